//! Simulated-integer execution of a whole graph from a [`QuantModel`]: the fake-quant
//! network whose outputs the INT8 engine must reproduce bit for bit.
//!
//! Semantics are those of [`super::model`] and [`super::scheme`]. A quantized value is
//! held as its *centred* codes `q - zp` in an f32 tensor (integers in [-255, 255]), so the
//! glue ops run unchanged on it: the real zero is 0, pillar max of codes is the code of
//! the max, scatter fills empty cells with 0 (the zero point) and a concat copies.
//!
//! An integer layer computes the exact i32 accumulator `sum (x_q - zp) * w_q` with the f32
//! GEMM of the FP32 ops: every product and every partial sum is an integer, and f32 holds
//! integers exactly up to 2^24. The input channels are split into groups whose worst-case
//! sum `max|x_q - zp| * sum_k |w_q[c, k]|` stays within 2^24 for every output channel, so
//! whatever order the GEMM adds in, each group's result is exact; the groups are then
//! added in wrapping i32, which equals the engine's wrapping sum modulo 2^32. The epilogue
//! is `Requant::apply` (quantized output) or `dequantize_acc` then ReLU (float output).

use super::model::{LayerPlan, LayerWeights, QuantModel};
use super::scheme::{QParams, Requant, add_requant, dequantize_acc, quantize_bias};
use crate::engine::fp32::{
    FoldedLayer, cells, collect_heads, concat_pillar_max, fold_layers, run_sparse_layer,
};
use crate::engine::sparse::{FrameSites, frame_sites};
use crate::engine::{EngineError, HeadOutputs, NetInput};
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::weights::Weights;
use crate::ops::conv_transpose2d::ConvTranspose2dParams;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::{self, OpsError, Tensor};
use crate::sparse::Rulebook;
use std::ops::Range;

/// Errors of the simulated-integer network.
#[derive(Debug, thiserror::Error)]
pub enum QnetError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("quantized model does not fit the graph: {0}")]
    Model(String),
    #[error("layer {node}: {source}")]
    Op { node: String, source: OpsError },
}

fn op_err(node: &str) -> impl Fn(OpsError) -> QnetError + '_ {
    move |source| QnetError::Op {
        node: node.to_owned(),
        source,
    }
}

/// Largest integer up to which every f32 integer is exact.
const EXACT_F32: f64 = (1u64 << 24) as f64;

/// One value of the network.
#[derive(Debug, Clone, PartialEq)]
pub enum QValue {
    /// Centred codes `q - zero_point` (integers stored in f32) and their parameters.
    Quant { centered: Tensor, params: QParams },
    /// A float value.
    Float(Tensor),
}

impl QValue {
    /// Quantizes a float tensor with `params` (half to even, clamped).
    pub fn quantize(x: &Tensor, params: QParams) -> QValue {
        let zp = params.zero_point;
        let data = x
            .data
            .iter()
            .map(|&v| (params.quantize(v) - zp) as f32)
            .collect();
        QValue::Quant {
            centered: Tensor {
                shape: x.shape.clone(),
                data,
            },
            params,
        }
    }

    /// The value in reals (dequantized codes, or the float tensor).
    pub fn to_float(&self) -> Tensor {
        match self {
            QValue::Float(t) => t.clone(),
            QValue::Quant { centered, params } => Tensor {
                shape: centered.shape.clone(),
                data: centered.data.iter().map(|&c| params.scale * c).collect(),
            },
        }
    }

    /// Consumes the value into reals.
    pub fn into_float(self) -> Tensor {
        match self {
            QValue::Float(t) => t,
            q => q.to_float(),
        }
    }

    pub fn shape(&self) -> &[usize] {
        match self {
            QValue::Float(t) => &t.shape,
            QValue::Quant { centered, .. } => &centered.shape,
        }
    }

    /// The u8 codes of a quantized value (`None` for a float value).
    pub fn codes(&self) -> Option<Vec<u8>> {
        match self {
            QValue::Float(_) => None,
            QValue::Quant { centered, params } => Some(
                centered
                    .data
                    .iter()
                    .map(|&c| (c as i32 + params.zero_point) as u8)
                    .collect(),
            ),
        }
    }

    fn params(&self) -> Option<QParams> {
        match self {
            QValue::Float(_) => None,
            QValue::Quant { params, .. } => Some(*params),
        }
    }

    /// Applies a shape-preserving or shape-changing op to the underlying tensor, keeping
    /// the parameters (glue ops on codes).
    fn map(&self, f: impl FnOnce(&Tensor) -> ops::Result<Tensor>) -> ops::Result<QValue> {
        Ok(match self {
            QValue::Float(t) => QValue::Float(f(t)?),
            QValue::Quant { centered, params } => QValue::Quant {
                centered: f(centered)?,
                params: *params,
            },
        })
    }
}

/// The network input (value 0) as the model quantizes it: one scale, or one scale per
/// feature (the last axis) when `input_scales` is set (see `QuantModel::input_scales`).
pub fn quantize_input(x: &Tensor, params: QParams, input_scales: Option<&[f32]>) -> QValue {
    let Some(scales) = input_scales else {
        return QValue::quantize(x, params);
    };
    let f = scales.len().max(1);
    let zp = params.zero_point;
    let data = x
        .data
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let q = QParams {
                scale: scales[i % f],
                ..params
            };
            (q.quantize(v) - zp) as f32
        })
        .collect();
    QValue::Quant {
        centered: Tensor {
            shape: x.shape.clone(),
            data,
        },
        params,
    }
}

/// The network input in reals: [`QValue::to_float`], per feature with `input_scales`.
pub fn input_to_float(x: &QValue, input_scales: Option<&[f32]>) -> Tensor {
    match (x, input_scales) {
        (QValue::Quant { centered, .. }, Some(scales)) => {
            let f = scales.len().max(1);
            Tensor {
                shape: centered.shape.clone(),
                data: centered
                    .data
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| scales[i % f] * c)
                    .collect(),
            }
        }
        _ => x.to_float(),
    }
}

/// Input channels of one exact-GEMM group and the weight codes restricted to them.
#[derive(Debug, Clone)]
struct WeightGroup {
    channels: Range<usize>,
    /// Weight codes (integers in f32) of these input channels, in the layer's layout.
    weight: Tensor,
}

/// Precomputed integer layer.
#[derive(Debug, Clone)]
struct IntLayer {
    input: QParams,
    output: Option<QParams>,
    groups: Vec<WeightGroup>,
    in_channels: usize,
    bias_q: Vec<i32>,
    requant: Vec<Requant>,
    weight_scales: Vec<f32>,
}

/// Input-channel axis of a weight in the layer's layout.
pub fn weight_in_axis(kind: LayerKind) -> usize {
    match kind {
        LayerKind::Linear | LayerKind::Conv2d { .. } => 1,
        LayerKind::ConvTranspose2d { .. } => 0,
        LayerKind::SparseConv3d { .. } => 4,
    }
}

/// Output-channel axis of a weight in the layer's layout.
pub fn weight_out_axis(kind: LayerKind) -> usize {
    match kind {
        LayerKind::ConvTranspose2d { .. } => 1,
        _ => 0,
    }
}

/// Splits the input channels into groups whose exact-sum bound stays within 2^24.
fn weight_groups(kind: LayerKind, w: &LayerWeights, max_dev: i32) -> Vec<WeightGroup> {
    let shape = &w.shape;
    let in_axis = weight_in_axis(kind);
    let out_axis = weight_out_axis(kind);
    let cin = shape[in_axis];
    let cout = shape[out_axis];
    let taps: usize = shape.iter().product::<usize>() / (cin * cout).max(1);
    // |w| summed over taps, per (input channel, output channel).
    let abs_sum = |ci: usize, co: usize| -> f64 {
        let code = |t: usize| -> i8 {
            match kind {
                LayerKind::ConvTranspose2d { .. } => w.codes[(ci * cout + co) * taps + t],
                // [Cout, kz, ky, kx, Cin]: the input channel is the innermost axis.
                LayerKind::SparseConv3d { .. } => w.codes[(co * taps + t) * cin + ci],
                _ => w.codes[(co * cin + ci) * taps + t],
            }
        };
        (0..taps)
            .map(|t| (code(t) as i32).unsigned_abs() as f64)
            .sum()
    };
    let dev = max_dev.max(1) as f64;
    let mut ranges = Vec::new();
    let mut start = 0;
    let mut partial = vec![0f64; cout];
    for ci in 0..cin {
        let add: Vec<f64> = (0..cout).map(|co| abs_sum(ci, co)).collect();
        let over = partial
            .iter()
            .zip(&add)
            .any(|(p, a)| (p + a) * dev > EXACT_F32);
        if over && ci > start {
            ranges.push(start..ci);
            start = ci;
            partial.iter_mut().for_each(|p| *p = 0.0);
        }
        partial.iter_mut().zip(&add).for_each(|(p, a)| *p += a);
    }
    ranges.push(start..cin);
    ranges
        .into_iter()
        .map(|r| {
            let mut gshape = shape.clone();
            gshape[in_axis] = r.len();
            let outer: usize = shape[..in_axis].iter().product();
            let inner: usize = shape[in_axis + 1..].iter().product();
            let mut data = Vec::with_capacity(gshape.iter().product());
            for o in 0..outer {
                let base = o * cin * inner;
                data.extend(
                    w.codes[base + r.start * inner..base + r.end * inner]
                        .iter()
                        .map(|&c| c as f32),
                );
            }
            WeightGroup {
                channels: r,
                weight: Tensor {
                    shape: gshape,
                    data,
                },
            }
        })
        .collect()
}

/// Input channels `r` of `x` (channel axis 1 for images, the last axis for point rows).
fn slice_channels(x: &Tensor, kind: LayerKind, r: &Range<usize>) -> Tensor {
    match kind {
        LayerKind::Linear | LayerKind::SparseConv3d { .. } => {
            let c = *x.shape.last().expect("rank >= 1");
            let mut shape = x.shape.clone();
            *shape.last_mut().expect("rank >= 1") = r.len();
            let data = x
                .data
                .chunks_exact(c.max(1))
                .flat_map(|row| row[r.clone()].iter().copied())
                .collect();
            Tensor { shape, data }
        }
        _ => {
            let (n, c) = (x.shape[0], x.shape[1]);
            let plane: usize = x.shape[2..].iter().product();
            let mut shape = x.shape.clone();
            shape[1] = r.len();
            let mut data = Vec::with_capacity(n * r.len() * plane);
            for b in 0..n {
                let base = b * c * plane;
                data.extend_from_slice(&x.data[base + r.start * plane..base + r.end * plane]);
            }
            Tensor { shape, data }
        }
    }
}

/// The weighted op alone (no bias, no ReLU) in f32.
pub fn weighted_op(kind: LayerKind, x: &Tensor, w: &Tensor) -> ops::Result<Tensor> {
    match kind {
        LayerKind::Linear => ops::linear::forward(x, w, None),
        LayerKind::Conv2d {
            stride, padding, ..
        } => ops::conv2d::forward(x, w, None, Conv2dParams::new(stride, padding)),
        LayerKind::ConvTranspose2d { stride, .. } => {
            ops::conv_transpose2d::forward(x, w, None, ConvTranspose2dParams::new(stride, 0))
        }
        LayerKind::SparseConv3d { .. } => Err(sparse_needs_rulebook()),
    }
}

/// A sparse conv runs with its frame's rulebook, which these graph-free helpers lack.
pub(crate) fn sparse_needs_rulebook() -> ops::OpsError {
    ops::OpsError::Invalid {
        op: "sparse_conv",
        arg: "rulebook",
        detail: "a sparse conv runs with its frame's rulebook, which this caller lacks".into(),
    }
}

impl IntLayer {
    fn new(
        kind: LayerKind,
        relu: bool,
        w: &LayerWeights,
        input: QParams,
        output: Option<QParams>,
    ) -> Self {
        let max_dev = (input.grid.qmax - input.zero_point).max(input.zero_point - input.grid.qmin);
        let groups = weight_groups(kind, w, max_dev);
        let bias_q: Vec<i32> = w
            .bias
            .iter()
            .zip(&w.scales)
            .map(|(&b, &s)| quantize_bias(b, input.scale, s))
            .collect();
        let requant = match &output {
            Some(out) => w
                .scales
                .iter()
                .map(|&s| Requant::new(input.scale, s, out, relu))
                .collect(),
            None => Vec::new(),
        };
        IntLayer {
            input,
            output,
            groups,
            in_channels: w.shape[weight_in_axis(kind)],
            bias_q,
            requant,
            weight_scales: w.scales.clone(),
        }
    }

    /// Exact accumulators of the layer on centred input codes, and the output shape. A
    /// sparse conv runs with its frame's rulebook `rb`.
    fn accumulate(
        &self,
        kind: LayerKind,
        x: &Tensor,
        rb: Option<&Rulebook>,
    ) -> ops::Result<(Vec<i32>, Vec<usize>)> {
        let op = |x: &Tensor, w: &Tensor| match (kind, rb) {
            (LayerKind::SparseConv3d { .. }, Some(rb)) => ops::sparse_conv::forward(x, rb, w, None),
            _ => weighted_op(kind, x, w),
        };
        let mut acc: Option<(Vec<i32>, Vec<usize>)> = None;
        for g in &self.groups {
            let y = if g.channels.len() == self.in_channels {
                op(x, &g.weight)?
            } else {
                op(&slice_channels(x, kind, &g.channels), &g.weight)?
            };
            match &mut acc {
                None => {
                    let a = y.data.iter().map(|&v| v as i32).collect();
                    acc = Some((a, y.shape));
                }
                Some((a, _)) => a
                    .iter_mut()
                    .zip(&y.data)
                    .for_each(|(s, &v)| *s = s.wrapping_add(v as i32)),
            }
        }
        Ok(acc.expect("a layer has at least one input channel group"))
    }

    fn run(
        &self,
        kind: LayerKind,
        relu: bool,
        x: &Tensor,
        rb: Option<&Rulebook>,
    ) -> ops::Result<QValue> {
        let (acc, shape) = self.accumulate(kind, x, rb)?;
        let cout = self.bias_q.len();
        // Output channel of flat index i: channels-last for linear and sparse rows, NCHW
        // otherwise.
        let inner: usize = match kind {
            LayerKind::Linear | LayerKind::SparseConv3d { .. } => 1,
            _ => shape[2..].iter().product(),
        };
        let channel = |i: usize| (i / inner) % cout;
        Ok(match &self.output {
            Some(out) => {
                let zp = out.zero_point;
                let data = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        let c = channel(i);
                        (self.requant[c].apply(a, self.bias_q[c]) - zp) as f32
                    })
                    .collect();
                QValue::Quant {
                    centered: Tensor { shape, data },
                    params: *out,
                }
            }
            None => {
                let data = acc
                    .iter()
                    .enumerate()
                    .map(|(i, &a)| {
                        let c = channel(i);
                        let v = dequantize_acc(
                            a,
                            self.bias_q[c],
                            self.input.scale,
                            self.weight_scales[c],
                        );
                        if relu { v.max(0.0) } else { v }
                    })
                    .collect();
                QValue::Float(Tensor { shape, data })
            }
        })
    }
}

/// How one node runs.
#[derive(Debug, Clone)]
enum Plan {
    Int(Box<IntLayer>),
    Float(FoldedLayer),
    Glue,
}

/// The simulated-integer network of a [`QuantModel`].
pub struct QuantNet {
    graph: Graph,
    model: QuantModel,
    plans: Vec<Plan>,
    last_use: Vec<usize>,
}

impl QuantNet {
    /// Folds the FP32 weights and prepares every layer of `model`.
    pub fn new(graph: &Graph, weights: &Weights, model: &QuantModel) -> Result<Self, QnetError> {
        let folded = fold_layers(graph, weights)?;
        Self::from_folded(graph, &folded, model)
    }

    /// As [`QuantNet::new`] with already folded layers (`fold_layers`).
    pub fn from_folded(
        graph: &Graph,
        folded: &[Option<FoldedLayer>],
        model: &QuantModel,
    ) -> Result<Self, QnetError> {
        model.validate(graph).map_err(QnetError::Model)?;
        if folded.len() != graph.nodes.len() {
            return Err(QnetError::Model(format!(
                "{} folded layers for {} nodes",
                folded.len(),
                graph.nodes.len()
            )));
        }
        let mut plans = Vec::with_capacity(graph.nodes.len());
        for (i, n) in graph.nodes.iter().enumerate() {
            let plan =
                match (&n.op, &model.layers[i]) {
                    (Op::Layer(l), Some(LayerPlan::Int(w))) => {
                        let input = model.activations[n.inputs[0]]
                            .expect("validated: an integer layer has a quantized input");
                        Plan::Int(Box::new(IntLayer::new(
                            l.kind,
                            l.relu,
                            w,
                            input,
                            model.activations[i + 1],
                        )))
                    }
                    (Op::Layer(_), _) => Plan::Float(folded[i].clone().ok_or_else(|| {
                        QnetError::Model(format!("{}: no folded weights", n.name))
                    })?),
                    _ => Plan::Glue,
                };
            plans.push(plan);
        }
        let mut last_use = vec![0; graph.nodes.len() + 1];
        for (i, n) in graph.nodes.iter().enumerate() {
            for &v in &n.inputs {
                last_use[v] = i;
            }
        }
        for t in &graph.tasks {
            for &v in std::iter::once(&t.heatmap).chain(&t.regression) {
                last_use[v] = usize::MAX;
            }
        }
        Ok(Self {
            graph: graph.clone(),
            model: model.clone(),
            plans,
            last_use,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn model(&self) -> &QuantModel {
        &self.model
    }

    /// Value 0: the decorated pillars `[P, N, F]` (or a voxel model's voxel rows
    /// `[V, F]`), quantized when the model says so.
    pub fn input_value(&self, input: &NetInput<'_>) -> Result<QValue, QnetError> {
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let shape = if self.graph.sparse.is_some() {
            vec![p, n * f]
        } else {
            vec![p, n, f]
        };
        let x = Tensor::new(shape, input.decorated.to_vec()).map_err(op_err("input"))?;
        Ok(match self.model.activations[0] {
            Some(q) => quantize_input(&x, q, self.model.input_scales.as_deref()),
            None => QValue::Float(x),
        })
    }

    /// The frame's sparse geometry (rulebooks), for a voxel model; `None` for pillars.
    pub fn frame_sites(&self, input: &NetInput<'_>) -> Result<Option<FrameSites>, QnetError> {
        Ok(frame_sites(&self.graph, input.coords)?)
    }

    /// Runs node `i` on already computed values (`values[v]` for each of its inputs);
    /// `sites` is the frame's [`frame_sites`](Self::frame_sites).
    pub fn run_node(
        &self,
        i: usize,
        values: &[Option<QValue>],
        input: &NetInput<'_>,
        sites: Option<&FrameSites>,
    ) -> Result<QValue, QnetError> {
        let node = &self.graph.nodes[i];
        let no_sites = || QnetError::Engine(crate::engine::sparse::no_sites(&node.name));
        let rulebook = |kind: LayerKind| -> Result<Option<&Rulebook>, QnetError> {
            match kind {
                LayerKind::SparseConv3d { rulebook, .. } => {
                    Ok(Some(&sites.ok_or_else(no_sites)?.rulebooks[rulebook]))
                }
                _ => Ok(None),
            }
        };
        let err = op_err(&node.name);
        let arg = |k: usize| -> Result<&QValue, QnetError> {
            values[node.inputs[k]].as_ref().ok_or_else(|| {
                QnetError::Engine(EngineError::Internal(format!(
                    "{} reads value {} which is not computed",
                    node.name, node.inputs[k]
                )))
            })
        };
        let out = match (&node.op, &self.plans[i]) {
            (Op::Layer(l), Plan::Int(layer)) => {
                let x = match arg(0)? {
                    QValue::Quant { centered, params } if *params == layer.input => centered,
                    other => {
                        return Err(QnetError::Model(format!(
                            "{}: input has parameters {:?}, the layer expects {:?}",
                            node.name,
                            other.params(),
                            layer.input
                        )));
                    }
                };
                layer
                    .run(l.kind, l.relu, x, rulebook(l.kind)?)
                    .map_err(&err)?
            }
            (Op::Layer(l), Plan::Float(f)) => {
                let scales = if node.inputs[0] == 0 {
                    self.model.input_scales.as_deref()
                } else {
                    None
                };
                let rb = rulebook(l.kind)?;
                let run = |x: &Tensor| match rb {
                    Some(rb) => run_sparse_layer(rb, x, f, l.relu),
                    None => crate::engine::fp32::run_layer(l.kind, x, f, l.relu),
                };
                let y = match arg(0)? {
                    QValue::Float(x) => run(x),
                    q => run(&input_to_float(q, scales)),
                }
                .map_err(&err)?;
                match self.model.activations[i + 1] {
                    Some(q) => QValue::quantize(&y, q),
                    None => QValue::Float(y),
                }
            }
            (
                Op::PillarMax {
                    concat_back,
                    include_padding,
                },
                _,
            ) => {
                let (p, n) = (input.counts.len(), input.max_points);
                let counts: Vec<u32> = if *include_padding {
                    vec![n as u32; p]
                } else {
                    input.counts.to_vec()
                };
                arg(0)?
                    .map(|x| {
                        let (m, _) = ops::pillar_max::forward(x, &counts)?;
                        Ok(if *concat_back {
                            concat_pillar_max(x, &m)
                        } else {
                            m
                        })
                    })
                    .map_err(&err)?
            }
            (Op::Scatter { .. }, _) => {
                let (ny, nx) = self.graph.bev;
                let cells = cells(input.coords);
                arg(0)?
                    .map(|x| {
                        let img = ops::scatter::forward(x, &cells, ny, nx)?;
                        let s = img.shape.clone();
                        img.reshape(vec![1, s[0], s[1], s[2]])
                    })
                    .map_err(&err)?
            }
            (Op::Add { relu }, _) => match (arg(0)?, arg(1)?) {
                (
                    QValue::Quant {
                        centered: a,
                        params: pa,
                    },
                    QValue::Quant {
                        centered: b,
                        params: pb,
                    },
                ) if pa == pb && self.model.activations[i + 1].is_some() => {
                    let out = self.model.activations[i + 1].expect("checked");
                    let r = add_requant(pa.scale, &out, *relu);
                    if a.shape != b.shape {
                        return Err(err(OpsError::Shape {
                            op: "add",
                            arg: "rhs",
                            got: b.shape.clone(),
                            expected: format!("{:?} (the lhs shape)", a.shape),
                        }));
                    }
                    let data = a
                        .data
                        .iter()
                        .zip(&b.data)
                        .map(|(&x, &y)| (r.apply(x as i32 + y as i32, 0) - out.zero_point) as f32)
                        .collect();
                    QValue::Quant {
                        centered: Tensor {
                            shape: a.shape.clone(),
                            data,
                        },
                        params: out,
                    }
                }
                // Mixed or float inputs (a partially quantized network during the
                // reconstruction): add in reals, quantize when the output has parameters.
                (a, b) => {
                    let y = crate::engine::sparse::add(&a.to_float(), &b.to_float(), *relu)
                        .map_err(&err)?;
                    match self.model.activations[i + 1] {
                        Some(q) => QValue::quantize(&y, q),
                        None => QValue::Float(y),
                    }
                }
            },
            (Op::HeightCompress { sites: set, .. }, _) => {
                let fs = sites.ok_or_else(no_sites)?;
                arg(0)?
                    .map(|x| crate::engine::sparse::height_compress(fs, *set, x))
                    .map_err(&err)?
            }
            (Op::Concat, _) => {
                let ins: Vec<&QValue> =
                    (0..node.inputs.len()).map(arg).collect::<Result<_, _>>()?;
                let params = ins[0].params();
                if ins.iter().any(|v| v.params() != params) {
                    return Err(QnetError::Model(format!(
                        "{}: inputs with different parameters",
                        node.name
                    )));
                }
                let tensors: Vec<&Tensor> = ins
                    .iter()
                    .map(|v| match v {
                        QValue::Float(t) => t,
                        QValue::Quant { centered, .. } => centered,
                    })
                    .collect();
                let t = ops::concat::forward(&tensors, 1).map_err(&err)?;
                match params {
                    Some(params) => QValue::Quant {
                        centered: t,
                        params,
                    },
                    None => QValue::Float(t),
                }
            }
            (Op::Layer(_), Plan::Glue) => {
                return Err(QnetError::Model(format!(
                    "{}: layer without a plan",
                    node.name
                )));
            }
        };
        Ok(out)
    }

    /// Runs the network on one frame; every value in between as the model prescribes.
    pub fn run(&self, input: &NetInput<'_>) -> Result<HeadOutputs, QnetError> {
        let n = self.graph.nodes.len();
        let sites = self.frame_sites(input)?;
        let mut values: Vec<Option<QValue>> = vec![None; n + 1];
        values[0] = Some(self.input_value(input)?);
        for i in 0..n {
            let out = self.run_node(i, &values, input, sites.as_ref())?;
            values[i + 1] = Some(out);
            for &v in &self.graph.nodes[i].inputs {
                if self.last_use[v] == i {
                    values[v] = None;
                }
            }
        }
        let mut floats: Vec<Option<Tensor>> = values
            .into_iter()
            .map(|v| v.map(QValue::into_float))
            .collect();
        Ok(collect_heads(&self.graph, &mut floats)?)
    }
}

/// A model that quantizes nothing: every value float, every layer float. Running it is
/// the FP32 network.
pub fn float_model(graph: &Graph, provenance: super::model::Provenance) -> QuantModel {
    QuantModel {
        provenance,
        activations: vec![None; graph.nodes.len() + 1],
        layers: graph
            .nodes
            .iter()
            .map(|n| matches!(n.op, Op::Layer(_)).then_some(LayerPlan::Float))
            .collect(),
        input_scales: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::scheme::{Flavour, Grid};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Naive wrapping-i32 accumulators of a conv2d / transposed conv / linear on codes.
    fn naive_acc(kind: LayerKind, x: &[i32], xs: &[usize], w: &LayerWeights, zp: i32) -> Vec<i32> {
        let wq = |i: usize| w.codes[i] as i32;
        match kind {
            k @ LayerKind::SparseConv3d { .. } => panic!("{k:?} in a pillar model"),
            LayerKind::Linear => {
                let (cout, cin) = (w.shape[0], w.shape[1]);
                let rows = x.len() / cin;
                let mut out = vec![0i32; rows * cout];
                for r in 0..rows {
                    for co in 0..cout {
                        let mut a = 0i32;
                        for ci in 0..cin {
                            a = a.wrapping_add(
                                (x[r * cin + ci] - zp).wrapping_mul(wq(co * cin + ci)),
                            );
                        }
                        out[r * cout + co] = a;
                    }
                }
                out
            }
            LayerKind::Conv2d {
                kernel: k,
                stride: s,
                padding: p,
            } => {
                let (cout, cin) = (w.shape[0], w.shape[1]);
                let (h, wd) = (xs[2], xs[3]);
                let (ho, wo) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
                let mut out = vec![0i32; cout * ho * wo];
                for co in 0..cout {
                    for oy in 0..ho {
                        for ox in 0..wo {
                            let mut a = 0i32;
                            for ci in 0..cin {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let iy = (oy * s + ky) as isize - p as isize;
                                        let ix = (ox * s + kx) as isize - p as isize;
                                        let v = if iy < 0
                                            || ix < 0
                                            || iy >= h as isize
                                            || ix >= wd as isize
                                        {
                                            zp
                                        } else {
                                            x[(ci * h + iy as usize) * wd + ix as usize]
                                        };
                                        a = a.wrapping_add((v - zp).wrapping_mul(wq(((co * cin
                                            + ci)
                                            * k
                                            + ky)
                                            * k
                                            + kx)));
                                    }
                                }
                            }
                            out[(co * ho + oy) * wo + ox] = a;
                        }
                    }
                }
                out
            }
            LayerKind::ConvTranspose2d {
                kernel: k,
                stride: s,
            } => {
                let (cin, cout) = (w.shape[0], w.shape[1]);
                let (h, wd) = (xs[2], xs[3]);
                let (ho, wo) = ((h - 1) * s + k, (wd - 1) * s + k);
                let mut out = vec![0i32; cout * ho * wo];
                for ci in 0..cin {
                    for iy in 0..h {
                        for ix in 0..wd {
                            let d = x[(ci * h + iy) * wd + ix] - zp;
                            for co in 0..cout {
                                for ky in 0..k {
                                    for kx in 0..k {
                                        let o = (co * ho + iy * s + ky) * wo + ix * s + kx;
                                        out[o] = out[o].wrapping_add(d.wrapping_mul(wq(((ci
                                            * cout
                                            + co)
                                            * k
                                            + ky)
                                            * k
                                            + kx)));
                                    }
                                }
                            }
                        }
                    }
                }
                out
            }
        }
    }

    /// Accumulators too large for one exact f32 GEMM are split into input-channel groups
    /// and still equal the naive wrapping integer sums, for every layer kind.
    #[test]
    fn large_accumulators_stay_exact() {
        let mut r = ChaCha8Rng::seed_from_u64(1);
        let input = QParams::asymmetric(-0.1, 25.4, Grid::activation(8, Flavour::Asymmetric));
        let cases = [
            (
                LayerKind::Conv2d {
                    kernel: 3,
                    stride: 1,
                    padding: 1,
                },
                vec![1, 96, 5, 6],
                vec![3, 96, 3, 3],
            ),
            (
                LayerKind::Conv2d {
                    kernel: 3,
                    stride: 2,
                    padding: 1,
                },
                vec![1, 80, 6, 5],
                vec![2, 80, 3, 3],
            ),
            (
                LayerKind::ConvTranspose2d {
                    kernel: 2,
                    stride: 2,
                },
                vec![1, 700, 2, 3],
                vec![700, 2, 2, 2],
            ),
            (LayerKind::Linear, vec![3, 2, 1200], vec![4, 1200]),
        ];
        for (kind, xs, ws) in cases {
            // Saturated codes: the worst case the bound has to handle.
            let codes: Vec<i8> = (0..ws.iter().product::<usize>())
                .map(|_| {
                    if r.random_range(0..4) == 0 {
                        r.random_range(-127..=127)
                    } else {
                        127
                    }
                })
                .collect();
            let cout = ws[weight_out_axis(kind)];
            let w = LayerWeights {
                bits: 8,
                codes,
                shape: ws.clone(),
                scales: vec![1e-3; cout],
                bias: vec![0.0; cout],
            };
            let layer = IntLayer::new(kind, false, &w, input, None);
            assert!(
                layer.groups.len() >= 2,
                "{kind:?}: {} groups",
                layer.groups.len()
            );
            let x: Vec<i32> = (0..xs.iter().product::<usize>())
                .map(|_| {
                    if r.random_range(0..3) == 0 {
                        r.random_range(0..=255)
                    } else {
                        255
                    }
                })
                .collect();
            let centered = Tensor::new(
                xs.clone(),
                x.iter().map(|&q| (q - input.zero_point) as f32).collect(),
            )
            .unwrap();
            let (got, _) = layer.accumulate(kind, &centered, None).unwrap();
            let want = naive_acc(kind, &x, &xs, &w, input.zero_point);
            assert_eq!(got, want, "{kind:?}");
        }
    }
}
