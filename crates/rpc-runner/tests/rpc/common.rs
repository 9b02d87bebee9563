//! Helpers shared by the test modules: trackers on `127.0.0.1:0`, bounded
//! waits, and a raw tracker connection for feeding it bad input.

use std::future::Future;
use std::time::Duration;

use rpc_runner::tracker::{
    QueueInfo, TRACKER_MAGIC, Tracker, TrackerClient, TrackerConfig, TrackerHandle,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest any single step of a test may take.
pub(crate) const LIMIT: Duration = Duration::from_secs(10);

/// The stop key of [`start_tracker`]'s trackers.
pub(crate) const STOP_KEY: &str = "test-stop-key";

/// Starts a tracker on `127.0.0.1:0` with the stop key [`STOP_KEY`].
pub(crate) async fn start_tracker() -> TrackerHandle {
    let config = TrackerConfig::default().stop_key(STOP_KEY);
    Tracker::start("127.0.0.1:0", config).await.expect("start tracker")
}

/// `"127.0.0.1:port"` of a tracker.
pub(crate) fn addr_of(tracker: &TrackerHandle) -> String {
    tracker.addr().to_string()
}

/// Awaits `fut`, failing the test if it takes longer than [`LIMIT`].
pub(crate) async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(LIMIT, fut).await {
        Ok(value) => value,
        Err(_) => panic!("{what}: not done within {LIMIT:?}"),
    }
}

/// Polls `check` every 10 ms until it returns true, failing after [`LIMIT`].
pub(crate) async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    within(what, async {
        while !check().await {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A key's queue in the tracker's summary (zeros if the key is unknown).
pub(crate) async fn queue(client: &mut TrackerClient, key: &str) -> QueueInfo {
    let summary = within("summary", client.summary()).await.expect("summary");
    summary.queue_info.get(key).copied().unwrap_or_default()
}

/// Waits until the tracker shows `pending` waiting requests for `key`.
pub(crate) async fn wait_pending(client: &mut TrackerClient, key: &str, pending: usize) {
    let what = format!("{pending} pending requests for {key:?}");
    eventually(&what, async || queue(client, key).await.pending == pending).await;
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub(crate) fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("local addr").port()
}

/// A tracker connection driven by hand, byte by byte.
pub(crate) struct RawConn {
    stream: TcpStream,
}

impl RawConn {
    /// Connects without any handshake.
    pub(crate) async fn connect(addr: &str) -> Self {
        let stream = within("connect", TcpStream::connect(addr)).await.expect("connect");
        RawConn { stream }
    }

    /// Connects and completes the magic handshake.
    pub(crate) async fn handshake(addr: &str) -> Self {
        let mut conn = Self::connect(addr).await;
        conn.send_bytes(&TRACKER_MAGIC.to_le_bytes()).await;
        let mut echo = [0u8; 4];
        within("magic echo", conn.stream.read_exact(&mut echo)).await.expect("magic echo");
        assert_eq!(i32::from_le_bytes(echo), TRACKER_MAGIC);
        conn
    }

    /// Writes raw bytes.
    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes)).await.expect("write");
    }

    /// Writes one `[i32 LE len][json]` frame.
    pub(crate) async fn send_json(&mut self, value: &Value) {
        let body = value.to_string();
        let mut frame = (body.len() as i32).to_le_bytes().to_vec();
        frame.extend_from_slice(body.as_bytes());
        self.send_bytes(&frame).await;
    }

    /// Reads one frame.
    pub(crate) async fn recv_json(&mut self) -> Value {
        within("reply", async {
            let len = self.stream.read_i32_le().await.expect("reply length");
            let mut body = vec![0u8; usize::try_from(len).expect("positive length")];
            self.stream.read_exact(&mut body).await.expect("reply body");
            serde_json::from_slice(&body).expect("reply json")
        })
        .await
    }

    /// Closes the writing half (the tracker then sees end of stream).
    pub(crate) async fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown().await;
    }

    /// Waits for the tracker to close the connection; returns what it sent
    /// before that. A reset counts as closed.
    pub(crate) async fn closed_by_tracker(mut self) -> Vec<u8> {
        within("the tracker closing the connection", async {
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                match self.stream.read(&mut buf).await {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return got,
                    Err(e) => panic!("reading until the tracker closes: {e}"),
                }
            }
        })
        .await
    }

    /// Asserts that nothing arrives (and the connection stays open) for `quiet`.
    pub(crate) async fn assert_quiet(&mut self, quiet: Duration) {
        let mut buf = [0u8; 1];
        if let Ok(res) = tokio::time::timeout(quiet, self.stream.read(&mut buf)).await {
            panic!("expected silence, got {res:?}");
        }
    }
}
