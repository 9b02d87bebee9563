//! Statistics of a measurement's batch costs, and whether two measurements
//! differ beyond their noise.
//!
//! Robust statistics (median, MAD) rather than mean and standard deviation:
//! one preempted batch moves the mean and the deviation a lot, the median and
//! the MAD hardly at all.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// Statistics of a set of costs (seconds).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Stats {
    /// Number of costs.
    pub n: usize,
    /// Smallest cost.
    pub min: f64,
    /// Median cost (the mean of the two middle ones for an even `n`).
    pub median: f64,
    /// Mean cost.
    pub mean: f64,
    /// Median absolute deviation from the median.
    pub mad: f64,
    /// Interquartile range (quartiles by linear interpolation).
    pub iqr: f64,
    /// Relative noise: `max(mad, iqr / 2) / median` (0 for fewer than 2
    /// costs or a zero median). For normal noise `iqr / 2` and `mad` agree
    /// (both 0.674 σ); the larger of the two keeps a bimodal set of costs
    /// (say 60% at one value, 40% at another, where the MAD is 0) from
    /// looking quiet.
    pub rel_noise: f64,
    /// `rel_noise` is at most the threshold the statistics were computed
    /// with, and there are at least [`Stats::MIN_STABLE_N`] costs.
    pub stable: bool,
}

/// How two measurements compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// The first is faster beyond the noise of both.
    Faster,
    /// The first is slower beyond the noise of both.
    Slower,
    /// The difference is within noise (or there are too few costs to tell).
    Tied,
}

/// The MAD of a normal distribution times this is its standard deviation.
const MAD_TO_SIGMA: f64 = 1.4826;

impl Stats {
    /// Default noise threshold for [`stable`](Stats::stable): 1% relative noise.
    pub const DEFAULT_THRESHOLD: f64 = 0.01;

    /// Fewest costs for a result to count as stable (one or two batches say
    /// nothing about their spread).
    pub const MIN_STABLE_N: usize = 3;

    /// Statistics of `costs`, `stable` against `threshold` (relative noise).
    /// Non-finite costs are ignored; `None` if no finite cost is left.
    pub fn from_costs(costs: &[f64], threshold: f64) -> Option<Stats> {
        let mut v: Vec<f64> = costs.iter().copied().filter(|c| c.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = median_sorted(&v);
        let mean = v.iter().sum::<f64>() / n as f64;
        let mut dev: Vec<f64> = v.iter().map(|c| (c - median).abs()).collect();
        dev.sort_by(f64::total_cmp);
        let mad = median_sorted(&dev);
        let iqr = quantile_sorted(&v, 0.75) - quantile_sorted(&v, 0.25);
        let rel_noise = if n < 2 || median <= 0.0 { 0.0 } else { mad.max(iqr / 2.0) / median };
        let stable = n >= Self::MIN_STABLE_N && rel_noise <= threshold;
        Some(Stats { n, min: v[0], median, mean, mad, iqr, rel_noise, stable })
    }

    /// The interval the median is taken to lie in: `median ± 3 σ̂` with
    /// `σ̂ = 1.4826 · spread / √n` (`spread = rel_noise · median`, the
    /// MAD or half the IQR, whichever is larger: its normal-equivalent
    /// standard error), and at least `± 0.5%` of the median (the resolution
    /// of any CPU timing worth trusting).
    pub fn interval(&self) -> (f64, f64) {
        let spread = self.mad.max(self.iqr / 2.0);
        let se = MAD_TO_SIGMA * spread / (self.n.max(1) as f64).sqrt();
        let half = (3.0 * se).max(0.005 * self.median.abs());
        (self.median - half, self.median + half)
    }

    /// Whether `self` is faster, slower or tied with `other`: faster or
    /// slower only if both have at least [`Stats::MIN_STABLE_N`] costs and
    /// their [`interval`](Stats::interval)s do not overlap.
    pub fn compare(&self, other: &Stats) -> Verdict {
        if self.n < Self::MIN_STABLE_N || other.n < Self::MIN_STABLE_N {
            return Verdict::Tied;
        }
        let (a_lo, a_hi) = self.interval();
        let (b_lo, b_hi) = other.interval();
        if a_hi < b_lo {
            Verdict::Faster
        } else if b_hi < a_lo {
            Verdict::Slower
        } else {
            Verdict::Tied
        }
    }
}

/// The candidates tied with the fastest: indices into `stats` of every one
/// whose comparison with the fastest median is [`Verdict::Tied`], fastest
/// first. One index means the fastest is faster than all others beyond noise.
pub fn best_within_noise(stats: &[Stats]) -> Vec<usize> {
    let Some(best) = (0..stats.len())
        .min_by(|&a, &b| stats[a].median.partial_cmp(&stats[b].median).unwrap_or(Ordering::Equal))
    else {
        return Vec::new();
    };
    let mut tied: Vec<usize> = (0..stats.len())
        .filter(|&i| i == best || stats[best].compare(&stats[i]) == Verdict::Tied)
        .collect();
    tied.sort_by(|&a, &b| stats[a].median.total_cmp(&stats[b].median));
    tied
}

/// The `q` quantile of sorted `v` (linear interpolation between order
/// statistics, R's type 7).
fn quantile_sorted(v: &[f64], q: f64) -> f64 {
    let pos = q * (v.len().saturating_sub(1)) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    v[lo] + (v[hi.min(v.len() - 1)] - v[lo]) * frac
}

/// Whether costs `a` are faster, slower or tied with costs `b` **timed
/// interleaved in one set** (`Runner::run_interleaved`: batch `k` of each
/// was timed in round `k`, close in time): compares the per-round ratios
/// `a[k] / b[k]`, so drift both share (frequency, temperature, a neighbour)
/// cancels out instead of widening the intervals. Faster if the ratios'
/// interval `median ± 3 · 1.4826 · spread / √n` (at least ± 0.5%) lies
/// below 1, slower if above; tied otherwise or with fewer than
/// [`Stats::MIN_STABLE_N`] pairs. For costs measured apart, use
/// [`Stats::compare`].
///
/// ```
/// use rpc_runner::measure::{Verdict, compare_paired};
/// // Both drift by 10% over the rounds; a stays 2% faster throughout.
/// let b: Vec<f64> = (0..20).map(|k| 1.0 + 0.005 * k as f64).collect();
/// let a: Vec<f64> = b.iter().map(|x| 0.98 * x).collect();
/// assert_eq!(compare_paired(&a, &b), Verdict::Faster);
/// assert_eq!(compare_paired(&b, &a), Verdict::Slower);
/// assert_eq!(compare_paired(&a, &a), Verdict::Tied);
/// ```
pub fn compare_paired(a: &[f64], b: &[f64]) -> Verdict {
    let ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .filter(|&(&x, &y)| x.is_finite() && y.is_finite() && y > 0.0)
        .map(|(&x, &y)| x / y)
        .collect();
    let Some(r) = Stats::from_costs(&ratios, 0.0) else { return Verdict::Tied };
    if r.n < Stats::MIN_STABLE_N {
        return Verdict::Tied;
    }
    let (lo, hi) = r.interval();
    if hi < 1.0 {
        Verdict::Faster
    } else if lo > 1.0 {
        Verdict::Slower
    } else {
        Verdict::Tied
    }
}

/// [`best_within_noise`] for costs timed interleaved in one set: the
/// fastest median and every candidate it does not beat round by round
/// ([`compare_paired`] not `Faster`), fastest median first. That includes a
/// candidate the round-by-round ratios call faster than the fastest median
/// (noisy or drifting costs can disagree so): the evidence conflicts, so
/// neither is a clear best. One index means it beats every other one.
pub fn best_within_noise_paired(costs: &[&[f64]]) -> Vec<usize> {
    let medians: Vec<f64> = costs
        .iter()
        .map(|c| Stats::from_costs(c, 0.0).map_or(f64::INFINITY, |s| s.median))
        .collect();
    let Some(best) = (0..costs.len())
        .filter(|&i| medians[i].is_finite())
        .min_by(|&a, &b| medians[a].total_cmp(&medians[b]))
    else {
        return Vec::new();
    };
    let mut tied: Vec<usize> = (0..costs.len())
        .filter(|&i| medians[i].is_finite())
        .filter(|&i| i == best || compare_paired(costs[best], costs[i]) != Verdict::Faster)
        .collect();
    tied.sort_by(|&a, &b| medians[a].total_cmp(&medians[b]));
    tied
}

fn median_sorted(v: &[f64]) -> f64 {
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics_are_robust_to_one_outlier() {
        let s = Stats::from_costs(&[1.0, 1.01, 0.99, 1.0, 50.0], 0.02).unwrap();
        assert_eq!((s.n, s.min, s.median), (5, 0.99, 1.0));
        assert!((s.mean - 10.8).abs() < 1e-9, "{}", s.mean);
        assert!((s.mad - 0.01).abs() < 1e-9, "{}", s.mad);
        assert!((s.rel_noise - 0.01).abs() < 1e-9);
        assert!(s.stable);
        assert!(!Stats::from_costs(&[1.0, 1.2, 0.8, 1.1, 0.9], 0.02).unwrap().stable);
        // Too few costs are never stable, and an even count takes the middle pair.
        // A bimodal set has a MAD of 0 but is not quiet.
        let bi = Stats::from_costs(&[10.0, 12.0, 10.0, 12.0, 10.0], 0.01).unwrap();
        assert_eq!((bi.mad, bi.iqr), (0.0, 2.0));
        assert!((bi.rel_noise - 0.1).abs() < 1e-12 && !bi.stable, "{bi:?}");
        let two = Stats::from_costs(&[1.0, 3.0], 0.5).unwrap();
        assert_eq!((two.median, two.stable), (2.0, false));
        assert!(Stats::from_costs(&[], 0.01).is_none());
        assert!(Stats::from_costs(&[f64::NAN], 0.01).is_none());
        assert_eq!(Stats::from_costs(&[2.0, f64::INFINITY], 0.01).unwrap().n, 1);
    }

    #[test]
    fn differences_count_only_beyond_noise() {
        let fast = Stats::from_costs(&[1.0, 1.01, 0.99, 1.0, 1.0, 1.02], 0.01).unwrap();
        let slow = Stats::from_costs(&[1.2, 1.21, 1.19, 1.2, 1.2, 1.22], 0.01).unwrap();
        let near = Stats::from_costs(&[1.003, 1.0, 1.01, 0.995, 1.005, 1.0], 0.01).unwrap();
        assert_eq!(fast.compare(&slow), Verdict::Faster);
        assert_eq!(slow.compare(&fast), Verdict::Slower);
        assert_eq!(fast.compare(&near), Verdict::Tied);
        let noisy = Stats::from_costs(&[1.0, 1.5, 0.8, 1.3, 0.9, 1.4], 0.01).unwrap();
        assert_eq!(noisy.compare(&slow), Verdict::Tied, "wide intervals overlap");
        // Two batches say nothing.
        let few = Stats::from_costs(&[0.5, 0.5], 0.01).unwrap();
        assert_eq!(few.compare(&slow), Verdict::Tied);
        assert_eq!(best_within_noise(&[slow, near, fast]), vec![2, 1]);
        assert_eq!(best_within_noise(&[slow, fast]), vec![1]);
        assert!(best_within_noise(&[]).is_empty());
    }

    #[test]
    fn paired_comparison_cancels_shared_drift() {
        // A shared 20% drift makes the unpaired intervals overlap...
        let b: Vec<f64> = (0..30).map(|k| 1.0 + 0.2 * (k as f64 / 29.0)).collect();
        let a: Vec<f64> = b.iter().map(|x| 0.985 * x).collect();
        let c: Vec<f64> = b.iter().map(|x| 1.001 * x).collect();
        let sa = Stats::from_costs(&a, 0.01).unwrap();
        let sb = Stats::from_costs(&b, 0.01).unwrap();
        assert_eq!(sa.compare(&sb), Verdict::Tied);
        // ...the per-round ratios do not.
        assert_eq!(compare_paired(&a, &b), Verdict::Faster);
        assert_eq!(compare_paired(&b, &a), Verdict::Slower);
        // 0.1% is below the ±0.5% floor: tied.
        assert_eq!(compare_paired(&c, &b), Verdict::Tied);
        assert_eq!(compare_paired(&a[..2], &b[..2]), Verdict::Tied, "too few pairs");
        assert_eq!(best_within_noise_paired(&[&b, &a, &c]), vec![1]);
        assert_eq!(best_within_noise_paired(&[&b, &c]), vec![0, 1]);
        assert!(best_within_noise_paired(&[]).is_empty());
        // Noisy ratios are tied.
        let noisy: Vec<f64> =
            b.iter().enumerate().map(|(k, x)| x * if k % 2 == 0 { 0.9 } else { 1.08 }).collect();
        assert_eq!(compare_paired(&noisy, &b), Verdict::Tied);
    }

    #[test]
    fn a_lower_median_that_loses_round_by_round_is_no_clear_best() {
        // `low` has the lower median (1 against 9), yet is 11% slower in six
        // of its seven rounds: the two kinds of evidence disagree.
        let low = [1.0, 1.0, 1.0, 1.0, 10.0, 10.0, 10.0];
        let high = [0.9, 0.9, 0.9, 20.0, 9.0, 9.0, 9.0];
        assert!(
            Stats::from_costs(&low, 0.0).unwrap().median
                < Stats::from_costs(&high, 0.0).unwrap().median
        );
        assert_eq!(compare_paired(&low, &high), Verdict::Slower);
        assert_eq!(best_within_noise_paired(&[&high, &low]), vec![1, 0]);
        // A third, beaten round by round by the fastest median, stays out.
        let slow: Vec<f64> = low.iter().map(|x| x * 1.2).collect();
        assert_eq!(compare_paired(&low, &slow), Verdict::Faster);
        assert_eq!(best_within_noise_paired(&[&slow, &high, &low]), vec![2, 1]);
    }
}
