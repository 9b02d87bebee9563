//! Statistics helpers of the fidelity benchmark: median, percentile, CV,
//! Kendall's tau-b over a common candidate list, the modal winner.

/// Median of `v` (the mean of the middle pair for an even length); `None` if empty.
pub(crate) fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 })
}

/// The `p`-th percentile (`p` in [0, 100], clamped) of `v`, linearly
/// interpolated between closest ranks; `None` if empty.
pub(crate) fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let rank = p.clamp(0.0, 100.0) / 100.0 * (v.len() - 1) as f64;
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    Some(v[lo] + (v[hi] - v[lo]) * (rank - lo as f64))
}

/// Coefficient of variation: sample standard deviation / mean; `None` for
/// fewer than 2 values or a zero mean.
pub(crate) fn cv(v: &[f64]) -> Option<f64> {
    let n = v.len();
    if n < 2 {
        return None;
    }
    let mean = v.iter().sum::<f64>() / n as f64;
    if mean == 0.0 {
        return None;
    }
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    Some(var.sqrt() / mean.abs())
}

/// Kendall's tau-b of two scorings of the same candidates (`a[i]` and `b[i]`
/// score candidate `i`): +1 same order, -1 reversed, ties corrected.
/// `None` if the lengths differ, there are fewer than 2 candidates, or one
/// side is all ties.
pub(crate) fn kendall_tau_b(a: &[f64], b: &[f64]) -> Option<f64> {
    if a.len() != b.len() || a.len() < 2 {
        return None;
    }
    let (mut concordant, mut discordant, mut ties_a, mut ties_b) = (0i64, 0i64, 0i64, 0i64);
    for i in 0..a.len() {
        for j in i + 1..a.len() {
            let da = a[i].total_cmp(&a[j]) as i64;
            let db = b[i].total_cmp(&b[j]) as i64;
            match (da, db) {
                (0, 0) => {}
                (0, _) => ties_a += 1,
                (_, 0) => ties_b += 1,
                _ if da == db => concordant += 1,
                _ => discordant += 1,
            }
        }
    }
    let denom =
        (((concordant + discordant + ties_a) * (concordant + discordant + ties_b)) as f64).sqrt();
    (denom > 0.0).then(|| (concordant - discordant) as f64 / denom)
}

/// Of the winners (one per pass), the fraction equal to the most common one.
pub(crate) fn modal_fraction(winners: &[usize]) -> Option<f64> {
    let modal_count = winners.iter().map(|w| winners.iter().filter(|x| *x == w).count()).max()?;
    Some(modal_count as f64 / winners.len() as f64)
}

/// Index of the smallest finite value.
pub(crate) fn argmin(v: &[f64]) -> Option<usize> {
    (0..v.len()).filter(|&i| v[i].is_finite()).min_by(|&x, &y| v[x].total_cmp(&v[y]))
}

/// Indices of a subset of candidates whose `scores` differ pairwise by more
/// than `rel` (relative to the faster): the fastest, then each next one that
/// is more than `rel` slower than the last one kept. In score order.
pub(crate) fn separated(scores: &[f64], rel: f64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).filter(|&i| scores[i].is_finite()).collect();
    order.sort_by(|&x, &y| scores[x].total_cmp(&scores[y]));
    let mut kept: Vec<usize> = Vec::new();
    for i in order {
        if kept.last().is_none_or(|&last| scores[i] > scores[last] * (1.0 + rel)) {
            kept.push(i);
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tau_b_is_one_for_the_same_order_and_minus_one_reversed() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        let rev = [5.0, 4.0, 3.0, 2.0, 1.0];
        assert_eq!(kendall_tau_b(&a, &a), Some(1.0));
        assert_eq!(kendall_tau_b(&a, &rev), Some(-1.0));
        // Scale does not matter, only order.
        assert_eq!(kendall_tau_b(&a, &[10.0, 20.0, 30.0, 40.0, 50.0]), Some(1.0));
        // One swapped pair of 10: (9 - 1) / 10.
        let t = kendall_tau_b(&a, &[2.0, 1.0, 3.0, 4.0, 5.0]).unwrap();
        assert!((t - 0.8).abs() < 1e-12, "{t}");
        // Ties: a = [1, 1, 2], b = [1, 2, 3]: C = 2, D = 0, ties_a = 1
        // -> 2 / sqrt(2 * 3).
        let t = kendall_tau_b(&[1.0, 1.0, 2.0], &[1.0, 2.0, 3.0]).unwrap();
        assert!((t - 2.0 / 6f64.sqrt()).abs() < 1e-12, "{t}");
        assert_eq!(kendall_tau_b(&[1.0], &[1.0]), None);
        assert_eq!(kendall_tau_b(&[1.0, 2.0], &[1.0]), None);
        assert_eq!(kendall_tau_b(&[1.0, 1.0], &[1.0, 2.0]), None, "all ties on one side");
    }

    #[test]
    fn median_percentile_and_cv() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let v: Vec<f64> = (1..=11).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(6.0));
        assert_eq!(percentile(&v, 90.0), Some(10.0));
        assert_eq!(percentile(&v, 100.0), Some(11.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[1.0, 2.0], 50.0), Some(1.5));
        assert_eq!(cv(&[2.0, 2.0, 2.0]), Some(0.0));
        // mean 2, sample sd 1.
        assert!((cv(&[1.0, 2.0, 3.0]).unwrap() - 0.5).abs() < 1e-12);
        assert_eq!(cv(&[1.0]), None);
    }

    #[test]
    fn winners_and_separated_sets() {
        assert_eq!(modal_fraction(&[2, 2, 1]), Some(2.0 / 3.0));
        assert_eq!(modal_fraction(&[0, 1, 2]), Some(1.0 / 3.0));
        assert_eq!(modal_fraction(&[]), None);
        assert_eq!(argmin(&[3.0, 1.0, 2.0]), Some(1));
        // 1.00, 1.02 (within 3% of 1.00), 1.10, 1.12 (within 3% of 1.10), 2.0.
        assert_eq!(separated(&[1.10, 1.0, 2.0, 1.02, 1.12], 0.03), vec![1, 0, 2]);
        assert!(separated(&[], 0.03).is_empty());
    }
}
