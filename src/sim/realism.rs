//! How close simulated scans are to real ones: points per scan, range and intensity
//! histograms, points on cars and pedestrians against distance, and the share of ground
//! returns, simulated HDL-64E against KITTI and simulated HDL-32E against nuScenes.
//!
//! The real files are read with small private readers (raw float32 scans, KITTI label
//! and calib text, the nuScenes labels.json of /work/shared/data), enough for these
//! statistics.

use super::sensor::LidarModel;
use super::simulator::{Scene, SimConfig};
use crate::boxes::{Box3d, Object};
use crate::cloud::Points;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RealismError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
}

fn read(path: &Path) -> Result<Vec<u8>, RealismError> {
    std::fs::read(path).map_err(|source| RealismError::Io {
        path: path.to_owned(),
        source,
    })
}

fn bad(path: &Path, what: impl Into<String>) -> RealismError {
    RealismError::Bad {
        path: path.to_owned(),
        what: what.into(),
    }
}

/// A float32 scan with `stride` values per point (x, y, z, intensity first).
fn read_bin(path: &Path, stride: usize) -> Result<Points, RealismError> {
    let b = read(path)?;
    if b.len() % (4 * stride) != 0 {
        return Err(bad(
            path,
            format!(
                "{} bytes is not a multiple of {} (float32 x {stride})",
                b.len(),
                4 * stride
            ),
        ));
    }
    let f: Vec<f32> = b
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let mut p = Points::with_capacity(f.len() / stride);
    for c in f.chunks_exact(stride) {
        p.push(c[0], c[1], c[2], c[3]);
    }
    Ok(p)
}

/// KITTI boxes of frame `id` in the velodyne frame (types Car and Pedestrian).
fn kitti_objects(root: &Path, id: &str) -> Result<Vec<Object>, RealismError> {
    let calib_path = root.join("calib").join(format!("{id}.txt"));
    let calib = String::from_utf8_lossy(&read(&calib_path)?).into_owned();
    let mat = |key: &str, n: usize| -> Result<Vec<f64>, RealismError> {
        let line = calib
            .lines()
            .find(|l| l.starts_with(key))
            .ok_or_else(|| bad(&calib_path, format!("no {key} line")))?;
        let v: Vec<f64> = line[key.len()..]
            .split_whitespace()
            .filter_map(|t| t.parse().ok())
            .collect();
        if v.len() != n {
            return Err(bad(
                &calib_path,
                format!("{key} has {} numbers, expected {n}", v.len()),
            ));
        }
        Ok(v)
    };
    let r0 = mat("R0_rect:", 9)?;
    let tr = mat("Tr_velo_to_cam:", 12)?;
    let label_path = root.join("label_2").join(format!("{id}.txt"));
    let text = String::from_utf8_lossy(&read(&label_path)?).into_owned();
    let mut out = Vec::new();
    for (ln, line) in text.lines().enumerate() {
        let t: Vec<&str> = line.split_whitespace().collect();
        if t.len() < 15 {
            continue;
        }
        let class = match t[0] {
            "Car" => "car",
            "Pedestrian" => "pedestrian",
            _ => continue,
        };
        let v: Vec<f64> = t[8..15]
            .iter()
            .map(|s| s.parse::<f64>())
            .collect::<Result<_, _>>()
            .map_err(|_| bad(&label_path, format!("line {}: bad number", ln + 1)))?;
        let (h, w, l, xr, yr, zr, ry) = (v[0], v[1], v[2], v[3], v[4], v[5], v[6]);
        // rect -> cam: R0^T x; cam -> velo: R^T (x - t) with Tr = [R | t].
        let c = [
            r0[0] * xr + r0[3] * yr + r0[6] * zr,
            r0[1] * xr + r0[4] * yr + r0[7] * zr,
            r0[2] * xr + r0[5] * yr + r0[8] * zr,
        ];
        let d = [c[0] - tr[3], c[1] - tr[7], c[2] - tr[11]];
        let p = [
            tr[0] * d[0] + tr[4] * d[1] + tr[8] * d[2],
            tr[1] * d[0] + tr[5] * d[1] + tr[9] * d[2],
            tr[2] * d[0] + tr[6] * d[1] + tr[10] * d[2],
        ];
        out.push(Object {
            bbox: Box3d {
                center: [p[0] as f32, p[1] as f32, (p[2] + h * 0.5) as f32],
                size: [l as f32, w as f32, h as f32],
                yaw: (-ry - std::f64::consts::FRAC_PI_2) as f32,
            },
            class: class.into(),
            velocity: None,
            num_points: None,
        });
    }
    Ok(out)
}

fn nuscenes_objects(path: &Path) -> Result<Vec<Object>, RealismError> {
    // The file was written by Python's json, which spells unknown velocities `NaN`.
    let text = String::from_utf8_lossy(&read(path)?).replace(": NaN", ": null");
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(path, e.to_string()))?;
    let boxes = v["boxes"]
        .as_array()
        .ok_or_else(|| bad(path, "no boxes array"))?;
    let mut out = Vec::new();
    for (i, b) in boxes.iter().enumerate() {
        let f = |k: &str| -> Result<f32, RealismError> {
            b[k].as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| bad(path, format!("box {i}: no number {k}")))
        };
        out.push(Object {
            bbox: Box3d {
                center: [f("x")?, f("y")?, f("z")?],
                size: [f("l")?, f("w")?, f("h")?],
                yaw: f("yaw")?,
            },
            class: b["class"].as_str().unwrap_or("").to_string(),
            velocity: None,
            num_points: None,
        });
    }
    Ok(out)
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
const DIST_BINS: [(f32, f32); 3] = [(5.0, 15.0), (15.0, 25.0), (30.0, 50.0)];

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
    let _ = writeln!(out);
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
        let p = drop_near(
            &read_bin(&kitti.join("velodyne").join(format!("{id}.bin")), 4)?,
            1.0,
        );
        real_k.push((p, kitti_objects(&kitti, &id)?));
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
        .ok_or_else(|| bad(&nus, "no .pcd.bin sweep"))?;
    let real_n = vec![(
        drop_near(&read_bin(&lidar_file, 5)?, 1.0),
        nuscenes_objects(&nus.join("labels.json"))?,
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
