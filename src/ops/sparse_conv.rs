//! Sparse 3D convolution (spconv semantics) over a [`Rulebook`]: for each kernel offset,
//! gather the paired input rows, multiply by that offset's weight slice (a GEMM on the
//! `gemm` crate), scatter-add into the paired output rows.
//!
//! # Weight layout
//! `[Cout, kz, ky, kx, Cin]`, spconv 2.x's layout (OpenPCDet checkpoints trained with
//! spconv >= 2 load unchanged; spconv 1.x stored `[kz, ky, kx, Cin, Cout]` and needs a
//! permute). Kernel axes follow the grid axes (z, y, x); offset `(a, b, c)` is offset number
//! `(a * ky + b) * kx + c` of the rulebook.
//!
//! # Determinism and parallelism
//! Offsets are multiplied in parallel (each into its own buffer), then every output row
//! sums its products in offset order, rows in parallel: the summation order is fixed, so
//! results do not depend on the thread count. Offsets are processed in groups whose product
//! buffers stay under a bound, so the memory stays a few tens of MiB at any site count.

use rayon::prelude::*;

use super::matmul::{MatRef, gemm};
use super::{OpsError, Result, Tensor, dims, expect_len, expect_shape};
use crate::sparse::{OffsetPairs, Rulebook, SparseTensor};

const OP: &str = "sparse_conv";

/// Bound on the elements of one group's product buffer (16 MiB of f32).
const GROUP_ELEMS: usize = 1 << 22;
/// Pairs per gather block in the weight gradient (bounds its scratch memory).
const WGRAD_BLOCK: usize = 8192;
/// Output rows per parallel task of the scatter.
const ROWS_PER_TASK: usize = 256;

/// Gradients of a sparse convolution.
#[derive(Debug, Clone)]
pub struct SparseConvGrads {
    /// `[N_in, Cin]`.
    pub input: Tensor,
    /// `[Cout, kz, ky, kx, Cin]`.
    pub weight: Tensor,
    pub bias: Option<Vec<f32>>,
}

/// Validates shapes against the rulebook; returns (cin, cout, kernel volume).
fn check(x: &Tensor, rb: &Rulebook, weight: &Tensor) -> Result<(usize, usize, usize)> {
    let [n, cin] = dims::<2>(OP, "input", x)?;
    if n != rb.n_in() {
        return Err(OpsError::Shape {
            op: OP,
            arg: "input",
            got: x.shape.clone(),
            expected: format!("[{}, C] (the rulebook's input sites)", rb.n_in()),
        });
    }
    let [cout, kz, ky, kx, wcin] = dims::<5>(OP, "weight", weight)?;
    if [kz, ky, kx] != rb.kernel() || wcin != cin {
        let k = rb.kernel();
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("[Cout, {}, {}, {}, {cin}]", k[0], k[1], k[2]),
        });
    }
    Ok((cin, cout, rb.kernel_volume()))
}

/// `dst[d] += src[s] * m(k)` for every pair (s, d) of every offset k, with `src` rows on
/// the `input` side of the pairs when `from_input` (else the `output` side). `m(k)` is a
/// `[src_c, dst_c]` view.
#[allow(clippy::too_many_arguments)]
fn accumulate_pairs<'w>(
    pairs: &[OffsetPairs],
    from_input: bool,
    src: &[f32],
    src_c: usize,
    dst: &mut [f32],
    dst_c: usize,
    m: impl Fn(usize) -> MatRef<'w> + Sync,
    group_elems: usize,
) {
    if dst_c == 0 || dst.is_empty() {
        return;
    }
    let n_dst = dst.len() / dst_c;
    // (source rows, destination rows) of an offset.
    fn sides(p: &OffsetPairs, from_input: bool) -> (&[u32], &[u32]) {
        if from_input {
            (&p.input, &p.output)
        } else {
            (&p.output, &p.input)
        }
    }
    let mut k0 = 0;
    while k0 < pairs.len() {
        let mut k1 = k0;
        let mut rows = 0;
        while k1 < pairs.len() && (k1 == k0 || (rows + pairs[k1].len()) * dst_c <= group_elems) {
            rows += pairs[k1].len();
            k1 += 1;
        }
        let group = &pairs[k0..k1];
        k0 = k1;
        if rows == 0 {
            continue;
        }
        // Products of each offset, offsets back to back.
        let mut prod = vec![0.0f32; rows * dst_c];
        let mut parts = Vec::with_capacity(group.len());
        let mut rest = prod.as_mut_slice();
        for (g, p) in group.iter().enumerate() {
            let (a, b) = rest.split_at_mut(p.len() * dst_c);
            parts.push((g, a));
            rest = b;
        }
        let kbase = k1 - group.len();
        parts.into_par_iter().for_each(|(g, out)| {
            let (s_rows, _) = sides(&group[g], from_input);
            if s_rows.is_empty() {
                return;
            }
            let mut a = vec![0.0f32; s_rows.len() * src_c];
            if src_c > 0 {
                for (row, &s) in a.chunks_exact_mut(src_c).zip(s_rows) {
                    let s = s as usize * src_c;
                    row.copy_from_slice(&src[s..s + src_c]);
                }
            }
            gemm(
                s_rows.len(),
                dst_c,
                src_c,
                out,
                dst_c,
                false,
                MatRef::rows(&a, src_c),
                m(kbase + g),
            );
        });
        // Products of each destination row, in offset order (CSR by counting sort).
        let mut start = vec![0usize; n_dst + 1];
        for p in group {
            for &d in sides(p, from_input).1 {
                start[d as usize + 1] += 1;
            }
        }
        for i in 0..n_dst {
            start[i + 1] += start[i];
        }
        let mut fill = start.clone();
        let mut list = vec![0u32; rows];
        let mut j = 0u32;
        for p in group {
            for &d in sides(p, from_input).1 {
                list[fill[d as usize]] = j;
                fill[d as usize] += 1;
                j += 1;
            }
        }
        dst.par_chunks_mut(dst_c * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(t, block)| {
                for (rr, row) in block.chunks_exact_mut(dst_c).enumerate() {
                    let r = t * ROWS_PER_TASK + rr;
                    for &j in &list[start[r]..start[r + 1]] {
                        let j = j as usize * dst_c;
                        for (o, &v) in row.iter_mut().zip(&prod[j..j + dst_c]) {
                            *o += v;
                        }
                    }
                }
            });
    }
}

fn forward_impl(
    x: &Tensor,
    rb: &Rulebook,
    weight: &Tensor,
    bias: Option<&[f32]>,
    group_elems: usize,
) -> Result<Tensor> {
    let (cin, cout, kvol) = check(x, rb, weight)?;
    let mut y = Tensor::zeros(&[rb.n_out(), cout]);
    if let Some(b) = bias {
        expect_len(OP, "bias", b.len(), cout)?;
        if cout > 0 {
            for row in y.data.chunks_exact_mut(cout) {
                row.copy_from_slice(b);
            }
        }
    }
    let w = &weight.data;
    // Offset k's slice as [Cin, Cout]: element (ci, co) = w[co][k][ci].
    let wk_t = |k: usize| MatRef {
        data: &w[k * cin..],
        rs: 1,
        cs: kvol * cin,
    };
    accumulate_pairs(
        rb.pairs(),
        true,
        &x.data,
        cin,
        &mut y.data,
        cout,
        wk_t,
        group_elems,
    );
    Ok(y)
}

/// `y = sparse_conv(x, weight) + bias`: `[N_in, Cin] -> [N_out, Cout]`, rows of `y` in the
/// order of `rb.out_coords()`. `x`'s rows must be the sites the rulebook was built on.
pub fn forward(x: &Tensor, rb: &Rulebook, weight: &Tensor, bias: Option<&[f32]>) -> Result<Tensor> {
    forward_impl(x, rb, weight, bias, GROUP_ELEMS)
}

/// [`forward`] on a sparse tensor: checks its grid against the rulebook and returns the
/// output sites with their features.
pub fn forward_sparse(
    x: &SparseTensor,
    rb: &Rulebook,
    weight: &Tensor,
    bias: Option<&[f32]>,
) -> Result<SparseTensor> {
    if x.shape != rb.in_shape() || x.len() != rb.n_in() {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "input",
            detail: format!(
                "{} sites on grid {:?}, but the rulebook was built for {} sites on {:?}",
                x.len(),
                x.shape,
                rb.n_in(),
                rb.in_shape()
            ),
        });
    }
    let features = forward(&x.features, rb, weight, bias)?;
    Ok(SparseTensor {
        coords: rb.out_coords().to_vec(),
        features,
        shape: rb.out_shape(),
    })
}

fn backward_impl(
    x: &Tensor,
    rb: &Rulebook,
    weight: &Tensor,
    has_bias: bool,
    grad_out: &Tensor,
    group_elems: usize,
) -> Result<SparseConvGrads> {
    let (cin, cout, kvol) = check(x, rb, weight)?;
    expect_shape(OP, "grad_out", grad_out, &[rb.n_out(), cout])?;
    let w = &weight.data;
    let dy = &grad_out.data;

    // dX[i] += dY[o] * W_k, W_k as [Cout, Cin]: element (co, ci) = w[co][k][ci].
    let mut gx = Tensor::zeros(&x.shape);
    let wk = |k: usize| MatRef {
        data: &w[k * cin..],
        rs: kvol * cin,
        cs: 1,
    };
    accumulate_pairs(
        rb.pairs(),
        false,
        dy,
        cout,
        &mut gx.data,
        cin,
        wk,
        group_elems,
    );

    // dW_k = sum over pairs of dY[o]^T X[i], per offset in parallel, pairs in fixed blocks.
    let per_offset: Vec<Vec<f32>> = rb
        .pairs()
        .par_iter()
        .map(|p| {
            let mut dwk = vec![0.0f32; cout * cin];
            let mut g = Vec::new();
            let mut a = Vec::new();
            for (ins, outs) in p
                .input
                .chunks(WGRAD_BLOCK)
                .zip(p.output.chunks(WGRAD_BLOCK))
            {
                g.clear();
                a.clear();
                for (&i, &o) in ins.iter().zip(outs) {
                    g.extend_from_slice(&dy[o as usize * cout..(o as usize + 1) * cout]);
                    a.extend_from_slice(&x.data[i as usize * cin..(i as usize + 1) * cin]);
                }
                gemm(
                    cout,
                    cin,
                    ins.len(),
                    &mut dwk,
                    cin,
                    true,
                    MatRef::transposed(&g, cout),
                    MatRef::rows(&a, cin),
                );
            }
            dwk
        })
        .collect();
    let mut gw = Tensor::zeros(&weight.shape);
    for (k, dwk) in per_offset.iter().enumerate() {
        for co in 0..cout {
            let dst = (co * kvol + k) * cin;
            gw.data[dst..dst + cin].copy_from_slice(&dwk[co * cin..(co + 1) * cin]);
        }
    }

    let bias = has_bias.then(|| {
        let mut acc = vec![0.0f64; cout];
        if cout > 0 {
            for row in dy.chunks_exact(cout) {
                for (s, &v) in acc.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
        }
        acc.into_iter().map(|v| v as f32).collect()
    });
    Ok(SparseConvGrads {
        input: gx,
        weight: gw,
        bias,
    })
}

/// Gradients w.r.t. input features, weight and (if `has_bias`) bias, given the output
/// gradient `[N_out, Cout]`.
pub fn backward(
    x: &Tensor,
    rb: &Rulebook,
    weight: &Tensor,
    has_bias: bool,
    grad_out: &Tensor,
) -> Result<SparseConvGrads> {
    backward_impl(x, rb, weight, has_bias, grad_out, GROUP_ELEMS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, dot, fd_grad, rng, to_f64, uniform, uniform_vec};
    use rand::RngExt;
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    fn random_sites(r: &mut ChaCha8Rng, shape: [usize; 3], n: usize) -> Vec<[u32; 3]> {
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        while v.len() < n {
            let c = shape.map(|s| r.random_range(0..s as u32));
            if seen.insert(c) {
                v.push(c);
            }
        }
        v
    }

    /// Geometry of one test case.
    #[derive(Clone, Copy)]
    struct Geo {
        shape: [usize; 3],
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    }

    /// Dense 3D cross-correlation in f64 of the zero-filled grid, read at `out_sites`:
    /// `y[o, co] = b[co] + sum w[co, kk, ci] * x_dense[ci, o * s - p + kk]`.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        coords: &[[u32; 3]],
        x: &[f64],
        cin: usize,
        w: &[f64],
        b: Option<&[f64]>,
        cout: usize,
        g: Geo,
        out_sites: &[[u32; 3]],
    ) -> Vec<f64> {
        let [d, h, wd] = g.shape;
        let mut dense = vec![0.0f64; cin * d * h * wd];
        for (i, c) in coords.iter().enumerate() {
            let at = (c[0] as usize * h + c[1] as usize) * wd + c[2] as usize;
            for ci in 0..cin {
                dense[ci * d * h * wd + at] = x[i * cin + ci];
            }
        }
        let [kz, ky, kx] = g.kernel;
        let mut y = vec![0.0f64; out_sites.len() * cout];
        for (r, o) in out_sites.iter().enumerate() {
            for co in 0..cout {
                let mut s = b.map_or(0.0, |b| b[co]);
                for a in 0..kz {
                    for bb in 0..ky {
                        for c in 0..kx {
                            let iz = (o[0] as usize * g.stride[0] + a) as i64 - g.padding[0] as i64;
                            let iy =
                                (o[1] as usize * g.stride[1] + bb) as i64 - g.padding[1] as i64;
                            let ix = (o[2] as usize * g.stride[2] + c) as i64 - g.padding[2] as i64;
                            if iz < 0
                                || iy < 0
                                || ix < 0
                                || iz >= d as i64
                                || iy >= h as i64
                                || ix >= wd as i64
                            {
                                continue;
                            }
                            let at = (iz as usize * h + iy as usize) * wd + ix as usize;
                            for ci in 0..cin {
                                let wi = (((co * kz + a) * ky + bb) * kx + c) * cin + ci;
                                s += w[wi] * dense[ci * d * h * wd + at];
                            }
                        }
                    }
                }
                y[r * cout + co] = s;
            }
        }
        y
    }

    fn build(coords: &[[u32; 3]], g: Geo, subm: bool) -> Rulebook {
        if subm {
            Rulebook::submanifold(coords, g.shape, g.kernel[0]).unwrap()
        } else {
            Rulebook::regular(coords, g.shape, g.kernel, g.stride, g.padding).unwrap()
        }
    }

    fn subm(shape: [usize; 3], k: usize) -> Geo {
        Geo {
            shape,
            kernel: [k; 3],
            stride: [1; 3],
            padding: [k / 2; 3],
        }
    }

    fn cases() -> Vec<(Geo, bool)> {
        vec![
            (subm([6, 7, 8], 3), true),
            (subm([5, 6, 5], 5), true),
            (subm([4, 4, 4], 1), true),
            (
                Geo {
                    shape: [9, 8, 7],
                    kernel: [3; 3],
                    stride: [2; 3],
                    padding: [1; 3],
                },
                false,
            ),
            // The last stride-2 stage of VoxelResBackBone8x: z unpadded.
            (
                Geo {
                    shape: [7, 8, 8],
                    kernel: [3; 3],
                    stride: [2; 3],
                    padding: [0, 1, 1],
                },
                false,
            ),
            // conv_out: (3,1,1) kernel, stride (2,1,1).
            (
                Geo {
                    shape: [5, 6, 7],
                    kernel: [3, 1, 1],
                    stride: [2, 1, 1],
                    padding: [0; 3],
                },
                false,
            ),
            (
                Geo {
                    shape: [6, 5, 7],
                    kernel: [2, 3, 1],
                    stride: [1, 2, 3],
                    padding: [1, 0, 2],
                },
                false,
            ),
        ]
    }

    /// Forward equals the dense f64 convolution at the output sites (submanifold: 'same'
    /// padding read at the input sites; regular: at every reached site), odd channel counts.
    #[test]
    fn sparse_conv_forward_matches_dense_reference() {
        let mut r = rng(11);
        for (g, is_subm) in cases() {
            let (cin, cout) = (3, 5);
            let n = g.shape.iter().product::<usize>() / 5;
            let coords = random_sites(&mut r, g.shape, n);
            let rb = build(&coords, g, is_subm);
            let x = uniform(&mut r, &[n, cin], 1.0);
            let kvol: usize = g.kernel.iter().product();
            let w = uniform(
                &mut r,
                &[cout, g.kernel[0], g.kernel[1], g.kernel[2], cin],
                1.0,
            );
            let b = uniform_vec(&mut r, cout, 1.0);
            assert_eq!(w.len(), cout * kvol * cin);
            let y = forward(&x, &rb, &w, Some(&b)).unwrap();
            let want = naive(
                &coords,
                &to_f64(&x.data),
                cin,
                &to_f64(&w.data),
                Some(&to_f64(&b)),
                cout,
                g,
                rb.out_coords(),
            );
            assert_eq!(y.shape, vec![rb.n_out(), cout]);
            assert_close(&format!("{:?}", g.kernel), &y.data, &want, 1e-5);
            if is_subm {
                assert_eq!(rb.out_coords(), coords.as_slice());
            }
            // Small product groups give the same sums in the same order.
            let small = forward_impl(&x, &rb, &w, Some(&b), 7).unwrap();
            assert_close("grouped", &small.data, &want, 1e-5);
            // Without bias, and through the SparseTensor entry point.
            let st = SparseTensor::new(coords.clone(), x.clone(), g.shape).unwrap();
            let ys = forward_sparse(&st, &rb, &w, None).unwrap();
            ys.validate().unwrap();
            let want0 = naive(
                &coords,
                &to_f64(&x.data),
                cin,
                &to_f64(&w.data),
                None,
                cout,
                g,
                rb.out_coords(),
            );
            assert_close("no bias", &ys.features.data, &want0, 1e-5);
            assert_eq!(ys.shape, rb.out_shape());
        }
    }

    /// Backward against f64 central differences of `sum(gy * naive(x, w, b))`.
    #[test]
    fn sparse_conv_backward_matches_finite_differences() {
        let mut r = rng(12);
        for (g, is_subm) in cases() {
            let (cin, cout) = (3, 5);
            let n = (g.shape.iter().product::<usize>() / 8).min(24);
            let coords = random_sites(&mut r, g.shape, n);
            let rb = build(&coords, g, is_subm);
            let x = uniform(&mut r, &[n, cin], 1.0);
            let w = uniform(
                &mut r,
                &[cout, g.kernel[0], g.kernel[1], g.kernel[2], cin],
                1.0,
            );
            let b = uniform_vec(&mut r, cout, 1.0);
            let gy = uniform_vec(&mut r, rb.n_out() * cout, 1.0);
            let grads = backward(
                &x,
                &rb,
                &w,
                true,
                &Tensor::new(vec![rb.n_out(), cout], gy.clone()).unwrap(),
            )
            .unwrap();
            let (x64, w64, b64) = (to_f64(&x.data), to_f64(&w.data), to_f64(&b));
            let out = rb.out_coords();
            let loss = |x: &[f64], w: &[f64], b: &[f64]| {
                dot(&gy, &naive(&coords, x, cin, w, Some(b), cout, g, out))
            };
            let want_x = fd_grad(&x64, |v| loss(v, &w64, &b64));
            let want_w = fd_grad(&w64, |v| loss(&x64, v, &b64));
            let want_b = fd_grad(&b64, |v| loss(&x64, &w64, v));
            let what = format!("{:?} stride {:?}", g.kernel, g.stride);
            assert_close(&format!("dx {what}"), &grads.input.data, &want_x, 1e-4);
            assert_close(&format!("dw {what}"), &grads.weight.data, &want_w, 1e-4);
            assert_close(
                &format!("db {what}"),
                grads.bias.as_ref().unwrap(),
                &want_b,
                1e-4,
            );
            let small = backward_impl(
                &x,
                &rb,
                &w,
                false,
                &Tensor::new(vec![rb.n_out(), cout], gy.clone()).unwrap(),
                5,
            )
            .unwrap();
            assert_close("dx grouped", &small.input.data, &want_x, 1e-4);
            assert!(small.bias.is_none());
        }
    }

    /// Same inputs, same bits (fixed summation order), on a larger grid with many offsets
    /// per output row.
    #[test]
    fn sparse_conv_is_deterministic() {
        let mut r = rng(13);
        let shape = [10, 40, 40];
        let coords = random_sites(&mut r, shape, 4000);
        let rb = Rulebook::submanifold(&coords, shape, 3).unwrap();
        let x = uniform(&mut r, &[coords.len(), 7], 1.0);
        let w = uniform(&mut r, &[9, 3, 3, 3, 7], 1.0);
        let a = forward(&x, &rb, &w, None).unwrap();
        let b = forward(&x, &rb, &w, None).unwrap();
        assert_eq!(a.data, b.data);
        let gy = uniform(&mut r, &[coords.len(), 9], 1.0);
        let g1 = backward(&x, &rb, &w, true, &gy).unwrap();
        let g2 = backward(&x, &rb, &w, true, &gy).unwrap();
        assert_eq!(g1.input.data, g2.input.data);
        assert_eq!(g1.weight.data, g2.weight.data);
        assert_eq!(g1.bias, g2.bias);
    }

    #[test]
    fn sparse_conv_shape_errors() {
        let shape = [3, 3, 3];
        let coords = vec![[0, 0, 0], [1, 1, 1]];
        let rb = Rulebook::submanifold(&coords, shape, 3).unwrap();
        let x = Tensor::zeros(&[2, 4]);
        let w = Tensor::zeros(&[5, 3, 3, 3, 4]);
        assert!(forward(&x, &rb, &w, None).is_ok());
        let e = |r: Result<Tensor>| r.unwrap_err().to_string();
        assert!(e(forward(&Tensor::zeros(&[3, 4]), &rb, &w, None)).contains("rulebook's input"));
        assert!(e(forward(&Tensor::zeros(&[8]), &rb, &w, None)).contains("input"));
        assert!(
            e(forward(&x, &rb, &Tensor::zeros(&[5, 3, 3, 3, 2]), None))
                .contains("[Cout, 3, 3, 3, 4]")
        );
        assert!(e(forward(&x, &rb, &Tensor::zeros(&[5, 1, 3, 3, 4]), None)).contains("weight"));
        assert!(e(forward(&x, &rb, &Tensor::zeros(&[5, 27, 4]), None)).contains("weight"));
        assert!(e(forward(&x, &rb, &w, Some(&[0.0; 4]))).contains("bias"));
        let bad_gy = Tensor::zeros(&[2, 4]);
        let err = backward(&x, &rb, &w, false, &bad_gy)
            .unwrap_err()
            .to_string();
        assert!(err.contains("grad_out"), "{err}");
        let st = SparseTensor::new(coords, x, [3, 3, 4]).unwrap();
        let err = forward_sparse(&st, &rb, &w, None).unwrap_err().to_string();
        assert!(err.contains("rulebook was built for"), "{err}");
    }
}
