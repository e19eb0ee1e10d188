#!/usr/bin/env bash
# Creates .venv-ort/ in the repo root with ONNX Runtime, the CPU baseline that
# scripts/bench_ort.py times against `lidar_ptq bench` (not needed by the tests).
# Idempotent: does nothing when the pinned versions are already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ort"
PY="$VENV/bin/python"

# Pinned so that a baseline figure names the exact runtime that produced it.
PACKAGES=(
  "onnxruntime==1.32.0"
  "onnx==1.23.2"
  "numpy==2.4.6"
  "pyyaml==6.0.4"
)

if [[ ! -x "$PY" ]]; then
  python3 -m venv "$VENV"
fi

installed_ok() {
  local spec name want have
  for spec in "${PACKAGES[@]}"; do
    name="${spec%%==*}"
    want="${spec##*==}"
    have="$("$PY" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p')"
    [[ "$have" == "$want" ]] || return 1
  done
}

if installed_ok; then
  echo "setup-ort: ${PACKAGES[*]} already installed in $VENV"
  exit 0
fi

"$PY" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
installed_ok || { echo "setup-ort: install did not give the pinned versions" >&2; exit 1; }
echo "setup-ort: installed ${PACKAGES[*]} in $VENV"
