//! INT8 inference on the CPU: a calibrated [`QuantModel`] executed in integer arithmetic.
//!
//! The semantics are exactly those of `quant::model`'s module doc: quantized values are
//! u8 codes, integer layers run the `kernels` (i32 accumulation, bias + requantization +
//! ReLU fused in the epilogue, or the dequantizing epilogue when the output value stays
//! float), glue ops move codes (pillar max and scatter keep their input's parameters,
//! empty pillars and cells get the zero point; concat copies), and kept-float layers
//! dequantize their input, run `fp32::run_layer` and quantize their output when it has
//! parameters.
//!
//! The execution plan is built once in [`Int8Engine::new`]: packed weights per layer, and
//! a buffer (slot) per live value, reused by liveness, so a scan allocates nothing in
//! steady state ([`Int8Engine::run_into`]; float layers, which use the allocating `ops`,
//! are the exception). The neck's concat is free: its inputs are written straight into
//! the concat's buffer at their channel offsets.

use super::fp32::{FoldedLayer, fold_layers, run_layer, run_sparse_layer};
use super::sparse::{FrameSites, frame_sites, no_sites};
use super::{EngineError, HeadOutputs, NetInput, TaskMaps};
use crate::kernels::{
    Epilogue, Isa, PackedConv, PackedConvTranspose, PackedLinear, PackedSparseConv,
};
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::weights::Weights;
use crate::ops::Tensor;
use crate::quant::{LayerPlan, QParams, QuantModel, Requant, quantize_bias};
use rayon::prelude::*;

/// A value's shape: up to 4 dimensions (`[P, N, C]`, `[P, C]` or `[1, C, H, W]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Shape {
    dims: [usize; 4],
    rank: usize,
}

impl Shape {
    fn new(d: &[usize]) -> Shape {
        let mut dims = [0; 4];
        dims[..d.len()].copy_from_slice(d);
        Shape {
            dims,
            rank: d.len(),
        }
    }

    fn dims(&self) -> &[usize] {
        &self.dims[..self.rank]
    }

    fn len(&self) -> usize {
        self.dims().iter().product()
    }

    fn nchw(&self) -> [usize; 4] {
        self.dims
    }
}

/// Where a value lives: a slot of its type's pool, from an element offset.
#[derive(Debug, Clone, Copy)]
struct Loc {
    slot: usize,
    offset: usize,
}

/// A layer's packed integer kernel.
enum IntKernel {
    Linear(PackedLinear),
    Conv(PackedConv),
    ConvTranspose(PackedConvTranspose),
    /// A sparse conv and the index of its rulebook.
    Sparse(PackedSparseConv, usize),
}

enum Step {
    /// Integer layer; `zx` is the input zero point. `stack` is empty, or the layer runs
    /// sibling convs (same input, same geometry) stacked into one kernel, at the first of
    /// them: one im2col and packing of the input for all. Their output values (`stack`:
    /// value and channels, in node order) lie one after the other in the first one's
    /// buffer, so each reads as an ordinary value.
    Int {
        // Boxed: the packed kernels are much larger than the other steps.
        kernel: Box<IntKernel>,
        zx: u8,
        stack: Vec<(usize, usize)>,
    },
    /// Kept-float layer with its folded FP32 parameters.
    Float {
        kind: LayerKind,
        folded: FoldedLayer,
        relu: bool,
    },
    PillarMax {
        concat_back: bool,
        include_padding: bool,
    },
    Scatter,
    /// Residual add; inputs and output share parameters (codes add exactly).
    Add {
        relu: bool,
    },
    /// Sparse features on site set `sites` to the BEV image.
    HeightCompress {
        sites: usize,
    },
    /// `aliased`: the inputs were written into the output's buffer already.
    Concat {
        aliased: bool,
    },
    /// A conv whose output a stacked `Int` step computed already.
    InStack,
}

/// Rows a stacked kernel may hold: enough to share the input's im2col and packing among
/// several siblings, few enough that their outputs, all live at once, stay small.
const MAX_STACK_ROWS: usize = 512;

/// What stacking needs of an integer conv: its weights as given, and its epilogue.
struct ConvParts {
    codes: Vec<i8>,
    shape: [usize; 4],
    stride: usize,
    padding: usize,
    bias_q: Vec<i32>,
    epilogue: Epilogue,
}

/// The INT8 CPU engine.
pub struct Int8Engine {
    graph: Graph,
    isa: Isa,
    acts: Vec<Option<QParams>>,
    /// Per-feature scales of the input codes (`QuantModel::input_scales`).
    input_scales: Option<Vec<f32>>,
    steps: Vec<Step>,
    loc: Vec<Loc>,
    shapes: Vec<Shape>,
    u8_slots: Vec<Vec<u8>>,
    f32_slots: Vec<Vec<f32>>,
    /// Scatter duplicate check: the run number that last claimed each BEV cell.
    cell_stamp: Vec<u32>,
    run_count: u32,
    /// The frame's rulebooks (voxel models).
    sites: Option<FrameSites>,
}

impl Int8Engine {
    /// Plans the execution of `qm` on `graph`. `weights` (FP32) supply the kept-float
    /// layers. Uses [`Isa::detect`]; see [`with_isa`](Self::with_isa).
    pub fn new(graph: &Graph, weights: &Weights, qm: &QuantModel) -> Result<Self, EngineError> {
        Self::with_isa(graph, weights, qm, Isa::detect())
    }

    /// Like [`new`](Self::new) with an explicit kernel family.
    pub fn with_isa(
        graph: &Graph,
        weights: &Weights,
        qm: &QuantModel,
        isa: Isa,
    ) -> Result<Self, EngineError> {
        qm.validate(graph).map_err(EngineError::QuantModel)?;
        if !isa.is_available() {
            return Err(EngineError::Internal(format!(
                "the {isa:?} kernels do not run on this CPU"
            )));
        }
        let mut folded = fold_layers(graph, weights)?;
        let acts = qm.activations.clone();
        let mut steps = Vec::with_capacity(graph.nodes.len());
        let mut conv_parts: Vec<Option<ConvParts>> = (0..graph.nodes.len()).map(|_| None).collect();
        for (i, (node, plan)) in graph.nodes.iter().zip(&qm.layers).enumerate() {
            let step = match (&node.op, plan) {
                (Op::Layer(l), Some(LayerPlan::Int(w))) => {
                    let kerr = |source| EngineError::Kernel {
                        node: node.name.clone(),
                        source,
                    };
                    let inp = acts[node.inputs[0]].ok_or_else(|| {
                        EngineError::QuantModel(format!("{}: input not quantized", node.name))
                    })?;
                    let bias_q: Vec<i32> = w
                        .bias
                        .iter()
                        .zip(&w.scales)
                        .map(|(&b, &s)| quantize_bias(b, inp.scale, s))
                        .collect();
                    let epi = match &acts[i + 1] {
                        Some(out) => Epilogue::Requant(
                            w.scales
                                .iter()
                                .map(|&s| Requant::new(inp.scale, s, out, l.relu))
                                .collect(),
                        ),
                        None => Epilogue::Dequant {
                            input_scale: inp.scale,
                            weight_scale: w.scales.clone(),
                            relu: l.relu,
                        },
                    };
                    let kernel = match l.kind {
                        LayerKind::Linear => IntKernel::Linear(
                            PackedLinear::with_epilogue(
                                &w.codes,
                                l.out_channels,
                                l.in_channels,
                                &bias_q,
                                epi,
                            )
                            .map_err(kerr)?,
                        ),
                        LayerKind::Conv2d {
                            kernel,
                            stride,
                            padding,
                        } => {
                            let shape = [l.out_channels, l.in_channels, kernel, kernel];
                            conv_parts[i] = Some(ConvParts {
                                codes: w.codes.clone(),
                                shape,
                                stride,
                                padding,
                                bias_q: bias_q.clone(),
                                epilogue: epi.clone(),
                            });
                            IntKernel::Conv(
                                PackedConv::with_epilogue(
                                    &w.codes,
                                    shape,
                                    &bias_q,
                                    epi,
                                    (stride, stride),
                                    (padding, padding),
                                )
                                .map_err(kerr)?,
                            )
                        }
                        LayerKind::ConvTranspose2d { kernel, stride } => IntKernel::ConvTranspose(
                            PackedConvTranspose::with_epilogue(
                                &w.codes,
                                [l.in_channels, l.out_channels, kernel, kernel],
                                &bias_q,
                                epi,
                                (stride, stride),
                                (0, 0),
                            )
                            .map_err(kerr)?,
                        ),
                        LayerKind::SparseConv3d { kernel, rulebook } => IntKernel::Sparse(
                            PackedSparseConv::with_epilogue(
                                &w.codes,
                                [
                                    l.out_channels,
                                    kernel[0],
                                    kernel[1],
                                    kernel[2],
                                    l.in_channels,
                                ],
                                &bias_q,
                                epi,
                            )
                            .map_err(kerr)?,
                            rulebook,
                        ),
                    };
                    Step::Int {
                        kernel: Box::new(kernel),
                        zx: inp.zero_point as u8,
                        stack: Vec::new(),
                    }
                }
                (Op::Layer(l), _) => Step::Float {
                    kind: l.kind,
                    folded: folded[i].take().ok_or_else(|| {
                        EngineError::Internal(format!("{} not folded", node.name))
                    })?,
                    relu: l.relu,
                },
                (
                    Op::PillarMax {
                        concat_back,
                        include_padding,
                    },
                    _,
                ) => Step::PillarMax {
                    concat_back: *concat_back,
                    include_padding: *include_padding,
                },
                (Op::Scatter { .. }, _) => Step::Scatter,
                (Op::Concat, _) => Step::Concat { aliased: false },
                (Op::Add { relu }, _) => Step::Add { relu: *relu },
                (Op::HeightCompress { sites, .. }, _) => Step::HeightCompress { sites: *sites },
            };
            steps.push(step);
        }
        stack_siblings(graph, &conv_parts, &mut steps)?;
        let (loc, n_u8, n_f32) = plan_memory(graph, &acts, &mut steps);
        let (ny, nx) = graph.bev;
        Ok(Self {
            graph: graph.clone(),
            isa,
            acts,
            input_scales: qm.input_scales.clone(),
            steps,
            loc,
            shapes: vec![Shape::default(); graph.nodes.len() + 1],
            u8_slots: vec![Vec::new(); n_u8],
            f32_slots: vec![Vec::new(); n_f32],
            cell_stamp: vec![0; ny * nx],
            run_count: 0,
            sites: None,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The kernel family in use.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Resident bytes of the parameters: packed integer layers (one byte per weight plus
    /// per-channel terms) and the f32 weights of kept-float layers.
    pub fn weight_bytes(&self) -> usize {
        self.steps
            .iter()
            .map(|s| match s {
                Step::Int { kernel, .. } => match kernel.as_ref() {
                    IntKernel::Linear(k) => k.weight_bytes(),
                    IntKernel::Conv(k) => k.weight_bytes(),
                    IntKernel::ConvTranspose(k) => k.weight_bytes(),
                    IntKernel::Sparse(k, _) => k.weight_bytes(),
                },
                Step::Float { folded, .. } => 4 * (folded.weight.data.len() + folded.bias.len()),
                _ => 0,
            })
            .sum()
    }

    /// Runs the network on one frame's decorated pillars.
    pub fn run(&mut self, input: &NetInput<'_>) -> Result<HeadOutputs, EngineError> {
        let mut out = HeadOutputs {
            tasks: Vec::new(),
            h: 0,
            w: 0,
        };
        self.run_into(input, &mut out)?;
        Ok(out)
    }

    /// Runs the network into `out`, reusing its buffers.
    pub fn run_into(
        &mut self,
        input: &NetInput<'_>,
        out: &mut HeadOutputs,
    ) -> Result<(), EngineError> {
        self.run_observed(input, out, &mut |_| {})
    }

    /// [`run_into`](Self::run_into), calling `after_node(i)` when node `i` is done (for
    /// per-stage timing).
    pub fn run_observed(
        &mut self,
        input: &NetInput<'_>,
        out: &mut HeadOutputs,
        after_node: &mut dyn FnMut(usize),
    ) -> Result<(), EngineError> {
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        check_input(input, self.graph.sparse.is_none())?;
        if let Some(scales) = &self.input_scales
            && scales.len() != f
        {
            return Err(EngineError::Input(format!(
                "{f} features per point, the model has input scales for {}",
                scales.len()
            )));
        }
        // A voxel model: the frame's rulebooks.
        self.sites = frame_sites(&self.graph, input.coords)?;
        self.shapes[0] = if self.sites.is_some() {
            Shape::new(&[p, n * f])
        } else {
            Shape::new(&[p, n, f])
        };
        // The input value: codes, or the floats as they are.
        let l0 = self.loc[0];
        match self.acts[0] {
            Some(q) => {
                // One scale, or one per feature: the layers reading the input carry the
                // per-feature scales in their weight codes.
                let per_feature: Vec<QParams> = match &self.input_scales {
                    Some(s) => s.iter().map(|&scale| QParams { scale, ..q }).collect(),
                    None => vec![q],
                };
                let width = per_feature.len();
                let dst = slot(&mut self.u8_slots, l0, p * n * f);
                // Chunks are a multiple of the feature count, so feature j sits at
                // offset j modulo the width within each chunk.
                let chunk = 4096 * width;
                dst.par_chunks_mut(chunk)
                    .zip(input.decorated.par_chunks(chunk))
                    .for_each(|(d, s)| quantize_rows(d, s, &per_feature));
            }
            None => slot(&mut self.f32_slots, l0, p * n * f).copy_from_slice(input.decorated),
        }
        self.run_count = self.run_count.wrapping_add(1);
        if self.run_count == 0 {
            self.cell_stamp.fill(0);
            self.run_count = 1;
        }
        for i in 0..self.graph.nodes.len() {
            self.node(i, input)?;
            after_node(i);
        }
        self.collect(out)
    }

    fn node(&mut self, i: usize, input: &NetInput<'_>) -> Result<(), EngineError> {
        let node = &self.graph.nodes[i];
        let v = i + 1;
        let x = node.inputs[0];
        let (xs, xl, yl) = (self.shapes[x], self.loc[x], self.loc[v]);
        let name = &node.name;
        let kerr = |source| EngineError::Kernel {
            node: name.clone(),
            source,
        };
        let out_q = self.acts[v];
        let shape = match &self.steps[i] {
            Step::Int { kernel, zx, stack } => {
                let isa = self.isa;
                let os = match kernel.as_ref() {
                    IntKernel::Linear(k) => {
                        let [pp, nn, _] = [xs.dims[0], xs.dims[1], xs.dims[2]];
                        if xs.rank != 3 {
                            return Err(EngineError::Internal(format!("{name}: rank {}", xs.rank)));
                        }
                        Shape::new(&[pp, nn, k.cout])
                    }
                    IntKernel::Conv(k) => Shape::new(&k.output_shape(xs.nchw()).map_err(kerr)?),
                    IntKernel::ConvTranspose(k) => {
                        Shape::new(&k.output_shape(xs.nchw()).map_err(kerr)?)
                    }
                    IntKernel::Sparse(k, r) => {
                        let fs = self.sites.as_ref().ok_or_else(|| no_sites(name))?;
                        Shape::new(&[fs.rulebooks[*r].n_out(), k.cout])
                    }
                };
                // Input and output are never in one slot (planned), so the output slot is
                // taken out of its pool for the call.
                let len = os.len();
                macro_rules! call {
                    ($pool:ident, $fwd:ident) => {{
                        let mut buf = std::mem::take(&mut self.$pool[yl.slot]);
                        if buf.len() < yl.offset + len {
                            buf.resize(yl.offset + len, Default::default());
                        }
                        let y = &mut buf[yl.offset..yl.offset + len];
                        let r = view(&self.u8_slots, xl, xs.len()).and_then(|xin| {
                            match kernel.as_ref() {
                                IntKernel::Linear(k) => {
                                    k.$fwd(isa, xin, xs.dims[0] * xs.dims[1], *zx, y)
                                }
                                IntKernel::Conv(k) => {
                                    k.$fwd(isa, xin, xs.nchw(), *zx, y).map(|_| ())
                                }
                                IntKernel::ConvTranspose(k) => {
                                    k.$fwd(isa, xin, xs.nchw(), *zx, y).map(|_| ())
                                }
                                IntKernel::Sparse(k, r) => match &self.sites {
                                    Some(fs) => k.$fwd(isa, xin, &fs.rulebooks[*r], *zx, y),
                                    None => unreachable!("the output shape needed the sites"),
                                },
                            }
                            .map_err(kerr)
                        });
                        self.$pool[yl.slot] = buf;
                        r?;
                    }};
                }
                if out_q.is_some() {
                    if xl.slot == yl.slot {
                        return Err(EngineError::Internal(format!("{name}: slot reuse")));
                    }
                    call!(u8_slots, forward);
                } else {
                    call!(f32_slots, forward_f32);
                }
                if stack.is_empty() {
                    os
                } else {
                    let [n, _, h, w] = os.nchw();
                    for &(m, cm) in stack {
                        self.shapes[m] = Shape::new(&[n, cm, h, w]);
                    }
                    self.shapes[v]
                }
            }
            Step::Float { kind, folded, relu } => {
                let data = match (self.acts[x], &self.input_scales) {
                    (Some(q), Some(scales)) if x == 0 => view(&self.u8_slots, xl, xs.len())?
                        .iter()
                        .enumerate()
                        .map(|(k, &c)| {
                            QParams {
                                scale: scales[k % scales.len()],
                                ..q
                            }
                            .dequantize(c as i32)
                        })
                        .collect(),
                    (Some(q), _) => view(&self.u8_slots, xl, xs.len())?
                        .iter()
                        .map(|&c| q.dequantize(c as i32))
                        .collect(),
                    (None, _) => view(&self.f32_slots, xl, xs.len())?.to_vec(),
                };
                let t =
                    Tensor::new(xs.dims().to_vec(), data).map_err(|e| EngineError::op(name, e))?;
                let y = match kind {
                    LayerKind::SparseConv3d { rulebook, .. } => {
                        let fs = self.sites.as_ref().ok_or_else(|| no_sites(name))?;
                        run_sparse_layer(&fs.rulebooks[*rulebook], &t, folded, *relu)
                    }
                    _ => run_layer(*kind, &t, folded, *relu),
                }
                .map_err(|e| EngineError::op(name, e))?;
                let os = Shape::new(&y.shape);
                match out_q {
                    Some(q) => slot(&mut self.u8_slots, yl, y.data.len())
                        .iter_mut()
                        .zip(&y.data)
                        .for_each(|(d, &v)| *d = q.quantize(v) as u8),
                    None => slot(&mut self.f32_slots, yl, y.data.len()).copy_from_slice(&y.data),
                }
                os
            }
            Step::PillarMax {
                concat_back,
                include_padding,
            } => {
                let [pp, nn, c] = [xs.dims[0], xs.dims[1], xs.dims[2]];
                let os = if *concat_back {
                    Shape::new(&[pp, nn, 2 * c])
                } else {
                    Shape::new(&[pp, c])
                };
                let counts = (!include_padding).then_some(input.counts);
                match out_q {
                    Some(q) => {
                        let (xin, y) = pair(&mut self.u8_slots, xl, xs.len(), yl, os.len())?;
                        pillar_max(
                            xin,
                            [pp, nn, c],
                            counts,
                            q.zero_point as u8,
                            *concat_back,
                            y,
                        );
                    }
                    None => {
                        let (xin, y) = pair(&mut self.f32_slots, xl, xs.len(), yl, os.len())?;
                        pillar_max(xin, [pp, nn, c], counts, 0.0, *concat_back, y);
                    }
                }
                os
            }
            Step::Scatter => {
                let (ny, nx) = self.graph.bev;
                let c = xs.dims[1];
                let os = Shape::new(&[1, c, ny, nx]);
                check_cells(input.coords, (ny, nx), &mut self.cell_stamp, self.run_count)?;
                match out_q {
                    Some(q) => {
                        let (xin, y) = pair(&mut self.u8_slots, xl, xs.len(), yl, os.len())?;
                        scatter(xin, c, input.coords, (ny, nx), q.zero_point as u8, y);
                    }
                    None => {
                        let (xin, y) = pair(&mut self.f32_slots, xl, xs.len(), yl, os.len())?;
                        scatter(xin, c, input.coords, (ny, nx), 0.0, y);
                    }
                }
                os
            }
            Step::Add { relu } => {
                let b = node.inputs[1];
                let (bs, bl) = (self.shapes[b], self.loc[b]);
                if bs != xs {
                    return Err(EngineError::Internal(format!(
                        "{name}: adding shapes {:?} and {:?}",
                        xs.dims(),
                        bs.dims()
                    )));
                }
                let len = xs.len();
                let relu = *relu;
                match (self.acts[x], out_q) {
                    (Some(qi), Some(qo)) => {
                        // Shared input parameters: the sum of centred codes is exact, then
                        // requantized into the output's parameters.
                        let r = crate::quant::scheme::add_requant(qi.scale, &qo, relu);
                        let zi = qi.zero_point;
                        // Two u8 codes have 511 sums: tabulate the requantization once.
                        let table: Vec<u8> =
                            (0..=510).map(|s| r.apply(s - 2 * zi, 0) as u8).collect();
                        let mut buf = std::mem::take(&mut self.u8_slots[yl.slot]);
                        if buf.len() < yl.offset + len {
                            buf.resize(yl.offset + len, 0);
                        }
                        let res = view(&self.u8_slots, xl, len).and_then(|a| {
                            let bv = view(&self.u8_slots, bl, len)?;
                            buf[yl.offset..yl.offset + len]
                                .par_chunks_mut(4096)
                                .zip(a.par_chunks(4096).zip(bv.par_chunks(4096)))
                                .for_each(|(o, (a, b))| {
                                    for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                                        *o = table[a as usize + b as usize];
                                    }
                                });
                            Ok(())
                        });
                        self.u8_slots[yl.slot] = buf;
                        res?;
                    }
                    (qi, qo) => {
                        // A float side (kept-float neighbours): add in reals.
                        let real = |v: usize| -> Result<Vec<f32>, EngineError> {
                            let l = self.loc[v];
                            Ok(match qi {
                                Some(q) => view(&self.u8_slots, l, len)?
                                    .iter()
                                    .map(|&c| q.dequantize(c as i32))
                                    .collect(),
                                None => view(&self.f32_slots, l, len)?.to_vec(),
                            })
                        };
                        let (a, bv) = (real(x)?, real(b)?);
                        let sum = a.iter().zip(&bv).map(|(&a, &b)| {
                            let v = a + b;
                            if relu && v < 0.0 { 0.0 } else { v }
                        });
                        match qo {
                            Some(q) => slot(&mut self.u8_slots, yl, len)
                                .iter_mut()
                                .zip(sum)
                                .for_each(|(d, v)| *d = q.quantize(v) as u8),
                            None => slot(&mut self.f32_slots, yl, len)
                                .iter_mut()
                                .zip(sum)
                                .for_each(|(d, v)| *d = v),
                        }
                    }
                }
                xs
            }
            Step::HeightCompress { sites: set } => {
                let fs = self.sites.as_ref().ok_or_else(|| no_sites(name))?;
                let coords = fs.sites(*set);
                let [d, h, w] = fs.grid(*set);
                let c = xs.dims[1];
                if xs.rank != 2 || xs.dims[0] != coords.len() {
                    return Err(EngineError::Internal(format!(
                        "{name}: {:?} features for {} sites",
                        xs.dims(),
                        coords.len()
                    )));
                }
                let os = Shape::new(&[1, c * d, h, w]);
                match out_q {
                    Some(q) => {
                        let (xin, y) = pair(&mut self.u8_slots, xl, xs.len(), yl, os.len())?;
                        height_compress(xin, c, coords, [d, h, w], q.zero_point as u8, y);
                    }
                    None => {
                        let (xin, y) = pair(&mut self.f32_slots, xl, xs.len(), yl, os.len())?;
                        height_compress(xin, c, coords, [d, h, w], 0.0, y);
                    }
                }
                os
            }
            Step::InStack => self.shapes[v],
            Step::Concat { aliased } => {
                let first = xs;
                let c: usize = node.inputs.iter().map(|&u| self.shapes[u].dims[1]).sum();
                let os = Shape::new(&[1, c, first.dims[2], first.dims[3]]);
                if !aliased {
                    let mut off = 0;
                    for &u in &node.inputs {
                        let (ul, len) = (self.loc[u], self.shapes[u].len());
                        let at = Loc {
                            slot: yl.slot,
                            offset: yl.offset + off,
                        };
                        match out_q {
                            Some(_) => {
                                let (s, d) = pair(&mut self.u8_slots, ul, len, at, len)?;
                                d.copy_from_slice(s);
                            }
                            None => {
                                let (s, d) = pair(&mut self.f32_slots, ul, len, at, len)?;
                                d.copy_from_slice(s);
                            }
                        }
                        off += len;
                    }
                }
                os
            }
        };
        self.shapes[v] = shape;
        Ok(())
    }

    /// Copies (or dequantizes) the head values into `out`.
    fn collect(&self, out: &mut HeadOutputs) -> Result<(), EngineError> {
        out.tasks.resize_with(self.graph.tasks.len(), || TaskMaps {
            heatmap: Vec::new(),
            regression: Vec::new(),
        });
        for (t, maps) in self.graph.tasks.iter().zip(&mut out.tasks) {
            let hm = self.shapes[t.heatmap];
            (out.h, out.w) = (hm.dims[2], hm.dims[3]);
            maps.heatmap.clear();
            self.append(t.heatmap, &mut maps.heatmap)?;
            maps.regression.clear();
            for &v in &t.regression {
                self.append(v, &mut maps.regression)?;
            }
        }
        Ok(())
    }

    fn append(&self, v: usize, dst: &mut Vec<f32>) -> Result<(), EngineError> {
        let len = self.shapes[v].len();
        match self.acts[v] {
            Some(q) => dst.extend(
                view(&self.u8_slots, self.loc[v], len)?
                    .iter()
                    .map(|&c| q.dequantize(c as i32)),
            ),
            None => dst.extend_from_slice(view(&self.f32_slots, self.loc[v], len)?),
        }
        Ok(())
    }
}

/// The slot buffer of `l`, grown to hold `len` elements from its offset.
/// `dst[k] = per_feature[k % width].quantize(src[k])`, row by row (no modulo per value).
/// On x86-64 with AVX2 the same loop is compiled with it, so rounding is one instruction
/// instead of a libm call; the operations, and so the codes, are the same.
fn quantize_rows(dst: &mut [u8], src: &[f32], per_feature: &[QParams]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 is available (checked above).
        return unsafe { quantize_rows_avx2(dst, src, per_feature) };
    }
    quantize_rows_portable(dst, src, per_feature)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn quantize_rows_avx2(dst: &mut [u8], src: &[f32], per_feature: &[QParams]) {
    quantize_rows_portable(dst, src, per_feature)
}

#[inline(always)]
fn quantize_rows_portable(dst: &mut [u8], src: &[f32], per_feature: &[QParams]) {
    let width = per_feature.len();
    for (d, s) in dst.chunks_mut(width).zip(src.chunks(width)) {
        for ((d, &x), q) in d.iter_mut().zip(s).zip(per_feature) {
            *d = q.quantize(x) as u8;
        }
    }
}

fn slot<T: Copy + Default>(pool: &mut [Vec<T>], l: Loc, len: usize) -> &mut [T] {
    let buf = &mut pool[l.slot];
    if buf.len() < l.offset + len {
        buf.resize(l.offset + len, T::default());
    }
    &mut buf[l.offset..l.offset + len]
}

fn view<T>(pool: &[Vec<T>], l: Loc, len: usize) -> Result<&[T], EngineError> {
    pool[l.slot]
        .get(l.offset..l.offset + len)
        .ok_or_else(|| EngineError::Internal(format!("value at {l:?} not computed")))
}

/// Input `a` and output `b` from one pool; their ranges must not overlap.
fn pair<T: Copy + Default>(
    pool: &mut [Vec<T>],
    a: Loc,
    alen: usize,
    b: Loc,
    blen: usize,
) -> Result<(&[T], &mut [T]), EngineError> {
    if a.slot == b.slot {
        let buf = &mut pool[a.slot];
        if buf.len() < b.offset + blen {
            buf.resize(b.offset + blen, T::default());
        }
        // Disjoint ranges of one buffer (a concat input copied into its own slot).
        if a.offset + alen <= b.offset {
            let (lo, hi) = buf.split_at_mut(b.offset);
            return Ok((&lo[a.offset..a.offset + alen], &mut hi[..blen]));
        }
        if b.offset + blen <= a.offset {
            let (lo, hi) = buf.split_at_mut(a.offset);
            return Ok((&hi[..alen], &mut lo[b.offset..b.offset + blen]));
        }
        return Err(EngineError::Internal(format!(
            "overlapping buffers {a:?} and {b:?}"
        )));
    }
    let (x, y) = if a.slot < b.slot {
        let (lo, hi) = pool.split_at_mut(b.slot);
        (&lo[a.slot], &mut hi[0])
    } else {
        let (lo, hi) = pool.split_at_mut(a.slot);
        (&hi[0], &mut lo[b.slot])
    };
    if y.len() < b.offset + blen {
        y.resize(b.offset + blen, T::default());
    }
    let x = x
        .get(a.offset..a.offset + alen)
        .ok_or_else(|| EngineError::Internal(format!("value at {a:?} not computed")))?;
    Ok((x, &mut y[b.offset..b.offset + blen]))
}

/// Checks the frame's arrays against each other (the kernels check the rest). A voxel
/// model's `counts` are the points averaged per voxel, not slots, so `pillars` says
/// whether they are checked against `max_points`.
pub(crate) fn check_input(input: &NetInput<'_>, pillars: bool) -> Result<(), EngineError> {
    let (p, n, f) = (input.counts.len(), input.max_points, input.width);
    if input.decorated.len() != p * n * f {
        return Err(EngineError::Input(format!(
            "{} decorated values for {p} pillars x {n} points x {f} features",
            input.decorated.len()
        )));
    }
    if input.coords.len() != p {
        return Err(EngineError::Input(format!(
            "{} pillar cells for {p} pillars",
            input.coords.len()
        )));
    }
    if let Some(k) = input.counts.iter().position(|&c| pillars && c as usize > n) {
        return Err(EngineError::Input(format!(
            "pillar {k} has {} points, more than the {n} slots",
            input.counts[k]
        )));
    }
    Ok(())
}

/// Every cell inside the grid and used once (as `ops::scatter` requires).
pub(crate) fn check_cells(
    coords: &[[u32; 3]],
    (ny, nx): (usize, usize),
    stamp: &mut [u32],
    run: u32,
) -> Result<(), EngineError> {
    for (i, c) in coords.iter().enumerate() {
        let (y, x) = (c[1] as usize, c[2] as usize);
        if y >= ny || x >= nx {
            return Err(EngineError::Input(format!(
                "pillar {i} at (y {y}, x {x}) is outside the {ny}x{nx} grid"
            )));
        }
        if std::mem::replace(&mut stamp[y * nx + x], run) == run {
            return Err(EngineError::Input(format!(
                "pillar {i} repeats cell (y {y}, x {x})"
            )));
        }
    }
    Ok(())
}

/// Max over each pillar's first `counts[p]` points (all `n` without counts); an empty
/// pillar gets `empty` (real 0). With `concat_back`, `[P, N, 2C]` = each point's features
/// then its pillar's max, as `fp32::concat_pillar_max`.
fn pillar_max<T: Copy + PartialOrd + Send + Sync>(
    x: &[T],
    [p, n, c]: [usize; 3],
    counts: Option<&[u32]>,
    empty: T,
    concat_back: bool,
    y: &mut [T],
) {
    let row = if concat_back { n * 2 * c } else { c };
    y.par_chunks_mut(row.max(1))
        .take(p)
        .enumerate()
        .for_each(|(pi, out)| {
            let k = counts.map_or(n, |cs| cs[pi] as usize);
            let pts = &x[pi * n * c..(pi + 1) * n * c];
            // The max goes where row 0 keeps it: after its features with `concat_back`.
            let at = if concat_back { c } else { 0 };
            let m = &mut out[at..at + c];
            match pts.get(..c) {
                Some(first) if k > 0 => m.copy_from_slice(first),
                _ => m.fill(empty),
            }
            for j in 1..k {
                for (o, &v) in m.iter_mut().zip(&pts[j * c..(j + 1) * c]) {
                    if v > *o {
                        *o = v;
                    }
                }
            }
            if concat_back {
                for j in 0..n {
                    out[j * 2 * c..j * 2 * c + c].copy_from_slice(&pts[j * c..(j + 1) * c]);
                    if j > 0 {
                        out.copy_within(c..2 * c, j * 2 * c + c);
                    }
                }
            }
        });
}

/// Pillar features `[P, C]` into the BEV image `[C, ny, nx]`; empty cells get `empty`.
fn scatter<T: Copy + Send + Sync>(
    x: &[T],
    c: usize,
    coords: &[[u32; 3]],
    (ny, nx): (usize, usize),
    empty: T,
    y: &mut [T],
) {
    let plane = ny * nx;
    y.par_chunks_mut(plane).enumerate().for_each(|(ch, img)| {
        img.fill(empty);
        for (i, cell) in coords.iter().enumerate() {
            img[cell[1] as usize * nx + cell[2] as usize] = x[i * c + ch];
        }
    });
}

/// Sparse features `[N, C]` on `coords` (z, y, x) of a `[D, H, W]` grid into the BEV image
/// `[C * D, H, W]` (channel `c * D + z`); empty cells get `empty` (real 0).
fn height_compress<T: Copy + Send + Sync>(
    x: &[T],
    c: usize,
    coords: &[[u32; 3]],
    [d, h, w]: [usize; 3],
    empty: T,
    y: &mut [T],
) {
    let plane = h * w;
    y.par_chunks_mut(d * plane)
        .enumerate()
        .for_each(|(ch, planes)| {
            planes.fill(empty);
            for (i, s) in coords.iter().enumerate() {
                planes[(s[0] as usize * h + s[1] as usize) * w + s[2] as usize] = x[i * c + ch];
            }
        });
    debug_assert_eq!(y.len(), c * d * plane);
}

/// Stacks sibling integer convs: those reading the same value with the same geometry and
/// the same kind of output (codes, or reals with the same ReLU), whose outputs have static
/// shapes and are not written into a concat, up to [`MAX_STACK_ROWS`] rows per stack.
/// Every output channel is computed exactly as alone (its own row of the GEMM), so
/// stacking changes no result.
fn stack_siblings(
    graph: &Graph,
    parts: &[Option<ConvParts>],
    steps: &mut [Step],
) -> Result<(), EngineError> {
    let shapes = static_shapes(graph);
    let mut concat_input = vec![false; graph.nodes.len() + 1];
    for n in &graph.nodes {
        if matches!(n.op, Op::Concat) {
            n.inputs.iter().for_each(|&u| concat_input[u] = true);
        }
    }
    let same_kind = |a: &Epilogue, b: &Epilogue| match (a, b) {
        (Epilogue::Requant(_), Epilogue::Requant(_)) => true,
        (
            Epilogue::Dequant {
                input_scale: sa,
                relu: ra,
                ..
            },
            Epilogue::Dequant {
                input_scale: sb,
                relu: rb,
                ..
            },
        ) => sa == sb && ra == rb,
        _ => false,
    };
    let int_step: Vec<bool> = steps
        .iter()
        .map(|s| matches!(s, Step::Int { .. }))
        .collect();
    let stackable = |j: usize| {
        parts[j].is_some() && shapes[j + 1].is_some() && !concat_input[j + 1] && int_step[j]
    };
    let mut taken = vec![false; graph.nodes.len()];
    for i in 0..graph.nodes.len() {
        if taken[i] || !stackable(i) {
            continue;
        }
        let lead = parts[i].as_ref().expect("stackable");
        let mut members = vec![i];
        let mut rows = lead.shape[0];
        for j in i + 1..graph.nodes.len() {
            let Some(p) = parts[j].as_ref().filter(|_| !taken[j] && stackable(j)) else {
                continue;
            };
            if graph.nodes[j].inputs == graph.nodes[i].inputs
                && p.shape[1..] == lead.shape[1..]
                && (p.stride, p.padding) == (lead.stride, lead.padding)
                && same_kind(&p.epilogue, &lead.epilogue)
                && rows + p.shape[0] <= MAX_STACK_ROWS
            {
                members.push(j);
                rows += p.shape[0];
            }
        }
        if members.len() < 2 {
            continue;
        }
        let ps: Vec<&ConvParts> = members
            .iter()
            .map(|&j| parts[j].as_ref().expect("stackable"))
            .collect();
        let epilogue = match &lead.epilogue {
            Epilogue::Requant(_) => Epilogue::Requant(
                ps.iter()
                    .flat_map(|p| match &p.epilogue {
                        Epilogue::Requant(r) => r.clone(),
                        Epilogue::Dequant { .. } => unreachable!("same kind"),
                    })
                    .collect(),
            ),
            Epilogue::Dequant {
                input_scale, relu, ..
            } => Epilogue::Dequant {
                input_scale: *input_scale,
                weight_scale: ps
                    .iter()
                    .flat_map(|p| match &p.epilogue {
                        Epilogue::Dequant { weight_scale, .. } => weight_scale.clone(),
                        Epilogue::Requant(_) => unreachable!("same kind"),
                    })
                    .collect(),
                relu: *relu,
            },
        };
        let codes: Vec<i8> = ps.iter().flat_map(|p| p.codes.iter().copied()).collect();
        let bias: Vec<i32> = ps.iter().flat_map(|p| p.bias_q.iter().copied()).collect();
        let [_, cin, kh, kw] = lead.shape;
        let kernel = PackedConv::with_epilogue(
            &codes,
            [rows, cin, kh, kw],
            &bias,
            epilogue,
            (lead.stride, lead.stride),
            (lead.padding, lead.padding),
        )
        .map_err(|source| EngineError::Kernel {
            node: graph.nodes[i].name.clone(),
            source,
        })?;
        let zx = match steps[i] {
            Step::Int { zx, .. } => zx,
            _ => unreachable!("stackable"),
        };
        steps[i] = Step::Int {
            kernel: Box::new(IntKernel::Conv(kernel)),
            zx,
            stack: members
                .iter()
                .zip(&ps)
                .map(|(&j, p)| (j + 1, p.shape[0]))
                .collect(),
        };
        for &j in &members {
            taken[j] = true;
        }
        for &j in &members[1..] {
            steps[j] = Step::InStack;
        }
    }
    Ok(())
}

/// Assigns every value a slot by liveness (a value's slot is free again after its last
/// reader) and aliases concat inputs into the concat's buffer. Returns the locations and
/// the u8 and f32 pool sizes.
fn plan_memory(
    graph: &Graph,
    acts: &[Option<QParams>],
    steps: &mut [Step],
) -> (Vec<Loc>, usize, usize) {
    let nv = graph.nodes.len() + 1;
    let head: Vec<usize> = graph
        .tasks
        .iter()
        .flat_map(|t| std::iter::once(t.heatmap).chain(t.regression.iter().copied()))
        .collect();
    let mut last_use: Vec<Option<usize>> = vec![None; nv];
    let mut readers = vec![0usize; nv];
    for (i, n) in graph.nodes.iter().enumerate() {
        for &u in &n.inputs {
            last_use[u] = Some(i);
            readers[u] += 1;
        }
    }
    for &v in &head {
        last_use[v] = Some(usize::MAX);
    }
    // Concat inputs read only by the concat, produced by layers, with static shapes, are
    // written in place: alias[u] = (concat value, element offset).
    let shapes = static_shapes(graph);
    let mut alias: Vec<Option<(usize, usize)>> = vec![None; nv];
    for (i, n) in graph.nodes.iter().enumerate() {
        if !matches!(n.op, Op::Concat) {
            continue;
        }
        let ok = n.inputs.iter().all(|&u| {
            u > 0
                && readers[u] == 1
                && !head.contains(&u)
                && shapes[u].is_some()
                && matches!(graph.nodes[u - 1].op, Op::Layer(_))
        });
        if ok {
            let mut off = 0;
            for &u in &n.inputs {
                alias[u] = Some((i + 1, off));
                off += shapes[u].map_or(0, |s| s.len());
            }
            steps[i] = Step::Concat { aliased: true };
        }
    }
    let is_u8 = |v: usize| acts[v].is_some();
    // Stacked outputs: one buffer per stack, each member at its offset; the buffer is free
    // again when every member is (`stack_live` counts the members still live).
    let mut stack_of: Vec<Option<usize>> = vec![None; nv];
    let mut stack_members: Vec<Vec<(usize, usize)>> = Vec::new();
    for step in steps.iter() {
        if let Step::Int { stack: members, .. } = step
            && !members.is_empty()
        {
            let mut off = 0;
            let placed = members
                .iter()
                .map(|&(m, _)| {
                    stack_of[m] = Some(stack_members.len());
                    let at = (m, off);
                    off += shapes[m].map_or(0, |s| s.len());
                    at
                })
                .collect();
            stack_members.push(placed);
        }
    }
    let mut stack_live: Vec<usize> = stack_members.iter().map(Vec::len).collect();
    let mut loc: Vec<Option<Loc>> = vec![None; nv];
    let mut pools = Pools::default();
    loc[0] = Some(pools.alloc(is_u8(0)));
    let mut to_free: Vec<(usize, bool)> = Vec::new();
    // A value that is dead now: its slot is free unless it lies in a concat's or a
    // stack's buffer (a stack's is free with its last member).
    let mut release = |u: usize, loc: &[Option<Loc>], to_free: &mut Vec<(usize, bool)>| {
        if alias[u].is_some() {
            return;
        }
        if let Some(g) = stack_of[u] {
            stack_live[g] -= 1;
            if stack_live[g] > 0 {
                return;
            }
        }
        to_free.push((loc[u].expect("planned").slot, is_u8(u)));
    };
    for (i, n) in graph.nodes.iter().enumerate() {
        let v = i + 1;
        if let Some(g) = stack_of[v]
            && loc[v].is_none()
        {
            // The first member: the stack's buffer, every member placed in it.
            let base = pools.alloc(is_u8(v));
            for &(m, off) in &stack_members[g] {
                loc[m] = Some(Loc {
                    slot: base.slot,
                    offset: off,
                });
            }
        }
        if loc[v].is_none() {
            loc[v] = Some(match alias[v] {
                Some((cv, off)) => {
                    let base = *loc[cv].get_or_insert_with(|| pools.alloc(is_u8(cv)));
                    Loc {
                        slot: base.slot,
                        offset: off,
                    }
                }
                None => pools.alloc(is_u8(v)),
            });
        }
        // Slots whose last reader is this node, and outputs nobody reads, free up now.
        to_free.clear();
        let mut dead: Vec<usize> = n.inputs.clone();
        dead.sort_unstable();
        dead.dedup();
        for &u in &dead {
            if last_use[u] == Some(i) {
                release(u, &loc, &mut to_free);
            }
        }
        if last_use[v].is_none() {
            release(v, &loc, &mut to_free);
        }
        to_free.sort_unstable();
        to_free.dedup();
        for &(s, u8_pool) in &to_free {
            pools.free(s, u8_pool);
        }
    }
    let loc = loc
        .into_iter()
        .map(|l| l.expect("every value planned"))
        .collect();
    (loc, pools.n_u8, pools.n_f32)
}

/// Shapes known before a frame arrives: everything from the scatter on.
fn static_shapes(graph: &Graph) -> Vec<Option<Shape>> {
    let (ny, nx) = graph.bev;
    let mut s: Vec<Option<Shape>> = vec![None; graph.nodes.len() + 1];
    for (i, n) in graph.nodes.iter().enumerate() {
        let x = s[n.inputs[0]];
        s[i + 1] = match &n.op {
            Op::Scatter { channels } => Some(Shape::new(&[1, *channels, ny, nx])),
            Op::Concat => {
                let c: Option<usize> = n.inputs.iter().map(|&u| s[u].map(|d| d.dims[1])).sum();
                x.zip(c)
                    .map(|(x, c)| Shape::new(&[1, c, x.dims[2], x.dims[3]]))
            }
            Op::HeightCompress { sites, channels } => graph.sparse.as_ref().map(|sp| {
                let [d, h, w] = sp.grids[*sites];
                Shape::new(&[1, channels * d, h, w])
            }),
            Op::PillarMax { .. } | Op::Add { .. } => None,
            Op::Layer(l) => x.and_then(|x| {
                let (h, w) = (x.dims[2], x.dims[3]);
                let (ho, wo) = match l.kind {
                    LayerKind::Linear => return None,
                    LayerKind::Conv2d {
                        kernel,
                        stride,
                        padding,
                    } => (
                        (h + 2 * padding).checked_sub(kernel)? / stride + 1,
                        (w + 2 * padding).checked_sub(kernel)? / stride + 1,
                    ),
                    LayerKind::ConvTranspose2d { kernel, stride } => {
                        ((h - 1) * stride + kernel, (w - 1) * stride + kernel)
                    }
                    LayerKind::SparseConv3d { .. } => return None,
                };
                Some(Shape::new(&[1, l.out_channels, ho, wo]))
            }),
        };
    }
    s
}

/// Slot counters and free lists of the two buffer pools.
#[derive(Default)]
struct Pools {
    free_u8: Vec<usize>,
    free_f32: Vec<usize>,
    n_u8: usize,
    n_f32: usize,
}

impl Pools {
    fn alloc(&mut self, u8_pool: bool) -> Loc {
        let (free, count) = if u8_pool {
            (&mut self.free_u8, &mut self.n_u8)
        } else {
            (&mut self.free_f32, &mut self.n_f32)
        };
        let slot = free.pop().unwrap_or_else(|| {
            *count += 1;
            *count - 1
        });
        Loc { slot, offset: 0 }
    }

    fn free(&mut self, slot: usize, u8_pool: bool) {
        if u8_pool {
            self.free_u8.push(slot);
        } else {
            self.free_f32.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fp32::tests::{TINY, random_weights, scan};
    use crate::model::ModelConfig;
    use crate::model::voxelize::{Mode, Pillars, Voxelizer, decorate};
    use crate::quant::model::quantize_weights_minmax;
    use crate::quant::quick::minmax_quick;
    use crate::quant::{Flavour, Grid, dequantize_acc};

    /// A value of the reference interpreter: codes or reals, with its shape.
    #[derive(Clone)]
    enum Val {
        Q(Vec<i32>, Vec<usize>),
        F(Vec<f32>, Vec<usize>),
    }

    impl Val {
        fn shape(&self) -> &[usize] {
            match self {
                Val::Q(_, s) | Val::F(_, s) => s,
            }
        }
    }

    /// The QuantModel semantics written out with plain loops, independently of the
    /// kernels and of the engine's plan: integer accumulation per output element,
    /// `Requant::apply` / `dequantize_acc`, glue ops on codes.
    fn reference(graph: &Graph, w: &Weights, qm: &QuantModel, input: &NetInput<'_>) -> HeadOutputs {
        let folded = fold_layers(graph, w).unwrap();
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let mut vals: Vec<Option<Val>> = vec![None; graph.nodes.len() + 1];
        // Parameters of input entry k (per feature with input_scales).
        let in_q = |q: QParams, k: usize| match &qm.input_scales {
            Some(s) => QParams {
                scale: s[k % f],
                ..q
            },
            None => q,
        };
        vals[0] = Some(match qm.activations[0] {
            Some(q) => Val::Q(
                input
                    .decorated
                    .iter()
                    .enumerate()
                    .map(|(k, &x)| in_q(q, k).quantize(x))
                    .collect(),
                vec![p, n, f],
            ),
            None => Val::F(input.decorated.to_vec(), vec![p, n, f]),
        });
        for (i, node) in graph.nodes.iter().enumerate() {
            let x = vals[node.inputs[0]].clone().unwrap();
            let oq = qm.activations[i + 1];
            let out = match (&node.op, &qm.layers[i]) {
                (op @ (Op::Add { .. } | Op::HeightCompress { .. }), _) => {
                    panic!("{op:?} in a pillar model")
                }
                (Op::Layer(l), Some(LayerPlan::Int(lw))) => {
                    let Val::Q(xq, xs) = x else {
                        panic!("int layer on floats")
                    };
                    let iq = qm.activations[node.inputs[0]].unwrap();
                    let zp = iq.zero_point;
                    let wq = |idx: usize| lw.codes[idx] as i32;
                    // (output element index, channel, accumulator)
                    let mut accs: Vec<(usize, i32)> = Vec::new();
                    let os: Vec<usize>;
                    match l.kind {
                        k @ LayerKind::SparseConv3d { .. } => panic!("{k:?} in a pillar model"),
                        LayerKind::Linear => {
                            let (rows, ci_n, co_n) = (xs[0] * xs[1], xs[2], l.out_channels);
                            os = vec![xs[0], xs[1], co_n];
                            for r in 0..rows {
                                for co in 0..co_n {
                                    let mut acc = 0i32;
                                    for ci in 0..ci_n {
                                        acc = acc.wrapping_add(
                                            (xq[r * ci_n + ci] - zp) * wq(co * ci_n + ci),
                                        );
                                    }
                                    accs.push((co, acc));
                                }
                            }
                        }
                        LayerKind::Conv2d {
                            kernel: k,
                            stride: s,
                            padding: pd,
                        } => {
                            let (ci_n, h, wd) = (xs[1], xs[2] as isize, xs[3] as isize);
                            let ho = (xs[2] + 2 * pd - k) / s + 1;
                            let wo = (xs[3] + 2 * pd - k) / s + 1;
                            os = vec![1, l.out_channels, ho, wo];
                            for co in 0..l.out_channels {
                                for oy in 0..ho {
                                    for ox in 0..wo {
                                        let mut acc = 0i32;
                                        for ci in 0..ci_n {
                                            for ky in 0..k {
                                                for kx in 0..k {
                                                    let iy = (oy * s + ky) as isize - pd as isize;
                                                    let ix = (ox * s + kx) as isize - pd as isize;
                                                    let v = if iy < 0
                                                        || ix < 0
                                                        || iy >= h
                                                        || ix >= wd
                                                    {
                                                        zp
                                                    } else {
                                                        xq[((ci as isize * h + iy) * wd + ix)
                                                            as usize]
                                                    };
                                                    acc = acc.wrapping_add(
                                                        (v - zp)
                                                            * wq(((co * ci_n + ci) * k + ky) * k
                                                                + kx),
                                                    );
                                                }
                                            }
                                        }
                                        accs.push((co, acc));
                                    }
                                }
                            }
                        }
                        LayerKind::ConvTranspose2d {
                            kernel: k,
                            stride: s,
                        } => {
                            let (ci_n, h, wd, co_n) = (xs[1], xs[2], xs[3], l.out_channels);
                            let (ho, wo) = ((h - 1) * s + k, (wd - 1) * s + k);
                            os = vec![1, co_n, ho, wo];
                            let mut a = vec![0i32; co_n * ho * wo];
                            for ci in 0..ci_n {
                                for iy in 0..h {
                                    for ix in 0..wd {
                                        let d = xq[(ci * h + iy) * wd + ix] - zp;
                                        for co in 0..co_n {
                                            for ky in 0..k {
                                                for kx in 0..k {
                                                    let o =
                                                        (co * ho + iy * s + ky) * wo + ix * s + kx;
                                                    a[o] =
                                                        a[o].wrapping_add(
                                                            d * wq(((ci * co_n + co) * k + ky) * k
                                                                + kx),
                                                        );
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                            accs = a
                                .iter()
                                .enumerate()
                                .map(|(o, &v)| (o / (ho * wo), v))
                                .collect();
                        }
                    }
                    let bq = |c: usize| quantize_bias(lw.bias[c], iq.scale, lw.scales[c]);
                    match oq {
                        Some(q) => Val::Q(
                            accs.iter()
                                .map(|&(c, acc)| {
                                    Requant::new(iq.scale, lw.scales[c], &q, l.relu)
                                        .apply(acc, bq(c))
                                })
                                .collect(),
                            os,
                        ),
                        None => Val::F(
                            accs.iter()
                                .map(|&(c, acc)| {
                                    let v = dequantize_acc(acc, bq(c), iq.scale, lw.scales[c]);
                                    if l.relu { v.max(0.0) } else { v }
                                })
                                .collect(),
                            os,
                        ),
                    }
                }
                (Op::Layer(l), _) => {
                    let (data, shape) = match x {
                        Val::Q(c, s) => {
                            let q = qm.activations[node.inputs[0]].unwrap();
                            let first = node.inputs[0] == 0;
                            let deq = |(k, &c): (usize, &i32)| {
                                if first { in_q(q, k) } else { q }.dequantize(c)
                            };
                            (c.iter().enumerate().map(deq).collect(), s)
                        }
                        Val::F(d, s) => (d, s),
                    };
                    let t = Tensor::new(shape, data).unwrap();
                    let y = run_layer(l.kind, &t, folded[i].as_ref().unwrap(), l.relu).unwrap();
                    match oq {
                        Some(q) => Val::Q(y.data.iter().map(|&v| q.quantize(v)).collect(), y.shape),
                        None => Val::F(y.data, y.shape),
                    }
                }
                (
                    Op::PillarMax {
                        concat_back,
                        include_padding,
                    },
                    _,
                ) => {
                    let s = x.shape().to_vec();
                    let (pp, nn, c) = (s[0], s[1], s[2]);
                    // Generic over codes and reals via f64 (exact for both).
                    let (data, empty): (Vec<f64>, f64) = match &x {
                        Val::Q(d, _) => (
                            d.iter().map(|&v| v as f64).collect(),
                            oq.unwrap().zero_point as f64,
                        ),
                        Val::F(d, _) => (d.iter().map(|&v| v as f64).collect(), 0.0),
                    };
                    let mut y = Vec::new();
                    for pi in 0..pp {
                        let k = if *include_padding {
                            nn
                        } else {
                            input.counts[pi] as usize
                        };
                        let m: Vec<f64> = (0..c)
                            .map(|ch| {
                                (0..k)
                                    .map(|j| data[(pi * nn + j) * c + ch])
                                    .fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v))))
                                    .unwrap_or(empty)
                            })
                            .collect();
                        if *concat_back {
                            for j in 0..nn {
                                y.extend_from_slice(
                                    &data[(pi * nn + j) * c..(pi * nn + j + 1) * c],
                                );
                                y.extend_from_slice(&m);
                            }
                        } else {
                            y.extend_from_slice(&m);
                        }
                    }
                    let shape = if *concat_back {
                        vec![pp, nn, 2 * c]
                    } else {
                        vec![pp, c]
                    };
                    match x {
                        Val::Q(..) => Val::Q(y.iter().map(|&v| v as i32).collect(), shape),
                        Val::F(..) => Val::F(y.iter().map(|&v| v as f32).collect(), shape),
                    }
                }
                (Op::Scatter { .. }, _) => {
                    let (ny, nx) = graph.bev;
                    let c = x.shape()[1];
                    let shape = vec![1, c, ny, nx];
                    let put = |d: &[f64], empty: f64| {
                        let mut img = vec![empty; c * ny * nx];
                        for (pi, cell) in input.coords.iter().enumerate() {
                            for ch in 0..c {
                                img[(ch * ny + cell[1] as usize) * nx + cell[2] as usize] =
                                    d[pi * c + ch];
                            }
                        }
                        img
                    };
                    match x {
                        Val::Q(d, _) => {
                            let d: Vec<f64> = d.iter().map(|&v| v as f64).collect();
                            let img = put(&d, oq.unwrap().zero_point as f64);
                            Val::Q(img.iter().map(|&v| v as i32).collect(), shape)
                        }
                        Val::F(d, _) => {
                            let d: Vec<f64> = d.iter().map(|&v| v as f64).collect();
                            Val::F(put(&d, 0.0).iter().map(|&v| v as f32).collect(), shape)
                        }
                    }
                }
                (Op::Concat, _) => {
                    let ins: Vec<Val> = node
                        .inputs
                        .iter()
                        .map(|&u| vals[u].clone().unwrap())
                        .collect();
                    let s0 = ins[0].shape().to_vec();
                    let c: usize = ins.iter().map(|v| v.shape()[1]).sum();
                    let shape = vec![1, c, s0[2], s0[3]];
                    match &ins[0] {
                        Val::Q(..) => Val::Q(
                            ins.iter()
                                .flat_map(|v| match v {
                                    Val::Q(d, _) => d.clone(),
                                    _ => panic!(),
                                })
                                .collect(),
                            shape,
                        ),
                        Val::F(..) => Val::F(
                            ins.iter()
                                .flat_map(|v| match v {
                                    Val::F(d, _) => d.clone(),
                                    _ => panic!(),
                                })
                                .collect(),
                            shape,
                        ),
                    }
                }
            };
            vals[i + 1] = Some(out);
        }
        let real = |v: usize| -> (Vec<f32>, Vec<usize>) {
            match vals[v].clone().unwrap() {
                Val::Q(c, s) => {
                    let q = qm.activations[v].unwrap();
                    (c.iter().map(|&c| q.dequantize(c)).collect(), s)
                }
                Val::F(d, s) => (d, s),
            }
        };
        let mut tasks = Vec::new();
        let (mut h, mut wd) = (0, 0);
        for t in &graph.tasks {
            let (heatmap, s) = real(t.heatmap);
            (h, wd) = (s[2], s[3]);
            let regression = t.regression.iter().flat_map(|&v| real(v).0).collect();
            tasks.push(TaskMaps {
                heatmap,
                regression,
            });
        }
        HeadOutputs { tasks, h, w: wd }
    }

    fn bits(h: &HeadOutputs) -> Vec<u32> {
        h.tasks
            .iter()
            .flat_map(|t| t.heatmap.iter().chain(&t.regression))
            .map(|v| v.to_bits())
            .collect()
    }

    struct Frame {
        pillars: Pillars,
        dec: Vec<f32>,
        width: usize,
    }

    impl Frame {
        fn new(cfg: &ModelConfig, pts: &crate::cloud::Points) -> Frame {
            let mut vox = Voxelizer::new(cfg, Mode::Test);
            let mut pillars = Pillars::default();
            vox.voxelize(pts, None, &mut pillars);
            let mut dec = Vec::new();
            let width = decorate(cfg, &pillars, &mut dec);
            Frame {
                pillars,
                dec,
                width,
            }
        }

        fn input(&self) -> NetInput<'_> {
            NetInput {
                decorated: &self.dec,
                max_points: self.pillars.max_points,
                width: self.width,
                counts: &self.pillars.counts,
                coords: &self.pillars.coords,
            }
        }
    }

    fn tiny() -> (ModelConfig, Graph, Weights) {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let w = random_weights(&graph, 3);
        (cfg, graph, w)
    }

    fn node(graph: &Graph, name: &str) -> usize {
        graph
            .nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The quick min-max model varied to cover every case of the semantics: a kept-float
    /// layer between quantized values, a symmetric activation, 4-bit weights, an integer
    /// layer with a float (ReLU) output feeding a float layer with a float input.
    fn varied_model(cfg: &ModelConfig, graph: &Graph, w: &Weights) -> QuantModel {
        let scans = [scan(11, 3000), scan(12, 500)];
        let mut qm = minmax_quick(cfg, graph, w, &scans).unwrap();
        qm.validate(graph).unwrap();
        let folded = fold_layers(graph, w).unwrap();
        qm.layers[node(graph, "backbone_2d.blocks.0.4")] = Some(LayerPlan::Float);
        let v = node(graph, "backbone_2d.blocks.1.1") + 1;
        let (lo, hi) = qm.activations[v].unwrap().real_range();
        qm.activations[v] = Some(QParams::symmetric(
            lo.abs().max(hi),
            Grid::activation(8, Flavour::Symmetric),
        ));
        let b = node(graph, "backbone_2d.blocks.1.4");
        qm.layers[b] = Some(LayerPlan::Int(quantize_weights_minmax(
            folded[b].as_ref().unwrap(),
            0,
            4,
        )));
        let hidden = node(graph, "dense_head.heads_list.0.hm.0");
        qm.activations[hidden + 1] = None;
        qm.layers[node(graph, "dense_head.heads_list.0.hm.1")] = Some(LayerPlan::Float);
        qm.validate(graph).unwrap();
        qm
    }

    #[test]
    fn int8_engine_equals_the_integer_reference() {
        let (cfg, graph, w) = tiny();
        let qm = varied_model(&cfg, &graph, &w);
        let dense = Frame::new(&cfg, &scan(5, 3000));
        // Few points: mostly empty BEV maps (the uniform-region path).
        let sparse = Frame::new(&cfg, &scan(6, 150));
        let mut isas = vec![Isa::Scalar];
        isas.extend(Isa::simd_available());
        for isa in isas {
            let mut e = Int8Engine::with_isa(&graph, &w, &qm, isa).unwrap();
            // The head's sibling convs run stacked (and must still match).
            assert!(
                e.steps
                    .iter()
                    .any(|s| matches!(s, Step::Int { stack, .. } if !stack.is_empty()))
            );
            for f in [&dense, &sparse, &dense] {
                let got = e.run(&f.input()).unwrap();
                let want = reference(&graph, &w, &qm, &f.input());
                assert_eq!((got.h, got.w), (want.h, want.w));
                assert_eq!(bits(&got), bits(&want), "{isa:?}");
            }
        }
        // Not a constant map: another scan changes the outputs.
        let mut e = Int8Engine::new(&graph, &w, &qm).unwrap();
        assert_ne!(
            e.run(&dense.input()).unwrap(),
            e.run(&sparse.input()).unwrap()
        );
    }

    /// The quick min-max model with one symmetric scale per input feature, folded into
    /// the weight columns of the first layer (`QuantModel::input_scales`).
    fn per_feature_model(cfg: &ModelConfig, graph: &Graph, w: &Weights) -> QuantModel {
        let mut qm = minmax_quick(cfg, graph, w, &[scan(11, 3000)]).unwrap();
        let f = Frame::new(cfg, &scan(11, 3000));
        let mut max_abs = vec![0.0f32; f.width];
        for (k, &x) in f.dec.iter().enumerate() {
            max_abs[k % f.width] = max_abs[k % f.width].max(x.abs());
        }
        let grid = Grid::activation(8, Flavour::Symmetric);
        // Distinct scales per feature, some clipping (half range on feature 0).
        let scales: Vec<f32> = max_abs
            .iter()
            .enumerate()
            .map(|(j, &m)| QParams::symmetric(if j == 0 { m / 2.0 } else { m }, grid).scale)
            .collect();
        qm.activations[0] = Some(QParams {
            scale: 1.0,
            zero_point: grid.symmetric_zero_point(),
            grid,
        });
        let mut folded = fold_layers(graph, w).unwrap();
        for (i, n) in graph.nodes.iter().enumerate() {
            if n.inputs.contains(&0) {
                let fl = folded[i].as_mut().unwrap();
                let cin = fl.weight.shape[1];
                for (k, x) in fl.weight.data.iter_mut().enumerate() {
                    *x *= scales[k % cin];
                }
                qm.layers[i] = Some(LayerPlan::Int(quantize_weights_minmax(fl, 0, 8)));
            }
        }
        qm.input_scales = Some(scales);
        qm.validate(graph).unwrap();
        qm
    }

    /// The input quantization loop (both compiled copies) gives `QParams::quantize` of
    /// each value with its feature's parameters: ties, NaN, infinities and clamping
    /// included.
    #[test]
    fn input_rows_quantize_like_qparams() {
        use crate::quant::{Flavour, Grid};
        let per_feature: Vec<QParams> = (0..10)
            .map(|j| {
                let flavour = if j % 2 == 0 {
                    Flavour::Asymmetric
                } else {
                    Flavour::Symmetric
                };
                let (lo, hi) = (-3.0 - j as f32, 1.5 + 0.7 * j as f32);
                QParams::for_range(lo, hi, Grid::activation(8, flavour), flavour)
            })
            .collect();
        let mut src = Vec::new();
        for i in 0..1003 {
            let j = i % 10;
            let q = &per_feature[j];
            let v = match i % 7 {
                // Exactly half-way between two codes.
                0 => ((i as f32 * 0.37).floor() - 40.0 + 0.5) * q.scale,
                1 => f32::NAN,
                2 => {
                    if i % 2 == 0 {
                        f32::INFINITY
                    } else {
                        f32::NEG_INFINITY
                    }
                }
                3 => 1e30 * if i % 2 == 0 { 1.0 } else { -1.0 },
                _ => (i as f32 * 0.913).sin() * 5.0,
            };
            src.push(v);
        }
        src.truncate(1000);
        let want: Vec<u8> = src
            .iter()
            .enumerate()
            .map(|(k, &x)| per_feature[k % 10].quantize(x) as u8)
            .collect();
        let mut got = vec![0u8; src.len()];
        quantize_rows_portable(&mut got, &src, &per_feature);
        assert_eq!(got, want);
        got.fill(0);
        quantize_rows(&mut got, &src, &per_feature);
        assert_eq!(got, want);
        assert!(want.iter().collect::<std::collections::HashSet<_>>().len() > 20);
    }

    /// Per-feature input scales: integer and kept-float first layers match the reference,
    /// and an input of another width is refused.
    #[test]
    fn per_feature_input_scales_follow_the_reference() {
        let (cfg, graph, w) = tiny();
        let int_first = per_feature_model(&cfg, &graph, &w);
        let mut float_first = int_first.clone();
        let first = graph
            .nodes
            .iter()
            .position(|n| n.inputs.contains(&0))
            .unwrap();
        float_first.layers[first] = Some(LayerPlan::Float);
        let f = Frame::new(&cfg, &scan(5, 3000));
        for qm in [&int_first, &float_first] {
            let want = reference(&graph, &w, qm, &f.input());
            let got = Int8Engine::new(&graph, &w, qm)
                .unwrap()
                .run(&f.input())
                .unwrap();
            assert_eq!(bits(&got), bits(&want));
        }
        // The scales matter: one scale for every feature gives other outputs.
        let mut one = int_first.clone();
        one.input_scales = None;
        let plain = reference(&graph, &w, &one, &f.input());
        assert_ne!(
            bits(&plain),
            bits(&reference(&graph, &w, &int_first, &f.input()))
        );
        let narrow = NetInput {
            width: f.width - 1,
            decorated: &f.dec[..f.pillars.counts.len() * f.pillars.max_points * (f.width - 1)],
            ..f.input()
        };
        let err = Int8Engine::new(&graph, &w, &int_first)
            .unwrap()
            .run(&narrow)
            .unwrap_err()
            .to_string();
        assert!(err.contains("input scales"), "{err}");
    }

    #[test]
    fn an_all_float_model_is_the_fp32_engine() {
        let (cfg, graph, w) = tiny();
        let mut qm = minmax_quick(&cfg, &graph, &w, &[scan(1, 800)]).unwrap();
        qm.activations.iter_mut().for_each(|a| *a = None);
        for (l, n) in qm.layers.iter_mut().zip(&graph.nodes) {
            if matches!(n.op, Op::Layer(_)) {
                *l = Some(LayerPlan::Float);
            }
        }
        let f = Frame::new(&cfg, &scan(2, 2000));
        let want = Fp32Engine::new(&graph, &w)
            .unwrap()
            .run(&f.input())
            .unwrap();
        let got = Int8Engine::new(&graph, &w, &qm)
            .unwrap()
            .run(&f.input())
            .unwrap();
        assert_eq!(bits(&got), bits(&want));
    }

    use crate::engine::Fp32Engine;

    /// Buffers are planned once: a second scan of the same size reuses every buffer, and
    /// the neck's concat inputs are written in place.
    #[test]
    fn steady_state_runs_reuse_their_buffers() {
        let (cfg, graph, w) = tiny();
        let qm = minmax_quick(&cfg, &graph, &w, &[scan(1, 800)]).unwrap();
        let mut e = Int8Engine::new(&graph, &w, &qm).unwrap();
        assert!(
            e.steps
                .iter()
                .any(|s| matches!(s, Step::Concat { aliased: true }))
        );
        let f = Frame::new(&cfg, &scan(2, 2000));
        let mut out = e.run(&f.input()).unwrap();
        let ptrs = |e: &Int8Engine, o: &HeadOutputs| -> Vec<usize> {
            let mut p: Vec<usize> = e.u8_slots.iter().map(|s| s.as_ptr() as usize).collect();
            p.extend(e.f32_slots.iter().map(|s| s.as_ptr() as usize));
            p.extend(o.tasks.iter().map(|t| t.heatmap.as_ptr() as usize));
            p
        };
        let before = ptrs(&e, &out);
        let first = out.clone();
        e.run_into(&f.input(), &mut out).unwrap();
        assert_eq!(ptrs(&e, &out), before);
        assert_eq!(out, first);
        // Fewer slots than values: liveness shares them.
        assert!(e.u8_slots.len() + e.f32_slots.len() < graph.nodes.len() / 2);
        // INT8 weights: about a quarter of the folded FP32 ones (per-channel terms and
        // row padding of the tiny model's 1- to 3-channel head convs on top).
        let fp32: usize = fold_layers(&graph, &w)
            .unwrap()
            .iter()
            .flatten()
            .map(|f| 4 * (f.weight.data.len() + f.bias.len()))
            .sum();
        let ratio = e.weight_bytes() as f64 / fp32 as f64;
        assert!(ratio > 0.25 && ratio < 0.6, "{ratio}");
    }

    #[test]
    fn mismatched_models_and_inputs_are_refused() {
        let (cfg, graph, w) = tiny();
        let qm = minmax_quick(&cfg, &graph, &w, &[scan(1, 800)]).unwrap();
        let mut short = qm.clone();
        short.activations.pop();
        let e = Int8Engine::new(&graph, &w, &short).err().unwrap();
        assert!(matches!(e, EngineError::QuantModel(_)), "{e}");
        let mut unquantized_input = qm.clone();
        unquantized_input.activations[0] = None;
        let e = Int8Engine::new(&graph, &w, &unquantized_input)
            .err()
            .unwrap();
        assert!(e.to_string().contains("quantized input"), "{e}");
        // A model of another graph.
        let default = ModelConfig::load(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"),
        )
        .unwrap();
        let dg = Graph::build(&default).unwrap();
        let dw = Weights::init(&dg, 1);
        assert!(Int8Engine::new(&dg, &dw, &qm).is_err());
        // Inputs that do not fit each other.
        let mut e = Int8Engine::new(&graph, &w, &qm).unwrap();
        let f = Frame::new(&cfg, &scan(2, 500));
        let mut coords = f.pillars.coords.clone();
        coords[0] = [0, 999, 0];
        let bad = NetInput {
            coords: &coords,
            ..f.input()
        };
        let err = e.run(&bad).unwrap_err().to_string();
        assert!(err.contains("outside"), "{err}");
        coords[0] = coords[1];
        let bad = NetInput {
            coords: &coords,
            ..f.input()
        };
        let err = e.run(&bad).unwrap_err().to_string();
        assert!(err.contains("repeats"), "{err}");
        let bad = NetInput {
            decorated: &f.dec[1..],
            ..f.input()
        };
        assert!(matches!(e.run(&bad), Err(EngineError::Input(_))));
        // And the engine still works afterwards.
        assert!(e.run(&f.input()).is_ok());
    }
}
