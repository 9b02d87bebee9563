//! The tracker's summary (reply to `SUMMARY`) and its text rendering, which
//! reproduces TVM's `TrackerSession.text_summary()` character for character.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Map, Value};

use super::error::TrackerError;

/// The state of one device key's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueInfo {
    /// Servers registered (PUT) and not leased.
    pub free: usize,
    /// Requests waiting for a server.
    pub pending: usize,
}

/// A server connection that described itself with `UPDATE_INFO`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerInfo {
    /// `"server:<key>"`.
    pub key: String,
    /// `(host, port)`: the host the server reported, or the IP its tracker
    /// connection comes from when it reported `null`.
    pub addr: (String, u16),
    /// Any other fields the server sent (TVM merges the whole object).
    pub extra: Map<String, Value>,
}

impl ServerInfo {
    /// The device key: the text after `server:`.
    pub fn device_key(&self) -> &str {
        self.key.split_once(':').map_or("", |(_, rest)| rest)
    }
}

/// The tracker's reply to `SUMMARY`:
/// `{"queue_info": {key: {"free": n, "pending": m}}, "server_info": [{"key": ..., "addr": [host, port]}]}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Every key a server was put to or a client requested, with its counts
    /// (a key stays listed once seen, as in TVM).
    pub queue_info: BTreeMap<String, QueueInfo>,
    /// The connected servers that sent `UPDATE_INFO` with a `server…` key, in
    /// the tracker's order.
    pub server_info: Vec<ServerInfo>,
    /// The reply's body as received.
    pub raw: Value,
}

impl Summary {
    /// Parses the body of a `[0, body]` `SUMMARY` reply.
    ///
    /// # Errors
    ///
    /// [`TrackerError::Protocol`] when the body is not of the shape above.
    pub fn from_json(body: Value) -> Result<Self, TrackerError> {
        let bad = |what: String| TrackerError::protocol(format!("malformed SUMMARY reply: {what}"));
        let queues = body
            .get("queue_info")
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no \"queue_info\" object".into()))?;
        let mut queue_info = BTreeMap::new();
        for (key, q) in queues {
            let count = |field: &str| {
                q.get(field)
                    .and_then(Value::as_u64)
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("queue {key:?} lacks a \"{field}\" count")))
            };
            queue_info.insert(
                key.clone(),
                QueueInfo { free: count("free")?, pending: count("pending")? },
            );
        }
        let servers = body
            .get("server_info")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("no \"server_info\" array".into()))?;
        let mut server_info = Vec::with_capacity(servers.len());
        for s in servers {
            let mut map = s.as_object().cloned().ok_or_else(|| bad(format!("server entry {s}")))?;
            let key = match map.remove("key") {
                Some(Value::String(k)) => k,
                _ => return Err(bad(format!("server entry without a string key: {s}"))),
            };
            let addr = match map.remove("addr") {
                Some(Value::Array(a)) => match a.as_slice() {
                    [Value::String(h), p] => match p.as_u64().and_then(|p| u16::try_from(p).ok()) {
                        Some(p) => (h.clone(), p),
                        None => return Err(bad(format!("server address {s}"))),
                    },
                    _ => return Err(bad(format!("server address {s}"))),
                },
                _ => return Err(bad(format!("server entry without an address: {s}"))),
            };
            server_info.push(ServerInfo { key, addr, extra: map });
        }
        Ok(Summary { queue_info, server_info, raw: body })
    }

    /// The text TVM's `TrackerSession.text_summary()` prints for this summary
    /// (what `python -m tvm.exec.query_rpc_tracker` shows).
    pub fn to_text(&self) -> String {
        let servers =
            self.server_info.iter().map(|s| (s.key.as_str(), format!("{}:{}", s.addr.0, s.addr.1)));
        let queues =
            self.queue_info.iter().map(|(k, q)| (k.as_str(), q.free as u64, q.pending as u64));
        render(servers.collect(), queues.collect())
    }
}

/// Renders a raw `SUMMARY` body exactly as TVM's `text_summary()` does,
/// whatever the address elements are (they are printed with Python's `str`).
pub(crate) fn text_summary_of(body: &Value) -> Result<String, TrackerError> {
    let bad = |what: &str| TrackerError::protocol(format!("malformed SUMMARY reply: {what}"));
    let servers =
        body.get("server_info").and_then(Value::as_array).ok_or_else(|| bad("no server_info"))?;
    let mut rows = Vec::with_capacity(servers.len());
    for s in servers {
        let key =
            s.get("key").and_then(Value::as_str).ok_or_else(|| bad("server without a key"))?;
        let addr = match s.get("addr") {
            Some(Value::Array(items)) => items.iter().map(py_str).collect::<Vec<_>>().join(":"),
            // Python joins the characters of a string address.
            Some(Value::String(text)) => {
                text.chars().map(String::from).collect::<Vec<_>>().join(":")
            }
            _ => return Err(bad("server without an address list")),
        };
        rows.push((key, addr));
    }
    let queues =
        body.get("queue_info").and_then(Value::as_object).ok_or_else(|| bad("no queue_info"))?;
    let mut counts = Vec::with_capacity(queues.len());
    for (key, q) in queues {
        let free =
            q.get("free").and_then(Value::as_u64).ok_or_else(|| bad("queue without free"))?;
        let pending =
            q.get("pending").and_then(Value::as_u64).ok_or_else(|| bad("queue without pending"))?;
        counts.push((key.as_str(), free, pending));
    }
    Ok(render(rows, counts))
}

/// TVM's layout: `client.py`, `TrackerSession.text_summary`.
fn render(mut servers: Vec<(&str, String)>, mut queues: Vec<(&str, u64, u64)>) -> String {
    let mut total_ct: BTreeMap<&str, u64> = BTreeMap::new();
    let mut res = String::new();
    res.push_str("Server List\n");
    res.push_str("------------------------------\n");
    res.push_str("server-address           key\n");
    res.push_str("------------------------------\n");
    // Python's sort is stable, as is `sort_by`; `str` orders by code point
    // like Python's.
    servers.sort_by(|a, b| a.0.cmp(b.0));
    for (key, addr) in &servers {
        let _ = writeln!(res, "{addr:<21}    {key}");
        // `key.split(":")[1]`: "server:rasp3b" -> "rasp3b" (TVM raises an
        // IndexError for a key without ':'; it is simply not counted here).
        if let Some(device) = key.split(':').nth(1) {
            *total_ct.entry(device).or_default() += 1;
        }
    }
    res.push_str("------------------------------\n");
    res.push('\n');

    queues.sort_by(|a, b| a.0.cmp(b.0));
    let max_key_len = queues.iter().map(|q| q.0.chars().count()).max().unwrap_or(0);
    res.push_str("Queue Status\n");
    let title = format!("{:<max_key_len$}   total  free  pending\n", "key");
    // `"-" * len(title)`: the title's length counts its newline.
    let separate_line = format!("{}\n", "-".repeat(title.chars().count()));
    res.push_str(&separate_line);
    res.push_str(&title);
    res.push_str(&separate_line);
    for (key, free, pending) in queues {
        let total = total_ct.get(key).copied().unwrap_or(0);
        if total != 0 || pending != 0 {
            let _ = writeln!(res, "{key:<max_key_len$}   {total:<5}  {free:<4}  {pending:<7}");
        }
    }
    res.push_str(&separate_line);
    res
}

/// Python's `str()` of a JSON-decoded value.
fn py_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => py_repr(other),
    }
}

/// Python's `repr()` of a JSON-decoded value (`None`, `True`, `'text'`, ...).
fn py_repr(v: &Value) -> String {
    match v {
        Value::Null => "None".into(),
        Value::Bool(true) => "True".into(),
        Value::Bool(false) => "False".into(),
        Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => i.to_string(),
            (_, Some(u), _) => u.to_string(),
            (_, _, Some(f)) => py_float_repr(f),
            _ => n.to_string(),
        },
        Value::String(s) => py_str_repr(s),
        Value::Array(items) => {
            format!("[{}]", items.iter().map(py_repr).collect::<Vec<_>>().join(", "))
        }
        Value::Object(map) => format!(
            "{{{}}}",
            map.iter()
                .map(|(k, v)| format!("{}: {}", py_str_repr(k), py_repr(v)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// Python's `repr(float)`: shortest round-trip digits, positional for
/// exponents in `-4..16`, otherwise `d.ddde+XX`.
fn py_float_repr(f: f64) -> String {
    let sci = format!("{f:e}"); // e.g. "1.5e-7", "-3e20"
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    if (-4..16).contains(&exp) {
        let s = f.to_string();
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exp.abs())
    }
}

/// Python's `repr(str)` for the common cases (quotes, backslash, control
/// characters); other characters are kept as they are.
fn py_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_tracker_text() {
        let body = json!({"queue_info": {}, "server_info": []});
        let want = "Server List\n\
                    ------------------------------\n\
                    server-address           key\n\
                    ------------------------------\n\
                    ------------------------------\n\
                    \n\
                    Queue Status\n\
                    ---------------------------\n\
                    key   total  free  pending\n\
                    ---------------------------\n\
                    ---------------------------\n";
        assert_eq!(text_summary_of(&body).unwrap(), want);
        assert_eq!(Summary::from_json(body).unwrap().to_text(), want);
    }

    #[test]
    fn servers_sorted_and_counted_queues_filtered() {
        let body = json!({
            "queue_info": {
                "rasp4": {"free": 1, "pending": 0},
                "gpu": {"free": 0, "pending": 3},
                "idle": {"free": 0, "pending": 0},
            },
            "server_info": [
                {"key": "server:rasp4", "addr": ["10.0.0.2", 9091]},
                {"key": "server:gpu", "addr": ["10.0.0.1", 9090]},
                {"key": "server:rasp4", "addr": ["192.168.100.200", 65535]},
            ],
        });
        let want = "Server List\n\
                    ------------------------------\n\
                    server-address           key\n\
                    ------------------------------\n\
                    10.0.0.1:9090            server:gpu\n\
                    10.0.0.2:9091            server:rasp4\n\
                    192.168.100.200:65535    server:rasp4\n\
                    ------------------------------\n\
                    \n\
                    Queue Status\n\
                    -----------------------------\n\
                    key     total  free  pending\n\
                    -----------------------------\n\
                    gpu     1      0     3      \n\
                    rasp4   2      1     0      \n\
                    -----------------------------\n";
        assert_eq!(text_summary_of(&body).unwrap(), want);
        assert_eq!(Summary::from_json(body).unwrap().to_text(), want);
    }

    #[test]
    fn python_str_of_odd_addresses() {
        assert_eq!(py_str(&json!(null)), "None");
        assert_eq!(py_str(&json!(true)), "True");
        assert_eq!(py_str(&json!(1.0)), "1.0");
        assert_eq!(py_str(&json!(0.5)), "0.5");
        assert_eq!(py_str(&json!(1e16)), "1e+16");
        assert_eq!(py_str(&json!(1.5e-7)), "1.5e-07");
        assert_eq!(py_str(&json!(0.0001)), "0.0001");
        assert_eq!(py_str(&json!(["a", 1, null])), "['a', 1, None]");
        assert_eq!(py_str(&json!("it's")), "it's");
        assert_eq!(py_repr(&json!("it's")), "\"it's\"");
        assert_eq!(py_repr(&json!({"a": "b\n"})), "{'a': 'b\\n'}");
    }

    #[test]
    fn malformed_summaries_are_protocol_errors() {
        for body in [
            json!(1),
            json!({"queue_info": {}}),
            json!({"queue_info": {"k": {"free": 1}}, "server_info": []}),
        ] {
            assert!(Summary::from_json(body.clone()).is_err(), "{body}");
            assert!(text_summary_of(&body).is_err(), "{body}");
        }
    }
}
