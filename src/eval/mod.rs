//! Evaluation: turns "accuracy" into numbers. nuScenes-style mAP (centre-distance
//! matching, TP errors, NDS) and KITTI-style rotated BEV IoU AP.

mod ap;
mod iou;

pub use ap::{
    ClassResult, ClassSpec, DISTANCE_BANDS, Frame, NuscenesConfig, NuscenesResult, TpErrors,
    bev_iou_ap, nuscenes_classes, nuscenes_eval,
};
pub use iou::{aligned_iou_3d, bev_intersection, bev_iou};
