//! The worker's task loop: read frames in batches, run tasks one at a time
//! in the order sent, answer each with one `Done` flushed before the next
//! task starts.
//!
//! Before it starts a task the worker takes in every frame already on the
//! channel without blocking, so a `Cancel` the parent sent for a task still
//! queued here is seen in time and that task is answered `Skipped`.

use std::collections::VecDeque;
use std::io::{self, BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::panic::{self, AssertUnwindSafe};

use crate::codec::{CodecError, MAGIC, write_frame};
use crate::protocol::{FromWorker, Outcome, ToWorker};
use crate::task::{Registry, WorkerContext};

const HEADER: usize = 8;

/// Incoming bytes, parsed into frames in place.
struct Inbox {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max: usize,
}

impl Inbox {
    fn new(max: usize) -> Self {
        Inbox { buf: vec![0; 64 * 1024], start: 0, end: 0, max }
    }

    /// The next complete frame's body, if one is buffered.
    fn next_frame(&mut self) -> Result<Option<&[u8]>, CodecError> {
        let avail = &self.buf[self.start..self.end];
        let n = avail.len().min(MAGIC.len());
        if avail[..n] != MAGIC[..n] {
            return Err(CodecError::BadMagic { found: avail[..n].to_vec() });
        }
        if avail.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes(avail[4..HEADER].try_into().expect("4 bytes")) as usize;
        if len > self.max {
            return Err(CodecError::TooLarge { len, max: self.max });
        }
        if avail.len() < HEADER + len {
            return Ok(None);
        }
        let body = self.start + HEADER..self.start + HEADER + len;
        self.start = body.end;
        Ok(Some(&self.buf[body]))
    }

    /// Reads more bytes: waiting for them, or (`wait == false`) only those
    /// already there. `Ok(None)`: nothing there now; `Ok(Some(0))`: EOF.
    fn fill(&mut self, ch: &mut UnixStream, wait: bool) -> io::Result<Option<usize>> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        // Room for the whole frame being received, and for a good read.
        let need = if self.end - self.start >= HEADER {
            let at = self.start + 4..self.start + HEADER;
            let len = u32::from_be_bytes(self.buf[at].try_into().expect("4 bytes")) as usize;
            HEADER + len.min(self.max)
        } else {
            HEADER
        };
        if self.buf.len() - self.end < 4096 || self.buf.len() - self.start < need {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            let want = need.max(self.end + 4096);
            if self.buf.len() < want {
                self.buf.resize(want, 0);
            }
        }
        loop {
            let room = &mut self.buf[self.end..];
            let n = if wait {
                ch.read(room)
            } else {
                // SAFETY: `room` is a valid, writable buffer of its length.
                let n = unsafe {
                    libc::recv(
                        ch.as_raw_fd(),
                        room.as_mut_ptr().cast(),
                        room.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
            };
            match n {
                Ok(n) => {
                    self.end += n;
                    return Ok(Some(n));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if !wait && e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}

/// A message taken in and not acted on yet.
enum Item {
    Run { id: u64, frame: Vec<u8>, cancelled: bool },
    Exit,
}

/// What made the loop end.
pub(crate) enum End {
    /// The parent asked the worker to exit.
    Exit,
    /// The parent closed the channel.
    Eof,
}

struct Queue {
    items: VecDeque<Item>,
    /// Spent frame buffers, reused.
    spare: Vec<Vec<u8>>,
}

impl Queue {
    fn take(&mut self, frame: &[u8]) -> Result<(), CodecError> {
        let msg: ToWorker<'_> = postcard::from_bytes(frame).map_err(bad_data)?;
        match msg {
            ToWorker::Run { id, .. } => {
                let mut buf = self.spare.pop().unwrap_or_default();
                buf.clear();
                buf.extend_from_slice(frame);
                self.items.push_back(Item::Run { id, frame: buf, cancelled: false });
            }
            ToWorker::Cancel { id } => {
                for item in &mut self.items {
                    if let Item::Run { id: queued, cancelled, .. } = item {
                        if *queued == id {
                            *cancelled = true;
                        }
                    }
                }
            }
            ToWorker::Exit => self.items.push_back(Item::Exit),
        }
        Ok(())
    }
}

fn bad_data(e: postcard::Error) -> CodecError {
    CodecError::Io(io::Error::new(io::ErrorKind::InvalidData, e))
}

/// Serves tasks until the parent says exit or closes the channel. `after`
/// runs after every task (the worker reaps what its task left behind).
pub(crate) fn run_tasks(
    channel: UnixStream,
    registry: &Registry,
    max: usize,
    last_panic: &dyn Fn() -> Option<String>,
    after: &dyn Fn(),
) -> Result<End, CodecError> {
    let mut reader = channel.try_clone()?;
    let mut writer = BufWriter::with_capacity(64 * 1024, channel);
    let mut inbox = Inbox::new(max);
    let mut queue = Queue { items: VecDeque::new(), spare: Vec::new() };
    let mut ctx = WorkerContext::default();
    let mut scratch = Vec::new();
    loop {
        // Take in every frame buffered, then what is on the channel now;
        // wait for more only with nothing to do.
        loop {
            while let Some(frame) = inbox.next_frame()? {
                queue.take(frame)?;
            }
            let wait = queue.items.is_empty();
            if wait {
                writer.flush()?;
            }
            match inbox.fill(&mut reader, wait)? {
                Some(0) => return Ok(End::Eof),
                Some(_) => {}
                None => break,
            }
        }
        let Some(item) = queue.items.pop_front() else { continue };
        let (id, frame, cancelled) = match item {
            Item::Exit => {
                writer.flush()?;
                return Ok(End::Exit);
            }
            Item::Run { id, frame, cancelled } => (id, frame, cancelled),
        };
        if cancelled {
            let done = FromWorker::Done { id, outcome: Outcome::Skipped };
            write_frame(&mut writer, &done, &mut scratch, max)?;
            queue.spare.push(frame);
            continue;
        }
        // The `Done` of the previous task is out before this one starts.
        writer.flush()?;
        let ToWorker::Run { name, payload, .. } =
            postcard::from_bytes::<ToWorker<'_>>(&frame).map_err(bad_data)?
        else {
            unreachable!("only runs are queued as runs")
        };
        let result: Result<Vec<u8>, Outcome<'static>> = match registry.get(name) {
            None => Err(Outcome::UnknownTask { name: name.to_owned() }),
            Some(handler) => {
                match panic::catch_unwind(AssertUnwindSafe(|| handler(payload, &mut ctx))) {
                    Ok(Ok(out)) => Ok(out),
                    Ok(Err(f)) => Err(Outcome::Failed { kind: f.kind, message: f.message }),
                    Err(_) => Err(Outcome::Panicked {
                        message: last_panic().unwrap_or_else(|| "panic".to_owned()),
                    }),
                }
            }
        };
        ctx.count_task();
        let output;
        let outcome = match result {
            Ok(out) => {
                output = out;
                Outcome::Ok(&output)
            }
            Err(failure) => failure,
        };
        match write_frame(&mut writer, &FromWorker::Done { id, outcome }, &mut scratch, max) {
            Err(CodecError::TooLarge { len, max: m }) => {
                let outcome = Outcome::TooLarge { len: len as u64, max: m as u64 };
                write_frame(&mut writer, &FromWorker::Done { id, outcome }, &mut scratch, max)?;
            }
            other => other?,
        }
        queue.spare.push(frame);
        // With nothing queued, out now; else flushed when the next task
        // starts (after the worker took in what else is on the channel).
        if queue.items.is_empty() {
            writer.flush()?;
        }
        after();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inbox_parses_frames_split_across_reads() {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut wire = Vec::new();
        let mut scratch = Vec::new();
        for id in 0..3 {
            write_frame(&mut wire, &ToWorker::Cancel { id }, &mut scratch, 1024).unwrap();
        }
        let mut inbox = Inbox::new(1024);
        assert!(inbox.fill(&mut b, false).unwrap().is_none(), "nothing there yet");
        a.write_all(&wire[..5]).unwrap();
        inbox.fill(&mut b, true).unwrap();
        assert!(inbox.next_frame().unwrap().is_none());
        a.write_all(&wire[5..]).unwrap();
        inbox.fill(&mut b, true).unwrap();
        let mut ids = Vec::new();
        while let Some(f) = inbox.next_frame().unwrap() {
            match postcard::from_bytes::<ToWorker<'_>>(f).unwrap() {
                ToWorker::Cancel { id } => ids.push(id),
                _ => panic!("unexpected message"),
            }
        }
        assert_eq!(ids, [0, 1, 2]);
        drop(a);
        assert_eq!(inbox.fill(&mut b, true).unwrap(), Some(0));
    }

    #[test]
    fn inbox_rejects_garbage_and_oversized_frames() {
        let mut inbox = Inbox::new(16);
        inbox.buf[..2].copy_from_slice(b"PQ");
        inbox.end = 2;
        assert!(matches!(inbox.next_frame(), Err(CodecError::BadMagic { .. })));
        let mut inbox = Inbox::new(16);
        inbox.buf[..8].copy_from_slice(b"PPv2\0\0\x01\0");
        inbox.end = 8;
        assert!(matches!(inbox.next_frame(), Err(CodecError::TooLarge { len: 256, max: 16 })));
    }
}
