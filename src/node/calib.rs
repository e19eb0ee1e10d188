//! Online calibration, node side: which live scans to calibrate with, and the state the
//! node reports. Calibration needs scans that differ: a robot standing still sends the
//! same scene ten times a second, and calibrating on ten copies of it fits the
//! quantization ranges to one scene. The selector takes a scan only when it is at least
//! `spacing` after the last one taken and its occupied bird's-eye-view cells are not
//! nearly the same set as the last taken scan's (Jaccard overlap above
//! `max_similarity`).

use crate::cloud::Points;

/// Side of the occupancy cells compared between scans, in metres: coarse enough that
/// sensor noise rarely moves a point to another cell, fine enough that driving a few
/// metres changes a large share of them.
pub const CELL_M: f32 = 1.0;

/// The occupied BEV cells of a scan (sorted, distinct cell keys).
pub fn occupancy(points: &Points) -> Vec<u64> {
    let mut keys: Vec<u64> = points
        .x
        .iter()
        .zip(&points.y)
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .map(|(&x, &y)| {
            let cx = (x / CELL_M).floor() as i32;
            let cy = (y / CELL_M).floor() as i32;
            (u64::from(cx as u32) << 32) | u64::from(cy as u32)
        })
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys
}

/// Jaccard overlap |A ∩ B| / |A ∪ B| of two sorted distinct key sets (1 for two empty sets).
pub fn jaccard(a: &[u64], b: &[u64]) -> f64 {
    let (mut i, mut j, mut both) = (0, 0, 0usize);
    while i < a.len() && j < b.len() {
        match a[i].cmp(&b[j]) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                both += 1;
                i += 1;
                j += 1;
            }
        }
    }
    let union = a.len() + b.len() - both;
    if union == 0 {
        1.0
    } else {
        both as f64 / union as f64
    }
}

/// What happened to an offered scan.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Offer {
    /// Collected; `have` of `want` scans so far.
    Taken { have: usize, want: usize },
    /// Less than the spacing after the last collected scan.
    TooSoon,
    /// Nearly the same scene as the last collected scan.
    NearDuplicate { similarity: f64 },
    /// No points.
    Empty,
    /// Enough scans already.
    Full,
}

/// Collects `want` distinct scans from a stream.
#[derive(Debug, Clone)]
pub struct ScanSelector {
    want: usize,
    spacing_ns: u64,
    max_similarity: f64,
    last: Option<(u64, Vec<u64>)>,
    scans: Vec<Points>,
    skipped_duplicates: usize,
}

impl ScanSelector {
    pub fn new(want: usize, spacing_s: f64, max_similarity: f64) -> Self {
        Self {
            want,
            spacing_ns: (spacing_s.max(0.0) * 1e9) as u64,
            max_similarity,
            last: None,
            scans: Vec::with_capacity(want),
            skipped_duplicates: 0,
        }
    }

    /// Considers a scan stamped `stamp_ns`. A stamp earlier than the last collected one
    /// (a replayed recording restarting) does not block collection; the overlap test
    /// still applies.
    pub fn offer(&mut self, stamp_ns: u64, points: &Points) -> Offer {
        if self.is_full() {
            return Offer::Full;
        }
        if points.is_empty() {
            return Offer::Empty;
        }
        if let Some((t, _)) = &self.last
            && stamp_ns >= *t
            && stamp_ns - t < self.spacing_ns
        {
            return Offer::TooSoon;
        }
        let cells = occupancy(points);
        if let Some((_, prev)) = &self.last {
            let similarity = jaccard(prev, &cells);
            if similarity > self.max_similarity {
                self.skipped_duplicates += 1;
                return Offer::NearDuplicate { similarity };
            }
        }
        self.last = Some((stamp_ns, cells));
        self.scans.push(points.clone());
        Offer::Taken {
            have: self.scans.len(),
            want: self.want,
        }
    }

    pub fn is_full(&self) -> bool {
        self.scans.len() >= self.want
    }

    pub fn collected(&self) -> usize {
        self.scans.len()
    }

    pub fn want(&self) -> usize {
        self.want
    }

    pub fn skipped_duplicates(&self) -> usize {
        self.skipped_duplicates
    }

    /// The collected scans, in arrival order.
    pub fn into_scans(self) -> Vec<Points> {
        self.scans
    }
}

/// Calibration progress as the node reports it.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationState {
    Off,
    Collecting {
        have: usize,
        want: usize,
    },
    /// Optimising; `stage` names the step (e.g. "FP statistics", "unit 3/20 ..."),
    /// `progress` is the fraction of that step done.
    Calibrating {
        stage: String,
        progress: f32,
    },
    /// An INT8 model is in use (loaded from `source`: the cache or a path).
    Done {
        source: String,
    },
    /// Calibration cannot run in this build or configuration; the node serves FP32.
    Unavailable {
        reason: String,
    },
    Failed {
        error: String,
    },
}

impl CalibrationState {
    /// One line for diagnostics and logs.
    pub fn describe(&self) -> String {
        match self {
            Self::Off => "off".into(),
            Self::Collecting { have, want } => format!("collecting scans {have}/{want}"),
            Self::Calibrating { stage, progress } => {
                let pct = progress.clamp(0.0, 1.0) * 100.0;
                if stage.is_empty() {
                    format!("calibrating {pct:.0}%")
                } else {
                    format!("calibrating: {stage} {pct:.0}%")
                }
            }
            Self::Done { source } => format!("int8 ready ({source})"),
            Self::Unavailable { reason } => format!("unavailable: {reason}"),
            Self::Failed { error } => format!("failed: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{LidarModel, SimConfig, Simulator};
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn jitter(p: &Points, sigma: f32, seed: u64) -> Points {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut q = p.clone();
        for v in q.x.iter_mut().chain(q.y.iter_mut()) {
            *v += rng.random_range(-sigma..sigma);
        }
        q
    }

    fn shifted(p: &Points, dx: f32) -> Points {
        let mut q = p.clone();
        q.x.iter_mut().for_each(|x| *x += dx);
        q
    }

    #[test]
    fn jaccard_matches_set_arithmetic() {
        use std::collections::BTreeSet;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..50 {
            let a: BTreeSet<u64> = (0..rng.random_range(0..60))
                .map(|_| rng.random_range(0..80))
                .collect();
            let b: BTreeSet<u64> = (0..rng.random_range(0..60))
                .map(|_| rng.random_range(0..80))
                .collect();
            let inter = a.intersection(&b).count() as f64;
            let union = a.union(&b).count() as f64;
            let want = if union == 0.0 { 1.0 } else { inter / union };
            let av: Vec<u64> = a.into_iter().collect();
            let bv: Vec<u64> = b.into_iter().collect();
            assert!((jaccard(&av, &bv) - want).abs() < 1e-12);
        }
    }

    #[test]
    fn selects_spaced_distinct_scans() {
        let sim = Simulator::new(SimConfig::new(LidarModel::Hdl32));
        let scene = sim.sample(11).0;
        let other = sim.sample(12).0;
        let mut sel = ScanSelector::new(3, 0.5, 0.9);
        let s = 1_000_000_000u64;
        assert_eq!(sel.offer(s, &scene), Offer::Taken { have: 1, want: 3 });
        // 0.1 s later: too soon whatever it holds.
        assert_eq!(sel.offer(s + s / 10, &other), Offer::TooSoon);
        // Standing still: the same scene with sensor noise is a near-duplicate.
        match sel.offer(2 * s, &jitter(&scene, 0.03, 1)) {
            Offer::NearDuplicate { similarity } => assert!(similarity > 0.9, "{similarity}"),
            o => panic!("expected a near-duplicate, got {o:?}"),
        }
        assert_eq!(sel.skipped_duplicates(), 1);
        // Having driven 8 m, the same street is different enough.
        assert_eq!(
            sel.offer(3 * s, &shifted(&scene, 8.0)),
            Offer::Taken { have: 2, want: 3 }
        );
        assert_eq!(sel.offer(3 * s + s, &Points::default()), Offer::Empty);
        // A replay restarting at an earlier stamp is not blocked by the spacing.
        assert_eq!(sel.offer(s / 2, &other), Offer::Taken { have: 3, want: 3 });
        assert!(sel.is_full());
        assert_eq!(sel.offer(10 * s, &scene), Offer::Full);
        let scans = sel.into_scans();
        assert_eq!(scans.len(), 3);
        assert_eq!(scans[0], scene);
        assert_eq!(scans[2], other);
    }

    #[test]
    fn states_describe_themselves() {
        assert_eq!(
            CalibrationState::Collecting { have: 3, want: 32 }.describe(),
            "collecting scans 3/32"
        );
        assert_eq!(
            CalibrationState::Calibrating {
                stage: String::new(),
                progress: 0.26
            }
            .describe(),
            "calibrating 26%"
        );
        assert_eq!(
            CalibrationState::Calibrating {
                stage: "FP statistics".into(),
                progress: 1.5
            }
            .describe(),
            "calibrating: FP statistics 100%"
        );
        assert!(
            CalibrationState::Unavailable { reason: "x".into() }
                .describe()
                .contains("unavailable")
        );
    }
}
