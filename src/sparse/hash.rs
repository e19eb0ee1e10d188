//! Open-addressing hash table from a site's linear index to its row.
//!
//! Sparse tensors on the nuScenes voxel grid (41 x 1440 x 1440 = 85 M cells) cannot afford a
//! dense cell -> row index, and std's SipHash costs more than the lookups it serves. Keys are
//! `u64` linear indices, hashed by Fibonacci multiplication (their low bits are dense
//! neighbourhoods, the high bits of the product mix them), probed linearly; the table stays
//! at most half full so probes stay short.

/// Marks an empty slot; no linear index reaches it (grids are far smaller than 2^64).
const EMPTY: u64 = u64::MAX;

/// Map from linear site index to row, with insert-or-get and lookup only (no removal).
#[derive(Debug, Clone)]
pub struct CoordHash {
    keys: Vec<u64>,
    rows: Vec<u32>,
    /// `64 - log2(capacity)`: the product's top bits index the table.
    shift: u32,
    len: usize,
}

impl Default for CoordHash {
    fn default() -> Self {
        Self::with_capacity(0)
    }
}

impl CoordHash {
    /// A table that holds `n` keys without growing.
    pub fn with_capacity(n: usize) -> Self {
        let cap = (2 * n).next_power_of_two().max(16);
        Self {
            keys: vec![EMPTY; cap],
            rows: vec![0; cap],
            shift: 64 - cap.trailing_zeros(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties the table, keeping its capacity (for reuse across scans).
    pub fn clear(&mut self) {
        if self.len > 0 {
            self.keys.fill(EMPTY);
            self.len = 0;
        }
    }

    #[inline]
    fn slot(&self, key: u64) -> usize {
        (key.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    /// The row stored for `key`, if any.
    #[inline]
    pub fn get(&self, key: u64) -> Option<u32> {
        let mask = self.keys.len() - 1;
        let mut s = self.slot(key);
        loop {
            let k = self.keys[s];
            if k == key {
                return Some(self.rows[s]);
            }
            if k == EMPTY {
                return None;
            }
            s = (s + 1) & mask;
        }
    }

    /// Inserts `key -> row` unless `key` is present; returns the stored row and whether it
    /// was inserted now.
    #[inline]
    pub fn get_or_insert(&mut self, key: u64, row: u32) -> (u32, bool) {
        debug_assert_ne!(key, EMPTY);
        if 2 * (self.len + 1) > self.keys.len() {
            self.grow();
        }
        let mask = self.keys.len() - 1;
        let mut s = self.slot(key);
        loop {
            let k = self.keys[s];
            if k == key {
                return (self.rows[s], false);
            }
            if k == EMPTY {
                self.keys[s] = key;
                self.rows[s] = row;
                self.len += 1;
                return (row, true);
            }
            s = (s + 1) & mask;
        }
    }

    fn grow(&mut self) {
        let mut bigger = Self::with_capacity(self.keys.len());
        for (&k, &r) in self.keys.iter().zip(&self.rows) {
            if k != EMPTY {
                bigger.get_or_insert(k, r);
            }
        }
        *self = bigger;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Against std's HashMap on clustered keys (as lidar sites are), through growth and reuse.
    #[test]
    fn sparse_hash_matches_std_hashmap() {
        let mut h = CoordHash::with_capacity(4);
        let mut reference = HashMap::new();
        for round in 0..2 {
            h.clear();
            reference.clear();
            for i in 0..5000u64 {
                let key = (i * 7919 + round * 13) % 20_000 + (i % 3) * 1_000_000;
                let row = reference.len() as u32;
                let want = *reference.entry(key).or_insert(row);
                let (got, inserted) = h.get_or_insert(key, row);
                assert_eq!(got, want);
                assert_eq!(inserted, want == row);
            }
            assert_eq!(h.len(), reference.len());
            for k in 0..3_100_000u64 {
                assert_eq!(h.get(k), reference.get(&k).copied(), "key {k}");
            }
        }
    }
}
