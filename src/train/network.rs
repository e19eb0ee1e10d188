//! The network in training mode: forward with BatchNorm on batch statistics, the loss of
//! every head task, and the backward pass to a gradient for every trainable parameter.
//!
//! Batching: the pillars of all frames are concatenated along P for the pillar feature
//! net (so its BN1d statistics cover every point slot of the batch, as the reference's
//! batched pillar list does) and each frame is scattered into its own image of a
//! `[B, C, ny, nx]` stack for the 2D part (BN2d statistics over B and the map).

use super::TrainError;
use super::batch::Batch;
use crate::engine::fp32::cells;
use crate::engine::sparse::FrameSites;
use crate::engine::{HeadOutputs, TaskMaps};
use crate::model::ModelConfig;
use crate::model::graph::{Graph, Layer, LayerKind, Op};
use crate::model::weights::Weights;
use crate::ops::batchnorm::{self, BatchNorm, Layout, TrainCache};
use crate::ops::conv_transpose2d::ConvTranspose2dParams;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::pillar_max::ArgMax;
use crate::ops::{self, Tensor};
use crate::sparse::SparseTensor;
use std::collections::BTreeMap;

/// BatchNorm momentum of CenterPoint's reference training (PyTorch's default is 0.1).
pub const BN_MOMENTUM: f32 = 0.01;

/// Whether BatchNorm uses the batch statistics (and updates the running ones) or the
/// running statistics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// The loss of one batch and the gradient of every trainable parameter.
#[derive(Debug, Clone)]
pub struct StepResult {
    /// `sum_tasks hm + loc_weight * reg`.
    pub loss: f32,
    /// Sum over tasks of the heatmap focal loss.
    pub hm_loss: f32,
    /// Sum over tasks of the (unweighted) regression loss.
    pub reg_loss: f32,
    /// Gradients by parameter name (weights, biases, BN gamma/beta).
    pub grads: BTreeMap<String, Tensor>,
    /// New BN running statistics by name (`<bn>.running_mean|running_var`).
    pub running: BTreeMap<String, Tensor>,
}

/// What a layer's backward needs beyond its input and output values.
enum Saved {
    None,
    /// Weighted op output before BN is not needed: the BN cache holds the normalised values.
    Layer {
        bn: Option<TrainCache>,
    },
    PillarMax(ArgMax),
}

/// The values and caches of one forward pass.
struct Forward {
    values: Vec<Option<Tensor>>,
    saved: Vec<Saved>,
    running: BTreeMap<String, Tensor>,
    sparse: Option<SparseBatch>,
}

/// The sparse geometry of a batch of voxel frames: each frame's rulebooks, and where each
/// frame's rows start in every site set (frames are concatenated along the rows).
struct SparseBatch {
    frames: Vec<FrameSites>,
    /// `starts[set][f]`, with the total at `starts[set][frames]`.
    starts: Vec<Vec<usize>>,
}

impl SparseBatch {
    fn build(graph: &Graph, batch: &Batch) -> Result<Option<Self>, TrainError> {
        let Some(sp) = &graph.sparse else {
            return Ok(None);
        };
        let frames = (0..batch.frames())
            .map(|f| {
                FrameSites::build(sp, &batch.coords[batch.pillar_range(f)])
                    .map_err(|e| TrainError::Model(format!("frame {f}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let starts = (0..sp.grids.len())
            .map(|s| {
                let mut v = vec![0];
                for fs in &frames {
                    v.push(v.last().copied().unwrap_or(0) + fs.sites(s).len());
                }
                v
            })
            .collect();
        Ok(Some(Self { frames, starts }))
    }

    /// Rows of frame `f` in site set `set`, as a tensor `[n, c]` copied out of `x`.
    fn rows(&self, x: &Tensor, set: usize, f: usize) -> ops::Result<Tensor> {
        let (a, b) = (self.starts[set][f], self.starts[set][f + 1]);
        let c = x.shape.last().copied().unwrap_or(0);
        Tensor::new(vec![b - a, c], x.data[a * c..b * c].to_vec())
    }

    /// Frame `f`'s features on site set `set` as a sparse tensor.
    fn sparse_tensor(&self, x: &Tensor, set: usize, f: usize) -> ops::Result<SparseTensor> {
        Ok(SparseTensor {
            coords: self.frames[f].sites(set).to_vec(),
            features: self.rows(x, set, f)?,
            shape: self.frames[f].grid(set),
        })
    }
}

/// The graph interpreter for training.
pub struct Network {
    cfg: ModelConfig,
    graph: Graph,
}

fn op_err(node: &str) -> impl Fn(ops::OpsError) -> TrainError + '_ {
    move |source| TrainError::Op {
        node: node.to_owned(),
        source,
    }
}

fn bn_of(weights: &Weights, prefix: &str, eps: f32) -> Result<BatchNorm, TrainError> {
    let get = |s: &str| -> Result<Vec<f32>, TrainError> {
        Ok(weights.get(&format!("{prefix}.{s}"))?.data.clone())
    };
    Ok(BatchNorm {
        gamma: get("weight")?,
        beta: get("bias")?,
        running_mean: get("running_mean")?,
        running_var: get("running_var")?,
        eps,
        momentum: BN_MOMENTUM,
    })
}

fn layout(kind: LayerKind) -> Layout {
    match kind {
        LayerKind::Linear | LayerKind::SparseConv3d { .. } => Layout::ChannelsLast,
        _ => Layout::ChannelsFirst,
    }
}

fn add_into(slot: &mut Option<Tensor>, g: Tensor) {
    match slot {
        Some(acc) => acc.data.iter_mut().zip(&g.data).for_each(|(a, b)| *a += b),
        None => *slot = Some(g),
    }
}

impl Network {
    pub fn new(cfg: &ModelConfig) -> Result<Self, TrainError> {
        let graph = Graph::build(cfg).map_err(TrainError::Model)?;
        let d = cfg.regression_channels();
        if cfg.loss.code_weights.len() != d {
            return Err(TrainError::Model(format!(
                "loss.code_weights has {} values, the head regresses {d} channels",
                cfg.loss.code_weights.len()
            )));
        }
        Ok(Self {
            cfg: cfg.clone(),
            graph,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn weighted(l: &Layer, w: &Weights, x: &Tensor) -> Result<Tensor, TrainError> {
        let wt = w.get(&format!("{}.weight", l.param))?;
        let b = if l.bias {
            Some(&w.get(&format!("{}.bias", l.param))?.data)
        } else {
            None
        };
        let b = b.map(|v| v.as_slice());
        let y = match l.kind {
            LayerKind::Linear => ops::linear::forward(x, wt, b),
            LayerKind::Conv2d {
                stride, padding, ..
            } => ops::conv2d::forward(x, wt, b, Conv2dParams::new(stride, padding)),
            LayerKind::ConvTranspose2d { stride, .. } => {
                ops::conv_transpose2d::forward(x, wt, b, ConvTranspose2dParams::new(stride, 0))
            }
            LayerKind::SparseConv3d { .. } => Err(crate::quant::qnet::sparse_needs_rulebook()),
        };
        y.map_err(op_err(&l.param))
    }

    /// A sparse conv over every frame of the batch: `[sum N_in, Cin] -> [sum N_out, Cout]`.
    fn sparse_weighted(
        l: &Layer,
        rulebook: usize,
        graph: &Graph,
        sb: &SparseBatch,
        w: &Weights,
        x: &Tensor,
    ) -> Result<Tensor, TrainError> {
        let err = op_err(&l.param);
        let spec = &graph.sparse.as_ref().expect("sparse graph").rulebooks[rulebook];
        let wt = w.get(&format!("{}.weight", l.param))?;
        let b = if l.bias {
            Some(w.get(&format!("{}.bias", l.param))?.data.as_slice())
        } else {
            None
        };
        let c = l.out_channels;
        let mut y = Tensor::zeros(&[sb.starts[spec.output][sb.frames.len()], c]);
        for (f, fs) in sb.frames.iter().enumerate() {
            let xf = sb.rows(x, spec.input, f).map_err(&err)?;
            let yf =
                ops::sparse_conv::forward(&xf, &fs.rulebooks[rulebook], wt, b).map_err(&err)?;
            let a = sb.starts[spec.output][f];
            y.data[a * c..a * c + yf.len()].copy_from_slice(&yf.data);
        }
        Ok(y)
    }

    fn forward(&self, w: &Weights, batch: &Batch, mode: Mode) -> Result<Forward, TrainError> {
        w.validate(&self.graph)?;
        let (ny, nx) = self.graph.bev;
        let n_slots = batch.max_points;
        let sparse = SparseBatch::build(&self.graph, batch)?;
        let mut values: Vec<Option<Tensor>> = vec![None; self.graph.nodes.len() + 1];
        let mut x0 = batch.input_tensor().map_err(op_err("input"))?;
        if sparse.is_some() {
            // One feature row per voxel.
            x0 = x0
                .reshape(vec![batch.counts.len(), batch.max_points * batch.width])
                .map_err(op_err("input"))?;
        }
        values[0] = Some(x0);
        let mut saved = Vec::with_capacity(self.graph.nodes.len());
        let mut running = BTreeMap::new();
        for (i, node) in self.graph.nodes.iter().enumerate() {
            let x = values[node.inputs[0]].as_ref().expect("topological order");
            let err = op_err(&node.name);
            let (out, s) = match &node.op {
                Op::Layer(l) => {
                    let mut y = match (l.kind, &sparse) {
                        (LayerKind::SparseConv3d { rulebook, .. }, Some(sb)) => {
                            Self::sparse_weighted(l, rulebook, &self.graph, sb, w, x)?
                        }
                        _ => Self::weighted(l, w, x)?,
                    };
                    let mut cache = None;
                    if let Some((prefix, eps)) = &l.bn {
                        let bn = bn_of(w, prefix, *eps)?;
                        y = match mode {
                            Mode::Train => {
                                let (y, c, upd) = batchnorm::forward_train(&bn, &y, layout(l.kind))
                                    .map_err(&err)?;
                                let c_len = upd.running_mean.len();
                                running.insert(
                                    format!("{prefix}.running_mean"),
                                    Tensor::new(vec![c_len], upd.running_mean).map_err(&err)?,
                                );
                                running.insert(
                                    format!("{prefix}.running_var"),
                                    Tensor::new(vec![c_len], upd.running_var).map_err(&err)?,
                                );
                                cache = Some(c);
                                y
                            }
                            Mode::Eval => {
                                batchnorm::forward_eval(&bn, &y, layout(l.kind)).map_err(&err)?
                            }
                        };
                    }
                    if l.relu {
                        ops::relu::forward_inplace(&mut y);
                    }
                    (y, Saved::Layer { bn: cache })
                }
                Op::PillarMax {
                    concat_back,
                    include_padding,
                } => {
                    let counts: Vec<u32> = if *include_padding {
                        vec![n_slots as u32; batch.counts.len()]
                    } else {
                        batch.counts.clone()
                    };
                    let (m, arg) = ops::pillar_max::forward(x, &counts).map_err(&err)?;
                    let out = if *concat_back {
                        let rep = ops::repeat_points::forward(&m, n_slots).map_err(&err)?;
                        ops::concat::forward(&[x, &rep], 2).map_err(&err)?
                    } else {
                        m
                    };
                    (out, Saved::PillarMax(arg))
                }
                Op::Scatter { channels } => {
                    let c = *channels;
                    let b = batch.frames();
                    let mut img = Tensor::zeros(&[b, c, ny, nx]);
                    let plane = c * ny * nx;
                    for f in 0..b {
                        let r = batch.pillar_range(f);
                        let feats =
                            Tensor::new(vec![r.len(), c], x.data[r.start * c..r.end * c].to_vec())
                                .map_err(&err)?;
                        let one = ops::scatter::forward(&feats, &cells(&batch.coords[r]), ny, nx)
                            .map_err(&err)?;
                        img.data[f * plane..(f + 1) * plane].copy_from_slice(&one.data);
                    }
                    (img, Saved::None)
                }
                Op::Concat => {
                    let ins: Vec<&Tensor> = node
                        .inputs
                        .iter()
                        .map(|&v| values[v].as_ref().expect("topological order"))
                        .collect();
                    (ops::concat::forward(&ins, 1).map_err(&err)?, Saved::None)
                }
                Op::Add { relu } => {
                    let b = values[node.inputs[1]].as_ref().expect("topological order");
                    let y = crate::engine::sparse::add(x, b, *relu).map_err(&err)?;
                    (y, Saved::None)
                }
                Op::HeightCompress { sites, channels } => {
                    let sb = sparse.as_ref().ok_or_else(|| {
                        TrainError::Internal(format!("{}: no sparse geometry", node.name))
                    })?;
                    let [d, h, wd] = self.graph.sparse.as_ref().expect("sparse").grids[*sites];
                    let b = batch.frames();
                    let plane = channels * d * h * wd;
                    let mut img = Tensor::zeros(&[b, channels * d, h, wd]);
                    for f in 0..b {
                        let t = sb.sparse_tensor(x, *sites, f).map_err(&err)?;
                        let one = ops::height_compress::forward(&t).map_err(&err)?;
                        img.data[f * plane..(f + 1) * plane].copy_from_slice(&one.data);
                    }
                    (img, Saved::None)
                }
            };
            values[i + 1] = Some(out);
            saved.push(s);
        }
        Ok(Forward {
            values,
            saved,
            running,
            sparse,
        })
    }

    /// Head maps of every frame with BatchNorm on its running statistics (the deployed
    /// network), one `HeadOutputs` per frame.
    pub fn forward_eval(&self, w: &Weights, batch: &Batch) -> Result<Vec<HeadOutputs>, TrainError> {
        let fwd = self.forward(w, batch, Mode::Eval)?;
        let b = batch.frames();
        let mut out = Vec::with_capacity(b);
        for f in 0..b {
            let mut tasks = Vec::new();
            let (mut h, mut wd) = (0, 0);
            for t in &self.graph.tasks {
                let hm = fwd.values[t.heatmap].as_ref().expect("computed");
                (h, wd) = (hm.shape[2], hm.shape[3]);
                let frame = |v: &Tensor| {
                    let per = v.len() / b;
                    v.data[f * per..(f + 1) * per].to_vec()
                };
                let mut regression = Vec::new();
                for &r in &t.regression {
                    regression.extend(frame(fwd.values[r].as_ref().expect("computed")));
                }
                tasks.push(TaskMaps {
                    heatmap: frame(hm),
                    regression,
                });
            }
            out.push(HeadOutputs { tasks, h, w: wd });
        }
        Ok(out)
    }

    /// One training step's loss, parameter gradients and BN running statistics.
    pub fn step(&self, w: &Weights, batch: &Batch) -> Result<StepResult, TrainError> {
        let mut fwd = self.forward(w, batch, Mode::Train)?;
        let mut grad: Vec<Option<Tensor>> = vec![None; fwd.values.len()];
        let (hm_loss, reg_loss) = self.losses(&fwd.values, batch, &mut grad)?;
        let grads = self.backward(w, batch, &mut fwd, grad)?;
        Ok(StepResult {
            loss: hm_loss + self.cfg.loss.loc_weight * reg_loss,
            hm_loss,
            reg_loss,
            grads,
            running: fwd.running,
        })
    }

    /// The loss of every task; seeds the gradients of the head outputs.
    fn losses(
        &self,
        values: &[Option<Tensor>],
        batch: &Batch,
        grad: &mut [Option<Tensor>],
    ) -> Result<(f32, f32), TrainError> {
        let (mut hm_total, mut reg_total) = (0.0f32, 0.0f32);
        let loc = self.cfg.loss.loc_weight;
        for (t, heads) in self.graph.tasks.iter().enumerate() {
            let err = op_err("loss");
            let hm = values[heads.heatmap].as_ref().expect("computed");
            let gt = batch.heatmap(t, &hm.shape).map_err(&err)?;
            let focal = ops::focal_loss::forward_backward(hm, &gt).map_err(&err)?;
            hm_total += focal.loss;
            add_into(&mut grad[heads.heatmap], focal.grad_logits);

            let regs: Vec<&Tensor> = heads
                .regression
                .iter()
                .map(|&v| values[v].as_ref().expect("computed"))
                .collect();
            let pred = ops::concat::forward(&regs, 1).map_err(&err)?;
            let (ind, mask, target) = batch.regression(t).map_err(&err)?;
            let l1 = ops::reg_l1_loss::forward_backward(
                &pred,
                &ind,
                &mask,
                &target,
                &self.cfg.loss.code_weights,
            )
            .map_err(&err)?;
            reg_total += l1.loss;
            let mut g = l1.grad_pred;
            g.data.iter_mut().for_each(|v| *v *= loc);
            let sizes: Vec<usize> = regs.iter().map(|r| r.shape[1]).collect();
            let parts = ops::concat::backward(&g, 1, &sizes).map_err(&err)?;
            for (&v, p) in heads.regression.iter().zip(parts) {
                add_into(&mut grad[v], p);
            }
        }
        Ok((hm_total, reg_total))
    }

    fn backward(
        &self,
        w: &Weights,
        batch: &Batch,
        fwd: &mut Forward,
        mut grad: Vec<Option<Tensor>>,
    ) -> Result<BTreeMap<String, Tensor>, TrainError> {
        let mut grads = BTreeMap::new();
        let (ny, nx) = self.graph.bev;
        for (i, node) in self.graph.nodes.iter().enumerate().rev() {
            let Some(gy) = grad[i + 1].take() else {
                continue;
            };
            let err = op_err(&node.name);
            let x = fwd.values[node.inputs[0]].as_ref().expect("forward value");
            match (&node.op, &fwd.saved[i]) {
                (Op::Layer(l), Saved::Layer { bn }) => {
                    let y = fwd.values[i + 1].as_ref().expect("forward value");
                    let mut g = if l.relu {
                        ops::relu::backward(y, &gy).map_err(&err)?
                    } else {
                        gy
                    };
                    if let (Some((prefix, eps)), Some(cache)) = (&l.bn, bn) {
                        let bnp = bn_of(w, prefix, *eps)?;
                        let bg = batchnorm::backward_train(&bnp, cache, &g).map_err(&err)?;
                        let c = bg.gamma.len();
                        grads.insert(
                            format!("{prefix}.weight"),
                            Tensor::new(vec![c], bg.gamma).map_err(&err)?,
                        );
                        grads.insert(
                            format!("{prefix}.bias"),
                            Tensor::new(vec![c], bg.beta).map_err(&err)?,
                        );
                        g = bg.input;
                    }
                    let wt = w.get(&format!("{}.weight", l.param))?;
                    let (gx, gw, gb) = match l.kind {
                        LayerKind::SparseConv3d { rulebook, .. } => {
                            let sb = fwd.sparse.as_ref().ok_or_else(|| {
                                TrainError::Internal(format!("{}: no sparse geometry", node.name))
                            })?;
                            let spec =
                                &self.graph.sparse.as_ref().expect("sparse").rulebooks[rulebook];
                            let cin = l.in_channels;
                            let mut gx = Tensor::zeros(&x.shape);
                            let mut gw = Tensor::zeros(&wt.shape);
                            let mut gb = l.bias.then(|| vec![0f32; l.out_channels]);
                            for (f, fs) in sb.frames.iter().enumerate() {
                                let xf = sb.rows(x, spec.input, f).map_err(&err)?;
                                let gf = sb.rows(&g, spec.output, f).map_err(&err)?;
                                let r = ops::sparse_conv::backward(
                                    &xf,
                                    &fs.rulebooks[rulebook],
                                    wt,
                                    l.bias,
                                    &gf,
                                )
                                .map_err(&err)?;
                                let a = sb.starts[spec.input][f];
                                gx.data[a * cin..a * cin + r.input.len()]
                                    .copy_from_slice(&r.input.data);
                                gw.data
                                    .iter_mut()
                                    .zip(&r.weight.data)
                                    .for_each(|(s, v)| *s += v);
                                if let (Some(s), Some(v)) = (&mut gb, &r.bias) {
                                    s.iter_mut().zip(v).for_each(|(s, v)| *s += v);
                                }
                            }
                            (gx, gw, gb)
                        }
                        LayerKind::Linear => {
                            let r = ops::linear::backward(x, wt, l.bias, &g).map_err(&err)?;
                            (r.input, r.weight, r.bias)
                        }
                        LayerKind::Conv2d {
                            stride, padding, ..
                        } => {
                            let r = ops::conv2d::backward(
                                x,
                                wt,
                                l.bias,
                                Conv2dParams::new(stride, padding),
                                &g,
                            )
                            .map_err(&err)?;
                            (r.input, r.weight, r.bias)
                        }
                        LayerKind::ConvTranspose2d { stride, .. } => {
                            let r = ops::conv_transpose2d::backward(
                                x,
                                wt,
                                l.bias,
                                ConvTranspose2dParams::new(stride, 0),
                                &g,
                            )
                            .map_err(&err)?;
                            (r.input, r.weight, r.bias)
                        }
                    };
                    grads.insert(format!("{}.weight", l.param), gw);
                    if let Some(gb) = gb {
                        let c = gb.len();
                        grads.insert(
                            format!("{}.bias", l.param),
                            Tensor::new(vec![c], gb).map_err(&err)?,
                        );
                    }
                    // The network input needs no gradient.
                    if node.inputs[0] != 0 {
                        add_into(&mut grad[node.inputs[0]], gx);
                    }
                }
                (Op::PillarMax { concat_back, .. }, Saved::PillarMax(arg)) => {
                    let gx = if *concat_back {
                        let c = x.shape[2];
                        let mut parts = ops::concat::backward(&gy, 2, &[c, c]).map_err(&err)?;
                        let g_rep = parts.pop().expect("two parts");
                        let mut g_direct = parts.pop().expect("two parts");
                        let gm = ops::repeat_points::backward(&g_rep).map_err(&err)?;
                        let via_max = ops::pillar_max::backward(arg, &gm).map_err(&err)?;
                        g_direct
                            .data
                            .iter_mut()
                            .zip(&via_max.data)
                            .for_each(|(a, b)| *a += b);
                        g_direct
                    } else {
                        ops::pillar_max::backward(arg, &gy).map_err(&err)?
                    };
                    add_into(&mut grad[node.inputs[0]], gx);
                }
                (Op::Scatter { channels }, _) => {
                    let c = *channels;
                    let plane = c * ny * nx;
                    let mut gx = Tensor::zeros(&x.shape);
                    for f in 0..batch.frames() {
                        let r = batch.pillar_range(f);
                        let img = Tensor::new(
                            vec![c, ny, nx],
                            gy.data[f * plane..(f + 1) * plane].to_vec(),
                        )
                        .map_err(&err)?;
                        let g = ops::scatter::backward(&img, &cells(&batch.coords[r.clone()]))
                            .map_err(&err)?;
                        gx.data[r.start * c..r.end * c].copy_from_slice(&g.data);
                    }
                    add_into(&mut grad[node.inputs[0]], gx);
                }
                (Op::Add { relu }, _) => {
                    let g = if *relu {
                        let y = fwd.values[i + 1].as_ref().expect("forward value");
                        ops::relu::backward(y, &gy).map_err(&err)?
                    } else {
                        gy
                    };
                    add_into(&mut grad[node.inputs[1]], g.clone());
                    add_into(&mut grad[node.inputs[0]], g);
                }
                (Op::HeightCompress { sites, channels }, _) => {
                    let sb = fwd.sparse.as_ref().ok_or_else(|| {
                        TrainError::Internal(format!("{}: no sparse geometry", node.name))
                    })?;
                    let [d, h, wd] = self.graph.sparse.as_ref().expect("sparse").grids[*sites];
                    let plane = channels * d * h * wd;
                    let mut gx = Tensor::zeros(&x.shape);
                    for f in 0..batch.frames() {
                        let t = sb.sparse_tensor(x, *sites, f).map_err(&err)?;
                        let gf = Tensor::new(
                            vec![1, channels * d, h, wd],
                            gy.data[f * plane..(f + 1) * plane].to_vec(),
                        )
                        .map_err(&err)?;
                        let r = ops::height_compress::backward(&t, &gf).map_err(&err)?;
                        let a = sb.starts[*sites][f] * channels;
                        gx.data[a..a + r.len()].copy_from_slice(&r.data);
                    }
                    add_into(&mut grad[node.inputs[0]], gx);
                }
                (Op::Concat, _) => {
                    let sizes: Vec<usize> = node
                        .inputs
                        .iter()
                        .map(|&v| fwd.values[v].as_ref().expect("forward value").shape[1])
                        .collect();
                    let parts = ops::concat::backward(&gy, 1, &sizes).map_err(&err)?;
                    for (&v, p) in node.inputs.iter().zip(parts) {
                        add_into(&mut grad[v], p);
                    }
                }
                _ => {
                    return Err(TrainError::Internal(format!(
                        "{}: cache mismatch",
                        node.name
                    )));
                }
            }
            // Activations are no longer needed once their consumers are done; free the
            // output early to bound memory.
            fwd.values[i + 1] = None;
        }
        Ok(grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::{Box3d, Object};
    use crate::engine::fp32::tests::{TINY, random_weights, scan};
    use crate::engine::{Fp32Engine, NetInput};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn object(class: &str, x: f32, y: f32, yaw: f32) -> Object {
        Object {
            bbox: Box3d {
                center: [x, y, -1.0],
                size: [4.0, 1.8, 1.5],
                yaw,
            },
            class: class.into(),
            velocity: None,
            num_points: None,
        }
    }

    /// Two small frames (few pillars) with objects of both tasks.
    fn batch(cfg: &ModelConfig, points: usize) -> Batch {
        let frames = vec![
            (
                scan(11, points),
                vec![
                    object("car", 3.0, -4.0, 0.4),
                    object("cyclist", -6.0, 5.0, 2.0),
                ],
            ),
            (scan(12, points), vec![object("pedestrian", 1.0, 7.0, -1.0)]),
        ];
        Batch::from_frames(cfg, &frames).unwrap()
    }

    /// Central differences of the loss (computed in f32, as the network does) on a
    /// sample of entries of every kind of parameter, against the backward pass.
    fn check_gradients(net: &Network, w: &Weights, b: &Batch) -> Vec<(String, f32, f32)> {
        check_gradients_of(net, w, b, &PILLAR_PARAMS)
    }

    fn check_gradients_of(
        net: &Network,
        w: &Weights,
        b: &Batch,
        names: &[&str],
    ) -> Vec<(String, f32, f32)> {
        let r = net.step(w, b).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        // Small enough that ReLU kinks and max switches are rarely crossed, large enough
        // that the f32 rounding of the loss stays below the tolerance.
        let eps = 1e-4f32;
        let mut out = Vec::new();
        for &name in names {
            let g = &r.grads[name];
            for _ in 0..SAMPLES {
                let k = rng.random_range(0..g.len());
                let mut wp = w.clone();
                wp.tensors.get_mut(name).unwrap().data[k] += eps;
                let lp = net.step(&wp, b).unwrap().loss;
                wp.tensors.get_mut(name).unwrap().data[k] -= 2.0 * eps;
                let lm = net.step(&wp, b).unwrap().loss;
                let fd = (lp - lm) / (2.0 * eps);
                out.push((format!("{name}[{k}]"), g.data[k], fd));
            }
        }
        out
    }

    const PILLAR_PARAMS: [&str; 21] = [
        "vfe.pfn_layers.0.linear.weight",
        "vfe.pfn_layers.0.norm.weight",
        "vfe.pfn_layers.0.norm.bias",
        "vfe.pfn_layers.1.linear.weight",
        "vfe.pfn_layers.1.norm.weight",
        "backbone_2d.blocks.0.1.weight",
        "backbone_2d.blocks.0.2.weight",
        "backbone_2d.blocks.1.4.weight",
        "backbone_2d.blocks.1.5.bias",
        "backbone_2d.deblocks.0.0.weight",
        "backbone_2d.deblocks.1.0.weight",
        "backbone_2d.deblocks.1.1.weight",
        "dense_head.shared_conv.0.weight",
        "dense_head.shared_conv.0.bias",
        "dense_head.shared_conv.1.weight",
        "dense_head.heads_list.0.hm.0.0.weight",
        "dense_head.heads_list.0.hm.1.weight",
        "dense_head.heads_list.1.hm.1.bias",
        "dense_head.heads_list.0.center.1.weight",
        "dense_head.heads_list.1.dim.0.1.bias",
        "dense_head.heads_list.1.rot.1.bias",
    ];

    const SAMPLES: usize = 6;

    /// Entries where backward and finite differences disagree. The loss is piecewise
    /// smooth (ReLU, pillar max, the focal clamp), so a rare entry whose perturbation
    /// crosses a kink may disagree; a wrong gradient disagrees on most entries.
    fn mismatches(checks: &[(String, f32, f32)]) -> Vec<String> {
        checks
            .iter()
            .filter(|(_, an, fd)| (an - fd).abs() > 4e-3 + 0.1 * an.abs().max(fd.abs()))
            .map(|(n, an, fd)| format!("{n}: backward {an}, finite differences {fd}"))
            .collect()
    }

    #[test]
    fn gradients_match_finite_differences() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let net = Network::new(&cfg).unwrap();
        let w = random_weights(net.graph(), 5);
        let b = batch(&cfg, 60);
        assert!(b.counts.len() < 130, "{} pillars", b.counts.len());
        let r = net.step(&w, &b).unwrap();
        // Every trainable parameter gets a gradient.
        for p in net.graph().params() {
            if !p.name.contains("running") {
                assert_eq!(r.grads[&p.name].shape, p.shape, "{}", p.name);
            }
        }
        let checks = check_gradients(&net, &w, &b);
        let bad = mismatches(&checks);
        let report = format!("{} of {}:\n{}", bad.len(), checks.len(), bad.join("\n"));
        // At most one kink-crossing entry per tensor, and 5 % overall.
        for chunk in checks.chunks(SAMPLES) {
            assert!(mismatches(chunk).len() <= 1, "{report}");
        }
        assert!(bad.len() * 20 <= checks.len(), "{report}");
        // The check has teeth: the gradients are not all tiny.
        let big = checks.iter().filter(|c| c.1.abs() > 0.05).count();
        assert!(
            big > checks.len() / 3,
            "{big} of {} gradients above 0.05",
            checks.len()
        );
    }

    /// The voxel model's training forward/backward: the sparse convs (stem, residual blocks,
    /// strided and (3,1,1) convs), residual adds and height compression, over a batch of
    /// two frames with their own rulebooks.
    #[test]
    fn voxel_gradients_match_finite_differences() {
        let cfg =
            ModelConfig::from_yaml(include_str!("../../tests/fixtures/tiny_voxel.yaml")).unwrap();
        let net = Network::new(&cfg).unwrap();
        let w = random_weights(net.graph(), 5);
        let b = batch(&cfg, 500);
        assert!(
            (50..800).contains(&b.counts.len()),
            "{} voxels",
            b.counts.len()
        );
        let r = net.step(&w, &b).unwrap();
        for p in net.graph().params() {
            if !p.name.contains("running") {
                assert_eq!(r.grads[&p.name].shape, p.shape, "{}", p.name);
            }
        }
        let names = [
            "backbone_3d.conv_input.0.weight",
            "backbone_3d.conv_input.1.weight",
            "backbone_3d.conv1.0.conv1.weight",
            "backbone_3d.conv1.0.conv2.bias",
            "backbone_3d.conv1.0.bn2.bias",
            "backbone_3d.conv2.0.0.weight",
            "backbone_3d.conv3.0.0.weight",
            "backbone_3d.conv3.1.conv1.weight",
            "backbone_3d.conv_out.0.weight",
            "backbone_3d.conv_out.1.weight",
            "backbone_2d.blocks.0.1.weight",
            "dense_head.heads_list.0.hm.1.weight",
        ];
        let checks = check_gradients_of(&net, &w, &b, &names);
        let bad = mismatches(&checks);
        let report = format!("{} of {}:\n{}", bad.len(), checks.len(), bad.join("\n"));
        for chunk in checks.chunks(SAMPLES) {
            assert!(mismatches(chunk).len() <= 1, "{report}");
        }
        assert!(bad.len() * 20 <= checks.len(), "{report}");
        let big = checks.iter().filter(|c| c.1.abs() > 0.02).count();
        assert!(
            big > checks.len() / 3,
            "{big} of {} gradients above 0.02",
            checks.len()
        );
        // Eval mode is the FP32 engine, frame by frame.
        let heads = net.forward_eval(&w, &b).unwrap();
        let engine = Fp32Engine::new(net.graph(), &w).unwrap();
        for (f, got) in heads.iter().enumerate() {
            let r = b.pillar_range(f);
            let input = NetInput {
                decorated: &b.decorated[r.start * b.width..r.end * b.width],
                max_points: 1,
                width: b.width,
                counts: &b.counts[r.clone()],
                coords: &b.coords[r],
            };
            let want = engine.run(&input).unwrap();
            for (g, e) in got.tasks.iter().zip(&want.tasks) {
                for (a, x) in g
                    .heatmap
                    .iter()
                    .chain(&g.regression)
                    .zip(e.heatmap.iter().chain(&e.regression))
                {
                    assert!((a - x).abs() <= 1e-4 * (1.0 + x.abs()), "{a} vs {x}");
                }
            }
        }
    }

    #[test]
    fn training_step_updates_the_running_statistics() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let net = Network::new(&cfg).unwrap();
        let w = random_weights(net.graph(), 5);
        let b = batch(&cfg, 300);
        let r = net.step(&w, &b).unwrap();
        let name = "backbone_2d.blocks.0.2.running_mean";
        let old = &w.tensors[name].data;
        let new = &r.running[name].data;
        // new = 0.99 old + 0.01 batch mean: it moved, but only by the momentum.
        assert_ne!(old, new);
        for (o, n) in old.iter().zip(new) {
            assert!((n - o).abs() < 0.05 * (1.0 + o.abs()), "{o} -> {n}");
        }
        assert_eq!(
            r.running.len(),
            2 * net
                .graph()
                .params()
                .iter()
                .filter(|p| p.name.ends_with("running_mean"))
                .count()
        );
    }

    #[test]
    fn eval_forward_matches_the_fp32_engine() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let net = Network::new(&cfg).unwrap();
        let w = random_weights(net.graph(), 3);
        let b = batch(&cfg, 2000);
        let heads = net.forward_eval(&w, &b).unwrap();
        let engine = Fp32Engine::new(net.graph(), &w).unwrap();
        for (f, got) in heads.iter().enumerate() {
            let r = b.pillar_range(f);
            let per = b.max_points * b.width;
            let input = NetInput {
                decorated: &b.decorated[r.start * per..r.end * per],
                max_points: b.max_points,
                width: b.width,
                counts: &b.counts[r.clone()],
                coords: &b.coords[r],
            };
            let want = engine.run(&input).unwrap();
            assert_eq!((got.h, got.w), (want.h, want.w));
            for (g, e) in got.tasks.iter().zip(&want.tasks) {
                assert_eq!(g.heatmap.len(), e.heatmap.len());
                assert_eq!(g.regression.len(), e.regression.len());
                for (a, x) in g
                    .heatmap
                    .iter()
                    .chain(&g.regression)
                    .zip(e.heatmap.iter().chain(&e.regression))
                {
                    assert!(
                        (a - x).abs() <= 1e-4 * (1.0 + x.abs()),
                        "frame {f}: {a} vs {x}"
                    );
                }
            }
        }
        // The two frames differ, so per-frame slicing is exercised.
        assert_ne!(heads[0], heads[1]);
    }
}
