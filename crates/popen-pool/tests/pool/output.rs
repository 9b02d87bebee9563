//! Tasks printing to stdout and stderr, in every output mode; no libtest banner.

use std::sync::{Arc, Mutex};

use popen_pool::{OutputMode, PopenPool};

use crate::common::*;
use crate::hygiene::*;
use crate::test_worker_program;

// ---------------------------------------------------------------------------
// 3. Tasks printing to stdout do not disturb the channel, in every output mode.

async fn noisy_tasks_return_their_values(pool: PopenPool) {
    for i in 0..5 {
        assert_eq!(pool.submit(Noisy(i)).await, Ok(i));
        assert_eq!(pool.submit(Int(100 + i)).await, Ok(100 + i));
    }
    assert_eq!(pool.stats().crashes, 0);
    assert_eq!(pool.stats().spawned, 1, "one worker served all the noisy tasks");
    pool.shutdown().await;
}

#[tokio::test]
async fn noisy_task_with_inherited_stdout() {
    let pool = PopenPool::builder(test_worker_program()).max_workers(1).build().unwrap();
    noisy_tasks_return_their_values(pool).await;
}

#[tokio::test]
async fn noisy_task_with_null_stdout() {
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .stdout(OutputMode::Null)
        .stderr(OutputMode::Null)
        .build()
        .unwrap();
    noisy_tasks_return_their_values(pool).await;
}

/// Records the `popen_pool::worker` events: (stream, message).
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<(String, String)>>>);

#[derive(Default)]
struct LineFields {
    stream: String,
    message: String,
}

impl tracing::field::Visit for LineFields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        match field.name() {
            "stream" => self.stream = value.to_owned(),
            "message" => self.message = value.to_owned(),
            _ => {}
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "stream" => self.stream = format!("{value:?}"),
            "message" => self.message = format!("{value:?}"),
            _ => {}
        }
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target() == "popen_pool::worker" {
            let mut fields = LineFields::default();
            event.record(&mut fields);
            self.0.lock().unwrap().push((fields.stream, fields.message));
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test]
async fn noisy_task_with_tracing_output() {
    let capture = Capture::default();
    // The test runtime is single-threaded: the line forwarders run on this thread.
    let _guard = tracing::subscriber::set_default(capture.clone());
    let pool = PopenPool::builder(test_worker_program())
        .max_workers(1)
        .stdout(OutputMode::Tracing)
        .stderr(OutputMode::Tracing)
        .build()
        .unwrap();
    noisy_tasks_return_their_values(pool).await;

    let count = |stream: &str, needle: &str| {
        let lines = capture.0.lock().unwrap();
        lines.iter().filter(|(s, m)| s == stream && m.contains(needle)).count()
    };
    let all_there = eventually(SOON, || {
        count("stdout", "garbage that looks like a frame header") >= 500
            && count("stderr", "noise on stderr") >= 5
    })
    .await;
    let lines = capture.0.lock().unwrap().clone();
    assert!(
        all_there,
        "missing forwarded lines; got {} events: {:?}",
        lines.len(),
        &lines[..lines.len().min(5)]
    );
    for i in 0..5 {
        let line = format!("noise \0\0\0\x05 {i} garbage that looks like a frame header");
        assert_eq!(count("stdout", &line), 100, "stdout lines of task {i}");
    }
    assert_eq!(count("stderr", "noise on stderr"), 5);
    assert_eq!(count("stdout", "running 1 test"), 0, "libtest's banner became a worker line");
}

const BANNER_ENV: &str = "POPEN_POOL_TEST_BANNER_PARENT";

/// Not a test of its own: re-run with `POPEN_POOL_TEST_BANNER_PARENT=1`, it
/// plays a test whose pool (inherited stdout) restarts its workers a few times.
#[test]
fn banner_parent_program_entry() {
    if std::env::var_os(BANNER_ENV).is_none() {
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let pool = PopenPool::builder(test_worker_program())
            .max_workers(2)
            .maximum_process_uses(1)
            .build()
            .unwrap();
        for i in 0..3 {
            assert_eq!(pool.submit(Noisy(i)).await, Ok(i));
        }
        pool.shutdown().await;
    });
}

#[test]
fn workers_print_no_libtest_banner_into_the_test_output() {
    let module = module_path!().split_once("::").map_or(module_path!(), |(_, rest)| rest);
    let entry = format!("{module}::banner_parent_program_entry");
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([entry.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(BANNER_ENV, "1")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{:?}: {stdout}", out.status);
    assert_eq!(
        stdout.matches("garbage that looks like a frame header").count(),
        300,
        "the tasks' own output reaches the test output: {stdout}"
    );
    // The parent's own banner, once; none of its (at least 4) workers'.
    assert_eq!(stdout.matches("running 1 test").count(), 1, "{stdout}");
}
