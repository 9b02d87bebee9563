//! The outputs of a tuning run: the result table, the JSON-lines tuning log
//! and the convergence plot.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde_json::{Value, json};

use rpc_runner::measure::Stats;

use crate::candidates::{Candidate, Expect, Size};
use crate::outcome::{Outcome, Status};

/// One candidate with its outcome; `trial` is its index in proposal order.
#[derive(Debug)]
pub(crate) struct Trial {
    pub(crate) trial: usize,
    /// The round that proposed (and screened) it.
    pub(crate) round: usize,
    /// Timed in the all-cores round (unpinned, with other threads).
    pub(crate) all_cores: bool,
    /// How long its build took, if it built.
    pub(crate) build_secs: Option<f64>,
    pub(crate) candidate: Candidate,
    pub(crate) outcome: Outcome,
}

impl Trial {
    pub(crate) fn gflops(&self, size: Size) -> Option<f64> {
        self.outcome.median().filter(|&s| s > 0.0).map(|s| size.flops() / s / 1e9)
    }

    fn json(&self, size: Size) -> Value {
        let mut obj = serde_json::Map::new();
        obj.insert("trial".into(), json!(self.trial));
        obj.insert("round".into(), json!(self.round));
        obj.insert("all_cores".into(), json!(self.all_cores));
        obj.insert("name".into(), json!(self.candidate.name));
        obj.extend(self.candidate.config_json());
        obj.insert("flags".into(), json!(self.candidate.extra_flags()));
        obj.insert("build_secs".into(), json!(self.build_secs));
        obj.insert("size".into(), json!([size.m, size.n, size.k]));
        obj.insert("status".into(), json!(self.outcome.status.key()));
        obj.insert("expected".into(), json!(expect_key(self.candidate.expect)));
        obj.insert("error".into(), json!(self.outcome.error));
        obj.insert("run_secs".into(), json!(self.outcome.run_secs));
        obj.insert("median_s".into(), json!(self.outcome.median()));
        // A rejected kernel's speed means nothing: only ranked ones have one.
        let gflops = self.outcome.status.ranked().then(|| self.gflops(size)).flatten();
        obj.insert("gflops".into(), json!(gflops));
        obj.insert("max_rel_err".into(), json!(self.outcome.max_rel_err));
        let o = &self.outcome;
        let stats = o.stats();
        obj.insert("rel_noise".into(), json!(stats.map(|s| s.rel_noise)));
        obj.insert("stable".into(), json!(stats.map(|s| s.stable)));
        obj.insert("finalist".into(), json!(o.finalist));
        // The screening round's median: a finalist's is kept, anyone else's
        // is its only one.
        let screen = if o.finalist { o.screen_median } else { o.median() };
        obj.insert("screen_median_s".into(), json!(screen));
        let f = o.fidelity.as_ref();
        obj.insert("interleaved".into(), json!(f.map(|f| f.interleaved)));
        obj.insert("stop".into(), json!(f.map(|f| f.stop)));
        obj.insert("warnings".into(), json!(f.map(|f| &f.warnings)));
        obj.insert("env".into(), json!(f.map(|f| &f.env)));
        if let Some((server, stages)) = &self.outcome.measured {
            obj.insert("server".into(), json!(server));
            obj.insert("stages".into(), json!(stages));
        }
        Value::Object(obj)
    }
}

fn expect_key(e: Expect) -> &'static str {
    match e {
        Expect::Ok => Status::Ok.key(),
        Expect::CompileError => Status::CompileError.key(),
        Expect::Crash => Status::Crashed.key(),
        Expect::WrongResult => Status::WrongResult.key(),
    }
}

/// Writes one JSON object per trial, in trial order.
pub(crate) fn write_log(path: &Path, trials: &[Trial], size: Size) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for t in trials {
        serde_json::to_writer(&mut w, &t.json(size))?;
        w.write_all(b"\n")?;
    }
    w.flush().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// `1.23 ms`, `456.7 us`, `89.0 ns`, `2.50 s`.
pub(crate) fn fmt_secs(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.1} us", s * 1e6)
    } else {
        format!("{:.1} ns", s * 1e9)
    }
}

/// `243.1 us ± 0.3%`: the median and the relative noise.
pub(crate) fn fmt_cost(s: &Stats) -> String {
    format!("{} ± {:.1}%", fmt_secs(s.median), s.rel_noise * 100.0)
}

/// The first line of an error, cut to `max` characters.
fn short(text: &str, max: usize) -> String {
    // Prefer the compiler's first "error:" line over its "In function" preamble.
    let line = text
        .lines()
        .find(|l| l.contains("error:"))
        .or_else(|| text.lines().find(|l| !l.trim().is_empty()))
        .unwrap_or("")
        .trim();
    let line = line.rsplit_once(".c:").map_or(line, |(_, rest)| rest);
    if line.chars().count() > max {
        let cut: String = line.chars().take(max.saturating_sub(3)).collect();
        format!("{cut}...")
    } else {
        line.to_owned()
    }
}

/// The result table: ranked finalists by final cost, then the other ranked
/// trials by screening cost, then the failures in trial order. A cost is
/// `median ± relative noise`, followed by `~` when it is unstable (see
/// [`legend`]).
pub(crate) fn table(trials: &[Trial], size: Size, naive_median: Option<f64>) -> String {
    let mut order: Vec<&Trial> = trials.iter().collect();
    order.sort_by(|a, b| {
        let key = |t: &Trial| {
            let o = &t.outcome;
            (!o.status.ranked(), !o.finalist, o.median().unwrap_or(f64::MAX))
        };
        let (ra, fa, ca) = key(a);
        let (rb, fb, cb) = key(b);
        ra.cmp(&rb).then(fa.cmp(&fb)).then(ca.total_cmp(&cb)).then(a.trial.cmp(&b.trial))
    });
    let rows: Vec<[String; 8]> = order
        .iter()
        .enumerate()
        .map(|(rank, t)| {
            let o = &t.outcome;
            let ranked = o.status.ranked();
            let median = o.median();
            let speedup = match (ranked, median, naive_median) {
                (true, Some(m), Some(n)) if m > 0.0 => format!("{:.2}x", n / m),
                _ => String::new(),
            };
            let mut status = o.status.label().to_owned();
            if t.candidate.expect != Expect::Ok && o.status.meets(t.candidate.expect) {
                status.push_str(" (expected)");
            }
            let detail = o.error.as_deref().map(|e| short(e, 64)).unwrap_or_default();
            let cost = match o.stats() {
                Some(s) => format!("{} {}", fmt_cost(&s), if o.unstable() { '~' } else { ' ' }),
                None => median.map(fmt_secs).unwrap_or_default(),
            };
            let round = match (t.all_cores, o.finalist, o.fidelity.is_some()) {
                (true, _, _) => "all cores".to_owned(),
                (false, true, _) => format!("{} final", t.round),
                (false, false, true) => t.round.to_string(),
                (false, false, false) => String::new(),
            };
            [
                if ranked { (rank + 1).to_string() } else { "-".to_owned() },
                t.candidate.describe(),
                cost,
                if ranked {
                    t.gflops(size).map(|g| format!("{g:.2}")).unwrap_or_default()
                } else {
                    String::new()
                },
                speedup,
                round,
                status,
                detail,
            ]
        })
        .collect();
    let header =
        ["#", "config", "median ± noise", "GFLOP/s", "speedup", "round", "status", "detail"];
    let mut widths = header.map(|h| h.chars().count());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Right-align the numbers, left-align the words.
    let right = [true, false, true, true, true, false, false, false];
    let mut out = String::new();
    let line = |out: &mut String, cells: &[String]| {
        let mut l = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let w = widths[i];
            if right[i] {
                let _ = write!(l, "{cell:>w$}  ");
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut out, &header.map(str::to_owned));
    line(&mut out, &widths.map(|w| "-".repeat(w)));
    for row in &rows {
        line(&mut out, row);
    }
    out
}

/// The lines under the table: what `~` and the round column mean.
pub(crate) fn legend(screen_noise: f64, final_noise: f64, any_unstable: bool) -> String {
    let mut out = String::new();
    if any_unstable {
        let _ = writeln!(
            out,
            "~ unstable: noise above the threshold ({:.1}% relative noise in screening, {:.1}% in the final round)",
            screen_noise * 100.0,
            final_noise * 100.0
        );
    }
    let _ = writeln!(
        out,
        "round: the round that proposed it; final = re-measured interleaved with the other \
         finalists and OpenBLAS (1 thread); all cores = timed unpinned, interleaved, every thread"
    );
    out
}

/// The convergence plot: best single-threaded GFLOP/s so far against the
/// round, each ranked candidate as a point at its round, OpenBLAS (one
/// thread, all cores) and the naive kernel as horizontal lines.
pub(crate) fn plot(
    path: &Path,
    trials: &[Trial],
    size: Size,
    lines: &[(String, f64)],
    rounds: usize,
) -> anyhow::Result<()> {
    let searched = |t: &&Trial| {
        !t.all_cores
            && t.outcome.status.ranked()
            && matches!(t.candidate.kind, crate::candidates::Kind::Gemm(_))
    };
    let points: Vec<(f64, f64)> = trials
        .iter()
        .filter(searched)
        .filter_map(|t| {
            // Spread a round's points a little so that they do not hide each other.
            let jitter = ((t.trial * 37) % 11) as f64 / 11.0 * 0.5 - 0.25;
            t.gflops(size).map(|g| (t.round as f64 + jitter, g))
        })
        .collect();
    let mut best = Vec::new();
    let mut so_far: Option<f64> = None;
    for r in 0..rounds.max(1) {
        for t in trials.iter().filter(searched).filter(|t| t.round == r) {
            if let Some(g) = t.gflops(size) {
                so_far = Some(so_far.map_or(g, |b: f64| b.max(g)));
            }
        }
        if let Some(b) = so_far {
            best.push((r as f64, b));
        }
    }
    let x_max = rounds.max(1) as f64 - 0.5;
    let y_max =
        points.iter().map(|&(_, g)| g).chain(lines.iter().map(|l| l.1)).fold(1.0, f64::max) * 1.12;

    let root = BitMapBackend::new(path, (1100, 650)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!("tune_matmul {}x{}x{} float32: convergence", size.m, size.n, size.k);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 26))
        .margin(18)
        .x_label_area_size(48)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..x_max, 0.0f64..y_max)?;
    chart
        .configure_mesh()
        .x_desc("round")
        .y_desc("GFLOP/s")
        .axis_desc_style(("sans-serif", 18))
        .label_style(("sans-serif", 14))
        .x_labels(rounds.max(1) + 1)
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 { format!("{x:.0}") } else { String::new() }
        })
        .y_label_formatter(&|y| format!("{y:.0}"))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()?;
    let palette = [RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(128, 128, 128)];
    for (i, (label, g)) in lines.iter().enumerate() {
        let color = palette[i.min(palette.len() - 1)];
        chart
            .draw_series(LineSeries::new(vec![(-0.5, *g), (x_max, *g)], color.stroke_width(2)))?
            .label(format!("{label} ({g:.1} GFLOP/s)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    let blue = RGBColor(31, 119, 180);
    let step: Vec<(f64, f64)> = best
        .iter()
        .enumerate()
        .flat_map(|(j, &(r, b))| [(r, b), (best.get(j + 1).map_or(r + 0.5, |n| n.0), b)])
        .collect();
    chart
        .draw_series(LineSeries::new(step, blue.stroke_width(3)))?
        .label("best so far (1 thread)")
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], blue.stroke_width(3)));
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(points.iter().map(|&p| Circle::new(p, 3, orange.filled())))?
        .label("candidate (final cost for finalists)")
        .legend(move |(x, y)| Circle::new((x + 10, y), 3, orange.filled()));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .label_font(("sans-serif", 15))
        .draw()?;
    root.present().with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
