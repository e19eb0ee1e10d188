//! The `calibrate` verb: an FP32 model and unlabelled scans (a bag, or simulated scans)
//! to an INT8 model file, with progress per stage and unit.

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use lidar_ptq::cloud::{DecodeOptions, POINTCLOUD2_TYPE, Points};
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::weights::Weights;
use lidar_ptq::quant::calibrate::{CalibOptions, Method, calibrate_detailed};
use lidar_ptq::quant::{Flavour, file};
use lidar_ptq::sim::LidarModel;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, ValueEnum)]
pub enum Bits {
    W8a8,
    W4a8,
    W8a4,
    W4a4,
}

impl Bits {
    fn split(self) -> (u32, u32) {
        match self {
            Bits::W8a8 => (8, 8),
            Bits::W4a8 => (4, 8),
            Bits::W8a4 => (8, 4),
            Bits::W4a4 => (4, 4),
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FlavourArg {
    Asymmetric,
    Symmetric,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum MethodArg {
    Minmax,
    Percentile,
    PercentileOccupied,
    Entropy,
    EntropyOccupied,
    LidarPtq,
}

impl MethodArg {
    fn method(self, percentile: f64) -> Method {
        match self {
            MethodArg::Minmax => Method::MinMax,
            MethodArg::Percentile => Method::Percentile {
                percentile,
                occupied_only: false,
            },
            MethodArg::PercentileOccupied => Method::Percentile {
                percentile,
                occupied_only: true,
            },
            MethodArg::Entropy => Method::Entropy {
                occupied_only: false,
            },
            MethodArg::EntropyOccupied => Method::Entropy {
                occupied_only: true,
            },
            MethodArg::LidarPtq => Method::LidarPtq,
        }
    }
}

#[derive(clap::Args)]
pub struct CalibrateArgs {
    /// FP32 model (safetensors); its config is read from the metadata key `config`
    /// unless --config is given.
    #[arg(long)]
    model: PathBuf,
    /// Model description (YAML), for weights files without an embedded config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Bag (directory, .mcap or .db3) with PointCloud2 scans to calibrate on.
    #[arg(long)]
    bag: Option<PathBuf>,
    /// Bag only: the PointCloud2 topic (default: the first one).
    #[arg(long)]
    topic: Option<String>,
    /// Calibration frames, spread evenly over the bag.
    #[arg(long, default_value_t = 256)]
    frames: usize,
    /// Without --bag: calibrate on this many simulated scans (distinct scenes).
    #[arg(long)]
    frames_from_sim: Option<usize>,
    /// Simulated sensors (with --frames-from-sim), comma-separated; frames alternate
    /// between them. Calibrate on the sensors the model will see: their intensity scales
    /// differ (KITTI-style 0..1, nuScenes-style 0..255).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [LidarModel::Hdl64, LidarModel::Hdl32])]
    lidar: Vec<LidarModel>,
    /// Scene seed of the simulated scans (keep it apart from training and evaluation).
    #[arg(long, default_value_t = 2_000_000)]
    sim_seed: u64,
    #[arg(long, value_enum, default_value_t = MethodArg::LidarPtq)]
    method: MethodArg,
    /// Percentile of the percentile methods.
    #[arg(long, default_value_t = 99.99)]
    percentile: f64,
    #[arg(long, value_enum, default_value_t = Bits::W8a8)]
    bits: Bits,
    /// Activation quantizer flavour.
    #[arg(long, value_enum, default_value_t = FlavourArg::Asymmetric)]
    flavour: FlavourArg,
    /// Layers kept float (node names, comma-separated).
    #[arg(long, value_delimiter = ',')]
    keep_float: Vec<String>,
    /// One scale for the whole network input instead of one per decorated feature.
    #[arg(long)]
    no_input_per_feature: bool,
    /// LiDAR-PTQ ablation: plain min-max instead of the Lp grid search.
    #[arg(long)]
    no_grid_search: bool,
    /// Grid search on activations only (weights: per-channel min-max).
    #[arg(long)]
    no_grid_weights: bool,
    /// Grid search on weights only (activations: min-max).
    #[arg(long)]
    no_grid_activations: bool,
    /// Weight grid search scored on the weights alone, not weighed by their inputs.
    #[arg(long)]
    no_grid_input_aware: bool,
    /// Norm exponent p of the grid search's `||x - q(x)||_p`.
    #[arg(long)]
    grid_p: Option<f64>,
    /// LiDAR-PTQ ablation: no TGPL term.
    #[arg(long)]
    no_tgpl: bool,
    /// LiDAR-PTQ ablation: round-to-nearest instead of adaptive rounding.
    #[arg(long)]
    no_adaround: bool,
    /// Reconstruct every layer on its own, also inside residual blocks (voxel model),
    /// instead of each block as one unit.
    #[arg(long)]
    layer_units: bool,
    /// Reconstruction iterations per unit.
    #[arg(long)]
    iters: Option<usize>,
    /// Frames used by the reconstruction.
    #[arg(long)]
    recon_frames: Option<usize>,
    /// Output window side of a convolution unit per iteration (0: full map).
    #[arg(long)]
    crop: Option<usize>,
    /// Iterations between full-map TGPL gradients.
    #[arg(long)]
    tgpl_every: Option<usize>,
    /// TGPL weight (default: balance with the reconstruction loss at iteration 0).
    #[arg(long)]
    lambda: Option<f32>,
    /// Adam learning rate of the rounding variables.
    #[arg(long)]
    lr_v: Option<f32>,
    /// Adam learning rate of the activation step sizes.
    #[arg(long)]
    lr_act: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// After calibrating, score FP32 and the simulated INT8 model on this many held-out
    /// simulated scans (nuScenes mAP; 0: skip).
    #[arg(long, default_value_t = 0)]
    eval_frames: usize,
    /// Sensor of the held-out scans.
    #[arg(long, value_enum, default_value_t = LidarModel::Hdl32)]
    eval_lidar: LidarModel,
    /// Scene seed of the held-out scans (`eval`'s default).
    #[arg(long, default_value_t = 1_000_000)]
    eval_seed: u64,
    /// INT8 model file to write.
    #[arg(long)]
    out: PathBuf,
}

/// An FP32 weights file and its config (embedded, or given).
pub fn load_fp32(model: &Path, config: Option<&Path>) -> Result<(ModelConfig, Graph, Weights)> {
    let bytes = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    let (weights, meta) = Weights::from_bytes(&bytes, model)?;
    let cfg = match config {
        Some(p) => ModelConfig::load(p)?,
        None => {
            let yaml = meta.get("config").with_context(|| {
                format!(
                    "{} embeds no model config (metadata key `config`); pass --config",
                    model.display()
                )
            })?;
            ModelConfig::from_yaml(yaml)
                .with_context(|| format!("config embedded in {}", model.display()))?
        }
    };
    let graph = Graph::build(&cfg).map_err(|e| anyhow::anyhow!("model {}: {e}", cfg.name))?;
    weights
        .validate(&graph)
        .with_context(|| format!("weights {}", model.display()))?;
    Ok((cfg, graph, weights))
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} ETA {eta}",
        )
        .expect("template")
        .progress_chars("=> "),
    );
    b.set_message(what.to_string());
    b
}

/// `frames` scans spread evenly over a bag's PointCloud2 topic.
fn bag_frames(path: &Path, topic: Option<&str>, frames: usize) -> Result<Vec<Points>> {
    let bag = lidar_ptq::bag::Bag::open(path)?;
    let info = match topic {
        Some(t) => bag
            .topic(t)
            .with_context(|| format!("bag {} has no topic {t}", path.display()))?,
        None => bag
            .topics()
            .iter()
            .find(|t| t.type_name == POINTCLOUD2_TYPE)
            .with_context(|| format!("bag {} has no PointCloud2 topic", path.display()))?,
    };
    let total = info.message_count as usize;
    if total == 0 {
        bail!("bag {}: topic {} holds no scan", path.display(), info.name);
    }
    let n = frames.min(total);
    if n < frames {
        log::warn!(
            "bag {} holds {total} scans; calibrating on all of them",
            path.display()
        );
    }
    let wanted: Vec<usize> = (0..n).map(|k| k * total / n).collect();
    let name = info.name.clone();
    let scans =
        lidar_ptq::source::read_bag_scans(path, Some(&name), &DecodeOptions::default(), |i| {
            wanted.binary_search(&i).is_ok()
        })?;
    Ok(scans.into_iter().map(|s| s.scan.points).collect())
}

/// `n` simulated scans of distinct scenes (seeds drawn from `seed`'s stream), frame `k`
/// from sensor `lidars[k % len]`.
fn sim_frames(lidars: &[LidarModel], n: usize, seed: u64) -> Result<Vec<Points>> {
    if lidars.is_empty() {
        bail!("--lidar needs at least one sensor");
    }
    let sims: Vec<lidar_ptq::sim::Simulator> = lidars
        .iter()
        .map(|&l| lidar_ptq::sim::Simulator::new(lidar_ptq::sim::SimConfig::new(l)))
        .collect();
    let mut stream = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let seeds: Vec<u64> = (0..n).map(|_| stream.random()).collect();
    let b = bar(n as u64, "simulating scans");
    let out = seeds
        .par_iter()
        .enumerate()
        .map(|(k, &s)| {
            let p = sims[k % sims.len()].sample(s).0;
            b.inc(1);
            p
        })
        .collect();
    b.finish_and_clear();
    Ok(out)
}

pub fn run(a: &CalibrateArgs) -> Result<()> {
    let start = Instant::now();
    let (cfg, graph, weights) = load_fp32(&a.model, a.config.as_deref())?;
    let frames = match (&a.bag, a.frames_from_sim) {
        (Some(_), Some(_)) => bail!("give either --bag or --frames-from-sim, not both"),
        (Some(bag), None) => bag_frames(bag, a.topic.as_deref(), a.frames)?,
        (None, Some(n)) => sim_frames(&a.lidar, n, a.sim_seed)?,
        (None, None) => {
            bail!("calibration needs scans: --bag B [--frames N] or --frames-from-sim N")
        }
    };
    let loaded = start.elapsed().as_secs_f64();
    let mut opts = CalibOptions::new(a.method.method(a.percentile));
    (opts.weight_bits, opts.activation_bits) = a.bits.split();
    opts.flavour = match a.flavour {
        FlavourArg::Asymmetric => Flavour::Asymmetric,
        FlavourArg::Symmetric => Flavour::Symmetric,
    };
    opts.keep_float = a.keep_float.clone();
    opts.seed = a.seed;
    opts.input_per_feature = !a.no_input_per_feature;
    if a.no_grid_search {
        opts.grid_search = None;
    }
    opts.grid_weights = !a.no_grid_weights;
    opts.grid_activations = !a.no_grid_activations;
    opts.grid_input_aware = !a.no_grid_input_aware;
    if let (Some(p), Some(g)) = (a.grid_p, opts.grid_search.as_mut()) {
        g.p = p;
    }
    let r = &mut opts.recon;
    r.tgpl = !a.no_tgpl;
    r.adaround = !a.no_adaround;
    r.blocks = !a.layer_units;
    if let Some(v) = a.iters {
        r.iters = v;
    }
    if let Some(v) = a.recon_frames {
        r.frames = v;
    }
    if let Some(v) = a.crop {
        r.crop = v;
    }
    if let Some(v) = a.tgpl_every {
        r.tgpl_every = v;
    }
    if a.lambda.is_some() {
        r.lambda = a.lambda;
    }
    if let Some(v) = a.lr_v {
        r.lr_v = v;
    }
    if let Some(v) = a.lr_act {
        r.lr_act = v;
    }
    let progress = bar(frames.len() as u64, "calibrating");
    let c = calibrate_detailed(&cfg, &weights, &frames, &opts, &progress)?;
    progress.finish_and_clear();
    file::save(&a.out, &c.model, &graph)?;
    let secs = start.elapsed().as_secs_f64();
    for u in &c.units {
        log::debug!(
            "{}: objective {:.4e} -> {:.4e}, {} roundings flipped",
            u.node,
            u.objective_before(),
            u.objective_after(),
            u.flipped
        );
    }
    println!(
        "calibrated {} ({}, W{}A{}) on {} frames in {:.1} s ({:.1} s reading scans): {}",
        cfg.name,
        opts.method.name(),
        opts.weight_bits,
        opts.activation_bits,
        frames.len(),
        secs,
        loaded,
        a.out.display()
    );
    if a.eval_frames > 0 {
        compare_on_sim(&cfg, &graph, &weights, &c.model, a)?;
    }
    Ok(())
}

/// nuScenes mAP of the FP32 model and of the simulated INT8 model on held-out scans.
fn compare_on_sim(
    cfg: &ModelConfig,
    graph: &Graph,
    weights: &Weights,
    model: &lidar_ptq::quant::QuantModel,
    a: &CalibrateArgs,
) -> Result<()> {
    use lidar_ptq::eval::{ClassSpec, Frame, NuscenesConfig, nuscenes_eval};
    use lidar_ptq::model::decode::decode;
    use lidar_ptq::train::sim_eval::{class_range, eval_frames};
    let frames = eval_frames(a.eval_lidar, a.eval_frames, a.eval_seed);
    let fp = lidar_ptq::engine::Fp32Engine::new(graph, weights)?;
    let q = lidar_ptq::quant::QuantNet::new(graph, weights, model)?;
    let mut scan =
        lidar_ptq::model::input::ScanInput::new(cfg, lidar_ptq::model::voxelize::Mode::Test)?;
    let b = bar(frames.len() as u64, "evaluating FP32 and INT8");
    let (mut d_fp, mut d_q) = (Vec::new(), Vec::new());
    for (points, _) in &frames {
        let input = lidar_ptq::quant::calibrate::FrameInput::prepare(&mut scan, points)?;
        d_fp.push(decode(cfg, &fp.run(&input.net_input())?.views())?);
        d_q.push(decode(cfg, &q.run(&input.net_input())?.views())?);
        b.inc(1);
    }
    b.finish_and_clear();
    let ncfg = NuscenesConfig {
        classes: cfg
            .classes()
            .into_iter()
            .map(|c| ClassSpec::new(c, class_range(c)))
            .collect(),
        ..NuscenesConfig::default()
    };
    let score = |dets: &[Vec<lidar_ptq::boxes::Detection>]| {
        let views: Vec<Frame<'_>> = frames
            .iter()
            .zip(dets)
            .map(|((_, gt), d)| Frame { gt, detections: d })
            .collect();
        nuscenes_eval(&views, &ncfg)
    };
    let (rf, rq) = (score(&d_fp), score(&d_q));
    for (cf, cq) in rf.classes.iter().zip(&rq.classes) {
        println!(
            "{:<22} {:>5} gt  AP FP32 {:.4}  INT8 {:.4}",
            cf.class, cf.num_gt, cf.mean_ap, cq.mean_ap
        );
    }
    println!(
        "mAP FP32 {:.4}  INT8 {:.4} ({:+.4})  NDS FP32 {:.4}  INT8 {:.4}  ({} frames)",
        rf.map,
        rq.map,
        rq.map - rf.map,
        rf.nds,
        rq.nds,
        frames.len()
    );
    Ok(())
}
