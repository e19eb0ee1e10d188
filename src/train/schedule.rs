//! One-cycle learning rate (OpenPCDet's `adam_onecycle`): cosine warm-up from
//! `max_lr / div_factor` to `max_lr` over the first `pct_start` of the steps, then cosine
//! annealing down to `max_lr / div_factor / final_div`.

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OneCycle {
    pub total_steps: usize,
    pub max_lr: f32,
    pub pct_start: f32,
    pub div_factor: f32,
    pub final_div: f32,
}

/// Cosine interpolation from `start` (pct 0) to `end` (pct 1).
fn cos_anneal(start: f64, end: f64, pct: f64) -> f64 {
    end + (start - end) / 2.0 * (1.0 + (std::f64::consts::PI * pct).cos())
}

impl OneCycle {
    /// The reference settings: 40 % warm-up, start at max/10, end at max/1e5.
    pub fn new(total_steps: usize, max_lr: f32) -> Self {
        Self {
            total_steps,
            max_lr,
            pct_start: 0.4,
            div_factor: 10.0,
            final_div: 1e4,
        }
    }

    /// Learning rate of step `step` (0-based); steps past the end keep the final value.
    pub fn lr(&self, step: usize) -> f32 {
        let max = self.max_lr as f64;
        let low = max / self.div_factor as f64;
        let end = low / self.final_div as f64;
        let total = self.total_steps.max(1) as f64;
        let up = (total * self.pct_start as f64).max(1.0);
        let s = (step as f64).min(total);
        let lr = if s < up {
            cos_anneal(low, max, s / up)
        } else {
            let down = (total - up).max(1.0);
            cos_anneal(max, end, ((s - up) / down).min(1.0))
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_cycle_values() {
        let s = OneCycle::new(100, 2e-3);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-9 + 1e-5 * b.abs();
        assert!(close(s.lr(0), 2e-4), "{}", s.lr(0));
        // Peak at 40 % of the steps.
        assert!(close(s.lr(40), 2e-3), "{}", s.lr(40));
        // Half-way up the cosine: the mean of start and peak.
        assert!(close(s.lr(20), 1.1e-3), "{}", s.lr(20));
        // Half-way down: the mean of peak and end (2e-8).
        assert!(close(s.lr(70), (2e-3 + 2e-8) / 2.0), "{}", s.lr(70));
        assert!(close(s.lr(100), 2e-8), "{}", s.lr(100));
        assert!(close(s.lr(500), 2e-8));
        // Monotone up, then monotone down.
        for k in 0..40 {
            assert!(s.lr(k + 1) > s.lr(k));
        }
        for k in 40..100 {
            assert!(s.lr(k + 1) < s.lr(k));
        }
    }
}
