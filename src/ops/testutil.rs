//! Test helpers: seeded random data and f64 central finite differences.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::Tensor;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `n` values uniform in [-scale, scale).
pub fn uniform_vec(r: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| r.random_range(-scale..scale)).collect()
}

pub fn uniform(r: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    Tensor::new(
        shape.to_vec(),
        uniform_vec(r, shape.iter().product(), scale),
    )
    .unwrap()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// `sum_i w_i y_i`: the scalar whose gradient w.r.t. `y` is `w`, used to test backward passes
/// with a generic upstream gradient.
pub fn dot(w: &[f32], y: &[f64]) -> f64 {
    assert_eq!(w.len(), y.len());
    w.iter().zip(y).map(|(&a, &b)| a as f64 * b).sum()
}

/// Central finite differences of `f` at `x` (f64 throughout).
pub fn fd_grad(x: &[f64], mut f: impl FnMut(&[f64]) -> f64) -> Vec<f64> {
    let h = 1e-5;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            let x0 = xp[i];
            xp[i] = x0 + h;
            let fp = f(&xp);
            xp[i] = x0 - h;
            let fm = f(&xp);
            xp[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}

/// Asserts `|got - want| <= tol * (1 + |want|)` elementwise, naming the first failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs();
        assert!(
            err <= tol * (1.0 + w.abs()),
            "{what}[{i}]: got {g}, want {w} (err {err:e})"
        );
    }
}
