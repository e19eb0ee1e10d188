//! Property tests: arbitrary messages and field layouts never panic the decoder or the
//! CDR reader, and every valid encode decodes back to the same points.

use lidar_ptq::cloud::{DecodeOptions, Layout, PointCloud2, PointField, Points, decode, encode};
use lidar_ptq::msgs::Header;
use proptest::prelude::*;

fn arb_field() -> impl Strategy<Value = PointField> {
    (
        prop::sample::select(vec![
            "x",
            "y",
            "z",
            "intensity",
            "ring",
            "t",
            "time",
            "timestamp",
            "line",
            "other",
        ]),
        0u32..40,
        0u8..11,
        0u32..4,
    )
        .prop_map(|(name, offset, datatype, count)| PointField {
            name: name.into(),
            offset,
            datatype,
            count,
        })
}

prop_compose! {
    fn arb_cloud()(
        fields in prop::collection::vec(arb_field(), 0..8),
        height in prop_oneof![0u32..4, Just(u32::MAX)],
        width in prop_oneof![0u32..16, Just(u32::MAX)],
        point_step in 0u32..48,
        row_pad in prop_oneof![0u32..8, Just(u32::MAX)],
        data in prop::collection::vec(any::<u8>(), 0..600),
        is_bigendian in any::<bool>(),
        stamp_sec in any::<i32>(),
    ) -> PointCloud2 {
        let row_step = width.saturating_mul(point_step).saturating_add(row_pad);
        PointCloud2 {
            header: Header { stamp_sec, stamp_nanosec: 0, frame_id: "f".into() },
            height, width, fields, is_bigendian, point_step, row_step, data, is_dense: false,
        }
    }
}

fn arb_points() -> impl Strategy<Value = Points> {
    prop::collection::vec(
        (
            -200f32..200.0,
            -200f32..200.0,
            -20f32..20.0,
            0u8..=255,
            0f32..0.2,
            0u16..200,
        ),
        0..64,
    )
    .prop_map(|v| {
        let mut p = Points::with_capacity(v.len());
        let (mut t, mut r) = (Vec::new(), Vec::new());
        for (x, y, z, i, ti, ri) in v {
            p.push(x, y, z, f32::from(i));
            t.push(ti);
            r.push(ri);
        }
        p.time = Some(t);
        p.ring = Some(r);
        p
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any message: decode either errors or returns consistent points; the accounting
    /// of dropped points is exact.
    #[test]
    fn arbitrary_messages_never_panic(c in arb_cloud()) {
        if let Ok(d) = decode(&c, &DecodeOptions::default()) {
            let p = &d.points;
            prop_assert!(c.validate().is_ok());
            prop_assert_eq!(p.len() + d.dropped_non_finite, c.point_count() as usize);
            prop_assert!(p.y.len() == p.len() && p.z.len() == p.len() && p.intensity.len() == p.len());
            prop_assert!(p.x.iter().chain(&p.y).chain(&p.z).chain(&p.intensity).all(|v| v.is_finite()));
            prop_assert!(p.time.as_ref().is_none_or(|t| t.len() == p.len()));
            prop_assert!(p.ring.as_ref().is_none_or(|r| r.len() == p.len()));
        }
        // The CDR form round-trips exactly, whatever the content.
        prop_assert_eq!(PointCloud2::from_cdr(&c.to_cdr()).unwrap(), c);
    }

    /// Arbitrary bytes through the CDR reader and the decoder: errors only.
    #[test]
    fn arbitrary_cdr_bytes_never_panic(mut bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        if bytes.len() >= 2 { bytes[0] = 0; bytes[1] = 1; }
        if let Ok(c) = PointCloud2::from_cdr(&bytes) {
            let _ = decode(&c, &DecodeOptions::default());
        }
    }

    /// Valid encodes decode back to the same points in every layout.
    #[test]
    fn valid_encodes_decode_back(p in arb_points(), li in 0usize..6, sec in 0i32..2_000_000_000) {
        let layout = Layout::ALL[li];
        let c = encode(&p, layout, Header { stamp_sec: sec, stamp_nanosec: 5, frame_id: "l".into() });
        let d = decode(&c, &DecodeOptions::default()).unwrap();
        prop_assert_eq!(d.dropped_non_finite, 0);
        prop_assert_eq!(&d.points.x, &p.x);
        prop_assert_eq!(&d.points.y, &p.y);
        prop_assert_eq!(&d.points.z, &p.z);
        prop_assert_eq!(&d.points.intensity, &p.intensity);
        if layout != Layout::XyziF32 {
            let rings = p.ring.as_ref().unwrap();
            prop_assert_eq!(d.points.ring.as_ref().unwrap(), rings);
        }
        if let Some(t) = &d.points.time {
            for (a, b) in t.iter().zip(p.time.as_ref().unwrap()) {
                prop_assert!((a - b).abs() < 2e-6, "{:?}: {} vs {}", layout, a, b);
            }
        }
    }
}
