//! The YAML model description: everything that defines a CenterPoint network, its input
//! encoding, training targets and post-processing. Presets live in `config/models/`.
//!
//! The description is declarative; `validate` checks it once so the rest of the code can
//! index with confidence. The voxel (sparse 3D) variant adds a `backbone_3d` section and a
//! `voxel` encoder; the 2D part, head, targets and decode are shared.

use serde::{Deserialize, Serialize};
use std::path::Path;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read model config {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("model config {path} is not valid YAML for a model description: {message}")]
    Parse { path: String, message: String },
    #[error("model config: {0}")]
    Invalid(String),
}

/// A point feature the network consumes, in the order listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointFeature {
    X,
    Y,
    Z,
    Intensity,
    /// Seconds between the point's sweep and the newest sweep (0 for a single sweep).
    TimeLag,
}

/// How raw points enter the network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputConfig {
    /// [x_min, y_min, z_min, x_max, y_max, z_max] in metres, lidar frame.
    pub point_range: [f32; 6],
    pub point_features: Vec<PointFeature>,
    /// Multiplier applied to decoded intensity before the network: the model must see the
    /// scale it was trained with (nuScenes raw 0..255, KITTI 0..1).
    #[serde(default = "one")]
    pub intensity_scale: f32,
}

fn one() -> f32 {
    1.0
}

/// Cell caps differ between training and deployment in the reference configs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainTest {
    pub train: usize,
    pub test: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoder {
    /// Vertical columns; points are kept for a pillar feature net.
    Pillar,
    /// 3D voxels; the mean of the points is the voxel feature.
    Voxel,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoxelizationConfig {
    pub encoder: Encoder,
    /// Cell size [x, y, z] in metres (for pillars z spans the whole range).
    pub cell_size: [f32; 3],
    pub max_points_per_cell: usize,
    pub max_cells: TrainTest,
}

/// Pillar feature net: point decoration and the PFN layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PillarFeatureConfig {
    /// Keep the raw absolute x, y, z among the decorated features.
    #[serde(default = "yes")]
    pub absolute_xyz: bool,
    /// Add x, y, z minus the mean of the pillar's points.
    #[serde(default = "yes")]
    pub cluster_offset: bool,
    /// Which axes get "coordinate minus pillar centre" features: 2 (x, y) or 3 (x, y, z).
    #[serde(default = "three")]
    pub center_offset_axes: usize,
    /// Add the point's distance from the sensor.
    #[serde(default)]
    pub distance: bool,
    /// Output width of each PFN layer; all but the last output half and concatenate the
    /// pillar max back onto each point.
    pub widths: Vec<usize>,
    #[serde(default = "eps_1e3")]
    pub bn_eps: f32,
    /// OpenPCDet takes the max over all slots, padded (zero-input) ones included.
    #[serde(default)]
    pub max_includes_padding: bool,
}

fn yes() -> bool {
    true
}
fn three() -> usize {
    3
}
fn eps_1e3() -> f32 {
    1e-3
}
fn eps_1e5() -> f32 {
    1e-5
}

/// One stride level of the 2D backbone: a strided 3x3 conv then `layers` 3x3 convs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Level {
    pub layers: usize,
    pub stride: usize,
    pub channels: usize,
}

/// Upsampling of one level to the common neck resolution. `stride` < 1 is a strided conv
/// (k = s = 1/stride), >= 1 a transposed conv (k = s = stride).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Upsample {
    pub stride: f32,
    pub channels: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backbone2dConfig {
    pub levels: Vec<Level>,
    pub upsample: Vec<Upsample>,
    #[serde(default = "eps_1e3")]
    pub bn_eps: f32,
}

/// Sparse 3D backbone of the voxel variant (VoxelResBackBone8x shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backbone3dConfig {
    /// Width of the submanifold stem.
    pub stem_channels: usize,
    /// Residual blocks per stage (stem stage first).
    pub blocks_per_stage: Vec<usize>,
    /// Channels of each stage after its stride-2 sparse conv (stem stage first).
    pub stage_channels: Vec<usize>,
    /// Channels of the final (3,1,1) stride-(2,1,1) conv before height compression.
    pub out_channels: usize,
    #[serde(default = "eps_1e3")]
    pub bn_eps: f32,
}

/// A separate sub-head: `num_conv - 1` (3x3 conv + BN + ReLU) then a 3x3 conv to `out`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubHead {
    pub name: String,
    pub out: usize,
    #[serde(default = "two")]
    pub num_conv: usize,
}

fn two() -> usize {
    2
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    pub shared_channels: usize,
    /// Class groups, each predicted by its own set of sub-heads.
    pub tasks: Vec<Vec<String>>,
    /// Regression sub-heads in target order (center, center_z, dim, rot[, vel]); the
    /// heatmap sub-head `hm` is added per task with one channel per class.
    pub sub_heads: Vec<SubHead>,
    #[serde(default = "two")]
    pub hm_num_conv: usize,
    /// Initial bias of the heatmap's last conv (focal-loss prior).
    #[serde(default = "hm_bias")]
    pub hm_init_bias: f32,
    #[serde(default = "eps_1e5")]
    pub bn_eps: f32,
    /// Bias on the convs followed by BatchNorm (the shared conv and the sub-heads' hidden
    /// convs), OpenPCDet's `USE_BIAS_BEFORE_NORM`. The last conv of a sub-head always has one.
    #[serde(default = "yes")]
    pub bias_before_norm: bool,
}

fn hm_bias() -> f32 {
    -2.19
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    #[serde(default = "overlap")]
    pub gaussian_overlap: f32,
    #[serde(default = "two")]
    pub min_radius: usize,
    #[serde(default = "max_objs")]
    pub max_objects: usize,
}

fn overlap() -> f32 {
    0.1
}
fn max_objs() -> usize {
    500
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    pub loc_weight: f32,
    /// One weight per regression channel, in target order.
    pub code_weights: Vec<f32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NmsKind {
    /// Rotated BEV IoU suppression.
    RotatedIou,
    /// Centre-distance suppression (cheap).
    Circle,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NmsConfig {
    pub kind: NmsKind,
    /// IoU threshold (rotated_iou) or radius in metres (circle).
    pub threshold: f32,
    pub pre_max: usize,
    pub post_max: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecodeConfig {
    pub score_threshold: f32,
    /// Detections with centres outside [x_min, y_min, z_min, x_max, y_max, z_max] are dropped.
    pub post_center_range: [f32; 6],
    pub top_k: usize,
    pub nms: NmsConfig,
    /// Keep only heatmap cells that are the maximum of their 3x3 neighbourhood before the
    /// top-K (CenterPoint's max-pool peak filter). OpenPCDet's CenterHead takes the plain
    /// top-K of the heatmap instead.
    #[serde(default = "yes")]
    pub local_max: bool,
}

/// A complete CenterPoint description.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub name: String,
    pub input: InputConfig,
    pub voxelization: VoxelizationConfig,
    /// Present for the pillar encoder.
    #[serde(default)]
    pub pillar_features: Option<PillarFeatureConfig>,
    /// Present for the voxel encoder.
    #[serde(default)]
    pub backbone_3d: Option<Backbone3dConfig>,
    pub backbone_2d: Backbone2dConfig,
    pub head: HeadConfig,
    pub target: TargetConfig,
    pub loss: LossConfig,
    pub decode: DecodeConfig,
}

impl ModelConfig {
    /// Reads and validates a YAML model description.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.display().to_string(),
                message,
            },
            other => other,
        })
    }

    /// Parses and validates a YAML model description.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let cfg: ModelConfig = serde_saphyr::from_str(text).map_err(|e| ConfigError::Parse {
            path: "<string>".into(),
            message: e.to_string(),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// The description as YAML; `from_yaml(to_yaml())` gives the same config back. This is
    /// what a weights file embeds so that it carries its own model description.
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).expect("a model config serialises")
    }

    /// All class names, task by task.
    pub fn classes(&self) -> Vec<&str> {
        self.head
            .tasks
            .iter()
            .flatten()
            .map(String::as_str)
            .collect()
    }

    /// BEV grid size (nx, ny, nz) of the voxelisation.
    pub fn grid_size(&self) -> [usize; 3] {
        let r = &self.input.point_range;
        let c = &self.voxelization.cell_size;
        [0, 1, 2].map(|i| ((r[i + 3] - r[i]) / c[i]).round() as usize)
    }

    /// Total stride from the voxel grid to the head's map: the sparse backbone's stride
    /// (voxel variant: 2 per stage after the stem) times the 2D part's output stride.
    pub fn head_stride(&self) -> f32 {
        let encoder = match &self.backbone_3d {
            Some(b) => (1usize << (b.stage_channels.len() - 1)) as f32,
            None => 1.0,
        };
        encoder * self.backbone_2d.levels[0].stride as f32 / self.backbone_2d.upsample[0].stride
    }

    /// Number of regression channels (sum of the sub-heads' outputs).
    pub fn regression_channels(&self) -> usize {
        self.head.sub_heads.iter().map(|h| h.out).sum()
    }

    /// Whether the head predicts velocity.
    pub fn has_velocity(&self) -> bool {
        self.head.sub_heads.iter().any(|h| h.name == "vel")
    }

    /// Width of the decorated point feature vector the first PFN layer sees.
    pub fn pillar_input_width(&self) -> Option<usize> {
        let p = self.pillar_features.as_ref()?;
        let raw = self.input.point_features.len() - if p.absolute_xyz { 0 } else { 3 };
        Some(
            raw + if p.cluster_offset { 3 } else { 0 }
                + p.center_offset_axes
                + usize::from(p.distance),
        )
    }

    /// Checks internal consistency; every error names the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let r = &self.input.point_range;
        if (0..3).any(|i| r[i] >= r[i + 3] || !r[i].is_finite() || !r[i + 3].is_finite()) {
            return bad(format!(
                "input.point_range {r:?} must have min < max on every axis"
            ));
        }
        let f = &self.input.point_features;
        if f.len() < 3 || f[..3] != [PointFeature::X, PointFeature::Y, PointFeature::Z] {
            return bad("input.point_features must start with x, y, z".into());
        }
        let v = &self.voxelization;
        if v.cell_size.iter().any(|&c| c <= 0.0 || !c.is_finite()) {
            return bad(format!(
                "voxelization.cell_size {:?} must be positive",
                v.cell_size
            ));
        }
        for i in 0..3 {
            let n = (r[i + 3] - r[i]) / v.cell_size[i];
            if (n - n.round()).abs() > 1e-3 || n.round() < 1.0 {
                return bad(format!(
                    "voxelization.cell_size[{i}] = {} does not divide the point range {}..{} into whole cells",
                    v.cell_size[i],
                    r[i],
                    r[i + 3]
                ));
            }
        }
        if v.max_points_per_cell == 0 || v.max_cells.train == 0 || v.max_cells.test == 0 {
            return bad("voxelization caps (max_points_per_cell, max_cells) must be > 0".into());
        }
        match (v.encoder, &self.pillar_features, &self.backbone_3d) {
            (Encoder::Pillar, Some(p), None) => {
                if p.widths.is_empty() || p.widths.contains(&0) {
                    return bad("pillar_features.widths must be non-empty and positive".into());
                }
                if p.widths[..p.widths.len() - 1].iter().any(|w| w % 2 != 0) {
                    return bad("pillar_features.widths: all but the last must be even (half is concatenated with the max)".into());
                }
                if !(2..=3).contains(&p.center_offset_axes) {
                    return bad("pillar_features.center_offset_axes must be 2 or 3".into());
                }
            }
            (Encoder::Voxel, None, Some(b)) => {
                if b.blocks_per_stage.len() != b.stage_channels.len() || b.stage_channels.is_empty()
                {
                    return bad("backbone_3d.blocks_per_stage and stage_channels must have the same, non-zero length".into());
                }
            }
            (Encoder::Pillar, _, _) => {
                return bad(
                    "the pillar encoder needs a pillar_features section and no backbone_3d".into(),
                );
            }
            (Encoder::Voxel, _, _) => {
                return bad(
                    "the voxel encoder needs a backbone_3d section and no pillar_features".into(),
                );
            }
        }
        let b = &self.backbone_2d;
        if b.levels.is_empty() || b.levels.len() != b.upsample.len() {
            return bad(format!(
                "backbone_2d: {} levels but {} upsample entries; each level needs one",
                b.levels.len(),
                b.upsample.len()
            ));
        }
        if b.levels.iter().any(|l| l.stride == 0 || l.channels == 0) {
            return bad("backbone_2d.levels: stride and channels must be > 0".into());
        }
        // Every level must land on the same resolution after upsampling.
        let mut total = 1usize;
        let mut out_stride = None;
        for (i, (l, u)) in b.levels.iter().zip(&b.upsample).enumerate() {
            total *= l.stride;
            if u.stride <= 0.0 || !u.stride.is_finite() || u.channels == 0 {
                return bad(format!(
                    "backbone_2d.upsample[{i}]: stride and channels must be > 0"
                ));
            }
            let s = total as f32 / u.stride;
            let inv = 1.0 / u.stride;
            let whole = if u.stride < 1.0 { inv } else { u.stride };
            if (whole - whole.round()).abs() > 1e-4 {
                return bad(format!(
                    "backbone_2d.upsample[{i}].stride {} must be an integer or 1/integer",
                    u.stride
                ));
            }
            match out_stride {
                None => out_stride = Some(s),
                Some(o) if (o - s).abs() > 1e-4 => {
                    return bad(format!(
                        "backbone_2d.upsample[{i}] brings level {i} to stride {s}, level 0 to {o}: they must agree"
                    ));
                }
                _ => {}
            }
        }
        let h = &self.head;
        if h.tasks.is_empty() || h.tasks.iter().any(|t| t.is_empty()) {
            return bad("head.tasks must list at least one non-empty class group".into());
        }
        let classes = self.classes();
        for (i, c) in classes.iter().enumerate() {
            if classes[..i].contains(c) {
                return bad(format!("head.tasks: class {c} appears twice"));
            }
        }
        let names: Vec<&str> = h.sub_heads.iter().map(|s| s.name.as_str()).collect();
        for required in ["center", "center_z", "dim", "rot"] {
            if !names.contains(&required) {
                return bad(format!("head.sub_heads lacks `{required}`"));
            }
        }
        if let Some(s) = h.sub_heads.iter().find(|s| s.num_conv == 0 || s.out == 0) {
            return bad(format!(
                "head.sub_heads.{}: out and num_conv must be > 0",
                s.name
            ));
        }
        if self.loss.code_weights.len() != self.regression_channels() {
            return bad(format!(
                "loss.code_weights has {} entries but the sub-heads output {} regression channels",
                self.loss.code_weights.len(),
                self.regression_channels()
            ));
        }
        let d = &self.decode;
        if !(0.0..1.0).contains(&d.score_threshold) || d.top_k == 0 || d.nms.post_max == 0 {
            return bad("decode: score_threshold in [0, 1), top_k and nms.post_max > 0".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn preset(name: &str) -> ModelConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("config/models")
            .join(name);
        ModelConfig::load(&path).unwrap_or_else(|e| panic!("{name}: {e}"))
    }

    #[test]
    fn presets_load_and_have_the_reference_shapes() {
        let nus = preset("nuscenes_pillar.yaml");
        assert_eq!(nus.grid_size(), [512, 512, 1]);
        assert_eq!(nus.head_stride(), 4.0);
        assert_eq!(nus.classes().len(), 10);
        assert_eq!(nus.pillar_input_width(), Some(11));
        assert_eq!(nus.regression_channels(), 10);
        let aw = preset("autoware_pillar.yaml");
        assert_eq!(aw.grid_size(), [480, 480, 1]);
        assert_eq!(aw.pillar_input_width(), Some(9));
        assert!(aw.has_velocity());
        assert_eq!(aw.head_stride(), 2.0);
        let def = preset("default.yaml");
        def.validate().unwrap();
    }

    #[test]
    fn inconsistent_configs_are_refused_with_the_key_named() {
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/nuscenes_pillar.yaml"),
        )
        .unwrap();
        let broken = text.replace(
            "code_weights: [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.2, 0.2, 1.0, 1.0]",
            "code_weights: [1.0]",
        );
        assert_ne!(broken, text);
        let e = ModelConfig::from_yaml(&broken).unwrap_err().to_string();
        assert!(e.contains("code_weights"), "{e}");
        let broken = text.replace("cell_size: [0.2, 0.2, 8.0]", "cell_size: [0.3, 0.2, 8.0]");
        let e = ModelConfig::from_yaml(&broken).unwrap_err().to_string();
        assert!(e.contains("cell_size[0]"), "{e}");
        let broken = text.replace("name: nuscenes_pillar", "name: x\nunknown_key: 3");
        let e = ModelConfig::from_yaml(&broken).unwrap_err().to_string();
        assert!(e.contains("unknown_key"), "{e}");
    }
}
