//! Execution of the network graph. Every engine interprets the same `model::graph::Graph`
//! and returns the same `HeadOutputs`; FP32 is the first, INT8 and CUDA follow.

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod fp32;
pub mod int8;
pub mod sparse;

use crate::model::decode::TaskOutputs;
use crate::model::weights::WeightsError;
use crate::ops::OpsError;
use thiserror::Error;

pub use fp32::Fp32Engine;
pub use int8::Int8Engine;
#[cfg(feature = "cuda")]
pub(crate) use int8::{check_cells, check_input};

/// Keeps freed memory in the process for the next scan instead of handing it back to the OS.
///
/// The FP32 engine allocates each activation as its layer runs. glibc serves blocks of
/// several MiB with `mmap` and unmaps them on free, so every scan page-faulted all its
/// activations in anew (tens of ms per scan on the nuScenes preset, PFN stage alone
/// 80 -> 28 ms). Raising the mmap and trim thresholds keeps them in the heap. Binaries call
/// this once at start; it does nothing on other C libraries. Returns whether it applied.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; called before threads start.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30) == 1
                && libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[derive(Debug, Error)]
pub enum EngineError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error("layer {node}: {source}")]
    Op { node: String, source: OpsError },
    #[error("layer {node}: {source}")]
    Kernel {
        node: String,
        source: crate::kernels::KernelError,
    },
    #[error("the quantized model does not fit the graph: {0}")]
    QuantModel(String),
    #[error("input: {0}")]
    Input(String),
    #[error("engine: {0}")]
    Internal(String),
    /// The GPU, its driver or a CUDA library (missing, refused, failed).
    #[error("GPU: {0}")]
    Device(String),
}

impl EngineError {
    pub fn op(node: &str, source: OpsError) -> Self {
        EngineError::Op {
            node: node.to_owned(),
            source,
        }
    }
}

/// One frame's network input: decorated pillar points `[P, N, width]` and the pillars'
/// point counts and cells.
pub struct NetInput<'a> {
    pub decorated: &'a [f32],
    pub max_points: usize,
    pub width: usize,
    pub counts: &'a [u32],
    /// (z, y, x) per pillar.
    pub coords: &'a [[u32; 3]],
}

/// Raw head maps of one task: heatmap logits `[classes, H, W]` and the regression
/// sub-heads concatenated `[channels, H, W]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskMaps {
    pub heatmap: Vec<f32>,
    pub regression: Vec<f32>,
}

/// Head outputs of every task, in config order.
#[derive(Debug, Clone, PartialEq)]
pub struct HeadOutputs {
    pub tasks: Vec<TaskMaps>,
    pub h: usize,
    pub w: usize,
}

impl HeadOutputs {
    /// Borrowed views for `model::decode::decode`.
    pub fn views(&self) -> Vec<TaskOutputs<'_>> {
        self.tasks
            .iter()
            .map(|t| TaskOutputs {
                heatmap: &t.heatmap,
                regression: &t.regression,
            })
            .collect()
    }
}
