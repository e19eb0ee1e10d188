//! A model file: safetensors weights that carry their own model description (the YAML in
//! metadata key [`META_CONFIG`], as the trainer writes it), loaded and checked in one step.
//!
//! A separate config file may be given as well; it must describe the same model, so a
//! stale or wrong YAML beside the weights is an error instead of a silently wrong network.
//! Weights without an embedded description need the separate file.

use super::graph::Graph;
use super::weights::{Weights, WeightsError};
use super::{ConfigError, ModelConfig};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Metadata key holding the model description YAML (the trainer's `META_CONFIG`).
pub const META_CONFIG: &str = "config";

/// At most this many differing settings are named in a mismatch error.
const MAX_DIFFERENCES: usize = 6;

#[derive(Debug, Error)]
pub enum BundleError {
    #[error(transparent)]
    Weights(#[from] WeightsError),
    #[error(
        "model file {path} carries no model description (metadata key `{META_CONFIG}`); \
         give its config YAML explicitly"
    )]
    NoConfig { path: PathBuf },
    #[error("model file {path}: its embedded model description is invalid: {source}")]
    EmbeddedConfig { path: PathBuf, source: ConfigError },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "model config {config} does not describe the model in {path} ({differences}); \
         leave the config out to use the description embedded in the model file"
    )]
    Mismatch {
        path: PathBuf,
        config: PathBuf,
        differences: String,
    },
    #[error("model {model}: {message}")]
    Graph { model: String, message: String },
}

/// A model description with weights that fit it.
#[derive(Debug, Clone)]
pub struct ModelBundle {
    pub config: ModelConfig,
    pub weights: Weights,
    /// The file's metadata (training step, seed, run, the config YAML, ...).
    pub metadata: BTreeMap<String, String>,
}

impl ModelBundle {
    /// Loads a model file; `config_override`, when given, must describe the same model as
    /// the embedded description (and stands in for it when the file has none).
    pub fn load(path: &Path, config_override: Option<&Path>) -> Result<Self, BundleError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (weights, metadata) = Weights::from_bytes(&bytes, path)?;
        let embedded = metadata
            .get(META_CONFIG)
            .map(|yaml| {
                ModelConfig::from_yaml(yaml).map_err(|source| BundleError::EmbeddedConfig {
                    path: path.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        let config = match (embedded, config_override) {
            (Some(e), Some(file)) => {
                let given = ModelConfig::load(file)?;
                let diffs = config_differences(&e, &given);
                if !diffs.is_empty() {
                    return Err(BundleError::Mismatch {
                        path: path.to_path_buf(),
                        config: file.to_path_buf(),
                        differences: diffs.join("; "),
                    });
                }
                e
            }
            (Some(e), None) => e,
            (None, Some(file)) => {
                log::warn!(
                    "{} has no embedded model description: using {} unchecked",
                    path.display(),
                    file.display()
                );
                ModelConfig::load(file)?
            }
            (None, None) => {
                return Err(BundleError::NoConfig {
                    path: path.to_path_buf(),
                });
            }
        };
        let graph = Graph::build(&config).map_err(|message| BundleError::Graph {
            model: config.name.clone(),
            message,
        })?;
        weights.validate(&graph)?;
        Ok(Self {
            config,
            weights,
            metadata,
        })
    }

    /// Writes weights with `config` embedded (atomically); other metadata is kept, its
    /// own `config` entry replaced.
    pub fn save(
        path: &Path,
        config: &ModelConfig,
        weights: &Weights,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), WeightsError> {
        let mut meta = metadata.clone();
        meta.insert(META_CONFIG.to_string(), config.to_yaml());
        weights.save(path, &meta)
    }
}

/// Settings that differ between two model descriptions, as `path: a vs b` (dotted path,
/// list indices in brackets), at most [`MAX_DIFFERENCES`] plus a count of the rest.
pub fn config_differences(a: &ModelConfig, b: &ModelConfig) -> Vec<String> {
    if a == b {
        return Vec::new();
    }
    let (va, vb) = (
        serde_json::to_value(a).expect("a model config serialises"),
        serde_json::to_value(b).expect("a model config serialises"),
    );
    let mut out = Vec::new();
    diff_values("", &va, &vb, &mut out);
    if out.is_empty() {
        // Equal as JSON but not as configs can only be float noise below JSON's precision.
        out.push("numeric settings differ".into());
    }
    if out.len() > MAX_DIFFERENCES {
        let rest = out.len() - MAX_DIFFERENCES;
        out.truncate(MAX_DIFFERENCES);
        out.push(format!("{rest} more"));
    }
    out
}

fn diff_values(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    let join = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                diff_values(
                    &join(k),
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                diff_values(&format!("{path}[{i}]"), p, q, out);
            }
        }
        _ if a != b => out.push(format!(
            "{path}: {} in the model file vs {} in the config",
            show(a),
            show(b)
        )),
        _ => {}
    }
}

/// A leaf value for a message; the configs' f32 settings print as written (0.3, not the
/// f64 widening 0.30000001192092896).
fn show(v: &serde_json::Value) -> String {
    match v.as_f64() {
        Some(x) if v.is_f64() && (x as f32) as f64 == x => (x as f32).to_string(),
        _ => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_model.yaml"),
        )
        .unwrap()
    }

    #[test]
    fn the_key_is_the_one_the_trainer_writes() {
        assert_eq!(META_CONFIG, crate::train::trainer::META_CONFIG);
    }

    #[test]
    fn round_trip_override_and_errors() {
        let cfg = tiny();
        let w = Weights::init(&Graph::build(&cfg).unwrap(), 3);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        ModelBundle::save(&path, &cfg, &w, &meta).unwrap();
        let b = ModelBundle::load(&path, None).unwrap();
        assert_eq!(b.config, cfg);
        assert_eq!(b.weights, w);
        assert_eq!(b.metadata["step"], "7");

        // The same description in another file (different formatting) is accepted.
        let same = dir.path().join("same.yaml");
        std::fs::write(&same, cfg.to_yaml()).unwrap();
        ModelBundle::load(&path, Some(&same)).unwrap();

        // A description that differs is refused, naming the setting.
        let mut other = cfg.clone();
        other.decode.score_threshold = 0.3;
        let wrong = dir.path().join("wrong.yaml");
        std::fs::write(&wrong, other.to_yaml()).unwrap();
        let e = ModelBundle::load(&path, Some(&wrong)).unwrap_err();
        assert!(matches!(e, BundleError::Mismatch { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("decode.score_threshold"), "{msg}");
        assert!(msg.contains("0.3"), "{msg}");

        // Weights without a description: an error alone, accepted with a config.
        let bare = dir.path().join("bare.safetensors");
        w.save(&bare, &BTreeMap::new()).unwrap();
        let e = ModelBundle::load(&bare, None).unwrap_err();
        assert!(matches!(e, BundleError::NoConfig { .. }), "{e}");
        assert_eq!(ModelBundle::load(&bare, Some(&same)).unwrap().config, cfg);

        // Weights of another model under this description: the shape error names a tensor.
        let default = ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"),
        )
        .unwrap();
        let dw = Weights::init(&Graph::build(&default).unwrap(), 1);
        let mixed = dir.path().join("mixed.safetensors");
        ModelBundle::save(&mixed, &cfg, &dw, &BTreeMap::new()).unwrap();
        let e = ModelBundle::load(&mixed, None).unwrap_err().to_string();
        assert!(e.contains("weights do not fit the model"), "{e}");

        // A missing file names the path.
        let e = ModelBundle::load(&dir.path().join("none.safetensors"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none.safetensors"), "{e}");
    }

    #[test]
    fn differences_name_nested_settings() {
        let a = tiny();
        let mut b = a.clone();
        b.head.tasks[1] = vec!["pedestrian".into()];
        b.input.point_range[3] = 25.6;
        let d = config_differences(&a, &b).join("; ");
        assert!(d.contains("input.point_range[3]"), "{d}");
        assert!(d.contains("head.tasks[1]"), "{d}");
        assert!(config_differences(&a, &a).is_empty());
    }
}
