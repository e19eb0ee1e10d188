//! KITTI scans, labels and calibration: boxes converted into the lidar frame must sit on
//! the lidar points and project back onto the labelled 2D image boxes.

use std::path::PathBuf;

use lidar_ptq::boxes::Box3d;
use lidar_ptq::cloud::Points;
use lidar_ptq::dataset::{self, kitti};

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

fn training() -> PathBuf {
    data().join("kitti/training")
}

fn count_in(b: &Box3d, pts: &Points) -> usize {
    (0..pts.len()).filter(|&i| b.contains(pts.xyz(i))).count()
}

/// The box's 8 corners in the lidar frame, in f64.
fn corners(b: &Box3d) -> Vec<[f64; 3]> {
    let (s, c) = (b.yaw as f64).sin_cos();
    let mut out = Vec::new();
    for sl in [-0.5, 0.5] {
        for sw in [-0.5, 0.5] {
            for sh in [-0.5, 0.5] {
                let (lx, ly) = (sl * b.size[0] as f64, sw * b.size[1] as f64);
                out.push([
                    b.center[0] as f64 + c * lx - s * ly,
                    b.center[1] as f64 + s * lx + c * ly,
                    b.center[2] as f64 + sh * b.size[2] as f64,
                ]);
            }
        }
    }
    out
}

/// Image-2 pixel of a lidar point, using the calibration forwards (P2 * R0 * Tr), which
/// the label conversion never uses: an independent check of its inverse.
fn project(calib: &kitti::Calib, p: [f64; 3]) -> [f64; 2] {
    let t = &calib.tr_velo_to_cam;
    let cam: Vec<f64> = (0..3)
        .map(|r| t[4 * r] * p[0] + t[4 * r + 1] * p[1] + t[4 * r + 2] * p[2] + t[4 * r + 3])
        .collect();
    let r0 = &calib.r0_rect;
    let rect: Vec<f64> = (0..3)
        .map(|r| r0[3 * r] * cam[0] + r0[3 * r + 1] * cam[1] + r0[3 * r + 2] * cam[2])
        .collect();
    let p2 = &calib.p[2];
    let h: Vec<f64> = (0..3)
        .map(|r| {
            p2[4 * r] * rect[0] + p2[4 * r + 1] * rect[1] + p2[4 * r + 2] * rect[2] + p2[4 * r + 3]
        })
        .collect();
    [h[0] / h[2], h[1] / h[2]]
}

const FRAMES: [&str; 7] = [
    "000000", "000001", "000002", "000003", "000004", "000005", "000008",
];

#[test]
fn boxes_project_onto_their_image_boxes() {
    let mut checked = 0;
    for id in FRAMES {
        let labels = kitti::read_labels(&training().join(format!("label_2/{id}.txt"))).unwrap();
        let calib = kitti::Calib::read(&training().join(format!("calib/{id}.txt"))).unwrap();
        let t = calib.rect_to_velo().unwrap();
        // Truncated objects are cut by the image border, so their 2D box is not the projection.
        for l in labels
            .iter()
            .filter(|l| l.kind != "DontCare" && l.truncated == 0.0)
        {
            let px: Vec<[f64; 2]> = corners(&l.to_lidar_box(&t))
                .into_iter()
                .map(|c| project(&calib, c))
                .collect();
            let fold =
                |k: usize, init: f64, f: fn(f64, f64) -> f64| px.iter().map(|p| p[k]).fold(init, f);
            let got = [
                fold(0, f64::INFINITY, f64::min),
                fold(1, f64::INFINITY, f64::min),
                fold(0, f64::NEG_INFINITY, f64::max),
                fold(1, f64::NEG_INFINITY, f64::max),
            ];
            // Vehicle 2D boxes are the projected 3D box to a pixel or two; people's 2D
            // boxes follow limbs the 3D box does not.
            let tol = if ["Car", "Van", "Truck"].contains(&l.kind.as_str()) {
                2.0
            } else {
                2.0 + 0.15 * (l.bbox[2] - l.bbox[0])
            };
            for k in 0..4 {
                assert!(
                    (got[k] - l.bbox[k]).abs() <= tol,
                    "{id} {}: projected 2D box {got:?}, labelled {:?}",
                    l.kind,
                    l.bbox
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} untruncated labels");
}

#[test]
fn boxes_sit_on_their_points() {
    for id in &FRAMES[..6] {
        let scan =
            dataset::load_scan(&training().join(format!("velodyne/{id}.bin")), None, None).unwrap();
        let labels = kitti::read_labels(&training().join(format!("label_2/{id}.txt"))).unwrap();
        let kept: Vec<_> = labels.iter().filter(|l| l.kind != "DontCare").collect();
        assert_eq!(
            kept.len(),
            scan.objects.len(),
            "{id}: DontCare only is skipped"
        );
        assert!(!scan.objects.is_empty());
        for (l, o) in kept.iter().zip(&scan.objects) {
            assert_eq!(Some(o.class.clone()), kitti::class_name(&l.kind));
            let b = o.bbox;
            let n = count_in(&b, &scan.points);
            assert!(n >= 5, "{id} {}: only {n} points in its box", l.kind);
            // The same box moved clear of itself (its own length or width plus 1 m) forwards,
            // backwards, left and right holds far fewer points on average.
            let (s, c) = b.yaw.sin_cos();
            let shifted: usize = [(1.0f32, 0.0f32), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0)]
                .iter()
                .map(|&(dl, dw)| {
                    let (ol, ow) = (dl * (b.size[0] + 1.0), dw * (b.size[1] + 1.0));
                    let mut moved = b;
                    moved.center[0] += c * ol - s * ow;
                    moved.center[1] += s * ol + c * ow;
                    count_in(&moved, &scan.points)
                })
                .sum();
            assert!(
                shifted * 2 < n * 4,
                "{id} {}: {n} points inside, {shifted} in the 4 shifted boxes",
                l.kind
            );
        }
    }
}

#[test]
fn frame_000001_truck_car_and_cyclist() {
    let scan = dataset::load_scan(&training().join("velodyne/000001.bin"), None, None).unwrap();
    assert_eq!(scan.points.len(), 120_268);
    let classes: Vec<&str> = scan.objects.iter().map(|o| o.class.as_str()).collect();
    assert_eq!(classes, ["truck", "car", "cyclist"]);
    // Ahead of the car, the truck ~70 m out, the car ~59 m out on the left, the cyclist
    // ~46 m out slightly right; all heading along the road (yaw near 0 or pi).
    let expect = [
        ("truck", 69.7, -0.46, 50),
        ("car", 58.8, 16.55, 5),
        ("cyclist", 46.1, -4.58, 10),
    ];
    for (o, (class, x, y, min_pts)) in scan.objects.iter().zip(expect) {
        assert_eq!(o.class, class);
        assert!((o.bbox.center[0] - x).abs() < 0.1, "{class} x {:?}", o.bbox);
        assert!((o.bbox.center[1] - y).abs() < 0.1, "{class} y {:?}", o.bbox);
        assert!(o.bbox.yaw.sin().abs() < 0.03, "{class} yaw {}", o.bbox.yaw);
        let n = count_in(&o.bbox, &scan.points);
        assert!(n >= min_pts, "{class}: {n} points");
    }
    // Truck: l, w, h = 12.34, 2.63, 2.85 from the label (h, w, l order there).
    assert_eq!(scan.objects[0].bbox.size, [12.34, 2.63, 2.85]);
}

#[test]
fn bad_files_give_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let scan = dir.path().join("bad.bin");
    std::fs::write(&scan, [0u8; 17]).unwrap();
    assert!(matches!(
        kitti::read_velodyne(&scan),
        Err(kitti::KittiError::ScanSize { len: 17, .. })
    ));
    let label = dir.path().join("l.txt");
    std::fs::write(
        &label,
        "Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87\n",
    )
    .unwrap();
    assert!(matches!(
        kitti::read_labels(&label),
        Err(kitti::KittiError::Label { line: 1, .. })
    ));
    std::fs::write(
        &label,
        "Car 0.00 0 1.85 387.63 181.54 423.81 203.12 1.67 1.87 3.69 -16.53 2.39 5x.49 1.57\n",
    )
    .unwrap();
    let err = kitti::read_labels(&label).unwrap_err().to_string();
    assert!(err.contains("z = \"5x.49\""), "{err}");
    let calib_text = std::fs::read_to_string(training().join("calib/000001.txt")).unwrap();
    let no_velo: String = calib_text
        .lines()
        .filter(|l| !l.starts_with("Tr_velo_to_cam"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(matches!(
        kitti::Calib::parse(&no_velo, std::path::Path::new("c.txt")),
        Err(kitti::KittiError::CalibMissing {
            key: "Tr_velo_to_cam",
            ..
        })
    ));
    let short = calib_text.replacen("R0_rect: 9.999239000000e-01 ", "R0_rect: ", 1);
    assert!(matches!(
        kitti::Calib::parse(&short, std::path::Path::new("c.txt")),
        Err(kitti::KittiError::Calib { line: 5, .. })
    ));
}
