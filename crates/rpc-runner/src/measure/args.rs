//! Argument descriptions in TVM's JSON shape: `["TENSOR", "float32", [256, 256]]`.

use serde::{Deserialize, Serialize};

/// Element type of a tensor argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// `float16`
    F16,
    /// `float32`
    F32,
    /// `float64`
    F64,
    /// `int8`
    I8,
    /// `int16`
    I16,
    /// `int32`
    I32,
    /// `int64`
    I64,
    /// `uint8`
    U8,
}

impl DType {
    /// TVM's name (`"float32"`...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F16 => "float16",
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::I8 => "int8",
            DType::I16 => "int16",
            DType::I32 => "int32",
            DType::I64 => "int64",
            DType::U8 => "uint8",
        }
    }

    /// Parses TVM's name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "float16" => DType::F16,
            "float32" => DType::F32,
            "float64" => DType::F64,
            "int8" => DType::I8,
            "int16" => DType::I16,
            "int32" => DType::I32,
            "int64" => DType::I64,
            "uint8" => DType::U8,
            _ => return None,
        })
    }

    /// Size of one element in bytes.
    pub fn bytes(self) -> usize {
        match self {
            DType::I8 | DType::U8 => 1,
            DType::F16 | DType::I16 => 2,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }
}

/// One tensor argument of a kernel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArgInfo {
    /// Element type.
    pub dtype: DType,
    /// Shape; every dimension >= 0.
    pub shape: Vec<i64>,
}

impl ArgInfo {
    /// A tensor argument.
    pub fn tensor(dtype: DType, shape: impl Into<Vec<i64>>) -> Self {
        ArgInfo { dtype, shape: shape.into() }
    }

    /// Number of elements (saturating at `usize::MAX` for absurd shapes;
    /// negative dimensions count as 0).
    pub fn numel(&self) -> usize {
        self.shape.iter().fold(1usize, |n, &d| n.saturating_mul(usize::try_from(d).unwrap_or(0)))
    }

    /// Size in bytes (saturating, as [`numel`](ArgInfo::numel)).
    pub fn nbytes(&self) -> usize {
        self.numel().saturating_mul(self.dtype.bytes())
    }

    /// TVM's JSON form, `["TENSOR", "float32", [m, n]]`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!(["TENSOR", self.dtype.name(), self.shape])
    }

    /// Parses TVM's JSON form.
    ///
    /// # Errors
    ///
    /// A message naming what is wrong.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, String> {
        let arr = v.as_array().ok_or_else(|| format!("arg info must be an array, got {v}"))?;
        match arr.as_slice() {
            [kind, dtype, shape] if kind == "TENSOR" => {
                let name =
                    dtype.as_str().ok_or_else(|| format!("dtype must be a string, got {dtype}"))?;
                let dtype =
                    DType::parse(name).ok_or_else(|| format!("unsupported dtype {name:?}"))?;
                let dims = shape
                    .as_array()
                    .ok_or_else(|| format!("shape must be an array, got {shape}"))?;
                let shape = dims
                    .iter()
                    .map(|d| {
                        d.as_i64().filter(|&d| d >= 0).ok_or_else(|| format!("bad dimension {d}"))
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ArgInfo { dtype, shape })
            }
            _ => Err(format!("expected [\"TENSOR\", dtype, shape], got {v}")),
        }
    }

    /// Parses a JSON list of arg infos (TVM's `args_info` of a candidate).
    ///
    /// # Errors
    ///
    /// A message naming the bad entry.
    pub fn list_from_json(text: &str) -> Result<Vec<Self>, String> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let arr = v.as_array().ok_or("args_info must be a JSON array")?;
        arr.iter()
            .enumerate()
            .map(|(i, a)| Self::from_json(a).map_err(|e| format!("arg {i}: {e}")))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_of_absurd_shapes_saturate_instead_of_overflowing() {
        let huge = ArgInfo::tensor(DType::F64, [i64::MAX, i64::MAX, 3]);
        assert_eq!(huge.numel(), usize::MAX);
        assert_eq!(huge.nbytes(), usize::MAX);
        assert_eq!(ArgInfo::tensor(DType::F32, [4, -2]).numel(), 0);
        assert_eq!(ArgInfo::tensor(DType::F32, [4, 5]).nbytes(), 80);
    }
}
