//! Argument descriptions in TVM's JSON shape: `["TENSOR", "float32", [256, 256]]`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Element type of a tensor argument. Displays, parses and serializes as
/// TVM's name (`"float32"`).
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::DType;
///
/// let t: DType = "float32".parse().unwrap();
/// assert_eq!(t, DType::F32);
/// assert_eq!(t.to_string(), "float32");
/// assert!("float8".parse::<DType>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
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
    /// Every element type, in declaration order (for tests over all of them).
    #[cfg(test)]
    pub(crate) const ALL: [DType; 8] = [
        DType::F16,
        DType::F32,
        DType::F64,
        DType::I8,
        DType::I16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];

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

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = ArgInfoError;
    fn from_str(s: &str) -> Result<Self, ArgInfoError> {
        DType::parse(s).ok_or_else(|| ArgInfoError::UnsupportedDType { name: s.to_owned() })
    }
}

impl Serialize for DType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for DType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Why an [`ArgInfo`] or a [`DType`] could not be parsed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArgInfoError {
    /// The text is not JSON.
    #[error("args_info is not JSON")]
    Json(#[source] serde_json::Error),
    /// The value does not have TVM's shape `["TENSOR", dtype, shape]`.
    #[error("expected [\"TENSOR\", dtype, shape], got {value}")]
    Shape {
        /// The value (as JSON text, at most 200 bytes).
        value: String,
    },
    /// The element type is not one of [`DType`]'s.
    #[error("unsupported dtype {name:?}")]
    UnsupportedDType {
        /// The name given.
        name: String,
    },
    /// A dimension is negative or not an integer.
    #[error("bad dimension {value}")]
    BadDimension {
        /// The dimension (as JSON text).
        value: String,
    },
    /// Entry `index` of a list is bad.
    #[error("arg {index}")]
    Entry {
        /// The entry's position.
        index: usize,
        /// What is wrong with it.
        #[source]
        source: Box<ArgInfoError>,
    },
}

/// JSON text of `v`, cut to 200 bytes (error messages stay short).
fn short_json(v: &serde_json::Value) -> String {
    let mut text = v.to_string();
    if text.len() > 200 {
        let mut cut = 200;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

/// One tensor argument of a kernel. Serializes in TVM's JSON form,
/// `["TENSOR", "float32", [m, n]]`.
///
/// # Examples
///
/// ```
/// use rpc_runner::measure::{ArgInfo, DType};
///
/// let a = ArgInfo::tensor(DType::F32, [256, 128]);
/// let json = serde_json::to_string(&a).unwrap();
/// assert_eq!(json, r#"["TENSOR","float32",[256,128]]"#);
/// assert_eq!(serde_json::from_str::<ArgInfo>(&json).unwrap(), a);
/// assert!(ArgInfo::list_from_json(r#"[["TENSOR", "float32", [-1]]]"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// [`ArgInfoError`] saying what is wrong.
    pub fn from_json(v: &serde_json::Value) -> Result<Self, ArgInfoError> {
        let shape_err = || ArgInfoError::Shape { value: short_json(v) };
        let arr = v.as_array().ok_or_else(shape_err)?;
        match arr.as_slice() {
            [kind, dtype, shape] if kind == "TENSOR" => {
                let dtype: DType = dtype.as_str().ok_or_else(shape_err)?.parse()?;
                let dims = shape.as_array().ok_or_else(shape_err)?;
                let shape = dims
                    .iter()
                    .map(|d| {
                        d.as_i64()
                            .filter(|&d| d >= 0)
                            .ok_or_else(|| ArgInfoError::BadDimension { value: short_json(d) })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(ArgInfo { dtype, shape })
            }
            _ => Err(shape_err()),
        }
    }

    /// Parses a JSON list of arg infos (TVM's `args_info` of a candidate).
    ///
    /// # Errors
    ///
    /// [`ArgInfoError::Json`], or [`ArgInfoError::Entry`] naming the bad entry.
    pub fn list_from_json(text: &str) -> Result<Vec<Self>, ArgInfoError> {
        let v: serde_json::Value = serde_json::from_str(text).map_err(ArgInfoError::Json)?;
        let arr = v.as_array().ok_or_else(|| ArgInfoError::Shape { value: short_json(&v) })?;
        arr.iter()
            .enumerate()
            .map(|(index, a)| {
                Self::from_json(a).map_err(|e| ArgInfoError::Entry { index, source: Box::new(e) })
            })
            .collect()
    }
}

impl Serialize for ArgInfo {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        ("TENSOR", self.dtype, &self.shape).serialize(s)
    }
}

impl<'de> Deserialize<'de> for ArgInfo {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let (kind, dtype, shape): (String, DType, Vec<i64>) = Deserialize::deserialize(d)?;
        if kind != "TENSOR" {
            return Err(D::Error::custom(format!("expected \"TENSOR\", got {kind:?}")));
        }
        if let Some(bad) = shape.iter().find(|&&d| d < 0) {
            return Err(D::Error::custom(format!("bad dimension {bad}")));
        }
        Ok(ArgInfo { dtype, shape })
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
