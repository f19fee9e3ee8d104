//! Scoring neighbour lists: Recall@K (paper definition), MAP@R and R-Precision (MLRC).
//!
//! These functions never see vectors, so exact search ([`super::knn_exact`]) and the indexer's
//! HNSW lists are scored by the same code.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Checks that there is one list per labelled item, that every neighbour index is a valid item
/// and that no list contains its own query (which would inflate every metric: the protocol
/// excludes the query, so a search that returns it must drop it before scoring).
fn check_lists(neighbors: &[Vec<u32>], labels: &[u32]) -> Result<()> {
    if neighbors.len() != labels.len() {
        return Err(Error::Invalid(format!(
            "{} neighbour lists for {} labels; every labelled item must be a query",
            neighbors.len(),
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(Error::Invalid("no queries to score (empty label list)".into()));
    }
    let n = labels.len();
    for (q, list) in neighbors.iter().enumerate() {
        for &j in list {
            if j as usize >= n {
                return Err(Error::Invalid(format!(
                    "neighbour list of query {q} names item {j}, but there are only {n} items"
                )));
            }
            if j as usize == q {
                return Err(Error::Invalid(format!(
                    "neighbour list of query {q} contains the query itself; exclude it before \
                     scoring (the paper metrics exclude the query from its own results)"
                )));
            }
        }
    }
    Ok(())
}

/// Recall@K as defined in the deep-metric-learning papers (Song et al. 2016 onwards): query `q`
/// is a hit at K when **any** of its first K neighbours has its label; the result is the
/// fraction of hits over all queries, for each K in `ks` (in the order given).
///
/// `neighbors[q]` lists the items nearest to `q`, best first, without `q` itself (an error
/// otherwise). A list shorter than K — e.g. an approximate search that returned fewer items —
/// is scored on what it holds: the missing positions count as misses.
///
/// For K = 1 this equals Precision@1 (PML's `precision_at_1`).
pub fn recall_at_k(neighbors: &[Vec<u32>], labels: &[u32], ks: &[usize]) -> Result<Vec<(usize, f64)>> {
    check_lists(neighbors, labels)?;
    if let Some(&bad) = ks.iter().find(|&&k| k == 0) {
        return Err(Error::Invalid(format!("Recall@{bad} is undefined; K must be at least 1")));
    }
    // 1-based rank of each query's first same-class neighbour; usize::MAX when none is listed.
    let first_hit: Vec<usize> = neighbors
        .par_iter()
        .enumerate()
        .map(|(q, list)| {
            list.iter().position(|&j| labels[j as usize] == labels[q]).map_or(usize::MAX, |p| p + 1)
        })
        .collect();
    let n = labels.len() as f64;
    Ok(ks
        .iter()
        .map(|&k| (k, first_hit.iter().filter(|&&rank| rank <= k).count() as f64 / n))
        .collect())
}

/// MAP@R and R-Precision as defined by Musgrave et al. 2020, "A Metric Learning Reality Check".
///
/// For query `q`, R = the number of *other* items sharing its label, rel(i) = 1 when the i-th
/// neighbour shares it, P(i) = (same-class among the first i)/i. Then
/// R-Precision = (same-class among the first R)/R and MAP@R = (1/R) Σ_{i≤R} P(i)·rel(i);
/// both are averaged over the queries. Returns `(MAP@R, R-Precision)`.
///
/// * Queries with R = 0 (the only item of their class) have no relevant item and are skipped,
///   as in PML; an error is returned if *every* query is such a singleton.
/// * Lists must hold at least R neighbours to be scored fully; a shorter list is scored as if
///   its missing positions were misses (which can only lower the result), so callers should ask
///   their search for at least the largest R.
pub fn map_at_r(neighbors: &[Vec<u32>], labels: &[u32]) -> Result<(f64, f64)> {
    check_lists(neighbors, labels)?;
    let counts = class_counts(labels);
    let per_query: Vec<Option<(f64, f64)>> = neighbors
        .par_iter()
        .enumerate()
        .map(|(q, list)| {
            let r = counts[&labels[q]] - 1;
            if r == 0 {
                return None;
            }
            let (mut hits, mut ap) = (0usize, 0.0f64);
            for (i, &j) in list.iter().take(r).enumerate() {
                if labels[j as usize] == labels[q] {
                    hits += 1;
                    ap += hits as f64 / (i + 1) as f64;
                }
            }
            Some((ap / r as f64, hits as f64 / r as f64))
        })
        .collect();
    let scored: Vec<(f64, f64)> = per_query.into_iter().flatten().collect();
    if scored.is_empty() {
        return Err(Error::Invalid(
            "MAP@R is undefined: every item is the only one of its class (R = 0 for all queries)".into(),
        ));
    }
    let m = scored.len() as f64;
    Ok((scored.iter().map(|s| s.0).sum::<f64>() / m, scored.iter().map(|s| s.1).sum::<f64>() / m))
}

/// Number of items of each label.
pub(super) fn class_counts(labels: &[u32]) -> HashMap<u32, usize> {
    let mut counts = HashMap::new();
    for &l in labels {
        *counts.entry(l).or_insert(0) += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn recall_counts_a_hit_at_rank_k_but_not_at_k_plus_1() {
        // Query 0 (label 0) has its only same-class item (index 8) at rank 8 exactly;
        // the rank-9 item is irrelevant to it.
        let labels = [0, 1, 1, 1, 1, 1, 1, 1, 0, 1];
        let mut neighbors: Vec<Vec<u32>> = (0..10u32).map(|q| (0..10).filter(|&j| j != q).collect()).collect();
        neighbors[0] = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        // Query 8 (label 0): its class mate 0 at rank 9 — a hit at K = 9 only.
        neighbors[8] = vec![1, 2, 3, 4, 5, 6, 7, 9, 0];
        // Every other query q (label 1) has the default list "all items but q, by index", which
        // starts with item 0 (label 0) and then a label-1 item: first hit at rank 2.
        // So R@1 = 0; R@2 = R@7 = 8/10 (queries 0 and 8 miss); R@8 = 9/10 (query 0 hits at
        // exactly rank 8); R@9 = 10/10 (query 8 hits at rank 9). An off-by-one in either
        // direction changes R@7, R@8 or R@9.
        let r = recall_at_k(&neighbors, &labels, &[1, 2, 7, 8, 9]).unwrap();
        assert_eq!(r.iter().map(|x| x.0).collect::<Vec<_>>(), vec![1, 2, 7, 8, 9]);
        let want = [0.0, 0.8, 0.8, 0.9, 1.0];
        for ((_, got), want) in r.iter().zip(want) {
            assert!(close(*got, want), "{r:?}");
        }
    }

    #[test]
    fn recall_hand_computed_small_case() {
        // Labels: a a b b   (items 0..3)
        // q0: [2, 1, 3] → first same-class (1) at rank 2
        // q1: [0, 2, 3] → rank 1
        // q2: [0, 1, 3] → rank 3
        // q3: [0, 1, 2] → rank 3
        // R@1 = 1/4, R@2 = 2/4, R@4 = 4/4 (lists are only 3 long; rank 3 ≤ 4).
        let labels = [7, 7, 9, 9];
        let nb = vec![vec![2, 1, 3], vec![0, 2, 3], vec![0, 1, 3], vec![0, 1, 2]];
        let r = recall_at_k(&nb, &labels, &[1, 2, 4]).unwrap();
        assert_eq!(r, vec![(1, 0.25), (2, 0.5), (4, 1.0)]);
    }

    #[test]
    fn short_lists_count_missing_positions_as_misses() {
        // q0's list stops before its class mate could appear: a miss at every K.
        let labels = [0, 0, 1];
        let nb = vec![vec![2], vec![0, 2], vec![0, 1]];
        let r = recall_at_k(&nb, &labels, &[1, 2]).unwrap();
        // q0 miss; q1 hit at 1; q2 (singleton class) never hits.
        assert_eq!(r, vec![(1, 1.0 / 3.0), (2, 1.0 / 3.0)]);
        // MAP@R: q0 R=1, list [2] → 0; q1 R=1, [0] → 1; q2 R=0 skipped. MAP@R = RP = 0.5.
        assert_eq!(map_at_r(&nb, &labels).unwrap(), (0.5, 0.5));
        // An empty list is all misses too.
        let nb = vec![vec![], vec![0, 2], vec![0, 1]];
        assert_eq!(map_at_r(&nb, &labels).unwrap(), (0.5, 0.5));
    }

    #[test]
    fn map_at_r_hand_computed() {
        // Musgrave et al.'s own example: R = 3 (four items of class 0), a query whose first
        // R neighbours are [rel, irrel, rel] gets MAP@R = (1/3)(1/1 + 2/3) = 5/9 and
        // R-Precision = 2/3.
        // Items: 0..3 class 0, 4..5 class 1.
        let labels = [0, 0, 0, 0, 1, 1];
        let nb = vec![
            vec![1, 4, 2, 3, 5], // q0, R=3: rel,irrel,rel → AP = (1 + 2/3)/3 = 5/9, RP = 2/3
            vec![0, 2, 3, 4, 5], // q1, R=3: all rel → AP = 1, RP = 1
            vec![4, 5, 0, 1, 3], // q2, R=3: irrel,irrel,rel → AP = (1/3)/3 = 1/9, RP = 1/3
            vec![4, 5, 1, 0, 2], // q3, R=3: irrel,irrel,rel → AP = 1/9, RP = 1/3
            vec![0, 5, 1, 2, 3], // q4, R=1: irrel (its mate 5 is at rank 2 = R+1) → 0, 0
            vec![4, 0, 1, 2, 3], // q5, R=1: rel → AP = 1, RP = 1
        ];
        let (map, rp) = map_at_r(&nb, &labels).unwrap();
        // MAP@R = (5/9 + 1 + 1/9 + 1/9 + 0 + 1)/6 = (25/9)/6 = 25/54
        // RP    = (2/3 + 1 + 1/3 + 1/3 + 0 + 1)/6 = (10/3)/6 = 10/18 = 5/9
        assert!(close(map, 25.0 / 54.0), "{map}");
        assert!(close(rp, 5.0 / 9.0), "{rp}");
        // Only the first R positions matter: moving q4's mate from rank R+1 to the end of the
        // list changes nothing.
        let mut nb2 = nb.clone();
        nb2[4] = vec![0, 1, 2, 3, 5];
        assert_eq!(map_at_r(&nb2, &labels).unwrap(), (map, rp));
    }

    #[test]
    fn map_at_r_differs_from_r_precision_on_order() {
        // Same hits in the first R, different positions: R-Precision equal, MAP@R not.
        // Items 0..2 class 0 (R = 2 each), 3..4 class 1.
        let labels = [0, 0, 0, 1, 1];
        let early = vec![vec![1, 3, 2, 4], vec![0, 2, 3, 4], vec![0, 1, 3, 4], vec![4, 0, 1, 2], vec![3, 0, 1, 2]];
        let mut late = early.clone();
        late[0] = vec![3, 1, 2, 4];
        // q0 early: [rel, irrel] → AP = 1/2, RP = 1/2; late: [irrel, rel] → AP = (1/2)/2 = 1/4.
        let (m1, r1) = map_at_r(&early, &labels).unwrap();
        let (m2, r2) = map_at_r(&late, &labels).unwrap();
        assert!(close(r1, r2));
        assert!(close(m1 - m2, 0.25 / 5.0), "{m1} {m2}");
    }

    #[test]
    fn singleton_classes_are_skipped() {
        // Item 2 is alone in class 5; it is not averaged in. q0, q1 each hit at rank 1 → 1.0.
        let labels = [1, 1, 5];
        let nb = vec![vec![1, 2], vec![0, 2], vec![0, 1]];
        assert_eq!(map_at_r(&nb, &labels).unwrap(), (1.0, 1.0));
        let err = map_at_r(&[vec![1], vec![0]], &[1, 2]).unwrap_err().to_string();
        assert!(err.contains("R = 0"), "{err}");
    }

    #[test]
    fn malformed_lists_are_rejected_with_the_reason() {
        let labels = [0, 0];
        let e = recall_at_k(&[vec![1]], &labels, &[1]).unwrap_err().to_string();
        assert!(e.contains("1 neighbour lists for 2 labels"), "{e}");
        let e = recall_at_k(&[vec![1], vec![1]], &labels, &[1]).unwrap_err().to_string();
        assert!(e.contains("query 1 contains the query itself"), "{e}");
        let e = map_at_r(&[vec![5], vec![0]], &labels).unwrap_err().to_string();
        assert!(e.contains("names item 5"), "{e}");
        let e = recall_at_k(&[vec![1], vec![0]], &labels, &[0]).unwrap_err().to_string();
        assert!(e.contains("Recall@0"), "{e}");
        assert!(recall_at_k(&[], &[], &[1]).is_err());
    }
}
