//! Max over the points of each pillar: `[P, N, C] -> [P, C]`, the PointNet pooling of the
//! pillar feature net. Only the first `counts[p]` point slots of pillar `p` take part (the
//! rest are padding); a pillar with no points yields zeros.

use super::{OpsError, Result, Tensor, dims, expect_len, expect_shape};

const OP: &str = "pillar_max";

/// Which point won each (pillar, channel) max; `u32::MAX` for empty pillars.
#[derive(Debug, Clone, PartialEq)]
pub struct ArgMax {
    pub shape: [usize; 3],
    pub index: Vec<u32>,
}

/// Per (pillar, channel), the max over the pillar's valid points. Ties go to the lowest
/// point index, so the result and the gradient routing are deterministic.
pub fn forward(x: &Tensor, counts: &[u32]) -> Result<(Tensor, ArgMax)> {
    let [p, n, c] = dims::<3>(OP, "input", x)?;
    check_counts(OP, counts, p, n)?;
    let mut y = Tensor::zeros(&[p, c]);
    let mut arg = vec![u32::MAX; p * c];
    for (pi, &k) in counts.iter().enumerate() {
        let pts = &x.data[pi * n * c..(pi + 1) * n * c];
        let out = &mut y.data[pi * c..(pi + 1) * c];
        let am = &mut arg[pi * c..(pi + 1) * c];
        for j in 0..k as usize {
            for (ch, &v) in pts[j * c..(j + 1) * c].iter().enumerate() {
                if am[ch] == u32::MAX || v > out[ch] {
                    out[ch] = v;
                    am[ch] = j as u32;
                }
            }
        }
    }
    Ok((
        y,
        ArgMax {
            shape: [p, n, c],
            index: arg,
        },
    ))
}

/// One count per pillar, none above the `n` point slots.
pub(crate) fn check_counts(op: &'static str, counts: &[u32], p: usize, n: usize) -> Result<()> {
    expect_len(op, "counts", counts.len(), p)?;
    if let Some((i, &k)) = counts.iter().enumerate().find(|&(_, &k)| k as usize > n) {
        return Err(OpsError::Invalid {
            op,
            arg: "counts",
            detail: format!("pillar {i} has count {k} > {n} point slots"),
        });
    }
    Ok(())
}

/// Routes each output gradient to the point that won the max: `[P, C] -> [P, N, C]`.
pub fn backward(arg: &ArgMax, grad_out: &Tensor) -> Result<Tensor> {
    let [p, n, c] = arg.shape;
    expect_shape(OP, "grad_out", grad_out, &[p, c])?;
    let mut gx = Tensor::zeros(&[p, n, c]);
    for pi in 0..p {
        for ch in 0..c {
            let j = arg.index[pi * c + ch];
            if j != u32::MAX {
                gx.data[(pi * n + j as usize) * c + ch] += grad_out.data[pi * c + ch];
            }
        }
    }
    Ok(gx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;
    use rand::RngExt;

    fn naive(x: &[f64], counts: &[u32], n: usize, c: usize) -> Vec<f64> {
        let mut y = vec![0.0; counts.len() * c];
        for (pi, &k) in counts.iter().enumerate() {
            for ch in 0..c {
                if k > 0 {
                    y[pi * c + ch] = (0..k as usize)
                        .map(|j| x[(pi * n + j) * c + ch])
                        .fold(f64::NEG_INFINITY, f64::max);
                }
            }
        }
        y
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(51);
        for &(p, n, c) in &[(5, 4, 3), (7, 9, 5), (1, 1, 1)] {
            let mut x = uniform(&mut r, &[p, n, c], 1.0);
            let counts: Vec<u32> = (0..p)
                .map(|i| {
                    if i == 1 {
                        0
                    } else {
                        r.random_range(1..=n as u32)
                    }
                })
                .collect();
            // Padding slots hold a large value: it must never win.
            for (pi, &k) in counts.iter().enumerate() {
                for j in k as usize..n {
                    x.data[(pi * n + j) * c..(pi * n + j + 1) * c].fill(10.0);
                }
            }
            let (y, arg) = forward(&x, &counts).unwrap();
            let xd = to_f64(&x.data);
            assert_close("y", &y.data, &naive(&xd, &counts, n, c), 0.0);
            let gy = uniform(&mut r, &y.shape, 1.0);
            let gx = backward(&arg, &gy).unwrap();
            let fd = fd_grad(&xd, |v| dot(&gy.data, &naive(v, &counts, n, c)));
            assert_close("dx", &gx.data, &fd, 1e-6);
        }
    }

    #[test]
    fn ties_go_to_the_first_point() {
        let x = Tensor::new(vec![1, 3, 1], vec![2.0, 2.0, 1.0]).unwrap();
        let (y, arg) = forward(&x, &[3]).unwrap();
        assert_eq!(y.data, vec![2.0]);
        assert_eq!(arg.index, vec![0]);
        let gx = backward(&arg, &Tensor::new(vec![1, 1], vec![1.0]).unwrap()).unwrap();
        assert_eq!(gx.data, vec![1.0, 0.0, 0.0]);
    }

    #[test]
    fn rejects_bad_counts() {
        let x = Tensor::zeros(&[2, 3, 4]);
        assert!(matches!(
            forward(&x, &[1]),
            Err(OpsError::Shape { arg: "counts", .. })
        ));
        assert!(matches!(
            forward(&x, &[1, 4]),
            Err(OpsError::Invalid { arg: "counts", .. })
        ));
    }
}
