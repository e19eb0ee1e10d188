//! `lidar_ptq fidelity`: how closely INT8 models reproduce the FP32 model's detections on
//! the same scans (real scans need no labels for this): matched boxes, mean centre error
//! and mean score error, per INT8 model.

use anyhow::{Context, Result, bail};
use lidar_ptq::boxes::Detection;
use lidar_ptq::cloud::{DecodeOptions, Points};
use lidar_ptq::detector::Detector;
use lidar_ptq::eval::fidelity::Fidelity;
use lidar_ptq::model::bundle::ModelBundle;
use serde::Serialize;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct FidelityArgs {
    /// Scans: files (KITTI `.bin`, nuScenes `.pcd.bin`, `.pcd`) or rosbag2 bags (every
    /// PointCloud2 scan of the first such topic).
    #[arg(required = true)]
    scans: Vec<PathBuf>,
    /// FP32 model file (the reference).
    #[arg(long, alias = "weights")]
    model: PathBuf,
    /// Model description YAML, for weights without an embedded one.
    #[arg(long)]
    config: Option<PathBuf>,
    /// INT8 models (files written by `lidar_ptq calibrate` for this FP32 model),
    /// comma-separated or repeated.
    #[arg(long, required = true, value_delimiter = ',')]
    int8: Vec<PathBuf>,
    /// Largest BEV centre distance (m) of a matched pair.
    #[arg(long, default_value_t = 2.0)]
    max_distance: f32,
    /// Print the report as one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the JSON report to this file (atomically).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct ModelRow {
    int8: String,
    method: String,
    bits: String,
    boxes: usize,
    matched: usize,
    /// Matched share of the FP32 boxes, and of the INT8 boxes.
    recall: f64,
    precision: f64,
    mean_centre_error_m: f64,
    mean_score_error: f64,
}

#[derive(Serialize)]
struct FidelityReport {
    model: String,
    scans: Vec<String>,
    max_distance_m: f32,
    fp32_boxes: usize,
    int8: Vec<ModelRow>,
}

fn read_scans(paths: &[PathBuf]) -> Result<Vec<Points>> {
    let mut out = Vec::new();
    for p in paths {
        if lidar_ptq::source::is_bag(p) {
            let scans =
                lidar_ptq::source::read_bag_scans(p, None, &DecodeOptions::default(), |_| true)
                    .with_context(|| format!("reading bag {}", p.display()))?;
            if scans.is_empty() {
                bail!("bag {} holds no scan", p.display());
            }
            out.extend(scans.into_iter().map(|s| s.scan.points));
        } else {
            out.push(
                lidar_ptq::dataset::read_points(p)
                    .with_context(|| format!("reading scan {}", p.display()))?,
            );
        }
    }
    Ok(out)
}

fn detect_all(
    d: &mut Detector,
    scans: &[Points],
    bar: &indicatif::ProgressBar,
) -> Result<Vec<Vec<Detection>>> {
    scans
        .iter()
        .map(|s| {
            let r = d.detect(s).context("detecting");
            bar.inc(1);
            r
        })
        .collect()
}

pub fn run(a: &FidelityArgs) -> Result<()> {
    if !(a.max_distance.is_finite() && a.max_distance > 0.0) {
        bail!("--max-distance must be a positive number of metres");
    }
    let bundle = ModelBundle::load(&a.model, a.config.as_deref())?;
    let scans = read_scans(&a.scans)?;
    let bar = indicatif::ProgressBar::new((scans.len() * (1 + a.int8.len())) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} {bar:40} {pos}/{len} eta {eta}")
            .expect("valid template"),
    );
    bar.set_message("fp32");
    let reference = detect_all(&mut Detector::from_bundle(&bundle)?, &scans, &bar)?;
    let mut rows = Vec::new();
    for q in &a.int8 {
        bar.set_message(q.display().to_string());
        let quant = lidar_ptq::quant::file::load_for(q, &bundle.config, &bundle.weights)?;
        let mut d = Detector::new_int8(bundle.config.clone(), &bundle.weights, &quant)?;
        let got = detect_all(&mut d, &scans, &bar)?;
        let mut f = Fidelity::default();
        for (r, g) in reference.iter().zip(&got) {
            f.add(r, g, a.max_distance);
        }
        let p = &quant.provenance;
        rows.push(ModelRow {
            int8: q.display().to_string(),
            method: p.method.clone(),
            bits: format!("W{}A{}", p.weight_bits, p.activation_bits),
            boxes: f.compared,
            matched: f.matched,
            recall: f.recall(),
            precision: f.precision(),
            mean_centre_error_m: f.mean_centre_error(),
            mean_score_error: f.mean_score_error(),
        });
    }
    bar.finish_and_clear();
    let report = FidelityReport {
        model: a.model.display().to_string(),
        scans: a.scans.iter().map(|p| p.display().to_string()).collect(),
        max_distance_m: a.max_distance,
        fp32_boxes: reference.iter().map(Vec::len).sum(),
        int8: rows,
    };
    let json = serde_json::to_string_pretty(&report).context("serialising the report")?;
    if let Some(out) = &a.out {
        lidar_ptq::fsutil::write_atomic(out, format!("{json}\n").as_bytes())
            .with_context(|| format!("writing the report to {}", out.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        println!(
            "{} scans, {} FP32 boxes, pairs within {} m (BEV centre)",
            scans.len(),
            report.fp32_boxes,
            a.max_distance
        );
        println!(
            "{:<40} {:>6} {:>7} {:>7} {:>7} {:>9} {:>9}",
            "int8", "boxes", "matched", "recall", "prec.", "centre m", "score"
        );
        for r in &report.int8 {
            println!(
                "{:<40} {:>6} {:>7} {:>7.3} {:>7.3} {:>9.4} {:>9.4}",
                r.int8,
                r.boxes,
                r.matched,
                r.recall,
                r.precision,
                r.mean_centre_error_m,
                r.mean_score_error
            );
        }
    }
    Ok(())
}
