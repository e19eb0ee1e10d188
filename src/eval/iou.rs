//! Rotated bird's-eye-view overlap of two boxes: exact convex-polygon clipping.

use crate::boxes::Box3d;

/// Area of a simple polygon (shoelace), positive for counter-clockwise order.
fn signed_area(poly: &[[f64; 2]]) -> f64 {
    let n = poly.len();
    (0..n)
        .map(|i| {
            let (a, b) = (poly[i], poly[(i + 1) % n]);
            a[0] * b[1] - b[0] * a[1]
        })
        .sum::<f64>()
        * 0.5
}

/// Polygon capacity: a clip pushes at most two points per edge, so a quad clipped four
/// times has at most 4 * 2^4 = 64 (8 for convex input; the rest is room for rounding).
const MAX_POINTS: usize = 64;

/// A polygon on the stack: clipping runs for every NMS candidate pair, so no heap.
struct Poly {
    pts: [[f64; 2]; MAX_POINTS],
    n: usize,
}

impl Poly {
    fn new() -> Self {
        Self {
            pts: [[0.0; 2]; MAX_POINTS],
            n: 0,
        }
    }

    fn push(&mut self, p: [f64; 2]) {
        self.pts[self.n] = p;
        self.n += 1;
    }

    fn points(&self) -> &[[f64; 2]] {
        &self.pts[..self.n]
    }
}

/// Clips `subject` by the half-plane left of the directed edge a -> b (Sutherland-Hodgman).
fn clip(subject: &[[f64; 2]], a: [f64; 2], b: [f64; 2], out: &mut Poly) {
    let side = |p: [f64; 2]| (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]);
    out.n = 0;
    for i in 0..subject.len() {
        let p = subject[i];
        let q = subject[(i + 1) % subject.len()];
        let (sp, sq) = (side(p), side(q));
        if sp >= 0.0 {
            out.push(p);
        }
        if (sp >= 0.0) != (sq >= 0.0) {
            let t = sp / (sp - sq);
            out.push([p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])]);
        }
    }
}

fn corners64(b: &Box3d) -> [[f64; 2]; 4] {
    b.bev_corners().map(|[x, y]| [x as f64, y as f64])
}

/// True when the boxes' circumscribed circles are apart, so their footprints cannot
/// overlap. The margin covers the f32 rounding of the corners; NMS over hundreds of
/// candidates skips almost every polygon clip with this.
fn circles_apart(a: &Box3d, b: &Box3d) -> bool {
    let radius = |b: &Box3d| 0.5 * (b.size[0] as f64).hypot(b.size[1] as f64);
    let dx = a.center[0] as f64 - b.center[0] as f64;
    let dy = a.center[1] as f64 - b.center[1] as f64;
    let reach = radius(a) + radius(b) + 1e-3;
    dx * dx + dy * dy > reach * reach
}

/// Area of the BEV intersection of two boxes, in square metres.
pub fn bev_intersection(a: &Box3d, b: &Box3d) -> f64 {
    if circles_apart(a, b) {
        return 0.0;
    }
    clipped_area(a, b)
}

/// The intersection area by clipping `a`'s footprint with each edge of `b`'s.
fn clipped_area(a: &Box3d, b: &Box3d) -> f64 {
    let pa = corners64(a);
    let pb = corners64(b);
    let mut cur = Poly::new();
    for p in pa {
        cur.push(p);
    }
    let mut next = Poly::new();
    for i in 0..4 {
        if cur.n == 0 {
            return 0.0;
        }
        clip(cur.points(), pb[i], pb[(i + 1) % 4], &mut next);
        std::mem::swap(&mut cur, &mut next);
    }
    if cur.n < 3 {
        0.0
    } else {
        signed_area(cur.points()).abs()
    }
}

/// Rotated BEV intersection over union.
pub fn bev_iou(a: &Box3d, b: &Box3d) -> f64 {
    let inter = bev_intersection(a, b);
    let union =
        (a.size[0] as f64 * a.size[1] as f64) + (b.size[0] as f64 * b.size[1] as f64) - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

/// 3D IoU of two boxes that share centre and yaw (nuScenes' scale error uses this:
/// "1 - IoU after aligning translation and orientation").
pub fn aligned_iou_3d(a: [f32; 3], b: [f32; 3]) -> f64 {
    let inter: f64 = (0..3).map(|i| a[i].min(b[i]) as f64).product();
    let va: f64 = a.iter().map(|&v| v as f64).product();
    let vb: f64 = b.iter().map(|&v| v as f64).product();
    let union = va + vb - inter;
    if union <= 0.0 { 0.0 } else { inter / union }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Independent reference: count samples of a fine grid that fall in both boxes.
    fn raster_intersection(a: &Box3d, b: &Box3d, step: f32) -> f64 {
        let corners: Vec<[f32; 2]> = a.bev_corners().into_iter().chain(b.bev_corners()).collect();
        let (x0, x1) = corners.iter().fold((f32::MAX, f32::MIN), |(lo, hi), c| {
            (lo.min(c[0]), hi.max(c[0]))
        });
        let (y0, y1) = corners.iter().fold((f32::MAX, f32::MIN), |(lo, hi), c| {
            (lo.min(c[1]), hi.max(c[1]))
        });
        let mut count = 0u64;
        let mut y = y0 + step * 0.5;
        while y < y1 {
            let mut x = x0 + step * 0.5;
            while x < x1 {
                let (za, zb) = (a.center[2], b.center[2]);
                if a.contains([x, y, za]) && b.contains([x, y, zb]) {
                    count += 1;
                }
                x += step;
            }
            y += step;
        }
        count as f64 * (step as f64).powi(2)
    }

    /// A box centred within `reach` of the origin, any yaw.
    fn random_box(
        rng: &mut ChaCha8Rng,
        reach: f32,
        length: std::ops::Range<f32>,
        width: std::ops::Range<f32>,
    ) -> Box3d {
        Box3d {
            center: [
                rng.random_range(-reach..reach),
                rng.random_range(-reach..reach),
                0.0,
            ],
            size: [rng.random_range(length), rng.random_range(width), 1.0],
            yaw: rng.random_range(-3.2..3.2),
        }
    }

    #[test]
    fn matches_a_raster_reference_on_random_pairs() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..40 {
            let a = random_box(&mut rng, 1.5, 0.5..4.0, 0.5..2.5);
            let b = random_box(&mut rng, 1.5, 0.5..4.0, 0.5..2.5);
            let exact = bev_intersection(&a, &b);
            let approx = raster_intersection(&a, &b, 0.01);
            assert!(
                (exact - approx).abs() < 0.02 + 0.01 * exact,
                "{exact} vs {approx}"
            );
            assert!((exact - bev_intersection(&b, &a)).abs() < 1e-9);
        }
    }

    /// The circle shortcut only skips pairs whose clipped intersection is empty.
    #[test]
    fn circle_shortcut_skips_only_disjoint_pairs() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut skipped = 0;
        for _ in 0..4000 {
            let a = random_box(&mut rng, 6.0, 0.3..8.0, 0.3..3.0);
            let b = random_box(&mut rng, 6.0, 0.3..8.0, 0.3..3.0);
            if circles_apart(&a, &b) {
                skipped += 1;
                assert!(clipped_area(&a, &b) < 1e-9, "{a:?} {b:?}");
                assert_eq!(bev_intersection(&a, &b), 0.0);
            } else {
                assert_eq!(bev_intersection(&a, &b), clipped_area(&a, &b));
            }
        }
        assert!((1000..3900).contains(&skipped), "{skipped} of 4000 skipped");
    }

    #[test]
    fn known_overlaps() {
        let a = Box3d {
            center: [0.0, 0.0, 0.0],
            size: [2.0, 2.0, 1.0],
            yaw: 0.0,
        };
        assert!((bev_iou(&a, &a) - 1.0).abs() < 1e-9);
        let shifted = Box3d {
            center: [1.0, 0.0, 0.0],
            ..a
        };
        assert!((bev_iou(&a, &shifted) - 2.0 / 6.0).abs() < 1e-9);
        let far = Box3d {
            center: [5.0, 0.0, 0.0],
            ..a
        };
        assert_eq!(bev_iou(&a, &far), 0.0);
        // A square turned by 45 degrees inside a larger square: area ratio.
        let diamond = Box3d {
            size: [1.0, 1.0, 1.0],
            yaw: std::f32::consts::FRAC_PI_4,
            ..a
        };
        assert!((bev_iou(&a, &diamond) - 0.25).abs() < 1e-6);
        assert!((aligned_iou_3d([2.0, 1.0, 1.0], [1.0, 1.0, 1.0]) - 0.5).abs() < 1e-12);
    }
}
