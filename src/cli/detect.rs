//! `lidar_ptq detect`: one scan through a model; prints the detections, writes them as
//! JSON (`render --detections` reads it) and draws them over the scan and its ground truth.

use std::path::PathBuf;

use anyhow::{Context, Result};
use lidar_ptq::boxes::{Detection, Object};
use lidar_ptq::render;

#[derive(clap::Args)]
pub struct DetectArgs {
    /// Scan file (KITTI `.bin`, nuScenes `.pcd.bin`, `.pcd`) or a rosbag2 bag (directory,
    /// `.mcap` or `.db3`) holding PointCloud2 scans.
    input: PathBuf,
    /// Model file: safetensors weights with their model description embedded.
    #[arg(long, alias = "weights")]
    model: PathBuf,
    /// Model description YAML: required for weights without an embedded one, otherwise
    /// it must describe the same model.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bag only: the PointCloud2 topic (default: the first one).
    #[arg(long)]
    topic: Option<String>,
    /// Bag only: which scan of the topic, in time order.
    #[arg(long, default_value_t = 0)]
    index: usize,
    /// Ground-truth labels for the PNG (default: the dataset's own beside the scan, or
    /// the bag's Detection3DArray topic).
    #[arg(long)]
    labels: Option<PathBuf>,
    /// KITTI calib `.txt` (default: `../calib/<id>.txt` beside the scan).
    #[arg(long)]
    calib: Option<PathBuf>,
    /// Print the detections as a JSON array instead of a table.
    #[arg(long)]
    json: bool,
    /// Write the detections to this JSON file (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw a bird's-eye view with the detections and the ground truth to this PNG.
    #[arg(long)]
    png: Option<PathBuf>,
    /// PNG: half the side shown in metres (default: the model's point range).
    #[arg(long)]
    extent: Option<f32>,
    /// PNG: metres per pixel.
    #[arg(long, default_value_t = 0.1)]
    resolution: f32,
}

fn as_object(d: &Detection) -> Object {
    Object {
        bbox: d.bbox,
        class: d.class.clone(),
        velocity: d.velocity,
        num_points: None,
    }
}

pub fn run(a: &DetectArgs) -> Result<()> {
    let mut detector =
        lidar_ptq::detector::Detector::from_model_file(&a.model, a.config.as_deref())?;
    let scan = lidar_ptq::source::load_scan(
        &a.input,
        a.labels.as_deref(),
        a.calib.as_deref(),
        a.topic.as_deref(),
        a.index,
    )?;
    let detections = detector
        .detect(&scan.points)
        .with_context(|| format!("detecting in {}", a.input.display()))?;
    let json = serde_json::to_string_pretty(&detections).context("serialising detections")?;
    if let Some(out) = &a.out {
        lidar_ptq::fsutil::write_atomic(out, format!("{json}\n").as_bytes())
            .with_context(|| format!("writing detections to {}", out.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        println!(
            "{} detections in {} ({} points, {} ground-truth objects)",
            detections.len(),
            a.input.display(),
            scan.points.len(),
            scan.objects.len()
        );
        println!(
            "{:<14} {:>6} {:>8} {:>8} {:>7} {:>6} {:>6} {:>6} {:>7}",
            "class", "score", "x", "y", "z", "l", "w", "h", "yaw"
        );
        for d in &detections {
            let (c, s) = (d.bbox.center, d.bbox.size);
            println!(
                "{:<14} {:>6.3} {:>8.2} {:>8.2} {:>7.2} {:>6.2} {:>6.2} {:>6.2} {:>7.3}",
                d.class, d.score, c[0], c[1], c[2], s[0], s[1], s[2], d.bbox.yaw
            );
        }
    }
    if let Some(png) = &a.png {
        let r = detector.config().input.point_range;
        let extent = a.extent.unwrap_or_else(|| {
            [r[0], r[1], r[3], r[4]]
                .iter()
                .fold(0.0f32, |m, v| m.max(v.abs()))
        });
        let opts = render::BevOptions {
            extent,
            resolution: a.resolution,
            ..render::BevOptions::default()
        };
        let shown: Vec<Object> = detections.iter().map(as_object).collect();
        let image = render::render_bev(&scan.points, &scan.objects, &shown, &opts)?;
        render::save_png(&image, png)
            .with_context(|| format!("writing the render to {}", png.display()))?;
        log::info!("wrote {}", png.display());
    }
    Ok(())
}
