//! Decode throughput on an Ouster OS1-128 scan: 128 x 2048 = 262,144 points, 48-byte
//! stride (12.6 MB), organised with about 10 % missing (NaN) returns, as ouster-ros
//! publishes it. Reported in bytes of point data per second.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::cloud::{DecodeOptions, Layout, Points, decode, encode};
use lidar_ptq::msgs::Header;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn os1_128() -> lidar_ptq::cloud::PointCloud2 {
    let (rows, cols) = (128usize, 2048usize);
    let mut rng = ChaCha8Rng::seed_from_u64(128);
    let mut p = Points::with_capacity(rows * cols);
    let mut time = Vec::with_capacity(rows * cols);
    let mut ring = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let elev = (-22.5f32 + 45.0 * r as f32 / (rows - 1) as f32).to_radians();
        for c in 0..cols {
            let az = std::f32::consts::TAU * c as f32 / cols as f32;
            let range: f32 = if rng.random_bool(0.1) {
                f32::NAN
            } else {
                rng.random_range(1.0..120.0)
            };
            p.push(
                range * elev.cos() * az.cos(),
                range * elev.cos() * az.sin(),
                range * elev.sin(),
                rng.random_range(0.0..3000.0),
            );
            time.push(c as f32 * 0.1 / cols as f32);
            ring.push(r as u16);
        }
    }
    p.time = Some(time);
    p.ring = Some(ring);
    let mut cloud = encode(
        &p,
        Layout::Ouster,
        Header::from_nanos(1_700_000_000_000_000_000, "os_sensor"),
    );
    cloud.height = rows as u32;
    cloud.width = cols as u32;
    cloud.row_step = (cols * 48) as u32;
    cloud
}

fn bench(c: &mut Criterion) {
    let cloud = os1_128();
    let opts = DecodeOptions::default();
    let mut g = c.benchmark_group("cloud_decode");
    g.throughput(Throughput::Bytes(cloud.data.len() as u64));
    g.bench_function("ouster_os1_128_xyzi_t_ring", |b| {
        b.iter(|| decode(black_box(&cloud), &opts).unwrap())
    });
    let xyzi_only = DecodeOptions {
        time: vec![],
        ring: vec![],
        ..DecodeOptions::default()
    };
    g.bench_function("ouster_os1_128_xyzi", |b| {
        b.iter(|| decode(black_box(&cloud), &xyzi_only).unwrap())
    });
    let mut be = cloud.clone();
    // Same cloud flagged big-endian: exercises the general (per-field dispatch) path.
    be.is_bigendian = true;
    g.bench_function("ouster_os1_128_general_path", |b| {
        b.iter(|| decode(black_box(&be), &opts).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
