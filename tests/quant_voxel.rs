//! LiDAR-PTQ on the voxel (SPConv) model: calibration quantizes every layer, sparse convs
//! included, with the residual adds' inputs sharing parameters; the INT8 engine executes
//! the result bit for bit as the simulated-integer network; the reconstruction improves
//! the sparse units.

use lidar_ptq::cloud::Points;
use lidar_ptq::engine::{Fp32Engine, HeadOutputs, Int8Engine};
use lidar_ptq::kernels::Isa;
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::graph::{Graph, LayerKind, Op};
use lidar_ptq::model::input::ScanInput;
use lidar_ptq::model::voxelize::Mode;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::quant::calibrate::{
    CalibOptions, FrameInput, Method, calibrate, calibrate_detailed,
};
use lidar_ptq::quant::qnet::float_model;
use lidar_ptq::quant::{LayerPlan, QuantModel, QuantNet};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TINY_VOXEL: &str = include_str!("fixtures/tiny_voxel.yaml");

fn tiny() -> (ModelConfig, Graph) {
    let cfg = ModelConfig::from_yaml(TINY_VOXEL).unwrap();
    let graph = Graph::build(&cfg).unwrap();
    (cfg, graph)
}

/// Seeded weights with non-trivial BatchNorm statistics.
fn weights(graph: &Graph, seed: u64) -> Weights {
    let mut w = Weights::init(graph, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for (name, t) in w.tensors.iter_mut() {
        let range = if name.ends_with("running_var") {
            0.5..2.0
        } else if name.ends_with("running_mean") || name.ends_with(".bias") {
            -0.3..0.3
        } else if name.contains("bn") || name.contains("norm") || name.ends_with(".1.weight") {
            0.5..1.5
        } else {
            continue;
        };
        if t.shape.len() == 1 {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(range.clone()));
        }
    }
    w
}

/// A scan inside the tiny model's +-6.4 m range: ground-like background and a few blobs.
fn scan(seed: u64) -> Points {
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

fn frames(n: usize, seed: u64) -> Vec<Points> {
    (0..n as u64).map(|k| scan(seed * 1000 + k)).collect()
}

fn inputs(cfg: &ModelConfig, frames: &[Points]) -> Vec<FrameInput> {
    let mut s = ScanInput::new(cfg, Mode::Test).unwrap();
    frames
        .iter()
        .map(|p| FrameInput::prepare(&mut s, p).unwrap())
        .collect()
}

/// Small but complete LiDAR-PTQ settings for the tiny voxel model.
fn quick_ptq(iters: usize) -> CalibOptions {
    let mut o = CalibOptions::new(Method::LidarPtq);
    o.grid_frames = 2;
    o.grid_samples = 4096;
    o.recon.iters = iters;
    o.recon.frames = 3;
    o.recon.crop = 6;
    o.recon.tgpl_every = 5;
    o.seed = 5;
    o
}

/// Relative squared error of the head outputs.
fn rel_err(a: &HeadOutputs, b: &HeadOutputs) -> f64 {
    let (mut err, mut mag) = (0f64, 0f64);
    for (x, y) in a.tasks.iter().zip(&b.tasks) {
        for (p, q) in x
            .heatmap
            .iter()
            .chain(&x.regression)
            .zip(y.heatmap.iter().chain(&y.regression))
        {
            assert!(p.is_finite());
            err += ((p - q) as f64).powi(2);
            mag += (*q as f64).powi(2);
        }
    }
    err / mag.max(1e-30)
}

/// Every layer is integer (sparse convs included), every value a layer reads is
/// quantized, and each residual add's two inputs share one parameter set (its output,
/// requantized, has its own).
fn assert_fully_quantized(graph: &Graph, m: &QuantModel, what: &str) {
    let mut sparse_int = 0;
    for (i, n) in graph.nodes.iter().enumerate() {
        match &n.op {
            Op::Layer(l) => {
                assert!(
                    matches!(m.layers[i], Some(LayerPlan::Int(_))),
                    "{what}: {}",
                    n.name
                );
                assert!(m.activations[n.inputs[0]].is_some(), "{what}: {}", n.name);
                sparse_int += matches!(l.kind, LayerKind::SparseConv3d { .. }) as usize;
            }
            Op::Add { .. } => {
                assert!(m.activations[i + 1].is_some(), "{what}: {}", n.name);
                let a = m.activations[n.inputs[0]];
                assert!(
                    a.is_some() && m.activations[n.inputs[1]] == a,
                    "{what}: {} inputs do not share parameters",
                    n.name
                );
            }
            _ => {}
        }
    }
    assert!(sparse_int >= 8, "{what}: {sparse_int} integer sparse convs");
}

#[test]
fn every_quantizer_disabled_is_fp32_exactly() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 3);
    let fp = Fp32Engine::new(&graph, &w).unwrap();
    let prov = calibrate(&cfg, &w, &frames(1, 1), &CalibOptions::new(Method::MinMax))
        .unwrap()
        .provenance;
    let q = QuantNet::new(&graph, &w, &float_model(&graph, prov)).unwrap();
    for f in inputs(&cfg, &frames(2, 1)) {
        assert_eq!(
            fp.run(&f.net_input()).unwrap(),
            q.run(&f.net_input()).unwrap()
        );
    }
}

#[test]
fn every_method_quantizes_every_layer_close_to_fp32() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 11);
    let fr = frames(4, 3);
    let test = inputs(&cfg, &frames(2, 8));
    let fp = Fp32Engine::new(&graph, &w).unwrap();
    for name in ["minmax", "percentile-occupied", "entropy", "lidar-ptq"] {
        let method = Method::from_name(name).unwrap();
        let opts = if method == Method::LidarPtq {
            quick_ptq(20)
        } else {
            CalibOptions::new(method)
        };
        let m = calibrate(&cfg, &w, &fr, &opts).unwrap();
        m.validate(&graph).unwrap();
        assert_fully_quantized(&graph, &m, name);
        // The voxel features (x, y, z, intensity, time) get one scale each.
        assert_eq!(m.input_scales.as_ref().map(Vec::len), Some(5), "{name}");
        let net = QuantNet::new(&graph, &w, &m).unwrap();
        for f in &test {
            let e = rel_err(
                &net.run(&f.net_input()).unwrap(),
                &fp.run(&f.net_input()).unwrap(),
            );
            assert!(e < 0.05, "{name}: relative squared error {e}");
        }
    }
}

/// The INT8 engine (implicit-GEMM sparse kernels, integer residual adds, height
/// compression of codes) executes a calibrated voxel model exactly as the simulated-integer
/// network (rulebook gather-GEMM-scatter on exact f32 codes) that calibration scored.
#[test]
fn the_int8_engine_reproduces_the_simulated_integer_network() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 13);
    let fr = frames(3, 4);
    let mut variants = vec![CalibOptions::new(Method::MinMax), quick_ptq(10)];
    // A kept-float sparse conv in the middle of the backbone, and one input scale.
    let mut o = CalibOptions::new(Method::MinMax);
    o.keep_float = vec!["backbone_3d.conv2.1.conv1".into()];
    o.input_per_feature = false;
    variants.push(o);
    let mut isas = vec![Isa::Scalar];
    isas.extend(Isa::simd_available());
    for opts in variants {
        let m = calibrate(&cfg, &w, &fr, &opts).unwrap();
        let net = QuantNet::new(&graph, &w, &m).unwrap();
        for &isa in &isas {
            let mut engine = Int8Engine::with_isa(&graph, &w, &m, isa).unwrap();
            // Frames of different sizes through one engine: buffers are reused.
            for f in inputs(&cfg, &frames(3, 10)) {
                let want = net.run(&f.net_input()).unwrap();
                let got = engine.run(&f.net_input()).unwrap();
                assert_eq!(got, want, "{:?} on {isa:?}", opts.method);
            }
        }
    }
}

/// The reconstruction optimises the sparse backbone unit by unit, residual blocks as one
/// unit each (or every layer alone), and improves each unit's objective (full frame, first
/// reconstruction frame) over round-to-nearest min-max.
#[test]
fn reconstruction_improves_the_sparse_units() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 12);
    for blocks in [true, false] {
        let mut o = quick_ptq(60);
        (o.weight_bits, o.activation_bits) = (4, 8);
        o.recon.tgpl_every = 4;
        o.recon.report = true;
        o.recon.blocks = blocks;
        let c = calibrate_detailed(
            &cfg,
            &w,
            &frames(4, 6),
            &o,
            &indicatif::ProgressBar::hidden(),
        )
        .unwrap();
        let sparse: Vec<_> = c
            .units
            .iter()
            .filter(|u| u.node.starts_with("backbone_3d."))
            .collect();
        let report: Vec<String> = sparse
            .iter()
            .map(|u| {
                format!(
                    "{}: {:.4e} -> {:.4e}, {} flipped",
                    u.node,
                    u.objective_before(),
                    u.objective_after(),
                    u.flipped
                )
            })
            .collect();
        let report = format!("blocks {blocks}:\n{}", report.join("\n"));
        println!("{report}");
        // conv_input, one strided conv per later stage, conv_out, and the three residual
        // blocks: as three units, or as their six convs.
        let block_units = [
            "backbone_3d.conv1.0",
            "backbone_3d.conv2.1",
            "backbone_3d.conv3.1",
        ];
        let n_blocks = sparse
            .iter()
            .filter(|u| block_units.contains(&u.node.as_str()))
            .count();
        if blocks {
            assert_eq!((sparse.len(), n_blocks), (7, 3), "{report}");
        } else {
            assert_eq!((sparse.len(), n_blocks), (10, 0), "{report}");
        }
        let better = sparse
            .iter()
            .filter(|u| u.objective_after() < u.objective_before())
            .count();
        assert!(better * 3 >= sparse.len() * 2, "{report}");
        assert!(sparse.iter().any(|u| u.flipped > 0), "{report}");
        assert!(sparse.iter().all(|u| u.lambda > 0.0), "{report}");
    }
}

/// Min-max covers what both inputs of every residual add take on the calibration frames:
/// the residual branch (a conv without ReLU) is signed where the block input is not, and
/// the add's output does not contain its range, so it must be observed itself.
#[test]
fn minmax_covers_both_inputs_of_every_residual_add() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 14);
    let fr = frames(3, 9);
    let m = calibrate(&cfg, &w, &fr, &CalibOptions::new(Method::MinMax)).unwrap();
    let fp = Fp32Engine::new(&graph, &w).unwrap();
    let mut range = vec![(f32::INFINITY, f32::NEG_INFINITY); graph.nodes.len() + 1];
    for f in inputs(&cfg, &fr) {
        fp.run_observed(&f.net_input(), &mut |v, t| {
            for &x in &t.data {
                range[v] = (range[v].0.min(x), range[v].1.max(x));
            }
        })
        .unwrap();
    }
    let mut signed = 0;
    for n in graph
        .nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Add { .. }))
    {
        for &v in &n.inputs {
            let q = m.activations[v].unwrap();
            let (lo, hi) = q.real_range();
            let (a, b) = range[v];
            assert!(
                lo <= a + q.scale && hi >= b - q.scale,
                "{}: input value {v} spans [{a}, {b}], parameters cover [{lo}, {hi}]",
                n.name
            );
            signed += (a < -q.scale) as usize;
        }
    }
    // The check means something: some residual branch does go negative.
    assert!(signed > 0);
}
