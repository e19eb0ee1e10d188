//! The detection classes, their size distributions and their typical speeds.
//!
//! Mean sizes (length, width, height in metres) are the nuScenes train-set class means
//! that mmdetection3d uses as anchor sizes (configs/_base_/models/
//! hv_pointpillars_fpn_nus.py and the SSN nuScenes config), except `cyclist`, which is
//! the KITTI Cyclist anchor of OpenPCDet (tools/cfgs/kitti_models/pointpillar.yaml:
//! 1.76 x 0.6 x 1.73). Spreads are our estimates of the nuScenes per-class spread
//! (about 8-10 % of each dimension for cars, more for trucks and trailers); they are
//! not published statistics.

use rand::RngExt;
use rand_distr::{Distribution, Normal};

/// A detection class of the simulator, spelled as the project's vocabulary spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Class {
    Car,
    Truck,
    Bus,
    Trailer,
    ConstructionVehicle,
    Pedestrian,
    Cyclist,
    Motorcycle,
    Bicycle,
    Barrier,
    TrafficCone,
}

impl Class {
    pub const ALL: [Class; 11] = [
        Class::Car,
        Class::Truck,
        Class::Bus,
        Class::Trailer,
        Class::ConstructionVehicle,
        Class::Pedestrian,
        Class::Cyclist,
        Class::Motorcycle,
        Class::Bicycle,
        Class::Barrier,
        Class::TrafficCone,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Car => "car",
            Class::Truck => "truck",
            Class::Bus => "bus",
            Class::Trailer => "trailer",
            Class::ConstructionVehicle => "construction_vehicle",
            Class::Pedestrian => "pedestrian",
            Class::Cyclist => "cyclist",
            Class::Motorcycle => "motorcycle",
            Class::Bicycle => "bicycle",
            Class::Barrier => "barrier",
            Class::TrafficCone => "traffic_cone",
        }
    }

    /// Mean (length, width, height).
    pub fn mean_size(self) -> [f32; 3] {
        match self {
            Class::Car => [4.607, 1.950, 1.723],
            Class::Truck => [6.738, 2.456, 2.730],
            Class::Bus => [11.189, 2.940, 3.470],
            Class::Trailer => [12.013, 2.874, 3.815],
            Class::ConstructionVehicle => [6.384, 2.731, 3.133],
            Class::Pedestrian => [0.726, 0.663, 1.757],
            Class::Cyclist => [1.76, 0.60, 1.73],
            Class::Motorcycle => [2.100, 0.763, 1.444],
            Class::Bicycle => [1.685, 0.601, 1.272],
            Class::Barrier => [0.486, 2.490, 0.983],
            Class::TrafficCone => [0.404, 0.397, 1.062],
        }
    }

    /// Relative 1-sigma spread of each dimension (our estimate, see the module note).
    fn rel_spread(self) -> [f32; 3] {
        match self {
            Class::Car => [0.09, 0.06, 0.09],
            Class::Truck | Class::Trailer | Class::ConstructionVehicle => [0.25, 0.08, 0.15],
            Class::Bus => [0.12, 0.04, 0.08],
            Class::Pedestrian => [0.15, 0.15, 0.07],
            Class::Cyclist | Class::Motorcycle | Class::Bicycle => [0.08, 0.12, 0.08],
            Class::Barrier => [0.2, 0.2, 0.1],
            Class::TrafficCone => [0.15, 0.15, 0.25],
        }
    }

    /// A size drawn around the class mean, clipped to +-2.5 sigma.
    pub fn sample_size(self, rng: &mut impl rand::Rng) -> [f32; 3] {
        let m = self.mean_size();
        let s = self.rel_spread();
        let n = Normal::new(0.0f32, 1.0).expect("unit normal");
        std::array::from_fn(|i| m[i] * (1.0 + s[i] * n.sample(rng).clamp(-2.5, 2.5)))
    }

    /// Typical cruising speed (m/s) when moving, and the chance of standing still.
    pub fn speed(self, rng: &mut impl rand::Rng) -> f32 {
        let (mean, sd, p_stop): (f32, f32, f32) = match self {
            Class::Car | Class::Motorcycle => (10.0, 3.0, 0.2),
            Class::Truck | Class::Bus => (8.0, 2.5, 0.2),
            Class::Trailer => (8.0, 2.5, 0.2),
            Class::ConstructionVehicle => (2.0, 1.0, 0.7),
            Class::Pedestrian => (1.3, 0.3, 0.3),
            Class::Cyclist => (4.5, 1.2, 0.1),
            Class::Bicycle | Class::Barrier | Class::TrafficCone => (0.0, 0.0, 1.0),
        };
        if rng.random::<f32>() < p_stop {
            return 0.0;
        }
        let n = Normal::new(mean, sd.max(1e-6)).expect("finite normal");
        n.sample(rng).max(0.3)
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn sampled_sizes_centre_on_the_means() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for c in Class::ALL {
            let n = 2000;
            let mut sum = [0.0f64; 3];
            for _ in 0..n {
                let s = c.sample_size(&mut rng);
                assert!(s.iter().all(|&v| v > 0.0));
                for i in 0..3 {
                    sum[i] += s[i] as f64;
                }
            }
            let m = c.mean_size();
            for i in 0..3 {
                let mean = sum[i] / n as f64;
                assert!(
                    (mean / m[i] as f64 - 1.0).abs() < 0.03,
                    "{c} dim {i}: {mean}"
                );
            }
        }
    }
}
