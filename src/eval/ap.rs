//! Average precision: nuScenes' centre-distance AP with its true-positive errors, and
//! KITTI-style rotated BEV IoU AP over 40 recall points.

use super::iou::{aligned_iou_3d, bev_iou};
use crate::boxes::{Detection, Object};
use serde::Serialize;
use std::f64::consts::PI;

/// Ground truth and detections of one frame.
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub gt: &'a [Object],
    pub detections: &'a [Detection],
}

/// A class to evaluate and the BEV range (from the sensor) within which it counts.
#[derive(Debug, Clone, Serialize)]
pub struct ClassSpec {
    pub name: String,
    pub range: f32,
}

impl ClassSpec {
    pub fn new(name: &str, range: f32) -> Self {
        Self {
            name: name.to_owned(),
            range,
        }
    }
}

/// The nuScenes detection classes with their evaluation ranges.
pub fn nuscenes_classes() -> Vec<ClassSpec> {
    [
        ("car", 50.0),
        ("truck", 50.0),
        ("bus", 50.0),
        ("trailer", 50.0),
        ("construction_vehicle", 50.0),
        ("pedestrian", 40.0),
        ("motorcycle", 40.0),
        ("bicycle", 40.0),
        ("traffic_cone", 30.0),
        ("barrier", 30.0),
    ]
    .into_iter()
    .map(|(n, r)| ClassSpec::new(n, r))
    .collect()
}

/// Parameters of the nuScenes detection metric (defaults are nuScenes').
#[derive(Debug, Clone, Serialize)]
pub struct NuscenesConfig {
    pub classes: Vec<ClassSpec>,
    pub dist_thresholds: Vec<f64>,
    /// Threshold at which true-positive errors are measured.
    pub tp_threshold: f64,
    pub min_recall: f64,
    pub min_precision: f64,
    /// Only count ground truth and detections whose BEV distance from the sensor lies in
    /// [near, far) (distance bands: 0-30, 30-50, 50+ m); `None` counts everything in range.
    pub band: Option<(f32, f32)>,
}

impl NuscenesConfig {
    /// The same metric restricted to a distance band.
    pub fn in_band(&self, near: f32, far: f32) -> Self {
        Self {
            band: Some((near, far)),
            ..self.clone()
        }
    }
}

/// The distance bands results are reported in.
pub const DISTANCE_BANDS: [(f32, f32); 3] = [(0.0, 30.0), (30.0, 50.0), (50.0, f32::INFINITY)];

impl Default for NuscenesConfig {
    fn default() -> Self {
        Self {
            classes: nuscenes_classes(),
            dist_thresholds: vec![0.5, 1.0, 2.0, 4.0],
            tp_threshold: 2.0,
            min_recall: 0.1,
            min_precision: 0.1,
            band: None,
        }
    }
}

/// Mean true-positive errors at the TP threshold; `None` where undefined (no true
/// positive, or the metric does not apply to the class, e.g. velocity of a cone).
#[derive(Debug, Clone, Default, Serialize)]
pub struct TpErrors {
    /// Translation error: BEV centre distance (m).
    pub ate: Option<f64>,
    /// Scale error: 1 - 3D IoU after aligning centre and heading.
    pub ase: Option<f64>,
    /// Orientation error: smallest yaw difference (rad); period pi for barriers.
    pub aoe: Option<f64>,
    /// Velocity error: BEV velocity difference (m/s).
    pub ave: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ClassResult {
    pub class: String,
    /// Ground-truth objects that count (in range, with points).
    pub num_gt: usize,
    /// AP at each distance threshold, in `NuscenesConfig::dist_thresholds` order.
    pub ap: Vec<f64>,
    /// Recall at each distance threshold with every detection kept (matched / GT).
    pub recall: Vec<f64>,
    pub mean_ap: f64,
    pub tp: TpErrors,
    /// Precision at the 101 recall points 0, 0.01, ..., 1 for each threshold (PR curves).
    pub precision: Vec<Vec<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NuscenesResult {
    /// Classes with at least one ground-truth object; the others are left out of mAP.
    pub classes: Vec<ClassResult>,
    pub map: f64,
    pub mean_tp: TpErrors,
    /// nuScenes detection score over the TP errors we can measure: attributes (AAE) do not
    /// exist in our data, so NDS = (5 mAP + sum of (1 - min(1, err)) over the defined
    /// errors) / (5 + number of defined errors).
    pub nds: f64,
}

/// `np.interp(x, xp, fp, right=right)` for non-decreasing `xp`.
fn interp(x: f64, xp: &[f64], fp: &[f64], right: f64) -> f64 {
    if xp.is_empty() {
        return right;
    }
    if x > *xp.last().unwrap() {
        return right;
    }
    if x < xp[0] {
        return fp[0];
    }
    // Last index with xp[j] <= x; interpolate towards j + 1.
    let j = xp.partition_point(|&v| v <= x) - 1;
    if j + 1 >= xp.len() || xp[j + 1] == xp[j] {
        return fp[j];
    }
    let t = (x - xp[j]) / (xp[j + 1] - xp[j]);
    fp[j] + t * (fp[j + 1] - fp[j])
}

fn bev_dist(a: [f32; 3], b: [f32; 3]) -> f64 {
    ((a[0] - b[0]) as f64).hypot((a[1] - b[1]) as f64)
}

fn in_range(c: [f32; 3], range: f32, band: Option<(f32, f32)>) -> bool {
    let d = (c[0] as f64).hypot(c[1] as f64);
    d <= range as f64 && band.is_none_or(|(near, far)| d >= near as f64 && d < far as f64)
}

fn yaw_diff(a: f32, b: f32, period: f64) -> f64 {
    let d = ((a - b) as f64).rem_euclid(period);
    d.min(period - d)
}

struct Matches {
    /// Per detection in descending-score order: matched or not, with its score.
    is_tp: Vec<bool>,
    conf: Vec<f64>,
    /// Errors of the true positives, in the same order.
    errors: Vec<[f64; 4]>,
}

/// Greedy nuScenes matching of one class at one distance threshold.
fn match_class(
    frames: &[(Vec<&Object>, Vec<&Detection>)],
    threshold: f64,
    yaw_period: f64,
) -> Matches {
    let mut order: Vec<(usize, usize)> = frames
        .iter()
        .enumerate()
        .flat_map(|(f, (_, d))| (0..d.len()).map(move |i| (f, i)))
        .collect();
    // Stable sort by descending score keeps ties in input order (deterministic).
    order.sort_by(|&(fa, ia), &(fb, ib)| {
        frames[fb].1[ib]
            .score
            .partial_cmp(&frames[fa].1[ia].score)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut taken: Vec<Vec<bool>> = frames.iter().map(|(g, _)| vec![false; g.len()]).collect();
    let mut m = Matches {
        is_tp: Vec::new(),
        conf: Vec::new(),
        errors: Vec::new(),
    };
    for (f, i) in order {
        let det = frames[f].1[i];
        let gts = &frames[f].0;
        let best = (0..gts.len())
            .filter(|&g| !taken[f][g])
            .map(|g| (g, bev_dist(gts[g].bbox.center, det.bbox.center)))
            .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
        let matched = best.filter(|&(_, d)| d < threshold);
        m.is_tp.push(matched.is_some());
        m.conf.push(det.score as f64);
        if let Some((g, d)) = matched {
            taken[f][g] = true;
            let gt = gts[g];
            let vel = match (gt.velocity, det.velocity) {
                (Some(a), Some(b)) => ((a[0] - b[0]) as f64).hypot((a[1] - b[1]) as f64),
                _ => f64::NAN,
            };
            m.errors.push([
                d,
                1.0 - aligned_iou_3d(gt.bbox.size, det.bbox.size),
                yaw_diff(gt.bbox.yaw, det.bbox.yaw, yaw_period),
                vel,
            ]);
        }
    }
    m
}

struct Curve {
    precision: Vec<f64>,
    conf: Vec<f64>,
}

fn pr_curve(m: &Matches, num_gt: usize) -> Curve {
    let (mut tp, mut fp) = (0.0, 0.0);
    let mut prec = Vec::with_capacity(m.is_tp.len());
    let mut rec = Vec::with_capacity(m.is_tp.len());
    for &t in &m.is_tp {
        if t {
            tp += 1.0
        } else {
            fp += 1.0
        }
        prec.push(tp / (tp + fp));
        rec.push(tp / num_gt as f64);
    }
    let points: Vec<f64> = (0..=100).map(|i| i as f64 / 100.0).collect();
    Curve {
        precision: points
            .iter()
            .map(|&r| interp(r, &rec, &prec, 0.0))
            .collect(),
        conf: points
            .iter()
            .map(|&r| interp(r, &rec, &m.conf, 0.0))
            .collect(),
    }
}

fn average_precision(precision: &[f64], cfg: &NuscenesConfig) -> f64 {
    let first = (100.0 * cfg.min_recall).round() as usize + 1;
    let tail = &precision[first.min(precision.len())..];
    if tail.is_empty() {
        return 0.0;
    }
    let s: f64 = tail.iter().map(|p| (p - cfg.min_precision).max(0.0)).sum();
    s / tail.len() as f64 / (1.0 - cfg.min_precision)
}

/// nuScenes' TP error: the running mean of the errors, re-sampled on the recall grid
/// through confidence, averaged from `min_recall` to the highest recall reached.
fn tp_error(m: &Matches, curve: &Curve, k: usize, cfg: &NuscenesConfig) -> Option<f64> {
    let vals: Vec<f64> = m.errors.iter().map(|e| e[k]).collect();
    if vals.is_empty() || vals.iter().any(|v| v.is_nan()) {
        return None;
    }
    let tp_conf: Vec<f64> = m
        .is_tp
        .iter()
        .zip(&m.conf)
        .filter(|(t, _)| **t)
        .map(|(_, c)| *c)
        .collect();
    let mut cummean = Vec::with_capacity(vals.len());
    let mut sum = 0.0;
    for (i, v) in vals.iter().enumerate() {
        sum += v;
        cummean.push(sum / (i + 1) as f64);
    }
    // Interpolate over ascending confidence.
    let xp: Vec<f64> = tp_conf.iter().rev().copied().collect();
    let fp: Vec<f64> = cummean.iter().rev().copied().collect();
    let on_grid: Vec<f64> = curve
        .conf
        .iter()
        .map(|&c| interp(c, &xp, &fp, *fp.last().unwrap()))
        .collect();
    let first = (100.0 * cfg.min_recall).round() as usize + 1;
    let last = curve.conf.iter().rposition(|&c| c != 0.0)?;
    if last < first {
        return Some(1.0);
    }
    let s = &on_grid[first..=last];
    Some(s.iter().sum::<f64>() / s.len() as f64)
}

/// The nuScenes detection metric over a set of frames.
pub fn nuscenes_eval(frames: &[Frame<'_>], cfg: &NuscenesConfig) -> NuscenesResult {
    let mut classes = Vec::new();
    for spec in &cfg.classes {
        let per_frame: Vec<(Vec<&Object>, Vec<&Detection>)> = frames
            .iter()
            .map(|f| {
                let gt =
                    f.gt.iter()
                        .filter(|o| o.class == spec.name && o.num_points != Some(0))
                        .filter(|o| in_range(o.bbox.center, spec.range, cfg.band))
                        .collect();
                let det = f
                    .detections
                    .iter()
                    .filter(|d| {
                        d.class == spec.name && in_range(d.bbox.center, spec.range, cfg.band)
                    })
                    .collect();
                (gt, det)
            })
            .collect();
        let num_gt: usize = per_frame.iter().map(|(g, _)| g.len()).sum();
        if num_gt == 0 {
            continue;
        }
        let yaw_period = if spec.name == "barrier" { PI } else { 2.0 * PI };
        let mut ap = Vec::new();
        let mut recall = Vec::new();
        let mut precision = Vec::new();
        for &thr in &cfg.dist_thresholds {
            let m = match_class(&per_frame, thr, yaw_period);
            recall.push(m.is_tp.iter().filter(|&&t| t).count() as f64 / num_gt as f64);
            let c = pr_curve(&m, num_gt);
            ap.push(average_precision(&c.precision, cfg));
            precision.push(c.precision);
        }
        let m = match_class(&per_frame, cfg.tp_threshold, yaw_period);
        let c = pr_curve(&m, num_gt);
        let cone = spec.name == "traffic_cone";
        let tp = TpErrors {
            ate: tp_error(&m, &c, 0, cfg),
            ase: tp_error(&m, &c, 1, cfg),
            aoe: if cone { None } else { tp_error(&m, &c, 2, cfg) },
            ave: if cone || spec.name == "barrier" {
                None
            } else {
                tp_error(&m, &c, 3, cfg)
            },
        };
        classes.push(ClassResult {
            class: spec.name.clone(),
            num_gt,
            mean_ap: ap.iter().sum::<f64>() / ap.len() as f64,
            ap,
            recall,
            tp,
            precision,
        });
    }
    let mean = |f: &dyn Fn(&TpErrors) -> Option<f64>| {
        let v: Vec<f64> = classes.iter().filter_map(|c| f(&c.tp)).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mean_tp = TpErrors {
        ate: mean(&|t| t.ate),
        ase: mean(&|t| t.ase),
        aoe: mean(&|t| t.aoe),
        ave: mean(&|t| t.ave),
    };
    let map = if classes.is_empty() {
        0.0
    } else {
        classes.iter().map(|c| c.mean_ap).sum::<f64>() / classes.len() as f64
    };
    let defined: Vec<f64> = [mean_tp.ate, mean_tp.ase, mean_tp.aoe, mean_tp.ave]
        .into_iter()
        .flatten()
        .collect();
    let nds = (5.0 * map + defined.iter().map(|e| 1.0 - e.min(1.0)).sum::<f64>())
        / (5.0 + defined.len() as f64);
    NuscenesResult {
        classes,
        map,
        mean_tp,
        nds,
    }
}

/// KITTI-style AP of one class with rotated BEV IoU matching (>= `iou_threshold`),
/// precision envelope sampled at 40 recall points (1/40 .. 1). `None` without ground truth.
pub fn bev_iou_ap(frames: &[Frame<'_>], class: &str, iou_threshold: f64) -> Option<f64> {
    let mut order: Vec<(usize, usize)> = Vec::new();
    let mut num_gt = 0;
    for (f, fr) in frames.iter().enumerate() {
        num_gt += fr.gt.iter().filter(|o| o.class == class).count();
        order.extend(
            fr.detections
                .iter()
                .enumerate()
                .filter(|(_, d)| d.class == class)
                .map(|(i, _)| (f, i)),
        );
    }
    if num_gt == 0 {
        return None;
    }
    order.sort_by(|&(fa, ia), &(fb, ib)| {
        frames[fb].detections[ib]
            .score
            .partial_cmp(&frames[fa].detections[ia].score)
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut taken: Vec<Vec<bool>> = frames.iter().map(|f| vec![false; f.gt.len()]).collect();
    let (mut tp, mut fp) = (0.0f64, 0.0f64);
    let mut prec = Vec::new();
    let mut rec = Vec::new();
    for (f, i) in order {
        let det = &frames[f].detections[i];
        let best = frames[f]
            .gt
            .iter()
            .enumerate()
            .filter(|(g, o)| o.class == class && !taken[f][*g])
            .map(|(g, o)| (g, bev_iou(&o.bbox, &det.bbox)))
            .max_by(|a, b| a.1.partial_cmp(&b.1).unwrap_or(std::cmp::Ordering::Equal));
        match best {
            Some((g, iou)) if iou >= iou_threshold => {
                taken[f][g] = true;
                tp += 1.0;
            }
            _ => fp += 1.0,
        }
        prec.push(tp / (tp + fp));
        rec.push(tp / num_gt as f64);
    }
    // Envelope: best precision at any recall >= r.
    let ap = (1..=40)
        .map(|k| {
            let r = k as f64 / 40.0;
            rec.iter()
                .zip(&prec)
                .filter(|(rc, _)| **rc >= r - 1e-12)
                .map(|(_, p)| *p)
                .fold(0.0, f64::max)
        })
        .sum::<f64>()
        / 40.0;
    Some(ap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;

    fn obj(class: &str, x: f32, y: f32) -> Object {
        Object {
            bbox: Box3d {
                center: [x, y, 0.0],
                size: [4.0, 2.0, 1.5],
                yaw: 0.3,
            },
            class: class.into(),
            velocity: Some([1.0, 0.0]),
            num_points: Some(10),
        }
    }

    fn det(class: &str, x: f32, y: f32, score: f32) -> Detection {
        let o = obj(class, x, y);
        Detection {
            bbox: o.bbox,
            class: o.class,
            score,
            velocity: o.velocity,
        }
    }

    #[test]
    fn perfect_detections_score_one() {
        let gt = vec![obj("car", 10.0, 0.0), obj("car", -5.0, 20.0)];
        let dets = vec![det("car", 10.0, 0.0, 0.9), det("car", -5.0, 20.0, 0.8)];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = nuscenes_eval(&frames, &NuscenesConfig::default());
        assert_eq!(r.classes.len(), 1);
        assert!((r.map - 1.0).abs() < 1e-12);
        let tp = &r.classes[0].tp;
        assert!(tp.ate.unwrap().abs() < 1e-9 && tp.aoe.unwrap().abs() < 1e-9);
        assert!((r.nds - 1.0).abs() < 1e-12);
        assert_eq!(bev_iou_ap(&frames, "car", 0.7), Some(1.0));
    }

    /// nuScenes' AP, computed independently, of the curve a TP, FP, TP ranking over two
    /// objects gives: (recall, precision) = (0.5, 1), (0.5, 0.5), (1, 2/3).
    fn tp_fp_tp_ap() -> f64 {
        let mut s = 0.0;
        for i in 11..=100 {
            let rc = i as f64 / 100.0;
            // numpy's interp takes the last of repeated recalls: at 0.5 the FP's precision.
            let p = if rc < 0.5 {
                1.0
            } else {
                0.5 + (rc - 0.5) / 0.5 * (2.0 / 3.0 - 0.5)
            };
            s += (p - 0.1f64).max(0.0);
        }
        s / 90.0 / 0.9
    }

    #[test]
    fn hand_computed_ap() {
        // Two GT; detections by score: TP, FP, TP: (recall, precision) = (0.5, 1), (0.5, 0.5),
        // (1, 2/3).
        let gt = vec![obj("car", 0.0, 10.0), obj("car", 0.0, 30.0)];
        let dets = vec![
            det("car", 0.0, 10.2, 0.9),
            det("car", 20.0, 0.0, 0.8),
            det("car", 0.3, 30.0, 0.7),
        ];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = nuscenes_eval(&frames, &NuscenesConfig::default());
        let expected = tp_fp_tp_ap();
        for (thr, ap) in [0.5, 1.0, 2.0, 4.0].iter().zip(&r.classes[0].ap) {
            assert!(
                (ap - expected).abs() < 1e-9,
                "thr {thr}: {ap} vs {expected}"
            );
        }
        // The TP translation error is the mean of 0.2 and 0.3 over the upper recall range,
        // with the running mean 0.2 where only the first TP counts.
        let ate = r.classes[0].tp.ate.unwrap();
        assert!(ate > 0.2 && ate < 0.3, "{ate}");
        // KITTI-style: precision envelope 1 up to recall 0.5, 2/3 above.
        let ap40 = bev_iou_ap(&frames, "car", 0.5).unwrap();
        assert!((ap40 - (20.0 * 1.0 + 20.0 * 2.0 / 3.0) / 40.0).abs() < 1e-12);
    }

    #[test]
    fn range_and_empty_ground_truth_filters() {
        let mut empty = obj("car", 5.0, 0.0);
        empty.num_points = Some(0);
        let gt = vec![obj("car", 60.0, 0.0), empty, obj("pedestrian", 5.0, 5.0)];
        // A detection on the empty car is neither TP nor (for AP purposes) useful; the
        // car class has no countable GT, so it is left out of mAP.
        let dets = vec![det("car", 5.0, 0.0, 0.9), det("pedestrian", 5.0, 5.0, 0.5)];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = nuscenes_eval(&frames, &NuscenesConfig::default());
        assert_eq!(r.classes.len(), 1);
        assert_eq!(r.classes[0].class, "pedestrian");
        assert!((r.map - 1.0).abs() < 1e-12);
    }

    #[test]
    fn missed_objects_lower_ap() {
        let gt: Vec<Object> = (0..10).map(|i| obj("car", 3.0 * i as f32, 0.0)).collect();
        let dets: Vec<Detection> = (0..5)
            .map(|i| det("car", 3.0 * i as f32, 0.0, 0.9 - 0.1 * i as f32))
            .collect();
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = nuscenes_eval(&frames, &NuscenesConfig::default());
        // Recall stops at 0.5 with precision 1: AP = (40 points of 0.9) / 90 / 0.9.
        assert!((r.map - 40.0 / 90.0).abs() < 1e-9, "{}", r.map);
    }

    #[test]
    fn duplicates_and_false_positives_cost_precision() {
        let gt = vec![obj("car", 10.0, 0.0), obj("car", 20.0, 0.0)];
        // A duplicate of the first car (lower score) is a false positive at every threshold,
        // ranked before the second car's detection.
        let dets = vec![
            det("car", 10.0, 0.0, 0.9),
            det("car", 10.1, 0.0, 0.8),
            det("car", 20.0, 0.0, 0.7),
        ];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = nuscenes_eval(&frames, &NuscenesConfig::default());
        // Same curve as `hand_computed_ap`: (0.5, 1), (0.5, 0.5), (1, 2/3).
        assert!((r.map - tp_fp_tp_ap()).abs() < 1e-9, "{}", r.map);
        // Only false positives: AP 0.
        let fps = vec![det("car", -30.0, 0.0, 0.9), det("car", 0.0, -30.0, 0.8)];
        let frames = [Frame {
            gt: &gt,
            detections: &fps,
        }];
        assert_eq!(nuscenes_eval(&frames, &NuscenesConfig::default()).map, 0.0);
        // A detection shifted by 1.5 m matches at 2 and 4 m but not at 0.5 and 1 m.
        let shifted = vec![det("car", 11.5, 0.0, 0.9), det("car", 21.5, 0.0, 0.9)];
        let frames = [Frame {
            gt: &gt,
            detections: &shifted,
        }];
        let ap = &nuscenes_eval(&frames, &NuscenesConfig::default()).classes[0].ap;
        for (got, want) in ap.iter().zip([0.0, 0.0, 1.0, 1.0]) {
            assert!((got - want).abs() < 1e-9, "{ap:?}");
        }
    }

    #[test]
    fn distance_bands_split_the_objects() {
        let gt = vec![obj("car", 10.0, 0.0), obj("car", 40.0, 0.0)];
        let dets = vec![det("car", 10.0, 0.0, 0.9)];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let cfg = NuscenesConfig::default();
        assert!((nuscenes_eval(&frames, &cfg.in_band(0.0, 30.0)).map - 1.0).abs() < 1e-12);
        assert_eq!(nuscenes_eval(&frames, &cfg.in_band(30.0, 50.0)).map, 0.0);
        assert!(
            nuscenes_eval(&frames, &cfg.in_band(50.0, f32::INFINITY))
                .classes
                .is_empty()
        );
    }

    #[test]
    fn interp_matches_numpy_semantics() {
        let xp = [0.0, 0.5, 0.5, 1.0];
        let fp = [1.0, 0.8, 0.6, 0.2];
        assert_eq!(interp(-1.0, &xp, &fp, 0.0), 1.0);
        assert!((interp(0.25, &xp, &fp, 0.0) - 0.9).abs() < 1e-12);
        assert!((interp(0.75, &xp, &fp, 0.0) - 0.4).abs() < 1e-12);
        assert_eq!(interp(1.5, &xp, &fp, 0.0), 0.0);
    }
}
