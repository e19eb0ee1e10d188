//! PCD reading: the real decoded Velodyne clouds (binary), and ascii / binary_compressed
//! files built here from known values with an independent LZF encoding.

use std::path::PathBuf;

use lidar_ptq::dataset::pcd::{self, PcdDataKind, PcdError};
use lidar_ptq::dataset::{self, LzfError};

/// The shared data folder: `$LIDAR_PTQ_DATA`, or `../shared/data` from the project root
/// (one level further up from a worktree).
fn data() -> PathBuf {
    if let Some(d) = std::env::var_os("LIDAR_PTQ_DATA") {
        return PathBuf::from(d);
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    ["../shared/data", "../../shared/data"]
        .iter()
        .map(|r| root.join(r))
        .find(|p| p.is_dir())
        .expect("shared data folder (set LIDAR_PTQ_DATA)")
}

fn velodyne_pcd(sensor: &str) -> PathBuf {
    let dir = data().join("velodyne").join(sensor);
    std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pcd"))
        .unwrap()
}

/// The header text up to and including the DATA line.
fn header_text(bytes: &[u8]) -> (String, usize) {
    let mut pos = 0;
    loop {
        let end = pos + bytes[pos..].iter().position(|&b| b == b'\n').unwrap();
        let line = std::str::from_utf8(&bytes[pos..end]).unwrap();
        pos = end + 1;
        if line.starts_with("DATA") {
            return (String::from_utf8(bytes[..pos].to_vec()).unwrap(), pos);
        }
    }
}

/// LZF encoding using only literal runs (at most 32 bytes each): valid LZF that needs no
/// match finder, so it is independent of the decoder's back-reference logic.
fn lzf_literals(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for chunk in raw.chunks(32) {
        out.push((chunk.len() - 1) as u8);
        out.extend_from_slice(chunk);
    }
    out
}

fn le_f32(b: &[u8], off: usize) -> f32 {
    f32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn real_binary_clouds() {
    for (sensor, n, intensity) in [
        ("vlp16", 14_831, true),
        ("vlp32", 26_216, false),
        ("vls128", 208_680, false),
    ] {
        let path = velodyne_pcd(sensor);
        let (h, pts) = pcd::read_pcd(&path).unwrap();
        assert_eq!(h.data, PcdDataKind::Binary);
        assert_eq!((h.points, h.width, h.height), (n, n, 1));
        assert_eq!(pts.len(), n);
        assert_eq!(h.viewpoint, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]);
        // Independently: x, y, z are the first three float32 of each record.
        let bytes = std::fs::read(&path).unwrap();
        let (_, off) = header_text(&bytes);
        let stride = h.point_size();
        assert_eq!(bytes.len(), off + n * stride, "{sensor}");
        for i in [0, 1, n / 2, n - 1] {
            let r = off + i * stride;
            assert_eq!(
                pts.xyz(i),
                [
                    le_f32(&bytes, r),
                    le_f32(&bytes, r + 4),
                    le_f32(&bytes, r + 8)
                ]
            );
        }
        let max_range = (0..n)
            .map(|i| pts.x[i].hypot(pts.y[i]))
            .fold(0.0f32, f32::max);
        assert!(
            max_range > 10.0 && max_range < 300.0,
            "{sensor}: {max_range}"
        );
        if intensity {
            // vlp16: x y z intensity(U8) return_type(U8) channel(U16) ...
            let ring = pts.ring.as_ref().unwrap();
            for i in [0, n / 3, n - 1] {
                let r = off + i * stride;
                assert_eq!(pts.intensity[i], bytes[r + 12] as f32);
                assert_eq!(ring[i], u16::from_le_bytes([bytes[r + 14], bytes[r + 15]]));
            }
            assert!(ring.iter().all(|&c| c < 16));
            assert!(pts.intensity.iter().any(|&v| v > 0.0));
        } else {
            assert!(pts.intensity.iter().all(|&v| v == 0.0));
            assert!(pts.ring.is_none());
        }
    }
    // The vls128 cloud reaches 238 m.
    let (_, pts) = pcd::read_pcd(&velodyne_pcd("vls128")).unwrap();
    let r = (0..pts.len())
        .map(|i| pts.x[i].hypot(pts.y[i]))
        .fold(0.0f32, f32::max);
    assert!((230.0..240.0).contains(&r), "{r}");
}

#[test]
fn real_cloud_recompressed_and_as_ascii_reads_the_same() {
    let path = velodyne_pcd("vlp16");
    let bytes = std::fs::read(&path).unwrap();
    let (h, pts) = pcd::read_pcd(&path).unwrap();
    let (text, off) = header_text(&bytes);
    let n = h.points;
    let stride = h.point_size();
    let records = &bytes[off..off + n * stride];

    // binary_compressed: field-major reordering, then LZF literal runs.
    let mut raw = Vec::with_capacity(records.len());
    for f in &h.fields {
        let w = f.ty.size() * f.count;
        for i in 0..n {
            raw.extend_from_slice(&records[i * stride + f.offset..i * stride + f.offset + w]);
        }
    }
    let lzf = lzf_literals(&raw);
    let mut file = text
        .replace("DATA binary", "DATA binary_compressed")
        .into_bytes();
    file.extend_from_slice(&(lzf.len() as u32).to_le_bytes());
    file.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    file.extend_from_slice(&lzf);
    let (hc, pc) = pcd::parse_pcd(&file).unwrap();
    assert_eq!(hc.data, PcdDataKind::BinaryCompressed);
    assert_eq!(pc, pts);

    // ascii: the x, y, z, intensity and channel columns printed by Rust's shortest
    // round-trip formatting, other fields as integers/floats too.
    let mut file = text.replace("DATA binary", "DATA ascii");
    for i in (0..n).take(500) {
        let r = &records[i * stride..];
        let vals: Vec<String> = h
            .fields
            .iter()
            .map(|f| {
                let b = &r[f.offset..];
                match (f.ty.is_float(), f.ty.size()) {
                    (true, 4) => format!("{}", le_f32(b, 0)),
                    (false, 1) => format!("{}", b[0]),
                    (false, 2) => format!("{}", u16::from_le_bytes([b[0], b[1]])),
                    (false, 4) => format!("{}", u32::from_le_bytes(b[..4].try_into().unwrap())),
                    other => panic!("unexpected field type {other:?}"),
                }
            })
            .collect();
        file.push_str(&vals.join(" "));
        file.push('\n');
    }
    let file = file
        .replace(&format!("WIDTH {n}"), "WIDTH 500")
        .replace(&format!("POINTS {n}"), "POINTS 500");
    let (ha, pa) = pcd::parse_pcd(file.as_bytes()).unwrap();
    assert_eq!(ha.data, PcdDataKind::Ascii);
    assert_eq!(pa.len(), 500);
    for i in 0..500 {
        assert_eq!(pa.xyz(i), pts.xyz(i));
        assert_eq!(pa.intensity[i], pts.intensity[i]);
        assert_eq!(pa.ring.as_ref().unwrap()[i], pts.ring.as_ref().unwrap()[i]);
    }
}

const MIXED_HEADER: &str = "# .PCD v0.7 - test
VERSION 0.7
FIELDS rgb x y z reflectance ring normal time
SIZE 4 8 4 4 2 1 4 4
TYPE U F F F I U F F
COUNT 1 1 1 1 1 1 3 1
WIDTH 2
HEIGHT 2
VIEWPOINT 1 2 3 1 0 0 0
POINTS 4
";

/// (x, y, z, reflectance, ring, time) of the 4 test points.
const MIXED: [(f64, f32, f32, i16, u8, f32); 4] = [
    (1.5, -2.25, 0.125, -7, 3, 0.0),
    (-1000.0625, 3.0e-3, -1.0, 300, 255, 0.05),
    (0.0, 0.0, 0.0, 0, 0, 0.1),
    (12.0, 13.5, f32::NAN, 32767, 31, -0.002),
];

#[test]
fn ascii_with_mixed_types_and_counts() {
    let mut file = format!("{MIXED_HEADER}DATA ascii\n");
    for (k, (x, y, z, r, ring, t)) in MIXED.iter().enumerate() {
        let z = if z.is_nan() {
            "nan".to_string()
        } else {
            z.to_string()
        };
        file.push_str(&format!("{k} {x} {y} {z} {r} {ring} 0.1 0.2 0.3 {t}\n\n"));
    }
    let (h, p) = pcd::parse_pcd(file.as_bytes()).unwrap();
    assert_eq!(h.viewpoint, [1.0, 2.0, 3.0, 1.0, 0.0, 0.0, 0.0]);
    assert_eq!((h.width, h.height, h.points), (2, 2, 4));
    check_mixed(&p);
}

fn check_mixed(p: &lidar_ptq::cloud::Points) {
    assert_eq!(p.len(), 4);
    for (i, (x, y, z, r, ring, t)) in MIXED.iter().enumerate() {
        assert_eq!(p.x[i], *x as f32);
        assert_eq!(p.y[i], *y);
        assert!(p.z[i] == *z || (p.z[i].is_nan() && z.is_nan()));
        assert_eq!(p.intensity[i], *r as f32);
        assert_eq!(p.ring.as_ref().unwrap()[i], *ring as u16);
        assert_eq!(p.time.as_ref().unwrap()[i], *t);
    }
}

/// The 4 mixed points in binary (point-major) layout.
fn mixed_records() -> Vec<u8> {
    let mut b = Vec::new();
    for (k, (x, y, z, r, ring, t)) in MIXED.iter().enumerate() {
        b.extend_from_slice(&(k as u32).to_le_bytes());
        b.extend_from_slice(&x.to_le_bytes());
        b.extend_from_slice(&y.to_le_bytes());
        b.extend_from_slice(&z.to_le_bytes());
        b.extend_from_slice(&r.to_le_bytes());
        b.push(*ring);
        for v in [0.1f32, 0.2, 0.3] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&t.to_le_bytes());
    }
    b
}

const MIXED_STRIDE: usize = 4 + 8 + 4 + 4 + 2 + 1 + 12 + 4;

#[test]
fn binary_with_mixed_types_and_counts() {
    let mut file = format!("{MIXED_HEADER}DATA binary\n").into_bytes();
    file.extend_from_slice(&mixed_records());
    let (h, p) = pcd::parse_pcd(&file).unwrap();
    assert_eq!(h.point_size(), MIXED_STRIDE);
    check_mixed(&p);
}

#[test]
fn binary_compressed_with_a_hand_made_back_reference() {
    // Field-major data: all rgb (4 x u32), all x (4 x f64), ...
    let rec = mixed_records();
    let widths = [4, 8, 4, 4, 2, 1, 12, 4];
    let mut raw = Vec::new();
    let mut off = 0;
    for w in widths {
        for i in 0..4 {
            raw.extend_from_slice(&rec[i * MIXED_STRIDE + off..i * MIXED_STRIDE + off + w]);
        }
        off += w;
    }
    // The normals (0.1, 0.2, 0.3) repeat 4 times: 12 literal bytes then one back-reference
    // of 36 bytes at distance 12, encoded by hand: length 36 - 2 = 34 >= 7, so the control
    // byte is 7 << 5 | (distance - 1) >> 8 followed by 34 - 7, then (distance - 1) & 0xff.
    let normals_at = 4 * (4 + 8 + 4 + 4 + 2 + 1);
    assert_eq!(
        raw[normals_at..normals_at + 12],
        raw[normals_at + 12..normals_at + 24]
    );
    let mut lzf = lzf_literals(&raw[..normals_at + 12]);
    lzf.extend_from_slice(&[7 << 5, 34 - 7, 11]);
    lzf.extend_from_slice(&lzf_literals(&raw[normals_at + 48..]));

    let mut file = format!("{MIXED_HEADER}DATA binary_compressed\n").into_bytes();
    file.extend_from_slice(&(lzf.len() as u32).to_le_bytes());
    file.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    file.extend_from_slice(&lzf);
    let (h, p) = pcd::parse_pcd(&file).unwrap();
    assert_eq!(h.data, PcdDataKind::BinaryCompressed);
    check_mixed(&p);
    // The decompressor alone reproduces the raw bytes.
    assert_eq!(dataset::lzf_decompress(&lzf, raw.len()).unwrap(), raw);

    // A back-reference reaching before the start, and a cut-off stream, are typed errors.
    let mut broken = file.clone();
    let body = file.len() - lzf.len();
    broken[body] = 0x20; // a 3-byte reference as the very first run
    assert!(matches!(
        pcd::parse_pcd(&broken),
        Err(PcdError::Lzf {
            source: LzfError::ReferenceBeforeStart { offset: 0, .. },
            ..
        })
    ));
    assert!(matches!(
        pcd::parse_pcd(&file[..file.len() - 5]),
        Err(PcdError::Truncated {
            what: "binary_compressed data",
            ..
        })
    ));
    let mut wrong_size = file.clone();
    let at = body - 4;
    wrong_size[at..at + 4].copy_from_slice(&((raw.len() + 1) as u32).to_le_bytes());
    assert!(matches!(
        pcd::parse_pcd(&wrong_size),
        Err(PcdError::CompressedSizeMismatch { .. })
    ));
}

#[test]
fn malformed_files_give_typed_errors() {
    let binary = {
        let mut f = format!("{MIXED_HEADER}DATA binary\n").into_bytes();
        f.extend_from_slice(&mixed_records());
        f
    };
    // Truncated binary data: one byte short.
    assert!(matches!(
        pcd::parse_pcd(&binary[..binary.len() - 1]),
        Err(PcdError::Truncated { what: "binary data", needed, available, .. })
            if needed == 4 * MIXED_STRIDE && available == needed - 1
    ));
    // A header cut before DATA.
    assert!(matches!(
        pcd::parse_pcd(MIXED_HEADER.as_bytes()),
        Err(PcdError::MissingData)
    ));
    // No x field.
    let no_x = format!("{MIXED_HEADER}DATA binary\n").replace(" x y z", " a y z");
    assert!(matches!(
        pcd::parse_pcd(no_x.as_bytes()),
        Err(PcdError::MissingField("x"))
    ));
    // SIZE with fewer entries than FIELDS.
    let short = format!("{MIXED_HEADER}DATA binary\n").replace("SIZE 4 8", "SIZE 8");
    let err = pcd::parse_pcd(short.as_bytes()).unwrap_err();
    assert!(
        matches!(&err, PcdError::BadHeaderLine { line: 4, key, .. } if key == "SIZE"),
        "{err}"
    );
    // F with size 2 (half floats) is not supported.
    let half = format!("{MIXED_HEADER}DATA binary\n").replace("SIZE 4 8 4 4 2", "SIZE 4 8 4 2 2");
    assert!(matches!(
        pcd::parse_pcd(half.as_bytes()),
        Err(PcdError::UnsupportedType {
            ty: 'F',
            size: 2,
            ..
        })
    ));
    // POINTS disagreeing with WIDTH * HEIGHT.
    let pts = format!("{MIXED_HEADER}DATA binary\n").replace("POINTS 4", "POINTS 5");
    assert!(matches!(
        pcd::parse_pcd(pts.as_bytes()),
        Err(PcdError::BadHeaderLine { .. })
    ));
    // Unknown DATA kind.
    assert!(matches!(
        pcd::parse_pcd(format!("{MIXED_HEADER}DATA zip\n").as_bytes()),
        Err(PcdError::UnknownDataKind(_))
    ));
    // ascii: a bad number names line and field; a short line and a missing line too.
    let ascii = format!("{MIXED_HEADER}DATA ascii\n");
    let ok_line = "1 1.0 2.0 3.0 4 5 0.1 0.2 0.3 0.0\n";
    let bad = format!("{ascii}{ok_line}1 1.0 2.0 3.0 x4 5 0.1 0.2 0.3 0.0\n");
    let err = pcd::parse_pcd(bad.as_bytes()).unwrap_err();
    assert!(
        matches!(&err, PcdError::AsciiBadValue { line: 13, field, .. } if field == "reflectance"),
        "{err}"
    );
    let short_line = format!("{ascii}{ok_line}1 1.0 2.0\n");
    assert!(matches!(
        pcd::parse_pcd(short_line.as_bytes()),
        Err(PcdError::AsciiValueCount {
            line: 13,
            expected: 10,
            got: 3
        })
    ));
    let missing = format!("{ascii}{ok_line}{ok_line}");
    assert!(matches!(
        pcd::parse_pcd(missing.as_bytes()),
        Err(PcdError::AsciiPointCount {
            expected: 4,
            got: 2
        })
    ));
    // File errors name the file.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.pcd");
    std::fs::write(&path, &binary[..binary.len() - 3]).unwrap();
    let err = pcd::read_pcd(&path).unwrap_err().to_string();
    assert!(
        err.contains("cut.pcd") && err.contains("truncated"),
        "{err}"
    );
}
