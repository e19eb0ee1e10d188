//! Safe wrapper over the `gemm` crate's strided f32 GEMM, used by linear and the convolutions.

/// A read-only strided matrix view: element (r, c) is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub(crate) struct MatRef<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl<'a> MatRef<'a> {
    /// Row-major matrix with row stride `ld`.
    pub fn rows(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: ld,
            cs: 1,
        }
    }

    /// The transpose of a row-major matrix with row stride `ld`.
    pub fn transposed(data: &'a [f32], ld: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: ld,
        }
    }

    /// Largest flat index touched by an `r x c` view (None when the view is empty).
    fn last_index(&self, r: usize, c: usize) -> Option<usize> {
        (r > 0 && c > 0).then(|| (r - 1) * self.rs + (c - 1) * self.cs)
    }
}

/// Below this many multiply-adds, threading costs more than it saves.
const PARALLEL_MIN_FLOPS: usize = 1 << 20;

/// `dst[m, n] (row stride ld_dst) = a[m, k] * b[k, n]`, plus the old `dst` if `accumulate`.
///
/// Panics if a view reaches outside its slice: callers validate shapes first, so this guards
/// an internal invariant (memory safety of the raw-pointer call), not user input.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
) {
    gemm_on(m, n, k, dst, ld_dst, accumulate, a, b, true);
}

/// [`gemm`] on the calling thread, for callers that already split work over threads.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_serial(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
) {
    gemm_on(m, n, k, dst, ld_dst, accumulate, a, b, false);
}

#[allow(clippy::too_many_arguments)]
fn gemm_on(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    ld_dst: usize,
    accumulate: bool,
    a: MatRef<'_>,
    b: MatRef<'_>,
    threads: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                dst[r * ld_dst..r * ld_dst + n].fill(0.0);
            }
        }
        return;
    }
    assert!(
        (m - 1) * ld_dst + n <= dst.len(),
        "gemm: dst view out of bounds"
    );
    assert!(
        a.last_index(m, k).is_some_and(|i| i < a.data.len()),
        "gemm: lhs view out of bounds"
    );
    assert!(
        b.last_index(k, n).is_some_and(|i| i < b.data.len()),
        "gemm: rhs view out of bounds"
    );
    let par = if threads && m * n * k >= PARALLEL_MIN_FLOPS {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the asserts above keep every accessed element inside its slice; dst does not
    // alias a or b because it is borrowed mutably.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            ld_dst as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{rng, uniform_vec};

    #[test]
    fn matches_naive_with_transposes_and_accumulate() {
        let mut r = rng(1);
        for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (17, 9, 33), (64, 65, 31)] {
            let a = uniform_vec(&mut r, m * k, 1.0);
            let bt = uniform_vec(&mut r, n * k, 1.0); // b stored transposed: [n, k]
            let init = uniform_vec(&mut r, m * n, 1.0);
            let mut dst = init.clone();
            gemm(
                m,
                n,
                k,
                &mut dst,
                n,
                true,
                MatRef::rows(&a, k),
                MatRef::transposed(&bt, k),
            );
            for i in 0..m {
                for j in 0..n {
                    let mut s = init[i * n + j] as f64;
                    for p in 0..k {
                        s += a[i * k + p] as f64 * bt[j * k + p] as f64;
                    }
                    assert!(
                        (dst[i * n + j] as f64 - s).abs() < 1e-4,
                        "({m},{n},{k}) at {i},{j}"
                    );
                }
            }
        }
    }
}
