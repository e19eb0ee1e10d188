//! One rosbag2 MCAP storage file: its topics from the summary, its messages in log-time order.
//!
//! Indexed files (chunked, with a summary) are streamed chunk by chunk through the file's
//! chunk indexes. Files without a summary or without chunk indexes have no index to follow,
//! so their wanted messages are read in one linear pass and sorted.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use mcap::sans_io::indexed_reader::{
    IndexedReadEvent, IndexedReader, IndexedReaderOptions, ReadOrder,
};
use mcap::sans_io::summary_reader::{SummaryReadEvent, SummaryReader, SummaryReaderOptions};

use super::metadata::parse_qos_text;
use super::{BagError, BagMessage, StorageContents, TopicInfo};

/// An opened MCAP storage file.
pub(crate) struct McapFile {
    path: PathBuf,
    /// `None` when the file has no usable index (no summary, or messages outside chunks).
    indexed: Option<mcap::Summary>,
}

fn mcap_err(path: &Path, source: mcap::McapError) -> BagError {
    BagError::Mcap {
        path: path.to_path_buf(),
        source,
    }
}

fn io_err(path: &Path, source: std::io::Error) -> BagError {
    BagError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read_summary(path: &Path) -> Result<Option<mcap::Summary>, BagError> {
    let mut file = File::open(path).map_err(|e| io_err(path, e))?;
    let size = file.metadata().map_err(|e| io_err(path, e))?.len();
    let mut reader =
        SummaryReader::new_with_options(SummaryReaderOptions::default().with_file_size(size));
    while let Some(event) = reader.next_event() {
        match event.map_err(|e| mcap_err(path, e))? {
            SummaryReadEvent::ReadRequest(n) => {
                let got = file.read(reader.insert(n)).map_err(|e| io_err(path, e))?;
                reader.notify_read(got);
            }
            SummaryReadEvent::SeekRequest(to) => {
                let pos = file.seek(to).map_err(|e| io_err(path, e))?;
                reader.notify_seeked(pos);
            }
        }
    }
    Ok(reader.finish())
}

fn topic_from_channel(
    path: &Path,
    channel: &mcap::Channel<'_>,
    count: u64,
) -> Result<TopicInfo, BagError> {
    let qos_text = channel
        .metadata
        .get("offered_qos_profiles")
        .map(String::as_str)
        .unwrap_or("");
    let offered_qos_profiles = parse_qos_text(qos_text).map_err(|message| BagError::Corrupt {
        path: path.to_path_buf(),
        message: format!("channel {} offered_qos_profiles: {message}", channel.topic),
    })?;
    Ok(TopicInfo {
        name: channel.topic.clone(),
        type_name: channel
            .schema
            .as_ref()
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        serialization_format: channel.message_encoding.clone(),
        message_count: count,
        offered_qos_profiles,
        type_description_hash: channel
            .metadata
            .get("topic_type_hash")
            .cloned()
            .unwrap_or_default(),
    })
}

impl McapFile {
    /// Opens the file and reads its topics, counts and time range.
    pub(crate) fn open(path: &Path) -> Result<(Self, StorageContents), BagError> {
        let summary = match read_summary(path) {
            Ok(s) => s,
            Err(e) => {
                // An inconsistent summary (e.g. a channel naming a schema it omits) still
                // leaves the data section readable; a truncated file fails the scan too.
                log::warn!("{e}; reading the file without its summary");
                None
            }
        };
        let usable = summary.filter(|s| {
            let messages = s.stats.as_ref().map(|st| st.message_count);
            // Without statistics we cannot tell whether chunk indexes cover every message,
            // and messages on channels the summary lacks could not be named.
            let named = s.stats.as_ref().is_some_and(|st| {
                st.channel_message_counts
                    .keys()
                    .all(|id| s.channels.contains_key(id))
            });
            named
                && (matches!(messages, Some(0))
                    || (messages.is_some() && !s.chunk_indexes.is_empty()))
        });
        let file = McapFile {
            path: path.to_path_buf(),
            indexed: usable,
        };
        let contents = match &file.indexed {
            Some(summary) => {
                let stats = summary.stats.as_ref().expect("checked above");
                let mut channels: Vec<_> = summary.channels.values().collect();
                channels.sort_by_key(|c| c.id);
                let topics = channels
                    .iter()
                    .map(|c| {
                        let n = stats
                            .channel_message_counts
                            .get(&c.id)
                            .copied()
                            .unwrap_or(0);
                        topic_from_channel(path, c, n)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                // Chunk indexes bound the messages they hold; some writers leave the
                // statistics' times stale, so the indexes win.
                let from_chunks = summary.chunk_indexes.iter().fold(None, |r, c| {
                    let (a, b) = (c.message_start_time as i64, c.message_end_time as i64);
                    Some(r.map_or((a, b), |(x, y): (i64, i64)| (x.min(a), y.max(b))))
                });
                let range = (stats.message_count > 0).then(|| {
                    from_chunks.unwrap_or((
                        stats.message_start_time as i64,
                        stats.message_end_time as i64,
                    ))
                });
                StorageContents {
                    topics,
                    time_range: range,
                    message_count: stats.message_count,
                }
            }
            None => file.scan_contents()?,
        };
        Ok((file, contents))
    }

    /// Topics and counts of an unindexed file, from one pass over it.
    fn scan_contents(&self) -> Result<StorageContents, BagError> {
        let buf = std::fs::read(&self.path).map_err(|e| io_err(&self.path, e))?;
        let mut channels: BTreeMap<u16, (std::sync::Arc<mcap::Channel<'_>>, u64)> = BTreeMap::new();
        let mut range: Option<(i64, i64)> = None;
        let mut total = 0u64;
        let stream = mcap::MessageStream::new(&buf).map_err(|e| mcap_err(&self.path, e))?;
        for msg in stream {
            let msg = msg.map_err(|e| mcap_err(&self.path, e))?;
            let t = msg.log_time as i64;
            range = Some(range.map_or((t, t), |(a, b)| (a.min(t), b.max(t))));
            total += 1;
            channels
                .entry(msg.channel.id)
                .or_insert_with(|| (msg.channel.clone(), 0))
                .1 += 1;
        }
        // Channels without messages only show up in the summary, if there is one.
        if let Ok(Some(summary)) = read_summary(&self.path) {
            for (id, c) in &summary.channels {
                channels.entry(*id).or_insert_with(|| (c.clone(), 0));
            }
        }
        let topics = channels
            .values()
            .map(|(c, n)| topic_from_channel(&self.path, c, *n))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(StorageContents {
            topics,
            time_range: range,
            message_count: total,
        })
    }

    /// Messages on `topics` (all when `None`) in log-time order.
    pub(crate) fn messages(
        &self,
        topics: Option<&HashSet<String>>,
    ) -> Result<Box<dyn Iterator<Item = Result<BagMessage, BagError>> + Send>, BagError> {
        match &self.indexed {
            Some(summary) => {
                let mut options = IndexedReaderOptions::new().with_order(ReadOrder::LogTime);
                if let Some(t) = topics {
                    options = options.include_topics(t.iter().cloned());
                }
                let reader = IndexedReader::new_with_options(summary, options)
                    .map_err(|e| mcap_err(&self.path, e))?;
                let file = File::open(&self.path).map_err(|e| io_err(&self.path, e))?;
                let names = summary
                    .channels
                    .iter()
                    .map(|(id, c)| (*id, c.topic.clone()))
                    .collect();
                Ok(Box::new(IndexedMessages {
                    path: self.path.clone(),
                    file,
                    reader,
                    names,
                    buf: Vec::new(),
                    failed: false,
                }))
            }
            None => Ok(Box::new(self.linear_messages(topics)?.into_iter().map(Ok))),
        }
    }

    fn linear_messages(
        &self,
        topics: Option<&HashSet<String>>,
    ) -> Result<VecDeque<BagMessage>, BagError> {
        let buf = std::fs::read(&self.path).map_err(|e| io_err(&self.path, e))?;
        let stream = mcap::MessageStream::new(&buf).map_err(|e| mcap_err(&self.path, e))?;
        let mut out = Vec::new();
        for msg in stream {
            let msg = msg.map_err(|e| mcap_err(&self.path, e))?;
            if topics.is_some_and(|t| !t.contains(&msg.channel.topic)) {
                continue;
            }
            out.push(BagMessage {
                topic: msg.channel.topic.clone(),
                timestamp_ns: msg.log_time as i64,
                data: msg.data.into_owned(),
            });
        }
        // Stable: equal timestamps keep file order.
        out.sort_by_key(|m| m.timestamp_ns);
        Ok(out.into())
    }
}

/// Streams an indexed file, loading one chunk at a time as the index asks for it.
struct IndexedMessages {
    path: PathBuf,
    file: File,
    reader: IndexedReader,
    names: std::collections::HashMap<u16, String>,
    buf: Vec<u8>,
    failed: bool,
}

impl IndexedMessages {
    fn load_chunk(&mut self, offset: u64, length: usize) -> Result<(), BagError> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| io_err(&self.path, e))?;
        self.buf.resize(length, 0);
        self.file
            .read_exact(&mut self.buf)
            .map_err(|e| io_err(&self.path, e))?;
        self.reader
            .insert_chunk_record_data(offset, &self.buf)
            .map_err(|e| mcap_err(&self.path, e))
    }
}

impl Iterator for IndexedMessages {
    type Item = Result<BagMessage, BagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        loop {
            let request = match self.reader.next_event()? {
                Err(e) => {
                    self.failed = true;
                    return Some(Err(mcap_err(&self.path, e)));
                }
                Ok(IndexedReadEvent::Message { header, data }) => {
                    let Some(topic) = self.names.get(&header.channel_id) else {
                        self.failed = true;
                        return Some(Err(BagError::Corrupt {
                            path: self.path.clone(),
                            message: format!("message on unknown channel {}", header.channel_id),
                        }));
                    };
                    return Some(Ok(BagMessage {
                        topic: topic.clone(),
                        timestamp_ns: header.log_time as i64,
                        data: data.to_vec(),
                    }));
                }
                Ok(IndexedReadEvent::ReadChunkRequest { offset, length }) => (offset, length),
            };
            if let Err(e) = self.load_chunk(request.0, request.1) {
                self.failed = true;
                return Some(Err(e));
            }
        }
    }
}
