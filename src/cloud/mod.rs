//! Point clouds: the plain `sensor_msgs/PointCloud2` representation, its decoding into
//! a structure-of-arrays point set and encoding back, and its CDR form.

mod points;

pub use points::Points;
