//! The CDR form of `sensor_msgs/msg/PointCloud2` (as DDS and rosbag2 store it) and its
//! `ros2msg` schema text (as rosbag2 embeds it in MCAP).

use super::error::CloudError;
use super::fields::PointField;
use super::message::PointCloud2;
use crate::cdr::{CdrReader, CdrWriter};
use crate::msgs::Header;

/// ROS type name of the message.
pub const POINTCLOUD2_TYPE: &str = "sensor_msgs/msg/PointCloud2";

/// The `ros2msg` schema rosbag2 writes for PointCloud2 in MCAP: the .msg file verbatim,
/// then each dependency, depth first with each message's dependencies in sorted order
/// (rosbag2 keeps them in a `std::set`), each after "\n", a line of 80 `=` and a line
/// `MSG: <type as written in the .msg>`. The .msg texts are those of ROS 2 Humble's
/// common_interfaces / rcl_interfaces, comments included, byte for byte.
pub const POINTCLOUD2_SCHEMA: &str = "\
# This message holds a collection of N-dimensional points, which may
# contain additional information such as normals, intensity, etc. The
# point data is stored as a binary blob, its layout described by the
# contents of the \"fields\" array.
#
# The point cloud data may be organized 2d (image-like) or 1d (unordered).
# Point clouds organized as 2d images may be produced by camera depth sensors
# such as stereo or time-of-flight.

# Time of sensor data acquisition, and the coordinate frame ID (for 3d points).
std_msgs/Header header

# 2D structure of the point cloud. If the cloud is unordered, height is
# 1 and width is the length of the point cloud.
uint32 height
uint32 width

# Describes the channels and their layout in the binary data blob.
PointField[] fields

bool    is_bigendian # Is this data bigendian?
uint32  point_step   # Length of a point in bytes
uint32  row_step     # Length of a row in bytes
uint8[] data         # Actual point data, size is (row_step*height)

bool is_dense        # True if there are no invalid points

================================================================================
MSG: sensor_msgs/PointField
# This message holds the description of one point entry in the
# PointCloud2 message format.
uint8 INT8    = 1
uint8 UINT8   = 2
uint8 INT16   = 3
uint8 UINT16  = 4
uint8 INT32   = 5
uint8 UINT32  = 6
uint8 FLOAT32 = 7
uint8 FLOAT64 = 8

# Common PointField names are x, y, z, intensity, rgb, rgba
string name      # Name of field
uint32 offset    # Offset from start of point struct
uint8  datatype  # Datatype enumeration, see above
uint32 count     # How many elements in the field

================================================================================
MSG: std_msgs/Header
# Standard metadata for higher-level stamped data types.
# This is generally used to communicate timestamped data
# in a particular coordinate frame.

# Two-integer timestamp that is expressed as seconds and nanoseconds.
builtin_interfaces/Time stamp

# Transform frame with which this data is associated.
string frame_id

================================================================================
MSG: builtin_interfaces/Time
# This message communicates ROS Time defined here:
# https://design.ros2.org/articles/clock_and_time.html

# The seconds component, valid over all int32 values.
int32 sec

# The nanoseconds component, valid in the range [0, 10e9).
uint32 nanosec
";

/// Smallest CDR size of one PointField: empty-string length (4), offset (4),
/// datatype (1), count (4); bounds the declared field count before allocating.
const MIN_FIELD_BYTES: usize = 13;

impl PointCloud2 {
    /// Parses a CDR payload (encapsulation header included). Only little-endian plain
    /// CDR is accepted. Bytes after `is_dense` (DDS pads payloads to 4 bytes) are
    /// ignored. The result is not validated; `decode` does that.
    pub fn from_cdr(payload: &[u8]) -> Result<Self, CloudError> {
        let mut r = CdrReader::new(payload)?;
        let header = Header::read_cdr(&mut r)?;
        let height = r.u32("height")?;
        let width = r.u32("width")?;
        let n = r.seq_len("fields", MIN_FIELD_BYTES)?;
        let mut fields = Vec::with_capacity(n);
        for _ in 0..n {
            fields.push(PointField {
                name: r.string("fields[].name")?,
                offset: r.u32("fields[].offset")?,
                datatype: r.u8("fields[].datatype")?,
                count: r.u32("fields[].count")?,
            });
        }
        let is_bigendian = r.bool("is_bigendian")?;
        let point_step = r.u32("point_step")?;
        let row_step = r.u32("row_step")?;
        let data = r.bytes("data")?.to_vec();
        let is_dense = r.bool("is_dense")?;
        Ok(Self {
            header,
            height,
            width,
            fields,
            is_bigendian,
            point_step,
            row_step,
            data,
            is_dense,
        })
    }

    /// Serialises to a little-endian plain CDR payload (encapsulation header included).
    ///
    /// # Panics
    /// If `data` or `fields` has more than `u32::MAX` elements (not representable).
    pub fn to_cdr(&self) -> Vec<u8> {
        let names: usize = self.fields.iter().map(|f| f.name.len() + 20).sum();
        let mut w =
            CdrWriter::with_capacity(self.header.frame_id.len() + names + self.data.len() + 48);
        self.header.write_cdr(&mut w);
        w.u32(self.height);
        w.u32(self.width);
        w.seq_len(self.fields.len());
        for f in &self.fields {
            w.string(&f.name);
            w.u32(f.offset);
            w.u8(f.datatype);
            w.u32(f.count);
        }
        w.bool(self.is_bigendian);
        w.u32(self.point_step);
        w.u32(self.row_step);
        w.bytes(&self.data);
        w.bool(self.is_dense);
        w.finish()
    }
}
