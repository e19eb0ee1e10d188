//! The model: voxelisation of scans into network inputs (more to come: config, graph,
//! weights, targets, decode).

pub mod voxelize;
