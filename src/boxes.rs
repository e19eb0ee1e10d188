//! Labelled 3D boxes in the lidar frame: the one box type that datasets, the simulator,
//! the model's decoder, evaluation and rendering all exchange.
//!
//! Convention (nuScenes / OpenPCDet): `center` is the gravity centre of the box,
//! `size` is (length along the heading, width, height), `yaw` is counter-clockwise from +x.

use serde::{Deserialize, Serialize};

/// An oriented 3D box.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Box3d {
    /// Gravity centre (x, y, z) in metres.
    pub center: [f32; 3],
    /// (length, width, height) in metres; length is along the heading.
    pub size: [f32; 3],
    /// Heading in radians, counter-clockwise from +x.
    pub yaw: f32,
}

impl Box3d {
    /// Whether a point lies inside the box (boundaries included).
    pub fn contains(&self, p: [f32; 3]) -> bool {
        let (lx, ly) = self.to_local(p[0], p[1]);
        let dz = p[2] - self.center[2];
        lx.abs() <= self.size[0] * 0.5
            && ly.abs() <= self.size[1] * 0.5
            && dz.abs() <= self.size[2] * 0.5
    }

    /// The point (x, y) in box-local BEV coordinates (x along the heading).
    pub fn to_local(&self, x: f32, y: f32) -> (f32, f32) {
        let (s, c) = self.yaw.sin_cos();
        let dx = x - self.center[0];
        let dy = y - self.center[1];
        (c * dx + s * dy, -s * dx + c * dy)
    }

    /// The four BEV corners, counter-clockwise, starting front-left.
    pub fn bev_corners(&self) -> [[f32; 2]; 4] {
        let (s, c) = self.yaw.sin_cos();
        let (hl, hw) = (self.size[0] * 0.5, self.size[1] * 0.5);
        let local = [[hl, hw], [-hl, hw], [-hl, -hw], [hl, -hw]];
        local.map(|[lx, ly]| {
            [
                self.center[0] + c * lx - s * ly,
                self.center[1] + s * lx + c * ly,
            ]
        })
    }
}

/// A labelled object: a box with its class and what the source knows about it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub bbox: Box3d,
    /// Class name as the source spells it in our vocabulary (`car`, `pedestrian`, ...).
    pub class: String,
    /// BEV velocity (vx, vy) in m/s, when known.
    pub velocity: Option<[f32; 2]>,
    /// Number of lidar points inside the box, when known.
    pub num_points: Option<u32>,
}

/// A detection: a box with its class and confidence, as a detector outputs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detection {
    pub bbox: Box3d,
    pub class: String,
    /// Confidence in [0, 1].
    pub score: f32,
    /// BEV velocity (vx, vy) in m/s, when the model predicts it.
    pub velocity: Option<[f32; 2]>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contains_respects_yaw() {
        // A 4 x 2 box turned by 90 degrees is 2 long in x and 4 long in y.
        let b = Box3d {
            center: [10.0, 5.0, 1.0],
            size: [4.0, 2.0, 2.0],
            yaw: std::f32::consts::FRAC_PI_2,
        };
        assert!(b.contains([10.0, 6.9, 1.0]));
        assert!(!b.contains([11.5, 5.0, 1.0]));
        assert!(b.contains([10.9, 5.0, 0.1]));
        assert!(!b.contains([10.0, 5.0, 2.1]));
    }

    #[test]
    fn corners_are_consistent_with_contains() {
        let b = Box3d {
            center: [-3.0, 2.0, 0.0],
            size: [4.5, 1.8, 1.5],
            yaw: 0.7,
        };
        for [x, y] in b.bev_corners() {
            // Slightly inside each corner (towards the centre) is inside, slightly outside is not.
            let inside = [
                x + (b.center[0] - x) * 0.01,
                y + (b.center[1] - y) * 0.01,
                0.0,
            ];
            let outside = [
                x - (b.center[0] - x) * 0.01,
                y - (b.center[1] - y) * 0.01,
                0.0,
            ];
            assert!(b.contains(inside));
            assert!(!b.contains(outside));
        }
    }
}
