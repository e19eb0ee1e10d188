//! Simulator throughput: whole HDL-64E / HDL-32E / VLP-16 scans of a generated street,
//! on one core (serial column casting) so the number reads as scans per second per core.
//! Run: cargo bench --bench sim

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};
use std::hint::black_box;

fn scans(c: &mut Criterion) {
    let mut group = c.benchmark_group("sim_scan_1core");
    group.sample_size(20);
    for model in [LidarModel::Hdl64, LidarModel::Hdl32, LidarModel::Vlp16] {
        let mut cfg = SimConfig::new(model);
        cfg.parallel = false;
        let scene = Scene::new(cfg, 42);
        group.throughput(Throughput::Elements(1));
        let mut k = 0u64;
        group.bench_function(model.name(), |b| {
            b.iter(|| {
                k += 1;
                black_box(scene.frame(k % 50).points.len())
            })
        });
    }
    group.finish();
}

criterion_group!(benches, scans);
criterion_main!(benches);
