//! Quantization: the one definition of the integer semantics (`scheme`), and (growing)
//! calibration statistics, fake-quant execution, LiDAR-PTQ and the INT8 model file.

pub mod adam;
pub mod adaround;
pub mod error;
pub mod fake_quant;
pub mod grid_search;
pub mod layout;
pub mod model;
pub mod observers;
pub mod quick;
pub mod scheme;

pub use error::QuantError;
pub use model::{LayerPlan, LayerWeights, Provenance, QuantModel};
pub use scheme::{Flavour, Grid, QParams, Requant, dequantize_acc, quantize_bias};
