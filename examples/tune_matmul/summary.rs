//! The closing summary: the best candidate (only when it beats every other
//! finalist beyond noise, else the set tied within noise with the fastest),
//! and the measurements' environment warnings, each once.

use std::fmt::Write as _;

use rpc_runner::measure::{
    Stats, Verdict, best_within_noise, best_within_noise_paired, compare_paired,
};

use crate::candidates::{Kind, Size};
use crate::report::{Trial, fmt_cost, fmt_secs};

/// The candidates the best is chosen among, `(trial index, stats)`: the
/// ranked finalists with statistics; every ranked candidate with statistics
/// when there was no final round (`--finalists 0`); none when every
/// finalist failed in the final round (the best of the rest would be a
/// claim about the candidates already ranked below them).
pub(crate) fn contenders(trials: &[Trial]) -> Vec<(usize, Stats)> {
    let any_finalist = trials
        .iter()
        .any(|t| t.outcome.finalist && !matches!(t.candidate.kind, Kind::OpenBlas { .. }));
    trials
        .iter()
        .enumerate()
        .filter(|(_, t)| !t.all_cores && !matches!(t.candidate.kind, Kind::OpenBlas { .. }))
        .filter(|(_, t)| t.outcome.status.ranked() && (!any_finalist || t.outcome.finalist))
        .filter_map(|(i, t)| t.outcome.stats().map(|s| (i, s)))
        .collect()
}

/// The best lines: `best: ...` when one candidate is faster than every
/// other contender beyond noise, else `best within noise: A, B, C ...`
/// and the fastest median's figures; then the speedup over naive.
pub(crate) fn best(
    trials: &[Trial],
    size: Size,
    naive_median: Option<f64>,
    naive_problem: Option<&str>,
) -> String {
    let contenders = contenders(trials);
    let stats: Vec<Stats> = contenders.iter().map(|&(_, s)| s).collect();
    // Finalists timed interleaved in one set are compared round by round
    // (their shared drift cancels); otherwise by their own intervals.
    let paired = contenders.len() > 1
        && contenders
            .iter()
            .all(|&(i, _)| trials[i].outcome.fidelity.as_ref().is_some_and(|f| f.interleaved));
    let costs: Vec<&[f64]> =
        contenders.iter().map(|&(i, _)| trials[i].outcome.run_secs.as_slice()).collect();
    let tied = if paired { best_within_noise_paired(&costs) } else { best_within_noise(&stats) };
    let mut out = String::new();
    let failed: Vec<&str> = trials
        .iter()
        .filter(|t| t.outcome.finalist && !t.outcome.status.ranked())
        .map(|t| t.candidate.name.as_str())
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(
            out,
            "note: {} of the finalists failed in the final round and are not ranked: {}",
            failed.len(),
            failed.join(", ")
        );
    }
    let Some(&fastest) = tied.first() else {
        let why = if failed.is_empty() {
            "no candidate ran successfully"
        } else {
            "no best: every finalist failed in the final round"
        };
        let _ = writeln!(out, "{why}");
        return out;
    };
    let (ti, s) = contenders[fastest];
    let t = &trials[ti];
    let round = if t.outcome.finalist { "final round" } else { "screening only" };
    let figures = format!(
        "{} ({}) {}, {:.2} GFLOP/s",
        t.candidate.describe(),
        t.candidate.name,
        fmt_cost(&s),
        size.flops() / s.median / 1e9
    );
    let figures = if s.stable { figures } else { format!("{figures} (~ unstable)") };
    if tied.len() == 1 {
        let _ = write!(out, "best: {figures}");
        // The runner-up: the next fastest median among the contenders.
        let runner_up = (0..stats.len())
            .filter(|&j| j != fastest)
            .min_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median));
        if let Some(j) = runner_up {
            let (rj, rs) = contenders[j];
            debug_assert!(
                !paired || compare_paired(costs[fastest], costs[j]) == Verdict::Faster,
                "a clear best beats the runner-up"
            );
            let _ = write!(
                out,
                "; {:.1}% faster than the runner-up {} beyond noise ({round})",
                (rs.median / s.median - 1.0) * 100.0,
                trials[rj].candidate.name
            );
        }
        out.push('\n');
    } else {
        let names: Vec<&str> =
            tied.iter().map(|&j| trials[contenders[j].0].candidate.name.as_str()).collect();
        let _ = writeln!(
            out,
            "best within noise: {} (differences below the measurement noise{}; {round})",
            names.join(", "),
            if paired { ", compared round by round" } else { "" }
        );
        let _ = writeln!(out, "fastest median: {figures}");
    }
    match (naive_median, naive_problem) {
        (Some(naive_m), _) => {
            let naive_noise = trials
                .iter()
                .find(|t| t.candidate.kind == Kind::Naive)
                .and_then(|t| t.outcome.stats())
                .map_or(0.0, |n| n.rel_noise);
            let noise = naive_noise.hypot(s.rel_noise) * 100.0;
            let _ = writeln!(
                out,
                "naive {}, {:.2} GFLOP/s; speedup of the fastest median over naive: {:.2}x \
                 (± {noise:.1}%)",
                fmt_secs(naive_m),
                size.flops() / naive_m / 1e9,
                naive_m / s.median
            );
        }
        (None, problem) => {
            let _ = writeln!(out, "no speedup: {}", problem.unwrap_or("no naive cost"));
        }
    }
    out
}

/// The two `best vs OpenBLAS` lines. One thread: the fastest contender
/// against OpenBLAS with one thread, both in the final round, compared
/// round by round (median of the per-round ratios ± their relative noise).
/// All cores: the fastest multi-threaded candidate against OpenBLAS with
/// every thread, both in the all-cores round, the same way. `missing`: why
/// OpenBLAS was not measured at all.
pub(crate) fn openblas(trials: &[Trial], size: Size, missing: Option<&str>) -> String {
    let mut out = String::new();
    let ob = |all: bool| {
        trials.iter().find(|t| {
            t.all_cores == all
                && matches!(t.candidate.kind, Kind::OpenBlas { .. })
                && t.outcome.status.ranked()
        })
    };
    let contenders = contenders(trials);
    let best_1t = contenders
        .iter()
        .min_by(|a, b| a.1.median.total_cmp(&b.1.median))
        .map(|&(i, _)| &trials[i]);
    let best_all = trials
        .iter()
        .filter(|t| t.all_cores && matches!(t.candidate.kind, Kind::Gemm(_)))
        .filter(|t| t.outcome.status.ranked())
        .filter_map(|t| t.outcome.median().map(|m| (t, m)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(t, _)| t);
    for (label, best, base) in [("1 thread", best_1t, ob(false)), ("all cores", best_all, ob(true))]
    {
        let line = match (missing, best, base) {
            (Some(why), _, _) => format!("not measured: {why}"),
            (None, Some(b), Some(o)) => ratio(b, o, size),
            (None, None, _) if label == "all cores" => {
                "not measured: no multi-threaded candidate ran (see the \"all cores:\" line above)"
                    .to_owned()
            }
            (None, None, _) => "not measured: no candidate ran".to_owned(),
            (None, Some(_), None) => "not measured: OpenBLAS did not run".to_owned(),
        };
        let _ = writeln!(out, "best vs OpenBLAS ({label}): {line}");
    }
    out
}

/// `R.RRx (± N.N%, ...)`: how many times faster `best` is than `base`.
fn ratio(best: &Trial, base: &Trial, size: Size) -> String {
    let (b, o) = (&best.outcome.run_secs, &base.outcome.run_secs);
    let paired: Vec<f64> = o.iter().zip(b.iter()).map(|(o, b)| o / b).collect();
    let verdict = match compare_paired(b, o) {
        Verdict::Faster => "faster beyond noise",
        Verdict::Slower => "slower beyond noise",
        _ => "tied within noise",
    };
    let figures = |t: &Trial| {
        format!(
            "{} {:.1} GFLOP/s",
            t.candidate.name,
            t.outcome.median().map_or(0.0, |m| size.flops() / m / 1e9)
        )
    };
    match Stats::from_costs(&paired, 0.0) {
        Some(r) => format!(
            "{:.2}x (± {:.1}%, {verdict}; {} vs {}, compared round by round)",
            r.median,
            r.rel_noise * 100.0,
            figures(best),
            figures(base)
        ),
        None => "not measured: no costs".to_owned(),
    }
}

/// Every distinct environment warning of the measurements that ran, once:
/// warnings that differ only in their numbers are one, with the numbers'
/// range (`the other CPUs were 31-78% busy ...`) and how many measurements
/// had it.
pub(crate) fn notes(trials: &[Trial]) -> Vec<String> {
    let measured: Vec<&Vec<String>> = trials
        .iter()
        .filter_map(|t| t.outcome.fidelity.as_ref().map(|f| &f.env.warnings))
        .collect();
    let mut groups: Vec<Group> = Vec::new();
    for w in measured.iter().flat_map(|w| w.iter()) {
        let (words, numbers) = split_numbers(w);
        match groups.iter_mut().find(|g| g.words == words && g.ranges.len() == numbers.len()) {
            Some(g) => {
                g.count += 1;
                for (r, &(x, d)) in g.ranges.iter_mut().zip(&numbers) {
                    *r = (r.0.min(x), r.1.max(x), r.2.max(d));
                }
            }
            None => groups.push(Group {
                ranges: numbers.iter().map(|&(x, d)| (x, x, d)).collect(),
                words,
                count: 1,
            }),
        }
    }
    groups
        .into_iter()
        .map(|g| {
            let mut text = String::new();
            for (i, w) in g.words.iter().enumerate() {
                text.push_str(w);
                if let Some(&(lo, hi, d)) = g.ranges.get(i) {
                    if lo == hi {
                        let _ = write!(text, "{lo:.d$}");
                    } else {
                        let _ = write!(text, "{lo:.d$}-{hi:.d$}");
                    }
                }
            }
            format!("note ({} of {} measurements): {text}", g.count, measured.len())
        })
        .collect()
}

/// Warnings that differ only in their numbers.
struct Group {
    /// The text around the numbers.
    words: Vec<String>,
    /// Each number's smallest and largest value and most decimals.
    ranges: Vec<(f64, f64, usize)>,
    /// Measurements with this warning.
    count: usize,
}

/// `text` cut around its numbers: the pieces between them (one more than
/// the numbers) and each number with its count of decimals.
fn split_numbers(text: &str) -> (Vec<String>, Vec<(f64, usize)>) {
    let mut words = vec![String::new()];
    let mut numbers = Vec::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if !c.is_ascii_digit() {
            if let Some(w) = words.last_mut() {
                w.push(c);
            }
            continue;
        }
        let mut num = c.to_string();
        while let Some(&d) = chars.peek() {
            // A '.' belongs to the number only if a digit follows it.
            let decimal_point = d == '.' && !num.contains('.') && {
                let mut ahead = chars.clone();
                ahead.next();
                ahead.peek().is_some_and(char::is_ascii_digit)
            };
            if !(d.is_ascii_digit() || decimal_point) {
                break;
            }
            num.push(d);
            chars.next();
        }
        let decimals = num.split_once('.').map_or(0, |(_, f)| f.len());
        numbers.push((num.parse().unwrap_or(0.0), decimals));
        words.push(String::new());
    }
    (words, numbers)
}
