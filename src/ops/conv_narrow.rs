//! 3x3 stride-1 convolution with padding 1 and only a few output channels (the head's
//! output layers: 1 to 3 channels from 64): a direct sum, no packing.
//!
//! With so few outputs a GEMM has nothing to amortise its packing over, and im2col or a
//! Winograd input transform costs more than the arithmetic. Here each input row is read
//! once per output row and added, shifted by -1, 0 and +1, onto every output channel's
//! accumulator row: slice loops the compiler vectorises.

use super::{OpsError, Result, Tensor, dims, expect_len};
use rayon::prelude::*;

const OP: &str = "conv3x3_narrow";

/// Up to this many output channels the direct sum beats the GEMM-based convolutions
/// (benches/ops_conv.rs, 64 input channels at 128 x 128).
pub const MAX_OUT_CHANNELS: usize = 4;

/// `y = conv3x3(x, weight, stride 1, padding 1) + bias`: `[N, Cin, H, W] -> [N, Cout, H, W]`.
pub fn forward(x: &Tensor, weight: &Tensor, bias: Option<&[f32]>) -> Result<Tensor> {
    let [n, cin, h, w] = dims::<4>(OP, "input", x)?;
    let [cout, wcin, kh, kw] = dims::<4>(OP, "weight", weight)?;
    if (wcin, kh, kw) != (cin, 3, 3) {
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("[Cout, {cin}, 3, 3]"),
        });
    }
    if let Some(b) = bias {
        expect_len(OP, "bias", b.len(), cout)?;
    }
    let mut y = Tensor::zeros(&[n, cout, h, w]);
    if h == 0 || w == 0 || cout == 0 {
        return Ok(y);
    }
    // Jobs: (image, output row); each owns row `oy` of every output plane of its image.
    let mut rows: Vec<Vec<&mut [f32]>> = (0..n * h).map(|_| Vec::with_capacity(cout)).collect();
    for (b, image) in y.data.chunks_exact_mut(cout * h * w).enumerate() {
        for plane in image.chunks_exact_mut(h * w) {
            for (oy, row) in plane.chunks_exact_mut(w).enumerate() {
                rows[b * h + oy].push(row);
            }
        }
    }
    rows.into_par_iter().enumerate().for_each(|(job, mut out)| {
        let (b, oy) = (job / h, job % h);
        let img = &x.data[b * cin * h * w..(b + 1) * cin * h * w];
        let row = Row {
            img,
            weight: &weight.data,
            bias,
            cin,
            h,
            w,
            oy,
        };
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2 (checked just above).
            unsafe { row_avx2(&row, &mut out) };
            return;
        }
        row_body(&row, &mut out);
    });
    Ok(y)
}

/// One output row's inputs.
struct Row<'a> {
    img: &'a [f32],
    weight: &'a [f32],
    bias: Option<&'a [f32]>,
    cin: usize,
    h: usize,
    w: usize,
    oy: usize,
}

/// The crate is built for baseline x86-64: this copy of the loops is compiled with AVX2
/// and runs where the CPU has it (same float operations in the same order).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_avx2(r: &Row<'_>, out: &mut [&mut [f32]]) {
    row_body(r, out);
}

/// Row `oy` of every output channel.
#[inline(always)]
fn row_body(r: &Row<'_>, out: &mut [&mut [f32]]) {
    let (cin, h, w, oy) = (r.cin, r.h, r.w, r.oy);
    for (co, acc) in out.iter_mut().enumerate() {
        acc.fill(r.bias.map_or(0.0, |b| b[co]));
    }
    for ci in 0..cin {
        for ky in 0..3 {
            let Some(iy) = (oy + ky).checked_sub(1).filter(|&iy| iy < h) else {
                continue;
            };
            let src = &r.img[(ci * h + iy) * w..(ci * h + iy + 1) * w];
            for (co, acc) in out.iter_mut().enumerate() {
                let k = &r.weight[((co * cin + ci) * 3 + ky) * 3..][..3];
                // Output x reads input x - 1, x, x + 1 (zero outside the row).
                for (a, s) in acc[1..].iter_mut().zip(&src[..w - 1]) {
                    *a += k[0] * s;
                }
                for (a, s) in acc.iter_mut().zip(src) {
                    *a += k[1] * s;
                }
                for (a, s) in acc[..w - 1].iter_mut().zip(&src[1..]) {
                    *a += k[2] * s;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::conv2d::{Conv2dParams, naive_f64};
    use crate::ops::testutil::*;

    #[test]
    fn matches_the_naive_convolution() {
        let mut r = rng(21);
        for &(n, cin, cout, h, w) in &[
            (1, 1, 1, 1, 1),
            (1, 3, 2, 5, 7),
            (2, 8, 3, 6, 1),
            (1, 16, 4, 9, 12),
        ] {
            let x = uniform(&mut r, &[n, cin, h, w], 1.0);
            let wt = uniform(&mut r, &[cout, cin, 3, 3], 1.0);
            let b = uniform_vec(&mut r, cout, 1.0);
            let y = forward(&x, &wt, Some(&b)).unwrap();
            let (want, shape) = naive_f64(
                &to_f64(&x.data),
                [n, cin, h, w],
                &to_f64(&wt.data),
                [cout, cin, 3, 3],
                Some(&to_f64(&b)),
                Conv2dParams::new(1, 1),
            );
            assert_eq!(y.shape, shape.to_vec());
            assert_close(&format!("{n}x{cin}x{h}x{w}->{cout}"), &y.data, &want, 1e-5);
        }
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let x = Tensor::zeros(&[1, 2, 4, 4]);
        assert!(forward(&x, &Tensor::zeros(&[1, 3, 3, 3]), None).is_err());
        assert!(forward(&x, &Tensor::zeros(&[1, 2, 1, 1]), None).is_err());
        assert!(forward(&x, &Tensor::zeros(&[1, 2, 3, 3]), Some(&[0.0; 2])).is_err());
    }
}
