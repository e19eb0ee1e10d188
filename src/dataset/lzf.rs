//! LZF decompression (liblzf's format, as PCL's `binary_compressed` PCD data uses it).
//!
//! The stream is a sequence of runs, each introduced by a control byte `c`:
//! - `c < 32`: a literal run of `c + 1` bytes that follow;
//! - otherwise a back-reference of `(c >> 5) + 2` bytes (when `c >> 5 == 7`, one more byte
//!   is added to the length), starting `((c & 0x1f) << 8 | next byte) + 1` bytes back in
//!   the output. Back-references may overlap the bytes they produce.

use thiserror::Error;

/// What was wrong with an LZF stream; offsets are into the compressed input.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LzfError {
    #[error("LZF literal run at offset {offset} needs {needed} bytes but only {available} remain")]
    TruncatedLiteral {
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error("LZF back-reference at offset {offset} is cut off by the end of the input")]
    TruncatedReference { offset: usize },
    #[error(
        "LZF back-reference at offset {offset} points {distance} bytes back but only {produced} bytes were produced"
    )]
    ReferenceBeforeStart {
        offset: usize,
        distance: usize,
        produced: usize,
    },
    #[error(
        "LZF output would exceed the declared size of {expected} bytes (at input offset {offset})"
    )]
    OutputOverflow { offset: usize, expected: usize },
    #[error("LZF output is {got} bytes but {expected} were declared")]
    OutputSizeMismatch { expected: usize, got: usize },
}

/// Decompresses `input`, which must expand to exactly `expected_len` bytes.
pub fn decompress(input: &[u8], expected_len: usize) -> Result<Vec<u8>, LzfError> {
    let mut out: Vec<u8> = Vec::with_capacity(expected_len);
    let mut i = 0usize;
    while i < input.len() {
        let offset = i;
        let ctrl = input[i] as usize;
        i += 1;
        if ctrl < 32 {
            let n = ctrl + 1;
            let available = input.len() - i;
            if n > available {
                return Err(LzfError::TruncatedLiteral {
                    offset,
                    needed: n,
                    available,
                });
            }
            if out.len() + n > expected_len {
                return Err(LzfError::OutputOverflow {
                    offset,
                    expected: expected_len,
                });
            }
            out.extend_from_slice(&input[i..i + n]);
            i += n;
        } else {
            let mut len = ctrl >> 5;
            if len == 7 {
                len += *input
                    .get(i)
                    .ok_or(LzfError::TruncatedReference { offset })?
                    as usize;
                i += 1;
            }
            len += 2;
            let low = *input
                .get(i)
                .ok_or(LzfError::TruncatedReference { offset })? as usize;
            i += 1;
            let distance = ((ctrl & 0x1f) << 8 | low) + 1;
            if distance > out.len() {
                return Err(LzfError::ReferenceBeforeStart {
                    offset,
                    distance,
                    produced: out.len(),
                });
            }
            if out.len() + len > expected_len {
                return Err(LzfError::OutputOverflow {
                    offset,
                    expected: expected_len,
                });
            }
            // Byte by byte: an overlapping reference repeats what it has just written.
            let start = out.len() - distance;
            for k in 0..len {
                let b = out[start + k];
                out.push(b);
            }
        }
    }
    if out.len() != expected_len {
        return Err(LzfError::OutputSizeMismatch {
            expected: expected_len,
            got: out.len(),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_and_overlapping_reference() {
        // "ab" literal, then a 6-byte reference 2 back: "abababab".
        let input = [1, b'a', b'b', (4 << 5), 1];
        assert_eq!(decompress(&input, 8).unwrap(), b"abababab");
    }

    #[test]
    fn long_reference_uses_extra_length_byte() {
        // 1 literal byte then a reference of 7 + 3 + 2 = 12 bytes, distance 1.
        let input = [0, b'z', (7 << 5), 3, 0];
        assert_eq!(decompress(&input, 13).unwrap(), vec![b'z'; 13]);
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            decompress(&[5, 1, 2], 6),
            Err(LzfError::TruncatedLiteral {
                offset: 0,
                needed: 6,
                available: 2
            })
        );
        assert_eq!(
            decompress(&[0, 1, (1 << 5)], 4),
            Err(LzfError::TruncatedReference { offset: 2 })
        );
        assert_eq!(
            decompress(&[0, 1, (1 << 5), 4], 4),
            Err(LzfError::ReferenceBeforeStart {
                offset: 2,
                distance: 5,
                produced: 1
            })
        );
        assert_eq!(
            decompress(&[0, 1], 2),
            Err(LzfError::OutputSizeMismatch {
                expected: 2,
                got: 1
            })
        );
        assert_eq!(
            decompress(&[1, 1, 2], 1),
            Err(LzfError::OutputOverflow {
                offset: 0,
                expected: 1
            })
        );
    }
}
