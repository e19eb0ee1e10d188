//! rosbag2 bags: reading bags recorded by ROS 2 (MCAP or sqlite3 storage, metadata versions
//! 1-9, split and zstd-compressed) and writing MCAP bags that ROS 2 tools read.
//!
//! This module moves opaque serialized messages; what they mean is for `msgs`/`cloud`.

pub mod info;
mod mcap_reader;
pub mod metadata;
mod sqlite_reader;
mod writer;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use mcap_reader::McapFile;
pub use metadata::{BagMetadata, Durability, History, Liveliness, Qos, QosDuration, Reliability};
use sqlite_reader::SqliteFile;
pub use writer::{BagWriter, ChunkCompression, WriterOptions};

#[derive(Debug, Error)]
pub enum BagError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{0}: not a rosbag2 bag (expected a directory with metadata.yaml, or a .mcap or .db3 file)"
    )]
    NotABag(PathBuf),
    #[error("{path}: {source}")]
    Metadata {
        path: PathBuf,
        source: metadata::MetadataError,
    },
    #[error("{path}: unsupported compression {format:?} in mode {mode:?} (only zstd)")]
    Compression {
        path: PathBuf,
        format: String,
        mode: String,
    },
    #[error("{path}: storage {storage:?} is not supported (only mcap and sqlite3)")]
    Storage { path: PathBuf, storage: String },
    #[error("{path}: MCAP: {source}")]
    Mcap {
        path: PathBuf,
        source: mcap::McapError,
    },
    #[error("{path}: sqlite3: {source}")]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("topic {0:?} is not in the bag")]
    UnknownTopic(String),
    #[error("topic {0:?} was already added to the bag")]
    DuplicateTopic(String),
    #[error("message on {topic:?} has timestamp {timestamp_ns}; MCAP needs a non-negative one")]
    NegativeTimestamp { topic: String, timestamp_ns: i64 },
}

/// A topic as the bag describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicInfo {
    pub name: String,
    /// ROS type, e.g. `sensor_msgs/msg/PointCloud2`.
    pub type_name: String,
    /// `cdr` for bags recorded by ROS 2 (some old bags leave it empty).
    pub serialization_format: String,
    pub message_count: u64,
    pub offered_qos_profiles: Vec<Qos>,
    /// `RIHS01_...` from Iron on, empty before.
    pub type_description_hash: String,
}

/// One serialized message as stored in the bag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BagMessage {
    pub topic: String,
    /// Receive time in nanoseconds since the epoch (MCAP `log_time`, sqlite `timestamp`).
    pub timestamp_ns: i64,
    pub data: Vec<u8>,
}

/// Storage plugin of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Mcap,
    Sqlite3,
}

impl fmt::Display for Storage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Storage::Mcap => "mcap",
            Storage::Sqlite3 => "sqlite3",
        })
    }
}

/// What one storage file holds, as read from the file itself.
pub(crate) struct StorageContents {
    pub(crate) topics: Vec<TopicInfo>,
    pub(crate) time_range: Option<(i64, i64)>,
    pub(crate) message_count: u64,
}

enum StorageFile {
    Mcap(McapFile),
    Sqlite(SqliteFile),
}

/// An opened bag. Cheap to keep open: messages are read on demand.
pub struct Bag {
    path: PathBuf,
    storage: Storage,
    metadata: Option<BagMetadata>,
    topics: Vec<TopicInfo>,
    time_range: Option<(i64, i64)>,
    message_count: u64,
    files: Vec<(PathBuf, StorageFile)>,
    per_message_zstd: bool,
    /// Holds files decompressed from `compression_mode: FILE` bags.
    _decompressed: Option<tempfile::TempDir>,
}

const MCAP_MAGIC: &[u8] = b"\x89MCAP0\r\n";
const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";

/// Storage of a file from its name, else from its first bytes.
fn detect_storage(path: &Path) -> Result<Option<Storage>, BagError> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let name = name.strip_suffix(".zstd").unwrap_or(&name);
    if name.ends_with(".mcap") {
        return Ok(Some(Storage::Mcap));
    }
    if name.ends_with(".db3") {
        return Ok(Some(Storage::Sqlite3));
    }
    let mut head = [0u8; 16];
    let n = {
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|source| BagError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        f.read(&mut head).map_err(|source| BagError::Io {
            path: path.to_path_buf(),
            source,
        })?
    };
    Ok(if head[..n].starts_with(MCAP_MAGIC) {
        Some(Storage::Mcap)
    } else if head[..n].starts_with(SQLITE_MAGIC) {
        Some(Storage::Sqlite3)
    } else {
        None
    })
}

fn storage_from_identifier(path: &Path, id: &str) -> Result<Option<Storage>, BagError> {
    match id {
        "mcap" => Ok(Some(Storage::Mcap)),
        "sqlite3" => Ok(Some(Storage::Sqlite3)),
        "" => Ok(None),
        other => Err(BagError::Storage {
            path: path.to_path_buf(),
            storage: other.to_string(),
        }),
    }
}

/// Decompresses a whole-file zstd storage file into `dir`, returning the new path.
fn decompress_file(src: &Path, dir: &Path) -> Result<PathBuf, BagError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BagError::Io { path, source }
    };
    let name = src.file_name().unwrap_or_default().to_string_lossy();
    let out = dir.join(name.strip_suffix(".zstd").unwrap_or(&name));
    let input = std::fs::File::open(src).map_err(io(src))?;
    let mut output = std::fs::File::create(&out).map_err(io(&out))?;
    let mut decoder = zstd::stream::read::Decoder::new(input).map_err(io(src))?;
    std::io::copy(&mut decoder, &mut output).map_err(|source| BagError::Corrupt {
        path: src.to_path_buf(),
        message: format!("zstd decompression failed: {source}"),
    })?;
    Ok(out)
}

impl Bag {
    /// Opens a bag directory (with `metadata.yaml`), its `metadata.yaml`, or a single
    /// `.mcap`/`.db3` storage file. Every storage file is opened and checked here, so a
    /// missing, truncated or corrupt file fails now, naming that file.
    pub fn open(path: impl AsRef<Path>) -> Result<Bag, BagError> {
        let path = path.as_ref();
        let io = |source| BagError::Io {
            path: path.to_path_buf(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let (dir, metadata_file) = if meta.is_dir() {
            (path.to_path_buf(), path.join("metadata.yaml"))
        } else if path.file_name().is_some_and(|n| n == "metadata.yaml") {
            (
                path.parent().unwrap_or(Path::new(".")).to_path_buf(),
                path.to_path_buf(),
            )
        } else {
            return Self::open_files(path, None, vec![path.to_path_buf()]);
        };
        if !metadata_file.is_file() {
            // A directory without metadata.yaml: read whatever storage files it holds.
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(io)?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    let n = p.to_string_lossy();
                    n.ends_with(".mcap") || n.ends_with(".db3")
                })
                .collect();
            if files.is_empty() {
                return Err(BagError::NotABag(path.to_path_buf()));
            }
            files.sort();
            return Self::open_files(path, None, files);
        }
        let text = std::fs::read_to_string(&metadata_file).map_err(|source| BagError::Io {
            path: metadata_file.clone(),
            source,
        })?;
        let md = BagMetadata::from_yaml(&text).map_err(|source| BagError::Metadata {
            path: metadata_file.clone(),
            source,
        })?;
        let mut names = md.relative_file_paths.clone();
        if names.is_empty() {
            names = md.files.iter().map(|f| f.path.clone()).collect();
        }
        let files = names.iter().map(|n| dir.join(n)).collect();
        Self::open_files(path, Some(md), files)
    }

    fn open_files(
        path: &Path,
        md: Option<BagMetadata>,
        names: Vec<PathBuf>,
    ) -> Result<Bag, BagError> {
        let (mode, format) = md
            .as_ref()
            .map(|m| {
                (
                    m.compression_mode.to_ascii_uppercase(),
                    m.compression_format.clone(),
                )
            })
            .unwrap_or_default();
        let single_zstd =
            md.is_none() && names.len() == 1 && names[0].to_string_lossy().ends_with(".zstd");
        let file_zstd = (mode == "FILE" && format == "zstd") || single_zstd;
        let per_message_zstd = mode == "MESSAGE" && format == "zstd";
        if !(mode.is_empty() || mode == "NONE" || file_zstd || per_message_zstd) {
            return Err(BagError::Compression {
                path: path.to_path_buf(),
                format,
                mode,
            });
        }
        let declared = match &md {
            Some(m) => storage_from_identifier(path, &m.storage_identifier)?,
            None => None,
        };
        let decompressed = if file_zstd {
            Some(
                tempfile::Builder::new()
                    .prefix("lidar_ptq-bag-")
                    .tempdir()
                    .map_err(|source| BagError::Io {
                        path: std::env::temp_dir(),
                        source,
                    })?,
            )
        } else {
            None
        };

        let mut files = Vec::with_capacity(names.len());
        let mut contents = Vec::with_capacity(names.len());
        let mut storage = declared;
        for name in names {
            let kind = match detect_storage(&name)? {
                Some(k) => k,
                None => declared.ok_or_else(|| BagError::NotABag(name.clone()))?,
            };
            storage.get_or_insert(kind);
            let local = match &decompressed {
                Some(dir) if name.to_string_lossy().ends_with(".zstd") => {
                    decompress_file(&name, dir.path())?
                }
                _ => name.clone(),
            };
            let (file, c) = match kind {
                Storage::Mcap => {
                    let (f, c) =
                        McapFile::open(&local).map_err(|e| rename_error(e, &local, &name))?;
                    (StorageFile::Mcap(f), c)
                }
                Storage::Sqlite3 => {
                    let (f, c) =
                        SqliteFile::open(&local).map_err(|e| rename_error(e, &local, &name))?;
                    (StorageFile::Sqlite(f), c)
                }
            };
            log::debug!("{}: {} messages", name.display(), c.message_count);
            files.push((name, file));
            contents.push(c);
        }
        let storage = storage.ok_or_else(|| BagError::NotABag(path.to_path_buf()))?;

        // Counts and times come from the storage files, which is what `messages` yields
        // (some recorders leave metadata.yaml approximate); names, types and QoS come from
        // metadata.yaml where there is one, as `ros2 bag info` shows them.
        let (stored, time_range, message_count) = merge_contents(contents);
        let topics = match &md {
            Some(m) => {
                let mut topics: Vec<TopicInfo> = m
                    .topics
                    .iter()
                    .map(|t| TopicInfo {
                        name: t.name.clone(),
                        type_name: t.type_name.clone(),
                        serialization_format: t.serialization_format.clone(),
                        message_count: stored
                            .iter()
                            .find(|s| s.name == t.name)
                            .map_or(0, |s| s.message_count),
                        offered_qos_profiles: t.offered_qos_profiles.clone(),
                        type_description_hash: t.type_description_hash.clone(),
                    })
                    .collect();
                for s in stored {
                    if !topics.iter().any(|t| t.name == s.name) {
                        topics.push(s);
                    }
                }
                topics
            }
            None => stored,
        };
        Ok(Bag {
            path: path.to_path_buf(),
            storage,
            metadata: md,
            topics,
            time_range,
            message_count,
            files,
            per_message_zstd,
            _decompressed: decompressed,
        })
    }

    /// The path the bag was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn storage(&self) -> Storage {
        self.storage
    }

    /// The parsed `metadata.yaml`, when the bag has one.
    pub fn metadata(&self) -> Option<&BagMetadata> {
        self.metadata.as_ref()
    }

    /// Storage files, in the order the bag lists them.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|(p, _)| p.as_path()).collect()
    }

    pub fn topics(&self) -> &[TopicInfo] {
        &self.topics
    }

    pub fn topic(&self, name: &str) -> Option<&TopicInfo> {
        self.topics.iter().find(|t| t.name == name)
    }

    pub fn message_count(&self) -> u64 {
        self.message_count
    }

    /// Time of the first message (ns since epoch); `None` for an empty bag.
    pub fn start_ns(&self) -> Option<i64> {
        self.time_range.map(|r| r.0)
    }

    /// Time of the last message (ns since epoch); `None` for an empty bag.
    pub fn end_ns(&self) -> Option<i64> {
        self.time_range.map(|r| r.1)
    }

    /// `end - start` in nanoseconds; 0 for an empty bag.
    pub fn duration_ns(&self) -> u64 {
        self.time_range
            .map_or(0, |(a, b)| b.saturating_sub(a).max(0) as u64)
    }

    /// Messages on `topics` (all topics when empty), in timestamp order across all files.
    /// Equal timestamps keep file order. Naming a topic the bag lacks is an error.
    pub fn messages(&self, topics: &[&str]) -> Result<Messages, BagError> {
        let wanted: Option<HashSet<String>> = if topics.is_empty() {
            None
        } else {
            for t in topics {
                if self.topic(t).is_none() {
                    return Err(BagError::UnknownTopic(t.to_string()));
                }
            }
            Some(topics.iter().map(|t| t.to_string()).collect())
        };
        let mut sources = Vec::with_capacity(self.files.len());
        for (_, f) in &self.files {
            sources.push(match f {
                StorageFile::Mcap(m) => m.messages(wanted.as_ref())?,
                StorageFile::Sqlite(s) => s.messages(wanted.as_ref())?,
            });
        }
        Ok(Messages {
            sources,
            heads: BinaryHeap::new(),
            started: false,
            failed: false,
            per_message_zstd: self.per_message_zstd,
            path: self.path.clone(),
        })
    }
}

/// Errors from a decompressed copy name the file the user gave.
fn rename_error(e: BagError, local: &Path, original: &Path) -> BagError {
    if local == original {
        return e;
    }
    match e {
        BagError::Io { source, .. } => BagError::Io {
            path: original.to_path_buf(),
            source,
        },
        BagError::Mcap { source, .. } => BagError::Mcap {
            path: original.to_path_buf(),
            source,
        },
        BagError::Sqlite { source, .. } => BagError::Sqlite {
            path: original.to_path_buf(),
            source,
        },
        BagError::Corrupt { message, .. } => BagError::Corrupt {
            path: original.to_path_buf(),
            message,
        },
        other => other,
    }
}

/// Topics and times of a bag without metadata.yaml, from its storage files.
fn merge_contents(contents: Vec<StorageContents>) -> (Vec<TopicInfo>, Option<(i64, i64)>, u64) {
    let mut topics: Vec<TopicInfo> = Vec::new();
    let mut range: Option<(i64, i64)> = None;
    let mut count = 0;
    for c in contents {
        count += c.message_count;
        if let Some((a, b)) = c.time_range {
            range = Some(range.map_or((a, b), |(x, y)| (x.min(a), y.max(b))));
        }
        for t in c.topics {
            match topics.iter_mut().find(|x| x.name == t.name) {
                Some(x) => x.message_count += t.message_count,
                None => topics.push(t),
            }
        }
    }
    (topics, range, count)
}

type Source = Box<dyn Iterator<Item = Result<BagMessage, BagError>> + Send>;

/// Iterator over a bag's messages: a k-way merge of the time-ordered files.
pub struct Messages {
    sources: Vec<Source>,
    /// Next message of each source, smallest (timestamp, file index) first.
    heads: BinaryHeap<Reverse<(i64, usize, HeapMessage)>>,
    started: bool,
    failed: bool,
    per_message_zstd: bool,
    path: PathBuf,
}

/// Heap entry payload; ordering is decided by (timestamp, file) before it is compared.
struct HeapMessage(BagMessage);

impl PartialEq for HeapMessage {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for HeapMessage {}
impl PartialOrd for HeapMessage {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for HeapMessage {
    fn cmp(&self, _: &Self) -> std::cmp::Ordering {
        std::cmp::Ordering::Equal
    }
}

impl Messages {
    fn pull(&mut self, i: usize) -> Result<(), BagError> {
        if let Some(m) = self.sources[i].next() {
            let m = m?;
            self.heads
                .push(Reverse((m.timestamp_ns, i, HeapMessage(m))));
        }
        Ok(())
    }
}

impl Iterator for Messages {
    type Item = Result<BagMessage, BagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        if !self.started {
            self.started = true;
            for i in 0..self.sources.len() {
                if let Err(e) = self.pull(i) {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
        let Reverse((_, i, HeapMessage(mut msg))) = self.heads.pop()?;
        if let Err(e) = self.pull(i) {
            self.failed = true;
            return Some(Err(e));
        }
        if self.per_message_zstd {
            match zstd::stream::decode_all(msg.data.as_slice()) {
                Ok(d) => msg.data = d,
                Err(e) => {
                    self.failed = true;
                    return Some(Err(BagError::Corrupt {
                        path: self.path.clone(),
                        message: format!(
                            "message on {} at {} ns: zstd decompression failed: {e}",
                            msg.topic, msg.timestamp_ns
                        ),
                    }));
                }
            }
        }
        Some(Ok(msg))
    }
}
