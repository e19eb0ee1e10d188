//! Transposed 2D convolution (PyTorch `ConvTranspose2d` semantics) on NCHW images: the
//! adjoint of conv2d w.r.t. its input, used by the CenterPoint neck to upsample.
//!
//! Weight `[Cin, Cout, kh, kw]`; output size `(H - 1) s - 2 p + k + output_padding`.
//! Forward = GEMM to columns, then col2im; backward = im2col of the output gradient, then GEMMs.

use super::conv2d::channel_sums;
use super::im2col::{Geom, col2im_add, im2col};
use super::matmul::{MatRef, gemm};
use super::{OpsError, Result, Tensor, dims, expect_len, expect_shape};

const OP: &str = "conv_transpose2d";

/// Stride, zero padding and extra output size, (vertical, horizontal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvTranspose2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    /// Extra rows/cols at the bottom/right; must be smaller than the stride.
    pub output_padding: (usize, usize),
}

impl ConvTranspose2dParams {
    /// Same stride and padding on both axes, no output padding.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (padding, padding),
            output_padding: (0, 0),
        }
    }
}

/// Gradients of a transposed convolution.
#[derive(Debug, Clone)]
pub struct ConvTranspose2dGrads {
    pub input: Tensor,
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

/// Validates shapes; returns (batch, cin, geometry of the equivalent conv over the output).
fn check(x: &Tensor, weight: &Tensor, p: ConvTranspose2dParams) -> Result<(usize, usize, Geom)> {
    let [n, cin, h, w] = dims::<4>(OP, "input", x)?;
    let [wcin, cout, kh, kw] = dims::<4>(OP, "weight", weight)?;
    if wcin != cin {
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("[{cin}, Cout, kh, kw] (input has {cin} channels)"),
        });
    }
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    let (oph, opw) = p.output_padding;
    if sh == 0 || sw == 0 || oph >= sh || opw >= sw {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "stride",
            detail: format!(
                "stride {:?} must be >= 1 and > output_padding {:?}",
                p.stride, p.output_padding
            ),
        });
    }
    let size = |i: usize, s: usize, k: usize, op: usize, pad: usize| {
        (i.checked_sub(1)? * s + k + op).checked_sub(2 * pad)
    };
    let (Some(ho), Some(wo)) = (size(h, sh, kh, oph, ph), size(w, sw, kw, opw, pw)) else {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "padding",
            detail: format!(
                "padding {:?} leaves no output for a {h}x{w} input and {kh}x{kw} kernel",
                p.padding
            ),
        });
    };
    if kh == 0 || kw == 0 || ho == 0 || wo == 0 {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "weight",
            detail: format!("kernel {kh}x{kw} gives an empty {ho}x{wo} output"),
        });
    }
    // The conv that this op is the adjoint of maps the [cout, ho, wo] output to [h, w].
    let g = Geom {
        c: cout,
        h: ho,
        w: wo,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        ho: h,
        wo: w,
    };
    Ok((n, cin, g))
}

/// `[N, Cin, H, W] -> [N, Cout, Ho, Wo]`.
pub fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&[f32]>,
    p: ConvTranspose2dParams,
) -> Result<Tensor> {
    let (n, cin, g) = check(x, weight, p)?;
    let cout = g.c;
    if let Some(b) = bias {
        expect_len(OP, "bias", b.len(), cout)?;
    }
    let (k, hw_in, plane_out) = (g.k(), g.ho * g.wo, g.h * g.w);
    let mut y = Tensor::zeros(&[n, cout, g.h, g.w]);
    if let Some(b) = bias {
        for (i, plane) in y.data.chunks_exact_mut(plane_out).enumerate() {
            plane.fill(b[i % cout]);
        }
    }
    let mut col = vec![0.0f32; k * hw_in];
    for b in 0..n {
        let img = &x.data[b * cin * hw_in..(b + 1) * cin * hw_in];
        // col[k, hw_in] = W^T X, with W viewed as [Cin, k].
        gemm(
            k,
            hw_in,
            cin,
            &mut col,
            hw_in,
            false,
            MatRef::transposed(&weight.data, k),
            MatRef::rows(img, hw_in),
        );
        col2im_add(
            &col,
            &g,
            0,
            g.ho,
            &mut y.data[b * cout * plane_out..(b + 1) * cout * plane_out],
        );
    }
    Ok(y)
}

/// Gradients w.r.t. input, weight and (if `has_bias`) bias.
pub fn backward(
    x: &Tensor,
    weight: &Tensor,
    has_bias: bool,
    p: ConvTranspose2dParams,
    grad_out: &Tensor,
) -> Result<ConvTranspose2dGrads> {
    let (n, cin, g) = check(x, weight, p)?;
    let cout = g.c;
    expect_shape(OP, "grad_out", grad_out, &[n, cout, g.h, g.w])?;
    let (k, hw_in, plane_out) = (g.k(), g.ho * g.wo, g.h * g.w);
    let mut gx = Tensor::zeros(&x.shape);
    let mut gw = Tensor::zeros(&weight.shape);
    let mut col = vec![0.0f32; k * hw_in];
    for b in 0..n {
        let img = &x.data[b * cin * hw_in..(b + 1) * cin * hw_in];
        let dy = &grad_out.data[b * cout * plane_out..(b + 1) * cout * plane_out];
        im2col(dy, &g, 0, g.ho, &mut col);
        // dX = W dcol ; dW += X dcol^T
        let dimg = &mut gx.data[b * cin * hw_in..(b + 1) * cin * hw_in];
        gemm(
            cin,
            hw_in,
            k,
            dimg,
            hw_in,
            false,
            MatRef::rows(&weight.data, k),
            MatRef::rows(&col, hw_in),
        );
        gemm(
            cin,
            k,
            hw_in,
            &mut gw.data,
            k,
            true,
            MatRef::rows(img, hw_in),
            MatRef::transposed(&col, hw_in),
        );
    }
    let bias = has_bias.then(|| channel_sums(&grad_out.data, cout, plane_out));
    Ok(ConvTranspose2dGrads {
        input: gx,
        weight: gw,
        bias,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    /// Naive f64 transposed conv written as its definition: every input pixel scatters its
    /// kernel-weighted value onto the output.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        x: &[f64],
        xs: [usize; 4],
        w: &[f64],
        ws: [usize; 4],
        b: Option<&[f64]>,
        p: ConvTranspose2dParams,
    ) -> Vec<f64> {
        let [n, cin, h, wd] = xs;
        let [_, cout, kh, kw] = ws;
        let ho = (h - 1) * p.stride.0 + kh + p.output_padding.0 - 2 * p.padding.0;
        let wo = (wd - 1) * p.stride.1 + kw + p.output_padding.1 - 2 * p.padding.1;
        let mut y = vec![0.0; n * cout * ho * wo];
        for bi in 0..n {
            for o in 0..cout {
                for i in 0..ho * wo {
                    y[(bi * cout + o) * ho * wo + i] = b.map_or(0.0, |b| b[o]);
                }
            }
            for ci in 0..cin {
                for iy in 0..h {
                    for ix in 0..wd {
                        let v = x[((bi * cin + ci) * h + iy) * wd + ix];
                        for o in 0..cout {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let oy = (iy * p.stride.0 + ky) as isize - p.padding.0 as isize;
                                    let ox = (ix * p.stride.1 + kx) as isize - p.padding.1 as isize;
                                    if oy < 0 || ox < 0 || oy >= ho as isize || ox >= wo as isize {
                                        continue;
                                    }
                                    y[((bi * cout + o) * ho + oy as usize) * wo + ox as usize] +=
                                        v * w[((ci * cout + o) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                }
            }
        }
        y
    }

    /// (n, cin, h, w, cout, kh, kw, stride, padding, output_padding, bias)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        bool,
    );
    const CASES: &[Case] = &[
        (2, 3, 4, 5, 2, 2, 2, 2, 0, 0, false),
        (1, 2, 3, 5, 3, 4, 4, 2, 1, 0, true),
        (2, 3, 5, 4, 4, 1, 1, 1, 0, 0, true),
        (1, 2, 3, 3, 2, 3, 3, 2, 1, 1, false),
        (1, 1, 4, 3, 2, 3, 2, 3, 0, 2, true),
    ];

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(41);
        for &(n, cin, h, w, cout, kh, kw, s, pad, op, with_bias) in CASES {
            let p = ConvTranspose2dParams {
                stride: (s, s),
                padding: (pad, pad),
                output_padding: (op, op),
            };
            let x = uniform(&mut r, &[n, cin, h, w], 1.0);
            let wt = uniform(&mut r, &[cin, cout, kh, kw], 1.0);
            let b = with_bias.then(|| uniform_vec(&mut r, cout, 1.0));
            let y = forward(&x, &wt, b.as_deref(), p).unwrap();
            let ho = (h - 1) * s + kh + op - 2 * pad;
            let wo = (w - 1) * s + kw + op - 2 * pad;
            assert_eq!(y.shape, vec![n, cout, ho, wo]);
            let (xd, wd) = (to_f64(&x.data), to_f64(&wt.data));
            let bd = b.as_ref().map(|b| to_f64(b));
            let (xs, ws) = ([n, cin, h, w], [cin, cout, kh, kw]);
            assert_close(
                "y",
                &y.data,
                &naive(&xd, xs, &wd, ws, bd.as_deref(), p),
                1e-5,
            );

            let gy = uniform(&mut r, &y.shape, 1.0);
            let g = backward(&x, &wt, with_bias, p, &gy).unwrap();
            let fx = fd_grad(&xd, |v| {
                dot(&gy.data, &naive(v, xs, &wd, ws, bd.as_deref(), p))
            });
            let fw = fd_grad(&wd, |v| {
                dot(&gy.data, &naive(&xd, xs, v, ws, bd.as_deref(), p))
            });
            assert_close("dx", &g.input.data, &fx, 1e-5);
            assert_close("dw", &g.weight.data, &fw, 1e-5);
            assert_eq!(with_bias, g.bias.is_some());
            if let (Some(bd), Some(gb)) = (&bd, &g.bias) {
                let fb = fd_grad(bd, |v| dot(&gy.data, &naive(&xd, xs, &wd, ws, Some(v), p)));
                assert_close("db", gb, &fb, 1e-5);
            }
        }
    }

    #[test]
    fn is_the_adjoint_of_conv2d() {
        // <conv(z, W), x> == <z, convT(x, W)> with the same weight tensor read as
        // [Cout_conv, Cin_conv, kh, kw] = [Cin_T, Cout_T, kh, kw].
        let mut r = rng(42);
        let wt = uniform(&mut r, &[3, 2, 3, 3], 1.0);
        let z = uniform(&mut r, &[1, 2, 9, 7], 1.0);
        let cp = crate::ops::conv2d::Conv2dParams::new(2, 1);
        let cz = crate::ops::conv2d::forward(&z, &wt, None, cp).unwrap();
        let x = uniform(&mut r, &cz.shape, 1.0);
        let tp = ConvTranspose2dParams {
            stride: (2, 2),
            padding: (1, 1),
            output_padding: (0, 0),
        };
        let tx = forward(&x, &wt, None, tp).unwrap();
        assert_eq!(tx.shape, z.shape);
        let lhs = dot(&cz.data, &to_f64(&x.data));
        let rhs = dot(&z.data, &to_f64(&tx.data));
        assert!(
            (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let x = Tensor::zeros(&[1, 3, 4, 4]);
        assert!(matches!(
            forward(
                &x,
                &Tensor::zeros(&[2, 3, 2, 2]),
                None,
                ConvTranspose2dParams::new(2, 0)
            ),
            Err(OpsError::Shape { arg: "weight", .. })
        ));
        let w = Tensor::zeros(&[3, 2, 2, 2]);
        let mut p = ConvTranspose2dParams::new(2, 0);
        p.output_padding = (2, 0);
        assert!(matches!(
            forward(&x, &w, None, p),
            Err(OpsError::Invalid { arg: "stride", .. })
        ));
        assert!(matches!(
            forward(
                &Tensor::zeros(&[1, 3, 1, 1]),
                &w,
                None,
                ConvTranspose2dParams::new(1, 3)
            ),
            Err(OpsError::Invalid { arg: "padding", .. })
        ));
        assert!(matches!(
            forward(&x, &w, Some(&[0.0; 3]), ConvTranspose2dParams::new(2, 0)),
            Err(OpsError::Shape { arg: "bias", .. })
        ));
    }
}
