//! A quick min-max quantized model for timing and tests (`bench --int8 auto`, engine
//! tests): every layer integer with per-channel max-abs 8-bit weights, every value u8
//! asymmetric over the range the FP32 model shows on a few scans, except the head outputs,
//! which stay float. It is not a calibration method (no outlier handling, no grid search,
//! no reconstruction); `quant` calibration proper produces the models meant for accuracy.
//!
//! Sharing rules of `quant::model`: a pillar max, scatter or height compression shares its
//! input's parameters, a concat's inputs share its output's, a residual add's two inputs
//! share one set, so ranges are merged over those groups first.

use super::model::{LayerPlan, Provenance, QuantModel, quantize_weights_minmax};
use super::scheme::{Flavour, Grid, QParams};
use crate::cloud::Points;
use crate::engine::fp32::fold_layers;
use crate::engine::{EngineError, Fp32Engine};
use crate::model::ModelConfig;
use crate::model::graph::{Graph, LayerKind, Op};
use crate::model::input::ScanInput;
use crate::model::voxelize::Mode;
use crate::model::weights::Weights;
use sha2::{Digest, Sha256};

/// The method name recorded in the provenance.
pub const METHOD: &str = "minmax-quick";

/// Builds the quick min-max model of `weights` from the FP32 activations on `scans`.
pub fn minmax_quick(
    cfg: &ModelConfig,
    graph: &Graph,
    weights: &Weights,
    scans: &[Points],
) -> Result<QuantModel, EngineError> {
    if scans.is_empty() {
        return Err(EngineError::Input("min-max needs at least one scan".into()));
    }
    let engine = Fp32Engine::new(graph, weights)?;
    let nv = graph.nodes.len() + 1;
    let mut range = vec![(f32::INFINITY, f32::NEG_INFINITY); nv];
    let mut scan = ScanInput::new(cfg, Mode::Test).map_err(|e| EngineError::op("voxelize", e))?;
    let mut digest = Sha256::new();
    for pts in scans {
        for v in pts
            .x
            .iter()
            .chain(&pts.y)
            .chain(&pts.z)
            .chain(&pts.intensity)
        {
            digest.update(v.to_le_bytes());
        }
        scan.prepare(pts)
            .map_err(|e| EngineError::op("voxelize", e))?;
        engine.run_observed(&scan.input(), &mut |v, t| {
            let r = &mut range[v];
            for &x in &t.data {
                r.0 = r.0.min(x);
                r.1 = r.1.max(x);
            }
        })?;
    }
    // Values that must share parameters, merged with a union-find.
    let mut parent: Vec<usize> = (0..nv).collect();
    fn root(p: &mut [usize], mut v: usize) -> usize {
        while p[v] != v {
            p[v] = p[p[v]];
            v = p[v];
        }
        v
    }
    for (i, n) in graph.nodes.iter().enumerate() {
        let tied: Vec<usize> = match n.op {
            Op::Layer(_) => continue,
            // An add's inputs share parameters; its output is requantized.
            Op::Add { .. } => n.inputs.clone(),
            _ => n.inputs.iter().copied().chain([i + 1]).collect(),
        };
        for &u in &tied[1..] {
            let (a, b) = (root(&mut parent, u), root(&mut parent, tied[0]));
            if a != b {
                parent[a] = b;
            }
        }
    }
    let mut group = vec![(f32::INFINITY, f32::NEG_INFINITY); nv];
    for (v, &(lo, hi)) in range.iter().enumerate() {
        let g = &mut group[root(&mut parent, v)];
        *g = (g.0.min(lo), g.1.max(hi));
    }
    let heads: Vec<usize> = graph
        .tasks
        .iter()
        .flat_map(|t| std::iter::once(t.heatmap).chain(t.regression.iter().copied()))
        .collect();
    let grid = Grid::activation(8, Flavour::Asymmetric);
    let activations = (0..nv)
        .map(|v| {
            if heads.contains(&v) {
                return None;
            }
            let (lo, hi) = group[root(&mut parent, v)];
            // A value never seen (no scan reached it) gets the unit range.
            let (lo, hi) = if lo <= hi { (lo, hi) } else { (0.0, 1.0) };
            Some(QParams::asymmetric(lo, hi, grid))
        })
        .collect();
    let folded = fold_layers(graph, weights)?;
    let layers = graph
        .nodes
        .iter()
        .zip(&folded)
        .map(|(n, f)| match (&n.op, f) {
            (Op::Layer(l), Some(f)) => {
                let axis = match l.kind {
                    LayerKind::ConvTranspose2d { .. } => 1,
                    _ => 0,
                };
                Some(LayerPlan::Int(quantize_weights_minmax(f, axis, 8)))
            }
            _ => None,
        })
        .collect();
    Ok(QuantModel {
        provenance: Provenance {
            fp32_digest: weights.digest(),
            config_yaml: cfg.to_yaml(),
            method: METHOD.into(),
            params: Default::default(),
            weight_bits: 8,
            activation_bits: 8,
            frames: scans.len(),
            frames_digest: digest
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            seed: 0,
        },
        activations,
        layers,
        input_scales: None,
    })
}
