//! `vision_msgs/msg/Detection3DArray` (vision_msgs 4.x, Humble and later): plain types,
//! CDR encoding and decoding, the full `ros2msg` schema text, and conversion from and to
//! our `Object`s.

use super::Header;
use crate::boxes::{Box3d, Object};
use crate::cdr::{CdrError, CdrReader, CdrWriter};

/// `geometry_msgs/Pose`: position and orientation quaternion (x, y, z, w).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    pub position: [f64; 3],
    pub orientation: [f64; 4],
}

impl Default for Pose {
    fn default() -> Self {
        Self {
            position: [0.0; 3],
            orientation: [0.0, 0.0, 0.0, 1.0],
        }
    }
}

/// `geometry_msgs/PoseWithCovariance`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoseWithCovariance {
    pub pose: Pose,
    /// Row-major 6x6 covariance of (x, y, z, rot x, rot y, rot z).
    pub covariance: [f64; 36],
}

impl Default for PoseWithCovariance {
    fn default() -> Self {
        Self {
            pose: Pose::default(),
            covariance: [0.0; 36],
        }
    }
}

/// `vision_msgs/ObjectHypothesisWithPose` (its `ObjectHypothesis` flattened in).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ObjectHypothesisWithPose {
    pub class_id: String,
    pub score: f64,
    pub pose: PoseWithCovariance,
}

/// `vision_msgs/BoundingBox3D`: centre pose and full size (m).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BoundingBox3D {
    pub center: Pose,
    pub size: [f64; 3],
}

/// `vision_msgs/Detection3D`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Detection3D {
    pub header: Header,
    pub results: Vec<ObjectHypothesisWithPose>,
    pub bbox: BoundingBox3D,
    pub id: String,
}

/// `vision_msgs/Detection3DArray`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Detection3DArray {
    pub header: Header,
    pub detections: Vec<Detection3D>,
}

/// ROS 2 type name.
pub const DETECTION3D_ARRAY_TYPE: &str = "vision_msgs/msg/Detection3DArray";

const SEP: &str =
    "================================================================================\n";

/// `ros2msg` schema text of vision_msgs/msg/Detection3DArray with every dependency, as
/// rosbag2 embeds it in MCAP (the type's text, then `MSG: pkg/msg/Type` sections).
pub fn detection3d_array_schema() -> String {
    let sections: [(&str, &str); 11] = [
        ("std_msgs/Header", super::HEADER_SCHEMA),
        ("builtin_interfaces/Time", super::TIME_SCHEMA),
        (
            "vision_msgs/Detection3D",
            "std_msgs/Header header\nObjectHypothesisWithPose[] results\nBoundingBox3D bbox\nstring id\n",
        ),
        (
            "vision_msgs/ObjectHypothesisWithPose",
            "ObjectHypothesis hypothesis\ngeometry_msgs/PoseWithCovariance pose\n",
        ),
        (
            "vision_msgs/ObjectHypothesis",
            "string class_id\nfloat64 score\n",
        ),
        (
            "geometry_msgs/PoseWithCovariance",
            "Pose pose\nfloat64[36] covariance\n",
        ),
        (
            "geometry_msgs/Pose",
            "Point position\nQuaternion orientation\n",
        ),
        ("geometry_msgs/Point", "float64 x\nfloat64 y\nfloat64 z\n"),
        (
            "geometry_msgs/Quaternion",
            "float64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1\n",
        ),
        (
            "vision_msgs/BoundingBox3D",
            "geometry_msgs/Pose center\ngeometry_msgs/Vector3 size\n",
        ),
        ("geometry_msgs/Vector3", "float64 x\nfloat64 y\nfloat64 z\n"),
    ];
    let mut s = String::from("std_msgs/Header header\nDetection3D[] detections\n");
    for (name, text) in sections {
        s.push_str(SEP);
        s.push_str("MSG: ");
        s.push_str(name);
        s.push('\n');
        s.push_str(text);
    }
    s
}

fn write_pose(w: &mut CdrWriter, p: &Pose) {
    for v in p.position.iter().chain(&p.orientation) {
        w.f64(*v);
    }
}

fn read_pose(r: &mut CdrReader<'_>) -> Result<Pose, CdrError> {
    let mut p = Pose::default();
    for v in p.position.iter_mut() {
        *v = r.f64("pose.position")?;
    }
    for v in p.orientation.iter_mut() {
        *v = r.f64("pose.orientation")?;
    }
    Ok(p)
}

impl Detection3DArray {
    /// Serialises to a CDR payload (encapsulation header included).
    pub fn to_cdr(&self) -> Vec<u8> {
        let mut w = CdrWriter::with_capacity(64 + self.detections.len() * 480);
        self.header.write_cdr(&mut w);
        w.seq_len(self.detections.len());
        for d in &self.detections {
            d.header.write_cdr(&mut w);
            w.seq_len(d.results.len());
            for h in &d.results {
                w.string(&h.class_id);
                w.f64(h.score);
                write_pose(&mut w, &h.pose.pose);
                for v in &h.pose.covariance {
                    w.f64(*v);
                }
            }
            write_pose(&mut w, &d.bbox.center);
            for v in &d.bbox.size {
                w.f64(*v);
            }
            w.string(&d.id);
        }
        w.finish()
    }

    /// Parses a CDR payload; every length is checked against the bytes left.
    pub fn from_cdr(payload: &[u8]) -> Result<Self, CdrError> {
        let mut r = CdrReader::new(payload)?;
        let header = Header::read_cdr(&mut r)?;
        // A detection takes at least header (12) + results length (4) + bbox (80) + id (4).
        let n = r.seq_len("detections", 100)?;
        let mut detections = Vec::with_capacity(n);
        for _ in 0..n {
            let header = Header::read_cdr(&mut r)?;
            let m = r.seq_len("detection.results", 4 + 8 + 56 + 288)?;
            let mut results = Vec::with_capacity(m);
            for _ in 0..m {
                let class_id = r.string("hypothesis.class_id")?;
                let score = r.f64("hypothesis.score")?;
                let pose = read_pose(&mut r)?;
                let mut covariance = [0.0; 36];
                for v in covariance.iter_mut() {
                    *v = r.f64("pose.covariance")?;
                }
                results.push(ObjectHypothesisWithPose {
                    class_id,
                    score,
                    pose: PoseWithCovariance { pose, covariance },
                });
            }
            let center = read_pose(&mut r)?;
            let mut size = [0.0; 3];
            for v in size.iter_mut() {
                *v = r.f64("bbox.size")?;
            }
            let id = r.string("detection.id")?;
            detections.push(Detection3D {
                header,
                results,
                bbox: BoundingBox3D { center, size },
                id,
            });
        }
        Ok(Self { header, detections })
    }

    /// Objects as detections: one hypothesis per object (class, `score`), the box's
    /// centre and yaw as a pose, its size; `id` is the object's index. vision_msgs has
    /// no velocity or point count field, so those are not carried.
    pub fn from_objects(header: &Header, objects: &[Object], score: f64) -> Self {
        let detections = objects
            .iter()
            .enumerate()
            .map(|(i, o)| {
                let b = &o.bbox;
                let half = b.yaw as f64 * 0.5;
                let pose = Pose {
                    position: b.center.map(f64::from),
                    orientation: [0.0, 0.0, half.sin(), half.cos()],
                };
                Detection3D {
                    header: header.clone(),
                    results: vec![ObjectHypothesisWithPose {
                        class_id: o.class.clone(),
                        score,
                        pose: PoseWithCovariance {
                            pose,
                            covariance: [0.0; 36],
                        },
                    }],
                    bbox: BoundingBox3D {
                        center: pose,
                        size: b.size.map(f64::from),
                    },
                    id: i.to_string(),
                }
            })
            .collect();
        Self {
            header: header.clone(),
            detections,
        }
    }

    /// Detections back to objects (class of the best hypothesis, yaw from the quaternion).
    pub fn to_objects(&self) -> Vec<Object> {
        self.detections
            .iter()
            .map(|d| {
                let best = d.results.iter().max_by(|a, b| a.score.total_cmp(&b.score));
                let q = d.bbox.center.orientation;
                let yaw = (2.0 * (q[3] * q[2] + q[0] * q[1]))
                    .atan2(1.0 - 2.0 * (q[1] * q[1] + q[2] * q[2]));
                Object {
                    bbox: Box3d {
                        center: d.bbox.center.position.map(|v| v as f32),
                        size: d.bbox.size.map(|v| v as f32),
                        yaw: yaw as f32,
                    },
                    class: best.map(|h| h.class_id.clone()).unwrap_or_default(),
                    velocity: None,
                    num_points: None,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Detection3DArray {
        let h = Header::from_nanos(1_700_000_000_500_000_000, "velodyne");
        let objs = vec![
            Object {
                bbox: Box3d {
                    center: [10.0, -2.0, -0.8],
                    size: [4.6, 1.9, 1.7],
                    yaw: 0.5,
                },
                class: "car".into(),
                velocity: Some([1.0, 0.0]),
                num_points: Some(40),
            },
            Object {
                bbox: Box3d {
                    center: [5.0, 3.0, -0.9],
                    size: [0.7, 0.7, 1.75],
                    yaw: -2.0,
                },
                class: "pedestrian".into(),
                velocity: None,
                num_points: Some(0),
            },
        ];
        Detection3DArray::from_objects(&h, &objs, 1.0)
    }

    #[test]
    fn round_trips_and_recovers_objects() {
        let a = sample();
        let bytes = a.to_cdr();
        let b = Detection3DArray::from_cdr(&bytes).unwrap();
        assert_eq!(a, b);
        let objs = b.to_objects();
        assert_eq!(objs[0].class, "car");
        assert!((objs[0].bbox.yaw - 0.5).abs() < 1e-6);
        assert!((objs[1].bbox.yaw + 2.0).abs() < 1e-6);
        assert_eq!(objs[1].bbox.size, [0.7, 0.7, 1.75]);
        // Every truncation is an error, never a panic.
        for cut in 0..bytes.len() {
            assert!(
                Detection3DArray::from_cdr(&bytes[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn byte_layout_is_plain_cdr() {
        let h = Header::from_nanos(3_000_000_007, "ab");
        let mut hyp = ObjectHypothesisWithPose {
            class_id: "car".into(),
            score: 0.5,
            ..Default::default()
        };
        hyp.pose.covariance[0] = 2.0;
        let a = Detection3DArray {
            header: h.clone(),
            detections: vec![Detection3D {
                header: h,
                results: vec![hyp],
                bbox: BoundingBox3D {
                    center: Pose::default(),
                    size: [4.0, 2.0, 1.5],
                },
                id: "7".into(),
            }],
        };
        let b = a.to_cdr();
        let body = &b[4..];
        let u32_at = |o: usize| u32::from_le_bytes(body[o..o + 4].try_into().unwrap());
        let f64_at = |o: usize| f64::from_le_bytes(body[o..o + 8].try_into().unwrap());
        assert_eq!(&b[..4], &[0, 1, 0, 0]);
        // Array header: sec 0, nanosec 4, frame_id len 8 ("ab\0" at 12..15), pad to 16.
        assert_eq!(u32_at(0), 3);
        assert_eq!(u32_at(4), 7);
        assert_eq!(u32_at(8), 3);
        assert_eq!(&body[12..15], b"ab\0");
        assert_eq!(u32_at(16), 1); // detections
        // Detection header at 20..35, results count at 36.
        assert_eq!(u32_at(20), 3);
        assert_eq!(u32_at(28), 3);
        assert_eq!(u32_at(36), 1);
        // class_id: len 4 at 40, "car\0" at 44..48; score f64 at 48 (already aligned).
        assert_eq!(u32_at(40), 4);
        assert_eq!(&body[44..48], b"car\0");
        assert_eq!(f64_at(48), 0.5);
        // Pose: position 56..80, orientation 80..112 (w = 1 at 104); covariance 112..400.
        assert_eq!(f64_at(104), 1.0);
        assert_eq!(f64_at(112), 2.0);
        // bbox centre 400..456 (w at 448), size 456..480, id len at 480, "7\0" at 484.
        assert_eq!(f64_at(448), 1.0);
        assert_eq!(f64_at(456), 4.0);
        assert_eq!(f64_at(472), 1.5);
        assert_eq!(u32_at(480), 2);
        assert_eq!(&body[484..486], b"7\0");
        assert_eq!(body.len(), 486);
    }

    #[test]
    fn schema_names_every_dependency() {
        let s = detection3d_array_schema();
        assert!(s.starts_with("std_msgs/Header header\nDetection3D[] detections\n"));
        for dep in [
            "std_msgs/Header",
            "builtin_interfaces/Time",
            "vision_msgs/Detection3D",
            "vision_msgs/ObjectHypothesisWithPose",
            "vision_msgs/ObjectHypothesis",
            "geometry_msgs/PoseWithCovariance",
            "geometry_msgs/Pose",
            "geometry_msgs/Point",
            "geometry_msgs/Quaternion",
            "vision_msgs/BoundingBox3D",
            "geometry_msgs/Vector3",
        ] {
            let line = format!("{}\nMSG: {dep}\n", "=".repeat(80));
            assert_eq!(s.matches(&line).count(), 1, "{dep}");
        }
    }
}
