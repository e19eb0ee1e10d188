#!/usr/bin/env bash
# The GPU checks of the CUDA engine, on a machine with an NVIDIA GPU: every GPU test
# (FP32 within 1e-4 of the CPU engine, INT8 bit-identical to the CPU INT8 engine, FP16
# close, pillar and voxel models, CUDA graph replay equal to eager launches), then
# `lidar_ptq bench --device cuda` (pillar preset with and without CUDA graphs, the default
# model, the voxel preset) and the PyTorch baseline on the same card.
#
#   scripts/gpu-check.sh [BIN_DIR] [OUT_DIR]
#
# BIN_DIR holds `lidar_ptq` and `cuda-tests` (the test binary of tests/cuda.rs), built with
#   cargo build --release --features cuda --bin lidar_ptq
#   cargo test --release --features cuda --test cuda --no-run   (copy target/release/deps/cuda-*)
# Default: builds them here (needs cargo). Results land in OUT_DIR (default gpu-out/).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-}
OUT=${2:-gpu-out}
mkdir -p "$OUT"
if [ -z "$BIN" ]; then
    cargo build --release --features cuda --bin lidar_ptq || exit 1
    t=$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("profile", {}).get("test") and m.get("executable"): print(m["executable"])' | tail -1)
    BIN=target/gpu-bin
    mkdir -p "$BIN"
    cp target/release/lidar_ptq "$BIN/" && cp "$t" "$BIN/cuda-tests" || exit 1
fi
# CUDA libraries the engine loads at run time (the driver's libcuda is on the default path).
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib \
    $(find /usr /opt -name 'libcublas.so*' -printf '%h\n' 2>/dev/null | grep -v stubs | sort -u) \
    $(find /usr /opt -name 'libnvrtc.so*' -printf '%h\n' 2>/dev/null | grep -v stubs | sort -u); do
    [ -d "$d" ] && LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
export LD_LIBRARY_PATH
export CARGO_MANIFEST_DIR=$PWD RUST_LOG=${RUST_LOG:-info}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
status=0
"$BIN/cuda-tests" --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" || status=1
# nuScenes pillar preset: FP32, FP16, INT8 with the dense part as a CUDA graph (per-node GPU
# times of a few extra profiled runs go to bench.log), then the same without graphs.
LIDAR_PTQ_CUDA_PROFILE=1 "$BIN/lidar_ptq" bench --device cuda --preset nuscenes-pillar --iters 30 \
    --warmup 5 --json > "$OUT/bench_nuscenes_pillar.json" 2> "$OUT/bench.log" || status=1
cat "$OUT/bench_nuscenes_pillar.json"
grep -h "network on the host" "$OUT/bench.log"
LIDAR_PTQ_CUDA_GRAPH=0 "$BIN/lidar_ptq" bench --device cuda --preset nuscenes-pillar --iters 30 \
    --warmup 5 --json > "$OUT/bench_nuscenes_pillar_nograph.json" 2>> "$OUT/bench.log" || status=1
cat "$OUT/bench_nuscenes_pillar_nograph.json"
"$BIN/lidar_ptq" bench --device cuda --model models/default.safetensors --iters 30 --warmup 5 \
    --json > "$OUT/bench_default.json" 2>> "$OUT/bench.log" || status=1
cat "$OUT/bench_default.json"
# nuScenes voxel preset (sparse backbone on the GPU; rulebooks built on the CPU).
"$BIN/lidar_ptq" bench --device cuda --preset nuscenes-voxel --iters 10 --warmup 2 --json \
    > "$OUT/bench_nuscenes_voxel.json" 2>> "$OUT/bench.log" || status=1
cat "$OUT/bench_nuscenes_voxel.json"
python3 scripts/bench_torch.py config/models/nuscenes_pillar.yaml > "$OUT/torch_nuscenes_pillar.json" \
    2> "$OUT/torch.log" || status=1
cat "$OUT/torch_nuscenes_pillar.json"
exit $status
