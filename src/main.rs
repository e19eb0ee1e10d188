//! The `lidar_ptq` command line: one thin function per verb over the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use lidar_ptq::{dataset, render};

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
    /// Draw a bird's-eye-view PNG of one scan with its labels (and detections).
    Render(RenderArgs),
}

#[derive(Subcommand)]
enum BagCommand {
    /// Print a bag's storage, time range and topics
    Info {
        /// Bag directory, its metadata.yaml, or a single .mcap/.db3 file
        path: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ColorBy {
    Height,
    Intensity,
}

#[derive(clap::Args)]
struct RenderArgs {
    /// Scan file: KITTI `.bin`, nuScenes `.pcd.bin` or `.pcd`.
    input: PathBuf,
    /// Output PNG.
    #[arg(long)]
    out: PathBuf,
    /// Ground-truth labels: KITTI `.txt` (needs calib) or nuScenes-style `labels.json`.
    /// Default: the dataset's own label file beside the scan, when present.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// KITTI calib `.txt` (default: `../calib/<id>.txt` beside the scan).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Detections to draw in a second colour: a JSON array of objects.
    #[arg(long)]
    detections: Option<PathBuf>,
    /// Half the side of the square shown, in metres.
    #[arg(long, default_value_t = 80.0)]
    extent: f32,
    /// Metres per pixel.
    #[arg(long, default_value_t = 0.1)]
    resolution: f32,
    /// Lidar-frame x,y at the image centre (metres).
    #[arg(long, value_delimiter = ',', default_values_t = [0.0, 0.0], allow_negative_numbers = true)]
    center: Vec<f32>,
    /// Side of each drawn point in pixels.
    #[arg(long, default_value_t = 1)]
    point_px: u32,
    /// Point colour.
    #[arg(long, value_enum, default_value_t = ColorBy::Height)]
    color_by: ColorBy,
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
        Command::Render(args) => render_verb(&args),
    }
}

fn render_verb(a: &RenderArgs) -> Result<()> {
    anyhow::ensure!(
        a.center.len() == 2,
        "--center takes x,y (got {:?})",
        a.center
    );
    let scan = dataset::load_scan(&a.input, a.labels.as_deref(), a.calib.as_deref())?;
    let detections = match &a.detections {
        Some(p) => dataset::read_objects_json(p)?,
        None => Vec::new(),
    };
    let opts = render::BevOptions {
        extent: a.extent,
        resolution: a.resolution,
        center: [a.center[0], a.center[1]],
        point_px: a.point_px,
        color_by: match a.color_by {
            ColorBy::Height => render::ColorBy::Height,
            ColorBy::Intensity => render::ColorBy::Intensity,
        },
        ..render::BevOptions::default()
    };
    let image = render::render_bev(&scan.points, &scan.objects, &detections, &opts)?;
    render::save_png(&image, &a.out)
        .with_context(|| format!("writing the render to {}", a.out.display()))?;
    log::info!(
        "wrote {} ({} px, {} points, {} ground-truth boxes, {} detections)",
        a.out.display(),
        image.width(),
        scan.points.len(),
        scan.objects.len(),
        detections.len()
    );
    Ok(())
}
