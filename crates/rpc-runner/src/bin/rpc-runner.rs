//! `rpc-runner`: the command-line tracker, device server and query tool, the
//! counterparts of TVM's `rpc_tracker`, `rpc_server` and `query_rpc_tracker`.

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
        /// Directory for the sessions' temp dirs (default: the system temp dir).
        #[arg(long)]
        work_dir: Option<std::path::PathBuf>,
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

#[tokio::main]
async fn main() -> Result<()> {
    // Session workers are this binary, re-executed.
    popen_pool::serve_if_worker(rpc_runner::tasks::registry());
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
    }
    Ok(())
}
