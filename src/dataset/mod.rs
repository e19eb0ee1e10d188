//! Scans and labels from files: KITTI, nuScenes and PCD, with boxes in the lidar frame
//! (the convention of [`crate::boxes`]).
//!
//! [`load_scan`] picks the reader from the file name (`*.pcd.bin` nuScenes, `*.bin`
//! KITTI, `*.pcd` PCD) and finds the labels the dataset's layout puts beside the scan.

pub mod kitti;
mod lzf;
pub mod nuscenes;
pub mod pcd;

use std::path::{Path, PathBuf};

use thiserror::Error;

pub use lzf::{LzfError, decompress as lzf_decompress};

use crate::boxes::Object;
use crate::cloud::Points;

/// What went wrong loading a scan with its labels.
#[derive(Debug, Error)]
pub enum DatasetError {
    #[error(transparent)]
    Kitti(#[from] kitti::KittiError),
    #[error(transparent)]
    Nuscenes(#[from] nuscenes::NuscenesError),
    #[error(transparent)]
    Pcd(#[from] pcd::PcdError),
    #[error("{0}: unknown scan format (expected *.bin KITTI, *.pcd.bin nuScenes or *.pcd)")]
    UnknownFormat(PathBuf),
    #[error("{0}: unknown label format (expected KITTI *.txt or nuScenes-style *.json)")]
    UnknownLabelFormat(PathBuf),
    #[error("KITTI labels {labels} need a calib file (none given or found beside the scan)")]
    MissingCalib { labels: PathBuf },
    #[error("labels {labels} belong to {expected}, not to the scan {scan}")]
    LabelsForOtherScan {
        labels: PathBuf,
        expected: String,
        scan: PathBuf,
    },
}

/// Scan file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScanFormat {
    KittiBin,
    NuscenesBin,
    Pcd,
}

impl ScanFormat {
    /// The format a file name says, if any.
    pub fn detect(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        if name.ends_with(".pcd.bin") {
            Some(Self::NuscenesBin)
        } else if name.ends_with(".bin") {
            Some(Self::KittiBin)
        } else if name.ends_with(".pcd") {
            Some(Self::Pcd)
        } else {
            None
        }
    }
}

/// A scan with its ground-truth objects (empty when there are no labels).
#[derive(Debug, Clone)]
pub struct Scan {
    pub points: Points,
    pub objects: Vec<Object>,
    /// The label file used, if any.
    pub labels: Option<PathBuf>,
}

/// Reads the points of a scan file, choosing the reader by file name.
pub fn read_points(path: &Path) -> Result<Points, DatasetError> {
    match ScanFormat::detect(path) {
        Some(ScanFormat::KittiBin) => Ok(kitti::read_velodyne(path)?),
        Some(ScanFormat::NuscenesBin) => Ok(nuscenes::read_sweep(path)?),
        Some(ScanFormat::Pcd) => Ok(pcd::read_pcd(path)?.1),
        None => Err(DatasetError::UnknownFormat(path.to_path_buf())),
    }
}

/// Loads a scan and its labels. Explicit `labels` / `calib` win; otherwise KITTI's
/// `../label_2/<id>.txt` + `../calib/<id>.txt` and nuScenes' `labels.json` beside the
/// sweep are used when present (a `labels.json` written for another sweep is skipped
/// with a warning; given explicitly, it is an error).
pub fn load_scan(
    path: &Path,
    labels: Option<&Path>,
    calib: Option<&Path>,
) -> Result<Scan, DatasetError> {
    let format =
        ScanFormat::detect(path).ok_or_else(|| DatasetError::UnknownFormat(path.to_path_buf()))?;
    let points = read_points(path)?;
    let (auto_labels, auto_calib) = match format {
        ScanFormat::KittiBin => kitti::sibling_files(path),
        ScanFormat::NuscenesBin => {
            let json = path.with_file_name("labels.json");
            (json.is_file().then_some(json), None)
        }
        ScanFormat::Pcd => (None, None),
    };
    let explicit = labels.is_some();
    let Some(labels) = labels.map(Path::to_path_buf).or(auto_labels) else {
        return Ok(Scan {
            points,
            objects: Vec::new(),
            labels: None,
        });
    };
    let calib = calib.map(Path::to_path_buf).or(auto_calib);
    let ext = labels
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or_default()
        .to_ascii_lowercase();
    let objects = match ext.as_str() {
        "txt" => {
            let calib = calib.ok_or_else(|| DatasetError::MissingCalib {
                labels: labels.clone(),
            })?;
            kitti::read_objects(&labels, &calib)?
        }
        "json" => {
            let file = nuscenes::read_labels(&labels)?;
            let scan_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if file.lidar_file != scan_name {
                if explicit {
                    return Err(DatasetError::LabelsForOtherScan {
                        labels,
                        expected: file.lidar_file,
                        scan: path.to_path_buf(),
                    });
                }
                log::warn!(
                    "{} describes {}, not {}: drawing no labels",
                    labels.display(),
                    file.lidar_file,
                    scan_name
                );
                return Ok(Scan {
                    points,
                    objects: Vec::new(),
                    labels: None,
                });
            }
            file.boxes
                .iter()
                .map(nuscenes::LabelBox::to_object)
                .collect()
        }
        _ => return Err(DatasetError::UnknownLabelFormat(labels)),
    };
    log::info!(
        "{}: {} points, {} objects from {}",
        path.display(),
        points.len(),
        objects.len(),
        labels.display()
    );
    Ok(Scan {
        points,
        objects,
        labels: Some(labels),
    })
}
