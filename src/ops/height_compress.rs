//! Height compression (OpenPCDet `HeightCompression`): densify a sparse tensor on a
//! (D, H, W) grid and fold depth into channels, `[N, C]` -> `[1, C * D, H, W]` with
//! channel `c * D + z`, as `dense[N, C, D, H, W].view(N, C * D, H, W)` does. Empty sites
//! are zero. The backward is the matching gather.

use super::{OpsError, Result, Tensor, dims, expect_shape};
use crate::sparse::SparseTensor;

const OP: &str = "height_compress";

/// Checks the features and the coordinates' range; returns the channels.
fn check(x: &SparseTensor) -> Result<usize> {
    let [n, c] = dims::<2>(OP, "features", &x.features)?;
    if n != x.coords.len() {
        return Err(OpsError::Shape {
            op: OP,
            arg: "features",
            got: x.features.shape.clone(),
            expected: format!("[{}, C] (one row per coordinate)", x.coords.len()),
        });
    }
    if let Some((row, c)) = x
        .coords
        .iter()
        .enumerate()
        .find(|(_, c)| (0..3).any(|a| c[a] as usize >= x.shape[a]))
    {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "coords",
            detail: format!("row {row}: site {c:?} outside the grid {:?}", x.shape),
        });
    }
    Ok(c)
}

/// Flat offset of site `s` (z, y, x), channel 0, in the `[1, C*D, H, W]` output; channel c
/// adds `c * D * H * W`.
#[inline]
fn base(s: [u32; 3], shape: [usize; 3]) -> usize {
    let [_, h, w] = shape;
    (s[0] as usize * h + s[1] as usize) * w + s[2] as usize
}

/// `[N, C]` sparse features -> dense BEV `[1, C * D, H, W]`.
pub fn forward(x: &SparseTensor) -> Result<Tensor> {
    let c = check(x)?;
    let [d, h, w] = x.shape;
    let plane = d * h * w;
    let mut out = Tensor::zeros(&[1, c * d, h, w]);
    for (s, f) in x.coords.iter().zip(x.features.data.chunks_exact(c.max(1))) {
        let b = base(*s, x.shape);
        for (ch, &v) in f.iter().enumerate() {
            out.data[ch * plane + b] = v;
        }
    }
    Ok(out)
}

/// Gradient of the features `[N, C]` given the gradient of the dense output.
pub fn backward(x: &SparseTensor, grad_out: &Tensor) -> Result<Tensor> {
    let c = check(x)?;
    let [d, h, w] = x.shape;
    expect_shape(OP, "grad_out", grad_out, &[1, c * d, h, w])?;
    let plane = d * h * w;
    let mut g = Tensor::zeros(&x.features.shape);
    for (s, row) in x.coords.iter().zip(g.data.chunks_exact_mut(c.max(1))) {
        let b = base(*s, x.shape);
        for (ch, v) in row.iter_mut().enumerate() {
            *v = grad_out.data[ch * plane + b];
        }
    }
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{rng, uniform};
    use rand::RngExt;
    use std::collections::BTreeSet;

    fn random_tensor(seed: u64, shape: [usize; 3], n: usize, c: usize) -> SparseTensor {
        let mut r = rng(seed);
        let mut seen = BTreeSet::new();
        let mut coords = Vec::new();
        while coords.len() < n {
            let s = shape.map(|v| r.random_range(0..v as u32));
            if seen.insert(s) {
                coords.push(s);
            }
        }
        let f = uniform(&mut r, &[n, c], 1.0);
        SparseTensor::new(coords, f, shape).unwrap()
    }

    /// Against an explicit dense [C, D, H, W] volume viewed as [C*D, H, W].
    #[test]
    fn height_compress_matches_naive_dense_view() {
        let (shape, c) = ([3, 4, 5], 3);
        let x = random_tensor(21, shape, 17, c);
        let y = forward(&x).unwrap();
        assert_eq!(y.shape, vec![1, c * 3, 4, 5]);
        let mut dense = vec![0.0f32; c * 3 * 4 * 5]; // [C, D, H, W]
        for (i, s) in x.coords.iter().enumerate() {
            for ch in 0..c {
                let at = ((ch * 3 + s[0] as usize) * 4 + s[1] as usize) * 5 + s[2] as usize;
                dense[at] = x.features.data[i * c + ch];
            }
        }
        assert_eq!(y.data, dense, "a [C, D, H, W] volume read as [C*D, H, W]");
        // Channel c*D + z explicitly, for one site.
        let (s, i) = (x.coords[4], 4);
        for ch in 0..c {
            let got = y.data[((ch * 3 + s[0] as usize) * 4 + s[1] as usize) * 5 + s[2] as usize];
            assert_eq!(got, x.features.data[i * c + ch]);
        }
        // The backward gathers exactly what the forward scattered: <g, y> = <backward(g), x>.
        let g = uniform(&mut rng(22), &y.shape, 1.0);
        let gx = backward(&x, &g).unwrap();
        let lhs: f64 = g
            .data
            .iter()
            .zip(&y.data)
            .map(|(a, b)| (a * b) as f64)
            .sum();
        let rhs: f64 = gx
            .data
            .iter()
            .zip(&x.features.data)
            .map(|(a, b)| (a * b) as f64)
            .sum();
        assert!((lhs - rhs).abs() < 1e-4, "{lhs} vs {rhs}");
        for (i, s) in x.coords.iter().enumerate() {
            for ch in 0..c {
                let at = ((ch * 3 + s[0] as usize) * 4 + s[1] as usize) * 5 + s[2] as usize;
                assert_eq!(gx.data[i * c + ch], g.data[at]);
            }
        }
    }

    #[test]
    fn height_compress_errors() {
        let mut x = random_tensor(23, [2, 3, 3], 4, 2);
        let e = backward(&x, &Tensor::zeros(&[1, 2, 3, 3]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("grad_out"), "{e}");
        x.coords[1] = [2, 0, 0];
        let e = forward(&x).unwrap_err().to_string();
        assert!(e.contains("outside the grid") && e.contains("row 1"), "{e}");
        x.coords.pop();
        let e = forward(&x).unwrap_err().to_string();
        assert!(e.contains("one row per coordinate"), "{e}");
    }
}
