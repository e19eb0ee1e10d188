//! Procedural urban worlds: a main road with lanes, curbs and sidewalks, an optional
//! cross street, facades, walls, fences, poles, trees, and agents of every detection
//! class placed where they belong (vehicles in lanes and parking bays, pedestrians on
//! sidewalks and crossings, cones and barriers around road works), moving at constant
//! velocity along their lanes.
//!
//! World frame: x along the main road (the ego drives +x), y left, z up; right-hand
//! traffic, so +x lanes have y < 0.

use super::classes::Class;
use super::geometry::{Footprint, Material, NO_OWNER, Primitive, Surface};
use super::shapes::{Part, PartShape, parts};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Exp};
use serde::{Deserialize, Serialize};

pub const LANE_WIDTH: f32 = 3.5;
const CURB_HEIGHT: f32 = 0.15;
/// Parts float this far above the ground so ground returns never fall inside a label box.
const LIFT: f32 = 0.005;

/// Knobs of world generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorldConfig {
    /// Seconds of driving the world must cover (the ego needs road ahead).
    pub duration_s: f32,
    /// Scales how many agents populate lanes and sidewalks (1 = typical city street).
    pub agent_density: f32,
    /// Class given to a bicycle with a rider: `cyclist` (KITTI/Waymo style) or
    /// `bicycle` (nuScenes, whose bicycle boxes include the rider).
    pub ridden_bicycle_class: String,
    /// Ground slope along x and y (rise over run) is drawn up to this magnitude.
    pub max_slope: f32,
}

impl Default for WorldConfig {
    fn default() -> Self {
        Self {
            duration_s: 0.0,
            agent_density: 1.0,
            ridden_bicycle_class: "cyclist".into(),
            max_slope: 0.02,
        }
    }
}

/// The terrain: a gentle plane, a long undulation and centimetre roughness.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ground {
    pub slope_x: f32,
    pub slope_y: f32,
    pub wave_amp: f32,
    pub wave_len: f32,
    pub roughness: f32,
}

impl Ground {
    pub fn height(&self, x: f32, y: f32) -> f32 {
        let k = std::f32::consts::TAU / self.wave_len;
        self.slope_x * x
            + self.slope_y * y
            + self.wave_amp * (k * x).sin()
            + self.roughness * ((x * 3.7).sin() * (y * 4.3).cos() + 0.5 * (x * 9.1 + y * 7.3).sin())
    }

    /// Gradient of the smooth part (roughness is left to the range noise).
    pub fn gradient(&self, x: f32) -> (f32, f32) {
        let k = std::f32::consts::TAU / self.wave_len;
        (
            self.slope_x + self.wave_amp * k * (k * x).cos(),
            self.slope_y,
        )
    }
}

/// A road marking: an axis-aligned painted rectangle, optionally dashed along x.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Paint {
    x0: f32,
    x1: f32,
    y0: f32,
    y1: f32,
    /// Dash period and painted length along x (0 = solid).
    dash: (f32, f32),
    /// Stripe period and painted width along y for zebra crossings (0 = solid).
    zebra: (f32, f32),
}

/// An agent: an object of a detection class moving at constant velocity.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub class: Class,
    /// Class string for the label (differs from `class.name()` for ridden bicycles).
    pub label: String,
    pub size: [f32; 3],
    /// Position at t = 0 and heading.
    pub x: f32,
    pub y: f32,
    pub yaw: f32,
    pub speed: f32,
    /// Height of what it stands on above the terrain (sidewalk agents: the curb).
    pub base: f32,
    pub parts: Vec<Part>,
}

impl Agent {
    pub fn velocity(&self) -> [f32; 2] {
        [self.speed * self.yaw.cos(), self.speed * self.yaw.sin()]
    }

    pub fn position(&self, t: f32) -> (f32, f32) {
        let v = self.velocity();
        (self.x + v[0] * t, self.y + v[1] * t)
    }
}

/// A generated world: terrain, paint, static scenery and agents.
#[derive(Debug, Clone)]
pub struct World {
    pub ground: Ground,
    pub statics: Vec<Primitive>,
    pub agents: Vec<Agent>,
    paints: Vec<Paint>,
    road_half: f32,
    sidewalk_outer: f32,
    cross: Option<(f32, f32)>,
    /// Ego lane centre (y) and speed.
    pub ego_y: f32,
    pub ego_speed: f32,
}

impl World {
    /// Reflectivity of the terrain at (x, y): asphalt, paint, or verge.
    pub fn ground_reflectivity(&self, x: f32, y: f32) -> f32 {
        for p in &self.paints {
            if x < p.x0 || x > p.x1 || y < p.y0 || y > p.y1 {
                continue;
            }
            let dashed = p.dash.0 == 0.0 || (x - p.x0).rem_euclid(p.dash.0) < p.dash.1;
            let striped = p.zebra.0 == 0.0 || (y - p.y0).rem_euclid(p.zebra.0) < p.zebra.1;
            if dashed && striped {
                return Material::LANE_PAINT.reflectivity;
            }
        }
        let on_road =
            y.abs() <= self.road_half || self.cross.is_some_and(|(cx, hw)| (x - cx).abs() <= hw);
        if on_road {
            // Patched asphalt: slow variation between older and newer surface.
            Material::ASPHALT.reflectivity * (1.0 + 0.25 * ((x * 0.13).sin() * (y * 0.31).cos()))
        } else if y.abs() <= self.sidewalk_outer {
            Material::CONCRETE.reflectivity
        } else {
            // Grass and gravel verges.
            0.35
        }
    }

    /// Generates a world from `seed`.
    pub fn generate(cfg: &WorldConfig, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let g = &mut rng;
        let ground = Ground {
            slope_x: g.random_range(-cfg.max_slope..=cfg.max_slope),
            slope_y: g.random_range(-cfg.max_slope..=cfg.max_slope) * 0.5,
            wave_amp: g.random_range(0.0..0.4f32),
            wave_len: g.random_range(60.0..160.0f32),
            roughness: 0.01,
        };
        let lanes = g.random_range(1..=3usize);
        let parking = g.random_bool(0.6);
        let road_half = lanes as f32 * LANE_WIDTH + if parking { 2.5 } else { 0.5 };
        let sidewalk_w = g.random_range(2.0..4.5f32);
        let sidewalk_outer = road_half + sidewalk_w;
        let ego_lane = g.random_range(0..lanes);
        let ego_y = -(ego_lane as f32 + 0.5) * LANE_WIDTH;
        let lane_speed: Vec<f32> = (0..2 * lanes)
            .map(|_| g.random_range(6.0..14.0f32) * if g.random_bool(0.15) { 0.0 } else { 1.0 })
            .collect();
        let ego_speed = lane_speed[ego_lane];
        let x_lo = -140.0;
        let x_hi = 140.0 + ego_speed * cfg.duration_s;
        let cross = g.random_bool(0.6).then(|| {
            let hw = g.random_range(1..=2usize) as f32 * LANE_WIDTH + 0.5;
            (g.random_range(-60.0..80.0f32), hw)
        });

        let mut w = World {
            ground,
            statics: Vec::new(),
            agents: Vec::new(),
            paints: Vec::new(),
            road_half,
            sidewalk_outer,
            cross,
            ego_y,
            ego_speed,
        };
        let in_cross =
            |x: f32, margin: f32| cross.is_some_and(|(cx, hw)| (x - cx).abs() < hw + margin);

        // Lane markings: centre line solid, lane dividers dashed, edge lines solid.
        w.paints.push(Paint {
            x0: x_lo,
            x1: x_hi,
            y0: -0.1,
            y1: 0.1,
            dash: (0.0, 0.0),
            zebra: (0.0, 0.0),
        });
        for k in 1..lanes {
            for s in [-1.0f32, 1.0] {
                let y = s * k as f32 * LANE_WIDTH;
                w.paints.push(Paint {
                    x0: x_lo,
                    x1: x_hi,
                    y0: y - 0.075,
                    y1: y + 0.075,
                    dash: (9.0, 3.0),
                    zebra: (0.0, 0.0),
                });
            }
        }
        for s in [-1.0f32, 1.0] {
            let y = s * lanes as f32 * LANE_WIDTH;
            w.paints.push(Paint {
                x0: x_lo,
                x1: x_hi,
                y0: y - 0.075,
                y1: y + 0.075,
                dash: (0.0, 0.0),
                zebra: (0.0, 0.0),
            });
        }
        if let Some((cx, hw)) = cross {
            for s in [-1.0f32, 1.0] {
                let x = cx + s * (hw + 2.5);
                w.paints.push(Paint {
                    x0: x - 2.0,
                    x1: x + 2.0,
                    y0: -road_half,
                    y1: road_half,
                    dash: (0.0, 0.0),
                    zebra: (1.0, 0.5),
                });
            }
        }

        // Sidewalk slabs with their curbs, in short segments that follow the terrain.
        let seg = 4.0;
        let mut x = x_lo;
        while x < x_hi {
            if !in_cross(x + seg * 0.5, 0.0) {
                for s in [-1.0f32, 1.0] {
                    let yc = s * (road_half + sidewalk_w * 0.5);
                    let top = ground.height(x + seg * 0.5, yc) + CURB_HEIGHT;
                    w.add_static(
                        Footprint::Rect {
                            cx: x + seg * 0.5,
                            cy: yc,
                            cos: 1.0,
                            sin: 0.0,
                            hl: seg * 0.5,
                            hw: sidewalk_w * 0.5,
                        },
                        top - 0.6,
                        top,
                        Material::CONCRETE,
                    );
                }
            }
            x += seg;
        }
        if let Some((cx, hw)) = cross {
            // Cross-street sidewalks and facades, running along y.
            for sx in [-1.0f32, 1.0] {
                let xc = cx + sx * (hw + sidewalk_w * 0.5);
                for sy in [-1.0f32, 1.0] {
                    let mut y = sidewalk_outer;
                    while y < 120.0 {
                        let yc = sy * (y + seg * 0.5);
                        let top = ground.height(xc, yc) + CURB_HEIGHT;
                        w.add_static(
                            Footprint::Rect {
                                cx: xc,
                                cy: yc,
                                cos: 1.0,
                                sin: 0.0,
                                hl: sidewalk_w * 0.5,
                                hw: seg * 0.5,
                            },
                            top - 0.6,
                            top,
                            Material::CONCRETE,
                        );
                        y += seg;
                    }
                    let mut y = sidewalk_outer + 1.0;
                    while y < 120.0 {
                        let len = g.random_range(8.0..30.0f32);
                        if g.random_bool(0.7) {
                            let depth = 12.0;
                            let xb =
                                cx + sx
                                    * (hw + sidewalk_w + g.random_range(0.0..2.0f32) + depth * 0.5);
                            let yb = sy * (y + len * 0.5);
                            w.building(g, xb, yb, depth * 0.5, len * 0.5);
                        }
                        y += len + g.random_range(0.0..6.0f32);
                    }
                }
            }
        }

        // Frontage along the main road: buildings, walls, fences, hedges, open lots.
        for s in [-1.0f32, 1.0] {
            let mut x = x_lo;
            while x < x_hi {
                let len = g.random_range(6.0..35.0f32);
                let xc = x + len * 0.5;
                if !in_cross(xc, len * 0.5 + sidewalk_w) {
                    let kind = g.random_range(0.0..1.0f32);
                    let setback = g.random_range(0.0..4.0f32);
                    let y_front = sidewalk_outer + setback;
                    if kind < 0.55 {
                        let depth = g.random_range(8.0..20.0f32);
                        w.building(g, xc, s * (y_front + depth * 0.5), len * 0.5, depth * 0.5);
                    } else if kind < 0.7 {
                        let hgt = g.random_range(1.5..3.0f32);
                        let z0 = ground.height(xc, s * y_front);
                        w.add_static(
                            Footprint::Rect {
                                cx: xc,
                                cy: s * (y_front + 0.15),
                                cos: 1.0,
                                sin: 0.0,
                                hl: len * 0.5,
                                hw: 0.15,
                            },
                            z0 - 0.3,
                            z0 + hgt,
                            Material::solid(g.random_range(0.2..0.5f32)),
                        );
                    } else if kind < 0.82 {
                        // Metal fence: posts and thin rails a lidar partly sees through.
                        let z0 = ground.height(xc, s * y_front);
                        let hgt = g.random_range(1.0..2.0f32);
                        let mut px = x;
                        while px < x + len {
                            w.add_static(
                                Footprint::Circle {
                                    cx: px,
                                    cy: s * y_front,
                                    r: 0.04,
                                },
                                z0 - 0.2,
                                z0 + hgt,
                                Material::METAL,
                            );
                            px += 2.5;
                        }
                        for zr in [0.15f32, hgt - 0.1] {
                            w.add_static(
                                Footprint::Rect {
                                    cx: xc,
                                    cy: s * y_front,
                                    cos: 1.0,
                                    sin: 0.0,
                                    hl: len * 0.5,
                                    hw: 0.02,
                                },
                                z0 + zr,
                                z0 + zr + 0.06,
                                Material::METAL,
                            );
                        }
                    } else if kind < 0.92 {
                        let z0 = ground.height(xc, s * y_front);
                        let hgt = g.random_range(0.8..2.5f32);
                        w.add_static(
                            Footprint::Rect {
                                cx: xc,
                                cy: s * (y_front + 0.6),
                                cos: 1.0,
                                sin: 0.0,
                                hl: len * 0.5,
                                hw: 0.6,
                            },
                            z0 - 0.2,
                            z0 + hgt,
                            Material::FOLIAGE,
                        );
                    }
                    // else: an open lot, nothing but verge.
                }
                x += len + g.random_range(0.0..3.0f32);
            }
            // A back row of taller buildings, seen over walls and hedges and through
            // gaps: what the upper beams of a real city scan hit far away.
            let mut x = x_lo;
            while x < x_hi {
                let len = g.random_range(15.0..45.0f32);
                let xc = x + len * 0.5;
                if !in_cross(xc, len * 0.5 + sidewalk_w) && g.random_bool(0.7) {
                    let depth = g.random_range(10.0..25.0f32);
                    let y0 = sidewalk_outer + g.random_range(25.0..45.0f32);
                    w.building(g, xc, s * (y0 + depth * 0.5), len * 0.5, depth * 0.5);
                }
                x += len + g.random_range(2.0..12.0f32);
            }
            // Poles and trees along the sidewalk.
            let mut x = x_lo + g.random_range(0.0..20.0f32);
            while x < x_hi {
                if !in_cross(x, 1.0) {
                    let y = s * (road_half + 0.5);
                    let z0 = ground.height(x, y) + CURB_HEIGHT;
                    let hgt = g.random_range(4.0..9.0f32);
                    w.add_static(
                        Footprint::Circle {
                            cx: x,
                            cy: y,
                            r: g.random_range(0.08..0.16f32),
                        },
                        z0 - 0.2,
                        z0 + hgt,
                        Material::METAL,
                    );
                    if g.random_bool(0.4) {
                        // A sign or lamp arm.
                        w.add_static(
                            Footprint::Rect {
                                cx: x,
                                cy: y - s * 0.8,
                                cos: 1.0,
                                sin: 0.0,
                                hl: 0.05,
                                hw: 0.8,
                            },
                            z0 + hgt - 0.4,
                            z0 + hgt - 0.2,
                            Material::METAL,
                        );
                    }
                }
                x += g.random_range(18.0..40.0f32);
            }
            let mut x = x_lo + g.random_range(0.0..10.0f32);
            while x < x_hi {
                if !in_cross(x, 2.0) && g.random_bool(0.6) {
                    let y = s * (sidewalk_outer - 0.8);
                    let z0 = ground.height(x, y) + CURB_HEIGHT;
                    let trunk = g.random_range(1.8..3.0f32);
                    w.add_static(
                        Footprint::Circle {
                            cx: x,
                            cy: y,
                            r: g.random_range(0.1..0.25f32),
                        },
                        z0 - 0.2,
                        z0 + trunk + 0.5,
                        Material::BARK,
                    );
                    w.add_static(
                        Footprint::Circle {
                            cx: x,
                            cy: y,
                            r: g.random_range(1.2..3.0f32),
                        },
                        z0 + trunk,
                        z0 + trunk + g.random_range(2.0..5.0f32),
                        Material::FOLIAGE,
                    );
                }
                x += g.random_range(7.0..20.0f32);
            }
        }

        w.populate(cfg, g, lanes, parking, &lane_speed, sidewalk_w, x_lo, x_hi);
        w
    }

    fn add_static(&mut self, footprint: Footprint, zmin: f32, zmax: f32, material: Material) {
        self.statics.push(Primitive {
            footprint,
            zmin,
            zmax,
            material,
            owner: NO_OWNER,
        });
    }

    /// A building: a box with a stepped facade (a ground-floor recess and a parapet).
    fn building(&mut self, g: &mut ChaCha8Rng, xc: f32, yc: f32, hx: f32, hy: f32) {
        let z0 = self.ground.height(xc, yc) - 0.5;
        let hgt = g.random_range(4.0..22.0f32);
        let m = Material::solid(g.random_range(0.15..0.6f32));
        let fp = |hx: f32, hy: f32| Footprint::Rect {
            cx: xc,
            cy: yc,
            cos: 1.0,
            sin: 0.0,
            hl: hx,
            hw: hy,
        };
        self.add_static(fp(hx - 0.3, hy - 0.3), z0, z0 + 3.5, Material::GLASS);
        self.add_static(fp(hx - 0.6, hy - 0.6), z0, z0 + 3.5, m);
        self.add_static(fp(hx, hy), z0 + 3.5, z0 + hgt, m);
    }

    #[allow(clippy::too_many_arguments)]
    fn populate(
        &mut self,
        cfg: &WorldConfig,
        g: &mut ChaCha8Rng,
        lanes: usize,
        parking: bool,
        lane_speed: &[f32],
        sidewalk_w: f32,
        x_lo: f32,
        x_hi: f32,
    ) {
        let density = cfg.agent_density.max(1e-3);
        let gap = |g: &mut ChaCha8Rng, mean: f32| {
            Exp::new(density / mean).expect("positive rate").sample(g)
        };
        let ego_y = self.ego_y;
        // Moving traffic in every lane.
        for (k, &speed) in lane_speed.iter().enumerate() {
            let dir = if k < lanes { 1.0f32 } else { -1.0 };
            let y = -dir * ((k % lanes) as f32 + 0.5) * LANE_WIDTH;
            let yaw = if dir > 0.0 { 0.0 } else { std::f32::consts::PI };
            let mut x = x_lo + gap(g, 20.0);
            while x < x_hi {
                let u = g.random_range(0.0..1.0f32);
                let class = if u < 0.78 {
                    Class::Car
                } else if u < 0.86 {
                    Class::Truck
                } else if u < 0.91 {
                    Class::Bus
                } else if u < 0.95 {
                    Class::Trailer
                } else if u < 0.99 {
                    Class::Motorcycle
                } else {
                    Class::ConstructionVehicle
                };
                let size = class.sample_size(g);
                let xc = x + size[0] * 0.5;
                // Leave room for the ego itself.
                let ego_clear = (y - ego_y).abs() < 0.1 && xc.abs() < 4.0 + size[0] * 0.5;
                if !ego_clear {
                    let jitter = g.random_range(-0.3..0.3f32);
                    let v = if speed > 0.0 {
                        speed + g.random_range(-0.3..0.3f32)
                    } else {
                        0.0
                    };
                    if class == Class::Trailer {
                        // A tractor pulls the trailer: tractor ahead in driving direction.
                        let tractor = [
                            g.random_range(5.5..6.5f32),
                            size[1] * 0.95,
                            g.random_range(3.0..3.6f32),
                        ];
                        let xt = xc + dir * (size[0] * 0.5 + tractor[0] * 0.5 + 0.3);
                        self.add_agent(
                            g,
                            Class::Truck,
                            "truck",
                            tractor,
                            xt,
                            y + jitter,
                            yaw,
                            v,
                            0.0,
                        );
                        self.add_agent(g, class, "trailer", size, xc, y + jitter, yaw, v, 0.0);
                        x += tractor[0] + 0.3;
                    } else {
                        let yaw = yaw + g.random_range(-0.03..0.03f32);
                        self.add_agent(g, class, class.name(), size, xc, y + jitter, yaw, v, 0.0);
                    }
                }
                x += size[0] + 6.0 + gap(g, 22.0);
            }
        }
        let ridden = cfg.ridden_bicycle_class.clone();
        for s in [-1.0f32, 1.0] {
            let dir = -s;
            let yaw_along = if dir > 0.0 { 0.0 } else { std::f32::consts::PI };
            // Cyclists near the curb of the outer lane.
            let mut x = x_lo + gap(g, 60.0);
            while x < x_hi {
                let size = Class::Cyclist.sample_size(g);
                let y = s * (lanes as f32 * LANE_WIDTH - 0.7);
                let v = Class::Cyclist.speed(g);
                self.add_agent(g, Class::Cyclist, &ridden, size, x, y, yaw_along, v, 0.0);
                x += gap(g, 80.0) + 5.0;
            }
            // Parked vehicles in the parking lane.
            if parking {
                let mut x = x_lo + gap(g, 6.0);
                while x < x_hi {
                    let class = if g.random_bool(0.9) {
                        Class::Car
                    } else {
                        Class::Truck
                    };
                    let size = class.sample_size(g);
                    let y = s * (lanes as f32 * LANE_WIDTH + 1.25 + g.random_range(-0.15..0.15f32));
                    let xc = x + size[0] * 0.5;
                    if !self.near_cross(xc, 6.0) && g.random_bool(0.75) {
                        let flip = if g.random_bool(0.1) {
                            std::f32::consts::PI
                        } else {
                            0.0
                        };
                        let yaw = yaw_along + flip + g.random_range(-0.04..0.04f32);
                        self.add_agent(g, class, class.name(), size, xc, y, yaw, 0.0, 0.0);
                    }
                    x += size[0] + 1.0 + gap(g, 4.0);
                }
            }
            // Pedestrians on the sidewalk, walking either way or standing.
            let mut x = x_lo + gap(g, 12.0);
            while x < x_hi {
                let size = Class::Pedestrian.sample_size(g);
                let y = s * (self.road_half + g.random_range(0.5..(sidewalk_w - 0.4).max(0.6)));
                if !self.near_cross(x, 1.0) {
                    let yaw = if g.random_bool(0.5) {
                        0.0
                    } else {
                        std::f32::consts::PI
                    };
                    let v = Class::Pedestrian.speed(g);
                    let yaw = yaw + g.random_range(-0.2..0.2f32);
                    self.add_agent(
                        g,
                        Class::Pedestrian,
                        "pedestrian",
                        size,
                        x,
                        y,
                        yaw,
                        v,
                        CURB_HEIGHT,
                    );
                }
                x += gap(g, 14.0);
            }
            // Parked bicycles and motorcycles by the facades.
            let mut x = x_lo + gap(g, 50.0);
            while x < x_hi {
                let class = if g.random_bool(0.7) {
                    Class::Bicycle
                } else {
                    Class::Motorcycle
                };
                let mut size = class.sample_size(g);
                if class == Class::Motorcycle {
                    size[2] = size[2].min(1.25); // no rider
                } else {
                    size[2] = size[2].min(1.1);
                }
                let y = s * (self.sidewalk_outer - 0.6);
                if !self.near_cross(x, 1.0) {
                    let yaw = g.random_range(1.2..1.9f32) * s;
                    self.add_agent(g, class, class.name(), size, x, y, yaw, 0.0, CURB_HEIGHT);
                }
                x += gap(g, 50.0) + 2.0;
            }
        }
        // Road works: cones along a lane divider, a row of barriers, maybe a digger.
        if g.random_bool(0.35) {
            let s = if g.random_bool(0.5) { 1.0f32 } else { -1.0 };
            let x0 = g.random_range(-60.0..60.0f32);
            let len = g.random_range(15.0..40.0f32);
            let y_edge = s * (lanes as f32 - 1.0).max(0.0) * LANE_WIDTH + s * 0.3;
            let mut x = x0;
            while x < x0 + len {
                let size = Class::TrafficCone.sample_size(g);
                self.add_agent(
                    g,
                    Class::TrafficCone,
                    "traffic_cone",
                    size,
                    x,
                    y_edge,
                    0.0,
                    0.0,
                    0.0,
                );
                x += g.random_range(2.5..5.0f32);
            }
            let mut x = x0 + 1.0;
            let yb = s * (lanes as f32 * LANE_WIDTH - 0.5);
            while x < x0 + len {
                let size = Class::Barrier.sample_size(g);
                // Barriers stand in a row: their width (2.5 m) runs along the road.
                self.add_agent(
                    g,
                    Class::Barrier,
                    "barrier",
                    size,
                    x,
                    yb,
                    std::f32::consts::FRAC_PI_2,
                    0.0,
                    0.0,
                );
                x += size[1] + 0.2;
            }
            if g.random_bool(0.5) {
                let size = Class::ConstructionVehicle.sample_size(g);
                let y = s * ((lanes as f32 - 0.5) * LANE_WIDTH + 0.5);
                let yaw = g.random_range(-0.5..0.5f32);
                self.add_agent(
                    g,
                    Class::ConstructionVehicle,
                    "construction_vehicle",
                    size,
                    x0 + len * 0.5,
                    y,
                    yaw,
                    0.0,
                    0.0,
                );
            }
        }
        // Pedestrians on the crossings and traffic on the cross street.
        if let Some((cx, hw)) = self.cross {
            for side in [-1.0f32, 1.0] {
                let xw = cx + side * (hw + 2.5);
                for _ in 0..g.random_range(0..4usize) {
                    let size = Class::Pedestrian.sample_size(g);
                    let y = g.random_range(-self.road_half..self.road_half);
                    let yaw = if g.random_bool(0.5) {
                        std::f32::consts::FRAC_PI_2
                    } else {
                        -std::f32::consts::FRAC_PI_2
                    };
                    let v = Class::Pedestrian.speed(g).max(0.8);
                    let x = xw + g.random_range(-1.5..1.5f32);
                    self.add_agent(g, Class::Pedestrian, "pedestrian", size, x, y, yaw, v, 0.0);
                }
            }
            let lanes_x = ((hw - 0.5) / LANE_WIDTH).round().max(1.0) as i32;
            for k in 0..2 * lanes_x {
                let dir = if k < lanes_x { 1.0f32 } else { -1.0 };
                let x = cx + dir * ((k % lanes_x) as f32 + 0.5) * LANE_WIDTH;
                let yaw = dir * std::f32::consts::FRAC_PI_2;
                let mut y = -120.0 + gap(g, 30.0);
                while y < 120.0 {
                    let size = Class::Car.sample_size(g);
                    if y.abs() > self.road_half + size[0] {
                        let v = Class::Car.speed(g);
                        self.add_agent(g, Class::Car, "car", size, x, y, yaw, v, 0.0);
                    }
                    y += size[0] + 6.0 + gap(g, 30.0);
                }
            }
        }
    }

    fn near_cross(&self, x: f32, margin: f32) -> bool {
        self.cross.is_some_and(|(cx, hw)| {
            (x - cx).abs() < hw + self.sidewalk_outer - self.road_half + margin
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn add_agent(
        &mut self,
        g: &mut ChaCha8Rng,
        class: Class,
        label: &str,
        size: [f32; 3],
        x: f32,
        y: f32,
        yaw: f32,
        speed: f32,
        base: f32,
    ) {
        let parts = parts(class, size, g);
        self.agents.push(Agent {
            class,
            label: label.to_string(),
            size,
            x,
            y,
            yaw,
            speed,
            base,
            parts,
        });
    }

    /// World primitives of agent `i` at time `t`, owned by `owner`.
    pub fn agent_primitives(&self, i: usize, t: f32, owner: u32, out: &mut Vec<Primitive>) {
        let a = &self.agents[i];
        let (x, y) = a.position(t);
        let z0 = self.ground.height(x, y) + a.base + LIFT;
        let (s, c) = a.yaw.sin_cos();
        for p in &a.parts {
            let footprint = match p.shape {
                PartShape::Block {
                    x: px,
                    y: py,
                    hl,
                    hw,
                } => Footprint::Rect {
                    cx: x + c * px - s * py,
                    cy: y + s * px + c * py,
                    cos: c,
                    sin: s,
                    hl,
                    hw,
                },
                PartShape::Column { x: px, y: py, r } => Footprint::Circle {
                    cx: x + c * px - s * py,
                    cy: y + s * px + c * py,
                    r,
                },
            };
            out.push(Primitive {
                footprint,
                zmin: z0 + p.zmin,
                zmax: z0 + p.zmax,
                material: p.material,
                owner,
            });
        }
    }

    /// Gravity centre of agent `i` at time `t`.
    pub fn agent_center(&self, i: usize, t: f32) -> [f32; 3] {
        let a = &self.agents[i];
        let (x, y) = a.position(t);
        [
            x,
            y,
            self.ground.height(x, y) + a.base + LIFT + a.size[2] * 0.5,
        ]
    }

    /// Ego position (x, y) at time `t`.
    pub fn ego_position(&self, t: f32) -> (f32, f32) {
        (self.ego_speed * t, self.ego_y)
    }

    /// Whether primitives of this surface kind exist (used by tests and reports).
    pub fn count_surface(&self, s: Surface) -> usize {
        self.statics
            .iter()
            .filter(|p| p.material.surface == s)
            .count()
    }
}

impl World {
    /// A world with flat, smooth terrain (z = 0), no scenery and no agents, for
    /// hand-built test scenes; the ego stands still at the origin.
    pub fn empty() -> Self {
        Self {
            ground: Ground {
                slope_x: 0.0,
                slope_y: 0.0,
                wave_amp: 0.0,
                wave_len: 100.0,
                roughness: 0.0,
            },
            statics: Vec::new(),
            agents: Vec::new(),
            paints: Vec::new(),
            road_half: f32::INFINITY,
            sidewalk_outer: f32::INFINITY,
            cross: None,
            ego_y: 0.0,
            ego_speed: 0.0,
        }
    }

    /// Adds an agent of `class` (label = the class name) standing on the terrain.
    #[allow(clippy::too_many_arguments)]
    pub fn push_agent(
        &mut self,
        class: Class,
        size: [f32; 3],
        x: f32,
        y: f32,
        yaw: f32,
        speed: f32,
        seed: u64,
    ) {
        let mut g = ChaCha8Rng::seed_from_u64(seed);
        self.add_agent(&mut g, class, class.name(), size, x, y, yaw, speed, 0.0);
    }

    /// Adds an opaque static wall (a yawed box standing on z = `z0`).
    #[allow(clippy::too_many_arguments)]
    pub fn push_wall(
        &mut self,
        cx: f32,
        cy: f32,
        yaw: f32,
        length: f32,
        thickness: f32,
        z0: f32,
        height: f32,
        reflectivity: f32,
    ) {
        let (sin, cos) = yaw.sin_cos();
        self.add_static(
            Footprint::Rect {
                cx,
                cy,
                cos,
                sin,
                hl: length * 0.5,
                hw: thickness * 0.5,
            },
            z0,
            z0 + height,
            Material::solid(reflectivity),
        );
    }
}
