//! Layer execution on the GPU: im2col, the GEMMs and the fused epilogues, for FP32,
//! FP16 and INT8 layers, and for groups of sibling convolutions that read the same input
//! (the head's sub-heads), which run as one GEMM; the voxel model's sparse convs, on
//! neighbour tables.

use super::Shape;
use super::device::Arg::{F, I, L, P};
use super::device::{DBuf, GemmKind, Gpu};
use crate::engine::EngineError;
use crate::engine::fp32::FoldedLayer;
use crate::model::graph::LayerKind;
use crate::quant::{QParams, Requant, quantize_bias};

pub(super) enum IntEpi {
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

pub(super) enum Exec {
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

/// Scratch buffers shared by the layers.
#[derive(Default)]
pub(super) struct Scratch {
    /// im2col / converted GEMM input.
    pub(super) col: DBuf,
    /// GEMM output before the epilogue.
    pub(super) acc: DBuf,
    /// A kept-float layer's dequantized input and its f32 output (`fin2`: an add's second
    /// dequantized input).
    pub(super) fin: DBuf,
    pub(super) fin2: DBuf,
    pub(super) fout: DBuf,
    pub(super) counts: DBuf,
    pub(super) cells: DBuf,
    /// The one-word-per-thread int8 im2col instead of the tiled one (tests compare them).
    pub(super) plain_im2col: bool,
    /// A channels-last copy of an int8 conv's input.
    pub(super) nhwc: DBuf,
}

pub(super) fn int_err(v: usize) -> EngineError {
    EngineError::Internal(format!("size {v} out of range for a GPU kernel"))
}

pub(super) fn i32_of(v: usize) -> Result<i32, EngineError> {
    i32::try_from(v).map_err(|_| int_err(v))
}

pub(super) fn i64_of(v: usize) -> Result<i64, EngineError> {
    i64::try_from(v).map_err(|_| int_err(v))
}

/// Rows `[rows, stride]` (the first `k` of each used) -> columns `[k, rows]`.
fn transpose_rows<T: Copy + Default>(w: &[T], rows: usize, stride: usize, k: usize) -> Vec<T> {
    let mut t = vec![T::default(); k * rows];
    for r in 0..rows {
        for q in 0..k {
            t[q * rows + r] = w[r * stride + q];
        }
    }
    t
}

/// A float sparse conv: f32 weights (every float precision) transposed to
/// `[taps * Cin, Cout]` for the sparse kernel, and the bias.
pub(super) fn sparse_float_exec(
    g: &Gpu,
    f: &FoldedLayer,
    cout: usize,
) -> Result<Exec, EngineError> {
    let k = f.weight.data.len() / cout.max(1);
    Ok(Exec::Float {
        w: g.alloc_from(&transpose_rows(&f.weight.data, cout, k, k))?,
        bias: g.alloc_from(&f.bias)?,
        half: false,
    })
}

pub(super) fn float_exec(g: &Gpu, f: &FoldedLayer, half: bool) -> Result<Exec, EngineError> {
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

/// Whether an int8 convolution runs on a channels-last im2col (input channels a multiple
/// of 4: whole words per tap), with its weight rows tap-major (`[Cout, k*k, Cin]`).
pub(super) fn tap_major(kind: LayerKind, cin: usize) -> bool {
    matches!(kind, LayerKind::Conv2d { .. }) && cin.is_multiple_of(4)
}

/// s8 weight rows in the GEMM's layout, `[cols, kpad]` with K padded to a multiple of 4:
/// conv `[Cout, Cin*k*k]` (or `[Cout, k*k*Cin]` with `taps_first`, see [`tap_major`]); transposed conv taps `[(Cout, ky, kx), Cin]`; linear
/// `[Cout, Cin]`; sparse conv `[Cout, taps*Cin]`.
pub(super) fn int_weight_rows(
    kind: LayerKind,
    cin: usize,
    cout: usize,
    lw: &crate::quant::LayerWeights,
    taps_first: bool,
) -> Result<(Vec<i8>, usize), EngineError> {
    let (cols, k, taps) = match kind {
        // codes [cout, taps, cin]: one row of taps * cin per output channel.
        LayerKind::SparseConv3d { kernel, .. } => (cout, cin * kernel.iter().product::<usize>(), 1),
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
    // Conv taps per input channel (for the tap-major order).
    let ktaps = k / cin.max(1);
    for j in 0..cols {
        for q in 0..k {
            let at = match kind {
                // q = tap * Cin + ci reads the code of (ci, tap).
                LayerKind::Conv2d { .. } if taps_first => {
                    let (t, ci) = (q / cin, q % cin);
                    ci * ktaps + t
                }
                _ => q,
            };
            w[j * kpad + q] = match kind {
                LayerKind::ConvTranspose2d { .. } => {
                    // codes [Cin, Cout, k, k]; column j = co * taps + t.
                    let (co, t) = (j / taps, j % taps);
                    lw.codes[(q * cout + co) * taps + t]
                }
                _ => lw.codes[j * k + at],
            };
        }
    }
    Ok((w, kpad))
}

#[allow(clippy::too_many_arguments)]
pub(super) fn int_exec(
    g: &Gpu,
    kind: LayerKind,
    cin: usize,
    cout: usize,
    lw: &crate::quant::LayerWeights,
    inp: &QParams,
    out: Option<&QParams>,
    relu: bool,
) -> Result<Exec, EngineError> {
    let (w, kpad) = int_weight_rows(kind, cin, cout, lw, tap_major(kind, cin))?;
    let cols = w.len() / kpad;
    // The sparse kernel reads its weights transposed, `[taps * Cin, Cout]`.
    let w_dev = match kind {
        LayerKind::SparseConv3d { .. } => transpose_rows(&w, cols, kpad, lw.codes.len() / cols),
        _ => w.clone(),
    };
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
        w: g.alloc_from(&w_dev)?,
        kpad,
        wsum: g.alloc_from(&wsum)?,
        bias_q: g.alloc_from(&bias_q)?,
        zx: inp.zero_point,
        epi,
    })
}

pub(super) struct LayerCall<'a> {
    pub(super) kind: LayerKind,
    pub(super) relu: bool,
    pub(super) cout: usize,
    pub(super) exec: &'a Exec,
    pub(super) xs: Shape,
    /// Input pointer and its parameters (codes when `Some`).
    pub(super) x: (u64, Option<QParams>),
    /// The network input's per-feature scales (device pointer and count) when this layer
    /// reads it and the model has them; `(0, 0)` otherwise.
    pub(super) x_scales: (u64, usize),
    pub(super) os: Shape,
    /// Output pointer and its parameters.
    pub(super) y: (u64, Option<QParams>),
    /// A sparse conv's neighbour table on the device (0 for other layers).
    pub(super) nbr: u64,
}

/// The epilogue's index mapping (see `locate` in kernels.cu).
pub(super) struct EpiMap {
    pub(super) mode: i32,
    pub(super) n: i64,
    pub(super) cout: i32,
    pub(super) plane: i64,
    pub(super) wo: i32,
    pub(super) s: i32,
    pub(super) ldc: i64,
}

pub(super) fn run_layer(g: &Gpu, sc: &mut Scratch, c: LayerCall<'_>) -> Result<(), EngineError> {
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

pub(super) fn run_float(
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
            match c.x_scales {
                (0, _) => g.launch("dequant_u8", n, &[P(src), L(ni), F(scale), I(zp), P(dst)])?,
                (scales, width) => g.launch(
                    "dequant_u8_pf",
                    n,
                    &[P(src), L(ni), P(scales), I(i32_of(width)?), I(zp), P(dst)],
                )?,
            }
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
    // f16 copy of a GEMM operand that is the input itself.
    let as_half = |sc: &mut Scratch, n: usize| -> Result<u64, EngineError> {
        g.ensure(&mut sc.col, 2 * n)?;
        let (src, dst, ni) = (xin, sc.col.ptr, i64_of(n)?);
        g.launch("cast_f16", n, &[P(src), L(ni), P(dst)])?;
        Ok(sc.col.ptr)
    };
    let cout = c.cout;
    let epi = match c.kind {
        LayerKind::SparseConv3d { kernel, .. } => {
            // Bias and ReLU fused; f32 weights in every float precision.
            let (cin, n_out) = (xs.dims[1], c.os.dims[0]);
            let taps: usize = kernel.iter().product();
            g.launch(
                "sparse_conv_f32",
                n_out * cout,
                &[
                    P(xin),
                    P(c.nbr),
                    I(i32_of(n_out)?),
                    I(i32_of(taps)?),
                    I(i32_of(cin)?),
                    I(i32_of(cout)?),
                    P(w.ptr),
                    P(bias.ptr),
                    I(c.relu as i32),
                    P(yout),
                ],
            )?;
            None
        }
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
            Some(EpiMap {
                mode: 0,
                n: i64_of(r * cout)?,
                cout: i32_of(cout)?,
                plane: 0,
                wo: 0,
                s: 1,
                ldc: i64_of(cout)?,
            })
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
                im2col_float(
                    g,
                    sc,
                    xin,
                    half,
                    (ci, h, wd),
                    (kernel, stride, padding),
                    (ho, wo),
                )?
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
            Some(EpiMap {
                mode: 1,
                n: i64_of(cout * plane)?,
                cout: i32_of(cout)?,
                plane: i64_of(plane)?,
                wo: i32_of(wo)?,
                s: 1,
                ldc: i64_of(plane)?,
            })
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
            Some(EpiMap {
                mode: 2,
                n: i64_of(cout * ho * wo)?,
                cout: i32_of(cout)?,
                plane: i64_of(ho * wo)?,
                wo: i32_of(wo)?,
                s: i32_of(stride)?,
                ldc: i64_of(plane_in)?,
            })
        }
    };
    if let Some(epi) = epi {
        let acc = if epi.mode == 2 { sc.acc.ptr } else { yout };
        epi_float(g, acc, bias, c.relu, &epi, yout)?;
    }
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

pub(super) fn gemm_checked(
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
pub(super) fn run_int(
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
    let kp = i32_of(kpad)?;
    // im2col into pixel-major s8 rows [rows, kpad].
    let im2col = |sc: &mut Scratch, chw: (usize, usize, usize), ksp, howo, nhwc| {
        im2col_int(g, sc, xin, chw, ksp, howo, kpad, zx, 0, nhwc)
    };
    // (m, n) of the TN GEMM: C col-major [m, n], ldc padded to 4 for the int8 GEMM.
    let map = match c.kind {
        LayerKind::SparseConv3d { kernel, .. } => {
            // Sums of centred codes over the present neighbours: no zero-point term for
            // the epilogue to add (its correction is 128 - zx, so zx = 128 below).
            let (cin, n_out) = (xs.dims[1], c.os.dims[0]);
            let taps: usize = kernel.iter().product();
            g.ensure(&mut sc.acc, 4 * n_out * cout)?;
            g.launch(
                "sparse_conv_s8",
                n_out * cout,
                &[
                    P(xin),
                    P(c.nbr),
                    I(i32_of(n_out)?),
                    I(i32_of(taps)?),
                    I(i32_of(cin)?),
                    I(i32_of(cout)?),
                    P(w.ptr),
                    I(zx),
                    P(sc.acc.ptr),
                ],
            )?;
            let map = EpiMap {
                mode: 0,
                n: i64_of(n_out * cout)?,
                cout: i32_of(cout)?,
                plane: 0,
                wo: 0,
                s: 1,
                ldc: i64_of(cout)?,
            };
            return epi_int(g, sc.acc.ptr, (wsum, bias_q, 128), epi, c.relu, &map, c.y);
        }
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
            let col = im2col(
                sc,
                (ci, h, wd),
                (kernel, stride, padding),
                (ho, wo),
                tap_major(c.kind, ci),
            )?;
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
            // A 1x1 im2col is ci-major and tap-major at once: the transpose alone.
            let col = im2col(sc, (ci, h, wd), (1, 1, 0), (h, wd), ci.is_multiple_of(4))?;
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
    epi_int(g, sc.acc.ptr, (wsum, bias_q, zx), epi, c.relu, &map, c.y)
}

/// Float im2col of an NCHW input into the `col` scratch, k-major `[C*k*k, ho*wo]`, in
/// f32 or f16.
pub(super) fn im2col_float(
    g: &Gpu,
    sc: &mut Scratch,
    x: u64,
    half: bool,
    (ci, h, wd): (usize, usize, usize),
    (kernel, stride, padding): (usize, usize, usize),
    (ho, wo): (usize, usize),
) -> Result<u64, EngineError> {
    let n = ci * kernel * kernel * ho * wo;
    g.ensure(&mut sc.col, if half { 2 } else { 4 } * n)?;
    let dst = sc.col.ptr;
    let mut list = vec![P(x)];
    for v in [ci, h, wd, kernel, stride, padding, ho, wo] {
        list.push(I(i32_of(v)?));
    }
    list.push(P(dst));
    // Blocks of 64 threads, four output columns each; one block row per (oy, k).
    let grid = (wo.div_ceil(256), ho, ci * kernel * kernel);
    g.launch_grid(
        if half { "im2col_f16" } else { "im2col_f32" },
        grid,
        64,
        0,
        &list,
    )?;
    Ok(dst)
}

/// Int8 im2col of NCHW codes into the `col` scratch, pixel-major `[ho*wo, kpad]`, shifted
/// by 128 (padding: the zero point `zx`).
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col_int(
    g: &Gpu,
    sc: &mut Scratch,
    x: u64,
    (ci, h, wd): (usize, usize, usize),
    (kernel, stride, padding): (usize, usize, usize),
    (ho, wo): (usize, usize),
    kpad: usize,
    zx: i32,
    zxc: u64,
    nhwc: bool,
) -> Result<u64, EngineError> {
    if !kpad.is_multiple_of(4) {
        return Err(EngineError::Internal(format!(
            "im2col: K {kpad} not padded to 4"
        )));
    }
    let n = ho * wo * kpad;
    g.ensure(&mut sc.col, n)?;
    let dst = sc.col.ptr;
    if nhwc {
        // Tap-major from a channels-last copy of the input (weights laid out to match).
        if zxc != 0 || !ci.is_multiple_of(4) || kpad != ci * kernel * kernel {
            return Err(EngineError::Internal(format!(
                "channels-last im2col of {ci} channels, K {kpad}"
            )));
        }
        let hw = h * wd;
        let (ci32, hw32) = (i32_of(ci)?, i32_of(hw)?);
        let grid = (hw.div_ceil(128), ci.div_ceil(32), 1);
        if kernel == 1 && stride == 1 && padding == 0 {
            // The transpose with the 128 shift is the whole im2col.
            let args = [P(x), I(ci32), I(hw32), I(0x80), P(dst)];
            g.launch_grid("nchw_to_nhwc_u8", grid, 256, 0, &args)?;
            return Ok(dst);
        }
        g.ensure(&mut sc.nhwc, hw * ci)?;
        let args = [P(x), I(ci32), I(hw32), I(0), P(sc.nhwc.ptr)];
        g.launch_grid("nchw_to_nhwc_u8", grid, 256, 0, &args)?;
        let pad_byte = ((zx - 128) as u8) as u32;
        let padw = pad_byte * 0x0101_0101;
        let mut list = vec![P(sc.nhwc.ptr)];
        for v in [ci / 4, h, wd, kernel, stride, padding, ho, wo] {
            list.push(I(i32_of(v)?));
        }
        list.extend([I(padw as i32), P(dst)]);
        g.launch_grid("im2col_nhwc_s8", (ho * wo, 1, 1), 128, 0, &list)?;
        return Ok(dst);
    }
    let mut list = vec![P(x)];
    for v in [ci, h, wd, kernel, stride, padding, ho, wo, kpad] {
        list.push(I(i32_of(v)?));
    }
    list.extend([I(zx), P(zxc)]);
    // Tiles of up to 64 output pixels within 48 KiB of shared memory (the k table, then
    // padded rows).
    let row = kpad + 4;
    let tp = ((48 * 1024usize).saturating_sub(8 * kpad) / row).min(64);
    if tp >= 1 && !sc.plain_im2col {
        list.extend([I(i32_of(tp)?), P(dst)]);
        let blocks = (ho * wo).div_ceil(tp);
        let smem = 8 * kpad + tp * row;
        let smem = u32::try_from(smem).map_err(|_| int_err(smem))?;
        g.launch_grid("im2col_s8_tile", (blocks, 1, 1), 256, smem, &list)?;
    } else {
        // One thread per 4-byte word.
        list.push(P(dst));
        g.launch("im2col_s8", n / 4, &list)?;
    }
    Ok(dst)
}

/// The grid of the four-pixels-per-thread epilogues (blocks of 256 threads), when `m` is a
/// convolution's (mode 1) with the plane and the accumulator stride multiples of 4 (their
/// 16-byte loads and 4-pixel stores stay aligned) and its channels fit a grid column.
fn vec4_grid(m: &EpiMap) -> Option<(usize, usize, usize)> {
    let (plane, ldc, cout) = (m.plane as usize, m.ldc as usize, m.cout as usize);
    (m.mode == 1
        && plane.is_multiple_of(4)
        && ldc.is_multiple_of(4)
        && plane <= i32::MAX as usize
        && (1..=65535).contains(&cout))
    .then(|| ((plane / 4).div_ceil(256), cout, 1))
}

/// The float epilogue: `y = acc + bias`, ReLU, through the index mapping `m`.
pub(super) fn epi_float(
    g: &Gpu,
    acc: u64,
    bias: &DBuf,
    relu: bool,
    m: &EpiMap,
    y: u64,
) -> Result<(), EngineError> {
    if let Some(grid) = vec4_grid(m) {
        let args = [
            P(acc),
            P(bias.ptr),
            I(relu as i32),
            I(m.plane as i32),
            L(m.ldc),
            P(y),
        ];
        return g.launch_grid("epi_f32_4", grid, 256, 0, &args);
    }
    g.launch(
        "epi_f32",
        m.n as usize,
        &[
            P(acc),
            P(bias.ptr),
            I(relu as i32),
            I(m.mode),
            L(m.n),
            I(m.cout),
            L(m.plane),
            I(m.wo),
            I(m.s),
            L(m.ldc),
            P(y),
        ],
    )
}

/// The integer epilogue: zero-point correction, bias, then requantization into the
/// output's codes or dequantization into reals (with ReLU).
pub(super) fn epi_int(
    g: &Gpu,
    acc: u64,
    (wsum, bias_q, zx): (&DBuf, &DBuf, i32),
    epi: &IntEpi,
    relu: bool,
    map: &EpiMap,
    y: (u64, Option<QParams>),
) -> Result<(), EngineError> {
    let corr = 128 - zx;
    let (ws, bq) = (wsum.ptr, bias_q.ptr);
    if let Some(grid) = vec4_grid(map) {
        let (plane, ldc) = (I(map.plane as i32), L(map.ldc));
        return match (epi, y.1) {
            (IntEpi::Requant { mult, zp, lo, hi }, Some(_)) => {
                let args = [
                    P(acc),
                    P(ws),
                    I(corr),
                    P(bq),
                    P(mult.ptr),
                    I(*zp),
                    I(*lo),
                    I(*hi),
                    plane,
                    ldc,
                    P(y.0),
                ];
                g.launch_grid("epi_requant4", grid, 256, 0, &args)
            }
            (IntEpi::Dequant { scale }, None) => {
                let args = [
                    P(acc),
                    P(ws),
                    I(corr),
                    P(bq),
                    P(scale.ptr),
                    I(relu as i32),
                    plane,
                    ldc,
                    P(y.0),
                ];
                g.launch_grid("epi_dequant4", grid, 256, 0, &args)
            }
            _ => Err(EngineError::Internal(
                "integer epilogue does not match the output's parameters".into(),
            )),
        };
    }
    match (epi, y.1) {
        (IntEpi::Requant { mult, zp, lo, hi }, Some(_)) => g.launch(
            "epi_requant",
            map.n as usize,
            &[
                P(acc),
                P(ws),
                I(corr),
                P(bq),
                P(mult.ptr),
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
                P(y.0),
            ],
        ),
        (IntEpi::Dequant { scale }, None) => g.launch(
            "epi_dequant",
            map.n as usize,
            &[
                P(acc),
                P(ws),
                I(corr),
                P(bq),
                P(scale.ptr),
                I(relu as i32),
                I(map.mode),
                L(map.n),
                I(map.cout),
                L(map.plane),
                I(map.wo),
                I(map.s),
                L(map.ldc),
                P(y.0),
            ],
        ),
        _ => Err(EngineError::Internal(
            "integer epilogue does not match the output's parameters".into(),
        )),
    }
}

/// The TN int8 GEMM `C[m, n] = A^T B` (A stored `[m, k]`, B `[n, k]`, rows of `k` bytes),
/// on cuBLAS, or on our dp4a kernel when cuBLAS refuses the shape.
pub(super) fn gemm_i8(
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
