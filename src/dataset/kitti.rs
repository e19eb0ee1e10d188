//! KITTI object-detection files: velodyne scans (`.bin`), labels (`label_2/*.txt`) and
//! calibration (`calib/*.txt`), with labels turned into lidar-frame boxes.
//!
//! Labels live in the rectified camera frame (x right, y down, z forward), located at the
//! bottom centre of the box, with `ry` the rotation about the camera y axis (ry = 0 faces
//! camera +x). They are brought into the lidar frame with the inverse of
//! `R0_rect * Tr_velo_to_cam` from the frame's own calibration: the centre point is
//! moved to the gravity centre (half the height up, i.e. -y in the camera) and mapped,
//! and the heading direction `(cos ry, 0, -sin ry)` is mapped by the rotation part, its
//! azimuth in the lidar xy plane giving the yaw. With KITTI's nominal calibration this
//! reduces to the familiar `yaw = -ry - pi/2`.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::boxes::{Box3d, Object};
use crate::cloud::Points;

/// What was wrong with a KITTI file.
#[derive(Debug, Error)]
pub enum KittiError {
    #[error("cannot read KITTI file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("KITTI scan {path} has {len} bytes, not a multiple of 16 (4 float32 per point)")]
    ScanSize { path: PathBuf, len: usize },
    #[error("KITTI calib {path} line {line}: {reason}")]
    Calib {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("KITTI calib {path} has no {key} matrix")]
    CalibMissing { path: PathBuf, key: &'static str },
    #[error("KITTI calib {path}: R0_rect * Tr_velo_to_cam is not invertible")]
    CalibSingular { path: PathBuf },
    #[error("KITTI label {path} line {line}: {reason}")]
    Label {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Reads a velodyne `.bin` scan: float32 x, y, z, reflectance (0..1, kept as is).
pub fn read_velodyne(path: &Path) -> Result<Points, KittiError> {
    let bytes = std::fs::read(path).map_err(|source| KittiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if bytes.len() % 16 != 0 {
        return Err(KittiError::ScanSize {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let n = bytes.len() / 16;
    let mut p = Points::with_capacity(n);
    for rec in bytes.chunks_exact(16) {
        let f = |k: usize| f32::from_le_bytes(rec[4 * k..4 * k + 4].try_into().expect("4 bytes"));
        p.push(f(0), f(1), f(2), f(3));
    }
    Ok(p)
}

/// A frame's calibration, row-major, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct Calib {
    /// Camera projection matrices P0..P3 (3 x 4).
    pub p: [[f64; 12]; 4],
    /// Rectifying rotation (3 x 3).
    pub r0_rect: [f64; 9],
    /// Velodyne to (unrectified) camera 0 (3 x 4).
    pub tr_velo_to_cam: [f64; 12],
    /// IMU to velodyne (3 x 4), when present.
    pub tr_imu_to_velo: Option<[f64; 12]>,
}

/// A 4 x 4 homogeneous transform, row-major.
type Mat4 = [[f64; 4]; 4];

fn mat4_from_3x4(m: &[f64; 12]) -> Mat4 {
    [
        [m[0], m[1], m[2], m[3]],
        [m[4], m[5], m[6], m[7]],
        [m[8], m[9], m[10], m[11]],
        [0.0, 0.0, 0.0, 1.0],
    ]
}

fn mat4_mul(a: &Mat4, b: &Mat4) -> Mat4 {
    let mut c = [[0.0; 4]; 4];
    for (i, row) in c.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[i][k] * b[k][j]).sum();
        }
    }
    c
}

/// Inverse by Gauss-Jordan elimination with partial pivoting (None when singular).
fn mat4_inv(m: &Mat4) -> Option<Mat4> {
    let mut a = *m;
    let mut inv = [[0.0; 4]; 4];
    for (i, row) in inv.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for col in 0..4 {
        let piv = (col..4).max_by(|&r, &s| a[r][col].abs().total_cmp(&a[s][col].abs()))?;
        if a[piv][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, piv);
        inv.swap(col, piv);
        let d = a[col][col];
        for k in 0..4 {
            a[col][k] /= d;
            inv[col][k] /= d;
        }
        for r in 0..4 {
            if r != col {
                let f = a[r][col];
                for k in 0..4 {
                    a[r][k] -= f * a[col][k];
                    inv[r][k] -= f * inv[col][k];
                }
            }
        }
    }
    Some(inv)
}

fn apply(m: &Mat4, p: [f64; 3]) -> [f64; 3] {
    let r = |i: usize| m[i][0] * p[0] + m[i][1] * p[1] + m[i][2] * p[2] + m[i][3];
    [r(0), r(1), r(2)]
}

fn apply_rot(m: &Mat4, d: [f64; 3]) -> [f64; 3] {
    let r = |i: usize| m[i][0] * d[0] + m[i][1] * d[1] + m[i][2] * d[2];
    [r(0), r(1), r(2)]
}

impl Calib {
    /// Reads a calib file. Accepts the object set's keys and the raw set's aliases
    /// (`R_rect`, `Tr_velo_cam`, `Tr_imu_velo`).
    pub fn read(path: &Path) -> Result<Self, KittiError> {
        let text = std::fs::read_to_string(path).map_err(|source| KittiError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses calib text; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, KittiError> {
        let mut p: [Option<[f64; 12]>; 4] = [None; 4];
        let mut r0 = None;
        let mut velo = None;
        let mut imu = None;
        for (k, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let err = |reason: String| KittiError::Calib {
                path: path.to_path_buf(),
                line: k + 1,
                reason,
            };
            let (key, rest) = line
                .split_once(':')
                .ok_or_else(|| err("no `key:` prefix".into()))?;
            let vals: Vec<f64> = rest
                .split_whitespace()
                .map(|t| t.parse().map_err(|_| err(format!("{t:?} is not a number"))))
                .collect::<Result<_, _>>()?;
            let want = |n: usize| {
                if vals.len() == n {
                    Ok(())
                } else {
                    Err(err(format!("{key} has {} values, need {n}", vals.len())))
                }
            };
            let m12 = |v: &[f64]| -> [f64; 12] { v.try_into().expect("checked length") };
            match key.trim() {
                "P0" | "P1" | "P2" | "P3" => {
                    want(12)?;
                    let i = (key.as_bytes()[1] - b'0') as usize;
                    p[i] = Some(m12(&vals));
                }
                "R0_rect" | "R_rect" => {
                    want(9)?;
                    r0 = Some(<[f64; 9]>::try_from(vals.as_slice()).expect("checked length"));
                }
                "Tr_velo_to_cam" | "Tr_velo_cam" => {
                    want(12)?;
                    velo = Some(m12(&vals));
                }
                "Tr_imu_to_velo" | "Tr_imu_velo" => {
                    want(12)?;
                    imu = Some(m12(&vals));
                }
                // Other keys (e.g. Tr_cam_to_road) are not needed.
                _ => {}
            }
        }
        let missing = |key: &'static str| KittiError::CalibMissing {
            path: path.to_path_buf(),
            key,
        };
        Ok(Self {
            p: [
                p[0].ok_or_else(|| missing("P0"))?,
                p[1].ok_or_else(|| missing("P1"))?,
                p[2].ok_or_else(|| missing("P2"))?,
                p[3].ok_or_else(|| missing("P3"))?,
            ],
            r0_rect: r0.ok_or_else(|| missing("R0_rect"))?,
            tr_velo_to_cam: velo.ok_or_else(|| missing("Tr_velo_to_cam"))?,
            tr_imu_to_velo: imu,
        })
    }

    /// Lidar frame -> rectified camera frame (`R0_rect * Tr_velo_to_cam`).
    pub fn velo_to_rect(&self) -> [[f64; 4]; 4] {
        let r = &self.r0_rect;
        let r0: Mat4 = [
            [r[0], r[1], r[2], 0.0],
            [r[3], r[4], r[5], 0.0],
            [r[6], r[7], r[8], 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        mat4_mul(&r0, &mat4_from_3x4(&self.tr_velo_to_cam))
    }

    /// Rectified camera frame -> lidar frame; None when the calibration is singular.
    pub fn rect_to_velo(&self) -> Option<[[f64; 4]; 4]> {
        mat4_inv(&self.velo_to_rect())
    }
}

/// One label line, as KITTI writes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    /// Raw KITTI type (`Car`, `Van`, `Truck`, `Pedestrian`, `Person_sitting`, `Cyclist`,
    /// `Tram`, `Misc`, `DontCare`).
    pub kind: String,
    pub truncated: f64,
    /// 0 fully visible, 1 partly, 2 largely occluded, 3 unknown.
    pub occluded: i32,
    pub alpha: f64,
    /// 2D box in image 2: left, top, right, bottom (pixels).
    pub bbox: [f64; 4],
    /// Height, width, length (m).
    pub hwl: [f64; 3],
    /// Bottom centre in the rectified camera frame (m).
    pub location: [f64; 3],
    pub rotation_y: f64,
    /// Detection score (only in result files).
    pub score: Option<f64>,
}

impl Label {
    /// The class in our vocabulary, or None for `DontCare`.
    pub fn class(&self) -> Option<String> {
        class_name(&self.kind)
    }

    /// The box in the lidar frame (gravity centre, (l, w, h), yaw CCW from +x), given
    /// the rectified-camera -> lidar transform.
    pub fn to_lidar_box(&self, rect_to_velo: &[[f64; 4]; 4]) -> Box3d {
        let [h, w, l] = self.hwl;
        let [x, y, z] = self.location;
        // Camera y points down: the gravity centre is half the height above the bottom.
        let c = apply(rect_to_velo, [x, y - h / 2.0, z]);
        let ry = self.rotation_y;
        let d = apply_rot(rect_to_velo, [ry.cos(), 0.0, -ry.sin()]);
        Box3d {
            center: [c[0] as f32, c[1] as f32, c[2] as f32],
            size: [l as f32, w as f32, h as f32],
            yaw: d[1].atan2(d[0]) as f32,
        }
    }
}

/// Maps a KITTI type to our lowercase vocabulary; None for `DontCare`.
pub fn class_name(kind: &str) -> Option<String> {
    Some(
        match kind {
            "DontCare" => return None,
            "Car" => "car",
            "Van" => "van",
            "Truck" => "truck",
            "Pedestrian" => "pedestrian",
            "Person_sitting" => "person_sitting",
            "Cyclist" => "cyclist",
            "Tram" => "tram",
            "Misc" => "misc",
            other => return Some(other.to_ascii_lowercase()),
        }
        .to_string(),
    )
}

/// Parses label text (15 values per line, 16 with a score); `path` names the source in errors.
pub fn parse_labels(text: &str, path: &Path) -> Result<Vec<Label>, KittiError> {
    let mut out = Vec::new();
    for (k, line) in text.lines().enumerate() {
        let toks: Vec<&str> = line.split_whitespace().collect();
        if toks.is_empty() {
            continue;
        }
        let err = |reason: String| KittiError::Label {
            path: path.to_path_buf(),
            line: k + 1,
            reason,
        };
        if toks.len() != 15 && toks.len() != 16 {
            return Err(err(format!(
                "{} values, need 15 (or 16 with a score)",
                toks.len()
            )));
        }
        const NAMES: [&str; 16] = [
            "type",
            "truncated",
            "occluded",
            "alpha",
            "left",
            "top",
            "right",
            "bottom",
            "h",
            "w",
            "l",
            "x",
            "y",
            "z",
            "rotation_y",
            "score",
        ];
        let mut v = [0.0f64; 16];
        for c in 1..toks.len() {
            v[c] = toks[c]
                .parse()
                .map_err(|_| err(format!("{} = {:?} is not a number", NAMES[c], toks[c])))?;
        }
        out.push(Label {
            kind: toks[0].to_string(),
            truncated: v[1],
            occluded: v[2] as i32,
            alpha: v[3],
            bbox: [v[4], v[5], v[6], v[7]],
            hwl: [v[8], v[9], v[10]],
            location: [v[11], v[12], v[13]],
            rotation_y: v[14],
            score: (toks.len() == 16).then_some(v[15]),
        });
    }
    Ok(out)
}

/// Reads a label file.
pub fn read_labels(path: &Path) -> Result<Vec<Label>, KittiError> {
    let text = std::fs::read_to_string(path).map_err(|source| KittiError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_labels(&text, path)
}

/// Turns labels into lidar-frame objects (`DontCare` skipped).
pub fn labels_to_objects(labels: &[Label], calib: &Calib) -> Option<Vec<Object>> {
    let t = calib.rect_to_velo()?;
    Some(
        labels
            .iter()
            .filter_map(|l| {
                Some(Object {
                    bbox: l.to_lidar_box(&t),
                    class: l.class()?,
                    velocity: None,
                    num_points: None,
                })
            })
            .collect(),
    )
}

/// Reads a label file and its calibration into lidar-frame objects.
pub fn read_objects(label_path: &Path, calib_path: &Path) -> Result<Vec<Object>, KittiError> {
    let labels = read_labels(label_path)?;
    let calib = Calib::read(calib_path)?;
    labels_to_objects(&labels, &calib).ok_or_else(|| KittiError::CalibSingular {
        path: calib_path.to_path_buf(),
    })
}

/// The label and calib files KITTI's layout puts beside a velodyne scan
/// (`<root>/velodyne/<id>.bin` -> `<root>/label_2/<id>.txt`, `<root>/calib/<id>.txt`),
/// each only when it exists.
pub fn sibling_files(scan: &Path) -> (Option<PathBuf>, Option<PathBuf>) {
    let (Some(stem), Some(dir)) = (scan.file_stem(), scan.parent()) else {
        return (None, None);
    };
    let root = dir.parent().unwrap_or(Path::new(".")).to_path_buf();
    let find = |sub: &str| {
        let p = root.join(sub).join(stem).with_extension("txt");
        p.is_file().then_some(p)
    };
    (find("label_2"), find("calib"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_is_an_inverse() {
        let m: Mat4 = [
            [0.0, -1.0, 0.0, 0.5],
            [0.0, 0.0, -1.0, -0.1],
            [1.0, 0.0, 0.0, -0.3],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let i = mat4_inv(&m).unwrap();
        let p = mat4_mul(&m, &i);
        for (r, row) in p.iter().enumerate() {
            for (c, v) in row.iter().enumerate() {
                assert!((v - if r == c { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        assert!(mat4_inv(&[[0.0; 4]; 4]).is_none());
    }

    #[test]
    fn nominal_calibration_gives_minus_ry_minus_half_pi() {
        // Ideal axes: camera x = -lidar y, y = -lidar z, z = lidar x.
        let calib = Calib {
            p: [[0.0; 12]; 4],
            r0_rect: [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
            tr_velo_to_cam: [0.0, -1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
            tr_imu_to_velo: None,
        };
        let t = calib.rect_to_velo().unwrap();
        for ry in [-3.0, -1.56, 0.0, 0.4, 1.57, 3.1] {
            let label = Label {
                kind: "Car".into(),
                truncated: 0.0,
                occluded: 0,
                alpha: 0.0,
                bbox: [0.0; 4],
                hwl: [1.5, 1.6, 4.0],
                location: [2.0, 1.7, 20.0],
                rotation_y: ry,
                score: None,
            };
            let b = label.to_lidar_box(&t);
            let want = -ry - std::f64::consts::FRAC_PI_2;
            let diff = (b.yaw as f64 - want).rem_euclid(std::f64::consts::TAU);
            assert!(diff.min(std::f64::consts::TAU - diff) < 1e-6, "ry {ry}");
            // Bottom at camera y = 1.7 (1.7 m below the lidar) -> centre 0.95 m below.
            assert!((b.center[0] - 20.0).abs() < 1e-5);
            assert!((b.center[1] + 2.0).abs() < 1e-5);
            assert!((b.center[2] + 0.95).abs() < 1e-5);
            assert_eq!(b.size, [4.0, 1.6, 1.5]);
        }
    }
}
