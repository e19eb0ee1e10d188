//! Quantization fidelity: how closely one detector's boxes reproduce a reference
//! detector's boxes on the same scans (INT8 against FP32), independently of ground truth.
//!
//! Matching follows the nuScenes rule with the reference in the place of the ground
//! truth: reference boxes in order of decreasing score (ties: list order) each take the
//! nearest still unmatched box of the same class whose BEV centre lies within
//! `max_distance`. Errors are measured on matched pairs only; unmatched boxes on either
//! side are counted.

use crate::boxes::Detection;
use serde::Serialize;

/// Counts and error sums over any number of frames (add frames with [`Fidelity::add`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Fidelity {
    pub frames: usize,
    /// Boxes of the reference and of the compared detector.
    pub reference: usize,
    pub compared: usize,
    pub matched: usize,
    /// Sums over matched pairs: BEV centre distance (m), |score difference|.
    pub centre_error_sum: f64,
    pub score_error_sum: f64,
}

/// A frame's matches: (reference index, compared index) pairs.
pub fn match_detections(
    reference: &[Detection],
    compared: &[Detection],
    max_distance: f32,
) -> Vec<(usize, usize)> {
    let mut order: Vec<usize> = (0..reference.len()).collect();
    // Stable sort: equal scores keep list order.
    order.sort_by(|&a, &b| reference[b].score.total_cmp(&reference[a].score));
    let mut taken = vec![false; compared.len()];
    let mut pairs = Vec::new();
    for r in order {
        let rd = &reference[r];
        let mut best: Option<(usize, f32)> = None;
        for (c, cd) in compared.iter().enumerate() {
            if taken[c] || cd.class != rd.class {
                continue;
            }
            let d = bev_distance(rd, cd);
            if d <= max_distance && best.is_none_or(|(_, bd)| d < bd) {
                best = Some((c, d));
            }
        }
        if let Some((c, _)) = best {
            taken[c] = true;
            pairs.push((r, c));
        }
    }
    pairs
}

fn bev_distance(a: &Detection, b: &Detection) -> f32 {
    let dx = a.bbox.center[0] - b.bbox.center[0];
    let dy = a.bbox.center[1] - b.bbox.center[1];
    (dx * dx + dy * dy).sqrt()
}

impl Fidelity {
    /// Adds one frame.
    pub fn add(&mut self, reference: &[Detection], compared: &[Detection], max_distance: f32) {
        let pairs = match_detections(reference, compared, max_distance);
        self.frames += 1;
        self.reference += reference.len();
        self.compared += compared.len();
        self.matched += pairs.len();
        for (r, c) in pairs {
            let (a, b) = (&reference[r], &compared[c]);
            self.centre_error_sum += bev_distance(a, b) as f64;
            self.score_error_sum += (a.score as f64 - b.score as f64).abs();
        }
    }

    /// Matched share of the reference boxes (1 when the reference has none).
    pub fn recall(&self) -> f64 {
        if self.reference == 0 {
            1.0
        } else {
            self.matched as f64 / self.reference as f64
        }
    }

    /// Matched share of the compared boxes (1 when there are none).
    pub fn precision(&self) -> f64 {
        if self.compared == 0 {
            1.0
        } else {
            self.matched as f64 / self.compared as f64
        }
    }

    /// Mean BEV centre distance of matched pairs (m); 0 without pairs.
    pub fn mean_centre_error(&self) -> f64 {
        self.centre_error_sum / self.matched.max(1) as f64
    }

    /// Mean |score difference| of matched pairs; 0 without pairs.
    pub fn mean_score_error(&self) -> f64 {
        self.score_error_sum / self.matched.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;

    fn det(class: &str, x: f32, y: f32, score: f32) -> Detection {
        Detection {
            bbox: Box3d {
                center: [x, y, 0.5],
                size: [4.0, 2.0, 1.5],
                yaw: 0.0,
            },
            class: class.into(),
            score,
            velocity: None,
        }
    }

    /// A case worked by hand: the nearest box of a low-score reference is claimed first
    /// by a high-score one; classes and the reach are respected.
    #[test]
    fn greedy_by_score_then_nearest() {
        let reference = vec![
            det("car", 0.0, 0.0, 0.3),
            det("car", 1.0, 0.0, 0.9),
            det("pedestrian", 5.0, 5.0, 0.5),
        ];
        let compared = vec![
            det("car", 0.6, 0.0, 0.8),        // nearest to both cars
            det("car", -0.5, 0.0, 0.2),       // 0.5 from the first, 1.5 from the second
            det("pedestrian", 9.0, 5.0, 0.5), // too far (4 m)
            det("car", 5.0, 5.1, 0.5),        // near the pedestrian but another class
        ];
        let pairs = match_detections(&reference, &compared, 2.0);
        // The 0.9 car goes first and takes compared 0 (0.4 m), the 0.3 car then takes
        // compared 1 (0.5 m); the pedestrian finds no box of its class in reach.
        assert_eq!(pairs, vec![(1, 0), (0, 1)]);
        let mut f = Fidelity::default();
        f.add(&reference, &compared, 2.0);
        assert_eq!((f.reference, f.compared, f.matched), (3, 4, 2));
        assert!((f.mean_centre_error() - 0.45).abs() < 1e-6);
        assert!((f.mean_score_error() - 0.1).abs() < 1e-6);
        assert!((f.recall() - 2.0 / 3.0).abs() < 1e-12);
        assert!((f.precision() - 0.5).abs() < 1e-12);
        // A tighter reach drops the 0.5 m pair.
        assert_eq!(match_detections(&reference, &compared, 0.45), vec![(1, 0)]);
    }

    #[test]
    fn identical_lists_match_exactly_and_frames_accumulate() {
        let a = vec![det("car", 3.0, 4.0, 0.7), det("car", 3.5, 4.0, 0.7)];
        let mut f = Fidelity::default();
        f.add(&a, &a, 1.0);
        f.add(&[], &a, 1.0);
        assert_eq!(match_detections(&a, &a, 1.0), vec![(0, 0), (1, 1)]);
        assert_eq!((f.frames, f.reference, f.compared, f.matched), (2, 2, 4, 2));
        assert_eq!(f.mean_centre_error(), 0.0);
        assert_eq!(f.mean_score_error(), 0.0);
        assert_eq!(f.recall(), 1.0);
        assert_eq!(f.precision(), 0.5);
        assert_eq!(Fidelity::default().recall(), 1.0);
    }
}
