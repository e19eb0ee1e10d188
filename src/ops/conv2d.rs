//! 2D convolution (cross-correlation, PyTorch semantics) on NCHW images with zero padding,
//! any kernel size and stride, optional bias.
//!
//! Forward and backward are GEMMs over im2col packings (the `gemm` crate does the
//! arithmetic). The column matrix is built in bands of output rows so it stays a few MiB
//! however large the image; a 1x1 stride-1 unpadded conv skips packing (the image already
//! is its column matrix).

use super::im2col::{Geom, col2im_add, im2col, im2col_serial};
use super::matmul::{MatRef, gemm, gemm_serial};
use super::{OpsError, Result, Tensor, dims, expect_len, expect_shape};
use rayon::prelude::*;

const OP: &str = "conv2d";

/// Target size of one im2col band, in elements (4 MiB of f32: L2/L3 friendly).
const BAND_ELEMS: usize = 1 << 20;

/// Target size of one band when each thread packs its own (1 MiB of f32).
const PAR_BAND_ELEMS: usize = 1 << 18;

/// Stride and zero padding, (vertical, horizontal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
}

impl Conv2dParams {
    /// Same stride and padding on both axes.
    pub fn new(stride: usize, padding: usize) -> Self {
        Self {
            stride: (stride, stride),
            padding: (padding, padding),
        }
    }
}

/// Gradients of a convolution.
#[derive(Debug, Clone)]
pub struct Conv2dGrads {
    pub input: Tensor,
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

/// Validates shapes; returns (batch, cout, geometry).
fn check(x: &Tensor, weight: &Tensor, p: Conv2dParams) -> Result<(usize, usize, Geom)> {
    let [n, c, h, w] = dims::<4>(OP, "input", x)?;
    let [cout, cin, kh, kw] = dims::<4>(OP, "weight", weight)?;
    if cin != c {
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("[Cout, {c}, kh, kw] (input has {c} channels)"),
        });
    }
    let (sh, sw) = p.stride;
    let (ph, pw) = p.padding;
    if sh == 0 || sw == 0 {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "stride",
            detail: format!("{:?} must be >= 1", p.stride),
        });
    }
    if h == 0 || w == 0 || kh == 0 || kw == 0 || h + 2 * ph < kh || w + 2 * pw < kw {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "weight",
            detail: format!(
                "kernel {kh}x{kw} does not fit the padded {h}x{w} input (padding {:?})",
                p.padding
            ),
        });
    }
    let ho = (h + 2 * ph - kh) / sh + 1;
    let wo = (w + 2 * pw - kw) / sw + 1;
    let g = Geom {
        c,
        h,
        w,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        ho,
        wo,
    };
    Ok((n, cout, g))
}

/// Output spatial size of a convolution: `(h + 2p - k) / s + 1` per axis.
pub fn output_size(
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    p: Conv2dParams,
) -> Option<(usize, usize)> {
    let ho = (h + 2 * p.padding.0).checked_sub(kh)? / p.stride.0.max(1) + 1;
    let wo = (w + 2 * p.padding.1).checked_sub(kw)? / p.stride.1.max(1) + 1;
    Some((ho, wo))
}

fn is_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0
}

/// Output rows per im2col band.
fn band_rows(g: &Geom) -> usize {
    if is_pointwise(g) {
        return g.ho.max(1);
    }
    (BAND_ELEMS / (g.k() * g.wo).max(1)).clamp(1, g.ho.max(1))
}

/// Output rows per band when bands are spread over threads: small enough that a band's
/// columns stay in the core's L2 cache between packing and GEMM, and that every thread gets
/// several bands.
fn par_band_rows(g: &Geom, threads: usize) -> usize {
    let by_cache = (PAR_BAND_ELEMS / (g.k() * g.wo).max(1)).max(1);
    let by_threads = g.ho.div_ceil(4 * threads.max(1)).max(1);
    by_cache.min(by_threads).min(g.ho.max(1))
}

/// Adds `conv(img, weight)` onto `out` (`[cout, ho * wo]`, holding the bias or zeros).
///
/// Each thread packs and multiplies its own bands of output rows on its own core: packing
/// in parallel and then one threaded GEMM per band would move the band between caches
/// and synchronise the pool twice per band.
fn forward_bands(img: &[f32], weight: &[f32], cout: usize, g: &Geom, out: &mut [f32]) {
    let (k, hw_out) = (g.k(), g.ho * g.wo);
    let rows = par_band_rows(g, rayon::current_num_threads());
    let bands: Vec<(usize, usize)> = (0..g.ho)
        .step_by(rows)
        .map(|oy0| (oy0, (oy0 + rows).min(g.ho)))
        .collect();
    let results: Vec<Vec<f32>> = bands
        .par_iter()
        .map_init(
            || vec![0.0f32; k * rows * g.wo],
            |col, &(oy0, oy1)| {
                let cols = (oy1 - oy0) * g.wo;
                im2col_serial(img, g, oy0, oy1, col);
                let mut band = vec![0.0f32; cout * cols];
                gemm_serial(
                    cout,
                    cols,
                    k,
                    &mut band,
                    cols,
                    false,
                    MatRef::rows(weight, k),
                    MatRef::rows(col, cols),
                );
                band
            },
        )
        .collect();
    for (&(oy0, oy1), band) in bands.iter().zip(&results) {
        let cols = (oy1 - oy0) * g.wo;
        for (co, src) in band.chunks_exact(cols).enumerate() {
            let dst = &mut out[co * hw_out + oy0 * g.wo..co * hw_out + oy1 * g.wo];
            for (d, s) in dst.iter_mut().zip(src) {
                *d += s;
            }
        }
    }
}

/// `y = conv(x, weight) + bias`: `[N, Cin, H, W] -> [N, Cout, Ho, Wo]`.
pub fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&[f32]>,
    p: Conv2dParams,
) -> Result<Tensor> {
    let (n, cout, g) = check(x, weight, p)?;
    if let Some(b) = bias {
        expect_len(OP, "bias", b.len(), cout)?;
    }
    let (k, hw_in, hw_out) = (g.k(), g.c * g.h * g.w, g.ho * g.wo);
    let mut y = Tensor::zeros(&[n, cout, g.ho, g.wo]);
    if let Some(b) = bias {
        for (i, plane) in y.data.chunks_exact_mut(hw_out.max(1)).enumerate() {
            plane.fill(b[i % cout]);
        }
    }
    for b in 0..n {
        let img = &x.data[b * hw_in..(b + 1) * hw_in];
        let out = &mut y.data[b * cout * hw_out..(b + 1) * cout * hw_out];
        if is_pointwise(&g) {
            // The image already is its column matrix.
            let w = MatRef::rows(&weight.data, k);
            gemm(
                cout,
                hw_out,
                k,
                out,
                hw_out,
                bias.is_some(),
                w,
                MatRef::rows(img, hw_out),
            );
        } else {
            forward_bands(img, &weight.data, cout, &g, out);
        }
    }
    Ok(y)
}

/// Gradients w.r.t. input, weight and (if `has_bias`) bias, given the output gradient.
pub fn backward(
    x: &Tensor,
    weight: &Tensor,
    has_bias: bool,
    p: Conv2dParams,
    grad_out: &Tensor,
) -> Result<Conv2dGrads> {
    let (n, cout, g) = check(x, weight, p)?;
    expect_shape(OP, "grad_out", grad_out, &[n, cout, g.ho, g.wo])?;
    let (k, hw_in, hw_out) = (g.k(), g.c * g.h * g.w, g.ho * g.wo);
    let mut gx = Tensor::zeros(&x.shape);
    let mut gw = Tensor::zeros(&weight.shape);
    let rows = band_rows(&g);
    let band = k * rows * g.wo;
    let mut col = if is_pointwise(&g) {
        Vec::new()
    } else {
        vec![0.0f32; band]
    };
    let mut dcol = if is_pointwise(&g) {
        Vec::new()
    } else {
        vec![0.0f32; band]
    };
    for b in 0..n {
        let img = &x.data[b * hw_in..(b + 1) * hw_in];
        let dy = &grad_out.data[b * cout * hw_out..(b + 1) * cout * hw_out];
        let dimg = &mut gx.data[b * hw_in..(b + 1) * hw_in];
        if is_pointwise(&g) {
            // dW += dY X^T ; dX = W^T dY
            gemm(
                cout,
                k,
                hw_out,
                &mut gw.data,
                k,
                true,
                MatRef::rows(dy, hw_out),
                MatRef::transposed(img, hw_out),
            );
            gemm(
                k,
                hw_out,
                cout,
                dimg,
                hw_out,
                false,
                MatRef::transposed(&weight.data, k),
                MatRef::rows(dy, hw_out),
            );
            continue;
        }
        let mut oy0 = 0;
        while oy0 < g.ho {
            let oy1 = (oy0 + rows).min(g.ho);
            let cols = (oy1 - oy0) * g.wo;
            let dy_band = MatRef::rows(&dy[oy0 * g.wo..], hw_out);
            im2col(img, &g, oy0, oy1, &mut col);
            gemm(
                cout,
                k,
                cols,
                &mut gw.data,
                k,
                true,
                dy_band,
                MatRef::transposed(&col, cols),
            );
            gemm(
                k,
                cols,
                cout,
                &mut dcol,
                cols,
                false,
                MatRef::transposed(&weight.data, k),
                dy_band,
            );
            col2im_add(&dcol, &g, oy0, oy1, dimg);
            oy0 = oy1;
        }
    }
    let bias = has_bias.then(|| channel_sums(&grad_out.data, cout, hw_out));
    Ok(Conv2dGrads {
        input: gx,
        weight: gw,
        bias,
    })
}

/// Per-channel sums of an `[N, C, plane]` buffer (the bias gradient of NCHW ops).
pub(crate) fn channel_sums(data: &[f32], c: usize, plane: usize) -> Vec<f32> {
    let mut s = vec![0.0f64; c];
    for (i, chunk) in data.chunks_exact(plane.max(1)).enumerate() {
        s[i % c.max(1)] += chunk.iter().map(|&v| v as f64).sum::<f64>();
    }
    s.into_iter().map(|v| v as f32).collect()
}

/// Naive f64 convolution, the reference for this op's and the transposed conv's tests.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn naive_f64(
    x: &[f64],
    xs: [usize; 4],
    w: &[f64],
    ws: [usize; 4],
    b: Option<&[f64]>,
    p: Conv2dParams,
) -> (Vec<f64>, [usize; 4]) {
    let [n, c, h, wd] = xs;
    let [co, _, kh, kw] = ws;
    let (ho, wo) = output_size(h, wd, kh, kw, p).unwrap();
    let mut y = vec![0.0; n * co * ho * wo];
    for bi in 0..n {
        for o in 0..co {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = b.map_or(0.0, |b| b[o]);
                    for ci in 0..c {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * p.stride.0 + ky) as isize - p.padding.0 as isize;
                                let ix = (ox * p.stride.1 + kx) as isize - p.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                s += x[((bi * c + ci) * h + iy as usize) * wd + ix as usize]
                                    * w[((o * c + ci) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    y[((bi * co + o) * ho + oy) * wo + ox] = s;
                }
            }
        }
    }
    (y, [n, co, ho, wo])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    /// (n, cin, h, w, cout, kh, kw, stride, padding, bias)
    type Case = (
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        usize,
        (usize, usize),
        (usize, usize),
        bool,
    );
    const CASES: &[Case] = &[
        (2, 3, 7, 6, 4, 3, 3, (1, 1), (1, 1), false),
        (1, 2, 9, 8, 3, 3, 3, (2, 2), (1, 1), true),
        (2, 4, 5, 5, 3, 1, 1, (1, 1), (0, 0), true),
        (1, 3, 6, 7, 2, 1, 1, (2, 2), (0, 0), false),
        (1, 2, 8, 7, 3, 2, 2, (2, 2), (0, 0), true),
        (1, 2, 6, 9, 2, 3, 2, (2, 1), (0, 2), true),
        (3, 1, 4, 4, 2, 4, 4, (1, 1), (2, 2), false),
    ];

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(31);
        for &(n, cin, h, w, cout, kh, kw, stride, padding, with_bias) in CASES {
            let p = Conv2dParams { stride, padding };
            let x = uniform(&mut r, &[n, cin, h, w], 1.0);
            let wt = uniform(&mut r, &[cout, cin, kh, kw], 1.0);
            let b = with_bias.then(|| uniform_vec(&mut r, cout, 1.0));
            let y = forward(&x, &wt, b.as_deref(), p).unwrap();
            let (xd, wd) = (to_f64(&x.data), to_f64(&wt.data));
            let bd = b.as_ref().map(|b| to_f64(b));
            let xs = [n, cin, h, w];
            let ws = [cout, cin, kh, kw];
            let (yr, ys) = naive_f64(&xd, xs, &wd, ws, bd.as_deref(), p);
            assert_eq!(y.shape, ys.to_vec());
            assert_close("y", &y.data, &yr, 1e-5);

            let gy = uniform(&mut r, &y.shape, 1.0);
            let g = backward(&x, &wt, with_bias, p, &gy).unwrap();
            let fx = fd_grad(&xd, |v| {
                dot(&gy.data, &naive_f64(v, xs, &wd, ws, bd.as_deref(), p).0)
            });
            let fw = fd_grad(&wd, |v| {
                dot(&gy.data, &naive_f64(&xd, xs, v, ws, bd.as_deref(), p).0)
            });
            assert_close("dx", &g.input.data, &fx, 1e-5);
            assert_close("dw", &g.weight.data, &fw, 1e-5);
            if let (Some(bd), Some(gb)) = (&bd, &g.bias) {
                let fb = fd_grad(bd, |v| {
                    dot(&gy.data, &naive_f64(&xd, xs, &wd, ws, Some(v), p).0)
                });
                assert_close("db", gb, &fb, 1e-5);
            } else {
                assert_eq!(with_bias, g.bias.is_some());
            }
        }
    }

    #[test]
    fn banded_packing_matches_reference_on_a_wide_image() {
        // Large enough that the im2col is built in several bands and the GEMM is threaded.
        let mut r = rng(32);
        let p = Conv2dParams::new(1, 1);
        let x = uniform(&mut r, &[1, 16, 70, 300], 1.0);
        let wt = uniform(&mut r, &[8, 16, 3, 3], 1.0);
        let g = check(&x, &wt, p).unwrap().2;
        assert!(band_rows(&g) < g.ho, "test must exercise several bands");
        let y = forward(&x, &wt, None, p).unwrap();
        let (yr, _) = naive_f64(
            &to_f64(&x.data),
            [1, 16, 70, 300],
            &to_f64(&wt.data),
            [8, 16, 3, 3],
            None,
            p,
        );
        assert_close("y", &y.data, &yr, 1e-4);
        // Backward against the adjoint identity <conv(x), gy> = <x, dx> (linear in x).
        let gy = uniform(&mut r, &y.shape, 1.0);
        let gr = backward(&x, &wt, false, p, &gy).unwrap();
        let lhs = dot(&gy.data, &to_f64(&y.data));
        let rhs = dot(&gr.input.data, &to_f64(&x.data));
        assert!(
            (lhs - rhs).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
        let rhs_w = dot(&gr.weight.data, &to_f64(&wt.data));
        assert!(
            (lhs - rhs_w).abs() < 1e-3 * lhs.abs().max(1.0),
            "{lhs} vs {rhs_w}"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let x = Tensor::zeros(&[1, 3, 4, 4]);
        let w = Tensor::zeros(&[2, 4, 3, 3]);
        assert!(matches!(
            forward(&x, &w, None, Conv2dParams::new(1, 1)),
            Err(OpsError::Shape { arg: "weight", .. })
        ));
        let w = Tensor::zeros(&[2, 3, 3, 3]);
        assert!(matches!(
            forward(&x, &w, None, Conv2dParams::new(0, 1)),
            Err(OpsError::Invalid { arg: "stride", .. })
        ));
        assert!(matches!(
            forward(
                &Tensor::zeros(&[1, 3, 1, 1]),
                &w,
                None,
                Conv2dParams::new(1, 0)
            ),
            Err(OpsError::Invalid { arg: "weight", .. })
        ));
        assert!(matches!(
            forward(&x, &w, Some(&[0.0]), Conv2dParams::new(1, 1)),
            Err(OpsError::Shape { arg: "bias", .. })
        ));
        assert!(matches!(
            backward(
                &x,
                &w,
                false,
                Conv2dParams::new(1, 1),
                &Tensor::zeros(&[1, 2, 3, 4])
            ),
            Err(OpsError::Shape {
                arg: "grad_out",
                ..
            })
        ));
    }
}
