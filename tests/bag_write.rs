//! Bags written by `BagWriter`, read back by our reader and, independently, by the
//! reference Python readers (`mcap` + `mcap-ros2-support`, and `rosbags`).

mod common;

use std::path::Path;

use lidar_ptq::bag::{
    Bag, BagError, BagMessage, BagWriter, ChunkCompression, Durability, Qos, Reliability,
    WriterOptions,
};
use lidar_ptq::cdr::CdrWriter;

const STRING_MSG: &str = "# Example string\nstring data\n";
const TIME_MSG: &str = "int32 sec\nuint32 nanosec\n";
const T0: i64 = 1_700_000_000_123_456_789;

fn string_cdr(s: &str) -> Vec<u8> {
    let mut w = CdrWriter::new();
    w.string(s);
    w.finish()
}

fn time_cdr(sec: i32, nanosec: u32) -> Vec<u8> {
    let mut w = CdrWriter::new();
    w.i32(sec);
    w.u32(nanosec);
    w.finish()
}

fn best_effort() -> Qos {
    Qos {
        reliability: Reliability::BestEffort,
        durability: Durability::Volatile,
        depth: 5,
        ..Qos::default()
    }
}

/// Writes `n` string messages (about 1 KiB each, so several 1 MiB chunks) interleaved with
/// time messages; returns what was written, in write order.
fn write_bag(dir: &Path, n: usize, compression: ChunkCompression) -> Vec<BagMessage> {
    let mut w = BagWriter::create(
        dir,
        WriterOptions {
            compression,
            ..WriterOptions::default()
        },
    )
    .unwrap();
    w.add_topic(
        "/chatter",
        "std_msgs/msg/String",
        STRING_MSG,
        &[best_effort()],
    )
    .unwrap();
    w.add_topic(
        "/clock_like",
        "builtin_interfaces/msg/Time",
        TIME_MSG,
        &[Qos::default()],
    )
    .unwrap();
    let mut written = Vec::new();
    for i in 0..n {
        let t = T0 + i as i64 * 10_000_000;
        let text = format!("message {i} {}", "x".repeat(1000));
        let data = string_cdr(&text);
        w.write("/chatter", t, &data).unwrap();
        written.push(BagMessage {
            topic: "/chatter".into(),
            timestamp_ns: t,
            data,
        });
        if i % 10 == 0 {
            let data = time_cdr(i as i32, 7 * i as u32);
            w.write("/clock_like", t + 5, &data).unwrap();
            written.push(BagMessage {
                topic: "/clock_like".into(),
                timestamp_ns: t + 5,
                data,
            });
        }
    }
    assert!(!dir.exists(), "the bag must not appear before finish");
    assert_eq!(w.finish().unwrap(), dir);
    written
}

#[test]
fn written_bag_reads_back_with_our_reader() {
    for compression in [
        ChunkCompression::None,
        ChunkCompression::Zstd,
        ChunkCompression::Lz4,
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out_bag");
        let written = write_bag(&dir, 1500, compression);
        // Exactly the bag, nothing left beside it.
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["out_bag"]);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, vec!["metadata.yaml", "out_bag_0.mcap"]);

        let yaml = std::fs::read_to_string(dir.join("metadata.yaml")).unwrap();
        assert!(yaml.starts_with("rosbag2_bagfile_information:"), "{yaml}");
        assert!(yaml.contains("ros_distro: jazzy"), "{yaml}");
        let bag = Bag::open(&dir).unwrap();
        let md = bag.metadata().unwrap();
        assert_eq!(md.version, 9);
        assert_eq!(md.storage_identifier, "mcap");
        assert_eq!(md.message_count, 1650);
        assert_eq!(md.starting_time_ns, T0);
        assert_eq!(md.duration_ns, 1499 * 10_000_000);
        assert_eq!(md.files[0].message_count, 1650);
        assert_eq!(bag.start_ns(), Some(T0));
        assert_eq!(bag.end_ns(), Some(T0 + 1499 * 10_000_000));
        let chatter = bag.topic("/chatter").unwrap();
        assert_eq!(chatter.message_count, 1500);
        assert_eq!(chatter.offered_qos_profiles, vec![best_effort()]);
        assert_eq!(chatter.serialization_format, "cdr");
        assert_eq!(bag.topic("/clock_like").unwrap().message_count, 150);
        let read: Vec<_> = bag
            .messages(&[])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(read, written, "{compression:?}");

        // rosbag2 chunks at 1 MiB: 1.5 MB of messages needs at least 2 chunks.
        let bytes = std::fs::read(dir.join("out_bag_0.mcap")).unwrap();
        let summary = mcap::Summary::read(&bytes).unwrap().unwrap();
        assert!(summary.chunk_indexes.len() >= 2);
        let expected = match compression {
            ChunkCompression::None => "",
            ChunkCompression::Zstd => "zstd",
            ChunkCompression::Lz4 => "lz4",
        };
        assert!(
            summary
                .chunk_indexes
                .iter()
                .all(|c| c.compression == expected)
        );
    }
}

#[test]
fn writer_is_atomic_and_checks_its_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("abandoned");
    {
        let mut w = BagWriter::create(&dir, WriterOptions::default()).unwrap();
        w.add_topic("/a", "std_msgs/msg/String", STRING_MSG, &[])
            .unwrap();
        w.write("/a", 5, &string_cdr("hi")).unwrap();
        assert!(matches!(
            w.add_topic("/a", "std_msgs/msg/String", STRING_MSG, &[]),
            Err(BagError::DuplicateTopic(_))
        ));
        assert!(matches!(
            w.write("/b", 5, &[]),
            Err(BagError::UnknownTopic(_))
        ));
        assert!(matches!(
            w.write("/a", -1, &[]),
            Err(BagError::NegativeTimestamp { .. })
        ));
        // Dropped without finish.
    }
    assert_eq!(
        std::fs::read_dir(tmp.path()).unwrap().count(),
        0,
        "leftovers"
    );

    std::fs::create_dir(&dir).unwrap();
    let e = BagWriter::create(&dir, WriterOptions::default())
        .err()
        .unwrap();
    assert!(e.to_string().contains("abandoned"), "{e}");

    // An empty bag is valid: rosbag2 marks it with the largest start time.
    let empty = tmp.path().join("empty");
    let mut w = BagWriter::create(&empty, WriterOptions::default()).unwrap();
    w.add_topic("/a", "std_msgs/msg/String", STRING_MSG, &[])
        .unwrap();
    w.finish().unwrap();
    let bag = Bag::open(&empty).unwrap();
    assert_eq!(bag.message_count(), 0);
    assert_eq!(bag.metadata().unwrap().starting_time_ns, i64::MAX);
    assert_eq!(bag.topics().len(), 1);
    assert_eq!(bag.messages(&[]).unwrap().count(), 0);
}

/// The independent check: what the reference readers see in our bag.
const PY_READERS: &str = r#"
import json, sys
from pathlib import Path
bag = Path(sys.argv[1])
out = {}

# (a) foxglove's mcap reader + mcap-ros2-support decoder.
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
with open(bag / (bag.name + "_0.mcap"), "rb") as f:
    r = make_reader(f, decoder_factories=[DecoderFactory()])
    out["profile"] = r.get_header().profile
    s = r.get_summary()
    out["schemas"] = sorted([sc.name, sc.encoding, sc.data.decode()] for sc in s.schemas.values())
    out["channels"] = sorted(
        [c.topic, c.message_encoding, s.schemas[c.schema_id].name, "offered_qos_profiles" in c.metadata]
        for c in s.channels.values())
    out["mcap_count"] = s.statistics.message_count
    out["chunks"] = len(s.chunk_indexes)
    md = [m for m in r.iter_metadata() if m.name == "rosbag2"]
    out["rosbag2_records"] = len(md)
    out["rosbag2_record"] = md[0].metadata["serialized_metadata"] if md else ""
    first = {}
    n = 0
    for schema, channel, message, decoded in r.iter_decoded_messages(log_time_order=True):
        n += 1
        if channel.topic not in first:
            if channel.topic == "/chatter":
                first[channel.topic] = [message.log_time, decoded.data[:12]]
            else:
                first[channel.topic] = [message.log_time, decoded.sec, decoded.nanosec]
    out["decoded_count"] = n
    out["decoded_first"] = first
    schema_texts = {sc.name: sc.data.decode() for sc in s.schemas.values()}

# (b) rosbags: opens the bag directory through metadata.yaml.
from rosbags.rosbag2 import Reader
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
store = get_typestore(Stores.EMPTY)
for name, text in schema_texts.items():
    store.register(get_types_from_msg(text, name))
with Reader(bag) as reader:
    out["rb_count"] = reader.message_count
    out["rb_start"] = reader.start_time
    out["rb_end"] = reader.end_time
    out["rb_duration"] = reader.duration
    out["rb_topics"] = sorted([k, v.msgtype, v.msgcount] for k, v in reader.topics.items())
    qos = {c.topic: [q.reliability.name.lower(), q.durability.name.lower(), q.depth]
           for c in reader.connections for q in c.ext.offered_qos_profiles}
    out["rb_qos"] = qos
    texts = []
    for conn, t, raw in reader.messages(connections=[c for c in reader.connections if c.topic == "/chatter"]):
        msg = store.deserialize_cdr(raw, conn.msgtype)
        texts.append([t, msg.data[:12]])
    out["rb_chatter_first"] = texts[0]
    out["rb_chatter_n"] = len(texts)
print(json.dumps(out))
"#;

#[test]
fn reference_python_readers_accept_our_bag() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("py_bag");
    write_bag(&dir, 1200, ChunkCompression::Zstd);
    let out = common::run_python(PY_READERS, &[&dir]);
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("python printed JSON");

    assert_eq!(v["profile"], "ros2");
    assert_eq!(
        v["schemas"],
        serde_json::json!([
            ["builtin_interfaces/msg/Time", "ros2msg", TIME_MSG],
            ["std_msgs/msg/String", "ros2msg", STRING_MSG]
        ])
    );
    assert_eq!(
        v["channels"],
        serde_json::json!([
            ["/chatter", "cdr", "std_msgs/msg/String", true],
            ["/clock_like", "cdr", "builtin_interfaces/msg/Time", true]
        ])
    );
    assert_eq!(v["mcap_count"], 1320);
    assert!(v["chunks"].as_u64().unwrap() >= 2);
    assert_eq!(v["rosbag2_records"], 1);
    let record = v["rosbag2_record"].as_str().unwrap();
    let inner = lidar_ptq::bag::BagMetadata::from_inner_yaml(record).unwrap();
    assert_eq!(inner.message_count, 1320);
    assert_eq!(inner.topics.len(), 2);

    assert_eq!(v["decoded_count"], 1320);
    assert_eq!(
        v["decoded_first"]["/chatter"],
        serde_json::json!([T0, "message 0 xx"])
    );
    assert_eq!(
        v["decoded_first"]["/clock_like"],
        serde_json::json!([T0 + 5, 0, 0])
    );

    assert_eq!(v["rb_count"], 1320);
    assert_eq!(v["rb_start"], T0);
    assert_eq!(v["rb_end"], T0 + 1199 * 10_000_000 + 1);
    assert_eq!(
        v["rb_topics"],
        serde_json::json!([
            ["/chatter", "std_msgs/msg/String", 1200],
            ["/clock_like", "builtin_interfaces/msg/Time", 120]
        ])
    );
    assert_eq!(
        v["rb_qos"]["/chatter"],
        serde_json::json!(["best_effort", "volatile", 5])
    );
    assert_eq!(
        v["rb_qos"]["/clock_like"],
        serde_json::json!(["reliable", "volatile", 10])
    );
    assert_eq!(v["rb_chatter_n"], 1200);
    assert_eq!(
        v["rb_chatter_first"],
        serde_json::json!([T0, "message 0 xx"])
    );
}

/// rosbag2 leaves uncompressed chunks without a CRC, but ours carry one, and with no codec
/// to notice damage the reader must check it.
#[test]
fn flipped_bit_in_uncompressed_chunk_is_caught_by_its_crc() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("crc_bag");
    write_bag(&dir, 20, ChunkCompression::None);
    let file = dir.join("crc_bag_0.mcap");
    let mut bytes = std::fs::read(&file).unwrap();
    let summary = mcap::Summary::read(&bytes).unwrap().unwrap();
    let chunk = &summary.chunk_indexes[0];
    assert_eq!(chunk.compression, "");
    // Last byte of the chunk's data: message payload, not record framing.
    let at = (chunk.compressed_data_offset().unwrap() + chunk.compressed_size - 1) as usize;
    bytes[at] ^= 0x01;
    std::fs::write(&file, bytes).unwrap();
    let bag = Bag::open(&dir).unwrap();
    let e = bag
        .messages(&[])
        .unwrap()
        .find_map(|r| r.err())
        .expect("a flipped bit must be an error");
    assert!(matches!(e, BagError::Corrupt { .. }), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("crc_bag_0.mcap") && text.contains("CRC"),
        "{text}"
    );
}
