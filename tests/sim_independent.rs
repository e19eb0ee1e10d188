//! `lidar_ptq simulate` bags read by the independent PyPI readers: foxglove's `mcap` +
//! `mcap-ros2-support` decode every message from the schema text embedded in the file, and
//! `rosbags` opens the bag directory through its metadata.yaml. What they decode must be
//! what our own readers see.

mod common;

use lidar_ptq::bag::Bag;
use lidar_ptq::cloud::{DecodeOptions, PointCloud2, decode};
use lidar_ptq::msgs::Detection3DArray;

const PY: &str = r#"
import json, sys, struct
from pathlib import Path
bag = Path(sys.argv[1])
out = {"clouds": [], "truth": []}
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
with open(bag / (bag.name + "_0.mcap"), "rb") as f:
    r = make_reader(f, decoder_factories=[DecoderFactory()])
    for schema, channel, message, m in r.iter_decoded_messages(log_time_order=True):
        if channel.topic == "/points":
            names = [fl.name for fl in m.fields]
            xi = names.index("x")
            off = m.fields[xi].offset
            xs = [struct.unpack_from("<f", bytes(m.data), k * m.point_step + off)[0] for k in range(3)]
            out["clouds"].append([m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id,
                                  m.width * m.height, m.point_step, names, xs])
        else:
            out["truth"].append([m.header.stamp.sec, m.header.stamp.nanosec, len(m.detections),
                [[d.results[0].hypothesis.class_id, d.bbox.center.position.x, d.bbox.size.x]
                 for d in m.detections[:3]]])
from rosbags.rosbag2 import Reader
with Reader(bag) as rd:
    out["rosbags_counts"] = sorted([c.topic, c.msgtype, c.msgcount] for c in rd.connections)
print(json.dumps(out))
"#;

#[test]
fn independent_readers_decode_simulated_bags() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("drive");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args([
            "simulate", "--lidar", "vlp16", "--frames", "2", "--seed", "3", "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    let py: serde_json::Value = serde_json::from_str(&common::run_python(PY, &[&out])).unwrap();

    let bag = Bag::open(&out).unwrap();
    let mut clouds = Vec::new();
    let mut truth = Vec::new();
    for m in bag.messages(&[]).unwrap() {
        let m = m.unwrap();
        if m.topic == "/points" {
            clouds.push(PointCloud2::from_cdr(&m.data).unwrap());
        } else {
            truth.push(Detection3DArray::from_cdr(&m.data).unwrap());
        }
    }
    assert_eq!((clouds.len(), truth.len()), (2, 2));
    for (c, p) in clouds.iter().zip(py["clouds"].as_array().unwrap()) {
        assert_eq!(p[0].as_i64().unwrap(), c.header.stamp_sec as i64);
        assert_eq!(p[1].as_u64().unwrap(), c.header.stamp_nanosec as u64);
        assert_eq!(p[2].as_str().unwrap(), c.header.frame_id);
        assert_eq!(p[3].as_u64().unwrap(), c.point_count());
        assert_eq!(p[4].as_u64().unwrap(), c.point_step as u64);
        let names: Vec<&str> = c.fields.iter().map(|f| f.name.as_str()).collect();
        let py_names: Vec<&str> = p[5]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(py_names, names);
        let pts = decode(c, &DecodeOptions::default()).unwrap().points;
        for k in 0..3 {
            assert_eq!(p[6][k].as_f64().unwrap() as f32, pts.x[k]);
        }
    }
    for (t, p) in truth.iter().zip(py["truth"].as_array().unwrap()) {
        assert_eq!(p[0].as_i64().unwrap(), t.header.stamp_sec as i64);
        assert_eq!(p[2].as_u64().unwrap(), t.detections.len() as u64);
        assert!(!t.detections.is_empty());
        for (d, q) in t.detections.iter().zip(p[3].as_array().unwrap()) {
            assert_eq!(q[0].as_str().unwrap(), d.results[0].class_id);
            assert_eq!(q[1].as_f64().unwrap(), d.bbox.center.position[0]);
            assert_eq!(q[2].as_f64().unwrap(), d.bbox.size[0]);
        }
    }
    let counts = &py["rosbags_counts"];
    assert_eq!(
        counts[0],
        serde_json::json!([
            "/ground_truth/objects",
            "vision_msgs/msg/Detection3DArray",
            2
        ])
    );
    assert_eq!(
        counts[1],
        serde_json::json!(["/points", "sensor_msgs/msg/PointCloud2", 2])
    );
}
