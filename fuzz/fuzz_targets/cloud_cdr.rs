//! Arbitrary bytes -> PointCloud2::from_cdr -> decode: must only ever return errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lidar_ptq::cloud::{DecodeOptions, PointCloud2, decode};

fuzz_target!(|data: &[u8]| {
    // Force a valid encapsulation header half the time so the fuzzer gets past it.
    let mut bytes = data.to_vec();
    if bytes.len() >= 2 && bytes[0] & 1 == 0 {
        bytes[0] = 0;
        bytes[1] = 1;
    }
    if let Ok(cloud) = PointCloud2::from_cdr(&bytes) {
        if let Ok(d) = decode(&cloud, &DecodeOptions::default()) {
            assert_eq!(
                d.points.len() + d.dropped_non_finite,
                cloud.point_count() as usize
            );
        }
        // Whatever parsed must serialise back to a payload that parses to the same.
        assert_eq!(PointCloud2::from_cdr(&cloud.to_cdr()).as_ref(), Ok(&cloud));
    }
});
