//! The DLPack structs a kernel receives, laid out exactly as in `dlpack.h`
//! (DLPack v0.8 / v1.x: these three structs did not change), and the mapping
//! from [`DType`] to [`DLDataType`].
//!
//! Only what the kernel ABI needs is here: CPU tensors, compact row-major
//! layout (`strides` null), no byte offset.

use std::ffi::c_void;
use std::mem::{offset_of, size_of};
use std::ptr;

use super::args::DType;

/// `kDLCPU`: the only device type a kernel is handed.
pub(crate) const DL_CPU: i32 = 1;

/// `DLDataTypeCode::kDLInt`.
pub(crate) const DL_INT: u8 = 0;
/// `DLDataTypeCode::kDLUInt`.
pub(crate) const DL_UINT: u8 = 1;
/// `DLDataTypeCode::kDLFloat`.
pub(crate) const DL_FLOAT: u8 = 2;

/// `DLDevice`: where a tensor lives. `device_type` is the C enum
/// `DLDeviceType`, which is `int`-sized.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DLDevice {
    /// `DLDeviceType` (`kDLCPU` = 1).
    pub(crate) device_type: i32,
    /// Index of the device of that type.
    pub(crate) device_id: i32,
}

/// `DLDataType`: element type code, bits per lane, lanes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DLDataType {
    /// `DLDataTypeCode`: 0 int, 1 uint, 2 float.
    pub(crate) code: u8,
    /// Bits of one lane.
    pub(crate) bits: u8,
    /// Lanes (1 for scalars elements).
    pub(crate) lanes: u16,
}

/// `DLTensor`: a borrowed view of one tensor, as passed to a kernel.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub(crate) struct DLTensor {
    /// The data, 64-byte aligned here.
    pub(crate) data: *mut c_void,
    /// Where the data lives.
    pub(crate) device: DLDevice,
    /// Number of dimensions.
    pub(crate) ndim: i32,
    /// Element type.
    pub(crate) dtype: DLDataType,
    /// `ndim` dimensions.
    pub(crate) shape: *mut i64,
    /// `ndim` strides in elements, or null for a compact row-major tensor.
    pub(crate) strides: *mut i64,
    /// Offset of the first element from `data`, in bytes.
    pub(crate) byte_offset: u64,
}

impl DLTensor {
    /// A compact CPU tensor over `data` with `ndim` dimensions at `shape`.
    pub(crate) fn cpu(data: *mut c_void, dtype: DLDataType, shape: &mut [i64]) -> Self {
        DLTensor {
            data,
            device: DLDevice { device_type: DL_CPU, device_id: 0 },
            // Callers check that the rank fits; saturate rather than wrap.
            ndim: i32::try_from(shape.len()).unwrap_or(i32::MAX),
            dtype,
            shape: shape.as_mut_ptr(),
            strides: ptr::null_mut(),
            byte_offset: 0,
        }
    }
}

// The layout of dlpack.h on LP64 targets (every target this crate serves).
#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(size_of::<DLDevice>() == 8);
    assert!(size_of::<DLDataType>() == 4);
    assert!(offset_of!(DLDataType, bits) == 1);
    assert!(offset_of!(DLDataType, lanes) == 2);
    assert!(size_of::<DLTensor>() == 48);
    assert!(offset_of!(DLTensor, device) == 8);
    assert!(offset_of!(DLTensor, ndim) == 16);
    assert!(offset_of!(DLTensor, dtype) == 20);
    assert!(offset_of!(DLTensor, shape) == 24);
    assert!(offset_of!(DLTensor, strides) == 32);
    assert!(offset_of!(DLTensor, byte_offset) == 40);
};

impl From<DType> for DLDataType {
    fn from(dtype: DType) -> Self {
        let (code, bits) = match dtype {
            DType::F16 => (DL_FLOAT, 16),
            DType::F32 => (DL_FLOAT, 32),
            DType::F64 => (DL_FLOAT, 64),
            DType::I8 => (DL_INT, 8),
            DType::I16 => (DL_INT, 16),
            DType::I32 => (DL_INT, 32),
            DType::I64 => (DL_INT, 64),
            DType::U8 => (DL_UINT, 8),
        };
        DLDataType { code, bits, lanes: 1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtypes_map_to_dlpack_codes() {
        let f32 = DLDataType::from(DType::F32);
        assert_eq!((f32.code, f32.bits, f32.lanes), (2, 32, 1));
        let u8 = DLDataType::from(DType::U8);
        assert_eq!((u8.code, u8.bits, u8.lanes), (1, 8, 1));
        let i64 = DLDataType::from(DType::I64);
        assert_eq!((i64.code, i64.bits, i64.lanes), (0, 64, 1));
        for d in DType::ALL {
            assert_eq!(usize::from(DLDataType::from(d).bits) / 8, d.bytes(), "{d:?}");
        }
    }

    #[test]
    fn cpu_tensor_is_compact() {
        let mut shape = vec![2, 3];
        let t = DLTensor::cpu(ptr::null_mut(), DType::F32.into(), &mut shape);
        assert_eq!(t.ndim, 2);
        assert_eq!(t.device, DLDevice { device_type: 1, device_id: 0 });
        assert!(t.strides.is_null());
        assert_eq!(t.byte_offset, 0);
        assert_eq!(t.shape, shape.as_mut_ptr());
    }
}
