//! TVM's RPC handshake, spoken by our clients and servers.
//!
//! Client: `i32 LE magic 0xFF271`, `i32 LE len`, `client:<matchkey>[ -timeout=S][ -token=T]`.
//! Server: `i32 LE code`; on success also `i32 LE len` and `server:<key>`.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// TVM's RPC magic, also the success code.
pub const RPC_MAGIC: i32 = 0xFF271;
/// Handshake answer: accepted.
pub const CODE_SUCCESS: i32 = RPC_MAGIC;
/// Handshake answer: the server is busy with another session (TVM's "duplicate").
pub const CODE_DUPLICATE: i32 = RPC_MAGIC + 1;
/// Handshake answer: the match key is not the server's.
pub const CODE_MISMATCH: i32 = RPC_MAGIC + 2;
/// Handshake answer (ours): the server requires a token and this one is wrong.
pub const CODE_UNAUTHORIZED: i32 = RPC_MAGIC + 3;
/// Handshake answer (ours): the server is at its connection limit.
pub const CODE_AT_CAPACITY: i32 = RPC_MAGIC + 4;

/// Longest key string accepted in a handshake.
pub(crate) const MAX_KEY_LEN: usize = 4096;

/// What a client asks for in its handshake.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClientHello {
    pub(crate) matchkey: String,
    pub(crate) timeout: Option<Duration>,
    pub(crate) token: Option<String>,
}

impl ClientHello {
    /// The key string sent on the wire.
    pub(crate) fn to_wire(&self) -> String {
        let mut s = format!("client:{}", self.matchkey);
        if let Some(t) = self.timeout {
            s.push_str(&format!(" -timeout={}", t.as_secs_f64()));
        }
        if let Some(token) = &self.token {
            s.push_str(&format!(" -token={token}"));
        }
        s
    }

    /// Parses a key string; `Err` explains what is wrong.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        let mut parts = s.split_whitespace();
        let head = parts.next().ok_or("empty client key")?;
        let matchkey =
            head.strip_prefix("client:").ok_or("client key must start with 'client:'")?;
        let mut hello = ClientHello { matchkey: matchkey.to_owned(), timeout: None, token: None };
        for opt in parts {
            if let Some(v) = opt.strip_prefix("-timeout=") {
                let secs: f64 = v.parse().map_err(|_| format!("bad -timeout value {v:?}"))?;
                if secs.is_finite() && secs > 0.0 {
                    hello.timeout = Some(Duration::from_secs_f64(secs.min(1e9)));
                }
            } else if let Some(v) = opt.strip_prefix("-token=") {
                hello.token = Some(v.to_owned());
            }
            // Unknown options are ignored, as TVM's server does.
        }
        Ok(hello)
    }
}

/// Why a client's handshake did not succeed.
#[derive(Debug)]
pub(crate) enum HandshakeFailure {
    /// The server answered with this code (one of the `CODE_*` refusals, or
    /// an unknown one).
    Refused(i32),
    /// The exchange itself failed (closed, not an RPC server, bad key).
    Io(std::io::Error),
}

/// The client side of the handshake: sends the magic and `hello`, reads the
/// answer and returns the server's key (without its `server:` prefix).
///
/// Cancel-safe only in the sense that dropping it leaves the stream
/// half-negotiated: the caller drops the stream then.
pub(crate) async fn client_handshake(
    stream: &mut (impl AsyncRead + AsyncWrite + Unpin),
    hello: &ClientHello,
) -> Result<String, HandshakeFailure> {
    client_handshake_send(stream, hello).await?;
    client_handshake_recv(stream).await
}

/// The client's half of the handshake: magic and key. Whatever the client
/// sends after it (its first session frame) may follow at once: the server
/// reads exactly the handshake's bytes before it answers.
pub(crate) async fn client_handshake_send(
    w: &mut (impl AsyncWrite + Unpin),
    hello: &ClientHello,
) -> Result<(), HandshakeFailure> {
    let mut first = RPC_MAGIC.to_le_bytes().to_vec();
    write_str(&mut first, &hello.to_wire()).await.map_err(HandshakeFailure::Io)?;
    w.write_all(&first).await.map_err(HandshakeFailure::Io)
}

/// The server's answer to [`client_handshake_send`]: its key, or the code
/// it refused with. Reads exactly the answer's bytes.
pub(crate) async fn client_handshake_recv(
    stream: &mut (impl AsyncRead + Unpin),
) -> Result<String, HandshakeFailure> {
    let code = read_i32(stream).await.map_err(HandshakeFailure::Io)?;
    if code != CODE_SUCCESS {
        return Err(HandshakeFailure::Refused(code));
    }
    let server = read_str(stream, MAX_KEY_LEN).await.map_err(HandshakeFailure::Io)?;
    Ok(server.strip_prefix("server:").unwrap_or(&server).to_owned())
}

pub(crate) async fn read_i32(r: &mut (impl AsyncRead + Unpin)) -> std::io::Result<i32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).await?;
    Ok(i32::from_le_bytes(b))
}

/// Reads `i32 len` + that many bytes of UTF-8, with `0 < len <= max`.
pub(crate) async fn read_str(
    r: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> std::io::Result<String> {
    let len = read_i32(r).await?;
    if len <= 0 || len as usize > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("key length {len} outside 1..={max}"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf).await?;
    String::from_utf8(buf)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidData, "key is not UTF-8"))
}

pub(crate) async fn write_str(w: &mut (impl AsyncWrite + Unpin), s: &str) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8 + s.len());
    buf.extend_from_slice(&(s.len() as i32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
    w.write_all(&buf).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_key_round_trips() {
        let hello = ClientHello {
            matchkey: "gpu:0.25".into(),
            timeout: Some(Duration::from_secs(20)),
            token: Some("s3cret".into()),
        };
        assert_eq!(hello.to_wire(), "client:gpu:0.25 -timeout=20 -token=s3cret");
        assert_eq!(ClientHello::parse(&hello.to_wire()).unwrap(), hello);
        let plain = ClientHello::parse("client:cpu:1 -unknown=3").unwrap();
        assert_eq!((plain.matchkey.as_str(), plain.timeout, plain.token), ("cpu:1", None, None));
        assert!(ClientHello::parse("server:x").is_err());
        assert!(ClientHello::parse("").is_err());
        assert!(ClientHello::parse("client:x -timeout=abc").is_err());
        // TVM sends -timeout=0 for "no timeout".
        assert_eq!(ClientHello::parse("client:x -timeout=0").unwrap().timeout, None);
    }
}
