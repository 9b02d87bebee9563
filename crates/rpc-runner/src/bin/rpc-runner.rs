//! `rpc-runner`: the command-line tracker, device server and query tool, the
//! counterparts of TVM's `rpc_tracker`, `rpc_server` and `query_rpc_tracker`,
//! and `probe`, which tells what a device runs (our server or TVM's).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use popen_pool::WorkerProgram;
use rpc_runner::tracker::{Tracker, TrackerClient, TrackerConfig};
use rpc_runner::{DeviceServer, ServerConfig};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(
    name = "rpc-runner",
    version,
    about = "TVM-compatible RPC tracker, device server and query tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a tracker (TVM's `python -m tvm.exec.rpc_tracker`).
    Tracker {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// First port to try.
        #[arg(long, default_value_t = 9190)]
        port: u16,
        /// Ports up to (excluding) this one are tried in turn.
        #[arg(long, default_value_t = 9199)]
        port_end: u16,
        /// Most connections served at once; more are refused at the
        /// handshake (a TVM client then reports "... is not RPC Tracker").
        #[arg(long, default_value_t = 4096)]
        max_connections: usize,
    },
    /// Run a device server (TVM's `python -m tvm.exec.rpc_server`).
    Server {
        /// Address to listen on.
        #[arg(long, default_value = "0.0.0.0")]
        host: String,
        /// First port to try.
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Ports up to (excluding) this one are tried in turn.
        #[arg(long, default_value_t = 9199)]
        port_end: u16,
        /// Tracker to register with, as HOST:PORT.
        #[arg(long, env = "TVM_TRACKER_ADDR")]
        tracker: Option<String>,
        /// Device key clients request (e.g. "cpu").
        #[arg(long, default_value = "")]
        key: String,
        /// Address the tracker should hand out for this server.
        #[arg(long)]
        custom_addr: Option<String>,
        /// Shared token clients must present (recommended on any shared network).
        #[arg(long, env = "RPC_RUNNER_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Upper bound of every session, in seconds (0: none).
        #[arg(long, value_parser = parse_secs)]
        session_timeout: Option<Duration>,
        /// Most connections handled at once (the session plus clients in
        /// their handshake); more are refused.
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=65536))]
        max_connections: u32,
        /// Largest upload accepted, in MiB.
        #[arg(long, default_value_t = 1024)]
        max_upload_mib: u64,
        /// CPUs the session workers time kernels on, e.g. `1` or `0,2-3`
        /// (default: the last online CPU); the server itself then runs on
        /// the other CPUs.
        #[arg(long, alias = "cpus", value_parser = parse_cpus, conflicts_with = "no_pin")]
        measure_cpus: Option<CpuList>,
        /// Do not pin: session workers and the server keep the affinity
        /// the server was started with.
        #[arg(long)]
        no_pin: bool,
        /// Memory ceiling of a session worker during a task, e.g. `4G`,
        /// `512M` (binary units); a task over it fails alone.
        #[arg(long, value_parser = parse_bytes)]
        memory_limit: Option<u64>,
        /// Directory for the sessions' temp dirs (default: /dev/shm when it is a
        /// writable tmpfs without noexec, else the system temp dir).
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
        /// Keep a warm spare session (a fresh dir and a started worker)
        /// ready, so a lease does not wait for a worker process to start.
        #[arg(long)]
        warm_spare: bool,
        /// Spawn every session worker as a fresh process instead of forking
        /// it from the server's zygote.
        #[arg(long)]
        no_zygote: bool,
    },
    /// Print the C header of the kernel ABI (`tuning_harness_kernel.h`).
    KernelHeader,
    /// Print a tracker's summary (TVM's `python -m tvm.exec.query_rpc_tracker`).
    Query {
        /// Tracker host.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// Tracker port.
        #[arg(long, default_value_t = 9190)]
        port: u16,
    },
    /// Lease one device (or connect to one server) and print what it runs:
    /// our server or TVM's, its protocol, device attributes. Measures nothing.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["tracker", "addr"])))]
    Probe {
        /// Tracker to lease the device from, as HOST:PORT.
        #[arg(long)]
        tracker: Option<String>,
        /// A server to connect to directly, as HOST:PORT.
        #[arg(long)]
        addr: Option<String>,
        /// Device key (with --addr: the server's key).
        #[arg(long, default_value = "")]
        key: String,
        /// Upper bound of the whole probe, in seconds.
        #[arg(long, default_value = "30", value_parser = parse_secs)]
        timeout: Duration,
    },
}

/// A parsed `--measure-cpus` list (a newtype: clap takes a bare `Vec` for
/// repeated values).
#[derive(Debug, Clone)]
struct CpuList(Vec<usize>);

/// A CPU list: `0,2-3` (at most 4096 CPUs).
fn parse_cpus(s: &str) -> std::result::Result<CpuList, String> {
    let mut cpus = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |t: &str| -> std::result::Result<usize, String> {
            t.trim().parse::<usize>().map_err(|_| format!("{t:?} is not a CPU number"))
        };
        let (lo, hi) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if lo > hi || hi >= 4096 {
            return Err(format!("{part:?} is not a CPU range (0 to 4095, low-high)"));
        }
        cpus.extend(lo..=hi);
    }
    if cpus.is_empty() {
        return Err("give at least one CPU".into());
    }
    Ok(CpuList(cpus))
}

/// A size in bytes with an optional binary suffix: `4G`, `512M`, `65536`.
fn parse_bytes(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown unit {c:?} (K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = digits.trim().parse().map_err(|_| format!("{s:?} is not a size"))?;
    n.checked_mul(1u64 << shift).filter(|&b| b > 0).ok_or_else(|| format!("{s:?} is out of range"))
}

/// Seconds as a duration: finite, >= 0 and at most 10^9 (0: none).
fn parse_secs(s: &str) -> std::result::Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s} is out of range: give 0 to 1e9 seconds"));
    }
    Ok(Duration::from_secs_f64(secs))
}

async fn bind_range(host: &str, port: u16, port_end: u16) -> Result<TcpListener> {
    let end = port_end.max(port.saturating_add(1));
    let mut last = None;
    for p in port..end {
        match TcpListener::bind((host, p)).await {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("cannot bind {host} on ports {port}..{end}")),
        None => bail!("empty port range {port}..{end}"),
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutting down");
}

fn local(listener: &TcpListener) -> Result<SocketAddr> {
    listener.local_addr().context("listener address")
}

fn main() -> Result<()> {
    // Session workers are this binary, re-executed: before any thread (the
    // server's zygote forks them from this point).
    popen_pool::serve_if_worker(rpc_runner::tasks::registry());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(run())
}

async fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Tracker { host, port, port_end, max_connections } => {
            let listener = bind_range(&host, port, port_end).await?;
            let config = TrackerConfig::default().max_connections(max_connections);
            println!("tracker listening on {}", local(&listener)?);
            Tracker::run(listener, config, shutdown_signal()).await.context("tracker failed")?;
        }
        Command::Server {
            host,
            port,
            port_end,
            tracker,
            key,
            custom_addr,
            token,
            session_timeout,
            max_connections,
            max_upload_mib,
            measure_cpus,
            no_pin,
            memory_limit,
            work_dir,
            warm_spare,
            no_zygote,
        } => {
            let listener = bind_range(&host, port, port_end).await?;
            let mut config = ServerConfig::new(key, WorkerProgram::current_exe()?)
                .max_connections(max_connections as usize)
                .max_upload_bytes(max_upload_mib.saturating_mul(1 << 20));
            if let Some(addr) = tracker {
                config = config.tracker(addr);
            }
            if let Some(addr) = custom_addr {
                config = config.custom_addr(addr);
            }
            if let Some(token) = token {
                config = config.token(token);
            }
            if let Some(limit) = session_timeout.filter(|d| !d.is_zero()) {
                config = config.session_timeout(limit);
            }
            if let Some(dir) = work_dir {
                config = config.work_root(dir);
            }
            if no_pin {
                config = config.no_worker_cpu_affinity();
            } else {
                let online = rpc_runner::measure::CpuPlan::detect();
                let plan = match measure_cpus {
                    Some(CpuList(cpus)) => {
                        let mut all: Vec<usize> =
                            online.measure.iter().chain(&online.others).copied().collect();
                        all.sort_unstable();
                        if let Some(c) = cpus.iter().find(|c| !all.contains(c)) {
                            bail!("--measure-cpus: CPU {c} is not online (online: {all:?})");
                        }
                        rpc_runner::measure::CpuPlan::with_measure(&all, cpus)
                    }
                    None => online,
                };
                if !plan.others.is_empty() {
                    rpc_runner::measure::pin_this_process(&plan.others)
                        .context("cannot pin the server to the CPUs that do not measure")?;
                }
                config = config.worker_cpu_affinity(plan.measure);
            }
            if let Some(bytes) = memory_limit {
                config = config.worker_memory_limit(bytes);
            }
            config = config.warm_spare(warm_spare).zygote(!no_zygote);
            config.check().await.context("the server cannot serve")?;
            println!("server listening on {}", local(&listener)?);
            DeviceServer::run(listener, config, shutdown_signal())
                .await
                .context("server failed")?;
        }
        Command::KernelHeader => print!("{}", rpc_runner::measure::KERNEL_HEADER),
        Command::Query { host, port } => {
            let addr = format!("{host}:{port}");
            let mut client = TrackerClient::connect(&addr)
                .await
                .with_context(|| format!("cannot query the tracker at {addr}"))?;
            print!("{}", client.text_summary().await?);
        }
        Command::Probe { tracker, addr, key, timeout } => {
            let limit = timeout.max(Duration::from_millis(100));
            let report = tokio::time::timeout(limit, probe(tracker, addr, &key, limit))
                .await
                .with_context(|| format!("the probe did not finish within {limit:?}"))??;
            print!("{report}");
        }
    }
    Ok(())
}

/// Where to open a session: a fresh lease from `tracker`, or `addr` itself.
async fn endpoint(
    tracker: &mut Option<TrackerClient>,
    addr: &Option<String>,
    key: &str,
) -> Result<(String, String)> {
    match (tracker.as_mut(), addr) {
        (Some(client), _) => {
            let lease = client
                .request_lease(key, 1)
                .await
                .with_context(|| format!("cannot lease a device of key {key:?}"))?;
            Ok((format!("{}:{}", lease.host, lease.port), lease.matchkey))
        }
        (None, Some(addr)) => Ok((addr.clone(), key.to_owned())),
        (None, None) => bail!("give --tracker or --addr"),
    }
}

/// Opens a TVM session first: our server refuses TVM's `kInitServer`
/// cleanly, while TVM's Python server would stop serving on our framed
/// protocol (a session process that ends on an undecodable stream kills
/// its listen loop). If TVM's protocol does not decode, a second session
/// (a new lease) tries ours.
async fn probe(
    tracker: Option<String>,
    addr: Option<String>,
    key: &str,
    limit: Duration,
) -> Result<String> {
    use rpc_runner::tvm::{Device, TvmError, TvmOptions, TvmSession, TvmValue, attr};
    use std::fmt::Write as _;
    let mut client = match &tracker {
        Some(t) => Some(
            TrackerClient::connect(t).await.with_context(|| format!("cannot reach tracker {t}"))?,
        ),
        None => None,
    };
    let step = limit.min(Duration::from_secs(10));
    let (at, matchkey) = endpoint(&mut client, &addr, key).await?;
    let opts = TvmOptions::default().connect_timeout(step).call_timeout(step);
    let mut out = String::new();
    let tvm_err = match TvmSession::connect(&at, &matchkey, &opts).await {
        Ok(mut sess) => {
            writeln!(out, "address:  {at}")?;
            writeln!(out, "server:   TVM RPC server (key {:?})", sess.server_key())?;
            writeln!(out, "protocol: {} (TVM >= 0.21 encoding)", sess.protocol_version())?;
            let show = |v: TvmValue| match v {
                TvmValue::None => "-".to_owned(),
                TvmValue::Int(i) => i.to_string(),
                TvmValue::Str(s) => s,
                other => format!("{other:?}"),
            };
            let kinds =
                [(1, "cpu"), (2, "cuda"), (4, "opencl"), (7, "vulkan"), (8, "metal"), (10, "rocm")];
            for (device_type, name) in kinds {
                let dev = Device { device_type, device_id: 0 };
                if sess.device_attr(dev, attr::EXIST).await? != TvmValue::Int(1) {
                    continue;
                }
                let threads = show(sess.device_attr(dev, attr::MAX_THREADS_PER_BLOCK).await?);
                let warp = show(sess.device_attr(dev, attr::WARP_SIZE).await?);
                let dname = show(sess.device_attr(dev, attr::DEVICE_NAME).await?);
                writeln!(
                    out,
                    "device:   {name}:0 exists, max threads per block {threads}, warp size {warp}, name {dname}"
                )?;
            }
            sess.close().await?;
            return Ok(out);
        }
        // A TVM packet that does not decode: an older TVM. Our protocol is
        // not tried on it (it could stop an old TVM server, see above).
        Err(e @ TvmError::Incompatible { tvm_framing: true, .. }) => {
            return Err(e).with_context(|| format!("{at} runs an unsupported TVM RPC server"));
        }
        Err(e @ (TvmError::Incompatible { .. } | TvmError::ConnectionLost { .. })) => e,
        Err(e) => return Err(e).with_context(|| format!("cannot open a session on {at}")),
    };
    // Not TVM's protocol: is it ours?
    let (at, matchkey) = endpoint(&mut client, &addr, key).await?;
    let copts = rpc_runner::ConnectOptions::default().request_timeout(step);
    // A direct server may still be ending the first session (the overall
    // timeout bounds the retries).
    let ours = loop {
        match rpc_runner::Session::connect(&at, &matchkey, &copts).await {
            Err(rpc_runner::SessionError::Busy) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => break other,
        }
    };
    match ours {
        Ok(mut sess) => {
            writeln!(out, "address:  {at}")?;
            writeln!(out, "server:   rpc-runner device server (key {:?})", sess.server_key())?;
            writeln!(out, "protocol: rpc-runner session protocol (TVM's handshake)")?;
            if let Some(t) = sess.session_timeout() {
                writeln!(out, "session timeout: {t:?}")?;
            }
            sess.close().await?;
            Ok(out)
        }
        Err(ours) => bail!(
            "{at} is neither a TVM (>= 0.21) RPC server nor an rpc-runner server: \
             TVM protocol: {tvm_err}; ours: {ours}"
        ),
    }
}
