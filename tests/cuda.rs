//! The CUDA engine against the CPU engines (feature `cuda`). Tests that need a GPU are
//! `#[ignore]`d with the reason, so a machine without one reports them as ignored rather
//! than passing them; on a GPU machine run `cargo test --features cuda --test cuda --
//! --include-ignored` (scripts/gpu-check.sh does this and the benchmarks).
#![cfg(feature = "cuda")]

use lidar_ptq::cloud::Points;
use lidar_ptq::engine::cuda::{CudaEngine, CudaPrecision, Gpu, driver_present};
use lidar_ptq::engine::{EngineError, Fp32Engine, HeadOutputs, Int8Engine};
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::bundle::ModelBundle;
use lidar_ptq::model::decode::decode;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::input::ScanInput;
use lidar_ptq::model::voxelize::Mode;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::quant::Flavour;
use lidar_ptq::quant::calibrate::{CalibOptions, FrameInput, Method, calibrate};
use lidar_ptq::sim::{LidarModel, SimConfig, Simulator};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;

const TINY: &str = include_str!("fixtures/tiny_model.yaml");

/// The repository root at run time (the test binary may run on another machine).
fn root() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn tiny() -> (ModelConfig, Graph, Weights) {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let graph = Graph::build(&cfg).unwrap();
    let mut w = Weights::init(&graph, 21);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for (name, t) in w.tensors.iter_mut() {
        if name.ends_with("running_var") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..2.0));
        } else if name.ends_with("running_mean") || name.contains("norm.bias") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-0.3..0.3));
        }
    }
    (cfg, graph, w)
}

fn default_model() -> (ModelConfig, Graph, Weights) {
    let b = ModelBundle::load(&root().join("models/default.safetensors"), None).unwrap();
    let graph = Graph::build(&b.config).unwrap();
    (b.config, graph, b.weights)
}

fn random_scan(seed: u64) -> Points {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Points::default();
    for _ in 0..3000 {
        p.push(
            rng.random_range(-13.0..13.0),
            rng.random_range(-13.0..13.0),
            rng.random_range(-2.0..1.0),
            rng.random_range(0.0..1.0),
        );
    }
    p
}

/// Simulated scans like the validation bags' (seeds from 1000000).
fn sim_scans(n: usize) -> Vec<Points> {
    let sim = Simulator::new(SimConfig::new(LidarModel::Hdl64));
    (0..n as u64).map(|k| sim.sample(1_000_000 + k).0).collect()
}

fn inputs(cfg: &ModelConfig, scans: &[Points]) -> Vec<FrameInput> {
    let mut scan = ScanInput::new(cfg, Mode::Test).unwrap();
    scans
        .iter()
        .map(|s| FrameInput::prepare(&mut scan, s).unwrap())
        .collect()
}

/// Largest `|a - b| / (1 + |b|)` over all head maps.
fn max_rel(a: &HeadOutputs, b: &HeadOutputs) -> f32 {
    assert_eq!((a.h, a.w, a.tasks.len()), (b.h, b.w, b.tasks.len()));
    let mut m = 0.0f32;
    for (x, y) in a.tasks.iter().zip(&b.tasks) {
        assert_eq!(x.heatmap.len(), y.heatmap.len());
        assert_eq!(x.regression.len(), y.regression.len());
        for (p, q) in x
            .heatmap
            .iter()
            .chain(&x.regression)
            .zip(y.heatmap.iter().chain(&y.regression))
        {
            m = m.max((p - q).abs() / (1.0 + q.abs()));
        }
    }
    m
}

#[test]
fn without_a_gpu_opening_one_is_a_clear_error() {
    match Gpu::open(0) {
        Ok(g) => assert!(!g.describe().is_empty()),
        Err(EngineError::Device(m)) => {
            if !driver_present() {
                assert!(m.contains("libcuda"), "{m}");
            }
        }
        Err(e) => panic!("not a device error: {e}"),
    }
    // An ordinal past the last GPU is refused, never a panic.
    if let Err(e) = Gpu::open(1 << 20) {
        assert!(matches!(e, EngineError::Device(_)), "{e}");
    }
}

/// The node's `device: cuda` puts its detectors on the GPU, or (no GPU here) fails with
/// the device error instead of silently running on the CPU.
#[test]
fn the_node_device_parameter_selects_the_gpu() {
    use lidar_ptq::node::engine::Fp32Model;
    use lidar_ptq::node::params::{NodeParams, ParamValue};
    let model = root().join("models/default.safetensors");
    let values = [
        ("device", ParamValue::String("cuda:0".into())),
        (
            "model_path",
            ParamValue::String(model.display().to_string()),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let params = NodeParams::from_values(&values).unwrap();
    let m = Fp32Model::load(&params).unwrap();
    match (Gpu::open(0), m.fp32()) {
        (Ok(_), Ok(d)) => assert_ne!(d.device(), "cpu"),
        (Err(_), Err(e)) => assert!(e.to_string().contains("GPU"), "{e}"),
        (gpu, det) => panic!(
            "GPU opens: {}, detector: {}",
            gpu.is_ok(),
            det.map(|d| d.device()).unwrap_or_else(|e| e.to_string())
        ),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fp32_matches_the_cpu_engine() {
    for (cfg, graph, w) in [tiny(), default_model()] {
        let cpu = Fp32Engine::new(&graph, &w).unwrap();
        let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Fp32, 0).unwrap();
        if cfg.name != "default" {
            // The tiny head's sub-head convs run fused: grouped and batched.
            assert_eq!(gpu.fusions(), (1, 1), "{}", cfg.name);
        }
        let scans = if cfg.name == "default" || graph.bev.0 > 64 {
            sim_scans(2)
        } else {
            vec![random_scan(1), random_scan(2)]
        };
        for f in inputs(&cfg, &scans) {
            let want = cpu.run(&f.net_input()).unwrap();
            for direct in [true, false] {
                gpu.set_direct_branches(direct);
                let got = gpu.run(&f.net_input()).unwrap();
                let e = max_rel(&got, &want);
                eprintln!("{} fp32 (direct {direct}) max rel error {e:.2e}", cfg.name);
                assert!(e <= 1e-4, "{}: {e}", cfg.name);
            }
        }
        // A second run of the same engine (buffers reused) gives the same maps.
        let f = &inputs(&cfg, &scans[..1])[0];
        assert_eq!(
            gpu.run(&f.net_input()).unwrap(),
            gpu.run(&f.net_input()).unwrap()
        );
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fp16_stays_close_to_fp32() {
    let mut worst: Vec<(String, f32)> = Vec::new();
    for (cfg, graph, w) in [tiny(), default_model()] {
        let cpu = Fp32Engine::new(&graph, &w).unwrap();
        let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Fp16, 0).unwrap();
        let scans = if cfg.name == "tiny" {
            vec![random_scan(3), random_scan(4)]
        } else {
            sim_scans(3)
        };
        for f in inputs(&cfg, &scans) {
            let want = cpu.run(&f.net_input()).unwrap();
            for direct in [true, false] {
                gpu.set_direct_branches(direct);
                let got = gpu.run(&f.net_input()).unwrap();
                let e = max_rel(&got, &want);
                eprintln!("{} fp16 (direct {direct}) max rel error {e:.2e}", cfg.name);
                worst.push((format!("{} direct {direct}", cfg.name), e));
                let (a, b) = (
                    decode(&cfg, &got.views()).unwrap(),
                    decode(&cfg, &want.views()).unwrap(),
                );
                eprintln!(
                    "{} fp16 detections {} vs fp32 {}",
                    cfg.name,
                    a.len(),
                    b.len()
                );
            }
        }
    }
    for (what, e) in worst {
        assert!(e <= 5e-2, "{what}: {e}");
    }
}

/// Calibrations with different shapes of integer model: min-max W8A8 (per-feature input
/// scales, the default); 4-bit weights with symmetric activations; a kept-float neck
/// layer; a kept-float first layer; one input scale.
fn calibrations() -> Vec<CalibOptions> {
    let mut out = vec![CalibOptions::new(Method::MinMax)];
    let mut o = CalibOptions::new(Method::MinMax);
    o.weight_bits = 4;
    o.flavour = Flavour::Symmetric;
    out.push(o);
    let mut o = CalibOptions::new(Method::Percentile {
        percentile: 99.9,
        occupied_only: true,
    });
    o.keep_float = vec!["backbone_2d.deblocks.1".into()];
    out.push(o);
    // The first layer kept float: it dequantizes the input with per-feature scales.
    let mut o = CalibOptions::new(Method::MinMax);
    o.keep_float = vec!["vfe.pfn_layers.0".into()];
    out.push(o);
    // One scale for the whole input.
    let mut o = CalibOptions::new(Method::MinMax);
    o.input_per_feature = false;
    out.push(o);
    out
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn int8_equals_the_cpu_int8_engine_bit_for_bit() {
    let (cfg, graph, w) = tiny();
    let calib: Vec<Points> = (10..14).map(random_scan).collect();
    for opts in calibrations() {
        let qm = calibrate(&cfg, &w, &calib, &opts).unwrap();
        let mut cpu = Int8Engine::new(&graph, &w, &qm).unwrap();
        let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Int8(&qm), 0).unwrap();
        assert_eq!(gpu.fusions(), (1, 1));
        for f in inputs(&cfg, &[random_scan(30), random_scan(31)]) {
            let want = cpu.run(&f.net_input()).unwrap();
            for (direct, tiled) in [(true, true), (false, true), (true, false)] {
                gpu.set_direct_branches(direct);
                gpu.set_tiled_im2col(tiled);
                let got = gpu.run(&f.net_input()).unwrap();
                assert_eq!(
                    got, want,
                    "{:?}, direct branch kernels {direct}, tiled im2col {tiled}",
                    opts.method
                );
            }
        }
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn int8_detections_equal_the_cpu_on_validation_scans() {
    let (cfg, graph, w) = default_model();
    let sim = Simulator::new(SimConfig::new(LidarModel::Hdl64));
    let calib: Vec<Points> = (0..4).map(|k| sim.sample(2_000_000 + k).0).collect();
    let qm = calibrate(&cfg, &w, &calib, &CalibOptions::new(Method::MinMax)).unwrap();
    let mut cpu = Int8Engine::new(&graph, &w, &qm).unwrap();
    let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Int8(&qm), 0).unwrap();
    let mut boxes = 0;
    for f in inputs(&cfg, &sim_scans(8)) {
        let want = cpu.run(&f.net_input()).unwrap();
        let got = gpu.run(&f.net_input()).unwrap();
        assert_eq!(got, want);
        let (a, b) = (
            decode(&cfg, &got.views()).unwrap(),
            decode(&cfg, &want.views()).unwrap(),
        );
        assert_eq!(a, b);
        boxes += a.len();
    }
    assert!(boxes > 0, "the scans produced no detections to compare");
}

// ---- the voxel (SPConv) model on the GPU ----------------------------------------------

const TINY_VOXEL: &str = include_str!("fixtures/tiny_voxel.yaml");

/// The tiny voxel model with seeded weights and non-trivial BatchNorm statistics.
fn tiny_voxel() -> (ModelConfig, Graph, Weights) {
    let cfg = ModelConfig::from_yaml(TINY_VOXEL).unwrap();
    let graph = Graph::build(&cfg).unwrap();
    let mut w = Weights::init(&graph, 41);
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for (name, t) in w.tensors.iter_mut() {
        let range = if name.ends_with("running_var") {
            0.5..2.0
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            -0.3..0.3
        } else {
            continue;
        };
        if t.shape.len() == 1 {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(range.clone()));
        }
    }
    (cfg, graph, w)
}

fn default_voxel() -> (ModelConfig, Graph, Weights) {
    let b = ModelBundle::load(&root().join("models/default_voxel.safetensors"), None).unwrap();
    let graph = Graph::build(&b.config).unwrap();
    (b.config, graph, b.weights)
}

/// A scan inside the tiny voxel model's +-6.4 m range: ground and a few blobs.
fn voxel_scan(seed: u64) -> Points {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Points::default();
    for _ in 0..1200 {
        p.push(
            rng.random_range(-6.3..6.3),
            rng.random_range(-6.3..6.3),
            rng.random_range(-2.9..-2.0),
            rng.random_range(0.0..1.0),
        );
    }
    for _ in 0..3 {
        let (cx, cy) = (rng.random_range(-5.0..5.0), rng.random_range(-5.0..5.0));
        for _ in 0..250 {
            p.push(
                cx + rng.random_range(-1.0..1.0),
                cy + rng.random_range(-0.6..0.6),
                rng.random_range(-2.0..0.5),
                rng.random_range(0.2..1.0),
            );
        }
    }
    p
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn voxel_fp32_matches_the_cpu_engine_and_fp16_stays_close() {
    for (cfg, graph, w) in [tiny_voxel(), default_voxel()] {
        assert!(graph.sparse.is_some());
        let cpu = Fp32Engine::new(&graph, &w).unwrap();
        let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Fp32, 0).unwrap();
        let mut half = CudaEngine::new(&graph, &w, CudaPrecision::Fp16, 0).unwrap();
        let scans: Vec<Points> = if cfg.name == "tiny_voxel" {
            (0..3).map(|k| voxel_scan(50 + k)).collect()
        } else {
            sim_scans(3)
        };
        let mut boxes = 0;
        for f in inputs(&cfg, &scans) {
            let want = cpu.run(&f.net_input()).unwrap();
            let got = gpu.run(&f.net_input()).unwrap();
            let e = max_rel(&got, &want);
            eprintln!("{} voxel fp32 max rel error {e:.2e}", cfg.name);
            assert!(e <= 1e-4, "{}: {e}", cfg.name);
            let e16 = max_rel(&half.run(&f.net_input()).unwrap(), &want);
            eprintln!("{} voxel fp16 max rel error {e16:.2e}", cfg.name);
            assert!(e16 <= 5e-2, "{}: {e16}", cfg.name);
            boxes += decode(&cfg, &got.views()).unwrap().len();
        }
        eprintln!("{}: {boxes} FP32 GPU detections", cfg.name);
        // From the second frame on, the dense part replays as a CUDA graph.
        assert!(gpu.graph_active(), "{}: no CUDA graph", cfg.name);
    }
}

/// Voxel calibrations: min-max W8A8 (every layer integer, first sparse convs included), and
/// one with the first sparse conv kept float (the float sparse kernel on dequantized codes).
fn voxel_calibrations(graph: &Graph) -> Vec<CalibOptions> {
    let first_sparse = graph
        .nodes
        .iter()
        .find(|n| {
            matches!(
                &n.op,
                lidar_ptq::model::graph::Op::Layer(l)
                    if matches!(l.kind, lidar_ptq::model::graph::LayerKind::SparseConv3d { .. })
            )
        })
        .map(|n| n.name.clone())
        .unwrap();
    let mut keep = CalibOptions::new(Method::MinMax);
    keep.keep_float = vec![first_sparse];
    vec![CalibOptions::new(Method::MinMax), keep]
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn voxel_int8_equals_the_cpu_int8_engine_bit_for_bit() {
    let (cfg, graph, w) = tiny_voxel();
    let calib: Vec<Points> = (0..4).map(|k| voxel_scan(60 + k)).collect();
    for opts in voxel_calibrations(&graph) {
        let qm = calibrate(&cfg, &w, &calib, &opts).unwrap();
        let mut cpu = Int8Engine::new(&graph, &w, &qm).unwrap();
        let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Int8(&qm), 0).unwrap();
        let scans: Vec<Points> = (0..3).map(|k| voxel_scan(70 + k)).collect();
        for f in inputs(&cfg, &scans) {
            let want = cpu.run(&f.net_input()).unwrap();
            let got = gpu.run(&f.net_input()).unwrap();
            assert_eq!(got, want, "keep float {:?}", opts.keep_float);
        }
    }
    // The default voxel model: head maps and detections identical on validation scans.
    let (cfg, graph, w) = default_voxel();
    let sim = Simulator::new(SimConfig::new(LidarModel::Hdl64));
    let calib: Vec<Points> = (0..4).map(|k| sim.sample(2_000_000 + k).0).collect();
    let qm = calibrate(&cfg, &w, &calib, &CalibOptions::new(Method::MinMax)).unwrap();
    let mut cpu = Int8Engine::new(&graph, &w, &qm).unwrap();
    let mut gpu = CudaEngine::new(&graph, &w, CudaPrecision::Int8(&qm), 0).unwrap();
    let mut boxes = 0;
    for f in inputs(&cfg, &sim_scans(4)) {
        let want = cpu.run(&f.net_input()).unwrap();
        let got = gpu.run(&f.net_input()).unwrap();
        assert_eq!(got, want);
        let (a, b) = (
            decode(&cfg, &got.views()).unwrap(),
            decode(&cfg, &want.views()).unwrap(),
        );
        assert_eq!(a, b);
        boxes += a.len();
    }
    assert!(boxes > 0, "the scans produced no detections to compare");
}

/// The dense part replayed as a CUDA graph computes what the eager launches compute, on
/// frames of different sizes (the per-frame part grows its buffers; the graph's stay).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn graph_replay_equals_eager_execution() {
    let (cfg, graph, w) = default_model();
    let sim = Simulator::new(SimConfig::new(LidarModel::Hdl64));
    let calib: Vec<Points> = (0..2).map(|k| sim.sample(2_000_000 + k).0).collect();
    let qm = calibrate(&cfg, &w, &calib, &CalibOptions::new(Method::MinMax)).unwrap();
    // Small, large, small, larger: buffers of the per-frame part reallocate.
    let mut scans = vec![random_scan(80)];
    scans.extend(sim_scans(1));
    scans.push(random_scan(81));
    scans.push(sim.sample(3_000_000).0);
    for p in [
        CudaPrecision::Fp32,
        CudaPrecision::Fp16,
        CudaPrecision::Int8(&qm),
    ] {
        let mut graphed = CudaEngine::new(&graph, &w, p, 0).unwrap();
        let mut eager = CudaEngine::new(&graph, &w, p, 0).unwrap();
        eager.set_graphs(false);
        for f in inputs(&cfg, &scans) {
            let a = graphed.run(&f.net_input()).unwrap();
            let b = eager.run(&f.net_input()).unwrap();
            assert_eq!(a, b, "{}", p.name());
        }
        assert!(graphed.graph_active(), "{}: no CUDA graph", p.name());
        assert!(!eager.graph_active());
    }
}

/// A frame with no points (a blinded sensor) runs on the GPU like on the CPU, between
/// ordinary frames (the captured graph and the grown buffers stay valid).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn empty_frames_match_the_cpu() {
    for (cfg, graph, w, scan) in [
        {
            let (c, g, w) = tiny();
            (c, g, w, random_scan(90))
        },
        {
            let (c, g, w) = tiny_voxel();
            (c, g, w, voxel_scan(91))
        },
    ] {
        let scans = vec![scan.clone(), Points::default(), scan, Points::default()];
        let qm = calibrate(&cfg, &w, &scans[..1], &CalibOptions::new(Method::MinMax)).unwrap();
        let cpu32 = Fp32Engine::new(&graph, &w).unwrap();
        let mut cpu8 = Int8Engine::new(&graph, &w, &qm).unwrap();
        let mut gpu32 = CudaEngine::new(&graph, &w, CudaPrecision::Fp32, 0).unwrap();
        let mut gpu8 = CudaEngine::new(&graph, &w, CudaPrecision::Int8(&qm), 0).unwrap();
        for f in inputs(&cfg, &scans) {
            let e = max_rel(
                &gpu32.run(&f.net_input()).unwrap(),
                &cpu32.run(&f.net_input()).unwrap(),
            );
            assert!(e <= 1e-4, "{}: {e}", cfg.name);
            assert_eq!(
                gpu8.run(&f.net_input()).unwrap(),
                cpu8.run(&f.net_input()).unwrap(),
                "{}",
                cfg.name
            );
        }
    }
}

/// Peak candidates found on the GPU decode to exactly the detections of the full head maps
/// (the GPU's own in FP32 and FP16, the CPU INT8 engine's in INT8), for the default pillar
/// and voxel models and the nuScenes preset with random weights (thousands of candidates).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn gpu_candidates_decode_like_the_maps() {
    use lidar_ptq::model::decode::decode_candidates;
    let nuscenes = {
        let cfg = ModelConfig::load(&root().join("config/models/nuscenes_pillar.yaml")).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let w = Weights::init(&graph, 7);
        (cfg, graph, w)
    };
    for (cfg, graph, w) in [default_model(), default_voxel(), nuscenes] {
        let sim = Simulator::new(SimConfig::new(LidarModel::Hdl64));
        let calib: Vec<Points> = (0..2).map(|k| sim.sample(2_000_000 + k).0).collect();
        let qm = calibrate(&cfg, &w, &calib, &CalibOptions::new(Method::MinMax)).unwrap();
        let mut cpu8 = Int8Engine::new(&graph, &w, &qm).unwrap();
        let dc = &cfg.decode;
        for p in [
            CudaPrecision::Fp32,
            CudaPrecision::Fp16,
            CudaPrecision::Int8(&qm),
        ] {
            let mut gpu = CudaEngine::new(&graph, &w, p, 0).unwrap();
            assert!(gpu.gpu_candidates(), "{} {}", cfg.name, p.name());
            let mut total = 0;
            for f in inputs(&cfg, &sim_scans(3)) {
                let maps = gpu.run(&f.net_input()).unwrap();
                let want = decode(&cfg, &maps.views()).unwrap();
                if p.name() == "int8" {
                    let cpu = cpu8.run(&f.net_input()).unwrap();
                    assert_eq!(want, decode(&cfg, &cpu.views()).unwrap(), "{}", cfg.name);
                }
                let mut cands = Vec::new();
                gpu.run_candidates(&f.net_input(), dc.score_threshold, dc.local_max, &mut cands)
                    .unwrap();
                let n: usize = cands.iter().map(|c| c.logits.len()).sum();
                assert_eq!(
                    decode_candidates(&cfg, &cands).unwrap(),
                    want,
                    "{} {}",
                    cfg.name,
                    p.name()
                );
                total += want.len();
                eprintln!(
                    "{} {}: {n} candidates, {} detections",
                    cfg.name,
                    p.name(),
                    want.len()
                );
            }
            assert!(
                total > 0,
                "{} {}: no detections to compare",
                cfg.name,
                p.name()
            );
        }
    }
}
