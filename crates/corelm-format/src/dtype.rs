//! MIL element types and their three numberings: MIL `DataType`, blob-storage `BlobDataType`
//! and Core ML feature `ArrayDataType`.

use std::fmt;

use crate::proto::mil::DataType as ProtoDataType;

/// An element type of a MIL tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    Bool,
    String,
    Fp16,
    Fp32,
    Fp64,
    Bf16,
    Int4,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint1,
    Uint2,
    Uint3,
    Uint4,
    Uint6,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
}

/// Every dtype, in the order they are listed in the MIL schema.
pub const ALL_DTYPES: [DType; 20] = [
    DType::Bool,
    DType::String,
    DType::Fp16,
    DType::Fp32,
    DType::Fp64,
    DType::Bf16,
    DType::Int4,
    DType::Int8,
    DType::Int16,
    DType::Int32,
    DType::Int64,
    DType::Uint1,
    DType::Uint2,
    DType::Uint3,
    DType::Uint4,
    DType::Uint6,
    DType::Uint8,
    DType::Uint16,
    DType::Uint32,
    DType::Uint64,
];

impl DType {
    /// The name MIL text and coremltools use (`fp16`, `int4`, `uint6`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "bool",
            DType::String => "string",
            DType::Fp16 => "fp16",
            DType::Fp32 => "fp32",
            DType::Fp64 => "fp64",
            DType::Bf16 => "bf16",
            DType::Int4 => "int4",
            DType::Int8 => "int8",
            DType::Int16 => "int16",
            DType::Int32 => "int32",
            DType::Int64 => "int64",
            DType::Uint1 => "uint1",
            DType::Uint2 => "uint2",
            DType::Uint3 => "uint3",
            DType::Uint4 => "uint4",
            DType::Uint6 => "uint6",
            DType::Uint8 => "uint8",
            DType::Uint16 => "uint16",
            DType::Uint32 => "uint32",
            DType::Uint64 => "uint64",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.name() == name)
    }

    /// Bits one element occupies in storage; `None` for strings.
    pub fn bit_width(self) -> Option<usize> {
        Some(match self {
            DType::String => return None,
            DType::Bool | DType::Int8 | DType::Uint8 => 8,
            DType::Uint1 => 1,
            DType::Uint2 => 2,
            DType::Uint3 => 3,
            DType::Int4 | DType::Uint4 => 4,
            DType::Uint6 => 6,
            DType::Fp16 | DType::Bf16 | DType::Int16 | DType::Uint16 => 16,
            DType::Fp32 | DType::Int32 | DType::Uint32 => 32,
            DType::Fp64 | DType::Int64 | DType::Uint64 => 64,
        })
    }

    /// Types narrower than a byte, stored as an LSB-first bit stream.
    pub fn is_sub_byte(self) -> bool {
        matches!(self.bit_width(), Some(w) if w < 8)
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::Fp16 | DType::Fp32 | DType::Fp64 | DType::Bf16)
    }

    pub fn is_int(self) -> bool {
        !self.is_float() && !matches!(self, DType::Bool | DType::String)
    }

    pub fn is_signed_int(self) -> bool {
        matches!(self, DType::Int4 | DType::Int8 | DType::Int16 | DType::Int32 | DType::Int64)
    }

    /// The inclusive integer range of an integer type (up to 32 bits).
    pub fn int_range(self) -> Option<(i64, i64)> {
        if !self.is_int() {
            return None;
        }
        let bits = self.bit_width()? as u32;
        if bits > 32 {
            return None;
        }
        Some(if self.is_signed_int() {
            (-(1i64 << (bits - 1)), (1i64 << (bits - 1)) - 1)
        } else {
            (0, (1i64 << bits) - 1)
        })
    }

    pub fn to_proto(self) -> ProtoDataType {
        match self {
            DType::Bool => ProtoDataType::Bool,
            DType::String => ProtoDataType::String,
            DType::Fp16 => ProtoDataType::Float16,
            DType::Fp32 => ProtoDataType::Float32,
            DType::Fp64 => ProtoDataType::Float64,
            DType::Bf16 => ProtoDataType::Bfloat16,
            DType::Int4 => ProtoDataType::Int4,
            DType::Int8 => ProtoDataType::Int8,
            DType::Int16 => ProtoDataType::Int16,
            DType::Int32 => ProtoDataType::Int32,
            DType::Int64 => ProtoDataType::Int64,
            DType::Uint1 => ProtoDataType::Uint1,
            DType::Uint2 => ProtoDataType::Uint2,
            DType::Uint3 => ProtoDataType::Uint3,
            DType::Uint4 => ProtoDataType::Uint4,
            DType::Uint6 => ProtoDataType::Uint6,
            DType::Uint8 => ProtoDataType::Uint8,
            DType::Uint16 => ProtoDataType::Uint16,
            DType::Uint32 => ProtoDataType::Uint32,
            DType::Uint64 => ProtoDataType::Uint64,
        }
    }

    /// `None` for `UNUSED_TYPE`, fp8 types (not supported here) and unknown numbers.
    pub fn from_proto(value: i32) -> Option<DType> {
        let proto = ProtoDataType::try_from(value).ok()?;
        ALL_DTYPES.into_iter().find(|d| d.to_proto() == proto)
    }

    /// The blob-storage code of this type (not the MIL `DataType` number).
    pub fn blob_code(self) -> Option<u32> {
        Some(match self {
            DType::Fp16 => 1,
            DType::Fp32 => 2,
            DType::Uint8 => 3,
            DType::Int8 => 4,
            DType::Bf16 => 5,
            DType::Int16 => 6,
            DType::Uint16 => 7,
            DType::Int4 => 8,
            DType::Uint1 => 9,
            DType::Uint2 => 10,
            DType::Uint4 => 11,
            DType::Uint3 => 12,
            DType::Uint6 => 13,
            DType::Int32 => 14,
            DType::Uint32 => 15,
            _ => return None,
        })
    }

    pub fn from_blob_code(code: u32) -> Option<DType> {
        ALL_DTYPES.into_iter().find(|d| d.blob_code() == Some(code))
    }

    /// Core ML feature (`ArrayFeatureType.ArrayDataType`) code for model inputs/outputs/states.
    pub fn array_feature_code(self) -> Option<i32> {
        use crate::proto::array_feature_type::ArrayDataType as A;
        Some(match self {
            DType::Fp32 => A::Float32,
            DType::Fp64 => A::Double,
            DType::Int32 => A::Int32,
            DType::Int8 => A::Int8,
            DType::Fp16 => A::Float16,
            _ => return None,
        } as i32)
    }

    pub fn from_array_feature_code(code: i32) -> Option<DType> {
        [DType::Fp32, DType::Fp64, DType::Int32, DType::Int8, DType::Fp16]
            .into_iter()
            .find(|d| d.array_feature_code() == Some(code))
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numberings_round_trip() {
        for d in ALL_DTYPES {
            assert_eq!(DType::from_proto(d.to_proto() as i32), Some(d));
            assert_eq!(DType::from_name(d.name()), Some(d));
            if let Some(code) = d.blob_code() {
                assert_eq!(DType::from_blob_code(code), Some(d));
            }
        }
        // Spot values from the format spec (§3, §4.1, §2.2).
        assert_eq!(DType::Int4.to_proto() as i32, 25);
        assert_eq!(DType::Uint3.to_proto() as i32, 39);
        assert_eq!(DType::Uint6.blob_code(), Some(13));
        assert_eq!(DType::Fp16.array_feature_code(), Some(65552));
        assert_eq!(DType::Int4.int_range(), Some((-8, 7)));
        assert_eq!(DType::Uint6.int_range(), Some((0, 63)));
    }
}
