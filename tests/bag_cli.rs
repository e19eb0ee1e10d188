//! `lidar_ptq bag info` on a real bag, run as users run it.

mod common;

use std::process::Command;

#[test]
fn bag_info_prints_the_velodyne_bag() {
    let dir = common::data_dir().join("velodyne/vls128/1614315746471294674");
    let out = Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(["bag", "info"])
        .arg(&dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains(&dir.display().to_string()), "{text}");
    assert!(text.contains("Storage:     sqlite3"), "{text}");
    assert!(text.contains("Messages:    4"), "{text}");
    assert!(text.contains("Duration:    0.263164997s"), "{text}");
    assert!(
        text.contains("Start:       2020-04-03 07:00:55 UTC (1585897255.313147068)"),
        "{text}"
    );
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("/velodyne_packets"))
        .unwrap_or_else(|| panic!("no /velodyne_packets row:\n{text}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    // This bag was recorded with an empty serialization format, shown as "-".
    assert_eq!(
        cols,
        [
            "/velodyne_packets",
            "velodyne_msgs/msg/VelodyneScan",
            "4",
            "-"
        ]
    );
}

#[test]
fn bag_info_fails_clearly_on_a_missing_bag() {
    let out = Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(["bag", "info", "/nonexistent/bag_dir"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/bag_dir"), "{err}");
}
