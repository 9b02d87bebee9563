//! A bounded, seeded fuzz loop over the protocol decoders, on stable Rust.
//!
//! Mutates the seed inputs of each target in `rpc_runner::fuzzing::TARGETS`
//! (bit flips, byte inserts and deletes, truncation, splices, length-field
//! edits, JSON-depth edits, huge lengths) with a seeded RNG and runs the
//! target on each mutant for the time given. A panic is caught, reported
//! with the input in hex, and makes the program exit non-zero.
//!
//! ```text
//! cargo run --release -p rpc-runner --example fuzz_protocols -- --seconds 20
//! cargo run --release -p rpc-runner --example fuzz_protocols -- --target handshake --seconds 600 --seed 7
//! cargo run --release -p rpc-runner --example fuzz_protocols -- --target tracker_frame --hex 0500000031
//! cargo run --release -p rpc-runner --example fuzz_protocols -- --write-corpus fuzz/corpus
//! ```
//!
//! `--seconds N` is per target (default 10). See `docs/fuzzing.md`.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rpc_runner::fuzzing::{TARGETS, Target};

/// Mutants never grow past this (keeps each run fast).
const MAX_INPUT: usize = 64 << 10;
/// Mutants kept to mutate further, besides the seeds.
const MAX_CORPUS: usize = 512;

struct Args {
    seconds: f64,
    target: Option<String>,
    seed: u64,
    hex: Option<String>,
    input: Option<PathBuf>,
    write_corpus: Option<PathBuf>,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        seconds: 10.0,
        target: None,
        seed: 0x2F271,
        hex: None,
        input: None,
        write_corpus: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().context("--seconds")?,
            "--target" => args.target = Some(value()?),
            "--seed" => args.seed = value()?.parse().context("--seed")?,
            "--hex" => args.hex = Some(value()?),
            "--input" => args.input = Some(value()?.into()),
            "--write-corpus" => args.write_corpus = Some(value()?.into()),
            "--help" | "-h" => {
                println!(
                    "fuzz_protocols [--seconds N (per target)] [--target NAME] [--seed S]\n\
                     \x20              [--hex HEX | --input FILE] [--write-corpus DIR]\n\
                     targets: {}",
                    TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    if !(args.seconds.is_finite() && (0.0..=1e9).contains(&args.seconds)) {
        bail!("--seconds must be a number from 0 to 1e9");
    }
    Ok(args)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    let text: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    if text.len() % 2 != 0 {
        bail!("odd number of hex digits");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("bad hex digit"))
        .collect()
}

/// Runs one input; `Err` holds the panic message.
fn run_one(target: &Target, input: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(input))).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "a panic with a non-text payload".to_owned())
    })
}

/// The `[i32 LE len][body]` frames found walking from `at`: (header offset, body length).
fn frames(data: &[u8], at: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = at;
    while pos + 4 <= data.len() && out.len() < 64 {
        let len = i32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes"));
        let Ok(len) = usize::try_from(len) else { break };
        if len == 0 || pos + 4 + len > data.len() {
            break;
        }
        out.push((pos, len));
        pos += 4 + len;
    }
    out
}

const INTERESTING_LENGTHS: [i32; 9] =
    [0, -1, i32::MIN, i32::MAX, 1 << 20, (1 << 20) + 1, 64 << 20, (64 << 20) + 1, 4097];
const JSON_BYTES: &[u8] = b"[]{}\",:\\0-1.eE nul";

/// One random mutation of `data` (`other`: another corpus entry to splice with).
fn mutate(rng: &mut StdRng, data: &mut Vec<u8>, other: &[u8], frames_at: usize) {
    let len = data.len();
    match rng.random_range(0..11) {
        0 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = rng.random_range(0..len);
            data[i] = if rng.random() {
                JSON_BYTES[rng.random_range(0..JSON_BYTES.len())]
            } else {
                rng.random()
            };
        }
        2 => {
            let i = rng.random_range(0..=len);
            let n = rng.random_range(1..=8);
            let bytes: Vec<u8> = (0..n)
                .map(|_| {
                    if rng.random() {
                        JSON_BYTES[rng.random_range(0..JSON_BYTES.len())]
                    } else {
                        rng.random()
                    }
                })
                .collect();
            data.splice(i..i, bytes);
        }
        3 if len > 0 => {
            let i = rng.random_range(0..len);
            let n = rng.random_range(1..=(len - i).min(16));
            data.drain(i..i + n);
        }
        4 if len > 0 => data.truncate(rng.random_range(0..len)),
        5 => {
            let cut = rng.random_range(0..=len);
            let from = rng.random_range(0..=other.len());
            data.truncate(cut);
            data.extend_from_slice(&other[from..]);
        }
        // Length fields: of a frame found by walking, or at a random offset.
        6 | 7 => {
            let found = frames(data, frames_at);
            let pos = if !found.is_empty() && rng.random_range(0..4) != 0 {
                found[rng.random_range(0..found.len())].0
            } else if len >= 4 {
                rng.random_range(0..=len - 4)
            } else {
                return;
            };
            let old = i32::from_le_bytes(data[pos..pos + 4].try_into().expect("4 bytes"));
            let new = match rng.random_range(0..3) {
                0 => INTERESTING_LENGTHS[rng.random_range(0..INTERESTING_LENGTHS.len())],
                1 => old.wrapping_add(rng.random_range(-3..=3)),
                _ => rng.random(),
            };
            data[pos..pos + 4].copy_from_slice(&new.to_le_bytes());
        }
        // JSON depth: nest part of a frame's body `n` deep, fixing its length.
        8 | 9 => {
            let found = frames(data, frames_at);
            if found.is_empty() {
                return;
            }
            let (pos, body_len) = found[rng.random_range(0..found.len())];
            let n = match rng.random_range(0..4) {
                0 => rng.random_range(1..40),
                1 => rng.random_range(100..140),
                2 => rng.random_range(1..600),
                _ => rng.random_range(1000..20_000),
            };
            let (open, close) = if rng.random() { (b'[', b']') } else { (b'{', b'}') };
            let body = pos + 4;
            let a = body + rng.random_range(0..=body_len);
            let b = a + rng.random_range(0..=(body + body_len - a));
            data.splice(b..b, std::iter::repeat_n(close, n));
            let opening: Vec<u8> = if open == b'[' {
                std::iter::repeat_n(b'[', n).collect()
            } else {
                b"{\"d\":".repeat(n)
            };
            let added = opening.len() + n;
            data.splice(a..a, opening);
            let new_len = i32::try_from(body_len + added).unwrap_or(i32::MAX);
            data[pos..pos + 4].copy_from_slice(&new_len.to_le_bytes());
        }
        // A huge length with a little body after it, appended.
        _ => {
            let huge = INTERESTING_LENGTHS[rng.random_range(0..INTERESTING_LENGTHS.len())];
            data.extend_from_slice(&huge.to_le_bytes());
            data.extend_from_slice(b"[1,");
        }
    }
    data.truncate(MAX_INPUT);
}

struct Outcome {
    iterations: u64,
    crashed: bool,
}

fn fuzz(target: &Target, seconds: f64, seed: u64) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed ^ fnv(target.name));
    let seeds = (target.seeds)();
    let mut corpus = seeds.clone();
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut iterations = 0u64;
    // The seeds themselves first.
    for input in &seeds {
        iterations += 1;
        if let Err(message) = run_one(target, input) {
            report(target, input, &message, seed);
            return Outcome { iterations, crashed: true };
        }
    }
    while Instant::now() < deadline {
        for _ in 0..64 {
            let mut input = corpus[rng.random_range(0..corpus.len())].clone();
            let other = &corpus[rng.random_range(0..corpus.len())];
            let other = other.clone();
            for _ in 0..rng.random_range(1..=4) {
                mutate(&mut rng, &mut input, &other, target.frames_at);
            }
            iterations += 1;
            if let Err(message) = run_one(target, &input) {
                report(target, &input, &message, seed);
                return Outcome { iterations, crashed: true };
            }
            // Keep some mutants to mutate further (stacked mutations).
            if rng.random_range(0..8) == 0 {
                if corpus.len() < seeds.len() + MAX_CORPUS {
                    corpus.push(input);
                } else {
                    let i = rng.random_range(seeds.len()..corpus.len());
                    corpus[i] = input;
                }
            }
        }
    }
    Outcome { iterations, crashed: false }
}

fn report(target: &Target, input: &[u8], message: &str, seed: u64) {
    eprintln!("CRASH in target {}: {message}", target.name);
    eprintln!("  input ({} bytes, hex): {}", input.len(), hex(input));
    eprintln!(
        "  reproduce: cargo run -p rpc-runner --example fuzz_protocols -- --target {} --hex {}",
        target.name,
        if input.len() <= 4096 { hex(input) } else { "<the hex above>".to_owned() }
    );
    eprintln!("  (found with --seed {seed})");
}

/// A stable hash of a target's name, so each target gets its own stream.
fn fnv(name: &str) -> u64 {
    name.bytes()
        .fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

fn main() -> Result<ExitCode> {
    let args = parse_args()?;
    let targets: Vec<&Target> = match &args.target {
        None => TARGETS.iter().collect(),
        Some(name) => match TARGETS.iter().find(|t| t.name == name) {
            Some(t) => vec![t],
            None => bail!(
                "unknown target {name:?}; targets: {}",
                TARGETS.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
            ),
        },
    };
    if let Some(dir) = &args.write_corpus {
        for t in &targets {
            let dir = dir.join(t.name);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            for (i, seed) in (t.seeds)().iter().enumerate() {
                std::fs::write(dir.join(format!("seed-{i:03}")), seed)?;
            }
            println!("wrote {} seeds to {}", (t.seeds)().len(), dir.display());
        }
        return Ok(ExitCode::SUCCESS);
    }
    let single = match (&args.hex, &args.input) {
        (Some(h), _) => Some(unhex(h)?),
        (None, Some(path)) => {
            Some(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
        }
        (None, None) => None,
    };
    // Panics are reported by `report`, with their input; silence the default hook.
    std::panic::set_hook(Box::new(|_| {}));
    if let Some(input) = single {
        let mut failed = false;
        for t in &targets {
            match run_one(t, &input) {
                Ok(()) => println!("{}: ok ({} bytes)", t.name, input.len()),
                Err(message) => {
                    println!("{}: PANIC: {message}", t.name);
                    failed = true;
                }
            }
        }
        return Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS });
    }

    let started = Instant::now();
    let mut total = 0u64;
    let mut crashed = Vec::new();
    for t in &targets {
        let t0 = Instant::now();
        let outcome = fuzz(t, args.seconds, args.seed);
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "{}: {} iterations in {secs:.1} s ({:.0}/s){}",
            t.name,
            outcome.iterations,
            outcome.iterations as f64 / secs.max(1e-9),
            if outcome.crashed { ", CRASHED" } else { "" }
        );
        total += outcome.iterations;
        if outcome.crashed {
            crashed.push(t.name);
        }
    }
    println!(
        "fuzz_protocols: {} targets, {total} iterations in {:.1} s, seed {}, {}",
        targets.len(),
        started.elapsed().as_secs_f64(),
        args.seed,
        if crashed.is_empty() {
            "no crashes".to_owned()
        } else {
            format!("CRASHED: {}", crashed.join(", "))
        }
    );
    Ok(if crashed.is_empty() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
