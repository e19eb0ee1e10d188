//! The check every incoming cloud passes before it may enter the newest-scan mailbox.
//!
//! A malformed cloud (truncated data, a missing coordinate field, an impossible
//! point_step) must be reported as malformed, not silently replaced by the next scan
//! while it waits for the detector, and it must never displace a good scan waiting
//! there. So the subscription callback checks the layout at once: sizes against the
//! buffer and the fields the decoder will read, no per-point work (microseconds, whatever
//! the cloud's size). A cloud that passes decodes without error.

use crate::cloud::{CloudError, DecodeOptions, PointCloud2};

/// Checks that `cloud` decodes with `opts`: exactly the errors [`crate::cloud::decode`]
/// would report, found without reading a point.
pub fn check(cloud: &PointCloud2, opts: &DecodeOptions) -> Result<(), CloudError> {
    cloud.validate()?;
    for axis in [&opts.x, &opts.y, &opts.z] {
        if cloud.readable_field(axis)?.is_none() {
            return Err(CloudError::MissingField {
                field: axis.clone(),
                present: cloud
                    .fields
                    .iter()
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
    }
    // Optional fields: absent is fine, present but unreadable is not (as in decode).
    let optional = opts
        .intensity
        .iter()
        .chain(opts.time.iter().map(|t| &t.name))
        .chain(&opts.ring);
    for name in optional {
        cloud.readable_field(name)?;
    }
    Ok(())
}

/// Limits how often malformed input is logged: a driver that sends only broken clouds
/// would otherwise write ten warnings a second. At most `burst` messages per `window_s`;
/// the next message after a quiet spell says how many were left out. Time is passed in
/// (seconds on a monotonic clock).
#[derive(Debug, Clone)]
pub struct LogThrottle {
    burst: u32,
    window_s: f64,
    window_start: f64,
    in_window: u32,
    suppressed: u64,
}

impl LogThrottle {
    pub fn new(burst: u32, window_s: f64) -> Self {
        Self {
            burst,
            window_s,
            window_start: f64::NEG_INFINITY,
            in_window: 0,
            suppressed: 0,
        }
    }

    /// Whether to log an event at `now`; `Some(n)`: log it, noting `n` left out before.
    pub fn allow(&mut self, now: f64) -> Option<u64> {
        if now - self.window_start >= self.window_s {
            self.window_start = now;
            self.in_window = 0;
        }
        if self.in_window < self.burst {
            self.in_window += 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cloud::{Layout, Points, decode, encode};
    use crate::msgs::Header;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn cloud(layout: Layout, n: usize) -> PointCloud2 {
        let mut p = Points::with_capacity(n);
        for i in 0..n {
            p.push(i as f32, -(i as f32), 0.5, 7.0);
        }
        encode(&p, layout, Header::from_nanos(1, "lidar"))
    }

    #[test]
    fn the_e2e_test_s_malformed_clouds_are_refused() {
        let opts = DecodeOptions::default();
        let good = cloud(Layout::Velodyne, 50);
        assert!(check(&good, &opts).is_ok());
        let mut truncated = good.clone();
        truncated.data.truncate(good.data.len() / 2);
        assert!(matches!(
            check(&truncated, &opts),
            Err(CloudError::DataTooShort { .. })
        ));
        let mut no_x = good.clone();
        no_x.fields.iter_mut().find(|f| f.name == "x").unwrap().name = "q".into();
        let e = check(&no_x, &opts).unwrap_err();
        assert!(e.to_string().contains("'x'"), "{e}");
        let mut absurd = good.clone();
        absurd.point_step = 1_000_000_000;
        assert!(check(&absurd, &opts).is_err());
    }

    /// Independent reference: the full decoder. Random corruptions of real layouts must
    /// be accepted by the check exactly when the decoder accepts them.
    #[test]
    fn agrees_with_the_decoder_on_random_corruptions() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let layouts = Layout::ALL;
        let (mut ok, mut bad) = (0, 0);
        for k in 0..600 {
            let mut c = cloud(layouts[k % layouts.len()], rng.random_range(0..40));
            let nf = c.fields.len();
            match rng.random_range(0..8) {
                0 => {
                    let n = rng.random_range(0..=c.data.len());
                    c.data.truncate(n);
                }
                1 => c.point_step = rng.random_range(0..64),
                2 => c.row_step = rng.random_range(0..2000),
                3 => c.width = rng.random_range(0..80),
                4 if nf > 0 => c.fields[rng.random_range(0..nf)].count = rng.random_range(0..3),
                5 if nf > 0 => c.fields[rng.random_range(0..nf)].datatype = rng.random_range(0..12),
                6 if nf > 0 => c.fields[rng.random_range(0..nf)].offset = rng.random_range(0..40),
                _ if nf > 0 => {
                    c.fields.remove(rng.random_range(0..nf));
                }
                _ => {}
            }
            let opts = DecodeOptions::default();
            let want = decode(&c, &opts).map(|_| ()).map_err(|e| e.to_string());
            let got = check(&c, &opts).map_err(|e| e.to_string());
            assert_eq!(got, want, "case {k}: {c:?}");
            if want.is_ok() { ok += 1 } else { bad += 1 }
        }
        assert!(ok > 50 && bad > 50, "{ok} accepted, {bad} refused");
    }

    #[test]
    fn throttle_lets_bursts_through_and_counts_the_rest() {
        let mut t = LogThrottle::new(3, 10.0);
        // 10 Hz of broken clouds for 25 s: 3 logged per 10 s window.
        let logged: Vec<(usize, u64)> = (0..250)
            .filter_map(|i| t.allow(i as f64 * 0.1).map(|n| (i, n)))
            .collect();
        assert_eq!(
            logged,
            vec![
                (0, 0),
                (1, 0),
                (2, 0),
                (100, 97),
                (101, 0),
                (102, 0),
                (200, 97),
                (201, 0),
                (202, 0)
            ]
        );
    }
}
