//! `LocalBuilder`: real compiles in worker processes (this test binary re-run
//! as a worker), compile errors with the compiler's stderr, timeouts that kill
//! the compiler, crashes, batch order, plugged-in build tasks, name checks.

use std::io::ErrorKind;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use popen_pool::ExitInfo;
use rpc_runner::measure::{
    BuildError, BuildOutput, BuilderInput, BuilderResult, CompileC, LocalBuilder,
    LocalBuilderConfig,
};

use crate::common::{eventually, within};
use crate::tasks::{CopyPrebuilt, CrashOrCompile};

/// A kernel with the artifact's C-ABI entry point.
const GOOD: &str = "#include <stdint.h>\n\
                    int32_t entry(void* args, int32_t num_args) { (void)args; return num_args; }\n";

/// A syntax error on line 3.
const BAD: &str = "#include <stdint.h>\n\
                   int32_t entry(void* args, int32_t num_args) {\n\
                   \x20   return num_args +;\n\
                   }\n";

/// Compiles only with `-DVALUE=...`.
const NEEDS_VALUE: &str = "#ifndef VALUE\n#error VALUE is not defined\n#endif\n\
                           int value(void) { return VALUE; }\n";

/// How long one test's builds may take, all told.
const BUILD_LIMIT: Duration = Duration::from_secs(60);

fn config(out_dir: &Path) -> LocalBuilderConfig {
    LocalBuilderConfig::default().max_workers(2).timeout(Duration::from_secs(30)).out_dir(out_dir)
}

fn new_builder(out_dir: &Path) -> LocalBuilder {
    LocalBuilder::new(crate::test_worker_program(), config(out_dir)).expect("builder")
}

async fn build(
    builder: &LocalBuilder<impl rpc_runner::measure::BuildTask>,
    inputs: Vec<BuilderInput>,
) -> Vec<BuilderResult> {
    let results =
        match tokio::time::timeout(BUILD_LIMIT, builder.build(inputs).collect_ordered()).await {
            Ok(results) => results,
            Err(_) => panic!("builds not done within {BUILD_LIMIT:?}"),
        };
    for r in &results {
        eprintln!("{}: {:?}", r.input_name, r.result);
    }
    results
}

fn ok(result: &BuilderResult) -> &BuildOutput {
    match &result.result {
        Ok(out) => out,
        Err(e) => panic!("{}: expected an artifact, got {e}", result.input_name),
    }
}

/// Asserts `path` is an ELF shared object (`e_type == ET_DYN`).
fn assert_shared_library(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    assert!(bytes.len() > 64, "{} is too short for ELF", path.display());
    assert_eq!(&bytes[..4], b"\x7fELF", "{} is not ELF", path.display());
    let e_type = u16::from_le_bytes([bytes[16], bytes[17]]);
    assert_eq!(e_type, 3, "{} is not a shared object (ET_DYN)", path.display());
}

#[tokio::test]
async fn good_source_builds_a_shared_library() {
    let dir = tempfile::tempdir().unwrap();
    let builder = new_builder(dir.path());
    let results = build(&builder, vec![BuilderInput::new("good", GOOD)]).await;
    let out = ok(&results[0]);
    assert_eq!(results[0].input_name, "good");
    assert_eq!(out.artifact_path, dir.path().join("good.so"));
    assert!(out.artifact_path.is_absolute());
    assert_shared_library(&out.artifact_path);
    assert_eq!(std::fs::read_to_string(dir.path().join("good.c")).unwrap(), GOOD);
    assert!(out.build_secs > 0.0 && out.build_secs < BUILD_LIMIT.as_secs_f64(), "{out:?}");
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test]
async fn syntax_error_is_a_compile_error_with_the_compilers_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let builder = new_builder(dir.path());
    let results = build(&builder, vec![BuilderInput::new("bad", BAD)]).await;
    match &results[0].result {
        Err(BuildError::Compile { stderr, status }) => {
            assert!(matches!(status, Some(code) if *code != 0), "{status:?}");
            // gcc and clang both write `path:line:col: error: ...`.
            assert!(stderr.contains("bad.c:3:"), "no error line in stderr:\n{stderr}");
            assert!(stderr.contains("error"), "{stderr}");
        }
        other => panic!("expected a compile error, got {other:?}"),
    }
    assert!(!dir.path().join("bad.so").exists(), "no artifact for a failed build");
    within("shutdown", builder.shutdown()).await;
}

/// Processes (pid, comm, state) whose command line mentions `marker`.
fn processes_mentioning(marker: &str) -> Vec<(u32, String, char)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if !String::from_utf8_lossy(&cmdline).contains(marker) {
            continue;
        }
        let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        found.push((pid, comm.trim().to_owned(), process_state(pid).unwrap_or('?')));
    }
    found
}

/// The state letter of `pid` (`R`, `S`, `Z`...), or `None` if it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesized command name.
    stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next())
}

/// True while some process has the FIFO open for reading. Only for after the
/// fact: opening the FIFO for writing and closing it would give a blocked
/// reader an end of file, and unblock the compiler.
fn fifo_has_reader(fifo: &Path) -> bool {
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(fifo);
    match opened {
        Ok(_) => true,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => false,
        Err(e) => panic!("open {}: {e}", fifo.display()),
    }
}

/// A source whose compile hangs: the preprocessor blocks opening a FIFO
/// (created in `dir`) that nobody writes.
fn hanging_source(dir: &Path) -> (PathBuf, String) {
    let fifo = dir.join("never-written.h");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let source = format!("#include \"{}\"\n{GOOD}", fifo.display());
    (fifo, source)
}

/// Waits until the compiler processes whose command line mentions `marker`
/// (the hung compile's source path) have died and nothing reads the FIFO.
///
/// A killed `cc` and `cc1` are orphans, reaped by init (or a subreaper), not
/// by the builder: a zombie left for init to reap counts as gone.
async fn assert_compilers_killed(marker: &str, compilers: &[(u32, String, char)], fifo: &Path) {
    let dead = |pid: u32| matches!(process_state(pid), None | Some('Z'));
    eventually("the compiler processes to die", async || {
        processes_mentioning(marker).is_empty() && compilers.iter().all(|(pid, ..)| dead(*pid))
    })
    .await;
    assert!(!fifo_has_reader(fifo), "something still reads the FIFO");
    // Report whether init has reaped them yet (it is not the builder's job).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(2)
        && compilers.iter().any(|(pid, ..)| process_state(*pid).is_some())
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let states: Vec<_> =
        compilers.iter().map(|(pid, comm, _)| (comm, process_state(*pid))).collect();
    eprintln!("after the kill, {:?} later: {states:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_compile_times_out_and_leaves_no_compiler_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (fifo, source) = hanging_source(dir.path());
    let out_dir = dir.path().join("out");
    let limit = Duration::from_millis(1500);
    let builder =
        LocalBuilder::new(crate::test_worker_program(), config(&out_dir).timeout(limit)).unwrap();

    let started = Instant::now();
    let pending = builder.build_one(BuilderInput::new("hangs", source));
    let marker = out_dir.join("hangs.c").display().to_string();
    let mut compilers = Vec::new();
    eventually("the compiler to block on the FIFO", async || {
        compilers = processes_mentioning(&marker);
        compilers.iter().any(|(_, comm, _)| comm == "cc1")
    })
    .await;
    eprintln!("compiler processes while hung: {compilers:?}");

    let result = within("the timeout", pending).await;
    let elapsed = started.elapsed();
    assert!(
        matches!(result.result, Err(BuildError::Timeout { limit: l }) if l == limit),
        "{result:?}"
    );
    assert!(elapsed >= limit, "timed out early: {elapsed:?}");
    assert!(elapsed < limit + Duration::from_secs(3), "timeout took {elapsed:?}");
    eprintln!("timeout reported after {elapsed:?}");

    assert_compilers_killed(&marker, &compilers, &fifo).await;
    assert!(!out_dir.join("hangs.so").exists());
    assert_eq!(builder.stats().timeouts, 1);

    // The pool replaced the killed worker: the builder still builds.
    let again = build(&builder, vec![BuilderInput::new("after", GOOD)]).await;
    assert_shared_library(&ok(&again[0]).artifact_path);
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_build_kills_its_compiler() {
    let dir = tempfile::tempdir().unwrap();
    let (fifo, source) = hanging_source(dir.path());
    let out_dir = dir.path().join("out");
    let builder = new_builder(&out_dir);
    let pending = builder.build_one(BuilderInput::new("dropped", source));
    let marker = out_dir.join("dropped.c").display().to_string();
    let mut compilers = Vec::new();
    eventually("the compiler to block on the FIFO", async || {
        compilers = processes_mentioning(&marker);
        compilers.iter().any(|(_, comm, _)| comm == "cc1")
    })
    .await;
    drop(pending);
    assert_compilers_killed(&marker, &compilers, &fifo).await;
    eventually("the build to count as cancelled", async || builder.stats().cancelled == 1).await;
    assert_eq!(builder.stats().timeouts, 0);
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_build_batch_kills_its_compiler_and_resolves_to_cancelled() {
    let dir = tempfile::tempdir().unwrap();
    let (fifo, source) = hanging_source(dir.path());
    let out_dir = dir.path().join("out");
    let builder = new_builder(&out_dir);
    let cancel = tokio_util::sync::CancellationToken::new();
    let batch = builder.build_with_cancel(
        vec![BuilderInput::new("hung", source), BuilderInput::new("fine", GOOD)],
        &cancel,
    );
    let marker = out_dir.join("hung.c").display().to_string();
    let mut compilers = Vec::new();
    eventually("the compiler to block on the FIFO", async || {
        compilers = processes_mentioning(&marker);
        compilers.iter().any(|(_, comm, _)| comm == "cc1")
    })
    .await;
    cancel.cancel();
    let results = within("the cancelled batch", batch.collect_ordered()).await;
    assert!(matches!(results[0].result, Err(BuildError::Cancelled)), "{:?}", results[0]);
    // The other build either finished before the cancel or was cancelled too.
    assert!(
        results[1].result.is_ok() || matches!(results[1].result, Err(BuildError::Cancelled)),
        "{:?}",
        results[1]
    );
    assert_compilers_killed(&marker, &compilers, &fifo).await;
    // A clone shares the pool: it still builds.
    let clone = builder.clone();
    let again = build(&clone, vec![BuilderInput::new("after", GOOD)]).await;
    assert_shared_library(&ok(&again[0]).artifact_path);
    drop(clone);
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test]
async fn a_build_task_that_aborts_is_a_crash_and_the_builder_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let builder =
        LocalBuilder::with_task(crate::test_worker_program(), config(dir.path()), CrashOrCompile)
            .unwrap();
    let results = build(
        &builder,
        vec![
            BuilderInput::new("crash_1", GOOD),
            BuilderInput::new("fine", GOOD),
            BuilderInput::new("crash_2", GOOD),
        ],
    )
    .await;
    for r in [&results[0], &results[2]] {
        match &r.result {
            Err(BuildError::Crash { exit: Some(ExitInfo::Signal(6)), message }) => {
                assert!(message.contains("SIGABRT"), "{message}");
            }
            other => panic!("{}: expected a crash by SIGABRT, got {other:?}", r.input_name),
        }
    }
    assert_shared_library(&ok(&results[1]).artifact_path);
    assert_eq!(builder.stats().crashes, 2);
    within("shutdown", builder.shutdown()).await;
}

/// What a result should be, by kind.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Artifact,
    Compile,
    Invalid,
}

fn kind(result: &BuilderResult) -> Expect {
    match &result.result {
        Ok(out) => {
            assert_shared_library(&out.artifact_path);
            Expect::Artifact
        }
        Err(BuildError::Compile { .. }) => Expect::Compile,
        Err(BuildError::InvalidInput { .. }) => Expect::Invalid,
        Err(e) => panic!("{}: unexpected {e}", result.input_name),
    }
}

/// A source that takes the compiler a while at -O3.
fn slow_source() -> String {
    let mut s = String::from("#include <stdint.h>\n");
    for i in 0..40 {
        s.push_str(&format!(
            "int32_t f{i}(int32_t* a, int32_t n) {{ int32_t s = {i}; \
             for (int32_t j = 0; j < n; j++) s += a[j] * (j ^ {i}); return s; }}\n"
        ));
    }
    s
}

fn mixed_batch() -> (Vec<BuilderInput>, Vec<Expect>) {
    use Expect::*;
    let inputs = vec![
        (BuilderInput::new("slow", slow_source()), Artifact),
        (BuilderInput::new("syntax_error", BAD), Compile),
        (BuilderInput::new("with_value", NEEDS_VALUE).with_flags(["-DVALUE=3"]), Artifact),
        (BuilderInput::new("../escape", GOOD), Invalid),
        (BuilderInput::new("small", GOOD), Artifact),
        (BuilderInput::new("without_value", NEEDS_VALUE), Compile),
        (BuilderInput::new("small", GOOD), Invalid), // the same name twice
        (BuilderInput::new("last", GOOD), Artifact),
    ];
    inputs.into_iter().unzip()
}

#[tokio::test]
async fn a_mixed_batch_comes_back_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let builder = new_builder(dir.path());
    let (inputs, expected) = mixed_batch();
    let names: Vec<String> = inputs.iter().map(|i| i.name.clone()).collect();
    let started = Instant::now();
    let results = build(&builder, inputs).await;
    eprintln!("8 mixed inputs on 2 workers: {:?}", started.elapsed());
    let got_names: Vec<&str> = results.iter().map(|r| r.input_name.as_str()).collect();
    assert_eq!(got_names, names);
    let kinds: Vec<Expect> = results.iter().map(kind).collect();
    assert_eq!(kinds, expected);
    match &results[5].result {
        Err(BuildError::Compile { stderr, .. }) => {
            assert!(stderr.contains("VALUE is not defined"), "{stderr}");
        }
        other => panic!("{other:?}"),
    }
    match &results[6].result {
        Err(BuildError::InvalidInput { reason, .. }) => {
            assert!(reason.contains("twice"), "{reason}")
        }
        other => panic!("{other:?}"),
    }

    // The stream variant: every index once, in completion order.
    let (inputs, expected) = mixed_batch();
    let streamed: Vec<(usize, BuilderResult)> =
        within("build stream", builder.build(inputs).collect()).await;
    let mut indices: Vec<usize> = streamed.iter().map(|(i, _)| *i).collect();
    eprintln!("build_stream completion order: {indices:?}");
    for (i, r) in &streamed {
        assert_eq!(kind(r), expected[*i], "{}", r.input_name);
    }
    indices.sort_unstable();
    assert_eq!(indices, (0..expected.len()).collect::<Vec<_>>());
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test]
async fn a_custom_build_task_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let prebuilt_dir = dir.path().join("prebuilt");
    let builder = new_builder(&prebuilt_dir);
    let prebuilt = ok(&build(&builder, vec![BuilderInput::new("kernel", GOOD)]).await[0])
        .artifact_path
        .clone();
    within("shutdown", builder.shutdown()).await;

    // A task type of its own: "builds" by copying; the source is not even C.
    let copy_dir = dir.path().join("copied");
    let from = prebuilt.clone();
    let copier =
        LocalBuilder::with_task(crate::test_worker_program(), config(&copy_dir), move |plan| {
            CopyPrebuilt { from: from.clone(), plan }
        })
        .unwrap();
    let results = build(&copier, vec![BuilderInput::new("copy", "this is not C")]).await;
    let out = ok(&results[0]);
    assert_eq!(out.artifact_path, copy_dir.join("copy.so"));
    assert_eq!(std::fs::read(&out.artifact_path).unwrap(), std::fs::read(&prebuilt).unwrap());
    within("shutdown", copier.shutdown()).await;

    // The default task, with the plan changed: a define for every build.
    let define_dir = dir.path().join("defined");
    let definer =
        LocalBuilder::with_task(crate::test_worker_program(), config(&define_dir), |mut plan| {
            plan.flags.push("-DVALUE=42".into());
            CompileC::new(plan)
        })
        .unwrap();
    let results = build(&definer, vec![BuilderInput::new("needs_value", NEEDS_VALUE)]).await;
    assert_shared_library(&ok(&results[0]).artifact_path);
    within("shutdown", definer.shutdown()).await;
}

#[tokio::test]
async fn bad_names_are_rejected_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let builder = new_builder(&out_dir);
    let long = "n".repeat(rpc_runner::measure::MAX_NAME_LEN + 1);
    let names =
        ["", ".", "..", "../escape", "a/b", "/etc/evil", "a\\b", ".hidden", "sp ace", &long];
    let inputs = names.iter().map(|n| BuilderInput::new(*n, GOOD)).collect();
    let started = Instant::now();
    let results = build(&builder, inputs).await;
    assert!(started.elapsed() < Duration::from_millis(500), "{:?}", started.elapsed());
    for (name, r) in names.iter().zip(&results) {
        assert_eq!(r.input_name, *name);
        match &r.result {
            Err(e @ BuildError::InvalidInput { name: n, .. }) => {
                assert_eq!(n, name);
                assert!(e.to_string().starts_with("invalid build input"), "{e}");
            }
            other => panic!("{name:?}: expected InvalidInput, got {other:?}"),
        }
    }
    let stats = builder.stats();
    assert_eq!(stats.completed + stats.failed + stats.running + stats.queued, 0, "{stats:?}");
    // Only the kernel ABI header the builder puts there at construction.
    let written: Vec<_> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "include")
        .collect();
    assert!(written.is_empty(), "files were written: {written:?}");
    assert!(!dir.path().join("escape.c").exists());
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test]
async fn a_missing_compiler_is_an_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path()).compiler("/nonexistent/bin/cc");
    let builder = LocalBuilder::new(crate::test_worker_program(), cfg).unwrap();
    let results = build(&builder, vec![BuilderInput::new("k", GOOD)]).await;
    match &results[0].result {
        Err(BuildError::Io { message }) => {
            assert!(message.contains("/nonexistent/bin/cc"), "{message}")
        }
        other => panic!("expected an i/o error, got {other:?}"),
    }
    within("shutdown", builder.shutdown()).await;
}

#[tokio::test]
async fn a_private_out_dir_lives_as_long_as_the_builder() {
    let cfg = LocalBuilderConfig::default().max_workers(1);
    let builder = LocalBuilder::new(crate::test_worker_program(), cfg).unwrap();
    let out_dir: PathBuf = builder.out_dir().to_path_buf();
    let results = build(&builder, vec![BuilderInput::new("k", GOOD)]).await;
    assert!(ok(&results[0]).artifact_path.starts_with(&out_dir));
    within("shutdown", builder.shutdown()).await;
    assert!(
        std::fs::metadata(&out_dir).is_err_and(|e| e.kind() == ErrorKind::NotFound),
        "{} was left behind",
        out_dir.display()
    );
}

/// The kernel ABI header is on every build's include path (no DLPack structs
/// copied by hand), also with a builder's own out dir.
#[tokio::test]
async fn the_kernel_header_is_on_the_include_path() {
    let dir = tempfile::tempdir().unwrap();
    let builder = new_builder(dir.path());
    let source = "#include \"tuning_harness_kernel.h\"\n\
                  TUNING_HARNESS_EXPORT int32_t entry(DLTensor* args, int32_t num_args) {\n\
                  \x20 return args[0].device.device_type == kDLCPU ? 0 : num_args;\n}\n";
    let results = build(&builder, vec![BuilderInput::new("with_header", source)]).await;
    assert_shared_library(&ok(&results[0]).artifact_path);
    let header = dir.path().join("include").join(rpc_runner::measure::KERNEL_HEADER_NAME);
    assert_eq!(std::fs::read_to_string(header).unwrap(), rpc_runner::measure::KERNEL_HEADER);
}
