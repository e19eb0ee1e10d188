//! Writes rosbag2 bags in MCAP storage, laid out as Jazzy's `ros2 bag record` does: a
//! directory with `metadata.yaml` (version 9) and `<dir name>_0.mcap` (profile `ros2`,
//! `cdr` messages, `ros2msg` schemas, 1 MiB chunks, a `rosbag2` metadata record).
//!
//! The bag is built in a hidden temp directory beside the target and renamed into place by
//! `finish`, so readers never see a half-written bag and a failed write leaves nothing.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::BagError;
use super::metadata::{BagMetadata, FileEntry, Qos, TopicEntry, qos_to_text};

/// Chunk compression of the MCAP file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ChunkCompression {
    /// rosbag2's default.
    #[default]
    None,
    Zstd,
    Lz4,
}

#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub compression: ChunkCompression,
    /// Uncompressed bytes per chunk; rosbag2 uses 1 MiB.
    pub chunk_size: u64,
    /// Written as `ros_distro` in the metadata.
    pub ros_distro: String,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            compression: ChunkCompression::None,
            chunk_size: 1 << 20,
            ros_distro: "jazzy".into(),
        }
    }
}

struct Topic {
    entry: TopicEntry,
    channel_id: u16,
    sequence: u32,
}

/// Builds one MCAP rosbag2 bag. Call [`BagWriter::finish`] to make it appear.
pub struct BagWriter {
    target: PathBuf,
    staging: tempfile::TempDir,
    file_name: String,
    mcap: mcap::Writer<BufWriter<File>>,
    schemas: HashMap<String, u16>,
    topics: Vec<Topic>,
    range: Option<(i64, i64)>,
    count: u64,
    options: WriterOptions,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> BagError + '_ {
    move |source| BagError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl BagWriter {
    /// Starts a bag that will become the directory `dir` (which must not exist yet).
    pub fn create(dir: impl AsRef<Path>, options: WriterOptions) -> Result<BagWriter, BagError> {
        let target = dir.as_ref().to_path_buf();
        if target.exists() {
            return Err(BagError::Io {
                path: target,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the bag directory already exists",
                ),
            });
        }
        let base = target
            .file_name()
            .ok_or_else(|| BagError::NotABag(target.clone()))?
            .to_string_lossy()
            .into_owned();
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{base}.tmp-"))
            .tempdir_in(&parent)
            .map_err(io_err(&parent))?;
        let file_name = format!("{base}_0.mcap");
        let mcap_path = staging.path().join(&file_name);
        let file = File::create(&mcap_path).map_err(io_err(&mcap_path))?;
        let compression = match options.compression {
            ChunkCompression::None => None,
            ChunkCompression::Zstd => Some(mcap::Compression::Zstd),
            ChunkCompression::Lz4 => Some(mcap::Compression::Lz4),
        };
        let mcap = mcap::WriteOptions::new()
            .profile("ros2")
            .library("lidar_ptq")
            .compression(compression)
            .chunk_size(Some(options.chunk_size))
            .create(BufWriter::new(file))
            .map_err(|source| BagError::Mcap {
                path: target.join(&file_name),
                source,
            })?;
        Ok(BagWriter {
            target,
            staging,
            file_name,
            mcap,
            schemas: HashMap::new(),
            topics: Vec::new(),
            range: None,
            count: 0,
            options,
        })
    }

    fn mcap_err(&self, source: mcap::McapError) -> BagError {
        BagError::Mcap {
            path: self.target.join(&self.file_name),
            source,
        }
    }

    /// Declares a topic. `schema_text` is the `ros2msg` definition: the type's `.msg` text,
    /// then each dependency after a line of 80 `=` and `MSG: pkg/msg/Type`.
    pub fn add_topic(
        &mut self,
        name: &str,
        type_name: &str,
        schema_text: &str,
        qos: &[Qos],
    ) -> Result<(), BagError> {
        if self.topics.iter().any(|t| t.entry.name == name) {
            return Err(BagError::DuplicateTopic(name.to_string()));
        }
        let schema_id = match self.schemas.get(type_name) {
            Some(&id) => id,
            None => {
                let id = self
                    .mcap
                    .add_schema(type_name, "ros2msg", schema_text.as_bytes())
                    .map_err(|e| self.mcap_err(e))?;
                self.schemas.insert(type_name.to_string(), id);
                id
            }
        };
        let mut meta = BTreeMap::new();
        meta.insert("offered_qos_profiles".to_string(), qos_to_text(qos));
        let channel_id = self
            .mcap
            .add_channel(schema_id, name, "cdr", &meta)
            .map_err(|e| self.mcap_err(e))?;
        self.topics.push(Topic {
            entry: TopicEntry {
                name: name.to_string(),
                type_name: type_name.to_string(),
                serialization_format: "cdr".into(),
                offered_qos_profiles: qos.to_vec(),
                type_description_hash: String::new(),
                message_count: 0,
            },
            channel_id,
            sequence: 0,
        });
        Ok(())
    }

    /// Appends one serialized (CDR) message received at `timestamp_ns`.
    pub fn write(&mut self, topic: &str, timestamp_ns: i64, data: &[u8]) -> Result<(), BagError> {
        let Some(idx) = self.topics.iter().position(|t| t.entry.name == topic) else {
            return Err(BagError::UnknownTopic(topic.to_string()));
        };
        let Ok(time) = u64::try_from(timestamp_ns) else {
            return Err(BagError::NegativeTimestamp {
                topic: topic.to_string(),
                timestamp_ns,
            });
        };
        let t = &mut self.topics[idx];
        let header = mcap::records::MessageHeader {
            channel_id: t.channel_id,
            sequence: t.sequence,
            log_time: time,
            publish_time: time,
        };
        t.sequence = t.sequence.wrapping_add(1);
        t.entry.message_count += 1;
        self.count += 1;
        self.range = Some(self.range.map_or((timestamp_ns, timestamp_ns), |(a, b)| {
            (a.min(timestamp_ns), b.max(timestamp_ns))
        }));
        self.mcap
            .write_to_known_channel(&header, data)
            .map_err(|e| self.mcap_err(e))
    }

    fn bag_metadata(&self) -> BagMetadata {
        // rosbag2 marks an empty bag with the largest time and zero duration.
        let (start, duration) = self
            .range
            .map_or((i64::MAX, 0), |(a, b)| (a, (b - a) as u64));
        BagMetadata {
            version: super::metadata::METADATA_VERSION,
            storage_identifier: "mcap".into(),
            relative_file_paths: vec![self.file_name.clone()],
            duration_ns: duration,
            starting_time_ns: start,
            message_count: self.count,
            topics: self.topics.iter().map(|t| t.entry.clone()).collect(),
            compression_format: String::new(),
            compression_mode: String::new(),
            files: vec![FileEntry {
                path: self.file_name.clone(),
                starting_time_ns: start,
                duration_ns: duration,
                message_count: self.count,
            }],
            ros_distro: self.options.ros_distro.clone(),
        }
    }

    /// Closes the MCAP file, writes `metadata.yaml` and moves the bag into place.
    /// Returns the bag directory.
    pub fn finish(mut self) -> Result<PathBuf, BagError> {
        let md = self.bag_metadata();
        let mut record = BTreeMap::new();
        record.insert("serialized_metadata".to_string(), md.to_inner_yaml());
        self.mcap
            .write_metadata(&mcap::records::Metadata {
                name: "rosbag2".into(),
                metadata: record,
            })
            .map_err(|e| self.mcap_err(e))?;
        self.mcap.finish().map_err(|e| self.mcap_err(e))?;
        let mcap_path = self.staging.path().join(&self.file_name);
        let mut file = self
            .mcap
            .into_inner()
            .into_inner()
            .map_err(|e| BagError::Io {
                path: mcap_path.clone(),
                source: e.into_error(),
            })?;
        file.flush().map_err(io_err(&mcap_path))?;
        file.sync_all().map_err(io_err(&mcap_path))?;

        let yaml_path = self.staging.path().join("metadata.yaml");
        let mut yaml = File::create(&yaml_path).map_err(io_err(&yaml_path))?;
        yaml.write_all(md.to_yaml().as_bytes())
            .and_then(|_| yaml.sync_all())
            .map_err(io_err(&yaml_path))?;

        let staged = self.staging.keep();
        if let Err(source) = std::fs::rename(&staged, &self.target) {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(BagError::Io {
                path: self.target,
                source,
            });
        }
        log::info!(
            "wrote {} messages on {} topics to {}",
            md.message_count,
            md.topics.len(),
            self.target.display()
        );
        Ok(self.target)
    }
}
