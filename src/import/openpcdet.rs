//! OpenPCDet CenterPoint-Pillar checkpoints to our model description and weights.
//!
//! The config side reads OpenPCDet's model YAML (with `_BASE_CONFIG_` resolved and merged
//! as OpenPCDet's `cfg_from_yaml_file` does) and maps DATA_CONFIG and MODEL onto a
//! [`ModelConfig`]. Every key of the network modules is either mapped, known to be
//! irrelevant at inference, or refused by name: a setting we silently ignored would give
//! a model that loads and computes something else.
//!
//! Conventions carried over (see docs/openpcdet.md for the table):
//! * points: `used_feature_list` x, y, z[, intensity][, timestamp] -> our point features;
//! * voxeliser: DataProcessor's xy range mask then spconv's first-seen pillar order in
//!   f32, `continue` at the pillar cap (our `Voxelizer` already follows this rule);
//! * PillarVFE: [raw features (xyz only with USE_ABSLOTE_XYZ), xyz - pillar mean over all
//!   slots, xyz - pillar centre, distance (WITH_DISTANCE)], Linear without bias, BN eps
//!   1e-3, max over all slots including padded ones;
//! * PointPillarScatter: row = y, column = x, one z level;
//! * BaseBEVBackbone: ZeroPad(1) + conv pad 0 == conv pad 1; BN eps 1e-3; an up-stride
//!   below 1 is a strided Conv2d (k = s = 1/stride), otherwise a ConvTranspose2d;
//! * CenterHead: shared conv and hidden convs with bias iff USE_BIAS_BEFORE_NORM, BN eps
//!   BN_EPS (1e-5); sub-heads center, center_z, dim (log), rot (cos, sin), vel, then hm;
//!   decoding is plain top-K of the heatmap (no 3x3 peak filter) and rotated-BEV NMS.
//!
//! State-dict keys already are our parameter names (the graph uses OpenPCDet's naming);
//! `global_step` and `num_batches_tracked` carry nothing for inference and are dropped.

use super::pickle::{Id, Value};
use super::torch_file::{Checkpoint, TorchFileError};
use crate::model::config::{
    Backbone2dConfig, DecodeConfig, Encoder, HeadConfig, InputConfig, Level, LossConfig, NmsConfig,
    NmsKind, PillarFeatureConfig, PointFeature, SubHead, TargetConfig, TrainTest, Upsample,
    VoxelizationConfig,
};
use crate::model::graph::Graph;
use crate::model::weights::Weights;
use crate::model::{ConfigError, ModelConfig};
use crate::ops::Tensor;
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Sub-heads our decoder understands, in its channel order, with their widths.
const SUB_HEADS: [(&str, usize); 5] = [
    ("center", 2),
    ("center_z", 1),
    ("dim", 3),
    ("rot", 2),
    ("vel", 2),
];

/// How deep `_BASE_CONFIG_` references may nest (a guard against cycles).
const MAX_BASE_DEPTH: usize = 8;

#[derive(Debug, Error)]
pub enum ImportError {
    #[error(transparent)]
    Torch(#[from] TorchFileError),
    #[error("cannot read OpenPCDet config {path}: {source}")]
    ConfigIo {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("OpenPCDet config {path} is not valid YAML: {message}")]
    Yaml { path: PathBuf, message: String },
    #[error("OpenPCDet config {path}: {key}: {message}")]
    Config {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("the model description made from {path} is invalid: {source}")]
    Model { path: PathBuf, source: ConfigError },
    #[error("checkpoint {path}: {message}")]
    StateDict { path: PathBuf, message: String },
}

/// An imported model: our description, its weights, provenance and remarks.
#[derive(Debug, Clone)]
pub struct Imported {
    pub config: ModelConfig,
    pub weights: Weights,
    /// Provenance for the model file's metadata (`source`, checkpoint digest, ...).
    pub metadata: BTreeMap<String, String>,
    /// Differences from running the model inside OpenPCDet that the user should know.
    pub notes: Vec<String>,
}

/// Imports an OpenPCDet CenterPoint checkpoint (legacy or zip container) with its model
/// config YAML.
pub fn import(checkpoint: &Path, config: &Path) -> Result<Imported, ImportError> {
    let (cfg, mut notes) = model_config(config)?;
    let bytes = std::fs::read(checkpoint).map_err(|source| TorchFileError::Io {
        path: checkpoint.to_path_buf(),
        source,
    })?;
    let ckpt = Checkpoint::from_bytes(&bytes, checkpoint)?;
    let weights = state_dict_weights(&ckpt, &cfg)?;
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let mut metadata = BTreeMap::from([
        ("source".to_string(), "openpcdet".to_string()),
        ("openpcdet_checkpoint".to_string(), file_name(checkpoint)),
        (
            "openpcdet_checkpoint_sha256".to_string(),
            Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
        ),
        ("openpcdet_config".to_string(), file_name(config)),
        (
            "openpcdet_container".to_string(),
            format!("{:?}", ckpt.container).to_lowercase(),
        ),
    ]);
    let p = &ckpt.pickle;
    for key in ["version", "epoch", "it"] {
        if let Some(id) = p.dict_get(p.root, key) {
            let v = match p.get(id) {
                Value::Str(s) => s.clone(),
                Value::Int(i) => i.to_string(),
                _ => continue,
            };
            metadata.insert(format!("openpcdet_{key}"), v);
        }
    }
    if cfg.input.point_features.contains(&PointFeature::Intensity) {
        notes.push(
            "intensity enters the network unscaled: feed the scale the model was trained on \
             (nuScenes 0..255, KITTI 0..1; the node's intensity_scale converts)"
                .into(),
        );
    }
    Ok(Imported {
        config: cfg,
        weights,
        metadata,
        notes,
    })
}

/// Reads an OpenPCDet model YAML and maps it onto our description; also returns remarks
/// about behaviour that differs from OpenPCDet's test-time pipeline.
pub fn model_config(path: &Path) -> Result<(ModelConfig, Vec<String>), ImportError> {
    let root = load_merged(path)?;
    let name = format!(
        "openpcdet_{}",
        path.file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into())
    );
    let at = Keyed {
        v: &root,
        key: String::new(),
        path,
    };
    let mut notes = Vec::new();
    let cfg = map_config(&at, name, &mut notes)?;
    cfg.validate().map_err(|source| ImportError::Model {
        path: path.to_path_buf(),
        source,
    })?;
    Ok((cfg, notes))
}

/// The state dict of a checkpoint as weights of `cfg`'s graph.
pub fn state_dict_weights(ckpt: &Checkpoint, cfg: &ModelConfig) -> Result<Weights, ImportError> {
    let p = &ckpt.pickle;
    let err = |message: String| ImportError::StateDict {
        path: ckpt.path.clone(),
        message,
    };
    let dict: Id = ["model_state", "state_dict"]
        .iter()
        .find_map(|k| p.dict_get(p.root, k))
        .unwrap_or(p.root);
    let Value::Dict(items) = p.get(dict) else {
        return Err(err(format!(
            "no state dict: the checkpoint holds a {} without `model_state`",
            p.describe(p.root)
        )));
    };
    let mut entries: Vec<(String, Id)> = Vec::with_capacity(items.len());
    for &(k, v) in items {
        let key = p
            .str(k)
            .ok_or_else(|| err(format!("state-dict key {} is not a string", p.describe(k))))?;
        entries.push((key.to_string(), v));
    }
    // DataParallel wraps every name in `module.`.
    if !entries.is_empty() && entries.iter().all(|(k, _)| k.starts_with("module.")) {
        for (k, _) in &mut entries {
            k.drain(.."module.".len());
        }
    }
    let graph = Graph::build(cfg).map_err(|m| err(format!("model {}: {m}", cfg.name)))?;
    let specs = graph.params();
    let wanted: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut tensors = BTreeMap::new();
    let mut unexpected = Vec::new();
    for (key, id) in &entries {
        if key == "global_step" || key.ends_with(".num_batches_tracked") {
            continue;
        }
        if !wanted.contains(key.as_str()) {
            unexpected.push(key.clone());
            continue;
        }
        let Value::Tensor(t) = p.get(*id) else {
            return Err(err(format!(
                "state-dict entry {key} is a {}, not a tensor",
                p.describe(*id)
            )));
        };
        let data = ckpt.tensor_f32(key, t)?;
        if let Some(i) = data.iter().position(|v| !v.is_finite()) {
            return Err(err(format!("tensor {key} holds a non-finite value at {i}")));
        }
        let tensor = Tensor::new(t.shape.clone(), data).map_err(|e| err(format!("{key}: {e}")))?;
        tensors.insert(key.clone(), tensor);
    }
    let list = |names: &[String]| {
        let shown: Vec<&str> = names.iter().take(6).map(String::as_str).collect();
        let more = names.len().saturating_sub(shown.len());
        format!(
            "{}{}",
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        )
    };
    if !unexpected.is_empty() {
        let modules: BTreeSet<&str> = unexpected
            .iter()
            .map(|k| k.split('.').next().unwrap_or(k))
            .collect();
        return Err(err(format!(
            "holds parameters the config does not describe (modules {}): {}; is {} the config \
             this checkpoint was trained with?",
            modules.into_iter().collect::<Vec<_>>().join(", "),
            list(&unexpected),
            cfg.name
        )));
    }
    let missing: Vec<String> = specs
        .iter()
        .filter(|s| !tensors.contains_key(&s.name))
        .map(|s| s.name.clone())
        .collect();
    if !missing.is_empty() {
        return Err(err(format!(
            "lacks parameters the config needs: {}",
            list(&missing)
        )));
    }
    let weights = Weights { tensors };
    weights
        .validate(&graph)
        .map_err(|e| err(format!("does not fit the config: {e}")))?;
    Ok(weights)
}

/// A position in the merged YAML, for typed access with errors naming the key path.
struct Keyed<'a> {
    v: &'a Json,
    key: String,
    path: &'a Path,
}

impl<'a> Keyed<'a> {
    fn child_key(&self, k: &str) -> String {
        if self.key.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.key)
        }
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, ImportError> {
        Err(ImportError::Config {
            path: self.path.to_path_buf(),
            key: if self.key.is_empty() {
                "(top level)".into()
            } else {
                self.key.clone()
            },
            message: message.into(),
        })
    }

    fn opt(&self, k: &str) -> Option<Keyed<'a>> {
        self.v
            .as_object()
            .and_then(|m| m.get(k))
            .filter(|v| !v.is_null())
            .map(|v| Keyed {
                v,
                key: self.child_key(k),
                path: self.path,
            })
    }

    fn get(&self, k: &str) -> Result<Keyed<'a>, ImportError> {
        match self.opt(k) {
            Some(c) => Ok(c),
            None => Keyed {
                v: self.v,
                key: self.child_key(k),
                path: self.path,
            }
            .err("missing"),
        }
    }

    /// Refuses keys outside `known` (mapped or irrelevant at inference), naming them.
    fn only(&self, known: &[&str]) -> Result<(), ImportError> {
        let Some(m) = self.v.as_object() else {
            return self.err("must be a mapping");
        };
        let unknown: Vec<&str> = m
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect();
        if unknown.is_empty() {
            Ok(())
        } else {
            self.err(format!(
                "unsupported setting(s) {}: the importer does not know how they change the \
                 network (known: {})",
                unknown.join(", "),
                known.join(", ")
            ))
        }
    }

    fn f32(&self) -> Result<f32, ImportError> {
        match self.v.as_f64() {
            Some(x) if x.is_finite() => Ok(x as f32),
            _ => self.err(format!("expected a number, found {}", self.v)),
        }
    }

    fn usize(&self) -> Result<usize, ImportError> {
        match self.v.as_u64() {
            Some(x) => Ok(x as usize),
            None => self.err(format!("expected a non-negative integer, found {}", self.v)),
        }
    }

    fn bool(&self) -> Result<bool, ImportError> {
        match self.v {
            Json::Bool(b) => Ok(*b),
            Json::String(s) if s == "True" || s == "true" => Ok(true),
            Json::String(s) if s == "False" || s == "false" => Ok(false),
            _ => self.err(format!("expected True or False, found {}", self.v)),
        }
    }

    fn str(&self) -> Result<&'a str, ImportError> {
        match self.v.as_str() {
            Some(s) => Ok(s),
            None => self.err(format!("expected a string, found {}", self.v)),
        }
    }

    fn list(&self) -> Result<Vec<Keyed<'a>>, ImportError> {
        match self.v.as_array() {
            Some(a) => Ok(a
                .iter()
                .enumerate()
                .map(|(i, v)| Keyed {
                    v,
                    key: format!("{}[{i}]", self.key),
                    path: self.path,
                })
                .collect()),
            None => self.err(format!("expected a list, found {}", self.v)),
        }
    }

    fn f32s(&self) -> Result<Vec<f32>, ImportError> {
        self.list()?.iter().map(Keyed::f32).collect()
    }

    fn usizes(&self) -> Result<Vec<usize>, ImportError> {
        self.list()?.iter().map(Keyed::usize).collect()
    }

    fn strs(&self) -> Result<Vec<String>, ImportError> {
        self.list()?
            .iter()
            .map(|k| k.str().map(str::to_string))
            .collect()
    }

    /// An OpenPCDet module section: its NAME must be `want`.
    fn module(&self, want: &[&str]) -> Result<&'a str, ImportError> {
        let name = self.get("NAME")?.str()?;
        if want.contains(&name) {
            Ok(name)
        } else {
            self.err(format!(
                "module `{name}` is not supported (supported: {})",
                want.join(", ")
            ))
        }
    }
}

/// A value given per mode (`{train: a, test: b}`) or once for both.
fn train_test(k: &Keyed<'_>) -> Result<TrainTest, ImportError> {
    if k.v.is_object() {
        Ok(TrainTest {
            train: k.get("train")?.usize()?,
            test: k.get("test")?.usize()?,
        })
    } else {
        let n = k.usize()?;
        Ok(TrainTest { train: n, test: n })
    }
}

fn map_config(
    root: &Keyed<'_>,
    name: String,
    notes: &mut Vec<String>,
) -> Result<ModelConfig, ImportError> {
    let data = root.get("DATA_CONFIG")?;
    let model = root.get("MODEL")?;
    model.only(&[
        "NAME",
        "VFE",
        "MAP_TO_BEV",
        "BACKBONE_2D",
        "DENSE_HEAD",
        "POST_PROCESSING",
        "BACKBONE_3D",
    ])?;
    model.module(&["CenterPoint"])?;
    if let Some(b3) = model.opt("BACKBONE_3D") {
        let n = b3
            .opt("NAME")
            .and_then(|n| n.v.as_str().map(str::to_string));
        return b3.err(format!(
            "module `{}` is not supported: the voxel (sparse 3D backbone) CenterPoint is not \
             implemented yet; only the pillar model (PillarVFE + PointPillarScatter) imports",
            n.unwrap_or_default()
        ));
    }

    // Input and voxelisation.
    let range = data.get("POINT_CLOUD_RANGE")?;
    let r = range.f32s()?;
    let point_range: [f32; 6] = r
        .try_into()
        .or_else(|_| range.err("expected 6 numbers [x_min, y_min, z_min, x_max, y_max, z_max]"))?;
    let enc = data.get("POINT_FEATURE_ENCODING")?;
    let et = enc.get("encoding_type")?;
    if et.str()? != "absolute_coordinates_encoding" {
        return et.err(format!("`{}` is not supported", et.str()?));
    }
    let used = enc.get("used_feature_list")?;
    let mut point_features = Vec::new();
    for f in used.list()? {
        point_features.push(match f.str()? {
            "x" => PointFeature::X,
            "y" => PointFeature::Y,
            "z" => PointFeature::Z,
            "intensity" => PointFeature::Intensity,
            "timestamp" => PointFeature::TimeLag,
            other => {
                return f.err(format!(
                    "point feature `{other}` is not supported (x, y, z, intensity, timestamp)"
                ));
            }
        });
    }
    if point_features.get(..3) != Some(&[PointFeature::X, PointFeature::Y, PointFeature::Z][..]) {
        return used.err("must start with x, y, z");
    }
    if let Some(s) = data.opt("MAX_SWEEPS")
        && s.usize()? > 1
        && point_features.contains(&PointFeature::TimeLag)
    {
        notes.push(format!(
            "trained on {} sweeps: give the network multi-sweep input with time lags, a single \
             scan has timestamp 0",
            s.usize()?
        ));
    }
    let mut voxels = None;
    let procs = data.get("DATA_PROCESSOR")?;
    for p in procs.list()? {
        match p.get("NAME")?.str()? {
            "mask_points_and_boxes_outside_range" => {}
            "shuffle_points" => {
                let test = p
                    .opt("SHUFFLE_ENABLED")
                    .and_then(|s| s.opt("test"))
                    .map(|t| t.bool())
                    .transpose()?
                    .unwrap_or(false);
                if test {
                    notes.push(
                        "the config shuffles points at test time; points are kept in input \
                         order here (this only matters when the pillar cap or a pillar's \
                         point cap is reached)"
                            .into(),
                    );
                }
            }
            "transform_points_to_voxels" => {
                let vs = p.get("VOXEL_SIZE")?;
                let v = vs.f32s()?;
                let cell_size: [f32; 3] = v.try_into().or_else(|_| vs.err("expected 3 numbers"))?;
                voxels = Some(VoxelizationConfig {
                    encoder: Encoder::Pillar,
                    cell_size,
                    max_points_per_cell: p.get("MAX_POINTS_PER_VOXEL")?.usize()?,
                    max_cells: train_test(&p.get("MAX_NUMBER_OF_VOXELS")?)?,
                });
            }
            other => {
                return p.get("NAME")?.err(format!(
                    "data processor `{other}` is not supported (mask_points_and_boxes_outside_range, \
                     shuffle_points, transform_points_to_voxels)"
                ));
            }
        }
    }
    let voxelization = match voxels {
        Some(v) => v,
        None => return procs.err("no transform_points_to_voxels step"),
    };

    // PillarVFE.
    let vfe = model.get("VFE")?;
    vfe.module(&["PillarVFE"])?;
    vfe.only(&[
        "NAME",
        "WITH_DISTANCE",
        "USE_ABSLOTE_XYZ",
        "USE_NORM",
        "NUM_FILTERS",
    ])?;
    let flag = |k: &str, default: bool| -> Result<bool, ImportError> {
        vfe.opt(k)
            .map(|f| f.bool())
            .transpose()
            .map(|b| b.unwrap_or(default))
    };
    if !flag("USE_NORM", true)? {
        return vfe
            .get("USE_NORM")?
            .err("False (PFN layers with a bias and no BatchNorm) is not supported");
    }
    let widths = vfe.get("NUM_FILTERS")?.usizes()?;
    let pillar_features = PillarFeatureConfig {
        absolute_xyz: flag("USE_ABSLOTE_XYZ", true)?,
        cluster_offset: true,
        center_offset_axes: 3,
        distance: flag("WITH_DISTANCE", false)?,
        widths: widths.clone(),
        bn_eps: 1e-3,
        max_includes_padding: true,
    };

    // PointPillarScatter.
    let m2b = model.get("MAP_TO_BEV")?;
    m2b.module(&["PointPillarScatter"])?;
    m2b.only(&["NAME", "NUM_BEV_FEATURES"])?;
    let bev = m2b.get("NUM_BEV_FEATURES")?;
    if Some(&bev.usize()?) != widths.last() {
        return bev.err(format!(
            "{} differs from the last VFE width {:?}",
            bev.usize()?,
            widths.last()
        ));
    }

    // BaseBEVBackbone.
    let bb = model.get("BACKBONE_2D")?;
    bb.module(&["BaseBEVBackbone"])?;
    bb.only(&[
        "NAME",
        "LAYER_NUMS",
        "LAYER_STRIDES",
        "NUM_FILTERS",
        "UPSAMPLE_STRIDES",
        "NUM_UPSAMPLE_FILTERS",
    ])?;
    let layer_nums = bb.get("LAYER_NUMS")?.usizes()?;
    let strides = bb.get("LAYER_STRIDES")?.usizes()?;
    let filters = bb.get("NUM_FILTERS")?.usizes()?;
    if strides.len() != layer_nums.len() || filters.len() != layer_nums.len() {
        return bb.err("LAYER_NUMS, LAYER_STRIDES and NUM_FILTERS differ in length");
    }
    let up = bb.get("UPSAMPLE_STRIDES")?;
    let up_strides = up.f32s()?;
    let up_filters = bb.get("NUM_UPSAMPLE_FILTERS")?.usizes()?;
    if up_strides.len() != up_filters.len() {
        return up.err("UPSAMPLE_STRIDES and NUM_UPSAMPLE_FILTERS differ in length");
    }
    if up_strides.len() != layer_nums.len() {
        return up.err(format!(
            "{} up-strides for {} levels: one deblock per level is supported (no extra deblock \
             after the concatenation, no backbone without deblocks)",
            up_strides.len(),
            layer_nums.len()
        ));
    }
    let backbone_2d = Backbone2dConfig {
        levels: layer_nums
            .iter()
            .zip(&strides)
            .zip(&filters)
            .map(|((&layers, &stride), &channels)| Level {
                layers,
                stride,
                channels,
            })
            .collect(),
        upsample: up_strides
            .iter()
            .zip(&up_filters)
            .map(|(&stride, &channels)| Upsample { stride, channels })
            .collect(),
        bn_eps: 1e-3,
    };

    // CenterHead.
    let dh = model.get("DENSE_HEAD")?;
    dh.module(&["CenterHead"])?;
    dh.only(&[
        "NAME",
        "CLASS_AGNOSTIC",
        "CLASS_NAMES_EACH_HEAD",
        "SHARED_CONV_CHANNEL",
        "USE_BIAS_BEFORE_NORM",
        "NUM_HM_CONV",
        "SEPARATE_HEAD_CFG",
        "BN_EPS",
        "BN_MOM",
        "TARGET_ASSIGNER_CONFIG",
        "LOSS_CONFIG",
        "POST_PROCESSING",
    ])?;
    let class_names = root.get("CLASS_NAMES")?.strs()?;
    let tasks_key = dh.get("CLASS_NAMES_EACH_HEAD")?;
    let mut tasks = Vec::new();
    for t in tasks_key.list()? {
        let names = t.strs()?;
        if let Some(c) = names.iter().find(|c| !class_names.contains(c)) {
            return t.err(format!("class `{c}` is not in CLASS_NAMES"));
        }
        tasks.push(names);
    }
    let sep = dh.get("SEPARATE_HEAD_CFG")?;
    sep.only(&["HEAD_ORDER", "HEAD_DICT"])?;
    let order = sep.get("HEAD_ORDER")?.strs()?;
    let dict = sep.get("HEAD_DICT")?;
    let Some(heads) = dict.v.as_object() else {
        return dict.err("must be a mapping");
    };
    if let Some(h) = heads
        .keys()
        .find(|h| !SUB_HEADS.iter().any(|(n, _)| n == h))
    {
        return dict.err(format!(
            "sub-head `{h}` is not supported (center, center_z, dim, rot, vel)"
        ));
    }
    if let Some(h) = order.iter().find(|h| !heads.contains_key(*h)) {
        return sep
            .get("HEAD_ORDER")?
            .err(format!("`{h}` is not in HEAD_DICT"));
    }
    // Our decoder reads the regression channels in a fixed order; the sub-heads are
    // separate branches named by key, so listing them in that order changes no weight.
    let mut sub_heads = Vec::new();
    for (n, out) in SUB_HEADS {
        let Some(h) = dict.opt(n) else {
            if n == "vel" {
                continue;
            }
            return dict.err(format!("sub-head `{n}` is required"));
        };
        h.only(&["out_channels", "num_conv"])?;
        let got = h.get("out_channels")?.usize()?;
        if got != out {
            return h.err(format!("out_channels {got}: the decoder needs {out}"));
        }
        sub_heads.push(SubHead {
            name: n.to_string(),
            out,
            num_conv: h
                .opt("num_conv")
                .map(|c| c.usize())
                .transpose()?
                .unwrap_or(2),
        });
    }
    let head = HeadConfig {
        shared_channels: dh.get("SHARED_CONV_CHANNEL")?.usize()?,
        tasks,
        sub_heads,
        hm_num_conv: dh
            .opt("NUM_HM_CONV")
            .map(|c| c.usize())
            .transpose()?
            .unwrap_or(2),
        hm_init_bias: -2.19,
        bn_eps: dh
            .opt("BN_EPS")
            .map(|c| c.f32())
            .transpose()?
            .unwrap_or(1e-5),
        // OpenPCDet's default is False.
        bias_before_norm: dh
            .opt("USE_BIAS_BEFORE_NORM")
            .map(|c| c.bool())
            .transpose()?
            .unwrap_or(false),
    };

    let ta = dh.get("TARGET_ASSIGNER_CONFIG")?;
    let fms = ta.get("FEATURE_MAP_STRIDE")?;
    let target = TargetConfig {
        gaussian_overlap: ta
            .opt("GAUSSIAN_OVERLAP")
            .map(|v| v.f32())
            .transpose()?
            .unwrap_or(0.1),
        min_radius: ta
            .opt("MIN_RADIUS")
            .map(|v| v.usize())
            .transpose()?
            .unwrap_or(2),
        max_objects: ta
            .opt("NUM_MAX_OBJS")
            .map(|v| v.usize())
            .transpose()?
            .unwrap_or(500),
    };
    let channels: usize = head.sub_heads.iter().map(|s| s.out).sum();
    let loss = match dh.opt("LOSS_CONFIG").and_then(|l| l.opt("LOSS_WEIGHTS")) {
        Some(w) => LossConfig {
            loc_weight: w
                .opt("loc_weight")
                .map(|v| v.f32())
                .transpose()?
                .unwrap_or(1.0),
            code_weights: match w.opt("code_weights") {
                Some(c) => c.f32s()?,
                None => vec![1.0; channels],
            },
        },
        None => LossConfig {
            loc_weight: 1.0,
            code_weights: vec![1.0; channels],
        },
    };

    let pp = dh.get("POST_PROCESSING")?;
    pp.only(&[
        "SCORE_THRESH",
        "POST_CENTER_LIMIT_RANGE",
        "MAX_OBJ_PER_SAMPLE",
        "NMS_CONFIG",
    ])?;
    let nms = pp.get("NMS_CONFIG")?;
    nms.only(&[
        "NMS_TYPE",
        "NMS_THRESH",
        "NMS_PRE_MAXSIZE",
        "NMS_POST_MAXSIZE",
    ])?;
    let nms_type = nms.get("NMS_TYPE")?;
    if !matches!(nms_type.str()?, "nms_gpu" | "nms_cpu") {
        return nms_type.err(format!(
            "`{}` is not supported (nms_gpu, nms_cpu: rotated BEV IoU)",
            nms_type.str()?
        ));
    }
    let lim = pp.get("POST_CENTER_LIMIT_RANGE")?;
    let post_center_range: [f32; 6] = lim
        .f32s()?
        .try_into()
        .or_else(|_| lim.err("expected 6 numbers"))?;
    let decode = DecodeConfig {
        score_threshold: pp.get("SCORE_THRESH")?.f32()?,
        post_center_range,
        top_k: pp.get("MAX_OBJ_PER_SAMPLE")?.usize()?,
        nms: NmsConfig {
            kind: NmsKind::RotatedIou,
            threshold: nms.get("NMS_THRESH")?.f32()?,
            pre_max: nms.get("NMS_PRE_MAXSIZE")?.usize()?,
            post_max: nms.get("NMS_POST_MAXSIZE")?.usize()?,
        },
        local_max: false,
    };

    let cfg = ModelConfig {
        name,
        input: InputConfig {
            point_range,
            point_features,
            intensity_scale: 1.0,
        },
        voxelization,
        pillar_features: Some(pillar_features),
        backbone_3d: None,
        backbone_2d,
        head,
        target,
        loss,
        decode,
    };
    // OpenPCDet's scatter has one z level, and the head's stride must be the one the
    // targets (and OpenPCDet's decoding) assume.
    if cfg.grid_size()[2] != 1 {
        return data.err(format!(
            "PointPillarScatter needs one z level; VOXEL_SIZE gives {}",
            cfg.grid_size()[2]
        ));
    }
    let stride = fms.f32()?;
    if (stride - cfg.head_stride()).abs() > 1e-4 {
        return fms.err(format!(
            "{stride} but the backbone's output stride is {}",
            cfg.head_stride()
        ));
    }
    Ok(cfg)
}

/// Reads a YAML file with its `_BASE_CONFIG_` references merged in.
fn load_merged(path: &Path) -> Result<Json, ImportError> {
    let mut root = Map::new();
    let file = read_yaml(path)?;
    let Json::Object(m) = file else {
        return Err(ImportError::Yaml {
            path: path.to_path_buf(),
            message: "the top level is not a mapping".into(),
        });
    };
    merge(&mut root, &m, path, 0)?;
    Ok(Json::Object(root))
}

fn read_yaml(path: &Path) -> Result<Json, ImportError> {
    let text = std::fs::read_to_string(path).map_err(|source| ImportError::ConfigIo {
        path: path.to_path_buf(),
        source,
    })?;
    serde_saphyr::from_str(&text).map_err(|e| ImportError::Yaml {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// OpenPCDet's `merge_new_config`: a `_BASE_CONFIG_` file's keys first, then this
/// mapping's keys, mappings merged recursively and everything else replaced.
fn merge(
    into: &mut Map<String, Json>,
    new: &Map<String, Json>,
    file: &Path,
    depth: usize,
) -> Result<(), ImportError> {
    if let Some(base) = new.get("_BASE_CONFIG_") {
        let Some(rel) = base.as_str() else {
            return Err(ImportError::Config {
                path: file.to_path_buf(),
                key: "_BASE_CONFIG_".into(),
                message: "must be a path".into(),
            });
        };
        if depth >= MAX_BASE_DEPTH {
            return Err(ImportError::Config {
                path: file.to_path_buf(),
                key: "_BASE_CONFIG_".into(),
                message: format!("nested more than {MAX_BASE_DEPTH} deep"),
            });
        }
        let base_path = resolve_base(file, rel)?;
        if let Json::Object(b) = read_yaml(&base_path)? {
            // The base's own references resolve relative to it.
            let mut resolved = Map::new();
            merge(&mut resolved, &b, &base_path, depth + 1)?;
            into.extend(resolved);
        }
    }
    for (k, v) in new {
        if k == "_BASE_CONFIG_" {
            continue;
        }
        match v {
            Json::Object(m) => {
                let slot = into
                    .entry(k.clone())
                    .or_insert_with(|| Json::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Json::Object(Map::new());
                }
                let Json::Object(slot) = slot else {
                    unreachable!("made a mapping above")
                };
                merge(slot, m, file, depth)?;
            }
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
    Ok(())
}

/// OpenPCDet resolves `_BASE_CONFIG_` against its `tools/` working directory
/// (`cfgs/dataset_configs/...`); here: against the config's folder and each folder above.
fn resolve_base(file: &Path, rel: &str) -> Result<PathBuf, ImportError> {
    let rel = Path::new(rel);
    if rel.is_absolute() && rel.is_file() {
        return Ok(rel.to_path_buf());
    }
    let dir = file.parent().unwrap_or(Path::new("."));
    for d in dir.ancestors() {
        let p = d.join(rel);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(ImportError::Config {
        path: file.to_path_buf(),
        key: "_BASE_CONFIG_".into(),
        message: format!(
            "{} not found beside the config or in any folder above it",
            rel.display()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn base_configs_merge_like_openpcdet() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "cfgs/dataset_configs/base.yaml",
            "A: 1\nB: {x: 1, y: [1, 2]}\nC: keep\n",
        );
        let child = write(
            dir.path(),
            "cfgs/models/child.yaml",
            "DATA_CONFIG:\n  _BASE_CONFIG_: cfgs/dataset_configs/base.yaml\n  B: {y: [3]}\n  A: 2\n",
        );
        let v = load_merged(&child).unwrap();
        let d = &v["DATA_CONFIG"];
        assert_eq!(d["A"], 2);
        assert_eq!(d["B"]["x"], 1);
        assert_eq!(d["B"]["y"], serde_json::json!([3]));
        assert_eq!(d["C"], "keep");
        let bad = write(
            dir.path(),
            "cfgs/models/bad.yaml",
            "DATA_CONFIG:\n  _BASE_CONFIG_: cfgs/none.yaml\n",
        );
        let e = load_merged(&bad).unwrap_err().to_string();
        assert!(e.contains("cfgs/none.yaml"), "{e}");
    }
}
