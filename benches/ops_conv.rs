//! Conv2d 3x3 throughput on a CenterPoint-sized layer (nuScenes pillar backbone level 1:
//! 64 -> 64 channels at 256 x 256, stride 1, padding 1). Criterion's "elements" are FLOPs
//! (2 per multiply-add), so its throughput line reads directly as FLOP/s.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::ops::Tensor;
use lidar_ptq::ops::conv2d::{self, Conv2dParams};
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
    let gy = random(&mut r, &[1, cout, h, w]);
    // The backward does two GEMMs of the forward's size (input and weight gradients).
    g.throughput(Throughput::Elements(2 * flops as u64));
    g.bench_function("backward", |b| {
        b.iter(|| conv2d::backward(black_box(&x), &wt, false, p, &gy).unwrap())
    });
    g.finish();
}

criterion_group!(benches, conv3x3);
criterion_main!(benches);
