//! PointCloud2 -> `Points`: every field read at its declared offset, datatype and byte
//! order, with non-finite points dropped and counted.
//!
//! The buffer is never reinterpreted as a struct: real layouts (Velodyne, Livox,
//! Hesai) put floats at unaligned offsets. Each field read copies its bytes into an
//! array and converts with `from_le_bytes`/`from_be_bytes`, which compiles to an
//! unaligned load. The common case (x, y, z, intensity all little-endian f32) has
//! its own monomorphised loop without per-field type dispatch.

use serde::{Deserialize, Serialize};

use super::error::CloudError;
use super::fields::PointFieldType;
use super::message::{Geometry, PointCloud2};
use super::points::Points;
use crate::msgs::Header;

/// How a per-point time field is encoded. Decoded times are always seconds relative
/// to the header stamp, as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimeKind {
    /// Seconds relative to the header stamp (Velodyne ROS 2 `time`, f32).
    RelativeSeconds,
    /// Nanoseconds relative to the header stamp (Ouster `t`, u32; Autoware `time_stamp`).
    RelativeNanoseconds,
    /// Absolute seconds since the epoch (Hesai `timestamp`, f64).
    AbsoluteSeconds,
    /// Absolute nanoseconds since the epoch (Livox driver 2 `timestamp`, f64).
    AbsoluteNanoseconds,
    /// Absolute, unit unknown: per cloud, the first finite value decides between seconds
    /// and nanoseconds, whichever puts it closer to the header stamp. A stamp and a
    /// timestamp in the same clock differ by milliseconds, while the wrong unit is off
    /// by a factor of 1e9, so the choice is unambiguous except for values near zero,
    /// where both readings give nearly the same relative time anyway.
    Absolute,
}

/// A candidate name for the per-point time field and how to interpret it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeField {
    pub name: String,
    pub kind: TimeKind,
}

impl TimeField {
    pub fn new(name: impl Into<String>, kind: TimeKind) -> Self {
        Self {
            name: name.into(),
            kind,
        }
    }
}

/// Which fields to read and how. Candidate lists are tried in order; the first name
/// present in the cloud wins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DecodeOptions {
    pub x: String,
    pub y: String,
    pub z: String,
    /// Candidate intensity names, e.g. `["intensity"]` or `["reflectivity"]` for Ouster.
    pub intensity: Vec<String>,
    /// Multiplies the raw intensity, to reach the scale the model was trained with
    /// (e.g. 1/255 for u8 intensities and a model trained on KITTI's 0..1).
    pub intensity_scale: f32,
    /// Intensity of every point when no candidate field exists (used as is, not scaled).
    pub default_intensity: f32,
    /// Candidate per-point time fields. Defaults: `time` relative seconds (Velodyne),
    /// `t` and `time_stamp` relative nanoseconds (Ouster, Autoware), `timestamp`
    /// absolute with the unit detected (Livox ns, Hesai s).
    pub time: Vec<TimeField>,
    /// Candidate ring (beam index) names; values are converted to u16, saturating.
    pub ring: Vec<String>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            x: "x".into(),
            y: "y".into(),
            z: "z".into(),
            intensity: vec!["intensity".into()],
            intensity_scale: 1.0,
            default_intensity: 0.0,
            time: vec![
                TimeField::new("time", TimeKind::RelativeSeconds),
                TimeField::new("t", TimeKind::RelativeNanoseconds),
                TimeField::new("time_stamp", TimeKind::RelativeNanoseconds),
                TimeField::new("timestamp", TimeKind::Absolute),
            ],
            ring: vec!["ring".into(), "channel".into(), "line".into()],
        }
    }
}

/// A decoded cloud.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decoded {
    pub points: Points,
    /// Points dropped because x, y, z or intensity was NaN or infinite.
    pub dropped_non_finite: usize,
}

/// Decodes `cloud` into points, dropping non-finite ones.
pub fn decode(cloud: &PointCloud2, opts: &DecodeOptions) -> Result<Decoded, CloudError> {
    let g = cloud.geometry()?;
    let axis = |name: &str| -> Result<Reader, CloudError> {
        match cloud.readable_field(name)? {
            Some((off, ty)) => Ok(Reader::new(off, ty, cloud.is_bigendian)),
            None => Err(CloudError::MissingField {
                field: name.to_owned(),
                present: cloud
                    .fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    };
    let (rx, ry, rz) = (axis(&opts.x)?, axis(&opts.y)?, axis(&opts.z)?);
    let ri = first_present(cloud, opts.intensity.iter().map(String::as_str))?;
    let mut rt = None;
    for tf in &opts.time {
        if let Some((off, ty)) = cloud.readable_field(&tf.name)? {
            rt = Some((Reader::new(off, ty, cloud.is_bigendian), tf.kind));
            break;
        }
    }
    let rr = first_present(cloud, opts.ring.iter().map(String::as_str))?;

    let time = rt.map(|(r, kind)| {
        (
            r,
            TimeMap::new(kind, &cloud.header, || first_finite(cloud, g, r)),
        )
    });
    let ring = rr;
    let scale = opts.intensity_scale;
    let default_i = opts.default_intensity;

    let fast = !cloud.is_bigendian
        && [rx, ry, rz].iter().all(|r| r.ty == PointFieldType::Float32)
        && ri.is_none_or(|r| r.ty == PointFieldType::Float32);
    let out = if fast {
        let (ox, oy, oz) = (rx.off, ry.off, rz.off);
        let oi = ri.map(|r| r.off);
        run(cloud, g, time, ring, move |p| {
            let i = match oi {
                Some(o) => le_f32(p, o) * scale,
                None => default_i,
            };
            [le_f32(p, ox), le_f32(p, oy), le_f32(p, oz), i]
        })
    } else {
        run(cloud, g, time, ring, move |p| {
            let i = match ri {
                Some(r) => r.f32(p) * scale,
                None => default_i,
            };
            [rx.f32(p), ry.f32(p), rz.f32(p), i]
        })
    };
    Ok(out)
}

fn first_present<'a>(
    cloud: &PointCloud2,
    names: impl IntoIterator<Item = &'a str>,
) -> Result<Option<Reader>, CloudError> {
    for name in names {
        if let Some((off, ty)) = cloud.readable_field(name)? {
            return Ok(Some(Reader::new(off, ty, cloud.is_bigendian)));
        }
    }
    Ok(None)
}

/// The decode loop, generic over how x, y, z and intensity are read so that the
/// common layout gets a loop without type dispatch.
fn run(
    cloud: &PointCloud2,
    g: Geometry,
    time: Option<(Reader, TimeMap)>,
    ring: Option<Reader>,
    xyzi: impl Fn(&[u8]) -> [f32; 4],
) -> Decoded {
    let n = g.points();
    // Written at index k, which only advances for finite points: branch-free
    // compaction, truncated at the end.
    let mut x = vec![0f32; n];
    let mut y = vec![0f32; n];
    let mut z = vec![0f32; n];
    let mut it = vec![0f32; n];
    let mut t = if time.is_some() {
        vec![0f32; n]
    } else {
        Vec::new()
    };
    let mut rg = if ring.is_some() {
        vec![0u16; n]
    } else {
        Vec::new()
    };
    let mut k = 0usize;
    for row in rows(cloud, g) {
        for p in row.chunks_exact(g.point_step) {
            if k >= n {
                break;
            }
            let [px, py, pz, pi] = xyzi(p);
            x[k] = px;
            y[k] = py;
            z[k] = pz;
            it[k] = pi;
            if let Some((r, map)) = &time {
                t[k] = map.apply(r.f64(p));
            }
            if let Some(r) = &ring {
                // Saturating float -> int conversion: NaN -> 0, out of range clamps.
                rg[k] = r.f64(p) as u16;
            }
            let ok = px.is_finite() & py.is_finite() & pz.is_finite() & pi.is_finite();
            k += usize::from(ok);
        }
    }
    x.truncate(k);
    y.truncate(k);
    z.truncate(k);
    it.truncate(k);
    let time = time.map(|_| {
        t.truncate(k);
        t
    });
    let ring = ring.map(|_| {
        rg.truncate(k);
        rg
    });
    Decoded {
        points: Points {
            x,
            y,
            z,
            intensity: it,
            time,
            ring,
        },
        dropped_non_finite: n - k,
    }
}

/// The point bytes of each row (row padding excluded).
fn rows(cloud: &PointCloud2, g: Geometry) -> impl Iterator<Item = &[u8]> {
    let len = g.width * g.point_step;
    // Empty rows are skipped wholesale: a 0-width cloud may declare 2^32 rows.
    let height = if len == 0 { 0 } else { g.height };
    (0..height).filter_map(move |r| {
        let start = r * g.row_step;
        cloud.data.get(start..start + len)
    })
}

fn first_finite(cloud: &PointCloud2, g: Geometry, r: Reader) -> Option<f64> {
    rows(cloud, g)
        .flat_map(|row| row.chunks_exact(g.point_step))
        .map(|p| r.f64(p))
        .find(|v| v.is_finite())
}

/// Affine map from a raw time value to seconds relative to the header stamp:
/// `(v - origin) * scale - shift`, in f64 so absolute epoch values keep precision.
#[derive(Debug, Clone, Copy)]
struct TimeMap {
    origin: f64,
    scale: f64,
    shift: f64,
}

impl TimeMap {
    fn new(kind: TimeKind, header: &Header, first: impl FnOnce() -> Option<f64>) -> Self {
        let sec = f64::from(header.stamp_sec);
        let nsec = f64::from(header.stamp_nanosec);
        let seconds = Self {
            origin: sec,
            scale: 1.0,
            shift: nsec * 1e-9,
        };
        let nanos = Self {
            origin: sec * 1e9 + nsec,
            scale: 1e-9,
            shift: 0.0,
        };
        match kind {
            TimeKind::RelativeSeconds => Self {
                origin: 0.0,
                scale: 1.0,
                shift: 0.0,
            },
            TimeKind::RelativeNanoseconds => Self {
                origin: 0.0,
                scale: 1e-9,
                shift: 0.0,
            },
            TimeKind::AbsoluteSeconds => seconds,
            TimeKind::AbsoluteNanoseconds => nanos,
            TimeKind::Absolute => match first() {
                Some(v) if nanos.apply_f64(v).abs() < seconds.apply_f64(v).abs() => nanos,
                _ => seconds,
            },
        }
    }

    fn apply_f64(&self, v: f64) -> f64 {
        (v - self.origin) * self.scale - self.shift
    }

    #[inline(always)]
    fn apply(&self, v: f64) -> f32 {
        self.apply_f64(v) as f32
    }
}

/// Reads one field of a point. Offsets were validated against `point_step`, so the
/// `None` branches (yielding NaN, which drops the point) are never taken for a
/// validated cloud; they exist so that no read can go out of bounds.
#[derive(Debug, Clone, Copy)]
struct Reader {
    off: usize,
    ty: PointFieldType,
    be: bool,
}

#[inline(always)]
fn bytes<const N: usize>(p: &[u8], off: usize) -> Option<[u8; N]> {
    p.get(off..).and_then(|s| s.first_chunk::<N>()).copied()
}

#[inline(always)]
fn le_f32(p: &[u8], off: usize) -> f32 {
    bytes::<4>(p, off).map_or(f32::NAN, f32::from_le_bytes)
}

impl Reader {
    fn new(off: usize, ty: PointFieldType, be: bool) -> Self {
        Self { off, ty, be }
    }

    #[inline(always)]
    fn f32(&self, p: &[u8]) -> f32 {
        match self.ty {
            PointFieldType::Float32 => bytes::<4>(p, self.off).map_or(f32::NAN, |b| {
                if self.be {
                    f32::from_be_bytes(b)
                } else {
                    f32::from_le_bytes(b)
                }
            }),
            // Integers up to 32 bits are exact in f64, so this rounds once.
            _ => self.f64(p) as f32,
        }
    }

    #[inline(always)]
    fn f64(&self, p: &[u8]) -> f64 {
        macro_rules! read {
            ($t:ty, $n:literal) => {
                bytes::<$n>(p, self.off).map_or(f64::NAN, |b| {
                    let v = if self.be {
                        <$t>::from_be_bytes(b)
                    } else {
                        <$t>::from_le_bytes(b)
                    };
                    v as f64
                })
            };
        }
        match self.ty {
            PointFieldType::Int8 => read!(i8, 1),
            PointFieldType::Uint8 => read!(u8, 1),
            PointFieldType::Int16 => read!(i16, 2),
            PointFieldType::Uint16 => read!(u16, 2),
            PointFieldType::Int32 => read!(i32, 4),
            PointFieldType::Uint32 => read!(u32, 4),
            PointFieldType::Float32 => read!(f32, 4),
            PointFieldType::Float64 => read!(f64, 8),
        }
    }
}
