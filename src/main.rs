//! The `lidar_ptq` command line: one thin function per verb over the library.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "lidar_ptq",
    version,
    about = "CenterPoint lidar detection in INT8 with LiDAR-PTQ"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Compare simulated scans with the real KITTI and nuScenes scans (markdown report).
    SimReport {
        /// Root of the shared real data (holding kitti/ and nuscenes/).
        #[arg(long, default_value = "../shared/data")]
        data: PathBuf,
        /// Simulated scenes per sensor.
        #[arg(long, default_value_t = 6)]
        scenes: usize,
        /// Also write the report to this file (atomically).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// rosbag2 bags (MCAP or sqlite3)
    Bag {
        #[command(subcommand)]
        command: BagCommand,
    },
}

#[derive(Subcommand)]
enum BagCommand {
    /// Print a bag's storage, time range and topics
    Info {
        /// Bag directory, its metadata.yaml, or a single .mcap/.db3 file
        path: PathBuf,
    },
}

fn main() -> Result<()> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.command {
        Command::SimReport { data, scenes, out } => sim_report(&data, scenes, out),
        Command::Bag {
            command: BagCommand::Info { path },
        } => {
            let bag = lidar_ptq::bag::Bag::open(&path)?;
            print!("{}", lidar_ptq::bag::info::format_info(&bag));
            Ok(())
        }
    }
}

fn sim_report(data: &std::path::Path, scenes: usize, out: Option<PathBuf>) -> Result<()> {
    let text = lidar_ptq::sim::realism::report(data, scenes)?;
    print!("{text}");
    if let Some(path) = out {
        write_atomic(&path, text.as_bytes())?;
    }
    Ok(())
}

/// Writes via a temporary file in the same directory, then renames.
fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
