//! Addressing one channel of a row-major tensor along an axis (axis 0 for conv weights
//! `[Cout, Cin, kh, kw]`, axis 1 for transposed-conv weights `[Cin, Cout, kh, kw]`).

use super::error::{QuantError, Result};

/// A row-major shape seen as `[outer, channels, inner]` around one axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelLayout {
    pub outer: usize,
    pub channels: usize,
    pub inner: usize,
}

impl ChannelLayout {
    pub fn new(what: &'static str, shape: &[usize], axis: usize) -> Result<Self> {
        if axis >= shape.len() {
            return Err(QuantError::Axis {
                what,
                axis,
                shape: shape.to_vec(),
            });
        }
        Ok(Self {
            outer: shape[..axis].iter().product(),
            channels: shape[axis],
            inner: shape[axis + 1..].iter().product(),
        })
    }

    pub fn len(&self) -> usize {
        self.outer * self.channels * self.inner
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements per channel.
    pub fn per_channel(&self) -> usize {
        self.outer * self.inner
    }

    /// Flat indices of channel `c`, in memory order.
    pub fn indices(&self, c: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.outer).flat_map(move |o| {
            let base = (o * self.channels + c) * self.inner;
            base..base + self.inner
        })
    }

    /// Channel of flat index `i`.
    #[inline]
    pub fn channel_of(&self, i: usize) -> usize {
        (i / self.inner) % self.channels
    }
}
