//! `lidar_ptq fidelity`: INT8 detections against FP32 detections of the shipped default
//! model on a simulated scan.

use lidar_ptq::model::bundle::ModelBundle;
use lidar_ptq::model::graph::{Graph, Op};
use lidar_ptq::sim::record::{RecordOptions, record};
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};
use std::path::Path;
use std::process::{Command, Output};

fn run(verb: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .arg(verb)
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

#[test]
fn int8_models_are_scored_against_fp32() {
    let dir = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/default.safetensors");
    let m = model.to_str().unwrap();
    let scene = Scene::new(SimConfig::new(LidarModel::Hdl64), 7);
    let opts = RecordOptions {
        frames: 1,
        ..RecordOptions::default()
    };
    let bag = record(&scene, &opts, &dir.path().join("bag"), |_| {}).unwrap();
    let q = dir.path().join("q.safetensors");
    let qf = dir.path().join("float.safetensors");
    let calib = |out: &Path, keep: &str| {
        let mut args = vec![
            "--model",
            m,
            "--frames-from-sim",
            "1",
            "--lidar",
            "hdl64",
            "--method",
            "minmax",
            "--out",
            out.to_str().unwrap(),
        ];
        if !keep.is_empty() {
            args.extend(["--keep-float", keep]);
        }
        let o = run("calibrate", &args);
        assert!(o.status.success(), "{}", text(&o));
    };
    calib(&q, "");
    // Every layer kept float: the "INT8" model is the FP32 one.
    let cfg = ModelBundle::load(&model, None).unwrap().config;
    let graph = Graph::build(&cfg).unwrap();
    let layers: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Layer(_)))
        .map(|n| n.name.as_str())
        .collect();
    calib(&qf, &layers.join(","));
    let both = format!("{},{}", qf.display(), q.display());
    let o = run(
        "fidelity",
        &[
            bag.to_str().unwrap(),
            "--model",
            m,
            "--int8",
            &both,
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let fp = r["fp32_boxes"].as_u64().unwrap();
    assert!(fp > 5, "{r}");
    let same = &r["int8"][0];
    assert_eq!(same["boxes"].as_u64(), Some(fp), "{r}");
    assert_eq!(same["matched"].as_u64(), Some(fp), "{r}");
    assert_eq!(same["mean_centre_error_m"].as_f64(), Some(0.0), "{r}");
    assert_eq!(same["mean_score_error"].as_f64(), Some(0.0), "{r}");
    let int8 = &r["int8"][1];
    assert_eq!(int8["bits"], "W8A8");
    assert_eq!(int8["method"], "minmax");
    let f = |k: &str| int8[k].as_f64().unwrap();
    assert!(f("recall") > 0.8 && f("precision") > 0.8, "{r}");
    assert!(
        f("mean_centre_error_m") > 0.0 && f("mean_centre_error_m") < 0.3,
        "{r}"
    );
    assert!(
        f("mean_score_error") > 0.0 && f("mean_score_error") < 0.05,
        "{r}"
    );

    // Bad requests are clear errors.
    let o = run(
        "fidelity",
        &[
            bag.to_str().unwrap(),
            "--model",
            m,
            "--int8",
            &both,
            "--max-distance",
            "0",
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("--max-distance"), "{}", text(&o));
    let o = run(
        "fidelity",
        &["/nonexistent/scan.bin", "--model", m, "--int8", &both],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("/nonexistent/scan.bin"), "{}", text(&o));
}
