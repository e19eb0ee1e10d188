//! PCD files (PCL's Point Cloud Data format, v0.5-0.7): `ascii`, `binary` and
//! `binary_compressed` (LZF) data, any field types, sizes and counts.
//!
//! Fields map onto [`Points`] by name: `x`, `y`, `z` are required; intensity is taken from
//! the first of `intensity`, `i`, `reflectance`, `reflectivity` (zeros when none); the ring
//! from `ring` or `channel`; per-point time (seconds) from a floating-point `time` field.
//! Other fields are read past. Fields with COUNT > 1 contribute their first element.
//!
//! VIEWPOINT is parsed and returned in [`PcdHeader`] but NOT applied to the points, as PCL
//! itself does: points stay in the frame they were stored in.

use std::path::{Path, PathBuf};

use thiserror::Error;

use super::lzf::{self, LzfError};
use crate::cloud::Points;

/// What was wrong with a PCD file.
#[derive(Debug, Error)]
pub enum PcdError {
    #[error("cannot read PCD file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("in PCD file {path}: {source}")]
    File {
        path: PathBuf,
        source: Box<PcdError>,
    },
    #[error("PCD header ends before its DATA line")]
    MissingData,
    #[error("PCD header line {line} is not ASCII text")]
    HeaderNotText { line: usize },
    #[error("PCD header is missing the {0} line")]
    MissingHeaderField(&'static str),
    #[error("PCD header line {line} ({key}): {reason}")]
    BadHeaderLine {
        line: usize,
        key: String,
        reason: String,
    },
    #[error("PCD field {field}: unsupported TYPE {ty} with SIZE {size}")]
    UnsupportedType {
        field: String,
        ty: char,
        size: usize,
    },
    #[error("PCD has no {0} field")]
    MissingField(&'static str),
    #[error("PCD data kind {0:?} is not ascii, binary or binary_compressed")]
    UnknownDataKind(String),
    #[error(
        "PCD {what} is truncated: needs {needed} bytes after offset {offset}, {available} remain"
    )]
    Truncated {
        what: &'static str,
        offset: usize,
        needed: usize,
        available: usize,
    },
    #[error(
        "PCD binary_compressed declares {declared} uncompressed bytes but {points} points need {expected}"
    )]
    CompressedSizeMismatch {
        declared: usize,
        points: usize,
        expected: usize,
    },
    #[error("PCD binary_compressed data (at offset {offset}): {source}")]
    Lzf { offset: usize, source: LzfError },
    #[error("PCD ascii data has {got} points but the header declares {expected}")]
    AsciiPointCount { expected: usize, got: usize },
    #[error("PCD ascii data line {line} has {got} values but the fields need {expected}")]
    AsciiValueCount {
        line: usize,
        expected: usize,
        got: usize,
    },
    #[error("PCD ascii data line {line}, field {field}: {token:?} is not a number")]
    AsciiBadValue {
        line: usize,
        field: String,
        token: String,
    },
}

/// A field's scalar type (TYPE letter and SIZE together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalarType {
    I8,
    I16,
    I32,
    I64,
    U8,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl ScalarType {
    fn from_type_size(field: &str, ty: char, size: usize) -> Result<Self, PcdError> {
        Ok(match (ty, size) {
            ('I', 1) => Self::I8,
            ('I', 2) => Self::I16,
            ('I', 4) => Self::I32,
            ('I', 8) => Self::I64,
            ('U', 1) => Self::U8,
            ('U', 2) => Self::U16,
            ('U', 4) => Self::U32,
            ('U', 8) => Self::U64,
            ('F', 4) => Self::F32,
            ('F', 8) => Self::F64,
            _ => {
                return Err(PcdError::UnsupportedType {
                    field: field.to_string(),
                    ty,
                    size,
                });
            }
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::I8 | Self::U8 => 1,
            Self::I16 | Self::U16 => 2,
            Self::I32 | Self::U32 | Self::F32 => 4,
            Self::I64 | Self::U64 | Self::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, Self::F32 | Self::F64)
    }

    /// Little-endian value at the start of `b` (which holds at least `size()` bytes).
    fn read(self, b: &[u8]) -> f64 {
        match self {
            Self::I8 => b[0] as i8 as f64,
            Self::U8 => b[0] as f64,
            Self::I16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            Self::U16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            Self::I32 => i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::U32 => u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64,
            Self::I64 => i64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
            Self::U64 => u64::from_le_bytes(b[..8].try_into().expect("8 bytes")) as f64,
            Self::F64 => f64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        }
    }
}

/// One PCD field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcdField {
    pub name: String,
    pub ty: ScalarType,
    pub count: usize,
    /// Byte offset of the field within one binary point record.
    pub offset: usize,
}

/// How the point data is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PcdDataKind {
    Ascii,
    Binary,
    BinaryCompressed,
}

/// The parsed header.
#[derive(Debug, Clone, PartialEq)]
pub struct PcdHeader {
    pub version: Option<String>,
    pub fields: Vec<PcdField>,
    pub width: usize,
    pub height: usize,
    pub points: usize,
    /// tx ty tz qw qx qy qz; parsed, not applied.
    pub viewpoint: [f64; 7],
    pub data: PcdDataKind,
    /// Byte offset where the data section starts.
    pub data_offset: usize,
}

impl PcdHeader {
    /// Bytes per point in `binary` data.
    pub fn point_size(&self) -> usize {
        self.fields.iter().map(|f| f.ty.size() * f.count).sum()
    }

    fn field_index(&self, names: &[&str]) -> Option<usize> {
        names
            .iter()
            .find_map(|n| self.fields.iter().position(|f| f.name == *n))
    }
}

/// Reads a PCD file into points; errors name the file.
pub fn read_pcd(path: &Path) -> Result<(PcdHeader, Points), PcdError> {
    let bytes = std::fs::read(path).map_err(|source| PcdError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_pcd(&bytes).map_err(|e| PcdError::File {
        path: path.to_path_buf(),
        source: Box::new(e),
    })
}

/// Parses the bytes of a whole PCD file.
pub fn parse_pcd(bytes: &[u8]) -> Result<(PcdHeader, Points), PcdError> {
    let header = parse_header(bytes)?;
    let data = &bytes[header.data_offset..];
    let n = header.points;
    let columns = Columns::new(&header)?;
    let points = match header.data {
        PcdDataKind::Binary => {
            let stride = header.point_size();
            let needed = n.checked_mul(stride).ok_or(PcdError::Truncated {
                what: "binary data",
                offset: header.data_offset,
                needed: usize::MAX,
                available: data.len(),
            })?;
            if data.len() < needed {
                return Err(PcdError::Truncated {
                    what: "binary data",
                    offset: header.data_offset,
                    needed,
                    available: data.len(),
                });
            }
            columns.gather(n, |f, i| {
                let field = &header.fields[f];
                field.ty.read(&data[i * stride + field.offset..])
            })
        }
        PcdDataKind::BinaryCompressed => {
            if data.len() < 8 {
                return Err(PcdError::Truncated {
                    what: "binary_compressed size words",
                    offset: header.data_offset,
                    needed: 8,
                    available: data.len(),
                });
            }
            let compressed = u32::from_le_bytes(data[0..4].try_into().expect("4 bytes")) as usize;
            let declared = u32::from_le_bytes(data[4..8].try_into().expect("4 bytes")) as usize;
            let expected = n.saturating_mul(header.point_size());
            if declared != expected {
                return Err(PcdError::CompressedSizeMismatch {
                    declared,
                    points: n,
                    expected,
                });
            }
            let body = &data[8..];
            if body.len() < compressed {
                return Err(PcdError::Truncated {
                    what: "binary_compressed data",
                    offset: header.data_offset + 8,
                    needed: compressed,
                    available: body.len(),
                });
            }
            let raw =
                lzf::decompress(&body[..compressed], declared).map_err(|source| PcdError::Lzf {
                    offset: header.data_offset + 8,
                    source,
                })?;
            // Decompressed data is field-major: all points' values of field 0, then field 1...
            columns.gather(n, |f, i| {
                let field = &header.fields[f];
                let elem = field.ty.size() * field.count;
                field.ty.read(&raw[field.offset * n + i * elem..])
            })
        }
        PcdDataKind::Ascii => {
            let values = parse_ascii(&header, bytes)?;
            let per_point: usize = header.fields.iter().map(|f| f.count).sum();
            let first: Vec<usize> = header
                .fields
                .iter()
                .scan(0, |acc, f| {
                    let s = *acc;
                    *acc += f.count;
                    Some(s)
                })
                .collect();
            columns.gather(n, |f, i| values[i * per_point + first[f]])
        }
    };
    Ok((header, points))
}

/// Which header fields feed which `Points` column.
struct Columns {
    x: usize,
    y: usize,
    z: usize,
    intensity: Option<usize>,
    ring: Option<usize>,
    time: Option<usize>,
}

impl Columns {
    fn new(h: &PcdHeader) -> Result<Self, PcdError> {
        let time = h
            .field_index(&["time"])
            .filter(|&f| h.fields[f].ty.is_float());
        Ok(Self {
            x: h.field_index(&["x"]).ok_or(PcdError::MissingField("x"))?,
            y: h.field_index(&["y"]).ok_or(PcdError::MissingField("y"))?,
            z: h.field_index(&["z"]).ok_or(PcdError::MissingField("z"))?,
            intensity: h.field_index(&["intensity", "i", "reflectance", "reflectivity"]),
            ring: h.field_index(&["ring", "channel"]),
            time,
        })
    }

    /// Builds the points from `value(field index, point index)`.
    fn gather(&self, n: usize, value: impl Fn(usize, usize) -> f64) -> Points {
        let mut p = Points::with_capacity(n);
        for i in 0..n {
            let intensity = self.intensity.map_or(0.0, |f| value(f, i) as f32);
            p.push(
                value(self.x, i) as f32,
                value(self.y, i) as f32,
                value(self.z, i) as f32,
                intensity,
            );
        }
        if let Some(f) = self.ring {
            p.ring = Some(
                (0..n)
                    .map(|i| value(f, i).clamp(0.0, u16::MAX as f64) as u16)
                    .collect(),
            );
        }
        if let Some(f) = self.time {
            p.time = Some((0..n).map(|i| value(f, i) as f32).collect());
        }
        p
    }
}

fn bad(line: usize, key: &str, reason: impl Into<String>) -> PcdError {
    PcdError::BadHeaderLine {
        line,
        key: key.to_string(),
        reason: reason.into(),
    }
}

fn parse_usize(line: usize, key: &str, tok: &str) -> Result<usize, PcdError> {
    tok.parse()
        .map_err(|_| bad(line, key, format!("{tok:?} is not a non-negative integer")))
}

/// Parses the header lines up to and including DATA.
pub fn parse_header(bytes: &[u8]) -> Result<PcdHeader, PcdError> {
    let mut pos = 0usize;
    let mut line_no = 0usize;
    let mut version = None;
    let mut names: Option<Vec<String>> = None;
    let mut sizes: Option<Vec<usize>> = None;
    let mut types: Option<Vec<char>> = None;
    let mut counts: Option<Vec<usize>> = None;
    let (mut width, mut height, mut points) = (None, None, None);
    let mut viewpoint = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0];
    // Where SIZE, TYPE and COUNT were, to name them in errors found at DATA.
    let mut key_line = [0usize; 3];
    loop {
        if pos >= bytes.len() {
            return Err(PcdError::MissingData);
        }
        line_no += 1;
        let end = bytes[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(bytes.len(), |e| pos + e);
        let line = std::str::from_utf8(&bytes[pos..end])
            .map_err(|_| PcdError::HeaderNotText { line: line_no })?;
        pos = (end + 1).min(bytes.len());
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut toks = line.split_whitespace();
        let key = toks.next().unwrap_or_default().to_ascii_uppercase();
        let rest: Vec<&str> = toks.collect();
        if let Some(k) = ["SIZE", "TYPE", "COUNT"].iter().position(|k| *k == key) {
            key_line[k] = line_no;
        }
        match key.as_str() {
            "VERSION" => version = rest.first().map(|s| s.to_string()),
            "FIELDS" | "COLUMNS" => names = Some(rest.iter().map(|s| s.to_string()).collect()),
            "SIZE" => {
                sizes = Some(
                    rest.iter()
                        .map(|t| parse_usize(line_no, &key, t))
                        .collect::<Result<_, _>>()?,
                )
            }
            "TYPE" => {
                types = Some(
                    rest.iter()
                        .map(|t| {
                            let mut c = t.chars();
                            match (c.next(), c.next()) {
                                (Some(ch), None) => Ok(ch.to_ascii_uppercase()),
                                _ => Err(bad(line_no, &key, format!("{t:?} is not one letter"))),
                            }
                        })
                        .collect::<Result<_, _>>()?,
                )
            }
            "COUNT" => {
                counts = Some(
                    rest.iter()
                        .map(|t| parse_usize(line_no, &key, t))
                        .collect::<Result<_, _>>()?,
                )
            }
            "WIDTH" | "HEIGHT" | "POINTS" => {
                let tok = rest
                    .first()
                    .ok_or_else(|| bad(line_no, &key, "missing value"))?;
                let v = Some(parse_usize(line_no, &key, tok)?);
                match key.as_str() {
                    "WIDTH" => width = v,
                    "HEIGHT" => height = v,
                    _ => points = v,
                }
            }
            "VIEWPOINT" => {
                if rest.len() != 7 {
                    return Err(bad(line_no, &key, format!("{} values, need 7", rest.len())));
                }
                for (k, t) in rest.iter().enumerate() {
                    viewpoint[k] = t
                        .parse()
                        .map_err(|_| bad(line_no, &key, format!("{t:?} is not a number")))?;
                }
            }
            "DATA" => {
                let kind = rest.first().copied().unwrap_or_default();
                let data = match kind.to_ascii_lowercase().as_str() {
                    "ascii" => PcdDataKind::Ascii,
                    "binary" => PcdDataKind::Binary,
                    "binary_compressed" => PcdDataKind::BinaryCompressed,
                    _ => return Err(PcdError::UnknownDataKind(kind.to_string())),
                };
                let names = names.ok_or(PcdError::MissingHeaderField("FIELDS"))?;
                let sizes = sizes.ok_or(PcdError::MissingHeaderField("SIZE"))?;
                let types = types.ok_or(PcdError::MissingHeaderField("TYPE"))?;
                let counts = counts.unwrap_or_else(|| vec![1; names.len()]);
                for (k, (key, len)) in [
                    ("SIZE", sizes.len()),
                    ("TYPE", types.len()),
                    ("COUNT", counts.len()),
                ]
                .into_iter()
                .enumerate()
                {
                    if len != names.len() {
                        return Err(bad(
                            key_line[k],
                            key,
                            format!("{len} entries but FIELDS has {}", names.len()),
                        ));
                    }
                }
                let mut fields = Vec::with_capacity(names.len());
                let mut offset = 0usize;
                for (((name, size), ty), count) in
                    names.into_iter().zip(sizes).zip(types).zip(counts)
                {
                    let ty = ScalarType::from_type_size(&name, ty, size)?;
                    if count == 0 {
                        return Err(bad(
                            key_line[2],
                            "COUNT",
                            format!("field {name} has COUNT 0"),
                        ));
                    }
                    fields.push(PcdField {
                        name,
                        ty,
                        count,
                        offset,
                    });
                    offset += size * count;
                }
                let width = width.ok_or(PcdError::MissingHeaderField("WIDTH"))?;
                let height = height.unwrap_or(1);
                let n = width
                    .checked_mul(height)
                    .ok_or_else(|| bad(line_no, "WIDTH", "WIDTH * HEIGHT overflows"))?;
                let points = points.unwrap_or(n);
                if points != n {
                    return Err(bad(
                        line_no,
                        "POINTS",
                        format!("{points} points but WIDTH * HEIGHT = {n}"),
                    ));
                }
                return Ok(PcdHeader {
                    version,
                    fields,
                    width,
                    height,
                    points,
                    viewpoint,
                    data,
                    data_offset: pos,
                });
            }
            _ => {
                return Err(bad(line_no, &key, "unknown header key"));
            }
        }
    }
}

/// All values of an ascii data section, point-major, in header field order.
fn parse_ascii(h: &PcdHeader, bytes: &[u8]) -> Result<Vec<f64>, PcdError> {
    let per_point: usize = h.fields.iter().map(|f| f.count).sum();
    // Which field each value column belongs to, for error messages.
    let owner: Vec<usize> = h
        .fields
        .iter()
        .enumerate()
        .flat_map(|(k, f)| std::iter::repeat_n(k, f.count))
        .collect();
    let header_lines = bytes[..h.data_offset]
        .iter()
        .filter(|&&b| b == b'\n')
        .count();
    let text = String::from_utf8_lossy(&bytes[h.data_offset..]);
    let mut values = Vec::with_capacity(h.points * per_point);
    let mut got = 0usize;
    for (k, line) in text.lines().enumerate() {
        let line_no = header_lines + k + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if got == h.points {
            return Err(PcdError::AsciiPointCount {
                expected: h.points,
                got: got + 1,
            });
        }
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks.len() != per_point {
            return Err(PcdError::AsciiValueCount {
                line: line_no,
                expected: per_point,
                got: toks.len(),
            });
        }
        for (c, t) in toks.iter().enumerate() {
            let v: f64 = t.parse().map_err(|_| PcdError::AsciiBadValue {
                line: line_no,
                field: h.fields[owner[c]].name.clone(),
                token: t.to_string(),
            })?;
            values.push(v);
        }
        got += 1;
    }
    if got != h.points {
        return Err(PcdError::AsciiPointCount {
            expected: h.points,
            got,
        });
    }
    Ok(values)
}
