//! 3x3 stride-1 convolution with padding 1 by Winograd's minimal filtering F(2x2, 3x3):
//! the inference path of the network's commonest layer.
//!
//! Each 2x2 block of outputs ("tile") comes from a 4x4 input patch. With the transforms
//! `V = Bᵀ d B` (input patch), `U = G g Gᵀ` (kernel) and `Y = Aᵀ M A`, the convolution is
//! `M[ξ] = U[ξ] · V[ξ]` for each of the 16 transformed positions ξ: 16 GEMMs of
//! `[cout, cin] x [cin, tiles]`, which is 16/4 = 4 multiplies per output and input channel
//! instead of 9 (2.25x fewer). F(2x2, 3x3)'s transforms only add, subtract and halve, so
//! its results stay within a few float ulps of the direct sum; the larger F(4x4, 3x3)
//! would save more but amplifies rounding. The backward pass and training keep im2col
//! ([`super::conv2d`]); this is a forward for inference.
//!
//! Work is split in bands of tile rows, each thread transforming, multiplying and
//! untransforming its own bands so the transformed band stays in its core's cache.

use super::matmul::{MatRef, gemm_serial};
use super::{OpsError, Result, Tensor, dims, expect_len};
use rayon::prelude::*;

const OP: &str = "winograd_conv3x3";

/// Target size of one band's transformed input and output (f32 elements, 1 MiB).
const BAND_ELEMS: usize = 1 << 18;

/// Output channels multiplied and untransformed together.
const COUT_BLOCK: usize = 64;

/// Kernel transform `U = G g Gᵀ` of every (cout, cin) pair: `[16, cout, cin]`, position
/// ξ = 4 * row + column of the 4x4 transformed kernel.
pub fn transform_weights(weight: &Tensor) -> Result<Vec<f32>> {
    let [cout, cin, kh, kw] = dims::<4>(OP, "weight", weight)?;
    if (kh, kw) != (3, 3) {
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: "[Cout, Cin, 3, 3]".into(),
        });
    }
    let mut u = vec![0.0f32; 16 * cout * cin];
    for (oc_ic, g) in weight.data.chunks_exact(9).enumerate() {
        // G g: [4, 3]; G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1].
        let mut gg = [[0.0f32; 3]; 4];
        for j in 0..3 {
            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = a;
            gg[1][j] = 0.5 * (a + b + c);
            gg[2][j] = 0.5 * (a - b + c);
            gg[3][j] = c;
        }
        // (G g) Gᵀ: [4, 4].
        for (i, row) in gg.iter().enumerate() {
            let (a, b, c) = (row[0], row[1], row[2]);
            let t = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
            for (j, &v) in t.iter().enumerate() {
                u[(4 * i + j) * cout * cin + oc_ic] = v;
            }
        }
    }
    Ok(u)
}

/// `y = conv3x3(x, weight, stride 1, padding 1) + bias` with the kernel already transformed
/// by [`transform_weights`] (`u`, for `cout` output channels).
pub fn forward(x: &Tensor, u: &[f32], cout: usize, bias: Option<&[f32]>) -> Result<Tensor> {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0.0; cout];
            &zeros
        }
    };
    Ok(forward_multi(x, u, &[cout], bias)?.remove(0))
}

/// Several convolutions of the same input at once (sibling layers): `u` holds their
/// transformed kernels stacked along the output channels (`couts[i]` each, as
/// [`transform_weights`] of the stacked weights gives), `bias` their stacked biases. The
/// input is transformed once and multiplied with one tall GEMM per position; each
/// convolution gets its own output tensor.
pub fn forward_multi(x: &Tensor, u: &[f32], couts: &[usize], bias: &[f32]) -> Result<Vec<Tensor>> {
    let [n, cin, h, w] = dims::<4>(OP, "input", x)?;
    let cout: usize = couts.iter().sum();
    expect_len(OP, "transformed weight", u.len(), 16 * cout * cin)?;
    expect_len(OP, "bias", bias.len(), cout)?;
    let mut ys: Vec<Tensor> = couts
        .iter()
        .map(|&c| Tensor::zeros(&[n, c, h, w]))
        .collect();
    if h == 0 || w == 0 || cout == 0 {
        return Ok(ys);
    }
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let threads = rayon::current_num_threads().max(1);
    // Sized without regard to cout, so that a convolution computes exactly the same sums
    // whether it runs alone or stacked with siblings.
    let by_cache = (BAND_ELEMS / (16 * (cin + COUT_BLOCK) * tw).max(1)).max(1);
    let band_t = by_cache.min(th.div_ceil(4 * threads)).max(1);
    let geo = Geo {
        cin,
        cout,
        couts,
        h,
        w,
        tw,
    };
    let img_len = cin * h * w;
    // Each band owns output rows [2 * t0, 2 * t1) of every plane of every output.
    let mut bands: Vec<Vec<&mut [f32]>> = (0..n * th.div_ceil(band_t))
        .map(|_| Vec::with_capacity(cout))
        .collect();
    let per_image = th.div_ceil(band_t);
    for (y, &c) in ys.iter_mut().zip(couts).filter(|(_, c)| **c > 0) {
        for (b, image) in y.data.chunks_exact_mut(c * h * w).enumerate() {
            for plane in image.chunks_exact_mut(h * w) {
                for (bi, rows) in plane.chunks_mut(2 * band_t * w).enumerate() {
                    bands[b * per_image + bi].push(rows);
                }
            }
        }
    }
    bands.into_par_iter().enumerate().for_each_init(
        || Scratch::new(&geo, band_t),
        |s, (k, mut planes)| {
            let (b, bi) = (k / per_image, k % per_image);
            let img = &x.data[b * img_len..(b + 1) * img_len];
            let t0 = bi * band_t;
            let t1 = (t0 + band_t).min(th);
            band(img, u, bias, &geo, t0, t1, s, &mut planes);
        },
    );
    Ok(ys)
}

/// Sizes shared by every band of one call.
struct Geo<'a> {
    cin: usize,
    cout: usize,
    couts: &'a [usize],
    h: usize,
    w: usize,
    tw: usize,
}

/// One thread's buffers: transformed input `[16, cin, tiles]`, products `[16, cout, tiles]`
/// and the row workspace of the transforms.
struct Scratch {
    v: Vec<f32>,
    m: Vec<f32>,
    rows: Vec<f32>,
}

impl Scratch {
    fn new(g: &Geo, band_t: usize) -> Self {
        let nb = band_t * g.tw;
        Self {
            v: vec![0.0; 16 * g.cin * nb],
            m: vec![0.0; 16 * COUT_BLOCK * nb],
            // Input rows of a band (2 per tile row + 2) x 4 combinations, even and odd columns;
            // at least the output transform's 8 rows.
            rows: vec![0.0; (2 * band_t + 2) * 4 * g.tw + 2 * (g.tw + 1)],
        }
    }
}

/// Tile rows `[t0, t1)`: input transform, 16 GEMMs, output transform into `planes`.
///
/// The crate is built for baseline x86-64, so the transforms' loops are compiled a second
/// time with AVX2 and that copy runs where the CPU has it (the GEMMs choose their own).
/// Both copies do the same float operations in the same order: same results.
#[allow(clippy::too_many_arguments)]
fn band(
    img: &[f32],
    u: &[f32],
    bias: &[f32],
    g: &Geo,
    t0: usize,
    t1: usize,
    s: &mut Scratch,
    planes: &mut [&mut [f32]],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        unsafe { band_avx2(img, u, bias, g, t0, t1, s, planes) };
        return;
    }
    band_body(img, u, bias, g, t0, t1, s, planes);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn band_avx2(
    img: &[f32],
    u: &[f32],
    bias: &[f32],
    g: &Geo,
    t0: usize,
    t1: usize,
    s: &mut Scratch,
    planes: &mut [&mut [f32]],
) {
    band_body(img, u, bias, g, t0, t1, s, planes);
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn band_body(
    img: &[f32],
    u: &[f32],
    bias: &[f32],
    g: &Geo,
    t0: usize,
    t1: usize,
    s: &mut Scratch,
    planes: &mut [&mut [f32]],
) {
    let (cin, cout, tw) = (g.cin, g.cout, g.tw);
    let nb = (t1 - t0) * tw;
    for c in 0..cin {
        let plane = &img[c * g.h * g.w..(c + 1) * g.h * g.w];
        transform_input(plane, g, t0, t1, &mut s.rows, &mut s.v, |xi, col| {
            (xi * cin + c) * nb + col
        });
    }
    // Each convolution's output channels in blocks, so the products of a block stay in
    // cache until they are untransformed, however many siblings are stacked; a block never
    // spans two siblings, so each gets the same GEMMs as when it runs alone.
    let blocks = g.couts.iter().scan(0, |first, &c| {
        let o = *first;
        *first += c;
        Some(
            (o..o + c)
                .step_by(COUT_BLOCK)
                .map(move |co0| (co0, COUT_BLOCK.min(o + c - co0))),
        )
    });
    for (co0, mb) in blocks.flatten() {
        for xi in 0..16 {
            gemm_serial(
                mb,
                nb,
                cin,
                &mut s.m[xi * mb * nb..(xi + 1) * mb * nb],
                nb,
                false,
                MatRef::rows(&u[(xi * cout + co0) * cin..][..mb * cin], cin),
                MatRef::rows(&s.v[xi * cin * nb..(xi + 1) * cin * nb], nb),
            );
        }
        for (k, out) in planes[co0..co0 + mb].iter_mut().enumerate() {
            let b = bias[co0 + k];
            for ty in t0..t1 {
                let col = (ty - t0) * tw;
                let m = |xi: usize| &s.m[(xi * mb + k) * nb + col..][..tw];
                transform_output_row(m, b, g.w, &mut out[(ty - t0) * 2 * g.w..], &mut s.rows);
            }
        }
    }
}

/// `Bᵀ d B` for every tile of tile rows `[t0, t1)` of one channel, written into `v` at
/// `at(ξ, first tile of the row)` for each transformed position ξ and tile row.
///
/// Tile `t` reads input columns `2t - 1 .. 2t + 2`, i.e. `O[t-1], E[t], O[t], E[t+1]` with
/// `E` the even and `O` the odd columns: splitting each row into those two turns the
/// strided patch reads into contiguous, vectorisable loops. Each input row's horizontal
/// combinations are computed once for the band (tile rows share two input rows).
#[inline(always)]
fn transform_input(
    plane: &[f32],
    g: &Geo,
    t0: usize,
    t1: usize,
    rows: &mut [f32],
    v: &mut [f32],
    at: impl Fn(usize, usize) -> usize,
) {
    let tw = g.tw;
    let n_rows = 2 * (t1 - t0) + 2;
    // hrows: per input row r, its 4 horizontal combinations (rows of tw values); then the
    // even and odd columns of the current row (odd[t] = column 2t - 1, odd[0] = padding).
    let (hrows, rest) = rows.split_at_mut(n_rows * 4 * tw);
    let (even, rest) = rest.split_at_mut(tw + 1);
    let odd = &mut rest[..tw + 1];
    for r in 0..n_rows {
        let y = (2 * t0 + r) as isize - 1;
        even.fill(0.0);
        odd.fill(0.0);
        if y >= 0 && (y as usize) < g.h {
            let src = &plane[y as usize * g.w..(y as usize + 1) * g.w];
            for (t, pair) in src.chunks(2).enumerate() {
                even[t] = pair[0];
                if let Some(&v) = pair.get(1) {
                    odd[t + 1] = v;
                }
            }
        }
        // Patch columns of tile t: c0 = odd[t], c1 = even[t], c2 = odd[t+1], c3 = even[t+1].
        let row = &mut hrows[4 * r * tw..4 * (r + 1) * tw];
        let (r0, rest) = row.split_at_mut(tw);
        let (r1, rest) = rest.split_at_mut(tw);
        let (r2, r3) = rest.split_at_mut(tw);
        for t in 0..tw {
            let (c0, c1, c2, c3) = (odd[t], even[t], odd[t + 1], even[t + 1]);
            r0[t] = c0 - c2;
            r1[t] = c1 + c2;
            r2[t] = c2 - c1;
            r3[t] = c1 - c3;
        }
    }
    // Vertical, per tile row and column combination j: Bᵀ's rows over patch rows d0..d3.
    for ty in t0..t1 {
        let (r, col) = (2 * (ty - t0), (ty - t0) * tw);
        for j in 0..4 {
            let d = |i: usize| &hrows[(4 * (r + i) + j) * tw..(4 * (r + i) + j + 1) * tw];
            let (d0, d1, d2, d3) = (d(0), d(1), d(2), d(3));
            for ((o, a), c) in v[at(j, col)..][..tw].iter_mut().zip(d0).zip(d2) {
                *o = a - c;
            }
            for ((o, b), c) in v[at(4 + j, col)..][..tw].iter_mut().zip(d1).zip(d2) {
                *o = b + c;
            }
            for ((o, b), c) in v[at(8 + j, col)..][..tw].iter_mut().zip(d1).zip(d2) {
                *o = c - b;
            }
            for ((o, b), d) in v[at(12 + j, col)..][..tw].iter_mut().zip(d1).zip(d3) {
                *o = b - d;
            }
        }
    }
}

/// `Aᵀ M A + bias` of every tile of one tile row, written to its two output rows of
/// `out` (which starts at the tile row's first output row; rows past the image are cut).
#[inline(always)]
fn transform_output_row<'a>(
    m: impl Fn(usize) -> &'a [f32],
    bias: f32,
    w: usize,
    out: &mut [f32],
    rows: &mut [f32],
) {
    let tw = m(0).len();
    // s[a][j] = sum over the patch rows with Aᵀ's row a: a = 0: m0 + m1 + m2; a = 1: m1 - m2 - m3.
    let (s, _) = rows.split_at_mut(8 * tw);
    for j in 0..4 {
        let (m0, m1, m2, m3) = (m(j), m(4 + j), m(8 + j), m(12 + j));
        for t in 0..tw {
            s[j * tw + t] = m0[t] + m1[t] + m2[t];
            s[(4 + j) * tw + t] = m1[t] - m2[t] - m3[t];
        }
    }
    let out_rows = (out.len() / w).min(2);
    for a in 0..out_rows {
        let r = &s[4 * a * tw..4 * (a + 1) * tw];
        let (s0, s1, s2, s3) = (&r[..tw], &r[tw..2 * tw], &r[2 * tw..3 * tw], &r[3 * tw..]);
        let dst = &mut out[a * w..(a + 1) * w];
        for t in 0..tw {
            let x = 2 * t;
            dst[x] = s0[t] + s1[t] + s2[t] + bias;
            if x + 1 < w {
                dst[x + 1] = s1[t] - s2[t] - s3[t] + bias;
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
    fn matches_the_naive_convolution_on_odd_and_even_sizes() {
        let mut r = rng(11);
        for &(n, cin, cout, h, w) in &[
            (1, 1, 1, 1, 1),
            (1, 3, 2, 5, 7),
            (2, 4, 5, 8, 6),
            (1, 7, 3, 13, 2),
            (1, 16, 9, 33, 31),
        ] {
            let x = uniform(&mut r, &[n, cin, h, w], 1.0);
            let wt = uniform(&mut r, &[cout, cin, 3, 3], 1.0);
            let b = uniform_vec(&mut r, cout, 1.0);
            let u = transform_weights(&wt).unwrap();
            let y = forward(&x, &u, cout, Some(&b)).unwrap();
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
    fn stacked_siblings_equal_separate_convolutions() {
        let mut r = rng(12);
        let (cin, h, w) = (5, 9, 10);
        let x = uniform(&mut r, &[2, cin, h, w], 1.0);
        let couts = [3, 70, 1, 64];
        let ws: Vec<Tensor> = couts
            .iter()
            .map(|&c| uniform(&mut r, &[c, cin, 3, 3], 1.0))
            .collect();
        let bs: Vec<Vec<f32>> = couts.iter().map(|&c| uniform_vec(&mut r, c, 1.0)).collect();
        let stacked = Tensor::new(
            vec![couts.iter().sum(), cin, 3, 3],
            ws.iter().flat_map(|t| t.data.clone()).collect(),
        )
        .unwrap();
        let u = transform_weights(&stacked).unwrap();
        let ys = forward_multi(&x, &u, &couts, &bs.concat()).unwrap();
        for ((y, wt), b) in ys.iter().zip(&ws).zip(&bs) {
            let alone = forward(&x, &transform_weights(wt).unwrap(), wt.shape[0], Some(b)).unwrap();
            assert_eq!(y.shape, alone.shape);
            assert_eq!(
                y.data, alone.data,
                "a sibling's output differs from its own conv"
            );
        }
    }

    #[test]
    fn shape_mismatches_are_errors() {
        let x = Tensor::zeros(&[1, 2, 4, 4]);
        let w5 = Tensor::zeros(&[3, 2, 5, 5]);
        assert!(transform_weights(&w5).is_err());
        let u = transform_weights(&Tensor::zeros(&[3, 2, 3, 3])).unwrap();
        assert!(forward(&x, &u, 4, None).is_err());
        assert!(forward(&x, &u, 3, Some(&[0.0; 2])).is_err());
        assert!(forward(&Tensor::zeros(&[2, 4, 4]), &u, 3, None).is_err());
    }
}
