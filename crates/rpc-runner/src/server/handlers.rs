//! The requests of a server session that touch files or start a call:
//! each answers at once or installs the operation the session loop drives.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use popen_pool::ErasedTask;

use super::ops::{self, Call, Stream, Upload, Writer, io_error};
use super::paths::resolve;
use super::session::{End, Op, Session, millis};
use crate::wire::error::WireError;
use crate::wire::proto::{MAX_SESSION_FRAME, Response, SESSION_PROTOCOL_VERSION};

impl Session<'_> {
    pub(super) async fn hello(&mut self, version: u32) -> Result<(), End> {
        if version != SESSION_PROTOCOL_VERSION {
            return Err(End::Terminate(WireError::Protocol {
                message: format!(
                    "client speaks session protocol {version}, server {SESSION_PROTOCOL_VERSION}"
                ),
            }));
        }
        let hello = Response::Hello {
            version: SESSION_PROTOCOL_VERSION,
            key: self.cfg.key.clone(),
            workdir: self.dir.display().to_string(),
            max_upload: self.cfg.max_upload_bytes,
            session_timeout_ms: self.limit.map(millis),
            max_frame: MAX_SESSION_FRAME as u64,
        };
        self.send(&hello).await
    }

    pub(super) async fn upload_begin(&mut self, id: u64, path: &str, len: u64) -> Result<(), End> {
        let limit = self.cfg.max_upload_bytes;
        let target = resolve(&self.dir, path, false);
        let mut up = Upload { id, writer: None, expected: len, written: 0, path: PathBuf::new() };
        let result = match target {
            _ if len > limit => Err(WireError::UploadTooLarge { len, limit }),
            Err(e) => Err(e),
            Ok(target) => {
                up.path = target.clone();
                Writer::create(&self.dir, target, len, path, self.in_memory)
                    .await
                    .map_err(|e| io_error(&e, path))
            }
        };
        match result {
            Ok(w) => {
                up.writer = Some(w);
                self.op = Op::Upload(up);
                Ok(())
            }
            Err(e) => {
                // Failed: its chunks are dropped until `UploadEnd`.
                self.op = Op::Upload(up);
                self.send_error(id, e).await
            }
        }
    }

    pub(super) async fn upload_chunk(&mut self, data: Bytes) -> Result<(), End> {
        let Op::Upload(up) = &mut self.op else { unreachable!("checked by the caller") };
        let id = up.id;
        let Some(writer) = up.writer.as_mut() else { return Ok(()) }; // failed: drop the rest
        up.written += data.len() as u64;
        let result = if up.written > up.expected {
            Err(WireError::Protocol {
                message: format!("upload {id} sent more than the {} bytes announced", up.expected),
            })
        } else {
            writer.write(data).await
        };
        if let Err(e) = result {
            if let Some(w) = up.writer.take() {
                let _ = w.finish().await;
            }
            return self.send_error(id, e).await;
        }
        Ok(())
    }

    pub(super) async fn upload_end(&mut self) -> Result<(), End> {
        let Op::Upload(mut up) = std::mem::replace(&mut self.op, Op::Idle) else {
            unreachable!("checked by the caller")
        };
        let id = up.id;
        let Some(writer) = up.writer.take() else {
            return Ok(()); // the error was already sent
        };
        let written = writer.finish().await;
        if up.written != up.expected {
            let message = format!("upload {id} sent {} of {} bytes", up.written, up.expected);
            up.discard().await;
            return self.send_error(id, WireError::Protocol { message }).await;
        }
        match written {
            Ok(()) => self.send(&Response::Ok { id }).await,
            Err(e) => self.send_error(id, e).await,
        }
    }

    pub(super) async fn download(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, false) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        match ops::open_for_download(target).await {
            Ok((file, len)) => {
                self.send(&Response::DownloadBegin { id, len }).await?;
                self.op = Op::Stream(Stream::file(id, file, len));
                Ok(())
            }
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    pub(super) async fn remove(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, false) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        match ops::remove(target).await {
            Ok(()) => self.send(&Response::Ok { id }).await,
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    pub(super) async fn listdir(&mut self, id: u64, path: &str) -> Result<(), End> {
        let target = match resolve(&self.dir, path, true) {
            Ok(t) => t,
            Err(e) => return self.send_error(id, e).await,
        };
        match ops::list(target).await {
            Ok(entries) => self.send(&Response::Listing { id, entries }).await,
            Err(e) => self.send_error(id, io_error(&e, path)).await,
        }
    }

    pub(super) async fn call(
        &mut self,
        id: u64,
        task: ErasedTask,
        limit: Option<Duration>,
    ) -> Result<(), End> {
        let worker = match self.worker.take() {
            Some(w) => w,
            None => match super::spare::new_worker(self.cfg, &self.dir) {
                Ok(w) => w,
                Err(e) => return self.send_error(id, WireError::from_pool(e)).await,
            },
        };
        if self.cfg.warm_spare {
            // What the next spare is filled with (see `spare::prefill`).
            if let Some(alloc) = alloc_of(&task) {
                self.last_alloc.replace(alloc);
            }
        }
        self.op = Op::Call(Call::start(id, worker, task, limit, self.teardown.take()));
        if let Some(want) = self.want_spare.take() {
            want.notify_one();
        }
        Ok(())
    }
}

/// The `AllocArgs` a call makes: the call itself, or the alloc step of a
/// `MeasureKernel` (decoded from the request, so bounded by its frame).
fn alloc_of(task: &ErasedTask) -> Option<ErasedTask> {
    use crate::measure::{AllocArgs, MeasureKernel};
    use popen_pool::Task as _;
    if task.name() == AllocArgs::NAME {
        return Some(task.clone());
    }
    if task.name() != MeasureKernel::NAME {
        return None;
    }
    let fused: MeasureKernel = postcard::from_bytes(task.payload()).ok()?;
    ErasedTask::new(&fused.alloc?).ok()
}
