//! torch checkpoint containers: the legacy stream (`torch.save(...,
//! _use_new_zipfile_serialization=False)`, what OpenPCDet's `save_checkpoint` writes) and
//! the zip archive (plain `torch.save`). Both hold one main pickle whose tensors point at
//! storages by key, and the storages' raw little-endian bytes.
//!
//! Legacy layout: pickles of the magic number, the protocol (1001), a sys_info dict and
//! the main object, then a pickled list of storage keys, then per key in that order an
//! int64 element count and the data. Zip layout: `<prefix>/data.pkl` and
//! `<prefix>/data/<key>` per storage (optionally `<prefix>/byteorder`).

use super::pickle::{DType, Id, Pickle, PickleError, TensorRef, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// The legacy format's magic number, 0x1950a86a20f9469cfc6c.
const LEGACY_MAGIC: i128 = 0x1950a86a20f9469cfc6c;
const LEGACY_PROTOCOL: i128 = 1001;

#[derive(Debug, Error)]
pub enum TorchFileError {
    #[error("cannot read checkpoint {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a torch checkpoint: it is neither a zip archive nor a legacy torch.save \
         stream (first bytes {head:02x?})"
    )]
    NotTorch { path: PathBuf, head: Vec<u8> },
    #[error("checkpoint {path}, {part}: {source}")]
    Pickle {
        path: PathBuf,
        part: &'static str,
        source: PickleError,
    },
    #[error("checkpoint {path} is damaged: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("checkpoint {path}: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// Which container a checkpoint came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Container {
    Legacy,
    Zip,
}

/// A loaded checkpoint: the main pickle and the bytes of every storage it references.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub path: PathBuf,
    pub container: Container,
    pub pickle: Pickle,
    storages: BTreeMap<String, Vec<u8>>,
}

impl Checkpoint {
    /// Reads a checkpoint file of either container.
    pub fn open(path: &Path) -> Result<Self, TorchFileError> {
        let bytes = std::fs::read(path).map_err(|source| TorchFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes, path)
    }

    /// Parses checkpoint bytes; `path` names the source in errors.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, TorchFileError> {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            read_zip(bytes, path)
        } else if bytes.first() == Some(&0x80) {
            read_legacy(bytes, path)
        } else {
            Err(TorchFileError::NotTorch {
                path: path.to_path_buf(),
                head: bytes[..bytes.len().min(8)].to_vec(),
            })
        }
    }

    /// The root object of the main pickle.
    pub fn root(&self) -> Id {
        self.pickle.root
    }

    /// A tensor's elements in row-major order, as f32 (float storages only).
    pub fn tensor_f32(&self, name: &str, t: &TensorRef) -> Result<Vec<f32>, TorchFileError> {
        let data = self.storage(t)?;
        let idx = t.indices();
        Ok(match t.storage.dtype {
            DType::F32 => idx
                .iter()
                .map(|&i| f32::from_le_bytes(data[i * 4..i * 4 + 4].try_into().expect("4")))
                .collect(),
            DType::F64 => idx
                .iter()
                .map(|&i| f64::from_le_bytes(data[i * 8..i * 8 + 8].try_into().expect("8")) as f32)
                .collect(),
            other => {
                return Err(TorchFileError::Unsupported {
                    path: self.path.clone(),
                    message: format!(
                        "tensor {name} has dtype {other:?}; float32 or float64 weights are needed"
                    ),
                });
            }
        })
    }

    fn storage(&self, t: &TensorRef) -> Result<&[u8], TorchFileError> {
        // Presence and size were checked when the checkpoint was read.
        self.storages
            .get(&t.storage.key)
            .map(Vec::as_slice)
            .ok_or_else(|| TorchFileError::Corrupt {
                path: self.path.clone(),
                message: format!("storage {} is missing", t.storage.key),
            })
    }
}

fn corrupt(path: &Path, message: impl Into<String>) -> TorchFileError {
    TorchFileError::Corrupt {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

fn parse(bytes: &[u8], path: &Path, part: &'static str) -> Result<(Pickle, usize), TorchFileError> {
    Pickle::parse(bytes).map_err(|source| TorchFileError::Pickle {
        path: path.to_path_buf(),
        part,
        source,
    })
}

fn read_legacy(bytes: &[u8], path: &Path) -> Result<Checkpoint, TorchFileError> {
    let mut pos = 0;
    let (magic, n) = parse(bytes, path, "magic number")?;
    pos += n;
    if magic.get(magic.root) != &Value::Int(LEGACY_MAGIC) {
        return Err(TorchFileError::NotTorch {
            path: path.to_path_buf(),
            head: bytes[..bytes.len().min(8)].to_vec(),
        });
    }
    let (proto, n) = parse(&bytes[pos..], path, "protocol version")?;
    pos += n;
    if proto.get(proto.root) != &Value::Int(LEGACY_PROTOCOL) {
        return Err(TorchFileError::Unsupported {
            path: path.to_path_buf(),
            message: format!(
                "legacy protocol {} (only {LEGACY_PROTOCOL} is known)",
                proto.describe(proto.root)
            ),
        });
    }
    let (sys, n) = parse(&bytes[pos..], path, "sys_info")?;
    pos += n;
    match sys
        .dict_get(sys.root, "little_endian")
        .map(|id| sys.get(id))
    {
        Some(Value::Bool(true)) => {}
        Some(Value::Bool(false)) => {
            return Err(TorchFileError::Unsupported {
                path: path.to_path_buf(),
                message: "written on a big-endian machine".into(),
            });
        }
        _ => return Err(corrupt(path, "sys_info lacks little_endian")),
    }
    let (main, n) = parse(&bytes[pos..], path, "main pickle")?;
    pos += n;
    let (keys, n) = parse(&bytes[pos..], path, "storage key list")?;
    pos += n;
    let Value::List(ids) = keys.get(keys.root) else {
        return Err(corrupt(path, "the storage key list is not a list"));
    };
    let mut storages = BTreeMap::new();
    for &id in ids {
        let key = keys
            .str(id)
            .ok_or_else(|| corrupt(path, "a storage key is not a string"))?;
        let s = main.storages.get(key).ok_or_else(|| {
            corrupt(
                path,
                format!("storage {key} is listed but no tensor uses it"),
            )
        })?;
        let head = bytes
            .get(pos..pos + 8)
            .ok_or_else(|| corrupt(path, format!("truncated before storage {key}")))?;
        let numel = i64::from_le_bytes(head.try_into().expect("8"));
        pos += 8;
        if numel < 0 || numel as u64 != s.numel as u64 {
            return Err(corrupt(
                path,
                format!(
                    "storage {key} records {numel} elements, its tensors expect {}",
                    s.numel
                ),
            ));
        }
        let len = s
            .numel
            .checked_mul(s.dtype.size())
            .ok_or_else(|| corrupt(path, format!("storage {key} is impossibly large")))?;
        let data = bytes.get(pos..pos.saturating_add(len)).ok_or_else(|| {
            corrupt(
                path,
                format!(
                    "truncated in storage {key} ({len} bytes needed, {} left)",
                    bytes.len() - pos
                ),
            )
        })?;
        pos += len;
        storages.insert(key.to_string(), data.to_vec());
    }
    if let Some(k) = main.storages.keys().find(|k| !storages.contains_key(*k)) {
        return Err(corrupt(path, format!("storage {k} is used but not stored")));
    }
    if pos != bytes.len() {
        log::warn!(
            "{}: {} bytes after the last storage ignored",
            path.display(),
            bytes.len() - pos
        );
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        container: Container::Legacy,
        pickle: main,
        storages,
    })
}

fn read_zip(bytes: &[u8], path: &Path) -> Result<Checkpoint, TorchFileError> {
    let zerr = |e: zip::result::ZipError| {
        corrupt(
            path,
            format!("not a readable zip archive (truncated or corrupt): {e}"),
        )
    };
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(zerr)?;
    // torch names the top folder after the file; find it through data.pkl.
    let pkl = zip
        .file_names()
        .filter_map(Result::ok)
        .map(|n| n.into_owned())
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .ok_or_else(|| corrupt(path, "the archive has no <name>/data.pkl"))?;
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    // Reads an entry, never more than `limit` bytes (declared sizes are not trusted).
    let mut read = |name: &str, limit: u64| -> Result<Option<Vec<u8>>, TorchFileError> {
        let mut f = match zip.by_name(name) {
            Ok(f) => f,
            Err(zip::result::ZipError::FileNotFound) => return Ok(None),
            Err(e) => return Err(zerr(e)),
        };
        let mut out = Vec::new();
        (&mut f)
            .take(limit)
            .read_to_end(&mut out)
            .map_err(|e| corrupt(path, format!("entry {name}: {e}")))?;
        Ok(Some(out))
    };
    if let Some(order) = read(&format!("{prefix}byteorder"), 16)?
        && order.trim_ascii() != b"little"
    {
        return Err(TorchFileError::Unsupported {
            path: path.to_path_buf(),
            message: format!("byte order {:?}", String::from_utf8_lossy(&order)),
        });
    }
    let data = read(&pkl, bytes.len() as u64)?.expect("listed above");
    let (pickle, _) = parse(&data, path, "data.pkl")?;
    let mut storages = BTreeMap::new();
    for (key, s) in &pickle.storages {
        let name = format!("{prefix}data/{key}");
        let len = (s.numel as u64)
            .checked_mul(s.dtype.size() as u64)
            .ok_or_else(|| corrupt(path, format!("storage {key} is impossibly large")))?;
        let d = read(&name, len + 1)?
            .ok_or_else(|| corrupt(path, format!("storage entry {name} is missing")))?;
        if d.len() as u64 != len {
            return Err(corrupt(
                path,
                format!(
                    "storage entry {name} holds {} bytes, its tensors expect {len}",
                    d.len()
                ),
            ));
        }
        storages.insert(key.clone(), d);
    }
    Ok(Checkpoint {
        path: path.to_path_buf(),
        container: Container::Zip,
        pickle,
        storages,
    })
}
