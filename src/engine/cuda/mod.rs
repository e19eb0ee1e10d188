//! Inference on NVIDIA GPUs (feature `cuda`): the same graph as the CPU engines, in FP32,
//! FP16 (f16 GEMM operands, f32 accumulation) or INT8 from the same calibrated
//! [`QuantModel`] with the same integer semantics as [`Int8Engine`](super::Int8Engine):
//! its head maps are bit-identical to the CPU INT8 engine's.
//!
//! Execution: layers are GEMMs on cuBLAS (convolutions through an im2col buffer, the
//! transposed convolutions of the neck as one GEMM and a scatter of its taps), with our
//! own NVRTC-compiled kernels for im2col, the fused epilogues (bias, requantization or
//! dequantization, ReLU), the pillar max and the scatter. INT8 GEMMs are s8 x s8 -> i32:
//! u8 activation codes are shifted by 128 on the way into the GEMM and the epilogue adds
//! `(128 - zx) * sum(w)` back, which reproduces the CPU's zero-point-corrected sum
//! exactly. Buffers grow to the largest frame seen and are then reused: steady-state
//! frames allocate nothing. The voxel model's sparse 3D backbone runs on neighbour tables
//! built from the frame's rulebooks on the CPU. The dense part (after the scatter or the
//! height compression: fixed shapes, fixed buffers) is captured once as a CUDA graph and
//! replayed on every later frame. Decoding's peak candidates can be found on the GPU
//! ([`CudaEngine::run_candidates`]); voxelisation and the rest of decoding stay on the CPU.

mod device;
mod layers;

pub use device::{Gpu, compile_kernels, driver_present, nvrtc_present};

use super::fp32::{FoldedLayer, fold_layers};
use super::sparse::{FrameSites, frame_sites, no_sites};
use super::{EngineError, HeadOutputs, NetInput, TaskMaps, check_cells, check_input};
use crate::model::decode::{TaskCandidates, peak_logit_cut};
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::weights::Weights;
use crate::quant::{LayerPlan, QParams, QuantModel};
use cudarc::driver::{CudaEvent, CudaGraph, PinnedHostSlice};
use device::Arg::{B, F, I, L, P};
use device::DBuf;
use device::GemmKind;
use layers::{
    EpiMap, Exec, IntEpi, LayerCall, Scratch, epi_float, epi_int, float_exec, gemm_checked,
    gemm_i8, i32_of, i64_of, im2col_float, im2col_int, int_exec, int_weight_rows, run_layer,
    tap_major,
};
use rayon::prelude::*;

/// What a [`CudaEngine`] computes in.
#[derive(Clone, Copy)]
pub enum CudaPrecision<'a> {
    Fp32,
    /// f16 weights and GEMM inputs, f32 accumulation and activations.
    Fp16,
    /// A calibrated model, executed in integers exactly like the CPU INT8 engine.
    Int8(&'a QuantModel),
}

impl CudaPrecision<'_> {
    pub fn name(&self) -> &'static str {
        match self {
            CudaPrecision::Fp32 => "fp32",
            CudaPrecision::Fp16 => "fp16",
            CudaPrecision::Int8(_) => "int8",
        }
    }
}

/// A value's shape (`[P, N, C]`, `[P, C]` or `[1, C, H, W]`).
#[derive(Debug, Clone, Copy, Default)]
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

    fn len(&self) -> usize {
        self.dims[..self.rank].iter().product()
    }
}

enum Step {
    Layer {
        kind: LayerKind,
        relu: bool,
        cin: usize,
        cout: usize,
        exec: Box<Exec>,
        /// Member of a sibling group: (group, whether this node leads it).
        group: Option<(usize, bool)>,
        /// Member of a branch batch: (batch, whether this node leads it).
        batch: Option<(usize, bool)>,
    },
    PillarMax {
        concat_back: bool,
        include_padding: bool,
    },
    Scatter,
    Concat,
    /// The residual join of the voxel backbone.
    Add {
        relu: bool,
    },
    /// Sparse features on site set `sites` to the BEV image.
    HeightCompress {
        sites: usize,
    },
}

/// Sibling convolutions reading the same input with the same geometry (the head's
/// sub-heads): one im2col and one GEMM over their stacked weights, then each member's
/// own epilogue on its slice of the output channels.
struct Group {
    members: Vec<usize>,
    /// Output-channel offset of each member in the stacked GEMM output.
    offsets: Vec<usize>,
    /// Where each member's output lies in the group's output buffer, in bytes per output
    /// pixel (the outputs are stacked, so the branches' next convs can run batched).
    out_units: Vec<usize>,
    units: usize,
    cout_total: usize,
    /// Stacked weights `[cout_total, k]` (f32, f16 or s8 rows).
    w: DBuf,
    /// GEMM depth: C*k*k, padded to 4 for s8.
    k: usize,
    int: bool,
    half: bool,
}

/// The next convolution of every member of a sibling group (the second conv of each
/// head branch): one im2col over the group's stacked output and one strided batched GEMM,
/// each branch's weights padded to `cmax` output channels.
struct Batch {
    members: Vec<usize>,
    /// The sibling group whose members feed these layers, in the same order.
    src: usize,
    cmax: usize,
    /// GEMM depth of one member (C*k*k; a multiple of 4 for s8).
    k: usize,
    /// Weights `[members, cmax, k]`, zero rows past each member's channels.
    w: DBuf,
    /// s8: each stacked input channel's zero point.
    zxc: DBuf,
    /// FP16 precision: f32 weights for the direct kernel (`w` holds f16 for the GEMM).
    w32: DBuf,
    int: bool,
    half: bool,
    /// Few output channels (at most [`DIRECT_MAX_OUT`]): our direct convolution kernel
    /// instead of im2col and the GEMM.
    direct: bool,
}

/// The direct branch kernels keep this many output channels in registers.
const DIRECT_MAX_OUT: usize = 8;

/// A captured CUDA graph that moves with its engine between threads.
struct DenseGraph(CudaGraph);

// SAFETY: the graph is launched only through `&mut CudaEngine` (one thread at a time), and
// `CudaGraph::launch` makes the engine's context current on the calling thread first.
unsafe impl Send for DenseGraph {}

/// The CUDA engine.
pub struct CudaEngine {
    gpu: Gpu,
    graph: Graph,
    precision: &'static str,
    /// Activation parameters per value (INT8; all `None` in float precisions): a value
    /// with parameters is u8 codes on the device, otherwise f32.
    acts: Vec<Option<QParams>>,
    /// Per-feature scales of the input codes (`QuantModel::input_scales`), and on the GPU.
    input_scales: Option<Vec<f32>>,
    input_scales_dev: DBuf,
    steps: Vec<Step>,
    groups: Vec<Group>,
    /// Each group's stacked output.
    group_out: Vec<DBuf>,
    batches: Vec<Batch>,
    vals: Vec<DBuf>,
    shapes: Vec<Shape>,
    scratch: Scratch,
    /// The input's upload staging: page-locked host memory (fast asynchronous copies), or
    /// `host_in` where the driver refuses to pin.
    host_in: Vec<u8>,
    pinned: Option<PinnedHostSlice<u8>>,
    host_cells: Vec<u32>,
    cell_stamp: Vec<u32>,
    run_count: u32,
    /// Events around the dense part (after the scatter .. end) of the last run.
    events: Option<(CudaEvent, CudaEvent)>,
    last_dense_ms: Option<f64>,
    /// Per-node GPU time sums (index i: node i - 1) and, at 0, the run count.
    profile: Option<Vec<f64>>,
    /// Whether branch batches with few outputs use the direct kernels.
    direct_on: bool,
    /// The frame's rulebooks (voxel models) and each rulebook's neighbour table on the
    /// device (`[n_out, taps]` input rows, -1 as i32 where a site is inactive).
    sites: Option<FrameSites>,
    nbr: Vec<DBuf>,
    /// First node of the dense part (after the scatter or height compression), if any.
    dense_start: Option<usize>,
    /// Scratch of the dense part, apart from the per-frame part's so that a larger frame
    /// never moves a buffer the captured graph uses.
    dense_sc: Scratch,
    /// The dense part as a CUDA graph, captured on the second frame; `graph_on` false
    /// after a failed capture, while profiling, or with `LIDAR_PTQ_CUDA_GRAPH=0`.
    dense_graph: Option<DenseGraph>,
    graph_on: bool,
    eager_dense_runs: u32,
    /// The head values gathered into one device buffer (filled by the dense part) and
    /// fetched with one download: (value, byte offset, bytes) each.
    head_stage: DBuf,
    head_layout: Vec<(usize, usize, usize)>,
    host_stage: Vec<u8>,
    pinned_out: Option<PinnedHostSlice<u8>>,
    unpinned: bool,
    last_phases: [f64; 4],
    /// `epi_rows4` tables of the integer groups and batches (one launch for all members'
    /// epilogues), built on the first run and re-uploaded only if a pointer changes.
    group_rows: Vec<RowTable>,
    batch_rows: Vec<RowTable>,
    /// Peak candidates: per-task buffers, the counts, the host records.
    cand: Vec<CandTask>,
    cand_count: DBuf,
    host_cand: Vec<u32>,
    pinned_cand: Option<PinnedHostSlice<u32>>,
}

/// Where a run's results go: the full head maps, or the peak candidates (with the logit
/// cut and the local-maximum switch).
enum Sink<'a> {
    Maps(&'a mut HeadOutputs),
    Candidates(&'a mut Vec<TaskCandidates>, f32, bool),
}

/// One task's candidate search on the device: its regression channels' pointers (host copy
/// and device table) and the record buffer.
#[derive(Default)]
struct CandTask {
    regs: Vec<u64>,
    regs_dev: DBuf,
    records: DBuf,
    cap: usize,
    stride: usize,
}

/// An `epi_rows4` entry table: its bytes on the host (to notice changes) and the device.
#[derive(Default)]
struct RowTable {
    host: Vec<u8>,
    dev: DBuf,
}

/// Bytes of one `RowEpi` (kernels.cu): four pointers, six 32-bit fields.
const ROW_EPI_BYTES: usize = 56;

impl CudaEngine {
    /// Plans `graph` on GPU `ordinal` in `precision`; `weights` are the FP32 weights
    /// (for INT8: those the model was calibrated for; they supply kept-float layers).
    pub fn new(
        graph: &Graph,
        weights: &Weights,
        precision: CudaPrecision<'_>,
        ordinal: usize,
    ) -> Result<Self, EngineError> {
        let gpu = Gpu::open(ordinal)?;
        Self::on(gpu, graph, weights, precision)
    }

    /// Like [`new`](Self::new) on an opened GPU.
    pub fn on(
        gpu: Gpu,
        graph: &Graph,
        weights: &Weights,
        precision: CudaPrecision<'_>,
    ) -> Result<Self, EngineError> {
        let mut folded = fold_layers(graph, weights)?;
        let nv = graph.nodes.len() + 1;
        let (acts, plans): (Vec<Option<QParams>>, Vec<Option<&LayerPlan>>) = match precision {
            CudaPrecision::Int8(qm) => {
                qm.validate(graph).map_err(EngineError::QuantModel)?;
                (
                    qm.activations.clone(),
                    qm.layers.iter().map(|l| l.as_ref()).collect(),
                )
            }
            _ => (vec![None; nv], vec![None; graph.nodes.len()]),
        };
        let half = matches!(precision, CudaPrecision::Fp16);
        let input_scales = match precision {
            CudaPrecision::Int8(qm) => qm.input_scales.clone(),
            _ => None,
        };
        let input_scales_dev = match &input_scales {
            Some(s) => gpu.alloc_from(s)?,
            None => DBuf::default(),
        };
        let (groups, group_of) = plan_groups(&gpu, graph, &plans, &acts, &folded, half)?;
        let (batches, batch_of) = plan_batches(
            &gpu, graph, &plans, &acts, &folded, half, &groups, &group_of,
        )?;
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for (i, node) in graph.nodes.iter().enumerate() {
            let step = match &node.op {
                Op::Add { relu } => Step::Add { relu: *relu },
                Op::HeightCompress { sites, .. } => Step::HeightCompress { sites: *sites },
                Op::Layer(l) => {
                    if let LayerKind::ConvTranspose2d { kernel, stride } = l.kind
                        && kernel != stride
                    {
                        return Err(EngineError::Internal(format!(
                            "{}: the CUDA engine runs transposed convolutions with kernel == \
                             stride only (kernel {kernel}, stride {stride})",
                            node.name
                        )));
                    }
                    let exec = match plans[i] {
                        Some(LayerPlan::Int(w)) => {
                            let inp = acts[node.inputs[0]].ok_or_else(|| {
                                EngineError::QuantModel(format!(
                                    "{}: input not quantized",
                                    node.name
                                ))
                            })?;
                            int_exec(
                                &gpu,
                                l.kind,
                                l.in_channels,
                                l.out_channels,
                                w,
                                &inp,
                                acts[i + 1].as_ref(),
                                l.relu,
                            )?
                        }
                        _ => {
                            let f = folded[i].take().ok_or_else(|| {
                                EngineError::Internal(format!("{} not folded", node.name))
                            })?;
                            // Sparse convs compute in f32 in every float precision.
                            if matches!(l.kind, LayerKind::SparseConv3d { .. }) {
                                layers::sparse_float_exec(&gpu, &f, l.out_channels)?
                            } else {
                                float_exec(&gpu, &f, half)?
                            }
                        }
                    };
                    Step::Layer {
                        kind: l.kind,
                        relu: l.relu,
                        cin: l.in_channels,
                        cout: l.out_channels,
                        exec: Box::new(exec),
                        group: group_of[i],
                        batch: batch_of[i],
                    }
                }
                Op::PillarMax {
                    concat_back,
                    include_padding,
                } => Step::PillarMax {
                    concat_back: *concat_back,
                    include_padding: *include_padding,
                },
                Op::Scatter { .. } => Step::Scatter,
                Op::Concat => Step::Concat,
            };
            steps.push(step);
        }
        // Timing events (cudarc's default flags disable timing).
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = match (gpu.ctx.new_event(timed), gpu.ctx.new_event(timed)) {
            (Ok(a), Ok(b)) => Some((a, b)),
            _ => None,
        };
        let (ny, nx) = graph.bev;
        let dense_start = steps
            .iter()
            .position(|s| matches!(s, Step::Scatter | Step::HeightCompress { .. }))
            .map(|i| i + 1);
        let graph_on = std::env::var("LIDAR_PTQ_CUDA_GRAPH").map_or(true, |v| v != "0");
        Ok(Self {
            gpu,
            graph: graph.clone(),
            precision: precision.name(),
            acts,
            input_scales,
            input_scales_dev,
            steps,
            group_out: groups.iter().map(|_| DBuf::default()).collect(),
            groups,
            batches,
            vals: (0..nv).map(|_| DBuf::default()).collect(),
            shapes: vec![Shape::default(); nv],
            scratch: Scratch::default(),
            host_in: Vec::new(),
            pinned: None,
            host_cells: Vec::new(),
            cell_stamp: vec![0; ny * nx],
            run_count: 0,
            events,
            last_dense_ms: None,
            profile: None,
            // LIDAR_PTQ_CUDA_DIRECT=0: im2col and the batched GEMM for the branches (timing).
            direct_on: std::env::var("LIDAR_PTQ_CUDA_DIRECT").map_or(true, |v| v != "0"),
            sites: None,
            nbr: Vec::new(),
            dense_start,
            dense_sc: Scratch::default(),
            dense_graph: None,
            graph_on,
            eager_dense_runs: 0,
            head_stage: DBuf::default(),
            head_layout: Vec::new(),
            host_stage: Vec::new(),
            pinned_out: None,
            unpinned: false,
            last_phases: [0.0; 4],
            group_rows: Vec::new(),
            batch_rows: Vec::new(),
            cand: Vec::new(),
            cand_count: DBuf::default(),
            host_cand: Vec::new(),
            pinned_cand: None,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// How many sibling groups and branch batches the plan fused (see [`Group`] and
    /// [`Batch`]).
    pub fn fusions(&self) -> (usize, usize) {
        (self.groups.len(), self.batches.len())
    }

    /// Whether the head branches' second convs may use the direct kernels (default) or
    /// always im2col and the batched GEMM (both compute the same; tests compare them).
    pub fn set_direct_branches(&mut self, on: bool) {
        self.direct_on = on;
        // The captured dense part used the other kernels.
        self.dense_graph = None;
        self.eager_dense_runs = 0;
    }

    /// Whether the int8 im2col uses the shared-memory tiled kernel (default) or the
    /// one-word-per-thread kernel (both write the same bytes; tests compare them).
    pub fn set_tiled_im2col(&mut self, on: bool) {
        self.scratch.plain_im2col = !on;
        self.dense_sc.plain_im2col = !on;
        self.dense_graph = None;
        self.eager_dense_runs = 0;
    }

    /// Whether the dense part now replays as a CUDA graph.
    pub fn graph_active(&self) -> bool {
        self.dense_graph.is_some()
    }

    /// Turns CUDA graph capture of the dense part on (default) or off.
    pub fn set_graphs(&mut self, on: bool) {
        self.graph_on = on;
        self.dense_graph = None;
        self.eager_dense_runs = 0;
    }

    /// "fp32", "fp16" or "int8".
    pub fn precision(&self) -> &'static str {
        self.precision
    }

    /// The GPU, e.g. "NVIDIA H100 80GB HBM3 (sm_90)".
    pub fn device(&self) -> String {
        self.gpu.describe()
    }

    /// GPU time of the dense part (backbone, neck, head: after the scatter) in the last
    /// run, from CUDA events.
    pub fn last_dense_ms(&self) -> Option<f64> {
        self.last_dense_ms
    }

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
        self.run_sink(input, Sink::Maps(out))
    }

    /// Whether [`run_candidates`](Self::run_candidates) applies: every head value is f32
    /// on the device (not codes).
    pub fn gpu_candidates(&self) -> bool {
        self.graph.tasks.iter().all(|t| {
            std::iter::once(t.heatmap)
                .chain(t.regression.iter().copied())
                .all(|v| self.acts[v].is_none())
        })
    }

    /// Runs the network and finds each task's peak candidates on the GPU (the rule of
    /// `model::decode` for `score_threshold` and `local_max`), downloading only those with
    /// their regression values: `model::decode::decode_candidates` turns them into the
    /// detections that decoding the full maps gives.
    pub fn run_candidates(
        &mut self,
        input: &NetInput<'_>,
        score_threshold: f32,
        local_max: bool,
        out: &mut Vec<TaskCandidates>,
    ) -> Result<(), EngineError> {
        if !self.gpu_candidates() {
            return Err(EngineError::Internal(
                "GPU candidates need float head values".into(),
            ));
        }
        let cut = peak_logit_cut(score_threshold);
        self.run_sink(input, Sink::Candidates(out, cut, local_max))
    }

    fn run_sink(&mut self, input: &NetInput<'_>, sink: Sink<'_>) -> Result<(), EngineError> {
        let t0 = std::time::Instant::now();
        let voxel = self.graph.sparse.is_some();
        check_input(input, !voxel)?;
        self.gpu.bind()?;
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let (ny, nx) = self.graph.bev;
        self.run_count = self.run_count.wrapping_add(1);
        if self.run_count == 0 {
            self.cell_stamp.fill(0);
            self.run_count = 1;
        }
        if voxel {
            // A voxel model: the frame's rulebooks (which check the voxel sites), their
            // neighbour tables on the device, one feature row per voxel.
            self.sites = frame_sites(&self.graph, input.coords)?;
            self.upload_neighbours()?;
            self.shapes[0] = Shape::new(&[p, n * f]);
        } else {
            check_cells(input.coords, (ny, nx), &mut self.cell_stamp, self.run_count)?;
            self.host_cells.clear();
            self.host_cells
                .extend(input.coords.iter().map(|c| c[1] * nx as u32 + c[2]));
            self.shapes[0] = Shape::new(&[p, n, f]);
        }
        let g = &self.gpu;
        if !voxel {
            g.ensure(&mut self.scratch.cells, 4 * p)?;
            g.upload(&self.scratch.cells, &self.host_cells)?;
        }
        g.ensure(&mut self.scratch.counts, 4 * p)?;
        g.upload(&self.scratch.counts, input.counts)?;
        match self.acts[0] {
            Some(q) => {
                // One scale, or one per feature (as the CPU INT8 engine).
                let per_feature: Vec<QParams> = match &self.input_scales {
                    Some(s) if s.len() != f => {
                        return Err(EngineError::Input(format!(
                            "{f} features per point, the model has input scales for {}",
                            s.len()
                        )));
                    }
                    Some(s) => s.iter().map(|&scale| QParams { scale, ..q }).collect(),
                    None => vec![q],
                };
                // The floats go up as in FP32 and are quantized on the GPU (the same
                // division, rounding and clamp as QParams::quantize).
                let len = p * n * f;
                let host = staging(
                    g,
                    (&mut self.pinned, &mut self.host_in),
                    &mut self.unpinned,
                    4 * len,
                    WRITE_COMBINED,
                )?;
                copy_floats(host, input.decorated);
                g.ensure(&mut self.scratch.fin, 4 * len)?;
                g.upload(&self.scratch.fin, host)?;
                g.ensure(&mut self.vals[0], len)?;
                let (src, dst, nl) = (self.scratch.fin.ptr, self.vals[0].ptr, i64_of(len)?);
                let (zp, qmin, qmax) = (q.zero_point, q.grid.qmin, q.grid.qmax);
                match per_feature.len() {
                    1 => g.launch(
                        "quant_f32",
                        len,
                        &[
                            P(src),
                            L(nl),
                            F(per_feature[0].scale),
                            I(zp),
                            I(qmin),
                            I(qmax),
                            P(dst),
                        ],
                    )?,
                    width => g.launch(
                        "quant_f32_pf",
                        len,
                        &[
                            P(src),
                            L(nl),
                            P(self.input_scales_dev.ptr),
                            I(i32_of(width)?),
                            I(zp),
                            I(qmin),
                            I(qmax),
                            P(dst),
                        ],
                    )?,
                }
            }
            None => {
                let len = 4 * p * n * f;
                let host = staging(
                    g,
                    (&mut self.pinned, &mut self.host_in),
                    &mut self.unpinned,
                    len,
                    WRITE_COMBINED,
                )?;
                copy_floats(host, input.decorated);
                g.ensure(&mut self.vals[0], len)?;
                g.upload(&self.vals[0], host)?;
            }
        }
        let t1 = std::time::Instant::now();
        let mut dense_started = false;
        let timed = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let profile = self.profile.is_some();
        let mut marks = Vec::new();
        let nodes = self.graph.nodes.len();
        let split = self.dense_start.unwrap_or(nodes);
        let mut i = 0;
        while i < nodes {
            if i == split && !profile && self.graph_on {
                // The dense part as one graph launch (captured on the second frame, once
                // the first has sized every buffer).
                self.dense_part(split, p)?;
                i = nodes;
                break;
            }
            self.node(i, p)?;
            if i + 1 == nodes {
                self.stage_heads()?;
            }
            if profile {
                let e = self
                    .gpu
                    .ctx
                    .new_event(timed)
                    .and_then(|e| e.record(&self.gpu.stream).map(|_| e))
                    .map_err(|e| EngineError::Device(format!("event: {e}")))?;
                marks.push(e);
            }
            if i + 1 == split
                && let Some((a, _)) = &self.events
            {
                a.record(&self.gpu.stream)
                    .map_err(|e| EngineError::Device(format!("event: {e}")))?;
                dense_started = true;
            }
            i += 1;
        }
        debug_assert_eq!(i, nodes);
        if split < nodes && !profile && self.graph_on {
            dense_started = self.events.is_some();
        }
        let t2 = std::time::Instant::now();
        if let Some((_, b)) = &self.events {
            b.record(&self.gpu.stream)
                .map_err(|e| EngineError::Device(format!("event: {e}")))?;
        }
        if let Sink::Candidates(_, cut, local_max) = &sink {
            self.enqueue_candidates(*cut, *local_max)?;
        }
        if let Some((a, b)) = &self.events {
            self.gpu.sync()?;
            self.last_dense_ms = if dense_started {
                a.elapsed_ms(b).ok().map(|m| m as f64)
            } else {
                None
            };
        }
        if let Some(acc) = &mut self.profile {
            self.gpu.sync()?;
            for (i, w) in marks.windows(2).enumerate() {
                acc[i + 1] += w[0].elapsed_ms(&w[1]).unwrap_or(0.0) as f64;
            }
            acc[0] += 1.0;
        }
        self.gpu.sync()?;
        let t3 = std::time::Instant::now();
        match sink {
            Sink::Maps(out) => self.collect(out)?,
            Sink::Candidates(out, ..) => self.collect_candidates(out)?,
        }
        let ms = |a: std::time::Instant, b: std::time::Instant| (b - a).as_secs_f64() * 1e3;
        self.last_phases = [
            ms(t0, t1),
            ms(t1, t2),
            ms(t2, t3),
            ms(t3, std::time::Instant::now()),
        ];
        Ok(())
    }

    /// Launches the candidate search of every task after the network (see
    /// [`run_candidates`](Self::run_candidates)).
    fn enqueue_candidates(&mut self, cut: f32, local_max: bool) -> Result<(), EngineError> {
        let nt = self.graph.tasks.len();
        let g = &self.gpu;
        g.ensure(&mut self.cand_count, 4 * nt)?;
        g.memset(self.cand_count.ptr, 0, 4 * nt)?;
        self.cand.resize_with(nt, CandTask::default);
        for (ti, t) in self.graph.tasks.iter().enumerate() {
            let hm = self.shapes[t.heatmap];
            let (classes, h, w) = (hm.dims[1], hm.dims[2], hm.dims[3]);
            let plane = h * w;
            let mut regs: Vec<u64> = Vec::new();
            for &v in &t.regression {
                let s = self.shapes[v];
                if s.rank != 4 || s.dims[2] != h || s.dims[3] != w {
                    return Err(EngineError::Internal(format!(
                        "task {ti}: regression shape {:?}",
                        &s.dims[..s.rank]
                    )));
                }
                regs.extend((0..s.dims[1]).map(|c| self.vals[v].ptr + (4 * c * plane) as u64));
            }
            let ct = &mut self.cand[ti];
            if ct.regs != regs {
                g.ensure(&mut ct.regs_dev, 8 * regs.len())?;
                g.upload(&ct.regs_dev, &regs)?;
                ct.regs = regs;
            }
            let (cap, stride) = (classes * plane, 3 + ct.regs.len());
            g.ensure(&mut ct.records, 4 * cap * stride)?;
            (ct.cap, ct.stride) = (cap, stride);
            g.launch(
                "head_candidates",
                cap,
                &[
                    P(self.vals[t.heatmap].ptr),
                    I(i32_of(classes)?),
                    I(i32_of(h)?),
                    I(i32_of(w)?),
                    F(cut),
                    I(local_max as i32),
                    P(ct.regs_dev.ptr),
                    I(i32_of(ct.regs.len())?),
                    I(i32_of(cap)?),
                    P(self.cand_count.ptr + 4 * ti as u64),
                    P(ct.records.ptr),
                ],
            )?;
        }
        Ok(())
    }

    /// Downloads the candidates: the counts, then each task's records.
    fn collect_candidates(&mut self, out: &mut Vec<TaskCandidates>) -> Result<(), EngineError> {
        let nt = self.graph.tasks.len();
        let mut counts = vec![0u32; nt];
        self.gpu
            .download(&mut counts, self.cand_count.ptr, self.cand_count.bytes)?;
        out.resize_with(nt, TaskCandidates::default);
        for ((tc, ct), &n) in out.iter_mut().zip(&self.cand).zip(&counts) {
            let n = (n as usize).min(ct.cap);
            let words = n * ct.stride;
            // Page-locked staging as for the head maps (thousands of candidates come back
            // from a model with random weights).
            let host = staging(
                &self.gpu,
                (&mut self.pinned_cand, &mut self.host_cand),
                &mut self.unpinned,
                words,
                0,
            )?;
            if n > 0 {
                self.gpu.download(host, ct.records.ptr, ct.records.bytes)?;
            }
            tc.logits.clear();
            tc.classes.clear();
            tc.cells.clear();
            tc.regression.clear();
            for r in host.chunks_exact(ct.stride) {
                tc.logits.push(f32::from_bits(r[0]));
                tc.classes.push(r[1]);
                tc.cells.push(r[2]);
                tc.regression
                    .extend(r[3..].iter().map(|&b| f32::from_bits(b)));
            }
        }
        Ok(())
    }

    /// Host-side milliseconds of the last run: input (checks, rulebooks, quantization and
    /// upload), launching the layers, waiting for the GPU, and collecting the head values
    /// (download and dequantization).
    pub fn last_phases_ms(&self) -> [f64; 4] {
        self.last_phases
    }

    /// The dense part, nodes `split..`, with the head staging: eagerly on the first frame,
    /// captured as a CUDA graph and launched on the second, replayed after that. A failed
    /// capture (a driver or cuBLAS that refuses it) turns graphs off and runs eagerly.
    fn dense_part(&mut self, split: usize, p: usize) -> Result<(), EngineError> {
        use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
        if let Some((a, _)) = &self.events {
            a.record(&self.gpu.stream)
                .map_err(|e| EngineError::Device(format!("event: {e}")))?;
        }
        if let Some(DenseGraph(graph)) = &self.dense_graph {
            return graph
                .launch()
                .map_err(|e| EngineError::Device(format!("CUDA graph launch: {e}")));
        }
        let nodes = self.graph.nodes.len();
        let eager = |e: &mut Self| -> Result<(), EngineError> {
            for i in split..nodes {
                e.node(i, p)?;
            }
            e.stage_heads()
        };
        if self.eager_dense_runs == 0 {
            self.eager_dense_runs += 1;
            return eager(self);
        }
        self.gpu
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| EngineError::Device(format!("CUDA graph capture: {e}")))?;
        let recorded = eager(self);
        let captured = self.gpu.stream.end_capture(CUgraphInstantiate_flags(0));
        match (recorded, captured) {
            (Ok(()), Ok(Some(graph))) => {
                graph
                    .launch()
                    .map_err(|e| EngineError::Device(format!("CUDA graph launch: {e}")))?;
                log::debug!("CUDA graph of the dense part captured");
                self.dense_graph = Some(DenseGraph(graph));
                Ok(())
            }
            (recorded, captured) => {
                let why = match (recorded, captured) {
                    (Err(e), _) => e.to_string(),
                    (_, Err(e)) => e.to_string(),
                    _ => "empty graph".to_string(),
                };
                log::warn!("CUDA graph capture failed ({why}); the dense part runs eagerly");
                self.graph_on = false;
                eager(self)
            }
        }
    }

    /// Copies the head values into the staging buffer (one download in `collect`).
    fn stage_heads(&mut self) -> Result<(), EngineError> {
        let mut layout = Vec::new();
        let mut off = 0;
        for t in &self.graph.tasks {
            for v in std::iter::once(t.heatmap).chain(t.regression.iter().copied()) {
                let bytes = self.elem(v) * self.shapes[v].len();
                layout.push((v, off, bytes));
                off += bytes.next_multiple_of(4);
            }
        }
        self.gpu.ensure(&mut self.head_stage, off)?;
        for &(v, at, bytes) in &layout {
            self.gpu
                .copy(self.head_stage.ptr + at as u64, self.vals[v].ptr, bytes)?;
        }
        self.head_layout = layout;
        Ok(())
    }

    /// Uploads each rulebook's neighbour table (`Rulebook::neighbours`): `[n_out, taps]`
    /// input rows, `u32::MAX` (-1 to the kernels, which read i32) where the site under an
    /// offset is inactive.
    fn upload_neighbours(&mut self) -> Result<(), EngineError> {
        let Some(fs) = &self.sites else {
            return Ok(());
        };
        self.nbr.resize_with(fs.rulebooks.len(), DBuf::default);
        for (rb, buf) in fs.rulebooks.iter().zip(&mut self.nbr) {
            // Rows must stay positive as i32.
            i32_of(rb.n_in())?;
            let table = rb.neighbours();
            self.gpu.ensure(buf, 4 * table.len())?;
            self.gpu.upload(buf, table)?;
        }
        Ok(())
    }

    /// Starts accumulating GPU time per node (CUDA events after every node; slows runs).
    pub fn enable_profile(&mut self) {
        self.profile = Some(vec![0.0; self.graph.nodes.len() + 1]);
        self.gpu.set_kernel_timing(true);
    }

    /// Summed GPU milliseconds and launch counts per kernel (and per GEMM shape) since
    /// [`enable_profile`](Self::enable_profile) or the last call, largest first.
    pub fn kernel_profile(&self) -> Result<Vec<(String, f64, usize)>, EngineError> {
        let mut v = self.gpu.take_kernel_times()?;
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        Ok(v)
    }

    /// Mean GPU milliseconds per node since [`enable_profile`](Self::enable_profile),
    /// by node name (the first node's time is not measured).
    pub fn profile(&self) -> Vec<(String, f64)> {
        let Some(acc) = &self.profile else {
            return Vec::new();
        };
        let runs = acc[0].max(1.0);
        self.graph
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), if i == 0 { 0.0 } else { acc[i] / runs }))
            .collect()
    }

    fn elem(&self, v: usize) -> usize {
        if self.acts[v].is_some() { 1 } else { 4 }
    }

    fn node(&mut self, i: usize, p: usize) -> Result<(), EngineError> {
        let node = &self.graph.nodes[i];
        let v = i + 1;
        let x = node.inputs[0];
        let xs = self.shapes[x];
        let out_q = self.acts[v];
        let g = &self.gpu;
        let shape = match &self.steps[i] {
            Step::Layer {
                kind,
                cout,
                batch: Some((bid, lead)),
                ..
            } => {
                let os = out_shape(*kind, &xs, *cout)
                    .ok_or_else(|| EngineError::Input(format!("{}: input shape", node.name)))?;
                if *lead {
                    self.run_batch(*bid, os)?;
                }
                os
            }
            Step::Layer {
                kind,
                cout,
                group: Some((gid, lead)),
                ..
            } => {
                let os = out_shape(*kind, &xs, *cout)
                    .ok_or_else(|| EngineError::Input(format!("{}: input shape", node.name)))?;
                if *lead {
                    self.run_group(*gid, x, xs, os)?;
                }
                os
            }
            Step::Layer {
                kind,
                relu,
                cin,
                cout,
                exec,
                group: None,
                batch: None,
            } => {
                // A sparse conv's output sites come from its rulebook.
                let (os, nbr) = match kind {
                    LayerKind::SparseConv3d { rulebook, .. } => {
                        let fs = self.sites.as_ref().ok_or_else(|| no_sites(&node.name))?;
                        let rb = fs.rulebooks.get(*rulebook).ok_or_else(|| {
                            EngineError::Internal(format!("{}: no rulebook {rulebook}", node.name))
                        })?;
                        if xs.rank != 2 || xs.dims[0] != rb.n_in() {
                            return Err(EngineError::Internal(format!(
                                "{}: input {:?} for a rulebook of {} sites",
                                node.name,
                                &xs.dims[..xs.rank],
                                rb.n_in()
                            )));
                        }
                        (Shape::new(&[rb.n_out(), *cout]), self.nbr[*rulebook].ptr)
                    }
                    _ => (
                        out_shape(*kind, &xs, *cout).ok_or_else(|| {
                            EngineError::Input(format!("{}: input shape", node.name))
                        })?,
                        0,
                    ),
                };
                let have = match xs.rank {
                    2 => xs.dims[1],
                    3 => xs.dims[2],
                    _ => xs.dims[1],
                };
                if have != *cin {
                    return Err(EngineError::Internal(format!(
                        "{}: {have} input channels, the layer takes {cin}",
                        node.name
                    )));
                }
                let elem_out = if out_q.is_some() { 1 } else { 4 };
                let mut yv = std::mem::take(&mut self.vals[v]);
                g.ensure(&mut yv, elem_out * os.len())?;
                let dense = self.dense_start.is_some_and(|d| i >= d);
                let sc = if dense {
                    &mut self.dense_sc
                } else {
                    &mut self.scratch
                };
                let r = run_layer(
                    g,
                    sc,
                    LayerCall {
                        kind: *kind,
                        relu: *relu,
                        cout: *cout,
                        exec,
                        xs,
                        x: (self.vals[x].ptr, self.acts[x]),
                        x_scales: match &self.input_scales {
                            Some(s) if x == 0 => (self.input_scales_dev.ptr, s.len()),
                            _ => (0, 0),
                        },
                        os,
                        y: (yv.ptr, out_q),
                        nbr,
                    },
                );
                self.vals[v] = yv;
                r?;
                os
            }
            Step::PillarMax {
                concat_back,
                include_padding,
            } => {
                let [pp, nn, c, _] = xs.dims;
                let os = if *concat_back {
                    Shape::new(&[pp, nn, 2 * c])
                } else {
                    Shape::new(&[pp, c])
                };
                let mut yv = std::mem::take(&mut self.vals[v]);
                g.ensure(&mut yv, self.elem(v) * os.len())?;
                let counts = if *include_padding {
                    0u64
                } else {
                    self.scratch.counts.ptr
                };
                let (xp, yp) = (self.vals[x].ptr, yv.ptr);
                let (pi, ni, ci) = (i32_of(pp)?, i32_of(nn)?, i32_of(c)?);
                let cat = *concat_back as i32;
                let r = match out_q {
                    Some(q) => {
                        let empty = q.zero_point as u8;
                        g.launch(
                            "pillar_max_u8",
                            pp * c,
                            &[
                                P(xp),
                                P(counts),
                                I(pi),
                                I(ni),
                                I(ci),
                                I(cat),
                                B(empty),
                                P(yp),
                            ],
                        )
                    }
                    None => {
                        let empty = 0.0f32;
                        g.launch(
                            "pillar_max_f32",
                            pp * c,
                            &[
                                P(xp),
                                P(counts),
                                I(pi),
                                I(ni),
                                I(ci),
                                I(cat),
                                F(empty),
                                P(yp),
                            ],
                        )
                    }
                };
                self.vals[v] = yv;
                r?;
                os
            }
            Step::Scatter => {
                let (ny, nx) = self.graph.bev;
                let c = xs.dims[1];
                let os = Shape::new(&[1, c, ny, nx]);
                let mut yv = std::mem::take(&mut self.vals[v]);
                let elem = self.elem(v);
                g.ensure(&mut yv, elem * os.len())?;
                let (xp, yp, cells) = (self.vals[x].ptr, yv.ptr, self.scratch.cells.ptr);
                let (pi, ci, plane) = (i32_of(p)?, i32_of(c)?, i64_of(ny * nx)?);
                let r = match out_q {
                    Some(q) => g.memset(yp, q.zero_point as u8, os.len()).and_then(|_| {
                        g.launch(
                            "scatter_u8",
                            p * c,
                            &[P(xp), P(cells), I(pi), I(ci), L(plane), P(yp)],
                        )
                    }),
                    None => g.memset(yp, 0, 4 * os.len()).and_then(|_| {
                        g.launch(
                            "scatter_f32",
                            p * c,
                            &[P(xp), P(cells), I(pi), I(ci), L(plane), P(yp)],
                        )
                    }),
                };
                self.vals[v] = yv;
                r?;
                os
            }
            Step::Add { relu } => {
                let b = node.inputs[1];
                let bs = self.shapes[b];
                if bs.rank != xs.rank || bs.dims != xs.dims {
                    return Err(EngineError::Internal(format!(
                        "{}: adding shapes {:?} and {:?}",
                        node.name,
                        &xs.dims[..xs.rank],
                        &bs.dims[..bs.rank]
                    )));
                }
                let len = xs.len();
                let relu = *relu;
                let mut yv = std::mem::take(&mut self.vals[v]);
                let r = g.ensure(&mut yv, self.elem(v) * len).and_then(|_| {
                    add_values(
                        g,
                        &mut self.scratch,
                        (self.vals[x].ptr, self.vals[b].ptr, self.acts[x]),
                        len,
                        relu,
                        (yv.ptr, out_q),
                    )
                });
                self.vals[v] = yv;
                r?;
                xs
            }
            Step::HeightCompress { sites: set } => {
                let fs = self.sites.as_ref().ok_or_else(|| no_sites(&node.name))?;
                let coords = fs.sites(*set);
                let [d, h, w] = fs.grid(*set);
                let c = xs.dims[1];
                if xs.rank != 2 || xs.dims[0] != coords.len() {
                    return Err(EngineError::Internal(format!(
                        "{}: {:?} features for {} sites",
                        node.name,
                        &xs.dims[..xs.rank],
                        coords.len()
                    )));
                }
                let os = Shape::new(&[1, c * d, h, w]);
                let elem = self.elem(v);
                let mut yv = std::mem::take(&mut self.vals[v]);
                let sc = &mut self.scratch;
                let (n_sites, ci) = (i32_of(coords.len())?, i32_of(c)?);
                let (di, hi, wi) = (i32_of(d)?, i32_of(h)?, i32_of(w)?);
                let r = g
                    .ensure(&mut yv, elem * os.len())
                    .and_then(|_| g.ensure(&mut sc.cells, 12 * coords.len()))
                    .and_then(|_| g.upload(&sc.cells, coords))
                    .and_then(|_| {
                        let args = [
                            P(self.vals[x].ptr),
                            P(sc.cells.ptr),
                            I(n_sites),
                            I(ci),
                            I(di),
                            I(hi),
                            I(wi),
                            P(yv.ptr),
                        ];
                        match out_q {
                            Some(q) => g
                                .memset(yv.ptr, q.zero_point as u8, os.len())
                                .and_then(|_| g.launch("hcomp_u8", coords.len() * c, &args)),
                            None => g
                                .memset(yv.ptr, 0, 4 * os.len())
                                .and_then(|_| g.launch("hcomp_f32", coords.len() * c, &args)),
                        }
                    });
                self.vals[v] = yv;
                r?;
                os
            }
            Step::Concat => {
                let c: usize = node.inputs.iter().map(|&u| self.shapes[u].dims[1]).sum();
                let os = Shape::new(&[1, c, xs.dims[2], xs.dims[3]]);
                let elem = self.elem(v);
                let mut yv = std::mem::take(&mut self.vals[v]);
                g.ensure(&mut yv, elem * os.len())?;
                let mut off = 0;
                let mut r = Ok(());
                for &u in &node.inputs {
                    let bytes = elem * self.shapes[u].len();
                    r = r.and_then(|_| g.copy(yv.ptr + off as u64, self.vals[u].ptr, bytes));
                    off += bytes;
                }
                self.vals[v] = yv;
                r?;
                os
            }
        };
        self.shapes[v] = shape;
        Ok(())
    }

    /// Runs every member of sibling group `gid` (at its first member): one im2col of the
    /// shared input `x`, one GEMM, the members' epilogues into their own values.
    fn run_group(&mut self, gid: usize, x: usize, xs: Shape, os: Shape) -> Result<(), EngineError> {
        let Self {
            gpu: g,
            graph,
            acts,
            steps,
            groups,
            group_out,
            vals,
            dense_sc: sc,
            group_rows,
            ..
        } = self;
        let grp = &groups[gid];
        let Op::Layer(l) = &graph.nodes[grp.members[0]].op else {
            return Err(EngineError::Internal("group of a non-layer".into()));
        };
        let LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } = l.kind
        else {
            return Err(EngineError::Internal("group of a non-convolution".into()));
        };
        let (ci, h, wd) = (xs.dims[1], xs.dims[2], xs.dims[3]);
        let (ho, wo) = (os.dims[2], os.dims[3]);
        let plane = ho * wo;
        g.ensure(&mut group_out[gid], grp.units * plane)?;
        for (&m, &u) in grp.members.iter().zip(&grp.out_units) {
            let Step::Layer { cout, .. } = &steps[m] else {
                return Err(EngineError::Internal("group member is not a layer".into()));
            };
            let elem = if acts[m + 1].is_some() { 1 } else { 4 };
            vals[m + 1] = DBuf::view(group_out[gid].ptr + (u * plane) as u64, elem * cout * plane);
        }
        let ksp = (kernel, stride, padding);
        let ldc = if grp.int {
            let zx = acts[x]
                .ok_or_else(|| EngineError::Internal("integer group on floats".into()))?
                .zero_point;
            let nhwc = tap_major(l.kind, ci);
            let col = im2col_int(
                g,
                sc,
                vals[x].ptr,
                (ci, h, wd),
                ksp,
                (ho, wo),
                grp.k,
                zx,
                0,
                nhwc,
            )?;
            let ldc = plane.next_multiple_of(4);
            g.ensure(&mut sc.acc, 4 * ldc * grp.cout_total)?;
            gemm_i8(
                g,
                (plane, grp.cout_total, grp.k),
                (col, grp.k),
                (grp.w.ptr, grp.k),
                (sc.acc.ptr, ldc),
            )?;
            ldc
        } else {
            let col = im2col_float(g, sc, vals[x].ptr, grp.half, (ci, h, wd), ksp, (ho, wo))?;
            g.ensure(&mut sc.acc, 4 * plane * grp.cout_total)?;
            let kind = if grp.half {
                GemmKind::F16
            } else {
                GemmKind::F32
            };
            gemm_checked(
                g,
                kind,
                (false, false),
                (plane, grp.cout_total, grp.k),
                (col, plane),
                (grp.w.ptr, grp.k),
                (sc.acc.ptr, plane),
            )?;
            plane
        };
        if grp.int && plane.is_multiple_of(4) && ldc.is_multiple_of(4) && grp.cout_total <= 65535 {
            // Every member's epilogue in one launch.
            let mut bytes = Vec::with_capacity(grp.cout_total * ROW_EPI_BYTES);
            for &m in &grp.members {
                let Step::Layer {
                    cout, relu, exec, ..
                } = &steps[m]
                else {
                    return Err(EngineError::Internal("group member is not a layer".into()));
                };
                let elem = if acts[m + 1].is_some() { 1 } else { 4 };
                for c in 0..*cout {
                    let y = vals[m + 1].ptr + (c * plane * elem) as u64;
                    row_entry(&mut bytes, exec, *relu, acts[m + 1], y, c)?;
                }
            }
            if group_rows.len() <= gid {
                group_rows.resize_with(gid + 1, RowTable::default);
            }
            return run_rows(g, &mut group_rows[gid], bytes, sc.acc.ptr, plane, ldc);
        }
        for (&m, &off) in grp.members.iter().zip(&grp.offsets) {
            let Step::Layer {
                cout, relu, exec, ..
            } = &steps[m]
            else {
                return Err(EngineError::Internal("group member is not a layer".into()));
            };
            let map = EpiMap {
                mode: 1,
                n: i64_of(cout * plane)?,
                cout: i32_of(*cout)?,
                plane: i64_of(plane)?,
                wo: i32_of(wo)?,
                s: 1,
                ldc: i64_of(ldc)?,
            };
            let acc = sc.acc.ptr + (4 * off * ldc) as u64;
            match &**exec {
                Exec::Int {
                    wsum,
                    bias_q,
                    zx,
                    epi,
                    ..
                } => epi_int(
                    g,
                    acc,
                    (wsum, bias_q, *zx),
                    epi,
                    *relu,
                    &map,
                    (vals[m + 1].ptr, acts[m + 1]),
                )?,
                Exec::Float { bias, .. } => epi_float(g, acc, bias, *relu, &map, vals[m + 1].ptr)?,
            }
        }
        Ok(())
    }

    /// Runs the branch batch `bid` (at its first member): the next conv of every member
    /// of a sibling group, on the group's stacked output, as one im2col and one strided
    /// batched GEMM, then each member's epilogue.
    fn run_batch(&mut self, bid: usize, os: Shape) -> Result<(), EngineError> {
        let Self {
            gpu: g,
            graph,
            acts,
            steps,
            groups,
            group_out,
            batches,
            vals,
            shapes,
            dense_sc: sc,
            direct_on,
            batch_rows,
            ..
        } = self;
        let b = &batches[bid];
        let src = &groups[b.src];
        let Op::Layer(l) = &graph.nodes[b.members[0]].op else {
            return Err(EngineError::Internal("batch of a non-layer".into()));
        };
        let LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } = l.kind
        else {
            return Err(EngineError::Internal("batch of a non-convolution".into()));
        };
        let xs = shapes[src.members[0] + 1];
        let (h, wd) = (xs.dims[2], xs.dims[3]);
        let (ho, wo) = (os.dims[2], os.dims[3]);
        let plane = ho * wo;
        let n = b.members.len();
        let (k, cmax) = (b.k, b.cmax);
        let ci_total = n * l.in_channels;
        let x = group_out[b.src].ptr;
        let ksp = (kernel, stride, padding);
        let ldc = if b.direct && *direct_on {
            g.ensure(&mut sc.acc, 4 * n * cmax * plane)?;
            let mut list = vec![P(x)];
            for v in [n, l.in_channels, h, wd, kernel, stride, padding, ho, wo] {
                list.push(I(i32_of(v)?));
            }
            let w = if b.half && !b.int { &b.w32 } else { &b.w };
            list.push(P(w.ptr));
            if b.int {
                list.push(P(b.zxc.ptr));
            }
            list.extend([P(sc.acc.ptr), I(i32_of(plane)?)]);
            // One kernel per output-channel count (1..=DIRECT_MAX_OUT).
            let name = if b.int {
                format!("branch_conv_s8_{cmax}")
            } else {
                format!("branch_conv_f32_{cmax}")
            };
            // The integer kernel takes four pixels of a row per thread.
            let threads = if b.int {
                n * ho * wo.div_ceil(4)
            } else {
                n * plane
            };
            g.launch(&name, threads, &list)?;
            plane
        } else if b.int {
            let col = im2col_int(
                g,
                sc,
                x,
                (ci_total, h, wd),
                ksp,
                (ho, wo),
                n * k,
                0,
                b.zxc.ptr,
                false,
            )?;
            let ldc = plane.next_multiple_of(4);
            g.ensure(&mut sc.acc, 4 * n * cmax * ldc)?;
            let done = g.gemm_batched(
                GemmKind::I8,
                (true, false),
                (plane, cmax, k),
                (col, n * k, k),
                (b.w.ptr, k, cmax * k),
                (sc.acc.ptr, ldc, cmax * ldc),
                n,
            )?;
            if !done {
                for j in 0..n {
                    gemm_i8(
                        g,
                        (plane, cmax, k),
                        (col + (j * k) as u64, n * k),
                        (b.w.ptr + (j * cmax * k) as u64, k),
                        (sc.acc.ptr + (4 * j * cmax * ldc) as u64, ldc),
                    )?;
                }
            }
            ldc
        } else {
            let col = im2col_float(g, sc, x, b.half, (ci_total, h, wd), ksp, (ho, wo))?;
            g.ensure(&mut sc.acc, 4 * n * cmax * plane)?;
            let kind = if b.half { GemmKind::F16 } else { GemmKind::F32 };
            let done = g.gemm_batched(
                kind,
                (false, false),
                (plane, cmax, k),
                (col, plane, k * plane),
                (b.w.ptr, k, cmax * k),
                (sc.acc.ptr, plane, cmax * plane),
                n,
            )?;
            if !done {
                return Err(EngineError::Device(format!(
                    "cuBLAS does not support the batched {kind:?} GEMM"
                )));
            }
            plane
        };
        if b.int && plane.is_multiple_of(4) && ldc.is_multiple_of(4) && n * cmax <= 65535 {
            // Every member's epilogue in one launch; rows past a member's channels pad.
            let mut bytes = Vec::with_capacity(n * cmax * ROW_EPI_BYTES);
            for &m in &b.members {
                let Step::Layer {
                    cout, relu, exec, ..
                } = &steps[m]
                else {
                    return Err(EngineError::Internal("batch member is not a layer".into()));
                };
                let elem = if acts[m + 1].is_some() { 1 } else { 4 };
                g.ensure(&mut vals[m + 1], elem * cout * plane)?;
                for c in 0..cmax {
                    if c < *cout {
                        let y = vals[m + 1].ptr + (c * plane * elem) as u64;
                        row_entry(&mut bytes, exec, *relu, acts[m + 1], y, c)?;
                    } else {
                        bytes.extend_from_slice(&[0u8; ROW_EPI_BYTES]);
                    }
                }
            }
            if batch_rows.len() <= bid {
                batch_rows.resize_with(bid + 1, RowTable::default);
            }
            return run_rows(g, &mut batch_rows[bid], bytes, sc.acc.ptr, plane, ldc);
        }
        for (j, &m) in b.members.iter().enumerate() {
            let Step::Layer {
                cout, relu, exec, ..
            } = &steps[m]
            else {
                return Err(EngineError::Internal("batch member is not a layer".into()));
            };
            let elem = if acts[m + 1].is_some() { 1 } else { 4 };
            g.ensure(&mut vals[m + 1], elem * cout * plane)?;
            let map = EpiMap {
                mode: 1,
                n: i64_of(cout * plane)?,
                cout: i32_of(*cout)?,
                plane: i64_of(plane)?,
                wo: i32_of(wo)?,
                s: 1,
                ldc: i64_of(ldc)?,
            };
            let acc = sc.acc.ptr + (4 * j * cmax * ldc) as u64;
            match &**exec {
                Exec::Int {
                    wsum,
                    bias_q,
                    zx,
                    epi,
                    ..
                } => epi_int(
                    g,
                    acc,
                    (wsum, bias_q, *zx),
                    epi,
                    *relu,
                    &map,
                    (vals[m + 1].ptr, acts[m + 1]),
                )?,
                Exec::Float { bias, .. } => epi_float(g, acc, bias, *relu, &map, vals[m + 1].ptr)?,
            }
        }
        Ok(())
    }

    /// Downloads the staged head values into `out` with one copy (codes dequantized on
    /// the host, as the CPU INT8 engine does).
    fn collect(&mut self, out: &mut HeadOutputs) -> Result<(), EngineError> {
        let total = self.head_layout.last().map_or(0, |&(_, at, b)| at + b);
        // Page-locked (cached, not write-combined: the host reads it) where the driver
        // allows, so the copy runs at the bus's speed.
        let host = staging(
            &self.gpu,
            (&mut self.pinned_out, &mut self.host_stage),
            &mut self.unpinned,
            total,
            0,
        )?;
        self.gpu
            .download(host, self.head_stage.ptr, self.head_stage.bytes)?;
        let host: &[u8] = host;
        out.tasks.resize_with(self.graph.tasks.len(), || TaskMaps {
            heatmap: Vec::new(),
            regression: Vec::new(),
        });
        let mut staged = self.head_layout.iter();
        let mut next = |dst: &mut Vec<f32>| -> Result<(), EngineError> {
            let &(v, at, bytes) = staged
                .next()
                .ok_or_else(|| EngineError::Internal("head staging layout".into()))?;
            let raw = &host[at..at + bytes];
            match self.acts[v] {
                Some(q) => dst.extend(raw.iter().map(|&c| q.dequantize(c as i32))),
                None => dst.extend(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]])),
                ),
            }
            Ok(())
        };
        for (ti, maps) in out.tasks.iter_mut().enumerate() {
            let t = &self.graph.tasks[ti];
            let hm = self.shapes[t.heatmap];
            (out.h, out.w) = (hm.dims[2], hm.dims[3]);
            maps.heatmap.clear();
            next(&mut maps.heatmap)?;
            maps.regression.clear();
            for _ in &t.regression {
                next(&mut maps.regression)?;
            }
        }
        Ok(())
    }
}

/// Appends the `epi_rows4` entry of output channel `ch` of integer layer `exec` writing
/// to `y` (its output's parameters `out_q`: codes, or reals when `None`).
fn row_entry(
    bytes: &mut Vec<u8>,
    exec: &Exec,
    relu: bool,
    out_q: Option<QParams>,
    y: u64,
    ch: usize,
) -> Result<(), EngineError> {
    let Exec::Int {
        wsum,
        bias_q,
        zx,
        epi,
        ..
    } = exec
    else {
        return Err(EngineError::Internal(
            "row epilogue of a float layer".into(),
        ));
    };
    let (mult, zp, lo, hi, flags) = match (epi, out_q) {
        (IntEpi::Requant { mult, zp, lo, hi }, Some(_)) => (mult.ptr, *zp, *lo, *hi, 0),
        (IntEpi::Dequant { scale }, None) => (scale.ptr, 0, 0, 0, 1 | if relu { 2 } else { 0 }),
        _ => {
            return Err(EngineError::Internal(
                "integer epilogue does not match the output's parameters".into(),
            ));
        }
    };
    for v in [y, wsum.ptr, bias_q.ptr, mult] {
        bytes.extend_from_slice(&v.to_ne_bytes());
    }
    for v in [i32_of(ch)?, 128 - zx, zp, lo, hi, flags] {
        bytes.extend_from_slice(&v.to_ne_bytes());
    }
    Ok(())
}

/// Launches `epi_rows4` over the rows of `bytes` (uploaded when they changed: on the first
/// run, never inside a graph capture once the buffers are stable).
fn run_rows(
    g: &Gpu,
    table: &mut RowTable,
    bytes: Vec<u8>,
    acc: u64,
    plane: usize,
    ldc: usize,
) -> Result<(), EngineError> {
    if table.host != bytes {
        g.ensure(&mut table.dev, bytes.len())?;
        g.upload(&table.dev, &bytes)?;
        table.host = bytes;
    }
    let rows = table.host.len() / ROW_EPI_BYTES;
    g.launch_grid(
        "epi_rows4",
        ((plane / 4).div_ceil(256), rows, 1),
        256,
        0,
        &[P(acc), P(table.dev.ptr), I(i32_of(plane)?), L(i64_of(ldc)?)],
    )
}

/// The floats' bytes into `dst` (as long), in parallel.
fn copy_floats(dst: &mut [u8], src: &[f32]) {
    dst.par_chunks_mut(1 << 16)
        .zip(src.par_chunks(1 << 14))
        .for_each(|(d, s)| {
            for (d, x) in d.chunks_exact_mut(4).zip(s) {
                d.copy_from_slice(&x.to_ne_bytes());
            }
        });
}

/// Page-locked host memory the host only writes (uploads): faster to fill and copy.
const WRITE_COMBINED: u32 = cudarc::driver::sys::CU_MEMHOSTALLOC_WRITECOMBINED;

/// `len` elements of host staging for a transfer: page-locked memory (allocated with
/// `flags`, grown with headroom to the largest frame), or the pageable `fallback` once the
/// driver has refused to pin (`unpinned`). The caller uses only what it writes or
/// downloads; the previous frame's transfers have finished (each run ends synchronized).
fn staging<'a, T>(
    g: &Gpu,
    (pinned, fallback): (&'a mut Option<PinnedHostSlice<T>>, &'a mut Vec<T>),
    unpinned: &mut bool,
    len: usize,
    flags: u32,
) -> Result<&'a mut [T], EngineError>
where
    T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits + Default + Clone,
{
    if pinned.as_ref().is_none_or(|b| b.len() < len) && !*unpinned {
        // SAFETY: T is valid for any bits (ValidAsZeroBits plain data); callers read only
        // what they wrote or downloaded.
        match unsafe {
            g.ctx
                .alloc_pinned_with_flags::<T>((len + len / 4).max(1), flags)
        } {
            Ok(b) => *pinned = Some(b),
            Err(e) => {
                log::warn!("pinned host memory refused ({e}): pageable transfers");
                *pinned = None;
                *unpinned = true;
            }
        }
    }
    match pinned {
        Some(b) if b.len() >= len => {
            let s = b
                .as_mut_slice()
                .map_err(|e| EngineError::Device(format!("pinned staging: {e}")))?;
            Ok(&mut s[..len])
        }
        _ => {
            fallback.resize(len, T::default());
            Ok(&mut fallback[..len])
        }
    }
}

/// The residual join `a + b` (ReLU when asked) of two values of `len` elements: on shared
/// codes exactly as the CPU INT8 engine (the sum of centred codes requantized), else in
/// reals (dequantized codes, or floats), quantized when the output has parameters.
fn add_values(
    g: &Gpu,
    sc: &mut Scratch,
    (a, b, qi): (u64, u64, Option<QParams>),
    len: usize,
    relu: bool,
    (y, qo): (u64, Option<QParams>),
) -> Result<(), EngineError> {
    let nl = i64_of(len)?;
    if let (Some(qi), Some(qo)) = (qi, qo) {
        let r = crate::quant::scheme::add_requant(qi.scale, &qo, relu);
        return g.launch(
            "add_u8",
            len,
            &[
                P(a),
                P(b),
                L(nl),
                I(qi.zero_point),
                F(r.multiplier),
                I(r.zero_point),
                I(r.lo),
                I(r.hi),
                P(y),
            ],
        );
    }
    let (ra, rb) = match qi {
        Some(q) => {
            g.ensure(&mut sc.fin, 4 * len)?;
            g.ensure(&mut sc.fin2, 4 * len)?;
            for (src, dst) in [(a, sc.fin.ptr), (b, sc.fin2.ptr)] {
                g.launch(
                    "dequant_u8",
                    len,
                    &[P(src), L(nl), F(q.scale), I(q.zero_point), P(dst)],
                )?;
            }
            (sc.fin.ptr, sc.fin2.ptr)
        }
        None => (a, b),
    };
    let sum = match qo {
        Some(_) => {
            g.ensure(&mut sc.fout, 4 * len)?;
            sc.fout.ptr
        }
        None => y,
    };
    g.launch(
        "add_f32",
        len,
        &[P(ra), P(rb), L(nl), I(relu as i32), P(sum)],
    )?;
    if let Some(q) = qo {
        let (scale, zp, qmin, qmax) = (q.scale, q.zero_point, q.grid.qmin, q.grid.qmax);
        g.launch(
            "quant_f32",
            len,
            &[P(sum), L(nl), F(scale), I(zp), I(qmin), I(qmax), P(y)],
        )?;
    }
    Ok(())
}

fn out_shape(kind: LayerKind, xs: &Shape, cout: usize) -> Option<Shape> {
    Some(match kind {
        LayerKind::SparseConv3d { .. } => return None,
        LayerKind::Linear => {
            if xs.rank != 3 {
                return None;
            }
            Shape::new(&[xs.dims[0], xs.dims[1], cout])
        }
        LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } => {
            if xs.rank != 4 {
                return None;
            }
            let (h, w) = (xs.dims[2], xs.dims[3]);
            let ho = (h + 2 * padding).checked_sub(kernel)? / stride + 1;
            let wo = (w + 2 * padding).checked_sub(kernel)? / stride + 1;
            Shape::new(&[1, cout, ho, wo])
        }
        LayerKind::ConvTranspose2d { kernel, stride } => {
            if xs.rank != 4 {
                return None;
            }
            let (h, w) = (xs.dims[2], xs.dims[3]);
            Shape::new(&[
                1,
                cout,
                (h - 1) * stride + kernel,
                (w - 1) * stride + kernel,
            ])
        }
    })
}

type GroupPlan = (Vec<Group>, Vec<Option<(usize, bool)>>);

/// Finds the sibling groups: convolutions with the same input value and geometry, all
/// integer or all float (float: on an f32 input, to an f32 output), and uploads their
/// stacked weights.
fn plan_groups(
    g: &Gpu,
    graph: &Graph,
    plans: &[Option<&LayerPlan>],
    acts: &[Option<QParams>],
    folded: &[Option<FoldedLayer>],
    half: bool,
) -> Result<GroupPlan, EngineError> {
    // (input value, geometry, input channels, integer) -> members.
    type Key = (usize, LayerKind, usize, bool);
    let mut by_key: Vec<(Key, Vec<usize>)> = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        let Op::Layer(l) = &node.op else { continue };
        if !matches!(l.kind, LayerKind::Conv2d { .. }) {
            continue;
        }
        let x = node.inputs[0];
        let int = matches!(plans[i], Some(LayerPlan::Int(_)));
        if !int && (acts[x].is_some() || acts[i + 1].is_some()) {
            continue;
        }
        let key = (x, l.kind, l.in_channels, int);
        match by_key.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => by_key.push((key, vec![i])),
        }
    }
    let mut groups = Vec::new();
    let mut group_of = vec![None; graph.nodes.len()];
    for ((_, kind, cin, int), members) in by_key {
        if members.len() < 2 {
            continue;
        }
        let couts: Vec<usize> = members
            .iter()
            .map(|&m| match &graph.nodes[m].op {
                Op::Layer(l) => l.out_channels,
                _ => 0,
            })
            .collect();
        let mut offsets = Vec::new();
        let mut total = 0;
        for c in &couts {
            offsets.push(total);
            total += c;
        }
        let (w, k) = if int {
            let mut rows = Vec::new();
            let mut kpad = 0;
            for (&m, &cout) in members.iter().zip(&couts) {
                let Some(LayerPlan::Int(lw)) = plans[m] else {
                    return Err(EngineError::Internal("integer group member".into()));
                };
                let (r, kp) = int_weight_rows(kind, cin, cout, lw, tap_major(kind, cin))?;
                rows.extend_from_slice(&r);
                kpad = kp;
            }
            (g.alloc_from(&rows)?, kpad)
        } else {
            let mut rows: Vec<f32> = Vec::new();
            for &m in &members {
                let f = folded[m]
                    .as_ref()
                    .ok_or_else(|| EngineError::Internal("float group member".into()))?;
                rows.extend_from_slice(&f.weight.data);
            }
            let k = rows.len() / total;
            let buf = if half {
                let h: Vec<u16> = rows
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                g.alloc_from(&h)?
            } else {
                g.alloc_from(&rows)?
            };
            (buf, k)
        };
        let gid = groups.len();
        for (j, &m) in members.iter().enumerate() {
            group_of[m] = Some((gid, j == 0));
        }
        let mut out_units = Vec::new();
        let mut units = 0;
        for (&m, &c) in members.iter().zip(&couts) {
            out_units.push(units);
            units += c * if acts[m + 1].is_some() { 1 } else { 4 };
        }
        groups.push(Group {
            members,
            offsets,
            out_units,
            units,
            cout_total: total,
            w,
            k,
            int,
            half,
        });
    }
    Ok((groups, group_of))
}

type BatchPlan = (Vec<Batch>, Vec<Option<(usize, bool)>>);

/// Finds, for each sibling group, the next convolutions of all its members when every
/// member has exactly one reader, a convolution of one geometry, all integer or all float.
#[allow(clippy::too_many_arguments)]
fn plan_batches(
    g: &Gpu,
    graph: &Graph,
    plans: &[Option<&LayerPlan>],
    acts: &[Option<QParams>],
    folded: &[Option<FoldedLayer>],
    half: bool,
    groups: &[Group],
    group_of: &[Option<(usize, bool)>],
) -> Result<BatchPlan, EngineError> {
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len() + 1];
    for (i, n) in graph.nodes.iter().enumerate() {
        for &v in &n.inputs {
            readers[v].push(i);
        }
    }
    let heads: Vec<usize> = graph
        .tasks
        .iter()
        .flat_map(|t| std::iter::once(t.heatmap).chain(t.regression.iter().copied()))
        .collect();
    let layer = |i: usize| match &graph.nodes[i].op {
        Op::Layer(l) => Some(l),
        _ => None,
    };
    let mut batches = Vec::new();
    let mut batch_of = vec![None; graph.nodes.len()];
    'groups: for (gid, grp) in groups.iter().enumerate() {
        let mut members = Vec::new();
        for &m in &grp.members {
            let r = &readers[m + 1];
            if r.len() != 1 || heads.contains(&(m + 1)) || group_of[r[0]].is_some() {
                continue 'groups;
            }
            members.push(r[0]);
        }
        let Some(first) = layer(members[0]) else {
            continue;
        };
        let LayerKind::Conv2d { kernel, .. } = first.kind else {
            continue;
        };
        let int = grp.int;
        for &c in &members {
            let Some(l) = layer(c) else { continue 'groups };
            let c_int = matches!(plans[c], Some(LayerPlan::Int(_)));
            if l.kind != first.kind || l.in_channels != first.in_channels || c_int != int {
                continue 'groups;
            }
            if int && acts[graph.nodes[c].inputs[0]].is_none() {
                continue 'groups;
            }
            if !int && (acts[graph.nodes[c].inputs[0]].is_some() || acts[c + 1].is_some()) {
                continue 'groups;
            }
        }
        let k = first.in_channels * kernel * kernel;
        if int && !k.is_multiple_of(4) {
            continue;
        }
        let couts: Vec<usize> = members
            .iter()
            .map(|&c| layer(c).map_or(0, |l| l.out_channels))
            .collect();
        let cmax = couts.iter().copied().max().unwrap_or(0);
        let direct = cmax <= DIRECT_MAX_OUT;
        let n = members.len();
        let mut w32 = DBuf::default();
        let (w, zxc) = if int {
            let mut w = vec![0i8; n * cmax * k];
            let mut zxc = Vec::with_capacity(n * first.in_channels);
            for (j, (&c, &cout)) in members.iter().zip(&couts).enumerate() {
                let Some(LayerPlan::Int(lw)) = plans[c] else {
                    continue 'groups;
                };
                // ci-major: the direct kernel and the stacked im2col index (ci, tap).
                let (rows, kpad) = int_weight_rows(first.kind, first.in_channels, cout, lw, false)?;
                debug_assert_eq!(kpad, k);
                w[j * cmax * k..j * cmax * k + rows.len()].copy_from_slice(&rows);
                let zx = acts[graph.nodes[c].inputs[0]].map_or(0, |q| q.zero_point);
                zxc.extend(std::iter::repeat_n(zx, first.in_channels));
            }
            (g.alloc_from(&w)?, g.alloc_from(&zxc)?)
        } else {
            let mut w = vec![0.0f32; n * cmax * k];
            for (j, &c) in members.iter().enumerate() {
                let f = folded[c]
                    .as_ref()
                    .ok_or_else(|| EngineError::Internal("float batch member".into()))?;
                w[j * cmax * k..j * cmax * k + f.weight.data.len()].copy_from_slice(&f.weight.data);
            }
            let buf = if half {
                let h: Vec<u16> = w
                    .iter()
                    .map(|&x| half::f16::from_f32(x).to_bits())
                    .collect();
                g.alloc_from(&h)?
            } else {
                g.alloc_from(&w)?
            };
            // The direct kernel computes in f32 in every precision.
            w32 = if half && direct {
                g.alloc_from(&w)?
            } else {
                DBuf::default()
            };
            (buf, DBuf::default())
        };
        let bid = batches.len();
        for (j, &c) in members.iter().enumerate() {
            batch_of[c] = Some((bid, j == 0));
        }
        batches.push(Batch {
            members,
            src: gid,
            cmax,
            k,
            w,
            zxc,
            w32,
            int,
            half,
            direct,
        });
    }
    Ok((batches, batch_of))
}
