//! The per-scan pipeline: points -> pillars or voxels -> network -> boxes. Owns its buffers, so a
//! detector reused across scans does not reallocate the voxeliser's grid.

use crate::boxes::Detection;
use crate::cloud::Points;
use crate::engine::{EngineError, Fp32Engine, HeadOutputs, Int8Engine};
use crate::model::decode::{DecodeError, decode};
use crate::model::graph::Graph;
use crate::model::input::ScanInput;
use crate::model::voxelize::{Mode, Pillars};
use crate::model::weights::{Weights, WeightsError};
use crate::model::{BundleError, ConfigError, ModelBundle, ModelConfig};
use crate::quant::QuantModel;
use std::path::Path;
use thiserror::Error;

/// Weights-file metadata key holding the model config YAML (as training writes it).
pub use crate::model::bundle::META_CONFIG as MODEL_CONFIG_KEY;

#[derive(Debug, Error)]
pub enum DetectorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("model {model}: {message}")]
    Graph { model: String, message: String },
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// The network backend a detector runs: FP32, or the INT8 engine of a calibrated model.
enum Backend {
    Fp32(Box<Fp32Engine>),
    Int8(Box<Int8Engine>),
    #[cfg(feature = "cuda")]
    Cuda(Box<crate::engine::cuda::CudaEngine>),
}

/// A CenterPoint detector running on the CPU in FP32 or INT8.
pub struct Detector {
    cfg: ModelConfig,
    input: ScanInput,
    engine: Backend,
}

impl Detector {
    pub fn new(cfg: ModelConfig, weights: &Weights) -> Result<Self, DetectorError> {
        let graph = Graph::build(&cfg).map_err(|message| DetectorError::Graph {
            model: cfg.name.clone(),
            message,
        })?;
        let engine = Backend::Fp32(Box::new(Fp32Engine::new(&graph, weights)?));
        let input = ScanInput::new(&cfg, Mode::Test).map_err(|e| DetectorError::Graph {
            model: cfg.name.clone(),
            message: e.to_string(),
        })?;
        Ok(Self { cfg, input, engine })
    }

    /// Loads a model description and its weights file.
    pub fn load(config: &Path, weights: &Path) -> Result<Self, DetectorError> {
        let cfg = ModelConfig::load(config)?;
        let graph = Graph::build(&cfg).map_err(|message| DetectorError::Graph {
            model: cfg.name.clone(),
            message,
        })?;
        let (w, _) = Weights::load(weights, &graph)?;
        Self::new(cfg, &w)
    }

    /// Loads a model file that carries its description (see [`ModelBundle`]); a given
    /// `config` must describe the same model.
    pub fn from_model_file(path: &Path, config: Option<&Path>) -> Result<Self, DetectorError> {
        Self::from_bundle(&ModelBundle::load(path, config)?)
    }

    pub fn from_bundle(bundle: &ModelBundle) -> Result<Self, DetectorError> {
        Self::new(bundle.config.clone(), &bundle.weights)
    }

    /// The description and weights of a self-describing model file (see [`ModelBundle`]),
    /// checked against each other, so callers may adjust the config (thresholds) before
    /// building a detector.
    pub fn read_model_file(path: &Path) -> Result<(ModelConfig, Weights), DetectorError> {
        let b = ModelBundle::load(path, None)?;
        Ok((b.config, b.weights))
    }

    /// A detector running the INT8 engine of `quant`, a model calibrated for `weights`
    /// (checked by the caller, e.g. with `quant::file::load_for`).
    pub fn new_int8(
        cfg: ModelConfig,
        weights: &Weights,
        quant: &QuantModel,
    ) -> Result<Self, DetectorError> {
        let mut d = Self::new(cfg, weights)?;
        let graph = Graph::build(&d.cfg).map_err(|message| DetectorError::Graph {
            model: d.cfg.name.clone(),
            message,
        })?;
        d.engine = Backend::Int8(Box::new(Int8Engine::new(&graph, weights, quant)?));
        Ok(d)
    }

    /// A detector on GPU `ordinal` (feature `cuda`): FP32, FP16, or INT8 with `quant`, a
    /// model calibrated for `weights`.
    #[cfg(feature = "cuda")]
    pub fn new_cuda(
        cfg: ModelConfig,
        weights: &Weights,
        precision: crate::engine::cuda::CudaPrecision<'_>,
        ordinal: usize,
    ) -> Result<Self, DetectorError> {
        let mut d = Self::new(cfg, weights)?;
        let graph = Graph::build(&d.cfg).map_err(|message| DetectorError::Graph {
            model: d.cfg.name.clone(),
            message,
        })?;
        d.engine = Backend::Cuda(Box::new(crate::engine::cuda::CudaEngine::new(
            &graph, weights, precision, ordinal,
        )?));
        Ok(d)
    }

    /// "fp32", "int8" (or on the GPU "fp16").
    pub fn precision(&self) -> &'static str {
        match &self.engine {
            Backend::Fp32(_) => "fp32",
            Backend::Int8(_) => "int8",
            #[cfg(feature = "cuda")]
            Backend::Cuda(e) => e.precision(),
        }
    }

    /// "cpu", or the GPU's name.
    pub fn device(&self) -> String {
        match &self.engine {
            #[cfg(feature = "cuda")]
            Backend::Cuda(e) => e.device(),
            _ => "cpu".into(),
        }
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Active voxels of the last scan of a voxel model (0 for pillar models).
    pub fn last_voxel_count(&self) -> usize {
        self.input.voxels()
    }

    /// Pillars of the last scan (for diagnostics such as the pillar-cap signal).
    pub fn last_pillars(&self) -> &Pillars {
        self.input.pillars()
    }

    /// Runs the network and returns its raw head maps.
    pub fn head_outputs(&mut self, points: &Points) -> Result<HeadOutputs, DetectorError> {
        self.input
            .prepare(points)
            .map_err(|e| EngineError::op("voxelise", e))?;
        let input = self.input.input();
        Ok(match &mut self.engine {
            Backend::Fp32(e) => e.run(&input)?,
            Backend::Int8(e) => e.run(&input)?,
            #[cfg(feature = "cuda")]
            Backend::Cuda(e) => e.run(&input)?,
        })
    }

    /// Detects objects in one scan.
    pub fn detect(&mut self, points: &Points) -> Result<Vec<Detection>, DetectorError> {
        // On the GPU the peak candidates are found there and only they come back; they
        // decode to the same detections as the full maps.
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(e) = &mut self.engine
            && e.gpu_candidates()
        {
            self.input
                .prepare(points)
                .map_err(|e| EngineError::op("voxelise", e))?;
            let dc = &self.cfg.decode;
            let mut cands = Vec::new();
            e.run_candidates(
                &self.input.input(),
                dc.score_threshold,
                dc.local_max,
                &mut cands,
            )?;
            return Ok(crate::model::decode::decode_candidates(&self.cfg, &cands)?);
        }
        let heads = self.head_outputs(points)?;
        Ok(decode(&self.cfg, &heads.views())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fp32::tests::{TINY, random_weights, scan};

    #[test]
    fn detects_deterministically_and_within_the_caps() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let graph = Graph::build(&cfg).unwrap();
        let w = random_weights(&graph, 9);
        let mut det = Detector::new(cfg.clone(), &w).unwrap();
        let pts = scan(1, 4000);
        let a = det.detect(&pts).unwrap();
        let b = det.detect(&pts).unwrap();
        assert_eq!(a, b);
        // Random weights: whatever comes out must respect the decode contract.
        assert!(a.len() <= 2 * cfg.decode.nms.post_max);
        for d in &a {
            assert!(d.score > cfg.decode.score_threshold && d.score <= 1.0);
            assert!(d.bbox.size.iter().all(|s| *s > 0.0));
            assert!(cfg.classes().contains(&d.class.as_str()));
        }
        assert!(det.last_pillars().len() > 100);
    }

    #[test]
    fn model_files_carry_their_config() {
        let cfg = ModelConfig::from_yaml(TINY).unwrap();
        let w = random_weights(&Graph::build(&cfg).unwrap(), 4);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.safetensors");
        let meta =
            std::collections::BTreeMap::from([(MODEL_CONFIG_KEY.to_string(), cfg.to_yaml())]);
        w.save(&path, &meta).unwrap();
        let mut a = Detector::from_model_file(&path, None).unwrap();
        let mut b = Detector::new(cfg.clone(), &w).unwrap();
        assert_eq!(a.config(), &cfg);
        let pts = scan(2, 3000);
        assert_eq!(a.detect(&pts).unwrap(), b.detect(&pts).unwrap());

        // Without the config, or with weights of another model: clear errors.
        w.save(&path, &Default::default()).unwrap();
        let e = Detector::from_model_file(&path, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("carries no model description"), "{e}");
        let other = ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"),
        )
        .unwrap();
        let wrong =
            std::collections::BTreeMap::from([(MODEL_CONFIG_KEY.to_string(), other.to_yaml())]);
        w.save(&path, &wrong).unwrap();
        let e = Detector::from_model_file(&path, None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("weights do not fit the model"), "{e}");
        let e = Detector::from_model_file(&dir.path().join("none.safetensors"), None)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
    }

    #[test]
    fn weights_of_another_model_are_refused() {
        let tiny = ModelConfig::from_yaml(TINY).unwrap();
        let default = ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"),
        )
        .unwrap();
        let w = Weights::init(&Graph::build(&default).unwrap(), 1);
        let e = Detector::new(tiny, &w).err().unwrap().to_string();
        assert!(e.contains("weights do not fit the model"), "{e}");
    }
}
