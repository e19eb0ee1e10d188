//! Reading real rosbag2 bags (recorded by rosbag2 itself and by tier4/nebula) and damaged
//! copies of them.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::{copy_dir, data_dir};
use lidar_ptq::bag::{Bag, BagError, BagMessage, Storage};

fn bag_dirs() -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        if dir.join("metadata.yaml").is_file() {
            out.push(dir.to_path_buf());
        }
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&data_dir().join("rosbag2"), &mut out);
    walk(&data_dir().join("velodyne"), &mut out);
    out.sort();
    out
}

fn all(bag: &Bag) -> Vec<BagMessage> {
    bag.messages(&[])
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| panic!("{}: {e}", bag.path().display()))
}

fn counts(msgs: &[BagMessage]) -> BTreeMap<String, u64> {
    let mut c = BTreeMap::new();
    for m in msgs {
        *c.entry(m.topic.clone()).or_insert(0) += 1;
    }
    c
}

/// Names and modification times of a directory's files.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u64, SystemTime)> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (e.path(), m.len(), m.modified().unwrap())
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_bag_directory_reads_as_its_metadata_says() {
    let dirs = bag_dirs();
    assert!(dirs.len() >= 13, "found only {} bags", dirs.len());
    for dir in dirs {
        let before = snapshot(&dir);
        let bag = Bag::open(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let md = bag
            .metadata()
            .expect("bag directories have metadata")
            .clone();
        let msgs = all(&bag);
        let name = dir.display();
        assert_eq!(msgs.len() as u64, md.message_count, "{name}");
        assert_eq!(bag.message_count(), md.message_count, "{name}");
        let got = counts(&msgs);
        for t in bag.topics() {
            assert_eq!(
                got.get(&t.name).copied().unwrap_or(0),
                t.message_count,
                "{name} topic {}",
                t.name
            );
        }
        for t in &md.topics {
            assert_eq!(
                got.get(&t.name).copied().unwrap_or(0),
                t.message_count,
                "{name}: metadata.yaml count of {}",
                t.name
            );
        }
        assert!(
            msgs.windows(2)
                .all(|w| w[0].timestamp_ns <= w[1].timestamp_ns),
            "{name}: messages out of time order"
        );
        match (msgs.first(), msgs.last()) {
            (Some(first), Some(last)) => {
                assert_eq!(Some(first.timestamp_ns), bag.start_ns(), "{name}");
                assert_eq!(Some(last.timestamp_ns), bag.end_ns(), "{name}");
                assert_eq!(
                    (last.timestamp_ns - first.timestamp_ns) as u64,
                    bag.duration_ns()
                );
            }
            _ => {
                assert_eq!(bag.start_ns(), None, "{name}");
                assert_eq!(bag.duration_ns(), 0);
            }
        }
        drop(bag);
        // Reading must leave read-only media untouched: no -wal/-shm, no journal.
        assert_eq!(
            snapshot(&dir),
            before,
            "{name}: reading changed the bag directory"
        );
    }
}

#[test]
fn single_storage_files_open_without_metadata() {
    let dir = data_dir().join("rosbag2/rosbag2_cpp/test/rosbag2_cpp/bags");
    for name in [
        "topics_and_services.mcap",
        "topics_and_services.db3",
        "only_services.mcap",
        "only_topics.mcap",
    ] {
        let bag = Bag::open(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(bag.metadata().is_none());
        let msgs = all(&bag);
        assert_eq!(msgs.len() as u64, bag.message_count(), "{name}");
        let got = counts(&msgs);
        let listed: u64 = bag.topics().iter().map(|t| t.message_count).sum();
        assert_eq!(listed, bag.message_count(), "{name}");
        for t in bag.topics() {
            assert_eq!(
                got.get(&t.name).copied().unwrap_or(0),
                t.message_count,
                "{name}"
            );
        }
    }
    // The same kind of recording in both storages: same topics and counts.
    let m = Bag::open(dir.join("topics_and_services.mcap")).unwrap();
    let s = Bag::open(dir.join("topics_and_services.db3")).unwrap();
    assert_eq!(m.storage(), Storage::Mcap);
    assert_eq!(s.storage(), Storage::Sqlite3);
    assert_eq!(counts(&all(&m)), counts(&all(&s)));
    let svc = m
        .topics()
        .iter()
        .find(|t| t.name.ends_with("/_service_event"))
        .expect("service event topic listed");
    assert!(svc.type_name.ends_with("_Event"), "{}", svc.type_name);
}

/// First `std_msgs/String` payload of a CDR message: header, u32 length incl. NUL, bytes.
fn cdr_string(data: &[u8]) -> String {
    assert_eq!(&data[..4], &[0, 1, 0, 0]);
    let len = u32::from_le_bytes(data[4..8].try_into().unwrap()) as usize;
    String::from_utf8(data[8..8 + len - 1].to_vec()).unwrap()
}

#[test]
fn talker_bags_give_their_strings_by_topic() {
    let root = data_dir().join("rosbag2/rosbag2_py/test/resources");
    // One recording stored both ways: both readers must agree byte for byte.
    let m = Bag::open(root.join("mcap/talker")).unwrap();
    let s = Bag::open(root.join("sqlite3/talker")).unwrap();
    assert_eq!(all(&m), all(&s));
    for (bag, first) in [
        (root.join("mcap/talker"), "Hello, world! 0"),
        (root.join("sqlite3/talker/talker.db3"), "Hello, world! 0"),
    ] {
        let b = Bag::open(&bag).unwrap();
        assert_eq!(all(&b).len(), 20);
        let topic: Vec<_> = b
            .messages(&["/topic"])
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(topic.len(), 10);
        assert!(topic.iter().all(|x| x.topic == "/topic"));
        assert_eq!(cdr_string(&topic[0].data), first);
        assert!(matches!(
            b.messages(&["/nope"]),
            Err(BagError::UnknownTopic(t)) if t == "/nope"
        ));
    }
}

#[test]
fn split_bag_merges_files_in_time_order() {
    let bag = Bag::open(data_dir().join("rosbag2/rosbag2_py/test/resources/mcap/wbag")).unwrap();
    assert_eq!(bag.files().len(), 5);
    let msgs = all(&bag);
    assert_eq!(msgs.len(), 6074);
    assert!(
        msgs.windows(2)
            .all(|w| w[0].timestamp_ns <= w[1].timestamp_ns)
    );
    let only: Vec<_> = bag
        .messages(&["AAA", "HHH"])
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(only.len(), 804 + 726);
}

#[test]
fn velodyne_bags_list_their_packets() {
    for (sensor, count) in [("vlp16", None), ("vlp32", None), ("vls128", Some(4))] {
        let dir = std::fs::read_dir(data_dir().join("velodyne").join(sensor))
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.is_dir())
            .unwrap();
        let bag = Bag::open(&dir).unwrap();
        let t = bag
            .topics()
            .iter()
            .find(|t| t.name.ends_with("/velodyne_packets"))
            .expect("packets topic");
        assert_eq!(t.type_name, "velodyne_msgs/msg/VelodyneScan");
        if let Some(n) = count {
            assert_eq!(t.message_count, n);
        }
        let msgs = all(&bag);
        assert_eq!(msgs.len() as u64, t.message_count);
        assert!(
            msgs.iter()
                .all(|m| m.data.len() > 1000 && m.data[..2] == [0, 1])
        );
    }
}

/// foxglove's conformance files: every layout (chunked or not, with or without indexes,
/// summary, statistics) must give the same messages as the expected JSON.
#[test]
fn mcap_conformance_files_give_expected_messages() {
    let mut checked = 0;
    for set in ["OneMessage", "TenMessages", "NoData"] {
        let dir = data_dir().join("mcap-conformance/data").join(set);
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_none_or(|x| x != "mcap") {
                continue;
            }
            let json: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(p.with_extension("json")).unwrap())
                    .unwrap();
            let mut expected: Vec<(i64, Vec<u8>)> = json["records"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["type"] == "Message")
                .map(|r| {
                    let f: BTreeMap<&str, &serde_json::Value> = r["fields"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|kv| (kv[0].as_str().unwrap(), &kv[1]))
                        .collect();
                    let t = f["log_time"].as_str().unwrap().parse().unwrap();
                    let d = f["data"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|b| b.as_str().unwrap().parse().unwrap())
                        .collect();
                    (t, d)
                })
                .collect();
            expected.sort_by_key(|x| x.0);
            let bag = Bag::open(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            let got: Vec<(i64, Vec<u8>)> = all(&bag)
                .into_iter()
                .map(|m| (m.timestamp_ns, m.data))
                .collect();
            assert_eq!(got, expected, "{}", p.display());
            assert_eq!(
                bag.message_count(),
                expected.len() as u64,
                "{}",
                p.display()
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} conformance files");
}

fn err_of(r: Result<Bag, BagError>) -> BagError {
    match r {
        Ok(_) => panic!("damaged bag opened without error"),
        Err(e) => e,
    }
}

#[test]
fn truncated_mcap_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr_test");
    copy_dir(
        &data_dir().join("rosbag2/rosbag2_tests/resources/mcap/cdr_test"),
        &dir,
    );
    let file = dir.join("cdr_test_0.mcap");
    let len = std::fs::metadata(&file).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    f.set_len(len / 2).unwrap();
    let e = err_of(Bag::open(&dir));
    assert!(matches!(e, BagError::Mcap { .. }), "{e:?}");
    assert!(e.to_string().contains("cdr_test_0.mcap"), "{e}");
}

#[test]
fn corrupt_chunk_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("talker");
    copy_dir(
        &data_dir().join("rosbag2/rosbag2_py/test/resources/mcap/talker"),
        &dir,
    );
    let file = dir.join("talker.mcap");
    let mut bytes = std::fs::read(&file).unwrap();
    // Scribble over the middle of the (zstd) chunk; the summary at the end stays valid.
    let summary = mcap::Summary::read(&bytes).unwrap().unwrap();
    let chunk = &summary.chunk_indexes[0];
    let mid = (chunk.chunk_start_offset + chunk.chunk_length / 2) as usize;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&file, bytes).unwrap();
    let bag = Bag::open(&dir).unwrap();
    let first_err = bag
        .messages(&[])
        .unwrap()
        .find_map(|r| r.err())
        .expect("reading a scribbled chunk must fail");
    assert!(first_err.to_string().contains("talker.mcap"), "{first_err}");
}

#[test]
fn corrupt_sqlite_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr_test");
    copy_dir(
        &data_dir().join("rosbag2/rosbag2_tests/resources/sqlite3/cdr_test"),
        &dir,
    );
    let file = dir.join("cdr_test_0.db3");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[..16].copy_from_slice(b"not a database!!");
    std::fs::write(&file, &bytes).unwrap();
    let e = err_of(Bag::open(&dir));
    assert!(matches!(e, BagError::Sqlite { .. }), "{e:?}");
    assert!(e.to_string().contains("cdr_test_0.db3"), "{e}");

    // Truncated to its first page: the tables' pages are gone.
    std::fs::write(
        &file,
        &std::fs::read(
            data_dir().join("rosbag2/rosbag2_tests/resources/sqlite3/cdr_test/cdr_test_0.db3"),
        )
        .unwrap()[..4096],
    )
    .unwrap();
    let e = err_of(Bag::open(&dir));
    assert!(e.to_string().contains("cdr_test_0.db3"), "{e}");
}

#[test]
fn missing_file_and_bad_metadata_are_errors_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("cdr_test");
    copy_dir(
        &data_dir().join("rosbag2/rosbag2_tests/resources/mcap/cdr_test"),
        &dir,
    );
    std::fs::remove_file(dir.join("cdr_test_0.mcap")).unwrap();
    let e = err_of(Bag::open(&dir));
    assert!(matches!(e, BagError::Io { .. }), "{e:?}");
    assert!(e.to_string().contains("cdr_test_0.mcap"), "{e}");

    std::fs::write(
        dir.join("metadata.yaml"),
        "rosbag2_bagfile_information:\n  version: [\n",
    )
    .unwrap();
    let e = err_of(Bag::open(&dir));
    assert!(matches!(e, BagError::Metadata { .. }), "{e:?}");
    assert!(e.to_string().contains("metadata.yaml"), "{e}");

    let e = err_of(Bag::open(tmp.path().join("nothing_here")));
    assert!(e.to_string().contains("nothing_here"), "{e}");
    let empty = tmp.path().join("empty_dir");
    std::fs::create_dir(&empty).unwrap();
    assert!(matches!(err_of(Bag::open(&empty)), BagError::NotABag(_)));
}

/// rosbag2 records sqlite in WAL mode; a recorder that died leaves messages only in the
/// `-wal` file. Those must be read, and the bag's own directory left alone.
#[test]
fn sqlite_messages_only_in_the_wal_are_read() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    std::fs::create_dir(&live).unwrap();
    let db = live.join("crash_0.db3");
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0;
         CREATE TABLE topics(id INTEGER PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
           serialization_format TEXT NOT NULL, offered_qos_profiles TEXT NOT NULL);
         CREATE TABLE messages(id INTEGER PRIMARY KEY, topic_id INTEGER NOT NULL,
           timestamp INTEGER NOT NULL, data BLOB NOT NULL);
         INSERT INTO topics VALUES (1, '/a', 'std_msgs/msg/String', 'cdr', '');",
    )
    .unwrap();
    for i in 0..50i64 {
        conn.execute(
            "INSERT INTO messages(topic_id, timestamp, data) VALUES (1, ?1, ?2)",
            rusqlite::params![1000 - i, vec![i as u8; 8]],
        )
        .unwrap();
    }
    // Copy while the writer is still open: the WAL is not checkpointed into the db file.
    let crashed = tmp.path().join("crashed");
    copy_dir(&live, &crashed);
    drop(conn);
    std::fs::remove_file(crashed.join("crash_0.db3-shm")).ok();
    assert!(
        std::fs::metadata(crashed.join("crash_0.db3-wal"))
            .unwrap()
            .len()
            > 0
    );

    let before = snapshot(&crashed);
    let bag = Bag::open(crashed.join("crash_0.db3")).unwrap();
    assert_eq!(bag.message_count(), 50);
    let msgs = all(&bag);
    assert_eq!(msgs.len(), 50);
    assert_eq!(msgs[0].timestamp_ns, 951);
    assert_eq!(msgs[0].data, vec![49u8; 8]);
    assert_eq!(msgs[49].timestamp_ns, 1000);
    drop(bag);
    assert_eq!(
        snapshot(&crashed),
        before,
        "reading changed the bag directory"
    );
}

/// `compression_mode: FILE`: each storage file zstd-compressed whole, split bags too.
#[test]
fn whole_file_zstd_bags_read_like_the_originals() {
    let tmp = tempfile::tempdir().unwrap();
    for (src, files) in [
        ("rosbag2_py/test/resources/mcap/wbag", 5),
        ("rosbag2_tests/resources/sqlite3/cdr_test", 1),
    ] {
        let src = data_dir().join("rosbag2").join(src);
        let dst = tmp.path().join(src.file_name().unwrap());
        std::fs::create_dir(&dst).unwrap();
        let original = Bag::open(&src).unwrap();
        let mut md = std::fs::read_to_string(src.join("metadata.yaml")).unwrap();
        for f in original.files() {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let packed = zstd::encode_all(std::fs::File::open(f).unwrap(), 3).unwrap();
            std::fs::write(dst.join(format!("{name}.zstd")), packed).unwrap();
            md = md.replace(&name, &format!("{name}.zstd"));
        }
        md = md
            .replace("compression_format: ''", "compression_format: zstd")
            .replace("compression_mode: ''", "compression_mode: FILE")
            .replace("compression_format: \"\"", "compression_format: zstd")
            .replace("compression_mode: \"\"", "compression_mode: FILE");
        std::fs::write(dst.join("metadata.yaml"), md).unwrap();
        let packed = Bag::open(&dst).unwrap();
        assert_eq!(packed.files().len(), files);
        assert_eq!(all(&packed), all(&original), "{}", dst.display());
        // Damage: a truncated compressed file names itself.
        let victim = packed.files()[0].to_path_buf();
        drop(packed);
        let bytes = std::fs::read(&victim).unwrap();
        std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
        let e = err_of(Bag::open(&dst));
        let shown = victim.file_name().unwrap().to_string_lossy().into_owned();
        assert!(e.to_string().contains(&shown), "{e}");
    }
}
