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
//! frames allocate nothing. Voxelisation and decoding stay on the CPU for now.

mod device;

pub use device::{Gpu, compile_kernels, driver_present, nvrtc_present};

use super::fp32::{FoldedLayer, fold_layers};
use super::{EngineError, HeadOutputs, NetInput, TaskMaps, check_cells, check_input};
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::weights::Weights;
use crate::quant::{LayerPlan, QParams, QuantModel, Requant, quantize_bias};
use cudarc::driver::CudaEvent;
use device::Arg::{B, F, I, L, P};
use device::{DBuf, GemmKind};
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

enum IntEpi {
    Requant {
        mult: DBuf,
        zp: i32,
        lo: i32,
        hi: i32,
    },
    Dequant {
        scale: DBuf,
    },
}

enum Exec {
    /// Folded f32 weights in the GEMM's layout (as stored: conv `[Cout, K]`, transposed
    /// conv `[Cin, Cout*k*k]`, linear `[Cout, Cin]`), f16 copies when `half`.
    Float { w: DBuf, bias: DBuf, half: bool },
    /// s8 weights `[cols, kpad]` (cols = GEMM output columns: Cout, or Cout*k*k taps for
    /// the transposed conv), their sums per column, the quantized bias per channel.
    Int {
        w: DBuf,
        kpad: usize,
        wsum: DBuf,
        bias_q: DBuf,
        zx: i32,
        epi: IntEpi,
    },
}

enum Step {
    Layer {
        kind: LayerKind,
        relu: bool,
        cin: usize,
        cout: usize,
        exec: Box<Exec>,
    },
    PillarMax {
        concat_back: bool,
        include_padding: bool,
    },
    Scatter,
    Concat,
}

/// Scratch buffers shared by the layers.
#[derive(Default)]
struct Scratch {
    /// im2col / converted GEMM input.
    col: DBuf,
    /// GEMM output before the epilogue.
    acc: DBuf,
    /// A kept-float layer's dequantized input and its f32 output.
    fin: DBuf,
    fout: DBuf,
    counts: DBuf,
    cells: DBuf,
}

/// The CUDA engine.
pub struct CudaEngine {
    gpu: Gpu,
    graph: Graph,
    precision: &'static str,
    /// Activation parameters per value (INT8; all `None` in float precisions): a value
    /// with parameters is u8 codes on the device, otherwise f32.
    acts: Vec<Option<QParams>>,
    steps: Vec<Step>,
    vals: Vec<DBuf>,
    shapes: Vec<Shape>,
    scratch: Scratch,
    host_in: Vec<u8>,
    host_cells: Vec<u32>,
    host_codes: Vec<u8>,
    cell_stamp: Vec<u32>,
    run_count: u32,
    /// Events around the dense part (after the scatter .. end) of the last run.
    events: Option<(CudaEvent, CudaEvent)>,
    last_dense_ms: Option<f64>,
}

fn int_err(v: usize) -> EngineError {
    EngineError::Internal(format!("size {v} out of range for a GPU kernel"))
}

fn i32_of(v: usize) -> Result<i32, EngineError> {
    i32::try_from(v).map_err(|_| int_err(v))
}

fn i64_of(v: usize) -> Result<i64, EngineError> {
    i64::try_from(v).map_err(|_| int_err(v))
}

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
        let mut steps = Vec::with_capacity(graph.nodes.len());
        for (i, node) in graph.nodes.iter().enumerate() {
            let step = match &node.op {
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
                            float_exec(&gpu, &f, half)?
                        }
                    };
                    Step::Layer {
                        kind: l.kind,
                        relu: l.relu,
                        cin: l.in_channels,
                        cout: l.out_channels,
                        exec: Box::new(exec),
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
        Ok(Self {
            gpu,
            graph: graph.clone(),
            precision: precision.name(),
            acts,
            steps,
            vals: (0..nv).map(|_| DBuf::default()).collect(),
            shapes: vec![Shape::default(); nv],
            scratch: Scratch::default(),
            host_in: Vec::new(),
            host_cells: Vec::new(),
            host_codes: Vec::new(),
            cell_stamp: vec![0; ny * nx],
            run_count: 0,
            events,
            last_dense_ms: None,
        })
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
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
        check_input(input)?;
        self.gpu.bind()?;
        let (p, n, f) = (input.counts.len(), input.max_points, input.width);
        let (ny, nx) = self.graph.bev;
        self.run_count = self.run_count.wrapping_add(1);
        if self.run_count == 0 {
            self.cell_stamp.fill(0);
            self.run_count = 1;
        }
        check_cells(input.coords, (ny, nx), &mut self.cell_stamp, self.run_count)?;
        self.host_cells.clear();
        self.host_cells
            .extend(input.coords.iter().map(|c| c[1] * nx as u32 + c[2]));
        let g = &self.gpu;
        g.ensure(&mut self.scratch.cells, 4 * p)?;
        g.upload(&self.scratch.cells, &self.host_cells)?;
        g.ensure(&mut self.scratch.counts, 4 * p)?;
        g.upload(&self.scratch.counts, input.counts)?;
        self.shapes[0] = Shape::new(&[p, n, f]);
        match self.acts[0] {
            Some(q) => {
                self.host_in.resize(p * n * f, 0);
                self.host_in
                    .par_chunks_mut(4096)
                    .zip(input.decorated.par_chunks(4096))
                    .for_each(|(d, s)| {
                        for (d, &x) in d.iter_mut().zip(s) {
                            *d = q.quantize(x) as u8;
                        }
                    });
                g.ensure(&mut self.vals[0], p * n * f)?;
                g.upload(&self.vals[0], &self.host_in)?;
            }
            None => {
                g.ensure(&mut self.vals[0], 4 * p * n * f)?;
                g.upload(&self.vals[0], input.decorated)?;
            }
        }
        let mut dense_started = false;
        for i in 0..self.graph.nodes.len() {
            self.node(i, p)?;
            if matches!(self.steps[i], Step::Scatter)
                && let Some((a, _)) = &self.events
            {
                a.record(&self.gpu.stream)
                    .map_err(|e| EngineError::Device(format!("event: {e}")))?;
                dense_started = true;
            }
        }
        if let Some((a, b)) = &self.events {
            b.record(&self.gpu.stream)
                .map_err(|e| EngineError::Device(format!("event: {e}")))?;
            self.gpu.sync()?;
            self.last_dense_ms = if dense_started {
                a.elapsed_ms(b).ok().map(|m| m as f64)
            } else {
                None
            };
        }
        self.collect(out)
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
                relu,
                cin,
                cout,
                exec,
            } => {
                let os = out_shape(*kind, &xs, *cout)
                    .ok_or_else(|| EngineError::Input(format!("{}: input shape", node.name)))?;
                if (xs.rank == 3 && xs.dims[2] != *cin) || (xs.rank == 4 && xs.dims[1] != *cin) {
                    return Err(EngineError::Internal(format!(
                        "{}: {} input channels, the layer takes {cin}",
                        node.name,
                        if xs.rank == 3 { xs.dims[2] } else { xs.dims[1] }
                    )));
                }
                let elem_out = if out_q.is_some() { 1 } else { 4 };
                let mut yv = std::mem::take(&mut self.vals[v]);
                g.ensure(&mut yv, elem_out * os.len())?;
                let r = run_layer(
                    g,
                    &mut self.scratch,
                    LayerCall {
                        kind: *kind,
                        relu: *relu,
                        cout: *cout,
                        exec,
                        xs,
                        x: (self.vals[x].ptr, self.acts[x]),
                        os,
                        y: (yv.ptr, out_q),
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

    /// Downloads the head values into `out` (codes dequantized on the host, as the CPU
    /// INT8 engine does).
    fn collect(&mut self, out: &mut HeadOutputs) -> Result<(), EngineError> {
        out.tasks.resize_with(self.graph.tasks.len(), || TaskMaps {
            heatmap: Vec::new(),
            regression: Vec::new(),
        });
        for (ti, maps) in out.tasks.iter_mut().enumerate() {
            let t = &self.graph.tasks[ti];
            let hm = self.shapes[t.heatmap];
            (out.h, out.w) = (hm.dims[2], hm.dims[3]);
            maps.heatmap.clear();
            append(
                &self.gpu,
                &self.vals[t.heatmap],
                self.shapes[t.heatmap].len(),
                self.acts[t.heatmap],
                &mut self.host_codes,
                &mut maps.heatmap,
            )?;
            maps.regression.clear();
            for &v in &t.regression {
                append(
                    &self.gpu,
                    &self.vals[v],
                    self.shapes[v].len(),
                    self.acts[v],
                    &mut self.host_codes,
                    &mut maps.regression,
                )?;
            }
        }
        Ok(())
    }
}

fn append(
    g: &Gpu,
    buf: &DBuf,
    len: usize,
    q: Option<QParams>,
    codes: &mut Vec<u8>,
    dst: &mut Vec<f32>,
) -> Result<(), EngineError> {
    match q {
        Some(q) => {
            codes.resize(len, 0);
            g.download(codes, buf.ptr, buf.bytes)?;
            dst.extend(codes.iter().map(|&c| q.dequantize(c as i32)));
        }
        None => {
            let at = dst.len();
            dst.resize(at + len, 0.0);
            g.download(&mut dst[at..], buf.ptr, buf.bytes)?;
        }
    }
    Ok(())
}

fn out_shape(kind: LayerKind, xs: &Shape, cout: usize) -> Option<Shape> {
    Some(match kind {
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

fn float_exec(g: &Gpu, f: &FoldedLayer, half: bool) -> Result<Exec, EngineError> {
    let w = if half {
        let h: Vec<u16> = f
            .weight
            .data
            .iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect();
        g.alloc_from(&h)?
    } else {
        g.alloc_from(&f.weight.data)?
    };
    Ok(Exec::Float {
        w,
        bias: g.alloc_from(&f.bias)?,
        half,
    })
}

#[allow(clippy::too_many_arguments)]
fn int_exec(
    g: &Gpu,
    kind: LayerKind,
    cin: usize,
    cout: usize,
    lw: &crate::quant::LayerWeights,
    inp: &QParams,
    out: Option<&QParams>,
    relu: bool,
) -> Result<Exec, EngineError> {
    // GEMM columns and their K: conv [Cout, Cin*k*k]; transposed conv taps
    // [(Cout, ky, kx), Cin]; linear [Cout, Cin].
    let (cols, k, taps) = match kind {
        LayerKind::Linear => (cout, cin, 1),
        LayerKind::Conv2d { kernel, .. } => (cout, cin * kernel * kernel, 1),
        LayerKind::ConvTranspose2d { kernel, .. } => (cout * kernel * kernel, cin, kernel * kernel),
    };
    if lw.codes.len() != cols * k {
        return Err(EngineError::QuantModel(format!(
            "{} weight codes for a {cols} x {k} layer",
            lw.codes.len()
        )));
    }
    let kpad = k.next_multiple_of(4);
    let mut w = vec![0i8; cols * kpad];
    for j in 0..cols {
        for q in 0..k {
            w[j * kpad + q] = match kind {
                LayerKind::ConvTranspose2d { .. } => {
                    // codes [Cin, Cout, k, k]; column j = co * taps + t.
                    let (co, t) = (j / taps, j % taps);
                    lw.codes[(q * cout + co) * taps + t]
                }
                _ => lw.codes[j * k + q],
            };
        }
    }
    let wsum: Vec<i32> = (0..cols)
        .map(|j| w[j * kpad..(j + 1) * kpad].iter().map(|&c| c as i32).sum())
        .collect();
    let bias_q: Vec<i32> = lw
        .bias
        .iter()
        .zip(&lw.scales)
        .map(|(&b, &s)| quantize_bias(b, inp.scale, s))
        .collect();
    let epi = match out {
        Some(o) => {
            let rq: Vec<Requant> = lw
                .scales
                .iter()
                .map(|&s| Requant::new(inp.scale, s, o, relu))
                .collect();
            let mult: Vec<f32> = rq.iter().map(|r| r.multiplier).collect();
            IntEpi::Requant {
                mult: g.alloc_from(&mult)?,
                zp: rq[0].zero_point,
                lo: rq[0].lo,
                hi: rq[0].hi,
            }
        }
        None => {
            // dequantize_acc's product, computed here exactly as the CPU computes it.
            let scale: Vec<f32> = lw.scales.iter().map(|&s| inp.scale * s).collect();
            IntEpi::Dequant {
                scale: g.alloc_from(&scale)?,
            }
        }
    };
    Ok(Exec::Int {
        w: g.alloc_from(&w)?,
        kpad,
        wsum: g.alloc_from(&wsum)?,
        bias_q: g.alloc_from(&bias_q)?,
        zx: inp.zero_point,
        epi,
    })
}

struct LayerCall<'a> {
    kind: LayerKind,
    relu: bool,
    cout: usize,
    exec: &'a Exec,
    xs: Shape,
    /// Input pointer and its parameters (codes when `Some`).
    x: (u64, Option<QParams>),
    os: Shape,
    /// Output pointer and its parameters.
    y: (u64, Option<QParams>),
}

/// The epilogue's index mapping (see `locate` in kernels.cu).
struct EpiMap {
    mode: i32,
    n: i64,
    cout: i32,
    plane: i64,
    wo: i32,
    s: i32,
    ldc: i64,
}

fn run_layer(g: &Gpu, sc: &mut Scratch, c: LayerCall<'_>) -> Result<(), EngineError> {
    match c.exec {
        Exec::Float { w, bias, half } => run_float(g, sc, &c, w, bias, *half),
        Exec::Int {
            w,
            kpad,
            wsum,
            bias_q,
            zx,
            epi,
        } => run_int(g, sc, &c, w, *kpad, wsum, bias_q, *zx, epi),
    }
}

fn run_float(
    g: &Gpu,
    sc: &mut Scratch,
    c: &LayerCall<'_>,
    w: &DBuf,
    bias: &DBuf,
    half: bool,
) -> Result<(), EngineError> {
    let xs = c.xs;
    // The input in f32: dequantized codes of an INT8 model's kept-float layer.
    let xin = match c.x.1 {
        Some(q) => {
            let n = xs.len();
            g.ensure(&mut sc.fin, 4 * n)?;
            let (src, dst, ni) = (c.x.0, sc.fin.ptr, i64_of(n)?);
            let (scale, zp) = (q.scale, q.zero_point);
            g.launch("dequant_u8", n, &[P(src), L(ni), F(scale), I(zp), P(dst)])?;
            sc.fin.ptr
        }
        None => c.x.0,
    };
    let out_len = c.os.len();
    let yout = match c.y.1 {
        Some(_) => {
            g.ensure(&mut sc.fout, 4 * out_len)?;
            sc.fout.ptr
        }
        None => c.y.0,
    };
    let kind = if half { GemmKind::F16 } else { GemmKind::F32 };
    let esz = if half { 2 } else { 4 };
    // f16 copy of a GEMM operand that is the input itself.
    let as_half = |sc: &mut Scratch, n: usize| -> Result<u64, EngineError> {
        g.ensure(&mut sc.col, 2 * n)?;
        let (src, dst, ni) = (xin, sc.col.ptr, i64_of(n)?);
        g.launch("cast_f16", n, &[P(src), L(ni), P(dst)])?;
        Ok(sc.col.ptr)
    };
    let cout = c.cout;
    let epi = match c.kind {
        LayerKind::Linear => {
            let (r, cin) = (xs.dims[0] * xs.dims[1], xs.dims[2]);
            let b = if half { as_half(sc, r * cin)? } else { xin };
            // Y[r, cout] (col-major [cout, r]) = W^T-op: (W [cout, cin]) x (X [r, cin]).
            gemm_checked(
                g,
                kind,
                (true, false),
                (cout, r, cin),
                (w.ptr, cin),
                (b, cin),
                (yout, cout),
            )?;
            EpiMap {
                mode: 0,
                n: i64_of(r * cout)?,
                cout: i32_of(cout)?,
                plane: 0,
                wo: 0,
                s: 1,
                ldc: i64_of(cout)?,
            }
        }
        LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } => {
            let (ci, h, wd) = (xs.dims[1], xs.dims[2], xs.dims[3]);
            let (ho, wo) = (c.os.dims[2], c.os.dims[3]);
            let plane = ho * wo;
            let k = ci * kernel * kernel;
            let a = if kernel == 1 && stride == 1 && padding == 0 {
                if half { as_half(sc, k * plane)? } else { xin }
            } else {
                g.ensure(&mut sc.col, esz * k * plane)?;
                let dst = sc.col.ptr;
                let v = [ci, h, wd, kernel, stride, padding, ho, wo];
                let mut args = [0i32; 8];
                for (d, &s) in args.iter_mut().zip(&v) {
                    *d = i32_of(s)?;
                }
                let name = if half { "im2col_f16" } else { "im2col_f32" };
                let mut list = vec![P(xin)];
                list.extend(args.iter().map(|&v| I(v)));
                list.push(P(dst));
                g.launch(name, k * plane, &list)?;
                dst
            };
            // Y[cout, plane] (col-major [plane, cout]) = col [K, plane] x W [cout, K].
            gemm_checked(
                g,
                kind,
                (false, false),
                (plane, cout, k),
                (a, plane),
                (w.ptr, k),
                (yout, plane),
            )?;
            EpiMap {
                mode: 1,
                n: i64_of(cout * plane)?,
                cout: i32_of(cout)?,
                plane: i64_of(plane)?,
                wo: i32_of(wo)?,
                s: 1,
                ldc: i64_of(plane)?,
            }
        }
        LayerKind::ConvTranspose2d { kernel, stride } => {
            let (ci, h, wd) = (xs.dims[1], xs.dims[2], xs.dims[3]);
            let plane_in = h * wd;
            let taps = cout * kernel * kernel;
            let a = if half {
                as_half(sc, ci * plane_in)?
            } else {
                xin
            };
            g.ensure(&mut sc.acc, 4 * taps * plane_in)?;
            // ACC[(co, tap), p] (col-major [p, taps]) = X [ci, p] x W [ci, taps]^T-op.
            gemm_checked(
                g,
                kind,
                (false, true),
                (plane_in, taps, ci),
                (a, plane_in),
                (w.ptr, taps),
                (sc.acc.ptr, plane_in),
            )?;
            let (ho, wo) = (c.os.dims[2], c.os.dims[3]);
            EpiMap {
                mode: 2,
                n: i64_of(cout * ho * wo)?,
                cout: i32_of(cout)?,
                plane: i64_of(ho * wo)?,
                wo: i32_of(wo)?,
                s: i32_of(stride)?,
                ldc: i64_of(plane_in)?,
            }
        }
    };
    let acc = if epi.mode == 2 { sc.acc.ptr } else { yout };
    let relu = c.relu as i32;
    let bp = bias.ptr;
    g.launch(
        "epi_f32",
        epi.n as usize,
        &[
            P(acc),
            P(bp),
            I(relu),
            I(epi.mode),
            L(epi.n),
            I(epi.cout),
            L(epi.plane),
            I(epi.wo),
            I(epi.s),
            L(epi.ldc),
            P(yout),
        ],
    )?;
    if let Some(q) = c.y.1 {
        let (src, dst, ni) = (yout, c.y.0, i64_of(out_len)?);
        let (scale, zp, qmin, qmax) = (q.scale, q.zero_point, q.grid.qmin, q.grid.qmax);
        g.launch(
            "quant_f32",
            out_len,
            &[P(src), L(ni), F(scale), I(zp), I(qmin), I(qmax), P(dst)],
        )?;
    }
    Ok(())
}

fn gemm_checked(
    g: &Gpu,
    kind: GemmKind,
    t: (bool, bool),
    mnk: (usize, usize, usize),
    a: (u64, usize),
    b: (u64, usize),
    c: (u64, usize),
) -> Result<(), EngineError> {
    if g.gemm(kind, t, mnk, a, b, c)? {
        Ok(())
    } else {
        Err(EngineError::Device(format!(
            "cuBLAS does not support the {kind:?} GEMM {mnk:?}"
        )))
    }
}

#[allow(clippy::too_many_arguments)]
fn run_int(
    g: &Gpu,
    sc: &mut Scratch,
    c: &LayerCall<'_>,
    w: &DBuf,
    kpad: usize,
    wsum: &DBuf,
    bias_q: &DBuf,
    zx: i32,
    epi: &IntEpi,
) -> Result<(), EngineError> {
    if c.x.1.is_none() {
        return Err(EngineError::Internal(
            "integer layer on a float input".into(),
        ));
    }
    let xs = c.xs;
    let xin = c.x.0;
    let cout = c.cout;
    let zxi = zx;
    let kp = i32_of(kpad)?;
    // im2col into pixel-major s8 rows [rows, kpad].
    let im2col = |sc: &mut Scratch,
                  (ci, h, wd): (usize, usize, usize),
                  (kernel, stride, padding): (usize, usize, usize),
                  (ho, wo): (usize, usize)|
     -> Result<u64, EngineError> {
        let rows = ho * wo;
        g.ensure(&mut sc.col, rows * kpad)?;
        let dst = sc.col.ptr;
        let v = [ci, h, wd, kernel, stride, padding, ho, wo];
        let mut a = [0i32; 8];
        for (d, &s) in a.iter_mut().zip(&v) {
            *d = i32_of(s)?;
        }
        let mut list = vec![P(xin)];
        list.extend(a.iter().map(|&v| I(v)));
        list.extend([I(kp), I(zxi), P(dst)]);
        g.launch("im2col_s8", rows * kpad, &list)?;
        Ok(dst)
    };
    // (m, n) of the TN GEMM: C col-major [m, n], ldc padded to 4 for the int8 GEMM.
    let map = match c.kind {
        LayerKind::Linear => {
            let (r, cin) = (xs.dims[0] * xs.dims[1], xs.dims[2]);
            g.ensure(&mut sc.col, r * kpad)?;
            let (dst, rr, ci) = (sc.col.ptr, i64_of(r)?, i32_of(cin)?);
            g.launch("rows_s8", r * kpad, &[P(xin), L(rr), I(ci), I(kp), P(dst)])?;
            let ldc = cout.next_multiple_of(4);
            g.ensure(&mut sc.acc, 4 * ldc * r)?;
            gemm_i8(
                g,
                (cout, r, kpad),
                (w.ptr, kpad),
                (dst, kpad),
                (sc.acc.ptr, ldc),
            )?;
            EpiMap {
                mode: 0,
                n: i64_of(r * cout)?,
                cout: i32_of(cout)?,
                plane: 0,
                wo: 0,
                s: 1,
                ldc: i64_of(ldc)?,
            }
        }
        LayerKind::Conv2d {
            kernel,
            stride,
            padding,
        } => {
            let (ci, h, wd) = (xs.dims[1], xs.dims[2], xs.dims[3]);
            let (ho, wo) = (c.os.dims[2], c.os.dims[3]);
            let plane = ho * wo;
            let col = im2col(sc, (ci, h, wd), (kernel, stride, padding), (ho, wo))?;
            let ldc = plane.next_multiple_of(4);
            g.ensure(&mut sc.acc, 4 * ldc * cout)?;
            gemm_i8(
                g,
                (plane, cout, kpad),
                (col, kpad),
                (w.ptr, kpad),
                (sc.acc.ptr, ldc),
            )?;
            EpiMap {
                mode: 1,
                n: i64_of(cout * plane)?,
                cout: i32_of(cout)?,
                plane: i64_of(plane)?,
                wo: i32_of(wo)?,
                s: 1,
                ldc: i64_of(ldc)?,
            }
        }
        LayerKind::ConvTranspose2d { kernel, stride } => {
            let (ci, h, wd) = (xs.dims[1], xs.dims[2], xs.dims[3]);
            let plane_in = h * wd;
            let taps = cout * kernel * kernel;
            // Pixel-major rows of the input itself (a 1x1 im2col).
            let col = im2col(sc, (ci, h, wd), (1, 1, 0), (h, wd))?;
            let ldc = plane_in.next_multiple_of(4);
            g.ensure(&mut sc.acc, 4 * ldc * taps)?;
            gemm_i8(
                g,
                (plane_in, taps, kpad),
                (col, kpad),
                (w.ptr, kpad),
                (sc.acc.ptr, ldc),
            )?;
            let (ho, wo) = (c.os.dims[2], c.os.dims[3]);
            EpiMap {
                mode: 2,
                n: i64_of(cout * ho * wo)?,
                cout: i32_of(cout)?,
                plane: i64_of(ho * wo)?,
                wo: i32_of(wo)?,
                s: i32_of(stride)?,
                ldc: i64_of(ldc)?,
            }
        }
    };
    let corr = 128 - zx;
    let (acc, ws, bq, y) = (sc.acc.ptr, wsum.ptr, bias_q.ptr, c.y.0);
    match (epi, c.y.1) {
        (IntEpi::Requant { mult, zp, lo, hi }, Some(_)) => {
            let m = mult.ptr;
            g.launch(
                "epi_requant",
                map.n as usize,
                &[
                    P(acc),
                    P(ws),
                    I(corr),
                    P(bq),
                    P(m),
                    I(*zp),
                    I(*lo),
                    I(*hi),
                    I(map.mode),
                    L(map.n),
                    I(map.cout),
                    L(map.plane),
                    I(map.wo),
                    I(map.s),
                    L(map.ldc),
                    P(y),
                ],
            )
        }
        (IntEpi::Dequant { scale }, None) => {
            let (s, relu) = (scale.ptr, c.relu as i32);
            g.launch(
                "epi_dequant",
                map.n as usize,
                &[
                    P(acc),
                    P(ws),
                    I(corr),
                    P(bq),
                    P(s),
                    I(relu),
                    I(map.mode),
                    L(map.n),
                    I(map.cout),
                    L(map.plane),
                    I(map.wo),
                    I(map.s),
                    L(map.ldc),
                    P(y),
                ],
            )
        }
        _ => Err(EngineError::Internal(
            "integer epilogue does not match the output's parameters".into(),
        )),
    }
}

/// The TN int8 GEMM `C[m, n] = A^T B` (A stored `[m, k]`, B `[n, k]`, rows of `k` bytes),
/// on cuBLAS, or on our dp4a kernel when cuBLAS refuses the shape.
fn gemm_i8(
    g: &Gpu,
    (m, n, k): (usize, usize, usize),
    a: (u64, usize),
    b: (u64, usize),
    c: (u64, usize),
) -> Result<(), EngineError> {
    if g.gemm(GemmKind::I8, (true, false), (m, n, k), a, b, c)? {
        return Ok(());
    }
    log::debug!("cuBLAS refused the int8 GEMM {m}x{n}x{k}: fallback kernel");
    let (mi, ni, ki) = (i32_of(m)?, i32_of(n)?, i32_of(k)?);
    let (lda, ldb, ldc) = (i32_of(a.1)?, i32_of(b.1)?, i32_of(c.1)?);
    g.launch(
        "gemm_s8_tn",
        m * n,
        &[
            P(a.0),
            P(b.0),
            I(mi),
            I(ni),
            I(ki),
            I(lda),
            I(ldb),
            P(c.0),
            I(ldc),
        ],
    )
}
