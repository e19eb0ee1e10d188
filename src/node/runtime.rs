//! The running node: parameters declared and validated, the subscription feeding the
//! newest-scan-wins mailbox, the detector thread publishing results, and the 1 Hz
//! diagnostics. Threads: the ROS thread spins the node (callbacks stay short: a scan is
//! only moved into the mailbox), the detector thread takes the newest scan, runs the
//! engine in use and publishes.

use super::calib::{CalibrationState, Offer};
use super::calibrator::{CalibJobError, Controller};
use super::diagnostics::{self, Snapshot};
use super::engine::{CalibrationPlan, EngineSwitch, StartError, start};
use super::intake::{self, LogThrottle};
use super::mailbox::Mailbox;
use super::params::{CalibrationMode, NodeParams, ParamError, ParamValue, Precision, specs};
use super::stats::{RateMeter, Window};
use super::{convert, output};
use crate::cloud::{self, decode};
use futures::{executor::LocalPool, future, stream::StreamExt, task::LocalSpawnExt};
use r2r::QosProfile;
use r2r::sensor_msgs::msg::PointCloud2;
use r2r::std_msgs::msg::Float64;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::NODE_NAME;

/// Samples kept for the latency percentiles.
const WINDOW: usize = 2000;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("ROS: {0}")]
    Ros(#[from] r2r::Error),
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Calibration(#[from] CalibJobError),
    #[error("{0}")]
    Other(String),
}

/// A cloud that passed [`intake::check`].
struct Job {
    cloud: cloud::PointCloud2,
}

/// What the detector thread reports and the diagnostics read.
struct Shared {
    frames_out: u64,
    malformed: u64,
    errors: u64,
    last_error: String,
    over_budget: u64,
    pillar_cap: u64,
    processing: Window,
    latency: Window,
    in_rate: RateMeter,
    out_rate: RateMeter,
    last_input: Option<Instant>,
    precision_active: &'static str,
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Declares every parameter (with its description) on the node and validates the
/// values it was started with.
fn declare_parameters(node: &r2r::Node) -> Result<NodeParams, ParamError> {
    let mut map = node.params.lock().unwrap_or_else(|e| e.into_inner());
    let given: BTreeMap<String, ParamValue> = map
        .iter()
        .map(|(k, p)| (k.clone(), convert::param_from_r2r(&p.value)))
        .collect();
    let params = NodeParams::from_values(&given)?;
    for spec in specs() {
        match map.get_mut(spec.name) {
            Some(p) => p.description = spec.description,
            None => {
                map.insert(
                    spec.name.to_owned(),
                    r2r::Parameter {
                        value: convert::param_to_r2r(&spec.default),
                        description: spec.description,
                    },
                );
            }
        }
    }
    Ok(params)
}

/// Runs the node until SIGINT/SIGTERM.
pub fn run() -> Result<(), NodeError> {
    let ctx = r2r::Context::create()?;
    let mut node = r2r::Node::create(ctx, NODE_NAME, "")?;
    super::rosout::install(&mut node, log::LevelFilter::Info);
    let params = declare_parameters(&node)?;
    let startup = start(&params)?;
    for (level, note) in &startup.notes {
        log::log!(*level, "{note}");
    }
    let model_name = startup.model.config.name.clone();
    let classes: Vec<String> = startup
        .model
        .config
        .classes()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let (switch, swap) = EngineSwitch::new(startup.engine);
    log::info!(
        "model {} ({}, {} classes) on {}, precision {} (requested {}), calibration {}",
        model_name,
        params.model_path.display(),
        classes.len(),
        "cpu",
        switch.precision().as_str(),
        params.precision.as_str(),
        startup.calibration.describe()
    );
    let controller = Arc::new(Controller::new(
        startup.model.clone(),
        params.calibration.clone(),
        params.decode_options(),
        swap,
        startup.calibration,
    ));
    if let CalibrationPlan::FromBag(bag) = &startup.plan {
        controller.start_bag(bag.clone())?;
    }
    let collect_online = startup.plan == CalibrationPlan::Online;

    let t0 = Instant::now();
    let shared = Arc::new(Mutex::new(Shared {
        frames_out: 0,
        malformed: 0,
        errors: 0,
        last_error: String::new(),
        over_budget: 0,
        pillar_cap: 0,
        processing: Window::new(WINDOW),
        latency: Window::new(WINDOW),
        in_rate: RateMeter::new(5.0),
        out_rate: RateMeter::new(5.0),
        last_input: None,
        precision_active: switch.precision().as_str(),
    }));
    let mailbox: Arc<Mailbox<Job>> = Arc::new(Mailbox::new());

    let det_pub = node.create_publisher::<r2r::vision_msgs::msg::Detection3DArray>(
        &params.output_topic,
        QosProfile::default(),
    )?;
    #[cfg(feature = "autoware")]
    let objects_pub = node
        .create_publisher::<r2r::autoware_perception_msgs::msg::DetectedObjects>(
            "~/output/objects",
            QosProfile::default(),
        )?;
    let marker_pub = node.create_publisher::<r2r::visualization_msgs::msg::MarkerArray>(
        &params.markers_topic,
        QosProfile::default(),
    )?;
    let proc_pub =
        node.create_publisher::<Float64>("~/debug/processing_time_ms", QosProfile::default())?;
    let latency_pub =
        node.create_publisher::<Float64>("~/debug/pipeline_latency_ms", QosProfile::default())?;
    let diag_pub = node.create_publisher::<r2r::diagnostic_msgs::msg::DiagnosticArray>(
        "/diagnostics",
        QosProfile::default(),
    )?;

    // ---- detector thread
    let worker = {
        let mailbox = mailbox.clone();
        let shared = shared.clone();
        let params = params.clone();
        let controller = controller.clone();
        let mut switch = switch;
        std::thread::Builder::new()
            .name("detector".into())
            .spawn(move || {
                let class_refs: Vec<&str> = classes.iter().map(String::as_str).collect();
                let decode_opts = params.decode_options();
                let mut selector = collect_online.then(|| controller.selector());
                loop {
                    let Some(job) = mailbox.take_timeout(Duration::from_millis(200)) else {
                        if mailbox.is_closed() {
                            break;
                        }
                        continue;
                    };
                    let started = Instant::now();
                    let cloud = job.cloud;
                    let stamp_ns = cloud.header.stamp_nanos();
                    // Between two scans: the only place the engine changes.
                    if let Some(s) = switch.poll_swap() {
                        log::info!(
                            "switched engine {} -> {} from the scan stamped {}.{:09} on",
                            s.from.as_str(),
                            s.to.as_str(),
                            cloud.header.stamp_sec,
                            cloud.header.stamp_nanosec
                        );
                        shared.lock().unwrap().precision_active = s.to.as_str();
                    }
                    if controller.take_collection_request() {
                        selector = Some(controller.selector());
                        log::info!(
                            "calibration: collecting {} distinct scans from the input",
                            params.calibration.frames
                        );
                    }
                    // Cannot fail after intake::check; kept as a guard, counted as malformed.
                    let decoded = match decode(&cloud, &decode_opts) {
                        Ok(d) => d,
                        Err(e) => {
                            log::warn!("skipping malformed PointCloud2: {e}");
                            shared.lock().unwrap().malformed += 1;
                            continue;
                        }
                    };
                    let dets = if decoded.points.is_empty() {
                        Vec::new()
                    } else {
                        match switch.engine().detect(&decoded.points) {
                            Ok(d) => d,
                            Err(e) => {
                                log::error!("detector failed on a scan: {e}");
                                let mut s = shared.lock().unwrap();
                                s.errors += 1;
                                s.last_error = e.to_string();
                                continue;
                            }
                        }
                    };
                    let at_cap = !decoded.points.is_empty() && switch.engine().pillars_at_cap();
                    let dets = output::filter(dets, &params);
                    let mut header = cloud.header.clone();
                    if let Some(f) = &params.frame_id {
                        header.frame_id = f.clone();
                    }
                    let array = output::detection_array(&header, &dets);
                    let markers = output::markers(&dets, &class_refs);
                    let mut publish_error = None;
                    if let Err(e) = det_pub.publish(&convert::detections_to_r2r(&array)) {
                        publish_error = Some(e);
                    }
                    if let Err(e) = marker_pub.publish(&convert::markers_to_r2r(&header, &markers))
                    {
                        publish_error = Some(e);
                    }
                    #[cfg(feature = "autoware")]
                    if let Err(e) = objects_pub.publish(&convert::autoware_to_r2r(
                        &header,
                        &output::autoware_objects(&dets),
                    )) {
                        publish_error = Some(e);
                    }
                    let processing_ms = started.elapsed().as_secs_f64() * 1e3;
                    let latency_ms = (now_nanos() as f64 - stamp_ns as f64) * 1e-6;
                    let _ = proc_pub.publish(&Float64 {
                        data: processing_ms,
                    });
                    let _ = latency_pub.publish(&Float64 { data: latency_ms });
                    if let Some(e) = publish_error {
                        log::error!("publishing detections failed: {e}");
                    }

                    // Calibration scan collection (after publishing: never delays output).
                    if let Some(sel) = selector.as_mut()
                        && let Offer::Taken { have, want } = sel.offer(stamp_ns, &decoded.points)
                    {
                        controller
                            .status
                            .set(CalibrationState::Collecting { have, want });
                        log::info!("calibration: collected scan {have}/{want}");
                        if have == want {
                            log::info!(
                                "calibration: {want} scans collected ({} near-duplicates skipped)",
                                sel.skipped_duplicates()
                            );
                            let scans = selector.take().map(|s| s.into_scans()).unwrap_or_default();
                            if let Err(e) = controller.start_scans(scans) {
                                log::error!("calibration: {e}");
                            }
                        }
                    }

                    let mut s = shared.lock().unwrap();
                    s.frames_out += 1;
                    s.out_rate.record(t0.elapsed().as_secs_f64());
                    s.processing.push(processing_ms);
                    s.latency.push(latency_ms);
                    if processing_ms > params.processing_budget_ms {
                        s.over_budget += 1;
                    }
                    if at_cap {
                        s.pillar_cap += 1;
                    }
                }
            })
            .map_err(|e| NodeError::Other(format!("cannot start the detector thread: {e}")))?
    };

    // ---- ROS thread: subscription, diagnostics, services, parameters
    let mut pool = LocalPool::new();
    let spawner = pool.spawner();
    let spawn_err = |e: futures::task::SpawnError| NodeError::Other(e.to_string());

    let sub = node.subscribe::<PointCloud2>(&params.input_topic, QosProfile::sensor_data())?;
    {
        let mailbox = mailbox.clone();
        let shared = shared.clone();
        let decode_opts = params.decode_options();
        let mut throttle = LogThrottle::new(5, 10.0);
        spawner
            .spawn_local(sub.for_each(move |msg| {
                let now = t0.elapsed().as_secs_f64();
                let cloud = convert::cloud_from_r2r(msg);
                let checked = intake::check(&cloud, &decode_opts);
                {
                    let mut s = shared.lock().unwrap();
                    s.in_rate.record(now);
                    s.last_input = Some(Instant::now());
                    if checked.is_err() {
                        s.malformed += 1;
                    }
                }
                match checked {
                    // Checked before the mailbox: a broken cloud never displaces a good
                    // scan waiting for the detector, and is reported as malformed.
                    Ok(()) => {
                        mailbox.put(Job { cloud });
                    }
                    Err(e) => {
                        if let Some(left_out) = throttle.allow(now) {
                            let more = if left_out > 0 {
                                format!(" ({left_out} more since the last report)")
                            } else {
                                String::new()
                            };
                            log::warn!(
                                "skipping malformed PointCloud2 (frame `{}`, stamp {}.{:09}): {e}{more}",
                                cloud.header.frame_id,
                                cloud.header.stamp_sec,
                                cloud.header.stamp_nanosec
                            );
                        }
                    }
                }
                future::ready(())
            }))
            .map_err(spawn_err)?;
    }

    let mut timer = node.create_wall_timer(Duration::from_secs(1))?;
    {
        let shared = shared.clone();
        let mailbox = mailbox.clone();
        let node_name = node.fully_qualified_name()?;
        let params = params.clone();
        let controller = controller.clone();
        spawner
            .spawn_local(async move {
                let mut prev = (0u64, 0u64, 0u64, 0u64, 0u64);
                let mut last_progress_log = f64::NEG_INFINITY;
                while timer.tick().await.is_ok() {
                    let counts = mailbox.counts();
                    let calibration = controller.status.get();
                    let now = t0.elapsed().as_secs_f64();
                    if matches!(calibration, CalibrationState::Calibrating { .. })
                        && now - last_progress_log >= 5.0
                    {
                        log::info!("calibration progress: {}", calibration.describe());
                        last_progress_log = now;
                    }
                    let snap = {
                        let mut s = shared.lock().unwrap();
                        let snap = Snapshot {
                            node_name: node_name.clone(),
                            model: model_name.clone(),
                            model_path: params.model_path.display().to_string(),
                            precision_requested: params.precision.as_str().into(),
                            precision_active: s.precision_active.into(),
                            calibration: calibration.describe(),
                            device: params.device.to_string(),
                            input_rate_hz: s.in_rate.rate(now),
                            output_rate_hz: s.out_rate.rate(now),
                            frames_in: counts.received + s.malformed,
                            frames_out: s.frames_out,
                            dropped: counts.dropped,
                            dropped_recent: counts.dropped - prev.0,
                            malformed: s.malformed,
                            malformed_recent: s.malformed - prev.1,
                            errors: s.errors,
                            errors_recent: s.errors - prev.2,
                            last_error: s.last_error.clone(),
                            over_budget: s.over_budget,
                            over_budget_recent: s.over_budget - prev.3,
                            budget_ms: params.processing_budget_ms,
                            pillar_cap_recent: s.pillar_cap - prev.4,
                            processing_ms: s.processing.summary(),
                            latency_ms: s.latency.summary(),
                            since_input_s: s.last_input.map(|t| t.elapsed().as_secs_f64()),
                        };
                        prev = (
                            counts.dropped,
                            s.malformed,
                            s.errors,
                            s.over_budget,
                            s.pillar_cap,
                        );
                        snap
                    };
                    let status = diagnostics::status(&snap);
                    let msg = convert::diagnostics_to_r2r(
                        convert::time_from_nanos(now_nanos()),
                        &[status],
                    );
                    if let Err(e) = diag_pub.publish(&msg) {
                        log::warn!("publishing diagnostics failed: {e}");
                    }
                }
            })
            .map_err(spawn_err)?;
    }

    let calibrate = node.create_service::<r2r::std_srvs::srv::Trigger::Service>(
        "~/calibrate",
        QosProfile::services_default(),
    )?;
    {
        let controller = controller.clone();
        let precision = params.precision;
        let mode = params.calibration.mode;
        let bag = params.calibration.bag_path.clone();
        let frames = params.calibration.frames;
        spawner
            .spawn_local(calibrate.for_each(move |req| {
                let result = match (precision, mode, &bag) {
                    (Precision::Fp32, _, _) => {
                        Err("precision is fp32: the node does not use INT8".to_owned())
                    }
                    (_, CalibrationMode::FromBag, Some(bag)) => controller
                        .start_bag(bag.clone())
                        .map(|()| format!("calibrating from {} in the background", bag.display()))
                        .map_err(|e| e.to_string()),
                    _ => controller.request_collection().map(|()| {
                        format!(
                            "collecting {frames} distinct scans from the input, then calibrating in the background"
                        )
                    }),
                };
                let (success, message) = match result {
                    Ok(m) => (true, m),
                    Err(m) => (false, m),
                };
                log::info!("~/calibrate: {message}");
                let response = r2r::std_srvs::srv::Trigger::Response { success, message };
                if let Err(e) = req.respond(response) {
                    log::warn!("~/calibrate: cannot respond: {e}");
                }
                future::ready(())
            }))
            .map_err(spawn_err)?;
    }

    let (param_handler, param_events) = node.make_parameter_handler()?;
    spawner.spawn_local(param_handler).map_err(spawn_err)?;
    spawner
        .spawn_local(param_events.for_each(|(name, _)| {
            log::warn!("parameter `{name}` changed at run time; it takes effect after a restart");
            future::ready(())
        }))
        .map_err(spawn_err)?;

    let running = Arc::new(AtomicBool::new(true));
    {
        let running = running.clone();
        ctrlc::set_handler(move || running.store(false, Ordering::SeqCst))
            .map_err(|e| NodeError::Other(format!("cannot install the signal handler: {e}")))?;
    }
    log::info!(
        "listening on {} -> {}, {}",
        params.input_topic,
        params.output_topic,
        params.markers_topic
    );
    while running.load(Ordering::SeqCst) {
        node.spin_once(Duration::from_millis(20));
        pool.run_until_stalled();
    }

    mailbox.close();
    if worker.join().is_err() {
        return Err(NodeError::Other("the detector thread panicked".into()));
    }
    let counts = mailbox.counts();
    let s = shared.lock().unwrap();
    let (p, l) = (s.processing.summary(), s.latency.summary());
    log::info!(
        "shutting down: {} scans in, {} answered, {} dropped, {} malformed, {} over budget; \
         processing p50 {:.1} ms p99 {:.1} ms, latency p50 {:.1} ms p99 {:.1} ms",
        counts.received + s.malformed,
        s.frames_out,
        counts.dropped,
        s.malformed,
        s.over_budget,
        p.p50,
        p.p99,
        l.p50,
        l.p99
    );
    Ok(())
}
