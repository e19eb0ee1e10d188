//! AVX2 INT8 GEMM kernels (exact: i16-widened operands, `vpmaddwd`, i32 accumulators).
//!
//! `out[M, N] = requant(W[M, K] * X[K, N])`. The N axis (pixels or rows) is cut into bands
//! of [`BAND`] columns run in parallel with rayon; each band is gathered as u8 into a
//! `[K, BAND]` column buffer (im2col for convolutions, zero-point padded), widened and
//! interleaved into K-pair panels of [`NR`] columns, then multiplied by every [`MR`]-row
//! block of the packed weights. The micro-kernel keeps an `MR x NR` tile in 12 ymm
//! accumulators; the epilogue adds `bias - zx * wsum`, requantizes in f32 exactly like
//! `Requant::apply` (RNE conversion, `vroundps` to nearest-even, clamp) and stores u8.
//! Scratch buffers are per worker thread and only grow, so steady-state calls do not
//! allocate.

use super::ConvGeom;
use super::pack::{GemmWeights, MR};
use crate::quant::Requant;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Columns per micro-kernel tile (two ymm of 8 i32 lanes).
const NR: usize = 16;
/// Columns per parallel band: its packed panels (`K * BAND * 4` bytes) stay in L2.
const BAND: usize = 128;

#[derive(Default)]
struct Scratch {
    col: Vec<u8>,
    xp: Vec<i32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Where output `(row, column)` goes in the output slice.
#[derive(Debug, Clone, Copy)]
enum Store {
    /// `out[row * ldc + n]` (NCHW planes: row = channel, n = pixel).
    Dense { ldc: usize },
    /// `out[n * ldc + row]` (linear: n = input row, row = output feature).
    RowMajor { ldc: usize },
    /// Transposed conv with kernel == stride: row = `(co, ky, kx)`, n = input pixel.
    Upsample {
        kh: usize,
        kw: usize,
        w_in: usize,
        plane_out: usize,
        wo: usize,
    },
}

impl Store {
    #[inline]
    fn index(&self, row: usize, n: usize) -> usize {
        match *self {
            Store::Dense { ldc } => row * ldc + n,
            Store::RowMajor { ldc } => n * ldc + row,
            Store::Upsample {
                kh,
                kw,
                w_in,
                plane_out,
                wo,
            } => {
                let (co, t) = (row / (kh * kw), row % (kh * kw));
                let (iy, ix) = (n / w_in, n % w_in);
                co * plane_out + (iy * kh + t / kw) * wo + ix * kw + t % kw
            }
        }
    }
}

/// The output buffer shared by the bands; each band writes a disjoint set of indices.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut u8,
    len: usize,
}
// SAFETY: bands write disjoint elements (distinct columns map to distinct outputs in every
// `Store`), and every write is bounds-checked against `len`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

/// One image `[cin, h, w]` -> `[cout, ho, wo]`.
///
/// # Safety
/// The CPU must support AVX2; `x` and `out` must have the lengths of `g`.
pub(super) unsafe fn conv2d(w: &GemmWeights, x: &[u8], zx: u8, g: &ConvGeom, out: &mut [u8]) {
    let n = g.ho * g.wo;
    let store = Store::Dense { ldc: n };
    let cin = x.len() / (g.h * g.w);
    // SAFETY: forwarded from the caller.
    unsafe {
        drive(w, n, zx, out, store, |n0, len, col| {
            im2col_band(x, g, cin, zx, n0, len, col)
        })
    }
}

/// Transposed conv with kernel == stride and no padding: `[cin, h, w] -> [cout, h*s, w*s]`.
///
/// # Safety
/// The CPU must support AVX2; `x` is `[cin, h, w]`, `out` `[cout, h*kh, w*kw]` with
/// `(kh, kw) == stride`.
pub(super) unsafe fn upsample(
    w: &GemmWeights,
    x: &[u8],
    zx: u8,
    (h, wi): (usize, usize),
    (kh, kw): (usize, usize),
    out: &mut [u8],
) {
    let hw = h * wi;
    let store = Store::Upsample {
        kh,
        kw,
        w_in: wi,
        plane_out: hw * kh * kw,
        wo: wi * kw,
    };
    let cin = x.len() / hw;
    // SAFETY: forwarded from the caller.
    unsafe {
        drive(w, hw, zx, out, store, |n0, len, col| {
            for ci in 0..cin {
                col[ci * BAND..ci * BAND + len].copy_from_slice(&x[ci * hw + n0..][..len]);
            }
        })
    }
}

/// `[rows, cin] -> [rows, cout]`.
///
/// # Safety
/// The CPU must support AVX2; `x` is `[rows, cin]`, `out` `[rows, m]`.
pub(super) unsafe fn linear(w: &GemmWeights, x: &[u8], zx: u8, rows: usize, out: &mut [u8]) {
    let cin = x.len().checked_div(rows).unwrap_or(0);
    let store = Store::RowMajor { ldc: w.m };
    // SAFETY: forwarded from the caller.
    unsafe {
        drive(w, rows, zx, out, store, |n0, len, col| {
            for (j, r) in x[n0 * cin..(n0 + len) * cin].chunks_exact(cin).enumerate() {
                for (k, &v) in r.iter().enumerate() {
                    col[k * BAND + j] = v;
                }
            }
        })
    }
}

/// Runs the GEMM over `n` columns in parallel bands. `fill(n0, len, col)` writes columns
/// `[n0, n0 + len)` of every K row into `col[k * BAND + j]`, `j < len`.
unsafe fn drive(
    w: &GemmWeights,
    n: usize,
    zx: u8,
    out: &mut [u8],
    store: Store,
    fill: impl Fn(usize, usize, &mut [u8]) + Sync,
) {
    let out = OutPtr {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    (0..n.div_ceil(BAND)).into_par_iter().for_each(|b| {
        let n0 = b * BAND;
        let len = (n - n0).min(BAND);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // Two rows per K pair (odd K reads one stale row, multiplied by zero weights).
            let col_len = 2 * w.kp * BAND;
            if s.col.len() < col_len {
                s.col.resize(col_len, 0);
            }
            let xp_len = BAND / NR * w.kp * NR;
            if s.xp.len() < xp_len {
                s.xp.resize(xp_len, 0);
            }
            fill(n0, len, &mut s.col[..col_len]);
            let panels = len.div_ceil(NR);
            // SAFETY: the caller guarantees AVX2; buffers were sized above.
            unsafe {
                pack_panels(&s.col[..col_len], w.kp, panels, &mut s.xp[..xp_len]);
                band_gemm(w, &s.xp[..xp_len], n0, len, zx, out, store);
            }
        })
    });
}

/// Widens and interleaves K-row pairs of `col` into panels:
/// `xp[(j * kp + p) * NR + c] = col[2p][16j + c] | col[2p + 1][16j + c] << 16`.
#[target_feature(enable = "avx2")]
unsafe fn pack_panels(col: &[u8], kp: usize, panels: usize, xp: &mut [i32]) {
    assert!(col.len() >= 2 * kp * BAND && xp.len() >= panels * kp * NR && panels * NR <= BAND);
    let (src, dst) = (col.as_ptr(), xp.as_mut_ptr());
    for p in 0..kp {
        for j in 0..panels {
            // SAFETY: indices bounded by the assert above.
            unsafe {
                let a = _mm_loadu_si128(src.add(2 * p * BAND + j * NR) as *const __m128i);
                let b = _mm_loadu_si128(src.add((2 * p + 1) * BAND + j * NR) as *const __m128i);
                let d = dst.add((j * kp + p) * NR);
                let lo = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(a, b));
                let hi = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(a, b));
                _mm256_storeu_si256(d as *mut __m256i, lo);
                _mm256_storeu_si256(d.add(8) as *mut __m256i, hi);
            }
        }
    }
}

/// The `MR x NR` tile `W[block rows, :] * X[:, panel]`: 12 accumulators, per K pair two
/// panel loads and `MR` weight-pair broadcasts.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn tile(wp: *const i32, xp: *const i32, kp: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for p in 0..kp {
        // SAFETY: the caller passes panels/blocks holding kp pairs.
        unsafe {
            let b0 = _mm256_loadu_si256(xp.add(p * NR) as *const __m256i);
            let b1 = _mm256_loadu_si256(xp.add(p * NR + 8) as *const __m256i);
            let a = wp.add(p * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_epi32(*a.add(i));
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(b0, wv));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(b1, wv));
            }
        }
    }
    acc
}

/// `Requant::apply(acc + off, 0)` on 8 lanes; the codes land in the low 8 bytes.
#[inline]
#[target_feature(enable = "avx2")]
fn requant8(acc: __m256i, off: i32, r: &Requant) -> __m128i {
    let v = _mm256_add_epi32(acc, _mm256_set1_epi32(off));
    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(r.multiplier));
    let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
    let f = _mm256_max_ps(f, _mm256_set1_ps((r.lo - r.zero_point) as f32));
    let f = _mm256_min_ps(f, _mm256_set1_ps((r.hi - r.zero_point) as f32));
    let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(r.zero_point));
    // q is within [lo, hi] ⊂ [0, 255]: the saturating packs are plain narrowing.
    let w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    _mm_packus_epi16(w, w)
}

#[target_feature(enable = "avx2")]
unsafe fn band_gemm(
    w: &GemmWeights,
    xp: &[i32],
    n0: usize,
    len: usize,
    zx: u8,
    out: OutPtr,
    store: Store,
) {
    let panels = len.div_ceil(NR);
    assert!(xp.len() >= panels * w.kp * NR && w.wp.len() >= w.m.div_ceil(MR) * w.kp * MR);
    for blk in 0..w.m.div_ceil(MR) {
        // SAFETY: bounded by the assert above.
        let wp = unsafe { w.wp.as_ptr().add(blk * w.kp * MR) };
        for j in 0..panels {
            // SAFETY: bounded by the assert above.
            let acc = unsafe { tile(wp, xp.as_ptr().add(j * w.kp * NR), w.kp) };
            for (i, acc) in acc.iter().enumerate() {
                let row = blk * MR + i;
                if row >= w.m {
                    break;
                }
                // sum (x - zx) w + bias = sum x w + (bias - zx * wsum), all mod 2^32.
                let off = w.bias[row].wrapping_sub((zx as i32).wrapping_mul(w.wsum[row]));
                for (h, &a) in acc.iter().enumerate() {
                    let c0 = j * NR + h * 8;
                    if c0 >= len {
                        break;
                    }
                    let codes = requant8(a, off, &w.requant[row]);
                    store8(out, store, row, n0 + c0, (len - c0).min(8), codes);
                }
            }
        }
    }
}

/// Writes the first `valid` codes of `codes` for columns `n..n + valid` of `row`.
#[inline]
#[target_feature(enable = "avx2")]
fn store8(out: OutPtr, store: Store, row: usize, n: usize, valid: usize, codes: __m128i) {
    if let Store::Dense { .. } = store {
        let at = store.index(row, n);
        if valid == 8 && at + 8 <= out.len {
            // SAFETY: in bounds (checked); this band owns these columns.
            unsafe { _mm_storel_epi64(out.ptr.add(at) as *mut __m128i, codes) };
            return;
        }
    }
    let mut bytes = [0u8; 16];
    // SAFETY: 16 bytes into a 16-byte array.
    unsafe { _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, codes) };
    for (t, &b) in bytes[..valid].iter().enumerate() {
        let at = store.index(row, n + t);
        assert!(at < out.len, "int8 kernel store out of bounds");
        // SAFETY: in bounds (asserted); this band owns this column.
        unsafe { *out.ptr.add(at) = b };
    }
}

/// u8 im2col of output pixels `[n0, n0 + len)`: row `(ci * kh + ky) * kw + kx` of `col`
/// (stride `BAND`) gets the input under that tap, or `zx` in the padding.
fn im2col_band(x: &[u8], g: &ConvGeom, cin: usize, zx: u8, n0: usize, len: usize, col: &mut [u8]) {
    let plane = g.h * g.w;
    for ci in 0..cin {
        let img = &x[ci * plane..(ci + 1) * plane];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = (ci * g.kh + ky) * g.kw + kx;
                let dst = &mut col[row * BAND..row * BAND + len];
                // Output columns whose tap lands inside the image: [ox_lo, ox_hi).
                let ox_lo = if g.pw > kx {
                    (g.pw - kx).div_ceil(g.sw)
                } else {
                    0
                };
                let ox_hi = if g.w + g.pw > kx {
                    ((g.w + g.pw - kx - 1) / g.sw + 1).min(g.wo)
                } else {
                    0
                };
                let (mut j, mut n) = (0, n0);
                while j < len {
                    let (oy, ox0) = (n / g.wo, n % g.wo);
                    let cnt = (g.wo - ox0).min(len - j);
                    let seg = &mut dst[j..j + cnt];
                    let iy = (oy * g.sh + ky).checked_sub(g.ph).filter(|&iy| iy < g.h);
                    match iy {
                        None => seg.fill(zx),
                        Some(iy) => {
                            let src = &img[iy * g.w..(iy + 1) * g.w];
                            let a = ox_lo.clamp(ox0, ox0 + cnt);
                            let b = ox_hi.clamp(a, ox0 + cnt);
                            seg[..a - ox0].fill(zx);
                            seg[b - ox0..].fill(zx);
                            let first = a * g.sw + kx - g.pw;
                            if g.sw == 1 {
                                seg[a - ox0..b - ox0].copy_from_slice(&src[first..first + b - a]);
                            } else {
                                for (t, d) in seg[a - ox0..b - ox0].iter_mut().enumerate() {
                                    *d = src[first + t * g.sw];
                                }
                            }
                        }
                    }
                    j += cnt;
                    n += cnt;
                }
            }
        }
    }
}
