//! The human-readable summary printed by `lidar_ptq bag info`.

use std::fmt::Write;

use super::Bag;

/// `secs.nanos` of a timestamp in nanoseconds.
fn seconds(ns: i64) -> String {
    let s = ns.div_euclid(1_000_000_000);
    let n = ns.rem_euclid(1_000_000_000);
    format!("{s}.{n:09}")
}

/// UTC calendar time of a timestamp in nanoseconds (proleptic Gregorian).
fn utc(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Path, storage, times, message count and a table of topics.
pub fn format_info(bag: &Bag) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Path:        {}", bag.path().display());
    let _ = writeln!(out, "Storage:     {}", bag.storage());
    let files: Vec<String> = bag
        .files()
        .iter()
        .map(|p| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let _ = writeln!(out, "Files:       {}", files.join(", "));
    let _ = writeln!(out, "Duration:    {}s", seconds(bag.duration_ns() as i64));
    match (bag.start_ns(), bag.end_ns()) {
        (Some(a), Some(b)) => {
            let _ = writeln!(out, "Start:       {} ({})", utc(a), seconds(a));
            let _ = writeln!(out, "End:         {} ({})", utc(b), seconds(b));
        }
        _ => {
            let _ = writeln!(out, "Start:       -");
            let _ = writeln!(out, "End:         -");
        }
    }
    let _ = writeln!(out, "Messages:    {}", bag.message_count());
    let topics = bag.topics();
    let _ = writeln!(out, "Topics:      {}", topics.len());
    let w_name = topics
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(0)
        .max(5);
    let w_type = topics
        .iter()
        .map(|t| t.type_name.len())
        .max()
        .unwrap_or(0)
        .max(4);
    let _ = writeln!(
        out,
        "  {:<w_name$}  {:<w_type$}  {:>8}  Format",
        "Topic", "Type", "Count"
    );
    for t in topics {
        let _ = writeln!(
            out,
            "  {:<w_name$}  {:<w_type$}  {:>8}  {}",
            t.name, t.type_name, t.message_count, t.serialization_format
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_matches_known_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        // 2020-04-03 07:00:55 UTC, the vls128 bag's start.
        assert_eq!(utc(1_585_897_255_313_147_068), "2020-04-03 07:00:55 UTC");
        assert_eq!(utc(951_782_400_000_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(seconds(1_500_000_001), "1.500000001");
    }
}
