//! Sparse 3D convolution on a lidar-like site set: one simulated HDL-64E scan voxelised on
//! the nuScenes 0.075 m voxel grid (41 x 1440 x 1440), capped at 30k voxels. Benchmarks the
//! voxeliser, rulebook construction, and forward/backward of a submanifold 3x3x3 16 -> 16
//! conv and a stride-2 3x3x3 16 -> 32 conv (VoxelResBackBone8x's first two layer kinds).
//! Also every rulebook of the nuScenes voxel preset's frame (`FrameSites::build`: what
//! each scan costs before the first sparse conv, on the CPU and GPU engines alike).
//! Criterion's "elements" are FLOPs (2 per multiply-add over the rulebook's pairs).
//! Run: cargo bench --bench sparse_conv (add `-- --quick` for a fast pass).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use lidar_ptq::engine::sparse::FrameSites;
use lidar_ptq::model::ModelConfig;
use lidar_ptq::model::config::PointFeature;
use lidar_ptq::model::graph::Graph;
use lidar_ptq::model::voxel_mean::{VoxelMean, VoxelMeanParams};
use lidar_ptq::ops::Tensor;
use lidar_ptq::ops::sparse_conv;
use lidar_ptq::sim::{LidarModel, Scene, SimConfig};
use lidar_ptq::sparse::Rulebook;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::hint::black_box;

fn random(r: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    Tensor::from_fn(shape, |_| r.random_range(-1.0f32..1.0))
}

fn sparse_conv(c: &mut Criterion) {
    let points = Scene::new(SimConfig::new(LidarModel::Hdl64), 42)
        .frame(0)
        .points;
    let params = VoxelMeanParams {
        point_range: [-54.0, -54.0, -5.0, 54.0, 54.0, 3.0],
        cell_size: [0.075, 0.075, 0.2],
        max_points: 10,
        max_voxels: 30_000,
        point_features: vec![
            PointFeature::X,
            PointFeature::Y,
            PointFeature::Z,
            PointFeature::Intensity,
            PointFeature::TimeLag,
        ],
        intensity_scale: 1.0,
    };
    let mut vm = VoxelMean::new(params).unwrap();
    let voxels = vm.voxelize(&points, None).unwrap().voxels;
    let (coords, shape) = (&voxels.coords, voxels.shape);
    let subm = Rulebook::submanifold(coords, shape, 3).unwrap();
    let down = Rulebook::regular(coords, shape, [3; 3], [2; 3], [1; 3]).unwrap();
    println!(
        "{} points -> {} voxels; submanifold 3x3x3: {} pairs; stride-2 3x3x3: {} outputs, {} pairs",
        points.len(),
        voxels.len(),
        subm.num_pairs(),
        down.n_out(),
        down.num_pairs()
    );

    let mut g = c.benchmark_group("sparse_conv_hdl64_nuscenes_voxel");
    g.sample_size(10);
    g.throughput(Throughput::Elements(points.len() as u64));
    g.bench_function("voxel_mean", |b| {
        b.iter(|| vm.voxelize(black_box(&points), None).unwrap())
    });
    g.throughput(Throughput::Elements(coords.len() as u64));
    g.bench_function("rulebook_submanifold_3", |b| {
        b.iter(|| Rulebook::submanifold(black_box(coords), shape, 3).unwrap())
    });
    g.bench_function("rulebook_stride2_3", |b| {
        b.iter(|| Rulebook::regular(black_box(coords), shape, [3; 3], [2; 3], [1; 3]).unwrap())
    });
    let cfg = ModelConfig::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/models/nuscenes_voxel.yaml"),
    )
    .unwrap();
    let graph = Graph::build(&cfg).unwrap();
    let spec = graph.sparse.as_ref().unwrap();
    let sites = FrameSites::build(spec, coords).unwrap();
    println!(
        "nuscenes_voxel frame: active sites per set {:?}",
        sites.counts()
    );
    g.bench_function("frame_sites_nuscenes_voxel", |b| {
        b.iter(|| FrameSites::build(spec, black_box(coords)).unwrap())
    });

    let mut r = ChaCha8Rng::seed_from_u64(7);
    let x = random(&mut r, &[coords.len(), 16]);
    for (name, rb, cout) in [("subm3_16x16", &subm, 16), ("stride2_16x32", &down, 32)] {
        let w = random(&mut r, &[cout, 3, 3, 3, 16]);
        let bias = vec![0.1f32; cout];
        let flops = 2 * rb.num_pairs() * 16 * cout;
        g.throughput(Throughput::Elements(flops as u64));
        g.bench_function(format!("{name}_forward"), |b| {
            b.iter(|| sparse_conv::forward(black_box(&x), rb, &w, Some(&bias)).unwrap())
        });
        let gy = random(&mut r, &[rb.n_out(), cout]);
        // Input and weight gradients: two products of the forward's size.
        g.throughput(Throughput::Elements(2 * flops as u64));
        g.bench_function(format!("{name}_backward"), |b| {
            b.iter(|| sparse_conv::backward(black_box(&x), rb, &w, true, &gy).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, sparse_conv);
criterion_main!(benches);
