//! The long-running operations of a server session, each a small state
//! machine the session loop polls: an upload (chunks written on a blocking
//! thread), a streamed answer (a download, or a call output larger than a
//! chunk) and a call running in the session's worker.
//!
//! Every step is cancel-safe: the loop drops a step's future whenever a
//! frame arrives and polls a fresh one afterwards, and no progress is lost.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::{FutureExt, SinkExt};
use popen_pool::{ErasedTask, PoolError, PopenWorker};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::task::JoinHandle;
use tokio_util::codec::FramedWrite;
use tokio_util::sync::CancellationToken;

use crate::session::DirEntry;
use crate::wire::codec::FrameCodec;
use crate::wire::error::WireError;
use crate::wire::proto::{CHUNK, CHUNK_VARIANT, data_frame};

pub(super) type Tx = FramedWrite<OwnedWriteHalf, FrameCodec>;

/// Most entries a listing returns.
pub(super) const MAX_LISTING: usize = 100_000;

/// An upload in progress.
pub(super) struct Upload {
    pub(super) id: u64,
    /// `None` once it failed (the error was sent); later chunks are dropped.
    pub(super) writer: Option<Writer>,
    pub(super) expected: u64,
    pub(super) written: u64,
    pub(super) path: PathBuf,
}

/// Uploads up to this size are kept in memory until their end and written
/// in one blocking call (a kernel's shared object: one thread hop instead
/// of a writer thread and a hop per step).
const SMALL_UPLOAD: u64 = 1 << 20;

/// A small upload of at most this size, on a work root in memory, is
/// written on the runtime's thread (see [`quick`]).
const INLINE_WRITE: u64 = 64 << 10;

/// A session dir with at most this many entries, none a dir, holding at
/// most [`INLINE_TREE_BYTES`], on a work root in memory, is removed on the
/// runtime's thread (see [`quick`]).
const INLINE_TREE_ENTRIES: usize = 32;
const INLINE_TREE_BYTES: u64 = 4 << 20;

/// Writes an upload's chunks to its file.
pub(super) enum Writer {
    /// A small upload: its chunks (at most [`SMALL_UPLOAD`] bytes, checked
    /// against the announced length by the caller), written at the end;
    /// `inline`: on the runtime's thread.
    Small { root: PathBuf, target: PathBuf, shown: String, chunks: Vec<Bytes>, inline: bool },
    /// On a blocking thread, straight from the received frames, while the
    /// session goes on reading the next ones.
    Stream { chunks: tokio::sync::mpsc::Sender<Bytes>, done: JoinHandle<std::io::Result<()>> },
}

impl Writer {
    /// For `target` of `len` bytes: a small upload is only noted; a large
    /// one creates `target` (and its parent dirs), reserves `len` bytes
    /// for it, and starts the writer thread.
    /// `target` lies under the session dir `root`; `shown` is the path as
    /// the client gave it (for errors); `in_memory`: the work root is in
    /// memory ([`in_memory`]).
    pub(super) async fn create(
        root: &Path,
        target: PathBuf,
        len: u64,
        shown: &str,
        in_memory: bool,
    ) -> std::io::Result<Writer> {
        let root = root.to_path_buf();
        if len <= SMALL_UPLOAD {
            let shown = shown.to_owned();
            let inline = in_memory && len <= INLINE_WRITE;
            return Ok(Writer::Small { root, target, shown, chunks: Vec::new(), inline });
        }
        let file = blocking(move || create_file(&root, &target)).await?;
        let (chunks, mut rx) = tokio::sync::mpsc::channel::<Bytes>(8);
        let done = tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let mut file = file;
            // Reserve the blocks up front: the writes then only fill them.
            let _ = nix::fcntl::posix_fallocate(&file, 0, i64::try_from(len).unwrap_or(0));
            while let Some(chunk) = rx.blocking_recv() {
                file.write_all(&chunk)?;
            }
            Ok(())
        });
        Ok(Writer::Stream { chunks, done })
    }

    /// Queues a chunk; `Err` with the writer's own error if it stopped.
    /// Cancel-safe only in the sense that a dropped call loses this chunk:
    /// the session ends whenever it drops one.
    pub(super) async fn write(&mut self, chunk: Bytes) -> Result<(), WireError> {
        let (chunks, done) = match self {
            Writer::Small { chunks, .. } => {
                chunks.push(chunk);
                return Ok(());
            }
            Writer::Stream { chunks, done } => (chunks, done),
        };
        if chunks.send(chunk).await.is_ok() {
            return Ok(());
        }
        Err(match done.await {
            Ok(Err(e)) => WireError::Io { message: e.to_string() },
            Ok(Ok(())) => WireError::Io { message: "upload writer stopped early".into() },
            Err(e) => WireError::Io { message: format!("upload writer failed: {e}") },
        })
    }

    /// Waits until every chunk is written and the file is closed.
    ///
    /// Cancel safety: a dropped future leaves the blocking write running to
    /// its end; it writes only below the session dir and never makes that
    /// dir again (`create_file`), so after the session's teardown it fails
    /// instead of leaving a file behind.
    pub(super) async fn finish(self) -> Result<(), WireError> {
        let done = match self {
            Writer::Small { root, target, shown, chunks, inline } => {
                return quick(inline, move || {
                    use std::io::Write;
                    let mut file = create_file(&root, &target)?;
                    chunks.iter().try_for_each(|c| file.write_all(c))
                })
                .await
                .map_err(|e| io_error(&e, &shown));
            }
            Writer::Stream { chunks, done } => {
                drop(chunks);
                done
            }
        };
        match done.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(WireError::Io { message: e.to_string() }),
            Err(e) => Err(WireError::Io { message: format!("upload writer failed: {e}") }),
        }
    }
}

/// Creates `target` and its missing parent dirs below the session dir
/// `root`, never `root` itself: a blocking call that outlives its session
/// (its future dropped at shutdown) then fails on the removed dir instead
/// of making it again.
pub(super) fn create_file(root: &Path, target: &Path) -> std::io::Result<std::fs::File> {
    if let Some(rel) = target.parent().and_then(|p| p.strip_prefix(root).ok()) {
        let mut dir = root.to_path_buf();
        for part in rel.components() {
            dir.push(part);
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => return Err(e),
                _ => {}
            }
        }
    }
    std::fs::File::create(target)
}

impl Upload {
    /// Stops the upload and removes its partial file.
    pub(super) async fn discard(mut self) {
        // A small upload's file does not exist yet; a large one's writer
        // thread is stopped first.
        if let Some(w @ Writer::Stream { .. }) = self.writer.take() {
            let _ = w.finish().await;
        }
        let path = self.path;
        let _ = blocking(move || std::fs::remove_file(path)).await;
    }
}

/// Where a streamed answer's bytes come from.
pub(super) enum Source {
    File { file: Option<std::fs::File>, reading: Option<JoinHandle<Read>> },
    Bytes(Bytes),
}

type Read = (std::fs::File, std::io::Result<Bytes>);

/// An answer streamed in `Chunk`s: a download, or a large call output.
pub(super) struct Stream {
    pub(super) id: u64,
    source: Source,
    remaining: u64,
    /// The next chunk, read but not yet queued.
    chunk: Option<Bytes>,
}

/// How a step of a stream ended.
pub(super) enum Step {
    More,
    Done,
    /// Reading the source failed: answer `Error` (the client is waiting for chunks).
    Failed(WireError),
    /// The connection broke.
    Gone,
}

impl Stream {
    pub(super) fn file(id: u64, file: std::fs::File, len: u64) -> Self {
        Stream {
            id,
            source: Source::File { file: Some(file), reading: None },
            remaining: len,
            chunk: None,
        }
    }

    pub(super) fn bytes(id: u64, data: Bytes) -> Self {
        let remaining = data.len() as u64;
        Stream { id, source: Source::Bytes(data), remaining, chunk: None }
    }

    /// Queues the next chunk (flushing when the last one is queued).
    /// Cancel-safe: progress is recorded only once a chunk is queued.
    pub(super) async fn step(&mut self, tx: &mut Tx) -> Step {
        if self.remaining == 0 {
            return match tx.flush().await {
                Ok(()) => Step::Done,
                Err(_) => Step::Gone,
            };
        }
        if self.chunk.is_none() {
            let want = CHUNK.min(self.remaining as usize);
            match &mut self.source {
                Source::Bytes(data) => self.chunk = Some(data.split_to(want)),
                Source::File { file, reading } => {
                    if reading.is_none() {
                        let Some(mut f) = file.take() else {
                            return Step::Failed(WireError::Io {
                                message: "download source lost".into(),
                            });
                        };
                        *reading = Some(tokio::task::spawn_blocking(move || {
                            use std::io::Read;
                            let mut buf = vec![0u8; want];
                            let r = f.read_exact(&mut buf).map(|()| Bytes::from(buf));
                            (f, r)
                        }));
                    }
                    let joined = reading.as_mut().expect("just set").await;
                    *reading = None;
                    match joined {
                        Ok((f, Ok(data))) => {
                            *file = Some(f);
                            self.chunk = Some(data);
                        }
                        Ok((_, Err(e))) => {
                            let message = format!("reading the file failed mid-download: {e}");
                            return Step::Failed(WireError::Io { message });
                        }
                        Err(e) => {
                            return Step::Failed(WireError::Io {
                                message: format!("read failed: {e}"),
                            });
                        }
                    }
                }
            }
        }
        let chunk = self.chunk.as_ref().expect("just read");
        if tx.feed(data_frame(CHUNK_VARIANT, self.id, chunk)).await.is_err() {
            return Step::Gone;
        }
        self.remaining -= chunk.len() as u64;
        self.chunk = None;
        Step::More
    }
}

/// What a call's future gives back: the worker, and the task's outcome
/// (`None`: cancelled, the worker was killed and reaped).
pub(super) type CallOutcome = (PopenWorker, Option<Result<Bytes, PoolError>>);

/// A call running in the session's worker.
pub(super) struct Call {
    pub(super) id: u64,
    cancel: CancellationToken,
    fut: BoxFuture<'static, CallOutcome>,
}

impl Call {
    /// Runs `task` in `worker` until it ends or the call is cancelled,
    /// first waiting for `after` (the previous session's teardown) if given.
    pub(super) fn start(
        id: u64,
        mut worker: PopenWorker,
        task: ErasedTask,
        limit: Option<Duration>,
        after: Option<Arc<tokio::sync::Mutex<()>>>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let fut = async move {
            let run = async {
                if let Some(after) = &after {
                    // Bounded: a worker stuck in the kernel does not hold
                    // the next session forever.
                    let waited =
                        tokio::time::timeout(super::session::KILL_WAIT, after.lock()).await;
                    if waited.is_err() {
                        tracing::warn!("the last session's worker is not reaped yet; going on");
                    }
                }
                worker.run_erased(&task, limit).await
            };
            let outcome = tokio::select! {
                r = run => Some(r),
                () = token.cancelled() => None,
            };
            if outcome.is_none() {
                // The dropped run killed the process group; reap it.
                worker.kill().await;
            }
            (worker, outcome)
        }
        .boxed();
        Call { id, cancel, fut }
    }

    /// Asks the call to stop; [`wait`](Call::wait) then returns soon.
    pub(super) fn cancel(&self) {
        self.cancel.cancel();
    }

    pub(super) fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Waits for the call to end. Cancel-safe.
    pub(super) async fn wait(&mut self) -> CallOutcome {
        (&mut self.fut).await
    }
}

/// Lists `dir`, sorted by name, on a blocking thread.
pub(super) async fn list(dir: PathBuf) -> std::io::Result<Vec<DirEntry>> {
    blocking(move || {
        let mut entries = Vec::new();
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            if entries.len() == MAX_LISTING {
                return Err(std::io::Error::other(format!(
                    "the directory has more than {MAX_LISTING} entries"
                )));
            }
            let meta = e.metadata()?;
            entries.push(DirEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                is_dir: meta.is_dir(),
                size: if meta.is_dir() { 0 } else { meta.len() },
            });
        }
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(entries)
    })
    .await
}

/// Opens a regular file for download: the file and its length.
pub(super) async fn open_for_download(path: PathBuf) -> std::io::Result<(std::fs::File, u64)> {
    blocking(move || {
        let file = std::fs::File::open(&path)?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(std::io::Error::other("not a regular file"));
        }
        Ok((file, meta.len()))
    })
    .await
}

/// Removes a file or a directory tree.
pub(super) async fn remove(path: PathBuf) -> std::io::Result<()> {
    blocking(move || match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path),
        Ok(_) => std::fs::remove_file(&path),
        Err(e) => Err(e),
    })
    .await
}

/// Whether `dir` is on a filesystem in memory (tmpfs or ramfs): its small
/// operations take microseconds and never wait for a device. Blocking (a
/// `statfs`): call it on a blocking thread.
pub(crate) fn in_memory(dir: &Path) -> bool {
    const RAMFS_MAGIC: nix::sys::statfs::FsType = nix::sys::statfs::FsType(0x8584_58f6);
    nix::sys::statfs::statfs(dir).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == nix::sys::statfs::TMPFS_MAGIC || t == RAMFS_MAGIC
    })
}

/// Runs filesystem work known to be short: on the runtime's thread when
/// `inline` (the work root is in memory and the work small: a dir made, a
/// file of at most [`INLINE_WRITE`] written), else on a blocking thread.
/// The hop to a blocking thread and back is two thread wakeups, more than
/// such a step costs in memory (~50 µs per measurement in an A/B).
/// Cancel safety: inline, the step is done before the first await; on a
/// blocking thread, a dropped future lets the step finish and drops its
/// result (as [`blocking`]).
pub(super) async fn quick<T: Send + 'static>(
    inline: bool,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    if inline { f() } else { blocking(f).await }
}

/// Removes a session dir and everything in it: on the runtime's thread if
/// the work root is in memory and the tree is small (at most
/// [`INLINE_TREE_ENTRIES`] entries, none a dir, [`INLINE_TREE_BYTES`] in
/// all: checked with one bounded listing), else on a blocking thread.
pub(super) async fn remove_session_dir(
    in_memory: bool,
    dir: tempfile::TempDir,
) -> std::io::Result<()> {
    let inline = in_memory && small_tree(dir.path());
    quick(inline, move || dir.close()).await
}

/// Whether `dir` holds at most [`INLINE_TREE_ENTRIES`] entries, none a
/// dir, of at most [`INLINE_TREE_BYTES`] together (links not followed).
fn small_tree(dir: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let mut bytes = 0u64;
    for (i, entry) in entries.enumerate() {
        if i == INLINE_TREE_ENTRIES {
            return false;
        }
        let Ok(meta) = entry.and_then(|e| e.metadata()) else { return false };
        bytes = bytes.saturating_add(meta.len());
        if meta.is_dir() || bytes > INLINE_TREE_BYTES {
            return false;
        }
    }
    true
}

/// Runs filesystem work on a blocking thread (never on the runtime's).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> std::io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(std::io::Error::other(format!("blocking task failed: {e}"))),
    }
}

/// The error a client sees for a failed filesystem operation on `path`.
pub(super) fn io_error(e: &std::io::Error, path: &str) -> WireError {
    if e.kind() == std::io::ErrorKind::NotFound {
        WireError::NotFound { path: path.to_owned() }
    } else {
        WireError::Io { message: format!("{path:?}: {e}") }
    }
}

/// Whether `dir` can hold session dirs: creates and removes a probe dir.
pub(crate) async fn probe_work_root(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    blocking(move || {
        let probe = tempfile::Builder::new().prefix("rpc-probe-").tempdir_in(&dir)?;
        probe.close()
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fs type `/proc/self/mountinfo` names for the mount at `point`.
    fn mount_type(point: &str) -> Option<String> {
        let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        info.lines().rev().find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            (left.split(' ').nth(4)? == point)
                .then(|| right.split(' ').next().map(str::to_owned))?
        })
    }

    #[test]
    fn in_memory_is_what_the_mount_table_says() {
        for point in ["/dev/shm", "/proc", "/"] {
            let Some(kind) = mount_type(point) else { continue };
            let expected = kind == "tmpfs" || kind == "ramfs";
            assert_eq!(in_memory(Path::new(point)), expected, "{point} is {kind}");
        }
        assert!(!in_memory(Path::new("/no/such/dir")));
    }

    #[test]
    fn small_tree_is_bounded_in_entries_bytes_and_depth() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        assert!(small_tree(p), "empty");
        for i in 0..INLINE_TREE_ENTRIES {
            std::fs::write(p.join(format!("f{i}")), b"x").unwrap();
        }
        assert!(small_tree(p), "at the entry bound");
        std::fs::write(p.join("one-more"), b"x").unwrap();
        assert!(!small_tree(p), "over the entry bound");

        let dir = tempfile::tempdir().unwrap();
        let big = std::fs::File::create(dir.path().join("big")).unwrap();
        big.set_len(INLINE_TREE_BYTES).unwrap();
        assert!(small_tree(dir.path()), "at the byte bound");
        big.set_len(INLINE_TREE_BYTES + 1).unwrap();
        assert!(!small_tree(dir.path()), "over the byte bound");

        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        assert!(!small_tree(dir.path()), "a subdir");
        // A link to a big file counts as the link, not the file.
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/proc/kcore", dir.path().join("link")).unwrap();
        assert!(small_tree(dir.path()), "a symlink is not followed");
        assert!(!small_tree(&dir.path().join("missing")), "no such dir");
    }
}
