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

// The search of the example, unit-tested here (examples' own tests do not run).
#[path = "../examples/tune_matmul/model.rs"]
mod model;
#[path = "../examples/tune_matmul/search.rs"]
mod search;
#[path = "../examples/tune_matmul/space.rs"]
#[expect(dead_code, reason = "the example uses more of it than these tests")]
mod space;

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
        &["--size", "64x64x64", "--trials", "8", "--batch", "4", "--seed", "7", "--out", out_arg],
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
    // --trials 8: the search proposes 8 single-threaded candidates, in two
    // rounds of 4 (--batch 4), after the naive and the three broken ones.
    let searched: Vec<&Value> =
        log.iter().filter(|l| l["kind"] == "gemm" && l["all_cores"] == false).collect();
    assert_eq!(searched.len(), 8, "--trials 8 proposes 8 candidates:\n{text}");
    for (i, line) in log.iter().enumerate() {
        assert_eq!(line["trial"], i, "{line}");
        for field in ["name", "kind", "status", "run_secs", "round", "all_cores"] {
            assert!(!line[field].is_null(), "{field} missing: {line}");
        }
    }
    let rounds: Vec<u64> = searched.iter().map(|l| l["round"].as_u64().unwrap()).collect();
    assert_eq!(rounds, [0, 0, 0, 0, 1, 1, 1, 1], "rounds of 4:\n{text}");
    for name in ["naive", "broken_compile", "broken_crash", "broken_wrong_result"] {
        assert_eq!(by_name(&log, name)["round"], 0, "{name} is in the first round");
    }
    for line in &searched {
        assert!(line["mr"].as_u64().is_some() && line["isa"].is_string(), "parameters: {line}");
        assert!(line["build_secs"].as_f64().is_some_and(|s| s > 0.0), "build: {line}");
    }
    assert!(stdout.contains("reported by a probe kernel run on the device"), "{stdout}");
    assert!(stdout.contains("pinned: timing on CPU"), "what was pinned: {stdout}");
    // The vendor library, measured in the same run, or why not.
    for label in ["1 thread", "all cores"] {
        let prefix = format!("best vs OpenBLAS ({label}): ");
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line: {stdout}"));
        let rest = &line[prefix.len()..];
        if openblas_installed() && (label == "1 thread" || cpus() > 1) {
            assert!(is_ratio(rest), "a ratio with OpenBLAS installed: {line}");
        } else {
            assert!(rest.starts_with("not measured: "), "{line}");
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

/// `R.RRx (...`
fn is_ratio(text: &str) -> bool {
    let Some((num, _)) = text.split_once("x (") else { return false };
    num.split_once('.').is_some_and(|(a, b)| {
        !a.is_empty()
            && a.bytes().all(|c| c.is_ascii_digit())
            && b.len() == 2
            && b.bytes().all(|c| c.is_ascii_digit())
    })
}

/// The dynamic loader knows `libopenblas.so.0` (`ldconfig -p`).
fn openblas_installed() -> bool {
    Command::new("ldconfig")
        .arg("-p")
        .output()
        .or_else(|_| Command::new("/sbin/ldconfig").arg("-p").output())
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libopenblas.so.0 "))
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn without_openblas_the_run_says_so_and_succeeds() {
    let out = tempfile::tempdir().unwrap();
    let out_arg = out.path().to_str().unwrap();
    let tag = format!("no-openblas-{}", std::process::id());
    let args = [
        "--size",
        "32x32x32",
        "--trials",
        "2",
        "--finalists",
        "2",
        "--out",
        out_arg,
        "--openblas-lib",
        "libno-such-openblas.so.0",
    ];
    let (status, stdout, stderr) = run_example(&args, &tag);
    let status = status.unwrap_or_else(|| panic!("killed\nstdout:\n{stdout}\nstderr:\n{stderr}"));
    assert!(status.success(), "exit {status}\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let missing = "not measured: libno-such-openblas.so.0 is not installed on the device \
                   (install it: apt-get install libopenblas0)";
    assert!(stdout.contains(&format!("OpenBLAS: {missing}")), "{stdout}");
    assert!(stdout.contains(&format!("best vs OpenBLAS (1 thread): {missing}")), "{stdout}");
    assert!(stdout.contains(&format!("best vs OpenBLAS (all cores): {missing}")), "{stdout}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_tagged(&tag).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_tagged(&tag), Vec::<u32>::new(), "leftover processes of the example");
}

/// A deterministic stand-in for measured GFLOP/s.
fn fake_gflops(g: &space::Gemm) -> Option<f64> {
    (g.mr != 7).then(|| (g.mr * g.nr()) as f64 + g.kc as f64 / 64.0 + f64::from(u8::from(g.pack_b)))
}

fn proposals(seed: u64) -> Vec<Vec<space::Gemm>> {
    proposals_measured(seed, |_| 1.0)
}

/// As [`proposals`], each measurement multiplied by `noise(i)` (the `i`-th
/// measurement fed back).
fn proposals_measured(seed: u64, mut noise: impl FnMut(usize) -> f64) -> Vec<Vec<space::Gemm>> {
    let mut s = search::Search::new(seed, &space::Isa::ALL, 256, 256, 256);
    let mut rounds = Vec::new();
    let mut i = 0;
    for _ in 0..4 {
        let batch = s.propose(16);
        s.observe(batch.iter().map(|g| {
            i += 1;
            // On a 2% grid (e^0.02k) so that +-0.5% stays inside a cell.
            let grid = fake_gflops(g).map(|y| ((y.ln() / 0.02).round() * 0.02).exp());
            (*g, grid.map(|y| y * noise(i)))
        }));
        rounds.push(batch);
    }
    rounds
}

#[test]
fn noise_below_the_grid_does_not_change_the_proposals() {
    use rand::{Rng, SeedableRng};
    let quiet = proposals(11);
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let noisy = proposals_measured(11, |_| 1.0 + rng.random_range(-0.005..0.005));
    assert_eq!(quiet, noisy, "+-0.5% noise changed what the search proposed");
    // Beyond the grid, measurements do steer it.
    let mut rng = rand::rngs::StdRng::seed_from_u64(99);
    let rough = proposals_measured(11, |_| 1.0 + rng.random_range(-0.3..0.3));
    assert_ne!(quiet, rough, "the search ignores its measurements");
}

#[test]
fn the_same_seed_proposes_the_same_candidates() {
    let a = proposals(11);
    assert_eq!(a, proposals(11), "same seed, same feedback");
    assert_ne!(a, proposals(12), "another seed");
    let all: Vec<&space::Gemm> = a.iter().flatten().collect();
    let unique: std::collections::HashSet<&&space::Gemm> = all.iter().collect();
    assert_eq!(unique.len(), all.len(), "never the same candidate twice");
    assert!(a.iter().all(|r| r.len() == 16));
}

#[test]
fn the_search_climbs_on_a_known_objective() {
    let rounds = proposals(5);
    let best = |r: &[space::Gemm]| r.iter().filter_map(fake_gflops).fold(0.0, f64::max);
    // The last round's proposals are mostly children of the best, ranked by the model.
    let mean = |r: &[space::Gemm]| r.iter().filter_map(fake_gflops).sum::<f64>() / r.len() as f64;
    assert!(mean(&rounds[3]) > mean(&rounds[0]), "{} vs {}", mean(&rounds[3]), mean(&rounds[0]));
    assert!(best(&rounds.concat()) >= best(&rounds[0]));
}

#[test]
fn mutation_and_crossover_stay_in_the_space() {
    use rand::SeedableRng;
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let isas = [space::Isa::Avx2, space::Isa::Portable];
    let mut g = space::Gemm::random(&mut rng, &isas);
    for _ in 0..5000 {
        let other = space::Gemm::random(&mut rng, &isas);
        assert!(other.valid() && isas.contains(&other.isa), "{other:?}");
        let m = g.mutate(&mut rng, &isas);
        assert!(m.valid() && m.threads == 1 && isas.contains(&m.isa), "{m:?}");
        let c = m.crossover(&other, &mut rng);
        assert!(c.valid() && isas.contains(&c.isa), "{c:?}");
        g = c;
    }
}

#[test]
fn the_cost_model_fits_a_known_linear_function() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let w = [0.5, -2.0, 3.0, 0.25, 1.5];
    let xs: Vec<Vec<f64>> = (0..200)
        .map(|_| {
            let mut x = vec![1.0];
            x.extend((0..4).map(|_| rng.random_range(-3.0..3.0)));
            x
        })
        .collect();
    let ys: Vec<f64> = xs.iter().map(|x| x.iter().zip(&w).map(|(a, b)| a * b).sum()).collect();
    let fit = model::Ridge::fit(&xs, &ys, 1e-9).expect("a positive definite system");
    for x in &xs {
        let want: f64 = x.iter().zip(&w).map(|(a, b)| a * b).sum();
        assert!((fit.predict(x) - want).abs() < 1e-6, "{} vs {want}", fit.predict(x));
    }
    // The real features of real configurations are well-formed.
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let g = space::Gemm::random(&mut rng, &space::Isa::ALL);
    let f = model::features(&g, 256, 256, 256);
    assert!(f.iter().all(|v| v.is_finite()), "{f:?}");
    assert!(model::Ridge::fit(&[], &[], 1.0).is_none(), "no data, no model");
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
