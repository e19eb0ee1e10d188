#!/usr/bin/env bash
# On a GPU machine: the HDL-64E validation bag (regenerated: simulation is deterministic),
# evaluated with INT8 models of the pillar and the voxel default models on the CPU and on
# the GPU (the reports must be identical), and in FP32 and FP16 on the GPU.
#   scripts/gpu-val-check.sh [LIDAR_PTQ_BINARY] [EXTRA_INT8_MODEL]
# The binary is built with --features cuda (default target/release/lidar_ptq); the extra
# INT8 model must be calibrated for models/default.safetensors (a min-max one is made here).
set -uo pipefail
cd "$(dirname "$0")/.."
B=${1:-target/release/lidar_ptq}
EXTRA=${2:-}
export RUST_LOG=warn
mkdir -p /tmp/val; [ -d /tmp/val/hdl64 ] || $B simulate --lidar hdl64 --scenes 40 --frames 3 --seed 1000000 --out /tmp/val/hdl64 >/dev/null 2>&1 || { echo "simulate failed"; exit 1; }
$B calibrate --model models/default.safetensors --frames-from-sim 32 --method minmax --out /tmp/q_minmax.safetensors >/dev/null 2>&1 || echo "calibrate failed"
for q in /tmp/q_minmax.safetensors $EXTRA; do
  for d in cpu cuda; do
    t0=$(date +%s.%N)
    $B eval --model models/default.safetensors --int8 $q --bag /tmp/val/hdl64 --device $d --json > /tmp/e_$d.json 2>/tmp/e_$d.log || { echo "eval $d failed"; tail -3 /tmp/e_$d.log; }
    echo "$q $d $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s"
  done
  python3 - <<'PY'
import json
a=json.load(open('/tmp/e_cpu.json')); b=json.load(open('/tmp/e_cuda.json'))
a.pop('model',None); b.pop('model',None)
print('INT8 CPU and GPU reports identical:', a==b, '| mAP', a.get('mAP', a.get('map')))
PY
done
# The voxel model: a min-max INT8 model, CPU and GPU reports identical.
$B calibrate --model models/default_voxel.safetensors --frames-from-sim 16 --method minmax \
    --out /tmp/qv_minmax.safetensors >/dev/null 2>&1 || echo "voxel calibrate failed"
for d in cpu cuda; do
  t0=$(date +%s.%N)
  $B eval --model models/default_voxel.safetensors --int8 /tmp/qv_minmax.safetensors \
      --bag /tmp/val/hdl64 --device $d --json > /tmp/ev_$d.json 2>/tmp/ev_$d.log || { echo "voxel eval $d failed"; tail -3 /tmp/ev_$d.log; }
  echo "voxel min-max $d $(python3 -c "print(round($(date +%s.%N)-$t0,1))") s"
done
python3 - <<'PY'
import json
a=json.load(open('/tmp/ev_cpu.json')); b=json.load(open('/tmp/ev_cuda.json'))
a.pop('model',None); b.pop('model',None)
print('voxel INT8 CPU and GPU reports identical:', a==b, '| mAP', a.get('mAP', a.get('map')))
PY
for p in "" "--fp16"; do
  $B eval --model models/default.safetensors --bag /tmp/val/hdl64 --device cuda $p --json > /tmp/f.json 2>/dev/null && python3 -c "import json; r=json.load(open('/tmp/f.json')); print('GPU ${p:-fp32} mAP', r.get('mAP', r.get('map')))"
done
