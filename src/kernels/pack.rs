//! Load-time packing of a weight matrix `W[M, K]` for the SIMD GEMM kernels.
//!
//! Rows are grouped in blocks of [`MR`] (the micro-kernel's rows; the last block is padded
//! with zero rows) and K in pairs (odd K gets a zero column): bytes
//! `wp[((block * kp + p) * MR + i) * 2 + {0, 1}]` hold `w[block * MR + i, 2p]` and
//! `w[.., 2p + 1]`. Sign-extending a block to i16 (`vpmovsxbw`) gives, per i32 lane, the
//! weight pair `vpmaddwd` multiplies against a pair of widened activations; the kernels
//! widen one block at a time into scratch, so resident weights stay one byte each. The
//! scalar reference reads the same store through [`GemmWeights::at`]. Portable code: only
//! the consumers are ISA-specific.

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
    /// Packed i8 pairs, `ceil(m / MR) * kp * MR * 2` bytes.
    pub wp: Vec<i8>,
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
        let at = |row: usize, kk: usize| -> i8 { if row < m && kk < k { w(row, kk) } else { 0 } };
        let mut wp = vec![0i8; blocks * kp * MR * 2];
        for b in 0..blocks {
            for p in 0..kp {
                for i in 0..MR {
                    let row = b * MR + i;
                    let e = ((b * kp + p) * MR + i) * 2;
                    wp[e] = at(row, 2 * p);
                    wp[e + 1] = at(row, 2 * p + 1);
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

    /// Element `(row, k)` of the logical `[m, k]` matrix.
    #[inline]
    pub fn at(&self, row: usize, k: usize) -> i8 {
        self.wp[((row / MR * self.kp + k / 2) * MR + row % MR) * 2 + k % 2]
    }

    /// Resident bytes: packed weights, sums, biases and epilogue parameters.
    pub fn bytes(&self) -> usize {
        let epi = match &self.epilogue {
            Epilogue::Requant(r) => std::mem::size_of_val(r.as_slice()),
            Epilogue::Dequant { weight_scale, .. } => 4 * weight_scale.len(),
        };
        self.wp.len() + 4 * (self.wsum.len() + self.bias.len() + self.deq_scale.len()) + epi
    }
}
