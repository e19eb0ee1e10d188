//! The portable scalar reference: the definition of every INT8 kernel. Plain loops, no
//! blocking (weights read element by element from the packed store, in the layer's
//! logical layout), so that it is obviously the semantics of `quant::scheme`:
//! `acc = sum (x_q - zx) * w_q` (padding reads `zx`, so it contributes nothing), then
//! the epilogue (`Requant::apply(acc, bias_q)` or `dequantize_acc`, see `OutElem`). Integer sums wrap like SIMD adds, so every faster
//! kernel must agree with these bit for bit.

use super::{ConvGeom, OutElem, PackedConv, PackedConvTranspose, PackedLinear, PackedSparseConv};
use crate::sparse::Rulebook;

/// One image `[cin, h, w]` -> `[cout, ho, wo]`.
pub(super) fn conv2d<T: OutElem>(p: &PackedConv, x: &[u8], zx: u8, g: &ConvGeom, out: &mut [T]) {
    let zx = zx as i32;
    let (kh, kw) = (p.kh, p.kw);
    for co in 0..p.cout {
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                let mut acc = 0i32;
                for ci in 0..p.cin {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let iy = (oy * g.sh + ky) as isize - g.ph as isize;
                            let ix = (ox * g.sw + kx) as isize - g.pw as isize;
                            let inside =
                                iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w;
                            let xq = if inside {
                                x[(ci * g.h + iy as usize) * g.w + ix as usize] as i32
                            } else {
                                zx
                            };
                            let wq = p.gemm.at(co, (ci * kh + ky) * kw + kx) as i32;
                            acc = acc.wrapping_add((xq - zx).wrapping_mul(wq));
                        }
                    }
                }
                out[(co * g.ho + oy) * g.wo + ox] = T::reference(&p.epilogue, co, acc, p.bias[co]);
            }
        }
    }
}

/// One image `[cin, h, w]` -> `[cout, ho, wo]`; general kernel, stride and padding
/// (padding crops the full output, PyTorch semantics).
pub(super) fn conv_transpose2d<T: OutElem>(
    p: &PackedConvTranspose,
    x: &[u8],
    zx: u8,
    (h, w): (usize, usize),
    (ho, wo): (usize, usize),
    out: &mut [T],
) {
    let zx = zx as i32;
    let (kh, kw) = (p.kh, p.kw);
    for co in 0..p.cout {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut acc = 0i32;
                // Output (oy, ox) collects input (iy, ix) at tap (ky, kx) when
                // iy * s + ky - pad == oy.
                for ci in 0..p.cin {
                    for ky in 0..kh {
                        let ty = oy as isize + p.padding.0 as isize - ky as isize;
                        if ty < 0 || !(ty as usize).is_multiple_of(p.stride.0) {
                            continue;
                        }
                        let iy = ty as usize / p.stride.0;
                        if iy >= h {
                            continue;
                        }
                        for kx in 0..kw {
                            let tx = ox as isize + p.padding.1 as isize - kx as isize;
                            if tx < 0 || !(tx as usize).is_multiple_of(p.stride.1) {
                                continue;
                            }
                            let ix = tx as usize / p.stride.1;
                            if ix >= w {
                                continue;
                            }
                            let xq = x[(ci * h + iy) * w + ix] as i32;
                            let wq = p.gemm.at((co * kh + ky) * kw + kx, ci) as i32;
                            acc = acc.wrapping_add((xq - zx).wrapping_mul(wq));
                        }
                    }
                }
                out[(co * ho + oy) * wo + ox] = T::reference(&p.epilogue, co, acc, p.bias[co]);
            }
        }
    }
}

/// `[rows, cin] -> [rows, cout]`.
pub(super) fn linear<T: OutElem>(p: &PackedLinear, x: &[u8], zx: u8, rows: usize, out: &mut [T]) {
    let zx = zx as i32;
    for r in 0..rows {
        for co in 0..p.cout {
            let mut acc = 0i32;
            for ci in 0..p.cin {
                let d = x[r * p.cin + ci] as i32 - zx;
                acc = acc.wrapping_add(d.wrapping_mul(p.gemm.at(co, ci) as i32));
            }
            out[r * p.cout + co] = T::reference(&p.epilogue, co, acc, p.bias[co]);
        }
    }
}

/// Sparse conv: output site `o` sums, over the rulebook's pairs `(i, o)` of each kernel
/// offset `t`, `(x[i, ci] - zx) * w[co, t, ci]`; a site without a neighbour at an offset has
/// no pair there (it contributes nothing, like zero-point padding).
pub(super) fn sparse_conv<T: OutElem>(
    p: &PackedSparseConv,
    x: &[u8],
    zx: u8,
    rb: &Rulebook,
    out: &mut [T],
) {
    let zx = zx as i32;
    let mut acc = vec![0i32; rb.n_out() * p.cout];
    for (t, pairs) in rb.pairs().iter().enumerate() {
        for (&i, &o) in pairs.input.iter().zip(&pairs.output) {
            for co in 0..p.cout {
                let a = &mut acc[o as usize * p.cout + co];
                for ci in 0..p.cin {
                    let d = x[i as usize * p.cin + ci] as i32 - zx;
                    *a = a.wrapping_add(d.wrapping_mul(p.weight(co, t, ci) as i32));
                }
            }
        }
    }
    for (k, o) in out.iter_mut().enumerate() {
        let co = k % p.cout;
        *o = T::reference(&p.epilogue, co, acc[k], p.bias[co]);
    }
}
