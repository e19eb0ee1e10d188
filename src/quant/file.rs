//! The INT8 model file: a safetensors file holding a [`QuantModel`].
//!
//! Tensors (exact binary values, no decimal round trip):
//! - `layers.<node>.codes` (I8, the weight's layout), `layers.<node>.scales` and
//!   `layers.<node>.bias` (F32, per output channel) for every integer layer;
//! - `activations.quantized` (U8 0/1), `activations.scale` (F32), `activations.zero_point`,
//!   `activations.qmin`, `activations.qmax` (I32), one entry per graph value;
//! - `input_scales` (F32, one per decorated feature) when the input is quantized per
//!   feature.
//!
//! Metadata: one sorted JSON string map (as the FP32 weights file stores it) with the
//! format tag, the provenance (FP32 weights digest, model config YAML, method and its
//! parameters, bit widths, number and digest of the calibration frames, seed) and the plan
//! of every node (`int:<bits>`, `float` or `glue`). The same model gives the same bytes.
//!
//! Loading checks the format, the tensors' dtypes and shapes, the plans against the graph
//! of the embedded config, and [`QuantModel::validate`]; [`load_for`] also refuses a
//! model calibrated for other FP32 weights or another config.

use super::model::{LayerPlan, LayerWeights, Provenance, QuantModel};
use super::scheme::{Grid, QParams};
use crate::model::ModelConfig;
use crate::model::graph::{Graph, Op};
use crate::model::weights::Weights;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The safetensors header key of our metadata map (as in the FP32 weights file).
const METADATA_KEY: &str = "lidar_ptq";
/// Format tag; bumped when the layout changes.
pub const FORMAT: &str = "lidar_ptq-int8/1";

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read INT8 model {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write INT8 model {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("INT8 model {path} is not valid: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "INT8 model {path} was calibrated for other FP32 weights (digest {file}, the FP32 model in use has {used})"
    )]
    OtherWeights {
        path: PathBuf,
        file: String,
        used: String,
    },
    #[error(
        "INT8 model {path} was calibrated for another model config (its embedded config `{file}` differs from the config in use, `{used}`)"
    )]
    OtherConfig {
        path: PathBuf,
        file: String,
        used: String,
    },
}

fn le_bytes<T: Copy, const N: usize>(xs: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
    xs.iter().flat_map(|&x| f(x)).collect()
}

/// Serialises a model (deterministic bytes). `graph` names the nodes; the model must fit it.
pub fn to_bytes(model: &QuantModel, graph: &Graph) -> Result<Vec<u8>, String> {
    model.validate(graph)?;
    let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut plans = Vec::with_capacity(graph.nodes.len());
    for (node, plan) in graph.nodes.iter().zip(&model.layers) {
        plans.push(match plan {
            Some(LayerPlan::Int(w)) => {
                let p = format!("layers.{}", node.name);
                tensors.push((
                    format!("{p}.codes"),
                    Dtype::I8,
                    w.shape.clone(),
                    w.codes.iter().map(|&c| c as u8).collect(),
                ));
                tensors.push((
                    format!("{p}.scales"),
                    Dtype::F32,
                    vec![w.scales.len()],
                    le_bytes(&w.scales, f32::to_le_bytes),
                ));
                tensors.push((
                    format!("{p}.bias"),
                    Dtype::F32,
                    vec![w.bias.len()],
                    le_bytes(&w.bias, f32::to_le_bytes),
                ));
                format!("int:{}", w.bits)
            }
            Some(LayerPlan::Float) => "float".to_string(),
            None => "glue".to_string(),
        });
    }
    let v = model.activations.len();
    let get = |f: &dyn Fn(&QParams) -> i32| -> Vec<i32> {
        model
            .activations
            .iter()
            .map(|a| a.as_ref().map_or(0, f))
            .collect()
    };
    let quantized: Vec<u8> = model
        .activations
        .iter()
        .map(|a| a.is_some() as u8)
        .collect();
    let scale: Vec<f32> = model
        .activations
        .iter()
        .map(|a| a.map_or(0.0, |q| q.scale))
        .collect();
    tensors.push((
        "activations.quantized".into(),
        Dtype::U8,
        vec![v],
        quantized,
    ));
    if let Some(scales) = &model.input_scales {
        tensors.push((
            "input_scales".into(),
            Dtype::F32,
            vec![scales.len()],
            le_bytes(scales, f32::to_le_bytes),
        ));
    }
    tensors.push((
        "activations.scale".into(),
        Dtype::F32,
        vec![v],
        le_bytes(&scale, f32::to_le_bytes),
    ));
    for (name, xs) in [
        ("zero_point", get(&|q| q.zero_point)),
        ("qmin", get(&|q| q.grid.qmin)),
        ("qmax", get(&|q| q.grid.qmax)),
    ] {
        tensors.push((
            format!("activations.{name}"),
            Dtype::I32,
            vec![v],
            le_bytes(&xs, i32::to_le_bytes),
        ));
    }
    let p = &model.provenance;
    let meta: BTreeMap<String, String> = BTreeMap::from([
        ("format".into(), FORMAT.into()),
        ("fp32_digest".into(), p.fp32_digest.clone()),
        ("config".into(), p.config_yaml.clone()),
        ("method".into(), p.method.clone()),
        (
            "params".into(),
            serde_json::to_string(&p.params).expect("string map"),
        ),
        ("weight_bits".into(), p.weight_bits.to_string()),
        ("activation_bits".into(), p.activation_bits.to_string()),
        ("frames".into(), p.frames.to_string()),
        ("frames_digest".into(), p.frames_digest.clone()),
        ("seed".into(), p.seed.to_string()),
        (
            "plans".into(),
            serde_json::to_string(&plans).expect("string list"),
        ),
    ]);
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            (
                n.clone(),
                TensorView::new(*d, s.clone(), b).expect("shape matches data"),
            )
        })
        .collect();
    let header = HashMap::from([(
        METADATA_KEY.to_string(),
        serde_json::to_string(&meta).expect("string map"),
    )]);
    safetensors::serialize(views, Some(header)).map_err(|e| e.to_string())
}

/// Writes `model` atomically.
pub fn save(path: &Path, model: &QuantModel, graph: &Graph) -> Result<(), FileError> {
    let bytes = to_bytes(model, graph).map_err(|message| FileError::Format {
        path: path.to_path_buf(),
        message,
    })?;
    crate::fsutil::write_atomic(path, &bytes).map_err(|source| FileError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Parses and validates a model against the graph of its own embedded config.
pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<(QuantModel, ModelConfig), FileError> {
    let bad = |message: String| FileError::Format {
        path: path.to_path_buf(),
        message,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let raw = header.metadata().clone().unwrap_or_default();
    let json = raw
        .get(METADATA_KEY)
        .ok_or_else(|| bad(format!("no `{METADATA_KEY}` metadata")))?;
    let meta: BTreeMap<String, String> = serde_json::from_str(json)
        .map_err(|e| bad(format!("metadata is not a JSON string map: {e}")))?;
    let field = |k: &str| {
        meta.get(k)
            .ok_or_else(|| bad(format!("metadata lacks `{k}`")))
    };
    if field("format")? != FORMAT {
        return Err(bad(format!(
            "format `{}`, expected `{FORMAT}`",
            field("format")?
        )));
    }
    let number = |k: &str| -> Result<u64, FileError> {
        field(k)?
            .parse::<u64>()
            .map_err(|e| bad(format!("metadata `{k}`: {e}")))
    };
    let cfg = ModelConfig::from_yaml(field("config")?)
        .map_err(|e| bad(format!("embedded config: {e}")))?;
    let graph = Graph::build(&cfg).map_err(|e| bad(format!("embedded config: {e}")))?;
    let params: BTreeMap<String, String> = serde_json::from_str(field("params")?)
        .map_err(|e| bad(format!("metadata `params`: {e}")))?;
    let plans: Vec<String> =
        serde_json::from_str(field("plans")?).map_err(|e| bad(format!("metadata `plans`: {e}")))?;
    let provenance = Provenance {
        fp32_digest: field("fp32_digest")?.clone(),
        config_yaml: field("config")?.clone(),
        method: field("method")?.clone(),
        params,
        weight_bits: number("weight_bits")? as u32,
        activation_bits: number("activation_bits")? as u32,
        frames: number("frames")? as usize,
        frames_digest: field("frames_digest")?.clone(),
        seed: number("seed")?,
    };
    let extra: Vec<&String> = meta
        .keys()
        .filter(|k| {
            ![
                "format",
                "fp32_digest",
                "config",
                "method",
                "params",
                "weight_bits",
                "activation_bits",
                "frames",
                "frames_digest",
                "seed",
                "plans",
            ]
            .contains(&k.as_str())
        })
        .collect();
    if let Some(k) = extra.first() {
        return Err(bad(format!("unknown metadata key `{k}`")));
    }
    if plans.len() != graph.nodes.len() {
        return Err(bad(format!(
            "{} node plans for a graph of {} nodes",
            plans.len(),
            graph.nodes.len()
        )));
    }
    let mut used: Vec<String> = Vec::new();
    let tensor = |name: &str,
                  dtype: Dtype,
                  shape: Option<&[usize]>,
                  used: &mut Vec<String>|
     -> Result<Vec<u8>, FileError> {
        let t = st
            .tensor(name)
            .map_err(|_| bad(format!("tensor `{name}` is missing")))?;
        if t.dtype() != dtype {
            return Err(bad(format!(
                "tensor `{name}` has dtype {:?}, expected {dtype:?}",
                t.dtype()
            )));
        }
        if let Some(s) = shape
            && t.shape() != s
        {
            return Err(bad(format!(
                "tensor `{name}` has shape {:?}, expected {s:?}",
                t.shape()
            )));
        }
        used.push(name.to_string());
        Ok(t.data().to_vec())
    };
    let f32s = |b: Vec<u8>| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let i32s = |b: Vec<u8>| -> Vec<i32> {
        b.chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect()
    };
    let mut layers = Vec::with_capacity(plans.len());
    for (node, plan) in graph.nodes.iter().zip(&plans) {
        let is_layer = matches!(node.op, Op::Layer(_));
        layers.push(match (plan.as_str(), &node.op) {
            ("glue", _) if !is_layer => None,
            ("float", Op::Layer(_)) => Some(LayerPlan::Float),
            (p, Op::Layer(l)) if p.starts_with("int:") => {
                let bits: u32 = p[4..]
                    .parse()
                    .map_err(|_| bad(format!("{}: plan `{p}`", node.name)))?;
                let pre = format!("layers.{}", node.name);
                let shape = l.weight_shape();
                let codes = tensor(&format!("{pre}.codes"), Dtype::I8, Some(&shape), &mut used)?;
                let c = [l.out_channels];
                let scales = f32s(tensor(
                    &format!("{pre}.scales"),
                    Dtype::F32,
                    Some(&c),
                    &mut used,
                )?);
                let bias = f32s(tensor(
                    &format!("{pre}.bias"),
                    Dtype::F32,
                    Some(&c),
                    &mut used,
                )?);
                Some(LayerPlan::Int(LayerWeights {
                    bits,
                    codes: codes.into_iter().map(|b| b as i8).collect(),
                    shape,
                    scales,
                    bias,
                }))
            }
            (p, _) => {
                return Err(bad(format!(
                    "node {}: plan `{p}` does not fit a {:?} node",
                    node.name, node.op
                )));
            }
        });
    }
    let v = [graph.nodes.len() + 1];
    let quantized = tensor("activations.quantized", Dtype::U8, Some(&v), &mut used)?;
    let scale = f32s(tensor(
        "activations.scale",
        Dtype::F32,
        Some(&v),
        &mut used,
    )?);
    let zp = i32s(tensor(
        "activations.zero_point",
        Dtype::I32,
        Some(&v),
        &mut used,
    )?);
    let qmin = i32s(tensor("activations.qmin", Dtype::I32, Some(&v), &mut used)?);
    let qmax = i32s(tensor("activations.qmax", Dtype::I32, Some(&v), &mut used)?);
    let mut activations = Vec::with_capacity(v[0]);
    for k in 0..v[0] {
        activations.push(match quantized[k] {
            0 => None,
            1 => Some(QParams {
                scale: scale[k],
                zero_point: zp[k],
                grid: Grid {
                    qmin: qmin[k],
                    qmax: qmax[k],
                },
            }),
            x => {
                return Err(bad(format!(
                    "activations.quantized[{k}] = {x}, expected 0 or 1"
                )));
            }
        });
    }
    let input_scales = match st.tensor("input_scales") {
        Ok(_) => Some(f32s(tensor("input_scales", Dtype::F32, None, &mut used)?)),
        Err(_) => None,
    };
    if let Some((name, _)) = st.tensors().into_iter().find(|(n, _)| !used.contains(n)) {
        return Err(bad(format!("unexpected tensor `{name}`")));
    }
    let model = QuantModel {
        provenance,
        activations,
        layers,
        input_scales,
    };
    model.validate(&graph).map_err(bad)?;
    Ok((model, cfg))
}

/// Loads a model, checked against the graph of its embedded config.
pub fn load(path: &Path) -> Result<(QuantModel, ModelConfig), FileError> {
    let bytes = std::fs::read(path).map_err(|source| FileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_bytes(&bytes, path)
}

/// Loads a model for the FP32 model (`cfg`, `weights`) in use: refused when it was
/// calibrated for other weights or another config.
pub fn load_for(
    path: &Path,
    cfg: &ModelConfig,
    weights: &Weights,
) -> Result<QuantModel, FileError> {
    let (model, file_cfg) = load(path)?;
    check_for(&model, &file_cfg, cfg, weights, path)?;
    Ok(model)
}

/// The checks of [`load_for`] on an already loaded model.
pub fn check_for(
    model: &QuantModel,
    file_cfg: &ModelConfig,
    cfg: &ModelConfig,
    weights: &Weights,
    path: &Path,
) -> Result<(), FileError> {
    if file_cfg != cfg {
        return Err(FileError::OtherConfig {
            path: path.to_path_buf(),
            file: file_cfg.name.clone(),
            used: cfg.name.clone(),
        });
    }
    let used = weights.digest();
    if model.provenance.fp32_digest != used {
        return Err(FileError::OtherWeights {
            path: path.to_path_buf(),
            file: model.provenance.fp32_digest.clone(),
            used,
        });
    }
    Ok(())
}
