//! Repeat of per-pillar features onto every point slot, `[P, C] -> [P, N, C]`: how a
//! two-layer pillar feature net concatenates the pillar max back onto each point (all `N`
//! slots, as the reference does; padded slots are excluded later by the counts of
//! [`super::pillar_max`]). Backward sums over the points.

use super::{Result, Tensor, dims};

const OP: &str = "repeat_points";

pub fn forward(x: &Tensor, points: usize) -> Result<Tensor> {
    let [p, c] = dims::<2>(OP, "input", x)?;
    let mut y = Tensor::zeros(&[p, points, c]);
    for (pi, src) in x.data.chunks_exact(c.max(1)).enumerate().take(p) {
        for slot in y.data[pi * points * c..(pi + 1) * points * c].chunks_exact_mut(c.max(1)) {
            slot.copy_from_slice(src);
        }
    }
    Ok(y)
}

/// `[P, N, C] -> [P, C]`: the sum over the point slots.
pub fn backward(grad_out: &Tensor) -> Result<Tensor> {
    let [p, n, c] = dims::<3>(OP, "grad_out", grad_out)?;
    let mut gx = Tensor::zeros(&[p, c]);
    for pi in 0..p {
        let dst = &mut gx.data[pi * c..(pi + 1) * c];
        for slot in grad_out.data[pi * n * c..(pi + 1) * n * c].chunks_exact(c.max(1)) {
            for (d, &g) in dst.iter_mut().zip(slot) {
                *d += g;
            }
        }
    }
    Ok(gx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn naive(x: &[f64], p: usize, n: usize, c: usize) -> Vec<f64> {
        let mut y = vec![0.0; p * n * c];
        for pi in 0..p {
            for j in 0..n {
                for ch in 0..c {
                    y[(pi * n + j) * c + ch] = x[pi * c + ch];
                }
            }
        }
        y
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(111);
        for &(p, n, c) in &[(4, 5, 3), (1, 1, 1), (3, 7, 2)] {
            let x = uniform(&mut r, &[p, c], 1.0);
            let y = forward(&x, n).unwrap();
            let xd = to_f64(&x.data);
            assert_close("y", &y.data, &naive(&xd, p, n, c), 0.0);
            let gy = uniform(&mut r, &y.shape, 1.0);
            let gx = backward(&gy).unwrap();
            let fd = fd_grad(&xd, |v| dot(&gy.data, &naive(v, p, n, c)));
            assert_close("dx", &gx.data, &fd, 1e-5);
        }
        assert!(forward(&Tensor::zeros(&[2, 3, 4]), 2).is_err());
        assert!(backward(&Tensor::zeros(&[2, 3])).is_err());
    }
}
