//! Training of the CenterPoint-Pillar network on simulated scans: the network's training
//! forward/backward ([`network`]), batches ([`batch`]), AdamW with gradient clipping
//! ([`optim`]), the one-cycle learning rate ([`schedule`]), augmentation ([`augment`]) and
//! the training loop with checkpoints ([`trainer`]).

pub mod augment;
pub mod batch;
pub mod network;
pub mod optim;
pub mod schedule;
pub mod sim_eval;
pub mod trainer;

pub use batch::Batch;
pub use network::{Network, StepResult};
pub use optim::{AdamW, clip_grad_norm};
pub use schedule::OneCycle;
pub use trainer::{LogEntry, TrainLog, TrainOptions, fit_step, train};

use crate::model::weights::WeightsError;
use crate::ops::OpsError;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("model: {0}")]
    Model(String),
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("layer {node}: {source}")]
    Op { node: String, source: OpsError },
    #[error("empty batch: {0}")]
    EmptyBatch(String),
    #[error("training options: {0}")]
    Options(String),
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("training diverged at step {step}: loss {loss}")]
    Diverged { step: usize, loss: f32 },
    #[error("internal: {0}")]
    Internal(String),
}
