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

extern "C" __global__ void fill_f32(float* y, long long n, float v) {
    GRID_STRIDE(i, n) { y[i] = v; }
}

// ---- im2col ---------------------------------------------------------------------------

// Float, k-major: col[k * ldp + p], k = (ci * kk + ky) * kk + kx, p = oy * wo + ox.
extern "C" __global__ void im2col_f32(const float* x, int c, int h, int w, int kk, int stride,
                                      int pad, int ho, int wo, float* col) {
    int plane = ho * wo;
    int n = c * kk * kk * plane;
    GRID_STRIDE(i, n) {
        int p = i % plane;
        int k = i / plane;
        int ci = k / (kk * kk), r = k % (kk * kk), ky = r / kk, kx = r % kk;
        int oy = p / wo, ox = p % wo;
        int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[((long long)ci * h + iy) * w + ix];
        col[i] = v;
    }
}

extern "C" __global__ void im2col_f16(const float* x, int c, int h, int w, int kk, int stride,
                                      int pad, int ho, int wo, f16raw* col) {
    int plane = ho * wo;
    int n = c * kk * kk * plane;
    GRID_STRIDE(i, n) {
        int p = i % plane;
        int k = i / plane;
        int ci = k / (kk * kk), r = k % (kk * kk), ky = r / kk, kx = r % kk;
        int oy = p / wo, ox = p % wo;
        int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
        float v = 0.0f;
        if (iy >= 0 && iy < h && ix >= 0 && ix < w) v = x[((long long)ci * h + iy) * w + ix];
        col[i] = to_half(v);
    }
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

// The same im2col through a shared-memory tile of `tp` output pixels: gathered with
// consecutive threads on consecutive pixels (coalesced reads of each input row, where the
// one-word-per-thread kernel reads bytes of distant channel planes), then written out as
// whole words. Tile rows are padded by one word so the byte stores spread over the banks.
extern "C" __global__ void im2col_s8_tile(const u8* x, int c, int h, int w, int kk, int stride,
                                          int pad, int ho, int wo, int kpad, int zx,
                                          const int* zxc, int tp, s8* col) {
    extern __shared__ unsigned tile_words[];
    u8* tile = (u8*)tile_words;
    int plane = ho * wo;
    int p0 = blockIdx.x * tp;
    if (p0 >= plane) return;
    int np = min(tp, plane - p0);
    int k2 = kk * kk, kreal = c * k2;
    int row = kpad + 4;
    for (int idx = threadIdx.x; idx < np * kpad; idx += blockDim.x) {
        int k = idx / np, pl = idx - k * np;
        int v = 0;
        if (k < kreal) {
            int ci = k / k2, r = k - ci * k2, ky = r / kk, kx = r - ky * kk;
            int p = p0 + pl;
            int oy = p / wo, ox = p - oy * wo;
            int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
            int code = zxc ? zxc[ci] : zx;
            if (iy >= 0 && iy < h && ix >= 0 && ix < w) code = x[((long long)ci * h + iy) * w + ix];
            v = code - 128;
        }
        tile[pl * row + k] = (u8)v;
    }
    __syncthreads();
    int q4 = kpad >> 2, r4 = row >> 2;
    unsigned* out = (unsigned*)(col + (long long)p0 * kpad);
    for (int i = threadIdx.x; i < np * q4; i += blockDim.x) {
        int pl = i / q4, wi = i - pl * q4;
        out[i] = tile_words[pl * r4 + wi];
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
template <int CM>
__device__ __forceinline__ void branch_conv_s8_t(const u8* x, int n, int cin, int h, int w,
                                                 int kk, int stride, int pad, int ho, int wo,
                                                 const s8* wts, const int* zxc, int* acc,
                                                 int ldc) {
    int plane = ho * wo;
    int K = cin * kk * kk;
    GRID_STRIDE(t, (long long)n * plane) {
        int j = t / plane, p = t % plane;
        int oy = p / wo, ox = p % wo;
        int s[CM];
#pragma unroll
        for (int c = 0; c < CM; ++c) s[c] = 0;
        const s8* wj = wts + (long long)j * CM * K;
        for (int ci = 0; ci < cin; ++ci) {
            const u8* xc = x + (long long)(j * cin + ci) * h * w;
            int zx = zxc[j * cin + ci];
            for (int ky = 0; ky < kk; ++ky) {
                int iy = oy * stride - pad + ky;
                bool row_in = iy >= 0 && iy < h;
                for (int kx = 0; kx < kk; ++kx) {
                    int ix = ox * stride - pad + kx;
                    int code = (row_in && ix >= 0 && ix < w) ? (int)xc[iy * w + ix] : zx;
                    int v = code - 128;
                    int k = (ci * kk + ky) * kk + kx;
#pragma unroll
                    for (int c = 0; c < CM; ++c) s[c] += v * (int)wj[c * K + k];
                }
            }
        }
#pragma unroll
        for (int c = 0; c < CM; ++c) acc[(long long)(j * CM + c) * ldc + p] = s[c];
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
// w[co * kpad + t * cin + ci] (spconv's [cout, kz, ky, kx, cin]). Integer: sums of
// (code - zx) * w over the present neighbours only (absent sites are zero, not padding),
// wrapping like the CPU; the epilogue follows as for a linear layer.
extern "C" __global__ void sparse_conv_s8(const u8* x, const int* nbr, int n_out, int taps,
                                          int cin, int cout, const s8* w, int kpad, int zx,
                                          int* acc) {
    GRID_STRIDE(i, (long long)n_out * cout) {
        int o = i / cout, co = i - o * cout;
        const s8* wr = w + (long long)co * kpad;
        unsigned s = 0;
        for (int t = 0; t < taps; ++t) {
            int r = nbr[(long long)o * taps + t];
            if (r < 0) continue;
            const u8* xr = x + (long long)r * cin;
            const s8* wt = wr + t * cin;
            for (int ci = 0; ci < cin; ++ci)
                s += (unsigned)((int)xr[ci] - zx) * (unsigned)(int)wt[ci];
        }
        acc[i] = (int)s;
    }
}

// Float twin with the bias and ReLU fused: y[o * cout + co].
extern "C" __global__ void sparse_conv_f32(const float* x, const int* nbr, int n_out, int taps,
                                           int cin, int cout, const float* w, const float* bias,
                                           int relu, float* y) {
    GRID_STRIDE(i, (long long)n_out * cout) {
        int o = i / cout, co = i - o * cout;
        const float* wr = w + (long long)co * taps * cin;
        float s = 0.0f;
        for (int t = 0; t < taps; ++t) {
            int r = nbr[(long long)o * taps + t];
            if (r < 0) continue;
            const float* xr = x + (long long)r * cin;
            const float* wt = wr + t * cin;
            for (int ci = 0; ci < cin; ++ci) s += xr[ci] * wt[ci];
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
