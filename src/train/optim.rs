//! AdamW (Adam with decoupled weight decay) and gradient clipping by global norm.

use crate::model::weights::{Weights, WeightsError};
use crate::ops::Tensor;
use std::collections::BTreeMap;

/// Scales all gradients so that their global L2 norm is at most `max_norm` (PyTorch's
/// `clip_grad_norm_`, with its 1e-6 guard); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut BTreeMap<String, Tensor>, max_norm: f32) -> f32 {
    let sq: f64 = grads
        .values()
        .flat_map(|t| &t.data)
        .map(|&g| g as f64 * g as f64)
        .sum();
    let norm = sq.sqrt();
    let coef = max_norm as f64 / (norm + 1e-6);
    if coef < 1.0 {
        for t in grads.values_mut() {
            t.data
                .iter_mut()
                .for_each(|g| *g = (*g as f64 * coef) as f32);
        }
    }
    norm as f32
}

/// AdamW state: first and second moments per parameter, and the step count.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub step: u64,
    m: BTreeMap<String, Vec<f32>>,
    v: BTreeMap<String, Vec<f32>>,
}

impl AdamW {
    /// PyTorch's AdamW defaults (betas 0.9/0.999, eps 1e-8) with the given weight decay.
    pub fn new(weight_decay: f32) -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            step: 0,
            m: BTreeMap::new(),
            v: BTreeMap::new(),
        }
    }

    /// One update of every parameter that has a gradient:
    /// `p <- p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)`.
    pub fn update(&mut self, weights: &mut Weights, grads: &BTreeMap<String, Tensor>, lr: f32) {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.beta1 as f64, self.beta2 as f64);
        let bc1 = 1.0 - b1.powi(t);
        let bc2 = 1.0 - b2.powi(t);
        let (lr, wd, eps) = (lr as f64, self.weight_decay as f64, self.eps as f64);
        for (name, g) in grads {
            let Some(p) = weights.tensors.get_mut(name) else {
                continue;
            };
            let m = self
                .m
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            let v = self
                .v
                .entry(name.clone())
                .or_insert_with(|| vec![0.0; g.len()]);
            for (((pi, &gi), mi), vi) in p.data.iter_mut().zip(&g.data).zip(m).zip(v) {
                let gi = gi as f64;
                let mn = b1 * *mi as f64 + (1.0 - b1) * gi;
                let vn = b2 * *vi as f64 + (1.0 - b2) * gi * gi;
                *mi = mn as f32;
                *vi = vn as f32;
                let decayed = *pi as f64 * (1.0 - lr * wd);
                *pi = (decayed - lr * (mn / bc1) / ((vn / bc2).sqrt() + eps)) as f32;
            }
        }
    }
}

impl AdamW {
    /// Writes the moments and the step count (safetensors, tensors `m/<name>` and
    /// `v/<name>`), so that a resumed run continues exactly where it stopped.
    pub fn save(&self, path: &std::path::Path) -> Result<(), WeightsError> {
        let mut w = Weights::default();
        for (prefix, map) in [("m", &self.m), ("v", &self.v)] {
            for (name, v) in map {
                w.tensors.insert(
                    format!("{prefix}/{name}"),
                    Tensor::new(vec![v.len()], v.clone()).expect("1-D shape"),
                );
            }
        }
        let meta = BTreeMap::from([("adam_step".to_string(), self.step.to_string())]);
        w.save(path, &meta)
    }

    /// Reads what [`AdamW::save`] wrote; each moment must match its parameter's size.
    pub fn load(
        path: &std::path::Path,
        params: &Weights,
        weight_decay: f32,
    ) -> Result<AdamW, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let (w, meta) = Weights::from_bytes(&bytes, path)?;
        let invalid = |message: String| WeightsError::Format {
            path: path.to_path_buf(),
            message,
        };
        let mut opt = AdamW::new(weight_decay);
        opt.step = meta
            .get("adam_step")
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid("no adam_step in the metadata".into()))?;
        for (name, t) in w.tensors {
            let (prefix, param) = name
                .split_once('/')
                .ok_or_else(|| invalid(format!("unexpected tensor {name}")))?;
            let expect = params
                .tensors
                .get(param)
                .ok_or_else(|| invalid(format!("{name}: the model has no parameter {param}")))?
                .len();
            if t.len() != expect {
                return Err(invalid(format!(
                    "{name} has {} values, parameter {param} has {expect}",
                    t.len()
                )));
            }
            match prefix {
                "m" => opt.m.insert(param.to_string(), t.data),
                "v" => opt.v.insert(param.to_string(), t.data),
                _ => return Err(invalid(format!("unexpected tensor {name}"))),
            };
        }
        Ok(opt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(v: &[f32]) -> Weights {
        let mut w = Weights::default();
        w.tensors
            .insert("p".into(), Tensor::new(vec![v.len()], v.to_vec()).unwrap());
        w
    }

    fn grads(v: &[f32]) -> BTreeMap<String, Tensor> {
        let mut g = BTreeMap::new();
        g.insert("p".into(), Tensor::new(vec![v.len()], v.to_vec()).unwrap());
        g
    }

    /// Two steps computed by hand from the AdamW formulas.
    #[test]
    fn adamw_matches_hand_computed_updates() {
        let mut w = weights(&[1.0, -2.0]);
        let mut opt = AdamW::new(0.01);
        let lr = 0.1;
        opt.update(&mut w, &grads(&[0.5, -0.25]), lr);
        // Step 1: m_hat = g, v_hat = g^2, so the step is lr * sign(g) (up to eps).
        let want1 = [
            1.0 * (1.0 - 0.1 * 0.01) - 0.1,
            -2.0 * (1.0 - 0.1 * 0.01) + 0.1,
        ];
        for (g, w) in w.tensors["p"].data.iter().zip(want1) {
            assert!((g - w).abs() < 1e-6, "{g} vs {w}");
        }
        opt.update(&mut w, &grads(&[-1.0, -0.25]), lr);
        // Step 2 for element 0: m = 0.9*0.05 + 0.1*(-1) = -0.055 (m1 = 0.05),
        // v = 0.999*0.00025 + 0.001*1 = 0.00124975 (v1 = 0.00025).
        let m_hat = -0.055f64 / (1.0 - 0.81);
        let v_hat = 0.001_249_75f64 / (1.0 - 0.998_001);
        let want = want1[0] as f64 * (1.0 - 0.001) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8);
        let got = w.tensors["p"].data[0] as f64;
        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
        assert_eq!(opt.step, 2);
    }

    #[test]
    fn clipping_scales_to_the_max_norm_only_when_above() {
        let mut g = grads(&[3.0, 4.0]);
        let n = clip_grad_norm(&mut g, 10.0);
        assert!((n - 5.0).abs() < 1e-6);
        assert_eq!(g["p"].data, vec![3.0, 4.0]);
        g.insert("q".into(), Tensor::new(vec![1], vec![0.0]).unwrap());
        let mut big = grads(&[30.0, 40.0]);
        let n = clip_grad_norm(&mut big, 10.0);
        assert!((n - 50.0).abs() < 1e-4);
        let d = &big["p"].data;
        assert!(
            (d[0] - 6.0).abs() < 1e-4 && (d[1] - 8.0).abs() < 1e-4,
            "{d:?}"
        );
        let after: f32 = d.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((after - 10.0).abs() < 1e-3);
    }
}
