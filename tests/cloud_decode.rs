//! Decoding hand-built PointCloud2 byte buffers: every datatype, both byte orders,
//! unaligned offsets, padded and organised clouds, and every malformation.

use lidar_ptq::cloud::{
    CloudError, DecodeOptions, PointCloud2, PointField, PointFieldType, TimeField, TimeKind, decode,
};
use lidar_ptq::msgs::Header;

use PointFieldType::*;

fn field(name: &str, offset: u32, ty: PointFieldType) -> PointField {
    PointField {
        name: name.into(),
        offset,
        datatype: ty as u8,
        count: 1,
    }
}

/// A sample value of each datatype, its bytes in the requested order, and the f32 the
/// decoder must produce (computed here with Rust's own conversions).
fn sample(ty: PointFieldType, be: bool) -> (Vec<u8>, f32) {
    macro_rules! enc {
        ($v:expr) => {
            if be {
                $v.to_be_bytes().to_vec()
            } else {
                $v.to_le_bytes().to_vec()
            }
        };
    }
    match ty {
        Int8 => (enc!(-5i8), -5.0),
        Uint8 => (enc!(200u8), 200.0),
        Int16 => (enc!(-1234i16), -1234.0),
        Uint16 => (enc!(60000u16), 60000.0),
        Int32 => (enc!(-123_456_789i32), -123_456_789i32 as f32),
        Uint32 => (enc!(4_000_000_000u32), 4_000_000_000u32 as f32),
        Float32 => (enc!(1.5e-3f32), 1.5e-3),
        Float64 => (enc!(-2.25e5f64), -2.25e5),
    }
}

fn put(buf: &mut [u8], off: usize, b: &[u8]) {
    buf[off..off + b.len()].copy_from_slice(b);
}

fn cloud(
    fields: Vec<PointField>,
    step: u32,
    width: u32,
    height: u32,
    data: Vec<u8>,
) -> PointCloud2 {
    PointCloud2 {
        header: Header::default(),
        height,
        width,
        fields,
        is_bigendian: false,
        point_step: step,
        row_step: step * width,
        data,
        is_dense: false,
    }
}

#[test]
fn every_datatype_in_both_byte_orders_at_unaligned_offsets() {
    for be in [false, true] {
        for ty in PointFieldType::ALL {
            let s = ty.size();
            // x at odd offset 3; y and z after it, intensity and ring after those.
            let (ox, oy, oz, oi, or) = (3, 3 + s, 3 + 2 * s, 3 + 3 * s, 3 + 4 * s);
            let step = (3 + 5 * s + 1) as u32;
            let (bytes, expect) = sample(ty, be);
            let mut data = vec![0xAAu8; step as usize];
            for o in [ox, oy, oz, oi, or] {
                put(&mut data, o, &bytes);
            }
            let fields = vec![
                field("x", ox as u32, ty),
                field("y", oy as u32, ty),
                field("z", oz as u32, ty),
                field("intensity", oi as u32, ty),
                field("ring", or as u32, ty),
            ];
            let mut c = cloud(fields, step, 1, 1, data);
            c.is_bigendian = be;
            let d = decode(&c, &DecodeOptions::default()).unwrap();
            let p = &d.points;
            assert_eq!(
                (p.x[0], p.y[0], p.z[0], p.intensity[0]),
                (expect, expect, expect, expect),
                "{ty:?} be={be}"
            );
            // Ring saturates into u16.
            let ring_expect = expect.clamp(0.0, 65535.0) as u16;
            assert_eq!(p.ring.as_ref().unwrap()[0], ring_expect, "{ty:?} be={be}");
            assert_eq!(d.dropped_non_finite, 0);
        }
    }
}

/// A Velodyne-layout point (22 bytes, floats unaligned at 18) written by hand.
fn velodyne_point(x: f32, y: f32, z: f32, i: f32, ring: u16, t: f32, be: bool) -> Vec<u8> {
    let mut p = vec![0u8; 22];
    let f = |v: f32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
    put(&mut p, 0, &f(x));
    put(&mut p, 4, &f(y));
    put(&mut p, 8, &f(z));
    put(&mut p, 12, &f(i));
    put(
        &mut p,
        16,
        &if be {
            ring.to_be_bytes()
        } else {
            ring.to_le_bytes()
        },
    );
    put(&mut p, 18, &f(t));
    p
}

fn velodyne_fields() -> Vec<PointField> {
    vec![
        field("x", 0, Float32),
        field("y", 4, Float32),
        field("z", 8, Float32),
        field("intensity", 12, Float32),
        field("ring", 16, Uint16),
        field("time", 18, Float32),
    ]
}

#[test]
fn organised_padded_cloud_with_nan_points_in_both_byte_orders() {
    // 2 rows x 3 columns, each row padded by 5 bytes; NaN/Inf returns at (0,1), (1,0)
    // and an infinite intensity at (1,2).
    let nan = f32::NAN;
    let pts = [
        [1.0, 2.0, 3.0, 10.0, 0.0, 0.001],
        [nan, nan, nan, 0.0, 1.0, 0.002],
        [4.5, -5.5, 6.25, 20.0, 2.0, 0.003],
        [f32::INFINITY, 0.0, 0.0, 1.0, 3.0, 0.004],
        [-7.0, 8.0, -9.0, 30.0, 4.0, 0.005],
        [1.0, 1.0, 1.0, f32::INFINITY, 5.0, 0.006],
    ];
    for be in [false, true] {
        let row_step = 3 * 22 + 5;
        let mut data = Vec::new();
        for row in 0..2 {
            for col in 0..3 {
                let q = pts[row * 3 + col];
                data.extend(velodyne_point(
                    q[0],
                    q[1],
                    q[2],
                    q[3],
                    q[4] as u16,
                    q[5],
                    be,
                ));
            }
            data.extend([0xFF; 5]);
        }
        let mut c = cloud(velodyne_fields(), 22, 3, 2, data);
        c.row_step = row_step;
        c.is_bigendian = be;
        let d = decode(&c, &DecodeOptions::default()).unwrap();
        assert_eq!(d.dropped_non_finite, 3);
        let p = d.points;
        assert_eq!(p.x, vec![1.0, 4.5, -7.0]);
        assert_eq!(p.y, vec![2.0, -5.5, 8.0]);
        assert_eq!(p.z, vec![3.0, 6.25, -9.0]);
        assert_eq!(p.intensity, vec![10.0, 20.0, 30.0]);
        assert_eq!(p.ring, Some(vec![0, 2, 4]));
        assert_eq!(p.time, Some(vec![0.001, 0.003, 0.005]));
    }
}

#[test]
fn padding_bytes_beyond_data_are_ignored_and_extra_data_tolerated() {
    // Data longer than height * row_step (trailing garbage) decodes the declared points.
    let mut data = velodyne_point(1.0, 2.0, 3.0, 4.0, 7, 0.5, false);
    data.extend([1, 2, 3]);
    let c = cloud(velodyne_fields(), 22, 1, 1, data);
    let d = decode(&c, &DecodeOptions::default()).unwrap();
    assert_eq!(d.points.xyz(0), [1.0, 2.0, 3.0]);
    assert_eq!(d.points.len(), 1);
}

#[test]
fn intensity_candidates_scale_and_default() {
    // Ouster-like: both "intensity" (f32) and "reflectivity" (u16).
    let mut p = vec![0u8; 48];
    put(&mut p, 0, &1.0f32.to_le_bytes());
    put(&mut p, 4, &2.0f32.to_le_bytes());
    put(&mut p, 8, &3.0f32.to_le_bytes());
    put(&mut p, 16, &500.0f32.to_le_bytes());
    put(&mut p, 24, &1020u16.to_le_bytes());
    let fields = vec![
        field("x", 0, Float32),
        field("y", 4, Float32),
        field("z", 8, Float32),
        field("intensity", 16, Float32),
        field("reflectivity", 24, Uint16),
    ];
    let c = cloud(fields.clone(), 48, 1, 1, p.clone());
    let mut o = DecodeOptions::default();
    assert_eq!(decode(&c, &o).unwrap().points.intensity, vec![500.0]);
    o.intensity = vec!["reflectivity".into(), "intensity".into()];
    o.intensity_scale = 1.0 / 255.0;
    assert_eq!(
        decode(&c, &o).unwrap().points.intensity,
        vec![1020.0 / 255.0]
    );
    // No candidate present: default, unscaled.
    o.intensity = vec!["signal".into()];
    o.default_intensity = 0.25;
    let d = decode(&c, &o).unwrap();
    assert_eq!(d.points.intensity, vec![0.25]);
    assert_eq!(d.points.time, None);
    assert_eq!(d.points.ring, None);
}

fn time_cloud(ty: PointFieldType, name: &str, raw: &[u8], header: Header) -> PointCloud2 {
    let step = 12 + raw.len() as u32;
    let mut p = vec![0u8; step as usize];
    put(&mut p, 12, raw);
    let fields = vec![
        field("x", 0, Float32),
        field("y", 4, Float32),
        field("z", 8, Float32),
        field(name, 12, ty),
    ];
    let mut c = cloud(fields, step, 1, 1, p);
    c.header = header;
    c
}

#[test]
fn time_fields_become_seconds_relative_to_the_stamp() {
    let stamp = Header {
        stamp_sec: 1_700_000_000,
        stamp_nanosec: 250_000_000,
        frame_id: "lidar".into(),
    };
    let o = DecodeOptions::default();
    let t = |c: &PointCloud2, o: &DecodeOptions| decode(c, o).unwrap().points.time.unwrap()[0];
    // Ouster: u32 ns relative.
    let c = time_cloud(Uint32, "t", &50_000_000u32.to_le_bytes(), stamp.clone());
    assert!((t(&c, &o) - 0.05).abs() < 1e-9);
    // Velodyne: f32 s relative.
    let c = time_cloud(Float32, "time", &(-0.02f32).to_le_bytes(), stamp.clone());
    assert_eq!(t(&c, &o), -0.02);
    // Livox: f64 absolute ns, unit detected: stamp + 30 ms.
    let abs_ns = 1_700_000_000_280_000_000f64;
    let c = time_cloud(Float64, "timestamp", &abs_ns.to_le_bytes(), stamp.clone());
    assert!((t(&c, &o) - 0.03).abs() < 1e-6, "{}", t(&c, &o));
    // Hesai: f64 absolute s, unit detected: stamp + 70 ms.
    let abs_s = 1_700_000_000.32f64;
    let c = time_cloud(Float64, "timestamp", &abs_s.to_le_bytes(), stamp.clone());
    assert!((t(&c, &o) - 0.07).abs() < 1e-6, "{}", t(&c, &o));
    // Unit detection with a zero stamp (simulated data): 40 ms in ns.
    let c = time_cloud(
        Float64,
        "timestamp",
        &40e6f64.to_le_bytes(),
        Header::default(),
    );
    assert!((t(&c, &o) - 0.04).abs() < 1e-9);
    // Explicit kinds override detection.
    let mut o2 = DecodeOptions {
        time: vec![TimeField::new("timestamp", TimeKind::AbsoluteSeconds)],
        ..DecodeOptions::default()
    };
    let c = time_cloud(Float64, "timestamp", &abs_s.to_le_bytes(), stamp.clone());
    assert!((t(&c, &o2) - 0.07).abs() < 1e-6);
    o2.time = vec![TimeField::new("timestamp", TimeKind::AbsoluteNanoseconds)];
    let c = time_cloud(Float64, "timestamp", &abs_ns.to_le_bytes(), stamp);
    assert!((t(&c, &o2) - 0.03).abs() < 1e-6);
}

#[test]
fn options_deserialize_from_yaml_with_defaults() {
    let o: DecodeOptions = serde_saphyr::from_str(
        "intensity: [reflectivity]\nintensity_scale: 0.5\ntime:\n  - {name: ts, kind: absolute_nanoseconds}\n",
    )
    .unwrap();
    assert_eq!(o.intensity, vec!["reflectivity".to_string()]);
    assert_eq!(o.intensity_scale, 0.5);
    assert_eq!(
        o.time,
        vec![TimeField::new("ts", TimeKind::AbsoluteNanoseconds)]
    );
    assert_eq!(o.x, "x");
    assert_eq!(o.ring, DecodeOptions::default().ring);
}

fn valid() -> PointCloud2 {
    let mut data = velodyne_point(1.0, 2.0, 3.0, 4.0, 1, 0.0, false);
    data.extend(velodyne_point(5.0, 6.0, 7.0, 8.0, 2, 0.0, false));
    cloud(velodyne_fields(), 22, 2, 1, data)
}

fn err(c: &PointCloud2) -> CloudError {
    decode(c, &DecodeOptions::default()).unwrap_err()
}

#[test]
fn malformed_messages_are_rejected_with_the_problem_named() {
    assert!(decode(&valid(), &DecodeOptions::default()).is_ok());

    let mut c = valid();
    c.data.pop();
    assert_eq!(
        err(&c),
        CloudError::DataTooShort {
            len: 43,
            expected: 44,
            height: 1,
            row_step: 44
        }
    );

    let mut c = valid();
    c.row_step = 43;
    assert_eq!(
        err(&c),
        CloudError::RowStepTooSmall {
            row_step: 43,
            width: 2,
            point_step: 22
        }
    );

    let mut c = valid();
    c.fields[5].offset = 19; // time f32 at 19..23 > 22
    assert!(
        matches!(err(&c), CloudError::FieldPastPointStep { ref field, offset: 19, .. } if field == "time")
    );

    let mut c = valid();
    c.fields[4].count = 4; // ring: 4 x u16 at 16..24 > 22
    assert!(
        matches!(err(&c), CloudError::FieldPastPointStep { ref field, count: 4, .. } if field == "ring")
    );

    let mut c = valid();
    c.fields.remove(1);
    assert!(matches!(err(&c), CloudError::MissingField { ref field, .. } if field == "y"));
    assert!(err(&c).to_string().contains("x, z, intensity, ring, time"));

    let mut c = valid();
    c.fields[3].datatype = 9;
    assert_eq!(
        err(&c),
        CloudError::UnknownDatatype {
            field: "intensity".into(),
            datatype: 9
        }
    );
    c.fields[3].datatype = 0;
    assert_eq!(
        err(&c),
        CloudError::UnknownDatatype {
            field: "intensity".into(),
            datatype: 0
        }
    );

    let mut c = valid();
    c.fields[0].count = 0;
    assert_eq!(err(&c), CloudError::EmptyField { field: "x".into() });

    let mut c = valid();
    c.point_step = 0;
    assert_eq!(err(&c), CloudError::ZeroPointStep);

    // Absurd sizes: products far beyond the buffer (and beyond u32) are caught before
    // anything is allocated or read.
    let mut c = valid();
    c.height = u32::MAX;
    c.row_step = u32::MAX;
    c.width = u32::MAX / 22;
    assert!(matches!(
        err(&c),
        CloudError::DataTooShort { .. } | CloudError::SizeOverflow { .. }
    ));
    let mut c = valid();
    c.width = u32::MAX;
    c.row_step = u32::MAX;
    assert!(matches!(err(&c), CloudError::RowStepTooSmall { .. }));
}

#[test]
fn empty_clouds_decode_to_no_points() {
    let mut c = valid();
    c.width = 0;
    c.height = u32::MAX; // many empty rows must not be walked one by one
    c.row_step = 0;
    c.data.clear();
    let d = decode(&c, &DecodeOptions::default()).unwrap();
    assert!(d.points.is_empty());
    assert_eq!(d.dropped_non_finite, 0);
}
