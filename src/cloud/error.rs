//! The one error type of the `cloud` module: every way a PointCloud2 can be malformed.

use thiserror::Error;

use crate::cdr::CdrError;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CloudError {
    #[error("PointCloud2 point_step is 0")]
    ZeroPointStep,
    #[error("PointCloud2 size {what} overflows ({a} * {b})")]
    SizeOverflow { what: &'static str, a: u64, b: u64 },
    #[error(
        "PointCloud2 row_step {row_step} is smaller than width {width} * point_step {point_step}"
    )]
    RowStepTooSmall {
        row_step: u32,
        width: u32,
        point_step: u32,
    },
    #[error(
        "PointCloud2 data has {len} bytes but height {height} * row_step {row_step} = {expected}"
    )]
    DataTooShort {
        len: usize,
        expected: u64,
        height: u32,
        row_step: u32,
    },
    #[error("PointCloud2 field '{field}' has unknown datatype {datatype} (valid: 1..=8)")]
    UnknownDatatype { field: String, datatype: u8 },
    #[error(
        "PointCloud2 field '{field}' at offset {offset} ({count} x {size} bytes) runs past point_step {point_step}"
    )]
    FieldPastPointStep {
        field: String,
        offset: u32,
        size: usize,
        count: u32,
        point_step: u32,
    },
    #[error("PointCloud2 field '{field}' has count 0, so there is no value to read")]
    EmptyField { field: String },
    #[error("PointCloud2 has no '{field}' field (fields present: {present})")]
    MissingField { field: String, present: String },
    #[error("PointCloud2 CDR: {0}")]
    Cdr(#[from] CdrError),
}
