//! The warm spare ([`ServerConfig::warm_spare`]): a session dir and a
//! started session worker made ahead, so a session does not wait for a
//! process to start.
//!
//! One keeper task owns the making: it makes a spare when the server
//! starts, when a session makes its first call, and when a session ends
//! (each time only if there is none). While no session runs, it also gives
//! the spare the argument sets of the last session's `AllocArgs` (same
//! shapes, repeat and seed: a tuner's next candidate asks for exactly
//! those), so that call finds them filled and their pages faulted in.
//! A session takes the spare (waiting for one being made, bounded by
//! [`TAKE_WAIT`]); the spare then is that session's dir and worker, torn
//! down with it like any other. A spare is never handed to two sessions,
//! and a worker that ran a session's code never becomes a spare.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use popen_pool::{ErasedTask, PoolError, PopenWorker};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

use super::{ServerConfig, Shared, ops};

/// Longest a session waits for a spare being made before making its own.
const TAKE_WAIT: Duration = Duration::from_secs(2);

/// Longest the keeper waits for a spare's prefill (`AllocArgs`).
const PREFILL_LIMIT: Duration = Duration::from_secs(30);

/// A fresh session dir and a started worker whose working dir it is.
pub(crate) struct Spare {
    pub(crate) dir: TempDir,
    pub(crate) worker: PopenWorker,
    /// The keeper gave it the last `AllocArgs` (or tried to).
    prefilled: bool,
}

/// The last `AllocArgs` call a session made (the request as received, so
/// bounded by the session's frame limit).
#[derive(Default)]
pub(crate) struct LastAlloc(std::sync::Mutex<Option<ErasedTask>>);

impl LastAlloc {
    pub(crate) fn replace(&self, task: ErasedTask) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(task);
    }

    fn get(&self) -> Option<ErasedTask> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn forget(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// A session worker for `dir`, configured as `cfg` says (not started).
pub(super) fn new_worker(cfg: &ServerConfig, dir: &Path) -> Result<PopenWorker, PoolError> {
    let program = cfg.worker.clone().current_dir(dir);
    let mut builder =
        PopenWorker::builder(program).stdout(cfg.worker_output).stderr(cfg.worker_output);
    if let Some(cpus) = &cfg.worker_cpus {
        builder = builder.cpu_affinity(cpus.iter().copied());
    }
    if let Some(bytes) = cfg.worker_memory_limit {
        builder = builder.memory_limit(bytes);
    }
    if let Some(zygote) = &cfg.zygote {
        builder = builder.zygote(zygote);
    }
    builder.build()
}

/// A new session dir under the server's work root.
pub(super) async fn session_dir(shared: &Shared) -> std::io::Result<TempDir> {
    let root = shared.cfg.root();
    let make = move || tempfile::Builder::new().prefix("rpc-session-").tempdir_in(root);
    ops::quick(shared.in_memory, make).await
}

/// Makes a spare; `None` (logged) if the dir or the worker cannot be made.
/// Not to be dropped while it runs: see [`keep`].
async fn make(shared: &Shared) -> Option<Spare> {
    let cfg = &shared.cfg;
    let dir = match session_dir(shared).await {
        Ok(dir) => dir,
        Err(e) => {
            tracing::debug!(error = %e, "cannot make a spare session dir");
            return None;
        }
    };
    let mut worker = match new_worker(cfg, dir.path()) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "cannot configure a spare session worker");
            discard_dir(dir).await;
            return None;
        }
    };
    if let Err(e) = worker.start().await {
        tracing::debug!(error = %e, "cannot start a spare session worker");
        worker.kill().await;
        discard_dir(dir).await;
        return None;
    }
    Some(Spare { dir, worker, prefilled: false })
}

/// Gives the spare the last session's `AllocArgs`, once, and only while no
/// session runs (the spare's worker is pinned where sessions time their
/// kernels). A spare whose prefill fails is discarded and the call is
/// forgotten (the next spare is made without it), so a failing call is not
/// retried forever.
async fn prefill(shared: &Shared, slot: &mut Option<Spare>) {
    let Some(spare) = slot.as_mut().filter(|s| !s.prefilled) else { return };
    if shared.serving.load(std::sync::atomic::Ordering::SeqCst) {
        return;
    }
    let Some(task) = shared.last_alloc.get() else { return };
    spare.prefilled = true;
    match spare.worker.run_erased(&task, Some(PREFILL_LIMIT)).await {
        Ok(_) => shared.update(|st| st.spare_filled = true),
        Err(e) => {
            tracing::debug!(error = %e, "the spare's prefill failed; discarding it");
            shared.last_alloc.forget();
            if let Some(spare) = slot.take() {
                no_spare(shared);
                discard(spare).await;
            }
            shared.spare_wanted.notify_one();
        }
    }
}

/// The status says no spare is ready.
fn no_spare(shared: &Shared) {
    shared.update(|st| (st.spare, st.spare_filled) = (None, false));
}

async fn discard_dir(dir: TempDir) {
    let path = dir.path().to_path_buf();
    if let Err(e) = ops::blocking(move || dir.close()).await {
        tracing::warn!(dir = %path.display(), error = %e, "cannot remove a spare session dir");
    }
}

/// Kills a spare's worker and removes its dir.
async fn discard(mut spare: Spare) {
    spare.worker.kill().await;
    discard_dir(spare.dir).await;
}

/// The keeper: makes a spare whenever one is wanted and there is none,
/// until `stop` (a spare being made is finished first); then discards the
/// spare. Runs only with `warm_spare`. Dropping it while it makes a spare
/// (the runtime shutting down, a dropped `DeviceServer::run`) can leave
/// that worker's process behind; a graceful stop cannot.
pub(super) async fn keep(shared: Arc<Shared>, stop: CancellationToken) {
    shared.spare_wanted.notify_one();
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = shared.spare_wanted.notified() => {}
        }
        let mut slot = shared.spare.lock().await;
        if shared.snapshot().unavailable.is_some() {
            continue;
        }
        if slot.is_none() {
            // Not cut short by `stop`: a worker start dropped midway can
            // leave its process running without a parent that knows it
            // (popen-pool's start is not safe to drop during the spawn); it
            // is discarded below.
            let made = make(&shared).await;
            let pid = made.as_ref().and_then(|s| s.worker.pid());
            *slot = made;
            shared.update(|st| st.spare = pid);
        }
        // Bounded by PREFILL_LIMIT, not cut short by `stop` either.
        prefill(&shared, &mut slot).await;
    }
    let left = shared.spare.lock().await.take();
    no_spare(&shared);
    if let Some(spare) = left {
        discard(spare).await;
    }
}

/// Takes the spare for a session (waiting at most [`TAKE_WAIT`] for one
/// being made). The session asks for the next one with its first call
/// (so the next worker starts while this session's worker, not the server,
/// is busy: an upload is not slowed by it) or when it ends. `None` without
/// `warm_spare`, when there is none, or when its process died (it is
/// discarded). Cancel-safe: a dropped call takes nothing.
pub(super) async fn take(shared: &Shared) -> Option<Spare> {
    if !shared.cfg.warm_spare {
        return None;
    }
    let taken = match tokio::time::timeout(TAKE_WAIT, shared.spare.lock()).await {
        Ok(mut slot) => {
            let taken = slot.take();
            no_spare(shared);
            taken
        }
        Err(_) => None,
    };
    let spare = taken?;
    if spare.worker.pid().is_none() {
        discard(spare).await;
        return None;
    }
    Some(spare)
}
