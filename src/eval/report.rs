//! The evaluation report of one model over one set of frames: every metric the project
//! quotes, per class, per distance band and overall, as one serialisable object (the
//! `lidar_ptq eval --json` output) and as a readable table.
//!
//! Conventions, chosen once here:
//! - nuScenes' centre-distance AP (0.5 / 1 / 2 / 4 m, 101 recall points, min recall and
//!   precision 0.1) with its TP errors and NDS; a class counts within its evaluation range
//!   ([`class_range`]: vehicles 50 m, people and bikes 40 m, cones and barriers 30 m).
//! - KITTI-style rotated BEV IoU AP over 40 recall points, with KITTI's thresholds: IoU
//!   0.7 for vehicles, 0.5 for everything else (pedestrians, cyclists, bikes, cones,
//!   barriers) ([`bev_iou_threshold`]); it counts the same objects as the nuScenes AP
//!   (class range, ground truth with at least one point when the count is known).
//! - Distance bands (0-30, 30-50, 50+ m from the sensor, BEV) select ground truth and
//!   detections by centre distance and ignore the class ranges, so the 50+ band says
//!   what the model does beyond them.
//! - A class without ground truth (overall or in a band) has `null` AP and is left out
//!   of the means; with no ground truth at all, mAP and NDS are `null`.

use super::ap::{
    ClassSpec, DISTANCE_BANDS, Frame, NuscenesConfig, NuscenesResult, TpErrors, bev_iou_ap,
    nuscenes_eval,
};
use crate::boxes::{Detection, Object};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// nuScenes' evaluation range of a class (vehicles 50 m, people and bikes 40 m, cones
/// and barriers 30 m; classes nuScenes lacks count as vehicles).
pub fn class_range(class: &str) -> f32 {
    crate::train::sim_eval::class_range(class)
}

/// KITTI's BEV IoU threshold of a class: 0.7 for vehicles, 0.5 for the rest.
pub fn bev_iou_threshold(class: &str) -> f64 {
    match class {
        "car" | "van" | "truck" | "bus" | "trailer" | "construction_vehicle" | "tram" => 0.7,
        _ => 0.5,
    }
}

/// Name of a distance band as the report keys it ("0-30", "30-50", "50+").
pub fn band_name((near, far): (f32, f32)) -> String {
    if far.is_finite() {
        format!("{near}-{far}")
    } else {
        format!("{near}+")
    }
}

/// One class in one distance band.
#[derive(Debug, Clone, Serialize)]
pub struct BandResult {
    /// nuScenes AP (mean over the distance thresholds); `null` without ground truth.
    #[serde(rename = "AP")]
    pub ap: Option<f64>,
    #[serde(rename = "bev_iou_AP")]
    pub bev_iou_ap: Option<f64>,
    pub num_gt: usize,
}

/// Everything measured for one class.
#[derive(Debug, Clone, Serialize)]
pub struct ClassReport {
    /// nuScenes AP: the mean over the distance thresholds; `null` without ground truth.
    #[serde(rename = "AP")]
    pub ap: Option<f64>,
    /// AP per centre-distance threshold, keyed "0.5", "1.0", "2.0", "4.0".
    #[serde(rename = "AP_by_threshold")]
    pub ap_by_threshold: BTreeMap<String, f64>,
    /// Recall (matched / ground truth, every detection kept) per centre distance.
    pub recall_by_threshold: BTreeMap<String, f64>,
    /// True-positive errors at the 2 m threshold (`null` where undefined).
    pub tp_errors: TpErrors,
    #[serde(rename = "bev_iou_AP")]
    pub bev_iou_ap: Option<f64>,
    pub bev_iou_threshold: f64,
    /// Evaluation range (m).
    pub range: f32,
    /// Ground truth that counts (in range, not known to be empty).
    pub num_gt: usize,
    /// Detections of the class in range.
    pub num_detections: usize,
    /// Keyed by [`band_name`].
    pub by_distance: BTreeMap<String, BandResult>,
}

/// Means over the classes of one distance band.
#[derive(Debug, Clone, Serialize)]
pub struct BandSummary {
    #[serde(rename = "mAP")]
    pub map: Option<f64>,
    #[serde(rename = "bev_iou_mAP")]
    pub bev_iou_map: Option<f64>,
    pub num_gt: usize,
}

/// The metric's fixed settings, recorded with the numbers.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub dist_thresholds: Vec<f64>,
    pub tp_threshold: f64,
    pub min_recall: f64,
    pub min_precision: f64,
    pub recall_points_nuscenes: usize,
    pub recall_points_bev_iou: usize,
    pub distance_bands: Vec<String>,
}

/// The whole evaluation: the `eval --json` object.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Model name (and file).
    pub model: String,
    /// Where the frames came from.
    pub source: String,
    pub frames: usize,
    /// Mean nuScenes AP over the classes with ground truth.
    #[serde(rename = "mAP")]
    pub map: Option<f64>,
    /// nuScenes detection score over the TP errors that exist here (see
    /// [`super::NuscenesResult::nds`]).
    #[serde(rename = "NDS")]
    pub nds: Option<f64>,
    /// Mean TP errors over the classes.
    pub tp_errors: TpErrors,
    #[serde(rename = "bev_iou_mAP")]
    pub bev_iou_map: Option<f64>,
    /// Keyed by class name.
    pub per_class: BTreeMap<String, ClassReport>,
    /// Keyed by [`band_name`].
    pub by_distance: BTreeMap<String, BandSummary>,
    /// The classes in the model's order (`per_class` is keyed alphabetically).
    pub classes: Vec<String>,
    pub settings: Settings,
}

/// The frames of one class that count: ground truth of the class within `range` (and the
/// band) that is not known to be empty, detections of the class likewise placed.
fn class_frames(
    frames: &[Frame<'_>],
    class: &str,
    range: f32,
    band: Option<(f32, f32)>,
) -> Vec<(Vec<Object>, Vec<Detection>)> {
    let keep = |c: [f32; 3]| {
        let d = c[0].hypot(c[1]);
        d <= range && band.is_none_or(|(near, far)| d >= near && d < far)
    };
    frames
        .iter()
        .map(|f| {
            (
                f.gt.iter()
                    .filter(|o| o.class == class && o.num_points != Some(0))
                    .filter(|o| keep(o.bbox.center))
                    .cloned()
                    .collect(),
                f.detections
                    .iter()
                    .filter(|d| d.class == class && keep(d.bbox.center))
                    .cloned()
                    .collect(),
            )
        })
        .collect()
}

fn bev_ap(frames: &[(Vec<Object>, Vec<Detection>)], class: &str) -> Option<f64> {
    let views: Vec<Frame<'_>> = frames
        .iter()
        .map(|(gt, d)| Frame { gt, detections: d })
        .collect();
    bev_iou_ap(&views, class, bev_iou_threshold(class))
}

fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Scores detections against ground truth over `classes` (each at its [`class_range`]):
/// the function behind `lidar_ptq eval`, callable on any (ground truth, detections) pairs.
/// Per-threshold values keyed by the centre distance (`"0.5"`, `"1.0"`, ...).
fn by_threshold(thresholds: &[f64], values: &[f64]) -> BTreeMap<String, f64> {
    thresholds
        .iter()
        .zip(values)
        .map(|(t, v)| (format!("{t:?}"), *v))
        .collect()
}

pub fn score(frames: &[Frame<'_>], classes: &[&str], model: &str, source: &str) -> Report {
    let specs: Vec<ClassSpec> = classes
        .iter()
        .map(|c| ClassSpec::new(c, class_range(c)))
        .collect();
    let cfg = NuscenesConfig {
        classes: specs.clone(),
        ..NuscenesConfig::default()
    };
    let overall = nuscenes_eval(frames, &cfg);
    // Bands ignore the class ranges (see the module doc).
    let unbounded = NuscenesConfig {
        classes: classes
            .iter()
            .map(|c| ClassSpec::new(c, f32::INFINITY))
            .collect(),
        ..cfg.clone()
    };
    let bands: Vec<((f32, f32), NuscenesResult)> = DISTANCE_BANDS
        .iter()
        .map(|&(near, far)| {
            (
                (near, far),
                nuscenes_eval(frames, &unbounded.in_band(near, far)),
            )
        })
        .collect();

    let mut per_class = BTreeMap::new();
    for spec in &specs {
        let class = spec.name.as_str();
        let result = overall.classes.iter().find(|c| c.class == class);
        let counted = class_frames(frames, class, spec.range, None);
        let mut by_distance = BTreeMap::new();
        for (band, r) in &bands {
            let in_band = class_frames(frames, class, f32::INFINITY, Some(*band));
            let br = r.classes.iter().find(|c| c.class == class);
            by_distance.insert(
                band_name(*band),
                BandResult {
                    ap: br.map(|c| c.mean_ap),
                    bev_iou_ap: bev_ap(&in_band, class),
                    num_gt: br.map_or(0, |c| c.num_gt),
                },
            );
        }
        per_class.insert(
            class.to_string(),
            ClassReport {
                ap: result.map(|c| c.mean_ap),
                ap_by_threshold: result
                    .map(|c| by_threshold(&cfg.dist_thresholds, &c.ap))
                    .unwrap_or_default(),
                recall_by_threshold: result
                    .map(|c| by_threshold(&cfg.dist_thresholds, &c.recall))
                    .unwrap_or_default(),
                tp_errors: result.map(|c| c.tp.clone()).unwrap_or_default(),
                bev_iou_ap: bev_ap(&counted, class),
                bev_iou_threshold: bev_iou_threshold(class),
                range: spec.range,
                num_gt: result.map_or(0, |c| c.num_gt),
                num_detections: counted.iter().map(|(_, d)| d.len()).sum(),
                by_distance,
            },
        );
    }
    let by_distance = bands
        .iter()
        .map(|(band, r)| {
            let name = band_name(*band);
            (
                name.clone(),
                BandSummary {
                    map: (!r.classes.is_empty()).then_some(r.map),
                    bev_iou_map: mean(per_class.values().map(|c| c.by_distance[&name].bev_iou_ap)),
                    num_gt: r.classes.iter().map(|c| c.num_gt).sum(),
                },
            )
        })
        .collect();
    let any_gt = !overall.classes.is_empty();
    Report {
        model: model.to_string(),
        source: source.to_string(),
        frames: frames.len(),
        map: any_gt.then_some(overall.map),
        nds: any_gt.then_some(overall.nds),
        tp_errors: overall.mean_tp.clone(),
        bev_iou_map: mean(per_class.values().map(|c| c.bev_iou_ap)),
        per_class,
        by_distance,
        classes: classes.iter().map(|c| c.to_string()).collect(),
        settings: Settings {
            dist_thresholds: cfg.dist_thresholds.clone(),
            tp_threshold: cfg.tp_threshold,
            min_recall: cfg.min_recall,
            min_precision: cfg.min_precision,
            recall_points_nuscenes: 101,
            recall_points_bev_iou: 40,
            distance_bands: DISTANCE_BANDS.iter().map(|&b| band_name(b)).collect(),
        },
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or("-".into(), |x| format!("{x:.3}"))
}

impl Report {
    /// A fixed-width table: one row per class, then the means and the bands.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "model {}, {} frames from {}",
            self.model, self.frames, self.source
        );
        let bands = &self.settings.distance_bands;
        let w = self
            .classes
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0)
            .max(5);
        let _ = write!(
            s,
            "{:<w$} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}",
            "class",
            "gt",
            "dets",
            "AP",
            "@0.5",
            "@1",
            "@2",
            "@4",
            "ATE",
            "ASE",
            "AOE",
            "AVE",
            "BEV-AP"
        );
        for b in bands {
            let _ = write!(s, " {:>7}", format!("AP{b}"));
        }
        s.push('\n');
        for name in &self.classes {
            let c = &self.per_class[name];
            let at = |k: &str| num(c.ap_by_threshold.get(k).copied());
            let _ = write!(
                s,
                "{:<w$} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7}",
                name,
                c.num_gt,
                c.num_detections,
                num(c.ap),
                at("0.5"),
                at("1.0"),
                at("2.0"),
                at("4.0"),
                num(c.tp_errors.ate),
                num(c.tp_errors.ase),
                num(c.tp_errors.aoe),
                num(c.tp_errors.ave),
                format!("{}@{}", num(c.bev_iou_ap), c.bev_iou_threshold)
            );
            for b in bands {
                let _ = write!(s, " {:>7}", num(c.by_distance[b].ap));
            }
            s.push('\n');
        }
        let _ = writeln!(
            s,
            "mAP {}  NDS {}  BEV IoU mAP {}",
            num(self.map),
            num(self.nds),
            num(self.bev_iou_map)
        );
        let _ = write!(s, "by distance:");
        for b in bands {
            let d = &self.by_distance[b];
            let _ = write!(s, "  {b} m: mAP {} ({} gt)", num(d.map), d.num_gt);
        }
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;

    fn obj(class: &str, x: f32, y: f32, points: Option<u32>) -> Object {
        Object {
            bbox: Box3d {
                center: [x, y, 0.0],
                size: [4.0, 2.0, 1.5],
                yaw: 0.2,
            },
            class: class.into(),
            velocity: None,
            num_points: points,
        }
    }

    fn det(o: &Object, dx: f32, score: f32) -> Detection {
        let mut bbox = o.bbox;
        bbox.center[0] += dx;
        Detection {
            bbox,
            class: o.class.clone(),
            score,
            velocity: None,
        }
    }

    #[test]
    fn perfect_shifted_and_banded() {
        // Cars at 10, 40 and 60 m (the last beyond the 50 m class range), one empty car,
        // and a pedestrian nobody detects.
        let gt = vec![
            obj("car", 10.0, 0.0, Some(50)),
            obj("car", 0.0, 40.0, Some(20)),
            obj("car", -60.0, 0.0, Some(5)),
            obj("car", 5.0, 5.0, Some(0)),
            obj("pedestrian", 3.0, -3.0, None),
        ];
        let dets = vec![
            det(&gt[0], 0.0, 0.9),
            // 1.5 m off: a hit at 2 and 4 m only, and BEV IoU about 0.37 < 0.7.
            det(&gt[1], 1.5, 0.8),
            det(&gt[2], 0.0, 0.7),
        ];
        let frames = [Frame {
            gt: &gt,
            detections: &dets,
        }];
        let r = score(&frames, &["car", "pedestrian", "cyclist"], "m", "test");
        let car = &r.per_class["car"];
        assert_eq!(car.num_gt, 2);
        assert_eq!(car.num_detections, 2);
        // Thresholds 0.5 / 1 m: TP then FP over two objects, (recall, precision) = (0.5, 1),
        // (0.5, 0.5): recall points 0.11..0.49 at precision 1, 0.5 at the FP's 0.5 (the
        // last of repeated recalls), none above. 2 / 4 m: both TP.
        let half = (39.0 * 0.9 + 0.4) / 90.0 / 0.9;
        for (k, want) in [("0.5", half), ("1.0", half), ("2.0", 1.0), ("4.0", 1.0)] {
            assert!((car.ap_by_threshold[k] - want).abs() < 1e-9, "{k}: {car:?}");
        }
        assert!((car.ap.unwrap() - (half + 1.0) / 2.0).abs() < 1e-9);
        // Recall: one car of two within 0.5 and 1 m, both within 2 and 4 m; the missed
        // pedestrian none.
        for (k, want) in [("0.5", 0.5), ("1.0", 0.5), ("2.0", 1.0), ("4.0", 1.0)] {
            assert_eq!(car.recall_by_threshold[k], want, "{k}");
        }
        assert_eq!(r.per_class["pedestrian"].recall_by_threshold["2.0"], 0.0);
        // BEV IoU 0.7: only the first car matches: 20 of 40 recall points at precision 1.
        assert!((car.bev_iou_ap.unwrap() - 0.5).abs() < 1e-12);
        // Bands ignore the class range: the 60 m car is found in 50+.
        let one = |v: Option<f64>| (v.unwrap() - 1.0).abs() < 1e-12;
        assert!(one(car.by_distance["0-30"].ap));
        assert_eq!(car.by_distance["0-30"].num_gt, 1);
        assert_eq!(car.by_distance["50+"].num_gt, 1);
        assert!(one(car.by_distance["50+"].ap));
        assert!(one(car.by_distance["50+"].bev_iou_ap));
        let mid = &car.by_distance["30-50"];
        assert!((mid.ap.unwrap() - 0.5).abs() < 1e-9 && mid.bev_iou_ap == Some(0.0));
        // The missed pedestrian: AP 0; the cyclist has no ground truth: null, not in mAP.
        assert_eq!(r.per_class["pedestrian"].ap, Some(0.0));
        assert_eq!(r.per_class["cyclist"].ap, None);
        assert_eq!(r.per_class["cyclist"].num_gt, 0);
        assert!((r.map.unwrap() - car.ap.unwrap() / 2.0).abs() < 1e-12);
        assert!((r.bev_iou_map.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(r.by_distance["50+"].num_gt, 1);

        let json = serde_json::to_value(&r).unwrap();
        assert!(json["per_class"]["cyclist"]["AP"].is_null());
        let at2 = json["per_class"]["car"]["AP_by_threshold"]["2.0"]
            .as_f64()
            .unwrap();
        assert!((at2 - 1.0).abs() < 1e-12);
        assert_eq!(json["frames"], 1);
        let table = r.to_table();
        assert!(
            table.contains("pedestrian") && table.contains("mAP"),
            "{table}"
        );
    }

    #[test]
    fn no_ground_truth_means_null_scores() {
        let dets = vec![det(&obj("car", 1.0, 1.0, None), 0.0, 0.5)];
        let frames = [Frame {
            gt: &[],
            detections: &dets,
        }];
        let r = score(&frames, &["car"], "m", "none");
        assert_eq!((r.map, r.nds, r.bev_iou_map), (None, None, None));
        let json = serde_json::to_string(&r).unwrap();
        assert!(json.contains("\"mAP\":null"), "{json}");
    }

    #[test]
    fn band_names() {
        let names: Vec<String> = DISTANCE_BANDS.iter().map(|&b| band_name(b)).collect();
        assert_eq!(names, ["0-30", "30-50", "50+"]);
    }
}
