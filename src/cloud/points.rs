//! The decoded point set every later stage consumes.

/// A scan as structure-of-arrays: all vectors have the same length.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Points {
    pub x: Vec<f32>,
    pub y: Vec<f32>,
    pub z: Vec<f32>,
    /// Intensity in the scale the model expects (after the configured scaling).
    pub intensity: Vec<f32>,
    /// Per-point time offset in seconds relative to the scan stamp, when the source has it.
    pub time: Option<Vec<f32>>,
    /// Laser ring (beam index), when the source has it.
    pub ring: Option<Vec<u16>>,
}

impl Points {
    pub fn with_capacity(n: usize) -> Self {
        Self {
            x: Vec::with_capacity(n),
            y: Vec::with_capacity(n),
            z: Vec::with_capacity(n),
            intensity: Vec::with_capacity(n),
            time: None,
            ring: None,
        }
    }

    pub fn len(&self) -> usize {
        self.x.len()
    }

    pub fn is_empty(&self) -> bool {
        self.x.is_empty()
    }

    /// Appends one point without time or ring.
    pub fn push(&mut self, x: f32, y: f32, z: f32, intensity: f32) {
        self.x.push(x);
        self.y.push(y);
        self.z.push(z);
        self.intensity.push(intensity);
    }

    /// Point `i` as (x, y, z).
    pub fn xyz(&self, i: usize) -> [f32; 3] {
        [self.x[i], self.y[i], self.z[i]]
    }
}
