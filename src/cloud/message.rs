//! `sensor_msgs/PointCloud2` as a plain struct, and the checks that make its byte
//! buffer safe to read.

use super::error::CloudError;
use super::fields::{PointField, PointFieldType};
use crate::msgs::Header;

/// `sensor_msgs/msg/PointCloud2`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PointCloud2 {
    pub header: Header,
    /// Number of rows (1 for unorganised clouds).
    pub height: u32,
    /// Points per row.
    pub width: u32,
    pub fields: Vec<PointField>,
    pub is_bigendian: bool,
    /// Bytes per point.
    pub point_step: u32,
    /// Bytes per row (may exceed `width * point_step` when rows are padded).
    pub row_step: u32,
    pub data: Vec<u8>,
    /// True when no point is NaN/Inf.
    pub is_dense: bool,
}

/// Sizes of a cloud whose buffer has been checked to hold every point it declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub height: usize,
    pub width: usize,
    pub point_step: usize,
    pub row_step: usize,
}

impl Geometry {
    pub fn points(&self) -> usize {
        // Cannot overflow: validated against the buffer length.
        self.height * self.width
    }
}

impl PointCloud2 {
    /// Number of points the message declares (`height * width`).
    pub fn point_count(&self) -> u64 {
        u64::from(self.height) * u64::from(self.width)
    }

    /// The field named `name` (the first one when names repeat).
    pub fn field(&self, name: &str) -> Option<&PointField> {
        self.fields.iter().find(|f| f.name == name)
    }

    /// Checks that sizes are consistent, the buffer holds every row and every field
    /// lies inside a point with a known datatype. After this, reads at
    /// `row * row_step + col * point_step + field.offset` are in bounds.
    pub fn validate(&self) -> Result<(), CloudError> {
        self.geometry().map(|_| ())
    }

    pub(crate) fn geometry(&self) -> Result<Geometry, CloudError> {
        if self.point_step == 0 {
            return Err(CloudError::ZeroPointStep);
        }
        let min_row = u64::from(self.width) * u64::from(self.point_step);
        if u64::from(self.row_step) < min_row {
            return Err(CloudError::RowStepTooSmall {
                row_step: self.row_step,
                width: self.width,
                point_step: self.point_step,
            });
        }
        let total = u64::from(self.height) * u64::from(self.row_step);
        let expected = usize::try_from(total).map_err(|_| CloudError::SizeOverflow {
            what: "height * row_step",
            a: self.height.into(),
            b: self.row_step.into(),
        })?;
        if self.data.len() < expected {
            return Err(CloudError::DataTooShort {
                len: self.data.len(),
                expected: total,
                height: self.height,
                row_step: self.row_step,
            });
        }
        for f in &self.fields {
            let ty = f.field_type().ok_or_else(|| CloudError::UnknownDatatype {
                field: f.name.clone(),
                datatype: f.datatype,
            })?;
            let end = u64::from(f.offset) + ty.size() as u64 * u64::from(f.count);
            if end > u64::from(self.point_step) {
                return Err(CloudError::FieldPastPointStep {
                    field: f.name.clone(),
                    offset: f.offset,
                    size: ty.size(),
                    count: f.count,
                    point_step: self.point_step,
                });
            }
        }
        // All products below are bounded by data.len(), so they fit in usize.
        Ok(Geometry {
            height: self.height as usize,
            width: self.width as usize,
            point_step: self.point_step as usize,
            row_step: self.row_step as usize,
        })
    }

    /// Looks up a field that will be read and returns its offset and type.
    /// Call after `geometry()` so offset and type are known to be valid.
    pub(crate) fn readable_field(
        &self,
        name: &str,
    ) -> Result<Option<(usize, PointFieldType)>, CloudError> {
        let Some(f) = self.field(name) else {
            return Ok(None);
        };
        if f.count == 0 {
            return Err(CloudError::EmptyField {
                field: f.name.clone(),
            });
        }
        let ty = f.field_type().ok_or_else(|| CloudError::UnknownDatatype {
            field: f.name.clone(),
            datatype: f.datatype,
        })?;
        Ok(Some((f.offset as usize, ty)))
    }
}
