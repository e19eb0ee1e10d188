//! `metadata.yaml` of a rosbag2 bag (versions 1-9) and the QoS profiles it carries.
//!
//! Fields appeared over versions (`files` in 5, `custom_data` in 6, `type_description_hash`
//! in 7, `ros_distro` in 8; in 9 `offered_qos_profiles` became a YAML list with policy
//! names instead of a YAML document in a string), so everything past version 4 is optional
//! when reading. Writing always produces version 9, as Jazzy does.

use serde::{Deserialize, Serialize};

/// Newest metadata version we read, and the one we write (Jazzy's).
pub const METADATA_VERSION: u32 = 9;

/// rosbag2 writes infinite durations as this `{sec, nsec}` pair (`RMW_DURATION_INFINITE`).
pub const INFINITE_SEC: i64 = 9_223_372_036;
pub const INFINITE_NSEC: i64 = 854_775_807;

/// The parsed `rosbag2_bagfile_information`.
#[derive(Debug, Clone, PartialEq)]
pub struct BagMetadata {
    pub version: u32,
    pub storage_identifier: String,
    pub relative_file_paths: Vec<String>,
    pub duration_ns: u64,
    pub starting_time_ns: i64,
    pub message_count: u64,
    pub topics: Vec<TopicEntry>,
    pub compression_format: String,
    pub compression_mode: String,
    pub files: Vec<FileEntry>,
    pub ros_distro: String,
}

/// One `topics_with_message_count` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicEntry {
    pub name: String,
    pub type_name: String,
    pub serialization_format: String,
    pub offered_qos_profiles: Vec<Qos>,
    pub type_description_hash: String,
    pub message_count: u64,
}

/// One `files` entry (version 5 and newer).
#[derive(Debug, Clone, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub starting_time_ns: i64,
    pub duration_ns: u64,
    pub message_count: u64,
}

/// Why a metadata document could not be used.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    #[error("YAML: {0}")]
    Yaml(String),
    #[error("metadata version {0} is newer than the newest supported ({METADATA_VERSION})")]
    Version(u32),
    #[error("topic {topic}: offered_qos_profiles: {message}")]
    Qos { topic: String, message: String },
    #[error("{field} is {value}, must not be negative")]
    Negative { field: &'static str, value: i64 },
}

/// A ROS 2 QoS profile as rosbag2 records it per publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Qos {
    pub history: History,
    pub depth: u64,
    pub reliability: Reliability,
    pub durability: Durability,
    pub deadline: QosDuration,
    pub lifespan: QosDuration,
    pub liveliness: Liveliness,
    pub liveliness_lease_duration: QosDuration,
    pub avoid_ros_namespace_conventions: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QosDuration {
    pub sec: i64,
    pub nsec: i64,
}

impl QosDuration {
    pub const INFINITE: QosDuration = QosDuration {
        sec: INFINITE_SEC,
        nsec: INFINITE_NSEC,
    };
}

impl Default for Qos {
    /// What a default rclcpp publisher offers (keep last 10, reliable, volatile).
    fn default() -> Self {
        Qos {
            history: History::KeepLast,
            depth: 10,
            reliability: Reliability::Reliable,
            durability: Durability::Volatile,
            deadline: QosDuration::INFINITE,
            lifespan: QosDuration::INFINITE,
            liveliness: Liveliness::Automatic,
            liveliness_lease_duration: QosDuration::INFINITE,
            avoid_ros_namespace_conventions: false,
        }
    }
}

/// Declares a QoS policy enum with its rmw numbers and the names version 9 writes.
macro_rules! policy {
    ($name:ident { $($variant:ident = $num:literal, $text:literal;)* } unknown = $unk:ident) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum $name { $($variant),* }
        impl $name {
            pub fn number(self) -> i64 { match self { $(Self::$variant => $num),* } }
            pub fn name(self) -> &'static str { match self { $(Self::$variant => $text),* } }
            /// Unknown numbers and names map to the policy's `unknown`, as rosbag2 does.
            fn from_value(v: &PolicyValue) -> Self {
                match v {
                    $(PolicyValue::Number($num) => Self::$variant,)*
                    PolicyValue::Name(s) => match s.to_ascii_lowercase().as_str() {
                        $($text => Self::$variant,)*
                        _ => Self::$unk,
                    },
                    PolicyValue::Number(_) => Self::$unk,
                }
            }
        }
    };
}

policy!(History {
    SystemDefault = 0, "system_default";
    KeepLast = 1, "keep_last";
    KeepAll = 2, "keep_all";
    Unknown = 3, "unknown";
} unknown = Unknown);

policy!(Reliability {
    SystemDefault = 0, "system_default";
    Reliable = 1, "reliable";
    BestEffort = 2, "best_effort";
    Unknown = 3, "unknown";
    BestAvailable = 4, "best_available";
} unknown = Unknown);

policy!(Durability {
    SystemDefault = 0, "system_default";
    TransientLocal = 1, "transient_local";
    Volatile = 2, "volatile";
    Unknown = 3, "unknown";
    BestAvailable = 4, "best_available";
} unknown = Unknown);

policy!(Liveliness {
    SystemDefault = 0, "system_default";
    Automatic = 1, "automatic";
    ManualByNode = 2, "manual_by_node";
    ManualByTopic = 3, "manual_by_topic";
    Unknown = 4, "unknown";
    BestAvailable = 5, "best_available";
} unknown = Unknown);

// ---- YAML shapes ----

#[derive(Deserialize, Serialize)]
struct Document {
    rosbag2_bagfile_information: Info,
}

#[derive(Deserialize, Serialize)]
struct Info {
    version: u32,
    storage_identifier: String,
    duration: Nanoseconds,
    starting_time: SinceEpoch,
    message_count: u64,
    #[serde(default)]
    topics_with_message_count: Vec<TopicWithCount>,
    #[serde(default)]
    compression_format: String,
    #[serde(default)]
    compression_mode: String,
    #[serde(default)]
    relative_file_paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    files: Option<Vec<FileYaml>>,
    #[serde(default)]
    custom_data: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ros_distro: Option<String>,
}

#[derive(Deserialize, Serialize)]
struct Nanoseconds {
    nanoseconds: i64,
}

#[derive(Deserialize, Serialize)]
struct SinceEpoch {
    nanoseconds_since_epoch: i64,
}

#[derive(Deserialize, Serialize)]
struct TopicWithCount {
    topic_metadata: TopicYaml,
    message_count: u64,
}

#[derive(Deserialize, Serialize)]
struct TopicYaml {
    name: String,
    #[serde(rename = "type")]
    type_name: String,
    #[serde(default)]
    serialization_format: String,
    #[serde(default)]
    offered_qos_profiles: QosField,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    type_description_hash: Option<String>,
}

#[derive(Deserialize, Serialize)]
struct FileYaml {
    path: String,
    starting_time: SinceEpoch,
    duration: Nanoseconds,
    message_count: u64,
}

/// Up to version 8 a YAML document inside a string, from version 9 a plain list.
#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum QosField {
    List(Vec<QosYaml>),
    Text(String),
}

impl Default for QosField {
    fn default() -> Self {
        QosField::Text(String::new())
    }
}

#[derive(Deserialize, Serialize)]
#[serde(untagged)]
enum PolicyValue {
    Number(i64),
    Name(String),
}

#[derive(Deserialize, Serialize)]
struct QosYaml {
    history: PolicyValue,
    depth: u64,
    reliability: PolicyValue,
    durability: PolicyValue,
    deadline: QosDuration,
    lifespan: QosDuration,
    liveliness: PolicyValue,
    liveliness_lease_duration: QosDuration,
    avoid_ros_namespace_conventions: bool,
}

impl QosYaml {
    fn to_qos(&self) -> Qos {
        Qos {
            history: History::from_value(&self.history),
            depth: self.depth,
            reliability: Reliability::from_value(&self.reliability),
            durability: Durability::from_value(&self.durability),
            deadline: self.deadline,
            lifespan: self.lifespan,
            liveliness: Liveliness::from_value(&self.liveliness),
            liveliness_lease_duration: self.liveliness_lease_duration,
            avoid_ros_namespace_conventions: self.avoid_ros_namespace_conventions,
        }
    }

    fn from_qos(q: &Qos) -> Self {
        QosYaml {
            history: PolicyValue::Name(q.history.name().into()),
            depth: q.depth,
            reliability: PolicyValue::Name(q.reliability.name().into()),
            durability: PolicyValue::Name(q.durability.name().into()),
            deadline: q.deadline,
            lifespan: q.lifespan,
            liveliness: PolicyValue::Name(q.liveliness.name().into()),
            liveliness_lease_duration: q.liveliness_lease_duration,
            avoid_ros_namespace_conventions: q.avoid_ros_namespace_conventions,
        }
    }
}

/// Parses `offered_qos_profiles` in either form (a string holding YAML, or a list).
pub fn parse_qos_text(text: &str) -> Result<Vec<Qos>, String> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let list: Vec<QosYaml> = serde_saphyr::from_str(text).map_err(|e| e.to_string())?;
    Ok(list.iter().map(QosYaml::to_qos).collect())
}

fn parse_qos_field(field: &QosField) -> Result<Vec<Qos>, String> {
    match field {
        QosField::List(list) => Ok(list.iter().map(QosYaml::to_qos).collect()),
        QosField::Text(text) => parse_qos_text(text),
    }
}

/// Serialises QoS profiles as version 9 writes them into MCAP channel metadata.
pub fn qos_to_text(profiles: &[Qos]) -> String {
    if profiles.is_empty() {
        return String::new();
    }
    let list: Vec<QosYaml> = profiles.iter().map(QosYaml::from_qos).collect();
    serde_saphyr::to_string(&list)
        .expect("QoS profiles are plain data and always serialise")
        .trim_end()
        .to_string()
}

fn non_negative(field: &'static str, value: i64) -> Result<u64, MetadataError> {
    u64::try_from(value).map_err(|_| MetadataError::Negative { field, value })
}

impl BagMetadata {
    /// Parses a whole `metadata.yaml` (top key `rosbag2_bagfile_information`).
    pub fn from_yaml(text: &str) -> Result<Self, MetadataError> {
        let doc: Document =
            serde_saphyr::from_str(text).map_err(|e| MetadataError::Yaml(e.to_string()))?;
        Self::from_info(doc.rosbag2_bagfile_information)
    }

    /// Parses the inner mapping alone, as stored in the MCAP `rosbag2` metadata record.
    pub fn from_inner_yaml(text: &str) -> Result<Self, MetadataError> {
        let info: Info =
            serde_saphyr::from_str(text).map_err(|e| MetadataError::Yaml(e.to_string()))?;
        Self::from_info(info)
    }

    fn from_info(info: Info) -> Result<Self, MetadataError> {
        if info.version > METADATA_VERSION {
            return Err(MetadataError::Version(info.version));
        }
        let topics =
            info.topics_with_message_count
                .into_iter()
                .map(|t| {
                    let qos = parse_qos_field(&t.topic_metadata.offered_qos_profiles).map_err(
                        |message| MetadataError::Qos {
                            topic: t.topic_metadata.name.clone(),
                            message,
                        },
                    )?;
                    Ok(TopicEntry {
                        name: t.topic_metadata.name,
                        type_name: t.topic_metadata.type_name,
                        serialization_format: t.topic_metadata.serialization_format,
                        offered_qos_profiles: qos,
                        type_description_hash: t
                            .topic_metadata
                            .type_description_hash
                            .unwrap_or_default(),
                        message_count: t.message_count,
                    })
                })
                .collect::<Result<Vec<_>, MetadataError>>()?;
        let files = info
            .files
            .unwrap_or_default()
            .into_iter()
            .map(|f| {
                Ok(FileEntry {
                    path: f.path,
                    starting_time_ns: f.starting_time.nanoseconds_since_epoch,
                    duration_ns: non_negative("files.duration", f.duration.nanoseconds)?,
                    message_count: f.message_count,
                })
            })
            .collect::<Result<Vec<_>, MetadataError>>()?;
        Ok(BagMetadata {
            version: info.version,
            storage_identifier: info.storage_identifier,
            relative_file_paths: info.relative_file_paths,
            duration_ns: non_negative("duration", info.duration.nanoseconds)?,
            starting_time_ns: info.starting_time.nanoseconds_since_epoch,
            message_count: info.message_count,
            topics,
            compression_format: info.compression_format,
            compression_mode: info.compression_mode,
            files,
            ros_distro: info.ros_distro.unwrap_or_default(),
        })
    }

    fn to_info(&self) -> Info {
        Info {
            version: METADATA_VERSION,
            storage_identifier: self.storage_identifier.clone(),
            duration: Nanoseconds {
                nanoseconds: self.duration_ns as i64,
            },
            starting_time: SinceEpoch {
                nanoseconds_since_epoch: self.starting_time_ns,
            },
            message_count: self.message_count,
            topics_with_message_count: self
                .topics
                .iter()
                .map(|t| TopicWithCount {
                    topic_metadata: TopicYaml {
                        name: t.name.clone(),
                        type_name: t.type_name.clone(),
                        serialization_format: t.serialization_format.clone(),
                        offered_qos_profiles: QosField::List(
                            t.offered_qos_profiles
                                .iter()
                                .map(QosYaml::from_qos)
                                .collect(),
                        ),
                        type_description_hash: Some(t.type_description_hash.clone()),
                    },
                    message_count: t.message_count,
                })
                .collect(),
            compression_format: self.compression_format.clone(),
            compression_mode: self.compression_mode.clone(),
            relative_file_paths: self.relative_file_paths.clone(),
            files: Some(
                self.files
                    .iter()
                    .map(|f| FileYaml {
                        path: f.path.clone(),
                        starting_time: SinceEpoch {
                            nanoseconds_since_epoch: f.starting_time_ns,
                        },
                        duration: Nanoseconds {
                            nanoseconds: f.duration_ns as i64,
                        },
                        message_count: f.message_count,
                    })
                    .collect(),
            ),
            custom_data: None,
            ros_distro: Some(self.ros_distro.clone()),
        }
    }

    /// The whole `metadata.yaml` text, in version 9.
    pub fn to_yaml(&self) -> String {
        let doc = Document {
            rosbag2_bagfile_information: self.to_info(),
        };
        serde_saphyr::to_string(&doc).expect("bag metadata is plain data and always serialises")
    }

    /// The inner mapping alone, as rosbag2 stores it in the MCAP `rosbag2` record.
    pub fn to_inner_yaml(&self) -> String {
        serde_saphyr::to_string(&self.to_info())
            .expect("bag metadata is plain data and always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V5: &str = "rosbag2_bagfile_information:\n  version: 5\n  storage_identifier: sqlite3\n  duration:\n    nanoseconds: 263164997\n  starting_time:\n    nanoseconds_since_epoch: 1585897255313147068\n  message_count: 4\n  topics_with_message_count:\n    - topic_metadata:\n        name: /velodyne_packets\n        type: velodyne_msgs/msg/VelodyneScan\n        serialization_format: \"\"\n        offered_qos_profiles: \"- history: 3\\n  depth: 0\\n  reliability: 1\\n  durability: 2\\n  deadline:\\n    sec: 0\\n    nsec: 0\\n  lifespan:\\n    sec: 0\\n    nsec: 0\\n  liveliness: 1\\n  liveliness_lease_duration:\\n    sec: 0\\n    nsec: 0\\n  avoid_ros_namespace_conventions: false\"\n      message_count: 4\n  compression_format: \"\"\n  compression_mode: \"\"\n  relative_file_paths:\n    - a_0.db3\n  files:\n    - path: a_0.db3\n      starting_time:\n        nanoseconds_since_epoch: 1585897255313147068\n      duration:\n        nanoseconds: 263164997\n      message_count: 4\n";

    #[test]
    fn parses_version_5_with_qos_string() {
        let m = BagMetadata::from_yaml(V5).unwrap();
        assert_eq!(m.version, 5);
        assert_eq!(m.message_count, 4);
        assert_eq!(m.starting_time_ns, 1585897255313147068);
        assert_eq!(m.topics[0].name, "/velodyne_packets");
        let q = m.topics[0].offered_qos_profiles[0];
        assert_eq!(q.history, History::Unknown);
        assert_eq!(q.reliability, Reliability::Reliable);
        assert_eq!(q.durability, Durability::Volatile);
        assert_eq!(m.files[0].path, "a_0.db3");
    }

    #[test]
    fn version_9_round_trips_with_named_policies() {
        let mut m = BagMetadata::from_yaml(V5).unwrap();
        m.topics[0].offered_qos_profiles = vec![Qos {
            reliability: Reliability::BestEffort,
            durability: Durability::TransientLocal,
            ..Qos::default()
        }];
        let text = m.to_yaml();
        assert!(text.contains("best_effort"), "{text}");
        let back = BagMetadata::from_yaml(&text).unwrap();
        assert_eq!(back.version, 9);
        assert_eq!(back.topics, m.topics);
        assert_eq!(back.files, m.files);
        assert_eq!(back.duration_ns, m.duration_ns);
        let inner = BagMetadata::from_inner_yaml(&m.to_inner_yaml()).unwrap();
        assert_eq!(inner.topics, m.topics);
    }

    #[test]
    fn rejects_future_version_and_bad_yaml() {
        let future = V5.replace("version: 5", "version: 10");
        assert!(matches!(
            BagMetadata::from_yaml(&future),
            Err(MetadataError::Version(10))
        ));
        assert!(matches!(
            BagMetadata::from_yaml("rosbag2_bagfile_information: [1, 2"),
            Err(MetadataError::Yaml(_))
        ));
        let bad_qos = V5.replace("depth: 0", "depth: [");
        assert!(matches!(
            BagMetadata::from_yaml(&bad_qos),
            Err(MetadataError::Qos { .. })
        ));
    }

    #[test]
    fn qos_text_round_trips() {
        let q = vec![
            Qos::default(),
            Qos {
                history: History::KeepAll,
                ..Qos::default()
            },
        ];
        assert_eq!(parse_qos_text(&qos_to_text(&q)).unwrap(), q);
        assert!(parse_qos_text("").unwrap().is_empty());
    }
}
