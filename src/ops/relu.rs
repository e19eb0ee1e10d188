//! ReLU, `max(x, 0)`, elementwise on any shape.

use super::{Result, Tensor, expect_shape};

pub fn forward(x: &Tensor) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| v.max(0.0)).collect(),
    }
}

/// In-place variant for engines that do not keep the pre-activation.
pub fn forward_inplace(x: &mut Tensor) {
    for v in &mut x.data {
        *v = v.max(0.0);
    }
}

/// `dx = dy * [x > 0]` (the subgradient at 0 is 0, as in PyTorch). Takes the forward's
/// input or output: both have the same sign pattern.
pub fn backward(x_or_y: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    expect_shape("relu", "grad_out", grad_out, &x_or_y.shape)?;
    Ok(Tensor {
        shape: x_or_y.shape.clone(),
        data: x_or_y
            .data
            .iter()
            .zip(&grad_out.data)
            .map(|(&x, &g)| if x > 0.0 { g } else { 0.0 })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(3);
        // Keep |x| away from the kink so finite differences are well defined there.
        let mut x = uniform(&mut r, &[3, 5, 7], 1.0);
        for v in &mut x.data {
            *v = v.signum() * (v.abs() + 0.01);
        }
        let y = forward(&x);
        let xd = to_f64(&x.data);
        let reference = |v: &[f64]| v.iter().map(|&a| a.max(0.0)).collect::<Vec<_>>();
        assert_close("y", &y.data, &reference(&xd), 0.0);
        let mut y2 = x.clone();
        forward_inplace(&mut y2);
        assert_eq!(y2, y);
        let gy = uniform(&mut r, &x.shape, 1.0);
        let gx = backward(&x, &gy).unwrap();
        assert_eq!(backward(&y, &gy).unwrap(), gx);
        let fd = fd_grad(&xd, |v| dot(&gy.data, &reference(v)));
        assert_close("dx", &gx.data, &fd, 1e-6);
        assert!(backward(&x, &Tensor::zeros(&[3, 5])).is_err());
    }
}
