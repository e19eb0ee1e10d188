//! The engine in use, and the seam through which a calibrated INT8 engine replaces the
//! FP32 one without a gap in service: a background task hands a ready engine to a
//! [`SwapHandle`]; the detector thread picks it up in [`EngineSwitch::poll_swap`]
//! between two scans, so every scan runs start to end on one engine and no scan waits
//! for calibration.

use super::calib::CalibrationState;
use super::params::{CalibrationMode, Device, NodeParams, ParamError, Precision};
use crate::boxes::Detection;
use crate::cloud::Points;
use crate::detector::{Detector, DetectorError};
use crate::model::ModelConfig;
use crate::model::weights::Weights;
use crate::quant::QuantModel;
use crate::quant::file::{self, FileError};
use std::sync::{Arc, Mutex};

/// Numeric precision of an engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActivePrecision {
    Fp32,
    Int8,
}

impl ActivePrecision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fp32 => "fp32",
            Self::Int8 => "int8",
        }
    }
}

/// A per-scan detector the node can run.
pub trait DetectEngine: Send {
    fn precision(&self) -> ActivePrecision;
    fn config(&self) -> &ModelConfig;
    fn detect(&mut self, points: &Points) -> Result<Vec<Detection>, DetectorError>;
    /// Whether the last scan filled the pillar cap (points were left out).
    fn pillars_at_cap(&self) -> bool;
}

impl DetectEngine for Detector {
    fn precision(&self) -> ActivePrecision {
        match Detector::precision(self) {
            "int8" => ActivePrecision::Int8,
            _ => ActivePrecision::Fp32,
        }
    }

    fn config(&self) -> &ModelConfig {
        Detector::config(self)
    }

    fn detect(&mut self, points: &Points) -> Result<Vec<Detection>, DetectorError> {
        Detector::detect(self, points)
    }

    fn pillars_at_cap(&self) -> bool {
        self.last_pillars().len() >= self.config().voxelization.max_cells.test
    }
}

type Pending = Arc<Mutex<Option<Box<dyn DetectEngine>>>>;

/// The detector thread's engine plus the slot a replacement arrives in.
pub struct EngineSwitch {
    current: Box<dyn DetectEngine>,
    pending: Pending,
    swaps: u64,
}

/// The producer side of the seam (cloneable, sendable to a calibration thread).
#[derive(Clone)]
pub struct SwapHandle {
    pending: Pending,
}

impl SwapHandle {
    /// Offers `engine` to replace the one in use at the next scan boundary. A newer
    /// offer replaces an older one not yet picked up.
    pub fn offer(&self, engine: Box<dyn DetectEngine>) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) = Some(engine);
    }
}

/// A completed swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Swap {
    pub from: ActivePrecision,
    pub to: ActivePrecision,
}

impl EngineSwitch {
    pub fn new(engine: Box<dyn DetectEngine>) -> (Self, SwapHandle) {
        let pending: Pending = Arc::new(Mutex::new(None));
        (
            Self {
                current: engine,
                pending: pending.clone(),
                swaps: 0,
            },
            SwapHandle { pending },
        )
    }

    /// Installs an offered engine, if any. Call between scans only.
    pub fn poll_swap(&mut self) -> Option<Swap> {
        let next = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let from = self.current.precision();
        self.current = next;
        self.swaps += 1;
        Some(Swap {
            from,
            to: self.current.precision(),
        })
    }

    pub fn engine(&mut self) -> &mut dyn DetectEngine {
        self.current.as_mut()
    }

    pub fn precision(&self) -> ActivePrecision {
        self.current.precision()
    }

    pub fn swaps(&self) -> u64 {
        self.swaps
    }
}

/// Why the node cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error("parameter `int8_model_path`: {0}")]
    Int8Model(#[from] FileError),
    #[error("{0}")]
    Unsupported(String),
}

/// The model config the node runs: the file's config with the NMS override, and the
/// decoder's score floor lowered to the smallest configured threshold so that the
/// per-class thresholds (applied after decoding) see every candidate they accept.
pub fn prepare_config(
    mut cfg: ModelConfig,
    params: &NodeParams,
) -> Result<ModelConfig, ParamError> {
    params.check_classes(&cfg.classes())?;
    if let Some(t) = params.nms_iou_threshold {
        cfg.decode.nms.threshold = t;
    }
    let floor = params
        .class_score_thresholds
        .values()
        .copied()
        .fold(params.score_threshold, f32::min);
    cfg.decode.score_threshold = cfg.decode.score_threshold.min(floor);
    Ok(cfg)
}

/// The FP32 model as its file holds it. Calibration runs on this config, and INT8 models
/// are checked against it (not against the node's threshold overrides, which only
/// change decoding), so a cached model stays valid when thresholds change.
#[derive(Debug, Clone)]
pub struct Fp32Model {
    pub config: ModelConfig,
    pub weights: Weights,
    /// The config with the node's decoding overrides ([`prepare_config`]).
    pub run_config: ModelConfig,
    /// Where the detectors run (calibration stays on the CPU).
    pub device: Device,
}

impl Fp32Model {
    pub fn load(params: &NodeParams) -> Result<Self, StartError> {
        let (config, weights) = Detector::read_model_file(&params.model_path)?;
        let run_config = prepare_config(config.clone(), params)?;
        Ok(Self {
            config,
            weights,
            run_config,
            device: params.device,
        })
    }

    /// The FP32 detector with the node's decoding overrides, on the node's device.
    pub fn fp32(&self) -> Result<Detector, DetectorError> {
        match self.device {
            Device::Cpu => Detector::new(self.run_config.clone(), &self.weights),
            Device::Cuda(n) => self.cuda(None, n),
        }
    }

    /// The INT8 detector of `quant` (calibrated for these weights), on the node's device.
    pub fn int8(&self, quant: &QuantModel) -> Result<Detector, DetectorError> {
        match self.device {
            Device::Cpu => Detector::new_int8(self.run_config.clone(), &self.weights, quant),
            Device::Cuda(n) => self.cuda(Some(quant), n),
        }
    }

    /// The detector on GPU `ordinal`: FP32, or INT8 with `quant`.
    #[cfg(feature = "cuda")]
    fn cuda(&self, quant: Option<&QuantModel>, ordinal: usize) -> Result<Detector, DetectorError> {
        use crate::engine::cuda::CudaPrecision;
        let precision = match quant {
            Some(q) => CudaPrecision::Int8(q),
            None => CudaPrecision::Fp32,
        };
        Detector::new_cuda(self.run_config.clone(), &self.weights, precision, ordinal)
    }

    /// Without the `cuda` feature no parameter selects a GPU; this says so if one does.
    #[cfg(not(feature = "cuda"))]
    fn cuda(&self, _: Option<&QuantModel>, ordinal: usize) -> Result<Detector, DetectorError> {
        Err(crate::engine::EngineError::Device(format!(
            "cuda:{ordinal} requested, but this build has no `cuda` feature"
        ))
        .into())
    }
}

/// The FP32 detector for the node's parameters.
pub fn load_fp32(params: &NodeParams) -> Result<Detector, StartError> {
    Ok(Fp32Model::load(params)?.fp32()?)
}

/// Loads the calibration cache when it was made for this FP32 model (weights digest and
/// config) with the configured calibration method; otherwise says why not.
pub fn load_cache(model: &Fp32Model, params: &NodeParams) -> Result<QuantModel, String> {
    let path = &params.calibration.cache_path;
    let q = file::load_for(path, &model.config, &model.weights).map_err(|e| e.to_string())?;
    if q.provenance.method != params.calibration.method {
        return Err(format!(
            "calibration cache {} was made with method {}, calibration.method is {}",
            path.display(),
            q.provenance.method,
            params.calibration.method
        ));
    }
    Ok(q)
}

/// What the node calibrates from after starting.
#[derive(Debug, Clone, PartialEq)]
pub enum CalibrationPlan {
    /// Nothing (FP32 by request, calibration off, or an INT8 model is already in use).
    None,
    /// Collect scans from the input topic.
    Online,
    /// Select scans from a recording, in the background.
    FromBag(std::path::PathBuf),
}

/// The engine to start with, the initial calibration state, and notes to log.
pub struct Startup {
    pub engine: Box<dyn DetectEngine>,
    pub model: Arc<Fp32Model>,
    pub calibration: CalibrationState,
    pub plan: CalibrationPlan,
    /// Notes to log at start: (level, text).
    pub notes: Vec<(log::Level, String)>,
}

/// Chooses the starting engine and calibration from the parameters:
/// - `fp32`: FP32, never calibrates.
/// - `int8`: the INT8 model at `int8_model_path`, else the calibration cache when it
///   matches the FP32 model; refuses to start without one.
/// - `auto`: like `int8` when an INT8 model is usable (a bad one is reported, not fatal),
///   otherwise FP32 while calibrating as `calibration.mode` says.
pub fn start(params: &NodeParams) -> Result<Startup, StartError> {
    let model = Arc::new(Fp32Model::load(params)?);
    let mut notes = Vec::new();
    let mode = params.calibration.mode;
    let cache = &params.calibration.cache_path;
    let int8_start = |q: &QuantModel, source: String, notes: Vec<(log::Level, String)>| {
        Ok::<_, StartError>(Startup {
            engine: Box::new(model.int8(q)?),
            model: model.clone(),
            calibration: CalibrationState::Done { source },
            plan: CalibrationPlan::None,
            notes,
        })
    };
    if params.precision == Precision::Fp32 {
        if mode != CalibrationMode::Off {
            notes.push((
                log::Level::Warn,
                format!(
                    "calibration.mode {} has no effect with precision fp32",
                    mode.as_str()
                ),
            ));
        }
        return Ok(Startup {
            engine: Box::new(model.fp32()?),
            model: model.clone(),
            calibration: CalibrationState::Off,
            plan: CalibrationPlan::None,
            notes,
        });
    }
    if let Some(path) = &params.int8_model_path {
        match file::load_for(path, &model.config, &model.weights) {
            Ok(q) => {
                notes.push((
                    log::Level::Info,
                    format!(
                        "loaded INT8 model {} ({} on {} scans); calibration.mode {} not used",
                        path.display(),
                        q.provenance.method,
                        q.provenance.frames,
                        mode.as_str()
                    ),
                ));
                return int8_start(&q, path.display().to_string(), notes);
            }
            Err(e) if params.precision == Precision::Int8 => return Err(e.into()),
            Err(e) => notes.push((log::Level::Warn, format!("int8_model_path not used: {e}"))),
        }
    }
    if cache.exists() {
        match load_cache(&model, params) {
            Ok(q) => {
                notes.push((
                    log::Level::Info,
                    format!(
                        "loaded the cached INT8 model {} ({} on {} scans); not recalibrating",
                        cache.display(),
                        q.provenance.method,
                        q.provenance.frames
                    ),
                ));
                return int8_start(&q, format!("cache {}", cache.display()), notes);
            }
            Err(why) => notes.push((
                log::Level::Warn,
                format!("calibration cache not used: {why}"),
            )),
        }
    }
    if params.precision == Precision::Int8 {
        return Err(StartError::Unsupported(format!(
            "parameter `precision` = \"int8\" needs an INT8 model: set int8_model_path, or \
             calibrate first (precision auto with calibration.mode online or from-bag writes \
             the cache {})",
            cache.display()
        )));
    }
    let want = params.calibration.frames;
    let (calibration, plan) = match mode {
        CalibrationMode::Off => (CalibrationState::Off, CalibrationPlan::None),
        CalibrationMode::Online => (
            CalibrationState::Collecting { have: 0, want },
            CalibrationPlan::Online,
        ),
        CalibrationMode::FromBag => {
            let bag = params.calibration.bag_path.clone().ok_or_else(|| {
                StartError::Unsupported(
                    "calibration.mode from-bag needs calibration.bag_path".into(),
                )
            })?;
            (
                CalibrationState::Collecting { have: 0, want },
                CalibrationPlan::FromBag(bag),
            )
        }
    };
    Ok(Startup {
        engine: Box::new(model.fp32()?),
        model,
        calibration,
        plan,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::graph::Graph;
    use crate::model::weights::Weights;
    use crate::node::params::ParamValue;
    use crate::sim::{LidarModel, SimConfig, Simulator};

    fn tiny(seed: u64) -> Detector {
        let text = include_str!("../../tests/fixtures/tiny_model.yaml");
        let cfg = ModelConfig::from_yaml(text).unwrap();
        let w = Weights::init(&Graph::build(&cfg).unwrap(), seed);
        Detector::new(cfg, &w).unwrap()
    }

    #[test]
    fn a_swap_takes_effect_between_scans_only() {
        let sim = Simulator::new(SimConfig::new(LidarModel::Hdl32));
        let scans: Vec<Points> = (0..4).map(|s| sim.sample(s).0).collect();
        // References: what each engine alone gives on each scan.
        let (mut ra, mut rb) = (tiny(1), tiny(2));
        let want_a: Vec<_> = scans.iter().map(|p| ra.detect(p).unwrap()).collect();
        let want_b: Vec<_> = scans.iter().map(|p| rb.detect(p).unwrap()).collect();
        assert_ne!(want_a, want_b, "the two engines must be distinguishable");

        let (mut switch, handle) = EngineSwitch::new(Box::new(tiny(1)));
        let producer = std::thread::spawn(move || handle.offer(Box::new(tiny(2))));
        let mut got = vec![switch.engine().detect(&scans[0]).unwrap()];
        producer.join().unwrap();
        got.push(switch.engine().detect(&scans[1]).unwrap());
        // Offered mid-stream, installed only at the boundary.
        assert_eq!(got, want_a[..2]);
        assert_eq!(
            switch.poll_swap(),
            Some(Swap {
                from: ActivePrecision::Fp32,
                to: ActivePrecision::Fp32
            })
        );
        assert_eq!(switch.poll_swap(), None);
        for (p, want) in scans[2..].iter().zip(&want_b[2..]) {
            assert_eq!(&switch.engine().detect(p).unwrap(), want);
        }
        assert_eq!(switch.swaps(), 1);
    }

    fn params(pairs: &[(&str, ParamValue)]) -> NodeParams {
        let m = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        NodeParams::from_values(&m).unwrap()
    }

    #[test]
    fn start_follows_the_parameters() {
        let cfg =
            ModelConfig::from_yaml(include_str!("../../tests/fixtures/tiny_model.yaml")).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("tiny.safetensors");
        let meta = std::collections::BTreeMap::from([(
            crate::detector::MODEL_CONFIG_KEY.to_string(),
            cfg.to_yaml(),
        )]);
        Weights::init(&Graph::build(&cfg).unwrap(), 3)
            .save(&model, &meta)
            .unwrap();
        let path = ParamValue::String(model.display().to_string());
        let s = |v: &str| ParamValue::String(v.into());

        let st = start(&params(&[
            ("model_path", path.clone()),
            ("score_threshold", ParamValue::Double(0.05)),
            ("nms_iou_threshold", ParamValue::Double(0.5)),
            ("calibration.mode", s("online")),
            ("calibration.frames", ParamValue::Integer(8)),
        ]))
        .unwrap();
        assert_eq!(st.engine.precision(), ActivePrecision::Fp32);
        assert_eq!(st.engine.config().decode.score_threshold, 0.05);
        assert_eq!(st.engine.config().decode.nms.threshold, 0.5);
        assert_eq!(
            st.calibration,
            CalibrationState::Collecting { have: 0, want: 8 }
        );
        assert!(st.notes.is_empty());
        assert_eq!(st.plan, CalibrationPlan::Online);

        // A higher node threshold leaves the model's decoder floor alone.
        let st = start(&params(&[
            ("model_path", path.clone()),
            ("precision", s("fp32")),
            ("calibration.mode", s("online")),
        ]))
        .unwrap();
        assert_eq!(st.engine.config().decode.score_threshold, 0.1);
        assert_eq!(st.calibration, CalibrationState::Off);
        assert!(st.notes[0].1.contains("no effect"), "{:?}", st.notes);
        assert_eq!(st.plan, CalibrationPlan::None);

        let e = start(&params(&[
            ("model_path", path.clone()),
            ("precision", s("int8")),
        ]))
        .err()
        .unwrap();
        assert!(e.to_string().contains("needs an INT8 model"), "{e}");
        let e = start(&params(&[
            ("model_path", path.clone()),
            (
                "class_score_thresholds",
                ParamValue::StringArray(vec!["truck=0.2".into()]),
            ),
        ]))
        .err()
        .unwrap();
        assert!(e.to_string().contains("no such class"), "{e}");
        let e = start(&params(&[("model_path", s("/nonexistent/m.safetensors"))]))
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/m.safetensors"), "{e}");
    }
}
