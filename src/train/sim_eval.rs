//! Accuracy of a detector on held-out simulated scans: the nuScenes detection metric over
//! frames drawn from a seeded stream (no augmentation).

use crate::boxes::Object;
use crate::cloud::Points;
use crate::detector::{Detector, DetectorError};
use crate::eval::{ClassSpec, Frame, NuscenesConfig, NuscenesResult, nuscenes_eval};
use crate::sim::{LidarModel, SimConfig, Simulator};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// nuScenes' evaluation range of a class (vehicles 50 m, people and bikes 40 m, cones
/// and barriers 30 m).
pub fn class_range(class: &str) -> f32 {
    match class {
        "pedestrian" | "cyclist" | "motorcycle" | "bicycle" => 40.0,
        "traffic_cone" | "barrier" => 30.0,
        _ => 50.0,
    }
}

/// The frames of evaluation stream `seed`: scene seeds drawn from a ChaCha8 stream.
pub fn eval_frames(lidar: LidarModel, frames: usize, seed: u64) -> Vec<(Points, Vec<Object>)> {
    let sim = Simulator::new(SimConfig::new(lidar));
    let mut stream = ChaCha8Rng::seed_from_u64(seed);
    (0..frames).map(|_| sim.sample(stream.random())).collect()
}

/// Runs the detector on every frame and scores it over the model's classes.
pub fn evaluate(
    detector: &mut Detector,
    frames: &[(Points, Vec<Object>)],
    progress: &indicatif::ProgressBar,
) -> Result<NuscenesResult, DetectorError> {
    let mut dets = Vec::with_capacity(frames.len());
    for (points, _) in frames {
        dets.push(detector.detect(points)?);
        progress.inc(1);
    }
    let cfg = NuscenesConfig {
        classes: detector
            .config()
            .classes()
            .into_iter()
            .map(|c| ClassSpec::new(c, class_range(c)))
            .collect(),
        ..NuscenesConfig::default()
    };
    let views: Vec<Frame<'_>> = frames
        .iter()
        .zip(&dets)
        .map(|((_, gt), d)| Frame { gt, detections: d })
        .collect();
    Ok(nuscenes_eval(&views, &cfg))
}
