//! `lidar_ptq calibrate` run as users run it: a model file with its config embedded, scans
//! from a simulated bag or the simulator, an INT8 model file that loads for that model.

use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::quant::file;
use lidar_ptq::sim::record::{RecordOptions, record};
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

const TINY: &str = include_str!("fixtures/tiny_model.yaml");

fn calibrate(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .arg("calibrate")
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The tiny model's weights with its config embedded, as `train` writes them.
fn model(dir: &Path) -> (ModelConfig, Weights) {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let w = Weights::init(&Graph::build(&cfg).unwrap(), 3);
    let meta = BTreeMap::from([("config".to_string(), cfg.to_yaml())]);
    w.save(&dir.join("model.safetensors"), &meta).unwrap();
    (cfg, w)
}

#[test]
fn calibrates_from_a_bag_and_from_the_simulator() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, w) = model(dir.path());
    let m = dir.path().join("model.safetensors");
    let scene = Scene::new(SimConfig::new(LidarModel::Vlp16), 5);
    let opts = RecordOptions {
        frames: 4,
        ..RecordOptions::default()
    };
    let bag = record(&scene, &opts, &dir.path().join("bag"), |_| {}).unwrap();
    let q = dir.path().join("q.safetensors");
    let args = [
        "--model",
        m.to_str().unwrap(),
        "--bag",
        bag.to_str().unwrap(),
        "--frames",
        "3",
        "--iters",
        "4",
        "--recon-frames",
        "2",
        "--out",
        q.to_str().unwrap(),
    ];
    let out = calibrate(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("on 3 frames"), "{}", text(&out));
    let qm = file::load_for(&q, &cfg, &w).unwrap();
    assert_eq!(qm.provenance.method, "lidar-ptq");
    assert_eq!(qm.provenance.frames, 3);
    // The same inputs give the same file.
    let first = std::fs::read(&q).unwrap();
    let out = calibrate(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(std::fs::read(&q).unwrap(), first);

    // Simulated scans instead of a bag; a baseline method and W4A8.
    let q2 = dir.path().join("q2.safetensors");
    let out = calibrate(&[
        "--model",
        m.to_str().unwrap(),
        "--frames-from-sim",
        "2",
        "--lidar",
        "vlp16",
        "--method",
        "entropy-occupied",
        "--bits",
        "w4a8",
        "--out",
        q2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let qm = file::load_for(&q2, &cfg, &w).unwrap();
    assert_eq!(qm.provenance.method, "entropy-occupied");
    assert_eq!(qm.provenance.weight_bits, 4);

    // Grid search switches reach the provenance.
    let out = calibrate(&[
        "--model",
        m.to_str().unwrap(),
        "--frames-from-sim",
        "1",
        "--lidar",
        "vlp16",
        "--no-tgpl",
        "--no-adaround",
        "--no-grid-activations",
        "--no-grid-input-aware",
        "--grid-p",
        "3",
        "--out",
        q2.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let p = file::load_for(&q2, &cfg, &w).unwrap().provenance.params;
    assert_eq!(p["grid_activations"], "false");
    assert_eq!(p["grid_weights"], "true");
    assert_eq!(p["grid_input_aware"], "false");
    assert_eq!(p["grid_p"], "3");
}

#[test]
fn refuses_unclear_requests() {
    let dir = tempfile::tempdir().unwrap();
    model(dir.path());
    let m = dir.path().join("model.safetensors");
    let q = dir.path().join("q.safetensors");
    let m = m.to_str().unwrap();
    let q = q.to_str().unwrap();
    let out = calibrate(&["--model", m, "--out", q]);
    assert!(!out.status.success());
    assert!(text(&out).contains("needs scans"), "{}", text(&out));
    let out = calibrate(&[
        "--model",
        m,
        "--bag",
        "/nonexistent",
        "--frames-from-sim",
        "2",
        "--out",
        q,
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("either --bag or --frames-from-sim"),
        "{}",
        text(&out)
    );
    // A weights file without an embedded config needs --config.
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let bare = dir.path().join("bare.safetensors");
    Weights::init(&Graph::build(&cfg).unwrap(), 1)
        .save(&bare, &BTreeMap::new())
        .unwrap();
    let out = calibrate(&[
        "--model",
        bare.to_str().unwrap(),
        "--frames-from-sim",
        "1",
        "--out",
        q,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("pass --config"), "{}", text(&out));
    let out = calibrate(&[
        "--model",
        m,
        "--frames-from-sim",
        "1",
        "--keep-float",
        "not.a.layer",
        "--out",
        q,
    ]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not.a.layer"), "{}", text(&out));
    assert!(!Path::new(q).exists());
}
