//! Adam over a flat f32 parameter slice (PyTorch's bias-corrected form) and a cosine
//! learning-rate decay, for AdaRound's `V` and LSQ step sizes.

use super::error::{QuantError, Result, check_len};

#[derive(Debug, Clone, PartialEq)]
pub struct Adam {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    /// Optimiser state for `n` parameters (beta1 0.9, beta2 0.999, eps 1e-8).
    pub fn new(n: usize) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }

    /// Steps taken so far.
    pub fn steps(&self) -> i32 {
        self.t
    }

    /// One update `p -= lr * m_hat / (sqrt(v_hat) + eps)`.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f32) -> Result<()> {
        check_len("adam", "params", self.m.len(), params.len())?;
        check_len("adam", "grads", self.m.len(), grads.len())?;
        if let Some(i) = grads.iter().position(|g| !g.is_finite()) {
            return Err(QuantError::NonFinite {
                what: "adam gradient",
                index: i,
                value: grads[i],
            });
        }
        self.t += 1;
        let c1 = 1.0 - (self.beta1 as f64).powi(self.t);
        let c2 = 1.0 - (self.beta2 as f64).powi(self.t);
        for ((p, &g), (m, v)) in params
            .iter_mut()
            .zip(grads)
            .zip(self.m.iter_mut().zip(self.v.iter_mut()))
        {
            *m = self.beta1 * *m + (1.0 - self.beta1) * g;
            *v = self.beta2 * *v + (1.0 - self.beta2) * g * g;
            let m_hat = *m as f64 / c1;
            let v_hat = *v as f64 / c2;
            *p -= (lr as f64 * m_hat / (v_hat.sqrt() + self.eps as f64)) as f32;
        }
        Ok(())
    }
}

/// Cosine decay from `base` at iteration 0 to `floor` at `total`:
/// `floor + (base - floor) * (1 + cos(pi * it / total)) / 2` (held at `floor` after).
pub fn cosine_lr(base: f32, floor: f32, it: usize, total: usize) -> f32 {
    let t = (it as f64 / total.max(1) as f64).min(1.0);
    (floor as f64 + (base - floor) as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
}
