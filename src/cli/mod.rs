//! The larger verbs of the `lidar_ptq` command line, one module each.

pub mod calibrate;
pub mod detect;
pub mod eval;
pub mod fidelity;
pub mod import;

use anyhow::Result;
use lidar_ptq::detector::Detector;
use lidar_ptq::model::ModelBundle;
use std::path::Path;

/// Where the network runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// GPU ordinal.
    Cuda(usize),
}

impl std::str::FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (GPU 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Device::Cuda)
                .ok_or_else(|| format!("device `{s}`: expected cpu, cuda or cuda:N")),
        }
    }
}

/// The detector of a model file on a device: FP32, FP16 (GPU only) or the INT8 model
/// `int8` (calibrated for this model; checked).
pub fn detector(
    bundle: &ModelBundle,
    int8: Option<&Path>,
    device: Device,
    fp16: bool,
) -> Result<Detector> {
    let quant = int8
        .map(|q| lidar_ptq::quant::file::load_for(q, &bundle.config, &bundle.weights))
        .transpose()?;
    anyhow::ensure!(
        !(fp16 && quant.is_some()),
        "--fp16 and --int8 exclude each other"
    );
    match device {
        Device::Cpu => {
            anyhow::ensure!(!fp16, "--fp16 runs on the GPU only (--device cuda)");
            Ok(match &quant {
                None => Detector::from_bundle(bundle)?,
                Some(q) => Detector::new_int8(bundle.config.clone(), &bundle.weights, q)?,
            })
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            use lidar_ptq::engine::cuda::CudaPrecision;
            let precision = match (&quant, fp16) {
                (Some(q), _) => CudaPrecision::Int8(q),
                (None, true) => CudaPrecision::Fp16,
                (None, false) => CudaPrecision::Fp32,
            };
            let d = Detector::new_cuda(bundle.config.clone(), &bundle.weights, precision, ordinal)
                .map_err(|e| anyhow::anyhow!("starting the CUDA engine: {e}"))?;
            log::info!("running on {} in {}", d.device(), d.precision());
            Ok(d)
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => anyhow::bail!(
            "this lidar_ptq was built without GPU support: rebuild with `--features cuda`"
        ),
    }
}
