//! A training batch: the decorated pillars of B frames concatenated along the pillar axis,
//! with the per-frame pillar ranges and the head targets of every frame.

use super::TrainError;
use crate::boxes::Object;
use crate::cloud::Points;
use crate::model::ModelConfig;
use crate::model::config::Encoder;
use crate::model::targets::{TaskTargets, build_targets};
use crate::model::voxel_mean::VoxelMean;
use crate::model::voxelize::{Mode, Pillars, Voxelizer, decorate};
use crate::ops::{self, Tensor};
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct Batch {
    /// Point slots per pillar (N) and decorated features per slot (F).
    pub max_points: usize,
    pub width: usize,
    /// `[sum P, N, F]`.
    pub decorated: Vec<f32>,
    pub counts: Vec<u32>,
    /// (z, y, x) per pillar.
    pub coords: Vec<[u32; 3]>,
    /// Pillar index where each frame starts, plus the total at the end.
    pub starts: Vec<usize>,
    /// `targets[frame][task]`.
    pub targets: Vec<Vec<TaskTargets>>,
    /// Head map size (H, W) and regression channels.
    map: (usize, usize),
    reg_channels: usize,
    max_objects: usize,
}

impl Batch {
    /// Voxelises (training caps), decorates and builds the targets of each frame.
    pub fn from_frames(
        cfg: &ModelConfig,
        frames: &[(Points, Vec<Object>)],
    ) -> Result<Batch, TrainError> {
        if frames.is_empty() {
            return Err(TrainError::EmptyBatch("no frames".into()));
        }
        let [nx, ny, _] = cfg.grid_size();
        let stride = cfg.head_stride();
        let map = ((ny as f32 / stride) as usize, (nx as f32 / stride) as usize);
        if cfg.voxelization.encoder == Encoder::Voxel {
            return Self::from_voxel_frames(cfg, frames, map);
        }
        let width = cfg.pillar_input_width().ok_or_else(|| {
            TrainError::Model(format!("model {} has no pillar encoder", cfg.name))
        })?;
        let mut vox = Voxelizer::new(cfg, Mode::Train);
        let mut pillars = Pillars::default();
        let mut buf = Vec::new();
        let mut b = Batch {
            max_points: cfg.voxelization.max_points_per_cell,
            width,
            decorated: Vec::new(),
            counts: Vec::new(),
            coords: Vec::new(),
            starts: vec![0],
            targets: Vec::new(),
            map,
            reg_channels: cfg.regression_channels(),
            max_objects: cfg.target.max_objects,
        };
        for (points, objects) in frames {
            vox.voxelize(points, None, &mut pillars);
            decorate(cfg, &pillars, &mut buf);
            b.decorated.extend_from_slice(&buf);
            b.counts.extend_from_slice(&pillars.counts);
            b.coords.extend_from_slice(&pillars.coords);
            b.starts.push(b.counts.len());
            b.targets.push(build_targets(cfg, objects));
        }
        if b.counts.is_empty() {
            return Err(TrainError::EmptyBatch(
                "no point of the batch falls inside the model's range".into(),
            ));
        }
        Ok(b)
    }

    /// A voxel model's batch: one row of mean point features per voxel (training caps).
    fn from_voxel_frames(
        cfg: &ModelConfig,
        frames: &[(Points, Vec<Object>)],
        map: (usize, usize),
    ) -> Result<Batch, TrainError> {
        let mut vm = VoxelMean::from_config(cfg, Mode::Train)
            .map_err(|e| TrainError::Model(format!("model {}: {e}", cfg.name)))?;
        let mut b = Batch {
            max_points: 1,
            width: cfg.input.point_features.len(),
            decorated: Vec::new(),
            counts: Vec::new(),
            coords: Vec::new(),
            starts: vec![0],
            targets: Vec::new(),
            map,
            reg_channels: cfg.regression_channels(),
            max_objects: cfg.target.max_objects,
        };
        for (points, objects) in frames {
            let v = vm.voxelize(points, None).map_err(|source| TrainError::Op {
                node: "voxel_mean".into(),
                source,
            })?;
            b.decorated.extend_from_slice(&v.voxels.features.data);
            b.counts.extend_from_slice(&v.counts);
            b.coords.extend_from_slice(&v.voxels.coords);
            b.starts.push(b.counts.len());
            b.targets.push(build_targets(cfg, objects));
        }
        if b.counts.is_empty() {
            return Err(TrainError::EmptyBatch(
                "no point of the batch falls inside the model's range".into(),
            ));
        }
        Ok(b)
    }

    pub fn frames(&self) -> usize {
        self.starts.len() - 1
    }

    /// Pillars of frame `f` in the concatenated arrays.
    pub fn pillar_range(&self, f: usize) -> Range<usize> {
        self.starts[f]..self.starts[f + 1]
    }

    pub(crate) fn input_tensor(&self) -> ops::Result<Tensor> {
        Tensor::new(
            vec![self.counts.len(), self.max_points, self.width],
            self.decorated.clone(),
        )
    }

    /// The Gaussian heatmaps of task `t` stacked over the batch, `[B, classes, H, W]`.
    pub(crate) fn heatmap(&self, t: usize, shape: &[usize]) -> ops::Result<Tensor> {
        let mut data = Vec::with_capacity(shape.iter().product());
        for f in &self.targets {
            data.extend_from_slice(&f[t].heatmap);
        }
        Tensor::new(shape.to_vec(), data)
    }

    /// Centre cells, masks and regression targets `[B, M, D]` of task `t`.
    pub(crate) fn regression(&self, t: usize) -> ops::Result<(Vec<usize>, Vec<bool>, Tensor)> {
        let (mut ind, mut mask, mut reg) = (Vec::new(), Vec::new(), Vec::new());
        for f in &self.targets {
            ind.extend_from_slice(&f[t].ind);
            mask.extend_from_slice(&f[t].mask);
            reg.extend_from_slice(&f[t].reg);
        }
        let target = Tensor::new(
            vec![self.frames(), self.max_objects, self.reg_channels],
            reg,
        )?;
        Ok((ind, mask, target))
    }

    /// Head map size (H, W).
    pub fn map_size(&self) -> (usize, usize) {
        self.map
    }

    /// Labelled objects that got a target, over all tasks and frames.
    pub fn num_objects(&self) -> usize {
        self.targets
            .iter()
            .flatten()
            .map(|t| t.mask.iter().filter(|&&m| m).count())
            .sum()
    }
}
