//! Linear layer over point features: `[.., Cin] -> [.., Cout]`, `y = x W^T + b`.
//!
//! The leading axes (e.g. `[P, N]` pillars x points) are flattened into rows, so the same
//! code serves `[P, N, Cin]` point features and plain `[M, Cin]` matrices.

use super::matmul::{MatRef, gemm};
use super::{OpsError, Result, Tensor, expect_len};

const OP: &str = "linear";

/// Gradients of a linear layer.
#[derive(Debug, Clone)]
pub struct LinearGrads {
    pub input: Tensor,
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

/// Checks shapes and returns (rows, cin, cout).
fn check(x: &Tensor, weight: &Tensor, bias: Option<&[f32]>) -> Result<(usize, usize, usize)> {
    let [cout, cin] = super::dims::<2>(OP, "weight", weight)?;
    let Some((&xc, lead)) = x.shape.split_last() else {
        return Err(OpsError::Shape {
            op: OP,
            arg: "input",
            got: x.shape.clone(),
            expected: format!("[.., {cin}]"),
        });
    };
    if xc != cin {
        return Err(OpsError::Shape {
            op: OP,
            arg: "input",
            got: x.shape.clone(),
            expected: format!("[.., {cin}] (weight is [{cout}, {cin}])"),
        });
    }
    if let Some(b) = bias {
        expect_len(OP, "bias", b.len(), cout)?;
    }
    Ok((lead.iter().product(), cin, cout))
}

/// `y[.., o] = sum_i x[.., i] w[o, i] + b[o]`.
pub fn forward(x: &Tensor, weight: &Tensor, bias: Option<&[f32]>) -> Result<Tensor> {
    let (m, cin, cout) = check(x, weight, bias)?;
    let mut shape = x.shape.clone();
    *shape.last_mut().expect("checked rank >= 1") = cout;
    let mut y = Tensor::zeros(&shape);
    if let Some(b) = bias {
        for row in y.data.chunks_exact_mut(cout.max(1)) {
            row.copy_from_slice(b);
        }
    }
    gemm(
        m,
        cout,
        cin,
        &mut y.data,
        cout,
        bias.is_some(),
        MatRef::rows(&x.data, cin),
        MatRef::transposed(&weight.data, cin),
    );
    Ok(y)
}

/// Gradients w.r.t. input, weight and (if the forward had one) bias.
pub fn backward(
    x: &Tensor,
    weight: &Tensor,
    has_bias: bool,
    grad_out: &Tensor,
) -> Result<LinearGrads> {
    let (m, cin, cout) = check(x, weight, None)?;
    let mut out_shape = x.shape.clone();
    *out_shape.last_mut().expect("checked rank >= 1") = cout;
    super::expect_shape(OP, "grad_out", grad_out, &out_shape)?;
    // dx = dy W
    let mut gx = Tensor::zeros(&x.shape);
    gemm(
        m,
        cin,
        cout,
        &mut gx.data,
        cin,
        false,
        MatRef::rows(&grad_out.data, cout),
        MatRef::rows(&weight.data, cin),
    );
    // dW = dy^T x
    let mut gw = Tensor::zeros(&weight.shape);
    gemm(
        cout,
        cin,
        m,
        &mut gw.data,
        cin,
        false,
        MatRef::transposed(&grad_out.data, cout),
        MatRef::rows(&x.data, cin),
    );
    let bias = has_bias.then(|| {
        let mut gb = vec![0.0f32; cout];
        for row in grad_out.data.chunks_exact(cout.max(1)) {
            for (g, &d) in gb.iter_mut().zip(row) {
                *g += d;
            }
        }
        gb
    });
    Ok(LinearGrads {
        input: gx,
        weight: gw,
        bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    fn naive(
        x: &[f64],
        w: &[f64],
        b: Option<&[f64]>,
        m: usize,
        cin: usize,
        cout: usize,
    ) -> Vec<f64> {
        let mut y = vec![0.0; m * cout];
        for r in 0..m {
            for o in 0..cout {
                let mut s = b.map_or(0.0, |b| b[o]);
                for i in 0..cin {
                    s += x[r * cin + i] * w[o * cin + i];
                }
                y[r * cout + o] = s;
            }
        }
        y
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(11);
        for &(p, n, cin, cout, with_bias) in &[
            (3, 5, 4, 6, false),
            (2, 7, 11, 5, true),
            (1, 1, 1, 1, true),
            (5, 3, 9, 16, false),
        ] {
            let x = uniform(&mut r, &[p, n, cin], 1.0);
            let w = uniform(&mut r, &[cout, cin], 1.0);
            let b = with_bias.then(|| uniform_vec(&mut r, cout, 1.0));
            let y = forward(&x, &w, b.as_deref()).unwrap();
            assert_eq!(y.shape, vec![p, n, cout]);
            let (xd, wd) = (to_f64(&x.data), to_f64(&w.data));
            let bd = b.as_ref().map(|b| to_f64(b));
            let m = p * n;
            assert_close(
                "y",
                &y.data,
                &naive(&xd, &wd, bd.as_deref(), m, cin, cout),
                1e-5,
            );

            let gy = uniform(&mut r, &y.shape, 1.0);
            let g = backward(&x, &w, with_bias, &gy).unwrap();
            let fx = fd_grad(&xd, |v| {
                dot(&gy.data, &naive(v, &wd, bd.as_deref(), m, cin, cout))
            });
            let fw = fd_grad(&wd, |v| {
                dot(&gy.data, &naive(&xd, v, bd.as_deref(), m, cin, cout))
            });
            assert_close("dx", &g.input.data, &fx, 1e-5);
            assert_close("dw", &g.weight.data, &fw, 1e-5);
            match (&bd, &g.bias) {
                (Some(bd), Some(gb)) => {
                    let fb = fd_grad(bd, |v| {
                        dot(&gy.data, &naive(&xd, &wd, Some(v), m, cin, cout))
                    });
                    assert_close("db", gb, &fb, 1e-5);
                }
                (None, None) => {}
                _ => panic!("bias gradient presence must follow has_bias"),
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = Tensor::zeros(&[2, 3, 4]);
        let w = Tensor::zeros(&[5, 3]);
        assert!(matches!(
            forward(&x, &w, None),
            Err(OpsError::Shape { arg: "input", .. })
        ));
        let w = Tensor::zeros(&[5, 4]);
        assert!(matches!(
            forward(&x, &w, Some(&[0.0; 4])),
            Err(OpsError::Shape { arg: "bias", .. })
        ));
        let gy = Tensor::zeros(&[2, 3, 4]);
        assert!(matches!(
            backward(&x, &w, false, &gy),
            Err(OpsError::Shape {
                arg: "grad_out",
                ..
            })
        ));
    }
}
