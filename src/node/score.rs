//! Scoring the node's output against a recording's ground truth: the detections a
//! subscriber collected (JSON, one entry per Detection3DArray), the same model run
//! offline over the same bag with the same output filter, and nuScenes mAP of both over
//! the frames the node answered. The end-to-end test compares the two.

use super::engine::DetectEngine;
use super::output;
use super::params::NodeParams;
use crate::boxes::{Detection, Object};
use crate::detector::DetectorError;
use crate::eval::{ClassSpec, Frame, NuscenesConfig, nuscenes_eval};
use crate::source::{BagScan, SourceError, read_bag_scans};
use crate::train::sim_eval::class_range;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ScoreError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error("collected detections: {0}")]
    Collected(String),
}

/// One output message of the node as a subscriber saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CollectedFrame {
    /// The header stamp (copied from the input cloud).
    pub stamp_ns: u64,
    pub frame_id: String,
    pub detections: Vec<Detection>,
}

/// Scores of one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Score {
    /// nuScenes mAP of the collected detections over the frames they answer.
    #[serde(rename = "mAP")]
    pub map: f64,
    /// The same for the model run offline over the same frames.
    #[serde(rename = "offline_mAP")]
    pub offline_map: f64,
    /// The model run offline over every scan of the bag (what `lidar_ptq eval` reports).
    #[serde(rename = "offline_mAP_all_frames")]
    pub offline_map_all: f64,
    /// Frames scored (those the node answered).
    pub frames_scored: usize,
    /// Scans in the bag.
    pub frames_in_bag: usize,
    /// Scored frames whose collected detections equal the offline ones (class, score,
    /// box; yaw within 1e-4 rad, as it passes through a quaternion).
    pub frames_identical: usize,
    /// Collected frames whose frame_id differs from the input cloud's.
    pub frame_id_mismatches: usize,
}

/// The model's outputs over every scan of a bag, filtered as the node filters them.
pub fn detect_offline(
    engine: &mut dyn DetectEngine,
    scans: &[BagScan],
    params: &NodeParams,
    progress: &indicatif::ProgressBar,
) -> Result<Vec<CollectedFrame>, DetectorError> {
    scans
        .iter()
        .map(|s| {
            // As the node: an empty scan has no detections (the detector is not run).
            let dets = if s.scan.points.is_empty() {
                Vec::new()
            } else {
                output::filter(engine.detect(&s.scan.points)?, params)
            };
            progress.inc(1);
            Ok(CollectedFrame {
                stamp_ns: s.header.stamp_nanos(),
                frame_id: s.header.frame_id.clone(),
                detections: dets,
            })
        })
        .collect()
}

fn same_detections(a: &[Detection], b: &[Detection]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            let dyaw = (x.bbox.yaw - y.bbox.yaw).rem_euclid(std::f32::consts::TAU);
            x.class == y.class
                && x.score == y.score
                && x.bbox.center == y.bbox.center
                && x.bbox.size == y.bbox.size
                && dyaw.min(std::f32::consts::TAU - dyaw) < 1e-4
        })
}

fn map_over(truth: &[&[Object]], dets: &[&[Detection]], classes: &[&str]) -> f64 {
    let cfg = NuscenesConfig {
        classes: classes
            .iter()
            .map(|c| ClassSpec::new(c, class_range(c)))
            .collect(),
        ..NuscenesConfig::default()
    };
    let frames: Vec<Frame<'_>> = truth
        .iter()
        .zip(dets)
        .map(|(&gt, &d)| Frame { gt, detections: d })
        .collect();
    nuscenes_eval(&frames, &cfg).map
}

/// Scores collected frames against the bag's ground truth and the offline run. Every
/// collected stamp must be a scan of the bag, at most once.
pub fn score(
    scans: &[BagScan],
    collected: &[CollectedFrame],
    offline: &[CollectedFrame],
    classes: &[&str],
) -> Result<Score, ScoreError> {
    let by_stamp: BTreeMap<u64, usize> = scans
        .iter()
        .enumerate()
        .map(|(i, s)| (s.header.stamp_nanos(), i))
        .collect();
    let offline_by_stamp: BTreeMap<u64, &CollectedFrame> =
        offline.iter().map(|f| (f.stamp_ns, f)).collect();
    let mut seen = std::collections::BTreeSet::new();
    let (mut truth, mut node, mut off) = (Vec::new(), Vec::new(), Vec::new());
    let (mut identical, mut frame_mismatch) = (0, 0);
    for f in collected {
        let &i = by_stamp.get(&f.stamp_ns).ok_or_else(|| {
            ScoreError::Collected(format!(
                "stamp {} ns is not a scan of the bag (headers must be copied from the input)",
                f.stamp_ns
            ))
        })?;
        if !seen.insert(f.stamp_ns) {
            return Err(ScoreError::Collected(format!(
                "stamp {} ns answered twice",
                f.stamp_ns
            )));
        }
        let o = offline_by_stamp.get(&f.stamp_ns).ok_or_else(|| {
            ScoreError::Collected(format!("no offline result for stamp {}", f.stamp_ns))
        })?;
        if f.frame_id != scans[i].header.frame_id {
            frame_mismatch += 1;
        }
        if same_detections(&f.detections, &o.detections) {
            identical += 1;
        }
        truth.push(scans[i].scan.objects.as_slice());
        node.push(f.detections.as_slice());
        off.push(o.detections.as_slice());
    }
    let mut all_truth = Vec::with_capacity(scans.len());
    let mut all_off = Vec::with_capacity(scans.len());
    for s in scans {
        let o = offline_by_stamp
            .get(&s.header.stamp_nanos())
            .ok_or_else(|| {
                ScoreError::Collected(format!(
                    "no offline result for stamp {}",
                    s.header.stamp_nanos()
                ))
            })?;
        all_truth.push(s.scan.objects.as_slice());
        all_off.push(o.detections.as_slice());
    }
    Ok(Score {
        map: map_over(&truth, &node, classes),
        offline_map: map_over(&truth, &off, classes),
        offline_map_all: map_over(&all_truth, &all_off, classes),
        frames_scored: collected.len(),
        frames_in_bag: scans.len(),
        frames_identical: identical,
        frame_id_mismatches: frame_mismatch,
    })
}

/// Reads a bag's scans (decoded as the node decodes them) with their ground truth, each
/// object's point count filled in as `lidar_ptq eval` does (objects without a single
/// point are not scored, as in nuScenes).
pub fn read_scans(bag: &Path, params: &NodeParams) -> Result<Vec<BagScan>, ScoreError> {
    let mut scans = read_bag_scans(bag, None, &params.decode_options(), |_| true)?;
    for s in &mut scans {
        crate::eval::sets::count_points(&s.scan.points, &mut s.scan.objects);
    }
    Ok(scans)
}

/// Parses collected frames (a JSON array).
pub fn parse_collected(text: &str) -> Result<Vec<CollectedFrame>, ScoreError> {
    serde_json::from_str(text).map_err(|e| ScoreError::Collected(format!("not valid JSON: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;
    use crate::dataset::Scan;
    use crate::msgs::Header;

    fn obj(class: &str, x: f32) -> Object {
        Object {
            bbox: Box3d {
                center: [x, 0.0, 0.0],
                size: [4.0, 2.0, 1.5],
                yaw: 0.0,
            },
            class: class.into(),
            velocity: None,
            num_points: None,
        }
    }

    fn det(o: &Object, score: f32) -> Detection {
        Detection {
            bbox: o.bbox,
            class: o.class.clone(),
            score,
            velocity: None,
        }
    }

    fn bag_scan(stamp: u64, objects: Vec<Object>) -> BagScan {
        BagScan {
            header: Header::from_nanos(stamp, "lidar"),
            scan: Scan {
                points: Default::default(),
                objects,
                labels: None,
            },
            dropped_non_finite: 0,
        }
    }

    fn frame(stamp: u64, dets: Vec<Detection>) -> CollectedFrame {
        CollectedFrame {
            stamp_ns: stamp,
            frame_id: "lidar".into(),
            detections: dets,
        }
    }

    #[test]
    fn perfect_and_missing_answers_score_as_expected() {
        let scans = vec![
            bag_scan(100, vec![obj("car", 10.0)]),
            bag_scan(200, vec![obj("car", 20.0)]),
        ];
        let offline = vec![
            frame(100, vec![det(&scans[0].scan.objects[0], 0.9)]),
            frame(200, vec![]),
        ];
        // The node answered both: the first perfectly, the second with nothing.
        let collected = offline.clone();
        let s = score(&scans, &collected, &offline, &["car"]).unwrap();
        assert_eq!(s.frames_scored, 2);
        assert_eq!(s.frames_identical, 2);
        assert_eq!(s.map, s.offline_map);
        // One of two cars found at full precision: AP is the area under a precision-1
        // curve up to recall 0.5, less nuScenes' first 10 % of recall.
        assert!(s.map > 0.3 && s.map < 0.5, "{}", s.map);
        // Only the first frame answered: a perfect score over the frames answered.
        let s = score(&scans, &collected[..1], &offline, &["car"]).unwrap();
        assert!((s.map - 1.0).abs() < 1e-9, "{}", s.map);
        // A different answer is noticed.
        let worse = vec![frame(100, vec![])];
        let s = score(&scans, &worse, &offline, &["car"]).unwrap();
        assert_eq!(s.frames_identical, 0);
        assert_eq!(s.map, 0.0);
        assert!(s.offline_map > 0.99);
    }

    #[test]
    fn foreign_or_repeated_stamps_are_errors() {
        let scans = vec![bag_scan(100, vec![])];
        let offline = vec![frame(100, vec![])];
        let e = score(&scans, &[frame(5, vec![])], &offline, &["car"]).unwrap_err();
        assert!(e.to_string().contains("not a scan of the bag"), "{e}");
        let e = score(
            &scans,
            &[frame(100, vec![]), frame(100, vec![])],
            &offline,
            &["car"],
        )
        .unwrap_err();
        assert!(e.to_string().contains("answered twice"), "{e}");
        let mut f = frame(100, vec![]);
        f.frame_id = "other".into();
        assert_eq!(
            score(&scans, &[f], &offline, &["car"])
                .unwrap()
                .frame_id_mismatches,
            1
        );
        assert!(parse_collected("{").is_err());
        let json = r#"[{"stamp_ns": 1, "frame_id": "l", "detections": [
            {"bbox": {"center": [1, 2, 3], "size": [4, 2, 1.5], "yaw": 0.5}, "class": "car", "score": 0.5}]}]"#;
        let c = parse_collected(json).unwrap();
        assert_eq!(c[0].detections[0].velocity, None);
    }
}
