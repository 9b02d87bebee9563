//! Framing of the tracker protocol: a 4-byte handshake magic, then
//! `[i32 little-endian length][UTF-8 JSON]` frames of at most [`MAX_FRAME`] bytes.
//!
//! [`JsonFrameCodec`] is a tokio-util [`Decoder`] / [`Encoder`] over
//! [`serde_json::Value`]; the magic is exchanged on the raw stream before the
//! codec takes over (see [`read_magic`] and [`write_magic`]).

use bytes::{Buf, BufMut, BytesMut};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};

use super::error::TrackerError;

/// The handshake magic of the tracker (control plane): both sides send it as
/// an `i32` little-endian first thing (TVM's `RPC_TRACKER_MAGIC`).
pub const TRACKER_MAGIC: i32 = 0x2F271;

/// The handshake magic of an RPC server (data plane, TVM's `RPC_MAGIC`),
/// defined with the rest of the session handshake in [`wire`](crate::wire).
pub use crate::wire::handshake::RPC_MAGIC;

/// The largest request frame body, in bytes, the tracker accepts and our
/// clients send: 1 MiB (TVM's `MAX_TRACKER_MSG_BYTES`, which TVM's tracker
/// applies to what it receives).
pub const MAX_FRAME: usize = 1 << 20;

/// The largest reply frame body, in bytes, our clients read and our tracker
/// writes: 64 MiB. TVM caps only incoming requests, so its tracker sends
/// summaries above 1 MiB (1.4 MB with ~30,000 keys); a client must read them.
pub const MAX_REPLY: usize = 64 << 20;

/// The deepest JSON nesting our clients accept in a reply: 128 levels, the
/// recursion limit of `serde_json` (checked before parsing, without recursion).
pub const MAX_REPLY_DEPTH: usize = 128;

/// The tracker's answer to a handshake when it is at its connection limit,
/// instead of the echoed [`TRACKER_MAGIC`]; an `i32` LE with the limit
/// follows, then the tracker closes the connection. (A TVM client reports
/// it as "... is not RPC Tracker".)
pub const TRACKER_AT_CAPACITY: i32 = TRACKER_MAGIC + 1;

const HEADER: usize = 4;

/// `[i32 LE length][UTF-8 JSON]` frames over [`serde_json::Value`].
///
/// A codec has three limits: the longest frame body it decodes, the longest
/// it encodes, and the deepest JSON nesting it decodes. [`Default`] (and
/// [`JsonFrameCodec::new`]) is [`MAX_FRAME`] both ways with a depth of
/// [`MAX_REPLY_DEPTH`]; [`JsonFrameCodec::client`] reads replies up to
/// [`MAX_REPLY`] and sends requests up to [`MAX_FRAME`].
///
/// Decoding fails with [`TrackerError::BadFrame`] for a length of zero or
/// less, [`TrackerError::FrameTooLarge`] above the decode limit (before any
/// of the body is buffered), [`TrackerError::InvalidUtf8`] or
/// [`TrackerError::InvalidJson`] for a bad body, [`TrackerError::TooDeep`]
/// for a body nested deeper than the depth limit (checked by an iterative
/// scan before parsing), and `BadFrame` for a frame cut short by the end of
/// the stream. After a length error the stream is out of sync and must be
/// dropped; after a body error the frame was consumed whole (a
/// `tokio_util` `Framed` ends its stream after any error anyway).
///
/// # Examples
///
/// ```
/// use bytes::BytesMut;
/// use rpc_runner::tracker::JsonFrameCodec;
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = JsonFrameCodec::new();
/// let mut buf = BytesMut::new();
/// codec.encode(&serde_json::json!([1]), &mut buf).unwrap();
/// assert_eq!(&buf[..], b"\x03\x00\x00\x00[1]");
/// assert_eq!(codec.decode(&mut buf).unwrap(), Some(serde_json::json!([1])));
/// ```
#[derive(Debug, Clone, Copy)]
pub struct JsonFrameCodec {
    max_decode: usize,
    max_encode: usize,
    max_depth: usize,
}

impl Default for JsonFrameCodec {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonFrameCodec {
    /// [`MAX_FRAME`] both ways, depth [`MAX_REPLY_DEPTH`].
    pub const fn new() -> Self {
        JsonFrameCodec { max_decode: MAX_FRAME, max_encode: MAX_FRAME, max_depth: MAX_REPLY_DEPTH }
    }

    /// A client's codec: reads replies up to [`MAX_REPLY`] bytes and
    /// [`MAX_REPLY_DEPTH`] levels, sends requests up to [`MAX_FRAME`].
    pub const fn client() -> Self {
        JsonFrameCodec { max_decode: MAX_REPLY, max_encode: MAX_FRAME, max_depth: MAX_REPLY_DEPTH }
    }

    /// The tracker's codec: reads requests up to [`MAX_FRAME`] bytes and
    /// `max_depth` levels (at most [`MAX_REPLY_DEPTH`]), writes replies up
    /// to [`MAX_REPLY`].
    pub(crate) const fn tracker(max_depth: usize) -> Self {
        let max_depth = if max_depth < MAX_REPLY_DEPTH { max_depth } else { MAX_REPLY_DEPTH };
        JsonFrameCodec { max_decode: MAX_FRAME, max_encode: MAX_REPLY, max_depth }
    }

    /// The longest frame body this codec decodes.
    pub const fn max_decode(&self) -> usize {
        self.max_decode
    }

    /// Splits off the next whole frame's body, if it is all there.
    fn next_body(&self, src: &mut BytesMut) -> Result<Option<BytesMut>, TrackerError> {
        if src.len() < HEADER {
            src.reserve(HEADER - src.len());
            return Ok(None);
        }
        let len = i32::from_le_bytes([src[0], src[1], src[2], src[3]]);
        if len <= 0 {
            return Err(TrackerError::BadFrame {
                reason: format!("frame length {len} is not positive"),
            });
        }
        let len = len as usize;
        if len > self.max_decode {
            return Err(TrackerError::FrameTooLarge { len, limit: self.max_decode });
        }
        if src.len() < HEADER + len {
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER);
        Ok(Some(src.split_to(len)))
    }

    /// Checks and parses one frame body.
    fn parse_body(&self, body: &[u8]) -> Result<Value, TrackerError> {
        let text =
            std::str::from_utf8(body).map_err(|source| TrackerError::InvalidUtf8 { source })?;
        if json_depth_exceeds(body, self.max_depth) {
            return Err(TrackerError::TooDeep { limit: self.max_depth });
        }
        serde_json::from_str(text).map_err(|source| TrackerError::InvalidJson { source })
    }
}

/// True if `json` nests arrays and objects deeper than `limit` levels.
///
/// An iterative scan that knows strings (and their escapes), so brackets
/// inside strings do not count; it does not validate the JSON (the parser
/// does that next) and stops as soon as the limit is passed.
pub(crate) fn json_depth_exceeds(json: &[u8], limit: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > limit {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

impl Decoder for JsonFrameCodec {
    type Item = Value;
    type Error = TrackerError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Value>, TrackerError> {
        match self.next_body(src)? {
            None => Ok(None),
            Some(body) => self.parse_body(&body).map(Some),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Value>, TrackerError> {
        match self.decode(src)? {
            Some(value) => Ok(Some(value)),
            None => eof_rest(src).map(|()| None),
        }
    }
}

fn eof_rest(src: &BytesMut) -> Result<(), TrackerError> {
    if src.is_empty() {
        Ok(())
    } else {
        Err(TrackerError::BadFrame {
            reason: format!("stream ended inside a frame ({} bytes left over)", src.len()),
        })
    }
}

/// The tracker's request decoder: like [`JsonFrameCodec`], except that a
/// body nested too deep is not the end of the stream. It is yielded as an
/// `Err` item (the frame was consumed whole, the stream is in sync), so the
/// tracker answers it with `FAIL` and serves the connection on. Every other
/// error ends the stream, as with [`JsonFrameCodec`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct RequestCodec(pub(crate) JsonFrameCodec);

impl Decoder for RequestCodec {
    type Item = Result<Value, TrackerError>;
    type Error = TrackerError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, TrackerError> {
        let Some(body) = self.0.next_body(src)? else { return Ok(None) };
        match self.0.parse_body(&body) {
            Ok(value) => Ok(Some(Ok(value))),
            Err(err @ TrackerError::TooDeep { .. }) => Ok(Some(Err(err))),
            Err(err) => Err(err),
        }
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Self::Item>, TrackerError> {
        match self.decode(src)? {
            Some(item) => Ok(Some(item)),
            None => eof_rest(src).map(|()| None),
        }
    }
}

impl Encoder<&Value> for JsonFrameCodec {
    type Error = TrackerError;

    fn encode(&mut self, item: &Value, dst: &mut BytesMut) -> Result<(), TrackerError> {
        let start = dst.len();
        dst.put_i32_le(0);
        serde_json::to_writer(dst.writer(), item)
            .map_err(|source| TrackerError::InvalidJson { source })?;
        let len = dst.len() - start - HEADER;
        if len > self.max_encode {
            dst.truncate(start);
            return Err(TrackerError::FrameTooLarge { len, limit: self.max_encode });
        }
        dst[start..start + HEADER].copy_from_slice(&(len as i32).to_le_bytes());
        Ok(())
    }
}

impl Encoder<Value> for JsonFrameCodec {
    type Error = TrackerError;

    fn encode(&mut self, item: Value, dst: &mut BytesMut) -> Result<(), TrackerError> {
        self.encode(&item, dst)
    }
}

/// Reads the 4-byte little-endian handshake magic.
pub(crate) async fn read_magic(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<i32> {
    let mut buf = [0u8; 4];
    r.read_exact(&mut buf).await?;
    Ok(i32::from_le_bytes(buf))
}

/// Writes a 4-byte little-endian handshake magic.
pub(crate) async fn write_magic(
    w: &mut (impl AsyncWrite + Unpin),
    magic: i32,
) -> std::io::Result<()> {
    w.write_all(&magic.to_le_bytes()).await?;
    w.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn frame(body: &[u8]) -> BytesMut {
        let mut b = BytesMut::new();
        b.put_i32_le(body.len() as i32);
        b.put_slice(body);
        b
    }

    #[test]
    fn encodes_length_prefixed_json() {
        let mut buf = BytesMut::new();
        JsonFrameCodec::new().encode(&json!([4, "k", "", 1]), &mut buf).unwrap();
        assert_eq!(&buf[..4], &(buf.len() as i32 - 4).to_le_bytes());
        assert_eq!(&buf[4..], br#"[4,"k","",1]"#);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let whole = frame(br#"[6]"#);
        for cut in 0..whole.len() {
            let mut src = BytesMut::from(&whole[..cut]);
            assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), None, "cut at {cut}");
            src.extend_from_slice(&whole[cut..]);
            assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), Some(json!([6])));
            assert!(src.is_empty());
        }
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut src = frame(b"1");
        src.extend_from_slice(&frame(br#"{"a": [null, 2]}"#));
        assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), Some(json!(1)));
        assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), Some(json!({"a": [null, 2]})));
        assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), None);
    }

    #[test]
    fn zero_and_negative_lengths_are_rejected() {
        for len in [0i32, -1, i32::MIN] {
            let mut src = BytesMut::from(&len.to_le_bytes()[..]);
            let err = JsonFrameCodec::new().decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::BadFrame { .. }), "{len}: {err:?}");
        }
    }

    #[test]
    fn huge_lengths_are_rejected_before_buffering() {
        for len in [MAX_FRAME as i32 + 1, i32::MAX] {
            let mut src = BytesMut::from(&len.to_le_bytes()[..]);
            let err = JsonFrameCodec::new().decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::FrameTooLarge { len: l, .. } if l == len as usize));
        }
        // Exactly MAX_FRAME is allowed: it waits for the body.
        let mut src = BytesMut::from(&(MAX_FRAME as i32).to_le_bytes()[..]);
        assert_eq!(JsonFrameCodec::new().decode(&mut src).unwrap(), None);
    }

    #[test]
    fn invalid_utf8_and_json_are_rejected() {
        let mut src = frame(b"[\"\xff\xfe\"]");
        assert!(matches!(
            JsonFrameCodec::new().decode(&mut src),
            Err(TrackerError::InvalidUtf8 { .. })
        ));
        for body in [&b"[1,"[..], b"{", b"nope", b"[1] [2]", b" "] {
            let mut src = frame(body);
            let err = JsonFrameCodec::new().decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::InvalidJson { .. }), "{body:?}: {err:?}");
        }
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_not_a_clean_end() {
        let mut empty = BytesMut::new();
        assert_eq!(JsonFrameCodec::new().decode_eof(&mut empty).unwrap(), None);
        let mut src = BytesMut::from(&frame(b"[1, 2]")[..6]);
        assert!(matches!(
            JsonFrameCodec::new().decode_eof(&mut src),
            Err(TrackerError::BadFrame { .. })
        ));
        let mut src = BytesMut::from(&[1u8, 0][..]);
        assert!(matches!(
            JsonFrameCodec::new().decode_eof(&mut src),
            Err(TrackerError::BadFrame { .. })
        ));
    }

    #[test]
    fn oversized_encodes_are_refused_and_leave_nothing() {
        let mut dst = BytesMut::from(&b"keep"[..]);
        let big = Value::String("x".repeat(MAX_FRAME));
        let err = JsonFrameCodec::new().encode(&big, &mut dst).unwrap_err();
        assert!(matches!(err, TrackerError::FrameTooLarge { len, .. } if len == MAX_FRAME + 2));
        assert_eq!(&dst[..], b"keep");
    }

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert!(!json_depth_exceeds(b"1", 0));
        assert!(json_depth_exceeds(b"[]", 0));
        assert!(!json_depth_exceeds(b"[[],{\"a\":[]}]", 3));
        assert!(json_depth_exceeds(b"[[[]]]", 2));
        assert!(!json_depth_exceeds(br#"["[[[[", "\"[[[", {"{{{": "]]]"}]"#, 2));
        let deep = format!("{}{}", "[".repeat(1_000_000), "]".repeat(1_000_000));
        assert!(json_depth_exceeds(deep.as_bytes(), 128), "a million levels, no stack overflow");
    }

    #[test]
    fn too_deep_is_typed_and_the_request_decoder_stays_in_sync() {
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        let mut src = frame(deep.as_bytes());
        let err = JsonFrameCodec::new().decode(&mut src).unwrap_err();
        assert!(matches!(err, TrackerError::TooDeep { limit: MAX_REPLY_DEPTH }), "{err:?}");

        let mut codec = RequestCodec(JsonFrameCodec::tracker(4));
        let mut src = frame(b"[[[[[1]]]]]");
        src.extend_from_slice(&frame(b"[1]"));
        let first = codec.decode(&mut src).unwrap().unwrap();
        assert!(matches!(first, Err(TrackerError::TooDeep { limit: 4 })), "{first:?}");
        assert_eq!(codec.decode(&mut src).unwrap().unwrap().unwrap(), json!([1]));
    }

    #[test]
    fn the_client_reads_replies_larger_than_requests() {
        let big = Value::String("x".repeat(MAX_FRAME + 10));
        let mut buf = BytesMut::new();
        assert!(JsonFrameCodec::client().encode(&big, &mut buf).is_err(), "requests stay small");
        JsonFrameCodec::tracker(0).encode(&big, &mut buf).unwrap();
        assert!(JsonFrameCodec::new().decode(&mut buf.clone()).is_err());
        assert_eq!(JsonFrameCodec::client().decode(&mut buf).unwrap(), Some(big));
        let mut src = BytesMut::from(&(MAX_REPLY as i32 + 1).to_le_bytes()[..]);
        let err = JsonFrameCodec::client().decode(&mut src).unwrap_err();
        assert!(matches!(err, TrackerError::FrameTooLarge { limit: MAX_REPLY, .. }), "{err:?}");
    }

    fn arb_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            // Dyadic fractions with at most 12 significant digits: exact in
            // binary and in decimal, and within serde_json's exact parsing
            // fast path (the default build does not round-trip every f64).
            (-1_000_000i32..1_000_000).prop_map(|i| Value::from(f64::from(i) / 64.0)),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..8)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn decoder_never_panics_on_arbitrary_bytes(
            bytes in prop::collection::vec(any::<u8>(), 0..256),
            split in 0usize..256,
        ) {
            let mut codec = JsonFrameCodec::new();
            let split = split.min(bytes.len());
            let mut src = BytesMut::from(&bytes[..split]);
            let mut fed_rest = false;
            loop {
                match codec.decode(&mut src) {
                    Ok(Some(_)) => continue,
                    Ok(None) if !fed_rest => {
                        src.extend_from_slice(&bytes[split..]);
                        fed_rest = true;
                    }
                    Ok(None) => {
                        let _ = codec.decode_eof(&mut src);
                        break;
                    }
                    Err(_) => break,
                }
            }
        }

        #[test]
        fn arbitrary_json_round_trips(value in arb_json()) {
            let mut buf = BytesMut::new();
            JsonFrameCodec::new().encode(&value, &mut buf).unwrap();
            let back = JsonFrameCodec::new().decode(&mut buf).unwrap().unwrap();
            prop_assert!(buf.is_empty());
            prop_assert_eq!(back, value);
        }
    }
}
