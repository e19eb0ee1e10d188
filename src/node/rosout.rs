//! Routes the `log` crate to ROS logging: the console (rcutils) and /rosout. r2r only
//! forwards its own macros to rcutils, and with Jazzy's rcl a node's /rosout publisher
//! is created by the client library (rclcpp, rclpy), which r2r does not do: without this
//! bridge, neither the library's messages nor r2r's would reach /rosout. So the bridge
//! prints through rcutils and publishes `rcl_interfaces/msg/Log` on /rosout itself, with
//! the QoS rcl uses there (reliable, transient local, depth 1000).

use r2r::rcl_interfaces::msg::Log;
use std::cell::Cell;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

struct RosLogger {
    logger_name: String,
    level: log::LevelFilter,
    // r2r publishers are Send, not Sync; records arrive from any thread.
    rosout: Option<Mutex<r2r::Publisher<Log>>>,
}

thread_local! {
    // r2r itself logs through `log` when rcutils fails; forwarding that back into r2r
    // would re-enter its logging lock. Such nested records are dropped.
    static FORWARDING: Cell<bool> = const { Cell::new(false) };
}

/// `rcl_interfaces/msg/Log` severities.
fn rosout_level(l: log::Level) -> u8 {
    match l {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug | log::Level::Trace => 10,
    }
}

impl log::Log for RosLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= self.level
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) || FORWARDING.with(Cell::get) {
            return;
        }
        FORWARDING.with(|f| f.set(true));
        let severity = match record.level() {
            log::Level::Error => r2r::LogSeverity::Error,
            log::Level::Warn => r2r::LogSeverity::Warn,
            log::Level::Info => r2r::LogSeverity::Info,
            log::Level::Debug | log::Level::Trace => r2r::LogSeverity::Debug,
        };
        // rcutils takes C strings: an interior NUL would make r2r panic.
        let msg = record.args().to_string().replace('\0', "\\0");
        let file = record.file().unwrap_or("");
        let line = record.line().unwrap_or(0);
        r2r::log(&msg, &self.logger_name, file, line, severity);
        if let Some(publisher) = &self.rosout {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            // A failed publish is dropped: logging about logging would recurse.
            let publisher = publisher.lock().unwrap_or_else(|e| e.into_inner());
            let _ = publisher.publish(&Log {
                stamp: r2r::builtin_interfaces::msg::Time {
                    sec: now.as_secs() as i32,
                    nanosec: now.subsec_nanos(),
                },
                level: rosout_level(record.level()),
                name: self.logger_name.clone(),
                msg,
                file: file.to_owned(),
                function: record.module_path().unwrap_or("").to_owned(),
                line,
            });
        }
        FORWARDING.with(|f| f.set(false));
    }

    fn flush(&self) {}
}

/// Installs the bridge as the global logger of `node`, logging as its logger name at
/// `level` and above (rcutils applies its own severity threshold to the console on top).
/// A second call is a no-op.
pub fn install(node: &mut r2r::Node, level: log::LevelFilter) {
    let rosout_qos = r2r::QosProfile::default()
        .reliable()
        .transient_local()
        .keep_last(1000);
    let rosout = match node.create_publisher::<Log>("/rosout", rosout_qos) {
        Ok(p) => Some(Mutex::new(p)),
        Err(e) => {
            eprintln!("lidar_ptq_node: cannot publish on /rosout: {e}");
            None
        }
    };
    let logger = RosLogger {
        logger_name: node.logger().to_owned(),
        level,
        rosout,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
