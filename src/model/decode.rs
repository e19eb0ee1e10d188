//! From head outputs to boxes: sigmoid heatmap, 3x3 peak extraction, top-K, box decoding,
//! score and range filtering, and per-task NMS.

use super::config::{ModelConfig, NmsKind};
use crate::boxes::{Box3d, Detection};
use crate::eval::bev_iou;
use rayon::prelude::*;

/// Raw head outputs of one task for one frame, each `[channels, H, W]` row-major.
pub struct TaskOutputs<'a> {
    /// Heatmap logits, one channel per class of the task.
    pub heatmap: &'a [f32],
    /// Regression maps concatenated in sub-head order (center 2, center_z 1, dim 3, rot 2,
    /// [vel 2]), i.e. `[regression channels, H, W]`.
    pub regression: &'a [f32],
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Most cells score far below the threshold: they are skipped on the logit, before the
/// neighbourhood test and the exp. The cut is the logit of a score 1e-6 under the
/// threshold (far more than f32 sigmoid's rounding), so every cell that could pass
/// reaches the exact test (`sigmoid(v) > threshold`). Cells with `v < cut` are skipped; the
/// GPU engine's candidate search uses the same cut.
pub fn peak_logit_cut(thr: f32) -> f32 {
    let lo = thr as f64 - 1e-6;
    let cut = (lo / (1.0 - lo)).ln();
    if cut.is_finite() {
        (cut - 1e-6 * cut.abs().max(1.0)) as f32
    } else {
        f32::NEG_INFINITY
    }
}

/// A peak: (score, class index within the task, cell index, key of its regression values).
type Peak = (f32, usize, usize, usize);

/// The top `k` peaks in descending score, ties by class then cell, so the order is
/// deterministic. A total order, so selecting the top k first and sorting only them gives
/// the same list as a full sort.
fn rank(mut out: Vec<Peak>, k: usize) -> Vec<Peak> {
    let order = |a: &Peak, b: &Peak| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2));
    if k == 0 {
        return Vec::new();
    }
    if out.len() > k {
        out.select_nth_unstable_by(k - 1, order);
        out.truncate(k);
    }
    out.sort_by(order);
    out
}

/// Candidate peaks of one task (the key is the cell).
fn peaks(
    heat: &[f32],
    classes: usize,
    h: usize,
    w: usize,
    k: usize,
    thr: f32,
    local_max: bool,
) -> Vec<Peak> {
    let logit_cut = peak_logit_cut(thr);
    let mut out = Vec::new();
    // The 3x3 neighbourhood maximum, separably: a row pass, then a column pass. A cell is
    // a peak when no neighbour exceeds it, i.e. when this maximum does not (f32::max skips
    // NaN, as the comparisons `neighbour > v` never suppress on a NaN).
    let (mut rowmax, mut nbmax) = (vec![0f32; h * w], vec![0f32; h * w]);
    for c in 0..classes {
        let plane = &heat[c * h * w..(c + 1) * h * w];
        if local_max {
            for y in 0..h {
                let r = &plane[y * w..(y + 1) * w];
                let o = &mut rowmax[y * w..(y + 1) * w];
                for x in 0..w {
                    let mut m = r[x];
                    if x > 0 {
                        m = m.max(r[x - 1]);
                    }
                    if x + 1 < w {
                        m = m.max(r[x + 1]);
                    }
                    o[x] = m;
                }
            }
            for y in 0..h {
                let (lo, hi) = (y.saturating_sub(1), (y + 2).min(h));
                let o = &mut nbmax[y * w..(y + 1) * w];
                o.copy_from_slice(&rowmax[lo * w..(lo + 1) * w]);
                for ny in lo + 1..hi {
                    for (m, &v) in o.iter_mut().zip(&rowmax[ny * w..(ny + 1) * w]) {
                        *m = m.max(v);
                    }
                }
            }
        }
        for (i, &v) in plane.iter().enumerate() {
            // Ties keep every equal cell, as max-pool equality does in the reference.
            // Without the filter every cell is a candidate.
            if v < logit_cut || (local_max && nbmax[i] > v) {
                continue;
            }
            let s = sigmoid(v);
            if s > thr {
                out.push((s, c, i, i));
            }
        }
    }
    rank(out, k)
}

/// Greedy non-maximum suppression over detections sorted by descending score.
pub fn nms(dets: Vec<Detection>, kind: NmsKind, threshold: f32, post_max: usize) -> Vec<Detection> {
    let mut kept: Vec<Detection> = Vec::new();
    for d in dets {
        if kept.len() == post_max {
            break;
        }
        let suppressed = kept.iter().any(|k| match kind {
            NmsKind::RotatedIou => bev_iou(&k.bbox, &d.bbox) > threshold as f64,
            NmsKind::Circle => {
                let dx = k.bbox.center[0] - d.bbox.center[0];
                let dy = k.bbox.center[1] - d.bbox.center[1];
                dx.hypot(dy) < threshold
            }
        });
        if !suppressed {
            kept.push(d);
        }
    }
    kept
}

/// Head outputs whose sizes do not match the model description.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("decode: task {task} {what} has {got} values, the model description implies {expected}")]
pub struct DecodeError {
    pub task: usize,
    pub what: &'static str,
    pub got: usize,
    pub expected: usize,
}

/// Decodes the outputs of every task (in config order) into detections.
pub fn decode(cfg: &ModelConfig, tasks: &[TaskOutputs<'_>]) -> Result<Vec<Detection>, DecodeError> {
    let (h, w) = head_size(cfg);
    let plane = h * w;
    let dc = &cfg.decode;
    check_tasks(cfg, tasks.len())?;
    let per_task = |(t, (classes, out)): (usize, (&Vec<String>, &TaskOutputs<'_>))| {
        let check = |what, got: usize, expected: usize| {
            if got == expected {
                Ok(())
            } else {
                Err(DecodeError {
                    task: t,
                    what,
                    got,
                    expected,
                })
            }
        };
        check("heatmap", out.heatmap.len(), classes.len() * plane)?;
        check(
            "regression",
            out.regression.len(),
            cfg.regression_channels() * plane,
        )?;
        let found = peaks(
            out.heatmap,
            classes.len(),
            h,
            w,
            dc.top_k,
            dc.score_threshold,
            dc.local_max,
        );
        Ok(task_boxes(cfg, classes, found, |ch, i| {
            out.regression[ch * plane + i]
        }))
    };
    run_tasks(cfg, tasks, per_task)
}

/// One task's peak candidates as the GPU engine finds them: the cells whose heatmap logit
/// passes [`peak_logit_cut`] and (with `decode.local_max`) is not exceeded by a 3x3
/// neighbour, in any order, with their regression values.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskCandidates {
    pub logits: Vec<f32>,
    /// Class index within the task.
    pub classes: Vec<u32>,
    /// Cell index `y * W + x` in the head map.
    pub cells: Vec<u32>,
    /// `[n, regression channels]`, in sub-head order.
    pub regression: Vec<f32>,
}

/// Decodes candidates (see [`TaskCandidates`]) into the detections [`decode`] gives for
/// the maps they were found in: the same scores, ranking, boxes and NMS.
pub fn decode_candidates(
    cfg: &ModelConfig,
    tasks: &[TaskCandidates],
) -> Result<Vec<Detection>, DecodeError> {
    let (h, w) = head_size(cfg);
    let dc = &cfg.decode;
    let nreg = cfg.regression_channels();
    check_tasks(cfg, tasks.len())?;
    let per_task = |(t, (classes, c)): (usize, (&Vec<String>, &TaskCandidates))| {
        let n = c.logits.len();
        let bad = |what, got, expected| DecodeError {
            task: t,
            what,
            got,
            expected,
        };
        if c.classes.len() != n || c.cells.len() != n {
            return Err(bad("candidate list", c.classes.len().min(c.cells.len()), n));
        }
        if c.regression.len() != n * nreg {
            return Err(bad("candidate regression", c.regression.len(), n * nreg));
        }
        let mut found = Vec::with_capacity(n);
        for k in 0..n {
            let (cls, cell) = (c.classes[k] as usize, c.cells[k] as usize);
            if cls >= classes.len() {
                return Err(bad("candidate class", cls, classes.len()));
            }
            if cell >= h * w {
                return Err(bad("candidate cell", cell, h * w));
            }
            let s = sigmoid(c.logits[k]);
            if s > dc.score_threshold {
                found.push((s, cls, cell, k));
            }
        }
        let found = rank(found, dc.top_k);
        Ok(task_boxes(cfg, classes, found, |ch, k| {
            c.regression[k * nreg + ch]
        }))
    };
    run_tasks(cfg, tasks, per_task)
}

/// The head maps' (H, W).
fn head_size(cfg: &ModelConfig) -> (usize, usize) {
    let [nx, ny, _] = cfg.grid_size();
    let stride = cfg.head_stride();
    ((ny as f32 / stride) as usize, (nx as f32 / stride) as usize)
}

fn check_tasks(cfg: &ModelConfig, n: usize) -> Result<(), DecodeError> {
    if n != cfg.head.tasks.len() {
        return Err(DecodeError {
            task: n,
            what: "list of tasks",
            got: n,
            expected: cfg.head.tasks.len(),
        });
    }
    Ok(())
}

/// Tasks are independent (their own peaks and NMS): decoded in parallel, concatenated in
/// config order, so the result is the same as one after the other.
fn run_tasks<'a, T: Sync>(
    cfg: &'a ModelConfig,
    tasks: &'a [T],
    per_task: impl Fn((usize, (&'a Vec<String>, &'a T))) -> Result<Vec<Detection>, DecodeError>
    + Sync
    + Send,
) -> Result<Vec<Detection>, DecodeError> {
    let parts: Vec<Result<Vec<Detection>, DecodeError>> = cfg
        .head
        .tasks
        .iter()
        .zip(tasks)
        .enumerate()
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(per_task)
        .collect();
    let mut all = Vec::new();
    for p in parts {
        all.extend(p?);
    }
    Ok(all)
}

/// Boxes of one task's ranked peaks (`reg(channel, key)` gives a peak's regression
/// values): decoded, range- and finiteness-filtered, capped at `pre_max`, then NMS.
fn task_boxes(
    cfg: &ModelConfig,
    classes: &[String],
    found: Vec<Peak>,
    reg: impl Fn(usize, usize) -> f32,
) -> Vec<Detection> {
    let (_, w) = head_size(cfg);
    let stride = cfg.head_stride();
    let r = &cfg.input.point_range;
    let cell = &cfg.voxelization.cell_size;
    let dc = &cfg.decode;
    let lim = &dc.post_center_range;
    let has_vel = cfg.has_velocity();
    let mut dets: Vec<Detection> = found
        .into_iter()
        .filter_map(|(score, c, i, key)| {
            let (ix, iy) = ((i % w) as f32, (i / w) as f32);
            let x = (ix + reg(0, key)) * stride * cell[0] + r[0];
            let y = (iy + reg(1, key)) * stride * cell[1] + r[1];
            let z = reg(2, key);
            let size = [reg(3, key).exp(), reg(4, key).exp(), reg(5, key).exp()];
            let yaw = reg(7, key).atan2(reg(6, key));
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
            (inside && finite).then(|| Detection {
                bbox: Box3d {
                    center: [x, y, z],
                    size,
                    yaw,
                },
                class: classes[c].clone(),
                score,
                velocity: has_vel.then(|| [reg(8, key), reg(9, key)]),
            })
        })
        .collect();
    dets.truncate(dc.nms.pre_max);
    nms(dets, dc.nms.kind, dc.nms.threshold, dc.nms.post_max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Object;
    use crate::model::targets::build_targets;
    use std::path::Path;

    fn cfg() -> ModelConfig {
        ModelConfig::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"))
            .unwrap()
    }

    /// The peak rule written out directly: every cell against its 3x3 neighbours, the
    /// sigmoid of all, a full sort.
    fn naive_peaks(
        heat: &[f32],
        classes: usize,
        (h, w): (usize, usize),
        k: usize,
        thr: f32,
        local_max: bool,
    ) -> Vec<(f32, usize, usize)> {
        let mut out = Vec::new();
        for c in 0..classes {
            let plane = &heat[c * h * w..(c + 1) * h * w];
            for y in 0..h {
                for x in 0..w {
                    let v = plane[y * w + x];
                    let mut peak = true;
                    if local_max {
                        for ny in y.saturating_sub(1)..(y + 2).min(h) {
                            for nx in x.saturating_sub(1)..(x + 2).min(w) {
                                // `>` is false against NaN: a NaN never suppresses.
                                peak &= plane[ny * w + nx].partial_cmp(&v)
                                    != Some(std::cmp::Ordering::Greater);
                            }
                        }
                    }
                    let s = sigmoid(v);
                    if peak && s > thr {
                        out.push((s, c, y * w + x));
                    }
                }
            }
        }
        out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        out.truncate(k);
        out
    }

    /// Candidates found the GPU's way (every cell passing the logit cut and the 3x3 test),
    /// shuffled, decode to exactly the detections of the maps.
    #[test]
    fn candidates_decode_like_the_maps() {
        use rand::seq::SliceRandom;
        use rand::{RngExt, SeedableRng};
        let cfg = cfg();
        let (h, w) = head_size(&cfg);
        let plane = h * w;
        let nreg = cfg.regression_channels();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for trial in 0..4 {
            let maps: Vec<(Vec<f32>, Vec<f32>)> = cfg
                .head
                .tasks
                .iter()
                .map(|classes| {
                    let heat = (0..classes.len() * plane)
                        .map(|_| (rng.random_range(-40..10) as f32) * 0.25)
                        .collect();
                    let reg = (0..nreg * plane)
                        .map(|_| rng.random_range(-1.0f32..1.0))
                        .collect();
                    (heat, reg)
                })
                .collect();
            let views: Vec<TaskOutputs<'_>> = maps
                .iter()
                .map(|(heat, reg)| TaskOutputs {
                    heatmap: heat,
                    regression: reg,
                })
                .collect();
            let want = decode(&cfg, &views).unwrap();
            let cut = peak_logit_cut(cfg.decode.score_threshold);
            let cands: Vec<TaskCandidates> = maps
                .iter()
                .map(|(heat, reg)| {
                    let mut found = Vec::new();
                    for (t, &v) in heat.iter().enumerate() {
                        let (c, i) = (t / plane, t % plane);
                        let (y, x) = (i / w, i % w);
                        let beaten = (y.saturating_sub(1)..(y + 2).min(h)).any(|ny| {
                            (x.saturating_sub(1)..(x + 2).min(w))
                                .any(|nx| heat[c * plane + ny * w + nx] > v)
                        });
                        if v < cut || (cfg.decode.local_max && beaten) {
                            continue;
                        }
                        found.push((v, c as u32, i as u32));
                    }
                    found.shuffle(&mut rng);
                    let mut tc = TaskCandidates::default();
                    for (v, c, i) in found {
                        tc.logits.push(v);
                        tc.classes.push(c);
                        tc.cells.push(i);
                        tc.regression
                            .extend((0..nreg).map(|ch| reg[ch * plane + i as usize]));
                    }
                    tc
                })
                .collect();
            assert_eq!(
                decode_candidates(&cfg, &cands).unwrap(),
                want,
                "trial {trial}"
            );
            assert!(!want.is_empty());
        }
        // Malformed candidate lists are errors naming what is wrong.
        let mut bad = vec![TaskCandidates::default(); cfg.head.tasks.len()];
        bad[0].logits.push(0.0);
        let e = decode_candidates(&cfg, &bad).unwrap_err();
        assert_eq!(e.what, "candidate list");
        bad[0].classes.push(99);
        bad[0].cells.push(0);
        bad[0].regression = vec![0.0; nreg];
        let e = decode_candidates(&cfg, &bad).unwrap_err();
        assert_eq!(e.what, "candidate class");
    }

    #[test]
    fn peaks_match_the_naive_rule() {
        use rand::{RngExt, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (h, w, classes) in [(1, 1, 1), (1, 7, 2), (9, 1, 1), (17, 23, 3)] {
            for trial in 0..20 {
                // Coarse values make plateaus (ties); a few NaNs and infinities.
                let heat: Vec<f32> = (0..h * w * classes)
                    .map(|_| match rng.random_range(0..40) {
                        0 => f32::NAN,
                        1 => f32::INFINITY,
                        2 => -0.0,
                        _ => (rng.random_range(-12..8) as f32) * 0.5,
                    })
                    .collect();
                for local_max in [true, false] {
                    for (k, thr) in [(5, 0.1), (1000, 0.1), (0, 0.1), (50, 0.9999)] {
                        let got: Vec<(f32, usize, usize)> =
                            peaks(&heat, classes, h, w, k, thr, local_max)
                                .into_iter()
                                .map(|(s, c, i, _)| (s, c, i))
                                .collect();
                        assert_eq!(
                            got,
                            naive_peaks(&heat, classes, (h, w), k, thr, local_max),
                            "{h}x{w}x{classes} trial {trial} k {k} thr {thr} local_max {local_max}"
                        );
                    }
                }
            }
        }
    }

    fn object(class: &str, center: [f32; 3], yaw: f32) -> Object {
        Object {
            bbox: Box3d {
                center,
                size: [4.2, 1.8, 1.5],
                yaw,
            },
            class: class.into(),
            velocity: Some([2.0, 0.5]),
            num_points: Some(30),
        }
    }

    /// Encoding boxes as perfect head outputs (logit 10 at the centre cell, the
    /// regression targets there) and decoding them gives the boxes back.
    #[test]
    fn decode_inverts_the_targets() {
        let cfg = cfg();
        let objects = vec![
            object("car", [12.3, -7.1, -1.0], 0.4),
            object("car", [-30.2, 20.9, -0.8], -2.0),
            object("pedestrian", [5.5, 5.5, -0.9], 1.0),
        ];
        let targets = build_targets(&cfg, &objects);
        let d = cfg.regression_channels();
        let plane = 64 * 64;
        let outs: Vec<(Vec<f32>, Vec<f32>)> = targets
            .iter()
            .map(|t| {
                let heat: Vec<f32> = t
                    .heatmap
                    .iter()
                    .map(|&v| if v == 1.0 { 10.0 } else { -10.0 })
                    .collect();
                let mut reg = vec![0.0; d * plane];
                for (k, &i) in t.ind.iter().enumerate().filter(|(k, _)| t.mask[*k]) {
                    for ch in 0..d {
                        reg[ch * plane + i] = t.reg[k * d + ch];
                    }
                }
                (heat, reg)
            })
            .collect();
        let tasks: Vec<TaskOutputs> = outs
            .iter()
            .map(|(h, r)| TaskOutputs {
                heatmap: h,
                regression: r,
            })
            .collect();
        let dets = decode(&cfg, &tasks).unwrap();
        assert_eq!(dets.len(), 3, "{dets:?}");
        let short = [TaskOutputs {
            heatmap: &outs[0].0[1..],
            regression: &outs[0].1,
        }];
        assert!(decode(&cfg, &short).is_err());
        for o in &objects {
            let d = dets
                .iter()
                .find(|d| d.class == o.class && (d.bbox.center[0] - o.bbox.center[0]).abs() < 1e-3)
                .expect("decoded");
            for i in 0..3 {
                assert!((d.bbox.center[i] - o.bbox.center[i]).abs() < 1e-3);
                assert!((d.bbox.size[i] - o.bbox.size[i]).abs() < 1e-3);
            }
            assert!((d.bbox.yaw - o.bbox.yaw).abs() < 1e-4);
            assert_eq!(d.velocity, o.velocity);
            assert!(d.score > 0.99);
        }
    }

    #[test]
    fn nms_suppresses_overlaps_only() {
        let det = |x: f32, score: f32| Detection {
            bbox: Box3d {
                center: [x, 0.0, 0.0],
                size: [4.0, 2.0, 1.5],
                yaw: 0.0,
            },
            class: "car".into(),
            score,
            velocity: None,
        };
        let dets = vec![det(0.0, 0.9), det(0.5, 0.8), det(10.0, 0.7), det(3.9, 0.6)];
        // IoU(0, 0.5) = 3.5/4.5 > 0.2: suppressed; IoU(0, 3.9) = 0.1/7.9 < 0.2: kept.
        let kept = nms(dets.clone(), NmsKind::RotatedIou, 0.2, 10);
        let xs: Vec<f32> = kept.iter().map(|d| d.bbox.center[0]).collect();
        assert_eq!(xs, vec![0.0, 10.0, 3.9]);
        let kept = nms(dets.clone(), NmsKind::Circle, 1.0, 10);
        assert_eq!(kept.len(), 3);
        assert_eq!(nms(dets, NmsKind::RotatedIou, 0.2, 1).len(), 1);
    }

    #[test]
    fn low_scores_and_non_peaks_are_dropped() {
        let (h, w) = (4, 4);
        let mut heat = vec![-10.0; h * w];
        heat[5] = 2.0; // peak
        heat[6] = 1.0; // neighbour of a higher cell: not a peak
        heat[15] = -3.0; // sigmoid 0.047 < 0.1
        let p = peaks(&heat, 1, h, w, 10, 0.1, true);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].2, 5);
        // Without the 3x3 filter (OpenPCDet's plain top-K) the neighbour is a candidate
        // too, ranked by score; the low cell still fails the threshold.
        let p = peaks(&heat, 1, h, w, 10, 0.1, false);
        let cells: Vec<usize> = p.iter().map(|c| c.2).collect();
        assert_eq!(cells, vec![5, 6]);
        assert_eq!(peaks(&heat, 1, h, w, 1, 0.1, false).len(), 1, "top-K caps");
    }

    /// The logit shortcut keeps exactly the cells a plain sigmoid-then-compare keeps,
    /// values right at the threshold and extreme thresholds included.
    #[test]
    fn logit_shortcut_keeps_what_the_sigmoid_keeps() {
        use rand::{RngExt, SeedableRng};
        let naive = |heat: &[f32], thr: f32| -> Vec<(f32, usize, usize)> {
            let mut out: Vec<_> = heat
                .iter()
                .enumerate()
                .filter(|&(_, &v)| sigmoid(v) > thr)
                .map(|(i, &v)| (sigmoid(v), 0, i))
                .collect();
            out.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.2.cmp(&b.2)));
            out
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for thr in [0.0f32, 1e-7, 0.1, 0.5, 0.9, 0.999_999, 1.0, -0.5, 2.0] {
            let centre = if thr > 0.0 && thr < 1.0 {
                (thr / (1.0 - thr)).ln()
            } else {
                0.0
            };
            let heat: Vec<f32> = (0..4096)
                .map(|_| centre + rng.random_range(-1e-3f32..1e-3) * rng.random_range(0.0f32..1.0))
                .chain([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, centre])
                .collect();
            let got: Vec<(f32, usize, usize)> =
                peaks(&heat, 1, 1, heat.len(), usize::MAX, thr, false)
                    .into_iter()
                    .map(|(s, c, i, _)| (s, c, i))
                    .collect();
            assert_eq!(got, naive(&heat, thr), "threshold {thr}");
        }
    }
}
