//! `std_msgs/msg/Header` and `builtin_interfaces/msg/Time`.

use crate::cdr::{CdrError, CdrReader, CdrWriter};

/// `std_msgs/msg/Header`: stamp and frame id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub stamp_sec: i32,
    pub stamp_nanosec: u32,
    pub frame_id: String,
}

/// `ros2msg` text of std_msgs/msg/Header, as rosbag2 embeds it.
pub const HEADER_SCHEMA: &str = "builtin_interfaces/Time stamp\nstring frame_id\n";
/// `ros2msg` text of builtin_interfaces/msg/Time.
pub const TIME_SCHEMA: &str = "int32 sec\nuint32 nanosec\n";

impl Header {
    /// A header stamped `ns` nanoseconds after the epoch.
    pub fn from_nanos(ns: u64, frame_id: impl Into<String>) -> Self {
        Self {
            stamp_sec: (ns / 1_000_000_000) as i32,
            stamp_nanosec: (ns % 1_000_000_000) as u32,
            frame_id: frame_id.into(),
        }
    }

    /// The stamp in nanoseconds since the epoch (negative stamps clamp to 0).
    pub fn stamp_nanos(&self) -> u64 {
        (self.stamp_sec.max(0) as u64) * 1_000_000_000 + self.stamp_nanosec as u64
    }

    pub fn read_cdr(r: &mut CdrReader<'_>) -> Result<Self, CdrError> {
        Ok(Self {
            stamp_sec: r.i32("header.stamp.sec")?,
            stamp_nanosec: r.u32("header.stamp.nanosec")?,
            frame_id: r.string("header.frame_id")?,
        })
    }

    pub fn write_cdr(&self, w: &mut CdrWriter) {
        w.i32(self.stamp_sec);
        w.u32(self.stamp_nanosec);
        w.string(&self.frame_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_through_cdr() {
        let h = Header::from_nanos(1_700_000_000_123_456_789, "velodyne");
        assert_eq!(h.stamp_sec, 1_700_000_000);
        assert_eq!(h.stamp_nanosec, 123_456_789);
        let mut w = CdrWriter::new();
        h.write_cdr(&mut w);
        let buf = w.finish();
        let mut r = CdrReader::new(&buf).unwrap();
        assert_eq!(Header::read_cdr(&mut r).unwrap(), h);
        assert_eq!(h.stamp_nanos(), 1_700_000_000_123_456_789);
    }
}
