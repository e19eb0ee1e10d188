//! `Points` -> PointCloud2 in the byte layouts real drivers publish, so the simulator
//! and tests can produce exactly what a node receives from each lidar.

use super::fields::{PointField, PointFieldType};
use super::message::PointCloud2;
use super::points::Points;
use crate::msgs::Header;

use PointFieldType::{Float32 as F32, Float64 as F64, Uint8 as U8, Uint16 as U16, Uint32 as U32};

/// Driver point layouts (offsets and point_step as the drivers publish them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// velodyne ROS 2: x y z intensity f32 @0/4/8/12, ring u16 @16, time f32 @18
    /// (seconds relative to the stamp); 22 bytes, packed.
    Velodyne,
    /// ouster-ros: x y z f32 @0/4/8, intensity f32 @16, t u32 @20 (ns relative),
    /// reflectivity u16 @24, ring u16 @26, ambient u16 @28, range u32 @32 (mm); 48 bytes.
    Ouster,
    /// livox_ros_driver2: x y z intensity f32, tag u8 @16, line u8 @17,
    /// timestamp f64 @18 (absolute ns); 26 bytes.
    Livox,
    /// Hesai: x y z intensity f32, ring u16 @16, timestamp f64 @18 (absolute s); 26 bytes.
    Hesai,
    /// Autoware PointXYZIRC: x y z f32, intensity u8 @12, return_type u8 @13,
    /// channel u16 @14; 16 bytes.
    AutowareXyzirc,
    /// Plain x y z intensity f32; 16 bytes.
    XyziF32,
}

impl Layout {
    pub const ALL: [Layout; 6] = [
        Self::Velodyne,
        Self::Ouster,
        Self::Livox,
        Self::Hesai,
        Self::AutowareXyzirc,
        Self::XyziF32,
    ];

    /// Bytes per point.
    pub fn point_step(self) -> u32 {
        match self {
            Self::Velodyne => 22,
            Self::Ouster => 48,
            Self::Livox | Self::Hesai => 26,
            Self::AutowareXyzirc | Self::XyziF32 => 16,
        }
    }

    /// The PointField list of the layout.
    pub fn fields(self) -> Vec<PointField> {
        let xyz = |v: &mut Vec<PointField>| {
            v.push(PointField::new("x", 0, F32));
            v.push(PointField::new("y", 4, F32));
            v.push(PointField::new("z", 8, F32));
        };
        let mut v = Vec::with_capacity(9);
        xyz(&mut v);
        match self {
            Self::Velodyne => {
                v.push(PointField::new("intensity", 12, F32));
                v.push(PointField::new("ring", 16, U16));
                v.push(PointField::new("time", 18, F32));
            }
            Self::Ouster => {
                v.push(PointField::new("intensity", 16, F32));
                v.push(PointField::new("t", 20, U32));
                v.push(PointField::new("reflectivity", 24, U16));
                v.push(PointField::new("ring", 26, U16));
                v.push(PointField::new("ambient", 28, U16));
                v.push(PointField::new("range", 32, U32));
            }
            Self::Livox => {
                v.push(PointField::new("intensity", 12, F32));
                v.push(PointField::new("tag", 16, U8));
                v.push(PointField::new("line", 17, U8));
                v.push(PointField::new("timestamp", 18, F64));
            }
            Self::Hesai => {
                v.push(PointField::new("intensity", 12, F32));
                v.push(PointField::new("ring", 16, U16));
                v.push(PointField::new("timestamp", 18, F64));
            }
            Self::AutowareXyzirc => {
                v.push(PointField::new("intensity", 12, U8));
                v.push(PointField::new("return_type", 13, U8));
                v.push(PointField::new("channel", 14, U16));
            }
            Self::XyziF32 => v.push(PointField::new("intensity", 12, F32)),
        }
        v
    }
}

/// Encodes `points` as an unorganised (height 1) little-endian cloud in `layout`.
///
/// Fields the points do not carry are filled as a driver would for the same point:
/// time 0 and ring 0 when absent, Ouster `range` = |xyz| in mm, `reflectivity` =
/// intensity rounded to u16, `ambient`, Livox `tag` and Autoware `return_type` 0
/// (unknown). Integer fields take the value rounded and saturated to their range
/// (e.g. Autoware's u8 intensity). Absolute timestamps are `header stamp + time`.
///
/// # Panics
/// If the vectors of `points` have different lengths (a broken `Points` invariant),
/// or the cloud exceeds 4 GiB (more than a PointCloud2 can describe).
pub fn encode(points: &Points, layout: Layout, header: Header) -> PointCloud2 {
    let n = points.len();
    assert!(
        points.y.len() == n && points.z.len() == n && points.intensity.len() == n,
        "Points vectors differ in length"
    );
    assert!(
        points.time.as_ref().is_none_or(|t| t.len() == n)
            && points.ring.as_ref().is_none_or(|r| r.len() == n),
        "Points time/ring length differs from the point count"
    );
    let step = layout.point_step() as usize;
    let width = u32::try_from(n).expect("more points than a PointCloud2 row holds");
    let row_step = u32::try_from(n * step).expect("PointCloud2 larger than 4 GiB");
    let stamp_s = f64::from(header.stamp_sec) + f64::from(header.stamp_nanosec) * 1e-9;
    let stamp_ns = f64::from(header.stamp_sec) * 1e9 + f64::from(header.stamp_nanosec);

    let mut data = vec![0u8; n * step];
    let mut dense = true;
    for (i, p) in data.chunks_exact_mut(step).enumerate() {
        let (x, y, z, it) = (points.x[i], points.y[i], points.z[i], points.intensity[i]);
        dense &= x.is_finite() && y.is_finite() && z.is_finite() && it.is_finite();
        let t = points.time.as_ref().map_or(0.0, |t| t[i]);
        let ring = points.ring.as_ref().map_or(0, |r| r[i]);
        put(p, 0, &x.to_le_bytes());
        put(p, 4, &y.to_le_bytes());
        put(p, 8, &z.to_le_bytes());
        match layout {
            Layout::Velodyne => {
                put(p, 12, &it.to_le_bytes());
                put(p, 16, &ring.to_le_bytes());
                put(p, 18, &t.to_le_bytes());
            }
            Layout::Ouster => {
                let range_mm =
                    (f64::from(x).hypot(f64::from(y)).hypot(f64::from(z)) * 1000.0).round() as u32;
                put(p, 16, &it.to_le_bytes());
                put(p, 20, &((f64::from(t) * 1e9).round() as u32).to_le_bytes());
                put(p, 24, &(it.round() as u16).to_le_bytes());
                put(p, 26, &ring.to_le_bytes());
                put(p, 28, &0u16.to_le_bytes());
                put(p, 32, &range_mm.to_le_bytes());
            }
            Layout::Livox => {
                put(p, 12, &it.to_le_bytes());
                put(p, 16, &[0]);
                put(p, 17, &[ring.min(255) as u8]);
                put(p, 18, &(stamp_ns + f64::from(t) * 1e9).to_le_bytes());
            }
            Layout::Hesai => {
                put(p, 12, &it.to_le_bytes());
                put(p, 16, &ring.to_le_bytes());
                put(p, 18, &(stamp_s + f64::from(t)).to_le_bytes());
            }
            Layout::AutowareXyzirc => {
                put(p, 12, &[it.round() as u8]);
                put(p, 13, &[0]);
                put(p, 14, &ring.to_le_bytes());
            }
            Layout::XyziF32 => put(p, 12, &it.to_le_bytes()),
        }
    }
    PointCloud2 {
        header,
        height: 1,
        width,
        fields: layout.fields(),
        is_bigendian: false,
        point_step: layout.point_step(),
        row_step,
        data,
        is_dense: dense,
    }
}

/// Writes `bytes` at `off` inside one point (offsets come from the layout table, all
/// inside `point_step`).
fn put(p: &mut [u8], off: usize, bytes: &[u8]) {
    p[off..off + bytes.len()].copy_from_slice(bytes);
}
