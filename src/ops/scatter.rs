//! Scatter of pillar features `[P, C]` into a dense BEV image `[C, ny, nx]` at the pillars'
//! grid cells (empty cells are 0), and its adjoint, the gather `[C, ny, nx] -> [P, C]`.

use super::{OpsError, Result, Tensor, dims};

const OP: &str = "scatter";

/// A pillar's BEV cell: row `y` (0..ny) and column `x` (0..nx).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cell {
    pub y: u32,
    pub x: u32,
}

/// Checks that every cell is inside the grid and no cell is used twice (a duplicate means
/// the voxeliser produced two pillars for one cell; the scatter would silently drop one).
fn check_cells(cells: &[Cell], ny: usize, nx: usize, check_duplicates: bool) -> Result<()> {
    let mut seen = if check_duplicates {
        vec![false; ny * nx]
    } else {
        Vec::new()
    };
    for (i, c) in cells.iter().enumerate() {
        if c.y as usize >= ny || c.x as usize >= nx {
            return Err(OpsError::Invalid {
                op: OP,
                arg: "cells",
                detail: format!(
                    "pillar {i} at (y {}, x {}) is outside the {ny}x{nx} grid",
                    c.y, c.x
                ),
            });
        }
        if check_duplicates {
            let k = c.y as usize * nx + c.x as usize;
            if std::mem::replace(&mut seen[k], true) {
                return Err(OpsError::Invalid {
                    op: OP,
                    arg: "cells",
                    detail: format!("pillar {i} repeats cell (y {}, x {})", c.y, c.x),
                });
            }
        }
    }
    Ok(())
}

/// `[P, C]` pillar features -> `[C, ny, nx]` image, zero where no pillar is.
pub fn forward(features: &Tensor, cells: &[Cell], ny: usize, nx: usize) -> Result<Tensor> {
    let [p, c] = dims::<2>(OP, "features", features)?;
    super::expect_len(OP, "cells", cells.len(), p)?;
    check_cells(cells, ny, nx, true)?;
    let plane = ny * nx;
    let mut img = Tensor::zeros(&[c, ny, nx]);
    for (i, cell) in cells.iter().enumerate() {
        let k = cell.y as usize * nx + cell.x as usize;
        for ch in 0..c {
            img.data[ch * plane + k] = features.data[i * c + ch];
        }
    }
    Ok(img)
}

/// Gather `[C, ny, nx] -> [P, C]`: the adjoint of [`forward`], hence its backward. Cells may
/// repeat here (reading twice is well defined).
pub fn gather(image: &Tensor, cells: &[Cell]) -> Result<Tensor> {
    let [c, ny, nx] = dims::<3>(OP, "image", image)?;
    check_cells(cells, ny, nx, false)?;
    let plane = ny * nx;
    let mut out = Tensor::zeros(&[cells.len(), c]);
    for (i, cell) in cells.iter().enumerate() {
        let k = cell.y as usize * nx + cell.x as usize;
        for ch in 0..c {
            out.data[i * c + ch] = image.data[ch * plane + k];
        }
    }
    Ok(out)
}

/// Backward of the scatter: the gradient of the pillar features.
pub fn backward(grad_out: &Tensor, cells: &[Cell]) -> Result<Tensor> {
    gather(grad_out, cells)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::*;
    use rand::RngExt;
    use rand::seq::SliceRandom;

    fn random_cells(r: &mut rand_chacha::ChaCha8Rng, p: usize, ny: usize, nx: usize) -> Vec<Cell> {
        let mut all: Vec<Cell> = (0..ny as u32)
            .flat_map(|y| (0..nx as u32).map(move |x| Cell { y, x }))
            .collect();
        all.shuffle(r);
        all.truncate(p);
        all
    }

    fn naive(f: &[f64], cells: &[Cell], c: usize, ny: usize, nx: usize) -> Vec<f64> {
        let mut img = vec![0.0; c * ny * nx];
        for (i, cell) in cells.iter().enumerate() {
            for ch in 0..c {
                img[(ch * ny + cell.y as usize) * nx + cell.x as usize] = f[i * c + ch];
            }
        }
        img
    }

    #[test]
    fn forward_and_backward_match_reference() {
        let mut r = rng(61);
        for &(c, ny, nx) in &[(3, 5, 7), (4, 9, 4), (1, 1, 1)] {
            let p = r.random_range(1..=ny * nx);
            let cells = random_cells(&mut r, p, ny, nx);
            let f = uniform(&mut r, &[p, c], 1.0);
            let img = forward(&f, &cells, ny, nx).unwrap();
            let fd64 = to_f64(&f.data);
            assert_close("img", &img.data, &naive(&fd64, &cells, c, ny, nx), 0.0);
            let gy = uniform(&mut r, &img.shape, 1.0);
            let gf = backward(&gy, &cells).unwrap();
            let fd = fd_grad(&fd64, |v| dot(&gy.data, &naive(v, &cells, c, ny, nx)));
            assert_close("dfeatures", &gf.data, &fd, 1e-6);
            // gather(scatter(f)) == f
            assert_eq!(gather(&img, &cells).unwrap(), f);
        }
    }

    #[test]
    fn rejects_bad_cells() {
        let f = Tensor::zeros(&[2, 3]);
        let out = [Cell { y: 0, x: 0 }, Cell { y: 4, x: 0 }];
        assert!(matches!(
            forward(&f, &out, 4, 4),
            Err(OpsError::Invalid { arg: "cells", .. })
        ));
        let dup = [Cell { y: 1, x: 2 }, Cell { y: 1, x: 2 }];
        assert!(matches!(
            forward(&f, &dup, 4, 4),
            Err(OpsError::Invalid { arg: "cells", .. })
        ));
        assert!(matches!(
            forward(&f, &dup[..1], 4, 4),
            Err(OpsError::Shape { arg: "cells", .. })
        ));
        assert!(gather(&Tensor::zeros(&[3, 4, 4]), &out).is_err());
    }
}
