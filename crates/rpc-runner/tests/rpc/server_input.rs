//! Bad input to the device server: each bad connection is dropped alone, and
//! the server keeps serving well-behaved clients.

use std::time::Duration;

use rpc_runner::session::{CODE_MISMATCH, CODE_SUCCESS, RPC_MAGIC};
use rpc_runner::{ConnectOptions, ServerHandle, Session};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::sessions::server;

async fn still_serves(s: &ServerHandle) {
    let addr = s.addr().to_string();
    let mut sess = Session::connect(&addr, "dev", &ConnectOptions::default())
        .await
        .expect("server still serves");
    sess.upload_bytes(b"ok", "ok").await.unwrap();
    sess.close().await.unwrap();
}

/// Sends `bytes`, then reads until the server closes (bounded); returns what it sent back.
async fn poke(s: &ServerHandle, bytes: &[u8]) -> Vec<u8> {
    let mut c = TcpStream::connect(s.addr()).await.unwrap();
    let _ = c.write_all(bytes).await;
    let _ = c.shutdown().await;
    let mut back = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), c.read_to_end(&mut back)).await;
    assert!(read.is_ok(), "server did not close a bad connection");
    back
}

fn handshake(key: &str) -> Vec<u8> {
    let mut b = RPC_MAGIC.to_le_bytes().to_vec();
    b.extend_from_slice(&(key.len() as i32).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b
}

#[tokio::test]
async fn garbage_before_and_after_the_handshake_is_dropped() {
    let s = server(None, "dev", |c| c.handshake_timeout(Duration::from_secs(2))).await;
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for len in [1usize, 3, 4, 7, 64, 4096] {
        let noise: Vec<u8> = (0..len)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        assert!(poke(&s, &noise).await.is_empty(), "random bytes get no answer");
    }
    still_serves(&s).await;

    let mut cases: Vec<Vec<u8>> = Vec::new();
    cases.push(0x1234_5678_i32.to_le_bytes().to_vec()); // wrong magic
    let mut negative = RPC_MAGIC.to_le_bytes().to_vec();
    negative.extend_from_slice(&(-5i32).to_le_bytes());
    cases.push(negative);
    let mut huge = RPC_MAGIC.to_le_bytes().to_vec();
    huge.extend_from_slice(&i32::MAX.to_le_bytes());
    cases.push(huge);
    let mut truncated = handshake("client:dev");
    truncated.truncate(10);
    cases.push(truncated);
    let mut not_utf8 = RPC_MAGIC.to_le_bytes().to_vec();
    not_utf8.extend_from_slice(&2i32.to_le_bytes());
    not_utf8.extend_from_slice(&[0xff, 0xfe]);
    cases.push(not_utf8);
    for case in &cases {
        assert!(poke(&s, case).await.is_empty(), "{case:?} gets no answer");
        still_serves(&s).await;
    }
    // A wrong key is answered with TVM's mismatch code.
    let back = poke(&s, &handshake("client:nope")).await;
    assert_eq!(back, CODE_MISMATCH.to_le_bytes());
    let back = poke(&s, &handshake("server:dev")).await;
    assert!(back.is_empty(), "a malformed client key gets no answer");

    // After a good handshake: garbage frames, an oversized length, a
    // truncated frame. Each ends that session only.
    for tail in [
        vec![0, 0, 0, 3, 0xff, 0xff, 0xff],
        vec![0xff, 0xff, 0xff, 0xff],
        vec![0, 0, 1, 0, 1, 2, 3],
    ] {
        let mut bytes = handshake("client:dev");
        bytes.extend_from_slice(&tail);
        let back = poke(&s, &bytes).await;
        assert_eq!(&back[..4], CODE_SUCCESS.to_le_bytes(), "handshake accepted");
        s.wait_for(Duration::from_secs(20), |st| !st.busy).await.expect("session torn down");
        still_serves(&s).await;
    }
    s.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_silent_client_cannot_hold_the_handshake() {
    let s = server(None, "dev", |c| c.handshake_timeout(Duration::from_millis(300))).await;
    let mut c = TcpStream::connect(s.addr()).await.unwrap();
    c.write_all(&RPC_MAGIC.to_le_bytes()).await.unwrap();
    // ... and never sends its key: the server drops it after the timeout.
    let mut buf = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(20), c.read(&mut buf)).await;
    assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "{r:?}");
    still_serves(&s).await;
    s.shutdown().await.unwrap();
}
