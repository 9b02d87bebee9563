//! Packed arguments as TVM (>= 0.21) sends them: `[i32 num_args]` then per
//! argument `[i32 TVM-FFI type index][payload]` (`RPCReference::SendPackedSeq`
//! in `src/runtime/minrpc/rpc_reference.h`; the type indices are tvm-ffi's
//! `TVMFFITypeIndex`, `include/tvm/ffi/c_api.h`).

use super::error::TvmError;
use super::packet::{PacketWriter, Reader};

/// TVM-FFI type indices (`TVMFFITypeIndex`) used on the wire.
pub(crate) mod index {
    pub(crate) const NONE: i32 = 0;
    pub(crate) const INT: i32 = 1;
    pub(crate) const BOOL: i32 = 2;
    pub(crate) const FLOAT: i32 = 3;
    pub(crate) const OPAQUE_PTR: i32 = 4;
    pub(crate) const DATA_TYPE: i32 = 5;
    pub(crate) const DEVICE: i32 = 6;
    pub(crate) const DL_TENSOR_PTR: i32 = 7;
    pub(crate) const RAW_STR: i32 = 8;
    pub(crate) const BYTE_ARRAY_PTR: i32 = 9;
    pub(crate) const SMALL_STR: i32 = 11;
    pub(crate) const SMALL_BYTES: i32 = 12;
    pub(crate) const STATIC_OBJECT_BEGIN: i32 = 64;
    pub(crate) const STR: i32 = 65;
    pub(crate) const BYTES: i32 = 66;
    pub(crate) const FUNCTION: i32 = 68;
    pub(crate) const MODULE: i32 = 73;
    /// TVM's `kRuntimeRPCObjectRef` (`kTVMFFIDynObjectBegin - 13`).
    pub(crate) const RPC_OBJECT_REF: i32 = 128 - 13;
}

/// A device: DLPack's `DLDevice` (`device_type` as in `DLDeviceType`: 1 CPU,
/// 2 CUDA, 4 OpenCL, 8 Metal, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// `DLDeviceType`.
    pub device_type: i32,
    /// The device's index.
    pub device_id: i32,
}

impl Device {
    /// The CPU with index `id`.
    pub fn cpu(id: i32) -> Self {
        Device { device_type: 1, device_id: id }
    }
}

/// An element type: DLPack's `DLDataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataType {
    /// `DLDataTypeCode`: 0 int, 1 uint, 2 float, 4 bfloat.
    pub code: u8,
    /// Bits per lane.
    pub bits: u8,
    /// Lanes.
    pub lanes: u16,
}

impl DataType {
    /// `float32`.
    pub const FLOAT32: DataType = DataType { code: 2, bits: 32, lanes: 1 };

    /// Parses `int8..int64`, `uint8..uint64`, `float16/32/64`, `bfloat16`,
    /// with an optional `xN` lane count (`float32x4`).
    pub fn parse(s: &str) -> Option<DataType> {
        let (base, lanes) = match s.split_once('x') {
            Some((b, l)) => (b, l.parse::<u16>().ok().filter(|&l| l > 0)?),
            None => (s, 1),
        };
        let (code, bits) = if let Some(b) = base.strip_prefix("uint") {
            (1, b)
        } else if let Some(b) = base.strip_prefix("int") {
            (0, b)
        } else if let Some(b) = base.strip_prefix("bfloat") {
            (4, b)
        } else if let Some(b) = base.strip_prefix("float") {
            (2, b)
        } else {
            return None;
        };
        let bits: u8 = bits.parse().ok().filter(|b| [8, 16, 32, 64].contains(b))?;
        Some(DataType { code, bits, lanes })
    }

    /// Bytes per element (all lanes), rounded up.
    pub fn bytes(self) -> u64 {
        (u64::from(self.bits) * u64::from(self.lanes)).div_ceil(8)
    }
}

/// A tensor on the server: its data pointer there and its description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteTensor {
    /// The data pointer on the server.
    pub data: u64,
    /// Where it lives.
    pub device: Device,
    /// Element type.
    pub dtype: DataType,
    /// Shape (row-major, contiguous).
    pub shape: Vec<i64>,
    /// Offset of the first element from `data`.
    pub byte_offset: u64,
}

impl RemoteTensor {
    /// Its size in bytes, or `None` if a dimension is negative or it overflows.
    pub fn nbytes(&self) -> Option<u64> {
        self.shape.iter().try_fold(self.dtype.bytes(), |acc, &d| {
            u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
        })
    }
}

/// A function handle on the server (from [`get_global_func`], a module's
/// function or `runtime.RPCTimeEvaluator`); free it with
/// [`TvmSession::free_handle`] when done.
///
/// [`get_global_func`]: super::TvmSession::get_global_func
/// [`TvmSession::free_handle`]: super::TvmSession::free_handle
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteFunc(pub u64);

/// A module handle on the server (from [`load_module`](super::TvmSession::load_module)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteModule(pub u64);

/// A value passed to or returned by the server.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TvmValue {
    /// `None` (a void return).
    None,
    /// An integer.
    Int(i64),
    /// A boolean.
    Bool(bool),
    /// A float.
    Float(f64),
    /// An opaque pointer on the server.
    OpaquePtr(u64),
    /// An element type.
    DataType(DataType),
    /// A device.
    Device(Device),
    /// A string.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// A tensor (sent as a `DLTensor*`: its description and data pointer).
    Tensor(RemoteTensor),
    /// A function handle.
    Func(RemoteFunc),
    /// A module handle.
    Module(RemoteModule),
    /// Another object returned by the server: its type index and handle.
    Object {
        /// Its TVM-FFI type index.
        type_index: i32,
        /// Its handle on the server.
        handle: u64,
    },
}

impl TvmValue {
    /// The float64 values of a `Bytes` value (e.g. the costs a time
    /// evaluator returns), or `None` if it is not `Bytes` of a multiple of 8.
    pub fn as_f64s(&self) -> Option<Vec<f64>> {
        match self {
            TvmValue::Bytes(b) if b.len() % 8 == 0 => Some(
                b.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ),
            _ => None,
        }
    }
}

pub(crate) fn write_tensor(w: &mut PacketWriter, t: &RemoteTensor) -> Result<(), TvmError> {
    let ndim = i32::try_from(t.shape.len())
        .map_err(|_| TvmError::InvalidArgument { message: "tensor has too many dims".into() })?;
    w.u64(t.data).i32(t.device.device_type).i32(t.device.device_id).i32(ndim);
    w.u8(t.dtype.code).u8(t.dtype.bits).u16(t.dtype.lanes);
    for &d in &t.shape {
        w.i64(d);
    }
    w.u64(t.byte_offset);
    Ok(())
}

pub(crate) fn read_tensor(r: &mut Reader<'_>) -> Result<RemoteTensor, TvmError> {
    let data = r.u64("tensor data")?;
    let device = Device { device_type: r.i32("device type")?, device_id: r.i32("device id")? };
    let ndim = r.i32("tensor ndim")?;
    let dtype = DataType { code: r.u8("dtype")?, bits: r.u8("dtype")?, lanes: r.u16("dtype")? };
    let ndim = usize::try_from(ndim)
        .ok()
        .filter(|&n| n.saturating_mul(8) <= r.remaining())
        .ok_or_else(|| TvmError::protocol(format!("tensor ndim {ndim} out of bounds")))?;
    let shape = (0..ndim).map(|_| r.i64("tensor shape")).collect::<Result<_, _>>()?;
    let byte_offset = r.u64("tensor byte offset")?;
    Ok(RemoteTensor { data, device, dtype, shape, byte_offset })
}

/// Appends a packed sequence.
pub(crate) fn write_seq(w: &mut PacketWriter, args: &[TvmValue]) -> Result<(), TvmError> {
    let n = i32::try_from(args.len())
        .map_err(|_| TvmError::InvalidArgument { message: "too many arguments".into() })?;
    w.i32(n);
    for a in args {
        match a {
            TvmValue::None => w.i32(index::NONE),
            TvmValue::Int(v) => w.i32(index::INT).i64(*v),
            TvmValue::Bool(v) => w.i32(index::BOOL).i64(i64::from(*v)),
            TvmValue::Float(v) => w.i32(index::FLOAT).u64(v.to_bits()),
            TvmValue::OpaquePtr(h) => w.i32(index::OPAQUE_PTR).u64(*h),
            TvmValue::DataType(t) => {
                w.i32(index::DATA_TYPE).u8(t.code).u8(t.bits).u16(t.lanes).i32(0)
            }
            TvmValue::Device(d) => w.i32(index::DEVICE).i32(d.device_type).i32(d.device_id),
            TvmValue::Str(s) => {
                if s.as_bytes().contains(&0) {
                    return Err(TvmError::InvalidArgument {
                        message: format!("string {s:?} contains a NUL byte"),
                    });
                }
                w.i32(index::RAW_STR).blob(s.as_bytes())
            }
            TvmValue::Bytes(b) => w.i32(index::BYTE_ARRAY_PTR).blob(b),
            TvmValue::Tensor(t) => {
                w.i32(index::DL_TENSOR_PTR);
                write_tensor(w, t)?;
                &mut *w
            }
            TvmValue::Func(f) => w.i32(index::FUNCTION).u64(f.0),
            TvmValue::Module(m) => w.i32(index::MODULE).u64(m.0),
            TvmValue::Object { type_index, handle } => {
                // TVM's object convention: outer index, inner u32 index, handle.
                w.i32(*type_index).u32(index::RPC_OBJECT_REF as u32).u64(*handle)
            }
        };
    }
    Ok(())
}

fn utf8(b: &[u8]) -> Result<String, TvmError> {
    String::from_utf8(b.to_vec()).map_err(|_| TvmError::protocol("string is not UTF-8"))
}

/// Reads a packed sequence; bounded by the packet (the argument count is
/// checked against what is left before anything is allocated).
pub(crate) fn read_seq(r: &mut Reader<'_>) -> Result<Vec<TvmValue>, TvmError> {
    let n = r.i32("argument count")?;
    let n = usize::try_from(n)
        .ok()
        .filter(|&n| n.saturating_mul(4) <= r.remaining())
        .ok_or_else(|| TvmError::protocol(format!("argument count {n} out of bounds")))?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let ti = r.i32("type index")?;
        let v = match ti {
            index::NONE => TvmValue::None,
            index::INT => TvmValue::Int(r.i64("int")?),
            index::BOOL => TvmValue::Bool(r.i64("bool")? != 0),
            index::FLOAT => TvmValue::Float(f64::from_bits(r.u64("float")?)),
            index::OPAQUE_PTR => TvmValue::OpaquePtr(r.u64("handle")?),
            index::DATA_TYPE => {
                let t =
                    DataType { code: r.u8("dtype")?, bits: r.u8("dtype")?, lanes: r.u16("dtype")? };
                r.i32("dtype padding")?;
                TvmValue::DataType(t)
            }
            index::DEVICE => TvmValue::Device(Device {
                device_type: r.i32("device")?,
                device_id: r.i32("device")?,
            }),
            index::FUNCTION => TvmValue::Func(RemoteFunc(r.u64("function handle")?)),
            index::MODULE => TvmValue::Module(RemoteModule(r.u64("module handle")?)),
            index::RAW_STR => TvmValue::Str(utf8(r.blob("string")?)?),
            index::BYTE_ARRAY_PTR => TvmValue::Bytes(r.blob("bytes")?.to_vec()),
            index::DL_TENSOR_PTR => TvmValue::Tensor(read_tensor(r)?),
            ti if ti >= index::STATIC_OBJECT_BEGIN
                || ti == index::SMALL_STR
                || ti == index::SMALL_BYTES =>
            {
                match r.u32("object type index")? as i32 {
                    index::STR => TvmValue::Str(utf8(r.blob("string")?)?),
                    index::BYTES => TvmValue::Bytes(r.blob("bytes")?.to_vec()),
                    index::RPC_OBJECT_REF => {
                        TvmValue::Object { type_index: ti, handle: r.u64("object handle")? }
                    }
                    inner => {
                        return Err(TvmError::protocol(format!(
                            "unsupported object type index {inner} (outer {ti})"
                        )));
                    }
                }
            }
            other => return Err(TvmError::protocol(format!("unknown type index {other}"))),
        };
        out.push(v);
    }
    Ok(out)
}

/// A `kCallFunc` return: TVM's `LocalSession::EncodeReturn` sends the
/// value's type index first, then the value (a tensor also its owner).
pub(crate) fn call_return(values: Vec<TvmValue>) -> Result<TvmValue, TvmError> {
    let mut it = values.into_iter();
    let Some(TvmValue::Int(ti)) = it.next() else {
        return Err(TvmError::protocol("a call's return does not start with its type index"));
    };
    let value = it.next().unwrap_or(TvmValue::None);
    let ti = i32::try_from(ti).map_err(|_| TvmError::protocol("type index out of range"))?;
    Ok(match (ti, value) {
        (index::FUNCTION, TvmValue::OpaquePtr(h)) => TvmValue::Func(RemoteFunc(h)),
        (index::MODULE, TvmValue::OpaquePtr(h)) => TvmValue::Module(RemoteModule(h)),
        (ti, TvmValue::OpaquePtr(h)) if ti >= index::STATIC_OBJECT_BEGIN => {
            TvmValue::Object { type_index: ti, handle: h }
        }
        (_, v) => v,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tvm::packet::RpcCode;

    fn body(args: &[TvmValue]) -> Vec<u8> {
        let mut w = PacketWriter::new(RpcCode::Return);
        write_seq(&mut w, args).unwrap();
        w.finish()[12..].to_vec()
    }

    #[test]
    fn every_value_round_trips() {
        let t = RemoteTensor {
            data: 0xdead_beef,
            device: Device::cpu(0),
            dtype: DataType::parse("float32x4").unwrap(),
            shape: vec![2, 3],
            byte_offset: 16,
        };
        let args = vec![
            TvmValue::None,
            TvmValue::Int(-7),
            TvmValue::Bool(true),
            TvmValue::Float(1.5),
            TvmValue::OpaquePtr(42),
            TvmValue::DataType(DataType::FLOAT32),
            TvmValue::Device(Device { device_type: 2, device_id: 3 }),
            TvmValue::Str("tvm.rpc.server.upload".into()),
            TvmValue::Bytes(vec![1, 2, 3]),
            TvmValue::Tensor(t.clone()),
            TvmValue::Func(RemoteFunc(9)),
            TvmValue::Module(RemoteModule(10)),
        ];
        let b = body(&args);
        let mut r = Reader::new(&b);
        assert_eq!(read_seq(&mut r).unwrap(), args);
        r.finish("seq").unwrap();
        assert_eq!(t.nbytes(), Some(96));
    }

    #[test]
    fn the_exact_bytes_of_a_raw_string_and_a_device() {
        let b = body(&[TvmValue::Str("ab".into()), TvmValue::Device(Device::cpu(1))]);
        let mut want = 2i32.to_le_bytes().to_vec();
        want.extend(8i32.to_le_bytes());
        want.extend(2u64.to_le_bytes());
        want.extend(b"ab");
        want.extend(6i32.to_le_bytes());
        want.extend(1i32.to_le_bytes());
        want.extend(1i32.to_le_bytes());
        assert_eq!(b, want);
    }

    #[test]
    fn objects_and_call_returns_decode() {
        // A `Bytes` object as TVM's `WriteFFIAny` sends it.
        let mut b = 1i32.to_le_bytes().to_vec();
        b.extend(index::BYTES.to_le_bytes());
        b.extend((index::BYTES as u32).to_le_bytes());
        b.extend(8u64.to_le_bytes());
        b.extend(2.5f64.to_le_bytes());
        let v = read_seq(&mut Reader::new(&b)).unwrap();
        assert_eq!(v[0].as_f64s(), Some(vec![2.5]));
        let ret = call_return(vec![TvmValue::Int(68), TvmValue::OpaquePtr(5)]).unwrap();
        assert_eq!(ret, TvmValue::Func(RemoteFunc(5)));
        let ret = call_return(vec![TvmValue::Int(0), TvmValue::None]).unwrap();
        assert_eq!(ret, TvmValue::None);
        assert!(call_return(vec![TvmValue::Str("x".into())]).is_err());
    }

    #[test]
    fn hostile_sequences_are_errors_never_panics() {
        // Unknown type index.
        let mut b = 1i32.to_le_bytes().to_vec();
        b.extend(13i32.to_le_bytes());
        let err = read_seq(&mut Reader::new(&b)).unwrap_err();
        assert!(err.to_string().contains("unknown type index 13"), "{err}");
        // A huge argument count, a huge tensor ndim, a huge string length.
        let b = i32::MAX.to_le_bytes();
        assert!(read_seq(&mut Reader::new(&b)).is_err());
        assert!(read_seq(&mut Reader::new(&(-1i32).to_le_bytes())).is_err());
        let mut t = 1i32.to_le_bytes().to_vec();
        t.extend(index::DL_TENSOR_PTR.to_le_bytes());
        t.extend([0u8; 16]);
        t.extend(i32::MAX.to_le_bytes());
        t.extend([2, 32, 1, 0]);
        assert!(read_seq(&mut Reader::new(&t)).is_err());
        let mut s = 1i32.to_le_bytes().to_vec();
        s.extend(index::RAW_STR.to_le_bytes());
        s.extend(u64::MAX.to_le_bytes());
        assert!(read_seq(&mut Reader::new(&s)).is_err());
        // Every truncation of a valid sequence.
        let full = body(&[
            TvmValue::Str("abc".into()),
            TvmValue::Tensor(RemoteTensor {
                data: 1,
                device: Device::cpu(0),
                dtype: DataType::FLOAT32,
                shape: vec![4],
                byte_offset: 0,
            }),
        ]);
        for cut in 0..full.len() {
            assert!(read_seq(&mut Reader::new(&full[..cut])).is_err(), "cut {cut}");
        }
        // A NUL inside a string cannot be sent as TVM's raw C string.
        let mut w = PacketWriter::new(RpcCode::CallFunc);
        assert!(write_seq(&mut w, &[TvmValue::Str("a\0b".into())]).is_err());
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(DataType::parse("float32"), Some(DataType::FLOAT32));
        assert_eq!(DataType::parse("uint8"), Some(DataType { code: 1, bits: 8, lanes: 1 }));
        assert_eq!(DataType::parse("int64x2").unwrap().bytes(), 16);
        assert_eq!(DataType::parse("float7"), None);
        assert_eq!(DataType::parse("x"), None);
        assert_eq!(DataType::parse("float32x0"), None);
    }
}
