//! nuScenes sweep and labels against the counts nuScenes itself stored.

use std::path::PathBuf;

use lidar_ptq::dataset::{self, nuscenes};

/// The shared data folder: `$LIDAR_PTQ_DATA`, or `../shared/data` from the project root
/// (one level further up from a worktree).
fn data() -> PathBuf {
    if let Some(d) = std::env::var_os("LIDAR_PTQ_DATA") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    ["../shared/data", "../../shared/data"]
        .iter()
        .map(|r| root.join(r))
        .find(|p| p.is_dir())
        .expect("shared data folder (set LIDAR_PTQ_DATA)")
}

fn dir() -> PathBuf {
    data().join("nuscenes")
}

#[test]
fn sweep_and_labels_load() {
    let labels = nuscenes::read_labels(&dir().join("labels.json")).unwrap();
    let pts = nuscenes::read_sweep(&dir().join(&labels.lidar_file)).unwrap();
    assert_eq!(pts.len(), 34_688);
    let ring = pts.ring.as_ref().unwrap();
    assert!(ring.iter().all(|&r| r < 32), "32-beam sensor");
    assert!(pts.intensity.iter().all(|&v| (0.0..=255.0).contains(&v)));
    assert_eq!(labels.boxes.len(), 69);
    let count = |c: &str| labels.boxes.iter().filter(|b| b.class == c).count();
    assert_eq!(
        (count("pedestrian"), count("barrier"), count("car")),
        (30, 22, 8)
    );
    // Python wrote unknown velocities as NaN: they load as unknown, not as numbers.
    let objects = nuscenes::read_objects(&dir().join("labels.json")).unwrap();
    assert_eq!(objects.iter().filter(|o| o.velocity.is_none()).count(), 2);

    // Auto-detection finds labels.json beside the sweep.
    let scan = dataset::load_scan(&dir().join(&labels.lidar_file), None, None).unwrap();
    assert_eq!(scan.objects, objects);
}

/// The counts nuScenes stored with each box, against our own count in the lidar frame.
/// 61 of the 69 agree exactly with the devkit's rule (f64, boundaries included, gravity
/// centre, l along yaw); the other 8 differ by 1-16 points either way, and no boundary
/// convention fixes them (see `nuscenes::points_in_box`). A wrong convention is far off:
/// bottom centre instead of gravity centre disagrees on 45 boxes, swapped l/w on 33.
#[test]
fn points_in_boxes_match_num_lidar_pts() {
    let labels = nuscenes::read_labels(&dir().join("labels.json")).unwrap();
    let pts = nuscenes::read_sweep(&dir().join(&labels.lidar_file)).unwrap();
    let mut exact = 0;
    for b in &labels.boxes {
        let want = b.num_lidar_pts.unwrap() as i64;
        let got = nuscenes::points_in_box(b, &pts) as i64;
        // The same count through the shared Box3d test (f32) must agree with the f64 one
        // except for points within float rounding of a face.
        let o = b.to_object();
        let via_box3d = (0..pts.len())
            .filter(|&i| o.bbox.contains(pts.xyz(i)))
            .count() as i64;
        assert!(
            (via_box3d - got).abs() <= 1,
            "{} {via_box3d} vs {got}",
            b.class
        );
        if got == want {
            exact += 1;
        } else {
            assert!(
                (got - want).abs() <= (want / 10).max(2),
                "{} at ({:.1}, {:.1}): {got} points, nuScenes says {want}",
                b.class,
                b.x,
                b.y
            );
        }
    }
    assert!(exact >= 61, "only {exact} of 69 counts agree exactly");
}

#[test]
fn labels_for_another_sweep_are_refused_when_explicit() {
    let labels = nuscenes::read_labels(&dir().join("labels.json")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let other = tmp.path().join("other__LIDAR_TOP__1.pcd.bin");
    std::fs::copy(dir().join(&labels.lidar_file), &other).unwrap();
    let explicit = dir().join("labels.json");
    assert!(matches!(
        dataset::load_scan(&other, Some(&explicit), None),
        Err(dataset::DatasetError::LabelsForOtherScan { .. })
    ));
    std::fs::write(other.with_file_name("labels.json"), "{\"boxes\": 3}").unwrap();
    assert!(matches!(
        dataset::load_scan(&other, None, None),
        Err(dataset::DatasetError::Nuscenes(
            nuscenes::NuscenesError::Json { .. }
        ))
    ));
    std::fs::write(&other, [0u8; 21]).unwrap();
    assert!(matches!(
        nuscenes::read_sweep(&other),
        Err(nuscenes::NuscenesError::ScanSize { len: 21, .. })
    ));
}
