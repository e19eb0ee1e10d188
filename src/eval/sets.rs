//! Evaluation sets: where labelled frames come from (a bag with ground truth, a KITTI
//! directory, the simulator's held-out stream) and running a detector over them, frame by
//! frame, into (ground truth, detections) pairs for [`super::score`].
//!
//! Rules that make the sources comparable:
//! - Ground truth that does not say how many points it holds (bags, KITTI) gets the count
//!   of scan points inside its box, so objects without a single point are left out as
//!   nuScenes leaves them out.
//! - KITTI labels exist only inside camera 2's image. Ground truth and detections are
//!   both restricted to boxes whose centre projects into that image (P2 of the frame's
//!   calibration, KITTI's 1242 x 375 px, in front of the camera); the network still sees
//!   the whole 360-degree scan. Only the classes KITTI labels map to are scored (Car ->
//!   car, Pedestrian -> pedestrian, Cyclist -> cyclist, when the model has them), and
//!   as in KITTI's own evaluation a car detection on a labelled van, or a pedestrian
//!   detection on a sitting person, is dropped instead of counted as a false positive.

use super::Frame;
use super::report::{Report, score};
use crate::boxes::{Detection, Object};
use crate::cloud::{DecodeOptions, Points};
use crate::dataset::kitti::{self, Calib, KittiError};
use crate::detector::{Detector, DetectorError};
use crate::msgs::DETECTION3D_ARRAY_TYPE;
use crate::sim::LidarModel;
use crate::source::{BagScanReader, SourceError};
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EvalSetError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error(transparent)]
    Kitti(#[from] KittiError),
    #[error(
        "bag {bag} has no {DETECTION3D_ARRAY_TYPE} topic: there is no ground truth to evaluate against"
    )]
    NoLabels { bag: String },
    #[error("bag {bag}: no scan on {topic} has a ground-truth message on {labels} with its stamp")]
    NoLabelledScans {
        bag: String,
        topic: String,
        labels: String,
    },
    #[error("KITTI directory {dir}: {message}")]
    KittiLayout { dir: PathBuf, message: String },
    #[error("class {class:?} is not one of the classes scored here ({scored})")]
    UnknownClass { class: String, scored: String },
    #[error("model {model} detects none of the classes {dataset} labels ({labels})")]
    NoClasses {
        model: String,
        dataset: String,
        labels: String,
    },
}

/// Where the evaluation frames come from.
#[derive(Debug, Clone)]
pub enum EvalSet {
    /// A rosbag2 bag with PointCloud2 scans and Detection3DArray ground truth of the same
    /// stamps (as `lidar_ptq simulate` writes); topics default to the first of each type.
    Bag {
        path: PathBuf,
        topic: Option<String>,
        labels_topic: Option<String>,
    },
    /// A KITTI object directory with `velodyne/`, `label_2/` and `calib/` (or its parent
    /// holding `training/`).
    Kitti { dir: PathBuf },
    /// The simulator's evaluation stream ([`crate::train::sim_eval::eval_frames`]).
    Sim {
        lidar: LidarModel,
        frames: usize,
        seed: u64,
    },
}

/// Ground truth and detections of one frame, owned.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalFrame {
    pub gt: Vec<Object>,
    pub detections: Vec<Detection>,
}

/// A detector's output over an evaluation set.
#[derive(Debug, Clone)]
pub struct EvalRun {
    pub frames: Vec<EvalFrame>,
    /// The classes scored, in the model's order.
    pub classes: Vec<String>,
    /// The set, described for the report.
    pub source: String,
}

impl EvalRun {
    /// Keeps only the classes in `only` (model order), each of which must be scored by
    /// this run: comparing models with different class sets on the classes they share.
    pub fn restrict_classes(&mut self, only: &[String]) -> Result<(), EvalSetError> {
        if let Some(c) = only.iter().find(|c| !self.classes.contains(c)) {
            return Err(EvalSetError::UnknownClass {
                class: c.clone(),
                scored: self.classes.join(", "),
            });
        }
        if only.is_empty() {
            return Err(EvalSetError::UnknownClass {
                class: String::new(),
                scored: self.classes.join(", "),
            });
        }
        self.classes.retain(|c| only.contains(c));
        Ok(())
    }

    pub fn score(&self, model: &str) -> Report {
        let views: Vec<Frame<'_>> = self
            .frames
            .iter()
            .map(|f| Frame {
                gt: &f.gt,
                detections: &f.detections,
            })
            .collect();
        let classes: Vec<&str> = self.classes.iter().map(String::as_str).collect();
        score(&views, &classes, model, &self.source)
    }
}

/// Fills in `num_points` (points inside the box) where the source left it unknown.
pub fn count_points(points: &Points, objects: &mut [Object]) {
    for o in objects.iter_mut().filter(|o| o.num_points.is_none()) {
        let n = (0..points.len())
            .filter(|&i| o.bbox.contains(points.xyz(i)))
            .count();
        o.num_points = Some(n as u32);
    }
}

/// Runs `detector` over the set (at most `max_frames` labelled frames), ticking
/// `progress` once per frame (its length is set here).
pub fn run(
    detector: &mut Detector,
    set: &EvalSet,
    max_frames: Option<usize>,
    progress: &indicatif::ProgressBar,
) -> Result<EvalRun, EvalSetError> {
    let limit = max_frames.unwrap_or(usize::MAX);
    let model_classes: Vec<String> = detector
        .config()
        .classes()
        .iter()
        .map(|c| c.to_string())
        .collect();
    match set {
        EvalSet::Bag {
            path,
            topic,
            labels_topic,
        } => run_bag(
            detector,
            path,
            topic.as_deref(),
            labels_topic.as_deref(),
            limit,
            progress,
        )
        .map(|(frames, source)| EvalRun {
            frames,
            classes: model_classes,
            source,
        }),
        EvalSet::Kitti { dir } => run_kitti(detector, dir, limit, progress),
        EvalSet::Sim {
            lidar,
            frames,
            seed,
        } => {
            let n = (*frames).min(limit);
            let data = crate::train::sim_eval::eval_frames(*lidar, n, *seed);
            progress.set_length(n as u64);
            let mut out = Vec::with_capacity(n);
            for (points, gt) in data {
                out.push(EvalFrame {
                    detections: detector.detect(&points)?,
                    gt,
                });
                progress.inc(1);
            }
            Ok(EvalRun {
                frames: out,
                classes: model_classes,
                source: format!("simulated {} scans, evaluation seed {seed}", lidar.name()),
            })
        }
    }
}

fn run_bag(
    detector: &mut Detector,
    path: &Path,
    topic: Option<&str>,
    labels_topic: Option<&str>,
    limit: usize,
    progress: &indicatif::ProgressBar,
) -> Result<(Vec<EvalFrame>, String), EvalSetError> {
    let bag = path.display().to_string();
    let reader = BagScanReader::open(path, topic, labels_topic, &DecodeOptions::default())?;
    let labels = reader
        .labels_topic()
        .ok_or_else(|| EvalSetError::NoLabels { bag: bag.clone() })?
        .to_string();
    let cloud_topic = reader.cloud_topic().to_string();
    progress.set_length(reader.scan_count().min(limit as u64));
    let mut frames = Vec::new();
    let mut unlabelled = 0usize;
    for s in reader {
        if frames.len() >= limit {
            break;
        }
        let s = s?;
        let Some(mut gt) = s.ground_truth else {
            unlabelled += 1;
            continue;
        };
        count_points(&s.scan.scan.points, &mut gt);
        frames.push(EvalFrame {
            detections: detector.detect(&s.scan.scan.points)?,
            gt,
        });
        progress.inc(1);
    }
    if unlabelled > 0 {
        log::warn!(
            "{bag}: {unlabelled} scans on {cloud_topic} have no ground truth on {labels} and were left out"
        );
    }
    if frames.is_empty() {
        return Err(EvalSetError::NoLabelledScans {
            bag,
            topic: cloud_topic,
            labels,
        });
    }
    Ok((
        frames,
        format!("bag {bag} (scans {cloud_topic}, ground truth {labels})"),
    ))
}

/// KITTI classes and the model classes they are scored as.
const KITTI_CLASSES: [&str; 3] = ["car", "pedestrian", "cyclist"];

/// Label classes whose boxes swallow detections of a class instead of making them false
/// positives (KITTI's neighbouring classes).
fn kitti_neighbours(class: &str) -> &'static [&'static str] {
    match class {
        "car" => &["van"],
        "pedestrian" => &["person_sitting"],
        _ => &[],
    }
}

/// KITTI camera 2's image size in pixels (the object set's images are 1224-1242 by
/// 370-376; the widest is used).
pub const KITTI_IMAGE_SIZE: [f64; 2] = [1242.0, 375.0];

/// Whether a lidar-frame point lies in front of camera 2 and projects into its image.
pub fn in_camera_fov(calib: &Calib, p: [f32; 3]) -> bool {
    let m = calib.velo_to_rect();
    let h = [p[0] as f64, p[1] as f64, p[2] as f64, 1.0];
    let rect: Vec<f64> = (0..3)
        .map(|r| (0..4).map(|k| m[r][k] * h[k]).sum())
        .chain([1.0])
        .collect();
    if rect[2] <= 0.0 {
        return false;
    }
    let p2 = &calib.p[2];
    let row = |r: usize| (0..4).map(|k| p2[4 * r + k] * rect[k]).sum::<f64>();
    let w = row(2);
    if w <= 0.0 {
        return false;
    }
    let (u, v) = (row(0) / w, row(1) / w);
    (0.0..KITTI_IMAGE_SIZE[0]).contains(&u) && (0.0..KITTI_IMAGE_SIZE[1]).contains(&v)
}

/// The frames of a KITTI directory: (id, scan, labels, calib), in id order; scans
/// without labels or calibration are skipped.
pub fn kitti_frames(dir: &Path) -> Result<Vec<(String, PathBuf, PathBuf, PathBuf)>, EvalSetError> {
    let root = if dir.join("velodyne").is_dir() {
        dir.to_path_buf()
    } else if dir.join("training/velodyne").is_dir() {
        dir.join("training")
    } else {
        return Err(EvalSetError::KittiLayout {
            dir: dir.to_path_buf(),
            message: "has no velodyne/ (nor training/velodyne/) directory".into(),
        });
    };
    let layout = |message: String| EvalSetError::KittiLayout {
        dir: dir.to_path_buf(),
        message,
    };
    let entries = std::fs::read_dir(root.join("velodyne"))
        .map_err(|e| layout(format!("cannot list velodyne/: {e}")))?;
    let mut scans: Vec<PathBuf> = Vec::new();
    for e in entries {
        let p = e
            .map_err(|e| layout(format!("cannot list velodyne/: {e}")))?
            .path();
        if p.extension().and_then(|x| x.to_str()) == Some("bin") {
            scans.push(p);
        }
    }
    scans.sort();
    let mut out = Vec::new();
    let mut skipped = 0;
    for scan in scans {
        let id = scan
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or_default()
            .to_string();
        match kitti::sibling_files(&scan) {
            (Some(labels), Some(calib)) => out.push((id, scan, labels, calib)),
            _ => skipped += 1,
        }
    }
    if skipped > 0 {
        log::warn!(
            "{}: {skipped} scans without label_2/ or calib/ files were left out",
            root.display()
        );
    }
    if out.is_empty() {
        return Err(layout(
            "has no velodyne/*.bin scan with its label_2/ and calib/ files".into(),
        ));
    }
    Ok(out)
}

fn run_kitti(
    detector: &mut Detector,
    dir: &Path,
    limit: usize,
    progress: &indicatif::ProgressBar,
) -> Result<EvalRun, EvalSetError> {
    let model_classes = detector.config().classes();
    let classes: Vec<String> = model_classes
        .iter()
        .filter(|c| KITTI_CLASSES.contains(c))
        .map(|c| c.to_string())
        .collect();
    if classes.is_empty() {
        return Err(EvalSetError::NoClasses {
            model: detector.config().name.clone(),
            dataset: "KITTI".into(),
            labels: KITTI_CLASSES.join(", "),
        });
    }
    let list = kitti_frames(dir)?;
    let n = list.len().min(limit);
    progress.set_length(n as u64);
    let mut frames = Vec::with_capacity(n);
    for (_, scan, labels, calib_path) in list.into_iter().take(n) {
        let points = kitti::read_velodyne(&scan)?;
        let calib = Calib::read(&calib_path)?;
        let mut gt =
            kitti::labels_to_objects(&kitti::read_labels(&labels)?, &calib).ok_or_else(|| {
                KittiError::CalibSingular {
                    path: calib_path.clone(),
                }
            })?;
        gt.retain(|o| in_camera_fov(&calib, o.bbox.center));
        count_points(&points, &mut gt);
        let mut detections = detector.detect(&points)?;
        detections.retain(|d| {
            in_camera_fov(&calib, d.bbox.center)
                && !gt.iter().any(|o| {
                    kitti_neighbours(&d.class).contains(&o.class.as_str())
                        && o.bbox
                            .contains([d.bbox.center[0], d.bbox.center[1], o.bbox.center[2]])
                })
        });
        frames.push(EvalFrame { gt, detections });
        progress.inc(1);
    }
    Ok(EvalRun {
        frames,
        classes,
        source: format!("KITTI {} (camera 2 field of view)", dir.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KITTI's nominal axes (camera x = -lidar y, y = -lidar z, z = lidar x) with a
    /// pinhole of focal 700 px centred in the image.
    fn nominal() -> Calib {
        let mut p2 = [0.0; 12];
        p2[0] = 700.0;
        p2[2] = 621.0;
        p2[5] = 700.0;
        p2[6] = 187.5;
        p2[10] = 1.0;
        Calib {
            p: [p2; 4],
            r0_rect: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            tr_velo_to_cam: [0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            tr_imu_to_velo: None,
        }
    }

    #[test]
    fn field_of_view_follows_the_projection() {
        let c = nominal();
        // Half the horizontal field of view: atan(621 / 700) = 41.6 degrees.
        let half = (621.0f32 / 700.0).atan();
        let at = |deg: f32, r: f32| {
            let a = (half.to_degrees() + deg).to_radians();
            [r * a.cos(), r * a.sin(), 0.0]
        };
        assert!(in_camera_fov(&c, [20.0, 0.0, -1.0]));
        assert!(in_camera_fov(&c, at(-1.0, 30.0)));
        assert!(!in_camera_fov(&c, at(1.0, 30.0)));
        assert!(!in_camera_fov(&c, [-20.0, 0.0, 0.0]), "behind the camera");
        assert!(!in_camera_fov(&c, [0.0, 20.0, 0.0]), "beside it");
        // Vertically: 187.5 px = 700 px * z / x, so z = 0.268 x is the top edge.
        assert!(in_camera_fov(&c, [10.0, 0.0, 2.6]));
        assert!(!in_camera_fov(&c, [10.0, 0.0, 2.8]));
    }

    #[test]
    fn counts_points_only_where_unknown() {
        let mut pts = Points::default();
        for x in [0.0, 0.5, 3.0] {
            pts.push(x, 0.0, 0.0, 0.0);
        }
        let bbox = crate::boxes::Box3d {
            center: [0.0, 0.0, 0.0],
            size: [2.0, 2.0, 2.0],
            yaw: 0.0,
        };
        let mut objs = vec![
            Object {
                bbox,
                class: "car".into(),
                velocity: None,
                num_points: None,
            },
            Object {
                bbox,
                class: "car".into(),
                velocity: None,
                num_points: Some(9),
            },
        ];
        count_points(&pts, &mut objs);
        assert_eq!(objs[0].num_points, Some(2));
        assert_eq!(objs[1].num_points, Some(9));
    }
}
