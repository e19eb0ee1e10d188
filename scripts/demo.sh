#!/usr/bin/env bash
# The main job, end to end on the built-in defaults (no network, no ROS needed):
# simulate a labelled HDL-64E drive into a rosbag2 MCAP bag, inspect it, render a scan
# with its ground truth, render a real KITTI scan with its labels, and measure the
# simulator against the real scans. Outputs go to out/demo/.
# Usage: scripts/demo.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${LIDAR_PTQ_DATA:-../shared/data}
OUT=out/demo
cargo build --release --locked
BIN=target/release/lidar_ptq
rm -rf "$OUT" && mkdir -p "$OUT"

"$BIN" simulate --lidar hdl64 --frames 10 --seed 7 --out "$OUT/sim_bag"
"$BIN" bag info "$OUT/sim_bag"
"$BIN" render "$OUT/sim_bag" --index 0 --extent 60 --out "$OUT/sim_frame0.png"
if [ -d "$DATA/kitti" ]; then
  "$BIN" render "$DATA/kitti/training/velodyne/000001.bin" --extent 60 --out "$OUT/kitti_000001.png"
  "$BIN" sim-report --data "$DATA" --out "$OUT/realism.md" > /dev/null
fi
echo "demo outputs in $OUT:"
ls -1 "$OUT"
