//! `sensor_msgs/PointField`: the datatype enumeration and the field descriptor.

/// The eight `PointField` datatypes, with their wire values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum PointFieldType {
    Int8 = 1,
    Uint8 = 2,
    Int16 = 3,
    Uint16 = 4,
    Int32 = 5,
    Uint32 = 6,
    Float32 = 7,
    Float64 = 8,
}

impl PointFieldType {
    pub const ALL: [PointFieldType; 8] = [
        Self::Int8,
        Self::Uint8,
        Self::Int16,
        Self::Uint16,
        Self::Int32,
        Self::Uint32,
        Self::Float32,
        Self::Float64,
    ];

    /// The type for a wire value, `None` for values outside 1..=8.
    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.get(usize::from(v).wrapping_sub(1)).copied()
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            Self::Int8 | Self::Uint8 => 1,
            Self::Int16 | Self::Uint16 => 2,
            Self::Int32 | Self::Uint32 | Self::Float32 => 4,
            Self::Float64 => 8,
        }
    }
}

/// `sensor_msgs/PointField`. `datatype` stays the raw wire byte so that a message with
/// an unknown datatype can still be represented (and rejected with a clear error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointField {
    pub name: String,
    /// Byte offset from the start of the point.
    pub offset: u32,
    pub datatype: u8,
    /// Number of elements of `datatype` in the field.
    pub count: u32,
}

impl PointField {
    /// A field holding one element of `ty` at `offset`.
    pub fn new(name: impl Into<String>, offset: u32, ty: PointFieldType) -> Self {
        Self {
            name: name.into(),
            offset,
            datatype: ty.as_u8(),
            count: 1,
        }
    }

    /// The datatype, `None` when the wire value is unknown.
    pub fn field_type(&self) -> Option<PointFieldType> {
        PointFieldType::from_u8(self.datatype)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datatype_wire_values_match_the_ros_constants() {
        let expected = [
            (1, 1),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 4),
            (6, 4),
            (7, 4),
            (8, 8),
        ];
        for (ty, (value, size)) in PointFieldType::ALL.iter().zip(expected) {
            assert_eq!(ty.as_u8(), value);
            assert_eq!(ty.size(), size);
            assert_eq!(PointFieldType::from_u8(value), Some(*ty));
        }
        assert_eq!(PointFieldType::from_u8(0), None);
        assert_eq!(PointFieldType::from_u8(9), None);
        assert_eq!(PointFieldType::from_u8(255), None);
    }
}
