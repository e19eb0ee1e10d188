//! Bird's-eye-view PNGs of one scan: points coloured by height or intensity on a dark
//! background, a metric grid and range rings, ground-truth boxes and detections.
//!
//! Image axes: +x (forward) points up, +y (left) points left, so the picture looks like
//! a map seen from above with the vehicle driving up the page.

mod colormap;
mod view;

use std::path::{Path, PathBuf};

use thiserror::Error;
use tiny_skia::{
    Color, LineCap, Paint, PathBuilder, Pixmap, PremultipliedColorU8, Stroke, Transform,
};

pub use colormap::turbo;
pub use view::BevView;

use crate::boxes::Object;
use crate::cloud::Points;

/// What went wrong rendering or writing an image.
#[derive(Debug, Error)]
pub enum RenderError {
    #[error("render option {option}: {reason}")]
    BadOption {
        option: &'static str,
        reason: String,
    },
    #[error("PNG encoding failed: {0}")]
    Encode(String),
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the point colour shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColorBy {
    /// z over `BevOptions::height_range`.
    Height,
    /// Intensity over 0..(99th percentile of the scan), so 0..1 and 0..255 scales both work.
    Intensity,
}

/// Rendering settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BevOptions {
    /// Half the side of the square area shown, in metres.
    pub extent: f32,
    /// Metres per pixel.
    pub resolution: f32,
    /// Lidar-frame (x, y) at the image centre.
    pub center: [f32; 2],
    pub color_by: ColorBy,
    /// z mapped to the ends of the colour map (Height).
    pub height_range: [f32; 2],
    /// Grid line spacing in metres (0: no grid).
    pub grid_step: f32,
    /// Range ring spacing in metres around the sensor (0: no rings).
    pub ring_step: f32,
    /// Side of each point's square in pixels.
    pub point_px: u32,
    /// Box outline width in pixels.
    pub box_px: f32,
}

impl Default for BevOptions {
    fn default() -> Self {
        Self {
            extent: 50.0,
            resolution: 0.1,
            center: [0.0, 0.0],
            color_by: ColorBy::Height,
            height_range: [-2.5, 1.5],
            grid_step: 10.0,
            ring_step: 10.0,
            point_px: 1,
            box_px: 2.0,
        }
    }
}

/// Colours used, as (r, g, b).
pub const BACKGROUND: [u8; 3] = [12, 12, 18];
pub const GRID: [u8; 3] = [40, 40, 52];
pub const RING: [u8; 3] = [62, 62, 80];
pub const GROUND_TRUTH: [u8; 3] = [40, 255, 90];
pub const DETECTION: [u8; 3] = [255, 60, 200];
pub const EGO: [u8; 3] = [255, 255, 255];

fn color([r, g, b]: [u8; 3]) -> Color {
    Color::from_rgba8(r, g, b, 255)
}

fn paint(rgb: [u8; 3]) -> Paint<'static> {
    let mut p = Paint::default();
    p.set_color(color(rgb));
    // Crisp lines: box and grid colours stay exact, so tests and readers can find them.
    p.anti_alias = false;
    p
}

/// Renders one scan with its ground truth and detections.
pub fn render_bev(
    points: &Points,
    ground_truth: &[Object],
    detections: &[Object],
    opts: &BevOptions,
) -> Result<Pixmap, RenderError> {
    let view = BevView::new(opts)?;
    let mut pm = Pixmap::new(view.size, view.size).ok_or_else(|| RenderError::BadOption {
        option: "extent",
        reason: "empty image".into(),
    })?;
    pm.fill(color(BACKGROUND));
    draw_grid(&mut pm, &view, opts);
    draw_points(&mut pm, &view, points, opts);
    draw_ego(&mut pm, &view);
    for o in ground_truth {
        draw_box(&mut pm, &view, o, GROUND_TRUTH, opts.box_px);
    }
    for o in detections {
        draw_box(&mut pm, &view, o, DETECTION, opts.box_px);
    }
    Ok(pm)
}

fn draw_grid(pm: &mut Pixmap, view: &BevView, opts: &BevOptions) {
    let stroke = Stroke {
        width: 1.0,
        ..Stroke::default()
    };
    if opts.grid_step > 0.0 {
        let mut pb = PathBuilder::new();
        let (lo_x, hi_x) = (view.center[0] - view.extent, view.center[0] + view.extent);
        let (lo_y, hi_y) = (view.center[1] - view.extent, view.center[1] + view.extent);
        let step = opts.grid_step;
        // Lines at multiples of the step, so the grid is tied to the sensor origin.
        let mut x = (lo_x / step).ceil() * step;
        while x <= hi_x {
            let (u0, v0) = view.to_pixel(x, lo_y);
            let (u1, v1) = view.to_pixel(x, hi_y);
            pb.move_to(u0, v0);
            pb.line_to(u1, v1);
            x += step;
        }
        let mut y = (lo_y / step).ceil() * step;
        while y <= hi_y {
            let (u0, v0) = view.to_pixel(lo_x, y);
            let (u1, v1) = view.to_pixel(hi_x, y);
            pb.move_to(u0, v0);
            pb.line_to(u1, v1);
            y += step;
        }
        if let Some(path) = pb.finish() {
            pm.stroke_path(&path, &paint(GRID), &stroke, Transform::identity(), None);
        }
    }
    if opts.ring_step > 0.0 {
        let mut pb = PathBuilder::new();
        let (cu, cv) = view.to_pixel(0.0, 0.0);
        // Rings out to the farthest image corner.
        let reach = view.center[0].abs().max(view.center[1].abs()) + view.extent * 1.5;
        let mut r = opts.ring_step;
        while r <= reach {
            pb.push_circle(cu, cv, r / view.resolution);
            r += opts.ring_step;
        }
        if let Some(path) = pb.finish() {
            pm.stroke_path(&path, &paint(RING), &stroke, Transform::identity(), None);
        }
    }
}

fn draw_points(pm: &mut Pixmap, view: &BevView, points: &Points, opts: &BevOptions) {
    let (lo, hi) = match opts.color_by {
        ColorBy::Height => (opts.height_range[0], opts.height_range[1]),
        ColorBy::Intensity => (0.0, intensity_scale(&points.intensity)),
    };
    let span = (hi - lo).max(f32::EPSILON);
    let size = view.size as i64;
    let half = (opts.point_px.max(1) as i64 - 1) / 2;
    let w = opts.point_px.max(1) as i64;
    let pixels = pm.pixels_mut();
    for i in 0..points.len() {
        let [x, y, z] = points.xyz(i);
        if !(x.is_finite() && y.is_finite() && z.is_finite()) {
            continue;
        }
        let value = match opts.color_by {
            ColorBy::Height => z,
            ColorBy::Intensity => points.intensity[i],
        };
        let [r, g, b] = turbo(((value - lo) / span).clamp(0.0, 1.0));
        let c = PremultipliedColorU8::from_rgba(r, g, b, 255).expect("opaque colour");
        let (u, v) = view.to_pixel(x, y);
        let (u, v) = (u.floor() as i64 - half, v.floor() as i64 - half);
        for dv in 0..w {
            for du in 0..w {
                let (pu, pv) = (u + du, v + dv);
                if (0..size).contains(&pu) && (0..size).contains(&pv) {
                    pixels[(pv * size + pu) as usize] = c;
                }
            }
        }
    }
}

/// The 99th percentile of finite, positive intensities (1 when there are none).
fn intensity_scale(values: &[f32]) -> f32 {
    let mut v: Vec<f32> = values
        .iter()
        .copied()
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    if v.is_empty() {
        return 1.0;
    }
    let k = ((v.len() - 1) as f32 * 0.99) as usize;
    let (_, p, _) = v.select_nth_unstable_by(k, f32::total_cmp);
    *p
}

fn draw_ego(pm: &mut Pixmap, view: &BevView) {
    // A small triangle at the sensor, pointing forward (+x).
    let mut pb = PathBuilder::new();
    let s = 1.0f32.max(0.3 / view.resolution) * 4.0;
    let (u, v) = view.to_pixel(0.0, 0.0);
    pb.move_to(u, v - s);
    pb.line_to(u - s * 0.6, v + s * 0.6);
    pb.line_to(u + s * 0.6, v + s * 0.6);
    pb.close();
    if let Some(path) = pb.finish() {
        pm.fill_path(
            &path,
            &paint(EGO),
            tiny_skia::FillRule::Winding,
            Transform::identity(),
            None,
        );
    }
}

fn draw_box(pm: &mut Pixmap, view: &BevView, o: &Object, rgb: [u8; 3], width: f32) {
    let b = &o.bbox;
    let corners = b.bev_corners();
    let mut pb = PathBuilder::new();
    for (k, [x, y]) in corners.iter().enumerate() {
        let (u, v) = view.to_pixel(*x, *y);
        if k == 0 {
            pb.move_to(u, v);
        } else {
            pb.line_to(u, v);
        }
    }
    pb.close();
    // Heading mark: centre to the middle of the front edge (corners 0 and 3 are in front).
    let (cu, cv) = view.to_pixel(b.center[0], b.center[1]);
    let front = [
        (corners[0][0] + corners[3][0]) * 0.5,
        (corners[0][1] + corners[3][1]) * 0.5,
    ];
    let (fu, fv) = view.to_pixel(front[0], front[1]);
    pb.move_to(cu, cv);
    pb.line_to(fu, fv);
    if let Some(path) = pb.finish() {
        let stroke = Stroke {
            width,
            line_cap: LineCap::Square,
            ..Stroke::default()
        };
        pm.stroke_path(&path, &paint(rgb), &stroke, Transform::identity(), None);
    }
}

/// Encodes the image as PNG and writes it atomically (a temp file in the same folder,
/// then a rename), so readers never see a half-written file.
pub fn save_png(pm: &Pixmap, path: &Path) -> Result<(), RenderError> {
    let bytes = pm
        .encode_png()
        .map_err(|e| RenderError::Encode(e.to_string()))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temp file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RenderError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| RenderError::Io {
        path: path.to_path_buf(),
        source,
    })
}
