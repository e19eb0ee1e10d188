//! The training loop: simulated frames drawn from a seeded stream, augmented, batched,
//! AdamW steps under the one-cycle schedule, log lines, atomic checkpoints.

use super::TrainError;
use super::augment::Augment;
use super::batch::Batch;
use super::network::{Network, StepResult};
use super::optim::{AdamW, clip_grad_norm};
use super::schedule::OneCycle;
use crate::boxes::Object;
use crate::cloud::Points;
use crate::model::ModelConfig;
use crate::model::weights::Weights;
use crate::sim::{LidarModel, SimConfig, Simulator};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    pub seed: u64,
    pub max_lr: f32,
    pub weight_decay: f32,
    /// Global gradient norm cap.
    pub clip: f32,
    pub lidar: LidarModel,
    pub augment: Augment,
    /// A log line every this many steps.
    pub log_every: usize,
    /// A checkpoint every this many steps (and always at the end).
    pub checkpoint_every: usize,
    pub progress: bool,
}

impl TrainOptions {
    pub fn new(steps: usize, batch: usize, seed: u64, lidar: LidarModel) -> Self {
        Self {
            steps,
            batch,
            seed,
            max_lr: 2e-3,
            weight_decay: 0.01,
            clip: 10.0,
            lidar,
            augment: Augment::default(),
            log_every: 10,
            checkpoint_every: 500,
            progress: true,
        }
    }
}

/// One step's numbers in the training log.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    pub step: usize,
    pub loss: f32,
    pub hm_loss: f32,
    pub reg_loss: f32,
    pub lr: f32,
    pub grad_norm: f32,
    pub objects: usize,
}

/// The JSON training log.
#[derive(Debug, Clone, Serialize)]
pub struct TrainLog {
    pub model: String,
    pub lidar: String,
    pub steps: usize,
    pub batch: usize,
    pub seed: u64,
    pub max_lr: f32,
    pub weights_digest: String,
    pub seconds: f64,
    pub steps_per_second: f64,
    pub entries: Vec<LogEntry>,
}

/// One optimisation step on a batch: loss and gradients, clipping, the AdamW update and
/// the new BN running statistics. Returns the step's result and the gradient norm before
/// clipping.
pub fn fit_step(
    net: &Network,
    weights: &mut Weights,
    opt: &mut AdamW,
    batch: &Batch,
    lr: f32,
    clip: f32,
) -> Result<(StepResult, f32), TrainError> {
    let mut r = net.step(weights, batch)?;
    if !r.loss.is_finite() {
        return Err(TrainError::Diverged {
            step: opt.step as usize,
            loss: r.loss,
        });
    }
    let norm = clip_grad_norm(&mut r.grads, clip);
    opt.update(weights, &r.grads, lr);
    for (name, t) in &r.running {
        weights.tensors.insert(name.clone(), t.clone());
    }
    Ok((r, norm))
}

/// A simulated frame drawn from `scene_seed`, augmented from `aug_seed`. Objects without a
/// point are dropped, as the reference drops unobservable ground truth.
pub fn sample_frame(
    sim: &Simulator,
    augment: &Augment,
    scene_seed: u64,
    aug_seed: u64,
) -> (Points, Vec<Object>) {
    let (mut points, mut objects) = sim.sample(scene_seed);
    objects.retain(|o| o.num_points != Some(0));
    augment.apply(
        &mut ChaCha8Rng::seed_from_u64(aug_seed),
        &mut points,
        &mut objects,
    );
    (points, objects)
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Trains from a seeded initialisation and writes `out/model.safetensors` and
/// `out/train_log.json` (at every checkpoint and at the end). The same options give the
/// same weights.
pub fn train(cfg: &ModelConfig, opts: &TrainOptions, out: &Path) -> Result<TrainLog, TrainError> {
    if opts.steps == 0 || opts.batch == 0 {
        return Err(TrainError::Options(format!(
            "steps ({}) and batch ({}) must be positive",
            opts.steps, opts.batch
        )));
    }
    if !(opts.max_lr > 0.0 && opts.max_lr.is_finite()) {
        return Err(TrainError::Options(format!(
            "max_lr must be positive, is {}",
            opts.max_lr
        )));
    }
    std::fs::create_dir_all(out).map_err(|source| TrainError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    let net = Network::new(cfg)?;
    let mut weights = Weights::init(net.graph(), opts.seed);
    let mut opt = AdamW::new(opts.weight_decay);
    let sched = OneCycle::new(opts.steps, opts.max_lr);
    let sim = Simulator::new(SimConfig::new(opts.lidar));
    let mut stream = ChaCha8Rng::seed_from_u64(opts.seed);
    let bar = if opts.progress {
        indicatif::ProgressBar::new(opts.steps as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} steps {elapsed_precise} eta {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut log = TrainLog {
        model: cfg.name.clone(),
        lidar: opts.lidar.name().into(),
        steps: opts.steps,
        batch: opts.batch,
        seed: opts.seed,
        max_lr: opts.max_lr,
        weights_digest: String::new(),
        seconds: 0.0,
        steps_per_second: 0.0,
        entries: Vec::new(),
    };
    let start = Instant::now();
    let save = |weights: &Weights, log: &mut TrainLog, step: usize| -> Result<(), TrainError> {
        let secs = start.elapsed().as_secs_f64();
        log.seconds = secs;
        log.steps_per_second = step as f64 / secs.max(1e-9);
        log.weights_digest = weights.digest();
        let meta = BTreeMap::from([
            ("model".to_string(), cfg.name.clone()),
            ("step".to_string(), step.to_string()),
            ("seed".to_string(), opts.seed.to_string()),
        ]);
        weights.save(&out.join("model.safetensors"), &meta)?;
        let json =
            serde_json::to_vec_pretty(log).map_err(|e| TrainError::Internal(e.to_string()))?;
        write(&out.join("train_log.json"), &json)
    };
    for step in 0..opts.steps {
        // Seeds are drawn in order from the stream, the frames simulated in parallel.
        let seeds: Vec<(u64, u64)> = (0..opts.batch)
            .map(|_| (stream.random(), stream.random()))
            .collect();
        let frames: Vec<(Points, Vec<Object>)> = seeds
            .par_iter()
            .map(|&(s, a)| sample_frame(&sim, &opts.augment, s, a))
            .collect();
        let batch = Batch::from_frames(cfg, &frames)?;
        let lr = sched.lr(step);
        let (r, norm) = fit_step(&net, &mut weights, &mut opt, &batch, lr, opts.clip)?;
        let entry = LogEntry {
            step: step + 1,
            loss: r.loss,
            hm_loss: r.hm_loss,
            reg_loss: r.reg_loss,
            lr,
            grad_norm: norm,
            objects: batch.num_objects(),
        };
        bar.set_message(format!("loss {:.4}", r.loss));
        bar.inc(1);
        if (step + 1) % opts.log_every.max(1) == 0 || step == 0 {
            log::info!(
                "step {}/{}: loss {:.4} (hm {:.4}, reg {:.4}), lr {:.2e}, |g| {:.3}, {} objects",
                step + 1,
                opts.steps,
                r.loss,
                r.hm_loss,
                r.reg_loss,
                lr,
                norm,
                entry.objects
            );
        }
        log.entries.push(entry);
        if (step + 1) % opts.checkpoint_every.max(1) == 0 && step + 1 < opts.steps {
            save(&weights, &mut log, step + 1)?;
        }
    }
    bar.finish_and_clear();
    save(&weights, &mut log, opts.steps)?;
    Ok(log)
}
