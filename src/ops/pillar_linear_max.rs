//! A pillar-feature-net layer in one pass: linear (+ ReLU) over each pillar's point slots,
//! then the max over its valid points, `[P, N, Cin] -> [P, Cout]` (or, for the layers
//! before the last, the points with their pillar's max beside them, `[P, N, 2 Cout]`).
//! The same result as [`linear::forward`](super::linear::forward), [`relu`](super::relu)
//! and [`pillar_max::forward`](super::pillar_max::forward) in a row, without the
//! `[P, N, Cout]` intermediate: for 30,000 pillars of 20 slots and 64 channels that is
//! 154 MB, and writing it, zeroing it and reading it back cost more than the
//! multiply-adds. Inference only (training keeps the separate ops, whose argmax routes
//! the gradient).

use rayon::prelude::*;

use super::matmul::{MatRef, gemm_serial};
use super::{OpsError, Result, Tensor, dims, expect_len};

const OP: &str = "pillar_linear_max";

/// Pillars per block: the block's `[B * N, Cout]` linear output stays in the core's cache.
const BLOCK: usize = 32;

/// What the pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// `[P, Cout]`: each pillar's max.
    Max,
    /// `[P, N, 2 Cout]`: each point slot's activations followed by its pillar's max (the
    /// layers before the last, as `engine::fp32::concat_pillar_max`).
    PointsAndMax,
}

/// `m[p, o] = max over j < counts[p] of act(sum_i x[p, j, i] w[o, i] + b[o])`, with `act`
/// the ReLU when `relu`; a pillar with no points has a zero max.
pub fn forward(
    x: &Tensor,
    weight: &Tensor,
    bias: &[f32],
    relu: bool,
    counts: &[u32],
    output: Output,
) -> Result<Tensor> {
    let [p, n, cin] = dims::<3>(OP, "input", x)?;
    let [cout, wcin] = dims::<2>(OP, "weight", weight)?;
    if wcin != cin {
        return Err(OpsError::Shape {
            op: OP,
            arg: "weight",
            got: weight.shape.clone(),
            expected: format!("[{cout}, {cin}] (the input has {cin} features)"),
        });
    }
    expect_len(OP, "bias", bias.len(), cout)?;
    super::pillar_max::check_counts(OP, counts, p, n)?;
    let mut y = match output {
        Output::Max => Tensor::zeros(&[p, cout]),
        Output::PointsAndMax => Tensor::zeros(&[p, n, 2 * cout]),
    };
    if p == 0 || n == 0 || cout == 0 {
        // Nothing to compute: every max is zero (or there are none).
        return Ok(y);
    }
    let per_pillar = y.data.len() / p;
    let act = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
    y.data
        .par_chunks_mut(BLOCK * per_pillar)
        .zip(counts.par_chunks(BLOCK))
        .enumerate()
        .for_each_init(Vec::new, |scratch, (b, (out, counts))| {
            let pillars = counts.len();
            let rows = pillars * n;
            let src = &x.data[b * BLOCK * n * cin..][..rows * cin];
            // The linear output goes to a cached scratch block, or straight into the first
            // half of each output row. Bias first, then accumulate: the order
            // `linear::forward` adds them in.
            let (lin, ld): (&mut [f32], usize) = match output {
                Output::Max => {
                    scratch.clear();
                    scratch.resize(rows * cout, 0.0);
                    (scratch.as_mut_slice(), cout)
                }
                Output::PointsAndMax => (&mut *out, 2 * cout),
            };
            for row in lin.chunks_exact_mut(ld) {
                row[..cout].copy_from_slice(bias);
            }
            gemm_serial(
                rows,
                cout,
                cin,
                lin,
                ld,
                true,
                MatRef::rows(src, cin),
                MatRef::transposed(&weight.data, cin),
            );
            for row in lin.chunks_exact_mut(ld) {
                for v in &mut row[..cout] {
                    *v = act(*v);
                }
            }
            let mut maxes = vec![0.0f32; pillars * cout];
            for ((pi, &k), max) in counts.iter().enumerate().zip(maxes.chunks_exact_mut(cout)) {
                // The first valid point sets the max (ties and order as pillar_max).
                let pts = &lin[pi * n * ld..][..n * ld];
                for (j, row) in pts.chunks_exact(ld).take(k as usize).enumerate() {
                    for (m, &v) in max.iter_mut().zip(&row[..cout]) {
                        if j == 0 || v > *m {
                            *m = v;
                        }
                    }
                }
            }
            match output {
                Output::Max => out.copy_from_slice(&maxes),
                Output::PointsAndMax => {
                    for (slots, max) in out.chunks_exact_mut(n * ld).zip(maxes.chunks_exact(cout)) {
                        for row in slots.chunks_exact_mut(ld) {
                            row[cout..].copy_from_slice(max);
                        }
                    }
                }
            }
        });
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::fp32::concat_pillar_max;
    use crate::ops::testutil::*;
    use crate::ops::{linear, pillar_max, relu};
    use rand::RngExt;

    /// The three separate ops, bit for bit, with padded slots, empty and full pillars and a
    /// pillar count that leaves a partial last block.
    #[test]
    fn pillar_linear_max_equals_linear_relu_max() {
        let mut r = rng(11);
        for (p, n, cin, cout, relu_on) in [
            (70, 5, 10, 64, true),
            (33, 20, 9, 16, false),
            (1, 1, 3, 1, true),
            (0, 4, 2, 3, true),
            (3, 0, 2, 3, true),
        ] {
            let x = uniform(&mut r, &[p, n, cin], 2.0);
            let w = uniform(&mut r, &[cout, cin], 1.0);
            let b = uniform_vec(&mut r, cout, 0.5);
            let counts: Vec<u32> = (0..p)
                .map(|i| match i % 7 {
                    0 => 0,
                    1 => n as u32,
                    _ => r.random_range(0..=n as u32),
                })
                .collect();
            let mut lin = linear::forward(&x, &w, Some(&b)).unwrap();
            if relu_on {
                relu::forward_inplace(&mut lin);
            }
            let (want, _) = pillar_max::forward(&lin, &counts).unwrap();
            let got = forward(&x, &w, &b, relu_on, &counts, Output::Max).unwrap();
            assert_eq!(got.shape, vec![p, cout]);
            assert_eq!(got.data, want.data, "p {p} n {n} cin {cin} cout {cout}");
            let want = concat_pillar_max(&lin, &want);
            let got = forward(&x, &w, &b, relu_on, &counts, Output::PointsAndMax).unwrap();
            assert_eq!(got.shape, vec![p, n, 2 * cout]);
            assert_eq!(
                got.data, want.data,
                "concat: p {p} n {n} cin {cin} cout {cout}"
            );
        }
    }

    #[test]
    fn pillar_linear_max_rejects_bad_shapes() {
        let x = Tensor::zeros(&[2, 3, 4]);
        let w = Tensor::zeros(&[5, 4]);
        let e = |r: Result<Tensor>| r.unwrap_err().to_string();
        let f =
            |w: &Tensor, b: &[f32], counts: &[u32]| forward(&x, w, b, true, counts, Output::Max);
        assert!(e(f(&Tensor::zeros(&[5, 3]), &[0.0; 5], &[1, 1])).contains("weight"));
        assert!(e(f(&w, &[0.0; 4], &[1, 1])).contains("bias"));
        assert!(e(f(&w, &[0.0; 5], &[1])).contains("counts"));
        assert!(e(f(&w, &[0.0; 5], &[1, 4])).contains("count 4 > 3"));
    }
}
