//! TVM's RPC packet framing after the handshake: `[u64 LE nbytes][i32 LE
//! RPCCode][body]`, where `nbytes` counts the code and the body. Reading is
//! bounded: a packet over the limit is an error before anything is
//! allocated, and every field is read through [`Reader`], which never reads
//! past the packet.

use tokio::io::{AsyncRead, AsyncReadExt};

use super::error::TvmError;

/// TVM's `RPCCode` (`src/runtime/minrpc/rpc_reference.h`); only the codes
/// this client sends or expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub(crate) enum RpcCode {
    Shutdown = 1,
    InitServer = 2,
    CallFunc = 3,
    Return = 4,
    Exception = 5,
    CopyFromRemote = 6,
    CopyToRemote = 7,
    CopyAck = 8,
    GetGlobalFunc = 9,
    FreeHandle = 10,
    DevGetAttr = 12,
    DevFreeData = 14,
    DevAllocDataWithScope = 17,
}

/// The protocol version string TVM sends in `kInitServer` (unchanged at
/// 0.21, when the argument encoding changed).
pub(crate) const PROTOCOL_VERSION: &str = "0.8.0";

/// A packet being built: reserves the length, then fields are appended.
#[derive(Debug)]
pub(crate) struct PacketWriter {
    buf: Vec<u8>,
}

impl PacketWriter {
    pub(crate) fn new(code: RpcCode) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&(code as i32).to_le_bytes());
        PacketWriter { buf }
    }

    pub(crate) fn i32(&mut self, v: i32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u32(&mut self, v: u32) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn i64(&mut self, v: i64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    pub(crate) fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_le_bytes());
        self
    }

    pub(crate) fn raw(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// `u64 len` then the bytes.
    pub(crate) fn blob(&mut self, v: &[u8]) -> &mut Self {
        self.u64(v.len() as u64).raw(v)
    }

    /// The finished packet, its length field filled in.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let nbytes = (self.buf.len() - 8) as u64;
        self.buf[..8].copy_from_slice(&nbytes.to_le_bytes());
        self.buf
    }
}

/// A received packet: its code (unvalidated) and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Packet {
    pub(crate) code: i32,
    pub(crate) body: Vec<u8>,
}

/// Reads one packet, refusing (before allocating) one whose announced length
/// exceeds `limit`. I/O errors (EOF included) are returned as they are.
///
/// Not cancel-safe: dropping it mid-packet loses the stream's position (the
/// session marks itself broken around it).
pub(crate) async fn read_packet(
    r: &mut (impl AsyncRead + Unpin),
    limit: u64,
) -> Result<Result<Packet, TvmError>, std::io::Error> {
    let mut head = [0u8; 8];
    r.read_exact(&mut head).await?;
    let nbytes = u64::from_le_bytes(head);
    if nbytes > limit {
        return Ok(Err(TvmError::PacketTooLarge { len: nbytes, limit }));
    }
    if nbytes < 4 {
        return Ok(Err(TvmError::protocol(format!("packet of {nbytes} bytes has no code"))));
    }
    let mut code = [0u8; 4];
    r.read_exact(&mut code).await?;
    let len = usize::try_from(nbytes - 4)
        .map_err(|_| std::io::Error::other("packet length does not fit in memory"))?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Ok(Packet { code: i32::from_le_bytes(code), body }))
}

/// A bounded cursor over a packet body: every read checks what is left.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], TvmError> {
        match usize::try_from(n) {
            Ok(n) if n <= self.buf.len() => {
                let (head, rest) = self.buf.split_at(n);
                self.buf = rest;
                Ok(head)
            }
            _ => Err(TvmError::protocol(format!(
                "truncated packet: {what} needs {n} bytes, {} left",
                self.buf.len()
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], TvmError> {
        let b = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, TvmError> {
        Ok(self.array::<1>(what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, TvmError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i32(&mut self, what: &str) -> Result<i32, TvmError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, TvmError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn i64(&mut self, what: &str) -> Result<i64, TvmError> {
        Ok(i64::from_le_bytes(self.array(what)?))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, TvmError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// `u64 len` then that many bytes (bounded by what is left).
    pub(crate) fn blob(&mut self, what: &str) -> Result<&'a [u8], TvmError> {
        let len = self.u64(what)?;
        self.take(len, what)
    }

    pub(crate) fn finish(&self, what: &str) -> Result<(), TvmError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(TvmError::protocol(format!("{} trailing bytes after {what}", self.buf.len())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn packets_round_trip_and_hostile_lengths_are_refused() {
        let mut w = PacketWriter::new(RpcCode::Return);
        w.i32(1).i32(0);
        let bytes = w.finish();
        assert_eq!(&bytes[..8], &12u64.to_le_bytes());
        let p = read_packet(&mut &bytes[..], 1 << 30).await.unwrap().unwrap();
        assert_eq!((p.code, p.body.len()), (RpcCode::Return as i32, 8));

        // Huge announced length: a typed error, no allocation.
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 4]);
        let err = read_packet(&mut &huge[..], 1 << 30).await.unwrap().unwrap_err();
        assert!(matches!(err, TvmError::PacketTooLarge { len: u64::MAX, .. }), "{err:?}");
        // Too short to hold a code.
        let short = 2u64.to_le_bytes();
        assert!(read_packet(&mut &short[..], 64).await.unwrap().is_err());
        // Truncated: an I/O error (EOF), never a panic.
        let truncated = &bytes[..bytes.len() - 3];
        assert!(read_packet(&mut &truncated[..], 64).await.is_err());
    }

    #[test]
    fn reader_never_reads_past_the_end() {
        let mut r = Reader::new(&[1, 0, 0, 0, 9]);
        assert_eq!(r.i32("a").unwrap(), 1);
        assert!(r.i32("b").is_err());
        assert!(r.u64("c").is_err());
        assert_eq!(r.u8("d").unwrap(), 9);
        assert!(r.finish("e").is_ok());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.push(0);
        let err = Reader::new(&huge).blob("blob").unwrap_err();
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(Reader::new(&[0, 0]).finish("x").is_err());
    }
}
