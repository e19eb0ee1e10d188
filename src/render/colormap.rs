//! A perceptual rainbow for point colours.

/// Anchor colours of Google's Turbo map at t = 0, 1/8, ..., 1 (rounded to u8); between
/// anchors the colour is interpolated linearly, which is close enough for a plot.
const TURBO: [[u8; 3]; 9] = [
    [48, 18, 59],
    [65, 69, 171],
    [70, 117, 237],
    [41, 170, 238],
    [26, 228, 182],
    [114, 254, 94],
    [200, 239, 52],
    [254, 185, 44],
    [236, 90, 20],
];

/// The colour for `t` in [0, 1] (clamped; NaN maps to 0).
pub fn turbo(t: f32) -> [u8; 3] {
    let t = if t.is_nan() { 0.0 } else { t.clamp(0.0, 1.0) };
    let s = t * (TURBO.len() - 1) as f32;
    let k = (s.floor() as usize).min(TURBO.len() - 2);
    let f = s - k as f32;
    let (a, b) = (TURBO[k], TURBO[k + 1]);
    std::array::from_fn(|c| (a[c] as f32 + (b[c] as f32 - a[c] as f32) * f).round() as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ends_and_clamping() {
        assert_eq!(turbo(0.0), TURBO[0]);
        assert_eq!(turbo(1.0), TURBO[8]);
        assert_eq!(turbo(-3.0), TURBO[0]);
        assert_eq!(turbo(f32::NAN), TURBO[0]);
        assert_eq!(turbo(0.5), TURBO[4]);
        // Halfway between anchors 0 and 1.
        assert_eq!(turbo(1.0 / 16.0), [57, 44, 115]);
    }
}
