//! AdaRound (Nagel et al., 2020) for one weight tensor, as LiDAR-PTQ's adaptive
//! rounding-to-nearest uses it:
//! `w_hat = s * clamp(floor(w/s) + h(V), lo, hi)`,
//! `h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`, zeta 1.1, gamma -0.1,
//! with `[lo, hi]` the grid relative to the zero point (`[-127, 127]` for int8 weights).
//! `V` starts where `h(V) = frac(w/s)`, so the soft weights start at `w` (up to clamping).
//! Hardening rounds up iff `V >= 0`, which is exactly `h(V) >= 0.5` (`sigmoid(V) >= 0.5`),
//! and yields integer codes on the scheme's grid.

use super::error::{QuantError, Result, check_finite, check_len};
use super::layout::ChannelLayout;
use super::scheme::QParams;
use crate::ops::Tensor;

pub const ZETA: f32 = 1.1;
pub const GAMMA: f32 = -0.1;
/// The spec's regulariser weight `w_r`.
pub const DEFAULT_REG_WEIGHT: f32 = 0.01;

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + (-v).exp())
}

/// The rectified sigmoid `h(V)`.
pub fn rectified_sigmoid(v: f32) -> f32 {
    (sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
}

/// `dh/dV` (zero where the clamp is active).
pub fn rectified_sigmoid_grad(v: f32) -> f32 {
    let s = sigmoid(v);
    let raw = s * (ZETA - GAMMA) + GAMMA;
    if raw > 0.0 && raw < 1.0 {
        (ZETA - GAMMA) * s * (1.0 - s)
    } else {
        0.0
    }
}

/// The `V` with `h(V) = r` for `r` in `[0, 1)`.
pub fn inverse_rectified_sigmoid(r: f32) -> f32 {
    let p = (r - GAMMA) / (ZETA - GAMMA);
    (p / (1.0 - p)).ln()
}

/// Linear annealing of the regulariser exponent `beta`: off (`None`) for the first
/// `warmup` fraction of `iters` (`floor(warmup * iters)` iterations), then from `start` at
/// the first regularised iteration linearly towards `end`, reached at `iters`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BetaSchedule {
    pub iters: usize,
    pub warmup: f32,
    pub start: f32,
    pub end: f32,
}

impl BetaSchedule {
    /// The spec's schedule: 20 -> 2 after 20% warm-up.
    pub fn new(iters: usize) -> Self {
        Self {
            iters,
            warmup: 0.2,
            start: 20.0,
            end: 2.0,
        }
    }

    pub fn warmup_iters(&self) -> usize {
        (self.warmup as f64 * self.iters as f64).floor() as usize
    }

    /// `beta` at iteration `it` (0-based), `None` during warm-up.
    pub fn beta(&self, it: usize) -> Option<f32> {
        let warm = self.warmup_iters();
        if it < warm {
            return None;
        }
        let span = (self.iters - warm).max(1) as f64;
        let t = ((it - warm) as f64 / span).min(1.0);
        Some((self.start as f64 + (self.end as f64 - self.start as f64) * t) as f32)
    }
}

/// Learnable rounding of one weight tensor with per-channel parameters along `axis`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaRound {
    layout: ChannelLayout,
    qs: Vec<QParams>,
    floor: Vec<f32>,
    /// The rounding variables, one per weight (optimise these).
    pub v: Vec<f32>,
}

impl AdaRound {
    /// Rounding variables for `w` quantized per channel along `axis` with `qs`.
    pub fn new(w: &Tensor, axis: usize, qs: &[QParams]) -> Result<Self> {
        let what = "adaround";
        let layout = ChannelLayout::new(what, &w.shape, axis)?;
        check_len(what, "data", layout.len(), w.data.len())?;
        check_len(what, "qparams", layout.channels, qs.len())?;
        check_finite(what, &w.data)?;
        if let Some(q) = qs.iter().find(|q| !(q.scale > 0.0 && q.scale.is_finite())) {
            return Err(QuantError::Param {
                what,
                field: "scale",
                value: q.scale as f64,
                why: "must be positive and finite",
            });
        }
        let mut floor = Vec::with_capacity(w.data.len());
        let mut v = Vec::with_capacity(w.data.len());
        for (i, &x) in w.data.iter().enumerate() {
            let q = &qs[layout.channel_of(i)];
            let r = x / q.scale;
            let f = r.floor();
            floor.push(f);
            // frac can round up to 1.0 in f32 for tiny negative r; keep it below 1.
            let frac = (r - f).clamp(0.0, 1.0 - f32::EPSILON);
            v.push(inverse_rectified_sigmoid(frac));
        }
        Ok(Self {
            layout,
            qs: qs.to_vec(),
            floor,
            v,
        })
    }

    pub fn len(&self) -> usize {
        self.v.len()
    }

    pub fn is_empty(&self) -> bool {
        self.v.is_empty()
    }

    pub fn qparams(&self) -> &[QParams] {
        &self.qs
    }

    fn bounds(q: &QParams) -> (f32, f32) {
        (
            (q.grid.qmin - q.zero_point) as f32,
            (q.grid.qmax - q.zero_point) as f32,
        )
    }

    /// The soft (differentiable) weights `w_hat`.
    pub fn soft_weights(&self) -> Vec<f32> {
        (0..self.len())
            .map(|i| {
                let q = &self.qs[self.layout.channel_of(i)];
                let (lo, hi) = Self::bounds(q);
                q.scale * (self.floor[i] + rectified_sigmoid(self.v[i])).clamp(lo, hi)
            })
            .collect()
    }

    /// dL/dV from dL/dw_hat.
    pub fn backward(&self, grad_w_hat: &[f32]) -> Result<Vec<f32>> {
        check_len(
            "adaround backward",
            "grad_w_hat",
            self.len(),
            grad_w_hat.len(),
        )?;
        Ok((0..self.len())
            .map(|i| {
                let q = &self.qs[self.layout.channel_of(i)];
                let (lo, hi) = Self::bounds(q);
                let code = self.floor[i] + rectified_sigmoid(self.v[i]);
                if code < lo || code > hi {
                    0.0
                } else {
                    grad_w_hat[i] * q.scale * rectified_sigmoid_grad(self.v[i])
                }
            })
            .collect())
    }

    /// `sum(1 - |2h(V) - 1|^beta)` in f64 (unweighted).
    pub fn regularizer(&self, beta: f32) -> f64 {
        self.v
            .iter()
            .map(|&v| {
                let u = (2.0 * rectified_sigmoid(v) as f64 - 1.0).abs();
                1.0 - u.powf(beta as f64)
            })
            .sum()
    }

    /// Adds `weight * d regularizer / dV` to `grad`.
    pub fn add_regularizer_grad(&self, beta: f32, weight: f32, grad: &mut [f32]) -> Result<()> {
        check_len("adaround regulariser", "grad", self.len(), grad.len())?;
        for (g, &v) in grad.iter_mut().zip(&self.v) {
            let u = 2.0 * rectified_sigmoid(v) - 1.0;
            let d_dh = -beta * u.abs().powf(beta - 1.0) * u.signum() * 2.0;
            let d_dh = if u == 0.0 { 0.0 } else { d_dh };
            *g += weight * d_dh * rectified_sigmoid_grad(v);
        }
        Ok(())
    }

    /// Hardened integer codes on the scheme's grid: `clamp(floor(w/s) + [V >= 0], lo, hi)
    /// + zero_point`.
    pub fn hard_codes(&self) -> Vec<i32> {
        (0..self.len())
            .map(|i| {
                let q = &self.qs[self.layout.channel_of(i)];
                let (lo, hi) = Self::bounds(q);
                let up = if self.v[i] >= 0.0 { 1.0 } else { 0.0 };
                (self.floor[i] + up).clamp(lo, hi) as i32 + q.zero_point
            })
            .collect()
    }

    /// Hardened weights (the codes dequantized by the scheme).
    pub fn hard_weights(&self) -> Vec<f32> {
        self.hard_codes()
            .into_iter()
            .enumerate()
            .map(|(i, c)| self.qs[self.layout.channel_of(i)].dequantize(c))
            .collect()
    }
}
