//! The text of a custom serialization error.
//!
//! postcard drops the message of `serde::ser::Error::custom` (its error is
//! just `SerdeSerCustom`). When that happens the value is walked again with
//! [`Probe`], a serializer that writes nothing and keeps the message; the
//! `Serialize` impl takes the same path through the value, so it fails the
//! same way.

use std::fmt::{self, Display};

use serde::ser::{self, Serialize};

/// Serializes `value` with postcard; a custom error keeps its message.
pub(crate) fn to_postcard<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| match e {
        postcard::Error::SerdeSerCustom => match value.serialize(Probe) {
            Err(Custom(msg)) => msg,
            Ok(()) => e.to_string(),
        },
        other => other.to_string(),
    })
}

#[derive(Debug)]
struct Custom(String);

impl Display for Custom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Custom {}

impl ser::Error for Custom {
    fn custom<M: Display>(msg: M) -> Self {
        Custom(msg.to_string())
    }
}

struct Probe;

type R = Result<(), Custom>;

macro_rules! leaf {
    ($($name:ident($ty:ty)),*) => {$(
        fn $name(self, _: $ty) -> R { Ok(()) }
    )*};
}

impl ser::Serializer for Probe {
    type Ok = ();
    type Error = Custom;
    type SerializeSeq = Probe;
    type SerializeTuple = Probe;
    type SerializeTupleStruct = Probe;
    type SerializeTupleVariant = Probe;
    type SerializeMap = Probe;
    type SerializeStruct = Probe;
    type SerializeStructVariant = Probe;

    leaf!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_i128(i128),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_u128(u128),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str)
    );

    fn serialize_none(self) -> R {
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, v: &T) -> R {
        v.serialize(Probe)
    }
    fn serialize_unit(self) -> R {
        Ok(())
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, _: &'static str) -> R {
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, v: &T) -> R {
        v.serialize(Probe)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        v: &T,
    ) -> R {
        v.serialize(Probe)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_tuple(self, _: usize) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Probe, Custom> {
        Ok(Probe)
    }
    fn is_human_readable(&self) -> bool {
        false // as postcard
    }
}

macro_rules! compound {
    ($($tr:ident::$m:ident),*) => {$(
        impl ser::$tr for Probe {
            type Ok = ();
            type Error = Custom;
            fn $m<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
                v.serialize(Probe)
            }
            fn end(self) -> R {
                Ok(())
            }
        }
    )*};
}

compound!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field,
    SerializeTupleVariant::serialize_field
);

impl ser::SerializeMap for Probe {
    type Ok = ();
    type Error = Custom;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, k: &T) -> R {
        k.serialize(Probe)
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, v: &T) -> R {
        v.serialize(Probe)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStruct for Probe {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Probe)
    }
    fn end(self) -> R {
        Ok(())
    }
}

impl ser::SerializeStructVariant for Probe {
    type Ok = ();
    type Error = Custom;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, _: &'static str, v: &T) -> R {
        v.serialize(Probe)
    }
    fn end(self) -> R {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Refuses;

    impl Serialize for Refuses {
        fn serialize<S: ser::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(ser::Error::custom("refusing: the handle is closed"))
        }
    }

    #[test]
    fn custom_errors_keep_their_text() {
        // postcard alone: "Serde Serialization Error" with no text.
        assert!(!postcard::to_stdvec(&Refuses).unwrap_err().to_string().contains("refusing"));
        let nested = (1u8, vec![Some(Refuses)]);
        assert_eq!(to_postcard(&nested).unwrap_err(), "refusing: the handle is closed");
        assert_eq!(to_postcard(&(1u8, "ok")).unwrap(), postcard::to_stdvec(&(1u8, "ok")).unwrap());
    }
}
