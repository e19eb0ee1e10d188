//! Load-time packing of a weight matrix `W[M, K]` for the SIMD GEMM kernels.
//!
//! Rows are grouped in blocks of [`MR`] (the micro-kernel's rows; the last block is padded
//! with zero rows) and K in pairs (odd K gets a zero column): element
//! `wp[(block * kp + p) * MR + i]` holds `w[block * MR + i, 2p]` in its low i16 and
//! `w[.., 2p + 1]` in its high i16, the operand `vpmaddwd` multiplies against a pair of
//! widened activations. Portable code: only the consumers are ISA-specific.

use super::Epilogue;

/// Rows (output channels) per micro-kernel tile.
pub(super) const MR: usize = 6;

#[derive(Debug, Clone)]
pub(super) struct GemmWeights {
    /// Rows.
    pub m: usize,
    /// Depth (K) before pair padding.
    pub k: usize,
    /// K pairs (`ceil(K / 2)`).
    pub kp: usize,
    /// Packed i16 pairs, `ceil(m / MR) * kp * MR` elements.
    pub wp: Vec<i32>,
    /// `sum_k w[row, k]` (folds the input zero point into the epilogue).
    pub wsum: Vec<i32>,
    /// Per-row quantized bias and epilogue.
    pub bias: Vec<i32>,
    pub epilogue: Epilogue,
    /// Per-row `s_in * s_w` of a dequantizing epilogue (the factor `dequantize_acc` uses).
    pub deq_scale: Vec<f32>,
}

impl GemmWeights {
    /// `w(row, k)` gives the element of the logical `[m, k]` matrix.
    pub fn new(
        m: usize,
        k: usize,
        bias: &[i32],
        epilogue: Epilogue,
        w: impl Fn(usize, usize) -> i8,
    ) -> Self {
        let kp = k.div_ceil(2);
        let blocks = m.div_ceil(MR);
        let at = |row: usize, kk: usize| -> i32 {
            if row < m && kk < k {
                w(row, kk) as i32
            } else {
                0
            }
        };
        let mut wp = vec![0i32; blocks * kp * MR];
        for b in 0..blocks {
            for p in 0..kp {
                for i in 0..MR {
                    let row = b * MR + i;
                    let lo = at(row, 2 * p) as i16 as u16 as u32;
                    let hi = at(row, 2 * p + 1) as i16 as u16 as u32;
                    wp[(b * kp + p) * MR + i] = (lo | (hi << 16)) as i32;
                }
            }
        }
        // Wrapping, like the accumulator it corrects.
        let wsum = (0..m)
            .map(|r| (0..k).fold(0i32, |s, kk| s.wrapping_add(w(r, kk) as i32)))
            .collect();
        let deq_scale = match &epilogue {
            Epilogue::Requant(_) => Vec::new(),
            Epilogue::Dequant {
                input_scale,
                weight_scale,
                ..
            } => weight_scale.iter().map(|&s| input_scale * s).collect(),
        };
        Self {
            m,
            k,
            kp,
            wp,
            wsum,
            bias: bias.to_vec(),
            epilogue,
            deq_scale,
        }
    }
}
