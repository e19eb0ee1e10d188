//! CornerNet / CenterNet focal loss on heatmap logits, as CenterPoint trains its heatmaps.
//!
//! `p = clamp(sigmoid(x), 1e-4, 1 - 1e-4)`; positives are cells with `gt == 1`:
//! `pos = log(p) (1 - p)^2`, every other cell is a negative weighted by the Gaussian
//! target: `neg = log(1 - p) p^2 (1 - gt)^4`; `loss = -(sum pos + sum neg) / #positives`
//! (just `-sum neg` when there is no positive). The clamp has zero gradient where it is
//! active, exactly as `torch.clamp` in the reference.

use super::sigmoid::sigmoid;
use super::{OpsError, Result, Tensor, expect_shape};

const OP: &str = "focal_loss";
const P_MIN: f64 = 1e-4;
const P_MAX: f64 = 1.0 - 1e-4;

/// Loss value and its gradient w.r.t. the logits.
#[derive(Debug, Clone)]
pub struct FocalLoss {
    pub loss: f32,
    pub num_positives: usize,
    pub grad_logits: Tensor,
}

/// Focal loss of `logits` against the Gaussian heatmap `gt` (values in [0, 1], same shape;
/// typically `[B, classes, H, W]`, normalised by the positives of the whole batch).
pub fn forward_backward(logits: &Tensor, gt: &Tensor) -> Result<FocalLoss> {
    expect_shape(OP, "gt", gt, &logits.shape)?;
    if let Some((i, &v)) = gt
        .data
        .iter()
        .enumerate()
        .find(|&(_, &v)| !(0.0..=1.0).contains(&v))
    {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "gt",
            detail: format!("heatmap value {v} at flat index {i} is outside [0, 1]"),
        });
    }
    let num_pos = gt.data.iter().filter(|&&g| g == 1.0).count();
    let norm = num_pos.max(1) as f64;
    let mut total = 0.0f64;
    let mut grad = Tensor::zeros(&logits.shape);
    for ((&x, &g), d) in logits.data.iter().zip(&gt.data).zip(&mut grad.data) {
        let s = sigmoid(x) as f64;
        let p = s.clamp(P_MIN, P_MAX);
        // Gradient of the clamp: 1 inside [min, max], 0 where it clips.
        let dp_dx = if (P_MIN..=P_MAX).contains(&s) {
            s * (1.0 - s)
        } else {
            0.0
        };
        let (term, dterm_dp) = if g == 1.0 {
            let q = 1.0 - p;
            (p.ln() * q * q, q * q / p - 2.0 * p.ln() * q)
        } else {
            let w = (1.0 - g as f64).powi(4);
            let l = (1.0 - p).ln();
            (l * p * p * w, w * (2.0 * p * l - p * p / (1.0 - p)))
        };
        total += term;
        *d = (-dterm_dp * dp_dx / norm) as f32;
    }
    Ok(FocalLoss {
        loss: (-total / norm) as f32,
        num_positives: num_pos,
        grad_logits: grad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;
    use rand::RngExt;

    /// Direct transcription of the reference formula, in f64.
    fn naive(x: &[f64], gt: &[f32]) -> f64 {
        let (mut pos, mut neg, mut n) = (0.0, 0.0, 0.0);
        for (&xi, &g) in x.iter().zip(gt) {
            let p = (1.0 / (1.0 + (-xi).exp())).clamp(1e-4, 1.0 - 1e-4);
            if g == 1.0 {
                pos += p.ln() * (1.0 - p).powi(2);
                n += 1.0;
            } else {
                neg += (1.0 - p).ln() * p.powi(2) * (1.0 - g as f64).powi(4);
            }
        }
        if n == 0.0 { -neg } else { -(pos + neg) / n }
    }

    fn case(
        r: &mut rand_chacha::ChaCha8Rng,
        shape: &[usize],
        positives: usize,
    ) -> (Tensor, Tensor) {
        let mut x = uniform(r, shape, 6.0);
        // A few saturated logits: the clamp must zero their gradient.
        for i in 0..3 {
            let n = x.len();
            x.data[i * 7 % n] = if i % 2 == 0 { 12.0 } else { -12.0 };
        }
        let mut gt = Tensor::from_fn(shape, |_| r.random_range(0.0f32..0.99));
        for i in 0..positives {
            let n = gt.len();
            gt.data[(i * 13 + 5) % n] = 1.0;
        }
        (x, gt)
    }

    #[test]
    fn loss_and_gradient_match_reference() {
        let mut r = rng(81);
        for &(shape, positives) in &[
            (&[2usize, 3, 5, 7][..], 4),
            (&[1, 1, 9, 11][..], 1),
            (&[1, 2, 3, 3][..], 0),
        ] {
            let (x, gt) = case(&mut r, shape, positives);
            let out = forward_backward(&x, &gt).unwrap();
            assert_eq!(out.num_positives, positives);
            let xd = to_f64(&x.data);
            let want = naive(&xd, &gt.data);
            assert!(
                ((out.loss as f64) - want).abs() < 1e-5 * (1.0 + want.abs()),
                "{} vs {want}",
                out.loss
            );
            let fd = fd_grad(&xd, |v| naive(v, &gt.data));
            assert_close("dlogits", &out.grad_logits.data, &fd, 1e-5);
            assert_eq!(
                out.grad_logits.data[0], 0.0,
                "clamped logit must have zero gradient"
            );
        }
    }

    #[test]
    fn rejects_bad_heatmaps() {
        let x = Tensor::zeros(&[1, 2, 2]);
        assert!(matches!(
            forward_backward(&x, &Tensor::zeros(&[1, 4])),
            Err(OpsError::Shape { arg: "gt", .. })
        ));
        let gt = Tensor::new(vec![1, 2, 2], vec![0.0, 1.5, 0.0, 0.0]).unwrap();
        assert!(matches!(
            forward_backward(&x, &gt),
            Err(OpsError::Invalid { arg: "gt", .. })
        ));
    }
}
