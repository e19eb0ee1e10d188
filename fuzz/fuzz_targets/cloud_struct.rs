//! Arbitrary PointCloud2 structures (small sizes, arbitrary fields and bytes) -> decode.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use lidar_ptq::cloud::{DecodeOptions, PointCloud2, PointField, decode};
use lidar_ptq::msgs::Header;

const NAMES: [&str; 10] = [
    "x", "y", "z", "intensity", "ring", "t", "time", "timestamp", "line", "other",
];

fn cloud(u: &mut Unstructured<'_>) -> Result<PointCloud2> {
    let nf = u.int_in_range(0..=8)?;
    let mut fields = Vec::with_capacity(nf);
    for _ in 0..nf {
        fields.push(PointField {
            name: (*u.choose(&NAMES)?).into(),
            offset: u.int_in_range(0..=64)?,
            datatype: u.int_in_range(0..=10)?,
            count: u.int_in_range(0..=3)?,
        });
    }
    // Mostly small sizes, sometimes extreme ones.
    let size = |u: &mut Unstructured<'_>, max: u32| -> Result<u32> {
        Ok(if u.ratio(1, 16)? { u.arbitrary()? } else { u.int_in_range(0..=max)? })
    };
    let height = size(u, 8)?;
    let width = size(u, 64)?;
    let point_step = size(u, 64)?;
    let row_step = size(u, 4096)?;
    Ok(PointCloud2 {
        header: Header {
            stamp_sec: u.arbitrary()?,
            stamp_nanosec: u.arbitrary()?,
            frame_id: String::new(),
        },
        height,
        width,
        fields,
        is_bigendian: u.arbitrary()?,
        point_step,
        row_step,
        is_dense: u.arbitrary()?,
        data: u.bytes(u.len())?.to_vec(),
    })
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    if let Ok(c) = cloud(&mut u) {
        if let Ok(d) = decode(&c, &DecodeOptions::default()) {
            assert_eq!(d.points.len() + d.dropped_non_finite, c.point_count() as usize);
            assert!(d.points.x.iter().all(|v| v.is_finite()));
        }
    }
});
