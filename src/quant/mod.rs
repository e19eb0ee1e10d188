//! Quantization: the one definition of the integer semantics (`scheme`), and (growing)
//! calibration statistics, fake-quant execution, LiDAR-PTQ and the INT8 model file.

pub mod scheme;

pub use scheme::{Flavour, Grid, QParams, Requant, quantize_bias};
