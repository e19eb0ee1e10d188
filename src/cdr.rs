//! Plain little-endian CDR (XCDR1), as DDS and rosbag2 store ROS 2 messages.
//!
//! A payload starts with a 4-byte encapsulation header (`00 01 00 00` for little-endian
//! plain CDR); primitives are aligned to their size, relative to the byte after the
//! header. Message modules (`cloud`, `msgs`) build on these primitives.

use thiserror::Error;

/// Encapsulation header of little-endian plain CDR.
pub const CDR_LE_HEADER: [u8; 4] = [0x00, 0x01, 0x00, 0x00];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CdrError {
    #[error("CDR payload of {0} bytes is too short for the 4-byte encapsulation header")]
    NoHeader(usize),
    #[error(
        "CDR encapsulation {0:02x} {1:02x} is not supported (only little-endian plain CDR, 00 01)"
    )]
    Encapsulation(u8, u8),
    #[error("CDR payload ends at byte {len} while reading {what} at offset {offset}")]
    Truncated {
        what: &'static str,
        offset: usize,
        len: usize,
    },
    #[error("{what} at offset {offset} declares {count} elements, more than the payload can hold")]
    BadLength {
        what: &'static str,
        offset: usize,
        count: u64,
    },
    #[error("string {what} at offset {offset} is not NUL-terminated UTF-8")]
    BadString { what: &'static str, offset: usize },
}

/// Reads primitives from a CDR payload, tracking alignment.
pub struct CdrReader<'a> {
    body: &'a [u8],
    pos: usize,
}

impl<'a> CdrReader<'a> {
    /// Checks the encapsulation header and positions the reader after it.
    pub fn new(payload: &'a [u8]) -> Result<Self, CdrError> {
        if payload.len() < 4 {
            return Err(CdrError::NoHeader(payload.len()));
        }
        match (payload[0], payload[1]) {
            (0x00, 0x01) => {}
            (a, b) => return Err(CdrError::Encapsulation(a, b)),
        }
        Ok(Self {
            body: &payload[4..],
            pos: 0,
        })
    }

    /// Offset of the next read, relative to the byte after the header.
    pub fn position(&self) -> usize {
        self.pos
    }

    /// Bytes left after the read position.
    pub fn remaining(&self) -> usize {
        self.body.len().saturating_sub(self.pos)
    }

    fn align(&mut self, n: usize) {
        self.pos = self.pos.div_ceil(n) * n;
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CdrError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.body.len());
        match end {
            Some(end) => {
                let s = &self.body[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(CdrError::Truncated {
                what,
                offset: self.pos,
                len: self.body.len(),
            }),
        }
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, CdrError> {
        Ok(self.take(1, what)?[0])
    }

    pub fn bool(&mut self, what: &'static str) -> Result<bool, CdrError> {
        Ok(self.u8(what)? != 0)
    }

    pub fn u16(&mut self, what: &'static str) -> Result<u16, CdrError> {
        self.align(2);
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    pub fn u32(&mut self, what: &'static str) -> Result<u32, CdrError> {
        self.align(4);
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes(b.try_into().expect("4 bytes")))
    }

    pub fn i32(&mut self, what: &'static str) -> Result<i32, CdrError> {
        Ok(self.u32(what)? as i32)
    }

    pub fn f32(&mut self, what: &'static str) -> Result<f32, CdrError> {
        Ok(f32::from_bits(self.u32(what)?))
    }

    pub fn u64(&mut self, what: &'static str) -> Result<u64, CdrError> {
        self.align(8);
        let b = self.take(8, what)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    pub fn f64(&mut self, what: &'static str) -> Result<f64, CdrError> {
        Ok(f64::from_bits(self.u64(what)?))
    }

    /// A sequence length, checked against the bytes left (`elem_size` bytes per element
    /// at least), so a corrupt length never triggers a huge allocation.
    pub fn seq_len(&mut self, what: &'static str, elem_size: usize) -> Result<usize, CdrError> {
        let offset = self.pos;
        let n = self.u32(what)? as usize;
        if n.saturating_mul(elem_size.max(1)) > self.remaining() {
            return Err(CdrError::BadLength {
                what,
                offset,
                count: n as u64,
            });
        }
        Ok(n)
    }

    /// A `string`: u32 length including the NUL, then the bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String, CdrError> {
        let offset = self.pos;
        let n = self.seq_len(what, 1)?;
        if n == 0 {
            // Some writers emit length 0 for the empty string.
            return Ok(String::new());
        }
        let bytes = self.take(n, what)?;
        match bytes.split_last() {
            Some((0, s)) => std::str::from_utf8(s)
                .map(str::to_owned)
                .map_err(|_| CdrError::BadString { what, offset }),
            _ => Err(CdrError::BadString { what, offset }),
        }
    }

    /// A `uint8[]` sequence, borrowed from the payload.
    pub fn bytes(&mut self, what: &'static str) -> Result<&'a [u8], CdrError> {
        let n = self.seq_len(what, 1)?;
        self.take(n, what)
    }
}

/// Writes primitives into a CDR payload (header included), aligning as CDR requires.
pub struct CdrWriter {
    buf: Vec<u8>,
}

impl Default for CdrWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl CdrWriter {
    pub fn new() -> Self {
        Self::with_capacity(64)
    }

    pub fn with_capacity(n: usize) -> Self {
        let mut buf = Vec::with_capacity(n + 4);
        buf.extend_from_slice(&CDR_LE_HEADER);
        Self { buf }
    }

    fn align(&mut self, n: usize) {
        let pos = self.buf.len() - 4;
        let pad = pos.div_ceil(n) * n - pos;
        self.buf.resize(self.buf.len() + pad, 0);
    }

    pub fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    pub fn bool(&mut self, v: bool) {
        self.buf.push(v as u8);
    }

    pub fn u16(&mut self, v: u16) {
        self.align(2);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn u32(&mut self, v: u32) {
        self.align(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn i32(&mut self, v: i32) {
        self.u32(v as u32);
    }

    pub fn f32(&mut self, v: f32) {
        self.u32(v.to_bits());
    }

    pub fn u64(&mut self, v: u64) {
        self.align(8);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    pub fn f64(&mut self, v: f64) {
        self.u64(v.to_bits());
    }

    /// Writes a sequence length. Panics only if `n` exceeds u32::MAX, which no ROS
    /// message can hold.
    pub fn seq_len(&mut self, n: usize) {
        self.u32(u32::try_from(n).expect("CDR sequence longer than u32::MAX"));
    }

    pub fn string(&mut self, s: &str) {
        self.seq_len(s.len() + 1);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    pub fn bytes(&mut self, b: &[u8]) {
        self.seq_len(b.len());
        self.buf.extend_from_slice(b);
    }

    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_is_relative_to_the_body() {
        let mut w = CdrWriter::new();
        w.u8(7);
        w.u32(0xdead_beef);
        w.u8(1);
        w.f64(2.5);
        w.string("map");
        let buf = w.finish();
        // header(4) u8(1) pad(3) u32(4) u8(1) pad(7) f64(8) len(4) "map\0"(4)
        assert_eq!(buf.len(), 4 + 1 + 3 + 4 + 1 + 7 + 8 + 4 + 4);
        assert_eq!(&buf[8..12], &0xdead_beef_u32.to_le_bytes());
        let mut r = CdrReader::new(&buf).unwrap();
        assert_eq!(r.u8("a").unwrap(), 7);
        assert_eq!(r.u32("b").unwrap(), 0xdead_beef);
        assert_eq!(r.u8("c").unwrap(), 1);
        assert_eq!(r.f64("d").unwrap(), 2.5);
        assert_eq!(r.string("e").unwrap(), "map");
        assert_eq!(r.remaining(), 0);
    }

    #[test]
    fn rejects_bad_headers_and_lengths() {
        assert_eq!(CdrReader::new(&[0, 1]).err(), Some(CdrError::NoHeader(2)));
        assert_eq!(
            CdrReader::new(&[0, 0, 0, 0]).err(),
            Some(CdrError::Encapsulation(0, 0))
        );
        let mut w = CdrWriter::new();
        w.u32(1_000_000); // a sequence length with nothing behind it
        let buf = w.finish();
        let mut r = CdrReader::new(&buf).unwrap();
        assert!(matches!(r.bytes("data"), Err(CdrError::BadLength { .. })));
        let mut r = CdrReader::new(&buf[..6]).unwrap();
        assert!(matches!(r.u32("x"), Err(CdrError::Truncated { .. })));
    }
}
