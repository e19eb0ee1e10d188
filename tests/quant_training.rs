//! Fake-quant forward/backward (STE, LSQ), AdaRound and Adam, checked against the
//! scheme, finite differences in f64 and hand-computed updates; plus a small end-to-end
//! AdaRound run that must beat round-to-nearest.

use lidar_ptq::ops::Tensor;
use lidar_ptq::quant::adam::{Adam, cosine_lr};
use lidar_ptq::quant::adaround::{AdaRound, BetaSchedule, DEFAULT_REG_WEIGHT, rectified_sigmoid};
use lidar_ptq::quant::fake_quant::{
    GradScale, fake_quant, fake_quant_backward, fake_quant_per_channel,
    fake_quant_per_channel_backward, local_grad,
};
use lidar_ptq::quant::observers::per_channel_qparams;
use lidar_ptq::quant::{Flavour, Grid, QParams, QuantError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

fn normal(n: usize, sigma: f32, seed: u64) -> Vec<f32> {
    let d = Normal::new(0.0f32, sigma).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| d.sample(&mut r)).collect()
}

fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let d = Uniform::new(lo, hi).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| d.sample(&mut r)).collect()
}

#[test]
fn forward_is_the_scheme_elementwise() {
    let xs = normal(3000, 2.0, 1);
    let q = QParams::asymmetric(-1.5, 3.0, Grid::activation(8, Flavour::Asymmetric));
    let y = fake_quant(&xs, &q);
    for (x, y) in xs.iter().zip(&y) {
        assert_eq!(y.to_bits(), q.fake(*x).to_bits());
    }
    // Per channel along axis 0 (conv [Cout, Cin, k, k]) and 1 (transposed [Cin, Cout, k, k]).
    let t = Tensor::new(vec![3, 4, 2, 2], normal(48, 1.0, 2)).unwrap();
    for axis in [0usize, 1] {
        let qs = per_channel_qparams(&t, axis, Grid::weight(8), Flavour::Symmetric).unwrap();
        let y = fake_quant_per_channel(&t, axis, &qs).unwrap();
        for (i, (&x, &yv)) in t.data.iter().zip(&y.data).enumerate() {
            let c = if axis == 0 { i / 16 } else { (i / 4) % 4 };
            assert_eq!(yv.to_bits(), qs[c].fake(x).to_bits(), "axis {axis} i {i}");
        }
    }
    let qs = vec![QParams::symmetric(1.0, Grid::weight(8)); 2];
    assert!(matches!(
        fake_quant_per_channel(&t, 0, &qs),
        Err(QuantError::Length {
            field: "qparams",
            ..
        })
    ));
}

#[test]
fn straight_through_masks_clipped_values() {
    // Asymmetric u8, scale 0.1, zero point 10: real range [-1.0, 24.5].
    let q = QParams {
        scale: 0.1,
        zero_point: 10,
        grid: Grid::activation(8, Flavour::Asymmetric),
    };
    let xs = [-3.0f32, -1.04, -0.96, 0.0, 5.03, 24.46, 24.54, 100.0];
    let g = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
    let b = fake_quant_backward(&xs, &g, &q, GradScale::None).unwrap();
    assert_eq!(b.input, vec![0.0, 0.0, 3.0, 4.0, 5.0, 6.0, 0.0, 0.0]);
    // Clipped values contribute the grid bound (relative to the zero point).
    let (lo, hi) = (-10.0f64, 245.0f64);
    let inside: f64 = [(-0.96f32, 3.0), (0.0, 4.0), (5.03, 5.0), (24.46, 6.0)]
        .iter()
        .map(|&(x, w)| {
            let v = x as f64 / 0.1f32 as f64;
            w * (v.round() - v)
        })
        .sum();
    let want = 1.0 * lo + 2.0 * lo + 7.0 * hi + 8.0 * hi + inside;
    assert!(
        (b.scale[0] as f64 - want).abs() < 1e-3,
        "{} vs {want}",
        b.scale[0]
    );
    // LSQ gradient scale 1/sqrt(N * Q_P), Q_P = 245 here.
    let s = fake_quant_backward(&xs, &g, &q, GradScale::Lsq).unwrap();
    let k = 1.0 / (8.0f64 * 245.0).sqrt();
    assert!((s.scale[0] as f64 - b.scale[0] as f64 * k).abs() < 1e-5);
    assert_eq!(s.input, b.input);
}

/// `x_hat(s)` in f64 with LSQ's straight-through rounding: the rounding residual is
/// frozen at `s0`, so away from ties the derivative is LSQ's step-size gradient.
fn surrogate(x: f64, s: f64, s0: f64, lo: f64, hi: f64) -> f64 {
    let v0 = x / s0;
    let c = v0.round() - v0;
    let v = x / s;
    if v < lo {
        s * lo
    } else if v > hi {
        s * hi
    } else {
        s * (v + c)
    }
}

/// The real forward in f64: `s * clamp(round(x / s))`.
fn real_fake(x: f64, s: f64, lo: f64, hi: f64) -> f64 {
    s * (x / s).round().clamp(lo, hi)
}

#[test]
fn scale_gradient_matches_finite_differences() {
    let grid = Grid::weight(8);
    let q = QParams::symmetric(2.0, grid);
    let (s0, lo, hi) = (q.scale as f64, -127.0, 127.0);
    // Points away from rounding ties and from the clipping boundary.
    let mut xs: Vec<f32> = uniform(400, -3.0, 3.0, 3)
        .into_iter()
        .filter(|&x| {
            let v = x as f64 / s0;
            (v - v.floor() - 0.5).abs() > 0.05 && (v.abs() - 127.0).abs() > 0.6
        })
        .collect();
    xs.extend([-2.5f32, 2.9]);
    let h = 1e-6 * s0;
    for &x in &xs {
        let (pass, ds) = local_grad(x, &q);
        let xd = x as f64;
        let fd =
            (surrogate(xd, s0 + h, s0, lo, hi) - surrogate(xd, s0 - h, s0, lo, hi)) / (2.0 * h);
        assert!((ds as f64 - fd).abs() < 1e-4, "x {x}: {ds} vs {fd}");
        assert_eq!(pass, (xd / s0).abs() <= 127.0);
        if !pass {
            // Clipped: the real forward is s * bound, its derivative the bound itself.
            let fd = (real_fake(xd, s0 + h, lo, hi) - real_fake(xd, s0 - h, lo, hi)) / (2.0 * h);
            assert!((ds as f64 - fd).abs() < 1e-4, "clipped x {x}: {ds} vs {fd}");
        }
    }
    // The summed gradient of L = sum g_i * x_hat_i.
    let g = normal(xs.len(), 1.0, 4);
    let b = fake_quant_backward(&xs, &g, &q, GradScale::None).unwrap();
    let loss = |s: f64| -> f64 {
        xs.iter()
            .zip(&g)
            .map(|(&x, &gi)| gi as f64 * surrogate(x as f64, s, s0, lo, hi))
            .sum()
    };
    let fd = (loss(s0 + h) - loss(s0 - h)) / (2.0 * h);
    assert!((b.scale[0] as f64 - fd).abs() < 1e-3 * fd.abs().max(1.0));
}

#[test]
fn per_channel_backward_equals_per_tensor_backward_per_channel() {
    let t = Tensor::new(vec![2, 3, 4], normal(24, 1.0, 5)).unwrap();
    let qs: Vec<QParams> = [0.5f32, 1.0, 2.0]
        .iter()
        .map(|&m| QParams::symmetric(m, Grid::weight(4)))
        .collect();
    let g = normal(24, 1.0, 6);
    let b = fake_quant_per_channel_backward(&t, 1, &qs, &g, GradScale::Lsq).unwrap();
    for (c, qc) in qs.iter().enumerate() {
        let idx: Vec<usize> = (0..24).filter(|i| (i / 4) % 3 == c).collect();
        let xs: Vec<f32> = idx.iter().map(|&i| t.data[i]).collect();
        let gs: Vec<f32> = idx.iter().map(|&i| g[i]).collect();
        let want = fake_quant_backward(&xs, &gs, qc, GradScale::Lsq).unwrap();
        assert!((b.scale[c] - want.scale[0]).abs() < 1e-6);
        for (k, &i) in idx.iter().enumerate() {
            assert_eq!(b.input[i], want.input[k]);
        }
    }
}

fn weights_and_qparams(seed: u64) -> (Tensor, Vec<QParams>) {
    let t = Tensor::new(vec![4, 3, 3], normal(36, 0.2, seed)).unwrap();
    let mut qs = per_channel_qparams(&t, 0, Grid::weight(4), Flavour::Symmetric).unwrap();
    // Channel 3 gets a narrower range, so some of its weights clamp.
    qs[3].scale *= 0.5;
    (t, qs)
}

#[test]
fn adaround_init_reproduces_the_weights() {
    let (t, qs) = weights_and_qparams(7);
    let ada = AdaRound::new(&t, 0, &qs).unwrap();
    let soft = ada.soft_weights();
    let mut clamped = 0;
    for (i, (&w, &wh)) in t.data.iter().zip(&soft).enumerate() {
        let s = qs[i / 9].scale;
        let want = w.clamp(-7.0 * s, 7.0 * s);
        clamped += (want != w) as usize;
        assert!(
            (wh - want).abs() <= 1e-5 * s.max(w.abs()) + 1e-6,
            "{i}: {wh} vs {want}"
        );
    }
    assert!(clamped > 0, "the narrowed channel exercises clamping");
    // Hardening at init is round-to-nearest (away from ties).
    let codes = ada.hard_codes();
    for (i, (&w, &c)) in t.data.iter().zip(&codes).enumerate() {
        let q = &qs[i / 9];
        let r = w / q.scale;
        if (r - r.floor() - 0.5).abs() > 1e-3 {
            assert_eq!(c, q.quantize(w), "{i}");
        }
    }
    let hw = ada.hard_weights();
    for (i, (&c, &h)) in codes.iter().zip(&hw).enumerate() {
        assert_eq!(h, qs[i / 9].dequantize(c));
    }
}

fn h64(v: f64) -> f64 {
    (1.0 / (1.0 + (-v).exp()) * 1.2 - 0.1).clamp(0.0, 1.0)
}

#[test]
fn adaround_gradients_match_finite_differences() {
    let (t, qs) = weights_and_qparams(8);
    let mut ada = AdaRound::new(&t, 0, &qs).unwrap();
    // Rounding variables well inside the rectified sigmoid's linear part.
    ada.v = uniform(36, -2.0, 2.0, 9)
        .into_iter()
        .map(|v| if v.abs() < 0.05 { 0.3 } else { v })
        .collect();
    let c = normal(36, 1.0, 10);
    let floors: Vec<f64> = t
        .data
        .iter()
        .enumerate()
        .map(|(i, &w)| (w / qs[i / 9].scale).floor() as f64)
        .collect();
    let w_hat = |i: usize, v: f64| {
        let s = qs[i / 9].scale as f64;
        s * (floors[i] + h64(v)).clamp(-7.0, 7.0)
    };
    let g = ada.backward(&c).unwrap();
    let h = 1e-5;
    for i in 0..36 {
        let v = ada.v[i] as f64;
        let code = floors[i] + h64(v);
        if (code.abs() - 7.0).abs() < 0.05 {
            continue; // at the clamp boundary the derivative is one-sided
        }
        let fd = c[i] as f64 * (w_hat(i, v + h) - w_hat(i, v - h)) / (2.0 * h);
        assert!(
            (g[i] as f64 - fd).abs() < 1e-4 * fd.abs().max(1e-2),
            "{i}: {} vs {fd}",
            g[i]
        );
    }
    for beta in [20.0f32, 7.5, 2.0] {
        let mut rg = vec![0.0f32; 36];
        ada.add_regularizer_grad(beta, 0.5, &mut rg).unwrap();
        let reg = |v: f64| 1.0 - (2.0 * h64(v) - 1.0).abs().powf(beta as f64);
        let total: f64 = ada.v.iter().map(|&v| reg(v as f64)).sum();
        assert!((ada.regularizer(beta) - total).abs() < 1e-4);
        for (i, &rgi) in rg.iter().enumerate() {
            let v = ada.v[i] as f64;
            let fd = 0.5 * (reg(v + h) - reg(v - h)) / (2.0 * h);
            assert!(
                (rgi as f64 - fd).abs() < 1e-3 * fd.abs().max(1e-3),
                "beta {beta} {i}: {} vs {fd}",
                rgi
            );
        }
    }
}

#[test]
fn beta_schedule_values() {
    let s = BetaSchedule::new(100);
    assert_eq!(s.warmup_iters(), 20);
    assert!((0..20).all(|i| s.beta(i).is_none()));
    assert_eq!(s.beta(20), Some(20.0));
    assert_eq!(s.beta(60), Some(11.0));
    assert!((s.beta(99).unwrap() - 2.225).abs() < 1e-6);
    assert_eq!(s.beta(100), Some(2.0));
    assert_eq!(s.beta(500), Some(2.0));
}

#[test]
fn hardening_rounds_up_iff_v_is_non_negative() {
    let (t, qs) = weights_and_qparams(11);
    let mut ada = AdaRound::new(&t, 0, &qs).unwrap();
    ada.v = uniform(36, -6.0, 6.0, 12);
    ada.v[0] = 0.0;
    let codes = ada.hard_codes();
    for (i, (&w, &c)) in t.data.iter().zip(&codes).enumerate() {
        let s = qs[i / 9].scale;
        let f = (w / s).floor() as i32;
        let up = ada.v[i] >= 0.0;
        assert_eq!(c, (f + up as i32).clamp(-7, 7), "{i}");
        assert!(c == f.clamp(-7, 7) || c == (f + 1).clamp(-7, 7));
        if ada.v[i].abs() > 1e-3 {
            assert_eq!(up, rectified_sigmoid(ada.v[i]) >= 0.5);
        }
    }
    assert!((rectified_sigmoid(0.0) - 0.5).abs() < 1e-6);
}

#[test]
fn adam_and_cosine_match_hand_computation() {
    let mut a = Adam::new(1);
    let mut p = [1.0f32];
    let want = [0.900000002f64, 0.9366103542405654, 0.9502794203389762];
    for (g, w) in [0.5f32, -1.0, 0.25].iter().zip(want) {
        a.step(&mut p, &[*g], 0.1).unwrap();
        assert!((p[0] as f64 - w).abs() < 1e-6, "{} vs {w}", p[0]);
    }
    assert_eq!(a.steps(), 3);
    assert!(a.step(&mut p, &[f32::NAN], 0.1).is_err());
    assert!(a.step(&mut [0.0, 0.0], &[0.0, 0.0], 0.1).is_err());
    assert_eq!(cosine_lr(1.0, 0.0, 0, 100), 1.0);
    assert!((cosine_lr(1.0, 0.0, 25, 100) - 0.853_553_4).abs() < 1e-6);
    assert!((cosine_lr(1.0, 0.0, 50, 100) - 0.5).abs() < 1e-6);
    assert!((cosine_lr(4e-5, 1e-6, 100, 100) - 1e-6).abs() < 1e-12);
    assert!((cosine_lr(4e-5, 1e-6, 300, 100) - 1e-6).abs() < 1e-12);
}

/// `||(W' - W) X||^2` for W [out, inp] (row-major) and X [inp, n], in f64.
fn recon_error(w_q: &[f32], w: &[f32], x: &[f32], out: usize, inp: usize, n: usize) -> f64 {
    let mut e = 0.0;
    for o in 0..out {
        for k in 0..n {
            let d: f64 = (0..inp)
                .map(|j| (w_q[o * inp + j] - w[o * inp + j]) as f64 * x[j * n + k] as f64)
                .sum();
            e += d * d;
        }
    }
    e
}

/// A linear layer quantized to 4 bits: AdaRound with Adam on the reconstruction error
/// beats round-to-nearest.
#[test]
fn adaround_beats_round_to_nearest_on_a_linear_layer() {
    let (out, inp, n) = (8usize, 32usize, 256usize);
    let w = Tensor::new(vec![out, inp], normal(out * inp, 0.1, 13)).unwrap();
    let x = normal(inp * n, 1.0, 14);
    let qs = per_channel_qparams(&w, 0, Grid::weight(4), Flavour::Symmetric).unwrap();
    let rtn = fake_quant_per_channel(&w, 0, &qs).unwrap();
    let e_rtn = recon_error(&rtn.data, &w.data, &x, out, inp, n);

    // Loss: mean over samples of the squared output error (as BRECQ / AdaRound do, so
    // the default regulariser weight has its intended relative strength).
    // Gram matrix G = X X^T / n: dL/dW_hat = 2 (W_hat - W) G.
    let mut gram = vec![0f32; inp * inp];
    for a in 0..inp {
        for b in 0..inp {
            gram[a * inp + b] = (0..n).map(|k| x[a * n + k] * x[b * n + k]).sum::<f32>() / n as f32;
        }
    }
    let iters = 2000;
    let sched = BetaSchedule::new(iters);
    let mut ada = AdaRound::new(&w, 0, &qs).unwrap();
    let mut adam = Adam::new(ada.len());
    for it in 0..iters {
        let wh = ada.soft_weights();
        let mut gw = vec![0f32; out * inp];
        for o in 0..out {
            for b in 0..inp {
                gw[o * inp + b] = 2.0
                    * (0..inp)
                        .map(|a| (wh[o * inp + a] - w.data[o * inp + a]) * gram[a * inp + b])
                        .sum::<f32>();
            }
        }
        let mut gv = ada.backward(&gw).unwrap();
        if let Some(beta) = sched.beta(it) {
            ada.add_regularizer_grad(beta, DEFAULT_REG_WEIGHT, &mut gv)
                .unwrap();
        }
        let mut v = std::mem::take(&mut ada.v);
        adam.step(&mut v, &gv, 3e-2).unwrap();
        ada.v = v;
    }
    let e_ada = recon_error(&ada.hard_weights(), &w.data, &x, out, inp, n);
    // The annealed regulariser has driven h(V) to {0, 1}: hardening changes little.
    assert!(ada.regularizer(2.0) < 0.02 * ada.len() as f64);
    assert!(
        e_ada < 0.95 * e_rtn,
        "adaround {e_ada} vs round-to-nearest {e_rtn}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let t = Tensor::new(vec![2, 3], vec![0.1, -0.2, 0.3, 0.4, f32::INFINITY, 0.0]).unwrap();
    let qs = vec![QParams::symmetric(1.0, Grid::weight(8)); 2];
    assert!(matches!(
        AdaRound::new(&t, 0, &qs),
        Err(QuantError::NonFinite { index: 4, .. })
    ));
    let t = Tensor::new(vec![2, 3], vec![0.1; 6]).unwrap();
    let mut zero = qs.clone();
    zero[1].scale = 0.0;
    assert!(matches!(
        AdaRound::new(&t, 0, &zero),
        Err(QuantError::Param { field: "scale", .. })
    ));
    assert!(matches!(
        AdaRound::new(&t, 2, &qs),
        Err(QuantError::Axis { axis: 2, .. })
    ));
    let ada = AdaRound::new(&t, 0, &qs).unwrap();
    assert!(matches!(
        ada.backward(&[0.0; 5]),
        Err(QuantError::Length {
            expected: 6,
            got: 5,
            ..
        })
    ));
    let q = qs[0];
    assert!(fake_quant_backward(&[1.0, 2.0], &[1.0], &q, GradScale::None).is_err());
    assert!(
        fake_quant_per_channel_backward(&t, 1, &qs, &[0.0; 6], GradScale::None).is_err(),
        "3 channels along axis 1, 2 qparams"
    );
}

/// LSQ step-size learning (rounding frozen at nearest): Adam with cosine decay on the
/// mean squared fake-quant error of heavy-tailed data moves the 4-bit step size from its
/// min-max start to (about) the best clipping the grid search finds for p = 2.
#[test]
fn lsq_step_size_learning_reduces_the_quantization_error() {
    use lidar_ptq::quant::grid_search::GridSearch;
    let d = rand_distr::StudentT::new(3.0f32).unwrap();
    let mut r = ChaCha8Rng::seed_from_u64(15);
    let xs: Vec<f32> = (0..4000).map(|_| d.sample(&mut r)).collect();
    let grid = Grid::weight(4);
    let max_abs = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
    let mse = |q: &QParams| -> f64 {
        xs.iter()
            .map(|&x| ((q.fake(x) - x) as f64).powi(2))
            .sum::<f64>()
            / xs.len() as f64
    };
    let q0 = QParams::symmetric(max_abs, grid);
    let mut q = q0;
    let iters = 300;
    let mut adam = Adam::new(1);
    let base_lr = 0.02 * q0.scale;
    for it in 0..iters {
        let g: Vec<f32> = xs
            .iter()
            .map(|&x| 2.0 * (q.fake(x) - x) / xs.len() as f32)
            .collect();
        let b = fake_quant_backward(&xs, &g, &q, GradScale::None).unwrap();
        let mut s = [q.scale];
        adam.step(&mut s, &b.scale, cosine_lr(base_lr, 0.0, it, iters))
            .unwrap();
        q.scale = s[0];
    }
    let best_grid = GridSearch {
        p: 2.0,
        ..GridSearch::default()
    }
    .search(&xs, -max_abs, max_abs, grid, Flavour::Symmetric)
    .unwrap();
    let (m0, m1, mg) = (mse(&q0), mse(&q), mse(&best_grid.qparams));
    assert!(m1 < 0.7 * m0, "lsq {m1} vs min-max {m0}");
    assert!(m1 < 1.05 * mg, "lsq {m1} vs best grid candidate {mg}");
}
