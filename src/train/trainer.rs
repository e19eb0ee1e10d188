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
use serde::{Deserialize, Serialize};
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
    /// Sensors to simulate; each frame draws one of them uniformly.
    pub lidars: Vec<LidarModel>,
    pub augment: Augment,
    /// A log line every this many steps.
    pub log_every: usize,
    /// A checkpoint every this many steps (and always at the end).
    pub checkpoint_every: usize,
    pub progress: bool,
    /// Stop (with a checkpoint) once this many steps are done, to be resumed later; the
    /// schedule still spans `steps`.
    pub stop_after: Option<usize>,
}

impl TrainOptions {
    pub fn new(steps: usize, batch: usize, seed: u64, lidars: Vec<LidarModel>) -> Self {
        Self {
            steps,
            batch,
            seed,
            max_lr: 2e-3,
            weight_decay: 0.01,
            clip: 10.0,
            lidars,
            augment: Augment::default(),
            log_every: 10,
            checkpoint_every: 500,
            progress: true,
            stop_after: None,
        }
    }
}

/// One step's numbers in the training log.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainLog {
    pub model: String,
    pub lidars: Vec<String>,
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

/// The seeds of step `step`'s frames: (sensor index, scene seed, augmentation seed) per
/// frame. Each step has its own ChaCha stream, so a resumed run draws the same frames.
pub fn step_seeds(seed: u64, step: usize, batch: usize, sensors: usize) -> Vec<(usize, u64, u64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64 + 1);
    (0..batch)
        .map(|_| {
            (
                rng.random_range(0..sensors.max(1)),
                rng.random(),
                rng.random(),
            )
        })
        .collect()
}

/// Weight-file metadata keys a training run writes (besides the config).
pub const META_STEP: &str = "step";
pub const META_CONFIG: &str = "config";

/// The run's identity; a resume must match it.
fn run_identity(opts: &TrainOptions) -> String {
    let lidars: Vec<&str> = opts.lidars.iter().map(|l| l.name()).collect();
    format!(
        "steps={} batch={} seed={} max_lr={} wd={} clip={} lidars={} augment={:?}",
        opts.steps,
        opts.batch,
        opts.seed,
        opts.max_lr,
        opts.weight_decay,
        opts.clip,
        lidars.join(","),
        opts.augment
    )
}

/// Loads `out`'s checkpoint for a resume: weights, optimizer state, log, and the step
/// reached. Errors name what does not match the run being resumed.
fn load_checkpoint(
    net: &Network,
    cfg_yaml: &str,
    opts: &TrainOptions,
    out: &Path,
) -> Result<(Weights, AdamW, TrainLog, usize), TrainError> {
    let model_path = out.join("model.safetensors");
    let (weights, meta) = Weights::load(&model_path, net.graph())?;
    let bad =
        |what: &str| TrainError::Options(format!("cannot resume from {}: {what}", out.display()));
    if meta.get(META_CONFIG).map(String::as_str) != Some(cfg_yaml) {
        return Err(bad(
            "the checkpoint was trained from a different model config",
        ));
    }
    if meta.get("run").map(String::as_str) != Some(run_identity(opts).as_str()) {
        return Err(bad(&format!(
            "the checkpoint's run ({}) differs from this one ({})",
            meta.get("run").map(String::as_str).unwrap_or("none"),
            run_identity(opts)
        )));
    }
    let step: usize = meta
        .get(META_STEP)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("no step in the checkpoint"))?;
    let opt = AdamW::load(
        &out.join("optimizer.safetensors"),
        &weights,
        opts.weight_decay,
    )?;
    if opt.step as usize != step {
        return Err(bad(&format!(
            "optimizer state is at step {} but the weights at step {step}",
            opt.step
        )));
    }
    let log_path = out.join("train_log.json");
    let text = std::fs::read(&log_path).map_err(|source| TrainError::Write {
        path: log_path.clone(),
        source,
    })?;
    let mut log: TrainLog =
        serde_json::from_slice(&text).map_err(|e| bad(&format!("{}: {e}", log_path.display())))?;
    log.entries.retain(|e| e.step <= step);
    Ok((weights, opt, log, step))
}

/// Trains from a seeded initialisation and writes `out/model.safetensors` (the config
/// embedded), `out/optimizer.safetensors` and `out/train_log.json` at every checkpoint
/// and at the end. The same options give the same weights, whether or not the run was
/// interrupted and resumed (`resume`: continue from `out`'s last checkpoint).
pub fn train(
    cfg: &ModelConfig,
    opts: &TrainOptions,
    out: &Path,
    resume: bool,
) -> Result<TrainLog, TrainError> {
    if opts.steps == 0 || opts.batch == 0 || opts.lidars.is_empty() {
        return Err(TrainError::Options(format!(
            "steps ({}), batch ({}) and sensors ({}) must be positive",
            opts.steps,
            opts.batch,
            opts.lidars.len()
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
    let cfg_yaml = cfg.to_yaml();
    let net = Network::new(cfg)?;
    let sched = OneCycle::new(opts.steps, opts.max_lr);
    let sims: Vec<Simulator> = opts
        .lidars
        .iter()
        .map(|&l| Simulator::new(SimConfig::new(l)))
        .collect();
    let (mut weights, mut opt, mut log, first) = if resume {
        load_checkpoint(&net, &cfg_yaml, opts, out)?
    } else {
        let log = TrainLog {
            model: cfg.name.clone(),
            lidars: opts.lidars.iter().map(|l| l.name().to_string()).collect(),
            steps: opts.steps,
            batch: opts.batch,
            seed: opts.seed,
            max_lr: opts.max_lr,
            weights_digest: String::new(),
            seconds: 0.0,
            steps_per_second: 0.0,
            entries: Vec::new(),
        };
        (
            Weights::init(net.graph(), opts.seed),
            AdamW::new(opts.weight_decay),
            log,
            0,
        )
    };
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
    bar.set_position(first as u64);
    bar.reset_eta();
    let start = Instant::now();
    let earlier_seconds = log.seconds;
    let run = run_identity(opts);
    let save = |weights: &Weights,
                opt: &AdamW,
                log: &mut TrainLog,
                step: usize|
     -> Result<(), TrainError> {
        log.seconds = earlier_seconds + start.elapsed().as_secs_f64();
        log.steps_per_second = step as f64 / log.seconds.max(1e-9);
        log.weights_digest = weights.digest();
        let meta = BTreeMap::from([
            ("model".to_string(), cfg.name.clone()),
            (META_STEP.to_string(), step.to_string()),
            ("seed".to_string(), opts.seed.to_string()),
            ("run".to_string(), run.clone()),
            (META_CONFIG.to_string(), cfg_yaml.clone()),
        ]);
        // Optimizer first: a crash between the two files leaves a checkpoint whose
        // steps disagree, which resume reports instead of silently mixing.
        opt.save(&out.join("optimizer.safetensors"))?;
        weights.save(&out.join("model.safetensors"), &meta)?;
        let json =
            serde_json::to_vec_pretty(log).map_err(|e| TrainError::Internal(e.to_string()))?;
        write(&out.join("train_log.json"), &json)
    };
    let last = opts.stop_after.unwrap_or(opts.steps).min(opts.steps);
    for step in first..last.max(first) {
        let seeds = step_seeds(opts.seed, step, opts.batch, sims.len());
        let frames: Vec<(Points, Vec<Object>)> = seeds
            .par_iter()
            .map(|&(l, s, a)| sample_frame(&sims[l], &opts.augment, s, a))
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
        if (step + 1) % opts.checkpoint_every.max(1) == 0 && step + 1 < last {
            save(&weights, &opt, &mut log, step + 1)?;
        }
    }
    bar.finish_and_clear();
    save(&weights, &opt, &mut log, last.max(first))?;
    Ok(log)
}
