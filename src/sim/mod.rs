//! Lidar simulation with ground truth: spinning sensors with their real beam layouts,
//! procedural streets with scenery and agents of every detection class, ray casting
//! with occlusion, dropout, noise and intensity, and drives that evolve over time.
//!
//! `Simulator::sample` draws one labelled scan in memory (training, calibration);
//! `Scene` replays a drive frame by frame (bags for the ROS node and its tests).

mod classes;
mod geometry;
pub mod realism;
pub mod record;
mod scan;
mod sensor;
mod shapes;
mod simulator;
mod world;

pub use classes::Class;
pub use geometry::{Footprint, Material, NO_OWNER, Primitive, Surface};
pub use scan::{Radiometry, Scan, SensorPose, column_azimuth};
pub use sensor::{EgoBody, LidarModel, Mount, SensorSpec};
pub use shapes::{Part, PartShape, parts};
pub use simulator::{Frame, Scene, SimConfig, Simulator};
pub use world::{Agent, Ground, LANE_WIDTH, World, WorldConfig};
