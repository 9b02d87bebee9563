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

/// The handshake magic of an RPC server (data plane, TVM's `RPC_MAGIC`). A
/// server answers a matching `client:<matchkey>` with this same value.
pub const RPC_MAGIC: i32 = 0xFF271;

/// The largest frame body, in bytes, either side accepts: 1 MiB (TVM's
/// `MAX_TRACKER_MSG_BYTES`).
pub const MAX_FRAME: usize = 1 << 20;

const HEADER: usize = 4;

/// `[i32 LE length][UTF-8 JSON]` frames over [`serde_json::Value`].
///
/// Decoding fails with [`TrackerError::BadFrame`] for a length of zero or
/// less, [`TrackerError::FrameTooLarge`] above [`MAX_FRAME`],
/// [`TrackerError::InvalidUtf8`] or [`TrackerError::InvalidJson`] for a bad
/// body, and `BadFrame` for a frame cut short by the end of the stream. After
/// an error the stream is out of sync and must be dropped.
///
/// # Examples
///
/// ```
/// use bytes::BytesMut;
/// use rpc_runner::tracker::JsonFrameCodec;
/// use tokio_util::codec::{Decoder, Encoder};
///
/// let mut codec = JsonFrameCodec;
/// let mut buf = BytesMut::new();
/// codec.encode(&serde_json::json!([1]), &mut buf).unwrap();
/// assert_eq!(&buf[..], b"\x03\x00\x00\x00[1]");
/// assert_eq!(codec.decode(&mut buf).unwrap(), Some(serde_json::json!([1])));
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct JsonFrameCodec;

impl Decoder for JsonFrameCodec {
    type Item = Value;
    type Error = TrackerError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Value>, TrackerError> {
        if src.len() < HEADER {
            src.reserve(HEADER - src.len());
            return Ok(None);
        }
        let len = i32::from_le_bytes(src[..HEADER].try_into().expect("4 bytes"));
        if len <= 0 {
            return Err(TrackerError::BadFrame {
                reason: format!("frame length {len} is not positive"),
            });
        }
        let len = len as usize;
        if len > MAX_FRAME {
            return Err(TrackerError::FrameTooLarge { len });
        }
        if src.len() < HEADER + len {
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER);
        let body = src.split_to(len);
        let text =
            std::str::from_utf8(&body).map_err(|source| TrackerError::InvalidUtf8 { source })?;
        let value =
            serde_json::from_str(text).map_err(|source| TrackerError::InvalidJson { source })?;
        Ok(Some(value))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Value>, TrackerError> {
        match self.decode(src)? {
            Some(value) => Ok(Some(value)),
            None if src.is_empty() => Ok(None),
            None => Err(TrackerError::BadFrame {
                reason: format!("stream ended inside a frame ({} bytes left over)", src.len()),
            }),
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
        if len > MAX_FRAME {
            dst.truncate(start);
            return Err(TrackerError::FrameTooLarge { len });
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
        JsonFrameCodec.encode(&json!([4, "k", "", 1]), &mut buf).unwrap();
        assert_eq!(&buf[..4], &(buf.len() as i32 - 4).to_le_bytes());
        assert_eq!(&buf[4..], br#"[4,"k","",1]"#);
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let whole = frame(br#"[6]"#);
        for cut in 0..whole.len() {
            let mut src = BytesMut::from(&whole[..cut]);
            assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), None, "cut at {cut}");
            src.extend_from_slice(&whole[cut..]);
            assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), Some(json!([6])));
            assert!(src.is_empty());
        }
    }

    #[test]
    fn two_frames_in_one_buffer() {
        let mut src = frame(b"1");
        src.extend_from_slice(&frame(br#"{"a": [null, 2]}"#));
        assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), Some(json!(1)));
        assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), Some(json!({"a": [null, 2]})));
        assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), None);
    }

    #[test]
    fn zero_and_negative_lengths_are_rejected() {
        for len in [0i32, -1, i32::MIN] {
            let mut src = BytesMut::from(&len.to_le_bytes()[..]);
            let err = JsonFrameCodec.decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::BadFrame { .. }), "{len}: {err:?}");
        }
    }

    #[test]
    fn huge_lengths_are_rejected_before_buffering() {
        for len in [MAX_FRAME as i32 + 1, i32::MAX] {
            let mut src = BytesMut::from(&len.to_le_bytes()[..]);
            let err = JsonFrameCodec.decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::FrameTooLarge { len: l } if l == len as usize));
        }
        // Exactly MAX_FRAME is allowed: it waits for the body.
        let mut src = BytesMut::from(&(MAX_FRAME as i32).to_le_bytes()[..]);
        assert_eq!(JsonFrameCodec.decode(&mut src).unwrap(), None);
    }

    #[test]
    fn invalid_utf8_and_json_are_rejected() {
        let mut src = frame(b"[\"\xff\xfe\"]");
        assert!(matches!(JsonFrameCodec.decode(&mut src), Err(TrackerError::InvalidUtf8 { .. })));
        for body in [&b"[1,"[..], b"{", b"nope", b"[1] [2]", b" "] {
            let mut src = frame(body);
            let err = JsonFrameCodec.decode(&mut src).unwrap_err();
            assert!(matches!(err, TrackerError::InvalidJson { .. }), "{body:?}: {err:?}");
        }
    }

    #[test]
    fn eof_inside_a_frame_is_an_error_not_a_clean_end() {
        let mut empty = BytesMut::new();
        assert_eq!(JsonFrameCodec.decode_eof(&mut empty).unwrap(), None);
        let mut src = BytesMut::from(&frame(b"[1, 2]")[..6]);
        assert!(matches!(JsonFrameCodec.decode_eof(&mut src), Err(TrackerError::BadFrame { .. })));
        let mut src = BytesMut::from(&[1u8, 0][..]);
        assert!(matches!(JsonFrameCodec.decode_eof(&mut src), Err(TrackerError::BadFrame { .. })));
    }

    #[test]
    fn oversized_encodes_are_refused_and_leave_nothing() {
        let mut dst = BytesMut::from(&b"keep"[..]);
        let big = Value::String("x".repeat(MAX_FRAME));
        let err = JsonFrameCodec.encode(&big, &mut dst).unwrap_err();
        assert!(matches!(err, TrackerError::FrameTooLarge { len } if len == MAX_FRAME + 2));
        assert_eq!(&dst[..], b"keep");
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
            let mut codec = JsonFrameCodec;
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
            JsonFrameCodec.encode(&value, &mut buf).unwrap();
            let back = JsonFrameCodec.decode(&mut buf).unwrap().unwrap();
            prop_assert!(buf.is_empty());
            prop_assert_eq!(back, value);
        }
    }
}
