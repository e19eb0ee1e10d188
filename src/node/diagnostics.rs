//! The node's `diagnostic_msgs/DiagnosticStatus` content: what is running (model,
//! precision, calibration) and how well (rates, drops, malformed input, frames over the
//! processing budget, pillar cap), with a level and a message saying why it is not OK.
//! Counts marked "recent" are since the previous report, so a WARN clears itself once
//! the cause stops.

use super::stats::Summary;

/// `diagnostic_msgs/DiagnosticStatus` levels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok = 0,
    Warn = 1,
    Error = 2,
    Stale = 3,
}

/// One status entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub level: Level,
    pub name: String,
    pub message: String,
    pub hardware_id: String,
    pub values: Vec<(String, String)>,
}

/// Everything a report needs, gathered by the node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    pub node_name: String,
    pub model: String,
    pub model_path: String,
    pub precision_requested: String,
    pub precision_active: String,
    pub calibration: String,
    pub device: String,
    pub input_rate_hz: f64,
    pub output_rate_hz: f64,
    pub frames_in: u64,
    pub frames_out: u64,
    pub dropped: u64,
    pub dropped_recent: u64,
    pub malformed: u64,
    pub malformed_recent: u64,
    pub errors: u64,
    pub errors_recent: u64,
    pub last_error: String,
    pub over_budget: u64,
    pub over_budget_recent: u64,
    pub budget_ms: f64,
    pub pillar_cap_recent: u64,
    pub processing_ms: Summary,
    pub latency_ms: Summary,
    /// Seconds since the last input scan (None before the first one).
    pub since_input_s: Option<f64>,
}

fn ms(v: f64) -> String {
    format!("{v:.1}")
}

/// The status of the detector from a snapshot.
pub fn status(s: &Snapshot) -> Status {
    let mut level = Level::Ok;
    let mut why = Vec::new();
    let mut raise = |l: Level, msg: String| {
        level = level.max(l);
        why.push(msg);
    };
    if s.errors_recent > 0 {
        raise(
            Level::Error,
            format!("{} scans failed in the detector", s.errors_recent),
        );
    }
    if s.over_budget_recent > 0 {
        raise(
            Level::Warn,
            format!(
                "{} frames over the {} ms budget",
                s.over_budget_recent, s.budget_ms
            ),
        );
    }
    if s.dropped_recent > 0 {
        raise(
            Level::Warn,
            format!(
                "{} scans dropped (input faster than processing)",
                s.dropped_recent
            ),
        );
    }
    if s.malformed_recent > 0 {
        raise(
            Level::Warn,
            format!("{} malformed clouds skipped", s.malformed_recent),
        );
    }
    if s.pillar_cap_recent > 0 {
        raise(
            Level::Warn,
            format!(
                "pillar cap reached in {} scans (points left out)",
                s.pillar_cap_recent
            ),
        );
    }
    let message = if why.is_empty() {
        match s.since_input_s {
            None => "waiting for point clouds".to_owned(),
            Some(_) => format!("running {}", s.precision_active),
        }
    } else {
        why.join("; ")
    };
    let values = [
        ("model", s.model.clone()),
        ("model_path", s.model_path.clone()),
        ("device", s.device.clone()),
        ("precision_requested", s.precision_requested.clone()),
        ("precision_active", s.precision_active.clone()),
        ("calibration", s.calibration.clone()),
        ("input_rate_hz", format!("{:.2}", s.input_rate_hz)),
        ("output_rate_hz", format!("{:.2}", s.output_rate_hz)),
        ("frames_in", s.frames_in.to_string()),
        ("frames_out", s.frames_out.to_string()),
        ("dropped", s.dropped.to_string()),
        ("malformed_skipped", s.malformed.to_string()),
        ("detector_errors", s.errors.to_string()),
        ("last_error", s.last_error.clone()),
        ("over_budget_frames", s.over_budget.to_string()),
        ("processing_budget_ms", ms(s.budget_ms)),
        ("processing_ms_p50", ms(s.processing_ms.p50)),
        ("processing_ms_p99", ms(s.processing_ms.p99)),
        ("processing_ms_max", ms(s.processing_ms.max)),
        ("latency_ms_p50", ms(s.latency_ms.p50)),
        ("latency_ms_p99", ms(s.latency_ms.p99)),
        (
            "since_last_input_s",
            s.since_input_s
                .map_or("never".into(), |t| format!("{t:.2}")),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Status {
        level,
        name: format!("{}: detector", s.node_name.trim_start_matches('/')),
        message,
        hardware_id: s.device.clone(),
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running() -> Snapshot {
        Snapshot {
            node_name: "/lidar_ptq_node".into(),
            model: "default".into(),
            precision_active: "fp32".into(),
            device: "cpu".into(),
            budget_ms: 100.0,
            frames_in: 10,
            since_input_s: Some(0.1),
            ..Snapshot::default()
        }
    }

    #[test]
    fn healthy_is_ok_and_lists_the_facts() {
        let st = status(&running());
        assert_eq!(st.level, Level::Ok);
        assert_eq!(st.message, "running fp32");
        assert_eq!(st.name, "lidar_ptq_node: detector");
        let get = |k: &str| {
            st.values
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("model").as_deref(), Some("default"));
        assert_eq!(get("frames_in").as_deref(), Some("10"));
        assert!(get("calibration").is_some() && get("over_budget_frames").is_some());
        let waiting = Snapshot {
            since_input_s: None,
            ..running()
        };
        assert_eq!(status(&waiting).message, "waiting for point clouds");
    }

    #[test]
    fn recent_problems_raise_the_level_with_reasons() {
        let s = Snapshot {
            over_budget_recent: 2,
            dropped_recent: 5,
            ..running()
        };
        let st = status(&s);
        assert_eq!(st.level, Level::Warn);
        assert!(st.message.contains("2 frames over the 100 ms budget"));
        assert!(st.message.contains("5 scans dropped"));
        let s = Snapshot {
            errors_recent: 1,
            malformed_recent: 1,
            ..running()
        };
        let st = status(&s);
        assert_eq!(st.level, Level::Error);
        assert!(st.message.contains("malformed"));
        // Totals alone (old problems) do not keep the status raised.
        let s = Snapshot {
            dropped: 100,
            malformed: 3,
            over_budget: 7,
            ..running()
        };
        assert_eq!(status(&s).level, Level::Ok);
    }
}
