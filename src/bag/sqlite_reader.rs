//! One rosbag2 sqlite3 storage file (`.db3`): its topics and its messages in time order.
//!
//! Bags are often on read-only media, so a database is opened `immutable` (no locks, no
//! `-wal`/`-shm` created next to it). rosbag2 records in WAL mode, and a bag whose writer
//! died keeps messages in a non-empty `-wal` that was never checkpointed: those bags are
//! copied with their WAL into a private temp dir first, where sqlite can replay the log.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{Connection, OpenFlags, params};

use super::metadata::parse_qos_text;
use super::{BagError, BagMessage, StorageContents, TopicInfo};

/// Rows fetched per query while streaming messages.
const PAGE: usize = 256;

/// An opened sqlite3 storage file.
pub(crate) struct SqliteFile {
    /// The file as the user named it, for messages.
    path: PathBuf,
    /// Where it is opened from: the file itself, or its copy next to the replayed WAL.
    db: PathBuf,
    copy: Option<Arc<tempfile::TempDir>>,
    topic_names: HashMap<i64, String>,
}

fn sql_err(path: &Path, source: rusqlite::Error) -> BagError {
    BagError::Sqlite {
        path: path.to_path_buf(),
        source,
    }
}

/// Percent-encodes a path for an sqlite `file:` URI.
fn uri_path(path: &Path) -> String {
    let mut out = String::new();
    for b in path.to_string_lossy().bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn connect(db: &Path, private_copy: bool, shown: &Path) -> Result<Connection, BagError> {
    let conn = if private_copy {
        // Read-write on our own copy so that sqlite can replay the WAL into it.
        Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_WRITE)
    } else {
        Connection::open_with_flags(
            format!("file:{}?immutable=1", uri_path(db)),
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI,
        )
    };
    conn.map_err(|e| sql_err(shown, e))
}

fn column_names(conn: &Connection, table: &str, shown: &Path) -> Result<HashSet<String>, BagError> {
    let mut stmt = conn
        .prepare(&format!("PRAGMA table_info({table})"))
        .map_err(|e| sql_err(shown, e))?;
    let names = stmt
        .query_map([], |r| r.get::<_, String>(1))
        .map_err(|e| sql_err(shown, e))?
        .collect::<Result<HashSet<_>, _>>()
        .map_err(|e| sql_err(shown, e))?;
    Ok(names)
}

impl SqliteFile {
    pub(crate) fn open(path: &Path) -> Result<(Self, StorageContents), BagError> {
        let io = |source| BagError::Io {
            path: path.to_path_buf(),
            source,
        };
        // Fail early with the file's own name rather than sqlite's "unable to open".
        std::fs::metadata(path).map_err(io)?;
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let wal_len = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
        let (db, copy) = if wal_len > 0 {
            let dir = tempfile::Builder::new()
                .prefix("lidar_ptq-bag-")
                .tempdir()
                .map_err(io)?;
            let name = path.file_name().unwrap_or_default();
            let db = dir.path().join(name);
            std::fs::copy(path, &db).map_err(io)?;
            std::fs::copy(&wal, format!("{}-wal", db.display())).map_err(|source| {
                BagError::Io {
                    path: wal.clone(),
                    source,
                }
            })?;
            log::debug!(
                "{}: replaying {wal_len} bytes of WAL in a private copy",
                path.display()
            );
            (db, Some(Arc::new(dir)))
        } else {
            (path.to_path_buf(), None)
        };
        let conn = connect(&db, copy.is_some(), path)?;
        let columns = column_names(&conn, "topics", path)?;
        if columns.is_empty() {
            return Err(BagError::Corrupt {
                path: path.to_path_buf(),
                message: "no `topics` table: not a rosbag2 sqlite3 file".into(),
            });
        }
        let opt = |c: &str| {
            if columns.contains(c) {
                c.to_string()
            } else {
                "''".to_string()
            }
        };
        let sql = format!(
            "SELECT id, name, type, serialization_format, {}, {} FROM topics ORDER BY id",
            opt("offered_qos_profiles"),
            opt("type_description_hash")
        );
        let mut stmt = conn.prepare(&sql).map_err(|e| sql_err(path, e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                ))
            })
            .map_err(|e| sql_err(path, e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| sql_err(path, e))?;
        drop(stmt);

        let mut counts: HashMap<i64, u64> = HashMap::new();
        {
            let mut stmt = conn
                .prepare("SELECT topic_id, COUNT(*) FROM messages GROUP BY topic_id")
                .map_err(|e| sql_err(path, e))?;
            let it = stmt
                .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))
                .map_err(|e| sql_err(path, e))?;
            for row in it {
                let (id, n) = row.map_err(|e| sql_err(path, e))?;
                counts.insert(id, n as u64);
            }
        }
        let (min, max, total): (Option<i64>, Option<i64>, i64) = conn
            .query_row(
                "SELECT MIN(timestamp), MAX(timestamp), COUNT(*) FROM messages",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .map_err(|e| sql_err(path, e))?;

        let mut topics = Vec::with_capacity(rows.len());
        let mut topic_names = HashMap::new();
        for (id, name, type_name, format, qos, hash) in rows {
            let offered_qos_profiles =
                parse_qos_text(&qos).map_err(|message| BagError::Corrupt {
                    path: path.to_path_buf(),
                    message: format!("topic {name} offered_qos_profiles: {message}"),
                })?;
            topic_names.insert(id, name.clone());
            topics.push(TopicInfo {
                name,
                type_name,
                serialization_format: format,
                message_count: counts.get(&id).copied().unwrap_or(0),
                offered_qos_profiles,
                type_description_hash: hash,
            });
        }
        let contents = StorageContents {
            topics,
            time_range: min.zip(max),
            message_count: total as u64,
        };
        Ok((
            SqliteFile {
                path: path.to_path_buf(),
                db,
                copy,
                topic_names,
            },
            contents,
        ))
    }

    /// Messages on `topics` (all when `None`) in (timestamp, row id) order, fetched a page
    /// at a time so that a large bag is never held in memory.
    pub(crate) fn messages(
        &self,
        topics: Option<&HashSet<String>>,
    ) -> Result<Box<dyn Iterator<Item = Result<BagMessage, BagError>> + Send>, BagError> {
        let conn = connect(&self.db, self.copy.is_some(), &self.path)?;
        let filter = match topics {
            None => String::new(),
            Some(wanted) => {
                let ids: Vec<String> = self
                    .topic_names
                    .iter()
                    .filter(|(_, n)| wanted.contains(*n))
                    .map(|(id, _)| id.to_string())
                    .collect();
                format!(" AND topic_id IN ({})", ids.join(","))
            }
        };
        let sql = format!(
            "SELECT id, timestamp, topic_id, data FROM messages \
             WHERE (timestamp, id) > (?1, ?2){filter} ORDER BY timestamp, id LIMIT {PAGE}"
        );
        Ok(Box::new(SqliteMessages {
            path: self.path.clone(),
            conn,
            _copy: self.copy.clone(),
            sql,
            names: self.topic_names.clone(),
            after: (i64::MIN, i64::MIN),
            page: Vec::new().into_iter(),
            done: false,
        }))
    }
}

struct SqliteMessages {
    path: PathBuf,
    conn: Connection,
    /// Keeps a private WAL copy alive while we read it.
    _copy: Option<Arc<tempfile::TempDir>>,
    sql: String,
    names: HashMap<i64, String>,
    after: (i64, i64),
    page: std::vec::IntoIter<BagMessage>,
    done: bool,
}

impl SqliteMessages {
    fn fetch(&mut self) -> Result<Vec<BagMessage>, BagError> {
        let mut stmt = self
            .conn
            .prepare_cached(&self.sql)
            .map_err(|e| sql_err(&self.path, e))?;
        let rows = stmt
            .query_map(params![self.after.0, self.after.1], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, Vec<u8>>(3)?,
                ))
            })
            .map_err(|e| sql_err(&self.path, e))?;
        let mut out = Vec::with_capacity(PAGE);
        for row in rows {
            let (id, timestamp, topic_id, data) = row.map_err(|e| sql_err(&self.path, e))?;
            let topic = self.names.get(&topic_id).ok_or_else(|| BagError::Corrupt {
                path: self.path.clone(),
                message: format!("message {id} has topic_id {topic_id}, not in `topics`"),
            })?;
            self.after = (timestamp, id);
            out.push(BagMessage {
                topic: topic.clone(),
                timestamp_ns: timestamp,
                data,
            });
        }
        Ok(out)
    }
}

impl Iterator for SqliteMessages {
    type Item = Result<BagMessage, BagError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(m) = self.page.next() {
            return Some(Ok(m));
        }
        if self.done {
            return None;
        }
        match self.fetch() {
            Ok(page) => {
                self.done = page.len() < PAGE;
                self.page = page.into_iter();
                self.page.next().map(Ok)
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
