//! The `lidar_ptq` command line: one thin function per verb over the library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

use lidar_ptq::{dataset, render};

mod cli;

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
    /// Simulate a drive and write it as a rosbag2 MCAP bag (PointCloud2 + ground truth).
    Simulate {
        /// Sensor model.
        #[arg(long, value_enum, default_value_t = lidar_ptq::sim::LidarModel::Hdl64)]
        lidar: lidar_ptq::sim::LidarModel,
        /// Number of scans per scene (at the sensor's rate).
        #[arg(long, default_value_t = 20)]
        frames: u64,
        /// World and noise seed: the same seed writes the same bytes.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Independent drives, one after the other in the bag (seeds SEED, SEED+1, ...).
        #[arg(long, default_value_t = 1)]
        scenes: u64,
        /// Bag directory to create (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// PointCloud2 byte layout (default: the sensor maker's driver).
        #[arg(long, value_enum)]
        layout: Option<CloudLayout>,
        /// Agent density (1 = a typical city street).
        #[arg(long, default_value_t = 1.0)]
        density: f32,
        /// Class of bicycles with riders: `cyclist` (KITTI) or `bicycle` (nuScenes).
        #[arg(long, default_value = "cyclist")]
        ridden_bicycle_class: String,
        #[arg(long, default_value = "/points")]
        points_topic: String,
        #[arg(long, default_value = "/ground_truth/objects")]
        ground_truth_topic: String,
    },
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
    /// Draw a bird's-eye-view PNG of one scan with its labels (and detections).
    Render(RenderArgs),
    /// Train a pillar model on simulated scans (writes DIR/model.safetensors, the config
    /// copy and DIR/train_log.json).
    Train(TrainArgs),
    /// Score a model on a labelled bag, a KITTI directory or held-out simulated scans
    /// (nuScenes mAP / TP errors / NDS, BEV IoU AP; per class and distance band).
    Eval(cli::eval::EvalArgs),
    /// Run a model on one scan (file or bag): print, save (JSON) or draw its detections.
    Detect(cli::detect::DetectArgs),
    /// Quantize an FP32 model to INT8 on unlabelled scans (LiDAR-PTQ or a baseline).
    Calibrate(Box<cli::calibrate::CalibrateArgs>),
    /// How closely INT8 models reproduce the FP32 detections on the same scans (matched
    /// boxes, centre and score errors; no labels needed).
    Fidelity(cli::fidelity::FidelityArgs),
    /// Score detections collected from lidar_ptq_node on a simulated bag against its
    /// ground truth, beside the same model run offline with the node's parameters
    /// (one JSON line on stdout).
    NodeScore(NodeScoreArgs),
    /// Time the FP32 and INT8 pipelines (end to end and per stage) on a simulated scan.
    Bench(BenchArgs),
    /// Convert a model trained elsewhere into a model file (weights + embedded config).
    #[command(subcommand)]
    Import(cli::import::ImportCommand),
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Weights (safetensors); the model config is the one embedded in the file unless
    /// --config is given.
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// Model description (YAML); random seeded weights unless --model is given.
    #[arg(long, conflicts_with = "preset")]
    config: Option<PathBuf>,
    /// Built-in model with random seeded weights: nuscenes-pillar, nuscenes-voxel, default,
    /// autoware-pillar.
    #[arg(long)]
    preset: Option<String>,
    /// INT8 model: a file written by `lidar_ptq calibrate`, `auto` (a quick min-max model built on
    /// a few simulated scans, timing only) or `none`.
    #[arg(long, default_value = "auto")]
    int8: String,
    /// Timed runs per pipeline (the median is reported).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Untimed runs first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Simulated sensor (default: HDL-32E for nuScenes models, HDL-64E otherwise).
    #[arg(long, value_enum)]
    lidar: Option<lidar_ptq::sim::LidarModel>,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
    /// Also report every node's median time (FP32 and INT8).
    #[arg(long)]
    layers: bool,
    /// cpu (FP32 and INT8 kernels on this CPU), or cuda / cuda:N (FP32, FP16 and INT8 on
    /// that GPU; builds with feature `cuda`).
    #[arg(long, default_value = "cpu")]
    device: cli::Device,
}

#[derive(clap::Args)]
struct NodeScoreArgs {
    /// The bag the node was fed (with its ground-truth topic).
    #[arg(long)]
    bag: PathBuf,
    /// JSON array of collected frames: {stamp_ns, frame_id, detections: [Detection]}.
    #[arg(long)]
    detections: PathBuf,
    /// The node's ROS parameter file (thresholds, intensity field, model path).
    #[arg(long, default_value = "config/lidar_ptq_node.yaml")]
    params: PathBuf,
    /// Overrides the parameter file's model_path.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Run the offline reference with this INT8 model (calibrated for the FP32 model),
    /// as the node runs it, instead of FP32.
    #[arg(long)]
    int8: Option<PathBuf>,
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model description (YAML).
    #[arg(long, default_value = "config/models/default.yaml")]
    config: PathBuf,
    /// Simulated sensors, comma-separated; each frame draws one of them.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [lidar_ptq::sim::LidarModel::Hdl64, lidar_ptq::sim::LidarModel::Hdl32])]
    lidar: Vec<lidar_ptq::sim::LidarModel>,
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Frames per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Seed of the initialisation, the scenes and the augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Peak learning rate of the one-cycle schedule.
    #[arg(long, default_value_t = 2e-3)]
    max_lr: f32,
    /// A checkpoint every this many steps (and at the end).
    #[arg(long, default_value_t = 500)]
    checkpoint_every: usize,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Continue the run from OUT's last checkpoint (same config and options).
    #[arg(long)]
    resume: bool,
    /// Stop with a checkpoint after this many steps (resume later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
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
    /// Scan file (KITTI `.bin`, nuScenes `.pcd.bin`, `.pcd`) or a rosbag2 bag (directory,
    /// `.mcap` or `.db3`) holding PointCloud2 scans, with ground truth when it has a
    /// Detection3DArray topic.
    input: PathBuf,
    /// Bag only: the PointCloud2 topic (default: the first one).
    #[arg(long)]
    topic: Option<String>,
    /// Bag only: which scan of the topic, in time order.
    #[arg(long, default_value_t = 0)]
    index: usize,
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
    if !lidar_ptq::engine::keep_freed_memory() {
        log::debug!("allocator thresholds left as they are");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Simulate {
            lidar,
            frames,
            seed,
            scenes,
            out,
            layout,
            density,
            ridden_bicycle_class,
            points_topic,
            ground_truth_topic,
        } => {
            let mut cfg = lidar_ptq::sim::SimConfig::new(lidar);
            cfg.world.agent_density = density;
            cfg.world.ridden_bicycle_class = ridden_bicycle_class;
            cfg.world.duration_s = frames as f32 / cfg.sensor.rate_hz;
            let layout = layout.map(CloudLayout::layout).unwrap_or(match lidar {
                lidar_ptq::sim::LidarModel::Os128 => lidar_ptq::cloud::Layout::Ouster,
                _ => lidar_ptq::cloud::Layout::Velodyne,
            });
            let opts = lidar_ptq::sim::record::RecordOptions {
                frames,
                layout,
                points_topic,
                ground_truth_topic,
                ..Default::default()
            };
            simulate(cfg, seed, scenes, &opts, &out)
        }
        Command::SimReport { data, scenes, out } => sim_report(&data, scenes, out),
        Command::Bag {
            command: BagCommand::Info { path },
        } => {
            let bag = lidar_ptq::bag::Bag::open(&path)?;
            print!("{}", lidar_ptq::bag::info::format_info(&bag));
            Ok(())
        }
        Command::Render(args) => render_verb(&args),
        Command::Train(args) => train_verb(&args),
        Command::Eval(args) => cli::eval::run(&args),
        Command::Detect(args) => cli::detect::run(&args),
        Command::Calibrate(args) => cli::calibrate::run(&args),
        Command::Fidelity(args) => cli::fidelity::run(&args),
        Command::NodeScore(args) => node_score_verb(&args),
        Command::Bench(args) => bench_verb(&args),
        Command::Import(cmd) => cli::import::run(&cmd),
    }
}

fn node_score_verb(a: &NodeScoreArgs) -> Result<()> {
    use lidar_ptq::node::{NODE_NAME, engine, params, score};
    let text = std::fs::read_to_string(&a.params)
        .with_context(|| format!("reading {}", a.params.display()))?;
    let mut values = params::from_ros_yaml(&text, NODE_NAME)
        .with_context(|| format!("parameter file {}", a.params.display()))?;
    if let Some(m) = &a.model {
        values.insert(
            "model_path".into(),
            params::ParamValue::String(m.display().to_string()),
        );
    }
    let p = params::NodeParams::from_values(&values)
        .with_context(|| format!("parameter file {}", a.params.display()))?;
    let model = engine::Fp32Model::load(&p)?;
    let mut det = match &a.int8 {
        None => model.fp32()?,
        Some(q) => model.int8(&lidar_ptq::quant::file::load_for(
            q,
            &model.config,
            &model.weights,
        )?)?,
    };
    let scans = score::read_scans(&a.bag, &p)?;
    let bar = indicatif::ProgressBar::new(scans.len() as u64);
    let offline = score::detect_offline(&mut det, &scans, &p, &bar)?;
    bar.finish_and_clear();
    let collected = std::fs::read_to_string(&a.detections)
        .with_context(|| format!("reading {}", a.detections.display()))?;
    let collected = score::parse_collected(&collected)?;
    let classes = det.config().classes();
    let s = score::score(&scans, &collected, &offline, &classes)?;
    println!("{}", serde_json::to_string(&s)?);
    Ok(())
}

fn bench_verb(a: &BenchArgs) -> Result<()> {
    use lidar_ptq::bench::{self, BenchOptions, Int8Source, ModelSource};
    let model = match (&a.model, &a.config, &a.preset) {
        (Some(path), config, None) => ModelSource::Weights {
            path: path.clone(),
            config: config.clone(),
        },
        (None, Some(config), None) => ModelSource::Config(config.clone()),
        (None, None, Some(p)) => ModelSource::Preset(p.clone()),
        _ => anyhow::bail!("bench needs --model, --config or --preset"),
    };
    let int8 = match a.int8.as_str() {
        "auto" => Int8Source::Auto,
        "none" => Int8Source::None,
        path => Int8Source::File(PathBuf::from(path)),
    };
    let opts = BenchOptions {
        model,
        int8,
        iters: a.iters,
        warmup: a.warmup,
        lidar: a.lidar,
        layers: a.layers,
    };
    let bar = indicatif::ProgressBar::new(0);
    if let cli::Device::Cuda(ordinal) = a.device {
        #[cfg(feature = "cuda")]
        {
            let report = bench::cuda::run(&opts, ordinal, &bar)?;
            bar.finish_and_clear();
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::cuda::format_report(&report));
            }
            return Ok(());
        }
        #[cfg(not(feature = "cuda"))]
        anyhow::bail!(
            "GPU {ordinal}: this lidar_ptq was built without GPU support: rebuild with `--features cuda`"
        );
    }
    let report = bench::run(&opts, &bar)?;
    bar.finish_and_clear();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::format_report(&report));
    }
    Ok(())
}

fn train_verb(a: &TrainArgs) -> Result<()> {
    let text = std::fs::read_to_string(&a.config)
        .with_context(|| format!("reading {}", a.config.display()))?;
    let cfg = lidar_ptq::model::ModelConfig::from_yaml(&text)
        .with_context(|| format!("model config {}", a.config.display()))?;
    let mut opts = lidar_ptq::train::TrainOptions::new(a.steps, a.batch, a.seed, a.lidar.clone());
    opts.max_lr = a.max_lr;
    opts.checkpoint_every = a.checkpoint_every;
    opts.stop_after = a.stop_after;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    lidar_ptq::fsutil::write_atomic(&a.out.join("config.yaml"), text.as_bytes())
        .with_context(|| format!("writing the config copy into {}", a.out.display()))?;
    let log = lidar_ptq::train::train(&cfg, &opts, &a.out, a.resume)?;
    let last = log.entries.last().map(|e| e.loss).unwrap_or(f32::NAN);
    println!(
        "trained {} for {} steps (batch {}) in {:.1} s: {:.3} steps/s, final loss {:.4}, weights {}",
        log.model,
        log.steps,
        log.batch,
        log.seconds,
        log.steps_per_second,
        last,
        a.out.join("model.safetensors").display()
    );
    Ok(())
}

fn render_verb(a: &RenderArgs) -> Result<()> {
    anyhow::ensure!(
        a.center.len() == 2,
        "--center takes x,y (got {:?})",
        a.center
    );
    let scan = lidar_ptq::source::load_scan(
        &a.input,
        a.labels.as_deref(),
        a.calib.as_deref(),
        a.topic.as_deref(),
        a.index,
    )?;
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

fn sim_report(data: &std::path::Path, scenes: usize, out: Option<PathBuf>) -> Result<()> {
    let text = lidar_ptq::sim::realism::report(data, scenes)?;
    print!("{text}");
    if let Some(path) = out {
        lidar_ptq::fsutil::write_atomic(&path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// PointCloud2 layouts selectable on the command line.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CloudLayout {
    Velodyne,
    Ouster,
    Livox,
    Hesai,
    Autoware,
    Xyzi,
}

impl CloudLayout {
    fn layout(self) -> lidar_ptq::cloud::Layout {
        use lidar_ptq::cloud::Layout;
        match self {
            Self::Velodyne => Layout::Velodyne,
            Self::Ouster => Layout::Ouster,
            Self::Livox => Layout::Livox,
            Self::Hesai => Layout::Hesai,
            Self::Autoware => Layout::AutowareXyzirc,
            Self::Xyzi => Layout::XyziF32,
        }
    }
}

fn simulate(
    cfg: lidar_ptq::sim::SimConfig,
    seed: u64,
    scenes: u64,
    opts: &lidar_ptq::sim::record::RecordOptions,
    out: &std::path::Path,
) -> Result<()> {
    anyhow::ensure!(scenes >= 1, "--scenes must be at least 1");
    let total = opts.frames * scenes;
    let bar = indicatif::ProgressBar::new(total);
    // Each drive starts one second after the previous one ended.
    let period_ns = (1e9 / cfg.sensor.rate_hz as f64) as u64;
    let drives: Vec<lidar_ptq::sim::Scene> = (0..scenes)
        .map(|j| {
            let mut c = cfg.clone();
            c.start_stamp_ns += j * (opts.frames * period_ns + 1_000_000_000);
            lidar_ptq::sim::Scene::new(c, seed + j)
        })
        .collect();
    let dir = lidar_ptq::sim::record::record_scenes(&drives, opts, out, |k| bar.set_position(k))?;
    bar.finish_and_clear();
    log::info!(
        "wrote {total} frames ({scenes} drives) to {}",
        dir.display()
    );
    Ok(())
}
