//! Global augmentation of a frame's points and boxes (OpenPCDet's world flip, rotation and
//! scaling), drawn from a seeded RNG.

use crate::boxes::Object;
use crate::cloud::Points;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    /// Mirror y (flip across the x axis) with probability 1/2.
    pub flip_x: bool,
    /// Mirror x (flip across the y axis) with probability 1/2.
    pub flip_y: bool,
    /// Rotation about z uniform in `[-max_rotation, max_rotation]` radians.
    pub max_rotation: f32,
    /// Scaling uniform in `[1 - s, 1 + s]`.
    pub scale: f32,
}

impl Default for Augment {
    /// The nuScenes settings of the reference: both flips, +-pi/4, scale 0.95..1.05.
    fn default() -> Self {
        Self {
            flip_x: true,
            flip_y: true,
            max_rotation: std::f32::consts::FRAC_PI_4,
            scale: 0.05,
        }
    }
}

impl Augment {
    /// Applies a random draw to the points and objects in place.
    pub fn apply(&self, rng: &mut ChaCha8Rng, points: &mut Points, objects: &mut [Object]) {
        if self.flip_x && rng.random_bool(0.5) {
            points.y.iter_mut().for_each(|y| *y = -*y);
            for o in objects.iter_mut() {
                o.bbox.center[1] = -o.bbox.center[1];
                o.bbox.yaw = -o.bbox.yaw;
                if let Some(v) = &mut o.velocity {
                    v[1] = -v[1];
                }
            }
        }
        if self.flip_y && rng.random_bool(0.5) {
            points.x.iter_mut().for_each(|x| *x = -*x);
            for o in objects.iter_mut() {
                o.bbox.center[0] = -o.bbox.center[0];
                o.bbox.yaw = std::f32::consts::PI - o.bbox.yaw;
                if let Some(v) = &mut o.velocity {
                    v[0] = -v[0];
                }
            }
        }
        if self.max_rotation > 0.0 {
            let a = rng.random_range(-self.max_rotation..=self.max_rotation);
            rotate(a, points, objects);
        }
        if self.scale > 0.0 {
            let s = rng.random_range(1.0 - self.scale..=1.0 + self.scale);
            for v in [&mut points.x, &mut points.y, &mut points.z] {
                v.iter_mut().for_each(|c| *c *= s);
            }
            for o in objects.iter_mut() {
                o.bbox.center.iter_mut().for_each(|c| *c *= s);
                o.bbox.size.iter_mut().for_each(|c| *c *= s);
                if let Some(v) = &mut o.velocity {
                    v.iter_mut().for_each(|c| *c *= s);
                }
            }
        }
        for o in objects.iter_mut() {
            o.bbox.yaw = wrap(o.bbox.yaw);
        }
    }
}

/// Counter-clockwise rotation by `a` about z.
pub fn rotate(a: f32, points: &mut Points, objects: &mut [Object]) {
    let (s, c) = a.sin_cos();
    let rot = |x: f32, y: f32| (c * x - s * y, s * x + c * y);
    for (x, y) in points.x.iter_mut().zip(points.y.iter_mut()) {
        (*x, *y) = rot(*x, *y);
    }
    for o in objects.iter_mut() {
        let (x, y) = rot(o.bbox.center[0], o.bbox.center[1]);
        o.bbox.center[0] = x;
        o.bbox.center[1] = y;
        o.bbox.yaw += a;
        if let Some(v) = &mut o.velocity {
            let (vx, vy) = rot(v[0], v[1]);
            *v = [vx, vy];
        }
    }
}

/// Angle in `(-pi, pi]`.
fn wrap(a: f32) -> f32 {
    let w = (a + std::f32::consts::PI).rem_euclid(std::f32::consts::TAU) - std::f32::consts::PI;
    if w <= -std::f32::consts::PI {
        w + std::f32::consts::TAU
    } else {
        w
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boxes::Box3d;
    use rand::SeedableRng;

    fn frame() -> (Points, Vec<Object>) {
        let obj = Object {
            bbox: Box3d {
                center: [10.0, 3.0, -1.0],
                size: [4.5, 1.9, 1.6],
                yaw: 0.3,
            },
            class: "car".into(),
            velocity: Some([2.0, 1.0]),
            num_points: None,
        };
        let mut pts = Points::default();
        // Points on the box: its corners at mid height, and its centre.
        for [x, y] in obj.bbox.bev_corners() {
            pts.push(x * 0.99 + 0.01 * 10.0, y * 0.99 + 0.01 * 3.0, -1.0, 0.5);
        }
        pts.push(10.0, 3.0, -1.0, 0.5);
        (pts, vec![obj])
    }

    /// Whatever the draw, points inside a box stay inside it, and the same seed gives
    /// the same result.
    #[test]
    fn points_stay_in_their_boxes_and_draws_are_seeded() {
        for seed in 0..20 {
            let (mut p, mut o) = frame();
            Augment::default().apply(&mut ChaCha8Rng::seed_from_u64(seed), &mut p, &mut o);
            for i in 0..p.len() {
                assert!(o[0].bbox.contains(p.xyz(i)), "seed {seed} point {i}");
            }
            let (mut p2, mut o2) = frame();
            Augment::default().apply(&mut ChaCha8Rng::seed_from_u64(seed), &mut p2, &mut o2);
            assert_eq!((p, o), (p2, o2));
        }
    }

    #[test]
    fn rotation_by_a_quarter_turn() {
        let (mut p, mut o) = frame();
        rotate(std::f32::consts::FRAC_PI_2, &mut p, &mut o);
        let b = &o[0].bbox;
        assert!((b.center[0] + 3.0).abs() < 1e-5 && (b.center[1] - 10.0).abs() < 1e-5);
        assert!((b.yaw - (0.3 + std::f32::consts::FRAC_PI_2)).abs() < 1e-6);
        let v = o[0].velocity.unwrap();
        assert!((v[0] + 1.0).abs() < 1e-5 && (v[1] - 2.0).abs() < 1e-5);
    }
}
