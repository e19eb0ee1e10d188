//! FP32 inference on the CPU: the graph executed with BatchNorm folded into the layers.

use super::sparse::{self, frame_sites};
use super::{EngineError, HeadOutputs, NetInput, TaskMaps};
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::weights::Weights;
use crate::ops::batchnorm::{self, BatchNorm};
use crate::ops::conv_transpose2d::ConvTranspose2dParams;
use crate::ops::conv2d::Conv2dParams;
use crate::ops::scatter::Cell;
use crate::ops::{self, Tensor};

/// A layer's weight and bias after folding its BatchNorm.
#[derive(Debug, Clone)]
pub struct FoldedLayer {
    pub weight: Tensor,
    pub bias: Vec<f32>,
}

/// Folds every layer's BatchNorm (inference statistics) into its weight and bias. Layers
/// without BN keep their weight, with a zero bias when they have none.
pub fn fold_layers(
    graph: &Graph,
    weights: &Weights,
) -> Result<Vec<Option<FoldedLayer>>, EngineError> {
    weights.validate(graph)?;
    graph
        .nodes
        .iter()
        .map(|n| {
            let Op::Layer(l) = &n.op else { return Ok(None) };
            let w = weights.get(&format!("{}.weight", l.param))?;
            let b = if l.bias {
                Some(weights.get(&format!("{}.bias", l.param))?.data.clone())
            } else {
                None
            };
            let folded = match &l.bn {
                Some((bn, eps)) => {
                    let get = |s: &str| -> Result<Vec<f32>, EngineError> {
                        Ok(weights.get(&format!("{bn}.{s}"))?.data.clone())
                    };
                    let bn = BatchNorm {
                        gamma: get("weight")?,
                        beta: get("bias")?,
                        running_mean: get("running_mean")?,
                        running_var: get("running_var")?,
                        eps: *eps,
                        momentum: 0.1,
                    };
                    let out_axis = match l.kind {
                        LayerKind::ConvTranspose2d { .. } => 1,
                        _ => 0,
                    };
                    let (weight, bias) = batchnorm::fold(&bn, w, b.as_deref(), out_axis)
                        .map_err(|e| EngineError::op(&n.name, e))?;
                    FoldedLayer { weight, bias }
                }
                None => FoldedLayer {
                    weight: w.clone(),
                    bias: b.unwrap_or_else(|| vec![0.0; l.out_channels]),
                },
            };
            Ok(Some(folded))
        })
        .collect()
}

/// Runs one layer on its input with folded parameters.
pub fn run_layer(kind: LayerKind, x: &Tensor, f: &FoldedLayer, relu: bool) -> ops::Result<Tensor> {
    run_layer_with(kind, x, f, None, relu)
}

/// [`run_layer`] with the layer's Winograd kernel transformed beforehand, if it has one.
fn run_layer_with(
    kind: LayerKind,
    x: &Tensor,
    f: &FoldedLayer,
    winograd: Option<&[f32]>,
    relu: bool,
) -> ops::Result<Tensor> {
    let mut y = match kind {
        LayerKind::Linear => ops::linear::forward(x, &f.weight, Some(&f.bias))?,
        // Head outputs (a few channels): a direct sum beats any packing.
        LayerKind::Conv2d {
            kernel: 3,
            stride: 1,
            padding: 1,
        } if f.weight.shape[0] <= ops::conv_narrow::MAX_OUT_CHANNELS => {
            ops::conv_narrow::forward(x, &f.weight, Some(&f.bias))?
        }
        // The commonest layer: Winograd does it with 2.25x fewer multiplies. The FP32
        // engine transforms its kernels once; other callers (a few float layers of an INT8
        // plan) transform here, a small cost beside the layer.
        LayerKind::Conv2d {
            kernel: 3,
            stride: 1,
            padding: 1,
        } => {
            let owned;
            let u = match winograd {
                Some(u) => u,
                None => {
                    owned = ops::winograd::transform_weights(&f.weight)?;
                    &owned
                }
            };
            ops::winograd::forward(x, u, f.weight.shape[0], Some(&f.bias))?
        }
        LayerKind::Conv2d {
            stride, padding, ..
        } => ops::conv2d::forward(
            x,
            &f.weight,
            Some(&f.bias),
            Conv2dParams::new(stride, padding),
        )?,
        LayerKind::ConvTranspose2d { stride, .. } => ops::conv_transpose2d::forward(
            x,
            &f.weight,
            Some(&f.bias),
            ConvTranspose2dParams::new(stride, 0),
        )?,
        LayerKind::SparseConv3d { .. } => {
            return Err(ops::OpsError::Invalid {
                op: "sparse_conv",
                arg: "rulebook",
                detail: "a sparse conv runs with its frame's rulebook (run_sparse_layer)".into(),
            });
        }
    };
    if relu {
        ops::relu::forward_inplace(&mut y);
    }
    Ok(y)
}

/// Runs one sparse conv layer with its frame rulebook and folded parameters.
pub fn run_sparse_layer(
    rb: &crate::sparse::Rulebook,
    x: &Tensor,
    f: &FoldedLayer,
    relu: bool,
) -> ops::Result<Tensor> {
    let mut y = ops::sparse_conv::forward(x, rb, &f.weight, Some(&f.bias))?;
    if relu {
        ops::relu::forward_inplace(&mut y);
    }
    Ok(y)
}

/// `[P, N, C]` points and their pillar max `[P, C]` -> `[P, N, 2C]`: each point's features
/// followed by its pillar's max (PFN layers before the last).
pub fn concat_pillar_max(x: &Tensor, max: &Tensor) -> Tensor {
    let (p, n, c) = (x.shape[0], x.shape[1], x.shape[2]);
    let mut out = Tensor::zeros(&[p, n, 2 * c]);
    for pi in 0..p {
        let m = &max.data[pi * c..(pi + 1) * c];
        for ni in 0..n {
            let row = (pi * n + ni) * 2 * c;
            out.data[row..row + c]
                .copy_from_slice(&x.data[(pi * n + ni) * c..(pi * n + ni + 1) * c]);
            out.data[row + c..row + 2 * c].copy_from_slice(m);
        }
    }
    out
}

/// Pillar cells for the scatter, (z, y, x) -> (y, x).
pub fn cells(coords: &[[u32; 3]]) -> Vec<Cell> {
    coords.iter().map(|c| Cell { y: c[1], x: c[2] }).collect()
}

/// The FP32 CPU engine.
pub struct Fp32Engine {
    graph: Graph,
    layers: Vec<Option<FoldedLayer>>,
    /// For each value, the index of the last node that reads it (to free it early).
    last_use: Vec<usize>,
    /// Per node: the sibling group it opens, if any.
    groups: Vec<Option<SiblingConvs>>,
    /// Per node: computed by an earlier node's sibling group.
    in_group: Vec<bool>,
    /// Per node: a linear layer whose only reader, the next node, is a pillar max; the two
    /// run as one pass (`ops::pillar_linear_max`) unless every value is being observed.
    pfn_fused: Vec<bool>,
    /// Per node: the Winograd kernel of a layer `run_layer` runs with Winograd, transformed
    /// once (the engine's weights are fixed).
    winograd: Vec<Option<Vec<f32>>>,
}

/// What a run shows its caller: every value (calibration statistics need the tensors), or
/// only which nodes are done (timing), which lets fused layers skip their intermediates.
enum Observer<'a> {
    Values(&'a mut dyn FnMut(usize, &Tensor)),
    Marks(&'a mut dyn FnMut(usize)),
}

impl Observer<'_> {
    fn show(&mut self, value: usize, t: &Tensor) {
        match self {
            Observer::Values(f) => f(value, t),
            Observer::Marks(f) if value > 0 => f(value - 1),
            Observer::Marks(_) => {}
        }
    }
}

/// The linear layers fused with the pillar max that reads them (see `pfn_fused`).
fn pfn_pairs(graph: &Graph, last_use: &[usize]) -> Vec<bool> {
    let nodes = &graph.nodes;
    (0..nodes.len())
        .map(|i| {
            matches!(&nodes[i].op, Op::Layer(l) if l.kind == LayerKind::Linear)
                && nodes
                    .get(i + 1)
                    .is_some_and(|m| matches!(m.op, Op::PillarMax { .. }) && m.inputs == [i + 1])
                && last_use[i + 1] == i + 1
        })
        .collect()
}

/// 3x3 convolutions that read the same value (the first layers of a head's sub-heads): run
/// as one Winograd convolution, which transforms their shared input once and multiplies
/// with one tall GEMM instead of many short ones.
struct SiblingConvs {
    members: Vec<usize>,
    couts: Vec<usize>,
    /// Stacked transformed kernels and biases.
    u: Vec<f32>,
    bias: Vec<f32>,
}

/// Whether `run_layer` runs this layer with Winograd (3x3, stride 1, more outputs than the
/// narrow direct kernel takes).
fn is_winograd(kind: LayerKind, cout: usize) -> bool {
    matches!(
        kind,
        LayerKind::Conv2d {
            kernel: 3,
            stride: 1,
            padding: 1
        }
    ) && cout > ops::conv_narrow::MAX_OUT_CHANNELS
}

/// Groups the Winograd convolutions by the value they read; groups of two or more.
fn sibling_groups(
    graph: &Graph,
    layers: &[Option<FoldedLayer>],
) -> Result<(Vec<Option<SiblingConvs>>, Vec<bool>), EngineError> {
    let mut groups: Vec<Option<SiblingConvs>> = (0..graph.nodes.len()).map(|_| None).collect();
    let mut in_group = vec![false; graph.nodes.len()];
    for (i, n) in graph.nodes.iter().enumerate() {
        // The layers run_layer runs with Winograd, so grouping changes no result.
        let conv = |m: &crate::model::graph::Node| matches!(&m.op, Op::Layer(l) if is_winograd(l.kind, l.out_channels));
        if in_group[i] || !conv(n) {
            continue;
        }
        let members: Vec<usize> = (i..graph.nodes.len())
            .filter(|&j| conv(&graph.nodes[j]) && graph.nodes[j].inputs == n.inputs)
            .collect();
        if members.len() < 2 {
            continue;
        }
        let folded: Vec<&FoldedLayer> = members
            .iter()
            .map(|&j| layers[j].as_ref().expect("layer folded"))
            .collect();
        let shape = &folded[0].weight.shape;
        let couts: Vec<usize> = folded.iter().map(|f| f.weight.shape[0]).collect();
        let stacked = Tensor::new(
            vec![couts.iter().sum(), shape[1], 3, 3],
            folded
                .iter()
                .flat_map(|f| f.weight.data.iter().copied())
                .collect(),
        )
        .map_err(|e| EngineError::op(&n.name, e))?;
        let u =
            ops::winograd::transform_weights(&stacked).map_err(|e| EngineError::op(&n.name, e))?;
        for &j in &members[1..] {
            in_group[j] = true;
        }
        groups[i] = Some(SiblingConvs {
            bias: folded.iter().flat_map(|f| f.bias.iter().copied()).collect(),
            members,
            couts,
            u,
        });
    }
    Ok((groups, in_group))
}

impl Fp32Engine {
    pub fn new(graph: &Graph, weights: &Weights) -> Result<Self, EngineError> {
        let layers = fold_layers(graph, weights)?;
        let mut last_use = vec![0; graph.nodes.len() + 1];
        for (i, n) in graph.nodes.iter().enumerate() {
            for &v in &n.inputs {
                last_use[v] = i;
            }
        }
        // Head outputs are read after the last node.
        for t in &graph.tasks {
            for &v in std::iter::once(&t.heatmap).chain(&t.regression) {
                last_use[v] = usize::MAX;
            }
        }
        let (groups, in_group) = sibling_groups(graph, &layers)?;
        let pfn_fused = pfn_pairs(graph, &last_use);
        let winograd = graph
            .nodes
            .iter()
            .zip(&layers)
            .map(|(node, f)| match (&node.op, f) {
                (Op::Layer(l), Some(f)) if is_winograd(l.kind, f.weight.shape[0]) => {
                    ops::winograd::transform_weights(&f.weight)
                        .map(Some)
                        .map_err(|e| EngineError::op(&node.name, e))
                }
                _ => Ok(None),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            graph: graph.clone(),
            layers,
            last_use,
            groups,
            in_group,
            pfn_fused,
            winograd,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Runs the network on one frame's decorated pillars.
    pub fn run(&self, input: &NetInput<'_>) -> Result<HeadOutputs, EngineError> {
        self.run_marked(input, &mut |_| {})
    }

    /// [`run`](Self::run), showing every value to `on_value(id, tensor)` as soon as it is
    /// computed (the input first, then node `i`'s output as value `i + 1`): calibration
    /// statistics hook in here. Every layer runs on its own (no fusion hides a value).
    pub fn run_observed(
        &self,
        input: &NetInput<'_>,
        on_value: &mut dyn FnMut(usize, &Tensor),
    ) -> Result<HeadOutputs, EngineError> {
        self.run_with(input, Observer::Values(on_value))
    }

    /// [`run`](Self::run), calling `done(i)` as node `i` finishes (per-stage timing); fused
    /// nodes finish together.
    pub fn run_marked(
        &self,
        input: &NetInput<'_>,
        done: &mut dyn FnMut(usize),
    ) -> Result<HeadOutputs, EngineError> {
        self.run_with(input, Observer::Marks(done))
    }

    fn run_with(
        &self,
        input: &NetInput<'_>,
        mut obs: Observer<'_>,
    ) -> Result<HeadOutputs, EngineError> {
        let fuse = matches!(obs, Observer::Marks(_));
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let sites = frame_sites(&self.graph, input.coords)?;
        // A voxel model's input is one feature row per voxel.
        let shape = if sites.is_some() {
            vec![p, n * f]
        } else {
            vec![p, n, f]
        };
        let x0 = Tensor::new(shape, input.decorated.to_vec())
            .map_err(|e| EngineError::op("input", e))?;
        obs.show(0, &x0);
        let mut values: Vec<Option<Tensor>> = vec![None; self.graph.nodes.len() + 1];
        values[0] = Some(x0);
        let (ny, nx) = self.graph.bev;
        let mut skip = false;
        for (i, node) in self.graph.nodes.iter().enumerate() {
            if std::mem::take(&mut skip) {
                // The pillar max of a fused pair: computed with its linear layer.
                continue;
            }
            if fuse && self.pfn_fused[i] {
                let out = self.fused_pfn(i, &values, input.counts)?;
                obs.show(i + 1, &out);
                obs.show(i + 2, &out);
                values[i + 2] = Some(out);
                self.free_inputs(i, &mut values);
                skip = true;
                continue;
            }
            if let Some(g) = &self.groups[i] {
                let outs = ops::winograd::forward_multi(
                    values[node.inputs[0]].as_ref().ok_or_else(|| {
                        EngineError::Internal(format!("{} reads a freed value", node.name))
                    })?,
                    &g.u,
                    &g.couts,
                    &g.bias,
                )
                .map_err(|e| EngineError::op(&node.name, e))?;
                for (&j, mut y) in g.members.iter().zip(outs) {
                    if matches!(&self.graph.nodes[j].op, Op::Layer(l) if l.relu) {
                        ops::relu::forward_inplace(&mut y);
                    }
                    obs.show(j + 1, &y);
                    values[j + 1] = Some(y);
                }
            }
            if self.groups[i].is_some() || self.in_group[i] {
                self.free_inputs(i, &mut values);
                continue;
            }
            let arg = |k: usize| -> Result<&Tensor, EngineError> {
                values[node.inputs[k]].as_ref().ok_or_else(|| {
                    EngineError::Internal(format!("{} reads a freed value", node.name))
                })
            };
            let out = match &node.op {
                Op::Layer(l) => {
                    let folded = self.layers[i].as_ref().expect("layer folded");
                    match (l.kind, &sites) {
                        (LayerKind::SparseConv3d { rulebook, .. }, Some(fs)) => {
                            run_sparse_layer(&fs.rulebooks[rulebook], arg(0)?, folded, l.relu)
                        }
                        (LayerKind::SparseConv3d { .. }, None) => {
                            return Err(sparse::no_sites(&node.name));
                        }
                        _ => run_layer_with(
                            l.kind,
                            arg(0)?,
                            folded,
                            self.winograd[i].as_deref(),
                            l.relu,
                        ),
                    }
                }
                Op::Add { relu } => sparse::add(arg(0)?, arg(1)?, *relu),
                Op::HeightCompress { sites: set, .. } => match &sites {
                    Some(fs) => sparse::height_compress(fs, *set, arg(0)?),
                    None => return Err(sparse::no_sites(&node.name)),
                },
                Op::PillarMax {
                    concat_back,
                    include_padding,
                } => {
                    let x = arg(0)?;
                    let counts: Vec<u32> = if *include_padding {
                        vec![n as u32; p]
                    } else {
                        input.counts.to_vec()
                    };
                    ops::pillar_max::forward(x, &counts).map(|(m, _)| {
                        if *concat_back {
                            concat_pillar_max(x, &m)
                        } else {
                            m
                        }
                    })
                }
                Op::Scatter { .. } => ops::scatter::forward(arg(0)?, &cells(input.coords), ny, nx)
                    .and_then(|img| {
                        let s = img.shape.clone();
                        img.reshape(vec![1, s[0], s[1], s[2]])
                    }),
                Op::Concat => {
                    let ins: Vec<&Tensor> = node
                        .inputs
                        .iter()
                        .map(|&v| values[v].as_ref().expect("computed"))
                        .collect();
                    ops::concat::forward(&ins, 1)
                }
            }
            .map_err(|e| EngineError::op(&node.name, e))?;
            obs.show(i + 1, &out);
            values[i + 1] = Some(out);
            self.free_inputs(i, &mut values);
        }
        collect_heads(&self.graph, &mut values)
    }

    /// Linear node `i` and the pillar max after it as one pass.
    fn fused_pfn(
        &self,
        i: usize,
        values: &[Option<Tensor>],
        counts: &[u32],
    ) -> Result<Tensor, EngineError> {
        let (lin, max) = (&self.graph.nodes[i], &self.graph.nodes[i + 1]);
        let x = values[lin.inputs[0]]
            .as_ref()
            .ok_or_else(|| EngineError::Internal(format!("{} reads a freed value", lin.name)))?;
        let (
            Op::Layer(l),
            Op::PillarMax {
                include_padding,
                concat_back,
            },
        ) = (&lin.op, &max.op)
        else {
            return Err(EngineError::Internal(format!(
                "{} is not a linear layer and pillar max",
                lin.name
            )));
        };
        let f = self.layers[i]
            .as_ref()
            .ok_or_else(|| EngineError::Internal(format!("{} not folded", lin.name)))?;
        let padded;
        let counts = if *include_padding {
            padded = vec![x.shape.get(1).copied().unwrap_or(0) as u32; counts.len()];
            &padded
        } else {
            counts
        };
        let output = if *concat_back {
            ops::pillar_linear_max::Output::PointsAndMax
        } else {
            ops::pillar_linear_max::Output::Max
        };
        ops::pillar_linear_max::forward(x, &f.weight, &f.bias, l.relu, counts, output)
            .map_err(|e| EngineError::op(&max.name, e))
    }

    /// Drops the values whose last reader is node `i`.
    fn free_inputs(&self, i: usize, values: &mut [Option<Tensor>]) {
        for &v in &self.graph.nodes[i].inputs {
            if self.last_use[v] == i {
                values[v] = None;
            }
        }
    }
}

/// Gathers the head maps of every task from the computed values.
pub fn collect_heads(
    graph: &Graph,
    values: &mut [Option<Tensor>],
) -> Result<HeadOutputs, EngineError> {
    let mut tasks = Vec::new();
    let (mut h, mut w) = (0, 0);
    for t in &graph.tasks {
        let hm = values[t.heatmap]
            .take()
            .ok_or_else(|| EngineError::Internal("heatmap not computed".into()))?;
        (h, w) = (hm.shape[2], hm.shape[3]);
        let mut regression = Vec::new();
        for &v in &t.regression {
            let r = values[v]
                .take()
                .ok_or_else(|| EngineError::Internal("regression not computed".into()))?;
            regression.extend_from_slice(&r.data);
        }
        tasks.push(TaskMaps {
            heatmap: hm.data,
            regression,
        });
    }
    Ok(HeadOutputs { tasks, h, w })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::model::ModelConfig;
    use crate::model::graph::Graph;
    use crate::model::voxelize::{Mode, Pillars, Voxelizer, decorate};
    use crate::ops::batchnorm::Layout;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A small pillar model exercising every node kind (two PFN layers, strided conv,
    /// conv and transposed-conv upsampling, concat, two tasks).
    pub(crate) const TINY: &str = include_str!("../../tests/fixtures/tiny_model.yaml");

    /// Random weights with non-trivial BatchNorm statistics.
    pub(crate) fn random_weights(graph: &Graph, seed: u64) -> Weights {
        let mut w = Weights::init(graph, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed + 1);
        for (name, t) in w.tensors.iter_mut() {
            if name.ends_with("running_var") {
                t.data
                    .iter_mut()
                    .for_each(|v| *v = rng.random_range(0.5..2.0));
            } else if name.ends_with("running_mean")
                || name.contains("norm.bias")
                || name.ends_with(".2.bias")
            {
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

    pub(crate) fn scan(seed: u64, n: usize) -> crate::cloud::Points {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut p = crate::cloud::Points::default();
        for _ in 0..n {
            p.push(
                rng.random_range(-13.0..13.0),
                rng.random_range(-13.0..13.0),
                rng.random_range(-2.0..1.0),
                rng.random_range(0.0..1.0),
            );
        }
        p
    }

    /// Reference interpreter: BatchNorm applied as its own op (not folded).
    fn reference(graph: &Graph, w: &Weights, input: &NetInput<'_>) -> HeadOutputs {
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let mut values: Vec<Option<Tensor>> = vec![None; graph.nodes.len() + 1];
        values[0] = Some(Tensor::new(vec![p, n, f], input.decorated.to_vec()).unwrap());
        for (i, node) in graph.nodes.iter().enumerate() {
            let x = values[node.inputs[0]].clone().unwrap();
            let out = match &node.op {
                op @ (Op::Add { .. } | Op::HeightCompress { .. }) => {
                    panic!("{op:?} in a pillar model")
                }
                Op::Layer(l) => {
                    let wt = w.get(&format!("{}.weight", l.param)).unwrap();
                    let b = l
                        .bias
                        .then(|| w.get(&format!("{}.bias", l.param)).unwrap().data.clone());
                    let mut y = match l.kind {
                        k @ LayerKind::SparseConv3d { .. } => panic!("{k:?} in a pillar model"),
                        LayerKind::Linear => ops::linear::forward(&x, wt, b.as_deref()).unwrap(),
                        LayerKind::Conv2d {
                            stride, padding, ..
                        } => ops::conv2d::forward(
                            &x,
                            wt,
                            b.as_deref(),
                            Conv2dParams::new(stride, padding),
                        )
                        .unwrap(),
                        LayerKind::ConvTranspose2d { stride, .. } => {
                            ops::conv_transpose2d::forward(
                                &x,
                                wt,
                                b.as_deref(),
                                ConvTranspose2dParams::new(stride, 0),
                            )
                            .unwrap()
                        }
                    };
                    if let Some((bn, eps)) = &l.bn {
                        let g = |s: &str| w.get(&format!("{bn}.{s}")).unwrap().data.clone();
                        let bn = BatchNorm {
                            gamma: g("weight"),
                            beta: g("bias"),
                            running_mean: g("running_mean"),
                            running_var: g("running_var"),
                            eps: *eps,
                            momentum: 0.1,
                        };
                        let layout = if l.kind == LayerKind::Linear {
                            Layout::ChannelsLast
                        } else {
                            Layout::ChannelsFirst
                        };
                        y = batchnorm::forward_eval(&bn, &y, layout).unwrap();
                    }
                    if l.relu {
                        y = ops::relu::forward(&y);
                    }
                    y
                }
                Op::PillarMax { concat_back, .. } => {
                    let (m, _) = ops::pillar_max::forward(&x, input.counts).unwrap();
                    if *concat_back {
                        concat_pillar_max(&x, &m)
                    } else {
                        m
                    }
                }
                Op::Scatter { .. } => {
                    let img =
                        ops::scatter::forward(&x, &cells(input.coords), graph.bev.0, graph.bev.1)
                            .unwrap();
                    let s = img.shape.clone();
                    img.reshape(vec![1, s[0], s[1], s[2]]).unwrap()
                }
                Op::Concat => {
                    let ins: Vec<Tensor> = node
                        .inputs
                        .iter()
                        .map(|&v| values[v].clone().unwrap())
                        .collect();
                    ops::concat::forward(&ins.iter().collect::<Vec<_>>(), 1).unwrap()
                }
            };
            values[i + 1] = Some(out);
        }
        collect_heads(graph, &mut values).unwrap()
    }

    /// BatchNorm (unfolded) of a layer on `[N, C]` rows or an NCHW image.
    fn bn_eval(w: &Weights, l: &crate::model::graph::Layer, y: Tensor, layout: Layout) -> Tensor {
        let Some((bn, eps)) = &l.bn else { return y };
        let g = |s: &str| w.get(&format!("{bn}.{s}")).unwrap().data.clone();
        let bn = BatchNorm {
            gamma: g("weight"),
            beta: g("bias"),
            running_mean: g("running_mean"),
            running_var: g("running_var"),
            eps: *eps,
            momentum: 0.1,
        };
        batchnorm::forward_eval(&bn, &y, layout).unwrap()
    }

    /// Dense reference of a voxel model, f64 throughout the sparse part: every site set is
    /// a dense grid with an activity mask; a sparse conv is a naive dense 3D convolution
    /// read at the active outputs (submanifold: the input mask; regular: every output some
    /// active input reaches), BN unfolded, inactive sites zero; the 2D part as `reference`.
    fn dense_voxel_reference(graph: &Graph, w: &Weights, input: &NetInput<'_>) -> HeadOutputs {
        use crate::model::graph::SparseSpec;
        let sp: &SparseSpec = graph.sparse.as_ref().unwrap();
        // Masks of every site set, from the voxels by dilation through the regular convs.
        let mut masks: Vec<Vec<bool>> = vec![Vec::new(); sp.grids.len()];
        let g0 = sp.grids[0];
        masks[0] = vec![false; g0.iter().product()];
        for c in input.coords {
            masks[0][(c[0] as usize * g0[1] + c[1] as usize) * g0[2] + c[2] as usize] = true;
        }
        // Reach of input site `i` (z, y, x) with kernel index `k` on an output grid.
        let reach = |i: [usize; 3], k: [usize; 3], r: &crate::model::graph::RulebookSpec| {
            let go = sp.grids[r.output];
            let mut o = [0usize; 3];
            for a in 0..3 {
                let t = i[a] as i64 + r.padding[a] as i64 - k[a] as i64;
                if t < 0 || t % r.stride[a] as i64 != 0 || t / r.stride[a] as i64 >= go[a] as i64 {
                    return None;
                }
                o[a] = (t / r.stride[a] as i64) as usize;
            }
            Some(o)
        };
        for r in sp.rulebooks.iter().filter(|r| !r.submanifold) {
            let (gi, go) = (sp.grids[r.input], sp.grids[r.output]);
            let mut m = vec![false; go.iter().product()];
            for z in 0..gi[0] {
                for y in 0..gi[1] {
                    for x in 0..gi[2] {
                        if !masks[r.input][(z * gi[1] + y) * gi[2] + x] {
                            continue;
                        }
                        for a in 0..r.kernel[0] {
                            for b in 0..r.kernel[1] {
                                for c in 0..r.kernel[2] {
                                    if let Some(o) = reach([z, y, x], [a, b, c], r) {
                                        m[(o[0] * go[1] + o[1]) * go[2] + o[2]] = true;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            masks[r.output] = m;
        }
        // Dense sparse-part values: (site set, channels, data [C, D, H, W] in f64).
        let mut dense: Vec<Option<(usize, usize, Vec<f64>)>> = vec![None; graph.nodes.len() + 1];
        let f = input.width;
        let n0: usize = g0.iter().product();
        let mut x0 = vec![0f64; f * n0];
        for (v, c) in input.coords.iter().enumerate() {
            let site = (c[0] as usize * g0[1] + c[1] as usize) * g0[2] + c[2] as usize;
            for ch in 0..f {
                x0[ch * n0 + site] = input.decorated[v * f + ch] as f64;
            }
        }
        dense[0] = Some((0, f, x0));
        let mut values: Vec<Option<Tensor>> = vec![None; graph.nodes.len() + 1];
        for (i, node) in graph.nodes.iter().enumerate() {
            match &node.op {
                Op::Layer(l) if matches!(l.kind, LayerKind::SparseConv3d { .. }) => {
                    let LayerKind::SparseConv3d { kernel, rulebook } = l.kind else {
                        unreachable!()
                    };
                    let r = &sp.rulebooks[rulebook];
                    let (set, cin, x) = dense[node.inputs[0]].clone().unwrap();
                    assert_eq!(set, r.input);
                    let (gi, go) = (sp.grids[r.input], sp.grids[r.output]);
                    let (ni, no) = (gi.iter().product::<usize>(), go.iter().product::<usize>());
                    let cout = l.out_channels;
                    let wt = w.get(&format!("{}.weight", l.param)).unwrap();
                    let mut y = vec![0f64; cout * no];
                    for z in 0..gi[0] {
                        for yy in 0..gi[1] {
                            for xx in 0..gi[2] {
                                let si = (z * gi[1] + yy) * gi[2] + xx;
                                if !masks[r.input][si] {
                                    continue;
                                }
                                for a in 0..kernel[0] {
                                    for b in 0..kernel[1] {
                                        for c in 0..kernel[2] {
                                            let Some(o) = reach([z, yy, xx], [a, b, c], r) else {
                                                continue;
                                            };
                                            let so = (o[0] * go[1] + o[1]) * go[2] + o[2];
                                            if !masks[r.output][so] {
                                                continue;
                                            }
                                            for co in 0..cout {
                                                let wbase = (((co * kernel[0] + a) * kernel[1]
                                                    + b)
                                                    * kernel[2]
                                                    + c)
                                                    * cin;
                                                let mut acc = 0f64;
                                                for ci in 0..cin {
                                                    acc += wt.data[wbase + ci] as f64
                                                        * x[ci * ni + si];
                                                }
                                                y[co * no + so] += acc;
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                    // Bias, BN, ReLU on the active rows only.
                    let active: Vec<usize> = (0..no).filter(|&s| masks[r.output][s]).collect();
                    let rows = Tensor::from_fn(&[active.len(), cout], |k| {
                        y[(k % cout) * no + active[k / cout]] as f32
                    });
                    let b = l
                        .bias
                        .then(|| w.get(&format!("{}.bias", l.param)).unwrap().data.clone());
                    let mut rows = rows;
                    if let Some(b) = b {
                        for (k, v) in rows.data.iter_mut().enumerate() {
                            *v += b[k % cout];
                        }
                    }
                    let mut rows = bn_eval(w, l, rows, Layout::ChannelsLast);
                    if l.relu {
                        rows = ops::relu::forward(&rows);
                    }
                    let mut out = vec![0f64; cout * no];
                    for (k, &s) in active.iter().enumerate() {
                        for co in 0..cout {
                            out[co * no + s] = rows.data[k * cout + co] as f64;
                        }
                    }
                    dense[i + 1] = Some((r.output, cout, out));
                }
                Op::Add { relu } => {
                    let (set, c, a) = dense[node.inputs[0]].clone().unwrap();
                    let (_, _, b) = dense[node.inputs[1]].clone().unwrap();
                    let y = a
                        .iter()
                        .zip(&b)
                        .map(|(p, q)| if *relu { (p + q).max(0.0) } else { p + q })
                        .collect();
                    dense[i + 1] = Some((set, c, y));
                }
                Op::HeightCompress { sites, .. } => {
                    let (set, c, x) = dense[node.inputs[0]].clone().unwrap();
                    assert_eq!(set, *sites);
                    let [d, h, ww] = sp.grids[set];
                    // [C, D, H, W] viewed as [1, C * D, H, W].
                    let t =
                        Tensor::new(vec![1, c * d, h, ww], x.iter().map(|&v| v as f32).collect())
                            .unwrap();
                    values[i + 1] = Some(t);
                }
                Op::Layer(l) => {
                    let x = values[node.inputs[0]].clone().unwrap();
                    let wt = w.get(&format!("{}.weight", l.param)).unwrap();
                    let b = l
                        .bias
                        .then(|| w.get(&format!("{}.bias", l.param)).unwrap().data.clone());
                    let y = match l.kind {
                        LayerKind::Conv2d {
                            stride, padding, ..
                        } => ops::conv2d::forward(
                            &x,
                            wt,
                            b.as_deref(),
                            Conv2dParams::new(stride, padding),
                        )
                        .unwrap(),
                        LayerKind::ConvTranspose2d { stride, .. } => {
                            ops::conv_transpose2d::forward(
                                &x,
                                wt,
                                b.as_deref(),
                                ConvTranspose2dParams::new(stride, 0),
                            )
                            .unwrap()
                        }
                        k => panic!("unexpected {k:?} in the 2D part"),
                    };
                    let mut y = bn_eval(w, l, y, Layout::ChannelsFirst);
                    if l.relu {
                        y = ops::relu::forward(&y);
                    }
                    values[i + 1] = Some(y);
                }
                Op::Concat => {
                    let ins: Vec<Tensor> = node
                        .inputs
                        .iter()
                        .map(|&v| values[v].clone().unwrap())
                        .collect();
                    values[i + 1] =
                        Some(ops::concat::forward(&ins.iter().collect::<Vec<_>>(), 1).unwrap());
                }
                op => panic!("unexpected {op:?} in a voxel model"),
            }
        }
        collect_heads(graph, &mut values).unwrap()
    }

    #[test]
    fn voxel_model_matches_a_dense_reference() {
        let cfg =
            ModelConfig::from_yaml(include_str!("../../tests/fixtures/tiny_voxel.yaml")).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let sp = graph.sparse.as_ref().unwrap();
        assert_eq!(
            sp.grids,
            vec![[16, 32, 32], [8, 16, 16], [3, 8, 8], [1, 8, 8]]
        );
        assert_eq!(graph.bev, (8, 8));
        let w = random_weights(&graph, 11);
        let engine = Fp32Engine::new(&graph, &w).unwrap();
        // Points inside the range, clustered so that voxels have neighbours.
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut pts = crate::cloud::Points::default();
        for _ in 0..1500 {
            let (cx, cy) = (
                rng.random_range(-5.0..5.0f32),
                rng.random_range(-5.0..5.0f32),
            );
            for _ in 0..3 {
                pts.push(
                    cx + rng.random_range(-0.6..0.6),
                    cy + rng.random_range(-0.6..0.6),
                    rng.random_range(-2.5..2.5),
                    rng.random_range(0.0..1.0),
                );
            }
        }
        let mut vm = crate::model::voxel_mean::VoxelMean::from_config(&cfg, Mode::Test).unwrap();
        let v = vm.voxelize(&pts, None).unwrap();
        assert!(v.voxels.len() > 1000, "{} voxels", v.voxels.len());
        let input = NetInput {
            decorated: &v.voxels.features.data,
            max_points: 1,
            width: v.voxels.channels(),
            counts: &v.counts,
            coords: &v.voxels.coords,
        };
        let got = engine.run(&input).unwrap();
        let want = dense_voxel_reference(&graph, &w, &input);
        assert_eq!((got.h, got.w), (8, 8));
        let mut worst = 0f32;
        for (g, r) in got.tasks.iter().zip(&want.tasks) {
            for (a, b) in g
                .heatmap
                .iter()
                .chain(&g.regression)
                .zip(r.heatmap.iter().chain(&r.regression))
            {
                worst = worst.max((a - b).abs() / (1.0 + b.abs()));
            }
        }
        assert!(worst < 1e-4, "worst relative error {worst}");
        // The detector runs the same model from points.
        let mut det = crate::detector::Detector::new(cfg.clone(), &w).unwrap();
        assert_eq!(det.head_outputs(&pts).unwrap(), got);
        assert_eq!(det.last_voxel_count(), v.voxels.len());
        // The INT8 detector runs it too, as the simulated-integer network does.
        let qm = crate::quant::quick::minmax_quick(&cfg, &graph, &w, std::slice::from_ref(&pts))
            .unwrap();
        let sim = crate::quant::QuantNet::new(&graph, &w, &qm)
            .unwrap()
            .run(&input)
            .unwrap();
        let mut det = crate::detector::Detector::new_int8(cfg.clone(), &w, &qm).unwrap();
        assert_eq!(det.head_outputs(&pts).unwrap(), sim);
    }

    #[test]
    fn folded_engine_matches_the_unfolded_reference() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let w = random_weights(&graph, 3);
        let engine = Fp32Engine::new(&graph, &w).unwrap();
        let pts = scan(5, 3000);
        let mut vox = Voxelizer::new(&cfg, Mode::Test);
        let mut pil = Pillars::default();
        vox.voxelize(&pts, None, &mut pil);
        let mut dec = Vec::new();
        let width = decorate(&cfg, &pil, &mut dec);
        let input = NetInput {
            decorated: &dec,
            max_points: pil.max_points,
            width,
            counts: &pil.counts,
            coords: &pil.coords,
        };
        let got = engine.run(&input).unwrap();
        let want = reference(&graph, &w, &input);
        assert_eq!((got.h, got.w), (8, 8));
        assert_eq!(got.tasks.len(), 2);
        for (g, r) in got.tasks.iter().zip(&want.tasks) {
            assert_eq!(g.heatmap.len(), r.heatmap.len());
            assert_eq!(g.regression.len(), r.regression.len());
            for (a, b) in g
                .heatmap
                .iter()
                .chain(&g.regression)
                .zip(r.heatmap.iter().chain(&r.regression))
            {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        // Observing every value runs the pillar net unfused: the same maps, bit for bit.
        assert_eq!(engine.run_observed(&input, &mut |_, _| {}).unwrap(), got);
        // The outputs depend on the input: an empty scan gives different maps.
        let empty = NetInput {
            decorated: &[],
            max_points: pil.max_points,
            width,
            counts: &[],
            coords: &[],
        };
        assert_ne!(engine.run(&empty).unwrap(), got);
    }

    #[test]
    fn mismatched_weights_are_refused() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let mut w = Weights::init(&graph, 1);
        w.tensors.remove("dense_head.shared_conv.0.weight");
        let e = Fp32Engine::new(&graph, &w).err().unwrap().to_string();
        assert!(e.contains("dense_head.shared_conv.0.weight"), "{e}");
    }
}
