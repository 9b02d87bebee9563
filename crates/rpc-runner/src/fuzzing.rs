//! Protocol fuzzing entry points (not a stable API: hidden from the docs).
//!
//! One function per target takes arbitrary bytes and feeds them through the
//! real decoders and state machines, asserting invariants (no panic, bounded
//! output, every decode error typed); an invariant broken is a panic. Both
//! drivers call these same functions: the stable, bounded loop
//! `examples/fuzz_protocols.rs` (run by CI) and the cargo-fuzz targets in
//! `fuzz/` (libFuzzer, nightly). See `docs/fuzzing.md`.
//!
//! Adding a target is one function and one seed list here, and one entry in
//! [`TARGETS`]: both drivers pick it up.

use bytes::BytesMut;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};
use tokio_util::codec::{Decoder, Encoder};

use crate::tracker::TrackerError;
use crate::tracker::fuzz_support::{
    Applied, ConnId, Delivery, JsonFrameCodec, Limits, MAX_KEY_LEN as MAX_DEVICE_KEY,
    MAX_MATCHKEY_LEN, State, TRACKER_DEPTH, TrackerRequest, expect_success, request_codec,
    text_summary_of,
};
use crate::tracker::{Lease, Summary};
use crate::wire::handshake::{ClientHello, MAX_KEY_LEN, RPC_MAGIC, read_i32, read_str};

/// A fuzz target: its name, its entry function and its seed inputs.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The name drivers select it by (`--target NAME`, the cargo-fuzz binary).
    pub name: &'static str,
    /// Runs one input; panics if an invariant breaks.
    pub run: fn(&[u8]),
    /// Valid inputs to start mutating from.
    pub seeds: fn() -> Vec<Vec<u8>>,
    /// Where length-prefixed frames start in a seed: the tracker's frames
    /// start at 0, the handshake's key string after the 4-byte magic.
    /// Mutators use it to find length fields.
    pub frames_at: usize,
}

/// Every target, in the order the stable loop runs them.
pub const TARGETS: &[Target] = &[
    Target { name: "tracker_frame", run: tracker_frame, seeds: tracker_frame_seeds, frames_at: 0 },
    Target { name: "handshake", run: handshake, seeds: handshake_seeds, frames_at: 4 },
    Target { name: "session_frame", run: session_frame, seeds: session_frame_seeds, frames_at: 0 },
];

/// Small limits, so that inputs of a few hundred bytes reach them.
const FUZZ_LIMITS: Limits = Limits { max_keys: 8, max_per_connection: 8, max_info_bytes: 512 };

/// How many tracker connections the target plays.
const CONNS: usize = 3;

/// Tracker frames: the bytes after the handshake, as one connection would
/// send them (or a tracker would reply them).
///
/// The bytes go through the tracker's request decoder in two chunks (the
/// split point depends on the input), each frame through the request
/// parser and the matching state (three connections take turns; a frame
/// whose first byte after the header is odd reconnects its connection),
/// and every decoded value also through the client's reply parsers.
/// Invariants: decode errors are the typed frame errors; a parsed request
/// round-trips through `to_json`; the state never holds more keys or
/// outstanding entries than its limits, so the summary and pending lists
/// stay within their bounds, and every reply encodes within a reply frame.
///
/// # Panics
///
/// When an invariant breaks (that is the point).
pub fn tracker_frame(data: &[u8]) {
    let mut state = State::new(FUZZ_LIMITS);
    let mut conns: Vec<(ConnId, UnboundedReceiver<Delivery>)> =
        (0..CONNS).map(|_| connect(&mut state)).collect();
    let mut codec = request_codec();
    let mut client_codec = JsonFrameCodec::client();
    let split = data.len() / 2 + data.first().map_or(0, |b| usize::from(*b) % 8);
    let split = split.min(data.len());
    let mut buf = BytesMut::from(&data[..split]);
    let mut client_buf = BytesMut::from(data);
    let mut fed_rest = false;
    let mut turn = 0usize;
    loop {
        let item = if fed_rest { codec.decode_eof(&mut buf) } else { codec.decode(&mut buf) };
        match item {
            Ok(Some(item)) => {
                let who = turn % CONNS;
                turn += 1;
                let reply = match item {
                    Ok(value) => {
                        check_reply_parsers(&value);
                        step(&mut state, &mut conns, who, &value)
                    }
                    Err(err) => {
                        assert!(
                            matches!(err, TrackerError::TooDeep { limit } if limit == TRACKER_DEPTH)
                        );
                        json!([-1, err.to_string()])
                    }
                };
                check_encodes(&reply);
            }
            Ok(None) if !fed_rest => {
                buf.extend_from_slice(&data[split..]);
                fed_rest = true;
            }
            Ok(None) => break,
            Err(err) => {
                assert_frame_error(&err);
                break;
            }
        }
    }
    // The client's decoder over the same bytes (replies up to 64 MiB).
    loop {
        match client_codec.decode_eof(&mut client_buf) {
            Ok(Some(value)) => check_reply_parsers(&value),
            Ok(None) => break,
            Err(err) => {
                assert_frame_error(&err);
                break;
            }
        }
    }
    for (id, _) in &conns {
        state.disconnect(*id);
    }
    assert_eq!(state.key_count(), 0, "every key is forgotten once every connection closed");
}

fn connect(state: &mut State) -> (ConnId, UnboundedReceiver<Delivery>) {
    let (tx, rx) = unbounded_channel();
    (state.connect("10.0.0.1".into(), tx), rx)
}

/// One request of connection `who`, applied as the tracker would; returns
/// the reply that would be sent.
fn step(
    state: &mut State,
    conns: &mut [(ConnId, UnboundedReceiver<Delivery>)],
    who: usize,
    value: &Value,
) -> Value {
    let reply = match TrackerRequest::parse(value) {
        Err(err) => {
            let TrackerError::Protocol { message } = &err else { panic!("parse gave {err:?}") };
            assert!(message.len() <= 310, "protocol message of {} bytes", message.len());
            return json!(-1);
        }
        Ok(request) => {
            let again = TrackerRequest::parse(&request.to_json()).expect("to_json parses");
            assert_eq!(again, request, "a request round-trips");
            match state.apply(conns[who].0, request, "stop-key") {
                Applied::Send(v) => v,
                Applied::Later | Applied::Stop => json!(0),
                Applied::WrongStopKey => json!(-1),
                Applied::Refused(reason) => {
                    assert!(reason.len() < 400, "refusal of {} bytes", reason.len());
                    json!([-1, reason])
                }
            }
        }
    };
    // Leases go out; every other one is "undeliverable" and requeued, as
    // when a connection dies with a lease on its way.
    for (i, (_, rx)) in conns.iter_mut().enumerate() {
        while let Ok(delivery) = rx.try_recv() {
            check_encodes(&json!([0, delivery.lease().to_json()]));
            if (i + turn_hint(value)) % 2 == 0 {
                state.requeue(delivery);
            }
        }
    }
    // An odd marker reconnects this connection (withdrawing all it had).
    if turn_hint(value) % 2 == 1 {
        state.disconnect(conns[who].0);
        conns[who] = connect(state);
    }
    check_bounds(state, conns);
    reply
}

/// A number derived from a request (its length in text), to vary the
/// connection's fate without extra input bytes.
fn turn_hint(value: &Value) -> usize {
    match value {
        Value::Array(items) => {
            items.len() + items.first().and_then(Value::as_u64).unwrap_or(0) as usize
        }
        _ => 0,
    }
}

fn check_bounds(state: &State, conns: &[(ConnId, UnboundedReceiver<Delivery>)]) {
    assert!(state.key_count() <= FUZZ_LIMITS.max_keys, "{} keys", state.key_count());
    for (id, _) in conns {
        let pending = state.pending_matchkeys(*id);
        assert!(pending.len() <= FUZZ_LIMITS.max_per_connection, "{} pending", pending.len());
        assert!(pending.iter().all(|m| m.len() <= MAX_MATCHKEY_LEN));
    }
    let summary = serde_json::to_vec(&state.summary()).expect("summary serializes");
    // Each key: its text (escaped, at most 6 bytes a byte) and the counts;
    // each connection: its info.
    let bound = FUZZ_LIMITS.max_keys * (6 * MAX_DEVICE_KEY + 64)
        + CONNS * 2 * (FUZZ_LIMITS.max_info_bytes + 8)
        + 64;
    assert!(summary.len() <= bound, "summary of {} bytes exceeds {bound}", summary.len());
}

/// The client's parsers must turn any value into a result, never a panic.
fn check_reply_parsers(value: &Value) {
    let _ = Lease::from_reply(value);
    let _ = expect_success(value, "PING");
    if let Some(body) = value.as_array().and_then(|a| a.get(1)) {
        let _ = Summary::from_json(body.clone()).map(|s| s.to_text());
        let _ = text_summary_of(body);
    }
    let _ = Summary::from_json(value.clone()).map(|s| s.to_text());
    let _ = text_summary_of(value);
}

fn check_encodes(reply: &Value) {
    let mut out = BytesMut::new();
    if let Err(err) = JsonFrameCodec::tracker(0).encode(reply, &mut out) {
        panic!("a reply does not encode: {err}");
    }
}

fn assert_frame_error(err: &TrackerError) {
    assert!(
        matches!(
            err,
            TrackerError::BadFrame { .. }
                | TrackerError::FrameTooLarge { .. }
                | TrackerError::InvalidUtf8 { .. }
                | TrackerError::InvalidJson { .. }
                | TrackerError::TooDeep { .. }
        ),
        "untyped decode error {err:?}"
    );
    assert!(
        err.to_string().len() < 1000,
        "a decode error message of {} bytes",
        err.to_string().len()
    );
}

/// Valid tracker traffic: each request kind, replies of each shape, and a
/// few frames back to back.
pub fn tracker_frame_seeds() -> Vec<Vec<u8>> {
    let values = [
        json!([1]),
        json!([2, "stop-key"]),
        json!([3, "cpu", [9090, "cpu:0.25"], null]),
        json!([3, "gpu", [9091, "gpu:0.5"], "10.0.0.7"]),
        json!([4, "cpu", "", 1]),
        json!([5, {"key": "server:cpu", "addr": [null, 9090]}]),
        json!([5, {"key": "server:gpu", "addr": ["h", 1], "extra": {"a": [1, {"b": null}]}}]),
        json!([6]),
        json!([7]),
        json!([0, ["127.0.0.1", 9090, "cpu:0.25"]]),
        json!([0, {"queue_info": {"cpu": {"free": 1, "pending": 0}},
                   "server_info": [{"key": "server:cpu", "addr": ["10.0.0.1", 9090]}]}]),
        json!([-1, "reason"]),
        json!(["cpu:0.25", "gpu:0.5"]),
    ];
    let mut seeds: Vec<Vec<u8>> = values.iter().map(|v| frame(v.to_string().as_bytes())).collect();
    // A server's session: info, put, a request that matches it, summary.
    let mut session = Vec::new();
    for v in [
        json!([5, {"key": "server:cpu", "addr": [null, 9090]}]),
        json!([3, "cpu", [9090, "cpu:0.1"], null]),
        json!([4, "cpu", "", 0]),
        json!([3, "cpu", [9090, "cpu:0.2"], null]),
        json!([4, "cpu", "", 5]),
        json!([6]),
        json!([7]),
    ] {
        session.extend(frame(v.to_string().as_bytes()));
    }
    seeds.push(session);
    // Many keys and entries: at and past the (small) limits.
    let mut crowd = Vec::new();
    for i in 0..10 {
        crowd.extend(frame(json!([4, format!("k{i}"), "", i]).to_string().as_bytes()));
        crowd.extend(frame(
            json!([3, format!("k{i}"), [i, format!("k{i}:0.{i}")], null]).to_string().as_bytes(),
        ));
    }
    seeds.push(crowd);
    seeds
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = (body.len() as i32).to_le_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

/// TVM's RPC handshake as a server receives it: `i32` magic, `i32` length,
/// `client:<matchkey>[ -timeout=S][ -token=T]`.
///
/// Goes through the real readers (`read_i32`, `read_str` with the
/// server's key limit) and the key parser. Invariants: a key read is at
/// most the limit; a parsed hello has a matchkey without whitespace, a
/// finite timeout of at most 1e9 s, and survives `to_wire` and parsing
/// again (same matchkey and token).
///
/// # Panics
///
/// When an invariant breaks.
pub fn handshake(data: &[u8]) {
    let mut reader = data;
    let read = futures::executor::block_on(async {
        let magic = read_i32(&mut reader).await?;
        let key = read_str(&mut reader, MAX_KEY_LEN).await?;
        Ok::<_, std::io::Error>((magic, key))
    });
    if let Ok((_magic, key)) = &read {
        assert!(key.len() <= MAX_KEY_LEN, "a key of {} bytes", key.len());
        check_hello(key);
    }
    // The key parser on its own, on any text.
    check_hello(&String::from_utf8_lossy(data));
}

fn check_hello(key: &str) {
    let Ok(hello) = ClientHello::parse(key) else { return };
    assert!(!hello.matchkey.contains(char::is_whitespace), "{:?}", hello.matchkey);
    if let Some(t) = hello.timeout {
        assert!(t.as_secs_f64() <= 1e9 + 1.0, "timeout {t:?}");
    }
    let again = ClientHello::parse(&hello.to_wire()).expect("to_wire parses");
    assert_eq!((&again.matchkey, &again.token), (&hello.matchkey, &hello.token));
}

/// Valid handshakes: plain, with a timeout, with a token, both.
pub fn handshake_seeds() -> Vec<Vec<u8>> {
    [
        "client:cpu:0.25",
        "client:cpu:0.25 -timeout=10",
        "client:gpu:0.5 -timeout=0 -token=s3cret",
        "client:k -token=t -timeout=1.5 -other=x",
    ]
    .iter()
    .map(|key| {
        let mut seed = RPC_MAGIC.to_le_bytes().to_vec();
        seed.extend(frame(key.as_bytes()));
        seed
    })
    .collect()
}

/// Payload limit of the session codec under fuzzing: small, so that inputs of
/// a few hundred bytes reach the oversized-frame path.
const SESSION_FUZZ_MAX: usize = 96;

/// Session data-plane frames (`[u32 BE len][postcard]`), as either side
/// would receive them after the handshake.
///
/// The bytes go through the real frame decoder (the one client and server
/// use, with a small limit) in two chunks, then every frame through the
/// request and the response decoders, and every oversized frame's head
/// through the id peek the server answers it with. Invariants: the decoder
/// never buffers more than one frame within the limit; a frame is within the
/// limit, an oversized one is reported with its length and at most
/// `HEAD` (24) bytes; the decoder accounts for every
/// input byte; a decoded message's encoding is stable (decode, encode,
/// decode, encode gives the same bytes twice).
///
/// # Panics
///
/// When an invariant breaks.
pub fn session_frame(data: &[u8]) {
    use crate::wire::codec::{FrameCodec, HEAD, Inbound};
    use crate::wire::proto::{Request, Response, peek_id};

    let mut codec = FrameCodec::new(SESSION_FUZZ_MAX);
    let split = data.first().map_or(0, |&b| usize::from(b) % (data.len() + 1));
    let mut buf = BytesMut::new();
    let mut accounted = 0usize;
    for piece in [&data[..split], &data[split..]] {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            let item = codec.decode(&mut buf).expect("the frame decoder never fails");
            accounted += before - buf.len();
            let Some(item) = item else {
                // Waiting for more: at most one frame within the limit is held.
                assert!(buf.len() < 4 + SESSION_FUZZ_MAX, "buffered {} bytes", buf.len());
                break;
            };
            match item {
                Inbound::Frame(frame) => {
                    assert!(frame.len() <= SESSION_FUZZ_MAX);
                    // Postcard accepts overlong varints, so a message need not
                    // re-encode to its input; its encoding must be stable.
                    if let Ok(req) = postcard::from_bytes::<Request<'_>>(&frame) {
                        let again = postcard::to_stdvec(&req).expect("requests encode");
                        let req2: Request<'_> = postcard::from_bytes(&again).expect("decodes");
                        let third = postcard::to_stdvec(&req2).expect("requests encode");
                        assert_eq!(again, third, "{}", req.kind());
                    }
                    if let Ok(resp) = postcard::from_bytes::<Response<'_>>(&frame) {
                        let again = postcard::to_stdvec(&resp).expect("responses encode");
                        let resp2: Response<'_> = postcard::from_bytes(&again).expect("decodes");
                        let third = postcard::to_stdvec(&resp2).expect("responses encode");
                        assert_eq!(again, third, "{}", resp.kind());
                        let _ = resp.id();
                    }
                }
                Inbound::TooLarge { len, head } => {
                    assert!(len > SESSION_FUZZ_MAX as u64 && head.len() <= HEAD);
                    let _ = peek_id(&head);
                }
            }
        }
    }
    // What is left is an incomplete frame (or the rest of an oversized one).
    assert!(accounted + buf.len() == data.len(), "bytes lost by the decoder");
    let _ = codec.decode_eof(&mut buf);
}

/// Valid session frames of both directions (one frame per seed, and a
/// whole upload as one seed).
pub fn session_frame_seeds() -> Vec<Vec<u8>> {
    use crate::wire::error::WireError;
    use crate::wire::proto::{
        CHUNK_VARIANT, Request, Response, SESSION_PROTOCOL_VERSION, UPLOAD_CHUNK, data_frame,
        msg_frame,
    };

    let encoded = |frames: Vec<crate::wire::codec::Outbound<'_>>| {
        let mut codec = crate::wire::codec::FrameCodec::new(usize::MAX);
        let mut out = BytesMut::new();
        for f in frames {
            codec.encode(f, &mut out).expect("seed frames encode");
        }
        out.to_vec()
    };
    let error = WireError::FrameTooLarge { len: 1 << 30, limit: 64 };
    vec![
        encoded(vec![msg_frame(&Request::Hello { version: SESSION_PROTOCOL_VERSION })]),
        encoded(vec![
            msg_frame(&Request::UploadBegin { id: 2, path: "a/b.so", len: 5 }),
            data_frame(UPLOAD_CHUNK, 2, b"12345"),
            msg_frame(&Request::UploadEnd { id: 2 }),
        ]),
        encoded(vec![msg_frame(&Request::Call {
            id: 3,
            name: "rpc_runner.time_kernel",
            payload: &[1, 2, 3],
            timeout_ms: Some(1000),
        })]),
        encoded(vec![msg_frame(&Request::Cancel { id: 3 }), msg_frame(&Request::Close { id: 4 })]),
        encoded(vec![
            msg_frame(&Response::DownloadBegin { id: 5, len: 3 }),
            data_frame(CHUNK_VARIANT, 5, b"xyz"),
        ]),
        encoded(vec![msg_frame(&Response::Error { id: 6, error })]),
        encoded(vec![msg_frame(&Response::Terminated { error: WireError::ServerShutdown })]),
        encoded(vec![data_frame(UPLOAD_CHUNK, 7, &[9u8; 200])]),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_runs_clean() {
        for target in TARGETS {
            for seed in (target.seeds)() {
                (target.run)(&seed);
            }
        }
    }

    #[test]
    fn the_deep_and_the_huge_run_clean() {
        let deep =
            format!("[5, {{\"addr\": [null, 1], \"d\": {}1{}}}]", "[".repeat(500), "]".repeat(500));
        tracker_frame(&frame(deep.as_bytes()));
        tracker_frame(&i32::MAX.to_le_bytes());
        tracker_frame(&(-1i32).to_le_bytes());
        handshake(&[0x71, 0xf2, 0x0f, 0, 0xff, 0xff, 0xff, 0x7f]);
    }
}
