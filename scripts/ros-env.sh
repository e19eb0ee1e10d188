# Source me (bash): makes .venv-ros/ (ROS 2 Jazzy from PyPI wheels, prepared by
# scripts/setup-ros.sh) look like a sourced ROS 2 install, for building the node
# (`cargo build --features ros`) and running it and rclpy scripts.
_lp_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_lp_venv="$_lp_root/.venv-ros"
if [ ! -x "$_lp_venv/bin/python" ]; then
  echo "ros-env.sh: $_lp_venv is missing; run scripts/setup-ros.sh first" >&2
  return 1 2>/dev/null || exit 1
fi
export VIRTUAL_ENV="$_lp_venv"
case ":$PATH:" in *":$_lp_venv/bin:"*) ;; *) export PATH="$_lp_venv/bin:$PATH" ;; esac
export ROS_DISTRO=jazzy ROS_VERSION=2 ROS_PYTHON_VERSION=3   # r2r's build panics without ROS_DISTRO
export AMENT_PREFIX_PATH="$_lp_venv" CMAKE_PREFIX_PATH="$_lp_venv"
# Libraries: the prefix, the wheels' vendored dependencies (site-packages/ros_*.libs, which
# their RPATHs stop finding once installed into <prefix>/lib), and libpython's directory.
_lp_ld="$_lp_venv/lib"
for _lp_d in "$_lp_venv"/lib/python3.11/site-packages/ros_*.libs; do
  [ -d "$_lp_d" ] && _lp_ld="$_lp_ld:$_lp_d"
done
_lp_pylib="$("$_lp_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
export LD_LIBRARY_PATH="$_lp_ld:$_lp_pylib"
export PYTHON="$_lp_venv/bin/python"          # build.rs asks it where libpython is
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1       # stops the wheels' .pth from re-executing Python
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp    # the only RMW the wheels ship
export ROS_HOME="${ROS_HOME:-$_lp_root/target/ros_home}"   # rcl writes its logs under ROS_HOME/log
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST            # DDS traffic stays on this host
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-42}"
# r2r generates Rust types only for these packages (it always adds rcl_interfaces,
# builtin_interfaces, unique_identifier_msgs, action_msgs); nested dependencies are listed.
export IDL_PACKAGE_FILTER="std_msgs;geometry_msgs;sensor_msgs;visualization_msgs;vision_msgs;autoware_perception_msgs;diagnostic_msgs;std_srvs;service_msgs"
unset _lp_root _lp_venv _lp_ld _lp_d _lp_pylib
