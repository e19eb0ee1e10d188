#!/usr/bin/env bash
# The LiDAR-PTQ results (docs/ptq-results.md): every calibration baseline and LiDAR-PTQ
# ablation row, W8A8 and W4A8, on the default model, scored on the held-out hdl64
# validation bag (`eval`); their fidelity to the FP32 detections on the real KITTI and
# nuScenes scans (`fidelity`); the run-to-run noise over calibration seeds (other
# calibration scans and RNG seed); the calibration wall time.
#
# Every step leaves its result under WORK and is skipped when the result is there, so an
# interrupted run resumes where it stopped; remove WORK to measure afresh. Steps run one
# at a time (the machine is shared); the markdown is rewritten from WORK at the end.
#
# Usage: scripts/ptq-table.sh [WORK]            (default out/ptq-table)
# Environment: LIDAR_PTQ_BIN (target/release/lidar_ptq), VAL_BAG (out/val/hdl64),
#   DATA (../shared/data), FRAMES (calibration scans, 256), NOISE_SEEDS ("1 2"; empty:
#   no noise runs), NOISE_ROWS (rows run with every noise seed, "minmax lidar-ptq"),
#   BITS ("w8a8 w4a8"), NICE (10), DOC (docs/ptq-results.md), MODEL
#   (models/default.safetensors), CARD (its model card), TRAIN_SECONDS (its training
#   time, from the card; the eleven-class models/default11.safetensors took 6666),
#   TITLE (the model's name in the heading), EXTRA_ROWS (more rows,
#   "name|label|calibrate arguments" separated by ';').
# The voxel model's table: MODEL=models/default_voxel.safetensors \
#   CARD=models/default_voxel.md TRAIN_SECONDS=... TITLE="default voxel model" BITS=w8a8 \
#   NOISE_SEEDS= EXTRA_ROWS="layer-units|LiDAR-PTQ, every layer its own unit|--method lidar-ptq --layer-units" \
#   DOC=docs/ptq-results-voxel.md scripts/ptq-table.sh out/ptq-table-voxel
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-out/ptq-table}
BIN=${LIDAR_PTQ_BIN:-target/release/lidar_ptq}
MODEL=${MODEL:-models/default.safetensors}
CARD=${CARD:-models/default.md}
TRAIN_SECONDS=${TRAIN_SECONDS:-5441}
TITLE=${TITLE:-default model}
VAL=${VAL_BAG:-out/val/hdl64}
DATA=${DATA:-../shared/data}
FRAMES=${FRAMES:-256}
NOISE_SEEDS=${NOISE_SEEDS-1 2}
NICE=${NICE:-10}
DOC=${DOC:-docs/ptq-results.md}
SIM_SEED=2000000
[ -x "$BIN" ] || cargo build --release --locked --bin lidar_ptq
[ -d "$VAL" ] || scripts/make-val-bags.sh "$(dirname "$VAL")"
KITTI_SCANS=("$DATA"/kitti/training/velodyne/*.bin)
NUSC_SCANS=("$DATA"/nuscenes/*.pcd.bin)
mkdir -p "$WORK"
run() { nice -n "$NICE" "$BIN" "$@"; }

# name | table label | calibrate arguments
ROWS=(
  "minmax|min-max|--method minmax"
  "entropy|entropy (all entries)|--method entropy"
  "entropy-occupied|entropy (occupied entries)|--method entropy-occupied"
  "percentile|percentile 99.99 (all entries)|--method percentile"
  "percentile-occupied|percentile 99.99 (occupied entries)|--method percentile-occupied"
  "grid|LiDAR-PTQ: min-max + Lp grid search|--method lidar-ptq --no-tgpl --no-adaround"
  "tgpl|+ TGPL (step sizes learnt)|--method lidar-ptq --no-adaround"
  "lidar-ptq|+ adaptive rounding (= LiDAR-PTQ)|--method lidar-ptq"
)
# More rows after these: EXTRA_ROWS="name|label|args;name|label|args".
if [ -n "${EXTRA_ROWS:-}" ]; then
  IFS=';' read -r -a extra <<<"$EXTRA_ROWS"
  ROWS+=("${extra[@]}")
fi
read -r -a NOISE_ROWS <<<"${NOISE_ROWS:-minmax lidar-ptq}"
[ -n "$NOISE_SEEDS" ] || NOISE_ROWS=()
read -r -a BITS <<<"${BITS:-w8a8 w4a8}"

row_args() { for r in "${ROWS[@]}"; do if [ "${r%%|*}" = "$1" ]; then echo "${r##*|}"; fi; done; }
row_index() { for i in "${!ROWS[@]}"; do if [ "${ROWS[$i]%%|*}" = "$1" ]; then echo "$i"; fi; done; }

# calibrate BITS NAME SEED: WORK/BITS/NAME[-sSEED].safetensors, its log and wall time (s).
calibrate() {
  local bits=$1 name=$2 seed=$3 tag=$2
  [ "$seed" = 0 ] || tag=$name-s$seed
  local q=$WORK/$bits/$tag.safetensors
  mkdir -p "$WORK/$bits"
  if [ ! -f "$q" ]; then
    echo "calibrate $bits $tag" >&2
    local t0 t1
    t0=$(date +%s.%N)
    # shellcheck disable=SC2046
    run calibrate --model "$MODEL" --frames-from-sim "$FRAMES" --lidar hdl64,hdl32 \
      --sim-seed $((SIM_SEED + seed)) --seed "$seed" --bits "$bits" $(row_args "$name") \
      --out "$q.tmp" >"$WORK/$bits/$tag.log" 2>&1
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc >"$WORK/$bits/$tag.seconds"
    mv "$q.tmp" "$q"
  fi
  if [ ! -f "$WORK/$bits/$tag.json" ]; then
    echo "eval $bits $tag" >&2
    run eval --model "$MODEL" --bag "$VAL" --int8 "$q" --json --out "$WORK/$bits/$tag.json" >/dev/null
  fi
}

[ -f "$WORK/fp32.json" ] || run eval --model "$MODEL" --bag "$VAL" --json --out "$WORK/fp32.json" >/dev/null
for bits in "${BITS[@]}"; do
  for r in "${ROWS[@]}"; do calibrate "$bits" "${r%%|*}" 0; done
  for name in "${NOISE_ROWS[@]}"; do
    for s in $NOISE_SEEDS; do calibrate "$bits" "$name" "$s"; done
  done
  files=$(for r in "${ROWS[@]}"; do printf '%s,' "$WORK/$bits/${r%%|*}.safetensors"; done)
  # The validation bag also scores the noise runs (after the rows, in NOISE_ROWS order).
  noise_files=$(for name in "${NOISE_ROWS[@]}"; do for s in $NOISE_SEEDS; do
    printf '%s,' "$WORK/$bits/$name-s$s.safetensors"; done; done)
  for set in val kitti nuscenes; do
    out=$WORK/$bits/fidelity-$set.json
    [ -f "$out" ] && continue
    echo "fidelity $bits $set" >&2
    case $set in
      val) scans=("$VAL") ;;
      kitti) scans=("${KITTI_SCANS[@]}") ;;
      *) scans=("${NUSC_SCANS[@]}") ;;
    esac
    list=$files
    [ "$set" = val ] && list=$files$noise_files
    run fidelity "${scans[@]}" --model "$MODEL" --int8 "${list%,}" --json --out "$out" >/dev/null
  done
done

# ---- the markdown, from WORK only ----
f3() { printf '%.3f' "$1"; }
metric() { jq -r "$2" "$1"; }
line() { # label json
  local j=$2
  printf '| %s | %s | %s | %s | %s | %s | %s |' "$1" \
    "$(f3 "$(metric "$j" .mAP)")" \
    "$(f3 "$(metric "$j" '.per_class.car.AP')")" \
    "$(f3 "$(metric "$j" '.per_class.pedestrian.AP')")" \
    "$(f3 "$(metric "$j" '.by_distance["0-30"].mAP')")" \
    "$(f3 "$(metric "$j" '.by_distance["30-50"].mAP')")" \
    "$(f3 "$(metric "$j" '.by_distance["50+"].mAP')")"
}
fp_map=$(metric "$WORK/fp32.json" .mAP)
cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')
{
  echo "# LiDAR-PTQ results on the $TITLE"
  echo
  echo "Generated by \`scripts/ptq-table.sh\` (commit \`$(git rev-parse --short HEAD)\`,"
  echo "$(date -u +%Y-%m-%d)) on $(nproc) cores of an $cpu, shared with other work. Every"
  echo "number below was measured by that run; its raw reports (eval / fidelity JSON, calibrate"
  echo "logs) are in \`$WORK\`."
  echo
  echo "- Model: \`$MODEL\` (FP32, card \`$CARD\`)."
  echo "- Calibration: $FRAMES simulated scans of distinct scenes, alternating HDL-64E and"
  echo "  HDL-32E (scene stream seed $SIM_SEED, apart from training and validation), every layer"
  echo "  quantized (no keep-float), per-channel symmetric weights, per-tensor asymmetric"
  echo "  activations, per-feature input scales; calibration seed 0."
  echo "- Scores: \`eval\` on the held-out validation bag \`$VAL\` ($(jq .frames "$WORK/fp32.json") scans):"
  echo "  nuScenes-style centre-distance AP, $(jq '.per_class | length' "$WORK/fp32.json") classes; per-distance columns are the mAP within"
  echo "  each range band. On the same bag, \`fidelity\` against the FP32 detections (see"
  echo "  below): the share of FP32 boxes the INT8 model reproduces and the mean score error of"
  echo "  the matched boxes: quantization fidelity on the validation scans, without labels."
  echo
  echo "Commands (per row; BITS = w8a8 or w4a8, ARGS from the row list in the script):"
  echo
  echo '```'
  echo "lidar_ptq eval --model $MODEL --bag $VAL --json"
  echo "lidar_ptq calibrate --model $MODEL --frames-from-sim $FRAMES --lidar hdl64,hdl32 \\"
  echo "  --sim-seed $SIM_SEED --seed 0 --bits BITS ARGS --out Q"
  echo "lidar_ptq eval --model $MODEL --bag $VAL --int8 Q --json"
  echo "lidar_ptq fidelity $VAL --model $MODEL --int8 Q1,Q2,.. --json"
  echo "lidar_ptq fidelity $DATA/kitti/training/velodyne/*.bin --model $MODEL --int8 Q1,Q2,.. --json"
  echo "lidar_ptq fidelity $DATA/nuscenes/*.pcd.bin --model $MODEL --int8 Q1,Q2,.. --json"
  echo '```'
  echo
  echo "| row | calibrate arguments |"
  echo "|---|---|"
  for r in "${ROWS[@]}"; do
    IFS='|' read -r _ label args <<<"$r"
    echo "| $label | \`$args\` |"
  done
  for bits in "${BITS[@]}"; do
    B=${bits^^}
    echo
    echo "## $B on the validation bag"
    echo
    echo "| method | mAP | car AP | pedestrian AP | mAP 0-30 m | mAP 30-50 m | mAP 50+ m | mAP - FP32 | FP32 boxes kept | score error | calibrate s |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    echo "$(line FP32 "$WORK/fp32.json") | | | |"
    for k in "${!ROWS[@]}"; do
      IFS='|' read -r name label _ <<<"${ROWS[$k]}"
      j=$WORK/$bits/$name.json
      d=$(echo "$(metric "$j" .mAP) - $fp_map" | bc -l)
      fid=$(jq -r --argjson k "$k" '.int8[$k] | "\(.recall*1000|round/10) % | \(.mean_score_error*10000|round/10000)"' "$WORK/$bits/fidelity-val.json")
      echo "$(line "$label" "$j") $(printf '%+.3f' "$d") | $fid | $(printf '%.0f' "$(cat "$WORK/$bits/$name.seconds")") |"
    done
  done
  if [ ${#NOISE_ROWS[@]} -gt 0 ]; then
  echo
  echo "## Run-to-run noise"
  echo
  echo "The same row calibrated with other seeds: seed k draws other calibration scans"
  echo "(\`--sim-seed $((SIM_SEED))+k\`) and seeds the method's own sampling (\`--seed k\`)."
  echo
  echo "| bits | method | metric | seed 0 | $(for s in $NOISE_SEEDS; do printf 'seed %s | ' "$s"; done)mean | std (n-1) | max - min |"
  echo "|---|---|---|---|$(for _ in $NOISE_SEEDS; do printf -- '---|'; done)---|---|---|"
  nrows=${#ROWS[@]}
  for bits in "${BITS[@]}"; do
    fv=$WORK/$bits/fidelity-val.json
    k=0
    for name in "${NOISE_ROWS[@]}"; do
      # Index of the seed-0 row in the validation fidelity report.
      k0=$(row_index "$name")
      maps=("$(metric "$WORK/$bits/$name.json" .mAP)")
      errs=("$(jq ".int8[$k0].mean_score_error" "$fv")")
      for s in $NOISE_SEEDS; do
        maps+=("$(metric "$WORK/$bits/$name-s$s.json" .mAP)")
        errs+=("$(jq ".int8[$((nrows + k))].mean_score_error" "$fv")")
        k=$((k + 1))
      done
      for metric_name in mAP "score error"; do
        if [ "$metric_name" = mAP ]; then vals=("${maps[@]}"); else vals=("${errs[@]}"); fi
        stats=$(printf '%s\n' "${vals[@]}" | awk '{s+=$1; q+=$1*$1; if(NR==1||$1<lo)lo=$1; if(NR==1||$1>hi)hi=$1} END {m=s/NR; v=(q-NR*m*m)/(NR-1); if(v<0)v=0; printf "%.4f | %.4f | %.4f", m, sqrt(v), hi-lo}')
        printf '| %s | %s | %s |' "${bits^^}" "$name" "$metric_name"
        for v in "${vals[@]}"; do printf ' %s |' "$(printf '%.4f' "$v")"; done
        echo " $stats |"
      done
    done
  done
  fi
  echo
  echo "## Fidelity to FP32 on real scans"
  echo
  echo "\`fidelity\`: FP32 and INT8 detections (score >= the decode threshold) of the same scan;"
  echo "an FP32 box matches the nearest unmatched INT8 box of its class within 2 m (BEV"
  echo "centre), FP32 boxes in order of score. Recall: matched / FP32 boxes; precision:"
  echo "matched / INT8 boxes; errors are means over matched pairs. KITTI: ${#KITTI_SCANS[@]}"
  echo "scans ($(jq .fp32_boxes "$WORK/${BITS[0]}/fidelity-kitti.json") FP32 boxes); nuScenes: ${#NUSC_SCANS[@]} scan"
  echo "($(jq .fp32_boxes "$WORK/${BITS[0]}/fidelity-nuscenes.json") FP32 boxes)."
  echo
  echo "| bits | method | KITTI matched | recall | precision | centre m | score | nuScenes matched | recall | precision | centre m | score |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
  for bits in "${BITS[@]}"; do
    for k in "${!ROWS[@]}"; do
      IFS='|' read -r _ label _ <<<"${ROWS[$k]}"
      printf '| %s | %s |' "${bits^^}" "$label"
      for set in kitti nuscenes; do
        jq -r --argjson k "$k" '.fp32_boxes as $n | .int8[$k] |
          " \(.matched)/\($n) | \(.recall*1000|round/1000) | \(.precision*1000|round/1000) | \(.mean_centre_error_m*1000|round/1000) | \(.mean_score_error*10000|round/10000) |"' \
          "$WORK/$bits/fidelity-$set.json" | tr -d '\n'
      done
      echo
    done
  done
  echo
  echo "## Calibration cost"
  echo
  t=$(cat "$WORK/w8a8/lidar-ptq.seconds")
  echo "LiDAR-PTQ W8A8 on $FRAMES calibration scans (the row above, whole \`calibrate\`"
  echo "command including simulating the scans): $(printf '%.0f' "$t") s wall time. Training the"
  echo "$TITLE took $TRAIN_SECONDS s on this machine (\`$CARD\`): calibration costs"
  echo "$(echo "$t / $TRAIN_SECONDS * 100" | bc -l | xargs printf '%.1f') % of it ($(echo "$TRAIN_SECONDS / $t" | bc -l | xargs printf '%.0f')x cheaper)."
} >"$DOC.tmp"
mv "$DOC.tmp" "$DOC"
echo "wrote $DOC" >&2
