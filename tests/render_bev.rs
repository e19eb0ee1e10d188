//! Bird's-eye-view rendering: boxes, headings and points land on the pixels the view
//! mapping says, on a synthetic scene and on KITTI frame 000001.

mod common;

use std::path::PathBuf;

use lidar_ptq::boxes::{Box3d, Object};
use lidar_ptq::cloud::Points;
use lidar_ptq::dataset;
use lidar_ptq::render::{self, BevOptions, BevView, ColorBy};
use tiny_skia::Pixmap;

fn data() -> PathBuf {
    common::data_dir()
}

fn rgb(pm: &Pixmap, u: i64, v: i64) -> Option<[u8; 3]> {
    if u < 0 || v < 0 {
        return None;
    }
    let c = pm.pixel(u as u32, v as u32)?;
    Some([c.red(), c.green(), c.blue()])
}

/// Whether `colour` is within one pixel of image position (u, v).
fn near(pm: &Pixmap, (u, v): (f32, f32), colour: [u8; 3]) -> bool {
    let (u, v) = (u.floor() as i64, v.floor() as i64);
    (-1..=1).any(|dv| (-1..=1).any(|du| rgb(pm, u + du, v + dv) == Some(colour)))
}

fn object(center: [f32; 3], size: [f32; 3], yaw: f32, class: &str) -> Object {
    Object {
        bbox: Box3d { center, size, yaw },
        class: class.into(),
        velocity: None,
        num_points: None,
    }
}

#[test]
fn synthetic_scene_pixels() {
    let gt = object([12.0, 6.0, 0.0], [6.0, 3.0, 2.0], 0.5, "car");
    let det = object([-8.0, -9.0, 0.0], [4.0, 2.0, 1.5], -1.2, "car");
    // Points on a 0.5 m lattice over the back half of the ground-truth box, at z = 0.5.
    let mut pts = Points::default();
    let (s, c) = gt.bbox.yaw.sin_cos();
    for i in 1..6 {
        for j in -2..=2 {
            let (lx, ly) = (-0.5 * i as f32, 0.5 * j as f32);
            pts.push(12.0 + c * lx - s * ly, 6.0 + s * lx + c * ly, 0.5, 0.0);
        }
    }
    let opts = BevOptions {
        extent: 20.0,
        resolution: 0.05,
        grid_step: 0.0,
        ring_step: 0.0,
        height_range: [-1.5, 2.5],
        ..BevOptions::default()
    };
    let pm = render::render_bev(
        &pts,
        std::slice::from_ref(&gt),
        std::slice::from_ref(&det),
        &opts,
    )
    .unwrap();
    let view = BevView::new(&opts).unwrap();
    assert_eq!((pm.width(), pm.height()), (800, 800));

    for [x, y] in gt.bbox.bev_corners() {
        assert!(
            near(&pm, view.to_pixel(x, y), render::GROUND_TRUTH),
            "gt corner {x} {y}"
        );
        assert!(!near(&pm, view.to_pixel(x, y), render::DETECTION));
    }
    for [x, y] in det.bbox.bev_corners() {
        assert!(
            near(&pm, view.to_pixel(x, y), render::DETECTION),
            "det corner {x} {y}"
        );
    }
    // The heading mark runs from the centre to the front edge, not to the back.
    let at = |lx: f32, ly: f32| (12.0 + c * lx - s * ly, 6.0 + s * lx + c * ly);
    let (fx, fy) = at(1.5, 0.0);
    assert!(near(&pm, view.to_pixel(fx, fy), render::GROUND_TRUTH));
    let (bx, by) = at(-1.25, 0.25);
    assert!(!near(&pm, view.to_pixel(bx, by), render::GROUND_TRUTH));
    // Every point is drawn in the height colour: z 0.5 over [-1.5, 2.5] is the middle.
    let point_colour = render::turbo(0.5);
    for i in 0..pts.len() {
        let (u, v) = view.to_pixel(pts.x[i], pts.y[i]);
        assert_eq!(
            rgb(&pm, u.floor() as i64, v.floor() as i64),
            Some(point_colour),
            "point {i}"
        );
    }
    // Empty places stay background: the image corner and between the two boxes.
    assert_eq!(rgb(&pm, 2, 2), Some(render::BACKGROUND));
    let (u, v) = view.to_pixel(2.0, -1.5);
    assert_eq!(rgb(&pm, u as i64, v as i64), Some(render::BACKGROUND));
    // The ego marker sits at the sensor.
    let (u, v) = view.to_pixel(0.0, 0.0);
    assert_eq!(rgb(&pm, u as i64, v as i64), Some(render::EGO));
}

#[test]
fn intensity_colouring_uses_the_scan_scale() {
    // 0..255 intensities (nuScenes-like): the brightest percent maps to the top colour.
    let mut pts = Points::default();
    for k in 0..200 {
        pts.push(
            5.0 + 0.1 * k as f32,
            3.0,
            0.0,
            if k == 199 { 255.0 } else { 100.0 },
        );
    }
    let opts = BevOptions {
        extent: 30.0,
        resolution: 0.05,
        color_by: ColorBy::Intensity,
        grid_step: 0.0,
        ring_step: 0.0,
        ..BevOptions::default()
    };
    let pm = render::render_bev(&pts, &[], &[], &opts).unwrap();
    let view = BevView::new(&opts).unwrap();
    let px = |i: usize| {
        let (u, v) = view.to_pixel(pts.x[i], pts.y[i]);
        rgb(&pm, u as i64, v as i64).unwrap()
    };
    // 99th percentile is 100: 100 and 255 both saturate; colour is the map's top.
    assert_eq!(px(0), render::turbo(1.0));
    assert_eq!(px(199), render::turbo(1.0));
    assert!(matches!(
        render::render_bev(
            &pts,
            &[],
            &[],
            &BevOptions {
                extent: -1.0,
                ..opts
            }
        ),
        Err(render::RenderError::BadOption {
            option: "extent",
            ..
        })
    ));
}

#[test]
fn kitti_000001_boxes_sit_on_their_points() {
    let scan = dataset::load_scan(
        &data().join("kitti/training/velodyne/000001.bin"),
        None,
        None,
    )
    .unwrap();
    let opts = BevOptions {
        extent: 80.0,
        resolution: 0.05,
        ..BevOptions::default()
    };
    let pm = render::render_bev(&scan.points, &scan.objects, &[], &opts).unwrap();
    let view = BevView::new(&opts).unwrap();
    let not_points = [
        render::BACKGROUND,
        render::GRID,
        render::RING,
        render::GROUND_TRUTH,
    ];
    assert_eq!(scan.objects.len(), 3);
    let mut drawn = 0;
    for o in &scan.objects {
        for [x, y] in o.bbox.bev_corners() {
            assert!(
                near(&pm, view.to_pixel(x, y), render::GROUND_TRUTH),
                "{} corner",
                o.class
            );
        }
        // Every point inside the box and clear of its 2 px (0.1 m) outline and heading
        // mark shows as a point-coloured pixel.
        let b = o.bbox;
        let inner = Box3d {
            size: [b.size[0] - 0.3, b.size[1] - 0.3, b.size[2]],
            ..b
        };
        let mut pixels = std::collections::BTreeSet::new();
        for i in 0..scan.points.len() {
            let (lx, ly) = b.to_local(scan.points.x[i], scan.points.y[i]);
            let on_heading = ly.abs() < 0.15 && lx > -0.15;
            if inner.contains(scan.points.xyz(i)) && !on_heading {
                let (u, v) = view.to_pixel(scan.points.x[i], scan.points.y[i]);
                let (u, v) = (u.floor() as i64, v.floor() as i64);
                let c = rgb(&pm, u, v).unwrap();
                assert!(!not_points.contains(&c), "{}: point {i} not drawn", o.class);
                pixels.insert((u, v));
            }
        }
        assert!(
            pixels.len() >= 2,
            "{}: {} point pixels",
            o.class,
            pixels.len()
        );
        drawn += pixels.len();
    }
    assert!(drawn >= 10, "{drawn} point pixels inside the three boxes");
}

#[test]
fn png_is_written_atomically_and_decodes() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bev.png");
    let mut pts = Points::default();
    pts.push(1.0, 1.0, 0.0, 0.0);
    let opts = BevOptions {
        extent: 5.0,
        resolution: 0.1,
        ..BevOptions::default()
    };
    let pm = render::render_bev(&pts, &[], &[], &opts).unwrap();
    render::save_png(&pm, &out).unwrap();
    // Overwriting works too, and leaves only the PNG behind.
    render::save_png(&pm, &out).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["bev.png"]);
    let back = Pixmap::load_png(&out).unwrap();
    assert_eq!(back.data(), pm.data());
    assert!(matches!(
        render::save_png(&pm, &dir.path().join("missing/bev.png")),
        Err(render::RenderError::Io { .. })
    ));
}
