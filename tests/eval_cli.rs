//! `lidar_ptq eval` and `lidar_ptq detect` end to end on the tiny fixture model (seeded
//! random weights: these tests check the plumbing, the report's schema and the errors,
//! not accuracy), and the scorer on detections that are the ground truth.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lidar_ptq::bag::{BagWriter, Qos, WriterOptions};
use lidar_ptq::boxes::Detection;
use lidar_ptq::cloud::{self, Layout, POINTCLOUD2_SCHEMA, POINTCLOUD2_TYPE};
use lidar_ptq::eval::Frame;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::model::{ModelBundle, ModelConfig};
use lidar_ptq::msgs::Header;
use lidar_ptq::sim::record::{RecordOptions, record};
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};
use serde_json::Value;

const CLASSES: [&str; 3] = ["car", "pedestrian", "cyclist"];
const BANDS: [&str; 3] = ["0-30", "30-50", "50+"];

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> ModelConfig {
    ModelConfig::load(&repo().join("tests/fixtures/tiny_model.yaml")).unwrap()
}

/// The tiny model with seeded random weights, its config embedded.
fn write_model(dir: &Path) -> PathBuf {
    let cfg = tiny();
    let w = Weights::init(&Graph::build(&cfg).unwrap(), 5);
    let path = dir.join("tiny.safetensors");
    ModelBundle::save(&path, &cfg, &w, &BTreeMap::new()).unwrap();
    path
}

/// A 3-scan simulated drive with ground truth, as `lidar_ptq simulate` writes it.
fn write_bag(dir: &Path) -> PathBuf {
    let scene = Scene::new(SimConfig::new(LidarModel::Hdl32), 21);
    let opts = RecordOptions {
        frames: 3,
        ..Default::default()
    };
    record(&scene, &opts, &dir.join("drive"), |_| {}).unwrap()
}

fn lidar_ptq(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(args)
        .current_dir(repo())
        .env("RUST_LOG", "warn")
        .output()
        .expect("the lidar_ptq binary runs")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "lidar_ptq failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout.clone()).unwrap()
}

/// Runs a command that must fail; returns its stderr.
fn fails(args: &[&str]) -> String {
    let out = lidar_ptq(args);
    assert!(!out.status.success(), "{args:?} succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The report keys every consumer may rely on.
fn check_schema(r: &Value, classes: &[&str]) {
    for k in [
        "mAP",
        "NDS",
        "bev_iou_mAP",
        "frames",
        "model",
        "source",
        "per_class",
    ] {
        assert!(r.get(k).is_some(), "no {k} in {r}");
    }
    let per_class = r["per_class"].as_object().unwrap();
    let mut names: Vec<&str> = per_class.keys().map(String::as_str).collect();
    names.sort();
    let mut want = classes.to_vec();
    want.sort();
    assert_eq!(names, want);
    for (name, c) in per_class {
        for k in [
            "AP",
            "AP_by_threshold",
            "bev_iou_AP",
            "num_gt",
            "by_distance",
        ] {
            assert!(c.get(k).is_some(), "{name}: no {k} in {c}");
        }
        let num_gt = c["num_gt"].as_u64().unwrap();
        let by_t = c["AP_by_threshold"].as_object().unwrap();
        if num_gt > 0 {
            let ap = c["AP"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&ap), "{name}: AP {ap}");
            let keys: Vec<&str> = by_t.keys().map(String::as_str).collect();
            assert_eq!(keys, ["0.5", "1.0", "2.0", "4.0"]);
        } else {
            assert!(c["AP"].is_null() && by_t.is_empty(), "{name}: {c}");
        }
        for b in BANDS {
            let band = &c["by_distance"][b];
            assert!(
                band["AP"].is_null() || band["AP"].is_f64(),
                "{name} {b}: {band}"
            );
            assert!(band["num_gt"].is_u64(), "{name} {b}: {band}");
        }
    }
    for b in BANDS {
        assert!(r["by_distance"][b].is_object(), "no band {b}");
    }
}

#[test]
fn eval_on_a_bag_prints_one_json_object() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let bag = write_bag(tmp.path());
    let report_file = tmp.path().join("report.json");
    let args = [
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--json",
        "--out",
        s(&report_file),
    ];
    let stdout = ok(&lidar_ptq(&args));
    let r: Value = serde_json::from_str(&stdout).expect("stdout is one JSON object");
    check_schema(&r, &CLASSES);
    assert_eq!(r["frames"], 3);
    assert!(
        r["model"].as_str().unwrap().starts_with("tiny"),
        "{}",
        r["model"]
    );
    assert!(
        r["source"].as_str().unwrap().contains("/points"),
        "{}",
        r["source"]
    );
    // The simulated drive has objects, so the scores are numbers (of random weights).
    let gt: u64 = CLASSES
        .iter()
        .map(|c| r["per_class"][c]["num_gt"].as_u64().unwrap())
        .sum();
    assert!(gt > 0, "{r}");
    assert!(r["mAP"].is_f64() && r["NDS"].is_f64(), "{r}");
    // --out holds the same report; a second run gives the same bytes.
    let file: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert_eq!(file, r);
    assert_eq!(ok(&lidar_ptq(&args)), stdout);

    // --frames limits the scans, the named topics are the defaults; the table is readable.
    let out = ok(&lidar_ptq(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--topic",
        "/points",
        "--labels-topic",
        "/ground_truth/objects",
        "--frames",
        "2",
        "--json",
    ]));
    let r2: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r2["frames"], 2);

    // --classes scores a subset: the same per-class figures, the mean over the subset.
    let out = ok(&lidar_ptq(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--classes",
        "cyclist,car",
        "--json",
    ]));
    let sub: Value = serde_json::from_str(&out).unwrap();
    let kept: Vec<&String> = sub["per_class"].as_object().unwrap().keys().collect();
    assert_eq!(kept, ["car", "cyclist"], "{sub}");
    // A class without ground truth has a null AP and stays out of the mean.
    let mut aps = Vec::new();
    for c in ["car", "cyclist"] {
        assert_eq!(sub["per_class"][c], r["per_class"][c], "{c}");
        aps.extend(r["per_class"][c]["AP"].as_f64());
    }
    assert!(!aps.is_empty(), "{r}");
    let mean = aps.iter().sum::<f64>() / aps.len() as f64;
    assert!((sub["mAP"].as_f64().unwrap() - mean).abs() < 1e-12, "{sub}");
    let e = fails(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--classes",
        "car,truck",
    ]);
    assert!(e.contains("\"truck\"") && e.contains("pedestrian"), "{e}");
    let table = ok(&lidar_ptq(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
    ]));
    for word in ["car", "pedestrian", "cyclist", "mAP", "NDS", "50+"] {
        assert!(table.contains(word), "{word} not in\n{table}");
    }
}

#[test]
fn eval_on_kitti_scores_the_camera_view_classes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let kitti = common::data_dir().join("kitti");
    let out = ok(&lidar_ptq(&[
        "eval",
        "--model",
        s(&model),
        "--kitti",
        s(&kitti),
        "--json",
    ]));
    let r: Value = serde_json::from_str(&out).unwrap();
    check_schema(&r, &CLASSES);
    // Frames 000000-000005 have scans, labels and calibration.
    assert_eq!(r["frames"], 6);
    assert!(r["source"].as_str().unwrap().contains("field of view"));
    for c in ["car", "pedestrian"] {
        assert!(
            r["per_class"][c]["num_gt"].as_u64().unwrap() > 0,
            "{c}: {r}"
        );
    }
    // The one cyclist (frame 000001) is 45.8 m ahead: beyond the 40 m class range, so not
    // in the cyclist AP, but in the 30-50 m band, which ignores the class ranges.
    let cyclist = &r["per_class"]["cyclist"];
    assert_eq!(cyclist["num_gt"], 0, "{cyclist}");
    assert!(cyclist["AP"].is_null());
    assert_eq!(cyclist["by_distance"]["30-50"]["num_gt"], 1, "{cyclist}");
    // The directory itself (not its parent) and a frame limit.
    let two: Value = serde_json::from_str(&ok(&lidar_ptq(&[
        "eval",
        "--model",
        s(&model),
        "--kitti",
        s(&kitti.join("training")),
        "--frames",
        "2",
        "--json",
    ])))
    .unwrap();
    assert_eq!(two["frames"], 2);
}

#[test]
fn eval_on_simulated_scans_keeps_the_old_flags() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let cfg = tmp.path().join("config.yaml");
    std::fs::write(&cfg, tiny().to_yaml()).unwrap();
    // The former interface: --config with --weights, --frames as the number of scans.
    let out = ok(&lidar_ptq(&[
        "eval",
        "--config",
        s(&cfg),
        "--weights",
        s(&model),
        "--lidar",
        "vlp16",
        "--frames",
        "2",
        "--seed",
        "1000",
        "--json",
    ]));
    let r: Value = serde_json::from_str(&out).unwrap();
    check_schema(&r, &CLASSES);
    assert_eq!(r["frames"], 2);
    assert!(r["source"].as_str().unwrap().contains("vlp16"));
}

#[test]
fn detect_writes_detections_that_render_draws() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let bag = write_bag(tmp.path());
    let dets = tmp.path().join("dets.json");
    let png = tmp.path().join("dets.png");
    let stdout = ok(&lidar_ptq(&[
        "detect",
        "--model",
        s(&model),
        s(&bag),
        "--index",
        "1",
        "--json",
        "--out",
        s(&dets),
        "--png",
        s(&png),
    ]));
    let printed: Vec<Detection> = serde_json::from_str(&stdout).unwrap();
    let written: Vec<Detection> = serde_json::from_slice(&std::fs::read(&dets).unwrap()).unwrap();
    assert_eq!(printed, written);
    // Random weights still leave peaks over the prior's threshold (decode contract
    // checked in the detector's tests): the file is not trivially empty.
    assert!(!written.is_empty());
    for d in &written {
        assert!(
            CLASSES.contains(&d.class.as_str()) && d.score > 0.1,
            "{d:?}"
        );
    }
    assert_eq!(&std::fs::read(&png).unwrap()[..8], b"\x89PNG\r\n\x1a\n");
    // `render` reads the file as detections.
    let rendered = tmp.path().join("render.png");
    ok(&lidar_ptq(&[
        "render",
        s(&bag),
        "--index",
        "1",
        "--detections",
        s(&dets),
        "--out",
        s(&rendered),
    ]));
    assert!(rendered.is_file());
    // The table form on a dataset file.
    let scan = common::data_dir().join("kitti/training/velodyne/000001.bin");
    let table = ok(&lidar_ptq(&["detect", "--model", s(&model), s(&scan)]));
    assert!(table.contains("detections in"), "{table}");
}

#[test]
fn bad_inputs_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = write_model(tmp.path());
    let bag = write_bag(tmp.path());

    let missing = tmp.path().join("missing.safetensors");
    let e = fails(&["eval", "--model", s(&missing), "--bag", s(&bag)]);
    assert!(e.contains("missing.safetensors"), "{e}");
    let e = fails(&["detect", "--model", s(&missing), s(&bag)]);
    assert!(e.contains("missing.safetensors"), "{e}");

    // A config that describes another model.
    let e = fails(&[
        "eval",
        "--model",
        s(&model),
        "--config",
        "config/models/default.yaml",
        "--bag",
        s(&bag),
    ]);
    assert!(e.contains("does not describe the model"), "{e}");

    // Weights without their description, and no config given.
    let bare = tmp.path().join("bare.safetensors");
    Weights::init(&Graph::build(&tiny()).unwrap(), 5)
        .save(&bare, &BTreeMap::new())
        .unwrap();
    let e = fails(&["eval", "--model", s(&bare), "--bag", s(&bag)]);
    assert!(e.contains("carries no model description"), "{e}");

    // A bag with scans but no ground truth.
    let unlabelled = tmp.path().join("unlabelled");
    let mut w = BagWriter::create(&unlabelled, WriterOptions::default()).unwrap();
    w.add_topic(
        "/points",
        POINTCLOUD2_TYPE,
        POINTCLOUD2_SCHEMA,
        &[Qos::default()],
    )
    .unwrap();
    let frame = Scene::new(SimConfig::new(LidarModel::Vlp16), 1).frame(0);
    let header = Header::from_nanos(frame.stamp_ns, "lidar");
    let msg = cloud::encode(&frame.points, Layout::Velodyne, header).to_cdr();
    w.write("/points", frame.stamp_ns as i64, &msg).unwrap();
    let unlabelled = w.finish().unwrap();
    let e = fails(&["eval", "--model", s(&model), "--bag", s(&unlabelled)]);
    assert!(e.contains("vision_msgs/msg/Detection3DArray"), "{e}");

    // A labels topic the bag lacks, or one of the wrong type.
    let e = fails(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--labels-topic",
        "/nope",
    ]);
    assert!(e.contains("/nope"), "{e}");
    let e = fails(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--labels-topic",
        "/points",
    ]);
    assert!(e.contains("not vision_msgs/msg/Detection3DArray"), "{e}");

    // Not a KITTI directory; two sets at once; bag options without a bag.
    let e = fails(&["eval", "--model", s(&model), "--kitti", s(tmp.path())]);
    assert!(e.contains("velodyne"), "{e}");
    let e = fails(&[
        "eval",
        "--model",
        s(&model),
        "--bag",
        s(&bag),
        "--kitti",
        s(tmp.path()),
    ]);
    assert!(e.contains("cannot be used with"), "{e}");
    let e = fails(&["eval", "--model", s(&model), "--topic", "/points"]);
    assert!(e.contains("--bag"), "{e}");
}

/// Detections that are the ground truth score 1 everywhere, after a trip through the JSON
/// file format `detect` writes (and `render` reads).
#[test]
fn ground_truth_as_detections_scores_one() {
    let frames = lidar_ptq::train::sim_eval::eval_frames(LidarModel::Hdl64, 3, 77);
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs = Vec::new();
    for (k, (_, gt)) in frames.iter().enumerate() {
        // Objects without points are not ground truth that counts (nuScenes' rule), so a
        // perfect detector does not report them.
        let dets: Vec<Detection> = gt
            .iter()
            .filter(|o| o.num_points != Some(0))
            .enumerate()
            .map(|(i, o)| Detection {
                bbox: o.bbox,
                class: o.class.clone(),
                score: 1.0 - 0.001 * i as f32,
                velocity: o.velocity,
            })
            .collect();
        let path = tmp.path().join(format!("{k}.json"));
        std::fs::write(&path, serde_json::to_vec(&dets).unwrap()).unwrap();
        // The render path reads the same file as boxes.
        let boxes = lidar_ptq::dataset::read_objects_json(&path).unwrap();
        assert_eq!(boxes.len(), dets.len());
        let back: Vec<Detection> = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        pairs.push((gt.clone(), back));
    }
    let views: Vec<Frame<'_>> = pairs
        .iter()
        .map(|(gt, d)| Frame { gt, detections: d })
        .collect();
    let classes = ["car", "truck", "pedestrian", "cyclist", "barrier"];
    let report = lidar_ptq::eval::score(&views, &classes, "ground truth", "sim");
    let r = serde_json::to_value(&report).unwrap();
    let one = |v: &Value, what: &str| {
        let x = v.as_f64().unwrap_or_else(|| panic!("{what}: {v}"));
        assert!((x - 1.0).abs() < 1e-9, "{what}: {x}");
    };
    one(&r["mAP"], "mAP");
    one(&r["NDS"], "NDS");
    one(&r["bev_iou_mAP"], "bev_iou_mAP");
    let mut scored = 0;
    for c in classes {
        let pc = &r["per_class"][c];
        if pc["num_gt"].as_u64().unwrap() == 0 {
            continue;
        }
        scored += 1;
        one(&pc["AP"], c);
        one(&pc["bev_iou_AP"], c);
        for (t, v) in pc["AP_by_threshold"].as_object().unwrap() {
            one(v, &format!("{c} AP@{t}"));
        }
        for b in BANDS {
            if pc["by_distance"][b]["num_gt"].as_u64().unwrap() > 0 {
                one(&pc["by_distance"][b]["AP"], &format!("{c} {b}"));
                one(&pc["by_distance"][b]["bev_iou_AP"], &format!("{c} {b} BEV"));
            }
        }
    }
    assert!(scored >= 2, "too few classes with ground truth: {r}");
    // Dropping a third of the cars lowers car AP below 1 (the test can fail).
    let fewer: Vec<(Vec<lidar_ptq::boxes::Object>, Vec<Detection>)> = pairs
        .iter()
        .map(|(gt, d)| {
            let mut k = 0;
            let kept = d
                .iter()
                .filter(|x| {
                    k += 1;
                    x.class != "car" || k % 3 != 0
                })
                .cloned()
                .collect();
            (gt.clone(), kept)
        })
        .collect();
    let views: Vec<Frame<'_>> = fewer
        .iter()
        .map(|(gt, d)| Frame { gt, detections: d })
        .collect();
    let car = &lidar_ptq::eval::score(&views, &classes, "m", "sim").per_class["car"];
    assert!(car.ap.unwrap() < 0.95, "{:?}", car.ap);
}

/// The bag reader pairs every scan with the ground truth of its stamp, as simulated, and
/// the points it counts in the boxes agree with the simulator's own counts.
#[test]
fn bag_scans_stream_with_their_ground_truth() {
    use lidar_ptq::cloud::DecodeOptions;
    use lidar_ptq::source::{BagScanReader, read_bag_scans};
    let tmp = tempfile::tempdir().unwrap();
    let bag = write_bag(tmp.path());
    let scene = Scene::new(SimConfig::new(LidarModel::Hdl32), 21);
    let opts = DecodeOptions::default();
    let reader = BagScanReader::open(&bag, None, None, &opts).unwrap();
    assert_eq!(reader.cloud_topic(), "/points");
    assert_eq!(reader.labels_topic(), Some("/ground_truth/objects"));
    assert_eq!(reader.scan_count(), 3);
    let (mut agree, mut total) = (0, 0);
    let mut streamed = Vec::new();
    for (k, s) in reader.enumerate() {
        let s = s.unwrap();
        assert_eq!(s.index, k);
        let frame = scene.frame(k as u64);
        let mut gt = s
            .ground_truth
            .expect("every simulated scan has ground truth");
        assert_eq!(gt.len(), frame.objects.len());
        lidar_ptq::eval::sets::count_points(&s.scan.scan.points, &mut gt);
        for (a, b) in gt.iter().zip(&frame.objects) {
            assert_eq!(a.class, b.class);
            assert_eq!(a.bbox.center, b.bbox.center);
            let dyaw = (a.bbox.yaw - b.bbox.yaw).rem_euclid(std::f32::consts::TAU);
            assert!(dyaw.min(std::f32::consts::TAU - dyaw) < 1e-5);
            total += 1;
            if (a.num_points.unwrap() > 0) == (b.num_points.unwrap() > 0) {
                agree += 1;
            }
        }
        streamed.push(s.scan.scan.points);
    }
    eprintln!("{agree} of {total} objects agree on being empty");
    assert!(agree * 10 >= total * 9, "{agree} of {total}");
    // The collecting reader picks the same scan, with its ground truth.
    let one = read_bag_scans(&bag, None, &opts, |i| i == 1).unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].scan.points, streamed[1]);
    assert_eq!(one[0].scan.objects.len(), scene.frame(1).objects.len());
}
