//! The tracker's messages: codes, typed requests parsed from JSON with clear
//! errors, and the replies' shapes.
//!
//! Every request is a JSON array whose first element is a [`TrackerCode`]. The
//! shapes are TVM's (see `docs/tracker.md`); parsing is stricter than TVM's
//! Python tracker in one way only: a field of the wrong type is an error
//! (TVM would often fail later, or not at all), so the connection that sent
//! it is closed. Extra trailing elements are ignored, as in TVM.

use serde_json::{Map, Value, json};

use super::error::TrackerError;

/// The codes of the tracker protocol (TVM's `TrackerCode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TrackerCode {
    /// `-1`: a reply meaning failure (e.g. `STOP` with a wrong key).
    Fail,
    /// `0`: a reply meaning success.
    Success,
    /// `1`: liveness check; replied with `0`.
    Ping,
    /// `2`: stop the tracker, given its stop key.
    Stop,
    /// `3`: a server reports itself free.
    Put,
    /// `4`: lease a free server; replied once one is free.
    Request,
    /// `5`: a server describes itself (shown in the summary).
    UpdateInfo,
    /// `6`: the tracker's queues and servers.
    Summary,
    /// `7`: the matchkeys put on this connection and not yet leased.
    GetPendingMatchkeys,
}

impl TrackerCode {
    /// The code's wire value.
    pub fn as_i64(self) -> i64 {
        match self {
            TrackerCode::Fail => -1,
            TrackerCode::Success => 0,
            TrackerCode::Ping => 1,
            TrackerCode::Stop => 2,
            TrackerCode::Put => 3,
            TrackerCode::Request => 4,
            TrackerCode::UpdateInfo => 5,
            TrackerCode::Summary => 6,
            TrackerCode::GetPendingMatchkeys => 7,
        }
    }

    /// The code of a wire value, if it is one.
    pub fn from_i64(code: i64) -> Option<Self> {
        Some(match code {
            -1 => TrackerCode::Fail,
            0 => TrackerCode::Success,
            1 => TrackerCode::Ping,
            2 => TrackerCode::Stop,
            3 => TrackerCode::Put,
            4 => TrackerCode::Request,
            5 => TrackerCode::UpdateInfo,
            6 => TrackerCode::Summary,
            7 => TrackerCode::GetPendingMatchkeys,
            _ => return None,
        })
    }

    /// TVM's name of the code, e.g. `"GET_PENDING_MATCHKEYS"`.
    pub fn name(self) -> &'static str {
        match self {
            TrackerCode::Fail => "FAIL",
            TrackerCode::Success => "SUCCESS",
            TrackerCode::Ping => "PING",
            TrackerCode::Stop => "STOP",
            TrackerCode::Put => "PUT",
            TrackerCode::Request => "REQUEST",
            TrackerCode::UpdateInfo => "UPDATE_INFO",
            TrackerCode::Summary => "SUMMARY",
            TrackerCode::GetPendingMatchkeys => "GET_PENDING_MATCHKEYS",
        }
    }
}

/// A request a client sends to the tracker, typed.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TrackerRequest {
    /// `[1]` -> `0`.
    Ping,
    /// `[2, stop_key]` -> `0` (and the tracker stops) or `-1` (wrong key).
    Stop {
        /// The key the tracker was started with.
        stop_key: String,
    },
    /// `[3, key, [port, matchkey], custom_addr|null]` -> `0`. The server is
    /// free for `key`; a client leasing it connects to `custom_addr` (or the
    /// IP this connection comes from) at `port` and presents `matchkey`.
    Put {
        /// The device key, e.g. `"rasp4"`.
        key: String,
        /// The server's RPC port.
        port: u16,
        /// The one-time key a client presents to the server.
        matchkey: String,
        /// The address to hand out instead of this connection's peer IP.
        custom_addr: Option<String>,
    },
    /// `[4, key, user, priority]` -> `[0, [host, port, matchkey]]` once a
    /// server of `key` is free.
    Request {
        /// The device key.
        key: String,
        /// Who is asking (TVM ignores it; so do we).
        user: String,
        /// Higher is served first.
        priority: i64,
    },
    /// `[5, {"key": "server:<key>", "addr": [host|null, port], ...}]` -> `0`.
    /// The object is merged into this connection's info (a `null` host is
    /// replaced with the connection's peer IP).
    UpdateInfo {
        /// The info object, as sent.
        info: Map<String, Value>,
    },
    /// `[6]` -> `[0, {"queue_info": ..., "server_info": [...]}]`.
    Summary,
    /// `[7]` -> the list of matchkeys put on this connection and not leased.
    GetPendingMatchkeys,
}

impl TrackerRequest {
    /// The request's code.
    pub fn code(&self) -> TrackerCode {
        match self {
            TrackerRequest::Ping => TrackerCode::Ping,
            TrackerRequest::Stop { .. } => TrackerCode::Stop,
            TrackerRequest::Put { .. } => TrackerCode::Put,
            TrackerRequest::Request { .. } => TrackerCode::Request,
            TrackerRequest::UpdateInfo { .. } => TrackerCode::UpdateInfo,
            TrackerRequest::Summary => TrackerCode::Summary,
            TrackerRequest::GetPendingMatchkeys => TrackerCode::GetPendingMatchkeys,
        }
    }

    /// Parses a request received from a client.
    ///
    /// # Errors
    ///
    /// [`TrackerError::Protocol`] when `value` is not an array starting with
    /// a request code, the code is unknown (or a reply code), or a field is
    /// missing or of the wrong type.
    pub fn parse(value: &Value) -> Result<Self, TrackerError> {
        let Some(args) = value.as_array() else {
            return Err(TrackerError::protocol(format!(
                "a request must be a JSON array, got {}",
                kind(value)
            )));
        };
        let Some(first) = args.first() else {
            return Err(TrackerError::protocol("empty request array"));
        };
        let Some(code) = first.as_i64() else {
            return Err(TrackerError::protocol(format!(
                "request code must be an integer, got {first}"
            )));
        };
        let code = match TrackerCode::from_i64(code) {
            None => return Err(TrackerError::protocol(format!("unknown request code {code}"))),
            Some(c @ (TrackerCode::Fail | TrackerCode::Success)) => {
                let name = c.name();
                return Err(TrackerError::protocol(format!(
                    "unknown request code {code} ({name})"
                )));
            }
            Some(c) => c,
        };
        let field = |i: usize, what: &str| -> Result<&Value, TrackerError> {
            args.get(i).ok_or_else(|| {
                TrackerError::protocol(format!(
                    "{} request lacks its {what} (element {i})",
                    code.name()
                ))
            })
        };
        let string = |i: usize, what: &str| -> Result<String, TrackerError> {
            let v = field(i, what)?;
            v.as_str().map(str::to_owned).ok_or_else(|| {
                TrackerError::protocol(format!("{} {what} must be a string, got {v}", code.name()))
            })
        };
        Ok(match code {
            TrackerCode::Ping => TrackerRequest::Ping,
            TrackerCode::Summary => TrackerRequest::Summary,
            TrackerCode::GetPendingMatchkeys => TrackerRequest::GetPendingMatchkeys,
            TrackerCode::Stop => TrackerRequest::Stop { stop_key: string(1, "stop key")? },
            TrackerCode::Put => {
                let key = string(1, "key")?;
                let pair = field(2, "[port, matchkey] pair")?;
                let (port, matchkey) = match pair.as_array().map(Vec::as_slice) {
                    Some([port, Value::String(matchkey)]) => {
                        (as_port(port, "PUT")?, matchkey.clone())
                    }
                    _ => {
                        return Err(TrackerError::protocol(format!(
                            "PUT element 2 must be [port, matchkey], got {pair}"
                        )));
                    }
                };
                let custom_addr = match args.get(3) {
                    None | Some(Value::Null) => None,
                    Some(Value::String(addr)) => Some(addr.clone()),
                    Some(other) => {
                        return Err(TrackerError::protocol(format!(
                            "PUT custom address must be a string or null, got {other}"
                        )));
                    }
                };
                TrackerRequest::Put { key, port, matchkey, custom_addr }
            }
            TrackerCode::Request => {
                let key = string(1, "key")?;
                let user = string(2, "user")?;
                let p = field(3, "priority")?;
                let priority = p.as_i64().ok_or_else(|| {
                    TrackerError::protocol(format!("REQUEST priority must be an integer, got {p}"))
                })?;
                TrackerRequest::Request { key, user, priority }
            }
            TrackerCode::UpdateInfo => {
                let v = field(1, "info object")?;
                let Some(info) = v.as_object() else {
                    return Err(TrackerError::protocol(format!(
                        "UPDATE_INFO info must be an object, got {v}"
                    )));
                };
                validate_info(info)?;
                TrackerRequest::UpdateInfo { info: info.clone() }
            }
            TrackerCode::Fail | TrackerCode::Success => unreachable!("rejected above"),
        })
    }

    /// The request as the JSON a client sends.
    pub fn to_json(&self) -> Value {
        let code = self.code().as_i64();
        match self {
            TrackerRequest::Ping
            | TrackerRequest::Summary
            | TrackerRequest::GetPendingMatchkeys => {
                json!([code])
            }
            TrackerRequest::Stop { stop_key } => json!([code, stop_key]),
            TrackerRequest::Put { key, port, matchkey, custom_addr } => {
                json!([code, key, [port, matchkey], custom_addr])
            }
            TrackerRequest::Request { key, user, priority } => json!([code, key, user, priority]),
            TrackerRequest::UpdateInfo { info } => json!([code, info]),
        }
    }
}

/// `addr` must be `[host|null, port]`; `key`, if present, a string.
fn validate_info(info: &Map<String, Value>) -> Result<(), TrackerError> {
    match info.get("addr").and_then(Value::as_array).map(Vec::as_slice) {
        Some([Value::Null | Value::String(_), port]) => {
            as_port(port, "UPDATE_INFO addr")?;
        }
        _ => {
            return Err(TrackerError::protocol(format!(
                "UPDATE_INFO info needs \"addr\": [host or null, port], got {}",
                info.get("addr").map_or_else(|| "nothing".to_owned(), Value::to_string)
            )));
        }
    }
    match info.get("key") {
        None | Some(Value::String(_)) => Ok(()),
        Some(other) => Err(TrackerError::protocol(format!(
            "UPDATE_INFO \"key\" must be a string, got {other}"
        ))),
    }
}

fn as_port(v: &Value, what: &str) -> Result<u16, TrackerError> {
    v.as_u64().and_then(|p| u16::try_from(p).ok()).ok_or_else(|| {
        TrackerError::protocol(format!("{what} port must be an integer in 0..=65535, got {v}"))
    })
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A leased server: where to connect and the matchkey to present there.
///
/// The tracker's reply to `REQUEST` is `[0, [host, port, matchkey]]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The server's host (its custom address, or the IP it registered from).
    pub host: String,
    /// The server's RPC port.
    pub port: u16,
    /// The one-time key to present in the RPC handshake (`client:<matchkey>`).
    pub matchkey: String,
}

impl Lease {
    /// The `[host, port, matchkey]` triple as sent by the tracker.
    pub fn to_json(&self) -> Value {
        json!([self.host, self.port, self.matchkey])
    }

    /// Parses the tracker's reply to `REQUEST`: `[0, [host, port, matchkey]]`.
    ///
    /// # Errors
    ///
    /// [`TrackerError::Refused`] for a `-1` reply, [`TrackerError::Protocol`]
    /// for anything else not of that shape.
    pub fn from_reply(reply: &Value) -> Result<Self, TrackerError> {
        let body = success_body(reply, "REQUEST")?;
        match body.as_array().map(Vec::as_slice) {
            Some([Value::String(host), port, Value::String(matchkey)]) => Ok(Lease {
                host: host.clone(),
                port: as_port(port, "lease")?,
                matchkey: matchkey.clone(),
            }),
            _ => Err(TrackerError::protocol(format!(
                "REQUEST reply must be [0, [host, port, matchkey]], got {reply}"
            ))),
        }
    }
}

/// True for a failure reply: TVM's bare `-1`, or our `[-1, reason]`.
fn is_fail(reply: &Value) -> bool {
    reply.as_i64() == Some(-1)
        || matches!(reply.as_array().map(Vec::as_slice), Some([code, ..]) if code.as_i64() == Some(-1))
}

fn refused(reply: &Value, request: &'static str) -> TrackerError {
    let mut text = reply.to_string();
    if text.len() > 300 {
        let mut end = 300;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str("...");
    }
    TrackerError::Refused { request, reply: text }
}

/// Checks a bare `0` reply (PING, STOP, PUT, UPDATE_INFO).
pub(crate) fn expect_success(reply: &Value, request: &'static str) -> Result<(), TrackerError> {
    match reply.as_i64() {
        Some(0) => Ok(()),
        _ if is_fail(reply) => Err(refused(reply, request)),
        _ => Err(TrackerError::protocol(format!("unexpected reply to {request}: {reply}"))),
    }
}

/// Extracts `body` from a `[0, body]` reply (SUMMARY, REQUEST).
pub(crate) fn success_body<'a>(
    reply: &'a Value,
    request: &'static str,
) -> Result<&'a Value, TrackerError> {
    match reply.as_array().map(Vec::as_slice) {
        Some([code, body]) if code.as_i64() == Some(0) => Ok(body),
        _ if is_fail(reply) => Err(refused(reply, request)),
        _ => Err(TrackerError::protocol(format!("unexpected reply to {request}: {reply}"))),
    }
}

/// A one-time matchkey for `key`: `"<key>:<random>"`, like TVM's
/// `base.random_key(key)` (the random part is a float in `[0, 1)`).
///
/// # Examples
///
/// ```
/// let m = rpc_runner::tracker::random_matchkey("rasp4");
/// assert!(m.starts_with("rasp4:0."));
/// ```
pub fn random_matchkey(key: &str) -> String {
    let r: f64 = rand::random();
    // Keep the "0." form even for a (vanishingly rare) 0.0 or tiny value.
    let mut s = format!("{key}:{r}");
    if !s[key.len() + 1..].contains('.') {
        s.push_str(".0");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for code in -1..=7 {
            assert_eq!(TrackerCode::from_i64(code).unwrap().as_i64(), code);
        }
        assert_eq!(TrackerCode::from_i64(8), None);
    }

    #[test]
    fn parses_every_request_and_round_trips() {
        let cases = [
            json!([1]),
            json!([2, "tracker:0.5"]),
            json!([3, "k", [9090, "k:0.1"], null]),
            json!([3, "k", [9090, "k:0.1"], "10.0.0.1"]),
            json!([4, "k", "", 5]),
            json!([4, "k", "me", -3]),
            json!([5, {"key": "server:k", "addr": [null, 9090]}]),
            json!([5, {"key": "server:k", "addr": ["h", 1], "extra": {"a": 1}}]),
            json!([6]),
            json!([7]),
        ];
        for case in cases {
            let req = TrackerRequest::parse(&case).unwrap();
            assert_eq!(req.to_json(), case);
        }
        // PUT without the custom address (older TVM servers) and with extra elements.
        let req = TrackerRequest::parse(&json!([3, "k", [1, "m"]])).unwrap();
        assert_eq!(req.to_json(), json!([3, "k", [1, "m"], null]));
        assert_eq!(TrackerRequest::parse(&json!([1, "extra"])).unwrap(), TrackerRequest::Ping);
    }

    #[test]
    fn rejects_ill_typed_requests_with_clear_messages() {
        let bad = [
            (json!({"code": 1}), "must be a JSON array"),
            (json!(1), "must be a JSON array"),
            (json!([]), "empty"),
            (json!(["1"]), "code must be an integer"),
            (json!([1.0]), "code must be an integer"),
            (json!([0]), "unknown request code 0 (SUCCESS)"),
            (json!([-1]), "unknown request code -1 (FAIL)"),
            (json!([42]), "unknown request code 42"),
            (json!([2]), "lacks its stop key"),
            (json!([2, 7]), "stop key must be a string"),
            (json!([3, "k"]), "lacks its [port, matchkey]"),
            (json!([3, 1, [1, "m"]]), "key must be a string"),
            (json!([3, "k", [1]]), "must be [port, matchkey]"),
            (json!([3, "k", ["1", "m"]]), "port must be an integer"),
            (json!([3, "k", [70000, "m"]]), "port must be an integer"),
            (json!([3, "k", [1, "m"], 5]), "custom address"),
            (json!([4, "k", ""]), "lacks its priority"),
            (json!([4, "k", "", "high"]), "priority must be an integer"),
            (json!([4, "k", null, 1]), "user must be a string"),
            (json!([5, []]), "info must be an object"),
            (json!([5, {"key": "server:k"}]), "needs \"addr\""),
            (json!([5, {"addr": [1, 2]}]), "needs \"addr\""),
            (json!([5, {"addr": [null, -2]}]), "port must be"),
            (json!([5, {"key": 3, "addr": [null, 2]}]), "\"key\" must be a string"),
        ];
        for (value, want) in bad {
            let err = TrackerRequest::parse(&value).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(want), "{value}: {msg:?} lacks {want:?}");
        }
    }

    #[test]
    fn messages_quoting_huge_values_are_cut() {
        let huge = json!([3, "k", [1, "m"], ["x".repeat(100_000)]]);
        let msg = TrackerRequest::parse(&huge).unwrap_err().to_string();
        assert!(msg.len() < 400 && msg.ends_with("..."), "{} bytes", msg.len());
        let multibyte = json!([4, "k", "", "é".repeat(1000)]);
        assert!(TrackerRequest::parse(&multibyte).unwrap_err().to_string().ends_with("..."));
    }

    #[test]
    fn replies() {
        assert!(expect_success(&json!(0), "PING").is_ok());
        assert!(matches!(expect_success(&json!(-1), "STOP"), Err(TrackerError::Refused { .. })));
        let err = expect_success(&json!([-1, "too big"]), "UPDATE_INFO").unwrap_err();
        assert_eq!(err.to_string(), "the tracker refused UPDATE_INFO: it replied [-1,\"too big\"]");
        assert!(matches!(Lease::from_reply(&json!([-1, "r"])), Err(TrackerError::Refused { .. })));
        assert!(matches!(expect_success(&json!([0]), "PING"), Err(TrackerError::Protocol { .. })));
        let lease = Lease::from_reply(&json!([0, ["1.2.3.4", 9090, "k:0.3"]])).unwrap();
        assert_eq!(lease, Lease { host: "1.2.3.4".into(), port: 9090, matchkey: "k:0.3".into() });
        assert_eq!(lease.to_json(), json!(["1.2.3.4", 9090, "k:0.3"]));
        assert!(Lease::from_reply(&json!([0, ["h", 1]])).is_err());
        assert!(Lease::from_reply(&json!([1, ["h", 1, "m"]])).is_err());
    }

    #[test]
    fn matchkeys_look_like_tvms() {
        let a = random_matchkey("rasp4");
        let b = random_matchkey("rasp4");
        assert_ne!(a, b);
        let (prefix, random) = a.rsplit_once(':').unwrap();
        assert_eq!(prefix, "rasp4");
        assert!(random.parse::<f64>().is_ok_and(|f| (0.0..1.0).contains(&f)), "{a}");
    }
}
