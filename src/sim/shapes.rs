//! What each class looks like to a lidar: an object as a handful of prisms (body,
//! hood, cabin glass, wheels; legs, torso, arms, head; rider plus bike), all inside the
//! object's label box so that every return from the object lies in its box.

use super::classes::Class;
use super::geometry::Material;
use rand::RngExt;

/// A part in the object frame: x forward, y left, z up from the box bottom.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PartShape {
    /// Axis-aligned box with centre and half extents in BEV.
    Block { x: f32, y: f32, hl: f32, hw: f32 },
    /// Upright cylinder.
    Column { x: f32, y: f32, r: f32 },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Part {
    pub shape: PartShape,
    pub zmin: f32,
    pub zmax: f32,
    pub material: Material,
}

const INSET: f32 = 0.002;

struct Builder {
    parts: Vec<Part>,
    // The label box, parts are clipped into it.
    hl: f32,
    hw: f32,
    h: f32,
}

impl Builder {
    fn new(size: [f32; 3]) -> Self {
        // Parts stay 2 mm inside the label so returns on a face are inside it, not on it.
        Self {
            parts: Vec::new(),
            hl: size[0] * 0.5 - INSET,
            hw: size[1] * 0.5 - INSET,
            h: size[2] - INSET,
        }
    }

    /// Adds a block given by its x and y ranges, clipped to the box.
    fn block(&mut self, x: [f32; 2], y: [f32; 2], z: [f32; 2], m: Material) {
        let x0 = x[0].max(-self.hl);
        let x1 = x[1].min(self.hl);
        let y0 = y[0].max(-self.hw);
        let y1 = y[1].min(self.hw);
        let z0 = z[0].max(INSET);
        let z1 = z[1].min(self.h);
        if x1 <= x0 || y1 <= y0 || z1 <= z0 {
            return;
        }
        self.parts.push(Part {
            shape: PartShape::Block {
                x: 0.5 * (x0 + x1),
                y: 0.5 * (y0 + y1),
                hl: 0.5 * (x1 - x0),
                hw: 0.5 * (y1 - y0),
            },
            zmin: z0,
            zmax: z1,
            material: m,
        });
    }

    /// Adds an upright cylinder, shrunk to fit the box.
    fn column(&mut self, x: f32, y: f32, r: f32, z: [f32; 2], m: Material) {
        let r = r.min(self.hl - x.abs()).min(self.hw - y.abs());
        let z0 = z[0].max(INSET);
        let z1 = z[1].min(self.h);
        if r <= 0.005 || z1 <= z0 {
            return;
        }
        self.parts.push(Part {
            shape: PartShape::Column { x, y, r },
            zmin: z0,
            zmax: z1,
            material: m,
        });
    }

    /// A wheel seen by a lidar: a thin block as tall and long as the tyre.
    fn wheel(&mut self, x: f32, y_outer: f32, radius: f32, width: f32) {
        let y = if y_outer > 0.0 {
            [y_outer - width, y_outer]
        } else {
            [y_outer, y_outer + width]
        };
        self.block(
            [x - radius, x + radius],
            y,
            [0.0, 2.0 * radius],
            Material::TYRE,
        );
    }
}

/// Parts of an object of `class` with label size `size`, varied by `rng` (paint, gait).
pub fn parts(class: Class, size: [f32; 3], rng: &mut impl rand::Rng) -> Vec<Part> {
    let [l, w, h] = size;
    let mut b = Builder::new(size);
    let (hl, hw) = (l * 0.5, w * 0.5);
    // Car paint at 905 nm: dark colours ~0.05-0.1, white/silver ~0.5-0.7.
    let paint = Material::solid(rng.random_range(0.06..0.65f32));
    match class {
        Class::Car => {
            let rw = (0.19 * h).clamp(0.28, 0.4);
            let clear = 0.6 * rw;
            let belt = 0.55 * h;
            b.block([-hl, hl], [-hw + 0.03, hw - 0.03], [clear, belt], paint);
            // Bumpers reach lower than the body.
            b.block(
                [hl - 0.25, hl],
                [-hw + 0.1, hw - 0.1],
                [0.6 * clear, belt - 0.1],
                paint,
            );
            b.block(
                [-hl, -hl + 0.2],
                [-hw + 0.1, hw - 0.1],
                [0.6 * clear, belt - 0.1],
                paint,
            );
            // Hood and trunk lids just above the belt line.
            b.block(
                [0.16 * l, 0.46 * l],
                [-hw + 0.1, hw - 0.1],
                [belt, belt + 0.05 * h],
                paint,
            );
            b.block(
                [-0.48 * l, -0.3 * l],
                [-hw + 0.1, hw - 0.1],
                [belt, belt + 0.06 * h],
                paint,
            );
            // Cabin: windshield and windows as glass, stepping back like a raked screen.
            b.block(
                [0.06 * l, 0.16 * l],
                [-hw + 0.15, hw - 0.15],
                [belt, 0.8 * h],
                Material::GLASS,
            );
            b.block(
                [-0.3 * l, 0.06 * l],
                [-hw + 0.12, hw - 0.12],
                [belt, 0.9 * h],
                Material::GLASS,
            );
            b.block(
                [-0.27 * l, 0.04 * l],
                [-hw + 0.18, hw - 0.18],
                [0.9 * h, h],
                paint,
            );
            // Side mirrors.
            b.block(
                [0.12 * l, 0.16 * l],
                [-hw, hw],
                [belt + 0.05, belt + 0.15],
                paint,
            );
            let axle = hl - 0.19 * l;
            for x in [axle, -axle] {
                for y in [hw - 0.02, -hw + 0.02] {
                    b.wheel(x, y, rw, 0.22);
                }
            }
        }
        Class::Truck | Class::Trailer => {
            let rw = 0.5;
            let is_trailer = class == Class::Trailer;
            let cab_len = if is_trailer {
                0.0
            } else {
                (0.28 * l).clamp(1.6, 2.6)
            };
            let floor = if is_trailer { 1.2 } else { 1.0 };
            // Cargo box behind the cab.
            b.block([-hl, hl - cab_len - 0.1], [-hw, hw], [floor, h], paint);
            // Chassis rails under the box.
            b.block(
                [-hl + 0.3, hl - 0.2],
                [-0.5, 0.5],
                [0.6, floor],
                Material::METAL,
            );
            if is_trailer {
                // Landing legs at the front.
                for y in [-0.6, 0.6] {
                    b.column(hl - 1.5, y, 0.08, [0.0, floor], Material::METAL);
                }
            } else {
                let cab = Material::solid(rng.random_range(0.1..0.7f32));
                b.block(
                    [hl - cab_len, hl],
                    [-hw + 0.05, hw - 0.05],
                    [0.6, 0.6 * h],
                    cab,
                );
                b.block(
                    [hl - cab_len, hl - 0.15],
                    [-hw + 0.1, hw - 0.1],
                    [0.6 * h, 0.85 * h],
                    Material::GLASS,
                );
                b.block(
                    [hl - cab_len, hl - 0.2],
                    [-hw + 0.1, hw - 0.1],
                    [0.85 * h, 0.95 * h],
                    cab,
                );
                for y in [hw - 0.05, -hw + 0.05] {
                    b.wheel(hl - 0.9, y, rw, 0.35);
                }
            }
            for y in [hw - 0.05, -hw + 0.05] {
                b.wheel(-hl + 1.0, y, rw, 0.5);
                b.wheel(-hl + 2.1, y, rw, 0.5);
            }
        }
        Class::Bus => {
            let rw = 0.5;
            b.block([-hl, hl], [-hw, hw], [0.35, 0.45 * h], paint);
            b.block(
                [-hl + 0.05, hl],
                [-hw + 0.04, hw - 0.04],
                [0.45 * h, 0.85 * h],
                Material::GLASS,
            );
            // Window pillars every ~1.5 m keep the glass band from going dark.
            let n = (l / 1.5) as i32;
            for i in 0..=n {
                let x = -hl + 0.1 + i as f32 * (l - 0.2) / n.max(1) as f32;
                b.block([x - 0.08, x + 0.08], [-hw, hw], [0.45 * h, 0.85 * h], paint);
            }
            b.block([-hl, hl], [-hw, hw], [0.85 * h, h], paint);
            for y in [hw - 0.02, -hw + 0.02] {
                b.wheel(hl - 2.4, y, rw, 0.3);
                b.wheel(-hl + 2.8, y, rw, 0.3);
            }
        }
        Class::ConstructionVehicle => {
            let yellow = Material::solid(0.6);
            // Tracks or big wheels low, engine house, cab, and an arm reaching forward.
            b.block(
                [-hl, 0.5 * hl],
                [-hw, -hw + 0.6],
                [0.0, 0.9],
                Material::TYRE,
            );
            b.block([-hl, 0.5 * hl], [hw - 0.6, hw], [0.0, 0.9], Material::TYRE);
            b.block(
                [-hl, 0.3 * hl],
                [-hw + 0.1, hw - 0.1],
                [0.9, 0.55 * h],
                yellow,
            );
            b.block(
                [-0.1 * hl, 0.35 * hl],
                [-hw + 0.2, 0.1],
                [0.55 * h, h],
                Material::GLASS,
            );
            b.block(
                [-0.1 * hl, 0.35 * hl],
                [-hw + 0.2, 0.1],
                [0.95 * h, h],
                yellow,
            );
            // Boom as three steps falling towards the front, then the bucket.
            for k in 0..3 {
                let x0 = 0.3 * hl + k as f32 * 0.2 * hl;
                let z1 = 0.85 * h - k as f32 * 0.2 * h;
                b.block([x0, x0 + 0.22 * hl], [0.1, 0.5], [z1 - 0.4, z1], yellow);
            }
            b.block(
                [0.9 * hl, hl],
                [-hw + 0.3, hw - 0.3],
                [0.0, 0.6],
                Material::METAL,
            );
        }
        Class::Pedestrian => {
            let cloth = Material::solid(rng.random_range(0.1..0.6f32));
            let trousers = Material::solid(rng.random_range(0.08..0.5f32));
            let phase = rng.random_range(0.0..std::f32::consts::TAU);
            let stride = (hl - 0.08).max(0.0) * phase.sin();
            let hip = 0.48 * h;
            let shoulder_w = (0.8 * w).min(0.46);
            let torso_d = 0.11f32.min(hl);
            for (sgn, leg_x) in [(1.0f32, stride), (-1.0, -stride)] {
                b.column(leg_x * 0.8, sgn * 0.1, 0.07, [0.0, hip], trousers);
            }
            b.block(
                [-torso_d, torso_d],
                [-shoulder_w * 0.5 + 0.07, shoulder_w * 0.5 - 0.07],
                [hip, 0.82 * h],
                cloth,
            );
            for sgn in [1.0f32, -1.0] {
                b.column(
                    -stride * 0.5 * sgn,
                    sgn * (shoulder_w * 0.5 - 0.02),
                    0.05,
                    [0.45 * h, 0.8 * h],
                    cloth,
                );
            }
            b.column(0.0, 0.0, 0.08, [0.82 * h, 0.87 * h], Material::SKIN);
            b.column(0.0, 0.0, 0.1, [0.87 * h, h], Material::SKIN);
        }
        Class::Cyclist | Class::Bicycle | Class::Motorcycle => {
            let motor = class == Class::Motorcycle;
            let rider = class == Class::Cyclist || (motor && h > 1.3);
            let rw = if motor { 0.31 } else { 0.34 };
            let tyre_w = if motor { 0.12 } else { 0.05 };
            let frame = Material::solid(rng.random_range(0.15..0.6f32));
            for x in [hl - rw, -hl + rw] {
                b.block(
                    [x - rw, x + rw],
                    [-tyre_w * 0.5, tyre_w * 0.5],
                    [0.0, 2.0 * rw],
                    Material::TYRE,
                );
            }
            if motor {
                b.block([-0.35 * l, 0.3 * l], [-0.2, 0.2], [0.3, 0.75], frame);
                b.block(
                    [-0.3 * l, 0.05 * l],
                    [-0.15, 0.15],
                    [0.75, 0.85],
                    Material::solid(0.08),
                );
            } else {
                b.block([-0.3 * l, 0.25 * l], [-0.025, 0.025], [0.35, 0.8], frame);
                b.block(
                    [-0.15 * l, -0.05 * l],
                    [-0.09, 0.09],
                    [0.8, 0.86],
                    Material::solid(0.08),
                );
            }
            // Handlebar.
            b.block(
                [0.3 * l - 0.05, 0.3 * l],
                [-0.3, 0.3],
                [0.95, 1.05],
                Material::METAL,
            );
            if rider {
                let cloth = Material::solid(rng.random_range(0.1..0.6f32));
                let seat = if motor { 0.85 } else { 0.86 };
                for y in [-0.13f32, 0.13] {
                    b.column(0.0, y, 0.065, [0.3, seat], cloth);
                }
                // Torso leans forward: two stepped blocks.
                b.block([-0.2 * l, 0.0], [-0.18, 0.18], [seat, seat + 0.3], cloth);
                b.block(
                    [-0.12 * l, 0.08 * l],
                    [-0.18, 0.18],
                    [seat + 0.3, h - 0.25],
                    cloth,
                );
                for y in [-0.22f32, 0.22] {
                    b.block(
                        [0.0, 0.25 * l],
                        [y - 0.04, y + 0.04],
                        [h - 0.5, h - 0.4],
                        cloth,
                    );
                }
                b.column(0.05 * l, 0.0, 0.1, [h - 0.24, h], Material::SKIN);
            }
        }
        Class::Barrier => {
            // Jersey barrier: wide foot, narrower wall; length runs across the heading
            // (nuScenes barriers are 0.5 long and 2.5 wide).
            let concrete = Material::solid(rng.random_range(0.25..0.55f32));
            b.block([-hl, hl], [-hw, hw], [0.0, 0.3 * h], concrete);
            b.block([-0.6 * hl, 0.6 * hl], [-hw, hw], [0.3 * h, h], concrete);
            b.block(
                [-0.62 * hl, 0.62 * hl],
                [-hw, hw],
                [0.75 * h, 0.85 * h],
                Material::RETRO,
            );
        }
        Class::TrafficCone => {
            let orange = Material::solid(0.45);
            b.block([-hl, hl], [-hw, hw], [0.0, 0.04], Material::solid(0.08));
            let steps = 4;
            let r0 = hl.min(hw) * 0.75;
            for k in 0..steps {
                let z0 = 0.04 + (h - 0.04) * k as f32 / steps as f32;
                let z1 = 0.04 + (h - 0.04) * (k + 1) as f32 / steps as f32;
                let r = r0 * (1.0 - 0.8 * (k as f32 + 0.5) / steps as f32);
                let m = if k == 2 { Material::RETRO } else { orange };
                b.column(0.0, 0.0, r, [z0, z1], m);
            }
        }
    }
    b.parts
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn parts_stay_inside_the_label_box() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for c in Class::ALL {
            for _ in 0..20 {
                let s = c.sample_size(&mut rng);
                let ps = parts(c, s, &mut rng);
                assert!(ps.len() >= 3, "{c} has {} parts", ps.len());
                for p in ps {
                    let (x0, x1, y0, y1) = match p.shape {
                        PartShape::Block { x, y, hl, hw } => (x - hl, x + hl, y - hw, y + hw),
                        PartShape::Column { x, y, r } => (x - r, x + r, y - r, y + r),
                    };
                    let e = 1e-4;
                    assert!(x0 >= -s[0] / 2.0 - e && x1 <= s[0] / 2.0 + e, "{c} {p:?}");
                    assert!(y0 >= -s[1] / 2.0 - e && y1 <= s[1] / 2.0 + e, "{c} {p:?}");
                    assert!(p.zmin >= 0.0 && p.zmax <= s[2] + e, "{c} {p:?}");
                }
            }
        }
    }
}
