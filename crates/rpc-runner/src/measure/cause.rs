//! [`Cause`]: the typed source of a measurement or build error that still
//! serializes, clones and compares.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The cause of a [`RunError`](super::RunError) or
/// [`BuildError`](super::BuildError): the typed error `E` that raised it
/// (a `SessionError`, a `PoolError`, an `io::Error`), shared behind an
/// `Arc` so the error stays `Clone`.
///
/// A cause serializes as its text. A deserialized cause has the text but no
/// typed error ([`get`](Cause::get) returns `None`): the value stayed in the
/// process that raised it. `Display` prints the text; [`source`] continues
/// with the typed error's own source, so `anyhow`'s `{:#}` and error-chain
/// printers show the whole chain once.
///
/// [`source`]: std::error::Error::source
pub struct Cause<E> {
    error: Option<Arc<E>>,
    text: String,
}

impl<E: std::error::Error> Cause<E> {
    /// The cause `error`.
    pub fn new(error: E) -> Self {
        Cause { text: error.to_string(), error: Some(Arc::new(error)) }
    }
}

impl<E> Cause<E> {
    /// A cause known only by its text (as after deserializing).
    pub fn text_only(text: impl Into<String>) -> Self {
        Cause { error: None, text: text.into() }
    }

    /// The typed error, unless this cause was deserialized.
    pub fn get(&self) -> Option<&E> {
        self.error.as_deref()
    }

    /// The error's text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl<E> Clone for Cause<E> {
    fn clone(&self) -> Self {
        Cause { error: self.error.clone(), text: self.text.clone() }
    }
}

impl<E> PartialEq for Cause<E> {
    /// Causes compare by text (the typed errors are not `PartialEq`).
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}

impl<E: fmt::Debug> fmt::Debug for Cause<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.error {
            Some(e) => e.fmt(f),
            None => f.debug_tuple("Cause").field(&self.text).finish(),
        }
    }
}

impl<E> fmt::Display for Cause<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<E: std::error::Error + 'static> std::error::Error for Cause<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.as_deref().and_then(std::error::Error::source)
    }
}

impl<E> From<E> for Cause<E>
where
    E: std::error::Error,
{
    fn from(error: E) -> Self {
        Cause::new(error)
    }
}

impl<E> Serialize for Cause<E> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de, E> Deserialize<'de> for Cause<E> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Cause::text_only)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_keeps_its_error_and_serializes_as_text() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "gone");
        let cause = Cause::new(io);
        assert_eq!(cause.get().map(std::io::Error::kind), Some(std::io::ErrorKind::NotFound));
        let json = serde_json::to_string(&cause).unwrap();
        assert_eq!(json, "\"gone\"");
        let back: Cause<std::io::Error> = serde_json::from_str(&json).unwrap();
        assert!(back.get().is_none());
        assert_eq!(back, cause);
    }
}
