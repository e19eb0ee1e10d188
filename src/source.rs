//! Where scans come from: dataset files (KITTI, nuScenes, PCD) or rosbag2 recordings, each
//! turned into plain points plus whatever ground truth travels with them. The bag side
//! pairs each `sensor_msgs/PointCloud2` with the `vision_msgs/Detection3DArray` of the
//! same stamp when the bag has one (as `lidar_ptq simulate` writes).

use crate::bag::{Bag, BagError};
use crate::boxes::Object;
use crate::cloud::{CloudError, DecodeOptions, POINTCLOUD2_TYPE, PointCloud2, decode};
use crate::dataset::{self, DatasetError, Scan};
use crate::msgs::{DETECTION3D_ARRAY_TYPE, Detection3DArray, Header};
use std::collections::BTreeMap;
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SourceError {
    #[error(transparent)]
    Bag(#[from] BagError),
    #[error(transparent)]
    Dataset(#[from] DatasetError),
    #[error("bag {bag}: message {index} on {topic} is not a valid PointCloud2: {source}")]
    Cloud {
        bag: String,
        topic: String,
        index: usize,
        source: CloudError,
    },
    #[error("bag {bag}: {message}")]
    Topic { bag: String, message: String },
    #[error("bag {bag}: ground truth at {stamp_ns} ns is not a valid Detection3DArray: {message}")]
    GroundTruth {
        bag: String,
        stamp_ns: u64,
        message: String,
    },
}

/// A scan read from a bag.
#[derive(Debug, Clone)]
pub struct BagScan {
    pub header: Header,
    pub scan: Scan,
    /// Points dropped by the decoder (NaN/Inf).
    pub dropped_non_finite: usize,
}

/// Whether a path looks like a bag (a directory, or a `.mcap` / `.db3` file).
pub fn is_bag(path: &Path) -> bool {
    path.is_dir()
        || matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("mcap" | "db3" | "zstd")
        )
}

fn topic_of_type(
    bag: &Bag,
    path: &Path,
    wanted: Option<&str>,
    type_name: &str,
) -> Result<Option<String>, SourceError> {
    if let Some(t) = wanted {
        let info = bag.topic(t).ok_or_else(|| SourceError::Topic {
            bag: path.display().to_string(),
            message: format!("has no topic {t}"),
        })?;
        if info.type_name != type_name {
            return Err(SourceError::Topic {
                bag: path.display().to_string(),
                message: format!("topic {t} carries {}, not {type_name}", info.type_name),
            });
        }
        return Ok(Some(t.to_owned()));
    }
    Ok(bag
        .topics()
        .iter()
        .find(|t| t.type_name == type_name)
        .map(|t| t.name.clone()))
}

/// Reads the PointCloud2 scans of a bag in time order, with matching ground truth when a
/// Detection3DArray topic exists. `topic` defaults to the first PointCloud2 topic.
/// `select` picks which scans (by index in time order) are decoded; others are skipped
/// cheaply.
pub fn read_bag_scans(
    path: &Path,
    topic: Option<&str>,
    opts: &DecodeOptions,
    mut select: impl FnMut(usize) -> bool,
) -> Result<Vec<BagScan>, SourceError> {
    let bag = Bag::open(path)?;
    let name = path.display().to_string();
    let cloud_topic =
        topic_of_type(&bag, path, topic, POINTCLOUD2_TYPE)?.ok_or_else(|| SourceError::Topic {
            bag: name.clone(),
            message: "has no sensor_msgs/msg/PointCloud2 topic".into(),
        })?;
    let gt_topic = topic_of_type(&bag, path, None, DETECTION3D_ARRAY_TYPE)?;
    let mut topics = vec![cloud_topic.clone()];
    topics.extend(gt_topic.clone());
    let mut scans = Vec::new();
    let mut truth: BTreeMap<u64, Vec<Object>> = BTreeMap::new();
    let mut index = 0;
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    for msg in bag.messages(&topic_refs)? {
        let msg = msg?;
        if msg.topic == cloud_topic {
            let i = index;
            index += 1;
            if !select(i) {
                continue;
            }
            let cloud = PointCloud2::from_cdr(&msg.data).map_err(|source| SourceError::Cloud {
                bag: name.clone(),
                topic: cloud_topic.clone(),
                index: i,
                source,
            })?;
            let decoded = decode(&cloud, opts).map_err(|source| SourceError::Cloud {
                bag: name.clone(),
                topic: cloud_topic.clone(),
                index: i,
                source,
            })?;
            scans.push(BagScan {
                header: cloud.header,
                scan: Scan {
                    points: decoded.points,
                    objects: Vec::new(),
                    labels: None,
                },
                dropped_non_finite: decoded.dropped_non_finite,
            });
        } else {
            let arr =
                Detection3DArray::from_cdr(&msg.data).map_err(|e| SourceError::GroundTruth {
                    bag: name.clone(),
                    stamp_ns: msg.timestamp_ns.max(0) as u64,
                    message: e.to_string(),
                })?;
            truth.insert(arr.header.stamp_nanos(), arr.to_objects());
        }
    }
    for s in &mut scans {
        if let Some(objs) = truth.remove(&s.header.stamp_nanos()) {
            s.scan.objects = objs;
        }
    }
    Ok(scans)
}

/// One scan with its labels from a dataset file, or scan `index` of a bag.
pub fn load_scan(
    path: &Path,
    labels: Option<&Path>,
    calib: Option<&Path>,
    topic: Option<&str>,
    index: usize,
) -> Result<Scan, SourceError> {
    if !is_bag(path) {
        return Ok(dataset::load_scan(path, labels, calib)?);
    }
    let mut scans = read_bag_scans(path, topic, &DecodeOptions::default(), |i| i == index)?;
    scans
        .pop()
        .map(|s| s.scan)
        .ok_or_else(|| SourceError::Topic {
            bag: path.display().to_string(),
            message: format!("has no scan with index {index}"),
        })
}
