//! Simulated drives written as rosbag2 bags: deterministic bytes, and what is read back
//! (PointCloud2 and Detection3DArray through our own readers) equals what was simulated.

use lidar_ptq::bag::Bag;
use lidar_ptq::cloud::{DecodeOptions, PointCloud2, decode};
use lidar_ptq::msgs::Detection3DArray;
use lidar_ptq::sim::record::{RecordOptions, record};
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};

fn bag_bytes(dir: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect()
}

#[test]
fn same_seed_same_bag_bytes_and_content_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SimConfig::new(LidarModel::Vlp16);
    let opts = RecordOptions {
        frames: 3,
        ..Default::default()
    };
    let scene = Scene::new(cfg.clone(), 9);
    // Same directory name so the file names inside match.
    let a = tmp.path().join("a/drive");
    let b = tmp.path().join("b/drive");
    let c = tmp.path().join("c/drive");
    for d in [&a, &b, &c] {
        std::fs::create_dir_all(d.parent().unwrap()).unwrap();
    }
    let mut seen = 0;
    record(&scene, &opts, &a, |k| seen = k).unwrap();
    assert_eq!(seen, 3);
    record(&Scene::new(cfg.clone(), 9), &opts, &b, |_| {}).unwrap();
    record(&Scene::new(cfg, 10), &opts, &c, |_| {}).unwrap();
    let (ba, bb, bc) = (bag_bytes(&a), bag_bytes(&b), bag_bytes(&c));
    assert_eq!(ba, bb, "same seed, different bytes");
    assert_ne!(ba, bc, "different seed, same bytes");

    let bag = Bag::open(&a).unwrap();
    assert_eq!(bag.message_count(), 6);
    let mut clouds = 0;
    let mut gts = 0;
    for m in bag.messages(&[]).unwrap() {
        let m = m.unwrap();
        let k =
            ((m.timestamp_ns as u64 - scene.config().start_stamp_ns) as f64 / 1e8).round() as u64;
        let f = scene.frame(k);
        match m.topic.as_str() {
            "/points" => {
                let cloud = PointCloud2::from_cdr(&m.data).unwrap();
                assert_eq!(cloud.header.frame_id, "velodyne");
                assert_eq!(cloud.header.stamp_nanos(), f.stamp_ns);
                let p = decode(&cloud, &DecodeOptions::default()).unwrap().points;
                assert_eq!(p.x, f.points.x);
                assert_eq!(p.z, f.points.z);
                assert_eq!(p.ring, f.points.ring);
                assert_eq!(p.time, f.points.time);
                clouds += 1;
            }
            "/ground_truth/objects" => {
                let gt = Detection3DArray::from_cdr(&m.data).unwrap();
                assert_eq!(gt.header.stamp_nanos(), f.stamp_ns);
                let objs = gt.to_objects();
                assert_eq!(objs.len(), f.objects.len());
                for (o, e) in objs.iter().zip(&f.objects) {
                    assert_eq!(o.class, e.class);
                    assert_eq!(o.bbox.center, e.bbox.center);
                    // Same heading (pi and -pi are one angle).
                    let d = o.bbox.yaw - e.bbox.yaw;
                    assert!(
                        d.sin().abs() < 1e-5 && d.cos() > 0.0,
                        "{} vs {}",
                        o.bbox.yaw,
                        e.bbox.yaw
                    );
                }
                gts += 1;
            }
            t => panic!("unexpected topic {t}"),
        }
    }
    assert_eq!((clouds, gts), (3, 3));
}

#[test]
fn several_drives_follow_each_other_in_one_bag() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SimConfig::new(LidarModel::Vlp16);
    let mut later = cfg.clone();
    later.start_stamp_ns += 10_000_000_000;
    let scenes = [Scene::new(cfg, 3), Scene::new(later, 4)];
    let opts = RecordOptions {
        frames: 2,
        ..Default::default()
    };
    let mut seen = 0;
    let dir =
        lidar_ptq::sim::record::record_scenes(&scenes, &opts, &tmp.path().join("d"), |k| seen = k)
            .unwrap();
    assert_eq!(seen, 4);
    let bag = Bag::open(&dir).unwrap();
    let clouds: Vec<_> = bag
        .messages(&["/points"])
        .unwrap()
        .map(|m| m.unwrap())
        .collect();
    assert_eq!(clouds.len(), 4);
    // Each message is the frame of its own drive, in time order.
    let expect: Vec<_> = scenes
        .iter()
        .flat_map(|s| (0..2).map(move |k| s.frame(k)))
        .collect();
    for (m, f) in clouds.iter().zip(&expect) {
        assert_eq!(m.timestamp_ns as u64, f.stamp_ns);
        let p = decode(
            &PointCloud2::from_cdr(&m.data).unwrap(),
            &DecodeOptions::default(),
        )
        .unwrap()
        .points;
        assert_eq!(p.x, f.points.x);
    }
}
