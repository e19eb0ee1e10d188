//! Voxelisation of a scan into pillars with the augmented point features of the
//! CenterPoint pillar feature net.
//!
//! Points outside the range are dropped, each remaining point goes to the BEV cell
//! `floor((p - range_min) / cell)`, and each pillar keeps at most `max_points_per_pillar`
//! points; at most `max_pillars` pillars are made. Overflow is resolved the way the
//! reference voxel generators do, which is deterministic for a given point order: pillars
//! are numbered in order of their first point, a pillar keeps its first points in input
//! order, and once `max_pillars` exist, points of new cells are dropped.
//!
//! Per kept point the features are the configured raw channels, then xyz minus the mean of
//! the pillar's kept points, then xyz (or xy) minus the pillar centre
//! (`i * cell + cell / 2 + range_min`; z uses the full pillar height). Padded slots are 0.

use crate::cloud::Points;
use crate::ops::Tensor;
use crate::ops::scatter::Cell;

/// A raw per-point channel copied into the features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawFeature {
    X,
    Y,
    Z,
    Intensity,
    /// Per-point time offset (time lag of multi-sweep clouds); the points must carry it.
    Time,
}

/// Which axes the offset from the pillar centre covers (OpenPCDet: xyz; original
/// CenterPoint and Autoware: xy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CentreOffset {
    Xyz,
    Xy,
}

/// Pillar grid and feature layout (one per preset).
#[derive(Debug, Clone, PartialEq)]
pub struct PillarConfig {
    pub range_min: [f32; 3],
    pub range_max: [f32; 3],
    /// Cell size in x and y, metres; a pillar spans the whole z range.
    pub cell_xy: [f32; 2],
    pub max_points_per_pillar: usize,
    pub max_pillars: usize,
    pub raw_features: Vec<RawFeature>,
    pub centre_offset: CentreOffset,
}

impl PillarConfig {
    /// The OpenPCDet nuScenes pillar preset (inference cap, 60k pillars): x, y, z,
    /// intensity, time lag + 3 mean offsets + 3 centre offsets = 11 features.
    pub fn nuscenes() -> Self {
        Self {
            range_min: [-51.2, -51.2, -5.0],
            range_max: [51.2, 51.2, 3.0],
            cell_xy: [0.2, 0.2],
            max_points_per_pillar: 20,
            max_pillars: 60_000,
            raw_features: vec![
                RawFeature::X,
                RawFeature::Y,
                RawFeature::Z,
                RawFeature::Intensity,
                RawFeature::Time,
            ],
            centre_offset: CentreOffset::Xyz,
        }
    }

    /// Grid size `(ny, nx)`; the extent is a whole number of cells (rounded, since presets
    /// such as 102.4 / 0.2 are not exact in binary).
    pub fn grid(&self) -> (usize, usize) {
        let n =
            |a: usize| ((self.range_max[a] - self.range_min[a]) / self.cell_xy[a]).round() as usize;
        (n(1), n(0))
    }

    /// Features per point.
    pub fn num_features(&self) -> usize {
        self.raw_features.len()
            + 3
            + match self.centre_offset {
                CentreOffset::Xyz => 3,
                CentreOffset::Xy => 2,
            }
    }

    fn validate(&self) -> Result<(), VoxelizeError> {
        for a in 0..3 {
            if !(self.range_min[a].is_finite()
                && self.range_max[a].is_finite()
                && self.range_min[a] < self.range_max[a])
            {
                return Err(VoxelizeError::Config {
                    field: "range",
                    detail: format!(
                        "axis {a}: min {} must be finite and below max {}",
                        self.range_min[a], self.range_max[a]
                    ),
                });
            }
        }
        for a in 0..2 {
            if !(self.cell_xy[a].is_finite() && self.cell_xy[a] > 0.0) {
                return Err(VoxelizeError::Config {
                    field: "cell_xy",
                    detail: format!("axis {a}: {} must be a positive size", self.cell_xy[a]),
                });
            }
        }
        let (ny, nx) = self.grid();
        if ny == 0 || nx == 0 || ny > u32::MAX as usize || nx > u32::MAX as usize {
            return Err(VoxelizeError::Config {
                field: "cell_xy",
                detail: format!("grid {ny}x{nx} is empty or too large"),
            });
        }
        if self.max_points_per_pillar == 0 || self.max_pillars == 0 {
            return Err(VoxelizeError::Config {
                field: "max_points_per_pillar/max_pillars",
                detail: "caps must be at least 1".into(),
            });
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum VoxelizeError {
    #[error("pillar config field `{field}` is invalid: {detail}")]
    Config { field: &'static str, detail: String },
    #[error("points field `{field}` has {got} values for {expected} points")]
    PointsLength {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("pillar config asks for point time, but the points carry none")]
    MissingTime,
}

/// The pillars of one scan: the inputs of the pillar feature net and the scatter.
#[derive(Debug, Clone, PartialEq)]
pub struct Pillars {
    /// `[P, max_points_per_pillar, num_features]`, zero in padded slots.
    pub features: Tensor,
    /// Kept points per pillar (1..=max_points_per_pillar).
    pub counts: Vec<u32>,
    /// BEV cell of each pillar.
    pub cells: Vec<Cell>,
    /// `(ny, nx)` of the BEV grid.
    pub grid: (usize, usize),
    /// Points inside the range that were dropped by the caps.
    pub dropped_points: usize,
}

/// Groups `points` into pillars and computes the augmented point features.
pub fn voxelize(points: &Points, cfg: &PillarConfig) -> Result<Pillars, VoxelizeError> {
    cfg.validate()?;
    let n = points.len();
    for (field, len) in [
        ("y", points.y.len()),
        ("z", points.z.len()),
        ("intensity", points.intensity.len()),
    ] {
        if len != n {
            return Err(VoxelizeError::PointsLength {
                field,
                got: len,
                expected: n,
            });
        }
    }
    let time = if cfg.raw_features.contains(&RawFeature::Time) {
        let t = points.time.as_ref().ok_or(VoxelizeError::MissingTime)?;
        if t.len() != n {
            return Err(VoxelizeError::PointsLength {
                field: "time",
                got: t.len(),
                expected: n,
            });
        }
        Some(t.as_slice())
    } else {
        None
    };
    let (ny, nx) = cfg.grid();
    let cap = cfg.max_points_per_pillar;

    // Pass 1: assign points to pillars (cell -> pillar index through a dense grid map).
    let mut pillar_of_cell = vec![u32::MAX; ny * nx];
    let mut cells: Vec<Cell> = Vec::new();
    let mut members: Vec<u32> = Vec::new(); // point indices, `cap` slots per pillar
    let mut counts: Vec<u32> = Vec::new();
    let mut dropped = 0usize;
    for i in 0..n {
        let Some(cell) = cell_of(cfg, points.x[i], points.y[i], points.z[i], ny, nx) else {
            continue;
        };
        let k = cell.y as usize * nx + cell.x as usize;
        let mut pi = pillar_of_cell[k];
        if pi == u32::MAX {
            if cells.len() == cfg.max_pillars {
                dropped += 1;
                continue;
            }
            pi = cells.len() as u32;
            pillar_of_cell[k] = pi;
            cells.push(cell);
            counts.push(0);
            members.resize(members.len() + cap, 0);
        }
        let c = &mut counts[pi as usize];
        if (*c as usize) < cap {
            members[pi as usize * cap + *c as usize] = i as u32;
            *c += 1;
        } else {
            dropped += 1;
        }
    }

    // Pass 2: features.
    let nf = cfg.num_features();
    let mut features = Tensor::zeros(&[cells.len(), cap, nf]);
    let z_centre = (cfg.range_min[2] + cfg.range_max[2]) / 2.0;
    for (pi, (cell, &count)) in cells.iter().zip(&counts).enumerate() {
        let idx = &members[pi * cap..pi * cap + count as usize];
        let mut mean = [0.0f64; 3];
        for &i in idx {
            let p = points.xyz(i as usize);
            for a in 0..3 {
                mean[a] += p[a] as f64;
            }
        }
        let mean = mean.map(|s| (s / count as f64) as f32);
        let centre = [
            cell.x as f32 * cfg.cell_xy[0] + cfg.cell_xy[0] / 2.0 + cfg.range_min[0],
            cell.y as f32 * cfg.cell_xy[1] + cfg.cell_xy[1] / 2.0 + cfg.range_min[1],
            z_centre,
        ];
        for (slot, &i) in idx.iter().enumerate() {
            let i = i as usize;
            let p = points.xyz(i);
            let row = &mut features.data[(pi * cap + slot) * nf..(pi * cap + slot + 1) * nf];
            for (dst, f) in row.iter_mut().zip(&cfg.raw_features) {
                *dst = match f {
                    RawFeature::X => p[0],
                    RawFeature::Y => p[1],
                    RawFeature::Z => p[2],
                    RawFeature::Intensity => points.intensity[i],
                    RawFeature::Time => time.map_or(0.0, |t| t[i]),
                };
            }
            let r = cfg.raw_features.len();
            for a in 0..3 {
                row[r + a] = p[a] - mean[a];
            }
            let axes = match cfg.centre_offset {
                CentreOffset::Xyz => 3,
                CentreOffset::Xy => 2,
            };
            for a in 0..axes {
                row[r + 3 + a] = p[a] - centre[a];
            }
        }
    }
    if dropped > 0 {
        log::debug!("voxelize: {dropped} in-range points dropped by the pillar caps");
    }
    Ok(Pillars {
        features,
        counts,
        cells,
        grid: (ny, nx),
        dropped_points: dropped,
    })
}

/// The BEV cell of a point, or None outside the range (or non-finite).
fn cell_of(cfg: &PillarConfig, x: f32, y: f32, z: f32, ny: usize, nx: usize) -> Option<Cell> {
    if !(z >= cfg.range_min[2] && z < cfg.range_max[2]) {
        return None;
    }
    let fx = ((x - cfg.range_min[0]) / cfg.cell_xy[0]).floor();
    let fy = ((y - cfg.range_min[1]) / cfg.cell_xy[1]).floor();
    // The comparisons are false for NaN, so non-finite points fall out here.
    if !(fx >= 0.0 && fy >= 0.0 && fx < nx as f32 && fy < ny as f32) {
        return None;
    }
    Some(Cell {
        y: fy as u32,
        x: fx as u32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use std::collections::HashMap;

    fn small_cfg(max_points: usize, max_pillars: usize, offset: CentreOffset) -> PillarConfig {
        PillarConfig {
            range_min: [-2.0, -1.0, -1.0],
            range_max: [2.0, 1.5, 1.0],
            cell_xy: [0.5, 0.25],
            max_points_per_pillar: max_points,
            max_pillars,
            raw_features: vec![
                RawFeature::X,
                RawFeature::Y,
                RawFeature::Z,
                RawFeature::Intensity,
                RawFeature::Time,
            ],
            centre_offset: offset,
        }
    }

    fn random_points(r: &mut ChaCha8Rng, n: usize) -> Points {
        let mut p = Points::with_capacity(n);
        let mut t = Vec::with_capacity(n);
        for _ in 0..n {
            // Clustered so that pillars overflow, with some points outside the range.
            let x = r.random_range(-2.5f32..2.5);
            let y = r.random_range(-1.3f32..1.8);
            let z = r.random_range(-1.2f32..1.2);
            p.push(x, y, z, r.random_range(0.0f32..255.0));
            t.push(r.random_range(0.0f32..0.5));
        }
        p.time = Some(t);
        p
    }

    /// Independent reference: a hash map keyed by cell, features built in f64 per
    /// pillar from the list of its points.
    /// Per pillar, per kept point, the feature vector.
    type PillarFeatures = Vec<Vec<Vec<f64>>>;

    fn naive(points: &Points, cfg: &PillarConfig) -> (Vec<(u32, u32)>, PillarFeatures) {
        let (nx, ny) = (
            ((cfg.range_max[0] - cfg.range_min[0]) as f64 / cfg.cell_xy[0] as f64).round() as i64,
            ((cfg.range_max[1] - cfg.range_min[1]) as f64 / cfg.cell_xy[1] as f64).round() as i64,
        );
        let mut order: Vec<(u32, u32)> = vec![];
        let mut lists: HashMap<(u32, u32), Vec<usize>> = HashMap::new();
        for i in 0..points.len() {
            let [x, y, z] = points.xyz(i);
            if z < cfg.range_min[2] || z >= cfg.range_max[2] {
                continue;
            }
            let ix = ((x - cfg.range_min[0]) / cfg.cell_xy[0]).floor() as i64;
            let iy = ((y - cfg.range_min[1]) / cfg.cell_xy[1]).floor() as i64;
            if ix < 0 || iy < 0 || ix >= nx || iy >= ny {
                continue;
            }
            let key = (iy as u32, ix as u32);
            if !lists.contains_key(&key) {
                if order.len() == cfg.max_pillars {
                    continue;
                }
                order.push(key);
            }
            let l = lists.entry(key).or_default();
            if l.len() < cfg.max_points_per_pillar {
                l.push(i);
            }
        }
        let t = points.time.as_ref().unwrap();
        let feats = order
            .iter()
            .map(|key| {
                let l = &lists[key];
                let mean: Vec<f64> = (0..3)
                    .map(|a| {
                        l.iter().map(|&i| points.xyz(i)[a] as f64).sum::<f64>() / l.len() as f64
                    })
                    .collect();
                let centre = [
                    (key.1 as f64 + 0.5) * cfg.cell_xy[0] as f64 + cfg.range_min[0] as f64,
                    (key.0 as f64 + 0.5) * cfg.cell_xy[1] as f64 + cfg.range_min[1] as f64,
                    (cfg.range_min[2] as f64 + cfg.range_max[2] as f64) / 2.0,
                ];
                l.iter()
                    .map(|&i| {
                        let p = points.xyz(i).map(|v| v as f64);
                        let mut f = vec![p[0], p[1], p[2], points.intensity[i] as f64, t[i] as f64];
                        f.extend((0..3).map(|a| p[a] - mean[a]));
                        let axes = if cfg.centre_offset == CentreOffset::Xyz {
                            3
                        } else {
                            2
                        };
                        f.extend((0..axes).map(|a| p[a] - centre[a]));
                        f
                    })
                    .collect()
            })
            .collect();
        (order, feats)
    }

    #[test]
    fn matches_reference_including_overflow() {
        let mut r = ChaCha8Rng::seed_from_u64(101);
        for &(n, max_points, max_pillars, offset) in &[
            (500, 4, 1000, CentreOffset::Xyz),
            (800, 3, 17, CentreOffset::Xy),
            (50, 20, 1000, CentreOffset::Xyz),
        ] {
            let points = random_points(&mut r, n);
            let cfg = small_cfg(max_points, max_pillars, offset);
            let got = voxelize(&points, &cfg).unwrap();
            let (order, feats) = naive(&points, &cfg);
            assert_eq!(got.grid, (10, 8));
            let cells: Vec<(u32, u32)> = got.cells.iter().map(|c| (c.y, c.x)).collect();
            assert_eq!(cells, order);
            let nf = cfg.num_features();
            assert_eq!(got.features.shape, vec![order.len(), max_points, nf]);
            let kept: usize = feats.iter().map(|f| f.len()).sum();
            let in_range = points
                .x
                .iter()
                .zip(&points.y)
                .zip(&points.z)
                .filter(|((x, y), z)| cell_of(&cfg, **x, **y, **z, 10, 8).is_some())
                .count();
            assert_eq!(got.dropped_points, in_range - kept);
            for (pi, pf) in feats.iter().enumerate() {
                assert_eq!(got.counts[pi] as usize, pf.len());
                for slot in 0..max_points {
                    let row = &got.features.data
                        [(pi * max_points + slot) * nf..(pi * max_points + slot + 1) * nf];
                    match pf.get(slot) {
                        Some(want) => {
                            for (k, (&g, &w)) in row.iter().zip(want).enumerate() {
                                assert!(
                                    (g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                                    "pillar {pi} slot {slot} feature {k}: {g} vs {w}"
                                );
                            }
                        }
                        None => assert!(row.iter().all(|&v| v == 0.0), "padding must be zero"),
                    }
                }
            }
        }
        // The test data must actually overflow both caps.
        let points = random_points(&mut r, 800);
        let got = voxelize(&points, &small_cfg(3, 17, CentreOffset::Xy)).unwrap();
        assert_eq!(got.cells.len(), 17);
        assert!(got.counts.contains(&3) && got.dropped_points > 0);
    }

    #[test]
    fn is_deterministic_and_drops_non_finite_points() {
        let mut r = ChaCha8Rng::seed_from_u64(102);
        let mut points = random_points(&mut r, 300);
        points.x[0] = f32::NAN;
        points.y[1] = f32::INFINITY;
        let cfg = small_cfg(5, 40, CentreOffset::Xyz);
        let a = voxelize(&points, &cfg).unwrap();
        assert_eq!(a, voxelize(&points, &cfg).unwrap());
        assert!(a.features.data.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn nuscenes_preset_grid() {
        let cfg = PillarConfig::nuscenes();
        assert_eq!(cfg.grid(), (512, 512));
        assert_eq!(cfg.num_features(), 11);
    }

    #[test]
    fn rejects_bad_config_and_points() {
        let points = Points::default();
        let mut cfg = small_cfg(4, 10, CentreOffset::Xyz);
        cfg.cell_xy[1] = 0.0;
        assert!(matches!(
            voxelize(&points, &cfg),
            Err(VoxelizeError::Config {
                field: "cell_xy",
                ..
            })
        ));
        let mut cfg = small_cfg(4, 10, CentreOffset::Xyz);
        cfg.range_max[2] = -3.0;
        assert!(matches!(
            voxelize(&points, &cfg),
            Err(VoxelizeError::Config { field: "range", .. })
        ));
        let cfg = small_cfg(4, 10, CentreOffset::Xyz);
        let mut p = Points::default();
        p.push(0.0, 0.0, 0.0, 1.0);
        assert_eq!(voxelize(&p, &cfg), Err(VoxelizeError::MissingTime));
        p.time = Some(vec![0.0]);
        p.intensity.clear();
        assert!(matches!(
            voxelize(&p, &cfg),
            Err(VoxelizeError::PointsLength {
                field: "intensity",
                ..
            })
        ));
    }
}
