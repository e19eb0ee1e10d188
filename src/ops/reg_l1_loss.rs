//! Masked L1 regression loss of CenterPoint's box heads, evaluated at the object centres.
//!
//! The prediction map `[B, D, H, W]` is read at each object's centre cell; the loss is
//! `sum_{b, m, d} mask[b, m] w[d] |pred[b, d, ind[b, m]] - target[b, m, d]| / max(#objects, 1)`
//! with `#objects = sum(mask)` over the batch. NaN targets (e.g. missing velocity) are
//! skipped, as in the reference. The gradient is `sign(diff) w[d] / #objects`, 0 at a zero
//! difference (PyTorch's `abs`), scatter-added back onto the map.

use super::{OpsError, Result, Tensor, dims, expect_len};

const OP: &str = "reg_l1_loss";

/// Loss value and its gradient w.r.t. the prediction map.
#[derive(Debug, Clone)]
pub struct RegL1Loss {
    pub loss: f32,
    pub num_objects: usize,
    pub grad_pred: Tensor,
}

/// `ind` and `mask` are `[B * M]` (object `m` of sample `b` at `b * M + m`), `ind` holding
/// flat cell indices `y * W + x`; `target` is `[B, M, D]`; `code_weights` is `[D]`.
pub fn forward_backward(
    pred: &Tensor,
    ind: &[usize],
    mask: &[bool],
    target: &Tensor,
    code_weights: &[f32],
) -> Result<RegL1Loss> {
    let [b, d, h, w] = dims::<4>(OP, "pred", pred)?;
    let [tb, m, td] = dims::<3>(OP, "target", target)?;
    if tb != b || td != d {
        return Err(OpsError::Shape {
            op: OP,
            arg: "target",
            got: target.shape.clone(),
            expected: format!("[{b}, M, {d}]"),
        });
    }
    expect_len(OP, "ind", ind.len(), b * m)?;
    expect_len(OP, "mask", mask.len(), b * m)?;
    expect_len(OP, "code_weights", code_weights.len(), d)?;
    let plane = h * w;
    if let Some((i, &k)) = ind
        .iter()
        .enumerate()
        .find(|&(i, &k)| mask[i] && k >= plane)
    {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "ind",
            detail: format!("object {i} points at cell {k}, the map has {plane}"),
        });
    }
    let num = mask.iter().filter(|&&v| v).count();
    let norm = num.max(1) as f64;
    let mut total = 0.0f64;
    let mut grad = Tensor::zeros(&pred.shape);
    for bi in 0..b {
        for mi in 0..m {
            let o = bi * m + mi;
            if !mask[o] {
                continue;
            }
            for (di, &wd) in code_weights.iter().enumerate() {
                let t = target.data[o * d + di];
                if t.is_nan() {
                    continue;
                }
                let k = (bi * d + di) * plane + ind[o];
                let diff = pred.data[k] as f64 - t as f64;
                let wd = wd as f64;
                total += wd * diff.abs();
                let sign = if diff > 0.0 {
                    1.0
                } else if diff < 0.0 {
                    -1.0
                } else {
                    0.0
                };
                grad.data[k] += (sign * wd / norm) as f32;
            }
        }
    }
    Ok(RegL1Loss {
        loss: (total / norm) as f32,
        num_objects: num,
        grad_pred: grad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;
    use rand::RngExt;

    #[allow(clippy::too_many_arguments)]
    fn naive(
        p: &[f64],
        shape: [usize; 4],
        ind: &[usize],
        mask: &[bool],
        t: &[f32],
        m: usize,
        cw: &[f32],
    ) -> f64 {
        let [b, d, h, w] = shape;
        let mut per_dim = vec![0.0; d];
        for bi in 0..b {
            for mi in 0..m {
                let o = bi * m + mi;
                for (di, acc) in per_dim.iter_mut().enumerate() {
                    let tv = t[o * d + di];
                    if mask[o] && !tv.is_nan() {
                        *acc += (p[(bi * d + di) * h * w + ind[o]] - tv as f64).abs();
                    }
                }
            }
        }
        let num = mask.iter().filter(|&&v| v).count().max(1) as f64;
        per_dim
            .iter()
            .zip(cw)
            .map(|(l, &c)| l / num * c as f64)
            .sum()
    }

    #[test]
    fn loss_and_gradient_match_reference() {
        let mut r = rng(91);
        let (b, d, h, w, m) = (2, 5, 4, 7, 6);
        let pred = uniform(&mut r, &[b, d, h, w], 2.0);
        let mut ind: Vec<usize> = (0..b * m).map(|_| r.random_range(0..h * w)).collect();
        ind[1] = ind[0]; // two objects in one cell: gradients must add up
        let mask: Vec<bool> = (0..b * m).map(|i| i % 4 != 3).collect();
        let mut target = uniform(&mut r, &[b, m, d], 2.0);
        target.data[2 * d + 4] = f32::NAN;
        let cw = [1.0, 1.0, 0.5, 0.2, 2.0];
        let out = forward_backward(&pred, &ind, &mask, &target, &cw).unwrap();
        assert_eq!(out.num_objects, mask.iter().filter(|&&v| v).count());
        let pd = to_f64(&pred.data);
        let shape = [b, d, h, w];
        let want = naive(&pd, shape, &ind, &mask, &target.data, m, &cw);
        assert!(
            ((out.loss as f64) - want).abs() < 1e-5 * (1.0 + want),
            "{} vs {want}",
            out.loss
        );
        let fd = fd_grad(&pd, |v| naive(v, shape, &ind, &mask, &target.data, m, &cw));
        assert_close("dpred", &out.grad_pred.data, &fd, 1e-5);
    }

    #[test]
    fn no_objects_gives_zero_loss() {
        let pred = Tensor::zeros(&[1, 2, 3, 3]);
        let target = Tensor::zeros(&[1, 2, 2]);
        let out = forward_backward(&pred, &[0, 99], &[false, false], &target, &[1.0, 1.0]).unwrap();
        assert_eq!((out.loss, out.num_objects), (0.0, 0));
        assert!(out.grad_pred.data.iter().all(|&g| g == 0.0));
    }

    #[test]
    fn rejects_bad_input() {
        let pred = Tensor::zeros(&[1, 2, 3, 3]);
        let target = Tensor::zeros(&[1, 2, 2]);
        assert!(matches!(
            forward_backward(&pred, &[0, 9], &[true, true], &target, &[1.0, 1.0]),
            Err(OpsError::Invalid { arg: "ind", .. })
        ));
        assert!(matches!(
            forward_backward(&pred, &[0], &[true, true], &target, &[1.0, 1.0]),
            Err(OpsError::Shape { arg: "ind", .. })
        ));
        assert!(matches!(
            forward_backward(&pred, &[0, 1], &[true, true], &target, &[1.0]),
            Err(OpsError::Shape {
                arg: "code_weights",
                ..
            })
        ));
        assert!(matches!(
            forward_backward(
                &pred,
                &[0, 1],
                &[true, true],
                &Tensor::zeros(&[1, 2, 3]),
                &[1.0, 1.0]
            ),
            Err(OpsError::Shape { arg: "target", .. })
        ));
    }
}
