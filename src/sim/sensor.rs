//! Spinning lidar models: beam elevation tables, azimuth resolution, rate, range limits,
//! noise and the radiometric constants the ray caster needs.

use serde::{Deserialize, Serialize};

/// The spinning lidars we simulate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum LidarModel {
    /// Velodyne VLP-16 (Puck): 16 beams, +-15 deg.
    Vlp16,
    /// Velodyne HDL-32E as on nuScenes' LIDAR_TOP (20 Hz).
    Hdl32,
    /// Velodyne HDL-64E S2 as on KITTI (10 Hz).
    Hdl64,
    /// Ouster OS1-128: 128 uniform beams over 45 deg.
    Os128,
}

impl LidarModel {
    pub fn spec(self) -> SensorSpec {
        SensorSpec::of(self)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Vlp16 => "vlp16",
            Self::Hdl32 => "hdl32",
            Self::Hdl64 => "hdl64",
            Self::Os128 => "os128",
        }
    }
}

/// Everything about a sensor that shapes its scans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SensorSpec {
    pub model: LidarModel,
    /// Beam elevations in degrees, indexed by ring (the driver's channel number).
    pub elevations_deg: Vec<f32>,
    /// Time offset of each ring's firing inside one azimuth column, seconds.
    pub firing_offset_s: Vec<f32>,
    /// Azimuth columns per revolution.
    pub columns: usize,
    /// Revolutions per second.
    pub rate_hz: f32,
    pub min_range: f32,
    pub max_range: f32,
    /// 1-sigma range noise, metres.
    pub range_sigma: f32,
    /// Range at which an 80 %-reflective, normally lit target is at the detection
    /// threshold (the data sheets' "range at 80 % reflectivity").
    pub range_at_80pct: f32,
    /// Dropout of rays that would return, independent of range (dust, interference).
    pub base_dropout: f32,
    /// Full-scale value of the intensity field (1.0 for KITTI's 0..1, 255 for nuScenes).
    pub intensity_scale: f32,
    /// Frame id the driver stamps on its clouds.
    pub frame_id: String,
}

impl SensorSpec {
    pub fn of(model: LidarModel) -> Self {
        match model {
            LidarModel::Vlp16 => {
                // VLP-16 user manual: channel n fires at elevation -15 + 2n for even n,
                // interleaved; the ROS driver's ring is ordered by elevation.
                let elevations_deg = (0..16).map(|i| -15.0 + 2.0 * i as f32).collect();
                // Firing order interleaves low and high beams, 2.304 us apart.
                let order = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15];
                Self {
                    model,
                    elevations_deg,
                    firing_offset_s: slot_offsets(&order, 2.304e-6),
                    columns: 1800, // 0.2 deg at 10 Hz
                    rate_hz: 10.0,
                    min_range: 0.5,
                    max_range: 100.0,
                    range_sigma: 0.03,
                    range_at_80pct: 100.0,
                    base_dropout: 0.01,
                    intensity_scale: 255.0,
                    frame_id: "velodyne".into(),
                }
            }
            LidarModel::Hdl32 => {
                // HDL-32E manual: -30.67 .. +10.67 deg in 4/3 deg steps; lasers fire
                // interleaved (low, high, low, ...) 1.152 us apart.
                let elevations_deg = (0..32).map(|i| -30.67 + 1.3333 * i as f32).collect();
                let mut order = [0usize; 32];
                for k in 0..16 {
                    order[2 * k] = k;
                    order[2 * k + 1] = k + 16;
                }
                Self {
                    model,
                    elevations_deg,
                    firing_offset_s: slot_offsets(&order, 1.152e-6),
                    // ~695 k points/s single return at 20 Hz -> 1084 columns (nuScenes
                    // sweeps carry 34.7 k points = 32 x 1084).
                    columns: 1084,
                    rate_hz: 20.0,
                    min_range: 1.0,
                    max_range: 80.0,
                    range_sigma: 0.02,
                    range_at_80pct: 80.0,
                    base_dropout: 0.0,
                    intensity_scale: 255.0,
                    frame_id: "lidar_top".into(),
                }
            }
            LidarModel::Hdl64 => {
                // HDL-64E S2: upper block 32 lasers +2.0 .. -8.33 deg (1/3 deg spacing),
                // lower block 32 lasers -8.83 .. -24.33 deg (1/2 deg spacing). Both
                // blocks fire together; 1.3 M points/s at 10 Hz -> 2083 columns (0.173 deg).
                let mut elevations_deg: Vec<f32> = (0..32)
                    .map(|i| -24.33 + 0.5 * i as f32)
                    .chain((0..32).map(|i| -8.33 + (10.33 / 31.0) * i as f32))
                    .collect();
                elevations_deg.sort_by(f32::total_cmp);
                let firing_offset_s = (0..64).map(|r| (r % 32) as f32 * 1.5e-6).collect();
                Self {
                    model,
                    elevations_deg,
                    firing_offset_s,
                    columns: 2083,
                    rate_hz: 10.0,
                    min_range: 2.5,
                    max_range: 120.0,
                    range_sigma: 0.02,
                    range_at_80pct: 120.0,
                    base_dropout: 0.02,
                    intensity_scale: 1.0,
                    frame_id: "velodyne".into(),
                }
            }
            LidarModel::Os128 => {
                // OS1-128: 45 deg vertical field, uniform; ouster-ros numbers ring 0 at the
                // top beam. 1024 columns at 10 Hz, all channels of a column fire together.
                let elevations_deg = (0..128).map(|i| 22.5 - 45.0 * i as f32 / 127.0).collect();
                Self {
                    model,
                    elevations_deg,
                    firing_offset_s: vec![0.0; 128],
                    columns: 1024,
                    rate_hz: 10.0,
                    min_range: 0.3,
                    max_range: 120.0,
                    range_sigma: 0.015,
                    range_at_80pct: 120.0,
                    base_dropout: 0.005,
                    intensity_scale: 255.0,
                    frame_id: "os_sensor".into(),
                }
            }
        }
    }

    pub fn beams(&self) -> usize {
        self.elevations_deg.len()
    }

    /// Duration of one revolution, seconds.
    pub fn period_s(&self) -> f32 {
        1.0 / self.rate_hz
    }
}

/// Offsets for rings fired in `order`, one slot of `dt` each.
fn slot_offsets(order: &[usize], dt: f32) -> Vec<f32> {
    let mut out = vec![0.0; order.len()];
    for (slot, &ring) in order.iter().enumerate() {
        out[ring] = slot as f32 * dt;
    }
    out
}

/// Where the sensor sits on the ego vehicle: height above the ground under the vehicle
/// origin, forward/left offset and yaw, and the vehicle body that hides the lowest beams
/// near the car. The scan is expressed in the sensor frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mount {
    pub x: f32,
    pub y: f32,
    /// Height of the optical centre above the ground, metres (KITTI 1.73, nuScenes 1.84).
    pub height: f32,
    pub yaw: f32,
    /// The ego vehicle as stacked levels (roof, then hood/trunk); empty: none.
    pub body: Vec<EgoBody>,
}

/// One level of the ego vehicle seen from the sensor: a rectangle around it (vehicle
/// axes) `below` metres under the optical centre. Rays that hit it are dropped, as
/// drivers and dataset tools drop returns from the ego vehicle.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EgoBody {
    pub front: f32,
    pub rear: f32,
    pub half_width: f32,
    pub below: f32,
}

impl EgoBody {
    /// Horizontal distance from the sensor to the body's edge along azimuth `az`
    /// (vehicle frame).
    pub fn exit_distance(&self, az: f32) -> f32 {
        let (dy, dx) = az.sin_cos();
        let tx = if dx > 1e-6 {
            self.front / dx
        } else if dx < -1e-6 {
            -self.rear / dx
        } else {
            f32::INFINITY
        };
        let ty = if dy.abs() > 1e-6 {
            self.half_width / dy.abs()
        } else {
            f32::INFINITY
        };
        tx.min(ty)
    }
}

impl Mount {
    /// The mount of the dataset each model comes from: KITTI's HDL-64E 1.73 m up on a
    /// VW Passat wagon (roof ~1.47 m), nuScenes' HDL-32E 1.84 m up on a Renault Zoe
    /// (roof ~1.56 m).
    pub fn default_for(model: LidarModel) -> Self {
        let level = |front, rear, half_width, below| EgoBody {
            front,
            rear,
            half_width,
            below,
        };
        // One level per rig, fitted to the real scans: KITTI and nuScenes keep about
        // 55 % of the lowest beams' returns, the rest end on the car ahead of and behind
        // the rack (the sensor sits ~0.5 m above the roof edge seen by those beams).
        let (height, body) = match model {
            LidarModel::Hdl64 => (1.73, vec![level(1.5, 1.5, 0.9, 0.5)]),
            LidarModel::Hdl32 => (1.84, vec![level(1.4, 1.4, 0.86, 0.52)]),
            LidarModel::Vlp16 => (1.6, vec![level(1.5, 2.2, 0.9, 0.4)]),
            LidarModel::Os128 => (1.9, vec![level(1.5, 2.2, 0.9, 0.4)]),
        };
        Self {
            x: 0.0,
            y: 0.0,
            height,
            yaw: 0.0,
            body,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_match_data_sheets() {
        for m in [
            LidarModel::Vlp16,
            LidarModel::Hdl32,
            LidarModel::Hdl64,
            LidarModel::Os128,
        ] {
            let s = m.spec();
            assert_eq!(s.elevations_deg.len(), s.firing_offset_s.len());
            assert!(s.firing_offset_s.iter().all(|&t| t < 1e-4));
        }
        let h = LidarModel::Hdl64.spec();
        assert_eq!(h.beams(), 64);
        assert!((h.elevations_deg[0] + 24.33).abs() < 1e-3);
        assert!((h.elevations_deg[63] - 2.0).abs() < 1e-3);
        let n = LidarModel::Hdl32.spec();
        assert!((n.elevations_deg[31] - 10.67).abs() < 0.01);
        assert_eq!(LidarModel::Os128.spec().beams(), 128);
    }
}
