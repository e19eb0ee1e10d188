//! The mapping between the lidar frame and image pixels.

use super::{BevOptions, RenderError};

/// Largest image side we agree to allocate (16384 x 16384 x 4 bytes = 1 GiB).
const MAX_SIDE: u32 = 16384;

/// A square top-down window onto the lidar frame.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BevView {
    pub center: [f32; 2],
    pub extent: f32,
    pub resolution: f32,
    /// Image side in pixels.
    pub size: u32,
}

impl BevView {
    /// Checks the options and sizes the image.
    pub fn new(opts: &BevOptions) -> Result<Self, RenderError> {
        let bad = |option, reason: String| RenderError::BadOption { option, reason };
        if !(opts.extent.is_finite() && opts.extent > 0.0) {
            return Err(bad(
                "extent",
                format!("{} is not a positive number of metres", opts.extent),
            ));
        }
        if !(opts.resolution.is_finite() && opts.resolution > 0.0) {
            return Err(bad(
                "resolution",
                format!(
                    "{} is not a positive number of metres per pixel",
                    opts.resolution
                ),
            ));
        }
        if !opts.center.iter().all(|c| c.is_finite()) {
            return Err(bad("center", format!("{:?} is not finite", opts.center)));
        }
        let side = (2.0 * opts.extent / opts.resolution).round();
        if !(1.0..=MAX_SIDE as f32).contains(&side) {
            return Err(bad(
                "resolution",
                format!(
                    "extent {} m at {} m/px gives a {side} px image (1..={MAX_SIDE})",
                    opts.extent, opts.resolution
                ),
            ));
        }
        Ok(Self {
            center: opts.center,
            extent: opts.extent,
            resolution: opts.resolution,
            size: side as u32,
        })
    }

    /// Image position (column u, row v; pixel (i, j) covers [i, i+1) x [j, j+1)) of the
    /// lidar-frame point (x, y): +x is up, +y is left.
    pub fn to_pixel(&self, x: f32, y: f32) -> (f32, f32) {
        let u = (self.center[1] + self.extent - y) / self.resolution;
        let v = (self.center[0] + self.extent - x) / self.resolution;
        (u, v)
    }

    /// The lidar-frame (x, y) at image position (u, v); the inverse of `to_pixel`.
    pub fn to_lidar(&self, u: f32, v: f32) -> (f32, f32) {
        (
            self.center[0] + self.extent - v * self.resolution,
            self.center[1] + self.extent - u * self.resolution,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forward_is_up_and_left_is_left() {
        let v = BevView::new(&BevOptions {
            extent: 10.0,
            resolution: 0.5,
            ..BevOptions::default()
        })
        .unwrap();
        assert_eq!(v.size, 40);
        assert_eq!(v.to_pixel(0.0, 0.0), (20.0, 20.0));
        // 5 m ahead is 10 px up; 5 m to the left is 10 px left.
        assert_eq!(v.to_pixel(5.0, 0.0), (20.0, 10.0));
        assert_eq!(v.to_pixel(0.0, 5.0), (10.0, 20.0));
        assert_eq!(v.to_lidar(10.0, 10.0), (5.0, 5.0));
        assert!(
            BevView::new(&BevOptions {
                resolution: 0.0,
                ..BevOptions::default()
            })
            .is_err()
        );
        assert!(
            BevView::new(&BevOptions {
                extent: 1e6,
                ..BevOptions::default()
            })
            .is_err()
        );
    }
}
