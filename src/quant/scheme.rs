//! The quantization semantics: the single definition of how reals map to integers and how
//! an int32 accumulator becomes the next layer's 8-bit activation. Fake-quant, calibration,
//! the INT8 model file and every INT8 kernel (their scalar reference first) use exactly
//! these functions, so simulated and executed INT8 agree bit for bit.
//!
//! Conventions:
//! - Activations live on a u8 grid `[qmin, qmax]` with a zero point: asymmetric (any zero
//!   point, exact zero) or symmetric (zero point 128, grid 1..=255, i.e. i8 [-127, 127]
//!   shifted by 128 so u8 x i8 kernels run both flavours unchanged). 4-bit activations use
//!   0..=15 (asymmetric) or 1..=15 around 8 (symmetric).
//! - Weights are per-output-channel symmetric on i8 [-127, 127] (4-bit: [-7, 7]), zero
//!   point 0.
//! - Rounding is round-half-to-even everywhere (what SIMD float->int conversions do).
//! - Convolution padding is the activation zero point (real 0).
//! - Requantization: `q = clamp(round((acc + bias_q) as f32 * m), lo - zp, hi - zp) + zp`
//!   with `m = s_in * s_w[c] / s_out` in f32; a fused ReLU raises `lo` to the zero point.

use serde::{Deserialize, Serialize};

/// How a tensor's range maps onto the integer grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Flavour {
    /// scale + integer zero point; the real zero is exactly representable.
    Asymmetric,
    /// zero point fixed at the grid's middle; scale = max|x| / (half range).
    Symmetric,
}

/// An integer grid `[qmin, qmax]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grid {
    pub qmin: i32,
    pub qmax: i32,
}

impl Grid {
    /// Activation grid for `bits` (8 or 4) and a flavour.
    pub fn activation(bits: u32, flavour: Flavour) -> Grid {
        let top = (1i32 << bits) - 1;
        match flavour {
            Flavour::Asymmetric => Grid { qmin: 0, qmax: top },
            Flavour::Symmetric => Grid { qmin: 1, qmax: top },
        }
    }

    /// Signed symmetric weight grid for `bits` (8 -> [-127, 127], 4 -> [-7, 7]).
    pub fn weight(bits: u32) -> Grid {
        let m = (1i32 << (bits - 1)) - 1;
        Grid { qmin: -m, qmax: m }
    }

    /// The zero point a symmetric quantizer on this grid uses (middle of the grid).
    pub fn symmetric_zero_point(&self) -> i32 {
        (self.qmin + self.qmax + 1) / 2
    }
}

/// `real = scale * (q - zero_point)`, q on `grid`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
    pub grid: Grid,
}

/// Smallest scale used when a tensor is all zeros (keeps every division finite).
pub const MIN_SCALE: f32 = 1e-8;

impl QParams {
    /// Parameters covering `[min, max]` (widened to include 0) on `grid`.
    pub fn asymmetric(min: f32, max: f32, grid: Grid) -> QParams {
        let (lo, hi) = (min.min(0.0), max.max(0.0));
        let steps = (grid.qmax - grid.qmin) as f32;
        let scale = ((hi - lo) / steps).max(MIN_SCALE);
        let zp = (grid.qmin as f32 - lo / scale).round_ties_even() as i32;
        QParams {
            scale,
            zero_point: zp.clamp(grid.qmin, grid.qmax),
            grid,
        }
    }

    /// Symmetric parameters for `max_abs` on `grid` (zero point in the grid's middle; 0
    /// for signed weight grids).
    pub fn symmetric(max_abs: f32, grid: Grid) -> QParams {
        let zp = grid.symmetric_zero_point();
        let half = (grid.qmax - zp) as f32;
        QParams {
            scale: (max_abs.abs() / half).max(MIN_SCALE),
            zero_point: zp,
            grid,
        }
    }

    /// Parameters of a flavour for the range `[min, max]`.
    pub fn for_range(min: f32, max: f32, grid: Grid, flavour: Flavour) -> QParams {
        match flavour {
            Flavour::Asymmetric => Self::asymmetric(min, max, grid),
            Flavour::Symmetric => Self::symmetric(min.abs().max(max.abs()), grid),
        }
    }

    /// Nearest grid point of `x` (half to even), clamped.
    #[inline]
    pub fn quantize(&self, x: f32) -> i32 {
        let q = (x / self.scale).round_ties_even();
        let lo = (self.grid.qmin - self.zero_point) as f32;
        let hi = (self.grid.qmax - self.zero_point) as f32;
        // Clamp in float before converting, so huge or NaN inputs cannot wrap.
        let q = if q.is_nan() { 0.0 } else { q.clamp(lo, hi) };
        q as i32 + self.zero_point
    }

    #[inline]
    pub fn dequantize(&self, q: i32) -> f32 {
        self.scale * (q - self.zero_point) as f32
    }

    /// Quantize then dequantize: what the integer engine sees, in reals.
    #[inline]
    pub fn fake(&self, x: f32) -> f32 {
        self.dequantize(self.quantize(x))
    }

    /// The real interval the grid covers.
    pub fn real_range(&self) -> (f32, f32) {
        (
            self.dequantize(self.grid.qmin),
            self.dequantize(self.grid.qmax),
        )
    }
}

/// A bias in the accumulator's units: `round(bias / (s_in * s_w))`, saturated to i32.
#[inline]
pub fn quantize_bias(bias: f32, input_scale: f32, weight_scale: f32) -> i32 {
    let v = (bias / (input_scale * weight_scale)).round_ties_even();
    if v.is_nan() {
        0
    } else {
        v.clamp(i32::MIN as f32, i32::MAX as f32) as i32
    }
}

/// The real value of accumulator `acc` plus the quantized bias, for a layer whose output
/// stays float (e.g. the head's last convs): `(acc + bias_q) * (s_in * s_w)` in f32.
#[inline]
pub fn dequantize_acc(acc: i32, bias_q: i32, input_scale: f32, weight_scale: f32) -> f32 {
    acc.wrapping_add(bias_q) as f32 * (input_scale * weight_scale)
}

/// The requantization of a residual add whose two inputs share one parameter set with
/// scale `input_scale`: the sum of the centred codes `(a - zp) + (b - zp)` is exact in
/// integers and becomes the output code as a layer's accumulator does (`Requant` with
/// weight scale 1 and zero bias; a ReLU raises the clamp to the output zero point).
pub fn add_requant(input_scale: f32, out: &QParams, relu: bool) -> Requant {
    Requant::new(input_scale, 1.0, out, relu)
}

/// Per-output-channel requantization of an int32 accumulator into an activation grid.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Requant {
    /// `s_in * s_w[c] / s_out`.
    pub multiplier: f32,
    /// Output zero point.
    pub zero_point: i32,
    /// Lowest output code (the zero point when a ReLU is fused).
    pub lo: i32,
    pub hi: i32,
}

impl Requant {
    pub fn new(input_scale: f32, weight_scale: f32, out: &QParams, relu: bool) -> Requant {
        Requant {
            multiplier: input_scale * weight_scale / out.scale,
            zero_point: out.zero_point,
            lo: if relu {
                out.zero_point.max(out.grid.qmin)
            } else {
                out.grid.qmin
            },
            hi: out.grid.qmax,
        }
    }

    /// The output code of accumulator `acc` (zero-point-corrected sum of products) plus
    /// the quantized bias. The i32 add wraps, as SIMD adds do.
    #[inline]
    pub fn apply(&self, acc: i32, bias_q: i32) -> i32 {
        let v = (acc.wrapping_add(bias_q) as f32 * self.multiplier).round_ties_even();
        let v = v.clamp(
            (self.lo - self.zero_point) as f32,
            (self.hi - self.zero_point) as f32,
        );
        v as i32 + self.zero_point
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids() {
        assert_eq!(
            Grid::activation(8, Flavour::Asymmetric),
            Grid { qmin: 0, qmax: 255 }
        );
        assert_eq!(
            Grid::activation(8, Flavour::Symmetric).symmetric_zero_point(),
            128
        );
        assert_eq!(
            Grid::weight(8),
            Grid {
                qmin: -127,
                qmax: 127
            }
        );
        assert_eq!(Grid::weight(4), Grid { qmin: -7, qmax: 7 });
        assert_eq!(
            Grid::activation(4, Flavour::Symmetric).symmetric_zero_point(),
            8
        );
    }

    #[test]
    fn asymmetric_covers_the_range_with_an_exact_zero() {
        let g = Grid::activation(8, Flavour::Asymmetric);
        let q = QParams::asymmetric(-1.0, 3.0, g);
        assert_eq!(q.fake(0.0), 0.0);
        let (lo, hi) = q.real_range();
        assert!((lo + 1.0).abs() < q.scale && (hi - 3.0).abs() < q.scale);
        // Every representable value round-trips; values in between go to the nearest code.
        for code in 0..=255 {
            assert_eq!(q.quantize(q.dequantize(code)), code);
        }
        let x = 1.234f32;
        assert!((q.fake(x) - x).abs() <= q.scale / 2.0 + 1e-6);
        // Out of range clamps; NaN maps to the zero point.
        assert_eq!(q.quantize(1e30), 255);
        assert_eq!(q.quantize(-1e30), 0);
        assert_eq!(q.quantize(f32::NAN), q.zero_point);
        // A post-ReLU tensor gets zero point 0.
        assert_eq!(QParams::asymmetric(0.0, 6.0, g).zero_point, 0);
    }

    #[test]
    fn symmetric_and_half_to_even() {
        let w = QParams::symmetric(1.27, Grid::weight(8));
        assert_eq!(w.zero_point, 0);
        assert!((w.scale - 0.01).abs() < 1e-9);
        // 0.005 / 0.01 = 0.5 -> 0 (even), 0.015 / 0.01 = 1.5 -> 2.
        assert_eq!(w.quantize(0.005), 0);
        assert_eq!(w.quantize(0.015), 2);
        assert_eq!(w.quantize(-5.0), -127);
        let a = QParams::symmetric(2.0, Grid::activation(8, Flavour::Symmetric));
        assert_eq!(a.zero_point, 128);
        assert_eq!(a.quantize(2.0), 255);
        assert_eq!(a.quantize(-2.0), 1);
    }

    /// Requantization equals quantizing the real-valued layer output with the output
    /// parameters, computed independently in f64, except at exact rounding ties.
    #[test]
    fn requant_matches_real_arithmetic() {
        let out = QParams::asymmetric(-2.0, 6.0, Grid::activation(8, Flavour::Asymmetric));
        let (s_in, s_w) = (0.02f32, 0.003f32);
        let bias = 0.37f32;
        let bq = quantize_bias(bias, s_in, s_w);
        for relu in [false, true] {
            let r = Requant::new(s_in, s_w, &out, relu);
            for acc in (-200_000..200_000).step_by(997) {
                let real = acc as f64 * s_in as f64 * s_w as f64 + bq as f64 * (s_in * s_w) as f64;
                let real = if relu { real.max(0.0) } else { real };
                let want = ((real / out.scale as f64).round() as i64 + out.zero_point as i64)
                    .clamp(r.lo as i64, 255) as i32;
                let got = r.apply(acc, bq);
                assert!((got - want).abs() <= 1, "acc {acc}: {got} vs {want}");
            }
        }
        assert_eq!(Requant::new(s_in, s_w, &out, true).lo, out.zero_point);
    }
}
