//! Training end to end on the tiny model: overfitting a fixed batch, and the trainer's
//! determinism and outputs.

use lidar_ptq::boxes::{Box3d, Object};
use lidar_ptq::cloud::Points;
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::sim::LidarModel;
use lidar_ptq::train::{AdamW, Batch, Network, TrainOptions, train, trainer::fit_step};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const TINY: &str = include_str!("fixtures/tiny_model.yaml");

/// A frame of a few boxes, each sampled with points on its surface, over a flat ground.
fn frame(seed: u64) -> (Points, Vec<Object>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut points = Points::default();
    let mut objects = Vec::new();
    for (class, size) in [("car", [4.2, 1.8, 1.5]), ("pedestrian", [0.7, 0.7, 1.7])] {
        let bbox = Box3d {
            center: [
                rng.random_range(-9.0..9.0),
                rng.random_range(-9.0..9.0),
                -1.0,
            ],
            size,
            yaw: rng.random_range(-3.0..3.0),
        };
        for _ in 0..60 {
            let lx = rng.random_range(-0.5..0.5) * size[0];
            let ly = rng.random_range(-0.5..0.5) * size[1];
            let z = bbox.center[2] + rng.random_range(-0.5..0.5) * size[2];
            let (s, c) = bbox.yaw.sin_cos();
            points.push(
                bbox.center[0] + c * lx - s * ly,
                bbox.center[1] + s * lx + c * ly,
                z,
                0.5,
            );
        }
        objects.push(Object {
            bbox,
            class: class.into(),
            velocity: None,
            num_points: Some(60),
        });
    }
    for _ in 0..150 {
        points.push(
            rng.random_range(-12.0..12.0),
            rng.random_range(-12.0..12.0),
            -1.8,
            0.1,
        );
    }
    (points, objects)
}

#[test]
fn overfitting_a_fixed_batch_reduces_the_loss() {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let net = Network::new(&cfg).unwrap();
    let batch = Batch::from_frames(&cfg, &[frame(1), frame(2)]).unwrap();
    assert_eq!(batch.num_objects(), 4);
    let mut w = Weights::init(net.graph(), 0);
    let mut opt = AdamW::new(0.01);
    let mut losses = Vec::new();
    for _ in 0..30 {
        let (r, norm) = fit_step(&net, &mut w, &mut opt, &batch, 1e-2, 10.0).unwrap();
        assert!(norm.is_finite());
        losses.push(r.loss);
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < 0.4 * first, "loss {first} -> {last}: {losses:?}");
}

#[test]
fn the_trainer_is_deterministic_and_writes_its_outputs() {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let mut opts = TrainOptions::new(2, 1, 5, vec![LidarModel::Vlp16]);
    opts.progress = false;
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let la = train(&cfg, &opts, a.path(), false).unwrap();
    let lb = train(&cfg, &opts, b.path(), false).unwrap();
    assert_eq!(la.weights_digest, lb.weights_digest);
    assert_eq!(la.entries.len(), 2);
    assert!(
        la.entries
            .iter()
            .all(|e| e.loss.is_finite() && e.loss > 0.0)
    );
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(a.path().join("train_log.json")).unwrap()).unwrap();
    assert_eq!(log["entries"].as_array().unwrap().len(), 2);
    // The weights moved away from the seeded initialisation and load back.
    let net = Network::new(&cfg).unwrap();
    let (w, _) = Weights::load(&a.path().join("model.safetensors"), net.graph()).unwrap();
    let (wb, _) = Weights::load(&b.path().join("model.safetensors"), net.graph()).unwrap();
    assert_eq!(w, wb);
    assert_ne!(w, Weights::init(net.graph(), 5));
    // A different seed trains differently.
    let mut other = opts.clone();
    other.seed = 6;
    let c = tempfile::tempdir().unwrap();
    assert_ne!(
        train(&cfg, &other, c.path(), false).unwrap().weights_digest,
        la.weights_digest
    );
}

#[test]
fn an_interrupted_and_resumed_run_gives_the_same_weights() {
    let cfg = ModelConfig::from_yaml(TINY).unwrap();
    let mut opts = TrainOptions::new(3, 1, 7, vec![LidarModel::Vlp16, LidarModel::Hdl32]);
    opts.progress = false;
    let whole = tempfile::tempdir().unwrap();
    let straight = train(&cfg, &opts, whole.path(), false).unwrap();
    let parts = tempfile::tempdir().unwrap();
    let mut first = opts.clone();
    first.stop_after = Some(1);
    assert_eq!(
        train(&cfg, &first, parts.path(), false)
            .unwrap()
            .entries
            .len(),
        1
    );
    // Resuming under other options is refused, naming the difference.
    let mut other = opts.clone();
    other.batch = 2;
    let err = train(&cfg, &other, parts.path(), true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("batch=1") && err.contains("batch=2"), "{err}");
    let resumed = train(&cfg, &opts, parts.path(), true).unwrap();
    assert_eq!(resumed.weights_digest, straight.weights_digest);
    assert_eq!(resumed.entries.len(), 3);
    // Resuming where there is no checkpoint is an error, not a fresh start.
    let empty = tempfile::tempdir().unwrap();
    assert!(train(&cfg, &opts, empty.path(), true).is_err());
}
