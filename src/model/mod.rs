//! The CenterPoint model: its YAML description and (growing) the network graph built from
//! it, voxelisation, training targets and decoding.

pub mod bundle;
pub mod config;
pub mod decode;
pub mod graph;
pub mod input;
pub mod targets;
pub mod voxel_mean;
pub mod voxelize;
pub mod weights;

pub use bundle::{BundleError, ModelBundle};
pub use config::{ConfigError, ModelConfig};
