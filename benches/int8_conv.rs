//! INT8 vs FP32 3x3 convolution on CenterPoint-sized layers (64 -> 64 at 128 x 128 and
//! 128 -> 128 at 64 x 64, stride 1, padding 1). Criterion's "elements" are operations
//! (2 per multiply-add), so its throughput line reads directly as OP/s; the INT8 and FP32
//! rows of one run are directly comparable.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::kernels::{Isa, PackedConv};
use lidar_ptq::ops::Tensor;
use lidar_ptq::ops::conv2d::{self, Conv2dParams};
use lidar_ptq::quant::Requant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn conv3x3(c: &mut Criterion) {
    for (ch, hw) in [(64, 128), (128, 64)] {
        let mut r = ChaCha8Rng::seed_from_u64(7);
        let ops = 2 * ch * ch * 9 * hw * hw;
        let mut g = c.benchmark_group(format!("conv3x3_{ch}x{ch}_{hw}x{hw}"));
        g.sample_size(10);
        g.throughput(Throughput::Elements(ops as u64));

        let x = Tensor::from_fn(&[1, ch, hw, hw], |_| r.random_range(-1.0f32..1.0));
        let wt = Tensor::from_fn(&[ch, ch, 3, 3], |_| r.random_range(-1.0f32..1.0));
        let p = Conv2dParams::new(1, 1);
        g.bench_function("fp32_gemm", |b| {
            b.iter(|| conv2d::forward(black_box(&x), &wt, None, p).unwrap())
        });

        let wq: Vec<i8> = (0..ch * ch * 9)
            .map(|_| r.random_range(-127i8..=127))
            .collect();
        let bias: Vec<i32> = (0..ch).map(|_| r.random_range(-5000..5000)).collect();
        let rq = vec![
            Requant {
                multiplier: 1.0 / 4096.0,
                zero_point: 0,
                lo: 0,
                hi: 255,
            };
            ch
        ];
        let packed = PackedConv::new(&wq, [ch, ch, 3, 3], &bias, &rq, (1, 1), (1, 1)).unwrap();
        let xq: Vec<u8> = (0..ch * hw * hw)
            .map(|_| r.random_range(0..=255u8))
            .collect();
        let shape = [1, ch, hw, hw];
        let mut out = vec![0u8; ch * hw * hw];
        let mut isas = vec![Isa::Scalar];
        isas.extend(Isa::simd_available());
        for isa in isas {
            g.bench_function(format!("int8_{isa:?}").to_lowercase(), |b| {
                b.iter(|| {
                    packed
                        .forward(isa, black_box(&xq), shape, 3, &mut out)
                        .unwrap()
                })
            });
        }
        g.finish();
    }
}

criterion_group!(benches, conv3x3);
criterion_main!(benches);
