#!/usr/bin/env bash
# The held-out validation bags: simulated drives whose seeds (1000000 and up) the
# training stream never draws (training scene seeds are random 64-bit draws). 40 drives
# of 3 scans each per sensor, so the frames are distinct scenes rather than one drive.
# Usage: scripts/make-val-bags.sh [OUT_DIR]   (default out/val)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/val}
BIN=${LIDAR_PTQ_BIN:-target/release/lidar_ptq}
[ -x "$BIN" ] || cargo build --release --locked
mkdir -p "$OUT"
for lidar in hdl64 hdl32; do
  [ -d "$OUT/$lidar" ] || "$BIN" simulate --lidar "$lidar" --scenes 40 --frames 3 \
    --seed 1000000 --out "$OUT/$lidar"
done
