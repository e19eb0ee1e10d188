#!/usr/bin/env bash
# The main job, end to end on the built-in defaults (no network, no ROS needed): the
# shipped default model (models/default.safetensors) evaluated in FP32 on a held-out
# simulated validation bag, calibrated to INT8 with LiDAR-PTQ on simulated scans it never
# saw, evaluated again in INT8, timed FP32 vs INT8, and run on a real KITTI scan.
# Outputs (JSON reports, PNGs, the INT8 model) go to out/demo/.
# Usage: scripts/demo.sh   (from anywhere)
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${LIDAR_PTQ_DATA:-../shared/data}
OUT=out/demo
MODEL=models/default.safetensors
cargo build --release --locked
BIN=target/release/lidar_ptq
rm -rf "$OUT" && mkdir -p "$OUT"

# Held-out validation bag: 40 drives x 3 scans, seeds the training never drew.
"$BIN" simulate --lidar hdl64 --scenes 40 --frames 3 --seed 1000000 --out "$OUT/val_hdl64"
"$BIN" bag info "$OUT/val_hdl64"
"$BIN" eval --model "$MODEL" --bag "$OUT/val_hdl64" --out "$OUT/eval_fp32.json"
# INT8: LiDAR-PTQ on 32 unlabelled simulated scans (seed 2000000, apart from the rest).
"$BIN" calibrate --model "$MODEL" --frames-from-sim 32 --lidar hdl64 --method lidar-ptq \
  --out "$OUT/default_w8a8.safetensors"
"$BIN" eval --model "$MODEL" --int8 "$OUT/default_w8a8.safetensors" --bag "$OUT/val_hdl64" \
  --out "$OUT/eval_int8.json"
"$BIN" bench --model "$MODEL" --int8 "$OUT/default_w8a8.safetensors" --iters 5 --warmup 1
"$BIN" detect "$OUT/val_hdl64" --index 0 --model "$MODEL" --png "$OUT/val_frame0.png" \
  --out "$OUT/val_frame0.json" > /dev/null
if [ -d "$DATA/kitti" ]; then
  "$BIN" detect "$DATA/kitti/training/velodyne/000001.bin" --model "$MODEL" \
    --png "$OUT/kitti_000001.png" > /dev/null
  "$BIN" eval --model "$MODEL" --kitti "$DATA/kitti" --out "$OUT/eval_kitti.json"
fi
echo "demo outputs in $OUT:"
ls -1 "$OUT"
