#!/usr/bin/env bash
# Our CPU engines against ONNX Runtime on this machine, on the same dense network
# (backbone + neck + head of a pillar preset, random weights), in alternating rounds so
# both see the same machine state. Prints one JSON line per round and the medians.
# Usage: scripts/bench-vs-ort.sh [PRESET=nuscenes-pillar] [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-nuscenes-pillar}"
ROUNDS="${2:-3}"
CONFIG="config/models/${PRESET//-/_}.yaml"
[[ -f "$CONFIG" ]] || { echo "bench-vs-ort: no config $CONFIG for preset $PRESET" >&2; exit 2; }

./scripts/setup-ort.sh >&2
cargo build --release --locked --bin lidar_ptq >&2
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  .venv-ort/bin/python scripts/bench_ort.py "$CONFIG" --threads "$(nproc)" 2>/dev/null > "$OUT/ort$r.json"
  ./target/release/lidar_ptq bench --preset "$PRESET" --int8 auto --iters 7 --warmup 2 --json 2>/dev/null > "$OUT/ours$r.json"
  # Where the CPU has AVX512-VNNI, our INT8 also with the AVX2 kernels forced.
  if grep -qw avx512_vnni /proc/cpuinfo; then
    LIDAR_PTQ_INT8_ISA=avx2 ./target/release/lidar_ptq bench --preset "$PRESET" --int8 auto \
      --iters 7 --warmup 2 --json 2>/dev/null > "$OUT/avx2$r.json"
  fi
done
python3 - "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
d, n = sys.argv[1], int(sys.argv[2])
rows = []
for r in range(1, n + 1):
    ort = json.load(open(f"{d}/ort{r}.json"))
    ours = json.load(open(f"{d}/ours{r}.json"))
    row = {
        "round": r,
        "ort_fp32_dense_ms": round(ort["fp32_dense_ms"], 1),
        "ours_fp32_dense_ms": round(ours["fp32_dense_ms"], 1),
        "ort_int8_dense_ms": round(ort["int8_dense_ms"], 1),
        "ours_int8_dense_ms": round(ours["int8_dense_ms"], 1),
        "ours_int8_isa": ours["isa"],
    }
    try:
        row["ours_int8_avx2_dense_ms"] = round(json.load(open(f"{d}/avx2{r}.json"))["int8_dense_ms"], 1)
    except FileNotFoundError:
        pass
    rows.append(row)
    print(json.dumps(row))
med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k not in ("round", "ours_int8_isa")}
med["ours_int8_isa"] = rows[0]["ours_int8_isa"]
med["fp32_ours_over_ort"] = round(med["ours_fp32_dense_ms"] / med["ort_fp32_dense_ms"], 3)
med["int8_ours_over_ort"] = round(med["ours_int8_dense_ms"] / med["ort_int8_dense_ms"], 3)
med["onnxruntime"] = ort["onnxruntime"]
med["dense_gmac"] = {"ort": round(ort["dense_gmac"], 3), "ours": round(ours["dense_gmac"], 3)}
med["threads"] = {"ort": ort["threads"], "ours": ours["threads"]}
med["cpu_features"] = ours["cpu_features"]
print(json.dumps({"median": med}, indent=2))
PY
