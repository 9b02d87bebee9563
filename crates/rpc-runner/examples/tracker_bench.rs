//! Tracker at scale: prints one JSON line.
//!
//! `cargo run --release -p rpc-runner --example tracker_bench [-- --quick | --n N]`
//!
//! The tracker runs in its own process (this example re-executed with
//! `--serve-tracker`, as `rpc-runner tracker` would run), so `rss_mib` is the
//! tracker's alone. This process plays N fake device servers and M
//! requesters (N = M), each on its own TCP connection speaking TVM's wire
//! protocol (magic, then `[i32 LE length][JSON]` frames); no real server is
//! behind a lease. Per scale (`n1000`, `n10000`; `n200` with `--quick`):
//!
//! - `lease_p50_s` / `lease_p99_s` / `lease_max_s`: the M requesters each
//!   send a `REQUEST` and wait; once the tracker shows all M pending, the N
//!   servers `PUT` one after another, paced evenly over `put_window_s`; a
//!   lease's latency is from its server's `PUT` (just before the write) to the
//!   requester's reading of the `REQUEST` reply.
//! - `cycles_per_s`: then every requester loops: release its lease (the
//!   fake server re-`PUT`s a new matchkey at once, as TVM's servers do after
//!   a session), `REQUEST` again, read the lease. Cycles completed per second
//!   over `cycle_window_s`; `cycle_lease_p50_s` / `_p99_s` / `_max_s`: the
//!   latency of those leases, from the later of the `PUT` and the `REQUEST`
//!   to the reply.
//! - `open_loop_*`: the same cycles paced (open loop): requester `i` starts
//!   one every `N / open_loop_offered_per_s` seconds (50,000 cycles/s in
//!   total, the throughput goal), offset by `i / N` of that period; a slot
//!   missed because the previous cycle was late is skipped and counted in
//!   `open_loop_skipped_slots`. `open_loop_lease_p50_s` / `_p99_s` /
//!   `_max_s`: lease latency at that rate, measured like `cycle_lease_*`.
//!   In the closed loop every requester always waits, so the mean lease
//!   latency is M / `cycles_per_s` (Little's law) whatever the tracker does;
//!   the open loop shows the latency at a given rate.
//! - `tracker_cpu_us_per_cycle`: the tracker process's CPU time (user +
//!   system) over the cycle window, per cycle: what the throughput would be
//!   bound by if the tracker had a core to itself.
//! - `rss_mib`: the tracker's resident memory at the end of the cycles, with
//!   all 2N connections open.
//!
//! `loopback_rtt_s` is the physical reference measured in the same run: the
//! median round trip of 4 bytes over a TCP loopback connection (`TCP_NODELAY`,
//! blocking sockets, two threads). The file descriptor limit is raised to
//! what 2N connections need (the tracker process inherits it); if it cannot
//! be, `fd_note` says so and the scale is reduced to what fits.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener as StdListener, TcpStream as StdStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rpc_runner::tracker::{TRACKER_MAGIC, Tracker, TrackerConfig};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::TcpStream;
use tokio::sync::{Notify, Semaphore, watch};

/// A tracker connection of this bench (reads buffered: one `recv` per frame).
type Conn = AsyncBufReader<TcpStream>;

/// The total rate of the paced cycles (the throughput goal).
const PACED_RATE: f64 = 50_000.0;

/// Descriptors beyond the connections (runtime, stdio, listener, slack).
const FD_SLACK: u64 = 512;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (percentile(&v, 50.0), percentile(&v, 99.0), v.last().copied().unwrap_or(f64::NAN))
}

/// Raises RLIMIT_NOFILE to `want`; returns the limit now in force.
fn raise_fd_limit(want: u64) -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return 1024 };
    if soft >= want {
        return soft;
    }
    if setrlimit(Resource::RLIMIT_NOFILE, want, hard.max(want)).is_ok() {
        return want;
    }
    let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s)
}

/// The median TCP loopback round trip of 4 bytes.
fn loopback_rtt() -> anyhow::Result<f64> {
    let listener = StdListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = [0u8; 4];
        while s.read_exact(&mut buf).is_ok() {
            s.write_all(&buf)?;
        }
        Ok(())
    });
    let mut s = StdStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut buf = [0u8; 4];
    let mut rtts = Vec::with_capacity(5000);
    for i in 0..5000u32 {
        let t = Instant::now();
        s.write_all(&i.to_le_bytes())?;
        s.read_exact(&mut buf)?;
        rtts.push(t.elapsed().as_secs_f64());
    }
    drop(s);
    let _ = echo.join();
    Ok(stats(rtts).0)
}

/// The tracker process: serves until its stdin closes (the bench exits).
fn serve_tracker() -> anyhow::Result<()> {
    // As `rpc-runner tracker` runs it (tokio's work-stealing runtime),
    // unless asked for one thread, for comparison.
    let rt = if std::env::args().any(|a| a == "--current-thread") {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().enable_all().build()?
    };
    rt.block_on(async {
        let config = TrackerConfig::default().max_connections(100_000).max_keys(16);
        let tracker = Tracker::start("127.0.0.1:0", config).await?;
        println!("{}", tracker.addr().port());
        tokio::task::spawn_blocking(|| {
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
        })
        .await?;
        tracker.shutdown().await?;
        Ok(())
    })
}

fn spawn_tracker(current_thread: bool) -> anyhow::Result<(Child, u16)> {
    let mut child = Command::new(std::env::current_exe()?)
        .arg("--serve-tracker")
        .args(current_thread.then_some("--current-thread"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("tracker stdout")?).read_line(&mut line)?;
    let port = line.trim().parse().with_context(|| format!("tracker printed {line:?}"))?;
    Ok((child, port))
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_s(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name (which may hold spaces) in parentheses.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64);
    // utime and stime are fields 14 and 15 of the whole line.
    (ticks(11) + ticks(12)) / hz
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

async fn send_frame(s: &mut Conn, v: &Value) -> anyhow::Result<()> {
    let body = serde_json::to_vec(v)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&i32::try_from(body.len())?.to_le_bytes());
    frame.extend_from_slice(&body);
    s.write_all(&frame).await?;
    Ok(())
}

async fn recv_frame(s: &mut Conn) -> anyhow::Result<Value> {
    let len = s.read_i32_le().await?;
    let len = usize::try_from(len).context("negative frame length")?;
    if len > 64 << 20 {
        bail!("frame of {len} bytes");
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok(serde_json::from_slice(&body)?)
}

async fn connect(port: u16) -> anyhow::Result<Conn> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
    s.set_nodelay(true)?;
    s.write_i32_le(TRACKER_MAGIC).await?;
    let echo = s.read_i32_le().await?;
    if echo != TRACKER_MAGIC {
        bail!("tracker answered the magic with {echo:#x}");
    }
    Ok(AsyncBufReader::new(s))
}

/// Opens `n` tracker connections, at most 128 handshakes at once.
async fn connect_all(port: u16, n: usize) -> anyhow::Result<Vec<Conn>> {
    let gate = Arc::new(Semaphore::new(128));
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await?;
            connect(port).await
        }));
    }
    let mut conns = Vec::with_capacity(n);
    for t in tasks {
        conns.push(t.await??);
    }
    Ok(conns)
}

/// Polls `SUMMARY` until `key` has `pending` waiting requests (30 s at most).
async fn wait_pending(ctl: &mut Conn, key: &str, pending: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        send_frame(ctl, &json!([6])).await?;
        let reply = recv_frame(ctl).await?;
        let got = reply[1]["queue_info"][key]["pending"].as_u64().unwrap_or(0);
        if got as usize == pending {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the tracker shows {got} pending requests for {key}, expected {pending}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What one requester measured.
struct Measured {
    first_lease_s: f64,
    cycle_leases_s: Vec<f64>,
    cycles_in_window: u64,
}

/// Shared by the fake servers and requesters of one scale.
struct Bench {
    key: String,
    base: Instant,
    /// Per server: nanoseconds since `base` at its latest `PUT`.
    put_at: Vec<AtomicU64>,
    /// Per server: set to make it re-`PUT`.
    release: Vec<Notify>,
    stop: AtomicBool,
}

impl Bench {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

async fn fake_server(
    bench: Arc<Bench>,
    idx: usize,
    mut s: Conn,
    first_put: Instant,
) -> anyhow::Result<()> {
    tokio::time::sleep_until(first_put.into()).await;
    for generation in 0u64.. {
        if generation > 0 {
            bench.release[idx].notified().await;
        }
        let put =
            json!([3, bench.key, [9000 + (idx % 50_000), format!("{idx}:{generation}")], null]);
        bench.put_at[idx].store(bench.now_ns(), Ordering::Release);
        send_frame(&mut s, &put).await?;
        let reply = recv_frame(&mut s).await?;
        if reply != json!(0) {
            bail!("PUT answered {reply}");
        }
    }
    Ok(())
}

/// Reads a lease reply; returns the server index it names.
async fn read_lease(s: &mut Conn) -> anyhow::Result<usize> {
    let reply = recv_frame(s).await?;
    let matchkey = reply[1][2].as_str().with_context(|| format!("REQUEST answered {reply}"))?;
    let idx = matchkey.split(':').next().and_then(|i| i.parse().ok());
    idx.with_context(|| format!("lease with matchkey {matchkey:?}"))
}

async fn requester(
    bench: Arc<Bench>,
    mut s: Conn,
    mut go: watch::Receiver<Option<(Instant, Instant)>>,
) -> anyhow::Result<(Measured, Conn, usize)> {
    let request = json!([4, bench.key, "bench", 0]);
    send_frame(&mut s, &request).await?;
    let mut held = read_lease(&mut s).await?;
    let first_lease_s = (bench.now_ns() - bench.put_at[held].load(Ordering::Acquire)) as f64 / 1e9;
    let (from, until) = go.wait_for(Option::is_some).await?.expect("checked");
    let mut cycle_leases_s = Vec::new();
    let mut cycles_in_window = 0;
    while !bench.stop.load(Ordering::Relaxed) {
        let (lease_s, next) = cycle(&bench, &mut s, &request, held).await?;
        held = next;
        let now = Instant::now();
        if now >= from && now < until {
            cycle_leases_s.push(lease_s);
            cycles_in_window += 1;
        }
    }
    Ok((Measured { first_lease_s, cycle_leases_s, cycles_in_window }, s, held))
}

/// One request/release cycle: releases `held` (its fake server re-`PUT`s),
/// requests again; returns the lease's latency (from the later of the
/// `REQUEST` and its server's `PUT` to the reply) and the server now held.
async fn cycle(
    bench: &Bench,
    s: &mut Conn,
    request: &Value,
    held: usize,
) -> anyhow::Result<(f64, usize)> {
    bench.release[held].notify_one();
    let asked = bench.now_ns();
    send_frame(s, request).await?;
    let next = read_lease(s).await?;
    let got = bench.now_ns();
    let both = asked.max(bench.put_at[next].load(Ordering::Acquire));
    Ok((got.saturating_sub(both) as f64 / 1e9, next))
}

/// Paced (open-loop) cycles: requester `idx` of `n` starts one cycle every
/// `period`, its slots offset by `idx / n` of a period, from `from` until
/// `until`; a slot already past when the previous cycle ends is skipped
/// (counted), not made up in a burst. Returns the latencies, the cycles done
/// and the slots skipped; the lease held at the end is released.
async fn paced_requester(
    bench: Arc<Bench>,
    mut s: Conn,
    mut held: usize,
    idx: usize,
    n: usize,
    (from, until, period): (Instant, Instant, Duration),
) -> anyhow::Result<(Vec<f64>, u64, u64)> {
    let request = json!([4, bench.key, "bench", 0]);
    let mut slot = from + period.mul_f64(idx as f64 / n as f64);
    let (mut leases, mut skipped) = (Vec::new(), 0);
    while slot < until {
        tokio::time::sleep_until(slot.into()).await;
        let (lease_s, next) = cycle(&bench, &mut s, &request, held).await?;
        held = next;
        leases.push(lease_s);
        slot += period;
        while slot < Instant::now() {
            slot += period;
            skipped += 1;
        }
    }
    bench.release[held].notify_one();
    let done = leases.len() as u64;
    Ok((leases, done, skipped))
}

async fn run_scale(port: u16, tracker_pid: u32, n: usize, quick: bool) -> anyhow::Result<Value> {
    let key = format!("bench{n}");
    let mut ctl = connect(port).await?;
    let servers = connect_all(port, n).await?;
    let requesters = connect_all(port, n).await?;
    let bench = Arc::new(Bench {
        key: key.clone(),
        base: Instant::now(),
        put_at: (0..n).map(|_| AtomicU64::new(0)).collect(),
        release: (0..n).map(|_| Notify::new()).collect(),
        stop: AtomicBool::new(false),
    });
    let (go_tx, go_rx) = watch::channel(None);
    let req_tasks: Vec<_> = requesters
        .into_iter()
        .map(|s| tokio::spawn(requester(Arc::clone(&bench), s, go_rx.clone())))
        .collect();
    wait_pending(&mut ctl, &key, n).await?;

    // Phase 1: paced PUTs to waiting requesters.
    let put_window = Duration::from_secs_f64(if n <= 1000 { 0.5 } else { 2.0 });
    let start = Instant::now() + Duration::from_millis(50);
    let srv_tasks: Vec<_> = servers
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let at = start + put_window.mul_f64(i as f64 / n as f64);
            tokio::spawn(fake_server(Arc::clone(&bench), i, s, at))
        })
        .collect();
    // Wait for every first lease: all pending requests served.
    wait_pending(&mut ctl, &key, 0).await?;
    tokio::time::sleep_until((start + put_window).into()).await;
    wait_pending(&mut ctl, &key, 0).await?;

    // Phase 2: request/release cycles.
    let warmup = Duration::from_millis(200);
    let window = Duration::from_secs_f64(if quick { 1.0 } else { 3.0 });
    let from = Instant::now() + warmup;
    let until = from + window;
    go_tx.send(Some((from, until)))?;
    tokio::time::sleep_until(from.into()).await;
    let cpu_from = cpu_s(tracker_pid);
    tokio::time::sleep_until(until.into()).await;
    let tracker_cpu = cpu_s(tracker_pid) - cpu_from;
    let rss = rss_mib(tracker_pid);
    bench.stop.store(true, Ordering::Relaxed);
    let mut first = Vec::with_capacity(n);
    let mut cycle = Vec::new();
    let mut cycles = 0;
    let mut conns = Vec::with_capacity(n);
    for t in req_tasks {
        let (m, conn, held) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .context("requester hung")???;
        first.push(m.first_lease_s);
        cycle.extend(m.cycle_leases_s);
        cycles += m.cycles_in_window;
        conns.push((conn, held));
    }

    // Phase 3: the same cycles paced at PACED_RATE in total (open loop).
    let period = Duration::from_secs_f64(n as f64 / PACED_RATE);
    let from = Instant::now() + Duration::from_millis(100);
    let until = from + window;
    let paced_tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, (conn, held))| {
            tokio::spawn(paced_requester(
                Arc::clone(&bench),
                conn,
                held,
                i,
                n,
                (from, until, period),
            ))
        })
        .collect();
    let mut paced = Vec::new();
    let (mut paced_done, mut paced_skipped) = (0, 0);
    for t in paced_tasks {
        let (leases, done, skipped) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .context("paced requester hung")???;
        paced.extend(leases);
        paced_done += done;
        paced_skipped += skipped;
    }
    for t in srv_tasks {
        t.abort();
        let _ = t.await;
    }
    let (p50, p99, max) = stats(first);
    let (c50, c99, cmax) = stats(cycle);
    let (q50, q99, qmax) = stats(paced);
    Ok(json!({
        "servers": n,
        "requesters": n,
        "put_window_s": put_window.as_secs_f64(),
        "lease_p50_s": p50,
        "lease_p99_s": p99,
        "lease_max_s": max,
        "cycle_window_s": window.as_secs_f64(),
        "cycles_per_s": cycles as f64 / window.as_secs_f64(),
        "tracker_cpu_us_per_cycle": tracker_cpu * 1e6 / cycles.max(1) as f64,
        "cycle_lease_p50_s": c50,
        "cycle_lease_p99_s": c99,
        "cycle_lease_max_s": cmax,
        "open_loop_offered_per_s": PACED_RATE,
        "open_loop_cycles_per_s": paced_done as f64 / window.as_secs_f64(),
        "open_loop_skipped_slots": paced_skipped,
        "open_loop_lease_p50_s": q50,
        "open_loop_lease_p99_s": q99,
        "open_loop_lease_max_s": qmax,
        "rss_mib": rss,
    }))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--serve-tracker") {
        return serve_tracker();
    }
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--n").and_then(|i| args.get(i + 1)?.parse().ok());
    let wanted: Vec<usize> = match only {
        Some(n) => vec![n],
        None if quick => vec![200],
        None => vec![1000, 10_000],
    };
    let need = 2 * (*wanted.iter().max().expect("not empty") as u64) + FD_SLACK;
    let limit = raise_fd_limit(need);
    let mut out = serde_json::Map::new();
    out.insert("tracker".into(), json!("separate process (this example, --serve-tracker)"));
    out.insert("fd_limit".into(), json!(limit));
    let fits = usize::try_from(limit.saturating_sub(FD_SLACK) / 2).unwrap_or(usize::MAX);
    let mut scales = Vec::new();
    for &n in &wanted {
        if n <= fits {
            scales.push((format!("n{n}"), n));
        } else {
            out.insert(
                "fd_note".into(),
                json!(format!(
                    "RLIMIT_NOFILE could not be raised to {need}; n{n} ran as {fits} servers + {fits} requesters"
                )),
            );
            scales.push((format!("n{n}"), fits));
        }
    }
    out.insert("loopback_rtt_s".into(), json!(loopback_rtt()?));
    let current_thread = args.iter().any(|a| a == "--tracker-current-thread");
    out.insert(
        "tracker_runtime".into(),
        json!(if current_thread { "current_thread" } else { "multi_thread" }),
    );
    let (mut child, port) = spawn_tracker(current_thread)?;
    let pid = child.id();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let result = rt.block_on(async {
        for (name, n) in scales {
            let figures = run_scale(port, pid, n, quick).await?;
            out.insert(name, figures);
        }
        anyhow::Ok(())
    });
    drop(rt);
    drop(child.stdin.take());
    let _ = child.wait();
    result?;
    println!("{}", Value::Object(out));
    Ok(())
}
