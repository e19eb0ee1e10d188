//! `lidar_ptq bench`: end-to-end and per-stage latency of the FP32 and INT8 pipelines on
//! one simulated scan, in the same process, median of N runs after warm-up.
//!
//! Stages: voxelise (pillars + decoration), PFN (`vfe.*` and the scatter; the INT8 input
//! quantization included), backbone (`backbone_2d.blocks`), neck (`backbone_2d.deblocks`
//! and the concat), head (`dense_head`, with collecting the head maps) and decode (boxes +
//! NMS). The dense part is backbone + neck + head, whose multiply-accumulates
//! (`Graph::dense_macs`) give the GOP/s figures. For a voxel model, "voxelise" is the mean
//! voxeliser and "pfn" is the sparse 3D backbone (rulebooks, sparse convs, height
//! compression), reported also as `sparse_ms` with the active sites of each resolution.

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::cloud::Points;
use crate::engine::{EngineError, Fp32Engine, HeadOutputs, Int8Engine, NetInput};
use crate::kernels::{Isa, panel_stats};
use crate::model::decode::{DecodeError, decode};
use crate::model::graph::Graph;
use crate::model::input::ScanInput;
use crate::model::voxelize::Mode;
use crate::model::weights::{Weights, WeightsError};
use crate::model::{ConfigError, ModelConfig};
use crate::quant::QuantModel;
use crate::sim::{LidarModel, SimConfig, Simulator};
use serde::Serialize;
use std::path::PathBuf;
use std::time::Instant;
use thiserror::Error;

/// Built-in model descriptions (`--preset`), so the preset benchmark needs only the binary.
pub const PRESETS: [(&str, &str); 4] = [
    (
        "nuscenes-pillar",
        include_str!("../../config/models/nuscenes_pillar.yaml"),
    ),
    (
        "nuscenes-voxel",
        include_str!("../../config/models/nuscenes_voxel.yaml"),
    ),
    ("default", include_str!("../../config/models/default.yaml")),
    (
        "autoware-pillar",
        include_str!("../../config/models/autoware_pillar.yaml"),
    ),
];

/// Seed of the preset's random weights.
const PRESET_WEIGHT_SEED: u64 = 7;
/// Scene seed of the timed scan; the `auto` INT8 model is built on the next few seeds.
const SCAN_SEED: u64 = 2024;
const AUTO_SCANS: usize = 3;

#[derive(Debug, Error)]
pub enum BenchError {
    #[error(
        "unknown preset `{0}` (known: nuscenes-pillar, nuscenes-voxel, default, autoware-pillar)"
    )]
    Preset(String),
    #[error("{0}")]
    Usage(String),
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model {model}: {message}")]
    Graph { model: String, message: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("quantized model {path}: {message}")]
    QuantModel { path: PathBuf, message: String },
}

/// Where the FP32 model comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// A weights file; its config is the one embedded in its metadata unless given.
    Weights {
        path: PathBuf,
        config: Option<PathBuf>,
    },
    /// A model description with seeded random weights.
    Config(PathBuf),
    /// A built-in description ([`PRESETS`]) with seeded random weights.
    Preset(String),
}

/// The INT8 model to time.
#[derive(Debug, Clone)]
pub enum Int8Source {
    /// Skip INT8.
    None,
    /// A quick min-max model built on the spot from a few simulated scans (timing only).
    Auto,
    /// A quantized model file (JSON `QuantModel`).
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub model: ModelSource,
    pub int8: Int8Source,
    pub iters: usize,
    pub warmup: usize,
    /// Simulated sensor; default: HDL-32E for nuScenes models, HDL-64E otherwise.
    pub lidar: Option<LidarModel>,
    /// Also report the median time of every node ([`BenchReport::layers`]).
    pub layers: bool,
}

/// One node's median milliseconds in each pipeline. A node the engine runs together with
/// others (the FP32 engine's stacked sibling convs) carries the group's time on the
/// first of them to finish and 0 on the rest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LayerTime {
    pub node: String,
    pub fp32_ms: f64,
    pub int8_ms: Option<f64>,
}

/// Median milliseconds per stage.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Stages {
    pub voxelize: f64,
    pub pfn: f64,
    pub backbone: f64,
    pub neck: f64,
    pub head: f64,
    pub decode: f64,
}

/// One pipeline's figures.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PipelineTimes {
    /// Median end-to-end milliseconds (points -> boxes).
    pub total_ms: f64,
    /// Median backbone + neck + head milliseconds.
    pub dense_ms: f64,
    /// Dense-part throughput: 2 * MACs / time, in G(FL)OP/s.
    pub dense_gops: f64,
    pub stages: Stages,
    pub detections: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchReport {
    pub model: String,
    pub lidar: String,
    pub points: usize,
    pub pillars: usize,
    pub iters: usize,
    pub warmup: usize,
    pub threads: usize,
    /// The INT8 kernel family in use.
    pub isa: String,
    pub cpu_features: Vec<String>,
    /// Dense-part multiply-accumulates per frame, in G.
    pub dense_gmac: f64,
    pub fp32_ms: f64,
    pub fp32_dense_ms: f64,
    pub fp32_stages: Stages,
    pub fp32: PipelineTimes,
    pub int8_ms: Option<f64>,
    pub int8_dense_ms: Option<f64>,
    pub int8_stages: Option<Stages>,
    pub int8: Option<PipelineTimes>,
    /// FP32 / INT8 end-to-end.
    pub speedup: Option<f64>,
    pub quant_method: Option<String>,
    /// Fraction of INT8 GEMM panels written from the uniform-region cache.
    pub uniform_panels: Option<f64>,
    /// Resident parameter bytes of the folded FP32 layers and of the INT8 engine.
    pub fp32_weight_bytes: usize,
    pub int8_weight_bytes: Option<usize>,
    /// INT8 / FP32 parameter bytes.
    pub int8_weight_ratio: Option<f64>,
    /// Voxel models: median FP32 milliseconds of the sparse 3D backbone (rulebooks
    /// included), its share of the end-to-end time, and the active sites of each
    /// resolution of the timed scan (the input voxels first).
    pub sparse_ms: Option<f64>,
    pub sparse_share: Option<f64>,
    pub active_sites: Option<Vec<usize>>,
    /// Voxel models: the same for the INT8 engine.
    pub int8_sparse_ms: Option<f64>,
    pub int8_sparse_share: Option<f64>,
    /// With `--layers`: every node's median time, in graph order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layers: Option<Vec<LayerTime>>,
}

/// CPU features that matter to the kernels, as detected at run time.
pub fn cpu_features() -> Vec<String> {
    #[allow(unused_mut)]
    let mut f = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($name:tt),*) => {$(
                if std::arch::is_x86_feature_detected!($name) {
                    f.push($name.to_string());
                }
            )*};
        }
        probe!(
            "sse4.2",
            "avx",
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vl",
            "avx512vnni",
            "avxvnni"
        );
    }
    f
}

/// Loads or builds the FP32 model.
pub fn load_model(src: &ModelSource) -> Result<(ModelConfig, Graph, Weights), BenchError> {
    let read = |p: &PathBuf| {
        std::fs::read_to_string(p).map_err(|source| BenchError::Read {
            path: p.clone(),
            source,
        })
    };
    let graph_of = |cfg: &ModelConfig| {
        Graph::build(cfg).map_err(|message| BenchError::Graph {
            model: cfg.name.clone(),
            message,
        })
    };
    match src {
        ModelSource::Preset(name) => {
            let text = PRESETS
                .iter()
                .find(|(n, _)| *n == name.replace('_', "-"))
                .map(|(_, t)| *t)
                .ok_or_else(|| BenchError::Preset(name.clone()))?;
            let cfg = ModelConfig::from_yaml(text)?;
            let graph = graph_of(&cfg)?;
            let w = Weights::init(&graph, PRESET_WEIGHT_SEED);
            Ok((cfg, graph, w))
        }
        ModelSource::Config(path) => {
            let cfg = ModelConfig::from_yaml(&read(path)?)?;
            let graph = graph_of(&cfg)?;
            let w = Weights::init(&graph, PRESET_WEIGHT_SEED);
            Ok((cfg, graph, w))
        }
        ModelSource::Weights { path, config } => {
            let bytes = std::fs::read(path).map_err(|source| BenchError::Read {
                path: path.clone(),
                source,
            })?;
            let (w, meta) = Weights::from_bytes(&bytes, path)?;
            let text = match config {
                Some(c) => read(c)?,
                None => meta
                    .get(crate::train::trainer::META_CONFIG)
                    .cloned()
                    .ok_or_else(|| {
                        BenchError::Usage(format!(
                            "{} embeds no model config: pass --config",
                            path.display()
                        ))
                    })?,
            };
            let cfg = ModelConfig::from_yaml(&text)?;
            let graph = graph_of(&cfg)?;
            w.validate(&graph)?;
            Ok((cfg, graph, w))
        }
    }
}

/// Reads a quantized model (JSON) and checks that it was calibrated from `weights`.
pub fn load_quant_model(
    path: &std::path::Path,
    cfg: &ModelConfig,
    weights: &Weights,
) -> Result<QuantModel, BenchError> {
    // The INT8 model file of `lidar_ptq calibrate`: refused when calibrated for other
    // FP32 weights or another config.
    crate::quant::file::load_for(path, cfg, weights).map_err(|e| BenchError::QuantModel {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The sensor the model was made for, unless chosen.
fn default_lidar(cfg: &ModelConfig) -> LidarModel {
    if cfg.name.contains("nuscenes") {
        LidarModel::Hdl32
    } else {
        LidarModel::Hdl64
    }
}

/// Which stage a node belongs to, by name.
fn stage_of(name: &str) -> usize {
    if name.starts_with("dense_head") {
        STAGE_HEAD
    } else if name.starts_with("backbone_2d.deblocks") || name == "backbone_2d.concat" {
        STAGE_NECK
    } else if name.starts_with("backbone_2d") {
        STAGE_BACKBONE
    } else {
        STAGE_PFN
    }
}

const STAGE_VOX: usize = 0;
const STAGE_PFN: usize = 1;
const STAGE_BACKBONE: usize = 2;
const STAGE_NECK: usize = 3;
const STAGE_HEAD: usize = 4;
const STAGE_DECODE: usize = 5;

/// A pipeline's network step: runs one input into the head maps, calling `mark(node)`
/// after each node.
type NetStep<'a> = dyn FnMut(&NetInput<'_>, &mut dyn FnMut(usize), &mut HeadOutputs) -> Result<(), BenchError>
    + 'a;

/// Per-stage milliseconds of one run, and per node.
struct Sample {
    stages: [f64; 6],
    nodes: Vec<f64>,
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The per-scan input buffers of the model (deployment caps).
fn scan_input(cfg: &ModelConfig) -> Result<ScanInput, BenchError> {
    ScanInput::new(cfg, Mode::Test).map_err(|e| BenchError::Graph {
        model: cfg.name.clone(),
        message: e.to_string(),
    })
}

/// Times `runs` iterations of a pipeline whose network step is `net(input, mark)`;
/// `mark(node)` is called after each node.
fn time_pipeline(
    cfg: &ModelConfig,
    graph: &Graph,
    pts: &Points,
    frame: &mut ScanInput,
    opts: &BenchOptions,
    progress: &indicatif::ProgressBar,
    net: &mut NetStep<'_>,
) -> Result<(Vec<Sample>, usize), BenchError> {
    let mut heads = HeadOutputs {
        tasks: Vec::new(),
        h: 0,
        w: 0,
    };
    let stage: Vec<usize> = graph.nodes.iter().map(|n| stage_of(&n.name)).collect();
    let mut samples = Vec::new();
    let mut detections = 0;
    for it in 0..opts.warmup + opts.iters {
        let mut s = [0.0; 6];
        let mut nodes = vec![0.0; graph.nodes.len()];
        let t0 = Instant::now();
        frame
            .prepare(pts)
            .map_err(|e| EngineError::op("voxelise", e))?;
        let t1 = Instant::now();
        s[STAGE_VOX] = ms(t1 - t0);
        let mut last = t1;
        net(
            &frame.input(),
            &mut |node| {
                let now = Instant::now();
                let t = ms(now - last);
                s[stage[node]] += t;
                nodes[node] += t;
                last = now;
            },
            &mut heads,
        )?;
        let t2 = Instant::now();
        // Collecting the head maps after the last node.
        s[STAGE_HEAD] += ms(t2 - last);
        let boxes = decode(cfg, &heads.views())?;
        s[STAGE_DECODE] = ms(t2.elapsed());
        detections = boxes.len();
        if it >= opts.warmup {
            samples.push(Sample { stages: s, nodes });
        }
        progress.inc(1);
    }
    Ok((samples, detections))
}

/// Median milliseconds of every node.
fn node_medians(samples: &[Sample], n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| median(samples.iter().map(|s| s.nodes[i]).collect()))
        .collect()
}

fn summarize(samples: &[Sample], detections: usize, dense_gmac: f64) -> PipelineTimes {
    let col = |k: usize| median(samples.iter().map(|s| s.stages[k]).collect());
    let total = median(samples.iter().map(|s| s.stages.iter().sum()).collect());
    let dense = median(
        samples
            .iter()
            .map(|s| s.stages[STAGE_BACKBONE] + s.stages[STAGE_NECK] + s.stages[STAGE_HEAD])
            .collect(),
    );
    PipelineTimes {
        total_ms: total,
        dense_ms: dense,
        dense_gops: if dense > 0.0 {
            2.0 * dense_gmac / (dense / 1e3)
        } else {
            0.0
        },
        stages: Stages {
            voxelize: col(STAGE_VOX),
            pfn: col(STAGE_PFN),
            backbone: col(STAGE_BACKBONE),
            neck: col(STAGE_NECK),
            head: col(STAGE_HEAD),
            decode: col(STAGE_DECODE),
        },
        detections,
    }
}

/// Runs the benchmark. `progress` counts runs (warm-up included).
pub fn run(
    opts: &BenchOptions,
    progress: &indicatif::ProgressBar,
) -> Result<BenchReport, BenchError> {
    if opts.iters == 0 {
        return Err(BenchError::Usage("--iters must be at least 1".into()));
    }
    let (cfg, graph, weights) = load_model(&opts.model)?;
    let lidar = opts.lidar.unwrap_or_else(|| default_lidar(&cfg));
    let sim = Simulator::new(SimConfig::new(lidar));
    let (pts, _) = sim.sample(SCAN_SEED);
    let (bb, head) = graph.dense_macs();
    let dense_gmac = (bb + head) as f64 / 1e9;
    let mut frame = scan_input(&cfg)?;
    let runs = opts.warmup + opts.iters;
    let with_int8 = !matches!(opts.int8, Int8Source::None);
    progress.set_length((runs * if with_int8 { 2 } else { 1 }) as u64);

    let fp32 = Fp32Engine::new(&graph, &weights)?;
    let (samples, det) = time_pipeline(
        &cfg,
        &graph,
        &pts,
        &mut frame,
        opts,
        progress,
        &mut |input, mark, heads| {
            *heads = fp32.run_marked(input, mark)?;
            Ok(())
        },
    )?;
    let fp32_times = summarize(&samples, det, dense_gmac);
    let fp32_nodes = node_medians(&samples, graph.nodes.len());

    let fp32_sparse_ms = graph.sparse.as_ref().map(|_| fp32_times.stages.pfn);
    let fp32_sparse_share = fp32_sparse_ms.map(|s| s / fp32_times.total_ms);
    let active_sites =
        crate::engine::sparse::frame_sites(&graph, frame.coords())?.map(|fs| fs.counts());
    let qm = match &opts.int8 {
        _ if !with_int8 => None,
        Int8Source::None => None,
        Int8Source::File(p) => Some(load_quant_model(p, &cfg, &weights)?),
        Int8Source::Auto => {
            let scans: Vec<Points> = (1..=AUTO_SCANS as u64)
                .map(|k| sim.sample(SCAN_SEED + k).0)
                .collect();
            Some(crate::quant::quick::minmax_quick(
                &cfg, &graph, &weights, &scans,
            )?)
        }
    };
    let fp32_weight_bytes: usize = crate::engine::fp32::fold_layers(&graph, &weights)?
        .iter()
        .flatten()
        .map(|f| 4 * (f.weight.data.len() + f.bias.len()))
        .sum();
    let mut int8_weight_bytes = None;
    let mut int8_times = None;
    let mut int8_nodes = None;
    let mut uniform = None;
    let isa = Isa::detect();
    if let Some(qm) = &qm {
        let mut engine = Int8Engine::with_isa(&graph, &weights, qm, isa)?;
        int8_weight_bytes = Some(engine.weight_bytes());
        let before = panel_stats();
        let (samples, det) = time_pipeline(
            &cfg,
            &graph,
            &pts,
            &mut frame,
            opts,
            progress,
            &mut |input, mark, heads| Ok(engine.run_observed(input, heads, mark)?),
        )?;
        let after = panel_stats();
        let seen = after.0 - before.0;
        uniform = (seen > 0).then(|| (after.1 - before.1) as f64 / seen as f64);
        int8_times = Some(summarize(&samples, det, dense_gmac));
        int8_nodes = Some(node_medians(&samples, graph.nodes.len()));
    }
    let layers = opts.layers.then(|| {
        graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| LayerTime {
                node: n.name.clone(),
                fp32_ms: fp32_nodes[i],
                int8_ms: int8_nodes.as_ref().map(|t| t[i]),
            })
            .collect()
    });
    let int8_sparse = int8_times
        .as_ref()
        .filter(|_| graph.sparse.is_some())
        .map(|t| t.stages.pfn);
    let (int8_sparse_ms, int8_sparse_share) = (
        int8_sparse,
        int8_sparse
            .zip(int8_times.as_ref())
            .map(|(s, t)| s / t.total_ms),
    );
    Ok(BenchReport {
        model: cfg.name.clone(),
        lidar: lidar.name().to_string(),
        points: pts.len(),
        pillars: frame.cells(),
        iters: opts.iters,
        warmup: opts.warmup,
        threads: rayon::current_num_threads(),
        isa: format!("{isa:?}"),
        cpu_features: cpu_features(),
        dense_gmac,
        fp32_ms: fp32_times.total_ms,
        fp32_dense_ms: fp32_times.dense_ms,
        fp32_stages: fp32_times.stages.clone(),
        int8_ms: int8_times.as_ref().map(|t| t.total_ms),
        int8_dense_ms: int8_times.as_ref().map(|t| t.dense_ms),
        int8_stages: int8_times.as_ref().map(|t| t.stages.clone()),
        speedup: int8_times
            .as_ref()
            .map(|t| fp32_times.total_ms / t.total_ms),
        int8: int8_times,
        fp32: fp32_times,
        quant_method: qm.map(|q| q.provenance.method),
        uniform_panels: uniform,
        fp32_weight_bytes,
        int8_weight_bytes,
        int8_weight_ratio: int8_weight_bytes.map(|b| b as f64 / fp32_weight_bytes as f64),
        sparse_share: fp32_sparse_share,
        sparse_ms: fp32_sparse_ms,
        active_sites,
        int8_sparse_ms,
        int8_sparse_share,
        layers,
    })
}

/// The human-readable report.
pub fn format_report(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} on a simulated {} scan: {} points, {} pillars",
        r.model, r.lidar, r.points, r.pillars
    );
    let _ = writeln!(
        s,
        "CPU features: {}; INT8 kernels {}; {} threads; dense part {:.2} GMAC",
        r.cpu_features.join(" "),
        r.isa,
        r.threads,
        r.dense_gmac
    );
    let _ = writeln!(
        s,
        "median of {} runs after {} warm-up (ms):",
        r.iters, r.warmup
    );
    let _ = writeln!(
        s,
        "{:<6} {:>9} {:>8} {:>8} {:>9} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "", "total", "voxel", "pfn", "backbone", "neck", "head", "decode", "dense", "GOP/s"
    );
    let mut row = |name: &str, t: &PipelineTimes| {
        let st = &t.stages;
        let _ = writeln!(
            s,
            "{:<6} {:>9.2} {:>8.2} {:>8.2} {:>9.2} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>8.1}",
            name,
            t.total_ms,
            st.voxelize,
            st.pfn,
            st.backbone,
            st.neck,
            st.head,
            st.decode,
            t.dense_ms,
            t.dense_gops
        );
    };
    row("fp32", &r.fp32);
    if let Some(t) = &r.int8 {
        row("int8", t);
    }
    if let (Some(sp), Some(m)) = (r.speedup, &r.quant_method) {
        let _ = writeln!(
            s,
            "INT8 ({m}) speed-up end to end: {sp:.2}x; dense part {:.2}x; uniform panels reused {:.1}%",
            r.fp32_dense_ms / r.int8_dense_ms.unwrap_or(f64::NAN),
            100.0 * r.uniform_panels.unwrap_or(0.0)
        );
    }
    if let (Some(b), Some(q)) = (r.int8_weight_bytes, r.int8_weight_ratio) {
        let _ = writeln!(
            s,
            "parameters: FP32 {:.2} MB, INT8 {:.2} MB ({:.1}% of FP32)",
            r.fp32_weight_bytes as f64 / 1e6,
            b as f64 / 1e6,
            100.0 * q
        );
    }
    if let (Some(ms), Some(share)) = (r.sparse_ms, r.sparse_share) {
        let _ = write!(
            s,
            "sparse 3D backbone (the pfn column): FP32 {ms:.2} ms ({:.1}% of the scan)",
            100.0 * share
        );
        if let (Some(ms), Some(share)) = (r.int8_sparse_ms, r.int8_sparse_share) {
            let _ = write!(s, ", INT8 {ms:.2} ms ({:.1}%)", 100.0 * share);
        }
        let _ = writeln!(
            s,
            "; active sites per resolution {:?}",
            r.active_sites.as_deref().unwrap_or(&[])
        );
    }
    if let Some(layers) = &r.layers {
        let _ = writeln!(s, "per node (median ms):");
        let _ = writeln!(s, "{:<48} {:>9} {:>9}", "node", "fp32", "int8");
        for l in layers {
            let int8 = l.int8_ms.map_or("-".to_string(), |t| format!("{t:.2}"));
            let _ = writeln!(s, "{:<48} {:>9.2} {:>9}", l.node, l.fp32_ms, int8);
        }
    }
    s
}
