#!/usr/bin/env bash
# Trains the default voxel model (config/models/default_voxel.yaml) with the default pillar
# model's recipe (how models/default_voxel.safetensors was made; see its card): simulated HDL-64E and HDL-32E scans, 4000 steps of batch 2, one-cycle LR.
# A forward pass costs about 1.25x the pillar model's on the CPU, so expect 2-3 hours on
# a 2-core machine. Resumable: rerun it after an interruption; STOP_AFTER=N stops after
# step N (a later run resumes exactly where it stopped), to spread training over sessions.
# Usage: scripts/train-default-voxel.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/train-default-voxel}
cargo build --release --locked --bin lidar_ptq
BIN=target/release/lidar_ptq
ARGS=()
[ -f "$OUT/optimizer.safetensors" ] && ARGS+=(--resume)
[ -n "${STOP_AFTER:-}" ] && ARGS+=(--stop-after "$STOP_AFTER")
"$BIN" train --config config/models/default_voxel.yaml --lidar hdl64,hdl32 \
  --steps 4000 --batch 2 --seed 1 --max-lr 2e-3 --checkpoint-every 250 \
  --out "$OUT" "${ARGS[@]}"
[ -d out/val/hdl64 ] || scripts/make-val-bags.sh
