//! Quantization: the one definition of the integer semantics (`scheme`), the calibrated
//! model (`model`), its simulated-integer execution (`qnet`), calibration with the
//! baselines and LiDAR-PTQ (`calibrate`, `tgpl`, `reconstruct`) and the INT8 model file
//! (`file`).

pub mod adam;
pub mod adaround;
pub mod calibrate;
pub mod error;
pub mod fake_quant;
pub mod file;
pub mod grid_search;
pub mod layout;
pub mod model;
pub mod observers;
pub mod qnet;
pub mod quick;
pub mod reconstruct;
pub mod scheme;
pub mod tgpl;

pub use calibrate::{CalibError, CalibOptions, Method, calibrate, calibrate_with_progress};
pub use error::QuantError;
pub use model::{LayerPlan, LayerWeights, Provenance, QuantModel};
pub use qnet::{QValue, QuantNet};
pub use scheme::{Flavour, Grid, QParams, Requant, dequantize_acc, quantize_bias};
