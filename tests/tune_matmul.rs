//! End to end: the `tune_matmul` example (the main job) on a small problem,
//! with its embedded tracker and device server, checked through its exit
//! status, its JSON-lines tuning log and its convergence plot.
//!
//! The example binary is the one cargo built next to this test
//! (`target/<profile>/examples/tune_matmul`); `cargo test` and
//! `cargo nextest run` build the examples with the tests. If it is missing
//! (a run filtered to this test only), it is built first.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A run is killed after this long (nextest's own limit is 180 s).
const RUN_LIMIT: Duration = Duration::from_secs(150);

/// `target/<profile>`: this test runs as `target/<profile>/deps/tune_matmul-<hash>`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.parent().and_then(Path::parent).expect("the test binary is in target/<profile>/deps").into()
}

fn example_binary() -> PathBuf {
    let profile_dir = profile_dir();
    let exe = profile_dir.join("examples").join("tune_matmul");
    if exe.is_file() {
        return exe;
    }
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(other) => other.to_owned(),
    };
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo)
        .args(["build", "--example", "tune_matmul", "--profile", &profile])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .spawn()
        .expect("cargo can be started to build the example");
    let (status, ..) = wait_bounded(&mut build, RUN_LIMIT);
    assert!(
        status.is_some_and(|s| s.success()) && exe.is_file(),
        "the example {} is missing and `cargo build --example tune_matmul` did not make it \
         (build the examples first: cargo build --example tune_matmul)",
        exe.display()
    );
    exe
}

/// Waits for `child` for at most `limit` (killing it then); returns its exit
/// status (`None` if it was killed) and its stdout and stderr.
fn wait_bounded(child: &mut Child, limit: Duration) -> (Option<ExitStatus>, String, String) {
    let mut readers = [
        child.stdout.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
        child.stderr.take().map(|r| Box::new(r) as Box<dyn Read + Send>),
    ]
    .map(|r| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut r) = r {
                let mut bytes = Vec::new();
                let _ = r.read_to_end(&mut bytes);
                text = String::from_utf8_lossy(&bytes).into_owned();
            }
            text
        })
    })
    .into_iter();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stdout = readers.next().unwrap().join().unwrap();
    let stderr = readers.next().unwrap().join().unwrap();
    (status, stdout, stderr)
}

/// Set in the example's environment (its workers inherit it) to find them.
const TAG_VAR: &str = "TUNE_MATMUL_TEST_TAG";

/// Runs the example with `args`, tagged with `tag`; returns its exit status
/// and output.
fn run_example(args: &[&str], tag: &str) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(example_binary())
        .args(args)
        .env_remove("RUST_LOG")
        .env(TAG_VAR, tag)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the example starts");
    wait_bounded(&mut child, RUN_LIMIT)
}

/// Pids of processes (zombies included) whose environment carries `tag`:
/// the example run and its workers (the example binary re-executed).
fn processes_tagged(tag: &str) -> Vec<u32> {
    let needle = format!("{TAG_VAR}={tag}");
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|&b| b == 0).any(|var| var == needle.as_bytes()))
        })
        .collect()
}

fn by_name<'a>(log: &'a [Value], name: &str) -> &'a Value {
    log.iter().find(|l| l["name"] == name).unwrap_or_else(|| panic!("no {name} in the log"))
}

#[test]
fn a_small_tuning_run_ranks_the_good_kernels_and_classifies_the_broken_ones() {
    let out = tempfile::tempdir().unwrap();
    let out_dir = out.path().join("run");
    let out_arg = out_dir.to_str().unwrap();
    let started = Instant::now();
    let tag = format!("small-run-{}", std::process::id());
    let (status, stdout, stderr) = run_example(
        &["--size", "64,64,64", "--trials", "8", "--seed", "7", "--out", out_arg],
        &tag,
    );
    let status = status.unwrap_or_else(|| {
        panic!("killed after {RUN_LIMIT:?}\nstdout:\n{stdout}\nstderr:\n{stderr}")
    });
    assert!(status.success(), "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    eprintln!("tune_matmul ran in {:.1} s:\n{stdout}", started.elapsed().as_secs_f64());
    assert!(stdout.contains("speedup of the fastest median over naive:"), "{stdout}");
    // A best only beyond noise, else the tie set; finalists re-measured interleaved.
    assert!(stdout.contains("\nbest: ") || stdout.contains("\nbest within noise: "), "{stdout}");
    assert!(stdout.contains(" ± "), "costs as median ± noise: {stdout}");
    assert!(stdout.contains(out_arg), "the output directory is printed: {stdout}");

    // The tuning log: one parseable object per candidate, in trial order.
    let text = std::fs::read_to_string(out_dir.join("tuning_log.jsonl")).unwrap();
    let log: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad log line {l:?}: {e}")))
        .collect();
    assert_eq!(log.len(), 8, "--trials 8 measures 8 candidates:\n{text}");
    for (i, line) in log.iter().enumerate() {
        assert_eq!(line["trial"], i, "{line}");
        for field in ["name", "kind", "status", "run_secs"] {
            assert!(!line[field].is_null(), "{field} missing: {line}");
        }
    }

    let naive = by_name(&log, "naive");
    assert_eq!(naive["status"], "ok", "{naive}");
    let compile = by_name(&log, "broken_compile");
    assert_eq!(compile["status"], "compile_error", "{compile}");
    assert!(
        compile["error"].as_str().unwrap().contains("undeclared"),
        "compiler stderr: {compile}"
    );
    let crash = by_name(&log, "broken_crash");
    assert_eq!(crash["status"], "crashed", "{crash}");
    assert!(crash["error"].as_str().unwrap().contains("SIGSEGV"), "{crash}");
    let wrong = by_name(&log, "broken_wrong_result");
    assert_eq!(wrong["status"], "wrong_result", "{wrong}");
    assert!(wrong["gflops"].is_null(), "a wrong result is not ranked: {wrong}");

    // Every candidate meant to work did, with costs; at least one tuned one.
    let good: Vec<&Value> = log.iter().filter(|l| l["expected"] == "ok").collect();
    for line in &good {
        assert_eq!(line["status"], "ok", "{line}");
        let runs = line["run_secs"].as_array().unwrap();
        assert!(!runs.is_empty() && runs.iter().all(|r| r.as_f64().unwrap() > 0.0), "{line}");
        assert!(line["median_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["gflops"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["max_rel_err"].as_f64().unwrap() <= 1e-3, "{line}");
        // Where and how long: the server and the time of each stage.
        assert!(line["server"].as_str().is_some_and(|s| s.starts_with("127.0.0.1:")), "{line}");
        assert!(line["stages"]["evaluate"].is_object(), "{line}");
        // How far to trust it.
        assert!(line["rel_noise"].as_f64().is_some_and(|n| n >= 0.0), "{line}");
        assert!(line["stable"].is_boolean() && line["finalist"].is_boolean(), "{line}");
        assert!(line["stop"].is_string() && line["warnings"].is_array(), "{line}");
    }
    assert!(good.iter().any(|l| l["name"] != "naive"), "a tuned candidate: {text}");
    // The fastest were re-measured together, interleaved.
    let finalists: Vec<&&Value> = good.iter().filter(|l| l["finalist"] == true).collect();
    assert!(!finalists.is_empty(), "{text}");
    assert!(finalists.iter().all(|l| l["interleaved"] == true), "{text}");

    // The convergence plot.
    let png = std::fs::read(out_dir.join("convergence.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");

    // Nothing is left behind: no worker of the example outlives it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_tagged(&tag).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_tagged(&tag), Vec::<u32>::new(), "leftover processes of the example");
}

#[test]
fn bad_flags_fail_with_a_clear_message() {
    let (status, _, stderr) = run_example(&["--size", "64,0,64"], "bad-size");
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("dimensions must be positive"), "{stderr}");

    // Nothing listens on port 1: the tracker cannot be reached.
    let out = tempfile::tempdir().unwrap();
    let out_arg = out.path().to_str().unwrap();
    let (status, _, stderr) =
        run_example(&["--tracker", "127.0.0.1:1", "--out", out_arg], "bad-tracker");
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(stderr.contains("the tracker at 127.0.0.1:1"), "{stderr}");
    assert!(stderr.contains("refused"), "the cause is named: {stderr}");
}
