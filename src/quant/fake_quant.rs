//! Fake quantization (quantize then dequantize with the scheme's exact semantics) and its
//! backward pass: straight-through for the input (gradient passes where the value is
//! inside the grid, zero where it is clipped) and LSQ's gradient for the step size.
//!
//! With `v = x / s` and the grid `[lo, hi]` relative to the (fixed, integer) zero point,
//! LSQ (Esser et al., 2020) uses
//! `d x_hat / d s = round(v) - v` inside, `lo` below, `hi` above:
//! the exact derivative of `s * clamp(v, lo, hi) + s * c` with the rounding residual
//! `c = round(v) - v` held constant (rounding treated straight-through).

use super::error::{Result, check_finite, check_len};
use super::layout::ChannelLayout;
use super::scheme::QParams;
use crate::ops::Tensor;

/// Whether to multiply the step-size gradient by LSQ's `1 / sqrt(N * Q_P)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradScale {
    None,
    /// `N` = elements sharing the step size; `Q_P` = the largest code magnitude relative
    /// to the zero point (`max(qmax - zp, zp - qmin)`: 127 for int8 weights, 255 for an
    /// asymmetric u8 activation with zero point 0).
    Lsq,
}

/// Gradients of a fake-quant node.
#[derive(Debug, Clone, PartialEq)]
pub struct FakeQuantGrad {
    pub input: Vec<f32>,
    /// One per step size (1 for per-tensor, one per channel otherwise).
    pub scale: Vec<f32>,
}

/// Elementwise `q.fake(x)`.
pub fn fake_quant(xs: &[f32], q: &QParams) -> Vec<f32> {
    xs.iter().map(|&x| q.fake(x)).collect()
}

/// Fake quantization per channel along `axis` (0 for conv weights, 1 for transposed conv).
pub fn fake_quant_per_channel(t: &Tensor, axis: usize, qs: &[QParams]) -> Result<Tensor> {
    let layout = channel_layout("fake-quant per channel", t, axis, qs)?;
    let data = t
        .data
        .iter()
        .enumerate()
        .map(|(i, &x)| qs[layout.channel_of(i)].fake(x))
        .collect();
    Ok(Tensor {
        shape: t.shape.clone(),
        data,
    })
}

fn channel_layout(
    what: &'static str,
    t: &Tensor,
    axis: usize,
    qs: &[QParams],
) -> Result<ChannelLayout> {
    let layout = ChannelLayout::new(what, &t.shape, axis)?;
    check_len(what, "data", layout.len(), t.data.len())?;
    check_len(what, "qparams", layout.channels, qs.len())?;
    Ok(layout)
}

/// Local derivatives at `x`: (straight-through mask, `d x_hat / d s`).
#[inline]
pub fn local_grad(x: f32, q: &QParams) -> (bool, f32) {
    let v = x / q.scale;
    let lo = (q.grid.qmin - q.zero_point) as f32;
    let hi = (q.grid.qmax - q.zero_point) as f32;
    if v < lo {
        (false, lo)
    } else if v > hi {
        (false, hi)
    } else {
        (true, v.round_ties_even() - v)
    }
}

/// LSQ's gradient scale `1 / sqrt(n * Q_P)`.
pub fn lsq_grad_scale(n: usize, q: &QParams) -> f32 {
    let qp = (q.grid.qmax - q.zero_point)
        .max(q.zero_point - q.grid.qmin)
        .max(1);
    1.0 / ((n as f64 * qp as f64).sqrt() as f32)
}

/// Backward of the per-tensor fake quant: `grad_out` is dL/dx_hat.
pub fn fake_quant_backward(
    xs: &[f32],
    grad_out: &[f32],
    q: &QParams,
    scale_mode: GradScale,
) -> Result<FakeQuantGrad> {
    check_len("fake-quant backward", "grad_out", xs.len(), grad_out.len())?;
    check_finite("fake-quant backward", xs)?;
    let mut input = Vec::with_capacity(xs.len());
    let mut gs = 0f64;
    for (&x, &g) in xs.iter().zip(grad_out) {
        let (pass, ds) = local_grad(x, q);
        input.push(if pass { g } else { 0.0 });
        gs += g as f64 * ds as f64;
    }
    let k = match scale_mode {
        GradScale::None => 1.0,
        GradScale::Lsq => lsq_grad_scale(xs.len(), q),
    };
    Ok(FakeQuantGrad {
        input,
        scale: vec![gs as f32 * k],
    })
}

/// Backward of [`fake_quant_per_channel`]; `N` for the gradient scale is the number of
/// elements per channel.
pub fn fake_quant_per_channel_backward(
    t: &Tensor,
    axis: usize,
    qs: &[QParams],
    grad_out: &[f32],
    scale_mode: GradScale,
) -> Result<FakeQuantGrad> {
    let what = "fake-quant per channel backward";
    let layout = channel_layout(what, t, axis, qs)?;
    check_len(what, "grad_out", t.data.len(), grad_out.len())?;
    check_finite(what, &t.data)?;
    let mut input = Vec::with_capacity(t.data.len());
    let mut gs = vec![0f64; layout.channels];
    for (i, (&x, &g)) in t.data.iter().zip(grad_out).enumerate() {
        let c = layout.channel_of(i);
        let (pass, ds) = local_grad(x, &qs[c]);
        input.push(if pass { g } else { 0.0 });
        gs[c] += g as f64 * ds as f64;
    }
    let scale = gs
        .iter()
        .zip(qs)
        .map(|(&g, q)| {
            let k = match scale_mode {
                GradScale::None => 1.0,
                GradScale::Lsq => lsq_grad_scale(layout.per_channel(), q),
            };
            g as f32 * k
        })
        .collect();
    Ok(FakeQuantGrad { input, scale })
}
