//! Evaluation: turns "accuracy" into numbers. nuScenes-style mAP (centre-distance
//! matching, TP errors, NDS) and KITTI-style rotated BEV IoU AP ([`nuscenes_eval`],
//! [`bev_iou_ap`]), the full report per class and distance band ([`report`]), and the
//! labelled frame sources a detector is run over ([`sets`]); quantization fidelity, INT8
//! boxes against FP32 boxes without labels ([`fidelity`]).

mod ap;
pub mod fidelity;
mod iou;
pub mod report;
pub mod sets;

pub use ap::{
    ClassResult, ClassSpec, DISTANCE_BANDS, Frame, NuscenesConfig, NuscenesResult, TpErrors,
    bev_iou_ap, nuscenes_classes, nuscenes_eval,
};
pub use iou::{aligned_iou_3d, bev_intersection, bev_iou};
pub use report::{Report, score};
pub use sets::{EvalFrame, EvalRun, EvalSet, EvalSetError};
