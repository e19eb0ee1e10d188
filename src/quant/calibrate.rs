//! Calibration: from an FP32 model and unlabelled scans to a [`QuantModel`].
//!
//! 1. BatchNorm is folded; every layer not kept float gets per-output-channel symmetric
//!    weight codes; every value read by an integer layer gets per-tensor activation
//!    parameters. Values tied by glue ops share parameters: pillar max, scatter and height
//!    compression in and out, a concat and its inputs, a residual add's two inputs (a
//!    *group*). A
//!    voxel model's sparse values hold active sites only, so their statistics are over
//!    the occupied sites by construction.
//! 2. One FP pass over every calibration frame feeds the group statistics: min-max,
//!    percentile or entropy (over all entries, or over the occupied, non-zero ones only).
//! 3. LiDAR-PTQ (`Method::LidarPtq`) starts from min-max and, unless switched off, runs
//!    the Lp grid search of the clipping range (weights per channel on the weights,
//!    activations on entries sampled from the first frames), then the unit-by-unit
//!    reconstruction with TGPL and adaptive rounding ([`super::reconstruct`]).

use super::error::QuantError;
use super::grid_search::GridSearch;
use super::model::{LayerPlan, LayerWeights, Provenance, QuantModel, quantize_weights_minmax};
use super::observers::{MinMax, Observer, ObserverKind};
use super::qnet::{QValue, QnetError, QuantNet, float_model, weight_in_axis, weight_out_axis};
use super::reconstruct::{self, ReconOptions, UnitReport};
use super::scheme::{Flavour, Grid, QParams};
use super::tgpl::{Positives, TgplOptions, positives};
use crate::cloud::Points;
use crate::engine::fp32::{FoldedLayer, collect_heads, fold_layers};
use crate::engine::{EngineError, NetInput};
use crate::model::ModelConfig;
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::input::ScanInput;
use crate::model::voxelize::Mode;
use crate::model::weights::Weights;
use crate::ops::{OpsError, Tensor};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// Errors of calibration.
#[derive(Debug, thiserror::Error)]
pub enum CalibError {
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Qnet(#[from] QnetError),
    #[error(transparent)]
    Quant(#[from] QuantError),
    #[error("layer {node}: {source}")]
    Op { node: String, source: OpsError },
    #[error("calibration options: {0}")]
    Options(String),
    #[error("calibration needs at least one frame")]
    NoFrames,
}

/// The statistic (and, for LiDAR-PTQ, the whole procedure) that sets the parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    MinMax,
    Percentile {
        percentile: f64,
        occupied_only: bool,
    },
    Entropy {
        occupied_only: bool,
    },
    /// Min-max, then (switchable) grid search, TGPL and adaptive rounding.
    LidarPtq,
}

impl Method {
    /// The CLI / provenance name.
    pub fn name(&self) -> &'static str {
        match self {
            Method::MinMax => "minmax",
            Method::Percentile {
                occupied_only: false,
                ..
            } => "percentile",
            Method::Percentile {
                occupied_only: true,
                ..
            } => "percentile-occupied",
            Method::Entropy {
                occupied_only: false,
            } => "entropy",
            Method::Entropy {
                occupied_only: true,
            } => "entropy-occupied",
            Method::LidarPtq => "lidar-ptq",
        }
    }

    /// Parses a CLI name (percentile at 99.99).
    pub fn from_name(name: &str) -> Option<Method> {
        Some(match name {
            "minmax" => Method::MinMax,
            "percentile" => Method::Percentile {
                percentile: 99.99,
                occupied_only: false,
            },
            "percentile-occupied" => Method::Percentile {
                percentile: 99.99,
                occupied_only: true,
            },
            "entropy" => Method::Entropy {
                occupied_only: false,
            },
            "entropy-occupied" => Method::Entropy {
                occupied_only: true,
            },
            "lidar-ptq" => Method::LidarPtq,
            _ => return None,
        })
    }

    fn observer(&self) -> Option<ObserverKind> {
        match *self {
            Method::Percentile {
                percentile,
                occupied_only,
            } => Some(ObserverKind::Percentile {
                percentile,
                sparsity_aware: occupied_only,
            }),
            Method::Entropy { occupied_only } => Some(ObserverKind::Entropy {
                sparsity_aware: occupied_only,
            }),
            Method::MinMax | Method::LidarPtq => None,
        }
    }
}

/// Everything that decides a calibration (recorded in the provenance).
#[derive(Debug, Clone, PartialEq)]
pub struct CalibOptions {
    pub method: Method,
    pub weight_bits: u32,
    pub activation_bits: u32,
    pub flavour: Flavour,
    /// Layer nodes that stay float (by node name).
    pub keep_float: Vec<String>,
    /// LiDAR-PTQ component 1; `None` keeps plain min-max.
    pub grid_search: Option<GridSearch>,
    /// What the grid search clips: weights (per channel), activations (per tensor).
    pub grid_weights: bool,
    pub grid_activations: bool,
    /// Weight candidates scored with each weight's error weighed by `E|x|^p` of the input
    /// channel it multiplies (measured on the grid frames), instead of unweighted.
    pub grid_input_aware: bool,
    /// Frames whose activations feed the activation grid search.
    pub grid_frames: usize,
    /// Non-zero entries sampled per value for the activation grid search (zeros are
    /// exact on every candidate grid, so they cannot change the choice).
    pub grid_samples: usize,
    /// Quantize the network input with one scale per decorated feature (see
    /// `QuantModel::input_scales`) instead of one for all.
    pub input_per_feature: bool,
    /// LiDAR-PTQ components 2 and 3.
    pub recon: ReconOptions,
    pub seed: u64,
}

impl CalibOptions {
    /// Defaults of a method: W8A8, asymmetric activations, every layer quantized, and
    /// for LiDAR-PTQ every component on.
    pub fn new(method: Method) -> Self {
        Self {
            method,
            weight_bits: 8,
            activation_bits: 8,
            flavour: Flavour::Asymmetric,
            keep_float: Vec::new(),
            grid_search: Some(GridSearch::default()),
            grid_weights: true,
            grid_activations: true,
            grid_input_aware: true,
            grid_frames: 16,
            grid_samples: 1 << 16,
            input_per_feature: true,
            recon: ReconOptions::default(),
            seed: 0,
        }
    }

    fn validate(&self) -> Result<(), CalibError> {
        let bad = |m: String| Err(CalibError::Options(m));
        if !matches!(self.weight_bits, 4 | 8) {
            return bad(format!("weight bits {} (4 or 8)", self.weight_bits));
        }
        if !matches!(self.activation_bits, 4 | 8) {
            return bad(format!("activation bits {} (4 or 8)", self.activation_bits));
        }
        if self.grid_search.is_some() && (self.grid_frames == 0 || self.grid_samples == 0) {
            return bad("grid search needs grid_frames > 0 and grid_samples > 0".into());
        }
        self.recon.validate().map_err(CalibError::Options)
    }

    /// Whether the reconstruction phase runs.
    pub fn reconstructs(&self) -> bool {
        self.method == Method::LidarPtq && (self.recon.tgpl || self.recon.adaround)
    }

    /// Method parameters as text, for the provenance.
    pub fn params(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            m.insert(k.to_string(), v);
        };
        put("flavour", format!("{:?}", self.flavour).to_lowercase());
        put("keep_float", self.keep_float.join(","));
        put("input_per_feature", self.input_per_feature.to_string());
        match self.method {
            Method::Percentile {
                percentile,
                occupied_only,
            } => {
                put("percentile", percentile.to_string());
                put("occupied_only", occupied_only.to_string());
            }
            Method::Entropy { occupied_only } => put("occupied_only", occupied_only.to_string()),
            Method::MinMax => {}
            Method::LidarPtq => {
                match &self.grid_search {
                    Some(g) => {
                        put("grid_search", "on".into());
                        put("grid_candidates", g.candidates.to_string());
                        put("grid_step", g.step.to_string());
                        put("grid_p", g.p.to_string());
                        put("grid_frames", self.grid_frames.to_string());
                        put("grid_samples", self.grid_samples.to_string());
                        put("grid_weights", self.grid_weights.to_string());
                        put("grid_activations", self.grid_activations.to_string());
                        put("grid_input_aware", self.grid_input_aware.to_string());
                    }
                    None => put("grid_search", "off".into()),
                }
                for (k, v) in self.recon.params() {
                    m.insert(k, v);
                }
            }
        }
        m
    }
}

/// One frame's network input, owned.
#[derive(Debug, Clone)]
pub struct FrameInput {
    pub decorated: Vec<f32>,
    pub max_points: usize,
    pub width: usize,
    pub counts: Vec<u32>,
    pub coords: Vec<[u32; 3]>,
}

impl FrameInput {
    /// Voxelises a scan with the model's encoder (deployment caps; pillars are also
    /// decorated) and keeps the network input.
    pub fn prepare(scan: &mut ScanInput, points: &Points) -> Result<Self, CalibError> {
        scan.prepare(points).map_err(|source| CalibError::Op {
            node: "voxelize".into(),
            source,
        })?;
        let i = scan.input();
        Ok(Self {
            decorated: i.decorated.to_vec(),
            max_points: i.max_points,
            width: i.width,
            counts: i.counts.to_vec(),
            coords: i.coords.to_vec(),
        })
    }

    pub fn net_input(&self) -> NetInput<'_> {
        NetInput {
            decorated: &self.decorated,
            max_points: self.max_points,
            width: self.width,
            counts: &self.counts,
            coords: &self.coords,
        }
    }
}

/// SHA-256 over the frames' points (count, then x, y, z, intensity little-endian).
pub fn frames_digest(frames: &[Points]) -> String {
    let mut h = Sha256::new();
    h.update((frames.len() as u64).to_le_bytes());
    for p in frames {
        h.update((p.len() as u64).to_le_bytes());
        for i in 0..p.len() {
            for v in [p.x[i], p.y[i], p.z[i], p.intensity[i]] {
                h.update(v.to_le_bytes());
            }
        }
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Group of every value: values tied by pillar max, scatter, height compression and concat
/// (inputs and output), and the two inputs of an add, share one parameter set. The group
/// id is the smallest value id of the group.
pub fn value_groups(graph: &Graph) -> Vec<usize> {
    let n = graph.nodes.len() + 1;
    let mut parent: Vec<usize> = (0..n).collect();
    fn find(p: &mut [usize], mut v: usize) -> usize {
        while p[v] != v {
            p[v] = p[p[v]];
            v = p[v];
        }
        v
    }
    let union = |p: &mut Vec<usize>, a: usize, b: usize| {
        let (ra, rb) = (find(p, a), find(p, b));
        let (lo, hi) = (ra.min(rb), ra.max(rb));
        p[hi] = lo;
    };
    for (i, node) in graph.nodes.iter().enumerate() {
        match node.op {
            Op::Layer(_) => {}
            // An add's inputs share parameters; its output is requantized.
            Op::Add { .. } => {
                for &v in &node.inputs[1..] {
                    union(&mut parent, node.inputs[0], v);
                }
            }
            _ => {
                for &v in &node.inputs {
                    union(&mut parent, v, i + 1);
                }
            }
        }
    }
    (0..n).map(|v| find(&mut parent, v)).collect()
}

/// Which layers run in integer and which group each integer layer's input belongs to.
#[derive(Debug, Clone)]
pub struct QuantPlan {
    /// Per node: whether it is an integer layer.
    pub int_layer: Vec<bool>,
    /// Group of each value.
    pub group: Vec<usize>,
    /// Per group id: the first integer layer reading a value of the group (its owner in
    /// the reconstruction), `None` when no integer layer reads it (the group stays float).
    pub owner: Vec<Option<usize>>,
}

impl QuantPlan {
    pub fn new(graph: &Graph, keep_float: &[String]) -> Result<Self, CalibError> {
        for name in keep_float {
            let ok = graph
                .nodes
                .iter()
                .any(|n| &n.name == name && matches!(n.op, Op::Layer(_)));
            if !ok {
                return Err(CalibError::Options(format!(
                    "keep-float layer `{name}` is not a layer of the model"
                )));
            }
        }
        let int_layer: Vec<bool> = graph
            .nodes
            .iter()
            .map(|n| matches!(n.op, Op::Layer(_)) && !keep_float.contains(&n.name))
            .collect();
        let group = value_groups(graph);
        let mut owner = vec![None; graph.nodes.len() + 1];
        for (i, n) in graph.nodes.iter().enumerate() {
            if int_layer[i] {
                let g = group[n.inputs[0]];
                owner[g].get_or_insert(i);
            }
        }
        Ok(Self {
            int_layer,
            group,
            owner,
        })
    }

    /// Whether value `v` gets activation parameters.
    pub fn quantized(&self, v: usize) -> bool {
        self.owner[self.group[v]].is_some()
    }

    /// Values of group `g`.
    pub fn members(&self, g: usize) -> impl Iterator<Item = usize> + '_ {
        self.group
            .iter()
            .enumerate()
            .filter(move |(_, x)| **x == g)
            .map(|(v, _)| v)
    }
}

/// Per-channel symmetric weight codes from per-channel parameters.
pub fn layer_weights(
    folded: &FoldedLayer,
    out_axis: usize,
    qs: &[QParams],
    bits: u32,
) -> LayerWeights {
    let shape = folded.weight.shape.clone();
    let inner: usize = shape[out_axis + 1..].iter().product();
    let cout = shape[out_axis];
    let codes = folded
        .weight
        .data
        .iter()
        .enumerate()
        .map(|(i, &w)| qs[(i / inner) % cout].quantize(w) as i8)
        .collect();
    LayerWeights {
        bits,
        codes,
        shape,
        scales: qs.iter().map(|q| q.scale).collect(),
        bias: folded.bias.clone(),
    }
}

/// Calibrates without progress output.
pub fn calibrate(
    cfg: &ModelConfig,
    weights: &Weights,
    frames: &[Points],
    opts: &CalibOptions,
) -> Result<QuantModel, CalibError> {
    calibrate_with_progress(
        cfg,
        weights,
        frames,
        opts,
        &indicatif::ProgressBar::hidden(),
    )
}

/// What the FP pass keeps of one frame: the range of every observed value, the observed
/// values themselves when a histogram or the grid search needs them, and the input and
/// positives of a reconstruction frame.
struct FrameObservation {
    ranges: Vec<(usize, f32, f32)>,
    /// Per-feature range of the network input (when input features get their own scales).
    input_ranges: Vec<(f32, f32)>,
    data: Vec<(usize, Tensor)>,
    recon: Option<(FrameInput, Positives)>,
}

/// Runs the FP network on one frame and collects its observations.
#[allow(clippy::too_many_arguments)]
fn fp_frame(
    cfg: &ModelConfig,
    graph: &Graph,
    fp: &QuantNet,
    last_use: &[usize],
    observed: &[bool],
    points: &Points,
    keep_data: bool,
    per_feature: bool,
    recon: Option<&TgplOptions>,
) -> Result<FrameObservation, CalibError> {
    let n = graph.nodes.len();
    let mut scan = ScanInput::new(cfg, Mode::Test).map_err(|source| CalibError::Op {
        node: "voxelize".into(),
        source,
    })?;
    let frame = FrameInput::prepare(&mut scan, points)?;
    let input = frame.net_input();
    let sites = fp.frame_sites(&input)?;
    let mut obs = FrameObservation {
        ranges: Vec::new(),
        input_ranges: Vec::new(),
        data: Vec::new(),
        recon: None,
    };
    let mut observe = |v: usize, x: &QValue| -> Result<(), CalibError> {
        if per_feature && v == 0 {
            obs.input_ranges = feature_ranges(input_tensor(x), input.width);
            if keep_data {
                obs.data.push((0, input_tensor(x).clone()));
            }
            return Ok(());
        }
        if !observed[v] {
            return Ok(());
        }
        let QValue::Float(t) = x else {
            return Err(CalibError::Model(
                "FP pass produced a quantized value".into(),
            ));
        };
        super::error::check_finite("activation statistics", &t.data)?;
        if !t.data.is_empty() {
            let (lo, hi) = t
                .data
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| {
                    (a.min(x), b.max(x))
                });
            obs.ranges.push((v, lo, hi));
        }
        if keep_data {
            obs.data.push((v, t.clone()));
        }
        Ok(())
    };
    let mut values: Vec<Option<QValue>> = vec![None; n + 1];
    let x0 = fp.input_value(&input)?;
    observe(0, &x0)?;
    values[0] = Some(x0);
    for i in 0..n {
        let y = fp.run_node(i, &values, &input, sites.as_ref())?;
        observe(i + 1, &y)?;
        values[i + 1] = Some(y);
        for &v in &graph.nodes[i].inputs {
            if last_use[v] == i {
                values[v] = None;
            }
        }
    }
    if let Some(tgpl) = recon {
        let mut floats: Vec<Option<Tensor>> = values
            .into_iter()
            .map(|v| v.map(QValue::into_float))
            .collect();
        let heads = collect_heads(graph, &mut floats)?;
        let pos = positives(cfg, &heads, tgpl);
        obs.recon = Some((frame, pos));
    }
    Ok(obs)
}

fn input_tensor(x: &QValue) -> &Tensor {
    match x {
        QValue::Float(t) | QValue::Quant { centered: t, .. } => t,
    }
}

/// Min and max of every feature (last axis of width `f`).
fn feature_ranges(t: &Tensor, f: usize) -> Vec<(f32, f32)> {
    let mut r = vec![(f32::INFINITY, f32::NEG_INFINITY); f];
    for row in t.data.chunks_exact(f.max(1)) {
        for (x, &v) in r.iter_mut().zip(row) {
            *x = (x.0.min(v), x.1.max(v));
        }
    }
    r
}

/// Adds `sum |x|^p` per channel (axis 1 of a `[1, C, H, W]` map, the last axis
/// otherwise) and the number of positions of `t` to `acc`. Zeros add nothing (skipped:
/// BEV maps are mostly empty).
fn add_moments(acc: &mut (Vec<f64>, u64), t: &Tensor, p: f64) {
    let (channels, inner) = match t.shape.as_slice() {
        [_, c, h, w] => (*c, h * w),
        s => (s.last().copied().unwrap_or(0), 1),
    };
    if channels == 0 || t.data.is_empty() {
        return;
    }
    if acc.0.len() != channels {
        *acc = (vec![0.0; channels], 0);
    }
    for (i, &x) in t.data.iter().enumerate() {
        if x != 0.0 {
            acc.0[(i / inner) % channels] += (x.abs() as f64).powf(p);
        }
    }
    acc.1 += (t.data.len() / channels) as u64;
}

/// Input-channel importance `E|x_j|^p` for the weight search, from [`add_moments`]'s
/// sums. With per-feature input scales folded into the layer, the integer layer's inputs
/// are `x_j / s_j`. A floor of 1e-3 of the mean keeps channels unseen in calibration
/// from being clipped without limit.
fn input_importance(sums: &[f64], n: u64, folded_scales: Option<&[f32]>, p: f64) -> Vec<f64> {
    let mut m: Vec<f64> = sums
        .iter()
        .enumerate()
        .map(|(j, &s)| {
            let e = s / n.max(1) as f64;
            match folded_scales {
                Some(sc) => e / (sc[j % sc.len()] as f64).powf(p),
                None => e,
            }
        })
        .collect();
    let floor = 1e-3 * m.iter().sum::<f64>() / m.len().max(1) as f64;
    m.iter_mut().for_each(|x| *x = x.max(floor));
    m
}

/// Per group statistics of the FP pass.
struct GroupStats {
    minmax: MinMax,
    observer: Option<Box<dyn Observer + Send>>,
    samples: Vec<f32>,
}

/// Calibrates `weights` (of the model `cfg`) on `frames`; `progress` shows the FP pass
/// and the reconstruction.
pub fn calibrate_with_progress(
    cfg: &ModelConfig,
    weights: &Weights,
    frames: &[Points],
    opts: &CalibOptions,
    progress: &indicatif::ProgressBar,
) -> Result<QuantModel, CalibError> {
    Ok(calibrate_detailed(cfg, weights, frames, opts, progress)?.model)
}

/// A calibrated model and, for LiDAR-PTQ's reconstruction, the objective of every unit
/// before and after its optimisation.
#[derive(Debug, Clone)]
pub struct Calibration {
    pub model: QuantModel,
    pub units: Vec<UnitReport>,
}

/// [`calibrate_with_progress`] with the per-unit reports.
pub fn calibrate_detailed(
    cfg: &ModelConfig,
    weights: &Weights,
    frames: &[Points],
    opts: &CalibOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Calibration, CalibError> {
    opts.validate()?;
    if frames.is_empty() {
        return Err(CalibError::NoFrames);
    }
    let graph = Graph::build(cfg).map_err(CalibError::Model)?;
    let folded = fold_layers(&graph, weights)?;
    let plan = QuantPlan::new(&graph, &opts.keep_float)?;
    let provenance = Provenance {
        fp32_digest: weights.digest(),
        config_yaml: cfg.to_yaml(),
        method: opts.method.name().to_string(),
        params: opts.params(),
        weight_bits: opts.weight_bits,
        activation_bits: opts.activation_bits,
        frames: frames.len(),
        frames_digest: frames_digest(frames),
        seed: opts.seed,
    };
    let act_grid = Grid::activation(opts.activation_bits, opts.flavour);
    let n = graph.nodes.len();

    // Per-feature input scales apply when the input's group is the input alone, read by
    // integer layers only.
    let per_feature = opts.input_per_feature
        && plan.quantized(0)
        && plan.members(plan.group[0]).count() == 1
        && graph.nodes.iter().enumerate().all(|(i, nd)| {
            !nd.inputs.contains(&0)
                || (plan.int_layer[i]
                    && matches!(&nd.op, Op::Layer(l) if matches!(
                        l.kind,
                        LayerKind::Linear | LayerKind::SparseConv3d { .. }
                    )))
        });
    // Values observed: those read by a layer, in a group that gets parameters, and the
    // inputs of a residual add (its output does not contain their ranges, unlike the
    // other glue ops': the residual branch is signed where the block input is not).
    let mut observed = vec![false; n + 1];
    for node in &graph.nodes {
        let read: &[usize] = match node.op {
            Op::Layer(_) => &node.inputs[..1],
            Op::Add { .. } => &node.inputs,
            _ => &[],
        };
        for &v in read {
            if plan.quantized(v) {
                observed[v] = true;
            }
        }
    }
    // A per-feature input has its own statistics.
    if per_feature {
        observed[0] = false;
    }
    let observer_kind = opts.method.observer();
    let (grid_search, weight_grid_search) = match opts.method {
        Method::LidarPtq => (
            opts.grid_search.filter(|_| opts.grid_activations),
            opts.grid_search.filter(|_| opts.grid_weights),
        ),
        _ => (None, None),
    };
    // Input-aware weight search: per layer input value, per channel `sum |x|^p` and the
    // number of positions, on the grid frames.
    let input_aware = opts.grid_input_aware && weight_grid_search.is_some();
    let mut moments: BTreeMap<usize, (Vec<f64>, u64)> = BTreeMap::new();
    let moment_p = weight_grid_search.map_or(2.0, |g| g.p);
    let mut stats: BTreeMap<usize, GroupStats> = BTreeMap::new();
    for (v, _) in observed.iter().enumerate().filter(|(_, o)| **o) {
        if let std::collections::btree_map::Entry::Vacant(e) = stats.entry(plan.group[v]) {
            e.insert(GroupStats {
                minmax: MinMax::new(),
                observer: observer_kind.map(|k| k.build()).transpose()?,
                samples: Vec::new(),
            });
        }
    }

    // Frames used by the reconstruction: spread evenly over the calibration set.
    let recon_idx: Vec<usize> = if opts.reconstructs() {
        let r = opts.recon.frames.min(frames.len());
        (0..r).map(|k| k * frames.len() / r).collect()
    } else {
        Vec::new()
    };
    let mut recon_frames: Vec<(FrameInput, Positives)> = Vec::new();
    let width = cfg
        .pillar_input_width()
        .unwrap_or(cfg.input.point_features.len());
    let mut input_ranges = vec![(f32::INFINITY, f32::NEG_INFINITY); width];
    let mut input_samples: Vec<Vec<f32>> = vec![Vec::new(); width];
    // A baseline's statistic decides the per-feature input scales too (each feature over
    // all its entries, padding slots included, or over its non-zero entries).
    let mut input_observers: Vec<Box<dyn Observer + Send>> = match observer_kind {
        Some(k) if per_feature => (0..width).map(|_| k.build()).collect::<Result<_, _>>()?,
        _ => Vec::new(),
    };

    // The FP pass.
    let fp = QuantNet::from_folded(&graph, &folded, &float_model(&graph, provenance.clone()))?;
    let mut last_use = vec![0usize; n + 1];
    for (i, node) in graph.nodes.iter().enumerate() {
        for &v in &node.inputs {
            last_use[v] = i;
        }
    }
    for t in &graph.tasks {
        for &v in std::iter::once(&t.heatmap).chain(&t.regression) {
            last_use[v] = usize::MAX;
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let per_frame_samples = opts.grid_samples.div_ceil(opts.grid_frames.max(1));
    progress.set_length(frames.len() as u64);
    progress.set_position(0);
    progress.set_message("FP statistics");
    // Frames run in parallel chunks; their observations are merged in frame order, so the
    // result does not depend on the number of threads.
    let chunk = rayon::current_num_threads().max(1);
    for (c, chunk_frames) in frames.chunks(chunk).enumerate() {
        let outs: Vec<Result<FrameObservation, CalibError>> = chunk_frames
            .par_iter()
            .enumerate()
            .map(|(j, points)| {
                let k = c * chunk + j;
                let keep_data = observer_kind.is_some()
                    || ((grid_search.is_some() || input_aware) && k < opts.grid_frames);
                let out = fp_frame(
                    cfg,
                    &graph,
                    &fp,
                    &last_use,
                    &observed,
                    points,
                    keep_data,
                    per_feature,
                    recon_idx.contains(&k).then_some(&opts.recon.tgpl_options),
                )?;
                progress.inc(1);
                Ok(out)
            })
            .collect();
        for (j, out) in outs.into_iter().enumerate() {
            let k = c * chunk + j;
            let out = out?;
            for (v, lo, hi) in out.ranges {
                let st = stats
                    .get_mut(&plan.group[v])
                    .expect("observed value has stats");
                st.minmax.observe(&[lo, hi])?;
            }
            for (r, x) in input_ranges.iter_mut().zip(&out.input_ranges) {
                *r = (r.0.min(x.0), r.1.max(x.1));
            }
            for (v, t) in out.data {
                if input_aware && k < opts.grid_frames {
                    add_moments(moments.entry(v).or_default(), &t, moment_p);
                }
                if per_feature && v == 0 {
                    for (j, o) in input_observers.iter_mut().enumerate() {
                        let xs: Vec<f32> = t.data.iter().skip(j).step_by(width).copied().collect();
                        o.observe(&xs)?;
                    }
                    if grid_search.is_some() && k < opts.grid_frames {
                        for (j, samples) in input_samples.iter_mut().enumerate() {
                            let nonzero: Vec<f32> = t
                                .data
                                .iter()
                                .skip(j)
                                .step_by(width)
                                .copied()
                                .filter(|&x| x != 0.0)
                                .collect();
                            if !nonzero.is_empty() {
                                for _ in 0..per_frame_samples / width.max(1) + 1 {
                                    samples.push(nonzero[rng.random_range(0..nonzero.len())]);
                                }
                            }
                        }
                    }
                    continue;
                }
                let st = stats
                    .get_mut(&plan.group[v])
                    .expect("observed value has stats");
                if let Some(o) = st.observer.as_mut() {
                    o.observe(&t.data)?;
                }
                if grid_search.is_some() && k < opts.grid_frames {
                    let nonzero: Vec<f32> = t.data.iter().copied().filter(|&x| x != 0.0).collect();
                    if !nonzero.is_empty() {
                        for _ in 0..per_frame_samples {
                            st.samples.push(nonzero[rng.random_range(0..nonzero.len())]);
                        }
                    }
                }
            }
            if let Some(r) = out.recon {
                recon_frames.push(r);
            }
        }
    }

    // Activation parameters per group.
    let mut group_params: BTreeMap<usize, QParams> = BTreeMap::new();
    for (&g, s) in &stats {
        let q = match (&s.observer, &grid_search) {
            (Some(o), _) => o.finish(act_grid, opts.flavour)?,
            (None, Some(gs)) => {
                let (lo, hi) = s.minmax.range().ok_or(QuantError::Empty {
                    what: "activation statistics",
                })?;
                if s.samples.is_empty() {
                    QParams::for_range(lo, hi, act_grid, opts.flavour)
                } else {
                    gs.search(&s.samples, lo, hi, act_grid, opts.flavour)?
                        .qparams
                }
            }
            (None, None) => s.minmax.finish(act_grid, opts.flavour)?,
        };
        group_params.insert(g, q);
    }
    let mut activations: Vec<Option<QParams>> = (0..=n)
        .map(|v| {
            group_params
                .get(&plan.group[v])
                .copied()
                .filter(|_| plan.quantized(v))
        })
        .collect();

    // Per-feature input scales, folded into the weight columns of the input's readers.
    let mut folded_q = folded.clone();
    let input_scales = if per_feature {
        let sym = Grid::activation(opts.activation_bits, Flavour::Symmetric);
        let mut scales = Vec::with_capacity(width);
        for (j, &(lo, hi)) in input_ranges.iter().enumerate() {
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 0.0) };
            let q = match &grid_search {
                _ if !input_observers.is_empty() && (lo, hi) != (0.0, 0.0) => {
                    input_observers[j].finish(sym, Flavour::Symmetric)?
                }
                Some(gs) if !input_samples[j].is_empty() => {
                    gs.search(&input_samples[j], lo, hi, sym, Flavour::Symmetric)?
                        .qparams
                }
                _ => QParams::for_range(lo, hi, sym, Flavour::Symmetric),
            };
            scales.push(q.scale);
        }
        activations[0] = Some(QParams {
            scale: 1.0,
            zero_point: sym.symmetric_zero_point(),
            grid: sym,
        });
        for (i, nd) in graph.nodes.iter().enumerate() {
            if nd.inputs.contains(&0)
                && let Some(f) = folded_q[i].as_mut()
            {
                // The input channel is the last weight axis of a linear and a sparse conv.
                let cin = *f.weight.shape.last().expect("weight rank >= 2");
                for (k, w) in f.weight.data.iter_mut().enumerate() {
                    *w *= scales[k % cin];
                }
            }
        }
        Some(scales)
    } else {
        None
    };

    // Weights.
    let mut layers = Vec::with_capacity(n);
    for (i, node) in graph.nodes.iter().enumerate() {
        let Op::Layer(l) = &node.op else {
            layers.push(None);
            continue;
        };
        if !plan.int_layer[i] {
            layers.push(Some(LayerPlan::Float));
            continue;
        }
        let f = folded_q[i].as_ref().expect("layer folded");
        let axis = weight_out_axis(l.kind);
        let w = match &weight_grid_search {
            Some(gs) => {
                let wgrid = Grid::weight(opts.weight_bits);
                let importance = moments.get(&node.inputs[0]).map(|(sums, n)| {
                    let folded_scales = input_scales.as_deref().filter(|_| node.inputs[0] == 0);
                    input_importance(sums, *n, folded_scales, gs.p)
                });
                let results = match importance {
                    Some(m) if input_aware => gs.search_per_channel_weighted(
                        &f.weight,
                        axis,
                        weight_in_axis(l.kind),
                        &m,
                        wgrid,
                        Flavour::Symmetric,
                    )?,
                    _ => gs.search_per_channel(&f.weight, axis, wgrid, Flavour::Symmetric)?,
                };
                let qs: Vec<QParams> = results.into_iter().map(|r| r.qparams).collect();
                layer_weights(f, axis, &qs, opts.weight_bits)
            }
            None => quantize_weights_minmax(f, axis, opts.weight_bits),
        };
        layers.push(Some(LayerPlan::Int(w)));
    }
    let init = QuantModel {
        provenance,
        activations,
        layers,
        input_scales,
    };
    init.validate(&graph).map_err(CalibError::Model)?;
    if !opts.reconstructs() {
        return Ok(Calibration {
            model: init,
            units: Vec::new(),
        });
    }
    let ctx = reconstruct::Context {
        cfg,
        graph: &graph,
        folded: &folded,
        folded_q: &folded_q,
        plan: &plan,
        opts: &opts.recon,
        seed: opts.seed,
    };
    let (model, units) = reconstruct::reconstruct_with_report(&ctx, init, recon_frames, progress)?;
    model.validate(&graph).map_err(CalibError::Model)?;
    Ok(Calibration { model, units })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_moments_per_channel_against_naive_sums() {
        let p = 2.4;
        // [1, C, H, W]: channel axis 1; [P, N, C]: the last axis.
        let map = Tensor::from_fn(
            &[1, 3, 2, 2],
            |i| if i % 5 == 0 { 0.0 } else { i as f32 - 6.0 },
        );
        let rows = Tensor::from_fn(&[2, 2, 3], |i| (i as f32 * 0.7).sin());
        for (t, channel) in [
            (
                &map,
                Box::new(|i: usize| i / 4) as Box<dyn Fn(usize) -> usize>,
            ),
            (&rows, Box::new(|i: usize| i % 3)),
        ] {
            let mut acc = (Vec::new(), 0u64);
            add_moments(&mut acc, t, p);
            add_moments(&mut acc, t, p);
            let mut want = [0.0f64; 3];
            for (i, &x) in t.data.iter().enumerate() {
                want[channel(i)] += 2.0 * (x.abs() as f64).powf(p);
            }
            assert_eq!(acc.1, 2 * (t.data.len() / 3) as u64);
            for (g, w) in acc.0.iter().zip(want) {
                assert!((g - w).abs() <= 1e-12 * w.max(1.0), "{g} vs {w}");
            }
        }
    }

    #[test]
    fn input_importance_divides_by_folded_scales_and_floors() {
        let sums = [8.0, 0.0, 2.0];
        let m = input_importance(&sums, 2, None, 2.0);
        assert_eq!(m[0], 4.0);
        assert_eq!(m[2], 1.0);
        // The unseen channel gets 1e-3 of the mean.
        assert!((m[1] - 1e-3 * 5.0 / 3.0).abs() < 1e-15);
        // Folded per-feature scales: the layer sees x / s.
        let m = input_importance(&sums, 2, Some(&[2.0, 1.0, 0.5]), 2.0);
        assert_eq!(m[0], 1.0);
        assert_eq!(m[2], 4.0);
    }
}
