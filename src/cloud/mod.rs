//! Point clouds: the plain `sensor_msgs/PointCloud2` representation, its decoding into
//! a structure-of-arrays point set and encoding back, and its CDR form.

mod cdr;
mod decode;
mod encode;
mod error;
mod fields;
mod message;
mod points;

pub use cdr::{POINTCLOUD2_SCHEMA, POINTCLOUD2_TYPE};
pub use decode::{DecodeOptions, Decoded, TimeField, TimeKind, decode};
pub use encode::{Layout, encode};
pub use error::CloudError;
pub use fields::{PointField, PointFieldType};
pub use message::PointCloud2;
pub use points::Points;
