//! Plain Rust forms of the ROS 2 messages we read and write besides PointCloud2
//! (`std_msgs/Header`, `vision_msgs/Detection3DArray`), with their CDR encoding and the
//! `ros2msg` schema text that MCAP bags embed.

mod header;

pub use header::{HEADER_SCHEMA, Header, TIME_SCHEMA};
