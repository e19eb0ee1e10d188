//! `lidar_ptq bench --device cuda`: FP32, FP16 and INT8 on one GPU, in the same run, on
//! the same simulated scan. End to end is points -> boxes: voxelisation and decoding on
//! the CPU, the network on the GPU with its upload and download (of the peak candidates
//! found on the GPU, or of the full head maps when they are codes). The dense part
//! (backbone, neck, head) is timed on the GPU with CUDA events.

use super::{
    AUTO_SCANS, BenchError, BenchOptions, Int8Source, SCAN_SEED, default_lidar, load_model,
    load_quant_model, median, ms,
};
use crate::engine::cuda::{CudaEngine, CudaPrecision, Gpu};
use crate::engine::{EngineError, HeadOutputs};
use crate::model::decode::{TaskCandidates, decode, decode_candidates};
use crate::sim::{SimConfig, Simulator};
use serde::Serialize;
use std::time::Instant;

/// One precision's medians, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuTimes {
    pub precision: String,
    /// Points -> boxes.
    pub total_ms: f64,
    pub voxelize_ms: f64,
    /// The network with its transfers (upload of the decorated pillars, download of the
    /// head maps).
    pub network_ms: f64,
    /// Backbone + neck + head on the GPU (CUDA events).
    pub dense_ms: f64,
    pub dense_gops: f64,
    pub decode_ms: f64,
    pub detections: usize,
    /// Whether the dense part replayed as a CUDA graph in the timed runs.
    pub cuda_graph: bool,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GpuBenchReport {
    pub model: String,
    pub device: String,
    pub lidar: String,
    pub points: usize,
    pub pillars: usize,
    pub iters: usize,
    pub warmup: usize,
    pub dense_gmac: f64,
    pub runs: Vec<GpuTimes>,
    /// FP32 / INT8 and FP16 / INT8, end to end and dense part.
    pub int8_speedup_vs_fp32: Option<f64>,
    pub int8_speedup_vs_fp16: Option<f64>,
    pub int8_dense_speedup_vs_fp32: Option<f64>,
    pub int8_dense_speedup_vs_fp16: Option<f64>,
    pub quant_method: Option<String>,
}

/// Runs the GPU benchmark on GPU `ordinal`; `progress` counts runs.
pub fn run(
    opts: &BenchOptions,
    ordinal: usize,
    progress: &indicatif::ProgressBar,
) -> Result<GpuBenchReport, BenchError> {
    if opts.iters == 0 {
        return Err(BenchError::Usage("--iters must be at least 1".into()));
    }
    let (cfg, graph, weights) = load_model(&opts.model)?;
    let lidar = opts.lidar.unwrap_or_else(|| default_lidar(&cfg));
    let sim = Simulator::new(SimConfig::new(lidar));
    let (pts, _) = sim.sample(SCAN_SEED);
    let (bb, head) = graph.dense_macs();
    let dense_gmac = (bb + head) as f64 / 1e9;
    let qm = match &opts.int8 {
        Int8Source::None => None,
        Int8Source::File(p) => Some(load_quant_model(p, &cfg, &weights)?),
        Int8Source::Auto => {
            let scans: Vec<_> = (1..=AUTO_SCANS as u64)
                .map(|k| sim.sample(SCAN_SEED + k).0)
                .collect();
            Some(crate::quant::quick::minmax_quick(
                &cfg, &graph, &weights, &scans,
            )?)
        }
    };
    let mut precisions = vec![CudaPrecision::Fp32, CudaPrecision::Fp16];
    if let Some(q) = &qm {
        precisions.push(CudaPrecision::Int8(q));
    }
    let runs_per = opts.warmup + opts.iters;
    progress.set_length((runs_per * precisions.len()) as u64);
    let mut frame = super::scan_input(&cfg)?;
    let mut device = String::new();
    let mut runs = Vec::new();
    for p in precisions {
        let gpu = Gpu::open(ordinal)?;
        device = gpu.describe();
        let mut engine = CudaEngine::on(gpu, &graph, &weights, p)?;
        let mut heads = HeadOutputs {
            tasks: Vec::new(),
            h: 0,
            w: 0,
        };
        let mut cands: Vec<TaskCandidates> = Vec::new();
        let mut samples: Vec<[f64; 5]> = Vec::new();
        let mut phases: Vec<[f64; 4]> = Vec::new();
        let mut detections = 0;
        for it in 0..runs_per {
            let t0 = Instant::now();
            frame
                .prepare(&pts)
                .map_err(|e| EngineError::op("voxelise", e))?;
            let t1 = Instant::now();
            let t2;
            // Peak candidates found on the GPU (only they come back), else the full maps.
            let boxes = if engine.gpu_candidates() {
                let dc = &cfg.decode;
                engine.run_candidates(
                    &frame.input(),
                    dc.score_threshold,
                    dc.local_max,
                    &mut cands,
                )?;
                t2 = Instant::now();
                decode_candidates(&cfg, &cands)?
            } else {
                engine.run_into(&frame.input(), &mut heads)?;
                t2 = Instant::now();
                decode(&cfg, &heads.views())?
            };
            let t3 = Instant::now();
            detections = boxes.len();
            if it >= opts.warmup {
                phases.push(engine.last_phases_ms());
                samples.push([
                    ms(t3 - t0),
                    ms(t1 - t0),
                    ms(t2 - t1),
                    engine.last_dense_ms().unwrap_or(f64::NAN),
                    ms(t3 - t2),
                ]);
            }
            progress.inc(1);
        }
        let cuda_graph = engine.graph_active();
        let ph = |k: usize| median(phases.iter().map(|s| s[k]).collect());
        log::info!(
            "{} network on the host (medians, ms): input {:.3}, launches {:.3}, GPU wait {:.3}, \
             collect {:.3}",
            p.name(),
            ph(0),
            ph(1),
            ph(2),
            ph(3)
        );
        if std::env::var_os("LIDAR_PTQ_CUDA_PROFILE").is_some() {
            // A few more runs with an event after every node: where the time goes.
            engine.enable_profile();
            for _ in 0..5 {
                frame
                    .prepare(&pts)
                    .map_err(|e| EngineError::op("voxelise", e))?;
                engine.run_into(&frame.input(), &mut heads)?;
            }
            let mut prof = engine.profile();
            let total: f64 = prof.iter().map(|p| p.1).sum();
            prof.sort_by(|a, b| b.1.total_cmp(&a.1));
            eprintln!(
                "{} per-node GPU ms (sum {total:.3}), largest first:",
                p.name()
            );
            for (name, t) in prof.iter().take(25) {
                eprintln!("  {t:8.4}  {name}");
            }
            eprintln!(
                "{} per-kernel GPU ms per run (launches per run), largest first:",
                p.name()
            );
            for (name, t, count) in engine.kernel_profile()?.iter().take(25) {
                eprintln!("  {:8.4}  {:4}  {name}", t / 5.0, count / 5);
            }
        }
        let col = |k: usize| median(samples.iter().map(|s| s[k]).collect());
        let dense = col(3);
        runs.push(GpuTimes {
            precision: p.name().into(),
            total_ms: col(0),
            voxelize_ms: col(1),
            network_ms: col(2),
            dense_ms: dense,
            dense_gops: 2.0 * dense_gmac / (dense / 1e3),
            decode_ms: col(4),
            detections,
            cuda_graph,
        });
    }
    let get = |name: &str| runs.iter().find(|r| r.precision == name);
    let ratio =
        |a: &str, f: fn(&GpuTimes) -> f64| get(a).zip(get("int8")).map(|(x, i)| f(x) / f(i));
    Ok(GpuBenchReport {
        model: cfg.name.clone(),
        device,
        lidar: lidar.name().to_string(),
        points: pts.len(),
        pillars: frame.cells(),
        iters: opts.iters,
        warmup: opts.warmup,
        dense_gmac,
        int8_speedup_vs_fp32: ratio("fp32", |t| t.total_ms),
        int8_speedup_vs_fp16: ratio("fp16", |t| t.total_ms),
        int8_dense_speedup_vs_fp32: ratio("fp32", |t| t.dense_ms),
        int8_dense_speedup_vs_fp16: ratio("fp16", |t| t.dense_ms),
        runs,
        quant_method: qm.map(|q| q.provenance.method),
    })
}

/// The human-readable report.
pub fn format_report(r: &GpuBenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "model {} on {}: simulated {} scan, {} points, {} pillars; dense part {:.2} GMAC",
        r.model, r.device, r.lidar, r.points, r.pillars, r.dense_gmac
    );
    let _ = writeln!(
        s,
        "median of {} runs after {} warm-up (ms):",
        r.iters, r.warmup
    );
    let _ = writeln!(
        s,
        "{:<6} {:>9} {:>8} {:>9} {:>9} {:>8} {:>9} {:>6}",
        "", "total", "voxel", "network", "dense", "decode", "GOP/s", "graph"
    );
    for t in &r.runs {
        let _ = writeln!(
            s,
            "{:<6} {:>9.3} {:>8.3} {:>9.3} {:>9.3} {:>8.3} {:>9.0} {:>6}",
            t.precision,
            t.total_ms,
            t.voxelize_ms,
            t.network_ms,
            t.dense_ms,
            t.decode_ms,
            t.dense_gops,
            if t.cuda_graph { "yes" } else { "no" }
        );
    }
    if let (Some(a), Some(b), Some(c), Some(d)) = (
        r.int8_speedup_vs_fp32,
        r.int8_speedup_vs_fp16,
        r.int8_dense_speedup_vs_fp32,
        r.int8_dense_speedup_vs_fp16,
    ) {
        let _ = writeln!(
            s,
            "INT8 speed-up end to end: {a:.2}x vs FP32, {b:.2}x vs FP16; dense part {c:.2}x vs FP32, {d:.2}x vs FP16"
        );
    }
    s
}
