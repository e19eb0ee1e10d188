//! `lidar_ptq_node`: the ROS 2 detector node (feature `ros`). Parameters come from
//! `--ros-args` (see config/lidar_ptq_node.yaml); errors in them end the node with a
//! message naming the parameter and exit status 1.

fn main() {
    // Activations are allocated per layer: keep freed memory for the next scan.
    lidar_ptq::engine::keep_freed_memory();
    if let Err(e) = lidar_ptq::node::runtime::run() {
        // The ROS logger may not be installed yet (the context failed): say it on stderr too.
        log::error!("{e}");
        eprintln!("lidar_ptq_node: {e}");
        std::process::exit(1);
    }
}
