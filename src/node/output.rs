//! What the node publishes for one scan, in plain Rust: the detections that pass the
//! per-class thresholds and range, as `vision_msgs/Detection3DArray` content, and the
//! RViz markers (a DELETEALL first so boxes of the previous frame disappear, then a cube
//! and a label per box). The ROS edge (`convert`) only copies these into r2r types.

use super::params::NodeParams;
use crate::boxes::Detection;
use crate::msgs::{
    BoundingBox3D, Detection3D, Detection3DArray, Header, ObjectHypothesisWithPose, Pose,
    PoseWithCovariance,
};

/// Keeps detections at or above their class threshold and within `max_range` (BEV).
pub fn filter(mut dets: Vec<Detection>, params: &NodeParams) -> Vec<Detection> {
    dets.retain(|d| {
        let range_ok = params.max_range.is_none_or(|r| {
            let [x, y, _] = d.bbox.center;
            (x * x + y * y).sqrt() <= r
        });
        range_ok && d.score >= params.threshold_of(&d.class)
    });
    dets
}

/// A box's pose: centre and yaw as a quaternion about z.
pub fn pose_of(d: &Detection) -> Pose {
    let half = f64::from(d.bbox.yaw) * 0.5;
    Pose {
        position: d.bbox.center.map(f64::from),
        orientation: [0.0, 0.0, half.sin(), half.cos()],
    }
}

/// One object of `autoware_perception_msgs/DetectedObjects` (feature `autoware`), in plain
/// Rust: Autoware's class label, the pose, the box dimensions and the BEV velocity.
#[derive(Debug, Clone, PartialEq)]
pub struct AutowareObject {
    /// `ObjectClassification` label (UNKNOWN 0, CAR 1, TRUCK 2, BUS 3, TRAILER 4,
    /// MOTORCYCLE 5, BICYCLE 6, PEDESTRIAN 7).
    pub label: u8,
    pub probability: f32,
    pub pose: Pose,
    pub dimensions: [f64; 3],
    pub velocity: Option<[f64; 2]>,
}

/// Autoware's label of one of our class names; classes Autoware has no label for
/// (barrier, traffic cone) are UNKNOWN, construction vehicles are trucks.
pub fn autoware_label(class: &str) -> u8 {
    match class {
        "car" => 1,
        "truck" | "construction_vehicle" => 2,
        "bus" => 3,
        "trailer" => 4,
        "motorcycle" => 5,
        "bicycle" | "cyclist" => 6,
        "pedestrian" => 7,
        _ => 0,
    }
}

/// The detections as Autoware objects. Velocity is in the box's heading frame, as
/// Autoware's twist is (our models predict it in the sensor frame).
pub fn autoware_objects(dets: &[Detection]) -> Vec<AutowareObject> {
    dets.iter()
        .map(|d| AutowareObject {
            label: autoware_label(&d.class),
            probability: d.score,
            pose: pose_of(d),
            dimensions: d.bbox.size.map(f64::from),
            velocity: d.velocity.map(|[vx, vy]| {
                let (s, c) = f64::from(d.bbox.yaw).sin_cos();
                let (vx, vy) = (f64::from(vx), f64::from(vy));
                [c * vx + s * vy, -s * vx + c * vy]
            }),
        })
        .collect()
}

/// `vision_msgs/Detection3DArray` of the detections, every header the given one.
pub fn detection_array(header: &Header, dets: &[Detection]) -> Detection3DArray {
    let detections = dets
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let pose = pose_of(d);
            Detection3D {
                header: header.clone(),
                results: vec![ObjectHypothesisWithPose {
                    class_id: d.class.clone(),
                    score: f64::from(d.score),
                    pose: PoseWithCovariance {
                        pose,
                        covariance: [0.0; 36],
                    },
                }],
                bbox: BoundingBox3D {
                    center: pose,
                    size: d.bbox.size.map(f64::from),
                },
                id: i.to_string(),
            }
        })
        .collect();
    Detection3DArray {
        header: header.clone(),
        detections,
    }
}

/// visualization_msgs/Marker kinds the node emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerKind {
    /// action DELETEALL (3): clears every marker of the previous frame.
    DeleteAll,
    /// type CUBE (1), action ADD.
    Cube,
    /// type TEXT_VIEW_FACING (9), action ADD.
    Text,
}

impl MarkerKind {
    /// (type, action) wire values.
    pub fn type_and_action(self) -> (i32, i32) {
        match self {
            Self::DeleteAll => (0, 3),
            Self::Cube => (1, 0),
            Self::Text => (9, 0),
        }
    }
}

/// One marker's content.
#[derive(Debug, Clone, PartialEq)]
pub struct MarkerSpec {
    pub kind: MarkerKind,
    pub ns: &'static str,
    pub id: i32,
    pub pose: Pose,
    /// Cube: (length, width, height); text: z is the text height.
    pub scale: [f64; 3],
    /// RGBA in [0, 1].
    pub color: [f32; 4],
    pub text: String,
}

/// A distinct, stable colour per class index (golden-angle hue steps).
pub fn class_color(index: usize) -> [f32; 4] {
    let h = (index as f32 * 137.508).rem_euclid(360.0) / 60.0;
    let x = 1.0 - (h.rem_euclid(2.0) - 1.0).abs();
    let (r, g, b) = match h as u32 {
        0 => (1.0, x, 0.0),
        1 => (x, 1.0, 0.0),
        2 => (0.0, 1.0, x),
        3 => (0.0, x, 1.0),
        4 => (x, 0.0, 1.0),
        _ => (1.0, 0.0, x),
    };
    [r, g, b, 0.5]
}

/// The markers of one frame: DELETEALL, then per detection a translucent cube coloured
/// by class and a `class score` label above it.
pub fn markers(dets: &[Detection], classes: &[&str]) -> Vec<MarkerSpec> {
    let mut out = Vec::with_capacity(1 + 2 * dets.len());
    out.push(MarkerSpec {
        kind: MarkerKind::DeleteAll,
        ns: "",
        id: 0,
        pose: Pose::default(),
        scale: [0.0; 3],
        color: [0.0; 4],
        text: String::new(),
    });
    for (i, d) in dets.iter().enumerate() {
        let class_index = classes
            .iter()
            .position(|c| *c == d.class)
            .unwrap_or(classes.len());
        let color = class_color(class_index);
        let pose = pose_of(d);
        out.push(MarkerSpec {
            kind: MarkerKind::Cube,
            ns: "boxes",
            id: i as i32,
            pose,
            scale: d.bbox.size.map(f64::from),
            color,
            text: String::new(),
        });
        let mut label_pose = pose;
        label_pose.position[2] += f64::from(d.bbox.size[2]) * 0.5 + 0.5;
        label_pose.orientation = [0.0, 0.0, 0.0, 1.0];
        out.push(MarkerSpec {
            kind: MarkerKind::Text,
            ns: "labels",
            id: i as i32,
            pose: label_pose,
            scale: [0.0, 0.0, 0.8],
            color: [color[0], color[1], color[2], 1.0],
            text: format!("{} {:.2}", d.class, d.score),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;
    use crate::node::params::ParamValue;
    use std::collections::BTreeMap;

    fn det(class: &str, score: f32, x: f32, y: f32, yaw: f32) -> Detection {
        Detection {
            bbox: Box3d {
                center: [x, y, -1.0],
                size: [4.0, 2.0, 1.5],
                yaw,
            },
            class: class.into(),
            score,
            velocity: None,
        }
    }

    #[test]
    fn autoware_objects_map_classes_pose_and_heading_frame_velocity() {
        let mut d = det("pedestrian", 0.7, 3.0, -2.0, std::f32::consts::FRAC_PI_2);
        d.velocity = Some([0.0, 1.5]);
        let dets = vec![
            d,
            det("traffic_cone", 0.4, 1.0, 1.0, 0.0),
            det("car", 0.9, 0.0, 5.0, 0.3),
        ];
        let o = autoware_objects(&dets);
        assert_eq!(o.iter().map(|o| o.label).collect::<Vec<_>>(), vec![7, 0, 1]);
        assert_eq!(o[0].probability, 0.7);
        assert_eq!(o[0].pose, pose_of(&dets[0]));
        assert_eq!(o[0].dimensions, [4.0, 2.0, 1.5]);
        // Moving along +y while facing +y: 1.5 m/s forward in the box frame.
        let v = o[0].velocity.unwrap();
        assert!((v[0] - 1.5).abs() < 1e-6 && v[1].abs() < 1e-6, "{v:?}");
        assert_eq!(o[1].velocity, None);
        for (c, l) in [
            ("truck", 2),
            ("construction_vehicle", 2),
            ("bus", 3),
            ("trailer", 4),
        ] {
            assert_eq!(autoware_label(c), l, "{c}");
        }
        for (c, l) in [
            ("motorcycle", 5),
            ("bicycle", 6),
            ("cyclist", 6),
            ("barrier", 0),
        ] {
            assert_eq!(autoware_label(c), l, "{c}");
        }
    }

    fn params(pairs: &[(&str, ParamValue)]) -> NodeParams {
        let m: BTreeMap<String, ParamValue> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        NodeParams::from_values(&m).unwrap()
    }

    #[test]
    fn thresholds_and_range_filter() {
        let p = params(&[
            ("score_threshold", ParamValue::Double(0.5)),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["pedestrian=0.2".into()]),
            ),
            ("max_range", ParamValue::Double(30.0)),
        ]);
        let kept = filter(
            vec![
                det("car", 0.6, 10.0, 0.0, 0.0),
                det("car", 0.4, 10.0, 0.0, 0.0),
                det("pedestrian", 0.3, 5.0, 5.0, 0.0),
                det("car", 0.9, 25.0, 25.0, 0.0), // 35 m away
            ],
            &p,
        );
        let got: Vec<(&str, f32)> = kept.iter().map(|d| (d.class.as_str(), d.score)).collect();
        assert_eq!(got, vec![("car", 0.6), ("pedestrian", 0.3)]);
    }

    #[test]
    fn detection_arrays_carry_the_header_and_round_trip() {
        let h = Header::from_nanos(1_700_000_000_250_000_000, "lidar_top");
        let dets = vec![
            det("car", 0.75, 10.0, -3.0, 0.4),
            det("cyclist", 0.5, -2.0, 7.0, -2.5),
        ];
        let a = detection_array(&h, &dets);
        assert_eq!(a.header, h);
        assert!(a.detections.iter().all(|d| d.header == h));
        assert_eq!(a.detections[1].results[0].score, 0.5);
        assert_eq!(a.detections[1].id, "1");
        // Back through CDR and the independent quaternion -> yaw of msgs.
        let back = Detection3DArray::from_cdr(&a.to_cdr())
            .unwrap()
            .to_objects();
        for (o, d) in back.iter().zip(&dets) {
            assert_eq!(o.class, d.class);
            assert_eq!(o.bbox.center, d.bbox.center);
            assert_eq!(o.bbox.size, d.bbox.size);
            assert!((o.bbox.yaw - d.bbox.yaw).abs() < 1e-6);
        }
    }

    #[test]
    fn markers_clear_first_then_box_and_label_per_detection() {
        let dets = vec![
            det("car", 0.75, 10.0, -3.0, 0.4),
            det("pedestrian", 0.5, 1.0, 2.0, 0.0),
        ];
        let m = markers(&dets, &["car", "pedestrian"]);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].kind, MarkerKind::DeleteAll);
        assert_eq!(m[0].kind.type_and_action(), (0, 3));
        assert_eq!(m[1].kind.type_and_action(), (1, 0));
        assert_eq!(m[2].kind.type_and_action(), (9, 0));
        assert_eq!(m[1].scale, [4.0, 2.0, 1.5]);
        assert_eq!(m[2].text, "car 0.75");
        assert!(m[2].pose.position[2] > m[1].pose.position[2]);
        assert_ne!(m[1].color, m[3].color, "classes get different colours");
        // (ns, id) pairs are unique, so RViz keeps every marker.
        let mut keys: Vec<_> = m[1..].iter().map(|k| (k.ns, k.id)).collect();
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 4);
        for i in 0..12 {
            let c = class_color(i);
            assert!(c.iter().all(|v| (0.0..=1.0).contains(v)) && c[3] > 0.0);
        }
        assert_eq!(markers(&[], &[]).len(), 1);
    }
}
