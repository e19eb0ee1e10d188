//! The sparse backbone's per-frame geometry: the rulebooks of `Graph::sparse`, built once
//! per frame from the input voxels and shared by every layer that names them.

use super::EngineError;
use crate::model::graph::{Graph, SparseSpec};
use crate::ops::{self, Tensor};
use crate::sparse::{Rulebook, SparseTensor};
use rayon::prelude::*;

/// One frame's rulebooks and site sets.
pub struct FrameSites {
    input: Vec<[u32; 3]>,
    grids: Vec<[usize; 3]>,
    /// For each site set above 0, the rulebook that produced it.
    producer: Vec<usize>,
    pub rulebooks: Vec<Rulebook>,
}

impl FrameSites {
    /// Builds every rulebook of `spec` for the input voxels `coords` (z, y, x) on site set 0.
    /// Rulebooks whose input sites exist are built together (a resolution's submanifold
    /// rulebook beside the strided one that produces the next resolution), wave by wave.
    pub fn build(spec: &SparseSpec, coords: &[[u32; 3]]) -> Result<Self, EngineError> {
        let mut s = FrameSites {
            input: coords.to_vec(),
            grids: spec.grids.clone(),
            producer: vec![usize::MAX; spec.grids.len()],
            rulebooks: Vec::with_capacity(spec.rulebooks.len()),
        };
        for (i, r) in spec.rulebooks.iter().enumerate() {
            if !r.submanifold {
                s.producer[r.output] = i;
            }
        }
        let mut built: Vec<Option<Rulebook>> = vec![None; spec.rulebooks.len()];
        loop {
            let wave: Vec<(usize, &[[u32; 3]])> = (0..spec.rulebooks.len())
                .filter(|&i| built[i].is_none())
                .filter_map(|i| Some((i, s.built_sites(&built, spec.rulebooks[i].input)?)))
                .collect();
            if wave.is_empty() {
                break;
            }
            let done: Vec<(usize, Result<Rulebook, EngineError>)> = wave
                .into_par_iter()
                .map(|(i, sites)| {
                    let r = &spec.rulebooks[i];
                    let grid = s.grids[r.input];
                    let rb = if r.submanifold {
                        Rulebook::submanifold(sites, grid, r.kernel[0])
                    } else {
                        Rulebook::regular(sites, grid, r.kernel, r.stride, r.padding)
                    };
                    (
                        i,
                        rb.map_err(|e| EngineError::op(&format!("rulebook {i}"), e)),
                    )
                })
                .collect();
            for (i, rb) in done {
                built[i] = Some(rb?);
            }
        }
        for (i, rb) in built.into_iter().enumerate() {
            let rb = rb.ok_or_else(|| {
                EngineError::Internal(format!(
                    "rulebook {i} reads a site set no rulebook produces"
                ))
            })?;
            s.rulebooks.push(rb);
        }
        Ok(s)
    }

    /// Coordinates of site set `set` if it exists among the rulebooks built so far.
    fn built_sites<'a>(
        &'a self,
        built: &'a [Option<Rulebook>],
        set: usize,
    ) -> Option<&'a [[u32; 3]]> {
        if set == 0 {
            return Some(&self.input);
        }
        built
            .get(self.producer[set])?
            .as_ref()
            .map(Rulebook::out_coords)
    }

    /// Coordinates of site set `set`.
    pub fn sites(&self, set: usize) -> &[[u32; 3]] {
        if set == 0 {
            &self.input
        } else {
            self.rulebooks[self.producer[set]].out_coords()
        }
    }

    /// Grid (D, H, W) of site set `set`.
    pub fn grid(&self, set: usize) -> [usize; 3] {
        self.grids[set]
    }

    /// Active sites per set (set 0 = the voxels), for benchmarks and logs.
    pub fn counts(&self) -> Vec<usize> {
        (0..self.grids.len()).map(|s| self.sites(s).len()).collect()
    }
}

/// Builds the frame's rulebooks when the graph has a sparse part.
pub fn frame_sites(graph: &Graph, coords: &[[u32; 3]]) -> Result<Option<FrameSites>, EngineError> {
    graph
        .sparse
        .as_ref()
        .map(|sp| FrameSites::build(sp, coords))
        .transpose()
}

/// `a + b`, then ReLU when asked: the residual join.
pub fn add(a: &Tensor, b: &Tensor, relu: bool) -> ops::Result<Tensor> {
    if a.shape != b.shape {
        return Err(ops::OpsError::Shape {
            op: "add",
            arg: "rhs",
            got: b.shape.clone(),
            expected: format!("{:?} (the lhs shape)", a.shape),
        });
    }
    let mut y = a.clone();
    for (o, &v) in y.data.iter_mut().zip(&b.data) {
        *o += v;
        if relu && *o < 0.0 {
            *o = 0.0;
        }
    }
    Ok(y)
}

/// Height compression of sparse features on site set `set` to `[1, C * D, H, W]`.
pub fn height_compress(fs: &FrameSites, set: usize, x: &Tensor) -> ops::Result<Tensor> {
    let t = SparseTensor {
        coords: fs.sites(set).to_vec(),
        features: x.clone(),
        shape: fs.grid(set),
    };
    ops::height_compress::forward(&t)
}

/// Gradient of [`height_compress`]'s input `x` from the gradient of its output.
pub fn height_compress_backward(
    fs: &FrameSites,
    set: usize,
    x: &Tensor,
    grad_out: &Tensor,
) -> ops::Result<Tensor> {
    let t = SparseTensor {
        coords: fs.sites(set).to_vec(),
        features: x.clone(),
        shape: fs.grid(set),
    };
    ops::height_compress::backward(&t, grad_out)
}

/// The error for an op that needs the frame's sparse sites in a graph without them.
pub fn no_sites(node: &str) -> EngineError {
    EngineError::Internal(format!(
        "{node} is a sparse op but the graph has no sparse part"
    ))
}
