//! Named parameter tensors of a graph: seeded initialisation, safetensors files (written
//! atomically), validation against the graph, and a digest for provenance.

use super::graph::{Graph, Op};
use crate::ops::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use rand_distr::{Distribution, Uniform};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum WeightsError {
    #[error("cannot read weights {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write weights {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("weights {path} are not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("weights {path}: tensor {name} has dtype {dtype}, expected F32")]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error("weights do not fit the model: tensor {name} is missing")]
    Missing { name: String },
    #[error(
        "weights do not fit the model: tensor {name} has shape {got:?}, the model needs {want:?}"
    )]
    Shape {
        name: String,
        got: Vec<usize>,
        want: Vec<usize>,
    },
    #[error("weights do not fit the model: unexpected tensor {name}")]
    Unexpected { name: String },
    #[error("weights: tensor {name} holds a non-finite value")]
    NonFinite { name: String },
}

/// The safetensors header key under which our metadata map is stored.
const METADATA_KEY: &str = "lidar_ptq";

/// All parameters of a model by name (sorted, so files and digests are deterministic).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
}

impl Weights {
    /// PyTorch's default initialisation, seeded: weights uniform in +-1/sqrt(fan_in) (its
    /// kaiming_uniform with a = sqrt(5)), biases likewise, BatchNorm identity, and the
    /// heatmap bias at its focal-loss prior.
    pub fn init(graph: &Graph, seed: u64) -> Weights {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mut tensors = BTreeMap::new();
        for n in &graph.nodes {
            let Op::Layer(l) = &n.op else { continue };
            let shape = l.weight_shape();
            // fan_in: PyTorch uses dim 1 times the kernel area, for transposed convs too.
            let fan_in: usize = shape[1] * shape[2..].iter().product::<usize>();
            let bound = 1.0 / (fan_in as f32).sqrt();
            let u = Uniform::new_inclusive(-bound, bound).expect("finite bound");
            let w = Tensor::from_fn(&shape, |_| u.sample(&mut rng));
            tensors.insert(format!("{}.weight", l.param), w);
            if l.bias {
                let b = if l.bias_init != 0.0 {
                    vec![l.bias_init; l.out_channels]
                } else {
                    (0..l.out_channels).map(|_| u.sample(&mut rng)).collect()
                };
                tensors.insert(
                    format!("{}.bias", l.param),
                    Tensor::new(vec![l.out_channels], b).expect("len"),
                );
            }
            if let Some((bn, _)) = &l.bn {
                let c = l.out_channels;
                for (s, v) in [
                    ("weight", 1.0),
                    ("bias", 0.0),
                    ("running_mean", 0.0),
                    ("running_var", 1.0),
                ] {
                    tensors.insert(
                        format!("{bn}.{s}"),
                        Tensor::new(vec![c], vec![v; c]).expect("len"),
                    );
                }
            }
        }
        Weights { tensors }
    }

    pub fn get(&self, name: &str) -> Result<&Tensor, WeightsError> {
        self.tensors.get(name).ok_or_else(|| WeightsError::Missing {
            name: name.to_owned(),
        })
    }

    /// Checks that the tensors are exactly the graph's parameters with the right shapes and
    /// finite values.
    pub fn validate(&self, graph: &Graph) -> Result<(), WeightsError> {
        let specs = graph.params();
        for p in &specs {
            let t = self.get(&p.name)?;
            if t.shape != p.shape {
                return Err(WeightsError::Shape {
                    name: p.name.clone(),
                    got: t.shape.clone(),
                    want: p.shape.clone(),
                });
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return Err(WeightsError::NonFinite {
                    name: p.name.clone(),
                });
            }
        }
        if let Some(extra) = self
            .tensors
            .keys()
            .find(|k| !specs.iter().any(|p| &p.name == *k))
        {
            return Err(WeightsError::Unexpected {
                name: extra.clone(),
            });
        }
        Ok(())
    }

    /// SHA-256 over names, shapes and little-endian values, in name order: the identity of
    /// a set of FP32 weights (an INT8 model records the digest of the weights it came from).
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (name, t) in &self.tensors {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((t.shape.len() as u64).to_le_bytes());
            for &d in &t.shape {
                h.update((d as u64).to_le_bytes());
            }
            for v in &t.data {
                h.update(v.to_le_bytes());
            }
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Serialises to safetensors bytes with `metadata` in the header.
    pub fn to_bytes(&self, metadata: &BTreeMap<String, String>) -> Vec<u8> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(n, t)| {
                let b: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n.clone(), b, t.shape.clone())
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = bytes
            .iter()
            .map(|(n, b, s)| {
                let v = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .expect("shape matches data");
                (n.clone(), v)
            })
            .collect();
        // safetensors keeps header metadata in a HashMap, whose order changes from run to
        // run; one key holding our sorted map as JSON keeps the file bytes deterministic.
        let meta = (!metadata.is_empty()).then(|| {
            std::collections::HashMap::from([(
                METADATA_KEY.to_string(),
                serde_json::to_string(metadata).expect("string map"),
            )])
        });
        safetensors::serialize(views, meta).expect("in-memory serialisation")
    }

    /// Parses safetensors bytes (F32 tensors only); `path` only names the source in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
    ) -> Result<(Weights, BTreeMap<String, String>), WeightsError> {
        let st =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| WeightsError::Format {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(bytes).map_err(|e| WeightsError::Format {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
        let raw: BTreeMap<String, String> = meta
            .metadata()
            .clone()
            .map(|m| m.into_iter().collect())
            .unwrap_or_default();
        // Our files carry one JSON-encoded map; files from elsewhere carry plain keys.
        let metadata = match raw.get(METADATA_KEY) {
            Some(json) if raw.len() == 1 => {
                serde_json::from_str(json).map_err(|e| WeightsError::Format {
                    path: path.to_path_buf(),
                    message: format!("metadata `{METADATA_KEY}` is not a JSON string map: {e}"),
                })?
            }
            _ => raw,
        };
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(WeightsError::Dtype {
                    path: path.to_path_buf(),
                    name,
                    dtype: format!("{:?}", view.dtype()),
                });
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect();
            let t = Tensor::new(view.shape().to_vec(), data).map_err(|e| WeightsError::Format {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            tensors.insert(name, t);
        }
        Ok((Weights { tensors }, metadata))
    }

    /// Loads a safetensors file and checks it against the graph.
    pub fn load(
        path: &Path,
        graph: &Graph,
    ) -> Result<(Weights, BTreeMap<String, String>), WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (w, meta) = Self::from_bytes(&bytes, path)?;
        w.validate(graph)?;
        Ok((w, meta))
    }

    /// Writes a safetensors file atomically (temporary file in the same directory, then
    /// rename), so a crash never leaves a half-written model behind.
    pub fn save(
        &self,
        path: &Path,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), WeightsError> {
        crate::fsutil::write_atomic(path, &self.to_bytes(metadata)).map_err(|source| {
            WeightsError::Write {
                path: path.to_path_buf(),
                source,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ModelConfig;

    fn graph() -> Graph {
        let cfg = ModelConfig::load(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/default.yaml"),
        )
        .unwrap();
        Graph::build(&cfg).unwrap()
    }

    #[test]
    fn init_is_seeded_and_fits_the_graph() {
        let g = graph();
        let a = Weights::init(&g, 7);
        a.validate(&g).unwrap();
        assert_eq!(a, Weights::init(&g, 7));
        assert_ne!(a.digest(), Weights::init(&g, 8).digest());
        let hm = a.get("dense_head.heads_list.0.hm.1.bias").unwrap();
        assert!(hm.data.iter().all(|&b| b == -2.19));
        // Bound of the PFN linear: 1 / sqrt(11).
        let w = a.get("vfe.pfn_layers.0.linear.weight").unwrap();
        let bound = 1.0 / 11f32.sqrt();
        assert!(w.data.iter().all(|v| v.abs() <= bound));
        assert!(w.data.iter().any(|v| v.abs() > 0.9 * bound));
    }

    #[test]
    fn save_load_round_trip_and_mismatches_are_named() {
        let g = graph();
        let w = Weights::init(&g, 1);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        let meta = BTreeMap::from([("model".to_string(), "default".to_string())]);
        w.save(&path, &meta).unwrap();
        let bytes_once = std::fs::read(&path).unwrap();
        let more = BTreeMap::from([
            ("model".to_string(), "default".to_string()),
            ("a".to_string(), "1".to_string()),
            ("z".to_string(), "2".to_string()),
        ]);
        assert_eq!(
            w.to_bytes(&more),
            w.to_bytes(&more),
            "same weights, same bytes"
        );
        w.save(&path, &meta).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), bytes_once);
        let (back, m) = Weights::load(&path, &g).unwrap();
        assert_eq!(back, w);
        assert_eq!(m, meta);
        assert_eq!(back.digest(), w.digest());

        let mut wrong = w.clone();
        wrong.tensors.insert(
            "backbone_2d.blocks.0.1.weight".into(),
            Tensor::zeros(&[32, 31, 3, 3]),
        );
        let e = wrong.validate(&g).unwrap_err().to_string();
        assert!(
            e.contains("backbone_2d.blocks.0.1.weight") && e.contains("31"),
            "{e}"
        );
        let mut missing = w.clone();
        missing.tensors.remove("dense_head.shared_conv.0.bias");
        assert!(matches!(
            missing.validate(&g),
            Err(WeightsError::Missing { .. })
        ));

        // A truncated file is a clear error, not a panic.
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let e = Weights::load(&path, &g).unwrap_err();
        assert!(matches!(e, WeightsError::Format { .. }), "{e}");
        std::fs::write(&path, b"not a model").unwrap();
        assert!(matches!(
            Weights::load(&path, &g),
            Err(WeightsError::Format { .. })
        ));
    }
}
