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

/// A scan streamed from a bag, with the ground truth of its stamp when the bag has some.
#[derive(Debug, Clone)]
pub struct StreamedScan {
    /// Index of the scan on its topic, in time order.
    pub index: usize,
    /// `scan.objects` is empty; the ground truth is in `ground_truth`.
    pub scan: BagScan,
    /// Objects of the labels message with this scan's stamp; `None` when there is none
    /// (or the bag has no labels topic), which differs from a message with no objects.
    pub ground_truth: Option<Vec<Object>>,
}

/// Streams a bag's PointCloud2 scans in time order, one decoded scan at a time, each
/// paired with the `Detection3DArray` of the same header stamp. The ground truth (small)
/// is read in a first pass, so scans need not be held until their labels show up.
pub struct BagScanReader {
    // Declared before `_bag`: the message stream reads files the bag may own.
    messages: crate::bag::Messages,
    name: String,
    cloud_topic: String,
    labels_topic: Option<String>,
    scan_count: u64,
    truth: BTreeMap<u64, Vec<Object>>,
    opts: DecodeOptions,
    index: usize,
    _bag: Bag,
}

impl BagScanReader {
    /// Opens `path`. `topic` defaults to the first PointCloud2 topic, `labels_topic` to
    /// the first Detection3DArray topic (none is fine: scans come without ground truth).
    pub fn open(
        path: &Path,
        topic: Option<&str>,
        labels_topic: Option<&str>,
        opts: &DecodeOptions,
    ) -> Result<Self, SourceError> {
        let bag = Bag::open(path)?;
        let name = path.display().to_string();
        let cloud_topic = topic_of_type(&bag, path, topic, POINTCLOUD2_TYPE)?.ok_or_else(|| {
            SourceError::Topic {
                bag: name.clone(),
                message: "has no sensor_msgs/msg/PointCloud2 topic".into(),
            }
        })?;
        let labels_topic = topic_of_type(&bag, path, labels_topic, DETECTION3D_ARRAY_TYPE)?;
        let mut truth = BTreeMap::new();
        if let Some(t) = &labels_topic {
            for msg in bag.messages(&[t.as_str()])? {
                let msg = msg?;
                let arr = Detection3DArray::from_cdr(&msg.data).map_err(|e| {
                    SourceError::GroundTruth {
                        bag: name.clone(),
                        stamp_ns: msg.timestamp_ns.max(0) as u64,
                        message: e.to_string(),
                    }
                })?;
                truth.insert(arr.header.stamp_nanos(), arr.to_objects());
            }
        }
        let scan_count = bag.topic(&cloud_topic).map_or(0, |t| t.message_count);
        Ok(Self {
            messages: bag.messages(&[cloud_topic.as_str()])?,
            name,
            cloud_topic,
            labels_topic,
            scan_count,
            truth,
            opts: opts.clone(),
            index: 0,
            _bag: bag,
        })
    }

    pub fn cloud_topic(&self) -> &str {
        &self.cloud_topic
    }

    /// The ground-truth topic, when the bag has one.
    pub fn labels_topic(&self) -> Option<&str> {
        self.labels_topic.as_deref()
    }

    /// Scans on the cloud topic as the bag's index counts them (for progress bars).
    pub fn scan_count(&self) -> u64 {
        self.scan_count
    }

    /// The next scan whose index `select` accepts; the others are skipped undecoded.
    pub fn next_where(
        &mut self,
        mut select: impl FnMut(usize) -> bool,
    ) -> Option<Result<StreamedScan, SourceError>> {
        loop {
            let msg = match self.messages.next()? {
                Ok(m) => m,
                Err(e) => return Some(Err(e.into())),
            };
            let i = self.index;
            self.index += 1;
            if select(i) {
                return Some(self.decode(i, &msg.data));
            }
        }
    }

    fn decode(&mut self, index: usize, data: &[u8]) -> Result<StreamedScan, SourceError> {
        let err = |source| SourceError::Cloud {
            bag: self.name.clone(),
            topic: self.cloud_topic.clone(),
            index,
            source,
        };
        let cloud = PointCloud2::from_cdr(data).map_err(err)?;
        let decoded = decode(&cloud, &self.opts).map_err(err)?;
        let ground_truth = self.truth.remove(&cloud.header.stamp_nanos());
        Ok(StreamedScan {
            index,
            scan: BagScan {
                header: cloud.header,
                scan: Scan {
                    points: decoded.points,
                    objects: Vec::new(),
                    labels: None,
                },
                dropped_non_finite: decoded.dropped_non_finite,
            },
            ground_truth,
        })
    }
}

impl Iterator for BagScanReader {
    type Item = Result<StreamedScan, SourceError>;

    fn next(&mut self) -> Option<Self::Item> {
        self.next_where(|_| true)
    }
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
    let mut reader = BagScanReader::open(path, topic, None, opts)?;
    let mut scans = Vec::new();
    while let Some(s) = reader.next_where(&mut select) {
        let s = s?;
        let mut scan = s.scan;
        scan.scan.objects = s.ground_truth.unwrap_or_default();
        scans.push(scan);
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
