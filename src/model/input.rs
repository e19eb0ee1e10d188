//! One scan's network input, for either encoder: decorated pillars, or the mean voxels of a
//! voxel model. Owns its buffers, so reusing it across scans does not reallocate the
//! voxelisers' tables. The detector and the benchmarks prepare their input through it.

use super::ModelConfig;
use super::config::Encoder;
use super::voxel_mean::VoxelMean;
use super::voxelize::{Mode, Pillars, Voxelizer, decorate};
use crate::cloud::Points;
use crate::engine::NetInput;
use crate::ops;

/// The voxeliser of the model's encoder and the last scan's input.
pub struct ScanInput {
    cfg: ModelConfig,
    pillar: Option<Voxelizer>,
    mean: Option<VoxelMean>,
    pillars: Pillars,
    decorated: Vec<f32>,
    width: usize,
    counts: Vec<u32>,
    coords: Vec<[u32; 3]>,
}

impl ScanInput {
    pub fn new(cfg: &ModelConfig, mode: Mode) -> ops::Result<Self> {
        let (pillar, mean) = match cfg.voxelization.encoder {
            Encoder::Pillar => (Some(Voxelizer::new(cfg, mode)), None),
            Encoder::Voxel => (None, Some(VoxelMean::from_config(cfg, mode)?)),
        };
        Ok(Self {
            cfg: cfg.clone(),
            pillar,
            mean,
            pillars: Pillars::default(),
            decorated: Vec::new(),
            width: 0,
            counts: Vec::new(),
            coords: Vec::new(),
        })
    }

    /// Voxelises (and, for pillars, decorates) one scan; [`input`](Self::input) then
    /// borrows the result.
    pub fn prepare(&mut self, points: &Points) -> ops::Result<()> {
        if let Some(m) = &mut self.mean {
            let v = m.voxelize(points, None)?;
            self.width = v.voxels.channels();
            self.decorated = v.voxels.features.data;
            self.counts = v.counts;
            self.coords = v.voxels.coords;
        } else if let Some(vz) = &mut self.pillar {
            vz.voxelize(points, None, &mut self.pillars);
            self.width = decorate(&self.cfg, &self.pillars, &mut self.decorated);
        }
        Ok(())
    }

    /// The network input of the last prepared scan.
    pub fn input(&self) -> NetInput<'_> {
        if self.mean.is_some() {
            NetInput {
                decorated: &self.decorated,
                max_points: 1,
                width: self.width,
                counts: &self.counts,
                coords: &self.coords,
            }
        } else {
            NetInput {
                decorated: &self.decorated,
                max_points: self.pillars.max_points,
                width: self.width,
                counts: &self.pillars.counts,
                coords: &self.pillars.coords,
            }
        }
    }

    /// Pillars of the last scan (empty for a voxel model).
    pub fn pillars(&self) -> &Pillars {
        &self.pillars
    }

    /// Pillars or voxels of the last scan.
    pub fn cells(&self) -> usize {
        if self.mean.is_some() {
            self.coords.len()
        } else {
            self.pillars.len()
        }
    }

    /// Active voxels of the last scan of a voxel model (0 for pillar models).
    pub fn voxels(&self) -> usize {
        if self.mean.is_some() {
            self.coords.len()
        } else {
            0
        }
    }

    /// Cell coordinates (z, y, x) of the last scan.
    pub fn coords(&self) -> &[[u32; 3]] {
        if self.mean.is_some() {
            &self.coords
        } else {
            &self.pillars.coords
        }
    }
}
