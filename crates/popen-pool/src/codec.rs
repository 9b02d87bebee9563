//! Framing: `[magic "PPv2"][u32 big-endian length][postcard body]`, with a
//! maximum frame size. The magic makes a misaligned or garbage header (bytes
//! a task wrote into the channel) an error as soon as its first bytes
//! arrive, instead of a length the reader waits for.
//!
//! The parent uses [`FrameCodec`] through tokio-util's `Framed`; the worker,
//! which is plain blocking code, uses [`read_frame`] and [`write_frame`] with
//! the same layout.
//!
//! Why not tokio-util's `LengthDelimitedCodec` (with `length_field_offset(4)`
//! to step over the magic), as the session protocol uses: it reads the
//! magic as an opaque prefix, so garbage would be taken for a length and
//! waited for (or reported as an oversized frame) instead of failing at
//! once; keeping the check means wrapping its decoder anyway. Its encoder
//! takes an owned `Bytes`, so each message would be serialized into a
//! buffer and then copied into the frame (a second copy of payloads of up to
//! 256 MiB), where [`FrameCodec`] serializes in place behind a reserved
//! header. And the worker, which has no runtime, needs the blocking
//! [`read_frame`]/[`write_frame`] with the same layout regardless.

use std::io::{self, Write};

use bytes::{Buf, BufMut, BytesMut};
use serde::Serialize;
use tokio_util::codec::{Decoder, Encoder};

/// Leads every frame, both ways.
pub(crate) const MAGIC: [u8; 4] = *b"PPv2";
const HEADER: usize = 8;

/// The default maximum frame size: 256 MiB (a 64 MiB payload fits with room).
pub const DEFAULT_MAX_FRAME: usize = 256 << 20;

/// A failure to read or write a frame.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum CodecError {
    /// The underlying channel failed.
    #[error("channel i/o failed: {0}")]
    Io(#[from] io::Error),
    /// A frame exceeds the maximum size.
    #[error("frame of {len} bytes exceeds the maximum of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The bytes at a frame boundary are not a frame header.
    #[error(
        "garbage on the channel: expected a frame header, got bytes {found:02x?} \
         (did task code write to the channel's fd?)"
    )]
    BadMagic { found: Vec<u8> },
    /// A message could not be serialized.
    #[error("cannot encode message: {0}")]
    Encode(#[source] postcard::Error),
}

/// Length-delimited postcard frames with a size limit.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    pub(crate) fn new(max: usize) -> Self {
        FrameCodec { max }
    }
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, CodecError> {
        check_magic(src)?;
        if src.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes(src[4..HEADER].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if src.len() < HEADER + len {
            src.reserve(HEADER + len - src.len());
            return Ok(None);
        }
        src.advance(HEADER);
        Ok(Some(src.split_to(len)))
    }
}

impl<T: Serialize> Encoder<&T> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, item: &T, dst: &mut BytesMut) -> Result<(), CodecError> {
        let start = dst.len();
        dst.put_slice(&MAGIC);
        dst.put_u32(0);
        postcard::to_io(item, dst.writer()).map_err(CodecError::Encode)?;
        let len = dst.len() - start - HEADER;
        if len > self.max {
            dst.truncate(start);
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        dst[start + 4..start + HEADER].copy_from_slice(&(len as u32).to_be_bytes());
        Ok(())
    }
}

/// Fails as soon as the bytes present at a frame boundary differ from the magic.
fn check_magic(src: &[u8]) -> Result<(), CodecError> {
    let n = src.len().min(MAGIC.len());
    if src[..n] == MAGIC[..n] {
        Ok(())
    } else {
        Err(CodecError::BadMagic { found: src[..n].to_vec() })
    }
}

/// Reads one frame into `buf` (blocking). `Ok(false)` on a clean EOF before
/// a frame. (The worker reads in batches, see `serve_loop`; this is the
/// reference reader the tests check the layout with.)
#[cfg(test)]
pub(crate) fn read_frame(
    r: &mut impl std::io::Read,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<bool, CodecError> {
    let mut header = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Ok(false),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => {
                got += n;
                check_magic(&header[..got])?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = u32::from_be_bytes(header[4..].try_into().expect("4 bytes")) as usize;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf)?;
    Ok(true)
}

/// Serializes `msg` into one frame and writes it (blocking).
pub(crate) fn write_frame<T: Serialize>(
    w: &mut impl Write,
    msg: &T,
    scratch: &mut Vec<u8>,
    max: usize,
) -> Result<(), CodecError> {
    scratch.clear();
    scratch.extend_from_slice(&MAGIC);
    scratch.extend_from_slice(&[0; HEADER - 4]);
    postcard::to_io(msg, &mut *scratch).map_err(CodecError::Encode)?;
    let len = scratch.len() - HEADER;
    if len > max {
        return Err(CodecError::TooLarge { len, max });
    }
    scratch[4..HEADER].copy_from_slice(&(len as u32).to_be_bytes());
    w.write_all(scratch)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{FromWorker, Outcome, ToWorker};

    #[test]
    fn round_trip_between_blocking_and_tokio_sides() {
        let mut codec = FrameCodec::new(1024);
        let mut buf = BytesMut::new();
        let payload = [7u8; 100];
        codec.encode(&ToWorker::Run { id: 9, name: "echo", payload: &payload }, &mut buf).unwrap();
        let mut frame = Vec::new();
        assert!(read_frame(&mut &buf[..], &mut frame, 1024).unwrap());
        match postcard::from_bytes::<ToWorker<'_>>(&frame).unwrap() {
            ToWorker::Run { id, name, payload: p } => {
                assert_eq!((id, name, p), (9, "echo", &payload[..]));
            }
            other => panic!("unexpected {other:?}"),
        }

        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        let msg = FromWorker::Done { id: 3, outcome: Outcome::Ok(b"xyz") };
        write_frame(&mut wire, &msg, &mut scratch, 1024).unwrap();
        let mut src = BytesMut::from(&wire[..]);
        let frame = codec.decode(&mut src).unwrap().unwrap();
        assert!(src.is_empty());
        match postcard::from_bytes::<FromWorker<'_>>(&frame).unwrap() {
            FromWorker::Done { id: 3, outcome: Outcome::Ok(b) } => assert_eq!(b, b"xyz"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn partial_frames_wait_for_more_bytes() {
        let mut codec = FrameCodec::new(1024);
        let mut src = BytesMut::from(&b"PPv2\0\0\0\x05\x01\x02"[..]);
        assert!(codec.decode(&mut src).unwrap().is_none());
        src.extend_from_slice(&[3, 4, 5]);
        assert_eq!(&codec.decode(&mut src).unwrap().unwrap()[..], &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn oversized_frames_are_rejected_on_both_sides() {
        let mut codec = FrameCodec::new(16);
        let mut src = BytesMut::from(&b"PPv2\x7f\xff\xff\xff"[..]);
        assert!(matches!(
            codec.decode(&mut src),
            Err(CodecError::TooLarge { len: 0x7fff_ffff, max: 16 })
        ));
        let big = [0u8; 64];
        let mut dst = BytesMut::new();
        let err = codec.encode(&ToWorker::Run { id: 1, name: "x", payload: &big }, &mut dst);
        assert!(matches!(err, Err(CodecError::TooLarge { max: 16, .. })));
        assert!(dst.is_empty(), "a refused frame leaves nothing behind");
        let mut frame = Vec::new();
        let err = read_frame(&mut &b"PPv2\0\0\x01\0"[..], &mut frame, 16);
        assert!(matches!(err, Err(CodecError::TooLarge { len: 256, max: 16 })));
        let mut scratch = Vec::new();
        let err = write_frame(
            &mut Vec::new(),
            &FromWorker::Done { id: 1, outcome: Outcome::Ok(&big) },
            &mut scratch,
            16,
        );
        assert!(matches!(err, Err(CodecError::TooLarge { .. })));
    }

    #[test]
    fn truncated_frame_is_an_error_not_a_clean_eof() {
        let mut frame = Vec::new();
        assert!(!read_frame(&mut &[][..], &mut frame, 16).unwrap());
        assert!(read_frame(&mut &b"PP"[..], &mut frame, 16).is_err());
        assert!(read_frame(&mut &b"PPv2\0\0\0\x04\x01"[..], &mut frame, 16).is_err());
    }

    /// Before the magic, a stray `[0, 0, 0x10, 0]` written by task code
    /// into the channel read as a 4096-byte frame: the reader waited for
    /// bytes that never came (a timeout, or a hang without one).
    #[test]
    fn garbage_before_a_frame_is_an_error_at_once() {
        let mut codec = FrameCodec::new(1 << 20);
        let mut wire = BytesMut::from(&[0u8, 0, 0x10, 0][..]);
        let msg = FromWorker::Done { id: 1, outcome: Outcome::Ok(b"x") };
        let mut scratch = Vec::new();
        let mut good = Vec::new();
        write_frame(&mut good, &msg, &mut scratch, 1 << 20).unwrap();
        wire.extend_from_slice(&good);
        assert!(matches!(codec.decode(&mut wire), Err(CodecError::BadMagic { .. })));
        // Even one byte of garbage is caught before a whole header is in.
        let mut one = BytesMut::from(&b"x"[..]);
        assert!(matches!(codec.decode(&mut one), Err(CodecError::BadMagic { .. })));
        let mut frame = Vec::new();
        let err = read_frame(&mut &b"PQ"[..], &mut frame, 16);
        assert!(matches!(err, Err(CodecError::BadMagic { .. })));
    }
}
