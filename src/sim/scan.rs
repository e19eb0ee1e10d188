//! The ray caster: one spinning-lidar revolution over a set of primitives and a terrain.
//!
//! Acceleration: every ray leaves the same origin, so primitives are binned by the
//! azimuth interval they cover (polar bins, the lidar's natural BEV grid) and sorted by
//! their nearest distance. Per azimuth column the 2D footprint spans of the bin's
//! primitives are computed once and sorted by entry; each beam then only intersects a
//! z interval and stops at the first span beyond its current closest hit.
//!
//! Randomness per ray comes from a counter-based hash of (frame seed, column, ring), so
//! columns can run on rayon in any order and the output stays byte-identical.

use super::geometry::{Footprint, NO_OWNER, Primitive, Span2, Surface, z_interval};
use super::sensor::{LidarModel, Mount, SensorSpec};
use super::world::World;
use crate::cloud::Points;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How surfaces turn into returns and intensities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Radiometry {
    /// Return strength goes as cos(incidence)^k: real rough surfaces are far from
    /// Lambertian at grazing angles (k = 1 would lose the road beyond ~15 m).
    pub angle_exponent: f32,
    /// Log-normal speckle on the return strength (sigma of its log).
    pub speckle_sigma: f32,
    /// Intensity = scale * clamp(gain * (reflectivity * cos^k * speckle)^gamma + noise, 0, 1).
    pub intensity_gain: f32,
    pub intensity_gamma: f32,
    pub intensity_noise: f32,
    /// Intensity falls as (10 m / range)^e: drivers only partly compensate range.
    pub intensity_range_exponent: f32,
    /// Share of rays through glass that pass without a return.
    pub glass_pass: f32,
    /// Mean penetration depth into foliage, metres.
    pub foliage_depth: f32,
}

impl Radiometry {
    /// Settings tuned per sensor against the real scans (see docs/realism.md):
    /// KITTI's HDL-64E reports a calibrated 0..1 reflectance that is bright and flat,
    /// nuScenes' HDL-32E a raw 0..255 value that is mostly small.
    pub fn for_model(model: LidarModel) -> Self {
        let base = Self {
            angle_exponent: 0.25,
            speckle_sigma: 0.4,
            intensity_gain: 1.0,
            intensity_gamma: 1.0,
            intensity_noise: 0.01,
            intensity_range_exponent: 0.0,
            glass_pass: 0.6,
            foliage_depth: 0.6,
        };
        match model {
            LidarModel::Hdl64 => Self {
                intensity_gain: 0.68,
                intensity_gamma: 0.45,
                intensity_noise: 0.06,
                intensity_range_exponent: 0.6,
                ..base
            },
            LidarModel::Hdl32 => Self {
                intensity_gain: 0.3,
                ..base
            },
            LidarModel::Vlp16 | LidarModel::Os128 => Self {
                intensity_gain: 0.5,
                ..base
            },
        }
    }
}

/// The sensor's pose in the world for one revolution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SensorPose {
    pub x: f32,
    pub y: f32,
    pub z: f32,
    pub yaw: f32,
}

/// One revolution's returns in the sensor frame, with the owner of each return.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    pub points: Points,
    /// Owner index of each point (`NO_OWNER` for scenery and terrain).
    pub owner: Vec<u32>,
}

/// Everything a revolution needs besides the sensor.
pub struct Target<'a> {
    pub world: &'a World,
    /// Primitives in world coordinates (static and agents at the sweep start).
    pub primitives: &'a [Primitive],
    /// World velocity of each owner, for motion during the sweep (empty: none).
    pub owner_velocity: &'a [[f32; 2]],
}

struct Candidate {
    span: Span2,
    prim: u32,
}

/// Counter-based RNG (splitmix64) for per-ray noise.
struct RayRng(u64);

impl RayRng {
    fn new(seed: u64, column: u32, ring: u32) -> Self {
        let mut s =
            Self(seed ^ ((column as u64) << 20 | ring as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        s.next();
        s
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
    }
    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

/// A return before it becomes a point.
#[derive(Clone, Copy)]
struct Ret {
    x: f32,
    y: f32,
    z: f32,
    intensity: f32,
    time: f32,
    ring: u16,
    owner: u32,
}

/// Azimuth of column `c` in the sensor frame: the head spins clockwise seen from above
/// (as Velodyne and Ouster heads do) and a revolution starts facing backwards.
pub fn column_azimuth(c: usize, columns: usize) -> f32 {
    std::f32::consts::PI - std::f32::consts::TAU * c as f32 / columns as f32
}

/// Casts one revolution.
#[allow(clippy::too_many_arguments)]
pub fn cast(
    spec: &SensorSpec,
    rad: &Radiometry,
    mount: &Mount,
    pose: SensorPose,
    target: &Target<'_>,
    seed: u64,
    parallel: bool,
) -> Scan {
    let n_bins = 720usize;
    let bins = PolarBins::build(target, pose, spec, n_bins);
    let beams: Vec<(f32, f32, f32, u16)> = spec
        .elevations_deg
        .iter()
        .enumerate()
        .map(|(r, &e)| {
            let e = e.to_radians();
            (e.tan(), e.cos(), e.sin(), r as u16)
        })
        .collect();
    // Rings fire in time order within a column; emit them in that order.
    let mut firing: Vec<usize> = (0..spec.beams()).collect();
    firing.sort_by(|&a, &b| {
        spec.firing_offset_s[a]
            .total_cmp(&spec.firing_offset_s[b])
            .then(a.cmp(&b))
    });

    let column = |c: usize| -> Vec<Ret> {
        let mut out = Vec::with_capacity(spec.beams());
        let mut cands: Vec<Candidate> = Vec::with_capacity(64);
        cast_column(
            spec, rad, mount, pose, target, &bins, &beams, &firing, seed, c, &mut cands, &mut out,
        );
        out
    };
    let cols: Vec<Vec<Ret>> = if parallel {
        (0..spec.columns).into_par_iter().map(column).collect()
    } else {
        (0..spec.columns).map(column).collect()
    };
    let n: usize = cols.iter().map(Vec::len).sum();
    let mut points = Points::with_capacity(n);
    let mut time = Vec::with_capacity(n);
    let mut ring = Vec::with_capacity(n);
    let mut owner = Vec::with_capacity(n);
    for r in cols.iter().flatten() {
        points.push(r.x, r.y, r.z, r.intensity);
        time.push(r.time);
        ring.push(r.ring);
        owner.push(r.owner);
    }
    points.time = Some(time);
    points.ring = Some(ring);
    Scan { points, owner }
}

#[allow(clippy::too_many_arguments)]
fn cast_column(
    spec: &SensorSpec,
    rad: &Radiometry,
    mount: &Mount,
    pose: SensorPose,
    target: &Target<'_>,
    bins: &PolarBins,
    beams: &[(f32, f32, f32, u16)],
    firing: &[usize],
    seed: u64,
    c: usize,
    cands: &mut Vec<Candidate>,
    out: &mut Vec<Ret>,
) {
    let az_sensor = column_azimuth(c, spec.columns);
    let az = az_sensor + pose.yaw;
    let (dy, dx) = az.sin_cos();
    let t_col = c as f32 / spec.columns as f32 / spec.rate_hz;
    cands.clear();
    for &pi in bins.bin(az) {
        let p = &target.primitives[pi as usize];
        // A moving owner has moved by v * t since the sweep start: move the ray instead.
        let (ox, oy) = match target.owner_velocity.get(p.owner as usize) {
            Some(v) if p.owner != NO_OWNER => (pose.x - v[0] * t_col, pose.y - v[1] * t_col),
            _ => (pose.x, pose.y),
        };
        if let Some(span) = p.footprint.span(ox, oy, dx, dy) {
            cands.push(Candidate { span, prim: pi });
        }
    }
    cands.sort_by(|a, b| a.span.t0.total_cmp(&b.span.t0).then(a.prim.cmp(&b.prim)));
    let ground = &target.world.ground;
    let (gx, gy) = ground.gradient(pose.x);
    let k = gx * dx + gy * dy;
    let g_here = ground.height(pose.x, pose.y);
    let (ys, xs) = (-pose.yaw).sin_cos();

    // Per body level: how far below the sensor a beam may drop before leaving it.
    let body: Vec<f32> = mount
        .body
        .iter()
        .map(|b| -b.below / b.exit_distance(az_sensor + mount.yaw))
        .collect();
    for &r in firing {
        let (tan_e, cos_e, sin_e, ring) = beams[r];
        if body.iter().any(|&min_tan| tan_e < min_tan) {
            continue; // the beam ends on the ego vehicle
        }
        let mut rng = RayRng::new(seed, c as u32, r as u32);
        let t_max = spec.max_range * cos_e;
        // Terrain: Newton-like steps on t*tan = G(t) - z_sensor, linearised with slope k.
        let mut best = t_max;
        let mut hit: Option<(f32, f32, u32)> = None; // (reflectivity, cos incidence, owner)
        if tan_e < k {
            let mut t = (g_here - pose.z) / (tan_e - k);
            for _ in 0..3 {
                if !(t > 0.0 && t < t_max * 1.5) {
                    break;
                }
                let gt = ground.height(pose.x + t * dx, pose.y + t * dy) - pose.z;
                t = (gt - k * t) / (tan_e - k);
            }
            if t > 0.0 && t < t_max {
                best = t;
                let (hx, hy) = (pose.x + t * dx, pose.y + t * dy);
                let (ax, ay) = ground.gradient(hx);
                let norm = (ax * ax + ay * ay + 1.0).sqrt();
                let cos_i = ((-ax * dx - ay * dy) * cos_e + sin_e).abs() / norm;
                hit = Some((target.world.ground_reflectivity(hx, hy), cos_i, NO_OWNER));
            }
        }
        for cand in cands.iter() {
            if cand.span.t0 >= best {
                break;
            }
            let p = &target.primitives[cand.prim as usize];
            let Some((tz0, tz1)) = z_interval(pose.z, tan_e, p.zmin, p.zmax) else {
                continue;
            };
            let te = cand.span.t0.max(tz0);
            let tx = cand.span.t1.min(tz1);
            if te > tx || te >= best || tx <= 0.0 {
                continue;
            }
            let side = cand.span.t0 >= tz0;
            let cos_i = if side {
                (dx * cand.span.nx + dy * cand.span.ny).abs() * cos_e
            } else {
                sin_e.abs()
            };
            match p.material.surface {
                Surface::Solid => {
                    best = te;
                    hit = Some((p.material.reflectivity, cos_i, p.owner));
                }
                Surface::Glass => {
                    if rng.uniform() >= rad.glass_pass {
                        best = te;
                        hit = Some((p.material.reflectivity, cos_i, p.owner));
                    }
                }
                Surface::Foliage => {
                    let depth = -rad.foliage_depth * rng.uniform().max(1e-7).ln() * cos_e;
                    let t = te + depth;
                    if t < tx && t < best {
                        best = t;
                        // Leaves face every way.
                        hit = Some((p.material.reflectivity, 0.2 + 0.8 * rng.uniform(), p.owner));
                    }
                }
            }
        }
        let Some((rho, cos_i, owner)) = hit else {
            continue;
        };
        let range = best / cos_e;
        if range < spec.min_range {
            continue;
        }
        // Detection: return strength relative to the threshold, with speckle.
        let strength = rho
            * cos_i.max(1e-4).powf(rad.angle_exponent)
            * (rad.speckle_sigma * rng.normal()).exp();
        let snr = strength / 0.8 * (spec.range_at_80pct / range).powi(2);
        if snr < 1.0 || rng.uniform() < spec.base_dropout {
            continue;
        }
        let noise = (spec.range_sigma * rng.normal())
            .clamp(-3.0 * spec.range_sigma, 3.0 * spec.range_sigma);
        let rr = (range + noise).max(0.0);
        let h = rr * cos_e;
        // World-aligned offset from the sensor, then into the sensor frame.
        let (wx, wy, wz) = (h * dx, h * dy, rr * sin_e);
        let x = xs * wx - ys * wy;
        let y = ys * wx + xs * wy;
        let falloff = (10.0 / range.max(1.0)).powf(rad.intensity_range_exponent);
        let i = (rad.intensity_gain * (strength * falloff).max(0.0).powf(rad.intensity_gamma)
            + rad.intensity_noise * rng.normal())
        .clamp(0.0, 1.0);
        out.push(Ret {
            x,
            y,
            z: wz,
            intensity: i * spec.intensity_scale,
            time: t_col + spec.firing_offset_s[r],
            ring,
            owner,
        });
    }
}

/// Primitives binned by the azimuth interval they cover, each bin sorted by distance.
struct PolarBins {
    n: usize,
    offsets: Vec<u32>,
    items: Vec<u32>,
}

impl PolarBins {
    fn build(target: &Target<'_>, pose: SensorPose, spec: &SensorSpec, n: usize) -> Self {
        let period = spec.period_s();
        let mut lists: Vec<Vec<(f32, u32)>> = vec![Vec::new(); n];
        let bin_w = std::f32::consts::TAU / n as f32;
        for (i, p) in target.primitives.iter().enumerate() {
            let (cx, cy) = p.footprint.center();
            let (rx, ry) = (cx - pose.x, cy - pose.y);
            let d = rx.hypot(ry);
            let moved = match target.owner_velocity.get(p.owner as usize) {
                Some(v) if p.owner != NO_OWNER => v[0].hypot(v[1]) * period,
                _ => 0.0,
            };
            let r = p.footprint.radius() + moved + 0.01;
            if d - r > spec.max_range {
                continue;
            }
            let near = (d - r).max(0.0);
            if d <= r {
                for l in lists.iter_mut() {
                    l.push((near, i as u32));
                }
                continue;
            }
            let centre = ry.atan2(rx);
            let (lo_a, hi_a) = match p.footprint {
                // Long walls: their exact angular extent, far tighter than the circle.
                Footprint::Rect {
                    cx,
                    cy,
                    cos,
                    sin,
                    hl,
                    hw,
                } if moved == 0.0 => {
                    let (px, py) = (pose.x - cx, pose.y - cy);
                    let (lx, ly) = (cos * px + sin * py, -sin * px + cos * py);
                    if lx.abs() <= hl + 0.01 && ly.abs() <= hw + 0.01 {
                        for l in lists.iter_mut() {
                            l.push((near, i as u32));
                        }
                        continue;
                    }
                    let mut lo = 0.0f32;
                    let mut hi = 0.0f32;
                    for (a, b) in [(hl, hw), (-hl, hw), (-hl, -hw), (hl, -hw)] {
                        let (qx, qy) = (
                            cx + cos * a - sin * b - pose.x,
                            cy + sin * a + cos * b - pose.y,
                        );
                        let delta = (qy.atan2(qx) - centre + std::f32::consts::PI)
                            .rem_euclid(std::f32::consts::TAU)
                            - std::f32::consts::PI;
                        lo = lo.min(delta);
                        hi = hi.max(delta);
                    }
                    (centre + lo - 1e-4, centre + hi + 1e-4)
                }
                _ => {
                    let half = (r / d).min(1.0).asin();
                    (centre - half, centre + half)
                }
            };
            let lo = (lo_a / bin_w).floor() as i64;
            let hi = (hi_a / bin_w).floor() as i64;
            for b in lo..=hi {
                lists[b.rem_euclid(n as i64) as usize].push((near, i as u32));
            }
        }
        let mut offsets = Vec::with_capacity(n + 1);
        let mut items = Vec::new();
        offsets.push(0);
        for mut l in lists {
            l.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            items.extend(l.into_iter().map(|(_, i)| i));
            offsets.push(items.len() as u32);
        }
        Self { n, offsets, items }
    }

    fn bin(&self, az: f32) -> &[u32] {
        let b = ((az / std::f32::consts::TAU).rem_euclid(1.0) * self.n as f32) as usize % self.n;
        &self.items[self.offsets[b] as usize..self.offsets[b + 1] as usize]
    }
}
