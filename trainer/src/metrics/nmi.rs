//! Normalized mutual information between a clustering and the ground-truth classes.

// BTreeMaps, not HashMaps: the sums below then run in a fixed order, so the same inputs give
// bit-identical results (HashMap iteration order is randomised per process).
use std::collections::BTreeMap;

use crate::error::{Error, Result};

/// Normalized mutual information with arithmetic normalisation,
/// NMI = I(pred; truth) / ((H(pred) + H(truth)) / 2), natural logarithms — the same value as
/// scikit-learn's default `normalized_mutual_info_score(truth, pred)` (symmetric in its
/// arguments), including its limit cases:
///
/// * both labellings put everything in one cluster → 1.0 (identical trivial partitions);
/// * zero mutual information otherwise → 0.0 (e.g. one side is a single cluster).
///
/// Label values are arbitrary identifiers; only the partitions they induce matter.
/// Errors when the two labellings have different lengths or are empty.
pub fn nmi(pred: &[u32], truth: &[u32]) -> Result<f64> {
    if pred.len() != truth.len() {
        return Err(Error::Invalid(format!(
            "NMI needs one cluster per item: {} cluster labels for {} class labels",
            pred.len(),
            truth.len()
        )));
    }
    if pred.is_empty() {
        return Err(Error::Invalid("NMI of an empty labelling is undefined".into()));
    }
    let n = pred.len() as f64;
    let mut joint: BTreeMap<(u32, u32), usize> = BTreeMap::new();
    let mut a: BTreeMap<u32, usize> = BTreeMap::new();
    let mut b: BTreeMap<u32, usize> = BTreeMap::new();
    for (&p, &t) in pred.iter().zip(truth) {
        *joint.entry((p, t)).or_insert(0) += 1;
        *a.entry(p).or_insert(0) += 1;
        *b.entry(t).or_insert(0) += 1;
    }
    if a.len() == 1 && b.len() == 1 {
        return Ok(1.0);
    }
    // I = Σ_ij (n_ij/N) ln(N n_ij / (a_i b_j)); clipped at 0 like sklearn (rounding can make an
    // independent pair come out at -1e-17).
    let mi: f64 = joint
        .iter()
        .map(|(&(p, t), &nij)| {
            let nij = nij as f64;
            nij / n * (n * nij / (a[&p] as f64 * b[&t] as f64)).ln()
        })
        .sum::<f64>()
        .max(0.0);
    if mi == 0.0 {
        return Ok(0.0);
    }
    let entropy = |m: &BTreeMap<u32, usize>| -> f64 {
        m.values()
            .map(|&c| {
                let p = c as f64 / n;
                -p * p.ln()
            })
            .sum()
    };
    let denom = (entropy(&a) + entropy(&b)) / 2.0;
    Ok((mi / denom).clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_partitions_score_one_whatever_the_label_names() {
        let truth = [0, 0, 1, 1, 2, 2, 2];
        assert!((nmi(&truth, &truth).unwrap() - 1.0).abs() < 1e-12);
        let renamed = [5, 5, 9, 9, 1, 1, 1];
        assert!((nmi(&renamed, &truth).unwrap() - 1.0).abs() < 1e-12);
        // One cluster on both sides: sklearn's convention, a perfect match.
        assert_eq!(nmi(&[3, 3, 3], &[4, 4, 4]).unwrap(), 1.0);
    }

    #[test]
    fn independent_partitions_score_zero() {
        // Clusters {0,1},{2,3} against classes {0,2},{1,3}: every cell of the contingency table
        // is 1 = (2·2)/4, exactly the product of the marginals, so I = 0.
        assert_eq!(nmi(&[0, 0, 1, 1], &[0, 1, 0, 1]).unwrap(), 0.0);
        // A single cluster carries no information about 3 classes.
        assert_eq!(nmi(&[0, 0, 0, 0, 0, 0], &[0, 0, 1, 1, 2, 2]).unwrap(), 0.0);
        // Large random independent labellings: close to 0 (finite-sample bias only).
        let pred: Vec<u32> = (0..20_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % 10).collect();
        let truth: Vec<u32> = (0..20_000u32).map(|i| (i.wrapping_mul(40_503) >> 3) % 10).collect();
        let v = nmi(&pred, &truth).unwrap();
        assert!(v < 0.01, "{v}");
    }

    #[test]
    fn small_case_by_hand_and_against_sklearn() {
        // pred = [0,0,0,1,1,1], truth = [0,0,1,1,1,1]. Contingency (pred rows, truth cols):
        //   [[2,1],[0,3]], marginals a = (3,3), b = (2,4), N = 6.
        //   I = 2/6·ln(6·2/(3·2)) + 1/6·ln(6·1/(3·4)) + 3/6·ln(6·3/(3·4))
        //     = (1/3)ln2 + (1/6)ln(1/2) + (1/2)ln(3/2) = (1/6)ln2 + (1/2)ln(3/2) ≈ 0.318257
        //   H(pred) = ln2 ≈ 0.693147; H(truth) = -(1/3)ln(1/3) - (2/3)ln(2/3) ≈ 0.636514
        //   NMI = I / ((H(pred)+H(truth))/2) ≈ 0.318257 / 0.664831 ≈ 0.478704
        let pred = [0, 0, 0, 1, 1, 1];
        let truth = [0, 0, 1, 1, 1, 1];
        let l2 = 2f64.ln();
        let i = l2 / 6.0 + 0.5 * 1.5f64.ln();
        let h_truth = -(1.0 / 3.0) * (1.0f64 / 3.0).ln() - (2.0 / 3.0) * (2.0f64 / 3.0).ln();
        let want = i / ((l2 + h_truth) / 2.0);
        let got = nmi(&pred, &truth).unwrap();
        assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        // scikit-learn 1.9.1: normalized_mutual_info_score([0,0,1,1,1,1], [0,0,0,1,1,1])
        //   = 0.47870397138568005  (pip install scikit-learn, then in python3:
        //   from sklearn.metrics import normalized_mutual_info_score as f; f(truth, pred))
        assert!((got - 0.478_703_971_385_680_05).abs() < 1e-12, "{got}");
        // Symmetric.
        assert!((nmi(&truth, &pred).unwrap() - got).abs() < 1e-15);
    }

    #[test]
    fn larger_case_against_sklearn() {
        // scikit-learn 1.9.1, produced with
        //   t = [i % 7 for i in range(100)]
        //   p = [(i % 7) // 2 if i % 3 else i % 4 for i in range(100)]
        //   normalized_mutual_info_score(t, p)  → 0.3300586345276739
        let truth: Vec<u32> = (0..100).map(|i| i % 7).collect();
        let pred: Vec<u32> = (0..100).map(|i| if i % 3 != 0 { (i % 7) / 2 } else { i % 4 }).collect();
        let got = nmi(&pred, &truth).unwrap();
        assert!((got - SKLEARN_LARGER).abs() < 1e-12, "{got}");
    }

    const SKLEARN_LARGER: f64 = 0.330_058_634_527_673_9;

    #[test]
    fn mismatched_or_empty_inputs_are_errors() {
        assert!(nmi(&[0, 1], &[0]).unwrap_err().to_string().contains("2 cluster labels for 1"));
        assert!(nmi(&[], &[]).is_err());
    }
}
