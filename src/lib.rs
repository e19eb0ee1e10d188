//! lidar_ptq: CenterPoint lidar 3D detection in INT8 with LiDAR-PTQ calibration.
//!
//! Data flows one way: scan -> points -> voxels/pillars -> network -> boxes -> messages.
//! Each module owns one concept; ROS types stay at the edge.

pub mod bag;
pub mod bench;
pub mod boxes;
pub mod cdr;
pub mod cloud;
pub mod dataset;
pub mod detector;
pub mod engine;
pub mod eval;
pub mod fsutil;
pub mod import;
pub mod kernels;
pub mod model;
pub mod msgs;
pub mod node;
pub mod ops;
pub mod quant;
pub mod render;
pub mod sim;
pub mod source;
pub mod sparse;
pub mod train;
