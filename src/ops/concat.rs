//! Concatenation along one axis (channels of NCHW images, or the last axis of point
//! features) and its backward, the split.

use super::{OpsError, Result, Tensor};

const OP: &str = "concat";

/// Concatenates tensors that agree on every axis but `axis`.
pub fn forward(inputs: &[&Tensor], axis: usize) -> Result<Tensor> {
    let first = inputs.first().ok_or_else(|| OpsError::Invalid {
        op: OP,
        arg: "inputs",
        detail: "needs at least one tensor".into(),
    })?;
    let rank = first.shape.len();
    if axis >= rank {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "axis",
            detail: format!("axis {axis} out of range for rank {rank}"),
        });
    }
    for t in inputs {
        let same =
            t.shape.len() == rank && (0..rank).all(|a| a == axis || t.shape[a] == first.shape[a]);
        if !same {
            return Err(OpsError::Shape {
                op: OP,
                arg: "inputs",
                got: t.shape.clone(),
                expected: format!("{:?} except on axis {axis}", first.shape),
            });
        }
    }
    let outer: usize = first.shape[..axis].iter().product();
    let inner: usize = first.shape[axis + 1..].iter().product();
    let total: usize = inputs.iter().map(|t| t.shape[axis]).sum();
    let mut shape = first.shape.clone();
    shape[axis] = total;
    let mut data = Vec::with_capacity(outer * total * inner);
    for o in 0..outer {
        for t in inputs {
            let blk = t.shape[axis] * inner;
            data.extend_from_slice(&t.data[o * blk..(o + 1) * blk]);
        }
    }
    Tensor::new(shape, data)
}

/// Splits `x` along `axis` into pieces of the given sizes (the backward of [`forward`]).
pub fn split(x: &Tensor, axis: usize, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let rank = x.shape.len();
    if axis >= rank || sizes.iter().sum::<usize>() != x.shape[axis] {
        return Err(OpsError::Invalid {
            op: "split",
            arg: "sizes",
            detail: format!(
                "sizes {sizes:?} on axis {axis} do not add up to shape {:?}",
                x.shape
            ),
        });
    }
    let outer: usize = x.shape[..axis].iter().product();
    let inner: usize = x.shape[axis + 1..].iter().product();
    let total = x.shape[axis];
    let mut out = Vec::with_capacity(sizes.len());
    let mut start = 0;
    for &s in sizes {
        let mut shape = x.shape.clone();
        shape[axis] = s;
        let mut data = Vec::with_capacity(outer * s * inner);
        for o in 0..outer {
            let base = (o * total + start) * inner;
            data.extend_from_slice(&x.data[base..base + s * inner]);
        }
        out.push(Tensor::new(shape, data)?);
        start += s;
    }
    Ok(out)
}

/// Backward of [`forward`]: the output gradient split back into the inputs' shapes.
pub fn backward(grad_out: &Tensor, axis: usize, input_sizes: &[usize]) -> Result<Vec<Tensor>> {
    split(grad_out, axis, input_sizes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    #[test]
    fn concat_matches_naive_and_split_inverts_it() {
        let mut r = rng(71);
        let a = uniform(&mut r, &[2, 3, 4, 5], 1.0);
        let b = uniform(&mut r, &[2, 1, 4, 5], 1.0);
        let c = uniform(&mut r, &[2, 4, 4, 5], 1.0);
        let y = forward(&[&a, &b, &c], 1).unwrap();
        assert_eq!(y.shape, vec![2, 8, 4, 5]);
        for n in 0..2 {
            for ch in 0..8 {
                for i in 0..20 {
                    let want = match ch {
                        0..3 => a.data[(n * 3 + ch) * 20 + i],
                        3 => b.data[n * 20 + i],
                        _ => c.data[(n * 4 + ch - 4) * 20 + i],
                    };
                    assert_eq!(y.data[(n * 8 + ch) * 20 + i], want);
                }
            }
        }
        let parts = backward(&y, 1, &[3, 1, 4]).unwrap();
        assert_eq!(parts, vec![a, b, c]);
        // Last axis of point features.
        let p = uniform(&mut r, &[3, 4, 2], 1.0);
        let q = uniform(&mut r, &[3, 4, 3], 1.0);
        let y = forward(&[&p, &q], 2).unwrap();
        assert_eq!(y.data[2..5], q.data[0..3]);
        assert_eq!(split(&y, 2, &[2, 3]).unwrap(), vec![p, q]);
    }

    #[test]
    fn rejects_mismatched_inputs() {
        let a = Tensor::zeros(&[2, 3, 4]);
        let b = Tensor::zeros(&[2, 3, 5]);
        assert!(matches!(forward(&[&a, &b], 1), Err(OpsError::Shape { .. })));
        assert!(forward(&[&a, &b], 2).is_ok());
        assert!(forward(&[&a], 3).is_err());
        assert!(forward(&[], 0).is_err());
        assert!(split(&a, 1, &[1, 1]).is_err());
    }
}
