//! Importing OpenPCDet CenterPoint-Pillar checkpoints, checked against tensors that
//! OpenPCDet's own PyTorch modules computed (shared/data/openpcdet-centerpoint-pillar):
//! both torch containers give the same weights, our voxeliser gives OpenPCDet's voxels,
//! our FP32 engine gives its pillar features, BEV map, backbone output and every head
//! output; hostile or damaged checkpoints are refused with clear errors; the imported
//! model calibrates to INT8 and runs in the detector like our own models.

mod common;

use lidar_ptq::detector::Detector;
use lidar_ptq::engine::{Fp32Engine, NetInput};
use lidar_ptq::import::openpcdet::{self, Imported};
use lidar_ptq::import::pickle::Pickle;
use lidar_ptq::import::torch_file::Checkpoint;
use lidar_ptq::model::graph::{Graph, Op};
use lidar_ptq::model::voxelize::{Mode, Pillars, Voxelizer, decorate};
use lidar_ptq::model::{ModelBundle, ModelConfig};
use lidar_ptq::ops::Tensor;
use lidar_ptq::quant::calibrate::{CalibOptions, Method, calibrate};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const NUSCENES_SCAN: &str =
    "nuscenes/n015-2018-07-24-11-22-45+0800__LIDAR_TOP__1532402927647951.pcd.bin";
const KITTI_SCAN: &str = "kitti/training/velodyne/000001.bin";

fn reference(name: &str) -> PathBuf {
    common::data_dir()
        .join("openpcdet-centerpoint-pillar")
        .join(name)
}

fn import(checkpoint: &str) -> Imported {
    openpcdet::import(&reference(checkpoint), &reference("model.yaml"))
        .unwrap_or_else(|e| panic!("importing {checkpoint}: {e}"))
}

/// A safetensors file's tensors as (shape, f32 or i32 values widened to f64).
struct Recorded {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
}

impl Recorded {
    fn load(name: &str) -> Self {
        let bytes = std::fs::read(reference(name)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut tensors = HashMap::new();
        for (n, t) in st.tensors() {
            let vals: Vec<f64> = match t.dtype() {
                safetensors::Dtype::F32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                safetensors::Dtype::I32 => t
                    .data()
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                d => panic!("{name}: {n} has dtype {d:?}"),
            };
            tensors.insert(n, (t.shape().to_vec(), vals));
        }
        Self { tensors }
    }

    fn get(&self, name: &str) -> &(Vec<usize>, Vec<f64>) {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("no recorded tensor {name}"))
    }

    fn f32s(&self, name: &str) -> Vec<f32> {
        self.get(name).1.iter().map(|&v| v as f32).collect()
    }

    fn i32s(&self, name: &str) -> Vec<i32> {
        self.get(name).1.iter().map(|&v| v as i32).collect()
    }
}

/// Checks `got` against the recorded tensor elementwise with the reference's suggested
/// tolerance |a - b| <= 1e-4 + 1e-4 |b|; returns (max abs error, max abs error / |b|
/// over elements with |b| > 1e-3).
fn assert_close(what: &str, got: &[f32], shape: &[usize], want: &(Vec<usize>, Vec<f64>)) {
    assert_eq!(shape, want.0.as_slice(), "{what}: shape");
    assert_eq!(got.len(), want.1.len(), "{what}: length");
    let (mut max_abs, mut max_rel, mut worst) = (0.0f64, 0.0f64, 0usize);
    for (i, (&a, &b)) in got.iter().zip(&want.1).enumerate() {
        let d = (a as f64 - b).abs();
        assert!(
            d <= 1e-4 + 1e-4 * b.abs(),
            "{what}[{i}]: {a} vs OpenPCDet {b} (|diff| {d:.3e})"
        );
        if d > max_abs {
            (max_abs, worst) = (d, i);
        }
        if b.abs() > 1e-3 {
            max_rel = max_rel.max(d / b.abs());
        }
    }
    // Guard against comparing two empty or all-zero tensors.
    assert!(
        want.1.iter().any(|v| *v != 0.0),
        "{what}: reference is all zero"
    );
    eprintln!(
        "{what:<34} max |a-b| {max_abs:.3e} (at {worst}), max |a-b|/|b| {max_rel:.3e} (|b| > 1e-3)"
    );
}

/// Pillars as OpenPCDet recorded them (voxels, counts, (b, z, y, x) coords).
fn recorded_pillars(rec: &Recorded) -> Pillars {
    let (shape, _) = rec.get("voxels");
    let coords = rec.i32s("voxel_coords");
    Pillars {
        max_points: shape[1],
        num_features: shape[2],
        features: rec.f32s("voxels"),
        counts: rec
            .i32s("voxel_num_points")
            .into_iter()
            .map(|c| c as u32)
            .collect(),
        coords: coords
            .chunks_exact(4)
            .map(|c| {
                assert_eq!(c[0], 0, "batch index");
                [c[1] as u32, c[2] as u32, c[3] as u32]
            })
            .collect(),
        point_pillar: Vec::new(),
        capped_points: 0,
    }
}

/// Every value of one FP32 run, by value id.
fn run_all(cfg: &ModelConfig, engine: &Fp32Engine, pillars: &Pillars) -> Vec<Option<Tensor>> {
    let mut dec = Vec::new();
    let width = decorate(cfg, pillars, &mut dec);
    let input = NetInput {
        decorated: &dec,
        max_points: pillars.max_points,
        width,
        counts: &pillars.counts,
        coords: &pillars.coords,
    };
    let mut values = vec![None; engine.graph().nodes.len() + 1];
    engine
        .run_observed(&input, &mut |id, t| values[id] = Some(t.clone()))
        .unwrap();
    values
}

fn node_value(graph: &Graph, name: &str) -> usize {
    1 + graph
        .nodes
        .iter()
        .position(|n| n.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

/// Compares every recorded head output `task{t}.{sub-head}`.
fn assert_heads(graph: &Graph, cfg: &ModelConfig, values: &[Option<Tensor>], rec: &Recorded) {
    let mut compared = 0;
    for (t, heads) in graph.tasks.iter().enumerate() {
        let named = cfg
            .head
            .sub_heads
            .iter()
            .map(|s| s.name.as_str())
            .zip(heads.regression.iter().copied())
            .chain(std::iter::once(("hm", heads.heatmap)));
        for (name, v) in named {
            let key = format!("task{t}.{name}");
            let got = values[v].as_ref().unwrap();
            assert_close(&key, &got.data, &got.shape, rec.get(&key));
            compared += 1;
        }
    }
    assert_eq!(compared, 12, "6 sub-heads x 2 tasks");
}

#[test]
fn legacy_and_zip_checkpoints_give_identical_weights() {
    let legacy = import("checkpoint.pth");
    let zip = import("checkpoint_zip.pth");
    assert_eq!(legacy.config, zip.config);
    assert_eq!(legacy.weights, zip.weights);
    assert_eq!(legacy.weights.digest(), zip.weights.digest());
    assert_eq!(legacy.metadata["openpcdet_container"], "legacy");
    assert_eq!(zip.metadata["openpcdet_container"], "zip");
    assert_eq!(legacy.metadata["openpcdet_version"], "pcdet+0.6.0+8caccce");
    // 194 entries = global_step + 26 num_batches_tracked + 167 float tensors.
    let w = &legacy.weights;
    assert_eq!(w.tensors.len(), 167);
    let values: usize = w.tensors.values().map(|t| t.data.len()).sum();
    assert_eq!(values, 283_399);
    let graph = Graph::build(&legacy.config).unwrap();
    assert_eq!(
        graph.num_trainable(),
        281_639,
        "the reference's trainable count"
    );
    assert_eq!(
        w.tensors["vfe.pfn_layers.0.linear.weight"].shape,
        vec![16, 11]
    );
    // Deblock 0 (up-stride 0.5) is a conv [out, in, 2, 2]; deblock 2 a transposed conv
    // [in, out, 2, 2].
    assert_eq!(
        w.tensors["backbone_2d.deblocks.0.0.weight"].shape,
        vec![32, 16, 2, 2]
    );
    assert_eq!(
        w.tensors["backbone_2d.deblocks.2.0.weight"].shape,
        vec![64, 32, 2, 2]
    );
    // The conventions the config maps to.
    let c = &legacy.config;
    assert_eq!(c.grid_size(), [256, 256, 1]);
    assert_eq!(c.head_stride(), 4.0);
    assert_eq!(c.pillar_input_width(), Some(11));
    assert_eq!(c.voxelization.max_cells.test, 10_000);
    let pf = c.pillar_features.as_ref().unwrap();
    assert!(pf.max_includes_padding && pf.absolute_xyz && !pf.distance);
    assert_eq!(
        (pf.bn_eps, c.backbone_2d.bn_eps, c.head.bn_eps),
        (1e-3, 1e-3, 1e-5)
    );
    assert!(c.head.bias_before_norm);
    assert!(!c.decode.local_max, "OpenPCDet decodes the plain top-K");
    assert_eq!(
        c.head.tasks,
        vec![
            vec!["car".to_string()],
            vec!["pedestrian".into(), "bicycle".into()]
        ]
    );
    // Both containers parse to the same tensors, value for value, straight from the files.
    let a = Checkpoint::open(&reference("checkpoint.pth")).unwrap();
    let b = Checkpoint::open(&reference("checkpoint_zip.pth")).unwrap();
    assert_eq!(a.pickle.storages.len(), b.pickle.storages.len());
}

#[test]
fn voxeliser_reproduces_openpcdet_voxels_on_the_nuscenes_scan() {
    let m = import("checkpoint.pth");
    let pts =
        lidar_ptq::dataset::nuscenes::read_sweep(&common::data_dir().join(NUSCENES_SCAN)).unwrap();
    let mut vox = Voxelizer::new(&m.config, Mode::Test);
    let mut got = Pillars::default();
    vox.voxelize(&pts, None, &mut got);
    let want = recorded_pillars(&Recorded::load("voxels.safetensors"));
    assert_eq!(got.len(), 4260);
    assert_eq!(got.coords, want.coords);
    assert_eq!(got.counts, want.counts);
    assert_eq!(got.features, want.features, "voxel points, bit for bit");
    assert_eq!(got.counts.iter().sum::<u32>(), 21_611);
}

#[test]
fn fp32_engine_reproduces_openpcdet_on_nuscenes() {
    let m = import("checkpoint_zip.pth");
    let graph = Graph::build(&m.config).unwrap();
    let engine = Fp32Engine::new(&graph, &m.weights).unwrap();
    let rec = Recorded::load("outputs.safetensors");
    let pillars = recorded_pillars(&Recorded::load("voxels.safetensors"));
    let values = run_all(&m.config, &engine, &pillars);

    let pf = values[node_value(&graph, "vfe.pfn_layers.1.max")]
        .as_ref()
        .unwrap();
    assert_close(
        "pillar_features",
        &pf.data,
        &pf.shape,
        rec.get("pillar_features"),
    );

    // The BEV map is recorded as its centre 32 x 32 crop.
    let bev = values[node_value(&graph, "map_to_bev")].as_ref().unwrap();
    assert_eq!(bev.shape, vec![1, 32, 256, 256]);
    let mut crop = Vec::with_capacity(32 * 32 * 32);
    for c in 0..32 {
        for y in 112..144 {
            let row = (c * 256 + y) * 256;
            crop.extend_from_slice(&bev.data[row + 112..row + 144]);
        }
    }
    assert_close(
        "spatial_features_center_crop",
        &crop,
        &[1, 32, 32, 32],
        rec.get("spatial_features_center_crop"),
    );

    let neck = values[node_value(&graph, "backbone_2d.concat")]
        .as_ref()
        .unwrap();
    assert_close(
        "spatial_features_2d",
        &neck.data,
        &neck.shape,
        rec.get("spatial_features_2d"),
    );
    assert_heads(&graph, &m.config, &values, &rec);
}

#[test]
fn voxeliser_and_engine_reproduce_openpcdet_on_the_kitti_scan() {
    let m = import("checkpoint.pth");
    let graph = Graph::build(&m.config).unwrap();
    let engine = Fp32Engine::new(&graph, &m.weights).unwrap();
    let pts =
        lidar_ptq::dataset::kitti::read_velodyne(&common::data_dir().join(KITTI_SCAN)).unwrap();
    // The pillar cap (10,000 of 10,689 candidate pillars) comes from the imported config.
    let mut vox = Voxelizer::new(&m.config, Mode::Test);
    let mut pillars = Pillars::default();
    vox.voxelize(&pts, None, &mut pillars);
    let want = Recorded::load("kitti_voxels.safetensors");
    let coords: Vec<[u32; 3]> = want
        .i32s("voxel_coords")
        .chunks_exact(4)
        .map(|c| [c[1] as u32, c[2] as u32, c[3] as u32])
        .collect();
    assert_eq!(pillars.coords, coords, "pillar list and first-seen order");
    let counts: Vec<u32> = want
        .i32s("voxel_num_points")
        .into_iter()
        .map(|c| c as u32)
        .collect();
    assert_eq!(pillars.counts, counts);
    assert_eq!(pillars.point_pillar, want.i32s("points_voxel_id"));
    assert_eq!(pillars.counts.iter().sum::<u32>(), 62_726);

    let values = run_all(&m.config, &engine, &pillars);
    assert_heads(
        &graph,
        &m.config,
        &values,
        &Recorded::load("kitti_outputs.safetensors"),
    );
}

/// Legacy-container bytes around a main pickle (magic, protocol, sys_info, main,
/// empty storage key list).
fn legacy_file(main: &[u8]) -> Vec<u8> {
    let mut v = vec![0x80, 0x02, 0x8a, 10];
    v.extend(&0x1950a86a20f9469cfc6c_u128.to_le_bytes()[..10]);
    v.push(b'.');
    v.extend(b"\x80\x02M\xe9\x03.");
    v.extend(b"\x80\x02}X\x0d\x00\x00\x00little_endian\x88s.");
    v.extend(main);
    v.extend(b"\x80\x02].");
    v
}

/// A zip-container checkpoint holding `data.pkl` only.
fn zip_file(pkl: &[u8]) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let mut z = zip::ZipWriter::new(&mut buf);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pkl).unwrap();
    z.start_file("archive/byteorder", opts).unwrap();
    z.write_all(b"little").unwrap();
    z.finish().unwrap();
    buf.into_inner()
}

fn bin_unicode(s: &str) -> Vec<u8> {
    let mut v = vec![b'X'];
    v.extend((s.len() as u32).to_le_bytes());
    v.extend(s.as_bytes());
    v
}

#[test]
fn hostile_pickles_are_refused_without_running_anything() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("pwned");
    let command = format!("touch {}", marker.display());
    // os.system('touch <marker>') by GLOBAL + REDUCE.
    let mut os_system = b"\x80\x02cos\nsystem\n".to_vec();
    os_system.extend(bin_unicode(&command));
    os_system.extend(b"\x85R.");
    // builtins.eval('...') by STACK_GLOBAL + REDUCE, inside a dict like a checkpoint.
    let mut eval = b"\x80\x04}".to_vec();
    eval.extend(bin_unicode("model_state"));
    eval.extend(bin_unicode("builtins"));
    eval.extend(bin_unicode("eval"));
    eval.push(0x93);
    eval.extend(bin_unicode(&format!(
        "__import__('os').system('{command}')"
    )));
    eval.extend(b"\x85Rs.");
    // posix.system through a REDUCE on a memoised callable.
    let mut posix = b"\x80\x02cposix\nsystem\nq\x00h\x00".to_vec();
    posix.extend(bin_unicode(&command));
    posix.extend(b"\x85R.");

    let cases: [(&str, &[u8], &str); 3] = [
        ("os_system", &os_system, "os.system"),
        ("builtins_eval", &eval, "builtins.eval"),
        ("posix_system", &posix, "posix.system"),
    ];
    let cfg = reference("model.yaml");
    for (name, pkl, callable) in cases {
        let e = Pickle::parse(pkl).unwrap_err().to_string();
        assert!(e.contains(&format!("`{callable}`")), "{name}: {e}");
        assert!(e.contains("nothing was imported or executed"), "{e}");
        for (container, bytes) in [("legacy", legacy_file(pkl)), ("zip", zip_file(pkl))] {
            let path = dir.path().join(format!("{name}_{container}.pth"));
            std::fs::write(&path, bytes).unwrap();
            let e = openpcdet::import(&path, &cfg).unwrap_err().to_string();
            assert!(
                e.contains(&format!("`{callable}`")) && e.contains(&*path.to_string_lossy()),
                "{name} ({container}): {e}"
            );
        }
    }
    assert!(!marker.exists(), "a hostile pickle ran a command");
}

#[test]
fn damaged_checkpoints_are_clear_errors() {
    let cfg = reference("model.yaml");
    let dir = tempfile::tempdir().unwrap();
    let try_import = |name: &str, bytes: &[u8]| -> String {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let e = openpcdet::import(&path, &cfg)
            .err()
            .unwrap_or_else(|| panic!("{name} was accepted"))
            .to_string();
        assert!(e.contains(name), "the error names the file: {e}");
        e
    };
    for file in ["checkpoint.pth", "checkpoint_zip.pth"] {
        let bytes = std::fs::read(reference(file)).unwrap();
        // Cut inside every part: headers, the main pickle, the key list, the storages.
        let n = bytes.len();
        for cut in [
            0,
            5,
            20,
            100,
            5_000,
            30_000,
            32_300,
            36_320,
            n / 2,
            n - 9,
            n - 1,
        ] {
            let e = try_import(&format!("cut{cut}_{file}"), &bytes[..cut]);
            let clear = [
                "truncated",
                "ends early",
                "not a torch checkpoint",
                "damaged",
            ];
            assert!(
                clear.iter().any(|c| e.contains(c)),
                "{file} cut at {cut}: {e}"
            );
        }
        // Not a checkpoint at all.
        let e = try_import(&format!("text_{file}"), b"model weights, honest");
        assert!(e.contains("not a torch checkpoint"), "{e}");
    }
    // A flipped byte in a zip storage fails the entry's CRC.
    let mut bytes = std::fs::read(reference("checkpoint_zip.pth")).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    let e = try_import("flipped.pth", &bytes);
    assert!(e.contains("damaged"), "{e}");
    // A legacy file whose magic number is wrong.
    let mut bytes = std::fs::read(reference("checkpoint.pth")).unwrap();
    bytes[5] ^= 0x01;
    let e = try_import("badmagic.pth", &bytes);
    assert!(e.contains("not a torch checkpoint"), "{e}");
}

/// The reference config with one line replaced (the replaced text must exist).
fn edited_config(dir: &Path, name: &str, from: &str, to: &str) -> PathBuf {
    let text = std::fs::read_to_string(reference("model.yaml")).unwrap();
    assert!(text.contains(from), "{from}");
    let p = dir.join(name);
    std::fs::write(&p, text.replacen(from, to, 1)).unwrap();
    p
}

#[test]
fn unsupported_settings_and_mismatched_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = reference("checkpoint.pth");
    let cases = [
        (
            "NUM_FILTERS: [ 16, 32, 64 ]",
            "NUM_FILTERS: [ 16, 32, 48 ]",
            "backbone_2d.blocks.2",
        ),
        (
            "NAME: PillarVFE",
            "NAME: DynamicPillarVFE",
            "module `DynamicPillarVFE` is not supported",
        ),
        (
            "USE_NORM: True",
            "USE_NORM: True\n        USE_PLANE: True",
            "MODEL.VFE: unsupported setting(s) USE_PLANE",
        ),
        (
            "'vel': {'out_channels': 2, 'num_conv': 2},",
            "'vel': {'out_channels': 2, 'num_conv': 2}, 'iou': {'out_channels': 1, 'num_conv': 2},",
            "sub-head `iou` is not supported",
        ),
        (
            "used_feature_list: ['x', 'y', 'z', 'intensity', 'timestamp']",
            "used_feature_list: ['x', 'y', 'z', 'intensity', 'elongation']",
            "point feature `elongation`",
        ),
        (
            "    MAP_TO_BEV:",
            "    BACKBONE_3D:\n        NAME: VoxelResBackBone8x\n\n    MAP_TO_BEV:",
            "`VoxelResBackBone8x` is not supported",
        ),
        (
            "NMS_TYPE: nms_gpu",
            "NMS_TYPE: circle_nms",
            "MODEL.DENSE_HEAD.POST_PROCESSING.NMS_CONFIG.NMS_TYPE",
        ),
        (
            "FEATURE_MAP_STRIDE: 4",
            "FEATURE_MAP_STRIDE: 8",
            "backbone's output stride is 4",
        ),
    ];
    for (i, (from, to, want)) in cases.iter().enumerate() {
        let cfg = edited_config(dir.path(), &format!("case{i}.yaml"), from, to);
        let e = openpcdet::import(&ckpt, &cfg)
            .err()
            .unwrap_or_else(|| panic!("case {i} ({to}) was accepted"))
            .to_string();
        assert!(e.contains(want), "case {i}: {e}");
    }
    // USE_BIAS_BEFORE_NORM False: the config is fine, but the checkpoint holds the
    // biases such a model lacks, and the error names them.
    let cfg = edited_config(
        dir.path(),
        "nobias.yaml",
        "USE_BIAS_BEFORE_NORM: True",
        "USE_BIAS_BEFORE_NORM: False",
    );
    let e = openpcdet::import(&ckpt, &cfg).unwrap_err().to_string();
    assert!(e.contains("dense_head.shared_conv.0.bias"), "{e}");
}

/// The CLI verb writes a model file that loads like our own and a YAML that describes it.
#[test]
fn import_verb_writes_a_self_describing_model() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("imported");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(["import", "openpcdet", "--checkpoint"])
        .arg(reference("checkpoint.pth"))
        .arg("--config")
        .arg(reference("model.yaml"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(stdout.contains("openpcdet_model"), "{stdout}");
    let bundle = ModelBundle::load(
        &out.join("model.safetensors"),
        Some(&out.join("model.yaml")),
    )
    .unwrap();
    let lib = import("checkpoint.pth");
    assert_eq!(bundle.config, lib.config);
    assert_eq!(bundle.weights, lib.weights);
    assert_eq!(bundle.metadata["source"], "openpcdet");
    // A hostile checkpoint fails the verb with the callable named.
    let bad = dir.path().join("bad.pth");
    std::fs::write(
        &bad,
        zip_file(b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R."),
    )
    .unwrap();
    let r = std::process::Command::new(env!("CARGO_BIN_EXE_lidar_ptq"))
        .args(["import", "openpcdet", "--checkpoint"])
        .arg(&bad)
        .arg("--config")
        .arg(reference("model.yaml"))
        .arg("--out")
        .arg(dir.path().join("bad_out"))
        .output()
        .unwrap();
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(err.contains("os.system"), "{err}");
    assert!(!dir.path().join("bad_out/model.safetensors").exists());
}

/// Relative RMS error of `x` against `y`, and their correlation, in f64.
fn agreement(x: &[f32], y: &[f32]) -> (f64, f64) {
    let n = y.len() as f64;
    let mean = |v: &[f32]| v.iter().map(|a| *a as f64).sum::<f64>() / n;
    let (mx, my) = (mean(x), mean(y));
    let (mut err, mut norm, mut cov, mut vx, mut vy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (a as f64, b as f64);
        err += (a - b).powi(2);
        norm += b * b;
        cov += (a - mx) * (b - my);
        vx += (a - mx).powi(2);
        vy += (b - my).powi(2);
    }
    ((err / norm).sqrt(), cov / (vx * vy).sqrt())
}

/// The imported model goes through LiDAR-PTQ calibration (tiny settings, the two real
/// scans) and runs INT8 in the detector; its head maps follow the FP32 ones.
#[test]
fn imported_model_calibrates_and_runs_int8() {
    let m = import("checkpoint_zip.pth");
    let nus =
        lidar_ptq::dataset::nuscenes::read_sweep(&common::data_dir().join(NUSCENES_SCAN)).unwrap();
    let kitti =
        lidar_ptq::dataset::kitti::read_velodyne(&common::data_dir().join(KITTI_SCAN)).unwrap();
    let frames = vec![nus.clone(), kitti];
    let mut o = CalibOptions::new(Method::LidarPtq);
    o.grid_frames = 2;
    o.grid_samples = 4096;
    o.recon.iters = 2;
    o.recon.frames = 1;
    o.recon.crop = 6;
    o.recon.crop_pillars = 64;
    o.recon.tgpl_every = 2;
    let q = calibrate(&m.config, &m.weights, &frames, &o).unwrap();
    // Through the INT8 model file and back, checked against the imported weights.
    let dir = tempfile::tempdir().unwrap();
    let qpath = dir.path().join("model.int8.safetensors");
    let graph = Graph::build(&m.config).unwrap();
    lidar_ptq::quant::file::save(&qpath, &q, &graph).unwrap();
    let q = lidar_ptq::quant::file::load_for(&qpath, &m.config, &m.weights).unwrap();
    let mut int8 = Detector::new_int8(m.config.clone(), &m.weights, &q).unwrap();
    let mut fp32 = Detector::new(m.config.clone(), &m.weights).unwrap();
    assert_eq!(int8.precision(), "int8");
    let hq = int8.head_outputs(&nus).unwrap();
    let hf = fp32.head_outputs(&nus).unwrap();
    for (t, (a, b)) in hq.tasks.iter().zip(&hf.tasks).enumerate() {
        for (what, x, y) in [
            ("heatmap", &a.heatmap, &b.heatmap),
            ("regression", &a.regression, &b.regression),
        ] {
            let (rel, corr) = agreement(x, y);
            eprintln!(
                "task {t} {what}: INT8 vs FP32 relative RMS error {rel:.4}, correlation {corr:.4}"
            );
            // Random weights with perturbed BatchNorm and two calibration frames: INT8
            // must track FP32 closely, not exactly (measured: correlation 0.95 to 0.98,
            // relative RMS error 0.11 to 0.27; a broken INT8 path gives ~0 and ~1).
            assert!(corr > 0.9 && rel < 0.35, "task {t} {what}: {rel} {corr}");
        }
    }
    let dets = int8.detect(&nus).unwrap();
    for d in &dets {
        assert!(m.config.classes().contains(&d.class.as_str()));
        assert!(d.score > m.config.decode.score_threshold && d.score <= 1.0);
    }
    eprintln!(
        "INT8 detector: {} detections on the nuScenes scan (random weights)",
        dets.len()
    );
    // The graph's pillar net ends in the max node the engine test reads.
    assert!(matches!(
        graph.nodes[node_value(&graph, "vfe.pfn_layers.1.max") - 1].op,
        Op::PillarMax { .. }
    ));
}

/// `head.bias_before_norm: false` (OpenPCDet's USE_BIAS_BEFORE_NORM default) removes
/// exactly the biases of the convs followed by BatchNorm, and computes what the biased
/// model computes with those biases at zero. Existing descriptions keep their biases.
#[test]
fn bias_before_norm_option_drops_the_hidden_conv_biases() {
    use rand::{RngExt, SeedableRng};
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny_model.yaml"),
    )
    .unwrap();
    let with = ModelConfig::from_yaml(&text).unwrap();
    assert!(
        with.head.bias_before_norm && with.decode.local_max,
        "defaults"
    );
    let mut without = with.clone();
    without.head.bias_before_norm = false;
    let (gw, go) = (
        Graph::build(&with).unwrap(),
        Graph::build(&without).unwrap(),
    );
    let names = |g: &Graph| -> Vec<String> { g.params().into_iter().map(|p| p.name).collect() };
    let dropped: Vec<String> = names(&gw)
        .into_iter()
        .filter(|n| !names(&go).contains(n))
        .collect();
    // Shared conv + (4 regression sub-heads + hm) x 2 tasks, one hidden conv each.
    assert_eq!(dropped.len(), 1 + 5 * 2, "{dropped:?}");
    assert!(dropped.contains(&"dense_head.shared_conv.0.bias".to_string()));
    assert!(dropped.contains(&"dense_head.heads_list.1.hm.0.0.bias".to_string()));
    assert!(names(&go).contains(&"dense_head.heads_list.1.hm.1.bias".to_string()));

    let mut w = lidar_ptq::model::weights::Weights::init(&gw, 5);
    for n in &dropped {
        w.tensors.get_mut(n).unwrap().data.fill(0.0);
    }
    let mut wo = w.clone();
    for n in &dropped {
        wo.tensors.remove(n);
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let mut pts = lidar_ptq::cloud::Points::default();
    for _ in 0..3000 {
        pts.push(
            rng.random_range(-12.0..12.0),
            rng.random_range(-12.0..12.0),
            rng.random_range(-2.0..1.0),
            rng.random_range(0.0..1.0),
        );
    }
    let a = Detector::new(with, &w).unwrap().head_outputs(&pts).unwrap();
    let b = Detector::new(without, &wo)
        .unwrap()
        .head_outputs(&pts)
        .unwrap();
    assert_eq!(a, b);
    // The biased weights do not fit the bias-free model, naming a dropped tensor.
    let e = Fp32Engine::new(&go, &w).err().unwrap().to_string();
    assert!(e.contains("unexpected tensor"), "{e}");
}

/// The imported model starts in the node exactly like our own: the node's parameter
/// file with `model_path` and `int8_model_path` pointing at the imported files, through
/// the node's own startup (the path `lidar_ptq_node` takes before it subscribes).
#[test]
fn imported_model_starts_in_the_node_with_its_int8_model() {
    use lidar_ptq::node::engine::{ActivePrecision, start};
    use lidar_ptq::node::params::{self, NodeParams, ParamValue};
    let m = import("checkpoint.pth");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model.safetensors");
    ModelBundle::save(&model, &m.config, &m.weights, &Default::default()).unwrap();
    let nus =
        lidar_ptq::dataset::nuscenes::read_sweep(&common::data_dir().join(NUSCENES_SCAN)).unwrap();
    let q = calibrate(
        &m.config,
        &m.weights,
        std::slice::from_ref(&nus),
        &CalibOptions::new(Method::MinMax),
    )
    .unwrap();
    let qpath = dir.path().join("model.int8.safetensors");
    lidar_ptq::quant::file::save(&qpath, &q, &Graph::build(&m.config).unwrap()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("config/lidar_ptq_node.yaml")).unwrap();
    let mut values = params::from_ros_yaml(&text, lidar_ptq::node::NODE_NAME).unwrap();
    let path = |p: &Path| ParamValue::String(p.display().to_string());
    values.insert("model_path".into(), path(&model));
    values.insert("int8_model_path".into(), path(&qpath));
    values.insert("precision".into(), ParamValue::String("int8".into()));
    // The shipped file's per-class thresholds name our default model's classes.
    values.insert(
        "class_score_thresholds".into(),
        ParamValue::StringArray(vec!["pedestrian=0.25".into(), "bicycle=0.25".into()]),
    );
    let p = NodeParams::from_values(&values).unwrap();
    let mut s = start(&p).unwrap();
    assert_eq!(s.engine.precision(), ActivePrecision::Int8);
    s.engine.detect(&nus).unwrap();
}
