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
        Command::Bag {
            command: BagCommand::Info { path },
        } => {
            let bag = lidar_ptq::bag::Bag::open(&path)?;
            print!("{}", lidar_ptq::bag::info::format_info(&bag));
            Ok(())
        }
    }
}
