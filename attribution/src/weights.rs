//! Turning raw attribution scores into weights: fixed-point integers that sum to exactly
//! [`WEIGHT_SCALE`] per inference, so an epoch splits a fee without rounding drift.

pub use ledgerlake_lakehouse::events::WEIGHT_SCALE;

/// Apportions [`WEIGHT_SCALE`] among the positive, finite scores by the largest-remainder
/// method: each gets the floor of its exact share, and the units left go one each to the
/// largest remainders (ties to the earlier item, so callers sort by a stable key first).
/// Items with a score that is not positive and finite get nothing and are left out.
/// Returns (index into `scores`, weight), in input order; empty when nothing is positive.
pub fn apportion(scores: &[f64]) -> Vec<(usize, u64)> {
    let positive: Vec<(usize, f64)> = scores
        .iter()
        .copied()
        .enumerate()
        .filter(|(_, s)| s.is_finite() && *s > 0.0)
        .collect();
    // Relative to the largest, so the total cannot overflow to infinity.
    let largest = positive.iter().map(|(_, s)| *s).fold(0.0, f64::max);
    let positive: Vec<(usize, f64)> = positive.into_iter().map(|(i, s)| (i, s / largest)).collect();
    let total: f64 = positive.iter().map(|(_, s)| s).sum();
    if positive.is_empty() || !total.is_finite() {
        return Vec::new();
    }
    let scale = WEIGHT_SCALE as f64;
    let mut shares: Vec<(usize, u64, f64)> = positive
        .iter()
        .map(|&(i, s)| {
            let exact = s / total * scale;
            // exact is in [0, scale]; the cast saturates at the ends.
            let floor = exact.floor();
            (i, floor as u64, exact - floor)
        })
        .collect();
    let given: u64 = shares.iter().map(|s| s.1).sum();
    // Floors lose less than one unit each, so fewer units are left than items (and
    // rounding of `exact` can only make `given` off by a unit or two either way).
    let mut left = WEIGHT_SCALE.saturating_sub(given);
    let mut by_remainder: Vec<usize> = (0..shares.len()).collect();
    by_remainder.sort_by(|&a, &b| shares[b].2.total_cmp(&shares[a].2).then(a.cmp(&b)));
    for &k in by_remainder.iter().cycle().take(shares.len() * 2) {
        if left == 0 {
            break;
        }
        shares[k].1 += 1;
        left -= 1;
    }
    let mut over = shares
        .iter()
        .map(|s| s.1)
        .sum::<u64>()
        .saturating_sub(WEIGHT_SCALE);
    for &k in by_remainder.iter().rev() {
        if over == 0 {
            break;
        }
        if shares[k].1 > 0 {
            shares[k].1 -= 1;
            over -= 1;
        }
    }
    shares
        .into_iter()
        .filter(|s| s.1 > 0)
        .map(|(i, w, _)| (i, w))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn thirds_sum_to_exactly_the_scale_with_the_unit_to_the_first() {
        let w = apportion(&[1.0, 1.0, 1.0]);
        assert_eq!(w, [(0, 333_333_334), (1, 333_333_333), (2, 333_333_333)]);
    }

    #[test]
    fn only_positive_finite_scores_earn() {
        let w = apportion(&[-1.0, 0.0, f64::NAN, 3.0, f64::INFINITY, 1.0]);
        assert_eq!(w, [(3, 750_000_000), (5, 250_000_000)]);
        assert!(apportion(&[0.0, -2.0]).is_empty());
        assert_eq!(apportion(&[f64::MAX, f64::MAX]), [(0, 500_000_000), (1, 500_000_000)], "no overflow to infinity");
        assert!(apportion(&[]).is_empty());
    }

    proptest! {
        #[test]
        fn weights_always_sum_to_the_scale_and_follow_the_scores(scores in prop::collection::vec(0.0f64..1e12, 1..60)) {
            let w = apportion(&scores);
            if scores.iter().any(|&s| s > 0.0) {
                prop_assert_eq!(w.iter().map(|x| x.1).sum::<u64>(), WEIGHT_SCALE);
            }
            let total: f64 = scores.iter().sum();
            for &(i, weight) in &w {
                let exact = scores[i] / total * WEIGHT_SCALE as f64;
                prop_assert!((weight as f64 - exact).abs() <= 1.0 + exact * 1e-12, "{} vs {}", weight, exact);
            }
        }
    }
}
