//! The ROS edge: r2r message types to and from our plain ones. Field-by-field copies
//! only; what the messages contain is decided in [`super::output`] and
//! [`super::diagnostics`].

use super::diagnostics::Status;
use super::output::MarkerSpec;
use super::params::ParamValue;
use crate::cloud;
use crate::msgs;
use r2r::builtin_interfaces::msg::Time;
use r2r::diagnostic_msgs::msg::{DiagnosticArray, DiagnosticStatus, KeyValue};
use r2r::geometry_msgs::msg::{Point, Pose, PoseWithCovariance, Quaternion, Vector3};
use r2r::sensor_msgs::msg::{PointCloud2, PointField};
use r2r::std_msgs::msg::{ColorRGBA, Header};
use r2r::vision_msgs::msg::{
    BoundingBox3D, Detection3D, Detection3DArray, ObjectHypothesis, ObjectHypothesisWithPose,
};
use r2r::visualization_msgs::msg::{Marker, MarkerArray};

pub fn header_from_r2r(h: &Header) -> msgs::Header {
    msgs::Header {
        stamp_sec: h.stamp.sec,
        stamp_nanosec: h.stamp.nanosec,
        frame_id: h.frame_id.clone(),
    }
}

pub fn header_to_r2r(h: &msgs::Header) -> Header {
    Header {
        stamp: Time {
            sec: h.stamp_sec,
            nanosec: h.stamp_nanosec,
        },
        frame_id: h.frame_id.clone(),
    }
}

/// Our PointCloud2 from r2r's (takes the data buffer without copying it).
pub fn cloud_from_r2r(m: PointCloud2) -> cloud::PointCloud2 {
    cloud::PointCloud2 {
        header: header_from_r2r(&m.header),
        height: m.height,
        width: m.width,
        fields: m
            .fields
            .into_iter()
            .map(|f| cloud::PointField {
                name: f.name,
                offset: f.offset,
                datatype: f.datatype,
                count: f.count,
            })
            .collect(),
        is_bigendian: m.is_bigendian,
        point_step: m.point_step,
        row_step: m.row_step,
        data: m.data,
        is_dense: m.is_dense,
    }
}

/// r2r's PointCloud2 from ours (for tests and tools publishing clouds).
pub fn cloud_to_r2r(c: &cloud::PointCloud2) -> PointCloud2 {
    PointCloud2 {
        header: header_to_r2r(&c.header),
        height: c.height,
        width: c.width,
        fields: c
            .fields
            .iter()
            .map(|f| PointField {
                name: f.name.clone(),
                offset: f.offset,
                datatype: f.datatype,
                count: f.count,
            })
            .collect(),
        is_bigendian: c.is_bigendian,
        point_step: c.point_step,
        row_step: c.row_step,
        data: c.data.clone(),
        is_dense: c.is_dense,
    }
}

fn pose_to_r2r(p: &msgs::Pose) -> Pose {
    Pose {
        position: Point {
            x: p.position[0],
            y: p.position[1],
            z: p.position[2],
        },
        orientation: Quaternion {
            x: p.orientation[0],
            y: p.orientation[1],
            z: p.orientation[2],
            w: p.orientation[3],
        },
    }
}

fn vector3(v: [f64; 3]) -> Vector3 {
    Vector3 {
        x: v[0],
        y: v[1],
        z: v[2],
    }
}

pub fn detections_to_r2r(a: &msgs::Detection3DArray) -> Detection3DArray {
    Detection3DArray {
        header: header_to_r2r(&a.header),
        detections: a
            .detections
            .iter()
            .map(|d| Detection3D {
                header: header_to_r2r(&d.header),
                results: d
                    .results
                    .iter()
                    .map(|r| ObjectHypothesisWithPose {
                        hypothesis: ObjectHypothesis {
                            class_id: r.class_id.clone(),
                            score: r.score,
                        },
                        pose: PoseWithCovariance {
                            pose: pose_to_r2r(&r.pose.pose),
                            covariance: r.pose.covariance.to_vec(),
                        },
                    })
                    .collect(),
                bbox: BoundingBox3D {
                    center: pose_to_r2r(&d.bbox.center),
                    size: vector3(d.bbox.size),
                },
                id: d.id.clone(),
            })
            .collect(),
    }
}

pub fn markers_to_r2r(header: &msgs::Header, specs: &[MarkerSpec]) -> MarkerArray {
    let header = header_to_r2r(header);
    MarkerArray {
        markers: specs
            .iter()
            .map(|m| {
                let (type_, action) = m.kind.type_and_action();
                Marker {
                    header: header.clone(),
                    ns: m.ns.to_owned(),
                    id: m.id,
                    type_,
                    action,
                    pose: pose_to_r2r(&m.pose),
                    scale: vector3(m.scale),
                    color: ColorRGBA {
                        r: m.color[0],
                        g: m.color[1],
                        b: m.color[2],
                        a: m.color[3],
                    },
                    text: m.text.clone(),
                    ..Default::default()
                }
            })
            .collect(),
    }
}

pub fn diagnostics_to_r2r(stamp: Time, statuses: &[Status]) -> DiagnosticArray {
    DiagnosticArray {
        header: Header {
            stamp,
            frame_id: String::new(),
        },
        status: statuses
            .iter()
            .map(|s| DiagnosticStatus {
                level: s.level as u8,
                name: s.name.clone(),
                message: s.message.clone(),
                hardware_id: s.hardware_id.clone(),
                values: s
                    .values
                    .iter()
                    .map(|(k, v)| KeyValue {
                        key: k.clone(),
                        value: v.clone(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn param_from_r2r(v: &r2r::ParameterValue) -> ParamValue {
    use r2r::ParameterValue as R;
    match v {
        R::NotSet => ParamValue::NotSet,
        R::Bool(b) => ParamValue::Bool(*b),
        R::Integer(i) => ParamValue::Integer(*i),
        R::Double(d) => ParamValue::Double(*d),
        R::String(s) => ParamValue::String(s.clone()),
        R::BoolArray(a) => ParamValue::BoolArray(a.clone()),
        R::ByteArray(a) => ParamValue::IntegerArray(a.iter().map(|&b| i64::from(b)).collect()),
        R::IntegerArray(a) => ParamValue::IntegerArray(a.clone()),
        R::DoubleArray(a) => ParamValue::DoubleArray(a.clone()),
        R::StringArray(a) => ParamValue::StringArray(a.clone()),
    }
}

pub fn param_to_r2r(v: &ParamValue) -> r2r::ParameterValue {
    use r2r::ParameterValue as R;
    match v {
        ParamValue::NotSet => R::NotSet,
        ParamValue::Bool(b) => R::Bool(*b),
        ParamValue::Integer(i) => R::Integer(*i),
        ParamValue::Double(d) => R::Double(*d),
        ParamValue::String(s) => R::String(s.clone()),
        ParamValue::BoolArray(a) => R::BoolArray(a.clone()),
        ParamValue::IntegerArray(a) => R::IntegerArray(a.clone()),
        ParamValue::DoubleArray(a) => R::DoubleArray(a.clone()),
        ParamValue::StringArray(a) => R::StringArray(a.clone()),
    }
}

/// A ROS time from nanoseconds since the epoch.
pub fn time_from_nanos(ns: u128) -> Time {
    Time {
        sec: (ns / 1_000_000_000) as i32,
        nanosec: (ns % 1_000_000_000) as u32,
    }
}

/// `autoware_perception_msgs/DetectedObjects` of the plain objects (feature `autoware`).
#[cfg(feature = "autoware")]
pub fn autoware_to_r2r(
    header: &msgs::Header,
    objects: &[crate::node::output::AutowareObject],
) -> r2r::autoware_perception_msgs::msg::DetectedObjects {
    use r2r::autoware_perception_msgs::msg::{
        DetectedObject, DetectedObjectKinematics, DetectedObjects, ObjectClassification, Shape,
    };
    use r2r::geometry_msgs::msg::{Twist, TwistWithCovariance};
    DetectedObjects {
        header: header_to_r2r(header),
        objects: objects
            .iter()
            .map(|o| DetectedObject {
                existence_probability: o.probability,
                classification: vec![ObjectClassification {
                    label: o.label,
                    probability: 1.0,
                }],
                kinematics: DetectedObjectKinematics {
                    pose_with_covariance: PoseWithCovariance {
                        pose: pose_to_r2r(&o.pose),
                        covariance: vec![0.0; 36],
                    },
                    has_position_covariance: false,
                    // CenterPoint regresses (cos, sin) of the heading: the sign is known.
                    orientation_availability: DetectedObjectKinematics::AVAILABLE as u8,
                    twist_with_covariance: TwistWithCovariance {
                        twist: Twist {
                            linear: vector3(o.velocity.map_or([0.0; 3], |[x, y]| [x, y, 0.0])),
                            ..Default::default()
                        },
                        covariance: vec![0.0; 36],
                    },
                    has_twist: o.velocity.is_some(),
                    has_twist_covariance: false,
                },
                shape: Shape {
                    type_: Shape::BOUNDING_BOX as u8,
                    dimensions: vector3(o.dimensions),
                    ..Default::default()
                },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::{Box3d, Detection};
    use crate::cloud::{Layout, Points, decode, encode};

    #[test]
    fn clouds_round_trip_and_decode_identically() {
        let mut pts = Points::with_capacity(3);
        pts.push(1.0, 2.0, 3.0, 10.0);
        pts.push(-4.0, 5.5, -0.5, 200.0);
        pts.push(7.25, -8.0, 1.0, 0.0);
        let ours = encode(
            &pts,
            Layout::Velodyne,
            msgs::Header::from_nanos(42, "lidar"),
        );
        let theirs = cloud_to_r2r(&ours);
        assert_eq!(theirs.header.frame_id, "lidar");
        assert_eq!(theirs.header.stamp.nanosec, 42);
        let back = cloud_from_r2r(theirs);
        assert_eq!(back, ours);
        let opts = Default::default();
        assert_eq!(decode(&back, &opts).unwrap(), decode(&ours, &opts).unwrap());
    }

    #[test]
    fn detections_keep_header_box_and_score() {
        let h = msgs::Header::from_nanos(1_700_000_000_000_000_123, "base");
        let d = Detection {
            bbox: Box3d {
                center: [1.0, 2.0, 3.0],
                size: [4.0, 2.0, 1.5],
                yaw: 0.3,
            },
            class: "car".into(),
            score: 0.625,
            velocity: None,
        };
        let a = detections_to_r2r(&crate::node::output::detection_array(&h, &[d]));
        assert_eq!(a.header.stamp.sec, 1_700_000_000);
        assert_eq!(a.header.stamp.nanosec, 123);
        assert_eq!(a.header.frame_id, "base");
        let det = &a.detections[0];
        assert_eq!(det.results[0].hypothesis.class_id, "car");
        assert_eq!(det.results[0].hypothesis.score, 0.625);
        assert_eq!(det.results[0].pose.covariance.len(), 36);
        assert_eq!(det.bbox.size.x, 4.0);
        assert_eq!(det.bbox.center.position.y, 2.0);
        assert!((det.bbox.center.orientation.z - 0.15f64.sin()).abs() < 1e-7);

        let m = markers_to_r2r(&h, &crate::node::output::markers(&[], &[]));
        assert_eq!(m.markers[0].action, 3);
        for v in [
            ParamValue::Double(0.5),
            ParamValue::StringArray(vec!["a".into()]),
            ParamValue::NotSet,
        ] {
            assert_eq!(param_from_r2r(&param_to_r2r(&v)), v);
        }
    }
}
