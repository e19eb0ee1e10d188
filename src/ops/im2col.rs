//! im2col / col2im packing shared by conv2d and transposed conv2d.
//!
//! For an image `[c, h, w]` and a kernel `kh x kw` with stride and zero padding, the column
//! matrix has `c * kh * kw` rows (row `(ci * kh + ky) * kw + kx`) and one column per output
//! position. `im2col` packs a band of output rows `[oy0, oy1)`, so callers can tile the
//! matrix to keep it in cache; `col2im` is its exact adjoint (scatter-add).

use rayon::prelude::*;

/// Geometry of a convolution over one `[c, h, w]` image producing a `[ho, wo]` grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub ph: usize,
    pub pw: usize,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// Rows of the column matrix.
    pub fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Output columns whose input column `ox * sw + kx - pw` lies inside `[0, w)`.
    fn valid_cols(&self, kx: usize) -> std::ops::Range<usize> {
        // ox >= ceil((pw - kx) / sw) and ox * sw + kx - pw <= w - 1.
        let lo = if self.pw > kx {
            (self.pw - kx).div_ceil(self.sw)
        } else {
            0
        };
        let hi = if self.w + self.pw > kx {
            ((self.w + self.pw - kx - 1) / self.sw + 1).min(self.wo)
        } else {
            0
        };
        lo.min(hi)..hi
    }

    /// Input row of output row `oy` at kernel row `ky`, if inside the image.
    fn in_row(&self, oy: usize, ky: usize) -> Option<usize> {
        (oy * self.sh + ky)
            .checked_sub(self.ph)
            .filter(|&iy| iy < self.h)
    }
}

/// Packs output rows `[oy0, oy1)` of `img` (`[c, h, w]`) into `col` (`[k, (oy1-oy0) * wo]`),
/// channels spread over the thread pool.
pub(crate) fn im2col(img: &[f32], g: &Geom, oy0: usize, oy1: usize, col: &mut [f32]) {
    let Some(per_c) = check_band(img, g, oy0, oy1, col) else {
        return;
    };
    col[..g.c * per_c]
        .par_chunks_mut(per_c)
        .enumerate()
        .for_each(|(ci, dst)| pack_channel(img, g, oy0, oy1, ci, dst));
}

/// [`im2col`] on the calling thread, for callers that already split work over threads.
pub(crate) fn im2col_serial(img: &[f32], g: &Geom, oy0: usize, oy1: usize, col: &mut [f32]) {
    let Some(per_c) = check_band(img, g, oy0, oy1, col) else {
        return;
    };
    for (ci, dst) in col[..g.c * per_c].chunks_exact_mut(per_c).enumerate() {
        pack_channel(img, g, oy0, oy1, ci, dst);
    }
}

/// Checks buffer sizes; the length of one channel's block of rows (None when empty).
fn check_band(img: &[f32], g: &Geom, oy0: usize, oy1: usize, col: &[f32]) -> Option<usize> {
    let cols = (oy1 - oy0) * g.wo;
    let per_c = g.kh * g.kw * cols;
    assert!(
        img.len() >= g.c * g.h * g.w && col.len() >= g.c * per_c,
        "im2col: buffer too small"
    );
    (per_c > 0).then_some(per_c)
}

/// The `kh * kw` rows of channel `ci` for output rows `[oy0, oy1)`.
fn pack_channel(img: &[f32], g: &Geom, oy0: usize, oy1: usize, ci: usize, dst: &mut [f32]) {
    let cols = (oy1 - oy0) * g.wo;
    let plane = &img[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            let row = &mut dst[(ky * g.kw + kx) * cols..(ky * g.kw + kx + 1) * cols];
            let valid = g.valid_cols(kx);
            for oy in oy0..oy1 {
                let out = &mut row[(oy - oy0) * g.wo..(oy - oy0 + 1) * g.wo];
                let Some(iy) = g.in_row(oy, ky) else {
                    out.fill(0.0);
                    continue;
                };
                out[..valid.start].fill(0.0);
                out[valid.end..].fill(0.0);
                let src = &plane[iy * g.w..(iy + 1) * g.w];
                let x0 = valid.start * g.sw + kx - g.pw;
                if g.sw == 1 {
                    out[valid.clone()].copy_from_slice(&src[x0..x0 + valid.len()]);
                } else {
                    for (j, o) in out[valid.clone()].iter_mut().enumerate() {
                        *o = src[x0 + j * g.sw];
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: adds the columns of output rows `[oy0, oy1)` back onto `img`.
pub(crate) fn col2im_add(col: &[f32], g: &Geom, oy0: usize, oy1: usize, img: &mut [f32]) {
    let cols = (oy1 - oy0) * g.wo;
    let per_c = g.kh * g.kw * cols;
    let plane_len = g.h * g.w;
    assert!(
        img.len() >= g.c * plane_len && col.len() >= g.c * per_c,
        "col2im: buffer too small"
    );
    if per_c == 0 || plane_len == 0 {
        return;
    }
    img[..g.c * plane_len]
        .par_chunks_mut(plane_len)
        .zip(col[..g.c * per_c].par_chunks(per_c))
        .for_each(|(plane, src)| {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let row = &src[(ky * g.kw + kx) * cols..(ky * g.kw + kx + 1) * cols];
                    let valid = g.valid_cols(kx);
                    for oy in oy0..oy1 {
                        let Some(iy) = g.in_row(oy, ky) else { continue };
                        let inp = &row[(oy - oy0) * g.wo..(oy - oy0 + 1) * g.wo];
                        let dst = &mut plane[iy * g.w..(iy + 1) * g.w];
                        let x0 = valid.start * g.sw + kx - g.pw;
                        for (j, &v) in inp[valid.clone()].iter().enumerate() {
                            dst[x0 + j * g.sw] += v;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;

    #[test]
    fn im2col_matches_naive_and_col2im_is_its_adjoint() {
        let mut r = rng(5);
        let geoms = [
            (2, 5, 7, 3, 3, 1, 1, 1, 1),
            (3, 6, 5, 3, 2, 2, 2, 1, 0),
            (1, 4, 4, 1, 1, 2, 1, 0, 0),
            (2, 3, 3, 4, 4, 2, 2, 2, 2),
        ];
        for &(c, h, w, kh, kw, sh, sw, ph, pw) in &geoms {
            let ho = (h + 2 * ph - kh) / sh + 1;
            let wo = (w + 2 * pw - kw) / sw + 1;
            let g = Geom {
                c,
                h,
                w,
                kh,
                kw,
                sh,
                sw,
                ph,
                pw,
                ho,
                wo,
            };
            let img = uniform_vec(&mut r, c * h * w, 1.0);
            for (oy0, oy1) in [(0, ho), (ho / 2, ho)] {
                let cols = (oy1 - oy0) * wo;
                let mut col = vec![f32::NAN; g.k() * cols];
                im2col(&img, &g, oy0, oy1, &mut col);
                for ci in 0..c {
                    for ky in 0..kh {
                        for kx in 0..kw {
                            for oy in oy0..oy1 {
                                for ox in 0..wo {
                                    let iy = (oy * sh + ky) as isize - ph as isize;
                                    let ix = (ox * sw + kx) as isize - pw as isize;
                                    let want = if iy >= 0
                                        && ix >= 0
                                        && (iy as usize) < h
                                        && (ix as usize) < w
                                    {
                                        img[(ci * h + iy as usize) * w + ix as usize]
                                    } else {
                                        0.0
                                    };
                                    let row = (ci * kh + ky) * kw + kx;
                                    assert_eq!(col[row * cols + (oy - oy0) * wo + ox], want);
                                }
                            }
                        }
                    }
                }
                // <im2col(x), y> == <x, col2im(y)>
                let y = uniform_vec(&mut r, col.len(), 1.0);
                let mut back = vec![0.0; img.len()];
                col2im_add(&y, &g, oy0, oy1, &mut back);
                let lhs: f64 = col.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
                let rhs: f64 = img
                    .iter()
                    .zip(&back)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum();
                assert!(
                    (lhs - rhs).abs() < 1e-4 * (1.0 + lhs.abs()),
                    "{lhs} vs {rhs}"
                );
            }
        }
    }
}
