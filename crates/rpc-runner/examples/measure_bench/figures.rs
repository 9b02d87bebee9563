//! The figures of one mode, from its passes (see the example's docs for
//! what each key means).

use rpc_runner::measure::Stats;
use serde_json::{Map, Value, json};

use crate::kernels::{Kernel, KernelKind};
use crate::stats::{argmin, cv, kendall_tau_b, median, modal_fraction, percentile, separated};

/// One pass of one mode.
#[derive(Debug, Clone)]
pub(crate) struct Pass {
    /// Batch costs (seconds) per kernel, in kernel order.
    pub(crate) costs: Vec<Vec<f64>>,
    /// Per kernel: whether the measurement was marked unstable.
    pub(crate) flagged: Vec<bool>,
    /// The relative noise the measurements count as stable under (ours:
    /// the adaptive target; the others: `Stats::DEFAULT_THRESHOLD`).
    pub(crate) threshold: f64,
    /// Median over the pass's measurements of the time spent outside the
    /// evaluator (lease, upload, load, alloc, cleanup), seconds; `None`
    /// for the bare driver.
    pub(crate) overhead_secs: Option<f64>,
    /// Wall time of the pass, seconds.
    pub(crate) wall_secs: f64,
}

impl Pass {
    /// A pass whose flags come from [`Stats::from_costs`] with the default
    /// threshold (tvm_mode and harness_free).
    pub(crate) fn flagged_by_stats(costs: Vec<Vec<f64>>, wall_secs: f64) -> Pass {
        let threshold = Stats::DEFAULT_THRESHOLD;
        let flagged = costs.iter().map(|c| !is_stable(c, threshold)).collect();
        Pass { costs, flagged, wall_secs, threshold, overhead_secs: None }
    }

    fn median_of(&self, k: usize) -> f64 {
        median(&self.costs[k]).unwrap_or(f64::NAN)
    }
}

fn is_stable(costs: &[f64], threshold: f64) -> bool {
    Stats::from_costs(costs, threshold).is_some_and(|s| s.stable)
}

/// The passes of one mode.
#[derive(Debug, Clone)]
pub(crate) struct Runs {
    /// Quiet passes.
    pub(crate) quiet: Vec<Pass>,
    /// The pass under neighbour load.
    pub(crate) loaded: Pass,
}

fn num(x: Option<f64>) -> Value {
    x.filter(|x| x.is_finite()).map_or(Value::Null, |x| json!(x))
}

fn max(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    v.into_iter().filter(|x| x.is_finite()).max_by(f64::total_cmp)
}

fn min(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    v.into_iter().filter(|x| x.is_finite()).min_by(f64::total_cmp)
}

/// The figures of one mode, as a JSON object with the benchmark's keys.
pub(crate) fn figures(kernels: &[Kernel], runs: &Runs) -> Map<String, Value> {
    let quiet = &runs.quiet;
    let matmul: Vec<usize> = (0..kernels.len()).filter(|&k| kernels[k].is_matmul()).collect();
    let near: Vec<usize> =
        (0..kernels.len()).filter(|&k| kernels[k].kind == KernelKind::NearEqual).collect();

    // Worst single batch cost against the nominal wait, quiet passes.
    let busywait = max(quiet.iter().flat_map(|p| {
        kernels.iter().zip(&p.costs).flat_map(|(k, costs)| match k.kind {
            KernelKind::BusyWait(nominal) => {
                costs.iter().map(|c| (c / nominal - 1.0).abs()).collect::<Vec<_>>()
            }
            _ => Vec::new(),
        })
    }));

    // Relative noise of every matmul measurement of every quiet pass.
    let noise: Vec<f64> = quiet
        .iter()
        .flat_map(|p| {
            matmul.iter().filter_map(|&k| {
                Stats::from_costs(&p.costs[k], Stats::DEFAULT_THRESHOLD).map(|s| s.rel_noise)
            })
        })
        .collect();

    // Per candidate: its median in each quiet pass, and across passes.
    let per_pass: Vec<Vec<f64>> =
        matmul.iter().map(|&k| quiet.iter().map(|p| p.median_of(k)).collect()).collect();
    let cross: Vec<f64> = per_pass.iter().map(|m| median(m).unwrap_or(f64::NAN)).collect();
    let cv_max = max(per_pass.iter().filter_map(|m| cv(m)));

    // Rank agreement over candidates more than 3% apart.
    let apart = separated(&cross, 0.03);
    let mut taus = Vec::new();
    for a in 0..quiet.len() {
        for b in a + 1..quiet.len() {
            let ra: Vec<f64> = apart.iter().map(|&i| per_pass[i][a]).collect();
            let rb: Vec<f64> = apart.iter().map(|&i| per_pass[i][b]).collect();
            taus.extend(kendall_tau_b(&ra, &rb));
        }
    }

    // The fastest near-equal candidate of each pass.
    let winners: Vec<usize> = quiet
        .iter()
        .filter_map(|p| argmin(&near.iter().map(|&k| p.median_of(k)).collect::<Vec<_>>()))
        .collect();

    // Neighbour load against the quiet cross-pass median.
    let shift =
        max(matmul.iter().zip(&cross).map(|(&k, &q)| (runs.loaded.median_of(k) / q - 1.0).abs()));

    // Unstable flags over every measurement, quiet and loaded.
    let (mut noisy, mut noisy_flagged, mut calm, mut calm_flagged, mut flagged, mut all) =
        (0usize, 0usize, 0usize, 0usize, 0usize, 0usize);
    for p in quiet.iter().chain([&runs.loaded]) {
        for (costs, &f) in p.costs.iter().zip(&p.flagged) {
            all += 1;
            flagged += usize::from(f);
            if is_stable(costs, p.threshold) {
                calm += 1;
                calm_flagged += usize::from(f);
            } else {
                noisy += 1;
                noisy_flagged += usize::from(f);
            }
        }
    }
    let frac = |a: usize, b: usize| (b > 0).then(|| a as f64 / b as f64);

    // Does "stable" predict a faithful median? Of the quiet matmul
    // measurements not flagged, how many are more than 2% off their
    // candidate's cross-pass median.
    let (mut trusted, mut trusted_off) = (0usize, 0usize);
    for p in quiet {
        for (j, &k) in matmul.iter().enumerate() {
            if !p.flagged[k] && cross[j].is_finite() {
                trusted += 1;
                trusted_off += usize::from((p.median_of(k) / cross[j] - 1.0).abs() > 0.02);
            }
        }
    }

    let per_candidate = median(
        &quiet.iter().map(|p| p.wall_secs / p.costs.len().max(1) as f64).collect::<Vec<_>>(),
    );

    let mut out = Map::new();
    out.insert("busywait_max_rel_err".into(), num(busywait));
    // Per busy-wait: the worst batch, and the median batch, error.
    let mut by_kernel = Map::new();
    for (k, kernel) in kernels.iter().enumerate() {
        let KernelKind::BusyWait(nominal) = kernel.kind else { continue };
        let errs: Vec<f64> = quiet
            .iter()
            .flat_map(|p| p.costs[k].iter().map(|c| (c / nominal - 1.0).abs()))
            .collect();
        by_kernel.insert(
            kernel.name.clone(),
            json!({ "max": num(max(errs.iter().copied())), "median": num(median(&errs)) }),
        );
    }
    out.insert("busywait_rel_err_by_kernel".into(), Value::Object(by_kernel));
    out.insert("noise_median".into(), num(median(&noise)));
    out.insert("noise_p90".into(), num(percentile(&noise, 90.0)));
    out.insert("noise_max".into(), num(max(noise.iter().copied())));
    out.insert("run_to_run_cv_max".into(), num(cv_max));
    out.insert("kendall_tau_min".into(), num(min(taus)));
    out.insert("kendall_candidates".into(), json!(apart.len()));
    out.insert("top1_agreement".into(), num(modal_fraction(&winners)));
    // The first near-equal candidate does the least work: the true fastest.
    let right = winners.iter().filter(|&&w| w == 0).count();
    out.insert("top1_truth".into(), num(frac(right, winners.len())));
    out.insert("neighbour_load_shift_max".into(), num(shift));
    out.insert("unstable_flagged".into(), num(frac(noisy_flagged, noisy)));
    out.insert("false_alarms".into(), num(frac(calm_flagged, calm)));
    out.insert("unstable_fraction".into(), num(frac(flagged, all)));
    out.insert("stable_but_off".into(), num(frac(trusted_off, trusted)));
    out.insert("seconds_per_candidate".into(), num(per_candidate));
    let overheads: Vec<f64> = quiet.iter().filter_map(|p| p.overhead_secs).collect();
    out.insert("overhead_per_measurement_s".into(), num(median(&overheads)));
    out.insert(
        "medians_s".into(),
        kernels
            .iter()
            .enumerate()
            .filter(|(_, k)| k.is_matmul())
            .zip(&cross)
            .map(|((_, k), m)| (k.name.clone(), num(Some(*m))))
            .collect::<Map<_, _>>()
            .into(),
    );
    out
}

/// `ours / peer` for every numeric key both have (null if either is
/// missing or the peer's is zero).
pub(crate) fn ratios(ours: &Map<String, Value>, peer: &Map<String, Value>) -> Map<String, Value> {
    ours.iter()
        .filter(|(k, v)| !v.is_object() && k.as_str() != "kendall_candidates")
        .map(|(k, v)| {
            let r = match (v.as_f64(), peer.get(k).and_then(Value::as_f64)) {
                (Some(o), Some(p)) if p != 0.0 => Some(o / p),
                _ => None,
            };
            (k.clone(), num(r))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kernel_set;

    /// A pass where every kernel's batch costs are `median(k)` exactly,
    /// the busy-waits at their nominal time.
    fn pass(kernels: &[Kernel], median: impl Fn(usize) -> f64) -> Pass {
        let costs = (0..kernels.len())
            .map(|k| match kernels[k].kind {
                KernelKind::BusyWait(nominal) => vec![nominal; 10],
                _ => vec![median(k); 10],
            })
            .collect();
        Pass::flagged_by_stats(costs, 1.0)
    }

    fn get(f: &Map<String, Value>, key: &str) -> Option<f64> {
        f.get(key).and_then(Value::as_f64)
    }

    #[test]
    fn figures_follow_the_passes() {
        let kernels = kernel_set(true);
        let n = kernels.len();
        // Candidate k takes 2^k ms: all more than 3% apart.
        let speed = |k: usize| 1e-3 * f64::powi(2.0, k as i32);
        let mut a = pass(&kernels, speed);
        a.costs[0][3] *= 1.05; // one busy-wait batch 5% long
        let b = pass(&kernels, speed);
        let loaded = pass(&kernels, |k| speed(k) * 1.25);
        let f = figures(&kernels, &Runs { quiet: vec![a, b.clone()], loaded: loaded.clone() });
        assert!((get(&f, "busywait_max_rel_err").unwrap() - 0.05).abs() < 1e-9);
        assert_eq!(get(&f, "kendall_tau_min"), Some(1.0));
        assert_eq!(get(&f, "run_to_run_cv_max"), Some(0.0));
        assert_eq!(get(&f, "noise_max"), Some(0.0));
        assert!((get(&f, "neighbour_load_shift_max").unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(get(&f, "top1_agreement"), Some(1.0));
        assert_eq!(get(&f, "top1_truth"), Some(1.0), "the first near-equal one is fastest");
        assert_eq!(get(&f, "unstable_fraction"), Some(0.0));
        assert_eq!(f.get("unstable_flagged"), Some(&Value::Null), "no noisy measurement");

        // A pass in reverse order disagrees completely; a noisy measurement
        // is flagged, and a flag on a calm one is a false alarm.
        // (Scaled up so that the cross-pass medians stay more than 3% apart.)
        let mut rev = pass(&kernels, |k| 1e3 * speed(n - k));
        rev.costs[n - 1] = vec![1.0, 2.0, 3.0, 4.0, 5.0];
        rev.flagged = rev.costs.iter().map(|c| !is_stable(c, rev.threshold)).collect();
        let mut calm = b;
        calm.flagged[n - 1] = true;
        let f = figures(&kernels, &Runs { quiet: vec![calm, rev], loaded });
        assert_eq!(get(&f, "kendall_tau_min"), Some(-1.0));
        assert_eq!(get(&f, "top1_agreement"), Some(0.5));
        assert_eq!(get(&f, "unstable_flagged"), Some(1.0));
        // 3 passes of n kernels: 1 noisy, 3n - 1 calm of which one flagged.
        assert!((get(&f, "false_alarms").unwrap() - 1.0 / (3 * n - 1) as f64).abs() < 1e-12);
        assert!((get(&f, "unstable_fraction").unwrap() - 2.0 / (3 * n) as f64).abs() < 1e-12);
    }

    #[test]
    fn ratios_skip_counts_objects_and_zero_peers() {
        let ours = json!({"a": 2.0, "b": 1.0, "kendall_candidates": 4, "medians_s": {}});
        let peer = json!({"a": 4.0, "b": 0.0, "kendall_candidates": 4});
        let r = ratios(ours.as_object().unwrap(), peer.as_object().unwrap());
        assert_eq!(Value::Object(r), json!({"a": 0.5, "b": null}));
    }
}
