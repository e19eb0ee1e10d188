//! Sparse 3D tensors and the rulebooks that drive sparse convolutions (the voxel branch of
//! CenterPoint, spconv semantics).
//!
//! A [`SparseTensor`] is a set of active sites of one (z, y, x) grid with a feature row per
//! site; inactive sites are zero. A [`Rulebook`] lists, per kernel offset, which input row
//! feeds which output row; the convolution itself (`ops::sparse_conv`) is gather - GEMM -
//! scatter over it. Rulebooks depend only on the sites, so the layers of one resolution
//! share one.

mod hash;
mod rulebook;

pub use hash::CoordHash;
pub use rulebook::{OffsetPairs, Rulebook};

use crate::ops::{OpsError, Result, Tensor};

const OP: &str = "sparse_tensor";

/// Row-major linear index of `c` = (z, y, x) in a grid of `shape` = (D, H, W).
#[inline]
pub fn linear_index(c: [u32; 3], shape: [usize; 3]) -> u64 {
    (c[0] as u64 * shape[1] as u64 + c[1] as u64) * shape[2] as u64 + c[2] as u64
}

/// Active sites of one sample on a (D, H, W) grid and their feature rows.
#[derive(Debug, Clone, PartialEq)]
pub struct SparseTensor {
    /// Site of each row as (z, y, x); unique, inside `shape`. Any order.
    pub coords: Vec<[u32; 3]>,
    /// `[N, C]`, row i belongs to `coords[i]`.
    pub features: Tensor,
    /// Grid size (D, H, W).
    pub shape: [usize; 3],
}

impl SparseTensor {
    /// Checked constructor (see [`SparseTensor::validate`]).
    pub fn new(coords: Vec<[u32; 3]>, features: Tensor, shape: [usize; 3]) -> Result<Self> {
        let t = Self {
            coords,
            features,
            shape,
        };
        t.validate()?;
        Ok(t)
    }

    /// Features are `[N, C]` with one row per site, sites lie inside the grid and are unique.
    pub fn validate(&self) -> Result<()> {
        let n = self.coords.len();
        if self.features.shape.len() != 2 || self.features.shape[0] != n {
            return Err(OpsError::Shape {
                op: OP,
                arg: "features",
                got: self.features.shape.clone(),
                expected: format!("[{n}, C] (one row per coordinate)"),
            });
        }
        if self.shape.contains(&0) || self.shape.iter().any(|&s| s > u32::MAX as usize) {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "shape",
                detail: format!("grid {:?} must have sides in 1..=2^32-1", self.shape),
            });
        }
        if n > u32::MAX as usize {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "coords",
                detail: format!("{n} sites exceed the u32 row index"),
            });
        }
        check_coords(OP, &self.coords, self.shape)?;
        Ok(())
    }

    /// Number of active sites.
    pub fn len(&self) -> usize {
        self.coords.len()
    }

    pub fn is_empty(&self) -> bool {
        self.coords.is_empty()
    }

    /// Feature channels (C).
    pub fn channels(&self) -> usize {
        self.features.shape.get(1).copied().unwrap_or(0)
    }

    /// The same sites carrying other features (`[N, C']`), e.g. a layer's output.
    pub fn with_features(&self, features: Tensor) -> Result<Self> {
        let n = self.coords.len();
        if features.shape.len() != 2 || features.shape[0] != n {
            return Err(OpsError::Shape {
                op: OP,
                arg: "features",
                got: features.shape,
                expected: format!("[{n}, C] (one row per coordinate)"),
            });
        }
        Ok(Self {
            coords: self.coords.clone(),
            features,
            shape: self.shape,
        })
    }
}

/// Sites inside `shape` and unique; returns their coordinate -> row table.
pub(crate) fn check_coords(
    op: &'static str,
    coords: &[[u32; 3]],
    shape: [usize; 3],
) -> Result<CoordHash> {
    let mut index = CoordHash::with_capacity(coords.len());
    for (row, &c) in coords.iter().enumerate() {
        if (0..3).any(|a| c[a] as usize >= shape[a]) {
            return Err(OpsError::Invalid {
                op,
                arg: "coords",
                detail: format!("row {row}: site {c:?} (z, y, x) outside the grid {shape:?}"),
            });
        }
        let (first, inserted) = index.get_or_insert(linear_index(c, shape), row as u32);
        if !inserted {
            return Err(OpsError::Invalid {
                op,
                arg: "coords",
                detail: format!("rows {first} and {row} both hold site {c:?}"),
            });
        }
    }
    Ok(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feats(n: usize, c: usize) -> Tensor {
        Tensor::from_fn(&[n, c], |i| i as f32)
    }

    #[test]
    fn sparse_tensor_validation_errors() {
        let shape = [2, 3, 4];
        let ok = SparseTensor::new(vec![[0, 0, 0], [1, 2, 3]], feats(2, 5), shape).unwrap();
        assert_eq!((ok.len(), ok.channels()), (2, 5));
        let err = |r: Result<SparseTensor>| r.unwrap_err().to_string();
        let e = err(SparseTensor::new(vec![[0, 0, 0]], feats(2, 5), shape));
        assert!(e.contains("features") && e.contains("[1, C]"), "{e}");
        let e = err(SparseTensor::new(
            vec![[0, 0, 0]],
            Tensor::zeros(&[5]),
            shape,
        ));
        assert!(e.contains("features"), "{e}");
        let e = err(SparseTensor::new(vec![[0, 3, 0]], feats(1, 1), shape));
        assert!(e.contains("outside the grid") && e.contains("row 0"), "{e}");
        let e = err(SparseTensor::new(vec![[2, 0, 0]], feats(1, 1), shape));
        assert!(e.contains("outside the grid"), "{e}");
        let e = err(SparseTensor::new(
            vec![[1, 1, 1], [0, 0, 0], [1, 1, 1]],
            feats(3, 1),
            shape,
        ));
        assert!(e.contains("rows 0 and 2"), "{e}");
        let e = err(SparseTensor::new(vec![], feats(0, 1), [0, 3, 4]));
        assert!(e.contains("shape"), "{e}");
        let e = ok.with_features(feats(3, 2)).unwrap_err().to_string();
        assert!(e.contains("features"), "{e}");
        assert_eq!(ok.with_features(feats(2, 7)).unwrap().channels(), 7);
    }
}
