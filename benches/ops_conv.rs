//! Conv2d 3x3 throughput on a CenterPoint-sized layer (nuScenes pillar backbone level 1:
//! 64 -> 64 channels at 256 x 256, stride 1, padding 1). Criterion's "elements" are FLOPs
//! (2 per multiply-add), so its throughput line reads directly as FLOP/s; for the Winograd
//! forward it is the direct convolution's FLOPs per second (an effective rate).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::ops::Tensor;
use lidar_ptq::ops::conv2d::{self, Conv2dParams};
use lidar_ptq::ops::{conv_narrow, winograd};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn random(r: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| r.random_range(-1.0f32..1.0))
}

fn conv3x3(c: &mut Criterion) {
    let (cin, cout, h, w) = (64, 64, 256, 256);
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let x = random(&mut r, &[1, cin, h, w]);
    let wt = random(&mut r, &[cout, cin, 3, 3]);
    let p = Conv2dParams::new(1, 1);
    let flops = 2 * cout * cin * 9 * h * w;
    let mut g = c.benchmark_group("conv2d_3x3_64x64_256x256");
    g.sample_size(10);
    g.throughput(Throughput::Elements(flops as u64));
    g.bench_function("forward", |b| {
        b.iter(|| conv2d::forward(black_box(&x), &wt, None, p).unwrap())
    });
    // The inference engine's path for this layer (same FLOPs counted: the direct sum's).
    let u = winograd::transform_weights(&wt).unwrap();
    g.bench_function("forward_winograd", |b| {
        b.iter(|| winograd::forward(black_box(&x), &u, cout, None).unwrap())
    });
    let gy = random(&mut r, &[1, cout, h, w]);
    // The backward does two GEMMs of the forward's size (input and weight gradients).
    g.throughput(Throughput::Elements(2 * flops as u64));
    g.bench_function("backward", |b| {
        b.iter(|| conv2d::backward(black_box(&x), &wt, false, p, &gy).unwrap())
    });
    g.finish();
}

/// A head output layer (64 -> 2 channels at 128 x 128): the three forwards that could run it.
fn conv3x3_narrow(c: &mut Criterion) {
    let (cin, cout, h, w) = (64, 2, 128, 128);
    let mut r = ChaCha8Rng::seed_from_u64(8);
    let x = random(&mut r, &[1, cin, h, w]);
    let wt = random(&mut r, &[cout, cin, 3, 3]);
    let mut g = c.benchmark_group("conv2d_3x3_64x2_128x128");
    g.sample_size(20);
    g.throughput(Throughput::Elements((2 * cout * cin * 9 * h * w) as u64));
    g.bench_function("forward", |b| {
        b.iter(|| conv2d::forward(black_box(&x), &wt, None, Conv2dParams::new(1, 1)).unwrap())
    });
    let u = winograd::transform_weights(&wt).unwrap();
    g.bench_function("forward_winograd", |b| {
        b.iter(|| winograd::forward(black_box(&x), &u, cout, None).unwrap())
    });
    g.bench_function("forward_narrow", |b| {
        b.iter(|| conv_narrow::forward(black_box(&x), &wt, None).unwrap())
    });
    g.finish();
}

criterion_group!(benches, conv3x3, conv3x3_narrow);
criterion_main!(benches);
