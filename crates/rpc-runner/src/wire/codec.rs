//! The session frame codec: `[u32 BE len][payload]`, with a typed answer to
//! an oversized frame instead of a dead connection.
//!
//! A frame longer than the limit is not buffered: the decoder keeps its first
//! [`HEAD`] bytes (enough to decode the message's variant and request id),
//! yields [`Inbound::TooLarge`] and discards the rest as it arrives, so the
//! receiver can answer "frame of N bytes exceeds the limit of M" for that
//! request and go on reading the next frame.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// Bytes of an oversized frame kept for its receiver.
pub(crate) const HEAD: usize = 24;

/// One received frame.
#[derive(Debug)]
pub(crate) enum Inbound {
    /// A frame within the limit.
    Frame(BytesMut),
    /// A frame over the limit: its length and first bytes; the rest is
    /// discarded by the decoder.
    TooLarge { len: u64, head: Bytes },
}

/// One frame to send.
#[derive(Debug)]
pub(crate) enum Outbound<'a> {
    /// An encoded message.
    Msg(Bytes),
    /// A message whose last field is a byte string: `head` is the postcard
    /// encoding up to and including the byte string's length, `data` its
    /// bytes (written into the send buffer without an intermediate copy).
    Data { head: Vec<u8>, data: &'a [u8] },
}

impl Outbound<'_> {
    /// The frame's payload length.
    pub(crate) fn len(&self) -> usize {
        match self {
            Outbound::Msg(b) => b.len(),
            Outbound::Data { head, data } => head.len() + data.len(),
        }
    }
}

/// Encoder and decoder of session frames, both bounded by `max` bytes of payload.
#[derive(Debug, Clone)]
pub(crate) struct FrameCodec {
    max: usize,
    /// Bytes of an oversized frame still to discard.
    skip: u64,
}

impl FrameCodec {
    /// A codec accepting and sending payloads of at most `max` bytes.
    pub(crate) fn new(max: usize) -> Self {
        FrameCodec { max: max.min(u32::MAX as usize), skip: 0 }
    }

    fn discard(&mut self, src: &mut BytesMut) {
        let n = (self.skip.min(src.len() as u64)) as usize;
        src.advance(n);
        self.skip -= n as u64;
    }
}

impl Decoder for FrameCodec {
    type Item = Inbound;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, std::io::Error> {
        if self.skip > 0 {
            self.discard(src);
            if self.skip > 0 {
                return Ok(None);
            }
        }
        let Some(header) = src.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(header.try_into().expect("four bytes")) as usize;
        if len > self.max {
            let keep = len.min(HEAD);
            if src.len() < 4 + keep {
                return Ok(None);
            }
            src.advance(4);
            let head = src.split_to(keep).freeze();
            self.skip = (len - keep) as u64;
            self.discard(src);
            return Ok(Some(Inbound::TooLarge { len: len as u64, head }));
        }
        if src.len() < 4 + len {
            src.reserve(4 + len - src.len());
            return Ok(None);
        }
        src.advance(4);
        Ok(Some(Inbound::Frame(src.split_to(len))))
    }

    fn decode_eof(&mut self, src: &mut BytesMut) -> Result<Option<Inbound>, std::io::Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if src.is_empty() && self.skip == 0 => Ok(None),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a frame",
            )),
        }
    }
}

impl Encoder<Outbound<'_>> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, item: Outbound<'_>, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let len = item.len();
        if len > self.max {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("frame of {len} bytes exceeds the limit of {} bytes", self.max),
            ));
        }
        dst.reserve(4 + len);
        dst.put_u32(len as u32);
        match item {
            Outbound::Msg(b) => dst.put_slice(&b),
            Outbound::Data { head, data } => {
                dst.put_slice(&head);
                dst.put_slice(data);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut v = (len as u32).to_be_bytes().to_vec();
        v.extend(std::iter::repeat_n(fill, len));
        v
    }

    #[test]
    fn oversized_frame_is_reported_and_skipped_in_pieces() {
        let mut codec = FrameCodec::new(100);
        let mut stream = frame(1000, 7);
        stream.extend(frame(3, 9));
        let mut src = BytesMut::new();
        let mut out = Vec::new();
        // Feed the bytes in small pieces, as a socket would.
        for piece in stream.chunks(37) {
            src.extend_from_slice(piece);
            while let Some(item) = codec.decode(&mut src).unwrap() {
                out.push(item);
            }
            assert!(src.len() <= 4 + 100, "an oversized frame must not be buffered");
        }
        assert_eq!(out.len(), 2);
        match &out[0] {
            Inbound::TooLarge { len, head } => {
                assert_eq!(*len, 1000);
                assert_eq!(head.as_ref(), &[7u8; HEAD][..]);
            }
            other => panic!("{other:?}"),
        }
        match &out[1] {
            Inbound::Frame(f) => assert_eq!(f.as_ref(), &[9, 9, 9]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn encoder_refuses_oversized_frames_and_writes_data_frames() {
        let mut codec = FrameCodec::new(8);
        let mut dst = BytesMut::new();
        let err = codec.encode(Outbound::Msg(Bytes::from(vec![0u8; 9])), &mut dst).unwrap_err();
        assert!(err.to_string().contains("exceeds the limit of 8 bytes"), "{err}");
        assert!(dst.is_empty());
        codec.encode(Outbound::Data { head: vec![1, 2], data: &[3, 4, 5] }, &mut dst).unwrap();
        assert_eq!(dst.as_ref(), &[0, 0, 0, 5, 1, 2, 3, 4, 5]);
        let Some(Inbound::Frame(f)) = codec.decode(&mut dst).unwrap() else { panic!() };
        assert_eq!(f.as_ref(), &[1, 2, 3, 4, 5]);
    }

    #[test]
    fn eof_mid_frame_is_an_error() {
        let mut codec = FrameCodec::new(100);
        let mut src = BytesMut::from(&[0u8, 0, 0, 10, 1, 2][..]);
        assert!(codec.decode_eof(&mut src).is_err());
        let mut empty = BytesMut::new();
        assert!(codec.decode_eof(&mut empty).unwrap().is_none());
    }
}
