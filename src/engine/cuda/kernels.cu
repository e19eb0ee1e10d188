// Device kernels of the CUDA engine, compiled at run time with NVRTC (no CUDA headers:
// f16 conversion and dp4a are inline PTX). The integer kernels implement quant::scheme's
// semantics exactly: round-half-to-even (rintf), f32 products rounded once (__fmul_rn),
// clamping before the zero point is added, i32 sums that wrap.
//
// Layout conventions (see engine/cuda/mod.rs): values are NCHW (batch 1) or, before the
// scatter, channels-last rows; float GEMM operands are "k-major" (col[k * ldp + p]) so
// cuBLAS runs them untransposed; int8 operands are "pixel-major" (col[p * kpad + k], kpad a
// multiple of 4) for cuBLAS's TN int8 GEMM.

typedef unsigned char u8;
typedef signed char s8;
typedef unsigned short f16raw;

// Element counts are below 2^31 (checked on the host), so indices are 32-bit: 64-bit
// division, which the index arithmetic needs, costs several times more on the GPU.
#define GRID_STRIDE(i, n) \
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < (int)(n); \
         i += gridDim.x * blockDim.x)

__device__ __forceinline__ f16raw to_half(float f) {
    f16raw h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

__device__ __forceinline__ int dp4a(int a, int b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}

// ---- conversions ----------------------------------------------------------------------

extern "C" __global__ void cast_f16(const float* x, long long n, f16raw* y) {
    GRID_STRIDE(i, n) { y[i] = to_half(x[i]); }
}

// real = scale * (q - zp), as QParams::dequantize.
extern "C" __global__ void dequant_u8(const u8* x, long long n, float scale, int zp, float* y) {
    GRID_STRIDE(i, n) { y[i] = __fmul_rn(scale, (float)((int)x[i] - zp)); }
}

// The network input with per-feature scales (QuantModel::input_scales): entry i is
// feature i % width.
extern "C" __global__ void dequant_u8_pf(const u8* x, long long n, const float* scales,
                                         int width, int zp, float* y) {
    GRID_STRIDE(i, n) { y[i] = __fmul_rn(scales[i % width], (float)((int)x[i] - zp)); }
}

// QParams::quantize: round(x / scale) half-to-even, NaN -> 0, clamped, plus the zero point.
extern "C" __global__ void quant_f32(const float* x, long long n, float scale, int zp,
                                     int qmin, int qmax, u8* y) {
    GRID_STRIDE(i, n) {
        float q = rintf(__fdiv_rn(x[i], scale));
        if (q != q) q = 0.0f;
        q = fminf(fmaxf(q, (float)(qmin - zp)), (float)(qmax - zp));
        y[i] = (u8)((int)q + zp);
    }
}

// The network input with per-feature scales (QuantModel::input_scales): entry i is feature
// i % width, each quantized as quant_f32.
extern "C" __global__ void quant_f32_pf(const float* x, long long n, const float* scales,
                                        int width, int zp, int qmin, int qmax, u8* y) {
    GRID_STRIDE(i, n) {
        float q = rintf(__fdiv_rn(x[i], scales[i % width]));
        if (q != q) q = 0.0f;
        q = fminf(fmaxf(q, (float)(qmin - zp)), (float)(qmax - zp));
        y[i] = (u8)((int)q + zp);
    }
}

extern "C" __global__ void fill_f32(float* y, long long n, float v) {
    GRID_STRIDE(i, n) { y[i] = v; }
}

// ---- im2col ---------------------------------------------------------------------------

// Float, k-major: col[k * plane + p], k = (ci * kk + ky) * kk + kx, p = oy * wo + ox. Grid
// (x: runs of 4 * blockDim output columns, y: oy, z: k), so no thread divides per element:
// k's tap and the row come from the block, and each thread writes four columns.
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <>
__device__ __forceinline__ f16raw from_f32<f16raw>(float v) { return to_half(v); }

template <typename T>
__device__ __forceinline__ void im2col_float_t(const float* x, int c, int h, int w, int kk,
                                               int stride, int pad, int ho, int wo, T* col) {
    int oy = blockIdx.y, k = blockIdx.z;
    int ci = k / (kk * kk), r = k - ci * kk * kk, ky = r / kk, kx = r - ky * kk;
    int iy = oy * stride - pad + ky;
    bool row_in = iy >= 0 && iy < h;
    const float* xr = x + ((long long)ci * h + iy) * w;
    T* out = col + (long long)k * ho * wo + (long long)oy * wo;
    int ox = blockIdx.x * 4 * blockDim.x + threadIdx.x;
#pragma unroll
    for (int q = 0; q < 4; ++q, ox += blockDim.x) {
        if (ox >= wo) break;
        int ix = ox * stride - pad + kx;
        float v = (row_in && ix >= 0 && ix < w) ? xr[ix] : 0.0f;
        out[ox] = from_f32<T>(v);
    }
}

extern "C" __global__ void im2col_f32(const float* x, int c, int h, int w, int kk, int stride,
                                      int pad, int ho, int wo, float* col) {
    im2col_float_t<float>(x, c, h, w, kk, stride, pad, ho, wo, col);
}

extern "C" __global__ void im2col_f16(const float* x, int c, int h, int w, int kk, int stride,
                                      int pad, int ho, int wo, f16raw* col) {
    im2col_float_t<f16raw>(x, c, h, w, kk, stride, pad, ho, wo, col);
}

// Int8, pixel-major: col[p * kpad + k] = code - 128 (padding: the zero point, also - 128;
// k >= c * kk * kk: 0). Shifting by 128 makes u8 codes signed for the s8 x s8 GEMM; the
// epilogue adds (128 - zx) * sum(w) back. `zxc`, when not null, gives each input channel
// its own zero point (inputs stacked from values with different parameters). Each thread
// writes one 4-byte word (kpad is a multiple of 4).
extern "C" __global__ void im2col_s8(const u8* x, int c, int h, int w, int kk, int stride,
                                     int pad, int ho, int wo, int kpad, int zx, const int* zxc,
                                     s8* col) {
    int plane = ho * wo;
    int q4 = kpad >> 2;
    int kreal = c * kk * kk, k2 = kk * kk;
    GRID_STRIDE(i, (long long)plane * q4) {
        int p = i / q4, k0 = (i - p * q4) << 2;
        int oy = p / wo, ox = p - oy * wo;
        int iy0 = oy * stride - pad, ix0 = ox * stride - pad;
        int ci = k0 / k2, r = k0 - ci * k2, ky = r / kk, kx = r - ky * kk;
        unsigned word = 0;
#pragma unroll
        for (int b = 0; b < 4; ++b) {
            int v = 0;
            if (k0 + b < kreal) {
                int iy = iy0 + ky, ix = ix0 + kx;
                int code = zxc ? zxc[ci] : zx;
                if (iy >= 0 && iy < h && ix >= 0 && ix < w)
                    code = x[((long long)ci * h + iy) * w + ix];
                v = code - 128;
            }
            word |= ((unsigned)v & 0xffu) << (8 * b);
            if (++kx == kk) {
                kx = 0;
                if (++ky == kk) {
                    ky = 0;
                    ++ci;
                }
            }
        }
        ((unsigned*)col)[i] = word;
    }
}

// The same im2col through a shared-memory tile of `tp` output pixels. A per-block table
// gives each k its input offset, tap and padding code, so the gather has no division;
// consecutive threads take consecutive pixels of one k (coalesced reads along each input
// row, where the one-word-per-thread kernel reads bytes of distant channel planes); the
// tile is then written out as whole words. Shared memory: koff[kpad], kinfo[kpad], then
// the tile, its rows padded by one word so the byte stores spread over the banks.
extern "C" __global__ void im2col_s8_tile(const u8* x, int c, int h, int w, int kk, int stride,
                                          int pad, int ho, int wo, int kpad, int zx,
                                          const int* zxc, int tp, s8* col) {
    extern __shared__ int smem_i[];
    int* koff = smem_i;
    int* kinfo = smem_i + kpad;
    u8* tile = (u8*)(smem_i + 2 * kpad);
    unsigned* tile_words = (unsigned*)tile;
    int plane = ho * wo;
    int p0 = blockIdx.x * tp;
    if (p0 >= plane) return;
    int np = min(tp, plane - p0);
    int k2 = kk * kk, kreal = c * k2;
    for (int k = threadIdx.x; k < kpad; k += blockDim.x) {
        if (k < kreal) {
            int ci = k / k2, r = k - ci * k2, ky = r / kk, kx = r - ky * kk;
            int zc = zxc ? zxc[ci] : zx;
            koff[k] = (ci * h + ky) * w + kx;
            kinfo[k] = ky | (kx << 8) | ((zc & 0xff) << 16);
        } else {
            koff[k] = 0;
            kinfo[k] = -1;
        }
    }
    __syncthreads();
    int row = kpad + 4;
    int groups = blockDim.x / np;
    int pl = threadIdx.x % np, g = threadIdx.x / np;
    if (g < groups) {
        int p = p0 + pl;
        int oy = p / wo, ox = p - oy * wo;
        int iy0 = oy * stride - pad, ix0 = ox * stride - pad;
        int base = iy0 * w + ix0;
        u8* trow = tile + pl * row;
        for (int k = g; k < kpad; k += groups) {
            int info = kinfo[k];
            int v = 0;
            if (info >= 0) {
                int iy = iy0 + (info & 0xff), ix = ix0 + ((info >> 8) & 0xff);
                int code = (iy >= 0 && iy < h && ix >= 0 && ix < w) ? (int)x[base + koff[k]]
                                                                     : (info >> 16) & 0xff;
                v = code - 128;
            }
            trow[k] = (u8)v;
        }
    }
    __syncthreads();
    int q4 = kpad >> 2, r4 = row >> 2;
    unsigned* out = (unsigned*)(col + (long long)p0 * kpad);
    int warps = blockDim.x >> 5, lane = threadIdx.x & 31;
    for (int q = threadIdx.x >> 5; q < np; q += warps)
        for (int wi = lane; wi < q4; wi += 32) out[q * q4 + wi] = tile_words[q * r4 + wi];
}

// NCHW codes [c, hw] -> channels-last [hw, c], each byte XORed with `mask` (0x80 gives the
// code - 128 of the s8 GEMM), through 32 x 32 shared-memory tiles: a block (256 threads)
// moves four tiles along the pixels (grid x: runs of 128 pixels, y: runs of 32 channels).
extern "C" __global__ void nchw_to_nhwc_u8(const u8* x, int c, int hw, int mask, u8* y) {
    __shared__ u8 t[32][33];
    int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    int c0 = blockIdx.y * 32;
    for (int sub = 0; sub < 4; ++sub) {
        int p0 = blockIdx.x * 128 + sub * 32;
        if (p0 >= hw) break;
        for (int r = ty; r < 32; r += 8) {
            int ci = c0 + r, p = p0 + tx;
            if (ci < c && p < hw) t[r][tx] = x[(long long)ci * hw + p];
        }
        __syncthreads();
        for (int r = ty; r < 32; r += 8) {
            int p = p0 + r, ci = c0 + tx;
            if (ci < c && p < hw) y[(long long)p * c + ci] = (u8)(t[tx][r] ^ mask);
        }
        __syncthreads();
    }
}

// Int8 im2col from channels-last codes (c a multiple of 4, cw = c / 4 words per pixel),
// tap-major: col word [p * kq + tap * cw + w] (kq = kk * kk * cw), shifted by 128; padding
// taps get `padw` (the zero point - 128 in every byte). One block per output pixel: whole
// words, read and written contiguously. Weights are laid out to match (tap, ci).
extern "C" __global__ void im2col_nhwc_s8(const unsigned* x, int cw, int h, int w, int kk,
                                          int stride, int pad, int ho, int wo, unsigned padw,
                                          unsigned* col) {
    int p = blockIdx.x;
    int oy = p / wo, ox = p - oy * wo;
    int kq = kk * kk * cw;
    unsigned* out = col + (long long)p * kq;
    for (int j = threadIdx.x; j < kq; j += blockDim.x) {
        int tap = j / cw, wd = j - tap * cw;
        int ky = tap / kk, kx = tap - ky * kk;
        int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        unsigned v = padw;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w)
            v = x[((long long)iy * w + ix) * cw + wd] ^ 0x80808080u;
        out[j] = v;
    }
}

// Channels-last rows [r, cin] of codes -> [r, kpad] shifted by 128 (the int8 linear's B).
extern "C" __global__ void rows_s8(const u8* x, long long r, int cin, int kpad, s8* y) {
    GRID_STRIDE(i, r * kpad) {
        int k = i % kpad;
        int row = i / kpad;
        y[i] = k < cin ? (s8)((int)x[(long long)row * cin + k] - 128) : (s8)0;
    }
}

// ---- int8 GEMM fallback ---------------------------------------------------------------

// c[j * ldc + i] = sum_k a[i * lda + k] * b[j * ldb + k] (cuBLAS's TN int8 GEMM), used
// when cuBLAS refuses a shape. k, lda, ldb are multiples of 4; a, b 4-byte aligned.
extern "C" __global__ void gemm_s8_tn(const s8* a, const s8* b, int m, int n, int k, int lda,
                                      int ldb, int* c, int ldc) {
    GRID_STRIDE(t, (long long)m * n) {
        int i = t % m, j = t / m;
        const int* ar = (const int*)(a + (long long)i * lda);
        const int* br = (const int*)(b + (long long)j * ldb);
        int s = 0;
        for (int q = 0; q < k / 4; ++q) s = dp4a(ar[q], br[q], s);
        c[(long long)j * ldc + i] = s;
    }
}

// ---- epilogues ------------------------------------------------------------------------

// Where output element o reads its accumulator, and the accumulator column (the GEMM
// output channel) it belongs to.
//   mode 0, linear rows:   o = r * cout + ch,     acc[r * ldc + ch]
//   mode 1, conv NCHW:      o = ch * plane + p,    acc[ch * ldc + p]
//   mode 2, transposed conv (kernel == stride = s), output plane ho x wo:
//                          acc[((ch * s + ky) * s + kx) * ldc + y * (wo / s) + x]
__device__ __forceinline__ void locate(int mode, int o, int cout, long long plane,
                                       int wo, int s, long long ldc, int* ch, int* col,
                                       long long* a) {
    if (mode == 0) {
        int r = o / cout;
        int c = o % cout;
        *ch = c; *col = c; *a = (long long)r * ldc + c;
    } else if (mode == 1) {
        int c = o / (int)plane;
        int p = o % (int)plane;
        *ch = c; *col = c; *a = (long long)c * ldc + p;
    } else {
        int c = o / (int)plane;
        int q = o % (int)plane;
        int oy = q / wo, ox = q % wo, win = wo / s;
        int y = oy / s, ky = oy % s, x = ox / s, kx = ox % s;
        int j = (c * s + ky) * s + kx;
        *ch = c; *col = j; *a = (long long)j * ldc + (long long)y * win + x;
    }
}

extern "C" __global__ void epi_f32(const float* acc, const float* bias, int relu, int mode,
                                   long long n, int cout, long long plane, int wo, int s,
                                   long long ldc, float* y) {
    GRID_STRIDE(o, n) {
        int ch, col;
        long long a;
        locate(mode, o, cout, plane, wo, s, ldc, &ch, &col, &a);
        float v = acc[a] + bias[ch];
        if (relu) v = fmaxf(v, 0.0f);
        y[o] = v;
    }
}

// The zero-point-corrected accumulator plus the quantized bias, wrapping like the CPU.
__device__ __forceinline__ int int_acc(const int* acc, long long a, const int* wsum, int col,
                                       int corr, const int* bias_q, int ch) {
    unsigned v = (unsigned)acc[a] + (unsigned)corr * (unsigned)wsum[col] + (unsigned)bias_q[ch];
    return (int)v;
}

// Requant::apply per output channel.
extern "C" __global__ void epi_requant(const int* acc, const int* wsum, int corr,
                                       const int* bias_q, const float* mult, int zp, int lo,
                                       int hi, int mode, long long n, int cout,
                                       long long plane, int wo, int s, long long ldc, u8* y) {
    GRID_STRIDE(o, n) {
        int ch, col;
        long long a;
        locate(mode, o, cout, plane, wo, s, ldc, &ch, &col, &a);
        int v = int_acc(acc, a, wsum, col, corr, bias_q, ch);
        float f = rintf(__fmul_rn((float)v, mult[ch]));
        f = fminf(fmaxf(f, (float)(lo - zp)), (float)(hi - zp));
        y[o] = (u8)((int)f + zp);
    }
}

// dequantize_acc with scale[ch] = s_in * s_w[ch] (computed on the host in f32), then ReLU.
extern "C" __global__ void epi_dequant(const int* acc, const int* wsum, int corr,
                                       const int* bias_q, const float* scale, int relu, int mode,
                                       long long n, int cout, long long plane, int wo, int s,
                                       long long ldc, float* y) {
    GRID_STRIDE(o, n) {
        int ch, col;
        long long a;
        locate(mode, o, cout, plane, wo, s, ldc, &ch, &col, &a);
        int v = int_acc(acc, a, wsum, col, corr, bias_q, ch);
        float f = __fmul_rn((float)v, scale[ch]);
        if (relu) f = fmaxf(f, 0.0f);
        y[o] = f;
    }
}

// Four accumulators plus `add` (the zero-point correction and bias, wrapping), requantized
// (Requant::apply) into four packed codes, or dequantized (with ReLU) into four reals.
__device__ __forceinline__ unsigned requant4(int4 a, unsigned add, float m, int zp, int lo,
                                             int hi) {
    float flo = (float)(lo - zp), fhi = (float)(hi - zp);
    int v[4] = {a.x, a.y, a.z, a.w};
    unsigned out = 0;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        int s = (int)((unsigned)v[q] + add);
        float f = rintf(__fmul_rn((float)s, m));
        f = fminf(fmaxf(f, flo), fhi);
        out |= ((unsigned)((int)f + zp) & 0xffu) << (8 * q);
    }
    return out;
}

__device__ __forceinline__ float4 dequant4(int4 a, unsigned add, float scale, int relu) {
    int v[4] = {a.x, a.y, a.z, a.w};
    float r[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        float f = __fmul_rn((float)(int)((unsigned)v[q] + add), scale);
        if (relu) f = fmaxf(f, 0.0f);
        r[q] = f;
    }
    return make_float4(r[0], r[1], r[2], r[3]);
}

// Mode 1 (convolution, NCHW) four pixels per thread: 16-byte accumulator loads, one store
// per four outputs, the channel's parameters read once. Grid (x: runs of 4 * blockDim
// pixels, y: channel); needs plane and ldc multiples of 4 (checked on the host).
extern "C" __global__ void epi_requant4(const int* acc, const int* wsum, int corr,
                                        const int* bias_q, const float* mult, int zp, int lo,
                                        int hi, int plane, long long ldc, u8* y) {
    int ch = blockIdx.y;
    int p = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (p >= plane) return;
    int4 a = *(const int4*)(acc + (long long)ch * ldc + p);
    unsigned add = (unsigned)corr * (unsigned)wsum[ch] + (unsigned)bias_q[ch];
    *(unsigned*)(y + (long long)ch * plane + p) = requant4(a, add, mult[ch], zp, lo, hi);
}

extern "C" __global__ void epi_dequant4(const int* acc, const int* wsum, int corr,
                                        const int* bias_q, const float* scale, int relu,
                                        int plane, long long ldc, float* y) {
    int ch = blockIdx.y;
    int p = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (p >= plane) return;
    int4 a = *(const int4*)(acc + (long long)ch * ldc + p);
    unsigned add = (unsigned)corr * (unsigned)wsum[ch] + (unsigned)bias_q[ch];
    *(float4*)(y + (long long)ch * plane + p) = dequant4(a, add, scale[ch], relu);
}

extern "C" __global__ void epi_f32_4(const float* acc, const float* bias, int relu, int plane,
                                     long long ldc, float* y) {
    int ch = blockIdx.y;
    int p = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (p >= plane) return;
    float4 a = *(const float4*)(acc + (long long)ch * ldc + p);
    float b = bias[ch];
    float r[4] = {a.x + b, a.y + b, a.z + b, a.w + b};
    if (relu) {
#pragma unroll
        for (int q = 0; q < 4; ++q) r[q] = fmaxf(r[q], 0.0f);
    }
    *(float4*)(y + (long long)ch * plane + p) = make_float4(r[0], r[1], r[2], r[3]);
}

// One launch for the epilogues of many layers (the head's sibling convs): accumulator row
// r (an output channel of one of them) has its own entry: output pointer (0: a padding
// row), that layer's parameter arrays and channel, and the kind of output. Four pixels per
// thread as epi_requant4 / epi_dequant4, with the same arithmetic. Grid (x: runs of
// 4 * blockDim pixels, y: rows).
struct RowEpi {
    unsigned long long y, wsum, bias, mult;
    int ch, corr, zp, lo, hi, flags;  // flags: 1 = dequantize to f32, 2 = ReLU (dequant)
};

extern "C" __global__ void epi_rows4(const int* acc, const RowEpi* rows, int plane,
                                     long long ldc) {
    RowEpi e = rows[blockIdx.y];
    int p = (blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (e.y == 0 || p >= plane) return;
    int4 a = *(const int4*)(acc + (long long)blockIdx.y * ldc + p);
    unsigned add = (unsigned)e.corr * (unsigned)((const int*)e.wsum)[e.ch] +
                   (unsigned)((const int*)e.bias)[e.ch];
    float m = ((const float*)e.mult)[e.ch];
    if (e.flags & 1)
        *(float4*)((float*)e.y + p) = dequant4(a, add, m, e.flags & 2);
    else
        *(unsigned*)((u8*)e.y + p) = requant4(a, add, m, e.zp, e.lo, e.hi);
}

// ---- glue ops -------------------------------------------------------------------------

// Max over each pillar's first counts[p] points (all n when counts is null); an empty
// pillar gets `empty`. With concat, [P, N, 2C]: each point's features, then the max.
#define PILLAR_MAX(NAME, T)                                                                  \
    extern "C" __global__ void NAME(const T* x, const unsigned* counts, int p, int n, int c, \
                                    int concat, T empty, T* y) {                             \
        GRID_STRIDE(i, (long long)p * c) {                                                   \
            int pi = i / c, ch = i % c;                                                      \
            int k = counts ? (int)counts[pi] : n;                                            \
            const T* px = x + (long long)pi * n * c + ch;                                    \
            T m = k > 0 ? px[0] : empty;                                                     \
            for (int j = 1; j < k; ++j) {                                                    \
                T v = px[(long long)j * c];                                                  \
                if (v > m) m = v;                                                            \
            }                                                                                \
            if (concat) {                                                                    \
                T* py = y + (long long)pi * n * 2 * c + ch;                                  \
                for (int j = 0; j < n; ++j) {                                                \
                    py[(long long)j * 2 * c] = px[(long long)j * c];                         \
                    py[(long long)j * 2 * c + c] = m;                                        \
                }                                                                            \
            } else {                                                                         \
                y[(long long)pi * c + ch] = m;                                               \
            }                                                                                \
        }                                                                                    \
    }
PILLAR_MAX(pillar_max_f32, float)
PILLAR_MAX(pillar_max_u8, u8)

// Pillar features [P, C] into the BEV image [C, plane] at cells[p] = y * nx + x (the image
// was filled with the empty value first).
#define SCATTER(NAME, T)                                                                     \
    extern "C" __global__ void NAME(const T* x, const unsigned* cells, int p, int c,          \
                                    long long plane, T* y) {                                  \
        GRID_STRIDE(i, (long long)p * c) {                                                   \
            int pi = i / c, ch = i % c;                                                      \
            y[(long long)ch * plane + cells[pi]] = x[i];                                     \
        }                                                                                    \
    }
SCATTER(scatter_f32, float)
SCATTER(scatter_u8, u8)

// ---- decoding: peak candidates ------------------------------------------------------

// One task's peak candidates (model::decode's rule): cells whose heatmap logit is not under
// `cut` and (with local_max) not exceeded by a 3x3 neighbour (NaN never exceeds). Each is
// appended, in any order, as a record of 3 + nreg words: the logit's bits, the class, the
// cell, then its regression values gathered through `regs` (one pointer per channel).
extern "C" __global__ void head_candidates(const float* hm, int classes, int h, int w,
                                           float cut, int local_max,
                                           const unsigned long long* regs, int nreg, int cap,
                                           unsigned* count, unsigned* out) {
    int plane = h * w;
    GRID_STRIDE(t, (long long)classes * plane) {
        float v = hm[t];
        if (v < cut) continue;
        int c = t / plane, i = t - c * plane;
        if (local_max) {
            int y = i / w, x = i - y * w;
            const float* pl = hm + (long long)c * plane;
            bool peak = true;
            for (int ny = max(y - 1, 0); ny < min(y + 2, h); ++ny)
                for (int nx = max(x - 1, 0); nx < min(x + 2, w); ++nx)
                    if (pl[ny * w + nx] > v) peak = false;
            if (!peak) continue;
        }
        unsigned k = atomicAdd(count, 1u);
        if (k >= (unsigned)cap) continue;
        unsigned* r = out + (long long)k * (3 + nreg);
        r[0] = __float_as_uint(v);
        r[1] = (unsigned)c;
        r[2] = (unsigned)i;
        for (int j = 0; j < nreg; ++j) r[3 + j] = __float_as_uint(((const float*)regs[j])[i]);
    }
}

// ---- direct convolution of the head branches ------------------------------------------

// The second conv of every head branch at once: few output channels each, so a direct
// convolution beats im2col + GEMM. Branch j reads channels [j*cin, (j+1)*cin) of the
// stacked input and writes acc[(j*cmax + c) * ldc + p]. Weights [n, cmax, cin*kk*kk].
// One instantiation per output-channel count (CM = cmax, 1..8): the sums stay in registers
// and no lane computes a channel that does not exist.
template <int CM>
__device__ __forceinline__ void branch_conv_f32_t(const float* x, int n, int cin, int h, int w,
                                                  int kk, int stride, int pad, int ho, int wo,
                                                  const float* wts, float* acc, int ldc) {
    int plane = ho * wo;
    int K = cin * kk * kk;
    GRID_STRIDE(t, (long long)n * plane) {
        int j = t / plane, p = t % plane;
        int oy = p / wo, ox = p % wo;
        float s[CM];
#pragma unroll
        for (int c = 0; c < CM; ++c) s[c] = 0.0f;
        const float* wj = wts + (long long)j * CM * K;
        for (int ci = 0; ci < cin; ++ci) {
            const float* xc = x + (long long)(j * cin + ci) * h * w;
            for (int ky = 0; ky < kk; ++ky) {
                int iy = oy * stride - pad + ky;
                if (iy < 0 || iy >= h) continue;
                for (int kx = 0; kx < kk; ++kx) {
                    int ix = ox * stride - pad + kx;
                    if (ix < 0 || ix >= w) continue;
                    float v = xc[iy * w + ix];
                    int k = (ci * kk + ky) * kk + kx;
#pragma unroll
                    for (int c = 0; c < CM; ++c) s[c] += v * wj[c * K + k];
                }
            }
        }
#pragma unroll
        for (int c = 0; c < CM; ++c) acc[(long long)(j * CM + c) * ldc + p] = s[c];
    }
}

// Integer twin: sums (code - 128) * w, padding at the branch's zero point (zxc per stacked
// channel), exactly what im2col_s8 and the s8 GEMM compute, so the same epilogue applies.
// Each thread takes four neighbouring pixels of one row, so every weight it loads serves
// four outputs.
template <int CM>
__device__ __forceinline__ void branch_conv_s8_t(const u8* x, int n, int cin, int h, int w,
                                                 int kk, int stride, int pad, int ho, int wo,
                                                 const s8* wts, const int* zxc, int* acc,
                                                 int ldc) {
    int K = cin * kk * kk;
    int wq = (wo + 3) >> 2;
    int per_branch = ho * wq;
    GRID_STRIDE(t, (long long)n * per_branch) {
        int j = t / per_branch, r = t - j * per_branch;
        int oy = r / wq, ox0 = (r - oy * wq) << 2;
        int s[CM][4];
#pragma unroll
        for (int c = 0; c < CM; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q) s[c][q] = 0;
        const s8* wj = wts + (long long)j * CM * K;
        for (int ci = 0; ci < cin; ++ci) {
            const u8* xc = x + (long long)(j * cin + ci) * h * w;
            int zx = zxc[j * cin + ci];
            for (int ky = 0; ky < kk; ++ky) {
                int iy = oy * stride - pad + ky;
                bool row_in = iy >= 0 && iy < h;
                const u8* xr = xc + (long long)iy * w;
                for (int kx = 0; kx < kk; ++kx) {
                    int k = (ci * kk + ky) * kk + kx;
                    int wv[CM];
#pragma unroll
                    for (int c = 0; c < CM; ++c) wv[c] = (int)wj[c * K + k];
#pragma unroll
                    for (int q = 0; q < 4; ++q) {
                        int ix = (ox0 + q) * stride - pad + kx;
                        int code = (row_in && ix >= 0 && ix < w) ? (int)xr[ix] : zx;
                        int v = code - 128;
#pragma unroll
                        for (int c = 0; c < CM; ++c) s[c][q] += v * wv[c];
                    }
                }
            }
        }
        int p = oy * wo + ox0;
#pragma unroll
        for (int c = 0; c < CM; ++c)
#pragma unroll
            for (int q = 0; q < 4; ++q)
                if (ox0 + q < wo) acc[(long long)(j * CM + c) * ldc + p + q] = s[c][q];
    }
}

#define BRANCH_CONV(CM)                                                                      \
    extern "C" __global__ void branch_conv_f32_##CM(                                         \
        const float* x, int n, int cin, int h, int w, int kk, int stride, int pad, int ho,   \
        int wo, const float* wts, float* acc, int ldc) {                                     \
        branch_conv_f32_t<CM>(x, n, cin, h, w, kk, stride, pad, ho, wo, wts, acc, ldc);      \
    }                                                                                        \
    extern "C" __global__ void branch_conv_s8_##CM(                                          \
        const u8* x, int n, int cin, int h, int w, int kk, int stride, int pad, int ho,      \
        int wo, const s8* wts, const int* zxc, int* acc, int ldc) {                          \
        branch_conv_s8_t<CM>(x, n, cin, h, w, kk, stride, pad, ho, wo, wts, zxc, acc, ldc);  \
    }
BRANCH_CONV(1)
BRANCH_CONV(2)
BRANCH_CONV(3)
BRANCH_CONV(4)
BRANCH_CONV(5)
BRANCH_CONV(6)
BRANCH_CONV(7)
BRANCH_CONV(8)

// ---- the voxel model's sparse 3D backbone ---------------------------------------------

// Sparse conv, output-stationary over a neighbour table nbr[o * taps + t] (the input row
// under kernel offset t of output site o, -1 when that site is inactive). Weights
// transposed to w[(t * cin + ci) * cout + co], so the lanes of a warp (consecutive output
// channels of one site) read consecutive weights while sharing each input value. Integer:
// sums of (code - zx) * w over the present neighbours only (absent sites are zero, not
// padding), wrapping like the CPU; the epilogue follows as for a linear layer.
extern "C" __global__ void sparse_conv_s8(const u8* x, const int* nbr, int n_out, int taps,
                                          int cin, int cout, const s8* w, int zx, int* acc) {
    GRID_STRIDE(i, (long long)n_out * cout) {
        int o = i / cout, co = i - o * cout;
        unsigned s = 0;
        for (int t = 0; t < taps; ++t) {
            int r = nbr[(long long)o * taps + t];
            if (r < 0) continue;
            const u8* xr = x + (long long)r * cin;
            const s8* wt = w + (long long)t * cin * cout + co;
            for (int ci = 0; ci < cin; ++ci)
                s += (unsigned)((int)xr[ci] - zx) * (unsigned)(int)wt[(long long)ci * cout];
        }
        acc[i] = (int)s;
    }
}

// Float twin (same transposed weights) with the bias and ReLU fused: y[o * cout + co].
extern "C" __global__ void sparse_conv_f32(const float* x, const int* nbr, int n_out, int taps,
                                           int cin, int cout, const float* w, const float* bias,
                                           int relu, float* y) {
    GRID_STRIDE(i, (long long)n_out * cout) {
        int o = i / cout, co = i - o * cout;
        float s = 0.0f;
        for (int t = 0; t < taps; ++t) {
            int r = nbr[(long long)o * taps + t];
            if (r < 0) continue;
            const float* xr = x + (long long)r * cin;
            const float* wt = w + (long long)t * cin * cout + co;
            for (int ci = 0; ci < cin; ++ci) s += xr[ci] * wt[(long long)ci * cout];
        }
        float v = s + bias[co];
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = v;
    }
}

// The residual join on codes sharing parameters (zi): Requant::apply(a + b - 2 zi, 0).
extern "C" __global__ void add_u8(const u8* a, const u8* b, long long n, int zi, float mult,
                                  int zp, int lo, int hi, u8* y) {
    GRID_STRIDE(i, n) {
        int v = (int)a[i] + (int)b[i] - 2 * zi;
        float f = rintf(__fmul_rn((float)v, mult));
        f = fminf(fmaxf(f, (float)(lo - zp)), (float)(hi - zp));
        y[i] = (u8)((int)f + zp);
    }
}

extern "C" __global__ void add_f32(const float* a, const float* b, long long n, int relu,
                                   float* y) {
    GRID_STRIDE(i, n) {
        float v = a[i] + b[i];
        if (relu && v < 0.0f) v = 0.0f;
        y[i] = v;
    }
}

// Height compression: site i's features [c] at coords (z, y, x) into the BEV image
// [c * d + z, h, w] (the image was filled with the empty value first).
#define HCOMP(NAME, T)                                                                       \
    extern "C" __global__ void NAME(const T* x, const unsigned* coords, int n, int c, int d,  \
                                    int h, int w, T* y) {                                    \
        GRID_STRIDE(i, (long long)n * c) {                                                   \
            int si = i / c, ch = i - si * c;                                                 \
            unsigned z = coords[3 * si], yy = coords[3 * si + 1], xx = coords[3 * si + 2];   \
            y[(((long long)ch * d + z) * h + yy) * w + xx] = x[i];                           \
        }                                                                                    \
    }
HCOMP(hcomp_f32, float)
HCOMP(hcomp_u8, u8)
