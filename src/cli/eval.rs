//! `lidar_ptq eval`: a model's accuracy over a labelled set (bag, KITTI directory or
//! simulated scans), as a table or one JSON object.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lidar_ptq::eval::EvalSet;
use lidar_ptq::model::ModelBundle;
use lidar_ptq::sim::LidarModel;

/// Simulated scans evaluated when no set is named.
const DEFAULT_SIM_FRAMES: usize = 20;

#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("set").args(["bag", "kitti", "sim_frames"])))]
pub struct EvalArgs {
    /// Model file: safetensors weights with their model description embedded (as `train`
    /// writes them).
    #[arg(long, alias = "weights")]
    model: PathBuf,
    /// Model description YAML: required for weights without an embedded one, otherwise
    /// it must describe the same model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run the INT8 engine of this calibrated model (written by `lidar_ptq calibrate` for
    /// the same FP32 model) instead of FP32.
    #[arg(long)]
    int8: Option<PathBuf>,
    /// Where the network runs: cpu, cuda (GPU 0) or cuda:N (builds with feature `cuda`).
    #[arg(long, default_value = "cpu")]
    device: super::Device,
    /// GPU only: run in FP16 (f16 weights and GEMM inputs, f32 accumulation).
    #[arg(long)]
    fp16: bool,
    /// Evaluate on a rosbag2 bag with PointCloud2 scans and Detection3DArray ground truth.
    #[arg(long)]
    bag: Option<PathBuf>,
    /// Bag only: the PointCloud2 topic (default: the first one).
    #[arg(long, requires = "bag")]
    topic: Option<String>,
    /// Bag only: the Detection3DArray ground-truth topic (default: the first one).
    #[arg(long, requires = "bag")]
    labels_topic: Option<String>,
    /// Evaluate on a KITTI object directory (velodyne/, label_2/, calib/), within the
    /// camera's field of view, on the classes KITTI labels (car, pedestrian, cyclist).
    #[arg(long)]
    kitti: Option<PathBuf>,
    /// Evaluate on this many held-out simulated scans (the default set, with 20 scans,
    /// when no set is named).
    #[arg(long)]
    sim_frames: Option<usize>,
    /// Simulated scans only: the sensor.
    #[arg(long, value_enum, default_value_t = LidarModel::Hdl32, conflicts_with_all = ["bag", "kitti"])]
    lidar: LidarModel,
    /// Simulated scans only: the seed of the evaluation stream (use one training did not).
    #[arg(long, default_value_t = 1_000_000, conflicts_with_all = ["bag", "kitti"])]
    seed: u64,
    /// Evaluate at most this many frames (for simulated scans without --sim-frames: the
    /// number of scans).
    #[arg(long)]
    frames: Option<usize>,
    /// Score only these of the model's classes (comma-separated), e.g. to compare models
    /// with different class sets on the classes they share; the others' detections and
    /// ground truth are left out of every figure.
    #[arg(long, value_delimiter = ',')]
    classes: Option<Vec<String>>,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: &EvalArgs) -> Result<()> {
    let bundle = ModelBundle::load(&a.model, a.config.as_deref())?;
    let mut detector = super::detector(&bundle, a.int8.as_deref(), a.device, a.fp16)?;
    let set = if let Some(path) = &a.bag {
        EvalSet::Bag {
            path: path.clone(),
            topic: a.topic.clone(),
            labels_topic: a.labels_topic.clone(),
        }
    } else if let Some(dir) = &a.kitti {
        EvalSet::Kitti { dir: dir.clone() }
    } else {
        EvalSet::Sim {
            lidar: a.lidar,
            frames: a.sim_frames.or(a.frames).unwrap_or(DEFAULT_SIM_FRAMES),
            seed: a.seed,
        }
    };
    anyhow::ensure!(a.frames != Some(0), "--frames must be at least 1");
    anyhow::ensure!(a.sim_frames != Some(0), "--sim-frames must be at least 1");
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} frames {elapsed} eta {eta}")
            .expect("valid template"),
    );
    let mut run = lidar_ptq::eval::sets::run(&mut detector, &set, a.frames, &bar)?;
    bar.finish_and_clear();
    if let Some(only) = &a.classes {
        run.restrict_classes(only)?;
    }
    let on = match a.device {
        super::Device::Cpu => String::new(),
        super::Device::Cuda(_) => format!(", on {}", detector.device()),
    };
    let model = match &a.int8 {
        None => format!(
            "{} ({}, {}{on})",
            bundle.config.name,
            a.model.display(),
            detector.precision()
        ),
        Some(q) => format!(
            "{} ({}, int8 {}{on})",
            bundle.config.name,
            a.model.display(),
            q.display()
        ),
    };
    let report = run.score(&model);
    let json = serde_json::to_string_pretty(&report).context("serialising the report")?;
    if let Some(out) = &a.out {
        lidar_ptq::fsutil::write_atomic(out, format!("{json}\n").as_bytes())
            .with_context(|| format!("writing the report to {}", out.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print!("{}", report.to_table());
    }
    Ok(())
}
