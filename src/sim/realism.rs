//! How close simulated scans are to real ones: points per scan, range and intensity
//! histograms, points on cars and pedestrians against distance, and the share of ground
//! returns, simulated HDL-64E against KITTI and simulated HDL-32E against nuScenes.
//!
//! The real files are read with the `dataset` readers.

use super::sensor::LidarModel;
use super::simulator::{Scene, SimConfig};
use crate::boxes::Object;
use crate::cloud::Points;
use crate::dataset::{kitti, nuscenes};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RealismError {
    #[error(transparent)]
    Kitti(#[from] crate::dataset::kitti::KittiError),
    #[error(transparent)]
    Nuscenes(#[from] crate::dataset::nuscenes::NuscenesError),
    #[error("cannot list {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
}

/// Real labels with the point count recomputed from the scan (`num_points = None`), the
/// same way for both datasets.
fn unlabelled_counts(mut objects: Vec<Object>) -> Vec<Object> {
    for o in &mut objects {
        o.num_points = None;
    }
    objects
}

/// Histogram shares over `edges` (values outside are dropped).
fn histogram(values: impl Iterator<Item = f32>, edges: &[f32]) -> Vec<f64> {
    let mut h = vec![0f64; edges.len() - 1];
    let mut n = 0f64;
    for v in values {
        if let Some(b) = (0..edges.len() - 1).find(|&b| v >= edges[b] && v < edges[b + 1]) {
            h[b] += 1.0;
            n += 1.0;
        }
    }
    h.iter().map(|c| c / n.max(1.0)).collect()
}

/// Total-variation distance between two histograms (0 = same, 1 = disjoint).
fn tv(a: &[f64], b: &[f64]) -> f64 {
    0.5 * a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>()
}

struct Side {
    scans: usize,
    points: Vec<f64>,
    range: Vec<f64>,
    intensity: Vec<f64>,
    ground: f64,
    /// Points per scan in each elevation band of `ELEV_EDGES`.
    elevation: Vec<f64>,
    /// (class, distance, points in box)
    objects: Vec<(String, f32, u32)>,
}

const RANGE_EDGES: [f32; 11] = [
    0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 130.0,
];
const ELEV_EDGES: [f32; 10] = [-31.0, -20.0, -15.0, -10.0, -6.0, -4.0, -2.0, 0.0, 3.0, 11.0];
const DIST_BINS: [(f32, f32); 3] = [(5.0, 15.0), (15.0, 30.0), (30.0, 50.0)];

/// Drops placeholder returns closer than `min_range` (nuScenes sweeps keep every ray,
/// no-returns at the origin: 8,220 of the 34,688 points).
fn drop_near(p: &Points, min_range: f32) -> Points {
    let mut out = Points::with_capacity(p.len());
    for i in 0..p.len() {
        if p.x[i].hypot(p.y[i]).hypot(p.z[i]) >= min_range {
            out.push(p.x[i], p.y[i], p.z[i], p.intensity[i]);
        }
    }
    out
}

fn collect(frames: &[(Points, Vec<Object>)], mount_height: f32, int_edges: &[f32]) -> Side {
    let mut ranges = Vec::new();
    let mut ints = Vec::new();
    let mut ground = 0usize;
    let mut total = 0usize;
    let mut objects = Vec::new();
    let mut points = Vec::new();
    let mut elev = vec![0f64; ELEV_EDGES.len() - 1];
    for (p, objs) in frames {
        for i in 0..p.len() {
            let e = p.z[i].atan2(p.x[i].hypot(p.y[i])).to_degrees();
            if let Some(b) = (0..elev.len()).find(|&b| e >= ELEV_EDGES[b] && e < ELEV_EDGES[b + 1])
            {
                elev[b] += 1.0 / frames.len() as f64;
            }
        }
        points.push(p.len() as f64);
        for i in 0..p.len() {
            ranges.push(p.x[i].hypot(p.y[i]));
            ints.push(p.intensity[i]);
            if p.z[i] < -mount_height + 0.3 {
                ground += 1;
            }
        }
        total += p.len();
        for o in objs {
            let n = o.num_points.unwrap_or_else(|| {
                (0..p.len()).filter(|&i| o.bbox.contains(p.xyz(i))).count() as u32
            });
            objects.push((o.class.clone(), o.bbox.center[0].hypot(o.bbox.center[1]), n));
        }
    }
    Side {
        scans: frames.len(),
        points,
        range: histogram(ranges.into_iter(), &RANGE_EDGES),
        intensity: histogram(ints.into_iter(), int_edges),
        ground: ground as f64 / total.max(1) as f64,
        elevation: elev,
        objects,
    }
}

fn median(mut v: Vec<u32>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2] as f64
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2]) as f64
    })
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

fn compare(out: &mut String, title: &str, real: &Side, sim: &Side, int_edges: &[f32]) {
    let (mr, ms) = (mean(&real.points), mean(&sim.points));
    let _ = writeln!(out, "## {title}\n");
    let _ = writeln!(out, "| | real | sim |\n|---|---|---|");
    let _ = writeln!(out, "| scans | {} | {} |", real.scans, sim.scans);
    let _ = writeln!(
        out,
        "| points per scan (mean) | {mr:.0} | {ms:.0} ({:+.1} %) |",
        100.0 * (ms / mr - 1.0)
    );
    let _ = writeln!(
        out,
        "| ground share (z < -mount + 0.3 m) | {:.3} | {:.3} |",
        real.ground, sim.ground
    );
    let _ = writeln!(
        out,
        "\nBEV range histogram (share of points), TV distance {:.3}:\n",
        tv(&real.range, &sim.range)
    );
    let _ = writeln!(out, "| range [m] | real | sim |\n|---|---|---|");
    for b in 0..real.range.len() {
        let _ = writeln!(
            out,
            "| {}-{} | {:.3} | {:.3} |",
            RANGE_EDGES[b],
            RANGE_EDGES[b + 1],
            real.range[b],
            sim.range[b]
        );
    }
    let _ = writeln!(out, "\nPoints per scan by elevation band:\n");
    let _ = writeln!(out, "| elevation [deg] | real | sim |\n|---|---|---|");
    for b in 0..real.elevation.len() {
        let _ = writeln!(
            out,
            "| {} .. {} | {:.0} | {:.0} |",
            ELEV_EDGES[b],
            ELEV_EDGES[b + 1],
            real.elevation[b],
            sim.elevation[b]
        );
    }
    let _ = writeln!(
        out,
        "\nIntensity histogram, TV distance {:.3}:\n",
        tv(&real.intensity, &sim.intensity)
    );
    let _ = writeln!(out, "| intensity | real | sim |\n|---|---|---|");
    for b in 0..real.intensity.len() {
        let _ = writeln!(
            out,
            "| {}-{} | {:.3} | {:.3} |",
            int_edges[b],
            int_edges[b + 1],
            real.intensity[b],
            sim.intensity[b]
        );
    }
    let _ = writeln!(
        out,
        "\nPoints in the box vs BEV distance (median over boxes with >= 1 point, number of such boxes):\n"
    );
    let _ = writeln!(
        out,
        "| class | distance [m] | real | sim | sim/real |\n|---|---|---|---|---|"
    );
    for class in ["car", "pedestrian"] {
        for (lo, hi) in DIST_BINS {
            let pick = |s: &Side| -> Vec<u32> {
                s.objects
                    .iter()
                    // Boxes with at least one point: real labels exist for what was seen.
                    .filter(|(c, d, n)| c == class && *d >= lo && *d < hi && *n > 0)
                    .map(|o| o.2)
                    .collect()
            };
            let (r, s) = (pick(real), pick(sim));
            let (nr, ns) = (r.len(), s.len());
            let (mr, ms) = (median(r), median(s));
            let fmt =
                |m: Option<f64>, n: usize| m.map_or("-".to_string(), |m| format!("{m:.0} (n={n})"));
            let ratio = match (mr, ms) {
                (Some(a), Some(b)) if a > 0.0 => format!("{:.2}", b / a),
                _ => "-".into(),
            };
            let _ = writeln!(
                out,
                "| {class} | {lo}-{hi} | {} | {} | {ratio} |",
                fmt(mr, nr),
                fmt(ms, ns)
            );
        }
    }
    let mut listed: Vec<String> = real
        .objects
        .iter()
        .filter(|(c, _, _)| c == "car" || c == "pedestrian")
        .map(|(c, d, n)| format!("{c} {d:.1} m: {n}"))
        .collect();
    listed.sort();
    let _ = writeln!(
        out,
        "\nEvery real car/pedestrian box (BEV distance: points in box): {}\n",
        listed.join("; ")
    );
}

/// Simulated frames of `model`: frame 0 of `scenes` worlds.
fn simulate(model: LidarModel, scenes: usize, ridden: &str) -> Vec<(Points, Vec<Object>)> {
    let mut cfg = SimConfig::new(model);
    cfg.world.ridden_bicycle_class = ridden.into();
    (0..scenes as u64)
        .map(|s| {
            let f = Scene::new(cfg.clone(), 1000 + s).frame(0);
            (f.points, f.objects)
        })
        .collect()
}

/// Points on a lone object (empty flat world) at BEV distance `d`, median over headings
/// and bearings: the sensor's pure sampling density, free of occlusion.
fn isolated(model: LidarModel, class: super::Class, d: f32) -> f64 {
    let mut cfg = SimConfig::new(model);
    cfg.motion_distortion = false;
    let mut counts = Vec::new();
    for (k, yaw) in [0.0f32, 0.8, 1.57, 2.4].into_iter().enumerate() {
        for bearing in [0.3f32, 1.2] {
            let mut w = super::World::empty();
            let size = class.mean_size();
            w.push_agent(
                class,
                size,
                d * bearing.cos(),
                d * bearing.sin(),
                yaw,
                0.0,
                k as u64,
            );
            let f = Scene::from_world(cfg.clone(), w, 77 + k as u64).frame(0);
            counts.push(f.objects[0].num_points.unwrap_or(0));
        }
    }
    median(counts).unwrap_or(0.0)
}

/// The report as markdown. `data` is the shared data root (holding kitti/ and nuscenes/).
pub fn report(data: &Path, scenes: usize) -> Result<String, RealismError> {
    let kitti = data.join("kitti/training");
    let mut real_k = Vec::new();
    for i in 0..6 {
        let id = format!("{i:06}");
        let p = kitti::read_velodyne(&kitti.join("velodyne").join(format!("{id}.bin")))?;
        let objs = kitti::read_objects(
            &kitti.join("label_2").join(format!("{id}.txt")),
            &kitti.join("calib").join(format!("{id}.txt")),
        )?;
        real_k.push((drop_near(&p, 1.0), unlabelled_counts(objs)));
    }
    let nus = data.join("nuscenes");
    let lidar_file = std::fs::read_dir(&nus)
        .map_err(|source| RealismError::Io {
            path: nus.clone(),
            source,
        })?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(".pcd.bin"))
        .ok_or_else(|| RealismError::Bad {
            path: nus.clone(),
            what: "no .pcd.bin sweep".into(),
        })?;
    let real_n = vec![(
        drop_near(&nuscenes::read_sweep(&lidar_file)?, 1.0),
        unlabelled_counts(nuscenes::read_objects(&nus.join("labels.json"))?),
    )];

    let kitti_int = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01];
    let nus_int = [0.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 256.0];
    let sim_k = simulate(LidarModel::Hdl64, scenes, "cyclist");
    let sim_n = simulate(LidarModel::Hdl32, scenes, "bicycle");
    let mut out = String::new();
    let _ = writeln!(out, "# Simulator realism report\n");
    let _ = writeln!(
        out,
        "Generated by `lidar_ptq sim-report` ({scenes} simulated scenes per sensor, frame 0 each, seeds 1000..). \
         Real data: the 6 KITTI HDL-64E scans and their Car/Pedestrian labels, the nuScenes HDL-32E sweep and its labels. \
         KITTI labels only cover the front camera's view, so real box counts are smaller. \
         Real points closer than 1 m are dropped first (the nuScenes sweep stores every ray, \
         8,220 no-returns at the origin).\n"
    );
    compare(
        &mut out,
        "HDL-64E: simulated vs KITTI",
        &collect(&real_k, 1.73, &kitti_int),
        &collect(&sim_k, 1.73, &kitti_int),
        &kitti_int,
    );
    let _ = writeln!(
        out,
        "## Lone objects (no occlusion): points on the object, median over 4 headings x 2 bearings\n"
    );
    let _ = writeln!(
        out,
        "| sensor | class | 10 m | 20 m | 40 m |\n|---|---|---|---|---|"
    );
    for model in [LidarModel::Hdl64, LidarModel::Hdl32] {
        for class in [super::Class::Car, super::Class::Pedestrian] {
            let v: Vec<String> = [10.0, 20.0, 40.0]
                .iter()
                .map(|&d| format!("{:.0}", isolated(model, class, d)))
                .collect();
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                model.name(),
                class.name(),
                v.join(" | ")
            );
        }
    }
    let _ = writeln!(out);
    compare(
        &mut out,
        "HDL-32E: simulated vs nuScenes",
        &collect(&real_n, 1.84, &nus_int),
        &collect(&sim_n, 1.84, &nus_int),
        &nus_int,
    );
    Ok(out)
}
