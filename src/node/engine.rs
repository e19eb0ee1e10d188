//! The engine in use, and the seam through which a calibrated INT8 engine replaces the
//! FP32 one without a gap in service: a background task hands a ready engine to a
//! [`SwapHandle`]; the detector thread picks it up in [`EngineSwitch::poll_swap`]
//! between two scans, so every scan runs start to end on one engine and no scan waits
//! for calibration.

use super::calib::CalibrationState;
use super::params::{CalibrationMode, NodeParams, ParamError, Precision};
use crate::boxes::Detection;
use crate::cloud::Points;
use crate::detector::{Detector, DetectorError};
use crate::model::ModelConfig;
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
        ActivePrecision::Fp32
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

/// The FP32 detector for the node's parameters.
pub fn load_fp32(params: &NodeParams) -> Result<Detector, StartError> {
    let (cfg, weights) = Detector::read_model_file(&params.model_path)?;
    let cfg = prepare_config(cfg, params)?;
    Ok(Detector::new(cfg, &weights)?)
}

/// The engine to start with, the initial calibration state, and notes to log.
pub struct Startup {
    pub engine: Box<dyn DetectEngine>,
    pub calibration: CalibrationState,
    pub notes: Vec<String>,
}

/// Why INT8 cannot be used yet, for messages.
pub const NO_INT8: &str = "this build has no INT8 engine yet";

/// Chooses the starting engine and calibration state from the parameters. The INT8
/// engine and LiDAR-PTQ calibration plug in here (through [`SwapHandle`]) once they
/// exist; until then every path that needs them says so instead of pretending.
pub fn start(params: &NodeParams) -> Result<Startup, StartError> {
    if params.precision == Precision::Int8 {
        return Err(StartError::Unsupported(format!(
            "parameter `precision` = \"int8\": {NO_INT8}; use fp32 or auto"
        )));
    }
    let engine = load_fp32(params)?;
    let mut notes = Vec::new();
    if let Some(p) = &params.int8_model_path {
        notes.push(format!(
            "int8_model_path {} not loaded: {NO_INT8}; serving FP32",
            p.display()
        ));
    }
    if params.calibration.cache_path.exists() {
        notes.push(format!(
            "calibration cache {} not loaded: {NO_INT8}; serving FP32",
            params.calibration.cache_path.display()
        ));
    }
    let calibration = match (params.calibration.mode, params.precision) {
        (CalibrationMode::Off, _) => CalibrationState::Off,
        (_, Precision::Fp32) => {
            notes.push(format!(
                "calibration.mode {} has no effect with precision fp32",
                params.calibration.mode.as_str()
            ));
            CalibrationState::Off
        }
        (CalibrationMode::Online, _) => CalibrationState::Collecting {
            have: 0,
            want: params.calibration.frames,
        },
        (CalibrationMode::FromBag, _) => CalibrationState::Unavailable {
            reason: format!("calibration from a bag: {NO_INT8}"),
        },
    };
    Ok(Startup {
        engine: Box::new(engine),
        calibration,
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

        // A higher node threshold leaves the model's decoder floor alone.
        let st = start(&params(&[
            ("model_path", path.clone()),
            ("precision", s("fp32")),
            ("calibration.mode", s("online")),
        ]))
        .unwrap();
        assert_eq!(st.engine.config().decode.score_threshold, 0.1);
        assert_eq!(st.calibration, CalibrationState::Off);
        assert!(st.notes[0].contains("no effect"), "{:?}", st.notes);

        let e = start(&params(&[
            ("model_path", path.clone()),
            ("precision", s("int8")),
        ]))
        .err()
        .unwrap();
        assert!(e.to_string().contains("no INT8 engine"), "{e}");
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
