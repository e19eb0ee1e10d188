//! Writes a simulated drive as a rosbag2 (MCAP) bag: the scans as
//! `sensor_msgs/msg/PointCloud2` in a real driver's layout and the ground truth as
//! `vision_msgs/msg/Detection3DArray`, both stamped with the scan stamp.

use super::simulator::Scene;
use crate::bag::{BagError, BagWriter, Qos, Reliability, WriterOptions};
use crate::cloud::{self, Layout, POINTCLOUD2_SCHEMA, POINTCLOUD2_TYPE};
use crate::msgs::{DETECTION3D_ARRAY_TYPE, Detection3DArray, Header, detection3d_array_schema};
use std::path::{Path, PathBuf};

/// What to record and where it goes in the bag.
#[derive(Debug, Clone)]
pub struct RecordOptions {
    pub frames: u64,
    pub layout: Layout,
    pub points_topic: String,
    pub ground_truth_topic: String,
    pub writer: WriterOptions,
}

impl Default for RecordOptions {
    fn default() -> Self {
        Self {
            frames: 10,
            layout: Layout::Velodyne,
            points_topic: "/points".into(),
            ground_truth_topic: "/ground_truth/objects".into(),
            writer: WriterOptions::default(),
        }
    }
}

/// Records `opts.frames` frames of `scene` into the new bag directory `out`, calling
/// `progress` after each frame. Returns the bag directory.
pub fn record(
    scene: &Scene,
    opts: &RecordOptions,
    out: &Path,
    progress: impl FnMut(u64),
) -> Result<PathBuf, BagError> {
    record_scenes(std::slice::from_ref(scene), opts, out, progress)
}

/// Records `opts.frames` frames of each scene in turn (a validation set of several
/// independent drives in one bag); `progress` gets the running frame count. Scenes should
/// have increasing start stamps so the bag's time runs forward.
pub fn record_scenes(
    scenes: &[Scene],
    opts: &RecordOptions,
    out: &Path,
    mut progress: impl FnMut(u64),
) -> Result<PathBuf, BagError> {
    let mut w = BagWriter::create(out, opts.writer.clone())?;
    // Lidar drivers publish with the sensor-data profile (best effort, keep last 5).
    let sensor_qos = Qos {
        reliability: Reliability::BestEffort,
        depth: 5,
        ..Qos::default()
    };
    w.add_topic(
        &opts.points_topic,
        POINTCLOUD2_TYPE,
        POINTCLOUD2_SCHEMA,
        &[sensor_qos],
    )?;
    w.add_topic(
        &opts.ground_truth_topic,
        DETECTION3D_ARRAY_TYPE,
        &detection3d_array_schema(),
        &[Qos::default()],
    )?;
    let mut done = 0;
    for scene in scenes {
        let frame_id = scene.config().sensor.frame_id.clone();
        for k in 0..opts.frames {
            let f = scene.frame(k);
            let header = Header::from_nanos(f.stamp_ns, frame_id.clone());
            let stamp = f.stamp_ns as i64;
            let cloud = cloud::encode(&f.points, opts.layout, header.clone());
            w.write(&opts.points_topic, stamp, &cloud.to_cdr())?;
            let gt = Detection3DArray::from_objects(&header, &f.objects, 1.0);
            w.write(&opts.ground_truth_topic, stamp, &gt.to_cdr())?;
            done += 1;
            progress(done);
        }
    }
    w.finish()
}
