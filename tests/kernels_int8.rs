//! INT8 kernels: every SIMD kernel is bit-exact with the scalar reference, and the scalar
//! reference is the quantization semantics (checked against real-valued f64 arithmetic on
//! the dequantized operands, padding being real zero).

use lidar_ptq::kernels::{
    Epilogue, Isa, KernelError, PackedConv, PackedConvTranspose, PackedLinear, PackedSparseConv,
};
use lidar_ptq::quant::{Flavour, Grid, QParams, Requant, quantize_bias};
use lidar_ptq::sparse::Rulebook;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// A random quantized layer: i8 weights, per-channel scales, real bias, output params.
struct Layer {
    w: Vec<i8>,
    s_w: Vec<f32>,
    bias: Vec<f32>,
    s_x: f32,
    zx: u8,
    out: QParams,
    relu: bool,
}

impl Layer {
    /// `fan_in` sets the output scale so the codes spread over the grid.
    fn random(r: &mut ChaCha8Rng, n_w: usize, cout: usize, fan_in: usize, zx: u8) -> Layer {
        let w = (0..n_w).map(|_| r.random_range(-127i8..=127)).collect();
        let s_w: Vec<f32> = (0..cout).map(|_| r.random_range(0.002f32..0.02)).collect();
        let s_x = r.random_range(0.01f32..0.05);
        let bias = (0..cout).map(|_| r.random_range(-0.5f32..0.5)).collect();
        // Typical |y| ~ s_x * 75 * s_w * 73 * sqrt(fan_in).
        let spread = s_x * 0.011 * 5500.0 * (fan_in as f32).sqrt();
        let zo = r.random_range(0..=255) as f32 / 255.0;
        let out = QParams::asymmetric(
            -2.0 * spread * zo,
            2.0 * spread * (1.0 - zo) + 1e-3,
            Grid::activation(8, Flavour::Asymmetric),
        );
        Layer {
            w,
            s_w,
            bias,
            s_x,
            zx,
            out,
            relu: r.random_bool(0.5),
        }
    }

    fn bias_q(&self) -> Vec<i32> {
        (0..self.s_w.len())
            .map(|c| quantize_bias(self.bias[c], self.s_x, self.s_w[c]))
            .collect()
    }

    fn requant(&self) -> Vec<Requant> {
        self.s_w
            .iter()
            .map(|&s| Requant::new(self.s_x, s, &self.out, self.relu))
            .collect()
    }

    /// The output code of a real pre-activation `y` of channel `c`, in f64.
    fn quantize_real(&self, y: f64) -> i32 {
        let y = if self.relu { y.max(0.0) } else { y };
        let q = (y / self.out.scale as f64).round() as i64 + self.out.zero_point as i64;
        q.clamp(self.out.grid.qmin as i64, self.out.grid.qmax as i64) as i32
    }

    fn x_real(&self, q: u8) -> f64 {
        self.s_x as f64 * (q as f64 - self.zx as f64)
    }
}

/// The SIMD families to compare with the reference on this CPU; says which are skipped.
fn simd() -> Vec<Isa> {
    let isas = Isa::simd_available();
    for isa in Isa::ALL[1..].iter().filter(|i| !isas.contains(i)) {
        eprintln!("{isa:?} unavailable on this CPU: its kernels are not compared");
    }
    isas
}

fn random_input(r: &mut ChaCha8Rng, n: usize) -> Vec<u8> {
    (0..n).map(|_| r.random_range(0..=255u8)).collect()
}

/// Requantizers with power-of-two multipliers put many accumulators exactly on a .5 tie,
/// exercising round-half-to-even in the SIMD epilogue.
fn tie_requant(cout: usize, zp: i32, relu: bool) -> Vec<Requant> {
    (0..cout)
        .map(|c| Requant {
            multiplier: 2f32.powi(-(8 + (c % 5) as i32)),
            zero_point: zp,
            lo: if relu { zp } else { 0 },
            hi: 255,
        })
        .collect()
}

/// Asserts every SIMD family this CPU runs == scalar for a conv case.
#[allow(clippy::too_many_arguments)]
fn conv_case(
    r: &mut ChaCha8Rng,
    cin: usize,
    cout: usize,
    k: (usize, usize),
    stride: usize,
    pad: usize,
    hw: (usize, usize),
    zx: u8,
    ties: bool,
) {
    let n_w = cout * cin * k.0 * k.1;
    let l = Layer::random(r, n_w, cout, cin * k.0 * k.1, zx);
    let rq = if ties {
        tie_requant(cout, l.out.zero_point, l.relu)
    } else {
        l.requant()
    };
    let p = PackedConv::new(
        &l.w,
        [cout, cin, k.0, k.1],
        &l.bias_q(),
        &rq,
        (stride, stride),
        (pad, pad),
    )
    .unwrap();
    let shape = [1 + (cin % 2), cin, hw.0, hw.1];
    let x = random_input(r, shape.iter().product());
    let os = p.output_shape(shape).unwrap();
    let mut want = vec![0u8; os.iter().product()];
    let mut got = vec![0u8; want.len()];
    p.forward(Isa::Scalar, &x, shape, zx, &mut want).unwrap();
    let case = format!("cin {cin} cout {cout} k {k:?} s {stride} p {pad} {hw:?} zx {zx}");
    for isa in simd() {
        p.forward(isa, &x, shape, zx, &mut got).unwrap();
        assert_eq!(got, want, "conv {case} {isa:?}");
    }
    // A degenerate case (all outputs clamped) would prove little.
    let distinct = want.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct > 3.min(want.len()),
        "conv {case}: outputs barely vary"
    );
}

#[test]
fn conv2d_simd_is_bit_exact_with_the_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(1);
    let mut i = 0;
    for cin in [3, 5, 17, 33] {
        for cout in [1, 7, 65] {
            for (k, stride, pad) in [(1, 1, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1), (3, 1, 0)] {
                let hw = (5 + i % 7, 9 + (i * 5) % 13);
                let zx = if i % 2 == 0 {
                    0
                } else {
                    r.random_range(1..=255)
                };
                conv_case(&mut r, cin, cout, (k, k), stride, pad, hw, zx, i % 3 == 0);
                i += 1;
            }
        }
    }
    // Non-square kernel, an image larger than one band, K odd and even (every K mod 4
    // for the quads of the VNNI core).
    conv_case(&mut r, 16, 13, (1, 3), 1, 1, (19, 23), 77, false);
    conv_case(&mut r, 6, 9, (1, 1), 1, 0, (7, 40), 5, false);
    conv_case(&mut r, 10, 70, (3, 3), 2, 1, (21, 30), 130, true);
    conv_case(&mut r, 8, 64, (3, 3), 1, 1, (16, 24), 3, false);
}

#[test]
fn narrow_conv3x3_simd_is_bit_exact_with_the_reference() {
    // 3x3, stride 1, padding 1, at most four output channels: the direct AVX2 kernel.
    let mut r = ChaCha8Rng::seed_from_u64(11);
    let mut i = 0;
    for cout in 1..=4 {
        for cin in [1, 2, 5, 64] {
            // Widths below, at and past one 16-pixel block; heights past one task (8 rows).
            for hw in [(3, 19), (4, 5), (9, 16), (17, 37)] {
                // Near the middle of the codes: a zero point far off it saturates every
                // output of these random layers (zx = 0 runs in the f32 cases below).
                let zx = r.random_range(64..=192);
                conv_case(
                    &mut r,
                    cin,
                    cout,
                    (3, 3),
                    1,
                    1,
                    hw,
                    zx,
                    cin == 64 && i % 2 == 0,
                );
                i += 1;
            }
        }
    }
    // The dequantizing epilogue (f32 output, with and without ReLU).
    for (cin, cout, (h, w), zx) in [
        (64, 2, (13, 21), 9u8),
        (3, 1, (4, 40), 250),
        (7, 4, (8, 8), 0),
    ] {
        let l = Layer::random(&mut r, cout * cin * 9, cout, cin * 9, zx);
        let p = PackedConv::with_epilogue(
            &l.w,
            [cout, cin, 3, 3],
            &l.bias_q(),
            l.dequant(),
            (1, 1),
            (1, 1),
        )
        .unwrap();
        let x = random_input(&mut r, cin * h * w);
        let (mut want, mut got) = (vec![0f32; cout * h * w], vec![0f32; cout * h * w]);
        p.forward_f32(Isa::Scalar, &x, [1, cin, h, w], zx, &mut want)
            .unwrap();
        for isa in simd() {
            p.forward_f32(isa, &x, [1, cin, h, w], zx, &mut got)
                .unwrap();
            assert_eq!(bits(&got), bits(&want), "narrow f32 cin {cin} cout {cout}");
        }
    }
}

#[test]
fn conv_transpose2d_simd_is_bit_exact_with_the_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(2);
    for (i, (cin, cout, k)) in [(3, 1, 2), (5, 7, 2), (17, 65, 2), (33, 7, 1), (16, 9, 4)]
        .into_iter()
        .enumerate()
    {
        let zx = if i % 2 == 0 { 0 } else { 131 };
        let l = Layer::random(&mut r, cin * cout * k * k, cout, cin, zx);
        let rq = if i == 1 {
            tie_requant(cout, l.out.zero_point, l.relu)
        } else {
            l.requant()
        };
        let p = PackedConvTranspose::new(&l.w, [cin, cout, k, k], &l.bias_q(), &rq, (k, k), (0, 0))
            .unwrap();
        let shape = [1, cin, 7 + i, 11 + 3 * i];
        let x = random_input(&mut r, shape.iter().product());
        let os = p.output_shape(shape).unwrap();
        assert_eq!(os, [1, cout, shape[2] * k, shape[3] * k]);
        let mut want = vec![0u8; os.iter().product()];
        let mut got = vec![0u8; want.len()];
        p.forward(Isa::Scalar, &x, shape, zx, &mut want).unwrap();
        for isa in simd() {
            p.forward(isa, &x, shape, zx, &mut got).unwrap();
            assert_eq!(got, want, "conv_transpose cin {cin} cout {cout} k {k}");
        }
    }
}

#[test]
fn linear_simd_is_bit_exact_with_the_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(3);
    for (i, (rows, cin, cout)) in [
        (1, 3, 1),
        (7, 5, 7),
        (130, 10, 64),
        (300, 33, 65),
        (17, 64, 3),
        // Several parallel tasks of rows (the pillar net's points), K odd and even.
        (1100, 64, 32),
        (1030, 9, 40),
        // The GEMM path with K = 2 mod 4.
        (50, 10, 70),
    ]
    .into_iter()
    .enumerate()
    {
        let zx = if i % 2 == 0 { 0 } else { 200 };
        let l = Layer::random(&mut r, cout * cin, cout, cin, zx);
        let rq = if i == 2 {
            tie_requant(cout, l.out.zero_point, l.relu)
        } else {
            l.requant()
        };
        let p = PackedLinear::new(&l.w, cout, cin, &l.bias_q(), &rq).unwrap();
        let x = random_input(&mut r, rows * cin);
        let mut want = vec![0u8; rows * cout];
        let mut got = vec![0u8; rows * cout];
        p.forward(Isa::Scalar, &x, rows, zx, &mut want).unwrap();
        for isa in simd() {
            p.forward(isa, &x, rows, zx, &mut got).unwrap();
            assert_eq!(got, want, "linear rows {rows} cin {cin} cout {cout}");
        }
    }
}

/// Fraction of codes equal to the f64 reference; every code must be within 1.
fn agreement(got: &[u8], want: &[i32], what: &str) -> f64 {
    let mut same = 0;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((g as i32 - w).abs() <= 1, "{what}: element {i}: {g} vs {w}");
        same += (g as i32 == w) as usize;
    }
    same as f64 / got.len() as f64
}

#[test]
fn scalar_conv2d_is_the_dequantized_real_conv() {
    let mut r = ChaCha8Rng::seed_from_u64(4);
    for (cin, cout, k, s, pad, zx) in [
        (3, 7, 3, 1, 1, 0u8),
        (5, 4, 3, 2, 1, 100),
        (17, 3, 1, 1, 0, 255),
        (4, 5, 2, 2, 0, 37),
    ] {
        let l = Layer::random(&mut r, cout * cin * k * k, cout, cin * k * k, zx);
        let p = PackedConv::new(
            &l.w,
            [cout, cin, k, k],
            &l.bias_q(),
            &l.requant(),
            (s, s),
            (pad, pad),
        )
        .unwrap();
        let (h, w) = (9, 6);
        let x = random_input(&mut r, cin * h * w);
        let [_, _, ho, wo] = p.output_shape([1, cin, h, w]).unwrap();
        let mut got = vec![0u8; cout * ho * wo];
        p.forward(Isa::Scalar, &x, [1, cin, h, w], zx, &mut got)
            .unwrap();
        // Real conv: dequantized operands, padding is the real value 0.
        let mut want = Vec::new();
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut y = l.bias[co] as f64;
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (oy * s + ky, ox * s + kx);
                                if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                    continue;
                                }
                                let xv = l.x_real(x[(ci * h + iy - pad) * w + ix - pad]);
                                let wq = l.w[((co * cin + ci) * k + ky) * k + kx];
                                y += xv * l.s_w[co] as f64 * wq as f64;
                            }
                        }
                    }
                    want.push(l.quantize_real(y));
                }
            }
        }
        let frac = agreement(&got, &want, "conv2d");
        assert!(frac > 0.97, "conv2d: only {frac} of codes match exactly");
    }
}

#[test]
fn scalar_conv_transpose2d_is_the_dequantized_real_conv() {
    let mut r = ChaCha8Rng::seed_from_u64(5);
    // Overlapping taps and cropping padding exercise the general reference.
    for (cin, cout, k, s, pad, zx) in [
        (3, 4, 2, 2, 0, 9u8),
        (5, 3, 3, 2, 1, 0),
        (4, 2, 3, 1, 1, 250),
    ] {
        let l = Layer::random(&mut r, cin * cout * k * k, cout, cin * k * k / s, zx);
        let p = PackedConvTranspose::new(
            &l.w,
            [cin, cout, k, k],
            &l.bias_q(),
            &l.requant(),
            (s, s),
            (pad, pad),
        )
        .unwrap();
        let (h, w) = (5, 7);
        let x = random_input(&mut r, cin * h * w);
        let [_, _, ho, wo] = p.output_shape([1, cin, h, w]).unwrap();
        let mut got = vec![0u8; cout * ho * wo];
        p.forward(Isa::Scalar, &x, [1, cin, h, w], zx, &mut got)
            .unwrap();
        // Scatter formulation: every input pixel spreads over its k x k window.
        let mut y: Vec<f64> = (0..cout * ho * wo)
            .map(|i| l.bias[i / (ho * wo)] as f64)
            .collect();
        for ci in 0..cin {
            for iy in 0..h {
                for ix in 0..w {
                    let xv = l.x_real(x[(ci * h + iy) * w + ix]);
                    for co in 0..cout {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (oy, ox) = (iy * s + ky, ix * s + kx);
                                if oy < pad || ox < pad || oy - pad >= ho || ox - pad >= wo {
                                    continue;
                                }
                                let wq = l.w[((ci * cout + co) * k + ky) * k + kx];
                                y[(co * ho + oy - pad) * wo + ox - pad] +=
                                    xv * l.s_w[co] as f64 * wq as f64;
                            }
                        }
                    }
                }
            }
        }
        let want: Vec<i32> = y.iter().map(|&v| l.quantize_real(v)).collect();
        let frac = agreement(&got, &want, "conv_transpose2d");
        assert!(frac > 0.97, "conv_transpose2d: only {frac} match exactly");
    }
}

#[test]
fn scalar_linear_is_the_dequantized_real_product() {
    let mut r = ChaCha8Rng::seed_from_u64(6);
    let (rows, cin, cout, zx) = (40, 10, 9, 57u8);
    let l = Layer::random(&mut r, cout * cin, cout, cin, zx);
    let p = PackedLinear::new(&l.w, cout, cin, &l.bias_q(), &l.requant()).unwrap();
    let x = random_input(&mut r, rows * cin);
    let mut got = vec![0u8; rows * cout];
    p.forward(Isa::Scalar, &x, rows, zx, &mut got).unwrap();
    let mut want = Vec::new();
    for row in 0..rows {
        for co in 0..cout {
            let y = (0..cin).fold(l.bias[co] as f64, |y, ci| {
                y + l.x_real(x[row * cin + ci]) * l.s_w[co] as f64 * l.w[co * cin + ci] as f64
            });
            want.push(l.quantize_real(y));
        }
    }
    let frac = agreement(&got, &want, "linear");
    assert!(frac > 0.97, "linear: only {frac} match exactly");
}

#[test]
fn bad_arguments_are_typed_errors() {
    let rq = Requant {
        multiplier: 0.01,
        zero_point: 0,
        lo: 0,
        hi: 255,
    };
    let conv = |w: &[i8], r: Requant| PackedConv::new(w, [1, 2, 1, 1], &[0], &[r], (1, 1), (0, 0));
    assert!(matches!(
        conv(&[1], rq),
        Err(KernelError::Length { arg: "weight", .. })
    ));
    assert!(matches!(
        conv(&[1, -128], rq),
        Err(KernelError::Invalid { arg: "weight", .. })
    ));
    let nan = Requant {
        multiplier: f32::NAN,
        ..rq
    };
    assert!(matches!(
        conv(&[1, 2], nan),
        Err(KernelError::Invalid { arg: "requant", .. })
    ));
    let p = conv(&[1, 2], rq).unwrap();
    let mut out = vec![0u8; 4];
    // Wrong channel count, then a short input buffer.
    assert!(matches!(
        p.forward(Isa::Scalar, &[0; 12], [1, 3, 2, 2], 0, &mut out),
        Err(KernelError::Invalid { arg: "input", .. })
    ));
    assert!(matches!(
        p.forward(Isa::best(), &[0; 7], [1, 2, 2, 2], 0, &mut out),
        Err(KernelError::Length { arg: "input", .. })
    ));
    assert!(
        p.forward(Isa::best(), &[0; 8], [1, 2, 2, 2], 0, &mut out)
            .is_ok()
    );
    let lin = PackedLinear::new(&[1, 2], 1, 2, &[0], &[rq]).unwrap();
    assert!(matches!(
        lin.forward(Isa::best(), &[0; 4], 2, 0, &mut [0u8; 3]),
        Err(KernelError::Length { arg: "output", .. })
    ));
}

impl Layer {
    fn dequant(&self) -> Epilogue {
        Epilogue::Dequant {
            input_scale: self.s_x,
            weight_scale: self.s_w.clone(),
            relu: self.relu,
        }
    }
}

/// A sparse BEV-like input: every channel holds one constant (`zx`, or a per-channel code
/// when `constant` is set) except a few random blobs, so most im2col panels are uniform.
fn sparse_input(
    r: &mut ChaCha8Rng,
    c: usize,
    h: usize,
    w: usize,
    zx: u8,
    constant: bool,
) -> Vec<u8> {
    let fill: Vec<u8> = (0..c)
        .map(|_| {
            if constant {
                r.random_range(0..=255u8)
            } else {
                zx
            }
        })
        .collect();
    let mut x: Vec<u8> = (0..c * h * w).map(|i| fill[i / (h * w)]).collect();
    for _ in 0..3 {
        let (y0, x0) = (r.random_range(0..h), r.random_range(0..w));
        for y in y0..(y0 + 3).min(h) {
            for xx in x0..(x0 + 4).min(w) {
                for ch in 0..c {
                    x[(ch * h + y) * w + xx] = r.random_range(0..=255u8);
                }
            }
        }
    }
    x
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Conv and transposed conv on sparse and uniform inputs, both epilogues, several layers
/// in a row (each call must start with a fresh uniform-column cache): SIMD == scalar.
#[test]
fn sparse_inputs_are_bit_exact_with_the_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(7);
    let reused_before = lidar_ptq::kernels::panel_stats().1;
    let mut i = 0;
    for (cin, cout, k, stride, pad) in [
        (3, 7, 3, 1, 1),
        (5, 13, 3, 2, 1),
        (16, 6, 3, 1, 1),
        (9, 65, 1, 1, 0),
        (7, 5, 2, 2, 0),
    ] {
        for constant in [false, true] {
            for (h, w) in [(37, 41), (8, 150), (20, 33)] {
                let zx = if i % 2 == 0 {
                    0
                } else {
                    r.random_range(1..=255)
                };
                let l = Layer::random(&mut r, cout * cin * k * k, cout, cin * k * k, zx);
                let x = sparse_input(&mut r, cin, h, w, zx, constant);
                let shape = [1, cin, h, w];
                let case = format!("cin {cin} cout {cout} k {k} s {stride} p {pad} {h}x{w}");
                let geo = ((stride, stride), (pad, pad));
                let rq = Epilogue::Requant(l.requant());
                let p = PackedConv::with_epilogue(
                    &l.w,
                    [cout, cin, k, k],
                    &l.bias_q(),
                    rq,
                    geo.0,
                    geo.1,
                )
                .unwrap();
                let n: usize = p.output_shape(shape).unwrap().iter().product();
                let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
                p.forward(Isa::Scalar, &x, shape, zx, &mut want).unwrap();
                for isa in simd() {
                    p.forward(isa, &x, shape, zx, &mut got).unwrap();
                    assert_eq!(got, want, "sparse conv u8 {case}");
                }
                let p = PackedConv::with_epilogue(
                    &l.w,
                    [cout, cin, k, k],
                    &l.bias_q(),
                    l.dequant(),
                    geo.0,
                    geo.1,
                )
                .unwrap();
                let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
                p.forward_f32(Isa::Scalar, &x, shape, zx, &mut want)
                    .unwrap();
                for isa in simd() {
                    p.forward_f32(isa, &x, shape, zx, &mut got).unwrap();
                    assert_eq!(bits(&got), bits(&want), "sparse conv f32 {case}");
                }
                // The transposed conv (upsampling) on the same input.
                let t = PackedConvTranspose::with_epilogue(
                    &l.w[..cin * cout * 4.min(k * k)],
                    [
                        cin,
                        cout,
                        if k * k >= 4 { 2 } else { 1 },
                        if k * k >= 4 { 2 } else { 1 },
                    ],
                    &l.bias_q(),
                    Epilogue::Requant(l.requant()),
                    if k * k >= 4 { (2, 2) } else { (1, 1) },
                    (0, 0),
                )
                .unwrap();
                let n: usize = t.output_shape(shape).unwrap().iter().product();
                let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
                t.forward(Isa::Scalar, &x, shape, zx, &mut want).unwrap();
                for isa in simd() {
                    t.forward(isa, &x, shape, zx, &mut got).unwrap();
                    assert_eq!(got, want, "sparse conv_transpose {case}");
                }
                i += 1;
            }
        }
    }
    // The inputs were sparse enough for the uniform-panel path to run.
    assert!(lidar_ptq::kernels::panel_stats().1 > reused_before + 100);
}

/// The dequantizing epilogue on dense random inputs: SIMD == scalar bit for bit, and the
/// scalar output is the real-valued layer (f64) up to f32 rounding.
#[test]
fn dequantizing_epilogue_is_exact() {
    let mut r = ChaCha8Rng::seed_from_u64(8);
    for (cin, cout, k, s, pad, zx) in [
        (3, 7, 3, 1, 1, 0u8),
        (17, 5, 3, 2, 1, 131),
        (8, 12, 1, 1, 0, 7),
    ] {
        let l = Layer::random(&mut r, cout * cin * k * k, cout, cin * k * k, zx);
        let p = PackedConv::with_epilogue(
            &l.w,
            [cout, cin, k, k],
            &l.bias_q(),
            l.dequant(),
            (s, s),
            (pad, pad),
        )
        .unwrap();
        let (h, w) = (11, 13);
        let x = random_input(&mut r, cin * h * w);
        let [_, _, ho, wo] = p.output_shape([1, cin, h, w]).unwrap();
        let mut got = vec![0f32; cout * ho * wo];
        p.forward_f32(Isa::Scalar, &x, [1, cin, h, w], zx, &mut got)
            .unwrap();
        let mut lanes = vec![0f32; got.len()];
        for isa in simd() {
            p.forward_f32(isa, &x, [1, cin, h, w], zx, &mut lanes)
                .unwrap();
            assert_eq!(
                bits(&lanes),
                bits(&got),
                "conv f32 cin {cin} cout {cout} {isa:?}"
            );
        }
        for co in 0..cout {
            let bq = l.bias_q()[co] as f64 * l.s_x as f64 * l.s_w[co] as f64;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut y = bq;
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let (iy, ix) = (oy * s + ky, ox * s + kx);
                                if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                    continue;
                                }
                                let xv = l.x_real(x[(ci * h + iy - pad) * w + ix - pad]);
                                y += xv
                                    * l.s_w[co] as f64
                                    * l.w[((co * cin + ci) * k + ky) * k + kx] as f64;
                            }
                        }
                    }
                    let y = if l.relu { y.max(0.0) } else { y };
                    let g = got[(co * ho + oy) * wo + ox] as f64;
                    assert!((g - y).abs() <= 1e-5 * (1.0 + y.abs()), "{g} vs {y}");
                }
            }
        }
    }
    // Linear (direct and GEMM paths) and transposed conv, SIMD against scalar.
    for (rows, cin, cout, zx) in [(300, 11, 64, 3u8), (17, 64, 3, 200), (40, 30, 70, 9)] {
        let l = Layer::random(&mut r, cout * cin, cout, cin, zx);
        let p = PackedLinear::with_epilogue(&l.w, cout, cin, &l.bias_q(), l.dequant()).unwrap();
        let x = random_input(&mut r, rows * cin);
        let (mut want, mut got) = (vec![0f32; rows * cout], vec![0f32; rows * cout]);
        p.forward_f32(Isa::Scalar, &x, rows, zx, &mut want).unwrap();
        for isa in simd() {
            p.forward_f32(isa, &x, rows, zx, &mut got).unwrap();
            assert_eq!(bits(&got), bits(&want), "linear f32 rows {rows}");
        }
    }
    let (cin, cout, k, zx) = (9, 5, 2, 44u8);
    let l = Layer::random(&mut r, cin * cout * k * k, cout, cin, zx);
    let p = PackedConvTranspose::with_epilogue(
        &l.w,
        [cin, cout, k, k],
        &l.bias_q(),
        l.dequant(),
        (k, k),
        (0, 0),
    )
    .unwrap();
    let shape = [1, cin, 9, 21];
    let x = random_input(&mut r, shape.iter().product());
    let n: usize = p.output_shape(shape).unwrap().iter().product();
    let (mut want, mut got) = (vec![0f32; n], vec![0f32; n]);
    p.forward_f32(Isa::Scalar, &x, shape, zx, &mut want)
        .unwrap();
    for isa in simd() {
        p.forward_f32(isa, &x, shape, zx, &mut got).unwrap();
        assert_eq!(bits(&got), bits(&want), "conv_transpose f32");
    }
}

#[test]
fn output_type_must_match_the_epilogue() {
    let l = PackedLinear::with_epilogue(
        &[1, 2],
        1,
        2,
        &[0],
        Epilogue::Dequant {
            input_scale: 0.1,
            weight_scale: vec![0.2],
            relu: false,
        },
    )
    .unwrap();
    let e = l
        .forward(Isa::Scalar, &[0; 2], 1, 0, &mut [0u8; 1])
        .unwrap_err();
    assert!(
        matches!(e, KernelError::Invalid { arg: "output", .. }),
        "{e}"
    );
    assert!(
        l.forward_f32(Isa::Scalar, &[0; 2], 1, 0, &mut [0f32; 1])
            .is_ok()
    );
    let bad = Epilogue::Dequant {
        input_scale: f32::INFINITY,
        weight_scale: vec![0.2],
        relu: false,
    };
    assert!(matches!(
        PackedLinear::with_epilogue(&[1, 2], 1, 2, &[0], bad),
        Err(KernelError::Invalid {
            arg: "weight_scale",
            ..
        })
    ));
}

/// Distinct random sites (z, y, x) of a grid, about `fill` of it active.
fn random_sites(r: &mut ChaCha8Rng, grid: [usize; 3], fill: f64) -> Vec<[u32; 3]> {
    let mut sites = Vec::new();
    for z in 0..grid[0] {
        for y in 0..grid[1] {
            for x in 0..grid[2] {
                if r.random_bool(fill) {
                    sites.push([z as u32, y as u32, x as u32]);
                }
            }
        }
    }
    sites
}

/// The rulebooks of the voxel backbone: submanifold 3x3x3, strided 3x3x3 with and
/// without z padding, and the (3, 1, 1) stride-(2, 1, 1) conv_out.
fn sparse_geometries(r: &mut ChaCha8Rng) -> Vec<(String, Rulebook)> {
    let grid = [5, 9, 7];
    let sites = random_sites(r, grid, 0.3);
    vec![
        (
            "submanifold".into(),
            Rulebook::submanifold(&sites, grid, 3).unwrap(),
        ),
        (
            "strided".into(),
            Rulebook::regular(&sites, grid, [3; 3], [2; 3], [1; 3]).unwrap(),
        ),
        (
            "strided, z unpadded".into(),
            Rulebook::regular(&sites, grid, [3; 3], [2; 3], [0, 1, 1]).unwrap(),
        ),
        (
            "conv_out".into(),
            Rulebook::regular(&sites, grid, [3, 1, 1], [2, 1, 1], [0; 3]).unwrap(),
        ),
    ]
}

#[test]
fn sparse_conv_simd_is_bit_exact_with_the_reference() {
    let mut r = ChaCha8Rng::seed_from_u64(21);
    for (g, (name, rb)) in sparse_geometries(&mut r).into_iter().enumerate() {
        let k = rb.kernel();
        for (cin, cout) in [(5, 16), (3, 7), (16, 33)] {
            let taps = k.iter().product::<usize>();
            let zx = [0u8, 128, 201][g % 3];
            let l = Layer::random(&mut r, cout * taps * cin, cout, cin * taps / 3, zx);
            let x = random_input(&mut r, rb.n_in() * cin);
            let case = format!("{name}: cin {cin} cout {cout} zx {zx}");
            // Requantizing epilogue (ties too), then the dequantizing one.
            for rq in [l.requant(), tie_requant(cout, l.out.zero_point, l.relu)] {
                let p = PackedSparseConv::with_epilogue(
                    &l.w,
                    [cout, k[0], k[1], k[2], cin],
                    &l.bias_q(),
                    Epilogue::Requant(rq),
                )
                .unwrap();
                let mut want = vec![0u8; rb.n_out() * cout];
                let mut got = vec![0u8; want.len()];
                p.forward(Isa::Scalar, &x, &rb, zx, &mut want).unwrap();
                for isa in simd() {
                    p.forward(isa, &x, &rb, zx, &mut got).unwrap();
                    assert_eq!(got, want, "{case}");
                }
                let distinct = want.iter().collect::<std::collections::HashSet<_>>().len();
                assert!(distinct > 3, "{case}: outputs barely vary");
            }
            let p = PackedSparseConv::with_epilogue(
                &l.w,
                [cout, k[0], k[1], k[2], cin],
                &l.bias_q(),
                Epilogue::Dequant {
                    input_scale: l.s_x,
                    weight_scale: l.s_w.clone(),
                    relu: l.relu,
                },
            )
            .unwrap();
            let mut want = vec![0f32; rb.n_out() * cout];
            let mut got = vec![0f32; want.len()];
            p.forward_f32(Isa::Scalar, &x, &rb, zx, &mut want).unwrap();
            for isa in simd() {
                p.forward_f32(isa, &x, &rb, zx, &mut got).unwrap();
                assert_eq!(bits(&got), bits(&want), "{case} (f32 output)");
            }
        }
    }
}

/// The scalar sparse conv is the real sparse convolution of the dequantized operands,
/// computed in f64 straight from the rulebook's pairs.
#[test]
fn scalar_sparse_conv_is_the_dequantized_real_conv() {
    let mut r = ChaCha8Rng::seed_from_u64(22);
    for (name, rb) in sparse_geometries(&mut r) {
        let k = rb.kernel();
        let taps = k.iter().product::<usize>();
        let (cin, cout, zx) = (6, 5, 90u8);
        let l = Layer::random(&mut r, cout * taps * cin, cout, cin * taps / 3, zx);
        let p = PackedSparseConv::with_epilogue(
            &l.w,
            [cout, k[0], k[1], k[2], cin],
            &l.bias_q(),
            Epilogue::Requant(l.requant()),
        )
        .unwrap();
        let x = random_input(&mut r, rb.n_in() * cin);
        let mut got = vec![0u8; rb.n_out() * cout];
        p.forward(Isa::Scalar, &x, &rb, zx, &mut got).unwrap();
        let mut y: Vec<f64> = (0..rb.n_out() * cout)
            .map(|i| l.bias[i % cout] as f64)
            .collect();
        for (t, pairs) in rb.pairs().iter().enumerate() {
            for (&i, &o) in pairs.input.iter().zip(&pairs.output) {
                for co in 0..cout {
                    for ci in 0..cin {
                        let xv = l.x_real(x[i as usize * cin + ci]);
                        let wq = l.w[(co * taps + t) * cin + ci];
                        y[o as usize * cout + co] += xv * l.s_w[co] as f64 * wq as f64;
                    }
                }
            }
        }
        let want: Vec<i32> = y.iter().map(|&v| l.quantize_real(v)).collect();
        let frac = agreement(&got, &want, &name);
        assert!(frac > 0.97, "{name}: only {frac} of codes match exactly");
    }
}

#[test]
fn sparse_conv_arguments_are_checked() {
    let mut r = ChaCha8Rng::seed_from_u64(23);
    let (_, rb) = sparse_geometries(&mut r).remove(0);
    let l = Layer::random(&mut r, 2 * 27 * 3, 2, 81, 0);
    let p = PackedSparseConv::with_epilogue(
        &l.w,
        [2, 3, 3, 3, 3],
        &l.bias_q(),
        Epilogue::Requant(l.requant()),
    )
    .unwrap();
    let x = random_input(&mut r, rb.n_in() * 3);
    let mut out = vec![0u8; rb.n_out() * 2];
    for isa in Isa::ALL.into_iter().filter(|i| i.is_available()) {
        // Too few input rows for the rulebook.
        let e = p
            .forward(isa, &x[..x.len() - 3], &rb, 0, &mut out)
            .unwrap_err();
        assert!(
            matches!(e, KernelError::Length { arg: "input", .. }),
            "{e:?}"
        );
        // An output buffer of the wrong size.
        let e = p.forward(isa, &x, &rb, 0, &mut out[1..]).unwrap_err();
        assert!(
            matches!(e, KernelError::Length { arg: "output", .. }),
            "{e:?}"
        );
        // A rulebook of another kernel size.
        let (_, rb311) = sparse_geometries(&mut r).pop().unwrap();
        let e = p.forward(isa, &x, &rb311, 0, &mut out).unwrap_err();
        assert!(e.to_string().contains("kernel offsets"), "{e}");
        // The f32 entry point on a requantizing layer.
        let mut f = vec![0f32; out.len()];
        assert!(p.forward_f32(isa, &x, &rb, 0, &mut f).is_err());
    }
    // Weight shape mismatch.
    assert!(
        PackedSparseConv::with_epilogue(
            &l.w[..10],
            [2, 3, 3, 3, 3],
            &l.bias_q(),
            Epilogue::Requant(l.requant()),
        )
        .is_err()
    );
}
