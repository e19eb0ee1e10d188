//! Rulebooks: for each kernel offset, the (input row, output row) pairs a sparse
//! convolution multiplies by that offset's weight slice.
//!
//! Semantics are PyTorch's / spconv's cross-correlation: along each axis, output site `o`
//! reads input site `i = o * s - p + kk` for kernel index `kk` in `0..k`, and the output
//! size is `(i + 2p - k) / s + 1`. A submanifold conv (odd `k`, stride 1, padding
//! `k / 2`) keeps exactly the input sites as outputs; a regular conv outputs every site
//! that some active input reaches. Offsets are numbered `(kz_i * ky + ky_i) * kx + kx_i`,
//! matching the spconv-2 weight layout `[Cout, kz, ky, kx, Cin]`.

use rayon::prelude::*;

use super::{CoordHash, check_coords, linear_index};
use crate::ops::{OpsError, Result};

const OP: &str = "rulebook";

/// The pairs of one kernel offset; `input[j]` feeds `output[j]`. Input rows are strictly
/// increasing, and no output row repeats (one offset links each output to one input).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetPairs {
    pub input: Vec<u32>,
    pub output: Vec<u32>,
}

impl OffsetPairs {
    pub fn len(&self) -> usize {
        self.input.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input.is_empty()
    }
}

/// Input/output pairs per kernel offset, and the output sites, of one sparse convolution
/// geometry on one set of input sites. Immutable once built, so layers can share it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rulebook {
    kernel: [usize; 3],
    stride: [usize; 3],
    padding: [usize; 3],
    in_shape: [usize; 3],
    out_shape: [usize; 3],
    n_in: usize,
    out_coords: Vec<[u32; 3]>,
    pairs: Vec<OffsetPairs>,
    submanifold: bool,
    /// The output-major neighbour table, built on first use (every layer that shares the
    /// rulebook reads the same one).
    neighbours: NeighbourCache,
}

/// A lazily built `[n_out, taps]` table; not part of a rulebook's identity.
#[derive(Debug, Clone, Default)]
struct NeighbourCache(std::sync::OnceLock<Vec<u32>>);

impl PartialEq for NeighbourCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

fn check_sites(coords: &[[u32; 3]], shape: [usize; 3]) -> Result<CoordHash> {
    check_grid(coords, shape)?;
    check_coords(OP, coords, shape)
}

fn check_grid(coords: &[[u32; 3]], shape: [usize; 3]) -> Result<()> {
    if shape.contains(&0) || shape.iter().any(|&s| s > u32::MAX as usize) {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "shape",
            detail: format!("grid {shape:?} must have sides in 1..=2^32-1"),
        });
    }
    if coords.len() > u32::MAX as usize {
        return Err(OpsError::Invalid {
            op: OP,
            arg: "coords",
            detail: format!("{} sites exceed the u32 row index", coords.len()),
        });
    }
    Ok(())
}

/// A site in linear-index order: its key, row and coordinates.
#[derive(Clone, Copy)]
struct Sorted {
    key: u64,
    row: u32,
    c: [u32; 3],
}

/// The sites sorted by linear index; sites outside the grid or repeated are the errors
/// `check_coords` names.
fn sorted_sites(coords: &[[u32; 3]], shape: [usize; 3]) -> Result<Vec<Sorted>> {
    let inside = coords
        .iter()
        .all(|c| (0..3).all(|a| (c[a] as usize) < shape[a]));
    let mut v: Vec<Sorted> = coords
        .par_iter()
        .enumerate()
        .map(|(row, &c)| Sorted {
            key: if inside { linear_index(c, shape) } else { 0 },
            row: row as u32,
            c,
        })
        .collect();
    // Keys are unique in a valid site set (checked next), so the key alone orders it.
    v.par_sort_unstable_by_key(|s| s.key);
    if !inside || v.windows(2).any(|w| w[0].key == w[1].key) {
        // The hash check finds the same fault and words it with the rows involved.
        check_coords(OP, coords, shape)?;
        return Err(OpsError::Invalid {
            op: OP,
            arg: "coords",
            detail: "sites outside the grid or repeated".into(),
        });
    }
    Ok(v)
}

/// One forward sweep of a submanifold rulebook for the kernel row `zy` = (kz, ky): for
/// each input (ascending keys), the active outputs `co = ci - d` with `d = kk - k / 2`
/// for every kx, written to `rows[kx * n + input row]`.
fn sweep_rows(sorted: &[Sorted], shape: [usize; 3], k: usize, zy: usize, rows: &mut [u32]) {
    let n = sorted.len();
    let r = (k / 2) as i64;
    let (dz, dy) = ((zy / k) as i64 - r, (zy % k) as i64 - r);
    let step = (dz * shape[1] as i64 + dy) * shape[2] as i64;
    let mut q = 0;
    for s in sorted {
        // Outputs with the same z and y differ from `base` by their x only.
        let base = s.key as i64 - step;
        while q < n && (sorted[q].key as i64) < base - r {
            q += 1;
        }
        let (oz, oy) = (s.c[0] as i64 - dz, s.c[1] as i64 - dy);
        let mut m = q;
        while m < n && (sorted[m].key as i64) <= base + r {
            let o = &sorted[m];
            // Equal keys of another z or y would be a wrap across the grid's edge.
            if o.c[0] as i64 == oz && o.c[1] as i64 == oy {
                let kx = (s.c[2] as i64 - o.c[2] as i64 + r) as usize;
                rows[kx * n + s.row as usize] = o.row;
            }
            m += 1;
        }
    }
}

/// For each input coordinate along one axis, the (kernel index, output coordinate) pairs
/// of a strided conv, kernel index rising (CSR layout).
struct AxisTargets {
    start: Vec<u32>,
    items: Vec<(u32, u32)>,
}

impl AxisTargets {
    fn new(size: usize, k: usize, s: usize, p: usize, out: usize) -> Self {
        let mut start = Vec::with_capacity(size + 1);
        let mut items = Vec::new();
        start.push(0);
        for c in 0..size {
            for kk in 0..k {
                // Input c is read by output o when o * s - p + kk = c.
                let t = c as i64 + p as i64 - kk as i64;
                if t >= 0 && t % s as i64 == 0 && ((t / s as i64) as usize) < out {
                    items.push((kk as u32, (t / s as i64) as u32));
                }
            }
            start.push(items.len() as u32);
        }
        Self { start, items }
    }

    fn of(&self, c: u32) -> &[(u32, u32)] {
        let c = c as usize;
        &self.items[self.start[c] as usize..self.start[c + 1] as usize]
    }
}

impl Rulebook {
    /// Submanifold conv with a centred `k x k x k` kernel (`k` odd): outputs are the input
    /// sites, row for row, and a pair exists where both ends are active.
    pub fn submanifold(coords: &[[u32; 3]], shape: [usize; 3], k: usize) -> Result<Self> {
        if k.is_multiple_of(2) {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "kernel",
                detail: format!("submanifold kernel {k} must be odd (centred)"),
            });
        }
        check_grid(coords, shape)?;
        let sorted = sorted_sites(coords, shape)?;
        let n = coords.len();
        let kernel = [k; 3];
        // Per kernel row (kz, ky), one forward sweep over the sites sorted by linear index
        // finds the outputs of its k offsets: outputs that differ only in x are neighbours
        // in that order, and they rise with the inputs' keys. The sweep fills a table
        // indexed by input row, which then lists the pairs in input-row order.
        let pairs: Vec<OffsetPairs> = (0..k * k)
            .into_par_iter()
            .map_init(Vec::new, |table, zy| {
                table.clear();
                table.resize(k * n, Rulebook::NO_NEIGHBOUR);
                sweep_rows(&sorted, shape, k, zy, table);
                table
                    .chunks(n.max(1))
                    .take(k)
                    .map(|col| {
                        let len = col.iter().filter(|&&o| o != Rulebook::NO_NEIGHBOUR).count();
                        let mut p = OffsetPairs {
                            input: Vec::with_capacity(len),
                            output: Vec::with_capacity(len),
                        };
                        for (i, &o) in col.iter().enumerate() {
                            if o != Rulebook::NO_NEIGHBOUR {
                                p.input.push(i as u32);
                                p.output.push(o);
                            }
                        }
                        p
                    })
                    .collect::<Vec<_>>()
            })
            .flatten()
            .collect();
        Ok(Self {
            kernel,
            stride: [1; 3],
            padding: [k / 2; 3],
            in_shape: shape,
            out_shape: shape,
            n_in: n,
            out_coords: coords.to_vec(),
            pairs,
            submanifold: true,
            neighbours: NeighbourCache::default(),
        })
    }

    /// Regular (strided) sparse conv: outputs are all sites that an active input reaches,
    /// numbered in order of first reach (inputs in row order, then offsets in order).
    pub fn regular(
        coords: &[[u32; 3]],
        shape: [usize; 3],
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    ) -> Result<Self> {
        check_sites(coords, shape)?;
        if kernel.contains(&0) || stride.contains(&0) {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "kernel",
                detail: format!("kernel {kernel:?} and stride {stride:?} must be >= 1"),
            });
        }
        let mut out_shape = [0; 3];
        for a in 0..3 {
            let padded = shape[a] + 2 * padding[a];
            if padded < kernel[a] {
                return Err(OpsError::Invalid {
                    op: OP,
                    arg: "kernel",
                    detail: format!(
                        "kernel {kernel:?} does not fit the grid {shape:?} padded by {padding:?}"
                    ),
                });
            }
            out_shape[a] = (padded - kernel[a]) / stride[a] + 1;
        }
        // Per axis and input coordinate, the (kernel index, output coordinate) pairs that
        // exist, kernel index rising: the 3D targets of an input are their product, in
        // offset order, with no division per site and offset.
        let axes: [AxisTargets; 3] = std::array::from_fn(|a| {
            AxisTargets::new(shape[a], kernel[a], stride[a], padding[a], out_shape[a])
        });
        // Outputs are numbered by first reach, scanning inputs in row order and offsets in
        // offset order: deterministic, and output order follows input order, which keeps
        // the gathers and scatters of the conv local (lidar sites arrive in scan order).
        let mut out_index = CoordHash::with_capacity(coords.len());
        let mut out_coords: Vec<[u32; 3]> = Vec::with_capacity(coords.len());
        let mut pairs = vec![OffsetPairs::default(); kernel.iter().product()];
        for (i, &ci) in coords.iter().enumerate() {
            for &(kz, oz) in axes[0].of(ci[0]) {
                for &(ky, oy) in axes[1].of(ci[1]) {
                    let zy = (kz as usize * kernel[1] + ky as usize) * kernel[2];
                    for &(kx, ox) in axes[2].of(ci[2]) {
                        let o = [oz, oy, ox];
                        let (row, new) = out_index
                            .get_or_insert(linear_index(o, out_shape), out_coords.len() as u32);
                        if new {
                            out_coords.push(o);
                        }
                        let p = &mut pairs[zy + kx as usize];
                        p.input.push(i as u32);
                        p.output.push(row);
                    }
                }
            }
        }
        Ok(Self {
            kernel,
            stride,
            padding,
            in_shape: shape,
            out_shape,
            n_in: coords.len(),
            out_coords,
            pairs,
            submanifold: false,
            neighbours: NeighbourCache::default(),
        })
    }

    /// Kernel size (kz, ky, kx).
    pub fn kernel(&self) -> [usize; 3] {
        self.kernel
    }

    /// Number of kernel offsets (kz * ky * kx).
    pub fn kernel_volume(&self) -> usize {
        self.pairs.len()
    }

    pub fn stride(&self) -> [usize; 3] {
        self.stride
    }

    pub fn padding(&self) -> [usize; 3] {
        self.padding
    }

    pub fn is_submanifold(&self) -> bool {
        self.submanifold
    }

    /// Input grid (D, H, W).
    pub fn in_shape(&self) -> [usize; 3] {
        self.in_shape
    }

    /// Output grid (D', H', W').
    pub fn out_shape(&self) -> [usize; 3] {
        self.out_shape
    }

    /// Number of input sites the rulebook was built for.
    pub fn n_in(&self) -> usize {
        self.n_in
    }

    /// Number of output sites.
    pub fn n_out(&self) -> usize {
        self.out_coords.len()
    }

    /// Output sites (z, y, x), row order of the conv's output features.
    pub fn out_coords(&self) -> &[[u32; 3]] {
        &self.out_coords
    }

    /// Pairs of every offset, in offset order.
    pub fn pairs(&self) -> &[OffsetPairs] {
        &self.pairs
    }

    /// Marks a missing neighbour in [`neighbours`](Self::neighbours).
    pub const NO_NEIGHBOUR: u32 = u32::MAX;

    /// `[n_out, taps]`: the input row each output reads under each offset, or
    /// [`NO_NEIGHBOUR`](Self::NO_NEIGHBOUR). Built once, on first use.
    pub fn neighbours(&self) -> &[u32] {
        self.neighbours.0.get_or_init(|| {
            let taps = self.pairs.len();
            let mut nbr = vec![Self::NO_NEIGHBOUR; self.n_out() * taps];
            for (t, p) in self.pairs.iter().enumerate() {
                for (&i, &o) in p.input.iter().zip(&p.output) {
                    nbr[o as usize * taps + t] = i;
                }
            }
            nbr
        })
    }

    /// Total pairs over all offsets (multiply-adds per channel pair).
    pub fn num_pairs(&self) -> usize {
        self.pairs.iter().map(OffsetPairs::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::rng;
    use rand::RngExt;
    use rand_chacha::ChaCha8Rng;
    use std::collections::BTreeSet;

    /// Kernel index (z, y, x) of each offset number, in offset order.
    fn kernel_indices(kernel: [usize; 3]) -> Vec<[usize; 3]> {
        let mut v = Vec::with_capacity(kernel.iter().product());
        for a in 0..kernel[0] {
            for b in 0..kernel[1] {
                for c in 0..kernel[2] {
                    v.push([a, b, c]);
                }
            }
        }
        v
    }

    pub(crate) fn random_sites(r: &mut ChaCha8Rng, shape: [usize; 3], n: usize) -> Vec<[u32; 3]> {
        let mut seen = BTreeSet::new();
        let mut v = Vec::new();
        while v.len() < n {
            let c = shape.map(|s| r.random_range(0..s as u32));
            if seen.insert(c) {
                v.push(c);
            }
        }
        v
    }

    fn check_pair_invariants(rb: &Rulebook) {
        for p in rb.pairs() {
            assert!(p.input.windows(2).all(|w| w[0] < w[1]));
            let outs: BTreeSet<_> = p.output.iter().collect();
            assert_eq!(outs.len(), p.len(), "an output repeats within an offset");
            assert!(p.output.iter().all(|&o| (o as usize) < rb.n_out()));
        }
    }

    /// Submanifold: outputs are the inputs; a pair exists exactly where input = output +
    /// (offset - centre) and both are active.
    #[test]
    fn sparse_rulebook_submanifold_properties() {
        let mut r = rng(3);
        // Dense site sets on narrow grids put neighbours of equal linear-index distance
        // across the grid's edges (wraps the sweep must reject).
        for (shape, k, n) in [
            ([5, 6, 7], 3, 60),
            ([4, 3, 9], 5, 80),
            ([2, 1, 8], 3, 12),
            ([3, 4, 2], 1, 10),
        ] {
            let coords = random_sites(&mut r, shape, n);
            let rb = Rulebook::submanifold(&coords, shape, k).unwrap();
            assert_eq!(rb.out_coords(), coords.as_slice());
            assert_eq!(rb.out_shape(), shape);
            assert_eq!(rb.kernel_volume(), k * k * k);
            check_pair_invariants(&rb);
            // The centre offset maps every site to itself.
            let centre = &rb.pairs()[k * k * k / 2];
            assert_eq!(centre.input, centre.output);
            assert_eq!(centre.len(), coords.len());
            let h = (k / 2) as i64;
            for (o_k, kk) in kernel_indices([k; 3]).into_iter().enumerate() {
                let mut want = Vec::new();
                for (o, co) in coords.iter().enumerate() {
                    for (i, ci) in coords.iter().enumerate() {
                        if (0..3).all(|a| ci[a] as i64 == co[a] as i64 + kk[a] as i64 - h) {
                            want.push((i as u32, o as u32));
                        }
                    }
                }
                want.sort();
                let p = &rb.pairs()[o_k];
                let got: Vec<_> = p
                    .input
                    .iter()
                    .copied()
                    .zip(p.output.iter().copied())
                    .collect();
                assert_eq!(got, want, "shape {shape:?} k {k} offset {kk:?}");
            }
        }
    }

    /// Regular conv: output sites are exactly the dense-conv outputs some active input
    /// touches, numbered by first reach, and pairs match the index arithmetic.
    #[test]
    fn sparse_rulebook_regular_properties() {
        let mut r = rng(4);
        for (shape, kernel, stride, padding) in [
            ([7, 9, 8], [3, 3, 3], [2, 2, 2], [1, 1, 1]),
            ([5, 6, 6], [3, 3, 3], [2, 2, 2], [0, 1, 1]),
            ([5, 4, 3], [3, 1, 1], [2, 1, 1], [0, 0, 0]),
            ([6, 5, 5], [2, 3, 1], [1, 2, 3], [1, 0, 2]),
        ] {
            let coords = random_sites(&mut r, shape, 25);
            let rb = Rulebook::regular(&coords, shape, kernel, stride, padding).unwrap();
            let out_shape: [usize; 3] =
                std::array::from_fn(|a| (shape[a] + 2 * padding[a] - kernel[a]) / stride[a] + 1);
            assert_eq!(rb.out_shape(), out_shape);
            check_pair_invariants(&rb);
            // Brute force over every dense output site and kernel offset.
            let mut want_sites = Vec::new();
            let mut want_pairs = vec![Vec::new(); kernel.iter().product()];
            for oz in 0..out_shape[0] {
                for oy in 0..out_shape[1] {
                    for ox in 0..out_shape[2] {
                        let o = [oz, oy, ox];
                        let mut touched = false;
                        for (k, kk) in kernel_indices(kernel).into_iter().enumerate() {
                            let ci: [i64; 3] = std::array::from_fn(|a| {
                                (o[a] * stride[a] + kk[a]) as i64 - padding[a] as i64
                            });
                            if let Some(i) = coords
                                .iter()
                                .position(|c| (0..3).all(|a| c[a] as i64 == ci[a]))
                            {
                                touched = true;
                                want_pairs[k].push((i as u32, o.map(|v| v as u32)));
                            }
                        }
                        if touched {
                            want_sites.push(o.map(|v| v as u32));
                        }
                    }
                }
            }
            let mut got_sites = rb.out_coords().to_vec();
            got_sites.sort();
            assert_eq!(got_sites, want_sites, "{kernel:?} {stride:?}");
            // First-reach numbering: scanning pairs by input row, then offset, output rows
            // appear as 0, 1, 2, ...
            let mut seen = vec![false; rb.n_out()];
            let mut next = 0;
            for i in 0..coords.len() as u32 {
                for p in rb.pairs() {
                    if let Ok(j) = p.input.binary_search(&i) {
                        let o = p.output[j] as usize;
                        if !seen[o] {
                            assert_eq!(o, next, "output rows numbered by first reach");
                            seen[o] = true;
                            next += 1;
                        }
                    }
                }
            }
            assert_eq!(next, rb.n_out());
            for (k, p) in rb.pairs().iter().enumerate() {
                let mut got: Vec<_> = p
                    .input
                    .iter()
                    .zip(&p.output)
                    .map(|(&i, &o)| (i, rb.out_coords()[o as usize]))
                    .collect();
                got.sort();
                want_pairs[k].sort();
                assert_eq!(got, want_pairs[k]);
            }
        }
    }

    #[test]
    fn sparse_rulebook_errors() {
        let c = [[0, 0, 0], [1, 1, 1]];
        let e = |r: Result<Rulebook>| r.unwrap_err().to_string();
        assert!(e(Rulebook::submanifold(&c, [2, 2, 2], 2)).contains("odd"));
        assert!(e(Rulebook::submanifold(&c, [2, 2, 1], 3)).contains("outside the grid"));
        assert!(e(Rulebook::submanifold(&[[0, 0, 0]; 2], [2, 2, 2], 3)).contains("rows 0 and 1"));
        assert!(e(Rulebook::submanifold(&[], [0, 2, 2], 3)).contains("shape"));
        assert!(
            e(Rulebook::regular(
                &c,
                [2, 2, 2],
                [3, 3, 3],
                [1, 1, 1],
                [0, 0, 0]
            ))
            .contains("does not fit")
        );
        assert!(
            e(Rulebook::regular(
                &c,
                [2, 2, 2],
                [1, 1, 1],
                [0, 1, 1],
                [0, 0, 0]
            ))
            .contains(">= 1")
        );
        assert!(
            e(Rulebook::regular(
                &[[0, 0, 5]],
                [2, 2, 2],
                [1, 1, 1],
                [1, 1, 1],
                [0, 0, 0]
            ))
            .contains("outside")
        );
        // Empty inputs are valid and produce nothing.
        let rb = Rulebook::regular(&[], [4, 4, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1]).unwrap();
        assert_eq!((rb.n_in(), rb.n_out(), rb.num_pairs()), (0, 0, 0));
    }
}
