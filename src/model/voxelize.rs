//! Points to pillars, and the decorated point features the pillar feature net consumes.
//!
//! The rule is OpenPCDet's (DataProcessor + spconv's Point2Voxel), reproduced exactly so
//! that imported models see the inputs they were trained on: points in input order, cell
//! index `floor((p - min) / cell)` in f32, pillars numbered by first sight, a full pillar
//! list drops the points of new pillars but keeps filling existing ones, a full pillar
//! drops further points.

use super::config::{ModelConfig, PointFeature};
use crate::cloud::Points;
use rayon::prelude::*;

/// Whether training or deployment caps apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Test,
}

/// Pillars of one scan. Buffers are reused across scans by [`Voxelizer::voxelize`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Pillars {
    /// Point slots per pillar (N).
    pub max_points: usize,
    /// Raw point features per slot (F), in the config's `point_features` order.
    pub num_features: usize,
    /// `[P, N, F]`, unused slots zero.
    pub features: Vec<f32>,
    /// Points stored in each pillar.
    pub counts: Vec<u32>,
    /// Cell of each pillar as (z, y, x).
    pub coords: Vec<[u32; 3]>,
    /// Pillar of each input point, -1 when the point fell outside the range or grid, or
    /// when its pillar could not be created because the pillar cap was reached.
    pub point_pillar: Vec<i32>,
    /// Points whose new pillar was refused by the pillar cap (a diagnostics signal).
    pub capped_points: usize,
}

impl Pillars {
    pub fn len(&self) -> usize {
        self.counts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.counts.is_empty()
    }
}

/// A voxeliser for one model; keeps its grid index between scans (no per-scan allocation
/// once the buffers have grown).
pub struct Voxelizer {
    range: [f32; 6],
    cell: [f32; 3],
    grid: [usize; 3],
    max_points: usize,
    max_pillars: usize,
    features: Vec<PointFeature>,
    intensity_scale: f32,
    /// Pillar index per grid cell (-1 empty); reset through `touched`.
    index: Vec<i32>,
    touched: Vec<usize>,
    /// Each point's cell in the last scan (u32::MAX: outside).
    cells: Vec<u32>,
}

impl Voxelizer {
    pub fn new(cfg: &ModelConfig, mode: Mode) -> Self {
        let grid = cfg.grid_size();
        Self {
            range: cfg.input.point_range,
            cell: cfg.voxelization.cell_size,
            grid,
            max_points: cfg.voxelization.max_points_per_cell,
            max_pillars: match mode {
                Mode::Train => cfg.voxelization.max_cells.train,
                Mode::Test => cfg.voxelization.max_cells.test,
            },
            features: cfg.input.point_features.clone(),
            intensity_scale: cfg.input.intensity_scale,
            index: vec![-1; grid[0] * grid[1] * grid[2]],
            touched: Vec::new(),
            cells: Vec::new(),
        }
    }

    /// Overrides the pillar cap (e.g. to match a reference's setting).
    pub fn with_max_pillars(mut self, n: usize) -> Self {
        self.max_pillars = n;
        self
    }

    /// Voxelises `points` into `out`. `time_lag` gives each point's sweep age in seconds
    /// for multi-sweep input; a single sweep has lag 0.
    pub fn voxelize(&mut self, points: &Points, time_lag: Option<&[f32]>, out: &mut Pillars) {
        for &c in &self.touched {
            self.index[c] = -1;
        }
        self.touched.clear();
        let nf = self.features.len();
        let n = self.max_points;
        out.max_points = n;
        out.num_features = nf;
        out.features.clear();
        out.counts.clear();
        out.coords.clear();
        out.point_pillar.clear();
        out.point_pillar.resize(points.len(), -1);
        out.capped_points = 0;
        let [nx, ny, nz] = self.grid;
        let r = self.range;
        let c = self.cell;
        // Each point's cell, in parallel (pure arithmetic); the order-dependent pillar
        // assignment below stays sequential. Cell numbers fit u32: the grid index holds an
        // i32 per cell.
        self.cells.clear();
        self.cells.resize(points.len(), u32::MAX);
        self.cells
            .par_chunks_mut(4096)
            .enumerate()
            .for_each(|(chunk, cells)| {
                for (j, out_cell) in cells.iter_mut().enumerate() {
                    let i = chunk * 4096 + j;
                    let (x, y, z) = (points.x[i], points.y[i], points.z[i]);
                    // The reference masks x and y (inclusive) first; z only through the
                    // grid test.
                    if !(x >= r[0] && x <= r[3] && y >= r[1] && y <= r[4]) {
                        continue;
                    }
                    let cx = ((x - r[0]) / c[0]).floor();
                    let cy = ((y - r[1]) / c[1]).floor();
                    let cz = ((z - r[2]) / c[2]).floor();
                    if !(cx >= 0.0 && cy >= 0.0 && cz >= 0.0) {
                        continue;
                    }
                    let (cx, cy, cz) = (cx as usize, cy as usize, cz as usize);
                    if cx >= nx || cy >= ny || cz >= nz {
                        continue;
                    }
                    *out_cell = ((cz * ny + cy) * nx + cx) as u32;
                }
            });
        for i in 0..points.len() {
            let cell = self.cells[i];
            if cell == u32::MAX {
                continue;
            }
            let cell = cell as usize;
            let (x, y, z) = (points.x[i], points.y[i], points.z[i]);
            let mut p = self.index[cell];
            if p < 0 {
                if out.counts.len() == self.max_pillars {
                    // Not a break: later points may still land in existing pillars.
                    out.capped_points += 1;
                    continue;
                }
                p = out.counts.len() as i32;
                self.index[cell] = p;
                self.touched.push(cell);
                out.counts.push(0);
                let (cx, cy, cz) = (cell % nx, (cell / nx) % ny, cell / (nx * ny));
                out.coords.push([cz as u32, cy as u32, cx as u32]);
                out.features.resize(out.features.len() + n * nf, 0.0);
            }
            out.point_pillar[i] = p;
            let pu = p as usize;
            let k = out.counts[pu] as usize;
            if k == n {
                continue;
            }
            out.counts[pu] += 1;
            let slot = &mut out.features[(pu * n + k) * nf..(pu * n + k + 1) * nf];
            for (f, v) in self.features.iter().zip(slot.iter_mut()) {
                *v = match f {
                    PointFeature::X => x,
                    PointFeature::Y => y,
                    PointFeature::Z => z,
                    PointFeature::Intensity => points.intensity[i] * self.intensity_scale,
                    PointFeature::TimeLag => time_lag.map_or(0.0, |t| t[i]),
                };
            }
        }
    }
}

/// Decorates the pillar points into the PFN input `[P, N, width]`: the raw features
/// (without x, y, z unless `absolute_xyz`), then xyz minus the pillar mean, then
/// coordinates minus the pillar centre (x, y[, z]), then the distance if configured. The
/// mean divides the sum over all slots by the count, and padded slots are zeroed after
/// decoration, as the reference does. Returns the width.
pub fn decorate(cfg: &ModelConfig, pillars: &Pillars, out: &mut Vec<f32>) -> usize {
    let pf = cfg
        .pillar_features
        .as_ref()
        .expect("decorate needs a pillar model (validated config)");
    let width = cfg.pillar_input_width().expect("pillar model");
    let (n, nf) = (pillars.max_points, pillars.num_features);
    let r = &cfg.input.point_range;
    let cell = &cfg.voxelization.cell_size;
    // Centre offset constants in f32, computed as the reference does: mul then add.
    let off = [0, 1, 2].map(|a| cell[a] / 2.0 + r[a]);
    // Every element of `out` is written below (data or zero), so stale contents from the
    // previous scan never survive, and the pillars fill their rows in parallel.
    out.resize(pillars.len() * n * width, 0.0);
    let skip = if pf.absolute_xyz { 0 } else { 3 };
    let rows = out.par_chunks_mut((n * width).max(1));
    rows.zip(pillars.counts.par_iter().zip(&pillars.coords))
        .enumerate()
        .for_each(|(p, (dst_all, (&count, coord)))| {
            let pts = &pillars.features[p * n * nf..(p + 1) * n * nf];
            let mut mean = [0.0f32; 3];
            for s in 0..n {
                for a in 0..3 {
                    mean[a] += pts[s * nf + a];
                }
            }
            let c = count.max(1) as f32;
            mean = mean.map(|m| m / c);
            let center = [
                coord[2] as f32 * cell[0] + off[0],
                coord[1] as f32 * cell[1] + off[1],
                coord[0] as f32 * cell[2] + off[2],
            ];
            let used = (count as usize).min(n);
            dst_all[used * width..].fill(0.0);
            for s in 0..used {
                let src = &pts[s * nf..(s + 1) * nf];
                let dst = &mut dst_all[s * width..(s + 1) * width];
                dst.fill(0.0);
                let mut k = 0;
                for &v in &src[skip..] {
                    dst[k] = v;
                    k += 1;
                }
                if pf.cluster_offset {
                    for a in 0..3 {
                        dst[k] = src[a] - mean[a];
                        k += 1;
                    }
                }
                for a in 0..pf.center_offset_axes {
                    dst[k] = src[a] - center[a];
                    k += 1;
                }
                if pf.distance {
                    dst[k] = (src[0] * src[0] + src[1] * src[1] + src[2] * src[2]).sqrt();
                }
            }
        });
    width
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn data(p: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/data")
            .join(p)
    }

    /// The reference model's input setup: 0.4 m pillars over +-51.2 m, 20 points, 10k pillars,
    /// features x, y, z, intensity, time lag.
    fn reference_cfg() -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml");
        ModelConfig::load(&path).unwrap()
    }

    fn tensor<'a>(st: &'a safetensors::SafeTensors<'a>, name: &str) -> (Vec<usize>, Vec<u8>) {
        let t = st.tensor(name).unwrap();
        (t.shape().to_vec(), t.data().to_vec())
    }

    fn as_f32(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn as_i32(b: &[u8]) -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    /// Exactly OpenPCDet's voxels for the real nuScenes sweep.
    #[test]
    fn matches_openpcdet_on_nuscenes() {
        let cfg = reference_cfg();
        let pts = crate::dataset::nuscenes::read_sweep(&data(
            "nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin",
        ))
        .unwrap();
        let mut v = Voxelizer::new(&cfg, Mode::Test).with_max_pillars(10_000);
        let mut out = Pillars::default();
        v.voxelize(&pts, None, &mut out);
        let bytes = std::fs::read(data("openpcdet-centerpoint-pillar/voxels.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (shape, vox) = tensor(&st, "voxels");
        assert_eq!(shape, vec![4260, 20, 5]);
        assert_eq!(out.len(), 4260);
        assert_eq!(as_f32(&vox), out.features);
        let (_, num) = tensor(&st, "voxel_num_points");
        let num: Vec<u32> = as_i32(&num).into_iter().map(|v| v as u32).collect();
        assert_eq!(num, out.counts);
        let (_, coords) = tensor(&st, "voxel_coords");
        let coords = as_i32(&coords);
        for (p, c) in out.coords.iter().enumerate() {
            assert_eq!(
                &coords[p * 4 + 1..p * 4 + 4],
                &[c[0] as i32, c[1] as i32, c[2] as i32]
            );
        }
    }

    /// The KITTI scan hits the pillar cap and is sensitive to f32 vs f64 and to
    /// break-vs-continue at the cap: pillar list, counts and point assignment must all agree.
    #[test]
    fn matches_openpcdet_on_kitti_with_the_pillar_cap() {
        let cfg = reference_cfg();
        let pts = crate::dataset::kitti::read_velodyne(&data("kitti/training/velodyne/000001.bin"))
            .unwrap();
        let mut v = Voxelizer::new(&cfg, Mode::Test).with_max_pillars(10_000);
        let mut out = Pillars::default();
        v.voxelize(&pts, None, &mut out);
        let bytes = std::fs::read(data(
            "openpcdet-centerpoint-pillar/kitti_voxels.safetensors",
        ))
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let (_, num) = tensor(&st, "voxel_num_points");
        let num: Vec<u32> = as_i32(&num).into_iter().map(|v| v as u32).collect();
        assert_eq!(out.counts, num);
        let (_, coords) = tensor(&st, "voxel_coords");
        let coords = as_i32(&coords);
        for (p, c) in out.coords.iter().enumerate() {
            assert_eq!(
                &coords[p * 4 + 1..p * 4 + 4],
                &[c[0] as i32, c[1] as i32, c[2] as i32]
            );
        }
        let (_, ids) = tensor(&st, "points_voxel_id");
        assert_eq!(as_i32(&ids), out.point_pillar);
        assert_eq!(
            out.counts.iter().map(|&c| c as usize).sum::<usize>(),
            62_726
        );
        assert!(out.capped_points > 0);
        // Reusing the voxeliser for another scan gives the same result as a fresh one.
        let mut again = Pillars::default();
        v.voxelize(&pts, None, &mut again);
        assert_eq!(again, out);
    }

    /// Decoration against a direct transcription of the reference formulas.
    #[test]
    fn decoration_matches_the_formulas() {
        let cfg = reference_cfg();
        let mut pts = Points::default();
        // Three points in one pillar, one in another, one out of range.
        for (x, y, z, i) in [
            (1.21, 2.1, -1.0, 10.0),
            (1.35, 2.3, -0.5, 20.0),
            (1.3, 2.05, 0.2, 30.0),
            (-7.9, 3.3, 0.0, 5.0),
            (80.0, 0.0, 0.0, 1.0),
        ] {
            pts.push(x, y, z, i);
        }
        let mut v = Voxelizer::new(&cfg, Mode::Test);
        let mut pil = Pillars::default();
        v.voxelize(&pts, None, &mut pil);
        assert_eq!(pil.counts, vec![3, 1]);
        assert_eq!(pil.point_pillar, vec![0, 0, 0, 1, -1]);
        let mut dec = Vec::new();
        let w = decorate(&cfg, &pil, &mut dec);
        assert_eq!(w, 11);
        let n = 20;
        let mean = [
            (1.21 + 1.35 + 1.3) / 3.0,
            (2.1 + 2.3 + 2.05) / 3.0,
            (-1.0 - 0.5 + 0.2) / 3.0,
        ];
        // Pillar centre: cell index * 0.4 + (0.2 - 51.2); z: 0 * 8 + (4 - 5).
        let cx = ((1.21f64 + 51.2) / 0.4).floor() * 0.4 + 0.2 - 51.2;
        let cy = ((2.1f64 + 51.2) / 0.4).floor() * 0.4 + 0.2 - 51.2;
        let raw = [
            (1.21, 2.1, -1.0, 10.0),
            (1.35, 2.3, -0.5, 20.0),
            (1.3, 2.05, 0.2, 30.0),
        ];
        for (s, &(x, y, z, i)) in raw.iter().enumerate() {
            let want = [
                x,
                y,
                z,
                i,
                0.0,
                x - mean[0],
                y - mean[1],
                z - mean[2],
                x - cx,
                y - cy,
                z - (-1.0),
            ];
            let got = &dec[s * w..(s + 1) * w];
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (*g as f64 - w).abs() < 1e-5,
                    "slot {s}: {got:?} vs {want:?}"
                );
            }
        }
        assert!(
            dec[3 * w..n * w].iter().all(|&v| v == 0.0),
            "padded slots are zero"
        );
    }
}
