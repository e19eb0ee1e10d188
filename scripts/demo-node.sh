#!/usr/bin/env bash
# The product end to end on the built-in default: lidar_ptq_node with the shipped model
# (models/default.safetensors) fed by an rclpy player with a simulated drive at 10 Hz.
# The node serves FP32 detections, collects 16 distinct scans, calibrates INT8 with
# LiDAR-PTQ in the background, switches to INT8 between two scans and caches the model;
# a restart then loads the cache. Prints a summary: frames, detections, FP32 vs INT8
# latency, mAP against the ground truth. Sets up ROS 2 (Jazzy from PyPI) on first use.
# Runs scripts/test-node-e2e with demo settings; outputs in out/demo-node/.
# Usage: scripts/demo-node.sh   (from anywhere; root for the Debian packages on first use)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${DEMO_OUT:-$ROOT/out/demo-node}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
MODEL="${MODEL:-models/default.safetensors}" E2E_OUT="$OUT" E2E_CAL_FRAMES="${E2E_CAL_FRAMES:-16}" \
  E2E_ITERS="${E2E_ITERS:-100}" E2E_JOBS="${E2E_JOBS:-$(nproc)}" \
  scripts/test-node-e2e | tee "$log"
rc=${PIPESTATUS[0]}
summary="$(tail -n 1 "$log")"
python3 - "$summary" <<'PYEOF'
import json, sys
s = json.loads(sys.argv[1])
f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"
lat, proc = s["latency_ms"], s["processing_ms"]
r1, r2 = s["run1"], s["run2"]
print()
print("lidar_ptq_node on the default model, simulated HDL-32E drive at 10 Hz")
print(f"  run 1 (online calibration): {r1['frames_in']} scans sent, {r1['frames_out']} answered, "
      f"{r1['dropped']} dropped by newest-scan-wins, {s['malformed_skipped']} malformed skipped")
print(f"    switched to INT8: {s['switched_to_int8']} (LiDAR-PTQ in the background: "
      f"{f(s['calibration_s'])} s; gap at the switch {f(r1['switch_gap_ms'], 0)} ms)")
print(f"  run 2 (restart): cached INT8 model used: {s['restart_used_cache']}; "
      f"{r2['frames_in']} scans sent, {r2['frames_out']} answered, {s['detections']} detections")
print("  per scan (ms)            processing p50 / p99     latency p50 / p99")
for name, p, l in (("FP32", proc["fp32"], lat["fp32"]), ("INT8", proc["int8"], lat["int8"]),
                   ("INT8 after restart", proc["restart_int8"], lat["restart_int8"])):
    print(f"    {name:<22} {f(p['p50']):>8} / {f(p['p99']):<8}      {f(l['p50']):>8} / {f(l['p99'])}")
print(f"  mAP vs ground truth: node INT8 {f(s['mAP'], 3)} | offline INT8 (lidar_ptq eval) "
      f"{f(s['offline_mAP'], 3)} | offline FP32 {f(s['fp32_offline_mAP'], 3)}")
print(f"  checks failed: {s['checks_failed'] or 'none'}")
PYEOF
exit "$rc"
