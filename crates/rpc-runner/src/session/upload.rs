//! Uploads: [`Session::upload_bytes`], [`Session::upload`] (streamed in
//! chunks), and an upload with a call right behind it
//! ([`Session::upload_and_call_raw`]).

use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncReadExt as _;

use super::client::{Session, millis};
use super::error::SessionError;
use super::io::{Got, Opened, open_local};
use crate::wire::proto::{CHUNK, Request, Response, UPLOAD_CHUNK, data_frame, msg_frame};

/// Which half of [`Session::upload_and_call_raw`] failed.
#[derive(Debug)]
pub(crate) enum UploadOrCall {
    /// The upload (nothing of the call ran, or its answer is skipped).
    Upload(SessionError),
    /// The call, after the upload succeeded (answered after this long).
    Call(Duration, SessionError),
}

impl Session {
    /// Uploads `data` to `remote` (a path relative to the session dir).
    ///
    /// # Errors
    ///
    /// [`SessionError::BadPath`], [`SessionError::UploadTooLarge`],
    /// [`SessionError::RemoteIo`], connection errors. If the server ends the
    /// session meanwhile (e.g. its session timeout), its reason
    /// ([`SessionError::SessionTimeout`]).
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe: the server removes the partial file (see [`Session`]).
    pub async fn upload_bytes(&mut self, data: &[u8], remote: &str) -> Result<(), SessionError> {
        self.upload_from(remote, data.len() as u64, Source::Bytes(data)).await
    }

    /// Uploads the local file `local` to `remote`, streaming it in chunks (a
    /// file of at most one chunk is read whole, in one trip to a blocking
    /// thread, before it is sent).
    ///
    /// # Errors
    ///
    /// As [`upload_bytes`](Session::upload_bytes), and
    /// [`SessionError::LocalIo`] if the file cannot be read.
    ///
    /// # Cancel safety
    ///
    /// Cancel-safe, as [`upload_bytes`](Session::upload_bytes).
    pub async fn upload(
        &mut self,
        local: impl AsRef<Path>,
        remote: &str,
    ) -> Result<(), SessionError> {
        self.check_open()?;
        let local = local.as_ref();
        let local_err =
            |source| SessionError::LocalIo { path: local.display().to_string(), source };
        // One trip to a blocking thread opens, sizes and (for a file of at
        // most one chunk, such as a kernel) reads it.
        let opened = open_local(local).await.map_err(local_err)?;
        match opened {
            Opened::Small(data) => {
                self.upload_from(remote, data.len() as u64, Source::Bytes(&data)).await
            }
            Opened::Large(file, len) => {
                let file = tokio::fs::File::from_std(file);
                self.upload_from(remote, len, Source::File { file, path: local }).await
            }
        }
    }

    async fn upload_from(
        &mut self,
        remote: &str,
        len: u64,
        mut source: Source<'_>,
    ) -> Result<(), SessionError> {
        self.check_open()?;
        if len > self.max_upload {
            return Err(SessionError::UploadTooLarge { len, limit: self.max_upload });
        }
        let id = self.begin().await?;
        self.write(msg_frame(&Request::UploadBegin { id, path: remote, len }), false).await?;
        let mut buf = Vec::new();
        let mut sent = 0u64;
        while sent < len {
            // The server may already have refused the upload, or ended the
            // session: stop sending then.
            if let Some(err) = self.early_answer(id)? {
                self.write(msg_frame(&Request::UploadEnd { id }), true).await?;
                self.done(id);
                return Err(err);
            }
            let want = CHUNK.min((len - sent) as usize);
            let chunk = match &mut source {
                Source::Bytes(data) => &data[sent as usize..sent as usize + want],
                Source::File { file, path } => {
                    buf.resize(want, 0);
                    if let Err(e) = file.read_exact(&mut buf).await {
                        // The server still expects bytes: give the upload up.
                        self.abandon(id).await;
                        let path = path.display().to_string();
                        return Err(SessionError::LocalIo { path, source: e });
                    }
                    &buf[..]
                }
            };
            self.write(data_frame(UPLOAD_CHUNK, id, chunk), false).await?;
            sent += want as u64;
        }
        self.write(msg_frame(&Request::UploadEnd { id }), true).await?;
        self.expect_ok(id).await
    }

    /// An answer to the running upload `id` (or the end of the session)
    /// that has already arrived: the server's error, if so.
    fn early_answer(&mut self, id: u64) -> Result<Option<SessionError>, SessionError> {
        while let Some(got) = self.next_now()? {
            let Got::Frame(frame) = got else {
                return Err(self.fail(SessionError::protocol("oversized frame during an upload")));
            };
            match postcard::from_bytes::<Response<'_>>(&frame) {
                Ok(Response::Terminated { error }) => {
                    return Err(self.fail(SessionError::from_wire(error)));
                }
                Ok(Response::Error { id: rid, error }) if rid == id => {
                    return Ok(Some(SessionError::from_wire(error)));
                }
                Ok(r) if r.id().is_some_and(|rid| rid < id) => {} // an abandoned request's
                Ok(r) => {
                    let what = format!("unexpected {} during upload {id}", r.kind());
                    return Err(self.fail(SessionError::protocol(what)));
                }
                Err(e) => {
                    let what = format!("undecodable answer: {e}");
                    return Err(self.fail(SessionError::protocol(what)));
                }
            }
        }
        Ok(None)
    }

    pub(super) async fn expect_ok(&mut self, id: u64) -> Result<(), SessionError> {
        let answer = self.answer(id, self.request_timeout).await?;
        match answer.decode() {
            Some(Response::Ok { .. }) => {
                self.done(id);
                Ok(())
            }
            _ => Err(self.unexpected(&answer, "Ok")),
        }
    }

    /// Uploads the local file `local` to `remote`, then runs the task
    /// `name`, sending the call right behind the upload instead of waiting
    /// for the upload's answer first: the server handles requests in order
    /// (the call starts once the file is written), and answers them in
    /// order. Returns how long the upload took to be answered and the
    /// call's output. A file larger than one chunk is uploaded first, as
    /// [`upload`](Session::upload) does, then called.
    ///
    /// If the upload fails, its error is returned and the call, which the
    /// server may still run, is abandoned (the next request cancels it and
    /// skips its answer).
    ///
    /// # Cancel safety
    ///
    /// As [`call`](Session::call): the next request cancels what is still
    /// running and skips its answers.
    pub(crate) async fn upload_and_call_raw(
        &mut self,
        local: &Path,
        ahead: Option<super::ReadAhead>,
        remote: &str,
        name: &str,
        payload: &[u8],
        timeout: Option<Duration>,
    ) -> Result<(Duration, Bytes), UploadOrCall> {
        use UploadOrCall::{Call, Upload};
        let started = Instant::now();
        self.check_open().map_err(Upload)?;
        let local_err =
            |source| Upload(SessionError::LocalIo { path: local.display().to_string(), source });
        let opened = match ahead {
            Some(read) => super::io::joined(read).await,
            None => open_local(local).await,
        };
        let data = match opened.map_err(local_err)? {
            Opened::Small(data) => data,
            Opened::Large(file, len) => {
                // Streamed as `upload` does, from the file already open.
                let file = tokio::fs::File::from_std(file);
                let source = Source::File { file, path: local };
                self.upload_from(remote, len, source).await.map_err(Upload)?;
                let up = started.elapsed();
                let out = self.call_raw(name, payload, timeout).await;
                return out.map(|out| (up, out)).map_err(|e| Call(up, e));
            }
        };
        let len = data.len() as u64;
        if len > self.max_upload {
            return Err(Upload(SessionError::UploadTooLarge { len, limit: self.max_upload }));
        }
        let upload = self.begin().await.map_err(Upload)?;
        // The call's id follows the upload's; the upload stays the request
        // in flight (answers from it on are kept) until it is answered.
        self.next_id += 1;
        let id = self.next_id;
        let call = msg_frame(&Request::Call { id, name, payload, timeout_ms: millis(timeout) });
        if call.len() as u64 > self.server_max_frame {
            self.done(upload); // nothing was sent
            let limit = self.server_max_frame;
            let e = SessionError::FrameTooLarge { len: call.len() as u64, limit };
            return Err(Call(Duration::ZERO, e));
        }
        let sent = async {
            self.write(msg_frame(&Request::UploadBegin { id: upload, path: remote, len }), false)
                .await?;
            if !data.is_empty() {
                self.write(data_frame(UPLOAD_CHUNK, upload, &data), false).await?;
            }
            self.write(msg_frame(&Request::UploadEnd { id: upload }), false).await?;
            self.write(call, true).await
        };
        if let Err(e) = sent.await {
            // Whatever got out is skipped and cancelled by the next request.
            self.in_flight = Some(upload);
            return Err(Upload(e));
        }
        let answered = self.expect_ok(upload).await;
        // The call is the request in flight now (abandoned if the upload
        // failed: the next request cancels it).
        self.in_flight = Some(id);
        answered.map_err(Upload)?;
        let up = started.elapsed();
        self.call_answer(id, timeout).await.map(|out| (up, out)).map_err(|e| Call(up, e))
    }
}

/// Where an upload's bytes come from.
enum Source<'a> {
    Bytes(&'a [u8]),
    File { file: tokio::fs::File, path: &'a Path },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConnectOptions, DeviceServer, ServerConfig};

    /// `/bin/true` is no worker program: its calls fail at once, which is what
    /// the abandoned and failed calls below need.
    async fn session() -> (crate::ServerHandle, Session) {
        let program = popen_pool::WorkerProgram::binary("/bin/true");
        let cfg = ServerConfig::new("dev", program).warm_spare(false).zygote(false);
        let s = DeviceServer::start("127.0.0.1:0", cfg).await.unwrap();
        let addr = s.addr().to_string();
        let sess = Session::connect(&addr, "dev", &ConnectOptions::default()).await.unwrap();
        (s, sess)
    }

    /// The names in the session dir.
    async fn names(sess: &mut Session) -> Vec<String> {
        sess.listdir("").await.unwrap().into_iter().map(|e| e.name).collect()
    }

    /// Uploads `local`, read ahead, as `remote` and calls a task the worker
    /// does not serve: the call fails, the session does not break.
    async fn upload_read_ahead_then_fail(sess: &mut Session, local: &Path, remote: &str) {
        let ahead = Some(crate::session::read_ahead(local));
        match sess.upload_and_call_raw(local, ahead, remote, "no.such_task", b"", None).await {
            Err(UploadOrCall::Call(_, e)) => assert!(!matches!(e, SessionError::Broken { .. })),
            other => panic!("the call's error: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_failed_upload_abandons_its_call_and_the_session_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("k.so");
        std::fs::write(&local, b"not a library").unwrap();
        let (s, mut sess) = session().await;
        // Refused at its start (a path out of the session dir): the call
        // sent behind it is abandoned, its answer skipped.
        let r =
            sess.upload_and_call_raw(&local, None, "../out.so", "no.such_task", b"", None).await;
        match r {
            Err(UploadOrCall::Upload(SessionError::BadPath { .. })) => {}
            other => panic!("the upload's error: {other:?}"),
        }
        // The session is in step: the next requests get their own answers.
        assert!(sess.listdir("").await.unwrap().is_empty());
        sess.upload_bytes(b"x", "later.bin").await.unwrap();
        assert_eq!(names(&mut sess).await, ["later.bin"]);
        // An upload that works, then a call that fails: the call's error,
        // and the file is there.
        upload_read_ahead_then_fail(&mut sess, &local, "k.so").await;
        assert_eq!(names(&mut sess).await, ["k.so", "later.bin"]);
        // The bytes read ahead are the ones uploaded.
        assert_eq!(sess.download("k.so").await.unwrap(), b"not a library");
        // A file that cannot be read ahead: a local error naming it, nothing sent.
        let gone = dir.path().join("gone.so");
        let ahead = Some(crate::session::read_ahead(&gone));
        match sess.upload_and_call_raw(&gone, ahead, "gone.so", "no.such_task", b"", None).await {
            Err(UploadOrCall::Upload(SessionError::LocalIo { path, .. })) => {
                assert!(path.ends_with("gone.so"), "{path}")
            }
            other => panic!("an unreadable file: {other:?}"),
        }
        assert_eq!(sess.listdir("").await.unwrap().len(), 2);
        sess.close().await.unwrap();
        s.shutdown().await.unwrap();
    }

    /// A file over one chunk is streamed first, then called.
    #[tokio::test]
    async fn a_large_file_is_streamed_then_called() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("big.so");
        std::fs::write(&local, vec![3u8; CHUNK + 12_345]).unwrap();
        let (s, mut sess) = session().await;
        upload_read_ahead_then_fail(&mut sess, &local, "big.so").await;
        let listing = sess.listdir("").await.unwrap();
        let sizes: Vec<(String, u64)> = listing.into_iter().map(|e| (e.name, e.size)).collect();
        assert_eq!(sizes, [("big.so".to_owned(), (CHUNK + 12_345) as u64)]);
        sess.close().await.unwrap();
        s.shutdown().await.unwrap();
    }

    /// Dropped at any of its awaits, the next requests still get their own
    /// answers.
    #[tokio::test]
    async fn a_dropped_upload_and_call_leaves_the_session_in_step() {
        let dir = tempfile::tempdir().unwrap();
        let local = dir.path().join("k.so");
        std::fs::write(&local, vec![7u8; 300 << 10]).unwrap();
        let (s, mut sess) = session().await;
        for (i, micros) in [0u64, 20, 100, 300, 1000, 3000, 10_000].into_iter().enumerate() {
            let remote = format!("k{i}.so");
            let fut = sess.upload_and_call_raw(&local, None, &remote, "no.such_task", b"", None);
            let _ = tokio::time::timeout(Duration::from_micros(micros), fut).await;
            let mark = format!("mark{i}.bin");
            sess.upload_bytes(b"x", &mark).await.unwrap();
            let names = names(&mut sess).await;
            assert!(names.contains(&mark), "after a drop at {micros} us: {names:?}");
        }
        sess.close().await.unwrap();
        s.shutdown().await.unwrap();
    }
}
