//! LiDAR-PTQ's unit-by-unit reconstruction: TGPL (component 2) and adaptive rounding
//! (component 3).
//!
//! Units are the integer layers, in topological order, except that a residual block
//! (conv - conv - add, the voxel model's sparse blocks) is one unit reconstructed at its
//! output (`optimise_block`; `ReconOptions::blocks`). Each sees, on a subset of the
//! calibration frames, the input produced by the already-quantized prefix (cached as a
//! frontier of live values, advanced one node at a time) and the FP model's output of the
//! same layer. Per unit it optimises, with Adam:
//! - the rounding variables `V` of its weights (AdaRound form, regulariser annealed), when
//!   adaptive rounding is on; otherwise the weights stay at round-to-nearest;
//! - the step size of its input's activation quantizer (LSQ gradient, cosine-decayed
//!   learning rate), when this unit is the first integer reader of that value's group
//!   (a group's parameters are learnt once, by its first reader, then frozen);
//!
//! on `L = L_rec + lambda * L_TGPL (+ rounding regulariser)` with
//! `L_rec` = squared L2 error of the unit's output per output position (summed over
//! channels), averaged over positions (BRECQ's normalisation, which the regulariser
//! weight 0.01 presumes); `lambda` balances both terms at iteration 0 unless given.
//!
//! Affordability (every choice a parameter; the defaults fit a 256-frame calibration of
//! the default model into minutes on two cores):
//! - iterations run on a random crop of the output (a window of the map for
//!   convolutions, a subset of pillars for the pillar net); the full-map objective is
//!   estimated by scaling the crop's terms;
//! - TGPL needs the rest of the network run in FP from the unit to the heads and back,
//!   which costs about a network pass. Its gradient w.r.t. the unit's output, `g`, is
//!   refreshed on the full map every `tgpl_every` iterations (each refresh on the next
//!   frame) and used in between as the linearisation `L_TGPL(y) ~ L_TGPL(y0) + <g, y - y0>`
//!   (`tgpl_every = 1` is the exact gradient). Only heads reachable from the unit count
//!   (the others are constant in its parameters).
//!
//! The cached prefix is simulated with fake quantization of the frontier values once
//! their group's parameters are set; this can differ from the engine's requantization by
//! one code at rare rounding ties, which only affects the reconstruction's inputs, not
//! the exported model's semantics.

use super::adam::{Adam, cosine_lr};
use super::adaround::{AdaRound, BetaSchedule, DEFAULT_REG_WEIGHT};
use super::calibrate::{CalibError, FrameInput, QuantPlan};
use super::fake_quant::{GradScale, fake_quant, fake_quant_backward};
use super::model::{LayerPlan, LayerWeights, QuantModel};
use super::qnet::{QValue, QuantNet, float_model, quantize_input, weight_out_axis};
use super::scheme::{Grid, MIN_SCALE, QParams};
use super::tgpl::{Positives, TgplOptions, heatmap_loss, regression_loss};
use crate::engine::fp32::{FoldedLayer, cells, concat_pillar_max, run_layer, run_sparse_layer};
use crate::engine::sparse::{self, FrameSites};
use crate::model::ModelConfig;
use crate::model::graph::{Graph, LayerKind, Op};
use crate::ops::conv_transpose2d::ConvTranspose2dParams;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::pillar_max::ArgMax;
use crate::ops::{self, OpsError, Tensor};
use crate::sparse::Rulebook;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Options of the reconstruction (LiDAR-PTQ components 2 and 3).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconOptions {
    /// Component 2: the TGPL term.
    pub tgpl: bool,
    /// Component 3: learned rounding (off: round-to-nearest, only step sizes learn).
    pub adaround: bool,
    /// Iterations per unit.
    pub iters: usize,
    /// Calibration frames used by the reconstruction (spread over the set).
    pub frames: usize,
    /// Side of the output window of a convolution unit per iteration (0: full map).
    pub crop: usize,
    /// Pillars per iteration of a pillar-net unit (0: all).
    pub crop_pillars: usize,
    /// Iterations between two full-map TGPL gradients.
    pub tgpl_every: usize,
    /// TGPL weight; `None` balances `L_rec` and `L_TGPL` at iteration 0.
    pub lambda: Option<f32>,
    /// Rounding regulariser weight `w_r`.
    pub reg_weight: f32,
    /// Regulariser warm-up fraction and `beta` annealing.
    pub warmup: f32,
    pub beta_start: f32,
    pub beta_end: f32,
    /// Adam learning rates: rounding variables, activation step sizes relative to their
    /// initial value (cosine decay).
    pub lr_v: f32,
    pub lr_act: f32,
    pub tgpl_options: TgplOptions,
    /// Measure every unit's full-map objective before (round-to-nearest, initial step)
    /// and after its optimisation on the first frame (costs two extra TGPL passes).
    pub report: bool,
    /// Residual blocks (conv - conv - add) are one unit, reconstructed at the block's
    /// output; off: every layer is its own unit.
    pub blocks: bool,
}

impl Default for ReconOptions {
    fn default() -> Self {
        Self {
            tgpl: true,
            adaround: true,
            iters: 100,
            frames: 16,
            crop: 16,
            crop_pillars: 1024,
            tgpl_every: 25,
            lambda: None,
            reg_weight: DEFAULT_REG_WEIGHT,
            warmup: 0.2,
            beta_start: 20.0,
            beta_end: 2.0,
            lr_v: 1e-2,
            lr_act: 3e-3,
            tgpl_options: TgplOptions::default(),
            report: false,
            blocks: true,
        }
    }
}

impl ReconOptions {
    pub(crate) fn validate(&self) -> Result<(), String> {
        if self.iters == 0 || self.frames == 0 || self.tgpl_every == 0 {
            return Err("reconstruction iters, frames and tgpl_every must be > 0".into());
        }
        if !(0.0..1.0).contains(&self.warmup) {
            return Err(format!(
                "warm-up fraction {} must be in [0, 1)",
                self.warmup
            ));
        }
        let finite = [
            self.reg_weight,
            self.beta_start,
            self.beta_end,
            self.lr_v,
            self.lr_act,
        ];
        if finite.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(
                "regulariser weight, beta and learning rates must be finite and >= 0".into(),
            );
        }
        if self.lambda.is_some_and(|l| !l.is_finite() || l < 0.0) {
            return Err("lambda must be finite and >= 0".into());
        }
        Ok(())
    }

    /// The options as text (provenance).
    pub fn params(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        let on = |b: bool| if b { "on" } else { "off" }.to_string();
        m.insert("tgpl".into(), on(self.tgpl));
        m.insert("adaround".into(), on(self.adaround));
        if self.tgpl || self.adaround {
            for (k, v) in [
                ("recon_iters", self.iters.to_string()),
                ("recon_frames", self.frames.to_string()),
                ("recon_crop", self.crop.to_string()),
                ("recon_crop_pillars", self.crop_pillars.to_string()),
                ("lr_act", self.lr_act.to_string()),
                (
                    "recon_units",
                    if self.blocks { "blocks" } else { "layers" }.to_string(),
                ),
            ] {
                m.insert(k.into(), v);
            }
        }
        if self.tgpl {
            m.insert("tgpl_every".into(), self.tgpl_every.to_string());
            m.insert(
                "tgpl_lambda".into(),
                self.lambda.map_or("balanced".into(), |l| l.to_string()),
            );
            m.insert("tgpl_top_k".into(), self.tgpl_options.top_k.to_string());
            m.insert(
                "tgpl_tau".into(),
                self.tgpl_options.score_threshold.to_string(),
            );
        }
        if self.adaround {
            for (k, v) in [
                ("adaround_reg_weight", self.reg_weight.to_string()),
                ("adaround_warmup", self.warmup.to_string()),
                (
                    "adaround_beta",
                    format!("{}..{}", self.beta_start, self.beta_end),
                ),
                ("lr_v", self.lr_v.to_string()),
            ] {
                m.insert(k.into(), v);
            }
        }
        m
    }
}

/// What the reconstruction works on.
pub struct Context<'a> {
    pub cfg: &'a ModelConfig,
    pub graph: &'a Graph,
    /// FP32 folded layers (the FP model and the FP rest of the network).
    pub folded: &'a [Option<FoldedLayer>],
    /// The layers the quantized network runs: `folded`, with per-feature input scales
    /// folded into the input's readers.
    pub folded_q: &'a [Option<FoldedLayer>],
    pub plan: &'a QuantPlan,
    pub opts: &'a ReconOptions,
    pub seed: u64,
}

/// What the optimisation of one unit did. The objective on the first reconstruction frame
/// (full map), at round-to-nearest with the initial step size and after the optimisation
/// (hardened), is measured with `ReconOptions::report` (NaN otherwise).
#[derive(Debug, Clone, PartialEq)]
pub struct UnitReport {
    pub node: String,
    pub rec_before: f64,
    pub rec_after: f64,
    /// TGPL terms (0 when TGPL is off).
    pub tgpl_before: f64,
    pub tgpl_after: f64,
    pub lambda: f64,
    /// Input step size before and after (equal when the unit does not own it).
    pub scale_before: f32,
    pub scale_after: f32,
    /// Weights whose rounding differs from round-to-nearest.
    pub flipped: usize,
}

impl UnitReport {
    pub fn objective_before(&self) -> f64 {
        self.rec_before + self.lambda * self.tgpl_before
    }

    pub fn objective_after(&self) -> f64 {
        self.rec_after + self.lambda * self.tgpl_after
    }
}

/// One reconstruction frame: its input, positives and the two frontiers.
struct FrameState {
    input: FrameInput,
    /// The frame's rulebooks (voxel models).
    sites: Option<FrameSites>,
    pos: Positives,
    /// Values of the partially quantized network that later nodes still read.
    q: Vec<Option<QValue>>,
    /// Values of the FP network.
    fp: Vec<Option<QValue>>,
}

/// Which part of a unit's output an iteration looks at.
#[derive(Debug, Clone, PartialEq)]
enum Crop {
    Full,
    /// Conv2d: output window; transposed conv (kernel == stride): input window.
    Window {
        y0: usize,
        x0: usize,
        h: usize,
        w: usize,
    },
    /// Linear over `[P, N, C]`: these pillars.
    Rows(Vec<usize>),
}

/// `t[.., y0 - pad.., x0 - pad..]` window of an NCHW image `[1, C, H, W]`, zero outside.
fn window(t: &Tensor, y0: isize, x0: isize, h: usize, w: usize) -> Tensor {
    let (c, ih, iw) = (t.shape[1], t.shape[2] as isize, t.shape[3] as isize);
    let mut out = Tensor::zeros(&[1, c, h, w]);
    for ch in 0..c {
        for y in 0..h {
            let sy = y0 + y as isize;
            if sy < 0 || sy >= ih {
                continue;
            }
            for x in 0..w {
                let sx = x0 + x as isize;
                if sx < 0 || sx >= iw {
                    continue;
                }
                out.data[(ch * h + y) * w + x] =
                    t.data[(ch as isize * ih + sy) as usize * iw as usize + sx as usize];
            }
        }
    }
    out
}

/// Pillars `rows` of a `[P, ...]` tensor.
fn rows(t: &Tensor, rows: &[usize]) -> Tensor {
    let per: usize = t.shape[1..].iter().product();
    let mut shape = t.shape.clone();
    shape[0] = rows.len();
    let mut data = Vec::with_capacity(rows.len() * per);
    for &r in rows {
        data.extend_from_slice(&t.data[r * per..(r + 1) * per]);
    }
    Tensor { shape, data }
}

/// The unit's layer with what the optimisation needs.
struct UnitLayer<'a> {
    kind: LayerKind,
    relu: bool,
    bias: &'a [f32],
}

impl UnitLayer<'_> {
    /// Input part of `x` a crop needs (with the convolution's halo, zeros outside).
    fn crop_input(&self, x: &Tensor, crop: &Crop) -> Tensor {
        match (crop, self.kind) {
            (Crop::Full, _) => x.clone(),
            (Crop::Rows(r), _) => rows(x, r),
            (
                Crop::Window { y0, x0, h, w },
                LayerKind::Conv2d {
                    kernel,
                    stride,
                    padding,
                },
            ) => {
                let iy = (y0 * stride) as isize - padding as isize;
                let ix = (x0 * stride) as isize - padding as isize;
                window(
                    x,
                    iy,
                    ix,
                    (h - 1) * stride + kernel,
                    (w - 1) * stride + kernel,
                )
            }
            (Crop::Window { y0, x0, h, w }, _) => window(x, *y0 as isize, *x0 as isize, *h, *w),
        }
    }

    /// Output part of a full output-shaped tensor that a crop produces.
    fn crop_output(&self, y: &Tensor, crop: &Crop) -> Tensor {
        match (crop, self.kind) {
            (Crop::Full, _) => y.clone(),
            (Crop::Rows(r), _) => rows(y, r),
            (Crop::Window { y0, x0, h, w }, LayerKind::ConvTranspose2d { stride, .. }) => window(
                y,
                (y0 * stride) as isize,
                (x0 * stride) as isize,
                h * stride,
                w * stride,
            ),
            (Crop::Window { y0, x0, h, w }, _) => window(y, *y0 as isize, *x0 as isize, *h, *w),
        }
    }

    fn conv_params(&self, crop: &Crop) -> Conv2dParams {
        match self.kind {
            LayerKind::Conv2d {
                stride, padding, ..
            } => Conv2dParams::new(stride, if *crop == Crop::Full { padding } else { 0 }),
            _ => unreachable!("conv params of a conv"),
        }
    }

    /// `relu(op(x, w) + b)` on a cropped input; a sparse conv runs on the whole frame with
    /// its rulebook `rb`.
    fn forward(
        &self,
        x: &Tensor,
        w: &Tensor,
        crop: &Crop,
        rb: Option<&Rulebook>,
    ) -> ops::Result<Tensor> {
        let mut y = match self.kind {
            LayerKind::SparseConv3d { .. } => {
                let rb = rb.ok_or_else(crate::quant::qnet::sparse_needs_rulebook)?;
                ops::sparse_conv::forward(x, rb, w, Some(self.bias))?
            }
            LayerKind::Linear => ops::linear::forward(x, w, Some(self.bias))?,
            LayerKind::Conv2d { .. } => {
                ops::conv2d::forward(x, w, Some(self.bias), self.conv_params(crop))?
            }
            LayerKind::ConvTranspose2d { stride, .. } => ops::conv_transpose2d::forward(
                x,
                w,
                Some(self.bias),
                ConvTranspose2dParams::new(stride, 0),
            )?,
        };
        if self.relu {
            ops::relu::forward_inplace(&mut y);
        }
        Ok(y)
    }

    /// Gradients of input and weight from the gradient of the output (after ReLU).
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        (y, gy): (&Tensor, &Tensor),
        crop: &Crop,
        rb: Option<&Rulebook>,
    ) -> ops::Result<(Tensor, Tensor)> {
        let g = if self.relu {
            ops::relu::backward(y, gy)?
        } else {
            gy.clone()
        };
        Ok(match self.kind {
            LayerKind::SparseConv3d { .. } => {
                let rb = rb.ok_or_else(crate::quant::qnet::sparse_needs_rulebook)?;
                let r = ops::sparse_conv::backward(x, rb, w, false, &g)?;
                (r.input, r.weight)
            }
            LayerKind::Linear => {
                let r = ops::linear::backward(x, w, false, &g)?;
                (r.input, r.weight)
            }
            LayerKind::Conv2d { .. } => {
                let r = ops::conv2d::backward(x, w, false, self.conv_params(crop), &g)?;
                (r.input, r.weight)
            }
            LayerKind::ConvTranspose2d { stride, .. } => {
                let r = ops::conv_transpose2d::backward(
                    x,
                    w,
                    false,
                    ConvTranspose2dParams::new(stride, 0),
                    &g,
                )?;
                (r.input, r.weight)
            }
        })
    }

    /// Output positions of an output tensor (pixels, point slots or active sites).
    fn positions(&self, y: &Tensor) -> usize {
        match self.kind {
            LayerKind::Linear | LayerKind::SparseConv3d { .. } => {
                y.len() / y.shape.last().copied().unwrap_or(1).max(1)
            }
            _ => y.shape[0] * y.shape[2] * y.shape[3],
        }
    }
}

/// Gradient of a layer's input `x` from the gradient of its pre-ReLU output (FP weights).
fn input_grad(
    kind: LayerKind,
    w: &Tensor,
    g: &Tensor,
    x: &Tensor,
    rb: Option<&Rulebook>,
) -> ops::Result<Tensor> {
    let in_shape = &x.shape;
    match kind {
        LayerKind::SparseConv3d { .. } => {
            let rb = rb.ok_or_else(crate::quant::qnet::sparse_needs_rulebook)?;
            Ok(ops::sparse_conv::backward(x, rb, w, false, g)?.input)
        }
        LayerKind::Linear => {
            let (cout, cin) = (w.shape[0], w.shape[1]);
            let wt = Tensor::from_fn(&[cin, cout], |i| w.data[(i % cout) * cin + i / cout]);
            ops::linear::forward(g, &wt, None)
        }
        LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } => {
            let op = |n: usize| (n + 2 * padding - kernel) % stride;
            let p = ConvTranspose2dParams {
                stride: (stride, stride),
                padding: (padding, padding),
                output_padding: (op(in_shape[2]), op(in_shape[3])),
            };
            ops::conv_transpose2d::forward(g, w, None, p)
        }
        LayerKind::ConvTranspose2d { stride, .. } => {
            ops::conv2d::forward(g, w, None, Conv2dParams::new(stride, 0))
        }
    }
}

fn add_into(slot: &mut Option<Tensor>, g: Tensor) {
    match slot {
        Some(acc) => acc.data.iter_mut().zip(&g.data).for_each(|(a, b)| *a += b),
        None => *slot = Some(g),
    }
}

/// The part of the network after a unit that TGPL runs: nodes needed for the heads the
/// unit reaches, which of them depend on the unit, and the reached head outputs.
struct Downstream {
    nodes: Vec<usize>,
    tainted_value: Vec<bool>,
}

impl Downstream {
    fn new(graph: &Graph, unit: usize) -> Self {
        let n = graph.nodes.len();
        let mut tainted_value = vec![false; n + 1];
        tainted_value[unit + 1] = true;
        for j in unit + 1..n {
            if graph.nodes[j].inputs.iter().any(|&v| tainted_value[v]) {
                tainted_value[j + 1] = true;
            }
        }
        let mut needed = vec![false; n + 1];
        for t in &graph.tasks {
            for &v in std::iter::once(&t.heatmap).chain(&t.regression) {
                if tainted_value[v] {
                    needed[v] = true;
                }
            }
        }
        let mut nodes = Vec::new();
        for j in (unit + 1..n).rev() {
            if needed[j + 1] {
                nodes.push(j);
                for &v in &graph.nodes[j].inputs {
                    needed[v] = true;
                }
            }
        }
        nodes.reverse();
        Self {
            nodes,
            tainted_value,
        }
    }
}

/// The reconstruction of every integer layer of `init`, in topological order. Returns
/// the model and a report per optimised unit.
pub fn reconstruct(
    ctx: &Context<'_>,
    init: QuantModel,
    frames: Vec<(FrameInput, Positives)>,
    progress: &indicatif::ProgressBar,
) -> Result<QuantModel, CalibError> {
    Ok(reconstruct_with_report(ctx, init, frames, progress)?.0)
}

/// Whether unit `i` learns the step size of its input: it is the group's first integer
/// reader, and the group is not the per-feature-scaled network input (fixed).
fn owns(ctx: &Context<'_>, init: &QuantModel, i: usize) -> bool {
    let g = ctx.plan.group[ctx.graph.nodes[i].inputs[0]];
    ctx.plan.owner[g] == Some(i) && !(init.input_scales.is_some() && g == ctx.plan.group[0])
}

/// Whether unit `i` has anything to learn.
fn learns(ctx: &Context<'_>, init: &QuantModel, i: usize) -> bool {
    ctx.opts.adaround || owns(ctx, init, i)
}

/// [`reconstruct`] with the per-unit reports.
pub fn reconstruct_with_report(
    ctx: &Context<'_>,
    init: QuantModel,
    frames: Vec<(FrameInput, Positives)>,
    progress: &indicatif::ProgressBar,
) -> Result<(QuantModel, Vec<UnitReport>), CalibError> {
    let graph = ctx.graph;
    let n = graph.nodes.len();
    if frames.is_empty() {
        return Err(CalibError::NoFrames);
    }
    let mut consumers = vec![0usize; n + 1];
    let mut last_use = vec![0usize; n + 1];
    for (i, node) in graph.nodes.iter().enumerate() {
        for &v in &node.inputs {
            consumers[v] += 1;
            last_use[v] = i;
        }
    }
    // The partial model: nothing quantized yet.
    let mut model = float_model(graph, init.provenance.clone());
    let fpnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
    let mut qnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
    let mut states: Vec<FrameState> = Vec::with_capacity(frames.len());
    for (input, pos) in frames {
        let x0 = fpnet.input_value(&input.net_input())?;
        let sites = fpnet.frame_sites(&input.net_input())?;
        let mut q = vec![None; n + 1];
        let mut fp = vec![None; n + 1];
        q[0] = Some(x0.clone());
        fp[0] = Some(x0);
        states.push(FrameState {
            input,
            sites,
            pos,
            q,
            fp,
        });
    }
    // Per-feature input scales are fixed by the statistics: the input is quantized from
    // the start.
    if init.input_scales.is_some() {
        model.input_scales = init.input_scales.clone();
        for v in ctx.plan.members(ctx.plan.group[0]) {
            model.activations[v] = init.activations[v];
        }
        let p = init.activations[0]
            .ok_or_else(|| CalibError::Model("per-feature input without parameters".into()))?;
        for s in &mut states {
            if let Some(QValue::Float(t)) = &s.q[0] {
                s.q[0] = Some(quantize_input(t, p, init.input_scales.as_deref()));
            }
        }
        qnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
    }
    // Residual blocks that are one unit: conv1 node -> (conv2 node, add node).
    let blocks: Vec<Option<(usize, usize)>> = (0..n)
        .map(|i| residual_block(ctx, &init, &consumers, i))
        .collect();
    let in_block: Vec<bool> = (0..n)
        .map(|j| blocks.iter().flatten().any(|&(c2, _)| c2 == j))
        .collect();
    let units: Vec<usize> = (0..n)
        .filter(|&i| ctx.plan.int_layer[i] && learns(ctx, &init, i) && !in_block[i])
        .collect();
    progress.set_length((units.len() * ctx.opts.iters) as u64);
    progress.set_position(0);
    let mut reports = Vec::new();
    // Frees, after node j, what no later node reads.
    let free = |states: &mut [FrameState], j: usize| {
        for s in states {
            for &v in &graph.nodes[j].inputs {
                if last_use[v] == j {
                    s.q[v] = None;
                    s.fp[v] = None;
                }
            }
            if consumers[j + 1] == 0 {
                s.q[j + 1] = None;
                s.fp[j + 1] = None;
            }
        }
    };
    let mut i = 0;
    while i < n {
        if let Some((c2, add)) = blocks[i] {
            let name = block_name(&graph.nodes[i].name);
            // The FP frontier through the block; the block's FP output is the target.
            for j in i..=add {
                states
                    .par_iter_mut()
                    .try_for_each(|s| -> Result<(), CalibError> {
                        let out =
                            fpnet.run_node(j, &s.fp, &s.input.net_input(), s.sites.as_ref())?;
                        s.fp[j + 1] = Some(out);
                        Ok(())
                    })?;
            }
            let y_fp: Vec<Tensor> = states
                .iter()
                .map(|s| s.fp[add + 1].as_ref().expect("computed").to_float())
                .collect();
            let k = units.iter().position(|&x| x == i).expect("unit");
            progress.set_message(format!("unit {}/{} {name}", k + 1, units.len()));
            let b = optimise_block(ctx, &init, [i, c2, add], &states, &y_fp, progress)?;
            let objective = if ctx.opts.report {
                format!(
                    "objective {:.4e} -> {:.4e}, ",
                    b.report.objective_before(),
                    b.report.objective_after()
                )
            } else {
                String::new()
            };
            log::info!(
                "{name} (block): {objective}lambda {:.3e}, steps {:.4e} -> {:.4e} (input), {:.4e} -> {:.4e} (inner), {} roundings flipped",
                b.report.lambda,
                b.report.scale_before,
                b.report.scale_after,
                b.inner_before,
                b.inner_after,
                b.report.flipped
            );
            reports.push(b.report);
            model.layers[i] = Some(LayerPlan::Int(b.w1));
            model.layers[c2] = Some(LayerPlan::Int(b.w2));
            for (owner, v, p) in [(i, graph.nodes[i].inputs[0], b.px), (c2, i + 1, b.ph)] {
                if owns(ctx, &init, owner) {
                    set_group(ctx, &mut model, &mut states, ctx.plan.group[v], p);
                }
            }
            qnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
            for j in i..=add {
                states
                    .par_iter_mut()
                    .try_for_each(|s| -> Result<(), CalibError> {
                        let out = qnet.run_node(j, &s.q, &s.input.net_input(), s.sites.as_ref())?;
                        s.q[j + 1] = Some(out);
                        Ok(())
                    })?;
                free(&mut states, j);
            }
            i = add + 1;
            continue;
        }
        let node = &graph.nodes[i];
        if ctx.plan.int_layer[i] {
            let Some(LayerPlan::Int(w0)) = &init.layers[i] else {
                return Err(CalibError::Model(format!(
                    "{}: integer layer without weights",
                    node.name
                )));
            };
            let u = node.inputs[0];
            let g = ctx.plan.group[u];
            let owns = owns(ctx, &init, i);
            let in0 = init.activations[u].ok_or_else(|| {
                CalibError::Model(format!("{}: quantized input without parameters", node.name))
            })?;
            // FP outputs of the unit (they also advance the FP frontier).
            let y_fp: Vec<Tensor> = states
                .par_iter()
                .map(|s| {
                    let y = fpnet.run_node(i, &s.fp, &s.input.net_input(), s.sites.as_ref())?;
                    Ok(y.into_float())
                })
                .collect::<Result<_, CalibError>>()?;
            let (w, in_params) = if learns(ctx, &init, i) {
                let k = units.iter().position(|&x| x == i).expect("unit");
                progress.set_message(format!("unit {}/{} {}", k + 1, units.len(), node.name));
                let (w, p, report) =
                    optimise_unit(ctx, i, w0, in0, owns, &states, &y_fp, progress)?;
                if ctx.opts.report {
                    log::info!(
                        "{}: objective {:.4e} -> {:.4e} (L_rec {:.4e} -> {:.4e}, L_TGPL {:.4e} -> {:.4e}, lambda {:.3e}), step {:.4e} -> {:.4e}, {} roundings flipped",
                        report.node,
                        report.objective_before(),
                        report.objective_after(),
                        report.rec_before,
                        report.rec_after,
                        report.tgpl_before,
                        report.tgpl_after,
                        report.lambda,
                        report.scale_before,
                        report.scale_after,
                        report.flipped
                    );
                } else {
                    log::info!(
                        "{}: lambda {:.3e}, step {:.4e} -> {:.4e}, {} roundings flipped",
                        report.node,
                        report.lambda,
                        report.scale_before,
                        report.scale_after,
                        report.flipped
                    );
                }
                reports.push(report);
                (w, p)
            } else {
                (w0.clone(), in0)
            };
            model.layers[i] = Some(LayerPlan::Int(w));
            if owns {
                set_group(ctx, &mut model, &mut states, g, in_params);
            }
            qnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
            states
                .par_iter_mut()
                .zip(y_fp)
                .try_for_each(|(s, y)| -> Result<(), CalibError> {
                    let out = qnet.run_node(i, &s.q, &s.input.net_input(), s.sites.as_ref())?;
                    s.q[i + 1] = Some(out);
                    s.fp[i + 1] = Some(QValue::Float(y));
                    Ok(())
                })?;
        } else {
            if model.layers[i] != init.layers[i] {
                model.layers[i] = init.layers[i].clone();
                qnet = QuantNet::from_folded(graph, ctx.folded, &model)?;
            }
            states
                .par_iter_mut()
                .try_for_each(|s| -> Result<(), CalibError> {
                    let input = s.input.net_input();
                    let out = qnet.run_node(i, &s.q, &input, s.sites.as_ref())?;
                    let fout = fpnet.run_node(i, &s.fp, &input, s.sites.as_ref())?;
                    s.q[i + 1] = Some(out);
                    s.fp[i + 1] = Some(fout);
                    Ok(())
                })?;
        }
        free(&mut states, i);
        i += 1;
    }
    // Every group's parameters are those of the initial model unless a unit learnt them.
    for (v, a) in model.activations.iter_mut().enumerate() {
        if a.is_none() {
            *a = init.activations[v];
        }
    }
    Ok((model, reports))
}

/// Weights of a unit during its optimisation: learned rounding or fixed nearest codes.
enum UnitWeights {
    Ada(AdaRound),
    Fixed(Tensor),
}

impl UnitWeights {
    /// Learned rounding from the folded weights when `adaround`, else the nearest codes of
    /// `w0`; per-channel steps are `w0`'s.
    fn new(
        folded: &FoldedLayer,
        w0: &LayerWeights,
        out_axis: usize,
        adaround: bool,
    ) -> Result<Self, CalibError> {
        let wq: Vec<QParams> = w0
            .scales
            .iter()
            .map(|&s| QParams {
                scale: s,
                zero_point: 0,
                grid: Grid::weight(w0.bits),
            })
            .collect();
        Ok(if adaround {
            UnitWeights::Ada(AdaRound::new(&folded.weight, out_axis, &wq)?)
        } else {
            UnitWeights::Fixed(dequantized(w0, out_axis))
        })
    }

    fn current(&self, shape: &[usize]) -> Tensor {
        match self {
            UnitWeights::Ada(a) => Tensor {
                shape: shape.to_vec(),
                data: a.soft_weights(),
            },
            UnitWeights::Fixed(t) => t.clone(),
        }
    }

    fn hard(&self, shape: &[usize]) -> Tensor {
        match self {
            UnitWeights::Ada(a) => Tensor {
                shape: shape.to_vec(),
                data: a.hard_weights(),
            },
            UnitWeights::Fixed(t) => t.clone(),
        }
    }
}

/// Dequantized weights of a layer's codes.
fn dequantized(w: &LayerWeights, out_axis: usize) -> Tensor {
    let inner: usize = w.shape[out_axis + 1..].iter().product();
    let cout = w.shape[out_axis];
    Tensor {
        shape: w.shape.clone(),
        data: w
            .codes
            .iter()
            .enumerate()
            .map(|(i, &c)| w.scales[(i / inner) % cout] * c as f32)
            .collect(),
    }
}

/// Sum of squared differences, in f64.
fn squared_error(y: &Tensor, t: &Tensor) -> f64 {
    y.data
        .iter()
        .zip(&t.data)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum()
}

/// Smallest step size relative to the initial one (keeps a step from collapsing).
const MIN_RATIO: f32 = 1e-2;

/// Sets the parameters of value group `g` and quantizes its members in the frontier.
fn set_group(
    ctx: &Context<'_>,
    model: &mut QuantModel,
    states: &mut [FrameState],
    g: usize,
    p: QParams,
) {
    let members: Vec<usize> = ctx.plan.members(g).collect();
    for &v in &members {
        model.activations[v] = Some(p);
    }
    states.par_iter_mut().for_each(|s| {
        for &v in &members {
            if let Some(QValue::Float(t)) = &s.q[v] {
                s.q[v] = Some(QValue::quantize(t, p));
            }
        }
    });
}

/// The residual block starting at node `i`, when blocks are units: integer layers
/// `i` (conv1) and `i + 1` (conv2, reading conv1's output alone), then node `i + 2`
/// adding conv2's output to conv1's input, each intermediate read once. Returns
/// (conv2, add).
fn residual_block(
    ctx: &Context<'_>,
    init: &QuantModel,
    consumers: &[usize],
    i: usize,
) -> Option<(usize, usize)> {
    let g = ctx.graph;
    let (c2, add) = (i + 1, i + 2);
    if !ctx.opts.blocks || add >= g.nodes.len() {
        return None;
    }
    let x = g.nodes[i].inputs[0];
    let ok = ctx.plan.int_layer[i]
        && ctx.plan.int_layer[c2]
        && matches!(g.nodes[i].op, Op::Layer(_))
        && matches!(g.nodes[c2].op, Op::Layer(_))
        && g.nodes[c2].inputs == [i + 1]
        && matches!(g.nodes[add].op, Op::Add { .. })
        && g.nodes[add].inputs.contains(&(c2 + 1))
        && g.nodes[add].inputs.contains(&x)
        && consumers[i + 1] == 1
        && consumers[c2 + 1] == 1
        && learns(ctx, init, i);
    ok.then_some((c2, add))
}

/// `backbone_3d.conv1.0.conv1` -> `backbone_3d.conv1.0`.
fn block_name(conv1: &str) -> String {
    conv1.strip_suffix(".conv1").unwrap_or(conv1).to_string()
}

/// What the optimisation of a residual block gives.
struct BlockResult {
    w1: LayerWeights,
    w2: LayerWeights,
    /// Parameters of the block input's group (shared by conv2's output and the block
    /// output) and of conv2's input.
    px: QParams,
    ph: QParams,
    inner_before: f32,
    inner_after: f32,
    report: UnitReport,
}

/// The block unit: `y = relu(fq_x(conv2(fq_h(relu(conv1(fq_x(x)))))) + fq_x(x))`, then
/// `fq_y(y)` with the output's own (here fixed) parameters: the integer block, whose add
/// sums codes sharing `fq_x`'s parameters and requantizes the sum. Learns both layers' rounding and the step sizes the
/// block owns, on `L_rec` at the block output (+ TGPL there), each quantizer with its
/// straight-through / LSQ gradient.
fn optimise_block(
    ctx: &Context<'_>,
    init: &QuantModel,
    [i1, i2, add]: [usize; 3],
    states: &[FrameState],
    y_fp: &[Tensor],
    progress: &indicatif::ProgressBar,
) -> Result<BlockResult, CalibError> {
    let graph = ctx.graph;
    let opts = ctx.opts;
    let name = block_name(&graph.nodes[i1].name);
    let err = |source: OpsError| CalibError::Op {
        node: name.clone(),
        source,
    };
    let layer_of = |j: usize| -> Result<(&crate::model::graph::Layer, &LayerWeights), CalibError> {
        match (&graph.nodes[j].op, &init.layers[j]) {
            (Op::Layer(l), Some(LayerPlan::Int(w))) => Ok((l, w)),
            _ => Err(CalibError::Model(format!(
                "{}: integer layer without weights",
                graph.nodes[j].name
            ))),
        }
    };
    let (l1, w01) = layer_of(i1)?;
    let (l2, w02) = layer_of(i2)?;
    let Op::Add { relu: add_relu } = graph.nodes[add].op else {
        unreachable!("residual_block checked the add")
    };
    let ux = graph.nodes[i1].inputs[0];
    let (px0, ph0) = match (init.activations[ux], init.activations[i1 + 1]) {
        (Some(a), Some(b)) => (a, b),
        _ => {
            return Err(CalibError::Model(format!(
                "{name}: block values without parameters"
            )));
        }
    };
    let (owns_x, owns_h) = (owns(ctx, init, i1), owns(ctx, init, i2));
    // The block output's parameters belong to its readers' group: fixed here.
    let py = init.activations[add + 1];
    let unit = |l: &crate::model::graph::Layer, j: usize| UnitLayer {
        kind: l.kind,
        relu: l.relu,
        bias: &ctx.folded_q[j].as_ref().expect("layer folded").bias,
    };
    let (u1, u2) = (unit(l1, i1), unit(l2, i2));
    let rb = |l: &crate::model::graph::Layer, f: usize| -> Option<&Rulebook> {
        match l.kind {
            LayerKind::SparseConv3d { rulebook, .. } => {
                states[f].sites.as_ref().map(|s| &s.rulebooks[rulebook])
            }
            _ => None,
        }
    };
    let weights_of = |l: &crate::model::graph::Layer, j: usize, w0: &LayerWeights| {
        let folded = ctx.folded_q[j].as_ref().expect("layer folded");
        UnitWeights::new(folded, w0, weight_out_axis(l.kind), opts.adaround)
    };
    let mut ws = [weights_of(l1, i1, w01)?, weights_of(l2, i2, w02)?];
    let shapes = [w01.shape.clone(), w02.shape.clone()];
    let nearest = [
        dequantized(w01, weight_out_axis(l1.kind)),
        dequantized(w02, weight_out_axis(l2.kind)),
    ];
    let mut adam_v: Vec<Option<Adam>> = ws
        .iter()
        .map(|w| match w {
            UnitWeights::Ada(a) => Some(Adam::new(a.len())),
            UnitWeights::Fixed(_) => None,
        })
        .collect();
    // Step sizes relative to their initial values (x: the block input's group, h: conv2's
    // input), learnt when the block owns them.
    let mut ratio = [1.0f32; 2];
    let mut adam_s = [Adam::new(1), Adam::new(1)];
    let qx = |r: f32| QParams {
        scale: (px0.scale * r).max(MIN_SCALE),
        ..px0
    };
    let qh = |r: f32| QParams {
        scale: (ph0.scale * r).max(MIN_SCALE),
        ..ph0
    };
    let sched = BetaSchedule {
        iters: opts.iters,
        warmup: opts.warmup,
        start: opts.beta_start,
        end: opts.beta_end,
    };
    let fq = |t: &Tensor, q: &QParams| Tensor {
        shape: t.shape.clone(),
        data: fake_quant(&t.data, q),
    };

    /// Everything the backward pass needs from one forward pass.
    struct Pass {
        x: Tensor,
        xq: Tensor,
        y1: Tensor,
        h: Tensor,
        a2: Tensor,
        z: Tensor,
        y: Tensor,
        yq: Tensor,
    }
    let forward = |f: usize, w: [&Tensor; 2], r: [f32; 2]| -> Result<Pass, CalibError> {
        let x = unit_input(states, f, ux).to_float();
        let (qx, qh) = (qx(r[0]), qh(r[1]));
        let xq = fq(&x, &qx);
        let y1 = u1.forward(&xq, w[0], &Crop::Full, rb(l1, f)).map_err(err)?;
        let h = fq(&y1, &qh);
        let a2 = u2.forward(&h, w[1], &Crop::Full, rb(l2, f)).map_err(err)?;
        let a2q = fq(&a2, &qx);
        let z = Tensor {
            shape: a2q.shape.clone(),
            data: a2q.data.iter().zip(&xq.data).map(|(a, b)| a + b).collect(),
        };
        let y = Tensor {
            shape: z.shape.clone(),
            data: z
                .data
                .iter()
                .map(|&v| if add_relu { v.max(0.0) } else { v })
                .collect(),
        };
        let yq = match &py {
            Some(q) => fq(&y, q),
            None => y.clone(),
        };
        Ok(Pass {
            x,
            xq,
            y1,
            h,
            a2,
            z,
            y,
            yq,
        })
    };
    // The block output has conv2's layout (rows of sites).
    let positions = |t: &Tensor| u2.positions(t).max(1);
    let rec_loss = |y: &Tensor, t: &Tensor| squared_error(y, t) / positions(y) as f64;
    let down = Downstream::new(graph, add);
    let tgpl = |f: usize, y: Tensor| tgpl_downstream(ctx, &down, add, &states[f], y);

    let (mut rec_before, mut tgpl_before) = (f64::NAN, f64::NAN);
    if opts.report {
        let p = forward(0, [&nearest[0], &nearest[1]], [1.0, 1.0])?;
        rec_before = rec_loss(&p.yq, &y_fp[0]);
        tgpl_before = if opts.tgpl { tgpl(0, p.yq)?.0 } else { 0.0 };
    }
    let mut lambda: Option<f64> = if opts.tgpl {
        opts.lambda.map(f64::from)
    } else {
        Some(0.0)
    };
    let frames = states.len();
    let mut g_tgpl: Option<(usize, Tensor)> = None;
    let lsq = |xs: &Tensor, g: &Tensor, q: &QParams| {
        fake_quant_backward(&xs.data, &g.data, q, GradScale::Lsq)
    };
    for t in 0..opts.iters {
        let f = if opts.tgpl {
            (t / opts.tgpl_every) % frames
        } else {
            t % frames
        };
        let w = [ws[0].current(&shapes[0]), ws[1].current(&shapes[1])];
        let p = forward(f, [&w[0], &w[1]], ratio)?;
        if opts.tgpl && t % opts.tgpl_every == 0 {
            let rec0 = lambda.is_none().then(|| rec_loss(&p.yq, &y_fp[f]));
            let (l, g) = tgpl(f, p.yq.clone())?;
            if let Some(r) = rec0 {
                lambda = Some(if l > 0.0 { r / l } else { 0.0 });
            }
            g_tgpl = Some((f, g));
        }
        let lam = lambda.unwrap_or(0.0);
        let pos = positions(&p.yq) as f64;
        let mut g_yq = Tensor::zeros(&p.yq.shape);
        for ((g, &a), &b) in g_yq.data.iter_mut().zip(&p.yq.data).zip(&y_fp[f].data) {
            *g = (2.0 * (a - b) as f64 / pos) as f32;
        }
        if let Some((gf, g)) = &g_tgpl
            && *gf == f
            && lam > 0.0
        {
            let k = lam as f32;
            g_yq.data
                .iter_mut()
                .zip(&g.data)
                .for_each(|(a, b)| *a += k * b);
        }
        let (qx_t, qh_t) = (qx(ratio[0]), qh(ratio[1]));
        // fq_y(y) (fixed parameters: straight-through only), relu, then the sum's two
        // branches.
        let gy = match &py {
            Some(q) => lsq(&p.y, &g_yq, q)?.input,
            None => g_yq.data.clone(),
        };
        let mut gs = [0.0f32, 0.0];
        let gz: Vec<f32> = gy
            .iter()
            .zip(&p.z.data)
            .map(|(&g, &z)| if add_relu && z <= 0.0 { 0.0 } else { g })
            .collect();
        let gz = Tensor {
            shape: p.z.shape.clone(),
            data: gz,
        };
        let ga2 = lsq(&p.a2, &gz, &qx_t)?;
        gs[0] += ga2.scale[0];
        let ga2 = Tensor {
            shape: p.a2.shape.clone(),
            data: ga2.input,
        };
        let (gh, gw2) = u2
            .backward(&p.h, &w[1], (&p.a2, &ga2), &Crop::Full, rb(l2, f))
            .map_err(err)?;
        let gy1 = lsq(&p.y1, &gh, &qh_t)?;
        gs[1] += gy1.scale[0];
        let gy1 = Tensor {
            shape: p.y1.shape.clone(),
            data: gy1.input,
        };
        let (gxq, gw1) = u1
            .backward(&p.xq, &w[0], (&p.y1, &gy1), &Crop::Full, rb(l1, f))
            .map_err(err)?;
        // The block input feeds conv1 and the sum.
        let gxq_total = Tensor {
            shape: gxq.shape.clone(),
            data: gxq.data.iter().zip(&gz.data).map(|(a, b)| a + b).collect(),
        };
        gs[0] += lsq(&p.x, &gxq_total, &qx_t)?.scale[0];
        for (k, gw) in [gw1, gw2].iter().enumerate() {
            if let (UnitWeights::Ada(a), Some(adam)) = (&mut ws[k], &mut adam_v[k]) {
                let mut gv = a.backward(&gw.data)?;
                if let Some(beta) = sched.beta(t) {
                    a.add_regularizer_grad(beta, opts.reg_weight, &mut gv)?;
                }
                adam.step(&mut a.v, &gv, opts.lr_v)?;
            }
        }
        for (k, (owned, s0)) in [(owns_x, px0.scale), (owns_h, ph0.scale)]
            .into_iter()
            .enumerate()
        {
            if owned {
                let mut r = [ratio[k]];
                adam_s[k].step(
                    &mut r,
                    &[gs[k] * s0],
                    cosine_lr(opts.lr_act, 0.0, t, opts.iters),
                )?;
                ratio[k] = r[0].max(MIN_RATIO);
            }
        }
        if t % 10 == 0 {
            progress.set_message(format!("{name}: L_rec {:.3e}", rec_loss(&p.yq, &y_fp[f])));
        }
        progress.inc(1);
    }
    let hard = [ws[0].hard(&shapes[0]), ws[1].hard(&shapes[1])];
    let (mut rec_after, mut tgpl_after) = (f64::NAN, f64::NAN);
    if opts.report {
        let p = forward(0, [&hard[0], &hard[1]], ratio)?;
        rec_after = rec_loss(&p.yq, &y_fp[0]);
        tgpl_after = if opts.tgpl { tgpl(0, p.yq)?.0 } else { 0.0 };
    }
    let mut flipped = 0;
    let mut out = Vec::new();
    for (w, w0) in ws.iter().zip([w01, w02]) {
        let codes: Vec<i8> = match w {
            UnitWeights::Ada(a) => a.hard_codes().into_iter().map(|c| c as i8).collect(),
            UnitWeights::Fixed(_) => w0.codes.clone(),
        };
        flipped += codes.iter().zip(&w0.codes).filter(|(a, b)| a != b).count();
        out.push(LayerWeights {
            codes,
            ..w0.clone()
        });
    }
    let w2 = out.pop().expect("two layers");
    let w1 = out.pop().expect("two layers");
    let (px, ph) = (qx(ratio[0]), qh(ratio[1]));
    Ok(BlockResult {
        w1,
        w2,
        px,
        ph,
        inner_before: ph0.scale,
        inner_after: ph.scale,
        report: UnitReport {
            node: name.clone(),
            rec_before,
            rec_after,
            tgpl_before,
            tgpl_after,
            lambda: lambda.unwrap_or(0.0),
            scale_before: px0.scale,
            scale_after: px.scale,
            flipped,
        },
    })
}

fn unit_input(states: &[FrameState], f: usize, u: usize) -> &QValue {
    states[f].q[u].as_ref().expect("unit input in the frontier")
}

#[allow(clippy::too_many_arguments)]
fn optimise_unit(
    ctx: &Context<'_>,
    i: usize,
    w0: &LayerWeights,
    in0: QParams,
    owns: bool,
    states: &[FrameState],
    y_fp: &[Tensor],
    progress: &indicatif::ProgressBar,
) -> Result<(LayerWeights, QParams, UnitReport), CalibError> {
    let node = &ctx.graph.nodes[i];
    let Op::Layer(l) = &node.op else {
        unreachable!("units are layers")
    };
    let err = |source: OpsError| CalibError::Op {
        node: node.name.clone(),
        source,
    };
    let opts = ctx.opts;
    let folded = ctx.folded_q[i].as_ref().expect("layer folded");
    let layer = UnitLayer {
        kind: l.kind,
        relu: l.relu,
        bias: &folded.bias,
    };
    let out_axis = weight_out_axis(l.kind);
    let shape = w0.shape.clone();
    let mut weights = UnitWeights::new(folded, w0, out_axis, opts.adaround)?;
    let nearest = dequantized(w0, out_axis);
    // The step size is learnt relative to its initial value (s = s0 * r, Adam on r), so
    // one learning rate suits every layer whatever the magnitude of its activations.
    let mut ratio = 1.0f32;
    let mut scale = in0.scale;
    let mut adam_v = match &weights {
        UnitWeights::Ada(a) => Some(Adam::new(a.len())),
        UnitWeights::Fixed(_) => None,
    };
    let mut adam_s = Adam::new(1);
    let sched = BetaSchedule {
        iters: opts.iters,
        warmup: opts.warmup,
        start: opts.beta_start,
        end: opts.beta_end,
    };
    let mut rng =
        ChaCha8Rng::seed_from_u64(ctx.seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)));
    let u = node.inputs[0];
    let down = Downstream::new(ctx.graph, i);
    let input_of = |f: usize| unit_input(states, f, u);
    // A sparse conv's rulebook on frame f.
    let rb_of = |f: usize| -> Option<&Rulebook> {
        match l.kind {
            LayerKind::SparseConv3d { rulebook, .. } => {
                states[f].sites.as_ref().map(|s| &s.rulebooks[rulebook])
            }
            _ => None,
        }
    };
    let qp = |s: f32| QParams { scale: s, ..in0 };

    // Full-map unit output of frame f with given weights and step size.
    let full_output = |f: usize, w: &Tensor, s: f32| -> Result<Tensor, CalibError> {
        let x = input_of(f).to_float();
        let x = if owns {
            Tensor {
                shape: x.shape.clone(),
                data: fake_quant(&x.data, &qp(s)),
            }
        } else {
            x
        };
        layer.forward(&x, w, &Crop::Full, rb_of(f)).map_err(err)
    };
    let rec_loss = |y: &Tensor, t: &Tensor| squared_error(y, t) / layer.positions(y).max(1) as f64;
    let tgpl = |f: usize, y: Tensor| -> Result<(f64, Tensor), CalibError> {
        tgpl_downstream(ctx, &down, i, &states[f], y)
    };

    // The objective before (reports only): nearest rounding, initial step size, frame 0.
    let (mut rec_before, mut tgpl_before) = (f64::NAN, f64::NAN);
    if opts.report {
        let y = full_output(0, &nearest, in0.scale)?;
        rec_before = rec_loss(&y, &y_fp[0]);
        tgpl_before = if opts.tgpl { tgpl(0, y)?.0 } else { 0.0 };
    }
    // Without a given lambda, the first TGPL pass (iteration 0) sets it.
    let mut lambda: Option<f64> = if opts.tgpl {
        opts.lambda.map(f64::from)
    } else {
        Some(0.0)
    };

    let frames = states.len();
    let mut g_tgpl: Option<(usize, Tensor)> = None;
    for t in 0..opts.iters {
        let f = if opts.tgpl {
            (t / opts.tgpl_every) % frames
        } else {
            t % frames
        };
        if opts.tgpl && t % opts.tgpl_every == 0 {
            let w = weights.current(&shape);
            let y = full_output(f, &w, scale)?;
            let rec0 = lambda.is_none().then(|| rec_loss(&y, &y_fp[f]));
            let (l, g) = tgpl(f, y)?;
            if let Some(r) = rec0 {
                lambda = Some(if l > 0.0 { r / l } else { 0.0 });
            }
            g_tgpl = Some((f, g));
        }
        let lambda = lambda.unwrap_or(0.0);
        // The crop of this iteration.
        let yf = &y_fp[f];
        let crop = match l.kind {
            // Sparse convs see every active site (a few tens of thousands at most).
            LayerKind::SparseConv3d { .. } => Crop::Full,
            LayerKind::Linear => {
                let p = yf.shape[0];
                if opts.crop_pillars == 0 || opts.crop_pillars >= p {
                    Crop::Full
                } else {
                    let mut idx =
                        rand::seq::index::sample(&mut rng, p, opts.crop_pillars).into_vec();
                    idx.sort_unstable();
                    Crop::Rows(idx)
                }
            }
            LayerKind::Conv2d { .. } => {
                let (ho, wo) = (yf.shape[2], yf.shape[3]);
                if opts.crop == 0 || (opts.crop >= ho && opts.crop >= wo) {
                    Crop::Full
                } else {
                    let (h, w) = (opts.crop.min(ho), opts.crop.min(wo));
                    Crop::Window {
                        y0: rng.random_range(0..=ho - h),
                        x0: rng.random_range(0..=wo - w),
                        h,
                        w,
                    }
                }
            }
            LayerKind::ConvTranspose2d { kernel, stride } => {
                let x = input_of(f);
                let (hi, wi) = (x.shape()[2], x.shape()[3]);
                let side = opts.crop.div_ceil(stride);
                if kernel != stride || opts.crop == 0 || (side >= hi && side >= wi) {
                    Crop::Full
                } else {
                    let (h, w) = (side.min(hi), side.min(wi));
                    Crop::Window {
                        y0: rng.random_range(0..=hi - h),
                        x0: rng.random_range(0..=wi - w),
                        h,
                        w,
                    }
                }
            }
        };
        let xc = match input_of(f) {
            QValue::Float(t) => layer.crop_input(t, &crop),
            QValue::Quant { centered, params } => {
                let mut c = layer.crop_input(centered, &crop);
                c.data.iter_mut().for_each(|v| *v *= params.scale);
                c
            }
        };
        let xq = if owns {
            Tensor {
                shape: xc.shape.clone(),
                data: fake_quant(&xc.data, &qp(scale)),
            }
        } else {
            xc.clone()
        };
        let w = weights.current(&shape);
        let y = layer.forward(&xq, &w, &crop, rb_of(f)).map_err(err)?;
        let target = layer.crop_output(yf, &crop);
        let pos = layer.positions(&y).max(1) as f64;
        let mut gy = Tensor::zeros(&y.shape);
        let mut rec = 0f64;
        for ((g, &a), &b) in gy.data.iter_mut().zip(&y.data).zip(&target.data) {
            let d = (a - b) as f64;
            rec += d * d;
            *g = (2.0 * d / pos) as f32;
        }
        let last_rec = rec / pos;
        if let Some((gf, g)) = &g_tgpl
            && *gf == f
            && lambda > 0.0
        {
            let gc = layer.crop_output(g, &crop);
            let ratio = layer.positions(g) as f64 / pos;
            let k = (lambda * ratio) as f32;
            gy.data
                .iter_mut()
                .zip(&gc.data)
                .for_each(|(a, b)| *a += k * b);
        }
        let (gx, gw) = layer
            .backward(&xq, &w, (&y, &gy), &crop, rb_of(f))
            .map_err(err)?;
        if let (UnitWeights::Ada(a), Some(adam)) = (&mut weights, &mut adam_v) {
            let mut gv = a.backward(&gw.data)?;
            if let Some(beta) = sched.beta(t) {
                a.add_regularizer_grad(beta, opts.reg_weight, &mut gv)?;
            }
            adam.step(&mut a.v, &gv, opts.lr_v)?;
        }
        if owns {
            let gs = fake_quant_backward(&xc.data, &gx.data, &qp(scale), GradScale::Lsq)?.scale[0];
            let mut r = [ratio];
            adam_s.step(
                &mut r,
                &[gs * in0.scale],
                cosine_lr(opts.lr_act, 0.0, t, opts.iters),
            )?;
            ratio = r[0].max(MIN_RATIO);
            scale = (in0.scale * ratio).max(MIN_SCALE);
        }
        if t % 10 == 0 {
            progress.set_message(format!(
                "{}: L_rec {:.3e}{}",
                node.name,
                last_rec,
                if opts.tgpl {
                    format!(", lambda {lambda:.2e}")
                } else {
                    String::new()
                }
            ));
        }
        progress.inc(1);
    }

    // Harden and report.
    let hard = weights.hard(&shape);
    let codes: Vec<i8> = match &weights {
        UnitWeights::Ada(a) => a.hard_codes().into_iter().map(|c| c as i8).collect(),
        UnitWeights::Fixed(_) => w0.codes.clone(),
    };
    let flipped = codes.iter().zip(&w0.codes).filter(|(a, b)| a != b).count();
    let (mut rec_after, mut tgpl_after) = (f64::NAN, f64::NAN);
    if opts.report {
        let y = full_output(0, &hard, scale)?;
        rec_after = rec_loss(&y, &y_fp[0]);
        tgpl_after = if opts.tgpl { tgpl(0, y)?.0 } else { 0.0 };
    }
    let w = LayerWeights {
        bits: w0.bits,
        codes,
        shape,
        scales: w0.scales.clone(),
        bias: w0.bias.clone(),
    };
    let report = UnitReport {
        node: node.name.clone(),
        rec_before,
        rec_after,
        tgpl_before,
        tgpl_after,
        lambda: lambda.unwrap_or(0.0),
        scale_before: in0.scale,
        scale_after: scale,
        flipped,
    };
    Ok((w, qp(scale), report))
}

/// The frame's rulebooks, which a sparse op of a voxel model needs.
fn frame_sites<'a>(s: &'a FrameState, node: &str) -> Result<&'a FrameSites, CalibError> {
    s.sites
        .as_ref()
        .ok_or_else(|| CalibError::Engine(sparse::no_sites(node)))
}

/// TGPL of frame `s` when unit `unit` outputs `y`: the FP rest of the network from the
/// frontier to the reached heads, the loss there, and its gradient w.r.t. `y`.
fn tgpl_downstream(
    ctx: &Context<'_>,
    down: &Downstream,
    unit: usize,
    s: &FrameState,
    y: Tensor,
) -> Result<(f64, Tensor), CalibError> {
    let graph = ctx.graph;
    let n = graph.nodes.len();
    let input = s.input.net_input();
    // Frontier values are borrowed when float, dequantized copies otherwise.
    let mut vals: Vec<Option<Cow<'_, Tensor>>> = vec![None; n + 1];
    let mut argmax: Vec<Option<ArgMax>> = vec![None; n];
    vals[unit + 1] = Some(Cow::Owned(y));
    let (ny, nx) = graph.bev;
    for &j in &down.nodes {
        let node = &graph.nodes[j];
        let err = |source: OpsError| CalibError::Op {
            node: node.name.clone(),
            source,
        };
        for &v in &node.inputs {
            if vals[v].is_none() {
                let q = s.q[v].as_ref().ok_or_else(|| {
                    CalibError::Model(format!(
                        "{} reads value {v}, not in the frontier",
                        node.name
                    ))
                })?;
                vals[v] = Some(match q {
                    QValue::Float(t) => Cow::Borrowed(t),
                    q => Cow::Owned(q.to_float()),
                });
            }
        }
        let x = vals[node.inputs[0]].as_deref().expect("fetched");
        let out = match &node.op {
            Op::Add { relu } => {
                let b = vals[node.inputs[1]].as_deref().expect("fetched");
                sparse::add(x, b, *relu).map_err(err)?
            }
            Op::HeightCompress { sites: set, .. } => {
                sparse::height_compress(frame_sites(s, &node.name)?, *set, x).map_err(err)?
            }
            Op::Layer(l) => {
                let f = ctx.folded[j].as_ref().expect("layer folded");
                match l.kind {
                    LayerKind::SparseConv3d { rulebook, .. } => {
                        let fs = frame_sites(s, &node.name)?;
                        run_sparse_layer(&fs.rulebooks[rulebook], x, f, l.relu).map_err(err)?
                    }
                    _ => run_layer(l.kind, x, f, l.relu).map_err(err)?,
                }
            }
            Op::PillarMax {
                concat_back,
                include_padding,
            } => {
                let counts: Vec<u32> = if *include_padding {
                    vec![input.max_points as u32; input.counts.len()]
                } else {
                    input.counts.to_vec()
                };
                let (m, arg) = ops::pillar_max::forward(x, &counts).map_err(err)?;
                argmax[j] = Some(arg);
                if *concat_back {
                    concat_pillar_max(x, &m)
                } else {
                    m
                }
            }
            Op::Scatter { .. } => {
                let img = ops::scatter::forward(x, &cells(input.coords), ny, nx).map_err(err)?;
                let sh = img.shape.clone();
                img.reshape(vec![1, sh[0], sh[1], sh[2]]).map_err(err)?
            }
            Op::Concat => {
                let ins: Vec<&Tensor> = node
                    .inputs
                    .iter()
                    .map(|&v| vals[v].as_deref().expect("fetched"))
                    .collect();
                ops::concat::forward(&ins, 1).map_err(err)?
            }
        };
        vals[j + 1] = Some(Cow::Owned(out));
    }
    // The loss on the reached heads.
    let lerr = |source: OpsError| CalibError::Op {
        node: "tgpl".into(),
        source,
    };
    let mut grads: Vec<Option<Tensor>> = vec![None; n + 1];
    let mut total = 0f64;
    let loc = ctx.cfg.loss.loc_weight;
    for (t, heads) in graph.tasks.iter().enumerate() {
        let pos = &s.pos.tasks[t];
        if down.tainted_value[heads.heatmap] {
            let hm = vals[heads.heatmap].as_deref().expect("computed");
            let (l, g) = heatmap_loss(pos, hm).map_err(lerr)?;
            total += l as f64;
            add_into(&mut grads[heads.heatmap], g);
        }
        let mut first = 0;
        for (&v, sub) in heads.regression.iter().zip(&ctx.cfg.head.sub_heads) {
            let c = sub.out;
            if down.tainted_value[v] {
                let r = vals[v].as_deref().expect("computed");
                let (l, mut g) =
                    regression_loss(pos, first, r, &ctx.cfg.loss.code_weights).map_err(lerr)?;
                total += (loc * l) as f64;
                g.data.iter_mut().for_each(|x| *x *= loc);
                add_into(&mut grads[v], g);
            }
            first += c;
        }
    }
    // Back to the unit's output through the nodes that depend on it.
    for &j in down.nodes.iter().rev() {
        if !down.tainted_value[j + 1] {
            continue;
        }
        let Some(gy) = grads[j + 1].take() else {
            continue;
        };
        let node = &graph.nodes[j];
        let err = |source: OpsError| CalibError::Op {
            node: node.name.clone(),
            source,
        };
        let x = vals[node.inputs[0]].as_deref().expect("forward value");
        match &node.op {
            Op::Add { relu } => {
                let g = if *relu {
                    let yv = vals[j + 1].as_deref().expect("forward value");
                    ops::relu::backward(yv, &gy).map_err(err)?
                } else {
                    gy
                };
                for &v in &node.inputs {
                    if down.tainted_value[v] {
                        add_into(&mut grads[v], g.clone());
                    }
                }
            }
            Op::HeightCompress { sites: set, .. } => {
                let fs = frame_sites(s, &node.name)?;
                let gx = sparse::height_compress_backward(fs, *set, x, &gy).map_err(err)?;
                add_into(&mut grads[node.inputs[0]], gx);
            }
            Op::Layer(l) => {
                let yv = vals[j + 1].as_deref().expect("forward value");
                let g = if l.relu {
                    ops::relu::backward(yv, &gy).map_err(err)?
                } else {
                    gy
                };
                let f = ctx.folded[j].as_ref().expect("layer folded");
                let rb = match l.kind {
                    LayerKind::SparseConv3d { rulebook, .. } => {
                        Some(&frame_sites(s, &node.name)?.rulebooks[rulebook])
                    }
                    _ => None,
                };
                let gx = input_grad(l.kind, &f.weight, &g, x, rb).map_err(err)?;
                if down.tainted_value[node.inputs[0]] {
                    add_into(&mut grads[node.inputs[0]], gx);
                }
            }
            Op::PillarMax { concat_back, .. } => {
                let arg = argmax[j].as_ref().expect("pillar max saved");
                let gx = if *concat_back {
                    let c = x.shape[2];
                    let mut parts = ops::concat::backward(&gy, 2, &[c, c]).map_err(err)?;
                    let g_rep = parts.pop().expect("two parts");
                    let mut g_direct = parts.pop().expect("two parts");
                    let gm = ops::repeat_points::backward(&g_rep).map_err(err)?;
                    let via = ops::pillar_max::backward(arg, &gm).map_err(err)?;
                    g_direct
                        .data
                        .iter_mut()
                        .zip(&via.data)
                        .for_each(|(a, b)| *a += b);
                    g_direct
                } else {
                    ops::pillar_max::backward(arg, &gy).map_err(err)?
                };
                add_into(&mut grads[node.inputs[0]], gx);
            }
            Op::Scatter { .. } => {
                let sh = gy.shape.clone();
                let img = gy.reshape(sh[1..].to_vec()).map_err(err)?;
                let gx = ops::scatter::backward(&img, &cells(input.coords)).map_err(err)?;
                add_into(&mut grads[node.inputs[0]], gx);
            }
            Op::Concat => {
                let sizes: Vec<usize> = node
                    .inputs
                    .iter()
                    .map(|&v| vals[v].as_deref().expect("forward").shape[1])
                    .collect();
                let parts = ops::concat::backward(&gy, 1, &sizes).map_err(err)?;
                for (&v, p) in node.inputs.iter().zip(parts) {
                    if down.tainted_value[v] {
                        add_into(&mut grads[v], p);
                    }
                }
            }
        }
    }
    let g = grads[unit + 1]
        .take()
        .unwrap_or_else(|| Tensor::zeros(&vals[unit + 1].as_deref().expect("unit output").shape));
    Ok((total, g))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{rng, uniform};

    fn dot(a: &Tensor, b: &Tensor) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| *x as f64 * *y as f64)
            .sum()
    }

    /// The input gradients used by TGPL are the adjoints of the layers:
    /// <op(x), g> = <x, input_grad(g)> for every kind, odd sizes and strides included.
    #[test]
    fn input_gradients_are_adjoints() {
        let mut r = rng(3);
        let cases = [
            (
                LayerKind::Conv2d {
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                },
                vec![1, 3, 7, 9],
                vec![4, 3, 3, 3],
            ),
            (
                LayerKind::Conv2d {
                    kernel: 3,
                    stride: 2,
                    padding: 1,
                },
                vec![1, 3, 8, 7],
                vec![4, 3, 3, 3],
            ),
            (
                LayerKind::Conv2d {
                    kernel: 2,
                    stride: 2,
                    padding: 0,
                },
                vec![1, 2, 6, 8],
                vec![5, 2, 2, 2],
            ),
            (
                LayerKind::ConvTranspose2d {
                    kernel: 2,
                    stride: 2,
                },
                vec![1, 3, 4, 5],
                vec![3, 2, 2, 2],
            ),
            (LayerKind::Linear, vec![4, 3, 5], vec![6, 5]),
        ];
        for (kind, xs, ws) in cases {
            let x = uniform(&mut r, &xs, 1.0);
            let w = uniform(&mut r, &ws, 1.0);
            let y = super::super::qnet::weighted_op(kind, &x, &w).unwrap();
            let g = uniform(&mut r, &y.shape, 1.0);
            let gx = input_grad(kind, &w, &g, &x, None).unwrap();
            assert_eq!(gx.shape, x.shape, "{kind:?}");
            let (a, b) = (dot(&y, &g), dot(&x, &gx));
            assert!(
                (a - b).abs() < 1e-4 * (1.0 + a.abs()),
                "{kind:?}: {a} vs {b}"
            );
        }
    }

    /// A cropped convolution reproduces the matching window of the full output.
    #[test]
    fn crops_reproduce_the_full_output() {
        let mut r = rng(5);
        let bias = [0.1f32, -0.2, 0.3, 0.0];
        for kind in [
            LayerKind::Conv2d {
                kernel: 3,
                stride: 1,
                padding: 1,
            },
            LayerKind::Conv2d {
                kernel: 3,
                stride: 2,
                padding: 1,
            },
            LayerKind::ConvTranspose2d {
                kernel: 2,
                stride: 2,
            },
        ] {
            let layer = UnitLayer {
                kind,
                relu: true,
                bias: &bias,
            };
            let x = uniform(&mut r, &[1, 3, 10, 12], 1.0);
            let ws = match kind {
                LayerKind::ConvTranspose2d { .. } => vec![3, 4, 2, 2],
                _ => vec![4, 3, 3, 3],
            };
            let w = uniform(&mut r, &ws, 1.0);
            let full = layer.forward(&x, &w, &Crop::Full, None).unwrap();
            let crop = Crop::Window {
                y0: 1,
                x0: 2,
                h: 3,
                w: 4,
            };
            let xc = layer.crop_input(&x, &crop);
            let yc = layer.forward(&xc, &w, &crop, None).unwrap();
            let want = layer.crop_output(&full, &crop);
            assert_eq!(yc.shape, want.shape, "{kind:?}");
            for (a, b) in yc.data.iter().zip(&want.data) {
                assert!((a - b).abs() < 1e-5, "{kind:?}: {a} vs {b}");
            }
        }
        // Pillar rows.
        let layer = UnitLayer {
            kind: LayerKind::Linear,
            relu: false,
            bias: &bias,
        };
        let x = uniform(&mut r, &[6, 2, 3], 1.0);
        let w = uniform(&mut r, &[4, 3], 1.0);
        let full = layer.forward(&x, &w, &Crop::Full, None).unwrap();
        let crop = Crop::Rows(vec![1, 4]);
        let yc = layer
            .forward(&layer.crop_input(&x, &crop), &w, &crop, None)
            .unwrap();
        assert_eq!(yc, layer.crop_output(&full, &crop));
    }
}
