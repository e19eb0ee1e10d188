//! LiDAR-PTQ's light clipping search: shrink the min-max range by
//! `alpha = 1 - step * i, i = 0..candidates` and keep the candidate with the lowest
//! `||x - fake_q(x)||_p` (p = 2.4). Per tensor for activations (evaluated on a cached
//! subset of calibration values, with the range from the full calibration set), per
//! output channel for weights. Weight candidates can be scored input-aware
//! ([`GridSearch::search_per_channel_weighted`]): each weight's error weighed by the
//! p-th moment of the input channel it multiplies, which on the default model keeps 4-bit
//! weights from being clipped where they meet large inputs (unweighted, the search loses
//! mAP against plain min-max there).

use serde::{Deserialize, Serialize};

use super::error::{QuantError, Result, check_finite, check_len};
use super::layout::ChannelLayout;
use super::scheme::{Flavour, Grid, QParams};
use crate::ops::Tensor;

/// Search settings (defaults are the spec's: 80 candidates, step 0.01, p = 2.4).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GridSearch {
    pub candidates: usize,
    pub step: f32,
    pub p: f64,
}

impl Default for GridSearch {
    fn default() -> Self {
        Self {
            candidates: 80,
            step: 0.01,
            p: 2.4,
        }
    }
}

/// The chosen candidate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SearchResult {
    pub qparams: QParams,
    pub alpha: f32,
    /// `sum |x - fake_q(x)|^p` of the chosen candidate (the p-th power of the norm).
    pub loss: f64,
}

impl GridSearch {
    fn validate(&self) -> Result<()> {
        let bad = |field, value, why| {
            Err(QuantError::Param {
                what: "grid search",
                field,
                value,
                why,
            })
        };
        if self.candidates == 0 {
            return bad("candidates", 0.0, "must be at least 1");
        }
        if self.step.is_nan() || self.step <= 0.0 || self.step * (self.candidates - 1) as f32 >= 1.0
        {
            return bad(
                "step",
                self.step as f64,
                "must be > 0 and keep every alpha positive",
            );
        }
        if !(self.p > 0.0 && self.p.is_finite()) {
            return bad("p", self.p, "must be a positive finite number");
        }
        Ok(())
    }

    /// `alpha_i = 1 - step * i`.
    pub fn alpha(&self, i: usize) -> f32 {
        1.0 - self.step * i as f32
    }

    /// The candidate parameters for `alpha` applied to `(min, max)` (asymmetric) or
    /// `max|x|` (symmetric).
    pub fn candidate(min: f32, max: f32, alpha: f32, grid: Grid, flavour: Flavour) -> QParams {
        match flavour {
            Flavour::Asymmetric => QParams::asymmetric(alpha * min, alpha * max, grid),
            Flavour::Symmetric => QParams::symmetric(alpha * min.abs().max(max.abs()), grid),
        }
    }

    /// `sum |x - fake_q(x)|^p` in f64.
    pub fn loss(&self, xs: impl Iterator<Item = f32>, q: &QParams) -> f64 {
        xs.map(|x| ((x - q.fake(x)) as f64).abs().powf(self.p))
            .sum()
    }

    /// Search over values `xs` given the range `(min, max)` they were calibrated to (for
    /// activations: the full calibration set's min-max; `xs` a cached subset).
    pub fn search(
        &self,
        xs: &[f32],
        min: f32,
        max: f32,
        grid: Grid,
        flavour: Flavour,
    ) -> Result<SearchResult> {
        self.validate()?;
        check_finite("grid search", xs)?;
        if xs.is_empty() {
            return Err(QuantError::Empty {
                what: "grid search",
            });
        }
        self.search_iter(|| xs.iter().map(|&x| (x, 1.0)), min, max, grid, flavour)
    }

    /// Search over `(value, weight)` pairs: the loss is `sum weight * |x - fake_q(x)|^p`.
    fn search_iter<I: Iterator<Item = (f32, f64)>>(
        &self,
        xs: impl Fn() -> I,
        min: f32,
        max: f32,
        grid: Grid,
        flavour: Flavour,
    ) -> Result<SearchResult> {
        if !(min.is_finite() && max.is_finite()) || min > max {
            return Err(QuantError::Param {
                what: "grid search",
                field: "min/max",
                value: (max - min) as f64,
                why: "range must be finite with min <= max",
            });
        }
        let mut best: Option<SearchResult> = None;
        for i in 0..self.candidates {
            let alpha = self.alpha(i);
            let q = Self::candidate(min, max, alpha, grid, flavour);
            let loss: f64 = xs()
                .map(|(x, m)| m * ((x - q.fake(x)) as f64).abs().powf(self.p))
                .sum();
            // Strict: ties keep the wider range.
            if best.is_none_or(|b| loss < b.loss) {
                best = Some(SearchResult {
                    qparams: q,
                    alpha,
                    loss,
                });
            }
        }
        Ok(best.expect("at least one candidate (validated)"))
    }

    /// Per-channel search along `axis` of a weight tensor, each channel's range its own
    /// min-max.
    pub fn search_per_channel(
        &self,
        w: &Tensor,
        axis: usize,
        grid: Grid,
        flavour: Flavour,
    ) -> Result<Vec<SearchResult>> {
        self.validate()?;
        let layout = ChannelLayout::new("grid search per channel", &w.shape, axis)?;
        check_len(
            "grid search per channel",
            "data",
            layout.len(),
            w.data.len(),
        )?;
        check_finite("grid search per channel", &w.data)?;
        if layout.per_channel() == 0 {
            return Err(QuantError::Empty {
                what: "grid search per channel",
            });
        }
        (0..layout.channels)
            .map(|c| {
                let vals = || layout.indices(c).map(|i| w.data[i]);
                let (lo, hi) = vals().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
                    (a.min(v), b.max(v))
                });
                self.search_iter(|| vals().map(|x| (x, 1.0)), lo, hi, grid, flavour)
            })
            .collect()
    }

    /// [`search_per_channel`](Self::search_per_channel) with each weight's error weighed
    /// by `importance[j]` of the input channel `j` it multiplies (`in_axis` of the weight):
    /// `sum_i importance[in(i)] * |w_i - fake_q(w_i)|^p`. With `importance[j] = E|x_j|^p`
    /// of the layer's input, this is the p-th power error of the products `w_i * x_j`, so
    /// the search clips the weights that meet large inputs least (data-aware, still one
    /// light grid per channel). Equal importances give the unweighted search.
    pub fn search_per_channel_weighted(
        &self,
        w: &Tensor,
        axis: usize,
        in_axis: usize,
        importance: &[f64],
        grid: Grid,
        flavour: Flavour,
    ) -> Result<Vec<SearchResult>> {
        self.validate()?;
        let what = "weighted grid search per channel";
        let layout = ChannelLayout::new(what, &w.shape, axis)?;
        let inputs = ChannelLayout::new(what, &w.shape, in_axis)?;
        check_len(what, "data", layout.len(), w.data.len())?;
        check_len(what, "importance", inputs.channels, importance.len())?;
        check_finite(what, &w.data)?;
        if let Some(&m) = importance.iter().find(|m| !(m.is_finite() && **m >= 0.0)) {
            return Err(QuantError::Param {
                what,
                field: "importance",
                value: m,
                why: "must be finite and >= 0",
            });
        }
        if layout.per_channel() == 0 {
            return Err(QuantError::Empty { what });
        }
        (0..layout.channels)
            .map(|c| {
                let vals = || layout.indices(c).map(|i| w.data[i]);
                let (lo, hi) = vals().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
                    (a.min(v), b.max(v))
                });
                let pairs = || {
                    layout
                        .indices(c)
                        .map(|i| (w.data[i], importance[inputs.channel_of(i)]))
                };
                self.search_iter(pairs, lo, hi, grid, flavour)
            })
            .collect()
    }
}
