//! The larger verbs of the `lidar_ptq` command line, one module each.

pub mod calibrate;
pub mod detect;
pub mod eval;
pub mod fidelity;
