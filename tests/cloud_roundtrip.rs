//! Encoding in every driver layout: exact field tables from the spec, raw bytes at
//! the spec's offsets, decode(encode(p)) == p, and the CDR form.

use lidar_ptq::cloud::{
    DecodeOptions, Layout, POINTCLOUD2_SCHEMA, PointCloud2, PointField, Points, decode, encode,
};
use lidar_ptq::msgs::Header;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The spec table (docs: ros-interfaces.md), as (name, offset, datatype) and point_step.
fn spec(layout: Layout) -> (Vec<(&'static str, u32, u8)>, u32) {
    let xyz = vec![("x", 0, 7), ("y", 4, 7), ("z", 8, 7)];
    let (rest, step): (Vec<(&str, u32, u8)>, u32) = match layout {
        Layout::Velodyne => (
            vec![("intensity", 12, 7), ("ring", 16, 4), ("time", 18, 7)],
            22,
        ),
        Layout::Ouster => (
            vec![
                ("intensity", 16, 7),
                ("t", 20, 6),
                ("reflectivity", 24, 4),
                ("ring", 26, 4),
                ("ambient", 28, 4),
                ("range", 32, 6),
            ],
            48,
        ),
        Layout::Livox => (
            vec![
                ("intensity", 12, 7),
                ("tag", 16, 2),
                ("line", 17, 2),
                ("timestamp", 18, 8),
            ],
            26,
        ),
        Layout::Hesai => (
            vec![("intensity", 12, 7), ("ring", 16, 4), ("timestamp", 18, 8)],
            26,
        ),
        Layout::AutowareXyzirc => (
            vec![
                ("intensity", 12, 2),
                ("return_type", 13, 2),
                ("channel", 14, 4),
            ],
            16,
        ),
        Layout::XyziF32 => (vec![("intensity", 12, 7)], 16),
    };
    (xyz.into_iter().chain(rest).collect(), step)
}

fn random_points(n: usize, seed: u64) -> Points {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut p = Points::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut ring = Vec::with_capacity(n);
    for _ in 0..n {
        p.push(
            rng.random_range(-80.0..80.0),
            rng.random_range(-80.0..80.0),
            rng.random_range(-3.0..5.0),
            // Whole numbers: exact in the u8/u16 intensity encodings.
            rng.random_range(0..=255u8) as f32,
        );
        time.push(rng.random_range(0.0..0.1));
        ring.push(rng.random_range(0..128u16));
    }
    p.time = Some(time);
    p.ring = Some(ring);
    p
}

fn header() -> Header {
    Header {
        stamp_sec: 1_718_000_000,
        stamp_nanosec: 987_654_321,
        frame_id: "lidar_top".into(),
    }
}

fn f32_at(c: &PointCloud2, i: usize, off: usize) -> f32 {
    let s = i * c.point_step as usize + off;
    f32::from_le_bytes(c.data[s..s + 4].try_into().unwrap())
}

#[test]
fn every_layout_matches_the_spec_table_and_round_trips() {
    let pts = random_points(300, 7);
    for layout in Layout::ALL {
        let c = encode(&pts, layout, header());
        let (table, step) = spec(layout);
        let got: Vec<(&str, u32, u8)> = c
            .fields
            .iter()
            .map(|f| (f.name.as_str(), f.offset, f.datatype))
            .collect();
        assert_eq!(got, table, "{layout:?}");
        assert!(c.fields.iter().all(|f| f.count == 1));
        assert_eq!(
            (c.point_step, c.row_step, c.height, c.width),
            (step, 300 * step, 1, 300)
        );
        assert_eq!(c.data.len(), 300 * step as usize);
        assert!(!c.is_bigendian && c.is_dense);
        assert_eq!(c.header, header());
        c.validate().unwrap();

        // Raw bytes at the spec offsets, read independently of the decoder.
        for i in [0, 151, 299] {
            assert_eq!(f32_at(&c, i, 0), pts.x[i]);
            assert_eq!(f32_at(&c, i, 4), pts.y[i]);
            assert_eq!(f32_at(&c, i, 8), pts.z[i]);
        }

        let d = decode(&c, &DecodeOptions::default()).unwrap();
        assert_eq!(d.dropped_non_finite, 0);
        let q = d.points;
        assert_eq!((&q.x, &q.y, &q.z), (&pts.x, &pts.y, &pts.z), "{layout:?}");
        assert_eq!(q.intensity, pts.intensity, "{layout:?}");
        let has_ring = layout != Layout::XyziF32;
        assert_eq!(q.ring.is_some(), has_ring, "{layout:?}");
        if has_ring {
            assert_eq!(q.ring, pts.ring, "{layout:?}");
        }
        let tol = match layout {
            Layout::Velodyne => 0.0,
            Layout::Ouster => 1e-9,                // u32 ns rounding
            Layout::Livox | Layout::Hesai => 1e-6, // f64 absolute epoch resolution
            Layout::AutowareXyzirc | Layout::XyziF32 => {
                assert_eq!(q.time, None, "{layout:?}");
                continue;
            }
        };
        let (t, t0) = (q.time.unwrap(), pts.time.as_ref().unwrap());
        for (a, b) in t.iter().zip(t0) {
            assert!(
                (a - b).abs() <= tol + b.abs() * f32::EPSILON,
                "{layout:?}: {a} vs {b}"
            );
        }
    }
}

#[test]
fn driver_specific_fields_hold_what_the_driver_would_write() {
    let pts = random_points(50, 11);
    let c = encode(&pts, Layout::Ouster, header());
    for i in 0..50 {
        let b = &c.data[i * 48..(i + 1) * 48];
        let (x, y, z) = (pts.x[i] as f64, pts.y[i] as f64, pts.z[i] as f64);
        let range = u32::from_le_bytes(b[32..36].try_into().unwrap());
        assert_eq!(
            range,
            ((x * x + y * y + z * z).sqrt() * 1000.0).round() as u32
        );
        let t_ns = u32::from_le_bytes(b[20..24].try_into().unwrap());
        assert_eq!(
            t_ns,
            (pts.time.as_ref().unwrap()[i] as f64 * 1e9).round() as u32
        );
        assert_eq!(u16::from_le_bytes([b[24], b[25]]), pts.intensity[i] as u16);
    }
    // Livox absolute ns, Hesai absolute s.
    let stamp_s = 1_718_000_000.0 + 0.987_654_321f64;
    let lv = encode(&pts, Layout::Livox, header());
    let hs = encode(&pts, Layout::Hesai, header());
    for i in [0, 49] {
        let t = pts.time.as_ref().unwrap()[i] as f64;
        let ns = f64::from_le_bytes(lv.data[i * 26 + 18..i * 26 + 26].try_into().unwrap());
        assert!((ns * 1e-9 - (stamp_s + t)).abs() < 1e-6);
        let s = f64::from_le_bytes(hs.data[i * 26 + 18..i * 26 + 26].try_into().unwrap());
        assert!((s - (stamp_s + t)).abs() < 1e-6);
        assert_eq!(lv.data[i * 26 + 17] as u16, pts.ring.as_ref().unwrap()[i]);
    }
}

#[test]
fn non_finite_points_mark_the_cloud_sparse_and_are_dropped() {
    let mut pts = random_points(10, 3);
    pts.x[4] = f32::NAN;
    pts.z[7] = f32::NEG_INFINITY;
    let c = encode(&pts, Layout::Velodyne, header());
    assert!(!c.is_dense);
    let d = decode(&c, &DecodeOptions::default()).unwrap();
    assert_eq!(d.dropped_non_finite, 2);
    assert_eq!(d.points.len(), 8);
    assert_eq!(d.points.x[4], pts.x[5]);
}

/// Bytes of a tiny cloud, laid out by hand from the CDR rules (alignment relative to
/// the byte after the 4-byte encapsulation header).
#[test]
fn cdr_bytes_match_a_hand_computed_layout() {
    let c = PointCloud2 {
        header: Header {
            stamp_sec: 0x0102_0304,
            stamp_nanosec: 5,
            frame_id: "ab".into(),
        },
        height: 1,
        width: 2,
        fields: vec![PointField {
            name: "x".into(),
            offset: 0,
            datatype: 2,
            count: 1,
        }],
        is_bigendian: false,
        point_step: 1,
        row_step: 2,
        data: vec![9, 8],
        is_dense: true,
    };
    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        0, 1, 0, 0,             // encapsulation: CDR little-endian
        4, 3, 2, 1,             // stamp.sec        body offset 0
        5, 0, 0, 0,             // stamp.nanosec    4
        3, 0, 0, 0, b'a', b'b', 0, // frame_id       8 (len 3 incl. NUL)
        0,                      // pad to 4         15
        1, 0, 0, 0,             // height           16
        2, 0, 0, 0,             // width            20
        1, 0, 0, 0,             // fields.len       24
        2, 0, 0, 0, b'x', 0,    // name "x"         28
        0, 0,                   // pad              34
        0, 0, 0, 0,             // offset           36
        2,                      // datatype UINT8   40
        0, 0, 0,                // pad              41
        1, 0, 0, 0,             // count            44
        0,                      // is_bigendian     48
        0, 0, 0,                // pad              49
        1, 0, 0, 0,             // point_step       52
        2, 0, 0, 0,             // row_step         56
        2, 0, 0, 0, 9, 8,       // data             60
        1,                      // is_dense         66
    ];
    assert_eq!(c.to_cdr(), expected);
    assert_eq!(PointCloud2::from_cdr(&expected).unwrap(), c);
    // DDS pads payloads to a multiple of 4; the padding is ignored.
    let mut padded = expected.clone();
    padded.push(0);
    assert_eq!(PointCloud2::from_cdr(&padded).unwrap(), c);
}

#[test]
fn cdr_round_trips_every_layout_and_rejects_bad_payloads() {
    let pts = random_points(64, 5);
    for layout in Layout::ALL {
        let c = encode(&pts, layout, header());
        let bytes = c.to_cdr();
        let back = PointCloud2::from_cdr(&bytes).unwrap();
        assert_eq!(back, c, "{layout:?}");
        // Every truncation is an error, never a panic.
        for cut in [0, 3, 4, 10, 30, bytes.len() / 2, bytes.len() - 1] {
            assert!(
                PointCloud2::from_cdr(&bytes[..cut]).is_err(),
                "{layout:?} cut {cut}"
            );
        }
    }
    let mut be = encode(&pts, Layout::XyziF32, header()).to_cdr();
    be[1] = 0x00; // 00 00: big-endian CDR
    let e = PointCloud2::from_cdr(&be).unwrap_err();
    assert!(e.to_string().contains("encapsulation 00 00"), "{e}");
    let e = PointCloud2::from_cdr(&[0, 1]).unwrap_err();
    assert!(e.to_string().contains("too short"), "{e}");
}

/// The schema follows rosbag2's `ros2msg` writer: top-level text, then each dependency
/// after "\n" + 80 '=' + "\nMSG: <type>\n", depth first, sorted per message.
#[test]
fn schema_has_rosbag2_structure() {
    let delim = format!("\n{}\nMSG: ", "=".repeat(80));
    let mut parts: Vec<&str> = POINTCLOUD2_SCHEMA.split(delim.as_str()).collect();
    assert_eq!(parts.len(), 4);
    let mut names = Vec::new();
    for p in &mut parts[1..] {
        let (name, text) = p.split_once('\n').unwrap();
        names.push(name);
        *p = text;
    }
    assert_eq!(
        names,
        [
            "sensor_msgs/PointField",
            "std_msgs/Header",
            "builtin_interfaces/Time"
        ]
    );
    // Every .msg file ends with a newline, so each part does too.
    assert!(parts.iter().all(|p| p.ends_with('\n')));
    // The field lines, in CDR order.
    let fields = |text: &str| -> Vec<String> {
        text.lines()
            .map(|l| l.split('#').next().unwrap().trim())
            .filter(|l| !l.is_empty() && !l.starts_with("MSG:") && !l.contains('='))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    assert_eq!(
        fields(parts[0]),
        [
            "std_msgs/Header header",
            "uint32 height",
            "uint32 width",
            "PointField[] fields",
            "bool is_bigendian",
            "uint32 point_step",
            "uint32 row_step",
            "uint8[] data",
            "bool is_dense"
        ]
    );
    assert_eq!(
        fields(parts[1]),
        [
            "string name",
            "uint32 offset",
            "uint8 datatype",
            "uint32 count"
        ]
    );
    assert_eq!(
        fields(parts[2]),
        ["builtin_interfaces/Time stamp", "string frame_id"]
    );
    assert_eq!(fields(parts[3]), ["int32 sec", "uint32 nanosec"]);
}
