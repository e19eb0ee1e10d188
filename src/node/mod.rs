//! The ROS 2 node `lidar_ptq_node`: PointCloud2 in, Detection3DArray and markers out.
//!
//! Everything that decides what the node does is plain Rust and builds without ROS:
//! parameters ([`params`]), the newest-scan-wins mailbox ([`mailbox`]), statistics
//! ([`stats`]), the published content ([`output`], [`diagnostics`]), the engine seam for
//! swapping in INT8 between scans ([`engine`]), calibration scan selection ([`calib`]),
//! background calibration ([`calibrator`]), the cheap checks of incoming clouds ([`intake`])
//! and scoring against ground truth ([`score`]). With the `ros` feature, [`convert`]
//! maps these to r2r message types and [`runtime`] wires them to a ROS node; ROS types
//! appear nowhere else.

pub mod calib;
pub mod calibrator;
pub mod diagnostics;
pub mod engine;
pub mod intake;
pub mod mailbox;
pub mod output;
pub mod params;
pub mod score;
pub mod stats;

/// The node's name (parameter files are keyed by it).
pub const NODE_NAME: &str = "lidar_ptq_node";

#[cfg(feature = "ros")]
pub mod convert;
#[cfg(feature = "ros")]
pub mod rosout;
#[cfg(feature = "ros")]
pub mod runtime;
