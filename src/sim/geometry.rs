//! Scene primitives and their ray intersections.
//!
//! Every primitive is a vertical prism (a yawed box or an upright cylinder) between two
//! heights. A lidar ray from the sensor is a straight line in BEV plus a constant slope
//! in z, so its 3D intersection with such a prism is the intersection of a 2D interval
//! (ray vs footprint, shared by all beams of an azimuth column) and a z interval. The
//! ray caster computes the 2D part once per column and per primitive.

/// How a surface returns light.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Surface {
    /// Opaque, diffuse.
    Solid,
    /// Glass: lets a share of rays through, returns the rest weakly.
    Glass,
    /// Foliage: rays penetrate a random depth and may pass through gaps.
    Foliage,
}

/// Surface reflectivity at the lidar wavelength (905 nm), 0..1, and its kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Material {
    pub reflectivity: f32,
    pub surface: Surface,
}

impl Material {
    pub const fn solid(reflectivity: f32) -> Self {
        Self {
            reflectivity,
            surface: Surface::Solid,
        }
    }
    // Typical 905 nm reflectivities (asphalt ~0.1-0.2, concrete ~0.3, vegetation ~0.5,
    // tyres ~0.05, retro-reflective sheeting > 1 relative to a Lambertian target).
    pub const ASPHALT: Self = Self::solid(0.17);
    pub const LANE_PAINT: Self = Self::solid(0.55);
    pub const CONCRETE: Self = Self::solid(0.3);
    pub const TYRE: Self = Self::solid(0.05);
    pub const GLASS: Self = Self {
        reflectivity: 0.08,
        surface: Surface::Glass,
    };
    pub const METAL: Self = Self::solid(0.35);
    pub const RETRO: Self = Self::solid(1.5);
    pub const FOLIAGE: Self = Self {
        reflectivity: 0.45,
        surface: Surface::Foliage,
    };
    pub const SKIN: Self = Self::solid(0.4);
    pub const BARK: Self = Self::solid(0.25);
}

/// The footprint of a prism in BEV.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Footprint {
    /// Rectangle with centre, heading (as cos, sin) and half extents along/across it.
    Rect {
        cx: f32,
        cy: f32,
        cos: f32,
        sin: f32,
        hl: f32,
        hw: f32,
    },
    /// Circle.
    Circle { cx: f32, cy: f32, r: f32 },
}

/// A prism in the world: footprint between `zmin` and `zmax`, made of one material,
/// owned by an object (its index in the frame's object list) or by the static scene.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Primitive {
    pub footprint: Footprint,
    pub zmin: f32,
    pub zmax: f32,
    pub material: Material,
    /// Index of the owning agent, or `NO_OWNER`.
    pub owner: u32,
}

pub const NO_OWNER: u32 = u32::MAX;

/// Entry and exit of a 2D ray in a footprint, with the outward normal at the entry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Span2 {
    pub t0: f32,
    pub t1: f32,
    pub nx: f32,
    pub ny: f32,
}

impl Footprint {
    pub fn center(&self) -> (f32, f32) {
        match *self {
            Footprint::Rect { cx, cy, .. } | Footprint::Circle { cx, cy, .. } => (cx, cy),
        }
    }

    /// Radius of the smallest centred circle holding the footprint.
    pub fn radius(&self) -> f32 {
        match *self {
            Footprint::Rect { hl, hw, .. } => hl.hypot(hw),
            Footprint::Circle { r, .. } => r,
        }
    }

    /// Intersection of the ray `o + t d` (`d` a unit BEV vector, t >= 0) with the
    /// footprint. A ray starting inside gets no span: the sensor never sits inside scenery.
    pub fn span(&self, ox: f32, oy: f32, dx: f32, dy: f32) -> Option<Span2> {
        match *self {
            Footprint::Rect {
                cx,
                cy,
                cos,
                sin,
                hl,
                hw,
            } => {
                let (px, py) = (ox - cx, oy - cy);
                let lox = cos * px + sin * py;
                let loy = -sin * px + cos * py;
                let ldx = cos * dx + sin * dy;
                let ldy = -sin * dx + cos * dy;
                let (ax0, ax1, sx) = slab(lox, ldx, hl)?;
                let (ay0, ay1, sy) = slab(loy, ldy, hw)?;
                let t0 = ax0.max(ay0);
                let t1 = ax1.min(ay1);
                if t0 > t1 || t0 <= 0.0 {
                    return None;
                }
                // Normal of the face entered last, back in the world frame.
                let (lnx, lny) = if ax0 >= ay0 { (sx, 0.0) } else { (0.0, sy) };
                Some(Span2 {
                    t0,
                    t1,
                    nx: cos * lnx - sin * lny,
                    ny: sin * lnx + cos * lny,
                })
            }
            Footprint::Circle { cx, cy, r } => {
                let (px, py) = (ox - cx, oy - cy);
                let b = px * dx + py * dy;
                let c = px * px + py * py - r * r;
                let disc = b * b - c;
                if disc < 0.0 || c <= 0.0 {
                    return None;
                }
                let s = disc.sqrt();
                let t0 = -b - s;
                if t0 <= 0.0 {
                    return None;
                }
                let (hx, hy) = (px + t0 * dx, py + t0 * dy);
                let inv = 1.0 / r;
                Some(Span2 {
                    t0,
                    t1: -b + s,
                    nx: hx * inv,
                    ny: hy * inv,
                })
            }
        }
    }
}

/// Parameter interval of `o + t d` inside |x| <= h, with the entry face's outward sign.
fn slab(o: f32, d: f32, h: f32) -> Option<(f32, f32, f32)> {
    if d.abs() < 1e-9 {
        return if o.abs() <= h {
            Some((f32::NEG_INFINITY, f32::INFINITY, 0.0))
        } else {
            None
        };
    }
    let inv = 1.0 / d;
    let ta = (-h - o) * inv;
    let tb = (h - o) * inv;
    if ta < tb {
        Some((ta, tb, -1.0))
    } else {
        Some((tb, ta, 1.0))
    }
}

/// Interval of horizontal distance t where `z0 + t * slope` lies in [zmin, zmax].
pub fn z_interval(z0: f32, slope: f32, zmin: f32, zmax: f32) -> Option<(f32, f32)> {
    if slope.abs() < 1e-9 {
        return (z0 >= zmin && z0 <= zmax).then_some((f32::NEG_INFINITY, f32::INFINITY));
    }
    let a = (zmin - z0) / slope;
    let b = (zmax - z0) / slope;
    Some(if a < b { (a, b) } else { (b, a) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rect_span_matches_brute_force() {
        let f = Footprint::Rect {
            cx: 10.0,
            cy: 2.0,
            cos: 0.6f32.cos(),
            sin: 0.6f32.sin(),
            hl: 2.0,
            hw: 1.0,
        };
        let b = crate::boxes::Box3d {
            center: [10.0, 2.0, 0.0],
            size: [4.0, 2.0, 10.0],
            yaw: 0.6,
        };
        for k in 0..200 {
            let a = -0.5 + k as f32 * 0.005;
            let (dx, dy) = (a.cos(), a.sin());
            // March in f64-fine steps to find the first inside sample.
            let first = (1..40000)
                .map(|i| i as f32 * 0.001)
                .find(|&t| b.contains([t * dx, t * dy, 0.0]));
            match (f.span(0.0, 0.0, dx, dy), first) {
                (Some(s), Some(t)) => assert!((s.t0 - t).abs() < 2e-3, "{} vs {t}", s.t0),
                (None, None) => {}
                (s, t) => panic!("angle {a}: span {s:?} vs march {t:?}"),
            }
        }
    }

    #[test]
    fn circle_span_and_normal() {
        let f = Footprint::Circle {
            cx: 5.0,
            cy: 0.0,
            r: 1.0,
        };
        let s = f.span(0.0, 0.0, 1.0, 0.0).unwrap();
        assert!((s.t0 - 4.0).abs() < 1e-5 && (s.t1 - 6.0).abs() < 1e-5);
        assert!((s.nx + 1.0).abs() < 1e-5 && s.ny.abs() < 1e-5);
        assert!(f.span(0.0, 0.0, 0.0, 1.0).is_none());
        // From inside: no span.
        assert!(f.span(5.0, 0.0, 1.0, 0.0).is_none());
    }

    #[test]
    fn z_interval_both_slopes() {
        assert_eq!(z_interval(0.0, -0.5, -2.0, -1.0), Some((2.0, 4.0)));
        assert_eq!(z_interval(0.0, 0.5, 1.0, 2.0), Some((2.0, 4.0)));
        assert_eq!(z_interval(0.0, 0.0, 1.0, 2.0), None);
    }
}
