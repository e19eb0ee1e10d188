//! The quantized model: what calibration produces and what the INT8 engine executes. It is
//! the one interface between the two (calibration never runs kernels, the engine never
//! computes statistics).
//!
//! Granularity follows the graph: every value (the input, each node's output) has either
//! activation parameters (the value is held as u8 codes) or none (the value stays f32).
//! Every layer node has integer weights with per-output-channel scales and its folded
//! bias, unless it is kept float. The semantics of executing a quantized layer are those
//! of [`super::scheme`]:
//!
//! - input codes `x_q` with `(s_in, zp_in)`, weight codes `w_q` with `s_w[c]`;
//! - `acc[c] = sum (x_q - zp_in) * w_q` in i32 (padding is `zp_in`, i.e. real 0);
//! - `bias_q[c] = quantize_bias(bias[c], s_in, s_w[c])`;
//! - output value quantized: `Requant::new(s_in, s_w[c], out, relu).apply(acc, bias_q)`;
//! - output value float: [`super::scheme::dequantize_acc`] then ReLU if the layer has one.
//!
//! Glue ops act on codes: pillar max, scatter and height compression need their input and
//! output to share parameters (max is monotonic; empty BEV cells get the zero point, real
//! 0), and a concat's inputs share the concat's parameters (a copy, no requantization).
//! A residual add's two inputs share one parameter set, so their sum is exact in
//! integers; the output has its own parameters and the sum is requantized into them
//! ([`super::scheme::add_requant`]), ReLU in the clamp.
//!
//! A sparse conv runs on the active sites only: its accumulator sums the rulebook's
//! pairs, and a missing neighbour contributes nothing, as zero-point padding does. A kept-float
//! layer dequantizes its input, runs in f32 with the folded weights and quantizes its
//! output when the output value has parameters.

use super::scheme::{Grid, QParams};
use crate::engine::fp32::FoldedLayer;
use crate::model::graph::{Graph, Op};
use serde::{Deserialize, Serialize};

/// Integer weights of one layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerWeights {
    pub bits: u32,
    /// Weight codes in the folded FP32 weight's layout (conv `[Cout, Cin, k, k]`,
    /// transposed conv `[Cin, Cout, k, k]`, linear `[Cout, Cin]`), on `Grid::weight(bits)`.
    pub codes: Vec<i8>,
    pub shape: Vec<usize>,
    /// Per output channel.
    pub scales: Vec<f32>,
    /// Folded bias in reals (quantized at run time with the input scale).
    pub bias: Vec<f32>,
}

/// How one layer node runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum LayerPlan {
    Int(LayerWeights),
    /// Runs in f32 with the folded weights of the FP32 model.
    Float,
}

/// Where a quantized model came from; loading checks it against the FP32 model in use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    /// `Weights::digest()` of the FP32 weights that were calibrated.
    pub fp32_digest: String,
    /// The model config (YAML) the FP32 weights belong to.
    pub config_yaml: String,
    /// Calibration method (`minmax`, `percentile`, `entropy`, `lidar-ptq`, ...).
    pub method: String,
    /// Method parameters and ablation switches, as text.
    pub params: std::collections::BTreeMap<String, String>,
    pub weight_bits: u32,
    pub activation_bits: u32,
    /// Number of calibration frames and a digest of their points.
    pub frames: usize,
    pub frames_digest: String,
    pub seed: u64,
}

/// A calibrated model: per value activation parameters and per node layer plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantModel {
    pub provenance: Provenance,
    /// Indexed by value id (0 = the decorated input, `i + 1` = output of node `i`).
    pub activations: Vec<Option<QParams>>,
    /// Indexed by node; `None` for glue nodes.
    pub layers: Vec<Option<LayerPlan>>,
    /// Per-feature scales of the network input (value 0), or `None` (one scale, as every
    /// other value). The decorated features mix metres over the whole range with
    /// centimetre offsets inside a pillar, which one 8-bit scale cannot hold. When set,
    /// feature `j` is quantized with `QParams { scale: input_scales[j], ..activations[0] }`
    /// (so `activations[0]` must be symmetric: one zero point for every feature, and has
    /// scale 1), and the weight codes of the layers reading value 0 quantize
    /// `W[c, j] * input_scales[j]`: the integer layer then runs unchanged with input scale
    /// 1. A float layer reading value 0 dequantizes feature `j` with its own scale.
    #[serde(default)]
    pub input_scales: Option<Vec<f32>>,
}

/// Per-channel symmetric max-abs weight quantization (the baseline every method starts
/// from; LiDAR-PTQ's grid search and adaptive rounding then change scales and codes).
pub fn quantize_weights_minmax(folded: &FoldedLayer, out_axis: usize, bits: u32) -> LayerWeights {
    let shape = folded.weight.shape.clone();
    let cout = shape[out_axis];
    let inner: usize = shape[out_axis + 1..].iter().product();
    let grid = Grid::weight(bits);
    let channel_of = |i: usize| (i / inner) % cout;
    let mut max_abs = vec![0.0f32; cout];
    for (i, &w) in folded.weight.data.iter().enumerate() {
        let c = channel_of(i);
        max_abs[c] = max_abs[c].max(w.abs());
    }
    let params: Vec<QParams> = max_abs
        .iter()
        .map(|&m| QParams::symmetric(m, grid))
        .collect();
    let codes = folded
        .weight
        .data
        .iter()
        .enumerate()
        .map(|(i, &w)| params[channel_of(i)].quantize(w) as i8)
        .collect();
    LayerWeights {
        bits,
        codes,
        shape,
        scales: params.iter().map(|p| p.scale).collect(),
        bias: folded.bias.clone(),
    }
}

impl QuantModel {
    /// Checks that the model fits `graph`: one entry per value and per node, integer
    /// layers with weights of the right shape and channel count, codes on their grid,
    /// finite positive scales, and the sharing rules of the glue ops.
    pub fn validate(&self, graph: &Graph) -> Result<(), String> {
        if self.activations.len() != graph.nodes.len() + 1 {
            return Err(format!(
                "{} activation entries for a graph of {} values",
                self.activations.len(),
                graph.nodes.len() + 1
            ));
        }
        if self.layers.len() != graph.nodes.len() {
            return Err(format!(
                "{} layer entries for a graph of {} nodes",
                self.layers.len(),
                graph.nodes.len()
            ));
        }
        for (v, a) in self.activations.iter().enumerate() {
            if let Some(p) = a
                && !(p.scale.is_finite()
                    && p.scale > 0.0
                    && p.grid.qmin >= 0
                    && p.grid.qmax <= 255
                    && p.grid.qmin < p.grid.qmax
                    && (p.grid.qmin..=p.grid.qmax).contains(&p.zero_point))
            {
                return Err(format!("value {v}: invalid activation parameters {p:?}"));
            }
        }
        if let Some(scales) = &self.input_scales {
            let Some(p) = self.activations[0] else {
                return Err("per-feature input scales without input parameters".into());
            };
            if p.scale != 1.0 || p.zero_point != p.grid.symmetric_zero_point() {
                return Err(format!(
                    "per-feature input scales need a symmetric input with scale 1, got {p:?}"
                ));
            }
            if scales.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
                return Err("per-feature input scales must be finite and positive".into());
            }
            for n in graph.nodes.iter().filter(|n| n.inputs.contains(&0)) {
                match &n.op {
                    Op::Layer(l) if l.in_channels == scales.len() => {}
                    _ => {
                        return Err(format!(
                            "{}: {} per-feature input scales do not fit this reader of the input",
                            n.name,
                            scales.len()
                        ));
                    }
                }
            }
        }
        for (i, (n, plan)) in graph.nodes.iter().zip(&self.layers).enumerate() {
            let out = self.activations[i + 1];
            let ins: Vec<Option<QParams>> = n.inputs.iter().map(|&v| self.activations[v]).collect();
            match (&n.op, plan) {
                (Op::Layer(l), Some(LayerPlan::Int(w))) => {
                    if w.shape != l.weight_shape() {
                        return Err(format!(
                            "{}: weight shape {:?}, the graph needs {:?}",
                            n.name,
                            w.shape,
                            l.weight_shape()
                        ));
                    }
                    if w.codes.len() != w.shape.iter().product::<usize>()
                        || w.scales.len() != l.out_channels
                        || w.bias.len() != l.out_channels
                    {
                        return Err(format!("{}: weight, scale or bias length mismatch", n.name));
                    }
                    if !matches!(w.bits, 4 | 8) {
                        return Err(format!("{}: {} weight bits", n.name, w.bits));
                    }
                    let g = Grid::weight(w.bits);
                    if w.codes
                        .iter()
                        .any(|&c| (c as i32) < g.qmin || (c as i32) > g.qmax)
                    {
                        return Err(format!("{}: weight code outside {g:?}", n.name));
                    }
                    if w.scales.iter().any(|s| !(s.is_finite() && *s > 0.0))
                        || w.bias.iter().any(|b| !b.is_finite())
                    {
                        return Err(format!("{}: non-finite or non-positive scale/bias", n.name));
                    }
                    if ins[0].is_none() {
                        return Err(format!(
                            "{}: an integer layer needs a quantized input",
                            n.name
                        ));
                    }
                }
                (Op::Layer(_), Some(LayerPlan::Float)) => {}
                (Op::Layer(_), None) => return Err(format!("{}: layer without a plan", n.name)),
                (_, Some(_)) => return Err(format!("{}: glue node with a layer plan", n.name)),
                (Op::PillarMax { .. } | Op::Scatter { .. } | Op::HeightCompress { .. }, None) => {
                    if ins[0] != out {
                        return Err(format!(
                            "{}: input and output must share activation parameters",
                            n.name
                        ));
                    }
                }
                (Op::Concat, None) => {
                    if ins.iter().any(|p| *p != out) {
                        return Err(format!(
                            "{}: every input must share the concat's activation parameters",
                            n.name
                        ));
                    }
                }
                (Op::Add { .. }, None) => {
                    if ins.iter().any(|p| *p != ins[0]) {
                        return Err(format!(
                            "{}: both inputs of an add must share activation parameters",
                            n.name
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}
