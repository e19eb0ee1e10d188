//! Logistic sigmoid, elementwise on any shape.

use super::{Result, Tensor, expect_shape};

/// Numerically stable for large |x| (never evaluates `exp` of a large positive number).
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

pub fn forward(x: &Tensor) -> Tensor {
    Tensor {
        shape: x.shape.clone(),
        data: x.data.iter().map(|&v| sigmoid(v)).collect(),
    }
}

/// `dx = dy * y (1 - y)`, from the forward's output `y`.
pub fn backward(y: &Tensor, grad_out: &Tensor) -> Result<Tensor> {
    expect_shape("sigmoid", "grad_out", grad_out, &y.shape)?;
    Ok(Tensor {
        shape: y.shape.clone(),
        data: y
            .data
            .iter()
            .zip(&grad_out.data)
            .map(|(&s, &g)| g * s * (1.0 - s))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn reference(v: &[f64]) -> Vec<f64> {
        v.iter().map(|&a| 1.0 / (1.0 + (-a).exp())).collect()
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(4);
        let x = uniform(&mut r, &[2, 3, 5, 7], 8.0);
        let y = forward(&x);
        let xd = to_f64(&x.data);
        assert_close("y", &y.data, &reference(&xd), 1e-6);
        let gy = uniform(&mut r, &x.shape, 1.0);
        let gx = backward(&y, &gy).unwrap();
        let fd = fd_grad(&xd, |v| dot(&gy.data, &reference(v)));
        assert_close("dx", &gx.data, &fd, 1e-6);
    }

    #[test]
    fn saturates_without_overflow() {
        assert_eq!(sigmoid(-1000.0), 0.0);
        assert_eq!(sigmoid(1000.0), 1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }
}
