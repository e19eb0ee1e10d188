//! Real INT8 CPU kernels: convolution, transposed convolution and linear on u8 activations
//! and i8 weights, with the bias + requantization + ReLU epilogue fused.
//!
//! # Semantics
//! Exactly `quant::scheme`: activations are u8 codes with a zero point `zx` (convolution
//! padding reads `zx`, i.e. real 0), weights are per-output-channel symmetric i8 in
//! `[-127, 127]`, the accumulator is `sum (x_q - zx) * w_q` in wrapping i32, and the output
//! code is `Requant::apply(acc, bias_q)` for the output channel. [`scalar`] is the
//! definition (plain loops); every other kernel must match it bit for bit.
//!
//! # Kernels and ISA selection
//! Weights are packed once at load ([`PackedConv`], [`PackedConvTranspose`],
//! [`PackedLinear`]) into one GEMM-ready i8 store (`pack::GemmWeights`: pairs along K in
//! row blocks, per-row weight sums) that every kernel family reads, one byte per weight. Each call picks an
//! [`Isa`]: [`Isa::detect`] takes the best one this CPU runs unless the environment variable
//! [`ISA_ENV`] is `scalar`; tests and benches pass an `Isa` explicitly.
//!
//! The AVX2 kernel (`avx2`) is an im2col GEMM: `out[M, N] = W[M, K] * X[K, N]` with M the
//! output channels, N the pixels of a band, K = Cin*kh*kw. Products must stay exact:
//! `vpmaddubsw` (u8 x i8 pairs summed into saturating i16) can overflow (2 * 255 * 127 >
//! 32767), so both operands are widened to i16 and multiplied with `vpmaddwd` (i16 pairs
//! summed into i32, exact). The zero point is folded into the epilogue as
//! `bias_q - zx * sum_k w[c, k]` (wrapping, identical to the reference mod 2^32).
//!
//! 3x3 convs with stride 1, padding 1 and at most four output channels (the head's last
//! layers) skip the GEMM: with so few rows, im2col and panel packing would cost several
//! times the multiplications. A direct kernel (`avx2::conv3x3_narrow`) sums the centred
//! input pairs times broadcast weight pairs in registers instead, with the same epilogue.
//! Likewise linear layers with at most 64 outputs (the pillar net, one row per point)
//! run `avx2::linear_direct`: a row's outputs accumulate in registers and are written
//! contiguously by a per-lane copy of the same epilogue, instead of being scattered.
//!
//! # Epilogues
//! An [`Epilogue`] turns `acc + bias_q` into the layer's output: [`Epilogue::Requant`]
//! gives u8 codes (`forward`), [`Epilogue::Dequant`] gives f32 reals exactly as
//! `quant::dequantize_acc` (then an optional ReLU) for layers whose output value stays
//! float, e.g. the head's last convs (`forward_f32`).
//!
//! # Uniform regions
//! LiDAR BEV maps are mostly empty, and an empty region holds one constant code per
//! channel (the zero point after the scatter, then `requant(bias)` after each layer). An
//! output pixel whose im2col column equals another's has the same output, so the AVX2
//! kernel detects panels of identical columns and reuses the outputs of the last such
//! column it computed instead of running the GEMM; results stay bit-exact by construction.
//!
//! # AVX512-VNNI
//! [`Isa::Avx512Vnni`] runs the same bands, uniform-panel cache and epilogues with another
//! multiply core (`avx2::GemmCore::Vnni`): K is grouped in quads instead of pairs, the
//! u8 im2col rows are interleaved into quads without widening, and `vpdpbusd` (256-bit,
//! AVX512VL) multiplies them by broadcast i8 weight quads straight into i32. Each u8 x i8
//! product fits i16 and VNNI adds the four into i32 without saturation, so the sums are
//! exact and the outputs are the reference's bit for bit. The weight quads are regrouped
//! from the one pair-packed store per row block, so resident weights stay one byte each.
//! The direct linear and sparse kernels have VNNI variants too (`avx2::linear_rows_vnni`,
//! `avx2::site_vnni`): u8 input quads broadcast against i8 weight quads, with the
//! zero point folded in as `-zx * wsum` (per present neighbour for the sparse conv). The
//! narrow-conv kernel is AVX2's under both families.
//!
//! AMX-INT8 would be one more core (tiles instead of ymm accumulators), selected the same
//! way; it is not written because no machine here has AMX, and untested kernels are not
//! shipped.

mod pack;
pub mod scalar;

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::quant::{Requant, dequantize_acc};
use pack::GemmWeights;

/// Environment variable that forces a kernel family (`scalar`, `avx2` or `avx512vnni`) in
/// [`Isa::detect`].
pub const ISA_ENV: &str = "LIDAR_PTQ_INT8_ISA";

/// Instruction-set family of a kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable reference loops (the definition).
    Scalar,
    /// x86-64 AVX2 (i16-widened `vpmaddwd` GEMM).
    Avx2,
    /// x86-64 AVX512-VNNI with AVX512VL: the GEMM, direct linear and sparse kernels
    /// multiply u8 x i8 quads with `vpdpbusd` on 256-bit registers; the narrow-conv
    /// kernel is AVX2's.
    Avx512Vnni,
}

impl Isa {
    /// Whether this CPU can run kernels of this family.
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => std::arch::is_x86_feature_detected!("avx2"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("avx512vnni")
                    && std::arch::is_x86_feature_detected!("avx512vl")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Vnni => false,
        }
    }

    /// Every family, the reference first.
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];

    /// The SIMD families this CPU runs (each is tested against [`Isa::Scalar`]).
    pub fn simd_available() -> Vec<Isa> {
        Isa::ALL[1..]
            .iter()
            .copied()
            .filter(|i| i.is_available())
            .collect()
    }

    /// The fastest family this CPU runs.
    pub fn best() -> Isa {
        [Isa::Avx512Vnni, Isa::Avx2]
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// [`Isa::best`] unless [`ISA_ENV`] names an available family.
    pub fn detect() -> Isa {
        match std::env::var(ISA_ENV).as_deref() {
            Ok("scalar") => Isa::Scalar,
            Ok("avx2") if Isa::Avx2.is_available() => Isa::Avx2,
            Ok("avx512vnni") if Isa::Avx512Vnni.is_available() => Isa::Avx512Vnni,
            _ => Isa::best(),
        }
    }
}

/// SIMD GEMM panels run so far in this process, and how many of them were written from
/// the uniform-region cache instead of being multiplied (diagnostics for the bench).
pub fn panel_stats() -> (u64, u64) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::atomic::Ordering::Relaxed;
        (
            avx2::PANELS_SEEN.load(Relaxed),
            avx2::PANELS_REUSED.load(Relaxed),
        )
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (0, 0)
    }
}

/// How an output channel's `acc + bias_q` becomes the layer's output.
#[derive(Debug, Clone, PartialEq)]
pub enum Epilogue {
    /// u8 codes: `Requant::apply` per output channel (ReLU is inside its clamp).
    Requant(Vec<Requant>),
    /// f32 reals: `dequantize_acc(acc, bias_q, input_scale, weight_scale[c])`, then
    /// `max(0)` when `relu`.
    Dequant {
        input_scale: f32,
        weight_scale: Vec<f32>,
        relu: bool,
    },
}

impl Epilogue {
    /// The same epilogue with each channel repeated `taps` times (GEMM rows `(c, tap)`).
    fn repeat_rows(&self, taps: usize) -> Epilogue {
        fn rep<E: Copy>(v: &[E], taps: usize) -> Vec<E> {
            v.iter()
                .flat_map(|&e| std::iter::repeat_n(e, taps))
                .collect()
        }
        match self {
            Epilogue::Requant(r) => Epilogue::Requant(rep(r, taps)),
            Epilogue::Dequant {
                input_scale,
                weight_scale,
                relu,
            } => Epilogue::Dequant {
                input_scale: *input_scale,
                weight_scale: rep(weight_scale, taps),
                relu: *relu,
            },
        }
    }
}

/// An output element type and its reference epilogue.
trait OutElem: Copy + Default + Send + Sync + 'static {
    /// Whether this type is produced by [`Epilogue::Dequant`] (else by `Requant`).
    const DEQUANT: bool;
    /// The reference epilogue of channel `ch`; only called with a matching epilogue.
    fn reference(epi: &Epilogue, ch: usize, acc: i32, bias_q: i32) -> Self;
}

impl OutElem for u8 {
    const DEQUANT: bool = false;
    #[inline]
    fn reference(epi: &Epilogue, ch: usize, acc: i32, bias_q: i32) -> u8 {
        match epi {
            Epilogue::Requant(r) => r[ch].apply(acc, bias_q) as u8,
            Epilogue::Dequant { .. } => 0,
        }
    }
}

impl OutElem for f32 {
    const DEQUANT: bool = true;
    #[inline]
    fn reference(epi: &Epilogue, ch: usize, acc: i32, bias_q: i32) -> f32 {
        match epi {
            Epilogue::Dequant {
                input_scale,
                weight_scale,
                relu,
            } => {
                let v = dequantize_acc(acc, bias_q, *input_scale, weight_scale[ch]);
                if *relu { v.max(0.0) } else { v }
            }
            Epilogue::Requant(_) => 0.0,
        }
    }
}

/// An output type every kernel family can write.
#[cfg(target_arch = "x86_64")]
trait Out: avx2::SimdOut + avx2::LaneOut {}
#[cfg(target_arch = "x86_64")]
impl<T: avx2::SimdOut + avx2::LaneOut> Out for T {}
#[cfg(not(target_arch = "x86_64"))]
trait Out: OutElem {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: OutElem> Out for T {}

/// Errors of the INT8 kernels: which argument, what was wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum KernelError {
    #[error("{op}: `{arg}` has length {got}, expected {expected}")]
    Length {
        op: &'static str,
        arg: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("{op}: `{arg}` is invalid: {detail}")]
    Invalid {
        op: &'static str,
        arg: &'static str,
        detail: String,
    },
    #[error("{op}: the {isa:?} kernels do not run on this CPU")]
    IsaUnavailable { op: &'static str, isa: Isa },
}

pub type Result<T> = std::result::Result<T, KernelError>;

fn expect_len(op: &'static str, arg: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(KernelError::Length {
            op,
            arg,
            got,
            expected,
        })
    }
}

fn invalid(op: &'static str, arg: &'static str, detail: String) -> KernelError {
    KernelError::Invalid { op, arg, detail }
}

/// Checks weights, biases and epilogues shared by all packed layers.
fn check_params(
    op: &'static str,
    weight: &[i8],
    expected_weights: usize,
    bias: &[i32],
    epilogue: &Epilogue,
    cout: usize,
) -> Result<()> {
    expect_len(op, "weight", weight.len(), expected_weights)?;
    expect_len(op, "bias", bias.len(), cout)?;
    if let Some(i) = weight.iter().position(|&w| w == i8::MIN) {
        return Err(invalid(
            op,
            "weight",
            format!("element {i} is -128, outside the symmetric grid [-127, 127]"),
        ));
    }
    match epilogue {
        Epilogue::Requant(requant) => {
            expect_len(op, "requant", requant.len(), cout)?;
            for (c, r) in requant.iter().enumerate() {
                // A finite multiplier keeps the float epilogue NaN-free (SIMD and scalar
                // agree); [lo, hi] inside [0, 255] keeps the result a u8 code.
                if !r.multiplier.is_finite() || r.lo < 0 || r.hi > 255 || r.lo > r.hi {
                    return Err(invalid(
                        op,
                        "requant",
                        format!(
                            "channel {c}: {r:?} needs a finite multiplier and 0 <= lo <= hi <= 255"
                        ),
                    ));
                }
            }
        }
        Epilogue::Dequant {
            input_scale,
            weight_scale,
            ..
        } => {
            expect_len(op, "weight_scale", weight_scale.len(), cout)?;
            if let Some(c) = weight_scale
                .iter()
                .position(|&s| !(input_scale * s).is_finite())
            {
                return Err(invalid(
                    op,
                    "weight_scale",
                    format!(
                        "channel {c}: {input_scale} * {} is not finite",
                        weight_scale[c]
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The output buffer type must be the one the epilogue produces.
fn check_output<T: OutElem>(op: &'static str, epilogue: &Epilogue) -> Result<()> {
    let dequant = matches!(epilogue, Epilogue::Dequant { .. });
    if dequant == T::DEQUANT {
        Ok(())
    } else {
        let (have, call) = if dequant {
            ("dequantizing (f32)", "forward_f32")
        } else {
            ("requantizing (u8)", "forward")
        };
        Err(invalid(
            op,
            "output",
            format!("the layer has a {have} epilogue: call `{call}`"),
        ))
    }
}

/// The band GEMM's multiply core for an x86 family.
#[cfg(target_arch = "x86_64")]
fn gemm_core(isa: Isa) -> avx2::GemmCore {
    match isa {
        Isa::Avx512Vnni => avx2::GemmCore::Vnni,
        _ => avx2::GemmCore::Madd16,
    }
}

fn check_isa(op: &'static str, isa: Isa) -> Result<()> {
    if isa.is_available() {
        Ok(())
    } else {
        Err(KernelError::IsaUnavailable { op, isa })
    }
}

/// Geometry of one convolution call (input and output sizes, stride, padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub ho: usize,
    pub wo: usize,
}

/// A 2D convolution (groups = 1) with its weights packed for every kernel family.
#[derive(Debug, Clone)]
pub struct PackedConv {
    pub cout: usize,
    pub cin: usize,
    pub kh: usize,
    pub kw: usize,
    /// (vertical, horizontal).
    pub stride: (usize, usize),
    /// (vertical, horizontal); padded taps read the input zero point.
    pub padding: (usize, usize),
    bias: Vec<i32>,
    epilogue: Epilogue,
    gemm: GemmWeights,
    /// Weight pairs of the AVX2 direct kernel for 3x3, stride-1, padding-1 convs with
    /// few output channels (`avx2::conv3x3_narrow`).
    narrow: Option<Vec<i32>>,
}

impl PackedConv {
    const OP: &'static str = "int8 conv2d";

    /// Packs `weight` (`[cout, cin, kh, kw]` = `shape`) with a quantized bias and a
    /// requantizer per output channel (u8 output, [`forward`](Self::forward)).
    pub fn new(
        weight: &[i8],
        shape: [usize; 4],
        bias: &[i32],
        requant: &[Requant],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let epilogue = Epilogue::Requant(requant.to_vec());
        Self::with_epilogue(weight, shape, bias, epilogue, stride, padding)
    }

    /// Packs `weight` with any [`Epilogue`].
    pub fn with_epilogue(
        weight: &[i8],
        shape: [usize; 4],
        bias: &[i32],
        epilogue: Epilogue,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let [cout, cin, kh, kw] = shape;
        let op = Self::OP;
        check_params(op, weight, cout * cin * kh * kw, bias, &epilogue, cout)?;
        if cout == 0 || cin == 0 || kh == 0 || kw == 0 {
            return Err(invalid(
                op,
                "shape",
                format!("{shape:?} has a zero dimension"),
            ));
        }
        if stride.0 == 0 || stride.1 == 0 {
            return Err(invalid(op, "stride", format!("{stride:?} must be >= 1")));
        }
        let k = cin * kh * kw;
        let gemm = GemmWeights::new(cout, k, bias, epilogue.clone(), |row, kk| {
            weight[row * k + kk]
        });
        #[cfg(target_arch = "x86_64")]
        let narrow = (kh == 3
            && kw == 3
            && stride == (1, 1)
            && padding == (1, 1)
            && cout <= avx2::NARROW_MAX_COUT)
            .then(|| avx2::narrow_weights(weight, cout, cin));
        #[cfg(not(target_arch = "x86_64"))]
        let narrow = None;
        Ok(Self {
            cout,
            cin,
            kh,
            kw,
            stride,
            padding,
            bias: bias.to_vec(),
            epilogue,
            gemm,
            narrow,
        })
    }

    /// Geometry of a call on an `[n, cin, h, w]` input.
    pub fn geom(&self, input: [usize; 4]) -> Result<ConvGeom> {
        let [_, c, h, w] = input;
        let op = Self::OP;
        if c != self.cin {
            return Err(invalid(
                op,
                "input",
                format!("shape {input:?} has {c} channels, the weights {}", self.cin),
            ));
        }
        let (ph, pw) = self.padding;
        if h + 2 * ph < self.kh || w + 2 * pw < self.kw || h == 0 || w == 0 {
            return Err(invalid(
                op,
                "input",
                format!(
                    "{h}x{w} padded by {:?} is smaller than the {}x{} kernel",
                    self.padding, self.kh, self.kw
                ),
            ));
        }
        let (sh, sw) = self.stride;
        Ok(ConvGeom {
            h,
            w,
            kh: self.kh,
            kw: self.kw,
            sh,
            sw,
            ph,
            pw,
            ho: (h + 2 * ph - self.kh) / sh + 1,
            wo: (w + 2 * pw - self.kw) / sw + 1,
        })
    }

    /// Output shape for an `[n, cin, h, w]` input.
    pub fn output_shape(&self, input: [usize; 4]) -> Result<[usize; 4]> {
        let g = self.geom(input)?;
        Ok([input[0], self.cout, g.ho, g.wo])
    }

    /// Resident bytes of the packed parameters.
    pub fn weight_bytes(&self) -> usize {
        self.gemm.bytes() + 4 * (self.bias.len() + self.narrow.as_ref().map_or(0, Vec::len))
    }

    /// `out = requant(conv(x - zx, w) + bias)`: `x` is `[n, cin, h, w]` = `input`, `out`
    /// must hold the [`output_shape`](Self::output_shape).
    pub fn forward(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [u8],
    ) -> Result<[usize; 4]> {
        self.run(isa, x, input, zx, out)
    }

    /// Like [`forward`](Self::forward) for a dequantizing epilogue: f32 output.
    pub fn forward_f32(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [f32],
    ) -> Result<[usize; 4]> {
        self.run(isa, x, input, zx, out)
    }

    fn run<T: Out>(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [T],
    ) -> Result<[usize; 4]> {
        let op = Self::OP;
        check_isa(op, isa)?;
        check_output::<T>(op, &self.epilogue)?;
        let g = self.geom(input)?;
        let n = input[0];
        let (plane_in, plane_out) = (self.cin * g.h * g.w, self.cout * g.ho * g.wo);
        expect_len(op, "input", x.len(), n * plane_in)?;
        expect_len(op, "output", out.len(), n * plane_out)?;
        for b in 0..n {
            let xi = &x[b * plane_in..(b + 1) * plane_in];
            let oi = &mut out[b * plane_out..(b + 1) * plane_out];
            match isa {
                Isa::Scalar => scalar::conv2d(self, xi, zx, &g, oi),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `check_isa` verified the family (VNNI implies AVX2); lengths
                // were checked above.
                Isa::Avx2 | Isa::Avx512Vnni => unsafe {
                    match &self.narrow {
                        Some(wn) => {
                            avx2::conv3x3_narrow(&self.gemm, wn, xi, zx, (self.cin, g.h, g.w), oi)
                        }
                        None => avx2::conv2d(gemm_core(isa), &self.gemm, xi, zx, &g, oi),
                    }
                },
                #[cfg(not(target_arch = "x86_64"))]
                Isa::Avx2 | Isa::Avx512Vnni => {
                    unreachable!("check_isa rejects x86 families off x86-64")
                }
            }
        }
        Ok([n, self.cout, g.ho, g.wo])
    }
}

/// A transposed 2D convolution (PyTorch `ConvTranspose2d`, no output padding) with packed
/// weights. The AVX2 kernel covers the upsampling case kernel == stride, padding 0 (each
/// output pixel gets exactly one tap per input channel); other geometries run the scalar
/// reference whatever the `Isa`.
#[derive(Debug, Clone)]
pub struct PackedConvTranspose {
    pub cin: usize,
    pub cout: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    bias: Vec<i32>,
    epilogue: Epilogue,
    /// Rows `(co, ky, kx)`, K = cin.
    gemm: GemmWeights,
}

impl PackedConvTranspose {
    const OP: &'static str = "int8 conv_transpose2d";

    /// Packs `weight` (`[cin, cout, kh, kw]` = `shape`), u8 output.
    pub fn new(
        weight: &[i8],
        shape: [usize; 4],
        bias: &[i32],
        requant: &[Requant],
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let epilogue = Epilogue::Requant(requant.to_vec());
        Self::with_epilogue(weight, shape, bias, epilogue, stride, padding)
    }

    /// Packs `weight` with any [`Epilogue`].
    pub fn with_epilogue(
        weight: &[i8],
        shape: [usize; 4],
        bias: &[i32],
        epilogue: Epilogue,
        stride: (usize, usize),
        padding: (usize, usize),
    ) -> Result<Self> {
        let [cin, cout, kh, kw] = shape;
        let op = Self::OP;
        check_params(op, weight, cin * cout * kh * kw, bias, &epilogue, cout)?;
        if cout == 0 || cin == 0 || kh == 0 || kw == 0 {
            return Err(invalid(
                op,
                "shape",
                format!("{shape:?} has a zero dimension"),
            ));
        }
        if stride.0 == 0 || stride.1 == 0 {
            return Err(invalid(op, "stride", format!("{stride:?} must be >= 1")));
        }
        let taps = kh * kw;
        let row_bias: Vec<i32> = (0..cout * taps).map(|r| bias[r / taps]).collect();
        let gemm = GemmWeights::new(
            cout * taps,
            cin,
            &row_bias,
            epilogue.repeat_rows(taps),
            |row, ci| {
                let (co, t) = (row / taps, row % taps);
                weight[(ci * cout + co) * taps + t]
            },
        );
        Ok(Self {
            cin,
            cout,
            kh,
            kw,
            stride,
            padding,
            bias: bias.to_vec(),
            epilogue,
            gemm,
        })
    }

    /// Output shape for an `[n, cin, h, w]` input: `(h - 1) * s - 2 * p + k` per axis.
    pub fn output_shape(&self, input: [usize; 4]) -> Result<[usize; 4]> {
        let [n, c, h, w] = input;
        let op = Self::OP;
        if c != self.cin {
            return Err(invalid(
                op,
                "input",
                format!("shape {input:?} has {c} channels, the weights {}", self.cin),
            ));
        }
        let size = |i: usize, s: usize, k: usize, p: usize| {
            (i.checked_sub(1)? * s + k)
                .checked_sub(2 * p)
                .filter(|&o| o > 0)
        };
        match (
            size(h, self.stride.0, self.kh, self.padding.0),
            size(w, self.stride.1, self.kw, self.padding.1),
        ) {
            (Some(ho), Some(wo)) => Ok([n, self.cout, ho, wo]),
            _ => Err(invalid(
                op,
                "input",
                format!("{h}x{w} leaves no output with padding {:?}", self.padding),
            )),
        }
    }

    /// Resident bytes of the packed parameters.
    pub fn weight_bytes(&self) -> usize {
        self.gemm.bytes() + 4 * self.bias.len()
    }

    fn is_upsampling(&self) -> bool {
        (self.kh, self.kw) == self.stride && self.padding == (0, 0)
    }

    /// `x` is `[n, cin, h, w]` = `input`; `out` must hold the output shape.
    pub fn forward(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [u8],
    ) -> Result<[usize; 4]> {
        self.run(isa, x, input, zx, out)
    }

    /// Like [`forward`](Self::forward) for a dequantizing epilogue: f32 output.
    pub fn forward_f32(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [f32],
    ) -> Result<[usize; 4]> {
        self.run(isa, x, input, zx, out)
    }

    fn run<T: Out>(
        &self,
        isa: Isa,
        x: &[u8],
        input: [usize; 4],
        zx: u8,
        out: &mut [T],
    ) -> Result<[usize; 4]> {
        let op = Self::OP;
        check_isa(op, isa)?;
        check_output::<T>(op, &self.epilogue)?;
        let [n, _, ho, wo] = self.output_shape(input)?;
        let (h, w) = (input[2], input[3]);
        let (plane_in, plane_out) = (self.cin * h * w, self.cout * ho * wo);
        expect_len(op, "input", x.len(), n * plane_in)?;
        expect_len(op, "output", out.len(), n * plane_out)?;
        for b in 0..n {
            let xi = &x[b * plane_in..(b + 1) * plane_in];
            let oi = &mut out[b * plane_out..(b + 1) * plane_out];
            match isa {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `check_isa` verified AVX2; lengths were checked above, and the
                // upsampling geometry makes (h * s, w * s) the output size.
                Isa::Avx2 | Isa::Avx512Vnni if self.is_upsampling() => unsafe {
                    avx2::upsample(gemm_core(isa), &self.gemm, xi, zx, (h, w), self.stride, oi)
                },
                _ => scalar::conv_transpose2d(self, xi, zx, (h, w), (ho, wo), oi),
            }
        }
        Ok([n, self.cout, ho, wo])
    }
}

/// A fully connected layer `[rows, cin] -> [rows, cout]` (weights `[cout, cin]`).
#[derive(Debug, Clone)]
pub struct PackedLinear {
    pub cout: usize,
    pub cin: usize,
    bias: Vec<i32>,
    epilogue: Epilogue,
    gemm: GemmWeights,
    /// The AVX2 direct kernel's layout, for layers with few outputs.
    #[cfg(target_arch = "x86_64")]
    direct: Option<avx2::DirectLinear>,
}

impl PackedLinear {
    const OP: &'static str = "int8 linear";

    /// Packs `weight` (`[cout, cin]`), u8 output.
    pub fn new(
        weight: &[i8],
        cout: usize,
        cin: usize,
        bias: &[i32],
        requant: &[Requant],
    ) -> Result<Self> {
        Self::with_epilogue(weight, cout, cin, bias, Epilogue::Requant(requant.to_vec()))
    }

    /// Packs `weight` with any [`Epilogue`].
    pub fn with_epilogue(
        weight: &[i8],
        cout: usize,
        cin: usize,
        bias: &[i32],
        epilogue: Epilogue,
    ) -> Result<Self> {
        let op = Self::OP;
        check_params(op, weight, cout * cin, bias, &epilogue, cout)?;
        if cout == 0 || cin == 0 {
            return Err(invalid(op, "shape", format!("[{cout}, {cin}] is empty")));
        }
        let gemm = GemmWeights::new(cout, cin, bias, epilogue.clone(), |row, k| {
            weight[row * cin + k]
        });
        Ok(Self {
            cout,
            cin,
            bias: bias.to_vec(),
            epilogue,
            #[cfg(target_arch = "x86_64")]
            direct: (cout <= avx2::LINEAR_DIRECT_MAX_COUT)
                .then(|| avx2::DirectLinear::new(&gemm, weight, cout, cin)),
            gemm,
        })
    }

    /// Resident bytes of the packed parameters.
    pub fn weight_bytes(&self) -> usize {
        #[cfg(target_arch = "x86_64")]
        let direct = self.direct.as_ref().map_or(0, |d| d.bytes());
        #[cfg(not(target_arch = "x86_64"))]
        let direct = 0;
        self.gemm.bytes() + 4 * self.bias.len() + direct
    }

    /// `x` is `[rows, cin]` row-major, `out` `[rows, cout]`.
    pub fn forward(&self, isa: Isa, x: &[u8], rows: usize, zx: u8, out: &mut [u8]) -> Result<()> {
        self.run(isa, x, rows, zx, out)
    }

    /// Like [`forward`](Self::forward) for a dequantizing epilogue: f32 output.
    pub fn forward_f32(
        &self,
        isa: Isa,
        x: &[u8],
        rows: usize,
        zx: u8,
        out: &mut [f32],
    ) -> Result<()> {
        self.run(isa, x, rows, zx, out)
    }

    fn run<T: Out>(&self, isa: Isa, x: &[u8], rows: usize, zx: u8, out: &mut [T]) -> Result<()> {
        let op = Self::OP;
        check_isa(op, isa)?;
        check_output::<T>(op, &self.epilogue)?;
        expect_len(op, "input", x.len(), rows * self.cin)?;
        expect_len(op, "output", out.len(), rows * self.cout)?;
        match isa {
            Isa::Scalar => scalar::linear(self, x, zx, rows, out),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `check_isa` verified AVX2; lengths were checked above.
            Isa::Avx2 | Isa::Avx512Vnni => unsafe {
                match &self.direct {
                    Some(d) => avx2::linear_direct(
                        gemm_core(isa),
                        d,
                        x,
                        zx,
                        (rows, self.cin, self.cout),
                        out,
                    ),
                    None => avx2::linear(gemm_core(isa), &self.gemm, x, zx, rows, out),
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Vnni => {
                unreachable!("check_isa rejects x86 families off x86-64")
            }
        }
        Ok(())
    }
}

/// A sparse 3D convolution `[N_in, cin] -> [N_out, cout]` over a frame's rulebook
/// (`crate::sparse::Rulebook`; weights `[cout, kz, ky, kx, cin]`, spconv's layout).
/// Output-stationary: each output site looks up its neighbour under every kernel offset
/// and multiplies only the neighbours that exist, accumulating in registers; the epilogue
/// follows at once. No i32 intermediate goes through memory and no scatter is needed.
#[derive(Debug, Clone)]
pub struct PackedSparseConv {
    pub cout: usize,
    pub cin: usize,
    pub taps: usize,
    /// Input-channel pairs (`ceil(cin / 2)`) and output channels rounded up to 8.
    kp: usize,
    cout_pad: usize,
    /// `[taps][kp][cout_pad][2]`: weight pairs `(w[co, t, 2q], w[co, t, 2q + 1])`, zero
    /// padded, one byte each.
    wp: Vec<i8>,
    bias: Vec<i32>,
    epilogue: Epilogue,
    /// The epilogue by output lane, for the SIMD kernels' 8-channel stores.
    #[cfg(target_arch = "x86_64")]
    lanes: avx2::Lanes,
}

impl PackedSparseConv {
    const OP: &'static str = "int8 sparse conv";
    /// No input site under this offset (neighbour tables).
    const NONE: u32 = crate::sparse::Rulebook::NO_NEIGHBOUR;

    /// Packs `weight` of shape `[cout, kz, ky, kx, cin]` with any [`Epilogue`].
    pub fn with_epilogue(
        weight: &[i8],
        shape: [usize; 5],
        bias: &[i32],
        epilogue: Epilogue,
    ) -> Result<Self> {
        let op = Self::OP;
        let [cout, kz, ky, kx, cin] = shape;
        let taps = kz * ky * kx;
        check_params(op, weight, cout * taps * cin, bias, &epilogue, cout)?;
        if cout == 0 || cin == 0 || taps == 0 {
            return Err(invalid(op, "shape", format!("{shape:?} is empty")));
        }
        let (kp, cout_pad) = (cin.div_ceil(2), cout.div_ceil(8) * 8);
        let mut wp = vec![0i8; taps * kp * cout_pad * 2];
        for co in 0..cout {
            for t in 0..taps {
                for ci in 0..cin {
                    wp[((t * kp + ci / 2) * cout_pad + co) * 2 + ci % 2] =
                        weight[(co * taps + t) * cin + ci];
                }
            }
        }
        Ok(Self {
            cout,
            cin,
            taps,
            kp,
            cout_pad,
            wp,
            bias: bias.to_vec(),
            #[cfg(target_arch = "x86_64")]
            lanes: avx2::Lanes::new(&epilogue, bias, cout, cout_pad),
            epilogue,
        })
    }

    /// Resident bytes of the packed parameters.
    pub fn weight_bytes(&self) -> usize {
        self.wp.len()
            + 4 * self.bias.len()
            + match &self.epilogue {
                Epilogue::Requant(r) => std::mem::size_of_val(r.as_slice()),
                Epilogue::Dequant { weight_scale, .. } => 4 * weight_scale.len(),
            }
    }

    /// Weight code of output channel `co`, offset `t`, input channel `ci`.
    fn weight(&self, co: usize, t: usize, ci: usize) -> i8 {
        self.wp[((t * self.kp + ci / 2) * self.cout_pad + co) * 2 + ci % 2]
    }

    /// `x` is `[rb.n_in(), cin]`, `out` `[rb.n_out(), cout]` codes.
    pub fn forward(
        &self,
        isa: Isa,
        x: &[u8],
        rb: &crate::sparse::Rulebook,
        zx: u8,
        out: &mut [u8],
    ) -> Result<()> {
        self.run(isa, x, rb, zx, out)
    }

    /// Like [`forward`](Self::forward) for a dequantizing epilogue: f32 output.
    pub fn forward_f32(
        &self,
        isa: Isa,
        x: &[u8],
        rb: &crate::sparse::Rulebook,
        zx: u8,
        out: &mut [f32],
    ) -> Result<()> {
        self.run(isa, x, rb, zx, out)
    }

    fn run<T: Out>(
        &self,
        isa: Isa,
        x: &[u8],
        rb: &crate::sparse::Rulebook,
        zx: u8,
        out: &mut [T],
    ) -> Result<()> {
        let op = Self::OP;
        check_isa(op, isa)?;
        check_output::<T>(op, &self.epilogue)?;
        if rb.kernel_volume() != self.taps {
            return Err(invalid(
                op,
                "rulebook",
                format!(
                    "{} kernel offsets, the layer has {}",
                    rb.kernel_volume(),
                    self.taps
                ),
            ));
        }
        // A rulebook's pairs index its own site sets (checked when it was built).
        expect_len(op, "input", x.len(), rb.n_in() * self.cin)?;
        expect_len(op, "output", out.len(), rb.n_out() * self.cout)?;
        match isa {
            Isa::Scalar => scalar::sparse_conv(self, x, zx, rb, out),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                let xc = self.centre(x, zx);
                let nbr = rb.neighbours();
                // SAFETY: `check_isa` verified AVX2; `xc` has `n_in * kp` pairs, the
                // neighbour table indexes `n_in` rows, `out` was checked above.
                unsafe { avx2::sparse_conv(self, avx2::SparseOperands::Pairs(&xc), nbr, out) }
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => {
                let vq = self.vnni_operands(x, zx);
                let nbr = rb.neighbours();
                // SAFETY: `check_isa` verified AVX512-VNNI (and AVX2); the operands are
                // sized for `n_in` rows and this layer, the neighbour table indexes
                // `n_in` rows, `out` was checked above.
                unsafe { avx2::sparse_conv(self, avx2::SparseOperands::Quads(&vq), nbr, out) }
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx2 | Isa::Avx512Vnni => {
                unreachable!("check_isa rejects x86 families off x86-64")
            }
        }
        Ok(())
    }

    /// Input rows as pairs of centred channels, `(x[2q] - zx) | (x[2q + 1] - zx) << 16` as
    /// i16 halves of an i32 (an odd last channel pairs with 0): `vpmaddwd`'s operand.
    fn centre(&self, x: &[u8], zx: u8) -> Vec<i32> {
        let (cin, kp) = (self.cin, self.kp);
        let rows = x.len() / cin;
        let mut xc = vec![0i32; rows * kp];
        for (src, dst) in x.chunks_exact(cin).zip(xc.chunks_exact_mut(kp)) {
            for (q, d) in dst.iter_mut().enumerate() {
                let lo = src[2 * q] as i32 - zx as i32;
                let hi = src.get(2 * q + 1).map_or(0, |&v| v as i32 - zx as i32);
                *d = (lo as i16 as u16 as u32 | ((hi as i16 as u16 as u32) << 16)) as i32;
            }
        }
        xc
    }

    /// The VNNI kernel's operands for one call: input rows as u8 quads, the weights
    /// regrouped from pairs into quads, and each offset's zero-point term `-zx * sum_ci w`
    /// (added once per present neighbour, so the sum ends centred, as in the AVX2 kernel).
    #[cfg(target_arch = "x86_64")]
    fn vnni_operands(&self, x: &[u8], zx: u8) -> avx2::SparseQuads {
        let (cin, kp, cp, taps) = (self.cin, self.kp, self.cout_pad, self.taps);
        let kq = cin.div_ceil(4);
        let rows = x.len() / cin;
        let mut xq = vec![0i32; rows * kq];
        for (src, dst) in x.chunks_exact(cin).zip(xq.chunks_exact_mut(kq)) {
            for (g, d) in dst.iter_mut().enumerate() {
                let b = [0, 1, 2, 3].map(|r| src.get(4 * g + r).copied().unwrap_or(0));
                *d = i32::from_le_bytes(b);
            }
        }
        let pair = |t: usize, q: usize, c: usize| -> [u8; 2] {
            if q < kp {
                let e = ((t * kp + q) * cp + c) * 2;
                [self.wp[e] as u8, self.wp[e + 1] as u8]
            } else {
                [0, 0]
            }
        };
        let mut wq = vec![0i32; taps * kq * cp];
        let mut corr = vec![0i32; taps * cp];
        for t in 0..taps {
            for g in 0..kq {
                for c in 0..cp {
                    let ([a, b], [e, f]) = (pair(t, 2 * g, c), pair(t, 2 * g + 1, c));
                    wq[(t * kq + g) * cp + c] = i32::from_le_bytes([a, b, e, f]);
                }
            }
            for c in 0..cp {
                let sum = (0..kp).fold(0i32, |s, q| {
                    let [a, b] = pair(t, q, c);
                    s.wrapping_add(a as i8 as i32).wrapping_add(b as i8 as i32)
                });
                corr[t * cp + c] = (zx as i32).wrapping_mul(sum).wrapping_neg();
            }
        }
        avx2::SparseQuads { kq, xq, wq, corr }
    }
}
