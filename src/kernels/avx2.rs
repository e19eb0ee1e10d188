//! x86 INT8 GEMM kernels (exact: i16-widened operands and `vpmaddwd` on AVX2, u8 x i8
//! quads and `vpdpbusd` on AVX512-VNNI; i32 accumulators).
//!
//! `out[M, N] = epilogue(W[M, K] * X[K, N])`. The N axis (pixels or rows) is cut into
//! bands of [`BAND`] columns run in parallel with rayon; each band is gathered as u8 into a
//! `[K, BAND]` column buffer (im2col for convolutions, zero-point padded), interleaved
//! into panels of [`NR`] columns (K pairs widened to i16, or K quads of u8, per
//! [`GemmCore`]), then multiplied by every [`MR`]-row
//! block of the packed weights. The micro-kernel keeps an `MR x NR` tile in 12 ymm
//! accumulators; the epilogue adds `bias - zx * wsum`, then requantizes in f32 exactly like
//! `Requant::apply` (RNE conversion, `vroundps` to nearest-even, clamp) and stores u8, or
//! dequantizes exactly like `dequantize_acc` (+ ReLU) and stores f32.
//!
//! Uniform panels: a panel whose `NR` columns are identical has identical outputs. Each
//! worker keeps the last such column and its `M` outputs (per call); a panel equal to it is
//! written from that cache without packing or multiplying. Empty BEV regions are uniform,
//! so sparse maps skip most of their GEMM. Scratch buffers are per worker thread and only
//! grow, so steady-state calls do not allocate.

use super::pack::{GemmWeights, MR};
use super::{ConvGeom, Epilogue, OutElem, PackedSparseConv};
use crate::quant::Requant;
use rayon::prelude::*;
use std::arch::x86_64::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// Columns per micro-kernel tile (two ymm of 8 i32 lanes).
const NR: usize = 16;
/// Columns per parallel band: its packed panels (`K * BAND * 4` bytes) stay in L2.
const BAND: usize = 128;
const PANELS: usize = BAND / NR;

/// The last uniform column a worker computed in call `call`, and its outputs as bits.
#[derive(Default)]
struct UniformCache {
    call: u64,
    valid: bool,
    col: Vec<u8>,
    out: Vec<u32>,
}

#[derive(Default)]
struct Scratch {
    col: Vec<u8>,
    xp: Vec<i32>,
    /// Weights in the core's lanes: one row block (prepared per band), or every block
    /// (prepared once per call, see [`Core::PREP_ONCE`]).
    wb: Vec<i32>,
    /// The call whose weights `wb` holds in full.
    wb_call: u64,
    cache: UniformCache,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Numbers kernel calls, so a worker's cache never outlives the call that filled it.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// Panels seen and panels written from the uniform cache, over the process.
pub(super) static PANELS_SEEN: AtomicU64 = AtomicU64::new(0);
pub(super) static PANELS_REUSED: AtomicU64 = AtomicU64::new(0);

/// An output element the SIMD epilogue writes.
pub(super) trait SimdOut: OutElem {
    /// Epilogue of 8 accumulator lanes of GEMM row `row` into `dst[..8]`.
    ///
    /// # Safety
    /// AVX2 available; `dst` valid for 8 writes; `row < w.m`.
    unsafe fn epi8(acc: __m256i, off: i32, w: &GemmWeights, row: usize, dst: *mut Self);
    fn to_bits(self) -> u32;
    fn from_bits(bits: u32) -> Self;
}

impl SimdOut for u8 {
    #[inline(always)]
    unsafe fn epi8(acc: __m256i, off: i32, w: &GemmWeights, row: usize, dst: *mut u8) {
        if let Epilogue::Requant(r) = &w.epilogue {
            // SAFETY: forwarded from the caller.
            unsafe { epi8_u8(acc, off, &r[row], dst) }
        }
    }
    fn to_bits(self) -> u32 {
        self as u32
    }
    fn from_bits(bits: u32) -> u8 {
        bits as u8
    }
}

impl SimdOut for f32 {
    #[inline(always)]
    unsafe fn epi8(acc: __m256i, off: i32, w: &GemmWeights, row: usize, dst: *mut f32) {
        let relu = matches!(w.epilogue, Epilogue::Dequant { relu: true, .. });
        // SAFETY: forwarded from the caller.
        unsafe { epi8_f32(acc, off, w.deq_scale[row], relu, dst) }
    }
    fn to_bits(self) -> u32 {
        f32::to_bits(self)
    }
    fn from_bits(bits: u32) -> f32 {
        f32::from_bits(bits)
    }
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
struct OutPtr<T> {
    ptr: *mut T,
    len: usize,
}
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: bands write disjoint elements (distinct columns map to distinct outputs in every
// `Store`), and every write is bounds-checked against `len`.
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

impl<T: Copy> OutPtr<T> {
    #[inline]
    fn write(&self, at: usize, v: T) {
        assert!(at < self.len, "int8 kernel store out of bounds");
        // SAFETY: in bounds (asserted); the calling band owns this element.
        unsafe { *self.ptr.add(at) = v };
    }

    #[inline]
    fn read(&self, at: usize) -> T {
        assert!(at < self.len, "int8 kernel read out of bounds");
        // SAFETY: in bounds (asserted); the calling band wrote this element.
        unsafe { *self.ptr.add(at) }
    }
}

/// One image `[cin, h, w]` -> `[cout, ho, wo]`.
///
/// # Safety
/// The CPU must support AVX2; `x` and `out` must have the lengths of `g`.
pub(super) unsafe fn conv2d<T: SimdOut>(
    core: GemmCore,
    w: &GemmWeights,
    x: &[u8],
    zx: u8,
    g: &ConvGeom,
    out: &mut [T],
) {
    let n = g.ho * g.wo;
    let store = Store::Dense { ldc: n };
    let cin = x.len() / (g.h * g.w);
    // SAFETY: forwarded from the caller.
    unsafe {
        drive(core, w, n, out, store, zx, |n0, len, col| {
            im2col_band(x, g, cin, zx, n0, len, col)
        })
    }
}

/// Transposed conv with kernel == stride and no padding: `[cin, h, w] -> [cout, h*s, w*s]`.
///
/// # Safety
/// The CPU must support AVX2; `x` is `[cin, h, w]`, `out` `[cout, h*kh, w*kw]` with
/// `(kh, kw) == stride`.
pub(super) unsafe fn upsample<T: SimdOut>(
    core: GemmCore,
    w: &GemmWeights,
    x: &[u8],
    zx: u8,
    (h, wi): (usize, usize),
    (kh, kw): (usize, usize),
    out: &mut [T],
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
        drive(core, w, hw, out, store, zx, |n0, len, col| {
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
pub(super) unsafe fn linear<T: SimdOut>(
    core: GemmCore,
    w: &GemmWeights,
    x: &[u8],
    zx: u8,
    rows: usize,
    out: &mut [T],
) {
    let cin = x.len().checked_div(rows).unwrap_or(0);
    let store = Store::RowMajor { ldc: w.m };
    // SAFETY: forwarded from the caller.
    unsafe {
        drive(core, w, rows, out, store, zx, |n0, len, col| {
            for (j, r) in x[n0 * cin..(n0 + len) * cin].chunks_exact(cin).enumerate() {
                for (k, &v) in r.iter().enumerate() {
                    col[k * BAND + j] = v;
                }
            }
        })
    }
}

/// Output sites per parallel task of the sparse conv.
const SITES_PER_TASK: usize = 64;

/// The sparse conv's per-call operands, by multiply core.
pub(super) enum SparseOperands<'a> {
    /// AVX2: `[n_in, p.kp]` pairs of centred inputs (`PackedSparseConv::centre`).
    Pairs(&'a [i32]),
    /// VNNI: u8 input quads and regrouped weights (`PackedSparseConv::vnni_operands`).
    Quads(&'a SparseQuads),
}

/// Sparse conv, output-stationary: every output site sums, in registers, its neighbours'
/// input rows times that offset's weights (`vpmaddwd` on centred i16 pairs, or
/// `vpdpbusd` on u8 quads plus the offset's zero-point term; exact i32 either way), up to
/// 64 output channels at a time; missing neighbours are skipped. The epilogue runs on 8
/// channels at a time (`Lanes`), lane for lane the reference's operations.
///
/// # Safety
/// The CPU must support AVX2, and AVX512-VNNI with AVX512VL for `Quads`; the operands
/// were built for this layer and `n_in` input rows, every neighbour index is below `n_in`
/// or `NONE`, and `out` is `[n_out, p.cout]`.
pub(super) unsafe fn sparse_conv<T: LaneOut>(
    p: &PackedSparseConv,
    ops: SparseOperands<'_>,
    nbr: &[u32],
    out: &mut [T],
) {
    let (cout, taps) = (p.cout, p.taps);
    if let SparseOperands::Quads(q) = &ops {
        assert!(q.wq.len() == taps * q.kq * p.cout_pad && q.corr.len() == taps * p.cout_pad);
    }
    out.par_chunks_mut(cout * SITES_PER_TASK)
        .enumerate()
        .for_each(|(task, rows)| {
            let mut acc = vec![0i32; p.cout_pad];
            for (r, row) in rows.chunks_exact_mut(cout).enumerate() {
                let o = task * SITES_PER_TASK + r;
                let nb = &nbr[o * taps..(o + 1) * taps];
                let mut cb = 0;
                while cb < p.cout_pad {
                    let na = ((p.cout_pad - cb) / 8).min(8);
                    // SAFETY: CPU features (caller); indices and lengths as the caller
                    // guarantees.
                    unsafe {
                        match na {
                            1 => site_any::<1>(p, &ops, nb, cb, &mut acc),
                            2 => site_any::<2>(p, &ops, nb, cb, &mut acc),
                            3 => site_any::<3>(p, &ops, nb, cb, &mut acc),
                            4 => site_any::<4>(p, &ops, nb, cb, &mut acc),
                            5 => site_any::<5>(p, &ops, nb, cb, &mut acc),
                            6 => site_any::<6>(p, &ops, nb, cb, &mut acc),
                            7 => site_any::<7>(p, &ops, nb, cb, &mut acc),
                            _ => site_any::<8>(p, &ops, nb, cb, &mut acc),
                        }
                    }
                    cb += na * 8;
                }
                // SAFETY: AVX2 (caller); `acc` holds cout_pad lanes, `row` cout.
                unsafe { store_lanes(&acc, &p.lanes, row) };
            }
        });
}

/// The epilogue of one row's i32 accumulators (`acc`, at least `row.len()` rounded up to 8
/// lanes) into `row`, 8 channels at a time.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_lanes<T: LaneOut>(acc: &[i32], lanes: &Lanes, row: &mut [T]) {
    let cout = row.len();
    assert!(acc.len() >= cout.next_multiple_of(8));
    for c0 in (0..cout).step_by(8) {
        // SAFETY: AVX2; 8 lanes of `acc` at c0 (asserted); full stores stay in the row.
        unsafe {
            let a = _mm256_loadu_si256(acc.as_ptr().add(c0) as *const __m256i);
            if c0 + 8 <= cout {
                T::lanes(a, lanes, c0, row.as_mut_ptr().add(c0));
            } else {
                let mut tail = [T::default(); 8];
                T::lanes(a, lanes, c0, tail.as_mut_ptr());
                row[c0..].copy_from_slice(&tail[..cout - c0]);
            }
        }
    }
}

/// One site's output channels `[cb, cb + 8 * NA)` with the kernel of the operands.
#[inline(always)]
unsafe fn site_any<const NA: usize>(
    p: &PackedSparseConv,
    ops: &SparseOperands<'_>,
    nb: &[u32],
    cb: usize,
    acc: &mut [i32],
) {
    // SAFETY: forwarded from `sparse_conv`.
    unsafe {
        match ops {
            SparseOperands::Pairs(xc) => site::<NA>(p, xc, nb, cb, acc),
            SparseOperands::Quads(q) => site_vnni::<NA>(q, p.cout_pad, nb, cb, acc),
        }
    }
}

/// Output channels `[cb, cb + 8 * NA)` of one site into `acc[cb..]`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn site<const NA: usize>(
    p: &PackedSparseConv,
    xc: &[i32],
    nb: &[u32],
    cb: usize,
    acc: &mut [i32],
) {
    let kp = p.kp;
    let mut a = [_mm256_setzero_si256(); NA];
    for (t, &i) in nb.iter().enumerate() {
        if i == PackedSparseConv::NONE {
            continue;
        }
        let xrow = &xc[i as usize * kp..(i as usize + 1) * kp];
        let wt = &p.wp[t * kp * p.cout_pad * 2..(t + 1) * kp * p.cout_pad * 2];
        for (q, &xv) in xrow.iter().enumerate() {
            let xv = _mm256_set1_epi32(xv);
            let w = &wt[(q * p.cout_pad + cb) * 2..(q * p.cout_pad + cb + NA * 8) * 2];
            for (k, a) in a.iter_mut().enumerate() {
                // SAFETY: `w` holds NA * 16 bytes; 16 read at k * 16.
                let w16 = unsafe {
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(w.as_ptr().add(k * 16) as *const __m128i))
                };
                *a = _mm256_add_epi32(*a, _mm256_madd_epi16(xv, w16));
            }
        }
    }
    for (k, a) in a.iter().enumerate() {
        let dst = &mut acc[cb + k * 8..cb + k * 8 + 8];
        // SAFETY: 8 lanes into an 8-element slice.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, *a) };
    }
}

/// The VNNI sparse conv's operands (`PackedSparseConv::vnni_operands`).
pub(super) struct SparseQuads {
    /// Input-channel quads per row.
    pub kq: usize,
    /// `[n_in, kq]`: u8 input quads (zero padded).
    pub xq: Vec<i32>,
    /// `[taps][kq][cout_pad]`: i8 weight quads.
    pub wq: Vec<i32>,
    /// `[taps][cout_pad]`: `-zx * sum_ci w[co, t, ci]`, wrapping.
    pub corr: Vec<i32>,
}

/// Output channels `[cb, cb + 8 * NA)` of one site into `acc[cb..]`, VNNI.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn site_vnni<const NA: usize>(
    q: &SparseQuads,
    cp: usize,
    nb: &[u32],
    cb: usize,
    acc: &mut [i32],
) {
    let kq = q.kq;
    let mut a = [_mm256_setzero_si256(); NA];
    for (t, &i) in nb.iter().enumerate() {
        if i == PackedSparseConv::NONE {
            continue;
        }
        let corr = &q.corr[t * cp + cb..t * cp + cb + NA * 8];
        for (k, a) in a.iter_mut().enumerate() {
            // SAFETY: `corr` holds NA * 8 lanes; 8 read at k * 8.
            let c = unsafe { _mm256_loadu_si256(corr.as_ptr().add(k * 8) as *const __m256i) };
            *a = _mm256_add_epi32(*a, c);
        }
        let xrow = &q.xq[i as usize * kq..(i as usize + 1) * kq];
        let wt = &q.wq[t * kq * cp..(t + 1) * kq * cp];
        for (g, &xv) in xrow.iter().enumerate() {
            let xv = _mm256_set1_epi32(xv);
            let w = &wt[g * cp + cb..g * cp + cb + NA * 8];
            for (k, a) in a.iter_mut().enumerate() {
                // SAFETY: `w` holds NA * 8 lanes; 8 read at k * 8.
                let wv = unsafe { _mm256_loadu_si256(w.as_ptr().add(k * 8) as *const __m256i) };
                *a = _mm256_dpbusd_epi32(*a, xv, wv);
            }
        }
    }
    for (k, a) in a.iter().enumerate() {
        let dst = &mut acc[cb + k * 8..cb + k * 8 + 8];
        // SAFETY: 8 lanes into an 8-element slice.
        unsafe { _mm256_storeu_si256(dst.as_mut_ptr() as *mut __m256i, *a) };
    }
}

/// Runs the GEMM over `n` columns in parallel bands with the multiply core `core`.
/// `fill(n0, len, col)` writes columns `[n0, n0 + len)` of every K row into
/// `col[k * BAND + j]`, `j < len`.
unsafe fn drive<T: SimdOut>(
    core: GemmCore,
    w: &GemmWeights,
    n: usize,
    out: &mut [T],
    store: Store,
    zx: u8,
    fill: impl Fn(usize, usize, &mut [u8]) + Sync,
) {
    // SAFETY: forwarded from the caller, who checked the core's ISA.
    unsafe {
        match core {
            GemmCore::Madd16 => drive_with::<T, Madd16>(w, n, out, store, zx, fill),
            GemmCore::Vnni => drive_with::<T, Vnni>(w, n, out, store, zx, fill),
        }
    }
}

unsafe fn drive_with<T: SimdOut, C: Core>(
    w: &GemmWeights,
    n: usize,
    out: &mut [T],
    store: Store,
    zx: u8,
    fill: impl Fn(usize, usize, &mut [u8]) + Sync,
) {
    let out = OutPtr {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    let call = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    // K groups: pairs or quads, the last one padded.
    let groups = w.k.div_ceil(C::GROUP);
    (0..n.div_ceil(BAND)).into_par_iter().for_each(|b| {
        let n0 = b * BAND;
        let len = (n - n0).min(BAND);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // GROUP rows per K group (the padding rows hold stale bytes, multiplied by
            // zero weights).
            let col_len = C::GROUP * groups * BAND;
            if s.col.len() < col_len {
                s.col.resize(col_len, 0);
            }
            let xp_len = PANELS * groups * NR;
            if s.xp.len() < xp_len {
                s.xp.resize(xp_len, 0);
            }
            let wb_len = if C::PREP_ONCE {
                w.m.div_ceil(MR) * groups * MR
            } else {
                groups * MR
            };
            if s.wb.len() < wb_len {
                s.wb.resize(wb_len, 0);
            }
            if C::PREP_ONCE && s.wb_call != call {
                for (blk, dst) in s.wb[..wb_len].chunks_exact_mut(groups * MR).enumerate() {
                    C::prep_block(w, blk, dst);
                }
                s.wb_call = call;
            }
            if s.cache.call != call {
                s.cache.call = call;
                s.cache.valid = false;
            }
            fill(n0, len, &mut s.col[..col_len]);
            // SAFETY: the caller guarantees the core's ISA; buffers were sized above.
            unsafe {
                band::<T, C>(
                    w,
                    &s.col[..col_len],
                    &mut s.xp[..xp_len],
                    &mut s.wb[..wb_len],
                    &mut s.cache,
                    n0,
                    len,
                    zx,
                    out,
                    store,
                )
            }
        })
    });
}

/// What a band does with one panel.
#[derive(Clone, Copy, PartialEq)]
enum Panel {
    /// Pack and multiply.
    Compute,
    /// Uniform and equal to the cached column: write the cached outputs.
    Cached,
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
unsafe fn band<T: SimdOut, C: Core>(
    w: &GemmWeights,
    col: &[u8],
    xp: &mut [i32],
    wb: &mut [i32],
    cache: &mut UniformCache,
    n0: usize,
    len: usize,
    zx: u8,
    out: OutPtr<T>,
    store: Store,
) {
    let panels = len.div_ceil(NR);
    let mut kinds = [Panel::Compute; PANELS];
    // The first uniform panel that misses the cache refills it after the GEMM.
    let mut refill = None;
    for (j, kind) in kinds.iter_mut().enumerate().take(panels) {
        let valid = (len - j * NR).min(NR);
        if !uniform(col, w.k, j * NR, valid) {
            continue;
        }
        if cache.valid && (0..w.k).all(|k| col[k * BAND + j * NR] == cache.col[k]) {
            *kind = Panel::Cached;
        } else if refill.is_none() {
            refill = Some(j);
        }
    }
    let reused = kinds[..panels]
        .iter()
        .filter(|k| **k == Panel::Cached)
        .count();
    PANELS_SEEN.fetch_add(panels as u64, Ordering::Relaxed);
    PANELS_REUSED.fetch_add(reused as u64, Ordering::Relaxed);
    let groups = w.k.div_ceil(C::GROUP);
    // SAFETY: AVX2 is enabled here, the core's ISA by the caller; buffer sizes were set
    // by `drive_with`.
    unsafe {
        C::pack_panels(col, groups, &kinds[..panels], xp);
        band_gemm::<T, C>(w, xp, wb, &kinds[..panels], n0, len, zx, out, store);
    }
    for (j, _) in kinds[..panels]
        .iter()
        .enumerate()
        .filter(|(_, k)| **k == Panel::Cached)
    {
        let (c0, valid) = (n0 + j * NR, (len - j * NR).min(NR));
        for (row, &bits) in cache.out.iter().enumerate() {
            let v = T::from_bits(bits);
            match store {
                Store::Dense { .. } => {
                    let at = store.index(row, c0);
                    assert!(at + valid <= out.len, "int8 kernel store out of bounds");
                    // SAFETY: in bounds (asserted); this band owns these columns.
                    unsafe { std::slice::from_raw_parts_mut(out.ptr.add(at), valid) }.fill(v);
                }
                _ => (0..valid).for_each(|c| out.write(store.index(row, c0 + c), v)),
            }
        }
    }
    if let Some(j) = refill {
        let c0 = n0 + j * NR;
        cache.col.clear();
        cache.col.extend((0..w.k).map(|k| col[k * BAND + j * NR]));
        cache.out.clear();
        cache
            .out
            .extend((0..w.m).map(|row| out.read(store.index(row, c0)).to_bits()));
        cache.valid = true;
    }
}

/// Whether columns `[c0, c0 + valid)` of every K row of `col` are equal.
#[target_feature(enable = "avx2")]
fn uniform(col: &[u8], k: usize, c0: usize, valid: usize) -> bool {
    assert!(c0 + NR <= BAND && col.len() >= k * BAND);
    let mask = if valid >= NR {
        0xFFFF
    } else {
        (1u32 << valid) - 1
    };
    (0..k).all(|kk| {
        let at = kk * BAND + c0;
        // SAFETY: `at + 16 <= col.len()` by the assert above.
        let v = unsafe { _mm_loadu_si128(col.as_ptr().add(at) as *const __m128i) };
        let eq = _mm_cmpeq_epi8(v, _mm_set1_epi8(col[at] as i8));
        (_mm_movemask_epi8(eq) as u32) & mask == mask
    })
}

/// Widens and interleaves K-row pairs of `col` into panels (those to compute):
/// `xp[(j * kp + p) * NR + c] = col[2p][16j + c] | col[2p + 1][16j + c] << 16`.
#[target_feature(enable = "avx2")]
unsafe fn pack_panels(col: &[u8], kp: usize, kinds: &[Panel], xp: &mut [i32]) {
    let panels = kinds.len();
    assert!(col.len() >= 2 * kp * BAND && xp.len() >= panels * kp * NR && panels * NR <= BAND);
    let (src, dst) = (col.as_ptr(), xp.as_mut_ptr());
    for p in 0..kp {
        for (j, _) in kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == Panel::Compute)
        {
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

/// `Requant::apply(acc + off, 0)` on 8 lanes, stored as 8 u8 codes at `dst`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn epi8_u8(acc: __m256i, off: i32, r: &Requant, dst: *mut u8) {
    let v = _mm256_add_epi32(acc, _mm256_set1_epi32(off));
    let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(r.multiplier));
    let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
    let f = _mm256_max_ps(f, _mm256_set1_ps((r.lo - r.zero_point) as f32));
    let f = _mm256_min_ps(f, _mm256_set1_ps((r.hi - r.zero_point) as f32));
    let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), _mm256_set1_epi32(r.zero_point));
    // q is within [lo, hi] ⊂ [0, 255]: the saturating packs are plain narrowing.
    let w = _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
    // SAFETY: the caller passes 8 writable bytes.
    unsafe { _mm_storel_epi64(dst as *mut __m128i, _mm_packus_epi16(w, w)) };
}

/// `dequantize_acc(acc + off, 0, ..)` (then ReLU) on 8 lanes, stored as f32 at `dst`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn epi8_f32(acc: __m256i, off: i32, scale: f32, relu: bool, dst: *mut f32) {
    let v = _mm256_add_epi32(acc, _mm256_set1_epi32(off));
    let mut f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale));
    if relu {
        f = _mm256_max_ps(f, _mm256_setzero_ps());
    }
    // SAFETY: the caller passes 8 writable floats.
    unsafe { _mm256_storeu_ps(dst, f) };
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
unsafe fn band_gemm<T: SimdOut, C: Core>(
    w: &GemmWeights,
    xp: &[i32],
    wb: &mut [i32],
    kinds: &[Panel],
    n0: usize,
    len: usize,
    zx: u8,
    out: OutPtr<T>,
    store: Store,
) {
    let panels = kinds.len();
    let groups = w.k.div_ceil(C::GROUP);
    let blk_len = groups * MR;
    assert!(
        xp.len() >= panels * groups * NR
            && w.wp.len() >= w.m.div_ceil(MR) * w.kp * MR * 2
            && wb.len()
                >= if C::PREP_ONCE {
                    w.m.div_ceil(MR) * blk_len
                } else {
                    blk_len
                }
    );
    if !kinds.contains(&Panel::Compute) {
        return;
    }
    for blk in 0..w.m.div_ceil(MR) {
        let wp = if C::PREP_ONCE {
            wb[blk * blk_len..].as_ptr()
        } else {
            C::prep_block(w, blk, &mut wb[..blk_len]);
            wb.as_ptr()
        };
        for (j, _) in kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == Panel::Compute)
        {
            // SAFETY: bounded by the assert above.
            let acc = unsafe { C::tile(wp, xp.as_ptr().add(j * groups * NR), groups) };
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
                    // SAFETY: AVX2 enabled; `row < m`.
                    unsafe { store8(w, out, store, row, n0 + c0, (len - c0).min(8), a, off) };
                }
            }
        }
    }
}

/// Sign-extends a block of i8 weight pairs into i16 pairs (one i32 lane per pair).
#[target_feature(enable = "avx2")]
fn widen_block(src: &[i8], dst: &mut [i32]) {
    assert!(dst.len() * 2 >= src.len());
    let mut i = 0;
    while i + 16 <= src.len() {
        // SAFETY: 16 bytes read at `i` and 8 lanes written at `i / 2`, both in bounds.
        unsafe {
            let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
            let d = dst.as_mut_ptr().add(i / 2) as *mut __m256i;
            _mm256_storeu_si256(d, _mm256_cvtepi8_epi16(v));
        }
        i += 16;
    }
    while i < src.len() {
        let (lo, hi) = (src[i] as i16 as u16 as u32, src[i + 1] as i16 as u16 as u32);
        dst[i / 2] = (lo | (hi << 16)) as i32;
        i += 2;
    }
}

/// The multiply core of the band GEMM, chosen per call: how K is grouped into i32 lanes,
/// packed and multiplied. Both cores give the exact integer sums, so they share the
/// bands, the uniform-panel cache and the epilogues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GemmCore {
    /// AVX2: u8 and i8 widened to i16 pairs, `vpmaddwd`.
    Madd16,
    /// AVX512-VNNI (256-bit, AVX512VL): u8 quads times i8 quads, `vpdpbusd`. Each
    /// u8 x i8 product fits i16 and VNNI sums four of them into i32 without saturation.
    Vnni,
}

/// A multiply core (see [`GemmCore`]).
trait Core {
    /// K elements per i32 lane.
    const GROUP: usize;
    /// Whether a worker prepares every row block once per call (kept in its scratch)
    /// rather than one block per band: for cores whose preparation costs more than
    /// re-reading prepared weights from the cache.
    const PREP_ONCE: bool;
    /// Packs the compute panels of `col` (`GROUP * groups` rows of `BAND` bytes) into
    /// `xp[(j * groups + g) * NR + c]`.
    ///
    /// # Safety
    /// The core's ISA is available.
    unsafe fn pack_panels(col: &[u8], groups: usize, kinds: &[Panel], xp: &mut [i32]);
    /// Row block `blk` of the packed weights in this core's lanes: `dst[g * MR + i]`.
    fn prep_block(w: &GemmWeights, blk: usize, dst: &mut [i32]);
    /// The `MR x NR` tile of one block and one panel over `groups` K groups.
    ///
    /// # Safety
    /// The core's ISA is available; `wp` and `xp` hold `groups * MR` and `groups * NR`.
    unsafe fn tile(wp: *const i32, xp: *const i32, groups: usize) -> [[__m256i; 2]; MR];
}

struct Madd16;

impl Core for Madd16 {
    const GROUP: usize = 2;
    // Widening is one instruction per 16 weights, and the widened matrix is twice the
    // size: per band keeps it in L1.
    const PREP_ONCE: bool = false;
    #[inline(always)]
    unsafe fn pack_panels(col: &[u8], groups: usize, kinds: &[Panel], xp: &mut [i32]) {
        // SAFETY: forwarded.
        unsafe { pack_panels(col, groups, kinds, xp) }
    }
    #[inline(always)]
    fn prep_block(w: &GemmWeights, blk: usize, dst: &mut [i32]) {
        let len = w.kp * MR * 2;
        // SAFETY: AVX2 is checked by every caller of the kernels (`check_isa`).
        unsafe { widen_block(&w.wp[blk * len..(blk + 1) * len], dst) }
    }
    #[inline(always)]
    unsafe fn tile(wp: *const i32, xp: *const i32, groups: usize) -> [[__m256i; 2]; MR] {
        // SAFETY: forwarded.
        unsafe { tile(wp, xp, groups) }
    }
}

struct Vnni;

impl Core for Vnni {
    const GROUP: usize = 4;
    // The byte regrouping cost as much as the multiplications when done per band.
    const PREP_ONCE: bool = true;
    #[inline(always)]
    unsafe fn pack_panels(col: &[u8], groups: usize, kinds: &[Panel], xp: &mut [i32]) {
        // SAFETY: forwarded.
        unsafe { pack_quads(col, groups, kinds, xp) }
    }
    fn prep_block(w: &GemmWeights, blk: usize, dst: &mut [i32]) {
        // Quad g of row i is pairs 2g and 2g + 1 of the pair-packed store (a missing
        // last pair is zero weights).
        let base = blk * w.kp * MR * 2;
        let pair = |p: usize, i: usize| -> [u8; 2] {
            if p < w.kp {
                let e = base + (p * MR + i) * 2;
                [w.wp[e] as u8, w.wp[e + 1] as u8]
            } else {
                [0, 0]
            }
        };
        for (g, lanes) in dst.chunks_exact_mut(MR).enumerate() {
            for (i, lane) in lanes.iter_mut().enumerate() {
                let ([a, b], [c, d]) = (pair(2 * g, i), pair(2 * g + 1, i));
                *lane = i32::from_le_bytes([a, b, c, d]);
            }
        }
    }
    #[inline(always)]
    unsafe fn tile(wp: *const i32, xp: *const i32, groups: usize) -> [[__m256i; 2]; MR] {
        // SAFETY: forwarded.
        unsafe { tile_vnni(wp, xp, groups) }
    }
}

/// Interleaves K-row quads of `col` into panels (those to compute): lane `c` of quad `g`
/// of panel `j` holds bytes `col[4g + r][16j + c]`, `r = 0..4`, lowest first.
#[target_feature(enable = "avx2")]
unsafe fn pack_quads(col: &[u8], groups: usize, kinds: &[Panel], xp: &mut [i32]) {
    let panels = kinds.len();
    assert!(
        col.len() >= 4 * groups * BAND && xp.len() >= panels * groups * NR && panels * NR <= BAND
    );
    let (src, dst) = (col.as_ptr(), xp.as_mut_ptr());
    for g in 0..groups {
        for (j, _) in kinds
            .iter()
            .enumerate()
            .filter(|(_, k)| **k == Panel::Compute)
        {
            // SAFETY: indices bounded by the assert above.
            unsafe {
                let row = |r: usize| {
                    _mm_loadu_si128(src.add((4 * g + r) * BAND + j * NR) as *const __m128i)
                };
                let (a, b, c, e) = (row(0), row(1), row(2), row(3));
                let (ab_lo, ab_hi) = (_mm_unpacklo_epi8(a, b), _mm_unpackhi_epi8(a, b));
                let (ce_lo, ce_hi) = (_mm_unpacklo_epi8(c, e), _mm_unpackhi_epi8(c, e));
                let d = dst.add((j * groups + g) * NR) as *mut __m128i;
                _mm_storeu_si128(d, _mm_unpacklo_epi16(ab_lo, ce_lo));
                _mm_storeu_si128(d.add(1), _mm_unpackhi_epi16(ab_lo, ce_lo));
                _mm_storeu_si128(d.add(2), _mm_unpacklo_epi16(ab_hi, ce_hi));
                _mm_storeu_si128(d.add(3), _mm_unpackhi_epi16(ab_hi, ce_hi));
            }
        }
    }
}

/// The `MR x NR` tile with `vpdpbusd`: per K quad two panel loads, `MR` weight-quad
/// broadcasts and 12 dot products into the i32 accumulators.
#[inline]
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn tile_vnni(wp: *const i32, xp: *const i32, groups: usize) -> [[__m256i; 2]; MR] {
    let mut acc = [[_mm256_setzero_si256(); 2]; MR];
    for g in 0..groups {
        // SAFETY: the caller passes panels/blocks holding `groups` quads.
        unsafe {
            let b0 = _mm256_loadu_si256(xp.add(g * NR) as *const __m256i);
            let b1 = _mm256_loadu_si256(xp.add(g * NR + 8) as *const __m256i);
            let a = wp.add(g * MR);
            for (i, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_epi32(*a.add(i));
                acc[0] = _mm256_dpbusd_epi32(acc[0], b0, wv);
                acc[1] = _mm256_dpbusd_epi32(acc[1], b1, wv);
            }
        }
    }
    acc
}

/// Runs the epilogue on 8 lanes and writes the first `valid` for columns `n..n + valid`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store8<T: SimdOut>(
    w: &GemmWeights,
    out: OutPtr<T>,
    store: Store,
    row: usize,
    n: usize,
    valid: usize,
    acc: __m256i,
    off: i32,
) {
    if let Store::Dense { .. } = store {
        let at = store.index(row, n);
        if valid == 8 && at + 8 <= out.len {
            // SAFETY: in bounds (checked); this band owns these columns.
            unsafe { T::epi8(acc, off, w, row, out.ptr.add(at)) };
            return;
        }
    }
    let mut lanes = [T::default(); 8];
    // SAFETY: 8 elements into an 8-element array.
    unsafe { T::epi8(acc, off, w, row, lanes.as_mut_ptr()) };
    for (t, &v) in lanes[..valid].iter().enumerate() {
        out.write(store.index(row, n + t), v);
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

/// Output channels the direct 3x3 kernel ([`conv3x3_narrow`]) serves: below this, the
/// GEMM's im2col and panel packing cost many times the multiplications themselves.
pub(super) const NARROW_MAX_COUT: usize = 4;
/// Output rows per parallel task of the direct kernel.
const NARROW_ROWS: usize = 8;
/// Output pixels per register block of the direct kernel (two ymm per channel).
const NARROW_COLS: usize = 16;

/// Weight pairs of the direct kernel: `wn[(p * 9 + tap) * cout + c]` holds
/// `w[c, 2p, tap]` and `w[c, 2p + 1, tap]` as an i16 pair (zero past `cin`).
pub(super) fn narrow_weights(w: &[i8], cout: usize, cin: usize) -> Vec<i32> {
    let kp = cin.div_ceil(2);
    let at = |c: usize, ci: usize, t: usize| -> u32 {
        if ci < cin {
            w[(c * cin + ci) * 9 + t] as i16 as u16 as u32
        } else {
            0
        }
    };
    let mut wn = vec![0i32; kp * 9 * cout];
    for p in 0..kp {
        for t in 0..9 {
            for c in 0..cout {
                wn[(p * 9 + t) * cout + c] = (at(c, 2 * p, t) | (at(c, 2 * p + 1, t) << 16)) as i32;
            }
        }
    }
    wn
}

/// Direct 3x3 convolution, stride 1, padding 1, for at most [`NARROW_MAX_COUT`] output
/// channels (the head's last convs): no im2col, no packing. Per task of
/// [`NARROW_ROWS`] output rows, the centred inputs `x - zx` of channel pairs are
/// interleaved as i16 pairs over the rows the task reads (zero in the padding, which is
/// exactly what a padded tap contributes), then every output pixel sums, in registers,
/// `vpmaddwd` of those pairs with the broadcast weight pairs of each tap: the exact
/// `sum (x - zx) * w` of the reference, followed by the GEMM kernels' epilogue with the
/// bias as offset.
///
/// # Safety
/// The CPU must support AVX2; `x` is `[cin, h, w]`, `out` `[cout, h, w]` with
/// `cout <= NARROW_MAX_COUT`, `wn` from [`narrow_weights`] and `gw` the layer's packed
/// weights (for the epilogue).
pub(super) unsafe fn conv3x3_narrow<T: SimdOut>(
    gw: &GemmWeights,
    wn: &[i32],
    x: &[u8],
    zx: u8,
    (cin, h, w): (usize, usize, usize),
    out: &mut [T],
) {
    let cout = gw.m;
    assert!(
        (1..=NARROW_MAX_COUT).contains(&cout)
            && x.len() == cin * h * w
            && out.len() == cout * h * w
            && wn.len() == cin.div_ceil(2) * 9 * cout
    );
    let out = OutPtr {
        ptr: out.as_mut_ptr(),
        len: out.len(),
    };
    (0..h.div_ceil(NARROW_ROWS)).into_par_iter().for_each(|t| {
        let y0 = t * NARROW_ROWS;
        let rows = (h - y0).min(NARROW_ROWS);
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            // SAFETY: AVX2 (caller); shapes asserted above.
            unsafe {
                let pitch = narrow_pairs(x, zx, (cin, h, w), y0, rows, &mut s.xp);
                match cout {
                    1 => narrow_rows::<T, 1>(gw, wn, &s.xp, pitch, (cin, h, w), y0, rows, out),
                    2 => narrow_rows::<T, 2>(gw, wn, &s.xp, pitch, (cin, h, w), y0, rows, out),
                    3 => narrow_rows::<T, 3>(gw, wn, &s.xp, pitch, (cin, h, w), y0, rows, out),
                    _ => narrow_rows::<T, 4>(gw, wn, &s.xp, pitch, (cin, h, w), y0, rows, out),
                }
            }
        })
    });
}

/// The centred input pairs a task reads: `xp[(p * (rows + 2) + r) * pitch + 1 + x]` =
/// `(x[2p, y0 + r - 1, x] - zx) | (x[2p + 1, ..] - zx) << 16` as i16, zero outside the
/// image (and for a missing odd channel). Returns the row pitch.
#[target_feature(enable = "avx2")]
unsafe fn narrow_pairs(
    x: &[u8],
    zx: u8,
    (cin, h, w): (usize, usize, usize),
    y0: usize,
    rows: usize,
    xp: &mut Vec<i32>,
) -> usize {
    // Room for the left pad, the row, the right pad and a full block read past it.
    let pitch = (w + 2).next_multiple_of(NARROW_COLS) + NARROW_COLS;
    let kp = cin.div_ceil(2);
    let len = kp * (rows + 2) * pitch;
    if xp.len() < len {
        xp.resize(len, 0);
    }
    let z = _mm256_set1_epi16(zx as i16);
    for p in 0..kp {
        for r in 0..rows + 2 {
            let dst = &mut xp[(p * (rows + 2) + r) * pitch..][..pitch];
            let iy = (y0 + r).checked_sub(1).filter(|&iy| iy < h);
            let Some(iy) = iy else {
                dst.fill(0);
                continue;
            };
            dst[0] = 0;
            dst[w + 1..].fill(0);
            let a = &x[((2 * p) * h + iy) * w..][..w];
            let b = (2 * p + 1 < cin).then(|| &x[((2 * p + 1) * h + iy) * w..][..w]);
            let mut i = 0;
            while i + 16 <= w {
                // SAFETY: 16 bytes at `i < w - 15` of each row; 16 lanes written at
                // `1 + i <= w - 15` of a row of `pitch >= w + 18` lanes.
                unsafe {
                    let va = _mm256_sub_epi16(
                        _mm256_cvtepu8_epi16(_mm_loadu_si128(a.as_ptr().add(i) as *const __m128i)),
                        z,
                    );
                    let vb = match b {
                        Some(b) => _mm256_sub_epi16(
                            _mm256_cvtepu8_epi16(_mm_loadu_si128(
                                b.as_ptr().add(i) as *const __m128i
                            )),
                            z,
                        ),
                        None => _mm256_setzero_si256(),
                    };
                    let lo = _mm256_unpacklo_epi16(va, vb);
                    let hi = _mm256_unpackhi_epi16(va, vb);
                    let d = dst.as_mut_ptr().add(1 + i) as *mut __m256i;
                    _mm256_storeu_si256(d, _mm256_permute2x128_si256::<0x20>(lo, hi));
                    _mm256_storeu_si256(d.add(1), _mm256_permute2x128_si256::<0x31>(lo, hi));
                }
                i += 16;
            }
            for j in i..w {
                let va = (a[j] as i16 - zx as i16) as u16 as u32;
                let vb = b.map_or(0, |b| (b[j] as i16 - zx as i16) as u16 as u32);
                dst[1 + j] = (va | (vb << 16)) as i32;
            }
        }
    }
    pitch
}

/// Output rows `[y0, y0 + rows)` of every channel from the task's pairs `xp`.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2")]
unsafe fn narrow_rows<T: SimdOut, const NC: usize>(
    gw: &GemmWeights,
    wn: &[i32],
    xp: &[i32],
    pitch: usize,
    (cin, h, w): (usize, usize, usize),
    y0: usize,
    rows: usize,
    out: OutPtr<T>,
) {
    let kp = cin.div_ceil(2);
    assert!(xp.len() >= kp * (rows + 2) * pitch && wn.len() >= kp * 9 * NC);
    for y in 0..rows {
        let mut xb = 0;
        while xb < w {
            let mut acc = [[_mm256_setzero_si256(); 2]; NC];
            for p in 0..kp {
                for ky in 0..3 {
                    let row = (p * (rows + 2) + y + ky) * pitch + xb;
                    for kx in 0..3 {
                        // SAFETY: `row + kx + 16 <= .. + w + 2 + 16 <= ..+ pitch` lanes of
                        // the task's pairs (asserted); weights indexed below `kp * 9 * NC`.
                        unsafe {
                            let src = xp.as_ptr().add(row + kx);
                            let x0 = _mm256_loadu_si256(src as *const __m256i);
                            let x1 = _mm256_loadu_si256(src.add(8) as *const __m256i);
                            let wv = wn.as_ptr().add((p * 9 + ky * 3 + kx) * NC);
                            for (c, acc) in acc.iter_mut().enumerate() {
                                let wc = _mm256_set1_epi32(*wv.add(c));
                                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(x0, wc));
                                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(x1, wc));
                            }
                        }
                    }
                }
            }
            for (c, acc) in acc.iter().enumerate() {
                for (half, &a) in acc.iter().enumerate() {
                    let c0 = xb + 8 * half;
                    if c0 >= w {
                        break;
                    }
                    let valid = (w - c0).min(8);
                    let at = (c * h + y0 + y) * w + c0;
                    // acc is sum (x - zx) w already: the offset is the bias alone.
                    let off = gw.bias[c];
                    // SAFETY: AVX2; `c < m`; full stores are in bounds (checked).
                    unsafe {
                        if valid == 8 && at + 8 <= out.len {
                            T::epi8(a, off, gw, c, out.ptr.add(at));
                        } else {
                            let mut lanes = [T::default(); 8];
                            T::epi8(a, off, gw, c, lanes.as_mut_ptr());
                            for (i, &v) in lanes[..valid].iter().enumerate() {
                                out.write(at + i, v);
                            }
                        }
                    }
                }
            }
            xb += NARROW_COLS;
        }
    }
}

/// Output channels the direct linear kernel keeps in registers (8 ymm accumulators).
pub(super) const LINEAR_DIRECT_MAX_COUT: usize = 64;
/// Rows per parallel task of the direct linear kernel.
const LINEAR_ROWS: usize = 512;

/// A linear layer prepared for [`linear_direct`]: weight pairs by output lane and the
/// epilogue's per-channel parameters as lanes (`m8` = outputs rounded up to 8, padding
/// lanes zero).
#[derive(Debug, Clone)]
pub(super) struct DirectLinear {
    kp: usize,
    m8: usize,
    /// `wl[p * m8 + c]`: `w[c, 2p]` and `w[c, 2p + 1]` as an i16 pair.
    wl: Vec<i32>,
    /// `wq[g * m8 + c]`: `w[c, 4g..4g + 4]` as i8 bytes (the VNNI kernel's quads).
    wq: Vec<i32>,
    /// `sum_k w[c, k]` by output lane (the VNNI kernel folds the zero point with it).
    wsum: Vec<i32>,
    lanes: Lanes,
}

/// An [`Epilogue`] and its bias laid out by output lane (`m8` lanes, zero padded), for
/// kernels whose accumulator vectors hold 8 output channels of one row.
#[derive(Debug, Clone)]
pub(super) struct Lanes {
    bias: Vec<i32>,
    epi: LaneEpilogue,
}

impl Lanes {
    pub(super) fn new(epilogue: &Epilogue, bias: &[i32], cout: usize, m8: usize) -> Lanes {
        let lane = |f: &dyn Fn(usize) -> f32| -> Vec<f32> {
            (0..m8).map(|c| if c < cout { f(c) } else { 0.0 }).collect()
        };
        let epi = match epilogue {
            Epilogue::Requant(r) => LaneEpilogue::Requant {
                mult: lane(&|c| r[c].multiplier),
                lo: lane(&|c| (r[c].lo - r[c].zero_point) as f32),
                hi: lane(&|c| (r[c].hi - r[c].zero_point) as f32),
                zp: (0..m8)
                    .map(|c| if c < cout { r[c].zero_point } else { 0 })
                    .collect(),
            },
            // The product `dequantize_acc` scales by.
            Epilogue::Dequant {
                input_scale,
                weight_scale,
                relu,
            } => LaneEpilogue::Dequant {
                scale: lane(&|c| input_scale * weight_scale[c]),
                relu: *relu,
            },
        };
        let mut bias = bias[..cout.min(bias.len())].to_vec();
        bias.resize(m8, 0);
        Lanes { bias, epi }
    }

    fn bytes(&self) -> usize {
        let m8 = self.bias.len();
        4 * m8
            + match &self.epi {
                LaneEpilogue::Requant { .. } => 16 * m8,
                LaneEpilogue::Dequant { .. } => 4 * m8,
            }
    }
}

/// [`Epilogue`] parameters laid out by output lane.
#[derive(Debug, Clone)]
enum LaneEpilogue {
    /// `Requant`: multiplier, `lo - zp` and `hi - zp` (as f32), `zp`.
    Requant {
        mult: Vec<f32>,
        lo: Vec<f32>,
        hi: Vec<f32>,
        zp: Vec<i32>,
    },
    /// `Dequant`: `s_in * s_w[c]`, then ReLU.
    Dequant { scale: Vec<f32>, relu: bool },
}

impl DirectLinear {
    pub(super) fn new(w: &GemmWeights, weight: &[i8], cout: usize, cin: usize) -> DirectLinear {
        let (kp, m8) = (cin.div_ceil(2), cout.next_multiple_of(8));
        let at = |c: usize, k: usize| -> u32 {
            if c < cout && k < cin {
                weight[c * cin + k] as i16 as u16 as u32
            } else {
                0
            }
        };
        let mut wl = vec![0i32; kp * m8];
        for p in 0..kp {
            for c in 0..m8 {
                wl[p * m8 + c] = (at(c, 2 * p) | (at(c, 2 * p + 1) << 16)) as i32;
            }
        }
        let byte = |c: usize, k: usize| {
            if c < cout && k < cin {
                weight[c * cin + k] as u8
            } else {
                0
            }
        };
        let kq = cin.div_ceil(4);
        let mut wq = vec![0i32; kq * m8];
        for g in 0..kq {
            for c in 0..m8 {
                let b = [0, 1, 2, 3].map(|r| byte(c, 4 * g + r));
                wq[g * m8 + c] = i32::from_le_bytes(b);
            }
        }
        // Wrapping, like the accumulator it corrects.
        let wsum = (0..m8)
            .map(|c| (0..cin).fold(0i32, |s, k| s.wrapping_add(byte(c, k) as i8 as i32)))
            .collect();
        let lanes = Lanes::new(&w.epilogue, &w.bias, cout, m8);
        DirectLinear {
            kp,
            m8,
            wl,
            wq,
            wsum,
            lanes,
        }
    }

    pub(super) fn bytes(&self) -> usize {
        4 * (self.wl.len() + self.wq.len() + self.wsum.len()) + self.lanes.bytes()
    }
}

/// An output element of the direct linear kernel's per-lane epilogue.
pub(super) trait LaneOut: OutElem {
    /// The epilogue of output channels `[c0, c0 + 8)` (accumulators `acc`, centred sums)
    /// into `dst[..8]`: lane by lane the operations of the GEMM epilogue.
    ///
    /// # Safety
    /// AVX2 available; `dst` valid for 8 writes; `c0 + 8 <= ` the lane count.
    unsafe fn lanes(acc: __m256i, d: &Lanes, c0: usize, dst: *mut Self);
}

impl LaneOut for u8 {
    #[inline(always)]
    unsafe fn lanes(acc: __m256i, d: &Lanes, c0: usize, dst: *mut u8) {
        if let LaneEpilogue::Requant { mult, lo, hi, zp } = &d.epi {
            // SAFETY: lanes `[c0, c0 + 8)` of vectors of length m8 (caller); 8 bytes out.
            unsafe {
                let ld = |v: &[f32]| _mm256_loadu_ps(v.as_ptr().add(c0));
                let b = _mm256_loadu_si256(d.bias.as_ptr().add(c0) as *const __m256i);
                let z = _mm256_loadu_si256(zp.as_ptr().add(c0) as *const __m256i);
                let v = _mm256_add_epi32(acc, b);
                let f = _mm256_mul_ps(_mm256_cvtepi32_ps(v), ld(mult));
                let f = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(f);
                let f = _mm256_min_ps(_mm256_max_ps(f, ld(lo)), ld(hi));
                let q = _mm256_add_epi32(_mm256_cvtps_epi32(f), z);
                let w =
                    _mm_packus_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q));
                _mm_storel_epi64(dst as *mut __m128i, _mm_packus_epi16(w, w));
            }
        }
    }
}

impl LaneOut for f32 {
    #[inline(always)]
    unsafe fn lanes(acc: __m256i, d: &Lanes, c0: usize, dst: *mut f32) {
        if let LaneEpilogue::Dequant { scale, relu } = &d.epi {
            // SAFETY: as for u8; 8 floats out.
            unsafe {
                let b = _mm256_loadu_si256(d.bias.as_ptr().add(c0) as *const __m256i);
                let v = _mm256_add_epi32(acc, b);
                let mut f = _mm256_mul_ps(
                    _mm256_cvtepi32_ps(v),
                    _mm256_loadu_ps(scale.as_ptr().add(c0)),
                );
                if *relu {
                    f = _mm256_max_ps(f, _mm256_setzero_ps());
                }
                _mm256_storeu_ps(dst, f);
            }
        }
    }
}

/// Linear `[rows, cin] -> [rows, cout]` with at most [`LINEAR_DIRECT_MAX_COUT`] outputs
/// (the pillar feature net, whose rows are points): each row's centred input pairs (or,
/// with VNNI, its u8 input quads) are broadcast against the weights of 8 outputs per
/// register, all outputs of the row accumulate in registers, and the epilogue writes
/// them contiguously. The GEMM would pack every row and scatter its outputs one by one.
///
/// # Safety
/// The CPU must support AVX2, and AVX512-VNNI with AVX512VL for `GemmCore::Vnni`; `x` is
/// `[rows, cin]`, `out` `[rows, cout]`, `d` built for `cout` outputs and `cin` inputs.
pub(super) unsafe fn linear_direct<T: LaneOut>(
    core: GemmCore,
    d: &DirectLinear,
    x: &[u8],
    zx: u8,
    (rows, cin, cout): (usize, usize, usize),
    out: &mut [T],
) {
    assert!(
        x.len() == rows * cin
            && out.len() == rows * cout
            && d.kp == cin.div_ceil(2)
            && d.wq.len() == cin.div_ceil(4) * d.m8
            && d.m8 == cout.next_multiple_of(8)
            && cout <= LINEAR_DIRECT_MAX_COUT
    );
    // VNNI multiplies raw codes: its accumulators start at `-zx * wsum`.
    let mut corr = [0i32; LINEAR_DIRECT_MAX_COUT];
    for (c, w) in corr.iter_mut().zip(&d.wsum) {
        *c = (zx as i32).wrapping_mul(*w).wrapping_neg();
    }
    out.par_chunks_mut(cout * LINEAR_ROWS)
        .enumerate()
        .for_each(|(t, o)| {
            let x = &x[t * LINEAR_ROWS * cin..];
            // SAFETY: the core's CPU features (caller); shapes asserted above.
            unsafe {
                match d.m8 / 8 {
                    1 => rows_any::<T, 1>(core, d, &corr, x, zx, cin, cout, o),
                    2 => rows_any::<T, 2>(core, d, &corr, x, zx, cin, cout, o),
                    3 => rows_any::<T, 3>(core, d, &corr, x, zx, cin, cout, o),
                    4 => rows_any::<T, 4>(core, d, &corr, x, zx, cin, cout, o),
                    5 => rows_any::<T, 5>(core, d, &corr, x, zx, cin, cout, o),
                    6 => rows_any::<T, 6>(core, d, &corr, x, zx, cin, cout, o),
                    7 => rows_any::<T, 7>(core, d, &corr, x, zx, cin, cout, o),
                    _ => rows_any::<T, 8>(core, d, &corr, x, zx, cin, cout, o),
                }
            }
        });
}

/// The rows of one task with the core's kernel.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn rows_any<T: LaneOut, const NA: usize>(
    core: GemmCore,
    d: &DirectLinear,
    corr: &[i32; LINEAR_DIRECT_MAX_COUT],
    x: &[u8],
    zx: u8,
    cin: usize,
    cout: usize,
    out: &mut [T],
) {
    // SAFETY: forwarded from `linear_direct`.
    unsafe {
        match core {
            GemmCore::Madd16 => linear_rows::<T, NA>(d, x, zx, cin, cout, out),
            GemmCore::Vnni => linear_rows_vnni::<T, NA>(d, corr, x, cin, cout, out),
        }
    }
}

/// The epilogue of one row's accumulators (outputs `8j..8j + 8` in `acc[j]`) into `orow`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_row<T: LaneOut, const NA: usize>(
    acc: &[__m256i; NA],
    d: &DirectLinear,
    cout: usize,
    orow: &mut [T],
) {
    for (j, &a) in acc.iter().enumerate() {
        let c0 = 8 * j;
        // SAFETY: AVX2; `c0 + 8 <= m8`; full stores stay inside the row.
        unsafe {
            if c0 + 8 <= cout {
                T::lanes(a, &d.lanes, c0, orow.as_mut_ptr().add(c0));
            } else {
                let mut lanes = [T::default(); 8];
                T::lanes(a, &d.lanes, c0, lanes.as_mut_ptr());
                orow[c0..].copy_from_slice(&lanes[..cout - c0]);
            }
        }
    }
}

/// The rows of `out` (`[n, cout]`) from the rows of `x` (`[>= n, cin]`).
#[target_feature(enable = "avx2")]
unsafe fn linear_rows<T: LaneOut, const NA: usize>(
    d: &DirectLinear,
    x: &[u8],
    zx: u8,
    cin: usize,
    cout: usize,
    out: &mut [T],
) {
    let (kp, m8) = (d.kp, d.m8);
    assert!(d.wl.len() >= kp * m8 && m8 >= 8 * NA && x.len() >= out.len() / cout * cin);
    let z = zx as i16;
    for (r, orow) in out.chunks_exact_mut(cout).enumerate() {
        let xr = &x[r * cin..(r + 1) * cin];
        let mut acc = [_mm256_setzero_si256(); NA];
        for p in 0..kp {
            let a = (xr[2 * p] as i16 - z) as u16 as u32;
            let b = xr
                .get(2 * p + 1)
                .map_or(0, |&v| (v as i16 - z) as u16 as u32);
            let xv = _mm256_set1_epi32((a | (b << 16)) as i32);
            // SAFETY: `p * m8 + 8 * NA <= kp * m8` lanes of `wl` (asserted).
            let wp = unsafe { d.wl.as_ptr().add(p * m8) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let wv = unsafe { _mm256_loadu_si256(wp.add(8 * j) as *const __m256i) };
                *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(xv, wv));
            }
        }
        // SAFETY: AVX2 (caller); `8 * NA <= m8`.
        unsafe { store_row::<T, NA>(&acc, d, cout, orow) };
    }
}

/// The rows of `out` (`[n, cout]`) from the rows of `x` (`[>= n, cin]`), VNNI: u8 input
/// quads against i8 weight quads, the accumulators started at `corr` (`-zx * wsum`) so they
/// end at the centred sum of the AVX2 kernel.
#[target_feature(enable = "avx2,avx512vnni,avx512vl")]
unsafe fn linear_rows_vnni<T: LaneOut, const NA: usize>(
    d: &DirectLinear,
    corr: &[i32; LINEAR_DIRECT_MAX_COUT],
    x: &[u8],
    cin: usize,
    cout: usize,
    out: &mut [T],
) {
    let (kq, m8) = (cin.div_ceil(4), d.m8);
    assert!(d.wq.len() >= kq * m8 && m8 >= 8 * NA && x.len() >= out.len() / cout * cin);
    let mut init = [_mm256_setzero_si256(); NA];
    for (j, v) in init.iter_mut().enumerate() {
        // SAFETY: `8 * NA <= m8 <= LINEAR_DIRECT_MAX_COUT` lanes of `corr`.
        *v = unsafe { _mm256_loadu_si256(corr.as_ptr().add(8 * j) as *const __m256i) };
    }
    for (r, orow) in out.chunks_exact_mut(cout).enumerate() {
        let xr = &x[r * cin..(r + 1) * cin];
        let mut acc = init;
        for g in 0..kq {
            // The last quad of an input whose width is not a multiple of 4 is padded
            // with zero codes (their weights are zero too).
            let q = match xr.get(4 * g..4 * g + 4) {
                Some(q) => [q[0], q[1], q[2], q[3]],
                None => {
                    let mut q = [0u8; 4];
                    q[..cin - 4 * g].copy_from_slice(&xr[4 * g..]);
                    q
                }
            };
            let xv = _mm256_set1_epi32(i32::from_le_bytes(q));
            // SAFETY: `g * m8 + 8 * NA <= kq * m8` lanes of `wq` (asserted).
            let wp = unsafe { d.wq.as_ptr().add(g * m8) };
            for (j, acc) in acc.iter_mut().enumerate() {
                // SAFETY: as above.
                let wv = unsafe { _mm256_loadu_si256(wp.add(8 * j) as *const __m256i) };
                *acc = _mm256_dpbusd_epi32(*acc, xv, wv);
            }
        }
        // SAFETY: AVX2 (caller); `8 * NA <= m8`.
        unsafe { store_row::<T, NA>(&acc, d, cout, orow) };
    }
}
