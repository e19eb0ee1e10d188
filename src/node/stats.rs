//! Running statistics the node reports: latency percentiles over a window of recent
//! frames, event rates, and frame counters. Time is passed in (seconds on any monotonic
//! clock), so the arithmetic is testable without sleeping.

use std::collections::VecDeque;

/// The last `capacity` samples of a quantity (e.g. processing time in ms).
#[derive(Debug, Clone)]
pub struct Window {
    samples: VecDeque<f64>,
    capacity: usize,
    total: u64,
}

/// Summary of a window.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Summary {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// Nearest-rank percentile (`q` in [0, 1]) of sorted values: the smallest value with at
/// least a fraction `q` of the values at or below it.
pub fn percentile_sorted(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

impl Window {
    pub fn new(capacity: usize) -> Self {
        Self {
            samples: VecDeque::with_capacity(capacity.max(1)),
            capacity: capacity.max(1),
            total: 0,
        }
    }

    /// Adds a sample; non-finite samples are ignored (they would poison the summary).
    pub fn push(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        if self.samples.len() == self.capacity {
            self.samples.pop_front();
        }
        self.samples.push_back(v);
        self.total += 1;
    }

    /// Samples ever pushed.
    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn last(&self) -> Option<f64> {
        self.samples.back().copied()
    }

    pub fn summary(&self) -> Summary {
        if self.samples.is_empty() {
            return Summary::default();
        }
        let mut v: Vec<f64> = self.samples.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        Summary {
            count: v.len(),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            p50: percentile_sorted(&v, 0.5),
            p90: percentile_sorted(&v, 0.9),
            p99: percentile_sorted(&v, 0.99),
            max: v[v.len() - 1],
        }
    }
}

/// Events per second over the last `span` seconds.
#[derive(Debug, Clone)]
pub struct RateMeter {
    times: VecDeque<f64>,
    span: f64,
}

impl RateMeter {
    pub fn new(span_s: f64) -> Self {
        Self {
            times: VecDeque::new(),
            span: span_s,
        }
    }

    pub fn record(&mut self, t: f64) {
        self.times.push_back(t);
        self.expire(t);
    }

    fn expire(&mut self, now: f64) {
        while self.times.front().is_some_and(|&f| f <= now - self.span) {
            self.times.pop_front();
        }
    }

    /// Rate at time `now`: events within (now - span, now] divided by the span.
    pub fn rate(&mut self, now: f64) -> f64 {
        self.expire(now);
        self.times.len() as f64 / self.span
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn percentiles_match_a_naive_count() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut w = Window::new(500);
        let mut all = Vec::new();
        for _ in 0..800 {
            let v: f64 = rng.random_range(0.0..100.0);
            w.push(v);
            all.push(v);
        }
        w.push(f64::NAN);
        let kept = &all[300..];
        let s = w.summary();
        assert_eq!(s.count, 500);
        assert_eq!(w.total(), 800);
        for (q, got) in [(0.5, s.p50), (0.9, s.p90), (0.99, s.p99), (1.0, s.max)] {
            // Definition check: at least q of the samples are <= got, and fewer than q
            // are < got.
            let le = kept.iter().filter(|&&v| v <= got).count() as f64 / 500.0;
            let lt = kept.iter().filter(|&&v| v < got).count() as f64 / 500.0;
            assert!(le >= q && lt < q, "q={q} got={got} le={le} lt={lt}");
            assert!(kept.contains(&got));
        }
        let mean = kept.iter().sum::<f64>() / 500.0;
        assert!((s.mean - mean).abs() < 1e-9);
        assert_eq!(percentile_sorted(&[1.0, 2.0, 3.0, 4.0], 0.5), 2.0);
        assert_eq!(percentile_sorted(&[7.0], 0.01), 7.0);
        assert!(percentile_sorted(&[], 0.5).is_nan());
        assert_eq!(Window::new(4).summary(), Summary::default());
    }

    #[test]
    fn rates_count_the_recent_span() {
        let mut r = RateMeter::new(2.0);
        for i in 0..50 {
            r.record(i as f64 * 0.1); // 10 Hz for 5 s
        }
        assert!((r.rate(4.9) - 10.0).abs() < 1e-9);
        assert!((r.rate(5.9) - 5.0).abs() < 1e-9);
        assert_eq!(r.rate(100.0), 0.0);
    }
}
