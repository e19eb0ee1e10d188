//! `lidar_ptq bench` as users run it: one JSON object with the FP32 and INT8 figures.

use std::process::Command;

fn bench(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bench_reports_fp32_and_int8_as_json() {
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny_model.yaml"
    );
    let out = bench(&[
        "--config", cfg, "--int8", "auto", "--iters", "1", "--warmup", "0", "--json",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in [
        "fp32_ms",
        "int8_ms",
        "int8_dense_ms",
        "fp32_dense_ms",
        "dense_gmac",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {text}"));
        assert!(x > 0.0 && x.is_finite(), "{key} = {x}");
    }
    for key in ["fp32_stages", "int8_stages"] {
        for stage in ["voxelize", "pfn", "backbone", "neck", "head", "decode"] {
            assert!(v[key][stage].as_f64().unwrap() >= 0.0, "{key}.{stage}");
        }
    }
    // The stages add up to the end-to-end time (one run: the medians are that run's).
    let stages: f64 = ["voxelize", "pfn", "backbone", "neck", "head", "decode"]
        .iter()
        .map(|s| v["int8_stages"][s].as_f64().unwrap())
        .sum();
    let total = v["int8_ms"].as_f64().unwrap();
    assert!(
        (stages - total).abs() <= 1e-6 * total.max(1.0),
        "{stages} vs {total}"
    );
    assert!(v["isa"].is_string() && v["threads"].as_u64().unwrap() >= 1);
    assert_eq!(v["quant_method"], "minmax-quick");
    let ratio = v["int8_weight_ratio"].as_f64().unwrap();
    assert!(ratio > 0.2 && ratio < 0.6, "{ratio}");
    assert!(v["pillars"].as_u64().unwrap() > 0);
}

#[test]
fn bench_refuses_bad_arguments() {
    let out = bench(&["--preset", "no-such-model", "--iters", "1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown preset"));
    let out = bench(&["--iters", "1"]);
    assert!(!out.status.success());
    let cfg = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny_model.yaml"
    );
    let out = bench(&[
        "--config",
        cfg,
        "--int8",
        "/no/such/file.json",
        "--iters",
        "1",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.json"));
}
