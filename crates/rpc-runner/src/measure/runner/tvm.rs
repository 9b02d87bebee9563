//! The default stages on a TVM RPC server ([`Backend::Tvm`]): lease with
//! [`TrackerClient::request_tvm`], upload with `tvm.rpc.server.upload`,
//! load with `tvm.rpc.server.load_module`, arguments allocated on the
//! device and filled with our seeded bytes (`kCopyToRemote`), timed by
//! TVM's `runtime.RPCTimeEvaluator`, outputs read back (`kCopyFromRemote`),
//! then everything freed, the upload removed and the session shut down.

use std::path::Path;
use std::time::Duration;

use super::config::Backend;
use super::pipeline::StageContext;
use super::result::{Measurement, Output, RunError, RunnerInput};
use crate::measure::args::ArgInfo;
use crate::measure::cause::Cause;
use crate::measure::kernel::host_args;
use crate::tracker::TrackerClient;
use crate::tvm::{
    DataType, Device, RemoteModule, RemoteTensor, TimeEvaluatorConfig, TvmError, TvmOptions,
    TvmSession, TvmValue,
};

/// Largest artifact uploaded to a TVM server (read into memory first).
const MAX_ARTIFACT_BYTES: u64 = 1 << 30;

/// A TVM session and what the stages left on it.
pub(crate) struct TvmDevice {
    pub(crate) sess: TvmSession,
    remote: Option<String>,
    module: Option<RemoteModule>,
    tensors: Vec<RemoteTensor>,
}

impl TvmDevice {
    pub(crate) fn new(sess: TvmSession) -> Self {
        TvmDevice { sess, remote: None, module: None, tensors: Vec::new() }
    }
}

/// A TVM error, classified as a [`RunError`].
pub(crate) fn classify(e: TvmError, limit: Duration) -> RunError {
    match e {
        TvmError::SessionTimeout { .. } | TvmError::Timeout { .. } => RunError::Timeout { limit },
        // TVM's server runs each session in a forked child: a crashing
        // kernel takes the connection with it.
        TvmError::ConnectionLost { .. } => {
            RunError::KernelCrash { message: format!("the TVM session process died ({e})") }
        }
        e => RunError::Tvm { source: Cause::new(e) },
    }
}

/// Leases a device of the key from the tracker and opens its TVM session.
pub(crate) async fn create(ctx: &StageContext) -> Result<TvmDevice, RunError> {
    let rpc = &ctx.rpc;
    let addr = rpc.tracker_addr();
    let fail = |e: TvmError| RunError::Tvm { source: Cause::new(e) };
    let mut tracker = TrackerClient::connect(&addr).await.map_err(|e| RunError::Session {
        addr: addr.clone(),
        source: Cause::new(crate::session::SessionError::from(e)),
    })?;
    let opts = TvmOptions::default()
        .session_timeout(Some(rpc.session_timeout))
        .call_timeout(rpc.session_timeout);
    let sess =
        tracker.request_tvm(&rpc.tracker_key, rpc.session_priority, &opts).await.map_err(fail)?;
    Ok(TvmDevice::new(sess))
}

/// Uploads the artifact as `remote`.
pub(crate) async fn upload(
    dev: &mut TvmDevice,
    artifact: &Path,
    remote: &str,
    limit: Duration,
) -> Result<String, RunError> {
    let io = |source: std::io::Error| RunError::Upload {
        artifact: artifact.to_path_buf(),
        source: Cause::new(crate::session::SessionError::LocalIo {
            path: artifact.display().to_string(),
            source,
        }),
    };
    let len = tokio::fs::metadata(artifact).await.map_err(io)?.len();
    if len > MAX_ARTIFACT_BYTES {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{len} bytes is over the {MAX_ARTIFACT_BYTES}-byte upload limit"),
        )));
    }
    let bytes = tokio::fs::read(artifact).await.map_err(io)?;
    dev.sess.upload(remote, &bytes).await.map_err(|e| classify(e, limit))?;
    dev.remote = Some(remote.to_owned());
    Ok(remote.to_owned())
}

/// Loads the uploaded library.
pub(crate) async fn load(
    dev: &mut TvmDevice,
    remote: &str,
    input: &RunnerInput,
    limit: Duration,
) -> Result<(), RunError> {
    match dev.sess.load_module(remote).await {
        Ok(m) => {
            dev.module = Some(m);
            Ok(())
        }
        Err(TvmError::Remote { message }) => Err(RunError::Load {
            kind: crate::measure::failure_kind::LOAD_ERROR.into(),
            artifact: input.artifact_path.clone(),
            message,
        }),
        Err(e) => Err(classify(e, limit)),
    }
}

fn dtype_of(info: &ArgInfo) -> Result<DataType, RunError> {
    DataType::parse(info.dtype.name()).ok_or_else(|| RunError::Other {
        message: format!("TVM has no element type {:?}", info.dtype.name()),
    })
}

/// Allocates the arguments on the device and copies our seeded bytes
/// (set 0 of [`AllocArgs`](crate::measure::AllocArgs) with the same seed).
pub(crate) async fn alloc(
    dev: &mut TvmDevice,
    ctx: &StageContext,
    input: &RunnerInput,
    limit: Duration,
) -> Result<(), RunError> {
    let bytes = host_args(&input.args_info, ctx.seed)
        .map_err(|f| RunError::Other { message: format!("{}: {}", f.kind, f.message) })?;
    for (info, data) in input.args_info.iter().zip(&bytes) {
        let t = dev
            .sess
            .alloc(&info.shape, dtype_of(info)?, Device::cpu(0))
            .await
            .map_err(|e| classify(e, limit))?;
        dev.tensors.push(t.clone());
        dev.sess.copy_to_remote(&t, data).await.map_err(|e| classify(e, limit))?;
    }
    Ok(())
}

/// Times the kernel with TVM's evaluator and reads back `read_args`.
pub(crate) async fn evaluate(
    dev: &mut TvmDevice,
    ctx: &StageContext,
    input: &RunnerInput,
    limit: Duration,
) -> Result<Measurement, RunError> {
    let Backend::Tvm { function } = &ctx.rpc.backend else {
        return Err(RunError::Other { message: "not a TVM backend".into() });
    };
    let module =
        dev.module.ok_or_else(|| RunError::Other { message: "no module loaded".into() })?;
    let e = &ctx.evaluator;
    let clamp = |v: u64| i32::try_from(v).unwrap_or(i32::MAX);
    let mut cfg = TimeEvaluatorConfig::new(
        clamp(e.number.into()),
        clamp(e.repeat.into()),
        clamp(e.min_repeat_ms),
    );
    cfg.cooldown_interval_ms = clamp(e.cooldown_ms);
    let timer = match dev.sess.time_evaluator(module, function, Device::cpu(0), &cfg).await {
        Ok(t) => t,
        Err(TvmError::Remote { message }) => {
            return Err(RunError::Load {
                kind: crate::measure::failure_kind::MISSING_SYMBOL.into(),
                artifact: input.artifact_path.clone(),
                message,
            });
        }
        Err(e) => return Err(classify(e, limit)),
    };
    let args: Vec<TvmValue> = dev.tensors.iter().cloned().map(TvmValue::Tensor).collect();
    let costs = match dev.sess.time(timer, &args).await {
        Ok(c) => c,
        // The shim turns a nonzero return of the kernel into an error.
        Err(TvmError::Remote { message }) => return Err(RunError::KernelError { message }),
        Err(e) => return Err(classify(e, limit)),
    };
    let _ = dev.sess.free_handle(timer.0).await;
    let mut outputs = Vec::with_capacity(input.read_args.len());
    for &index in &input.read_args {
        let (Some(t), Some(info)) = (
            usize::try_from(index).ok().and_then(|i| dev.tensors.get(i)).cloned(),
            usize::try_from(index).ok().and_then(|i| input.args_info.get(i)),
        ) else {
            return Err(RunError::Other { message: format!("no argument {index}") });
        };
        let bytes = dev.sess.copy_from_remote(&t).await.map_err(|e| classify(e, limit))?;
        outputs.push(Output::new(index, info.clone(), bytes));
    }
    let mut m = Measurement::new(costs).with_outputs(outputs);
    m.env.warnings.push(
        "timed by TVM's RPCTimeEvaluator on a TVM server: no environment record, TVM's fixed repeat"
            .into(),
    );
    if e.adaptive.is_some() || e.enable_cpu_cache_flush || e.realtime {
        m.env.warnings.push(
            "TVM's evaluator has no adaptive rule, cache flush or real-time setting here: number/repeat/min_repeat_ms/cooldown used"
                .into(),
        );
    }
    Ok(m)
}

/// Frees what the stages left, removes the upload and shuts the session
/// down, all within `limit`; dropping the session frees the device anyway.
pub(crate) async fn close(mut dev: TvmDevice, limit: Duration) -> Result<(), RunError> {
    let work = async {
        for t in std::mem::take(&mut dev.tensors) {
            let _ = dev.sess.free(&t).await;
        }
        if let Some(m) = dev.module.take() {
            let _ = dev.sess.free_handle(m.0).await;
        }
        if let Some(remote) = dev.remote.take() {
            let _ = dev.sess.remove(&remote).await;
        }
        dev.sess.close().await
    };
    match tokio::time::timeout(limit, work).await {
        Ok(r) => r.map_err(|e| classify(e, limit)),
        Err(_) => Err(RunError::Timeout { limit }),
    }
}
