//! Routes the `log` crate to ROS logging (rcutils: the console and /rosout). r2r only
//! forwards its own macros; the library logs through `log`, so without this bridge its
//! messages would never reach /rosout.

use std::cell::Cell;

struct RosLogger {
    logger_name: String,
    level: log::LevelFilter,
}

thread_local! {
    // r2r itself logs through `log` when rcutils fails; forwarding that back into r2r
    // would re-enter its logging lock. Such nested records are dropped.
    static FORWARDING: Cell<bool> = const { Cell::new(false) };
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
        r2r::log(
            &msg,
            &self.logger_name,
            record.file().unwrap_or(""),
            record.line().unwrap_or(0),
            severity,
        );
        FORWARDING.with(|f| f.set(false));
    }

    fn flush(&self) {}
}

/// Installs the bridge as the global logger, logging as `logger_name` at `level` and
/// above (rcutils applies its own severity threshold on top). A second call is a no-op.
pub fn install(logger_name: &str, level: log::LevelFilter) {
    let logger = RosLogger {
        logger_name: logger_name.to_owned(),
        level,
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}
