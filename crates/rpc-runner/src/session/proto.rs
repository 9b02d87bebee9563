//! The data-plane protocol between a session client and a device server.
//!
//! The connection starts with TVM's handshake (see [`handshake`](super::handshake));
//! after it, both sides exchange length-delimited postcard frames
//! (`[u32 BE len][postcard]`, see [`session_codec`]) carrying [`Request`]s
//! and [`Response`]s. Requests are answered in order, one at a time; an upload
//! is `UploadBegin`, any number of `UploadChunk`s and `UploadEnd`, answered
//! once; a download is answered by `DownloadBegin` and its chunks.

use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Version of the post-handshake protocol; both sides must agree.
pub(crate) const SESSION_PROTOCOL_VERSION: u32 = 1;

/// Largest frame either side sends or accepts: 64 MiB + headroom.
pub(crate) const MAX_SESSION_FRAME: usize = (64 << 20) + 4096;

/// Size of upload and download chunks.
pub(crate) const CHUNK: usize = 1 << 20;

/// The session frame codec.
pub(crate) fn session_codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().max_frame_length(MAX_SESSION_FRAME).new_codec()
}

/// The postcard bytes that precede a chunk's data in an encoded
/// `Request::UploadChunk { id, data }` (variant index, id, data length), so a
/// client can write the chunk's data straight from its buffer.
pub(crate) fn upload_chunk_header(id: u64, len: usize) -> Vec<u8> {
    postcard::to_stdvec(&(UPLOAD_CHUNK_VARIANT, id, len)).expect("integers serialize")
}

/// Index of `UploadChunk` among `Request`'s variants (postcard encodes it).
const UPLOAD_CHUNK_VARIANT: u32 = 2;

/// Client to server.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Request<'a> {
    /// First frame after the handshake.
    Hello { version: u32 },
    /// Start writing `len` bytes to `path` (relative to the session dir).
    UploadBegin { id: u64, path: &'a str, len: u64 },
    /// Next bytes of upload `id`.
    UploadChunk {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    /// Upload `id` is complete.
    UploadEnd { id: u64 },
    /// Send the file at `path`.
    Download { id: u64, path: &'a str },
    /// Remove a file or directory (recursively).
    Remove { id: u64, path: &'a str },
    /// List a directory (`""` or `"."`: the session dir).
    ListDir { id: u64, path: &'a str },
    /// Run a task of the server's worker program in the session's worker.
    Call {
        id: u64,
        name: &'a str,
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
        timeout_ms: Option<u64>,
    },
    /// End the session; the server answers `Closed` once it has cleaned up.
    Close { id: u64 },
}

/// Server to client.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Response<'a> {
    /// Answer to `Hello`.
    Hello {
        version: u32,
        /// The server's key.
        key: String,
        /// The session's temp dir on the server (for diagnostics).
        workdir: String,
        /// Upload size limit in bytes.
        max_upload: u64,
        /// The session timeout the server enforces, in ms.
        session_timeout_ms: Option<u64>,
    },
    /// The request `id` succeeded (upload, remove).
    Ok { id: u64 },
    /// A download starts; `len` bytes follow in chunks.
    DownloadBegin { id: u64, len: u64 },
    /// Next bytes of a download.
    DownloadChunk {
        id: u64,
        #[serde(with = "serde_bytes")]
        data: &'a [u8],
    },
    /// A directory listing.
    Listing { id: u64, entries: Vec<DirEntry> },
    /// The output of a `Call`, postcard-encoded.
    CallDone {
        id: u64,
        #[serde(with = "serde_bytes")]
        payload: &'a [u8],
    },
    /// The request `id` failed; the session goes on.
    Error { id: u64, error: WireError },
    /// Answer to `Close`: everything is cleaned up.
    Closed { id: u64 },
    /// The server ends the session (timeout, shutdown); the connection closes next.
    Terminated { error: WireError },
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name.
    pub name: String,
    /// True for a directory.
    pub is_dir: bool,
    /// Size in bytes (0 for directories).
    pub size: u64,
}

/// An error as it travels from server to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    /// A remote path was rejected (absolute, `..`, empty).
    BadPath { path: String, reason: String },
    /// A file or directory does not exist.
    NotFound { path: String },
    /// A filesystem operation failed.
    Io { message: String },
    /// An upload exceeds the server's limit.
    UploadTooLarge { len: u64, limit: u64 },
    /// The task ran past its time limit (the session's worker was replaced).
    TaskTimeout { limit_ms: u64 },
    /// The session's worker died under the task.
    WorkerDied { code: Option<i32>, signal: Option<i32> },
    /// The task returned an error or panicked.
    Task { kind: String, message: String },
    /// The worker program does not register the task.
    UnknownTask { name: String, known: Vec<String> },
    /// Another pool error (spawn, frame size...), as text.
    Worker { message: String },
    /// The session ran past its timeout.
    SessionTimeout { limit_ms: u64 },
    /// The server is shutting down.
    ServerShutdown,
    /// The peer broke the protocol.
    Protocol { message: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_header_matches_the_encoded_request() {
        for (id, len) in [(1u64, 0usize), (300, 5), (u64::MAX, 1 << 20)] {
            let data = vec![9u8; len];
            let full = postcard::to_stdvec(&Request::UploadChunk { id, data: &data }).unwrap();
            let mut manual = upload_chunk_header(id, len);
            manual.extend_from_slice(&data);
            assert_eq!(manual, full);
        }
    }

    proptest::proptest! {
        /// The server decodes whatever a client sends without panicking, and
        /// the client whatever a server sends.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = postcard::from_bytes::<Request<'_>>(&bytes);
            let _ = postcard::from_bytes::<Response<'_>>(&bytes);
        }

        #[test]
        fn handshake_keys_never_panic(key in "\\PC{0,64}") {
            let _ = super::super::handshake::ClientHello::parse(&key);
        }
    }
}
