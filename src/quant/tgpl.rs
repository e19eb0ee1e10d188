//! TGPL, LiDAR-PTQ's task-guided global positive loss: the quantized model's head outputs
//! are pulled towards the FP model's, but only where the FP model detects something.
//!
//! Positives P of a frame come from the FP model's deploy-time decode (sigmoid heatmap,
//! 3x3 peak, top-K, score threshold, box range filter, per-task NMS), computed once and
//! cached. The loss on the quantized outputs is, per task,
//! - CenterNet focal loss (alpha 2, beta 4) of the heatmap logits against Gaussians
//!   rendered at P with the training radius rule, normalised by max(|P|, 1);
//! - L1 between the quantized and the FP raw regression outputs at the cells of P,
//!   weighted by the model's code weights, normalised by max(|P|, 1);
//!
//! `L_TGPL = sum_tasks L_cls + loc_weight * L_reg`.

use crate::boxes::Box3d;
use crate::engine::HeadOutputs;
use crate::eval::bev_iou;
use crate::model::ModelConfig;
use crate::model::config::NmsKind;
use crate::model::targets::{draw_gaussian, gaussian_radius};
use crate::ops::{self, Tensor};
use serde::{Deserialize, Serialize};

/// How positives are taken from the FP model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TgplOptions {
    /// Peaks kept per task before NMS (spec K = 500).
    pub top_k: usize,
    /// Score threshold tau on the sigmoid heatmap (spec 0.1).
    pub score_threshold: f32,
}

impl Default for TgplOptions {
    fn default() -> Self {
        Self {
            top_k: 500,
            score_threshold: 0.1,
        }
    }
}

/// Positives of one task in one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskPositives {
    /// Flat map cell `y * W + x` of each positive.
    pub cells: Vec<usize>,
    /// Class index within the task of each positive.
    pub classes: Vec<usize>,
    /// Gaussian targets `[classes, H, W]` rendered at the positives.
    pub heatmap: Vec<f32>,
    /// FP raw regression outputs at the positives, `[|P|, D]`.
    pub regression: Vec<f32>,
}

impl TaskPositives {
    pub fn len(&self) -> usize {
        self.cells.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cells.is_empty()
    }
}

/// Positives of every task of one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Positives {
    pub tasks: Vec<TaskPositives>,
    pub h: usize,
    pub w: usize,
}

impl Positives {
    pub fn count(&self) -> usize {
        self.tasks.iter().map(TaskPositives::len).sum()
    }
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Peaks of one task as `model::decode` finds them: (score, class, cell), best first.
fn peaks(
    heat: &[f32],
    classes: usize,
    h: usize,
    w: usize,
    k: usize,
    thr: f32,
) -> Vec<(f32, usize, usize)> {
    let mut out = Vec::new();
    for c in 0..classes {
        let plane = &heat[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            for x in 0..w {
                let v = plane[y * w + x];
                let mut is_peak = true;
                'n: for ny in y.saturating_sub(1)..(y + 2).min(h) {
                    for nx in x.saturating_sub(1)..(x + 2).min(w) {
                        if plane[ny * w + nx] > v {
                            is_peak = false;
                            break 'n;
                        }
                    }
                }
                if is_peak {
                    let s = sigmoid(v);
                    if s > thr {
                        out.push((s, c, y * w + x));
                    }
                }
            }
        }
    }
    out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    out.truncate(k);
    out
}

/// The FP model's positives of one frame.
pub fn positives(cfg: &ModelConfig, heads: &HeadOutputs, opts: &TgplOptions) -> Positives {
    let (h, w) = (heads.h, heads.w);
    let plane = h * w;
    let stride = cfg.head_stride();
    let cell = &cfg.voxelization.cell_size;
    let r = &cfg.input.point_range;
    let lim = &cfg.decode.post_center_range;
    let nms = &cfg.decode.nms;
    let d = cfg.regression_channels();
    let tasks = cfg
        .head
        .tasks
        .iter()
        .zip(&heads.tasks)
        .map(|(classes, out)| {
            let reg = |ch: usize, i: usize| out.regression[ch * plane + i];
            // Candidate boxes in score order, as the decode builds them.
            let mut cands: Vec<(usize, usize, Box3d)> = Vec::new();
            for (_, c, i) in peaks(
                &out.heatmap,
                classes.len(),
                h,
                w,
                opts.top_k,
                opts.score_threshold,
            ) {
                let (ix, iy) = ((i % w) as f32, (i / w) as f32);
                let x = (ix + reg(0, i)) * stride * cell[0] + r[0];
                let y = (iy + reg(1, i)) * stride * cell[1] + r[1];
                let z = reg(2, i);
                let size = [reg(3, i).exp(), reg(4, i).exp(), reg(5, i).exp()];
                let yaw = reg(7, i).atan2(reg(6, i));
                let inside = x >= lim[0]
                    && y >= lim[1]
                    && z >= lim[2]
                    && x <= lim[3]
                    && y <= lim[4]
                    && z <= lim[5];
                let finite = x.is_finite()
                    && y.is_finite()
                    && z.is_finite()
                    && size.iter().all(|s| s.is_finite())
                    && yaw.is_finite();
                if inside && finite {
                    cands.push((
                        c,
                        i,
                        Box3d {
                            center: [x, y, z],
                            size,
                            yaw,
                        },
                    ));
                }
            }
            cands.truncate(nms.pre_max);
            // Greedy NMS (the decode's rule), keeping the cells.
            let mut kept: Vec<(usize, usize, Box3d)> = Vec::new();
            for cand in cands {
                if kept.len() == nms.post_max {
                    break;
                }
                let suppressed = kept.iter().any(|k| match nms.kind {
                    NmsKind::RotatedIou => bev_iou(&k.2, &cand.2) > nms.threshold as f64,
                    NmsKind::Circle => {
                        let dx = k.2.center[0] - cand.2.center[0];
                        let dy = k.2.center[1] - cand.2.center[1];
                        dx.hypot(dy) < nms.threshold
                    }
                });
                if !suppressed {
                    kept.push(cand);
                }
            }
            let mut heatmap = vec![0.0; classes.len() * plane];
            let mut regression = Vec::with_capacity(kept.len() * d);
            for (c, i, b) in &kept {
                let dx = b.size[0] / cell[0] / stride;
                let dy = b.size[1] / cell[1] / stride;
                let radius = (gaussian_radius(dx, dy, cfg.target.gaussian_overlap) as usize)
                    .max(cfg.target.min_radius);
                draw_gaussian(
                    &mut heatmap[c * plane..(c + 1) * plane],
                    h,
                    w,
                    i % w,
                    i / w,
                    radius,
                );
                regression.extend((0..d).map(|ch| reg(ch, *i)));
            }
            TaskPositives {
                cells: kept.iter().map(|k| k.1).collect(),
                classes: kept.iter().map(|k| k.0).collect(),
                heatmap,
                regression,
            }
        })
        .collect();
    Positives { tasks, h, w }
}

/// Focal loss of one task's heatmap logits `[1, classes, H, W]` against the Gaussians at
/// the positives, and its gradient.
pub fn heatmap_loss(pos: &TaskPositives, logits: &Tensor) -> ops::Result<(f32, Tensor)> {
    let gt = Tensor::new(logits.shape.clone(), pos.heatmap.clone())?;
    let f = ops::focal_loss::forward_backward(logits, &gt)?;
    Ok((f.loss, f.grad_logits))
}

/// L1 of regression channels `first..first + c` (one sub-head's output `[1, c, H, W]`)
/// against the FP outputs at the positives, weighted by `code_weights` (all channels) and
/// normalised by max(|P|, 1); and its gradient.
pub fn regression_loss(
    pos: &TaskPositives,
    first: usize,
    pred: &Tensor,
    code_weights: &[f32],
) -> ops::Result<(f32, Tensor)> {
    let [_, c, h, w] =
        <[usize; 4]>::try_from(pred.shape.as_slice()).map_err(|_| ops::OpsError::Shape {
            op: "tgpl regression",
            arg: "pred",
            got: pred.shape.clone(),
            expected: "[1, C, H, W]".into(),
        })?;
    let d = code_weights.len();
    if first + c > d || pos.regression.len() != pos.len() * d {
        return Err(ops::OpsError::Invalid {
            op: "tgpl regression",
            arg: "pred",
            detail: format!("channels {first}..{} of {d}", first + c),
        });
    }
    let plane = h * w;
    let norm = pos.len().max(1) as f64;
    let mut total = 0f64;
    let mut grad = Tensor::zeros(&pred.shape);
    for (k, &cell) in pos.cells.iter().enumerate() {
        for ch in 0..c {
            let wd = code_weights[first + ch] as f64;
            let idx = ch * plane + cell;
            let diff = pred.data[idx] as f64 - pos.regression[k * d + first + ch] as f64;
            total += wd * diff.abs();
            let sign = if diff > 0.0 {
                1.0
            } else if diff < 0.0 {
                -1.0
            } else {
                0.0
            };
            grad.data[idx] += (sign * wd / norm) as f32;
        }
    }
    Ok(((total / norm) as f32, grad))
}

/// `L_TGPL` of a frame's head outputs against its positives (every task, every head).
pub fn tgpl_loss(cfg: &ModelConfig, pos: &Positives, heads: &HeadOutputs) -> ops::Result<f32> {
    let (h, w) = (heads.h, heads.w);
    let mut total = 0f32;
    for ((classes, t), p) in cfg.head.tasks.iter().zip(&heads.tasks).zip(&pos.tasks) {
        let hm = Tensor::new(vec![1, classes.len(), h, w], t.heatmap.clone())?;
        total += heatmap_loss(p, &hm)?.0;
        let d = cfg.regression_channels();
        let reg = Tensor::new(vec![1, d, h, w], t.regression.clone())?;
        total += cfg.loss.loc_weight * regression_loss(p, 0, &reg, &cfg.loss.code_weights)?.0;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::TaskMaps;

    const TINY: &str = include_str!("../../tests/fixtures/tiny_model.yaml");

    /// Head outputs with clear peaks: the positives are exactly the peaks above the
    /// threshold, and the FP outputs themselves have zero regression loss.
    #[test]
    fn positives_are_the_decoded_peaks() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let (h, w) = (8, 8);
        let d = cfg.regression_channels();
        let mut tasks = Vec::new();
        for classes in &cfg.head.tasks {
            let mut heat = vec![-8.0f32; classes.len() * h * w];
            heat[3 * w + 4] = 3.0; // class 0 at (4, 3)
            heat[3 * w + 5] = 1.0; // its neighbour: not a peak
            if classes.len() > 1 {
                heat[h * w + 6 * w + 1] = 0.5; // class 1 at (1, 6)
            }
            let mut reg = vec![0.0f32; d * h * w];
            for ch in 0..d {
                for i in 0..h * w {
                    reg[ch * h * w + i] = 0.1 * ch as f32 + 0.001 * i as f32;
                }
            }
            tasks.push(TaskMaps {
                heatmap: heat,
                regression: reg,
            });
        }
        let heads = HeadOutputs { tasks, h, w };
        let pos = positives(&cfg, &heads, &TgplOptions::default());
        assert_eq!(pos.tasks[0].cells, vec![3 * w + 4]);
        assert_eq!(pos.tasks[1].cells, vec![3 * w + 4, 6 * w + 1]);
        assert_eq!(pos.tasks[1].classes, vec![0, 1]);
        assert_eq!(pos.tasks[0].heatmap[3 * w + 4], 1.0);
        assert_eq!(
            pos.tasks[0].heatmap.iter().filter(|&&v| v == 1.0).count(),
            1
        );
        assert_eq!(pos.tasks[0].regression[2], 0.2 + 0.001 * (3 * w + 4) as f32);
        // The regression term vanishes at the FP outputs and grows with a deviation.
        let reg = Tensor::new(vec![1, d, h, w], heads.tasks[1].regression.clone()).unwrap();
        let (l, _) = regression_loss(&pos.tasks[1], 0, &reg, &cfg.loss.code_weights).unwrap();
        assert_eq!(l, 0.0);
        let mut moved = reg.clone();
        moved.data[3 * w + 4] += 0.5; // channel 0 at the first positive
        let (l, g) = regression_loss(&pos.tasks[1], 0, &moved, &cfg.loss.code_weights).unwrap();
        assert!((l - 0.25).abs() < 1e-6, "{l}"); // 0.5 / 2 positives
        assert!((g.data[3 * w + 4] - 0.5).abs() < 1e-6);
        // A higher threshold drops the weak peak.
        let strict = TgplOptions {
            score_threshold: 0.7,
            ..TgplOptions::default()
        };
        assert_eq!(
            positives(&cfg, &heads, &strict).tasks[1].cells,
            vec![3 * w + 4]
        );
    }

    /// The regression gradient matches finite differences of the loss.
    #[test]
    fn regression_gradient_matches_finite_differences() {
        let pos = TaskPositives {
            cells: vec![1, 5],
            classes: vec![0, 0],
            heatmap: vec![0.0; 9],
            regression: vec![0.3, -0.2, 1.0, 0.5, 0.1, -0.7],
        };
        let cw = [1.0, 0.5, 2.0];
        let pred = Tensor::from_fn(&[1, 2, 3, 3], |i| (i as f32 * 0.37).sin());
        let (_, g) = regression_loss(&pos, 1, &pred, &cw).unwrap();
        for i in 0..pred.len() {
            let eps = 1e-3;
            let mut p = pred.clone();
            p.data[i] += eps;
            let lp = regression_loss(&pos, 1, &p, &cw).unwrap().0;
            p.data[i] -= 2.0 * eps;
            let lm = regression_loss(&pos, 1, &p, &cw).unwrap().0;
            let fd = (lp - lm) / (2.0 * eps);
            assert!((fd - g.data[i]).abs() < 1e-3, "{i}: {fd} vs {}", g.data[i]);
        }
    }
}
