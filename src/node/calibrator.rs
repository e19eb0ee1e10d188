//! Background calibration: collected scans (live, or selected from a recording) to an
//! INT8 engine, without disturbing the detector. The calibration runs on its own thread
//! and its own rayon pool, all at the lowest CPU priority (nice 19), so the detector
//! thread keeps its core; the INT8 model is written to the cache atomically and the
//! engine handed to the detector thread through [`SwapHandle`], which installs it
//! between two scans. Online and from-bag calibration differ only in where the scans
//! come from ([`Controller::start_scans`], [`Controller::start_bag`]).

use super::calib::{CalibrationState, Offer, ScanSelector};
use super::engine::{Fp32Model, SwapHandle};
use super::params::CalibrationParams;
use crate::cloud::{DecodeOptions, Points};
use crate::detector::{Detector, DetectorError};
use crate::model::graph::Graph;
use crate::quant::calibrate::{CalibError, CalibOptions, Method};
use crate::quant::file::{self, FileError};
use crate::source::{BagScanReader, SourceError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum CalibJobError {
    #[error("calibration.method `{0}` is not a calibration method")]
    Method(String),
    #[error(transparent)]
    Calib(#[from] CalibError),
    #[error(transparent)]
    Detector(#[from] DetectorError),
    #[error("calibration bag: {0}")]
    Bag(#[from] SourceError),
    #[error("calibration bag {0} holds no usable scan")]
    EmptyBag(PathBuf),
    #[error("model: {0}")]
    Model(String),
    #[error("cannot start the calibration thread: {0}")]
    Thread(std::io::Error),
    #[error("a calibration is already running ({0})")]
    Busy(String),
}

/// The calibration options of the node's parameters: the method's defaults (W8A8,
/// asymmetric activations, every LiDAR-PTQ component on) with the configured
/// reconstruction iterations.
pub fn options(params: &CalibrationParams) -> Result<CalibOptions, CalibJobError> {
    let method = Method::from_name(&params.method)
        .ok_or_else(|| CalibJobError::Method(params.method.clone()))?;
    let mut o = CalibOptions::new(method);
    o.recon.iters = params.iters;
    Ok(o)
}

/// A finished calibration.
pub struct Outcome {
    pub engine: Detector,
    /// The method and number of scans, for messages.
    pub method: String,
    pub scans: usize,
    pub seconds: f64,
    /// Writing the cache: a failure leaves the INT8 engine usable (it is only not
    /// remembered across restarts).
    pub cached: Result<(), FileError>,
}

/// Calibrates `model` on `scans` and writes the INT8 model to `cache` (atomically).
/// Synchronous: the body of the background thread.
pub fn calibrate(
    model: &Fp32Model,
    scans: &[Points],
    options: &CalibOptions,
    cache: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<Outcome, CalibJobError> {
    let t0 = Instant::now();
    let mut opts = options.clone();
    // Fewer scans than the method's defaults use: use them all.
    opts.recon.frames = opts.recon.frames.min(scans.len()).max(1);
    opts.grid_frames = opts.grid_frames.min(scans.len()).max(1);
    let q = crate::quant::calibrate::calibrate_with_progress(
        &model.config,
        &model.weights,
        scans,
        &opts,
        progress,
    )?;
    let graph = Graph::build(&model.config).map_err(CalibJobError::Model)?;
    let cached = file::save(cache, &q, &graph);
    let engine = model.int8(&q)?;
    Ok(Outcome {
        engine,
        method: q.provenance.method.clone(),
        scans: scans.len(),
        seconds: t0.elapsed().as_secs_f64(),
        cached,
    })
}

/// Up to `want` distinct scans of a recording, chosen by the same rules as live scans
/// (spacing by header stamp, near-duplicates skipped). Unreadable scans are skipped with
/// a warning; a recording with fewer distinct scans gives what it has.
pub fn select_from_bag(
    bag: &Path,
    decode: &DecodeOptions,
    mut selector: ScanSelector,
    mut on_taken: impl FnMut(usize, usize),
) -> Result<Vec<Points>, CalibJobError> {
    let mut reader = BagScanReader::open(bag, None, None, decode)?;
    for scan in reader.by_ref() {
        match scan {
            Ok(s) => {
                let stamp = s.scan.header.stamp_nanos();
                if let Offer::Taken { have, want } = selector.offer(stamp, &s.scan.scan.points) {
                    on_taken(have, want);
                }
                if selector.is_full() {
                    break;
                }
            }
            Err(e) => log::warn!("calibration bag {}: skipping a scan: {e}", bag.display()),
        }
    }
    if selector.collected() < selector.want() {
        log::warn!(
            "calibration bag {} gave {} distinct scans of the {} wanted ({} near-duplicates skipped)",
            bag.display(),
            selector.collected(),
            selector.want(),
            selector.skipped_duplicates()
        );
    }
    let scans = selector.into_scans();
    if scans.is_empty() {
        return Err(CalibJobError::EmptyBag(bag.to_path_buf()));
    }
    Ok(scans)
}

/// Lowers the calling thread's CPU priority to nice 19 (on Linux, niceness is per
/// thread), so that it only uses CPU time the detector leaves.
pub fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's id; no memory is passed.
        let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 19) };
        if rc != 0 {
            log::debug!(
                "cannot lower the calibration thread's priority: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Calibration state shared by the detector thread, the calibration thread and the
/// diagnostics: the state, and the live progress of a running calibration.
pub struct Status {
    state: Mutex<CalibrationState>,
    progress: indicatif::ProgressBar,
    busy: AtomicBool,
}

impl Status {
    pub fn new(state: CalibrationState) -> Self {
        Self {
            state: Mutex::new(state),
            progress: indicatif::ProgressBar::hidden(),
            busy: AtomicBool::new(false),
        }
    }

    pub fn set(&self, s: CalibrationState) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
    }

    /// The state; while calibrating, with the stage and fraction done from the progress.
    pub fn get(&self) -> CalibrationState {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        match s {
            CalibrationState::Calibrating { .. } => {
                let len = self.progress.length().unwrap_or(0);
                CalibrationState::Calibrating {
                    stage: self.progress.message(),
                    progress: if len == 0 {
                        0.0
                    } else {
                        self.progress.position() as f32 / len as f32
                    },
                }
            }
            other => other,
        }
    }

    /// Whether a calibration (collection from a bag, or the optimisation) is running.
    pub fn busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst)
    }
}

/// Starts calibrations and reports them; one at a time.
pub struct Controller {
    model: Arc<Fp32Model>,
    params: CalibrationParams,
    decode: DecodeOptions,
    swap: SwapHandle,
    pub status: Arc<Status>,
    /// Set by the `~/calibrate` service: the detector thread starts collecting anew.
    collect_requested: AtomicBool,
}

impl Controller {
    pub fn new(
        model: Arc<Fp32Model>,
        params: CalibrationParams,
        decode: DecodeOptions,
        swap: SwapHandle,
        state: CalibrationState,
    ) -> Self {
        Self {
            model,
            params,
            decode,
            swap,
            status: Arc::new(Status::new(state)),
            collect_requested: AtomicBool::new(false),
        }
    }

    /// A selector for the configured number, spacing and distinctness of scans.
    pub fn selector(&self) -> ScanSelector {
        ScanSelector::new(
            self.params.frames,
            self.params.spacing_s,
            self.params.max_similarity,
        )
    }

    /// Asks the detector thread to collect live scans anew (the `~/calibrate` service).
    /// Refused while a calibration runs.
    pub fn request_collection(&self) -> Result<(), String> {
        if self.status.busy() {
            return Err(format!(
                "a calibration is already running ({})",
                self.status.get().describe()
            ));
        }
        self.collect_requested.store(true, Ordering::SeqCst);
        self.status.set(CalibrationState::Collecting {
            have: 0,
            want: self.params.frames,
        });
        Ok(())
    }

    /// Takes a pending collection request.
    pub fn take_collection_request(&self) -> bool {
        self.collect_requested.swap(false, Ordering::SeqCst)
    }

    /// Calibrates on collected live scans in the background.
    pub fn start_scans(self: &Arc<Self>, scans: Vec<Points>) -> Result<(), CalibJobError> {
        self.spawn(move |_| Ok(scans))
    }

    /// Selects scans from a recording and calibrates on them, all in the background.
    pub fn start_bag(self: &Arc<Self>, bag: PathBuf) -> Result<(), CalibJobError> {
        self.spawn(move |c| {
            log::info!(
                "calibration: selecting {} distinct scans from {}",
                c.params.frames,
                bag.display()
            );
            select_from_bag(&bag, &c.decode, c.selector(), |have, want| {
                c.status.set(CalibrationState::Collecting { have, want })
            })
        })
    }

    fn spawn(
        self: &Arc<Self>,
        scans: impl FnOnce(&Controller) -> Result<Vec<Points>, CalibJobError> + Send + 'static,
    ) -> Result<(), CalibJobError> {
        if self.status.busy.swap(true, Ordering::SeqCst) {
            return Err(CalibJobError::Busy(self.status.get().describe()));
        }
        let c = self.clone();
        let spawned = std::thread::Builder::new()
            .name("calibration".into())
            .spawn(move || {
                lower_priority();
                let result = scans(&c).and_then(|scans| c.run(&scans));
                if let Err(e) = result {
                    log::error!("calibration failed: {e}; the engine in use stays");
                    c.status.set(CalibrationState::Failed {
                        error: e.to_string(),
                    });
                }
                c.status.busy.store(false, Ordering::SeqCst);
            });
        if let Err(e) = spawned {
            self.status.busy.store(false, Ordering::SeqCst);
            return Err(CalibJobError::Thread(e));
        }
        Ok(())
    }

    /// Calibrates on a low-priority pool and offers the INT8 engine.
    fn run(&self, scans: &[Points]) -> Result<(), CalibJobError> {
        let opts = options(&self.params)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("calibration-{i}"))
            .start_handler(|_| lower_priority())
            .build()
            .map_err(|e| CalibJobError::Thread(std::io::Error::other(e.to_string())))?;
        log::info!(
            "calibration: {} on {} scans started (background, lowest CPU priority)",
            opts.method.name(),
            scans.len()
        );
        self.status.progress.reset();
        self.status.set(CalibrationState::Calibrating {
            stage: String::new(),
            progress: 0.0,
        });
        let cache = &self.params.cache_path;
        let outcome =
            pool.install(|| calibrate(&self.model, scans, &opts, cache, &self.status.progress))?;
        let source = match &outcome.cached {
            Ok(()) => {
                log::info!(
                    "calibration: {} on {} scans done in {:.1} s; INT8 model cached at {}",
                    outcome.method,
                    outcome.scans,
                    outcome.seconds,
                    cache.display()
                );
                format!("calibrated on {} scans, cached", outcome.scans)
            }
            Err(e) => {
                log::error!(
                    "calibration: {} on {} scans done in {:.1} s, but the cache was not written: {e}",
                    outcome.method,
                    outcome.scans,
                    outcome.seconds
                );
                format!("calibrated on {} scans, not cached", outcome.scans)
            }
        };
        self.swap.offer(Box::new(outcome.engine));
        self.status.set(CalibrationState::Done { source });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::MODEL_CONFIG_KEY;
    use crate::model::ModelConfig;
    use crate::model::weights::Weights;
    use crate::node::engine::{ActivePrecision, CalibrationPlan, EngineSwitch, Swap, start};
    use crate::node::params::{NodeParams, ParamValue};
    use crate::sim::{LidarModel, SimConfig, Simulator};
    use std::collections::BTreeMap;
    use std::time::Duration;

    /// A self-describing tiny model file with seeded weights.
    fn tiny_model(path: &Path, seed: u64) {
        let cfg =
            ModelConfig::from_yaml(include_str!("../../tests/fixtures/tiny_model.yaml")).unwrap();
        let meta = BTreeMap::from([(MODEL_CONFIG_KEY.to_string(), cfg.to_yaml())]);
        Weights::init(&Graph::build(&cfg).unwrap(), seed)
            .save(path, &meta)
            .unwrap();
    }

    fn params(dir: &Path, extra: &[(&str, ParamValue)]) -> NodeParams {
        let s = |v: &str| ParamValue::String(v.into());
        let mut m: BTreeMap<String, ParamValue> = BTreeMap::from([
            (
                "model_path".into(),
                s(&dir.join("tiny.safetensors").display().to_string()),
            ),
            ("score_threshold".into(), ParamValue::Double(0.05)),
            ("calibration.mode".into(), s("online")),
            ("calibration.method".into(), s("minmax")),
            ("calibration.frames".into(), ParamValue::Integer(3)),
        ]);
        for (k, v) in extra {
            m.insert(k.to_string(), v.clone());
        }
        NodeParams::from_values(&m).unwrap()
    }

    fn scans(n: u64) -> Vec<Points> {
        let sim = Simulator::new(SimConfig::new(LidarModel::Hdl32));
        (0..n).map(|s| sim.sample(100 + s).0).collect()
    }

    fn wait_until_idle(status: &Status) {
        let t0 = Instant::now();
        while status.busy() && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(!status.busy(), "calibration did not finish");
    }

    #[test]
    fn background_calibration_swaps_to_int8_caches_and_is_reused() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(&dir.path().join("tiny.safetensors"), 7);
        let p = params(dir.path(), &[]);
        let st = start(&p).unwrap();
        assert_eq!(st.engine.precision(), ActivePrecision::Fp32);
        assert_eq!(st.plan, CalibrationPlan::Online);
        let model = st.model.clone();
        let (mut switch, swap) = EngineSwitch::new(st.engine);
        let c = Arc::new(Controller::new(
            model.clone(),
            p.calibration.clone(),
            p.decode_options(),
            swap,
            st.calibration,
        ));
        let frames = scans(3);
        c.start_scans(frames.clone()).unwrap();
        wait_until_idle(&c.status);
        assert!(
            matches!(c.status.get(), CalibrationState::Done { .. }),
            "{:?}",
            c.status.get()
        );
        assert_eq!(
            switch.poll_swap(),
            Some(Swap {
                from: ActivePrecision::Fp32,
                to: ActivePrecision::Int8
            })
        );

        // The cache holds exactly what calibrating directly gives (deterministic bytes),
        // and the swapped-in engine detects as an INT8 detector built from the cache.
        let cache = &p.calibration.cache_path;
        let direct = crate::quant::calibrate::calibrate(
            &model.config,
            &model.weights,
            &frames,
            &options(&p.calibration).unwrap(),
        )
        .unwrap();
        let graph = Graph::build(&model.config).unwrap();
        assert_eq!(
            std::fs::read(cache).unwrap(),
            file::to_bytes(&direct, &graph).unwrap()
        );
        let q = file::load_for(cache, &model.config, &model.weights).unwrap();
        let mut reference = model.int8(&q).unwrap();
        let probe = scans(5).pop().unwrap();
        let got = switch.engine().detect(&probe).unwrap();
        assert_eq!(got, reference.detect(&probe).unwrap());
        assert!(
            !got.is_empty(),
            "seeded tiny model with a low threshold finds boxes"
        );

        // A restart uses the cache without calibrating ...
        let st = start(&p).unwrap();
        assert_eq!(st.engine.precision(), ActivePrecision::Int8);
        assert_eq!(st.plan, CalibrationPlan::None);
        assert!(
            st.notes.iter().any(|(_, n)| n.contains("cached INT8")),
            "{:?}",
            st.notes
        );
        // ... also with precision int8, and with other thresholds (decoding only).
        let p8 = params(
            dir.path(),
            &[
                ("precision", ParamValue::String("int8".into())),
                ("score_threshold", ParamValue::Double(0.4)),
            ],
        );
        assert_eq!(
            start(&p8).unwrap().engine.precision(),
            ActivePrecision::Int8
        );

        // Another method, or other weights under the same path: recalibrate.
        let other_method = params(
            dir.path(),
            &[("calibration.method", ParamValue::String("entropy".into()))],
        );
        let st = start(&other_method).unwrap();
        assert_eq!(st.engine.precision(), ActivePrecision::Fp32);
        assert_eq!(st.plan, CalibrationPlan::Online);
        assert!(
            st.notes.iter().any(|(_, n)| n.contains("method minmax")),
            "{:?}",
            st.notes
        );
        tiny_model(&dir.path().join("tiny.safetensors"), 8);
        let st = start(&p).unwrap();
        assert_eq!(st.engine.precision(), ActivePrecision::Fp32);
        assert!(
            st.notes
                .iter()
                .any(|(_, n)| n.contains("other FP32 weights")),
            "{:?}",
            st.notes
        );
        // precision int8 without a usable INT8 model refuses to start.
        let e = start(&p8).err().unwrap().to_string();
        assert!(e.contains("needs an INT8 model"), "{e}");
        let with_path = params(
            dir.path(),
            &[
                ("precision", ParamValue::String("int8".into())),
                (
                    "int8_model_path",
                    ParamValue::String(cache.display().to_string()),
                ),
            ],
        );
        let e = start(&with_path).err().unwrap().to_string();
        assert!(
            e.contains("int8_model_path") && e.contains("other FP32 weights"),
            "{e}"
        );
    }

    #[test]
    fn a_failed_calibration_is_reported_and_the_engine_stays() {
        let dir = tempfile::tempdir().unwrap();
        tiny_model(&dir.path().join("tiny.safetensors"), 7);
        let p = params(dir.path(), &[]);
        let st = start(&p).unwrap();
        let (mut switch, swap) = EngineSwitch::new(st.engine);
        let c = Arc::new(Controller::new(
            st.model,
            p.calibration.clone(),
            p.decode_options(),
            swap,
            st.calibration,
        ));
        c.start_scans(Vec::new()).unwrap();
        wait_until_idle(&c.status);
        match c.status.get() {
            CalibrationState::Failed { error } => assert!(error.contains("at least one frame")),
            s => panic!("{s:?}"),
        }
        assert_eq!(switch.poll_swap(), None);
        assert!(!p.calibration.cache_path.exists());
        // The service may start a new collection afterwards.
        assert!(c.request_collection().is_ok());
        assert!(c.take_collection_request());
        assert!(!c.take_collection_request());
    }

    #[test]
    fn bags_give_scans_by_the_live_rules() {
        let dir = tempfile::tempdir().unwrap();
        let scene = crate::sim::Scene::new(SimConfig::new(LidarModel::Hdl32), 3);
        let opts = crate::sim::record::RecordOptions {
            frames: 6,
            ..Default::default()
        };
        let bag =
            crate::sim::record::record(&scene, &opts, &dir.path().join("bag"), |_| {}).unwrap();
        let decode = DecodeOptions::default();
        let all = crate::source::read_bag_scans(&bag, None, &decode, |_| true).unwrap();
        assert_eq!(all.len(), 6);
        // 0.1 s spacing, duplicates allowed: the first scan, then each one at least
        // 0.1 s after the last taken (computed here from the bag's stamps).
        let mut want_idx = Vec::new();
        let mut last: Option<u64> = None;
        for (i, s) in all.iter().enumerate() {
            let t = s.header.stamp_nanos();
            if last.is_none_or(|l| t - l >= 100_000_000) && want_idx.len() < 3 {
                want_idx.push(i);
                last = Some(t);
            }
        }
        assert_eq!(want_idx.len(), 3, "the recording is long enough");
        let mut taken = Vec::new();
        let got = select_from_bag(&bag, &decode, ScanSelector::new(3, 0.1, 1.0), |h, w| {
            taken.push((h, w))
        })
        .unwrap();
        assert_eq!(taken, vec![(1, 3), (2, 3), (3, 3)]);
        let want: Vec<Points> = want_idx
            .iter()
            .map(|&i| all[i].scan.points.clone())
            .collect();
        assert_eq!(got, want);
        // Asking for more than the bag has gives what there is.
        let got =
            select_from_bag(&bag, &decode, ScanSelector::new(10, 0.0, 1.0), |_, _| {}).unwrap();
        assert_eq!(got.len(), 6);
        let e = select_from_bag(
            &dir.path().join("nope"),
            &decode,
            ScanSelector::new(3, 0.2, 1.0),
            |_, _| {},
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn calibration_threads_run_at_the_lowest_priority() {
        // SAFETY: reads the calling thread's priority.
        let prio =
            || unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) };
        let before = prio();
        let lowered = std::thread::spawn(move || {
            lower_priority();
            prio()
        })
        .join()
        .unwrap();
        assert_eq!(lowered, 19);
        // Per thread: the spawning thread keeps its priority.
        assert_eq!(prio(), before);
    }
}
