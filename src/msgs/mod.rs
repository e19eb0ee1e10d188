//! Plain Rust forms of the ROS 2 messages we read and write besides PointCloud2
//! (`std_msgs/Header`, `vision_msgs/Detection3DArray`), with their CDR encoding and the
//! `ros2msg` schema text that MCAP bags embed.

mod header;

pub use header::{HEADER_SCHEMA, Header, TIME_SCHEMA};

mod detection3d;

pub use detection3d::{
    BoundingBox3D, DETECTION3D_ARRAY_TYPE, Detection3D, Detection3DArray, ObjectHypothesisWithPose,
    Pose, PoseWithCovariance, detection3d_array_schema,
};
