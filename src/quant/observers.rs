//! Calibration statistics, accumulated over many batches: `observe` each batch, then
//! `finish` for a grid and flavour.
//!
//! - [`MinMax`]: the LiDAR-PTQ statistic.
//! - [`Percentile`] and [`Entropy`] (TensorRT's KL calibration): baselines. Both are
//!   histogram based and, with `sparsity_aware`, ignore exact zeros (empty BEV cells);
//!   without it the ~90% zeros of a BEV map drag the entropy threshold down, which is
//!   the failure LiDAR-PTQ reports.
//!
//! Histograms span `[0, 2^e)` with `e` the smallest exponent covering every magnitude
//! seen; a wider batch doubles the range by merging bin pairs. Because the range is a
//! power of two, merging is exact: the final histogram depends only on the multiset of
//! values, not on batch order or size. The data fill between half and all of the bins.

use serde::{Deserialize, Serialize};

use super::error::{QuantError, Result, check_finite};
use super::layout::ChannelLayout;
use super::scheme::{Flavour, Grid, QParams};
use crate::ops::Tensor;

/// A streaming calibration statistic.
pub trait Observer {
    /// Accumulate one batch; a non-finite value is an error (and the batch is ignored).
    fn observe(&mut self, xs: &[f32]) -> Result<()>;
    /// Quantization parameters for everything observed so far.
    fn finish(&self, grid: Grid, flavour: Flavour) -> Result<QParams>;
}

/// Which calibration statistic to use for activations.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ObserverKind {
    MinMax,
    Percentile {
        percentile: f64,
        sparsity_aware: bool,
    },
    Entropy {
        sparsity_aware: bool,
    },
}

impl ObserverKind {
    pub fn build(&self) -> Result<Box<dyn Observer + Send>> {
        Ok(match *self {
            ObserverKind::MinMax => Box::new(MinMax::new()),
            ObserverKind::Percentile {
                percentile,
                sparsity_aware,
            } => Box::new(Percentile::new(
                percentile,
                sparsity_aware,
                Percentile::DEFAULT_BINS,
            )?),
            ObserverKind::Entropy { sparsity_aware } => {
                Box::new(Entropy::new(sparsity_aware, Entropy::DEFAULT_BINS)?)
            }
        })
    }
}

/// Running minimum and maximum.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MinMax {
    min: f32,
    max: f32,
    count: u64,
}

impl Default for MinMax {
    fn default() -> Self {
        Self::new()
    }
}

impl MinMax {
    pub fn new() -> Self {
        Self {
            min: f32::INFINITY,
            max: f32::NEG_INFINITY,
            count: 0,
        }
    }

    /// `(min, max)` of everything observed; `None` before any value.
    pub fn range(&self) -> Option<(f32, f32)> {
        (self.count > 0).then_some((self.min, self.max))
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    fn add(&mut self, v: f32) {
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        self.count += 1;
    }
}

impl Observer for MinMax {
    fn observe(&mut self, xs: &[f32]) -> Result<()> {
        check_finite("min-max observer", xs)?;
        xs.iter().for_each(|&v| self.add(v));
        Ok(())
    }

    fn finish(&self, grid: Grid, flavour: Flavour) -> Result<QParams> {
        let (lo, hi) = self.range().ok_or(QuantError::Empty {
            what: "min-max observer",
        })?;
        Ok(QParams::for_range(lo, hi, grid, flavour))
    }
}

/// Histogram of positive magnitudes over `[0, 2^exp)` with a power-of-two bin count.
#[derive(Debug, Clone, PartialEq)]
pub struct MagnitudeHistogram {
    bins: Vec<u64>,
    log2_bins: i32,
    /// Range exponent; `None` until the first value.
    exp: Option<i32>,
    count: u64,
}

/// `floor(log2(m))` for `m > 0` (every f32 is a normal f64, so the exponent field is it).
fn floor_log2(m: f64) -> i32 {
    ((m.to_bits() >> 52) & 0x7ff) as i32 - 1023
}

impl MagnitudeHistogram {
    pub fn new(num_bins: usize) -> Result<Self> {
        if num_bins < 2 || !num_bins.is_power_of_two() {
            return Err(QuantError::Param {
                what: "histogram",
                field: "num_bins",
                value: num_bins as f64,
                why: "must be a power of two >= 2",
            });
        }
        Ok(Self {
            bins: vec![0; num_bins],
            log2_bins: num_bins.trailing_zeros() as i32,
            exp: None,
            count: 0,
        })
    }

    pub fn bins(&self) -> &[u64] {
        &self.bins
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn exp(&self) -> Option<i32> {
        self.exp
    }

    /// Bin width `2^exp / num_bins` (exact power of two).
    pub fn width(&self) -> Option<f64> {
        self.exp.map(|e| 2f64.powi(e - self.log2_bins))
    }

    /// Add a magnitude `m > 0` (finite).
    fn add(&mut self, m: f64) {
        let e = floor_log2(m) + 1;
        match self.exp {
            None => self.exp = Some(e),
            Some(cur) if e > cur => self.bins = self.merged_to(e),
            Some(_) => {}
        }
        self.exp = Some(self.exp.unwrap_or(e).max(e));
        let w = self.width().unwrap_or(1.0);
        // m < 2^exp, and dividing by a power of two is exact, so the index is in range.
        let idx = ((m / w) as usize).min(self.bins.len() - 1);
        self.bins[idx] += 1;
        self.count += 1;
    }

    /// The bins re-expressed over `[0, 2^e)`, `e >= exp` (pairs merged per doubling).
    pub fn merged_to(&self, e: i32) -> Vec<u64> {
        let n = self.bins.len();
        let Some(cur) = self.exp else {
            return vec![0; n];
        };
        let shift = (e - cur).max(0);
        if shift >= self.log2_bins {
            let mut out = vec![0; n];
            out[0] = self.count;
            return out;
        }
        let mut out = vec![0; n];
        for (j, &b) in self.bins.iter().enumerate() {
            out[j >> shift] += b;
        }
        out
    }
}

/// The value at 1-based rank `r` of a histogram (`1 <= r <= total`), interpolated
/// linearly inside its bin: within one bin width of the exact order statistic.
fn value_at_rank(bins: &[u64], width: f64, r: u64) -> f64 {
    let mut before = 0u64;
    for (j, &b) in bins.iter().enumerate() {
        if b > 0 && before + b >= r {
            let frac = (r - before) as f64 / b as f64;
            return width * (j as f64 + frac);
        }
        before += b;
    }
    width * bins.len() as f64
}

/// Positive and negative magnitudes plus zeros, for percentile and entropy statistics.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedHistogram {
    pos: MagnitudeHistogram,
    neg: MagnitudeHistogram,
    zeros: u64,
    sparsity_aware: bool,
    minmax: MinMax,
}

impl SignedHistogram {
    pub fn new(num_bins: usize, sparsity_aware: bool) -> Result<Self> {
        Ok(Self {
            pos: MagnitudeHistogram::new(num_bins)?,
            neg: MagnitudeHistogram::new(num_bins)?,
            zeros: 0,
            sparsity_aware,
            minmax: MinMax::new(),
        })
    }

    pub fn observe(&mut self, what: &'static str, xs: &[f32]) -> Result<()> {
        check_finite(what, xs)?;
        for &v in xs {
            if v == 0.0 {
                if self.sparsity_aware {
                    continue;
                }
                self.zeros += 1;
            } else if v > 0.0 {
                self.pos.add(v as f64);
            } else {
                self.neg.add(-(v as f64));
            }
            self.minmax.add(v);
        }
        Ok(())
    }

    /// Number of values counted (zeros excluded when sparsity-aware).
    pub fn count(&self) -> u64 {
        self.pos.count + self.neg.count + self.zeros
    }

    /// Range of the counted values.
    pub fn range(&self) -> Option<(f32, f32)> {
        self.minmax.range()
    }

    /// Histogram of `|x|` over `[0, 2^e)` and its bin width; `None` when no non-zero
    /// value was seen (zeros land in bin 0).
    pub fn magnitudes(&self) -> Option<(Vec<u64>, f64)> {
        let e = match (self.pos.exp, self.neg.exp) {
            (Some(a), Some(b)) => a.max(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        let mut bins = self.pos.merged_to(e);
        for (b, n) in bins.iter_mut().zip(self.neg.merged_to(e)) {
            *b += n;
        }
        bins[0] += self.zeros;
        let width = 2f64.powi(e - self.pos.log2_bins);
        Some((bins, width))
    }

    /// Signed value at 1-based rank `r` in ascending order (within one bin width).
    pub fn signed_value_at_rank(&self, r: u64) -> f64 {
        let n_neg = self.neg.count;
        if r <= n_neg {
            // Ascending values run through descending magnitudes.
            let w = self.neg.width().unwrap_or(0.0);
            -value_at_rank(&self.neg.bins, w, n_neg - r + 1)
        } else if r <= n_neg + self.zeros {
            0.0
        } else {
            let w = self.pos.width().unwrap_or(0.0);
            value_at_rank(&self.pos.bins, w, r - n_neg - self.zeros)
        }
    }
}

/// Nearest-rank index `ceil(q * n)` clamped to `1..=n`.
fn rank(q: f64, n: u64) -> u64 {
    ((q * n as f64).ceil() as u64).clamp(1, n)
}

/// Percentile clipping: symmetric flavour uses the `percentile`-th percentile of `|x|`;
/// asymmetric uses the `(100 - p)`-th and `p`-th percentiles of `x` (nearest rank).
/// Accuracy: within one bin width of the exact order statistic, i.e. below
/// `2 * max|x| / num_bins` (default 2^14 bins: 1.2e-4 of the range).
#[derive(Debug, Clone, PartialEq)]
pub struct Percentile {
    hist: SignedHistogram,
    percentile: f64,
}

impl Percentile {
    pub const DEFAULT_BINS: usize = 1 << 14;

    pub fn new(percentile: f64, sparsity_aware: bool, num_bins: usize) -> Result<Self> {
        if !(percentile > 0.0 && percentile <= 100.0) {
            return Err(QuantError::Param {
                what: "percentile observer",
                field: "percentile",
                value: percentile,
                why: "must be in (0, 100]",
            });
        }
        Ok(Self {
            hist: SignedHistogram::new(num_bins, sparsity_aware)?,
            percentile,
        })
    }

    pub fn histogram(&self) -> &SignedHistogram {
        &self.hist
    }

    /// `(lo, hi)` clipping range for a flavour (symmetric: `(-t, t)`).
    pub fn clip_range(&self, flavour: Flavour) -> Result<(f32, f32)> {
        let n = self.hist.count();
        if n == 0 {
            return Err(QuantError::Empty {
                what: "percentile observer",
            });
        }
        let q = self.percentile / 100.0;
        // Interpolation can overshoot the data by less than a bin; never exceed it.
        let (min, max) = self.hist.range().unwrap_or((0.0, 0.0));
        let max_abs = min.abs().max(max.abs());
        Ok(match flavour {
            Flavour::Symmetric => {
                let t = match self.hist.magnitudes() {
                    Some((bins, w)) => value_at_rank(&bins, w, rank(q, n)),
                    None => 0.0,
                } as f32;
                let t = t.min(max_abs);
                (-t, t)
            }
            Flavour::Asymmetric => {
                let hi = self.hist.signed_value_at_rank(rank(q, n));
                let lo = self.hist.signed_value_at_rank(rank(1.0 - q, n));
                ((lo as f32).max(min), (hi as f32).min(max))
            }
        })
    }
}

impl Observer for Percentile {
    fn observe(&mut self, xs: &[f32]) -> Result<()> {
        self.hist.observe("percentile observer", xs)
    }

    fn finish(&self, grid: Grid, flavour: Flavour) -> Result<QParams> {
        let (lo, hi) = self.clip_range(flavour)?;
        Ok(QParams::for_range(lo, hi, grid, flavour))
    }
}

/// TensorRT's entropy calibration: a histogram of `|x|` (2048 bins), and the clipping
/// threshold whose quantized distribution has the smallest KL divergence from the
/// clipped reference (see [`kl_threshold`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Entropy {
    hist: SignedHistogram,
}

impl Entropy {
    pub const DEFAULT_BINS: usize = 2048;

    pub fn new(sparsity_aware: bool, num_bins: usize) -> Result<Self> {
        Ok(Self {
            hist: SignedHistogram::new(num_bins, sparsity_aware)?,
        })
    }

    pub fn histogram(&self) -> &SignedHistogram {
        &self.hist
    }

    /// Quantization levels the KL search merges into: half the grid (128 at 8 bits) for
    /// signed data, the whole grid (256) for non-negative data on an asymmetric grid.
    pub fn levels(&self, grid: Grid, flavour: Flavour) -> usize {
        let steps = (grid.qmax - grid.qmin) as usize;
        let non_negative = self.hist.range().is_some_and(|(lo, _)| lo >= 0.0);
        if flavour == Flavour::Asymmetric && non_negative {
            steps + 1
        } else {
            steps / 2 + 1
        }
    }

    /// The clipping threshold on `|x|` for a grid and flavour.
    pub fn threshold(&self, grid: Grid, flavour: Flavour) -> Result<f32> {
        let (lo, hi) = self.hist.range().ok_or(QuantError::Empty {
            what: "entropy observer",
        })?;
        let max_abs = lo.abs().max(hi.abs());
        let Some((bins, width)) = self.hist.magnitudes() else {
            return Ok(0.0);
        };
        let levels = self.levels(grid, flavour);
        let (i, _) = kl_threshold(&bins, levels)?;
        Ok(((i as f64 * width) as f32).min(max_abs))
    }
}

impl Observer for Entropy {
    fn observe(&mut self, xs: &[f32]) -> Result<()> {
        self.hist.observe("entropy observer", xs)
    }

    fn finish(&self, grid: Grid, flavour: Flavour) -> Result<QParams> {
        let t = self.threshold(grid, flavour)?;
        let (lo, hi) = self.hist.range().unwrap_or((0.0, 0.0));
        Ok(QParams::for_range(lo.max(-t), hi.min(t), grid, flavour))
    }
}

/// KL divergence `sum P ln(P/Q)` of the candidate that keeps the first `i` bins:
/// P = bins[..i] with every count beyond added to bin i-1; Q = bins[..i] merged into
/// `levels` groups of `i / levels` bins (the last takes the remainder), each group's
/// count spread evenly over the group's bins where P is non-zero. Both normalised.
/// Infinite when P has mass where Q has none.
pub fn kl_candidate(bins: &[u64], i: usize, levels: usize) -> f64 {
    let outliers: u64 = bins[i..].iter().sum();
    let mut p: Vec<f64> = bins[..i].iter().map(|&b| b as f64).collect();
    p[i - 1] += outliers as f64;
    let per = i / levels;
    let mut q = vec![0f64; i];
    for g in 0..levels {
        let start = g * per;
        let stop = if g == levels - 1 { i } else { start + per };
        let mass: u64 = bins[start..stop].iter().sum();
        let nonzero = p[start..stop].iter().filter(|&&v| v > 0.0).count();
        if nonzero == 0 {
            continue;
        }
        let share = mass as f64 / nonzero as f64;
        for j in start..stop {
            if p[j] > 0.0 {
                q[j] = share;
            }
        }
    }
    let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if qs == 0.0 {
        return f64::INFINITY;
    }
    let mut kl = 0.0;
    for (&pj, &qj) in p.iter().zip(&q) {
        if pj > 0.0 {
            if qj == 0.0 {
                return f64::INFINITY;
            }
            let (pn, qn) = (pj / ps, qj / qs);
            kl += pn * (pn / qn).ln();
        }
    }
    kl
}

/// TensorRT's threshold search over a magnitude histogram: candidates `i` in
/// `levels..=bins.len()` (threshold `i * width`); returns the first minimiser and every
/// candidate's divergence (index `i - levels`).
pub fn kl_threshold(bins: &[u64], levels: usize) -> Result<(usize, Vec<f64>)> {
    if levels < 2 || levels > bins.len() {
        return Err(QuantError::Param {
            what: "entropy calibration",
            field: "levels",
            value: levels as f64,
            why: "must be in 2..=number of histogram bins",
        });
    }
    if bins.iter().all(|&b| b == 0) {
        return Err(QuantError::Empty {
            what: "entropy calibration",
        });
    }
    let divs: Vec<f64> = (levels..=bins.len())
        .map(|i| kl_candidate(bins, i, levels))
        .collect();
    let mut best = 0;
    for (k, &d) in divs.iter().enumerate() {
        if d < divs[best] {
            best = k;
        }
    }
    Ok((levels + best, divs))
}

/// Per-channel `(min, max)` of a tensor along `axis` (weights: 0 for conv, 1 for
/// transposed conv).
pub fn per_channel_minmax(t: &Tensor, axis: usize) -> Result<Vec<(f32, f32)>> {
    let layout = ChannelLayout::new("per-channel min-max", &t.shape, axis)?;
    crate::quant::error::check_len("per-channel min-max", "data", layout.len(), t.data.len())?;
    check_finite("per-channel min-max", &t.data)?;
    if layout.per_channel() == 0 {
        return Err(QuantError::Empty {
            what: "per-channel min-max",
        });
    }
    Ok((0..layout.channels)
        .map(|c| {
            layout
                .indices(c)
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), i| {
                    (lo.min(t.data[i]), hi.max(t.data[i]))
                })
        })
        .collect())
}

/// Per-channel min-max quantization parameters.
pub fn per_channel_qparams(
    t: &Tensor,
    axis: usize,
    grid: Grid,
    flavour: Flavour,
) -> Result<Vec<QParams>> {
    Ok(per_channel_minmax(t, axis)?
        .into_iter()
        .map(|(lo, hi)| QParams::for_range(lo, hi, grid, flavour))
        .collect())
}
