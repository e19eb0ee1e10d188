//! Scenes that evolve over time and the frames a lidar records of them, with ground truth.

use super::geometry::{NO_OWNER, Primitive};
use super::scan::{Radiometry, SensorPose, Target, cast};
use super::sensor::{LidarModel, Mount, SensorSpec};
use super::world::{World, WorldConfig};
use crate::boxes::{Box3d, Object};
use crate::cloud::Points;
use serde::{Deserialize, Serialize};

/// Everything that decides what a simulated drive looks like.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SimConfig {
    pub sensor: SensorSpec,
    pub mount: Mount,
    pub world: WorldConfig,
    pub radiometry: Radiometry,
    /// Moving objects keep moving while the head spins (smearing them as real scans do).
    pub motion_distortion: bool,
    /// Stamp of frame 0, nanoseconds since the epoch.
    pub start_stamp_ns: u64,
    /// Cast columns on rayon (output is identical either way).
    pub parallel: bool,
}

impl SimConfig {
    /// The dataset-like setup of `model` (mount height of KITTI / nuScenes rigs).
    pub fn new(model: LidarModel) -> Self {
        Self {
            sensor: model.spec(),
            mount: Mount::default_for(model),
            world: WorldConfig::default(),
            radiometry: Radiometry::for_model(model),
            motion_distortion: true,
            start_stamp_ns: 1_700_000_000_000_000_000,
            parallel: true,
        }
    }
}

/// One simulated revolution with its ground truth.
#[derive(Debug, Clone)]
pub struct Frame {
    pub index: u64,
    pub stamp_ns: u64,
    /// Points in the sensor frame with intensity, ring and per-point time.
    pub points: Points,
    /// Ground-truth objects in the sensor frame at the stamp (the sweep start); objects
    /// without returns are kept with `num_points = Some(0)`.
    pub objects: Vec<Object>,
    /// For each point, the index of the object it hit, or `u32::MAX` for scenery.
    pub point_object: Vec<u32>,
}

/// A world and a drive through it.
#[derive(Debug, Clone)]
pub struct Scene {
    config: SimConfig,
    world: World,
    seed: u64,
    next: u64,
}

impl Scene {
    /// Generates a world from `seed`, sized for `config.world.duration_s` of driving.
    pub fn new(config: SimConfig, seed: u64) -> Self {
        let world = World::generate(&config.world, seed);
        Self::from_world(config, world, seed)
    }

    /// A drive through a given world (hand-built test scenes).
    pub fn from_world(config: SimConfig, world: World, seed: u64) -> Self {
        Self {
            config,
            world,
            seed,
            next: 0,
        }
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// The sensor pose at frame `k`.
    pub fn sensor_pose(&self, k: u64) -> SensorPose {
        let t = self.time(k);
        let (ex, ey) = self.world.ego_position(t);
        let m = &self.config.mount;
        SensorPose {
            x: ex + m.x,
            y: ey + m.y,
            z: self.world.ground.height(ex, ey) + m.height,
            yaw: m.yaw,
        }
    }

    fn time(&self, k: u64) -> f32 {
        (k as f64 / self.config.sensor.rate_hz as f64) as f32
    }

    /// Frame `k` (frames are independent of the order they are asked for).
    pub fn frame(&self, k: u64) -> Frame {
        let cfg = &self.config;
        let t = self.time(k);
        let pose = self.sensor_pose(k);
        let reach = cfg.sensor.max_range + 15.0;
        let mut prims: Vec<Primitive> = self.world.statics.clone();
        let mut owners: Vec<usize> = Vec::new();
        let mut velocity: Vec<[f32; 2]> = Vec::new();
        for (i, a) in self.world.agents.iter().enumerate() {
            let (x, y) = a.position(t);
            if (x - pose.x).hypot(y - pose.y) > reach {
                continue;
            }
            let owner = owners.len() as u32;
            self.world.agent_primitives(i, t, owner, &mut prims);
            owners.push(i);
            velocity.push(if cfg.motion_distortion {
                a.velocity()
            } else {
                [0.0, 0.0]
            });
        }
        let target = Target {
            world: &self.world,
            primitives: &prims,
            owner_velocity: &velocity,
        };
        let ray_seed = splitmix(self.seed ^ splitmix(k.wrapping_add(0xA5A5)));
        let scan = cast(
            &cfg.sensor,
            &cfg.radiometry,
            &cfg.mount,
            pose,
            &target,
            ray_seed,
            cfg.parallel,
        );

        let mut counts = vec![0u32; owners.len()];
        for &o in &scan.owner {
            if o != NO_OWNER {
                counts[o as usize] += 1;
            }
        }
        let (s, c) = (-pose.yaw).sin_cos();
        let objects = owners
            .iter()
            .zip(&counts)
            .map(|(&i, &n)| {
                let a = &self.world.agents[i];
                let w = self.world.agent_center(i, t);
                let (dx, dy) = (w[0] - pose.x, w[1] - pose.y);
                let v = a.velocity();
                Object {
                    bbox: Box3d {
                        center: [c * dx - s * dy, s * dx + c * dy, w[2] - pose.z],
                        size: a.size,
                        yaw: wrap_angle(a.yaw - pose.yaw),
                    },
                    class: a.label.clone(),
                    velocity: Some([c * v[0] - s * v[1], s * v[0] + c * v[1]]),
                    num_points: Some(n),
                }
            })
            .collect();
        Frame {
            index: k,
            stamp_ns: cfg.start_stamp_ns
                + (k as f64 * 1e9 / cfg.sensor.rate_hz as f64).round() as u64,
            points: scan.points,
            objects,
            point_object: scan.owner,
        }
    }

    /// The next frame of the drive.
    pub fn next_frame(&mut self) -> Frame {
        let f = self.frame(self.next);
        self.next += 1;
        f
    }
}

/// Draws independent scenes in memory, for training and calibration.
#[derive(Debug, Clone)]
pub struct Simulator {
    pub config: SimConfig,
}

impl Simulator {
    pub fn new(config: SimConfig) -> Self {
        Self { config }
    }

    /// Frame 0 of a fresh world drawn from `seed`.
    pub fn sample(&self, seed: u64) -> (Points, Vec<Object>) {
        let f = Scene::new(self.config.clone(), seed).frame(0);
        (f.points, f.objects)
    }

    /// A drive through a world drawn from `seed`.
    pub fn scene(&self, seed: u64) -> Scene {
        Scene::new(self.config.clone(), seed)
    }
}

fn wrap_angle(a: f32) -> f32 {
    let w = (a + std::f32::consts::PI).rem_euclid(std::f32::consts::TAU) - std::f32::consts::PI;
    if w <= -std::f32::consts::PI {
        w + std::f32::consts::TAU
    } else {
        w
    }
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
