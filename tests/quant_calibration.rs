//! Calibration statistics (observers) and the Lp clipping grid search, checked against
//! sorting, naive f64 KL and brute-force f64 references.

use lidar_ptq::ops::Tensor;
use lidar_ptq::quant::grid_search::GridSearch;
use lidar_ptq::quant::observers::{
    Entropy, MinMax, Observer, ObserverKind, Percentile, kl_candidate, kl_threshold,
    per_channel_minmax, per_channel_qparams,
};
use lidar_ptq::quant::{Flavour, Grid, QParams, QuantError};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, StudentT, Uniform};

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn gaussian(n: usize, seed: u64) -> Vec<f32> {
    let d = Normal::new(0.0f32, 1.0).unwrap();
    let mut r = rng(seed);
    (0..n).map(|_| d.sample(&mut r)).collect()
}

fn uniform(n: usize, lo: f32, hi: f32, seed: u64) -> Vec<f32> {
    let d = Uniform::new(lo, hi).unwrap();
    let mut r = rng(seed);
    (0..n).map(|_| d.sample(&mut r)).collect()
}

/// 90% exact zeros, the rest |N(0, 1)| (a post-ReLU BEV map).
fn sparse_bev(n: usize, seed: u64) -> Vec<f32> {
    let d = Normal::new(0.0f32, 1.0).unwrap();
    let mut r = rng(seed);
    let u = Uniform::new(0.0f32, 1.0).unwrap();
    (0..n)
        .map(|_| {
            if u.sample(&mut r) < 0.9 {
                0.0
            } else {
                d.sample(&mut r).abs()
            }
        })
        .collect()
}

/// Feeds `xs` in uneven batches.
fn feed(o: &mut dyn Observer, xs: &[f32]) {
    let mut i = 0;
    let mut b = 1;
    while i < xs.len() {
        let j = (i + b).min(xs.len());
        o.observe(&xs[i..j]).unwrap();
        i = j;
        b = b * 3 + 7;
    }
}

/// Nearest-rank percentile of a sorted slice.
fn nearest_rank(sorted: &[f32], q: f64) -> f32 {
    let n = sorted.len();
    let r = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[r - 1]
}

#[test]
fn min_max_streams_and_rejects_bad_input() {
    let xs = uniform(10_000, -3.0, 5.0, 1);
    let mut o = MinMax::new();
    assert_eq!(
        o.finish(Grid::weight(8), Flavour::Symmetric),
        Err(QuantError::Empty {
            what: "min-max observer"
        })
    );
    feed(&mut o, &xs);
    let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(o.range(), Some((lo, hi)));
    let g = Grid::activation(8, Flavour::Asymmetric);
    assert_eq!(
        o.finish(g, Flavour::Asymmetric).unwrap(),
        QParams::asymmetric(lo, hi, g)
    );
    let err = o.observe(&[1.0, f32::NAN]).unwrap_err();
    assert!(matches!(err, QuantError::NonFinite { index: 1, .. }));
    assert_eq!(
        o.range(),
        Some((lo, hi)),
        "a rejected batch changes nothing"
    );
}

#[test]
fn histograms_do_not_depend_on_batch_order() {
    let mut xs = gaussian(20_000, 2);
    xs.extend(uniform(100, -40.0, 40.0, 3));
    let mut a = Percentile::new(99.9, false, 1024).unwrap();
    feed(&mut a, &xs);
    let mut b = Percentile::new(99.9, false, 1024).unwrap();
    let mut rev = xs.clone();
    rev.reverse();
    b.observe(&rev).unwrap();
    assert_eq!(a.histogram(), b.histogram());
}

#[test]
fn percentile_matches_sorting_within_one_bin() {
    let bins = 1 << 12;
    let mut cases = vec![
        ("gaussian", gaussian(50_000, 4)),
        ("uniform", uniform(50_000, -2.0, 7.0, 5)),
    ];
    let mut heavy = gaussian(50_000, 6);
    heavy.extend([250.0, -90.0, 31.0]);
    cases.push(("gaussian+outliers", heavy));
    for (name, xs) in &cases {
        for p in [50.0, 99.0, 99.9, 99.99] {
            let mut o = Percentile::new(p, false, bins).unwrap();
            feed(&mut o, xs);
            let max_abs = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
            let tol = 2.0 * max_abs / bins as f32;

            let mut mags: Vec<f32> = xs.iter().map(|v| v.abs()).collect();
            mags.sort_by(f32::total_cmp);
            let (_, t) = o.clip_range(Flavour::Symmetric).unwrap();
            let want = nearest_rank(&mags, p / 100.0);
            assert!((t - want).abs() <= tol, "{name} p{p}: {t} vs {want}");

            let mut sorted = xs.clone();
            sorted.sort_by(f32::total_cmp);
            let (lo, hi) = o.clip_range(Flavour::Asymmetric).unwrap();
            let (wlo, whi) = (
                nearest_rank(&sorted, 1.0 - p / 100.0),
                nearest_rank(&sorted, p / 100.0),
            );
            assert!((hi - whi).abs() <= tol, "{name} p{p} hi: {hi} vs {whi}");
            assert!((lo - wlo).abs() <= tol, "{name} p{p} lo: {lo} vs {wlo}");
        }
    }
}

#[test]
fn percentile_sparsity_switch_counts_or_ignores_zeros() {
    let xs = sparse_bev(100_000, 7);
    let bins = 1 << 14;
    for sparsity_aware in [false, true] {
        let mut o = Percentile::new(95.0, sparsity_aware, bins).unwrap();
        feed(&mut o, &xs);
        let mut vals: Vec<f32> = xs
            .iter()
            .copied()
            .filter(|&v| !sparsity_aware || v != 0.0)
            .collect();
        vals.sort_by(f32::total_cmp);
        let want = nearest_rank(&vals, 0.95);
        let (_, t) = o.clip_range(Flavour::Symmetric).unwrap();
        let tol = 2.0 * vals.last().unwrap() / bins as f32;
        assert!((t - want).abs() <= tol, "{sparsity_aware}: {t} vs {want}");
    }
    // 95% of all entries is deep in the non-zero tail's lower half; over the non-zero
    // entries alone it is ~1.96 sigma.
    let mut all = Percentile::new(95.0, false, bins).unwrap();
    let mut nz = Percentile::new(95.0, true, bins).unwrap();
    all.observe(&xs).unwrap();
    nz.observe(&xs).unwrap();
    let t_all = all.clip_range(Flavour::Symmetric).unwrap().1;
    let t_nz = nz.clip_range(Flavour::Symmetric).unwrap().1;
    assert!(t_all < 0.5 * t_nz, "{t_all} vs {t_nz}");
}

/// TensorRT's KL search written out naively in f64 from its description.
fn naive_kl(bins: &[u64], i: usize, levels: usize) -> f64 {
    let total: f64 = bins.iter().map(|&b| b as f64).sum();
    let mut p = vec![0f64; i];
    for j in 0..bins.len() {
        p[j.min(i - 1)] += bins[j] as f64;
    }
    let group_of = |j: usize| (j / (i / levels)).min(levels - 1);
    let mut mass = vec![0f64; levels];
    let mut nonzero = vec![0f64; levels];
    for j in 0..i {
        mass[group_of(j)] += bins[j] as f64;
        if p[j] > 0.0 {
            nonzero[group_of(j)] += 1.0;
        }
    }
    let q: Vec<f64> = (0..i)
        .map(|j| {
            if p[j] > 0.0 {
                mass[group_of(j)] / nonzero[group_of(j)]
            } else {
                0.0
            }
        })
        .collect();
    let qt: f64 = q.iter().sum();
    let mut kl = 0.0;
    for j in 0..i {
        if p[j] > 0.0 {
            if q[j] == 0.0 {
                return f64::INFINITY;
            }
            kl += p[j] / total * ((p[j] / total) / (q[j] / qt)).ln();
        }
    }
    kl
}

#[test]
fn kl_matches_naive_reference() {
    let mut r = rng(8);
    let d = Uniform::new(0u64, 50).unwrap();
    for case in 0..20 {
        let n = 64;
        // Some empty bins, a heavy first bin and a tail, to exercise every branch.
        let mut bins: Vec<u64> = (0..n)
            .map(|j| {
                let v = d.sample(&mut r);
                if v < 12 { 0 } else { v * (n - j) }
            })
            .collect();
        bins[0] += 500 * case;
        for levels in [4, 8, 16] {
            let (best, divs) = kl_threshold(&bins, levels).unwrap();
            let mut want_best = levels;
            for i in levels..=n as usize {
                let got = kl_candidate(&bins, i, levels);
                let want = naive_kl(&bins, i, levels);
                assert_eq!(divs[i - levels], got);
                if want.is_infinite() {
                    assert!(got.is_infinite(), "case {case} i {i}");
                } else {
                    assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0));
                }
                if want < naive_kl(&bins, want_best, levels) {
                    want_best = i;
                }
            }
            assert_eq!(best, want_best, "case {case} levels {levels}");
        }
    }
    assert!(kl_threshold(&[0; 8], 4).is_err());
    assert!(kl_threshold(&[1; 8], 16).is_err());
}

fn entropy_threshold(xs: &[f32], sparsity_aware: bool, flavour: Flavour) -> f32 {
    let mut o = Entropy::new(sparsity_aware, Entropy::DEFAULT_BINS).unwrap();
    feed(&mut o, xs);
    o.threshold(Grid::activation(8, flavour), flavour).unwrap()
}

#[test]
fn entropy_on_known_distributions() {
    // Uniform: nothing is worth clipping; the threshold sits at the top of the data.
    let u = uniform(200_000, -1.0, 1.0, 9);
    let t = entropy_threshold(&u, false, Flavour::Symmetric);
    assert!(t > 0.95 && t <= 1.0, "uniform threshold {t}");
    // Gaussian: the bulk (several sigma) is kept.
    let g = gaussian(200_000, 10);
    let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
    let t = entropy_threshold(&g, false, Flavour::Symmetric);
    assert!(t > 3.0 && t <= max, "gaussian threshold {t} (max {max})");
    // A handful of far outliers is clipped away rather than stretching the range 12x.
    let mut go = g.clone();
    go.extend([60.0, -55.0, 58.0, 61.0]);
    let t_out = entropy_threshold(&go, false, Flavour::Symmetric);
    assert!(
        t_out > 3.0 && t_out < 10.0,
        "gaussian+outliers threshold {t_out}"
    );
    // The threshold defines the quantizer the observer returns.
    let mut o = Entropy::new(false, Entropy::DEFAULT_BINS).unwrap();
    o.observe(&g).unwrap();
    let grid = Grid::activation(8, Flavour::Symmetric);
    assert_eq!(
        o.finish(grid, Flavour::Symmetric).unwrap(),
        QParams::symmetric(t, grid)
    );
}

/// The LiDAR-PTQ failure: over all entries of a ~90%-zero map the zeros dominate the
/// histogram and KL picks a tiny range; over the non-zero entries it does not.
#[test]
fn entropy_all_entries_collapses_on_sparse_maps() {
    let xs = sparse_bev(300_000, 11);
    let t_all = entropy_threshold(&xs, false, Flavour::Asymmetric);
    let t_nz = entropy_threshold(&xs, true, Flavour::Asymmetric);
    assert!(t_all < 0.5 * t_nz, "all entries {t_all}, non-zero {t_nz}");
    // Non-zero-only behaves like the dense |N(0,1)| tail: a few sigma.
    assert!(t_nz > 2.0, "non-zero threshold {t_nz}");
    let kind = ObserverKind::Entropy {
        sparsity_aware: true,
    };
    let mut o = kind.build().unwrap();
    o.observe(&xs).unwrap();
    let g = Grid::activation(8, Flavour::Asymmetric);
    let q = o.finish(g, Flavour::Asymmetric).unwrap();
    assert_eq!(q.zero_point, 0);
    assert!((q.real_range().1 - t_nz).abs() <= q.scale);
}

#[test]
fn per_channel_minmax_matches_naive_loops() {
    let shape = [3usize, 4, 2, 2];
    let t = Tensor::from_fn(&shape, |i| ((i * 37 % 23) as f32 - 11.0) * 0.3);
    for axis in 0..4 {
        let got = per_channel_minmax(&t, axis).unwrap();
        assert_eq!(got.len(), shape[axis]);
        for (c, &(lo, hi)) in got.iter().enumerate() {
            let (mut wlo, mut whi) = (f32::INFINITY, f32::NEG_INFINITY);
            for a in 0..3 {
                for b in 0..4 {
                    for h in 0..2 {
                        for w in 0..2 {
                            let idx = [a, b, h, w];
                            if idx[axis] != c {
                                continue;
                            }
                            let v = t.data[((a * 4 + b) * 2 + h) * 2 + w];
                            wlo = wlo.min(v);
                            whi = whi.max(v);
                        }
                    }
                }
            }
            assert_eq!((lo, hi), (wlo, whi), "axis {axis} channel {c}");
        }
    }
    let qs = per_channel_qparams(&t, 1, Grid::weight(8), Flavour::Symmetric).unwrap();
    assert_eq!(qs.len(), 4);
    assert!(matches!(
        per_channel_minmax(&t, 4),
        Err(QuantError::Axis { axis: 4, .. })
    ));
}

/// `sum |x - fake(x)|^p` with the candidate's parameters, the fake evaluated in f64.
fn ref_loss(xs: &[f32], q: &QParams, p: f64) -> f64 {
    let (s, zp) = (q.scale as f64, q.zero_point as f64);
    let (lo, hi) = (q.grid.qmin as f64 - zp, q.grid.qmax as f64 - zp);
    xs.iter()
        .map(|&x| {
            let code = (x as f64 / s).round_ties_even().clamp(lo, hi);
            (x as f64 - s * code).abs().powf(p)
        })
        .sum()
}

fn heavy_tailed(n: usize, seed: u64) -> Vec<f32> {
    let d = StudentT::new(3.0f32).unwrap();
    let mut r = rng(seed);
    (0..n).map(|_| d.sample(&mut r)).collect()
}

#[test]
fn grid_search_picks_the_brute_force_minimum() {
    let gs = GridSearch::default();
    for (seed, flavour, bits) in [
        (12, Flavour::Asymmetric, 8),
        (13, Flavour::Symmetric, 8),
        (16, Flavour::Asymmetric, 4),
        (17, Flavour::Symmetric, 4),
    ] {
        let mut xs = heavy_tailed(4000, seed);
        xs.iter_mut().step_by(3).for_each(|v| *v = v.abs());
        let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
        let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let grid = Grid::activation(bits, flavour);
        let got = gs.search(&xs, lo, hi, grid, flavour).unwrap();
        let losses: Vec<f64> = (0..80)
            .map(|i| {
                let alpha = 1.0 - 0.01 * i as f32;
                let q = match flavour {
                    Flavour::Asymmetric => QParams::asymmetric(alpha * lo, alpha * hi, grid),
                    Flavour::Symmetric => QParams::symmetric(alpha * lo.abs().max(hi), grid),
                };
                ref_loss(&xs, &q, 2.4)
            })
            .collect();
        let best = losses.iter().cloned().fold(f64::INFINITY, f64::min);
        let got_ref = ref_loss(&xs, &got.qparams, 2.4);
        assert!(got_ref <= best * (1.0 + 1e-6), "{got_ref} vs {best}");
        assert!((got.loss - got_ref).abs() <= 1e-4 * got_ref);
        // Heavy tails on a coarse grid: clipping clearly beats plain min-max.
        if bits == 4 {
            assert!(got.alpha < 0.9, "{flavour:?} alpha {}", got.alpha);
            assert!(
                got_ref < 0.8 * losses[0],
                "{got_ref} vs min-max {}",
                losses[0]
            );
        }
    }
}

#[test]
fn grid_search_on_a_cached_subset_keeps_the_full_range_semantics() {
    // Uniform data: no clipping helps; the full range (alpha 1) or close to it wins.
    let xs = uniform(5000, 0.0, 4.0, 14);
    let g = Grid::activation(8, Flavour::Asymmetric);
    let r = GridSearch::default()
        .search(&xs[..1000], 0.0, 4.0, g, Flavour::Asymmetric)
        .unwrap();
    assert!(r.alpha >= 0.98, "alpha {}", r.alpha);
    assert!(matches!(
        GridSearch::default().search(&[], 0.0, 1.0, g, Flavour::Asymmetric),
        Err(QuantError::Empty { .. })
    ));
    let bad = GridSearch {
        candidates: 200,
        ..GridSearch::default()
    };
    assert!(matches!(
        bad.search(&xs, 0.0, 4.0, g, Flavour::Asymmetric),
        Err(QuantError::Param { field: "step", .. })
    ));
}

#[test]
fn grid_search_per_channel_equals_per_channel_searches() {
    let vals = heavy_tailed(4 * 2 * 3 * 3, 15);
    for axis in [0usize, 1] {
        let t = Tensor::new(vec![4, 2, 3, 3], vals.clone()).unwrap();
        let gs = GridSearch::default();
        let res = gs
            .search_per_channel(&t, axis, Grid::weight(8), Flavour::Symmetric)
            .unwrap();
        assert_eq!(res.len(), t.shape[axis]);
        for (c, r) in res.iter().enumerate() {
            let ch: Vec<f32> = (0..t.data.len())
                .filter(|&i| {
                    let idx = if axis == 0 { i / 18 } else { (i / 9) % 2 };
                    idx == c
                })
                .map(|i| t.data[i])
                .collect();
            let lo = ch.iter().cloned().fold(f32::INFINITY, f32::min);
            let hi = ch.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let want = gs
                .search(&ch, lo, hi, Grid::weight(8), Flavour::Symmetric)
                .unwrap();
            assert_eq!(*r, want, "axis {axis} channel {c}");
        }
    }
}

/// The input-aware weight search against a brute force over the candidates in f64:
/// `sum importance[in(i)] * |w_i - q(w_i)|^p` per output channel, for both weight layouts
/// (conv: out axis 0, in axis 1; transposed conv: the other way round).
#[test]
fn weighted_grid_search_picks_the_brute_force_minimum() {
    let gs = GridSearch::default();
    let vals = heavy_tailed(6 * 5 * 3 * 3, 31);
    let t = Tensor::new(vec![6, 5, 3, 3], vals).unwrap();
    let importance = [0.01, 4.0, 0.0, 1.0, 250.0];
    let grid = Grid::weight(4);
    for (axis, in_axis) in [(0usize, 1usize), (1, 0)] {
        let n_in = t.shape[in_axis];
        let imp: Vec<f64> = importance.iter().cycle().take(n_in).copied().collect();
        let got = gs
            .search_per_channel_weighted(&t, axis, in_axis, &imp, grid, Flavour::Symmetric)
            .unwrap();
        assert_eq!(got.len(), t.shape[axis]);
        let index = |i: usize, ax: usize| {
            let inner: usize = t.shape[ax + 1..].iter().product();
            (i / inner) % t.shape[ax]
        };
        for (c, r) in got.iter().enumerate() {
            let members: Vec<usize> = (0..t.data.len()).filter(|&i| index(i, axis) == c).collect();
            let max_abs = members.iter().map(|&i| t.data[i].abs()).fold(0.0, f32::max);
            let loss = |q: &QParams| -> f64 {
                members
                    .iter()
                    .map(|&i| imp[index(i, in_axis)] * ref_loss(&[t.data[i]], q, 2.4))
                    .sum()
            };
            let best = (0..gs.candidates)
                .map(|k| loss(&QParams::symmetric(gs.alpha(k) * max_abs, grid)))
                .fold(f64::INFINITY, f64::min);
            let got_loss = loss(&r.qparams);
            assert!(got_loss <= best * (1.0 + 1e-6), "{got_loss} vs {best}");
            assert!((r.loss - got_loss).abs() <= 1e-4 * got_loss.max(1e-12));
        }
        // Equal importances: the unweighted search.
        let ones = vec![1.0; n_in];
        assert_eq!(
            gs.search_per_channel_weighted(&t, axis, in_axis, &ones, grid, Flavour::Symmetric)
                .unwrap(),
            gs.search_per_channel(&t, axis, grid, Flavour::Symmetric)
                .unwrap()
        );
    }
    // The outlier meets large inputs: the weighted search keeps it (no clipping), the
    // unweighted one clips it.
    let mut w: Vec<f32> = (0..1024).map(|k| (k as f32 / 511.5 - 1.0) * 0.9).collect();
    w[0] = 1.5;
    let t = Tensor::new(vec![1, 1024], w).unwrap();
    let mut imp = vec![1.0; 1024];
    imp[0] = 1e4;
    let weighted = gs
        .search_per_channel_weighted(&t, 0, 1, &imp, grid, Flavour::Symmetric)
        .unwrap();
    let plain = gs
        .search_per_channel(&t, 0, grid, Flavour::Symmetric)
        .unwrap();
    assert!(plain[0].alpha < 0.9, "{}", plain[0].alpha);
    assert!(
        weighted[0].alpha > plain[0].alpha,
        "{} vs {}",
        weighted[0].alpha,
        plain[0].alpha
    );
    // Bad importances are errors.
    for bad in [vec![1.0; 1023], {
        let mut b = vec![1.0; 1024];
        b[3] = -1.0;
        b
    }] {
        assert!(
            gs.search_per_channel_weighted(&t, 0, 1, &bad, grid, Flavour::Symmetric)
                .is_err()
        );
    }
}

#[test]
fn bad_observer_settings_are_typed_errors() {
    assert!(matches!(
        Percentile::new(0.0, true, 1024),
        Err(QuantError::Param {
            field: "percentile",
            ..
        })
    ));
    assert!(matches!(
        Percentile::new(99.0, true, 1000),
        Err(QuantError::Param {
            field: "num_bins",
            ..
        })
    ));
    // Sparsity-aware over an all-zero map: nothing was counted.
    let mut p = Percentile::new(99.0, true, 1024).unwrap();
    p.observe(&[0.0; 100]).unwrap();
    assert!(matches!(
        p.finish(Grid::weight(8), Flavour::Symmetric),
        Err(QuantError::Empty { .. })
    ));
    let mut e = Entropy::new(false, 2048).unwrap();
    assert!(matches!(
        e.observe(&[1.0, f32::NEG_INFINITY]),
        Err(QuantError::NonFinite { index: 1, .. })
    ));
    assert!(matches!(
        e.finish(Grid::weight(8), Flavour::Symmetric),
        Err(QuantError::Empty { .. })
    ));
}

#[test]
fn percentile_100_is_the_observed_range() {
    let xs = uniform(5000, -2.0, 3.0, 18);
    let mut o = Percentile::new(100.0, false, 256).unwrap();
    o.observe(&xs).unwrap();
    let lo = xs.iter().cloned().fold(f32::INFINITY, f32::min);
    let hi = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    assert_eq!(o.clip_range(Flavour::Symmetric).unwrap(), (-hi, hi));
    let (plo, phi) = o.clip_range(Flavour::Asymmetric).unwrap();
    assert_eq!(phi, hi);
    // The extreme ranks interpolate to their bin's outer edge, clamped to the data.
    assert_eq!(plo, lo);
}
