//! The data-plane protocol between a session client and a device server.
//!
//! The connection starts with TVM's handshake (see [`handshake`](super::handshake));
//! after it, both sides exchange length-delimited postcard frames
//! (`[u32 BE len][postcard]`, see [`FrameCodec`](super::codec::FrameCodec))
//! carrying [`Request`]s and [`Response`]s. Requests are answered in order,
//! one at a time; an upload is `UploadBegin`, any number of `UploadChunk`s
//! and `UploadEnd`, answered once; a download is answered by `DownloadBegin`
//! and its `Chunk`s; a call by `CallDone`, or by `CallBegin` and `Chunk`s
//! when its output is larger than a chunk. A client that gives up on a
//! request sends `Cancel { id }`; every answer to a cancelled request is
//! still sent in order, and the client skips answers to ids below its
//! current one.

use serde::{Deserialize, Serialize};

use super::codec::Outbound;
pub(crate) use super::error::WireError;

/// Version of the post-handshake protocol; both sides must agree (3: a
/// worker's death carries popen-pool's `ExitInfo` as itself).
pub(crate) const SESSION_PROTOCOL_VERSION: u32 = 3;

/// Largest frame payload either side sends or accepts by default: 64 MiB +
/// headroom for the message around a 64 MiB byte string.
pub(crate) const MAX_SESSION_FRAME: usize = (64 << 20) + 4096;

/// Size of upload, download and call-output chunks.
pub(crate) const CHUNK: usize = 1 << 20;

/// Index of `Request::UploadChunk` among `Request`'s variants.
pub(crate) const UPLOAD_CHUNK: u32 = 2;
/// Index of `Request::Call` among `Request`'s variants.
#[cfg(test)]
pub(crate) const CALL: u32 = 7;
/// Index of `Response::Chunk` among `Response`'s variants.
pub(crate) const CHUNK_VARIANT: u32 = 3;
/// Index of `Response::CallDone` among `Response`'s variants.
pub(crate) const CALL_DONE: u32 = 5;

/// A frame for `variant { id, data }` (a message whose fields are an id and
/// a byte string, like `UploadChunk`, `Chunk` and `CallDone`), written
/// straight from `data`.
pub(crate) fn data_frame(variant: u32, id: u64, data: &[u8]) -> Outbound<'_> {
    let head = postcard::to_stdvec(&(variant, id, data.len())).expect("integers serialize");
    Outbound::Data { head, data }
}

/// Encodes a message (one without a large byte string) as a frame.
pub(crate) fn msg_frame<T: Serialize>(msg: &T) -> Outbound<'static> {
    Outbound::Msg(postcard::to_stdvec(msg).expect("protocol messages serialize").into())
}

/// The variant index and request id at the start of an encoded message
/// (every message but `Hello` and `Terminated` starts with its id), e.g.
/// from the head of an oversized frame.
pub(crate) fn peek_id(head: &[u8]) -> Option<(u32, u64)> {
    postcard::take_from_bytes::<(u32, u64)>(head).ok().map(|(v, _)| v)
}

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
    /// The client gave up on request `id`: stop it (a running call's worker
    /// is killed, an upload's partial file removed, a streamed answer stops)
    /// and answer it with `Error { id, Cancelled }` if it was not answered
    /// yet (a streamed answer was: its remaining chunks are just not sent).
    Cancel { id: u64 },
}

impl Request<'_> {
    /// The request's name and id, for logs and errors (never its data).
    pub(crate) fn kind(&self) -> String {
        match self {
            Request::Hello { version } => format!("Hello(v{version})"),
            Request::UploadBegin { id, len, .. } => format!("UploadBegin({id}, {len} bytes)"),
            Request::UploadChunk { id, data } => format!("UploadChunk({id}, {} bytes)", data.len()),
            Request::UploadEnd { id } => format!("UploadEnd({id})"),
            Request::Download { id, .. } => format!("Download({id})"),
            Request::Remove { id, .. } => format!("Remove({id})"),
            Request::ListDir { id, .. } => format!("ListDir({id})"),
            Request::Call { id, name, .. } => format!("Call({id}, {name:?})"),
            Request::Close { id } => format!("Close({id})"),
            Request::Cancel { id } => format!("Cancel({id})"),
        }
    }
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
        /// The largest frame payload the server accepts.
        max_frame: u64,
    },
    /// The request `id` succeeded (upload, remove).
    Ok { id: u64 },
    /// A download starts; `len` bytes follow in `Chunk`s.
    DownloadBegin { id: u64, len: u64 },
    /// Next bytes of a download or of a large call output.
    Chunk {
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
    /// The output of a `Call` is `len` bytes, sent in `Chunk`s.
    CallBegin { id: u64, len: u64 },
}

impl Response<'_> {
    /// The response's name and id, for logs and errors (never its data).
    pub(crate) fn kind(&self) -> String {
        match self {
            Response::Hello { version, .. } => format!("Hello(v{version})"),
            Response::Ok { id } => format!("Ok({id})"),
            Response::DownloadBegin { id, len } => format!("DownloadBegin({id}, {len} bytes)"),
            Response::Chunk { id, data } => format!("Chunk({id}, {} bytes)", data.len()),
            Response::Listing { id, entries } => {
                format!("Listing({id}, {} entries)", entries.len())
            }
            Response::CallDone { id, payload } => {
                format!("CallDone({id}, {} bytes)", payload.len())
            }
            Response::Error { id, error } => format!("Error({id}, {error})"),
            Response::Closed { id } => format!("Closed({id})"),
            Response::Terminated { error } => format!("Terminated({error})"),
            Response::CallBegin { id, len } => format!("CallBegin({id}, {len} bytes)"),
        }
    }

    /// The id of the request this answers (`None` for `Hello`, `Terminated`).
    pub(crate) fn id(&self) -> Option<u64> {
        match self {
            Response::Hello { .. } | Response::Terminated { .. } => None,
            Response::Ok { id }
            | Response::DownloadBegin { id, .. }
            | Response::Chunk { id, .. }
            | Response::Listing { id, .. }
            | Response::CallDone { id, .. }
            | Response::Error { id, .. }
            | Response::Closed { id }
            | Response::CallBegin { id, .. } => Some(*id),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(frame: Outbound<'_>) -> Vec<u8> {
        match frame {
            Outbound::Msg(b) => b.to_vec(),
            Outbound::Data { mut head, data } => {
                head.extend_from_slice(data);
                head
            }
        }
    }

    #[test]
    fn data_frames_match_the_encoded_messages() {
        for (id, len) in [(1u64, 0usize), (300, 5), (u64::MAX, 1 << 20)] {
            let data = vec![9u8; len];
            let req = postcard::to_stdvec(&Request::UploadChunk { id, data: &data }).unwrap();
            assert_eq!(payload(data_frame(UPLOAD_CHUNK, id, &data)), req);
            let chunk = postcard::to_stdvec(&Response::Chunk { id, data: &data }).unwrap();
            assert_eq!(payload(data_frame(CHUNK_VARIANT, id, &data)), chunk);
            let done = postcard::to_stdvec(&Response::CallDone { id, payload: &data }).unwrap();
            assert_eq!(payload(data_frame(CALL_DONE, id, &data)), done);
            let call = Request::Call { id, name: "t", payload: &data, timeout_ms: None };
            let call = postcard::to_stdvec(&call).unwrap();
            assert_eq!(peek_id(&call), Some((CALL, id)));
            assert_eq!(
                peek_id(&req[..req.len().min(super::super::codec::HEAD)]),
                Some((UPLOAD_CHUNK, id))
            );
        }
    }

    proptest::proptest! {
        /// The server decodes whatever a client sends without panicking, and
        /// the client whatever a server sends.
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = postcard::from_bytes::<Request<'_>>(&bytes);
            let _ = postcard::from_bytes::<Response<'_>>(&bytes);
            let _ = peek_id(&bytes);
        }

        #[test]
        fn handshake_keys_never_panic(key in "\\PC{0,64}") {
            let _ = super::super::handshake::ClientHello::parse(&key);
        }
    }
}
