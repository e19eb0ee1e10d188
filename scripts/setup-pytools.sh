#!/usr/bin/env bash
# Creates .venv-tools/ in the repo root with the Python tools that tests use as an
# independent check of our rosbag2/MCAP output (the reference readers, not our code).
# Idempotent: does nothing when the pinned versions are already installed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tools"
PY="$VENV/bin/python"

# Pinned so that a reference reader upgrade never changes what our tests accept.
PACKAGES=(
  "mcap==1.6.0"
  "mcap-ros2-support==0.6.0"
  "rosbags==0.11.9"
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
  echo "setup-pytools: ${PACKAGES[*]} already installed in $VENV"
  exit 0
fi

"$PY" -m pip install --quiet --disable-pip-version-check "${PACKAGES[@]}"
installed_ok || { echo "setup-pytools: install did not give the pinned versions" >&2; exit 1; }
echo "setup-pytools: installed ${PACKAGES[*]} in $VENV"
