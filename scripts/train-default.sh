#!/usr/bin/env bash
# Trains the default model from scratch (about 1.5-2 hours on a 2-core machine) and
# writes the held-out validation bags it is evaluated on. This is how
# models/default.safetensors was made; see models/default.md for the figures.
# Usage: scripts/train-default.sh [OUT_DIR]   (resumable: rerun it after an interruption)
# CONFIG=config/models/default11.yaml trains the previous, eleven-class default instead.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/train-default}
CONFIG=${CONFIG:-config/models/default.yaml}
cargo build --release --locked
BIN=target/release/lidar_ptq
RESUME=()
[ -f "$OUT/optimizer.safetensors" ] && RESUME=(--resume)
"$BIN" train --config "$CONFIG" --lidar hdl64,hdl32 \
  --steps 4000 --batch 2 --seed 1 --max-lr 2e-3 --checkpoint-every 250 \
  --out "$OUT" "${RESUME[@]}"
scripts/make-val-bags.sh
