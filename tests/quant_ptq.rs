//! Calibration end to end on the tiny model: the simulated-integer network against FP32
//! (every quantizer off) and against a naive integer interpreter written here, every
//! method's output, the INT8 model file, determinism, and LiDAR-PTQ's reconstruction
//! lowering its objective.

use lidar_ptq::cloud::Points;
use lidar_ptq::engine::fp32::{concat_pillar_max, run_layer};
use lidar_ptq::engine::{Fp32Engine, HeadOutputs, NetInput, TaskMaps};
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::graph::{Graph, LayerKind, Op};
use lidar_ptq::model::input::ScanInput;
use lidar_ptq::model::voxelize::Mode;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::ops::Tensor;
use lidar_ptq::quant::calibrate::{
    CalibOptions, FrameInput, Method, calibrate, calibrate_detailed,
};
use lidar_ptq::quant::file::{self, FileError};
use lidar_ptq::quant::qnet::{QuantNet, float_model};
use lidar_ptq::quant::{
    Flavour, LayerPlan, Provenance, QParams, QuantModel, Requant, dequantize_acc, quantize_bias,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

const TINY: &str = include_str!("fixtures/tiny_model.yaml");

fn tiny() -> (ModelConfig, Graph) {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let graph = Graph::build(&cfg).unwrap();
    (cfg, graph)
}

/// Seeded weights with non-trivial BatchNorm statistics.
fn weights(graph: &Graph, seed: u64) -> Weights {
    let mut w = Weights::init(graph, seed);
    let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
    for (name, t) in w.tensors.iter_mut() {
        if name.ends_with("running_var") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..2.0));
        } else if name.ends_with("running_mean") || name.contains("norm.bias") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(-0.3..0.3));
        } else if name.contains("norm.weight") {
            t.data
                .iter_mut()
                .for_each(|v| *v = rng.random_range(0.5..1.5));
        }
    }
    w
}

/// A scan: a uniform background plus a few dense blobs (object-like clusters).
fn scan(seed: u64) -> Points {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Points::default();
    for _ in 0..1500 {
        p.push(
            rng.random_range(-13.0..13.0),
            rng.random_range(-13.0..13.0),
            rng.random_range(-2.0..1.0),
            rng.random_range(0.0..1.0),
        );
    }
    for _ in 0..4 {
        let (cx, cy) = (rng.random_range(-10.0..10.0), rng.random_range(-10.0..10.0));
        for _ in 0..200 {
            p.push(
                cx + rng.random_range(-2.0..2.0),
                cy + rng.random_range(-1.0..1.0),
                rng.random_range(-1.5..0.5),
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
    let mut scan = ScanInput::new(cfg, Mode::Test).unwrap();
    frames
        .iter()
        .map(|p| FrameInput::prepare(&mut scan, p).unwrap())
        .collect()
}

fn provenance() -> Provenance {
    Provenance {
        fp32_digest: String::new(),
        config_yaml: String::new(),
        method: "none".into(),
        params: BTreeMap::new(),
        weight_bits: 8,
        activation_bits: 8,
        frames: 0,
        frames_digest: String::new(),
        seed: 0,
    }
}

/// Small but complete LiDAR-PTQ settings for the tiny model.
fn quick_ptq(iters: usize) -> CalibOptions {
    let mut o = CalibOptions::new(Method::LidarPtq);
    o.grid_frames = 2;
    o.grid_samples = 4096;
    o.recon.iters = iters;
    o.recon.frames = 3;
    o.recon.crop = 6;
    o.recon.crop_pillars = 64;
    o.recon.tgpl_every = 5;
    o.seed = 7;
    o
}

#[test]
fn every_quantizer_disabled_is_fp32_exactly() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 3);
    let fp = Fp32Engine::new(&graph, &w).unwrap();
    let q = QuantNet::new(&graph, &w, &float_model(&graph, provenance())).unwrap();
    for f in inputs(&cfg, &frames(3, 1)) {
        let a = fp.run(&f.net_input()).unwrap();
        let b = q.run(&f.net_input()).unwrap();
        assert_eq!(a, b);
    }
}

/// A value of the naive interpreter: u8 codes or floats.
#[derive(Clone)]
enum V {
    Codes(Vec<i32>, Vec<usize>, QParams),
    Float(Tensor),
}

impl V {
    fn float(&self) -> Tensor {
        match self {
            V::Float(t) => t.clone(),
            V::Codes(c, s, q) => {
                Tensor::new(s.clone(), c.iter().map(|&c| q.dequantize(c)).collect()).unwrap()
            }
        }
    }
}

/// Integer accumulators by plain loops (i64 sums truncated to i32: the wrapping sum).
fn acc(
    kind: LayerKind,
    x: &[i32],
    xs: &[usize],
    codes: &[i8],
    ws: &[usize],
    zp: i32,
) -> (Vec<i32>, Vec<usize>) {
    let w = |i: usize| codes[i] as i64;
    match kind {
        k @ LayerKind::SparseConv3d { .. } => panic!("{k:?} in a pillar model"),
        LayerKind::Linear => {
            let (cout, cin) = (ws[0], ws[1]);
            let rows = x.len() / cin;
            let mut out = vec![0i32; rows * cout];
            for r in 0..rows {
                for co in 0..cout {
                    let s: i64 = (0..cin)
                        .map(|ci| (x[r * cin + ci] - zp) as i64 * w(co * cin + ci))
                        .sum();
                    out[r * cout + co] = s as i32;
                }
            }
            let mut shape = xs.to_vec();
            *shape.last_mut().unwrap() = cout;
            (out, shape)
        }
        LayerKind::Conv2d {
            kernel: k,
            stride: s,
            padding: p,
        } => {
            let (cout, cin, h, wd) = (ws[0], ws[1], xs[2], xs[3]);
            let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
            let mut out = vec![0i32; cout * ho * wo];
            for co in 0..cout {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut a = 0i64;
                        for ci in 0..cin {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let (iy, ix) = (
                                        (oy * s + ky) as isize - p as isize,
                                        (ox * s + kx) as isize - p as isize,
                                    );
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < wd
                                    {
                                        let v = x[(ci * h + iy as usize) * wd + ix as usize] - zp;
                                        a += v as i64 * w(((co * cin + ci) * k + ky) * k + kx);
                                    }
                                }
                            }
                        }
                        out[(co * ho + oy) * wo + ox] = a as i32;
                    }
                }
            }
            (out, vec![1, cout, ho, wo])
        }
        LayerKind::ConvTranspose2d {
            kernel: k,
            stride: s,
        } => {
            let (cin, cout, h, wd) = (ws[0], ws[1], xs[2], xs[3]);
            let (ho, wo) = ((h - 1) * s + k, (wd - 1) * s + k);
            let mut out = vec![0i64; cout * ho * wo];
            for ci in 0..cin {
                for iy in 0..h {
                    for ix in 0..wd {
                        let d = (x[(ci * h + iy) * wd + ix] - zp) as i64;
                        for co in 0..cout {
                            for ky in 0..k {
                                for kx in 0..k {
                                    out[(co * ho + iy * s + ky) * wo + ix * s + kx] +=
                                        d * w(((ci * cout + co) * k + ky) * k + kx);
                                }
                            }
                        }
                    }
                }
            }
            (
                out.into_iter().map(|a| a as i32).collect(),
                vec![1, cout, ho, wo],
            )
        }
    }
}

/// The model's semantics (quant/model.rs) interpreted with plain loops over codes.
fn naive(graph: &Graph, m: &QuantModel, w: &Weights, input: &NetInput<'_>) -> HeadOutputs {
    let folded = lidar_ptq::engine::fp32::fold_layers(graph, w).unwrap();
    let (p, n, f) = (input.counts.len(), input.max_points, input.width);
    let x0 = Tensor::new(vec![p, n, f], input.decorated.to_vec()).unwrap();
    let quant = |t: &Tensor, q: Option<QParams>| match q {
        Some(q) => V::Codes(
            t.data.iter().map(|&x| q.quantize(x)).collect(),
            t.shape.clone(),
            q,
        ),
        None => V::Float(t.clone()),
    };
    // The input per feature when the model says so.
    let per = m.input_scales.clone();
    let mut vals: Vec<V> = vec![match (m.activations[0], &per) {
        (Some(q), Some(sc)) => V::Codes(
            x0.data
                .iter()
                .enumerate()
                .map(|(k, &x)| {
                    QParams {
                        scale: sc[k % f],
                        ..q
                    }
                    .quantize(x)
                })
                .collect(),
            x0.shape.clone(),
            q,
        ),
        (q, _) => quant(&x0, q),
    }];
    let (ny, nx) = graph.bev;
    for (i, node) in graph.nodes.iter().enumerate() {
        let out_q = m.activations[i + 1];
        let x = vals[node.inputs[0]].clone();
        let out = match (&node.op, &m.layers[i]) {
            (op @ (Op::Add { .. } | Op::HeightCompress { .. }), _) => {
                panic!("{op:?} in a pillar model")
            }
            (Op::Layer(l), Some(LayerPlan::Int(lw))) => {
                let V::Codes(c, xs, qin) = x else {
                    panic!("integer layer on floats")
                };
                let (a, shape) = acc(l.kind, &c, &xs, &lw.codes, &lw.shape, qin.zero_point);
                let cout = l.out_channels;
                let inner: usize = if l.kind == LayerKind::Linear {
                    1
                } else {
                    shape[2] * shape[3]
                };
                let ch = |k: usize| (k / inner) % cout;
                let bq: Vec<i32> = (0..cout)
                    .map(|c| quantize_bias(lw.bias[c], qin.scale, lw.scales[c]))
                    .collect();
                match out_q {
                    Some(q) => V::Codes(
                        a.iter()
                            .enumerate()
                            .map(|(k, &a)| {
                                Requant::new(qin.scale, lw.scales[ch(k)], &q, l.relu)
                                    .apply(a, bq[ch(k)])
                            })
                            .collect(),
                        shape,
                        q,
                    ),
                    None => V::Float(
                        Tensor::new(
                            shape,
                            a.iter()
                                .enumerate()
                                .map(|(k, &a)| {
                                    let v =
                                        dequantize_acc(a, bq[ch(k)], qin.scale, lw.scales[ch(k)]);
                                    if l.relu { v.max(0.0) } else { v }
                                })
                                .collect(),
                        )
                        .unwrap(),
                    ),
                }
            }
            (Op::Layer(l), _) => {
                let xf = match (&x, &per) {
                    (V::Codes(c, s, q), Some(sc)) if node.inputs[0] == 0 => Tensor::new(
                        s.clone(),
                        c.iter()
                            .enumerate()
                            .map(|(k, &c)| sc[k % f] * (c - q.zero_point) as f32)
                            .collect(),
                    )
                    .unwrap(),
                    _ => x.float(),
                };
                let y = run_layer(l.kind, &xf, folded[i].as_ref().unwrap(), l.relu).unwrap();
                quant(&y, out_q)
            }
            (
                Op::PillarMax {
                    concat_back,
                    include_padding,
                },
                _,
            ) => {
                let (vals_of, shape, q) = match &x {
                    V::Codes(c, s, q) => (
                        c.iter().map(|&v| v as f64).collect::<Vec<f64>>(),
                        s.clone(),
                        Some(*q),
                    ),
                    V::Float(t) => (
                        t.data.iter().map(|&v| v as f64).collect(),
                        t.shape.clone(),
                        None,
                    ),
                };
                let c = shape[2];
                let mut m = vec![0f64; p * c];
                for pi in 0..p {
                    let k = if *include_padding {
                        n
                    } else {
                        input.counts[pi] as usize
                    };
                    for ch in 0..c {
                        m[pi * c + ch] = (0..k)
                            .map(|j| vals_of[(pi * n + j) * c + ch])
                            .fold(f64::NEG_INFINITY, f64::max);
                        if k == 0 {
                            m[pi * c + ch] = q.map_or(0.0, |q| q.zero_point as f64);
                        }
                    }
                }
                let mt = Tensor::new(vec![p, c], m.iter().map(|&v| v as f32).collect()).unwrap();
                let xt = Tensor::new(shape, vals_of.iter().map(|&v| v as f32).collect()).unwrap();
                let y = if *concat_back {
                    concat_pillar_max(&xt, &mt)
                } else {
                    mt
                };
                match q {
                    Some(q) => V::Codes(y.data.iter().map(|&v| v as i32).collect(), y.shape, q),
                    None => V::Float(y),
                }
            }
            (Op::Scatter { channels }, _) => {
                let c = *channels;
                let (fill, q) = match &x {
                    V::Codes(_, _, q) => (q.zero_point as f32, Some(*q)),
                    V::Float(_) => (0.0, None),
                };
                let src: Vec<f32> = match &x {
                    V::Codes(cd, _, _) => cd.iter().map(|&v| v as f32).collect(),
                    V::Float(t) => t.data.clone(),
                };
                let mut img = vec![fill; c * ny * nx];
                for (pi, cell) in input.coords.iter().enumerate() {
                    let k = cell[1] as usize * nx + cell[2] as usize;
                    for ch in 0..c {
                        img[ch * ny * nx + k] = src[pi * c + ch];
                    }
                }
                match q {
                    Some(q) => V::Codes(
                        img.iter().map(|&v| v as i32).collect(),
                        vec![1, c, ny, nx],
                        q,
                    ),
                    None => V::Float(Tensor::new(vec![1, c, ny, nx], img).unwrap()),
                }
            }
            (Op::Concat, _) => {
                let parts: Vec<V> = node.inputs.iter().map(|&v| vals[v].clone()).collect();
                match &parts[0] {
                    V::Codes(_, s0, q) => {
                        let mut data = Vec::new();
                        let mut c = 0;
                        for pt in &parts {
                            let V::Codes(cd, s, _) = pt else {
                                panic!("mixed concat")
                            };
                            data.extend_from_slice(cd);
                            c += s[1];
                        }
                        V::Codes(data, vec![1, c, s0[2], s0[3]], *q)
                    }
                    V::Float(_) => {
                        let ts: Vec<Tensor> = parts.iter().map(V::float).collect();
                        V::Float(
                            lidar_ptq::ops::concat::forward(&ts.iter().collect::<Vec<_>>(), 1)
                                .unwrap(),
                        )
                    }
                }
            }
        };
        vals.push(out);
    }
    let tasks = graph
        .tasks
        .iter()
        .map(|t| TaskMaps {
            heatmap: vals[t.heatmap].float().data,
            regression: t
                .regression
                .iter()
                .flat_map(|&v| vals[v].float().data)
                .collect(),
        })
        .collect();
    let hm = vals[graph.tasks[0].heatmap].float();
    HeadOutputs {
        tasks,
        h: hm.shape[2],
        w: hm.shape[3],
    }
}

#[test]
fn simulated_integer_network_matches_a_naive_integer_interpreter() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 5);
    let fr = frames(3, 2);
    let mut variants = vec![CalibOptions::new(Method::MinMax)];
    let mut o = CalibOptions::new(Method::MinMax);
    o.input_per_feature = false;
    variants.push(o);
    let mut o = CalibOptions::new(Method::Entropy {
        occupied_only: true,
    });
    o.flavour = Flavour::Symmetric;
    o.weight_bits = 4;
    o.keep_float = vec![
        "vfe.pfn_layers.0".into(),
        "dense_head.heads_list.0.hm.1".into(),
    ];
    variants.push(o);
    let mut o = CalibOptions::new(Method::Percentile {
        percentile: 99.9,
        occupied_only: false,
    });
    o.activation_bits = 4;
    o.keep_float = vec!["backbone_2d.deblocks.1".into()];
    variants.push(o);
    for opts in variants {
        let m = calibrate(&cfg, &w, &fr, &opts).unwrap();
        // Per-feature input scales exactly when asked for and the input's reader is integer.
        let first_int = !opts.keep_float.contains(&"vfe.pfn_layers.0".to_string());
        assert_eq!(
            m.input_scales.is_some(),
            opts.input_per_feature && first_int
        );
        let net = QuantNet::new(&graph, &w, &m).unwrap();
        for f in inputs(&cfg, &frames(2, 9)) {
            let got = net.run(&f.net_input()).unwrap();
            let want = naive(&graph, &m, &w, &f.net_input());
            assert_eq!(got, want, "{:?}", opts.method);
        }
    }
}

#[test]
fn every_method_gives_a_valid_model_close_to_fp32() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 11);
    let fr = frames(4, 3);
    let test = inputs(&cfg, &frames(2, 8));
    let fp = Fp32Engine::new(&graph, &w).unwrap();
    for name in [
        "minmax",
        "percentile",
        "percentile-occupied",
        "entropy",
        "entropy-occupied",
        "lidar-ptq",
    ] {
        let method = Method::from_name(name).unwrap();
        assert_eq!(method.name(), name);
        let opts = if method == Method::LidarPtq {
            quick_ptq(20)
        } else {
            CalibOptions::new(method)
        };
        let m = calibrate(&cfg, &w, &fr, &opts).unwrap();
        m.validate(&graph).unwrap();
        assert_eq!(m.provenance.method, name);
        assert_eq!(m.provenance.frames, 4);
        assert_eq!(m.provenance.fp32_digest, w.digest());
        // Every layer is integer and every value a layer reads is quantized.
        for (i, n) in graph.nodes.iter().enumerate() {
            if let Op::Layer(_) = n.op {
                assert!(
                    matches!(m.layers[i], Some(LayerPlan::Int(_))),
                    "{name}: {}",
                    n.name
                );
                assert!(m.activations[n.inputs[0]].is_some(), "{name}: {}", n.name);
            }
        }
        let net = QuantNet::new(&graph, &w, &m).unwrap();
        for f in &test {
            let q = net.run(&f.net_input()).unwrap();
            let r = fp.run(&f.net_input()).unwrap();
            for (a, b) in q.tasks.iter().zip(&r.tasks) {
                let (mut err, mut mag) = (0f64, 0f64);
                for (x, y) in a
                    .heatmap
                    .iter()
                    .chain(&a.regression)
                    .zip(b.heatmap.iter().chain(&b.regression))
                {
                    assert!(x.is_finite());
                    err += ((x - y) as f64).powi(2);
                    mag += (*y as f64).powi(2);
                }
                // 8-bit everywhere: the head outputs stay near FP32.
                assert!(
                    err < 0.05 * mag,
                    "{name}: relative squared error {}",
                    err / mag
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_clear_errors() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 1);
    let e = calibrate(&cfg, &w, &[], &CalibOptions::new(Method::MinMax))
        .unwrap_err()
        .to_string();
    assert!(e.contains("at least one frame"), "{e}");
    let mut o = CalibOptions::new(Method::MinMax);
    o.weight_bits = 3;
    let e = calibrate(&cfg, &w, &frames(1, 1), &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("weight bits 3"), "{e}");
    let mut o = CalibOptions::new(Method::MinMax);
    o.keep_float = vec!["no.such.layer".into()];
    let e = calibrate(&cfg, &w, &frames(1, 1), &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no.such.layer"), "{e}");
    let other = Weights::init(
        &Graph::build(
            &ModelConfig::load(std::path::Path::new(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/config/models/default.yaml"
            )))
            .unwrap(),
        )
        .unwrap(),
        1,
    );
    let e = calibrate(
        &cfg,
        &other,
        &frames(1, 1),
        &CalibOptions::new(Method::MinMax),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("weights do not fit"), "{e}");
}

#[test]
fn model_file_round_trips_and_refuses_bad_files() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 4);
    let mut o = CalibOptions::new(Method::MinMax);
    o.keep_float = vec!["dense_head.heads_list.1.rot.1".into()];
    o.weight_bits = 4;
    let m = calibrate(&cfg, &w, &frames(2, 4), &o).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q.safetensors");
    file::save(&path, &m, &graph).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let back = file::load_for(&path, &cfg, &w).unwrap();
    assert_eq!(back, m);
    assert_eq!(file::to_bytes(&back, &graph).unwrap(), bytes);
    // No temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);

    // Other FP32 weights, other config.
    let e = file::load_for(&path, &cfg, &weights(&graph, 5)).unwrap_err();
    assert!(matches!(e, FileError::OtherWeights { .. }));
    assert!(
        e.to_string().contains("calibrated for other FP32 weights"),
        "{e}"
    );
    let mut cfg2 = cfg.clone();
    cfg2.decode.score_threshold = 0.2;
    assert!(matches!(
        file::load_for(&path, &cfg2, &w),
        Err(FileError::OtherConfig { .. })
    ));

    // Damaged files.
    let write = |b: &[u8]| {
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, b).unwrap();
        file::load(&p)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(write(&bytes[..bytes.len() - 10]).contains("is not valid"));
    assert!(write(b"garbage").contains("is not valid"));
    // A weight code outside the 4-bit grid.
    let mut bad = m.clone();
    if let Some(LayerPlan::Int(lw)) = bad
        .layers
        .iter_mut()
        .flatten()
        .find(|p| matches!(p, LayerPlan::Int(_)))
    {
        lw.bits = 8;
        lw.codes[0] = 100;
    }
    let find = |b: &[u8], pat: &[u8]| b.windows(pat.len()).position(|w| w == pat).unwrap();
    let mut b8 = file::to_bytes(&bad, &graph).unwrap();
    let at = find(&b8, b"int:8");
    b8[at + 4] = b'4';
    let e = write(&b8);
    assert!(e.contains("weight code outside"), "{e}");
    // Tampered metadata.
    let mut t = bytes.clone();
    let at = find(&t, b"lidar_ptq-int8/1");
    t[at + 15] = b'9';
    assert!(write(&t).contains("format"), "{}", write(&t));
    // Per-feature input scales must be positive.
    let mut neg = m.clone();
    neg.input_scales
        .as_mut()
        .expect("per-feature input by default")[2] = -1.0;
    assert!(
        file::to_bytes(&neg, &graph)
            .unwrap_err()
            .contains("input scales")
    );
    // A model that does not fit the graph is not written.
    let mut wrong = m.clone();
    wrong.activations.pop();
    assert!(file::save(&path, &wrong, &graph).is_err());
}

#[test]
fn same_seed_and_inputs_give_identical_files() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 6);
    let fr = frames(4, 5);
    let a = calibrate(&cfg, &w, &fr, &quick_ptq(15)).unwrap();
    let b = calibrate(&cfg, &w, &fr, &quick_ptq(15)).unwrap();
    let (ba, bb) = (
        file::to_bytes(&a, &graph).unwrap(),
        file::to_bytes(&b, &graph).unwrap(),
    );
    assert_eq!(ba, bb);
    // Another seed changes the reconstruction (crops, frames), hence the file.
    let mut o = quick_ptq(15);
    o.seed = 8;
    let c = calibrate(&cfg, &w, &fr, &o).unwrap();
    assert_ne!(file::to_bytes(&c, &graph).unwrap(), ba);
    assert_eq!(c.provenance.frames_digest, a.provenance.frames_digest);
    assert_eq!(c.provenance.params["tgpl"], "on");
}

/// The optimised quantizers (hardened) have a lower objective than round-to-nearest
/// with the initial step sizes, unit by unit, for TGPL alone (step sizes only, W8A4 from
/// min-max), adaptive rounding alone (W4A8 from the grid search) and both (W4A4 from
/// min-max). The objective is measured on the full map of the first frame; the typical
/// unit (geometric mean of after / before) must gain, and most units must.
#[test]
fn reconstruction_lowers_each_units_objective() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 12);
    let fr = frames(4, 6);
    // (tgpl, adaround, weight bits, activation bits, grid search, required gain)
    for (tgpl, ada, wb, ab, grid, gain) in [
        (true, false, 8, 4, false, 0.97),
        (false, true, 4, 8, true, 0.8),
        (true, true, 4, 4, false, 0.85),
    ] {
        let mut o = quick_ptq(80);
        (o.weight_bits, o.activation_bits) = (wb, ab);
        if !grid {
            o.grid_search = None;
        }
        o.recon.tgpl = tgpl;
        o.recon.adaround = ada;
        o.recon.crop = 0;
        o.recon.crop_pillars = 0;
        o.recon.tgpl_every = 4;
        o.recon.lr_v = 1e-2;
        o.recon.report = true;
        let c = calibrate_detailed(&cfg, &w, &fr, &o, &indicatif::ProgressBar::hidden()).unwrap();
        assert!(!c.units.is_empty());
        let log_gain: f64 = c
            .units
            .iter()
            .map(|u| (u.objective_after() / u.objective_before()).ln())
            .sum::<f64>()
            / c.units.len() as f64;
        let typical = log_gain.exp();
        let better = c
            .units
            .iter()
            .filter(|u| u.objective_after() < u.objective_before())
            .count();
        let report: Vec<String> = c
            .units
            .iter()
            .map(|u| {
                format!(
                    "{}: {:.4e} -> {:.4e} (step {:.3e} -> {:.3e}, {} flipped)",
                    u.node,
                    u.objective_before(),
                    u.objective_after(),
                    u.scale_before,
                    u.scale_after,
                    u.flipped
                )
            })
            .collect();
        let report = format!(
            "tgpl {tgpl} adaround {ada}: typical unit objective x {typical:.3}, {better} of {} units better\n{}",
            c.units.len(),
            report.join("\n")
        );
        println!("{report}");
        assert!(typical < gain, "{report}");
        assert!(better * 2 > c.units.len(), "{report}");
        if ada {
            assert!(c.units.iter().any(|u| u.flipped > 0));
        } else {
            assert!(c.units.iter().all(|u| u.flipped == 0));
        }
        if tgpl {
            assert!(
                c.units
                    .iter()
                    .all(|u| u.lambda > 0.0 && u.tgpl_before > 0.0)
            );
        } else {
            assert!(
                c.units
                    .iter()
                    .all(|u| u.lambda == 0.0 && u.tgpl_after == 0.0)
            );
        }
    }
}

/// The INT8 engine (packed kernels, fused epilogues) executes a calibrated model exactly
/// as the simulated-integer network that calibration scored it with.
#[test]
fn the_int8_engine_reproduces_the_simulated_integer_network() {
    let (cfg, graph) = tiny();
    let w = weights(&graph, 13);
    let fr = frames(3, 4);
    let mut variants = vec![CalibOptions::new(Method::MinMax), quick_ptq(10)];
    let mut o = CalibOptions::new(Method::Percentile {
        percentile: 99.9,
        occupied_only: true,
    });
    o.keep_float = vec!["backbone_2d.deblocks.1".into()];
    variants.push(o);
    // One scale for the whole input (the others have one per feature).
    let mut o = CalibOptions::new(Method::MinMax);
    o.input_per_feature = false;
    variants.push(o);
    for opts in variants {
        let m = calibrate(&cfg, &w, &fr, &opts).unwrap();
        assert_eq!(m.input_scales.is_some(), opts.input_per_feature);
        let net = QuantNet::new(&graph, &w, &m).unwrap();
        let mut engine = lidar_ptq::engine::Int8Engine::new(&graph, &w, &m).unwrap();
        for f in inputs(&cfg, &frames(2, 10)) {
            let want = net.run(&f.net_input()).unwrap();
            let got = engine.run(&f.net_input()).unwrap();
            assert_eq!(got, want, "{:?}", opts.method);
        }
    }
}

/// A baseline's statistic sets the per-feature input scales: each feature observed on
/// its own over every entry of the calibration inputs (padding slots included) or over
/// its non-zero entries, symmetric on the 8-bit grid.
#[test]
fn baselines_set_the_per_feature_input_scales_with_their_statistic() {
    use lidar_ptq::quant::Grid;
    use lidar_ptq::quant::observers::{Entropy, MinMax, Observer, Percentile};
    let (cfg, graph) = tiny();
    let w = weights(&graph, 21);
    let fr = frames(3, 6);
    let ins = inputs(&cfg, &fr);
    let width = ins[0].width;
    let feature = |j: usize| -> Vec<f32> {
        ins.iter()
            .flat_map(|f| f.decorated.iter().skip(j).step_by(width).copied())
            .collect()
    };
    let sym = Grid::activation(8, Flavour::Symmetric);
    type MakeObserver = Box<dyn Fn() -> Box<dyn Observer>>;
    let cases: Vec<(Method, MakeObserver)> = vec![
        (Method::MinMax, Box::new(|| Box::new(MinMax::new()))),
        (
            Method::Entropy {
                occupied_only: false,
            },
            Box::new(|| Box::new(Entropy::new(false, Entropy::DEFAULT_BINS).unwrap())),
        ),
        (
            Method::Percentile {
                percentile: 99.0,
                occupied_only: true,
            },
            Box::new(|| Box::new(Percentile::new(99.0, true, Percentile::DEFAULT_BINS).unwrap())),
        ),
    ];
    let mut all_scales = Vec::new();
    for (method, observer) in cases {
        let m = calibrate(&cfg, &w, &fr, &CalibOptions::new(method)).unwrap();
        let got = m.input_scales.clone().unwrap();
        let want: Vec<f32> = (0..width)
            .map(|j| {
                let xs = feature(j);
                if xs.iter().all(|&x| x == 0.0) {
                    // A feature never non-zero keeps the min-max (degenerate) scale.
                    return QParams::for_range(0.0, 0.0, sym, Flavour::Symmetric).scale;
                }
                let mut o = observer();
                o.observe(&xs).unwrap();
                o.finish(sym, Flavour::Symmetric).unwrap().scale
            })
            .collect();
        assert_eq!(got, want, "{method:?}");
        all_scales.push(got);
    }
    // Entropy over every entry (mostly padding zeros) clips some feature far below its
    // min-max range: the baseline's failure reaches the input too.
    assert!(
        all_scales[1]
            .iter()
            .zip(&all_scales[0])
            .any(|(e, m)| *e < 0.5 * m),
        "{all_scales:?}"
    );
}
