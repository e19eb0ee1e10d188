//! Errors of the quantization building blocks (observers, grid search, fake-quant,
//! AdaRound, Adam): which routine, which argument, what was wrong.

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum QuantError {
    #[error("{what}: non-finite value {value} at index {index}")]
    NonFinite {
        what: &'static str,
        index: usize,
        value: f32,
    },
    #[error("{what}: no values observed")]
    Empty { what: &'static str },
    #[error("{what}: axis {axis} is out of range for shape {shape:?}")]
    Axis {
        what: &'static str,
        axis: usize,
        shape: Vec<usize>,
    },
    #[error("{what}: `{field}` has length {got}, expected {expected}")]
    Length {
        what: &'static str,
        field: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("{what}: parameter `{field}` = {value} is invalid: {why}")]
    Param {
        what: &'static str,
        field: &'static str,
        value: f64,
        why: &'static str,
    },
}

pub type Result<T> = std::result::Result<T, QuantError>;

/// First non-finite value of `xs`, as an error naming the routine.
pub(crate) fn check_finite(what: &'static str, xs: &[f32]) -> Result<()> {
    match xs.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(QuantError::NonFinite {
            what,
            index,
            value: xs[index],
        }),
        None => Ok(()),
    }
}

pub(crate) fn check_len(
    what: &'static str,
    field: &'static str,
    expected: usize,
    got: usize,
) -> Result<()> {
    if expected == got {
        Ok(())
    } else {
        Err(QuantError::Length {
            what,
            field,
            expected,
            got,
        })
    }
}
