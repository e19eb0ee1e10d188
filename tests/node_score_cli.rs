//! `lidar_ptq node-score`, run as the end-to-end script runs it: a simulated bag, a
//! self-describing model file, and detections as a subscriber would have collected them.

use lidar_ptq::detector::{Detector, MODEL_CONFIG_KEY};
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::node::params::{NodeParams, ParamValue};
use lidar_ptq::node::score::{self, CollectedFrame};
use std::collections::BTreeMap;
use std::process::Command;

fn run(args: &[&std::ffi::OsStr]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn node_score_compares_collected_with_offline_detections() {
    let dir = tempfile::tempdir().unwrap();
    let bag = dir.path().join("bag");
    let (ok, _, err) = run(&[
        "simulate".as_ref(),
        "--lidar".as_ref(),
        "hdl32".as_ref(),
        "--frames".as_ref(),
        "3".as_ref(),
        "--seed".as_ref(),
        "9".as_ref(),
        "--out".as_ref(),
        bag.as_os_str(),
    ]);
    assert!(ok, "{err}");

    // A tiny model with seeded weights and a low threshold, so that it outputs boxes.
    let cfg = ModelConfig::from_yaml(include_str!("fixtures/tiny_model.yaml")).unwrap();
    let weights = Weights::init(&Graph::build(&cfg).unwrap(), 5);
    let model = dir.path().join("tiny.safetensors");
    let meta = BTreeMap::from([(MODEL_CONFIG_KEY.to_string(), cfg.to_yaml())]);
    weights.save(&model, &meta).unwrap();
    let params_file = dir.path().join("params.yaml");
    std::fs::write(
        &params_file,
        format!(
            "lidar_ptq_node:\n  ros__parameters:\n    model_path: {}\n    score_threshold: 0.05\n",
            model.display()
        ),
    )
    .unwrap();

    // What the node would publish: the same model and filter, over frames 0 and 2.
    let values = BTreeMap::from([
        (
            "model_path".to_string(),
            ParamValue::String(model.display().to_string()),
        ),
        ("score_threshold".to_string(), ParamValue::Double(0.05)),
    ]);
    let params = NodeParams::from_values(&values).unwrap();
    let mut det: Detector = lidar_ptq::node::engine::load_fp32(&params).unwrap();
    let scans = score::read_scans(&bag, &params).unwrap();
    assert_eq!(scans.len(), 3);
    let all = score::detect_offline(&mut det, &scans, &params, &indicatif::ProgressBar::hidden())
        .unwrap();
    assert!(all.iter().any(|f| !f.detections.is_empty()));
    let collected: Vec<CollectedFrame> = vec![all[0].clone(), all[2].clone()];
    let collected_path = dir.path().join("collected.json");
    std::fs::write(&collected_path, serde_json::to_string(&collected).unwrap()).unwrap();

    let (ok, out, err) = run(&[
        "node-score".as_ref(),
        "--bag".as_ref(),
        bag.as_os_str(),
        "--detections".as_ref(),
        collected_path.as_os_str(),
        "--params".as_ref(),
        params_file.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["frames_scored"], 2);
    assert_eq!(v["frames_in_bag"], 3);
    assert_eq!(v["frames_identical"], 2);
    assert_eq!(v["frame_id_mismatches"], 0);
    assert_eq!(v["mAP"], v["offline_mAP"]);

    // Detections that were not the model's are noticed, and a bad file is a clear error.
    let mut changed = collected.clone();
    changed[0].detections.clear();
    std::fs::write(&collected_path, serde_json::to_string(&changed).unwrap()).unwrap();
    let (ok, out, _) = run(&[
        "node-score".as_ref(),
        "--bag".as_ref(),
        bag.as_os_str(),
        "--detections".as_ref(),
        collected_path.as_os_str(),
        "--params".as_ref(),
        params_file.as_os_str(),
    ]);
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["frames_identical"], 1);
    std::fs::write(
        &params_file,
        "lidar_ptq_node:\n  ros__parameters:\n    precision: int4\n",
    )
    .unwrap();
    let (ok, _, err) = run(&[
        "node-score".as_ref(),
        "--bag".as_ref(),
        bag.as_os_str(),
        "--detections".as_ref(),
        collected_path.as_os_str(),
        "--params".as_ref(),
        params_file.as_os_str(),
    ]);
    assert!(!ok);
    assert!(err.contains("precision") && err.contains("int4"), "{err}");
}

/// With the model's own threshold and every scan answered, node-score's figures are
/// `lidar_ptq eval`'s: the same metric over the same detections, FP32 and INT8. The
/// shipped default model, so that there is something to score (a random tiny model
/// scores 0 everywhere, which would hide a difference in the metric).
#[test]
fn node_score_agrees_with_eval_fp32_and_int8() {
    let dir = tempfile::tempdir().unwrap();
    let bag = dir.path().join("bag");
    let (ok, _, err) = run(&[
        "simulate".as_ref(),
        "--lidar".as_ref(),
        "hdl32".as_ref(),
        "--frames".as_ref(),
        "2".as_ref(),
        "--seed".as_ref(),
        "11".as_ref(),
        "--out".as_ref(),
        bag.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default.safetensors");
    let (cfg, _) = Detector::read_model_file(&model).unwrap();
    let int8 = dir.path().join("default.int8.safetensors");
    let (ok, _, err) = run(&[
        "calibrate".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--frames-from-sim".as_ref(),
        "1".as_ref(),
        "--lidar".as_ref(),
        "hdl32".as_ref(),
        "--method".as_ref(),
        "minmax".as_ref(),
        "--out".as_ref(),
        int8.as_os_str(),
    ]);
    assert!(ok, "{err}");
    let threshold = cfg.decode.score_threshold;
    let params_file = dir.path().join("params.yaml");
    std::fs::write(
        &params_file,
        format!(
            "lidar_ptq_node:\n  ros__parameters:\n    model_path: {}\n    score_threshold: {threshold}\n    class_score_thresholds: []\n",
            model.display()
        ),
    )
    .unwrap();
    let values = lidar_ptq::node::params::from_ros_yaml(
        &std::fs::read_to_string(&params_file).unwrap(),
        "lidar_ptq_node",
    )
    .unwrap();
    let params = NodeParams::from_values(&values).unwrap();
    let m = lidar_ptq::node::engine::Fp32Model::load(&params).unwrap();
    let q = lidar_ptq::quant::file::load_for(&int8, &m.config, &m.weights).unwrap();
    let scans = score::read_scans(&bag, &params).unwrap();
    for (int8_arg, mut det) in [
        (None, m.fp32().unwrap()),
        (Some(&int8), m.int8(&q).unwrap()),
    ] {
        let collected =
            score::detect_offline(&mut det, &scans, &params, &indicatif::ProgressBar::hidden())
                .unwrap();
        let collected_path = dir.path().join("collected.json");
        std::fs::write(&collected_path, serde_json::to_string(&collected).unwrap()).unwrap();
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "node-score".as_ref(),
            "--bag".as_ref(),
            bag.as_os_str(),
            "--detections".as_ref(),
            collected_path.as_os_str(),
            "--params".as_ref(),
            params_file.as_os_str(),
        ];
        let mut eval_args: Vec<&std::ffi::OsStr> = vec![
            "eval".as_ref(),
            "--model".as_ref(),
            model.as_os_str(),
            "--bag".as_ref(),
            bag.as_os_str(),
            "--json".as_ref(),
        ];
        if let Some(q) = int8_arg {
            args.extend(["--int8".as_ref(), q.as_os_str()]);
            eval_args.extend(["--int8".as_ref(), q.as_os_str()]);
        }
        let (ok, out, err) = run(&args);
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["frames_identical"], 2, "{int8_arg:?}");
        let (ok, out, err) = run(&eval_args);
        assert!(ok, "{err}");
        let e: serde_json::Value = serde_json::from_str(&out).unwrap();
        let eval_map = e["mAP"].as_f64().unwrap();
        assert!(
            eval_map > 0.05,
            "the default model finds objects: {eval_map}"
        );
        for key in ["mAP", "offline_mAP", "offline_mAP_all_frames"] {
            let got = v[key].as_f64().unwrap();
            assert!(
                (got - eval_map).abs() < 1e-12,
                "{key} {got} vs eval {eval_map} ({int8_arg:?})"
            );
        }
    }
}
