//! The full evaluation protocol on a test split, and its report (JSON and Markdown).

use serde_json::{Map, Value};

use super::retrieval::class_counts;
use super::{kmeans_pp, knn_exact, map_at_r, nmi, recall_at_k, rows};
use crate::error::{Error, Result};

/// Lloyd iterations allowed to the NMI clustering. k-means on embeddings of a few thousand
/// points converges in a few dozen iterations; the cap only bounds pathological cases.
pub const KMEANS_MAX_ITER: usize = 100;

/// The paper metrics of one evaluation. Values are fractions in [0, 1].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RetrievalMetrics {
    /// `(K, Recall@K)` in the order the Ks were requested.
    pub recall: Vec<(usize, f64)>,
    /// NMI of k-means (k = number of classes) against the labels; `None` when not computed
    /// (e.g. metrics scored from an index's neighbour lists only).
    pub nmi: Option<f64>,
    pub map_at_r: f64,
    pub r_precision: f64,
}

impl RetrievalMetrics {
    /// Scores neighbour lists (exact or approximate; see [`recall_at_k`] and [`map_at_r`] for
    /// their contract) without NMI, which needs the vectors. Lists should hold at least
    /// `max(max ks, largest class size − 1)` neighbours, or the missing ones count as misses.
    pub fn from_neighbors(neighbors: &[Vec<u32>], labels: &[u32], ks: &[usize]) -> Result<Self> {
        let recall = recall_at_k(neighbors, labels, ks)?;
        let (map_at_r, r_precision) = map_at_r(neighbors, labels)?;
        Ok(Self { recall, nmi: None, map_at_r, r_precision })
    }

    /// Recall at `k`, if it was computed.
    pub fn recall_at(&self, k: usize) -> Option<f64> {
        self.recall.iter().find(|(kk, _)| *kk == k).map(|(_, r)| *r)
    }

    /// Flat JSON object: `"recall@1"`, `"recall@2"`, … (one per K, in order), `"nmi"` (`null`
    /// when not computed), `"map@r"`, `"r_precision"`; values are fractions.
    pub fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        for &(k, r) in &self.recall {
            m.insert(format!("recall@{k}"), Value::from(r));
        }
        m.insert("nmi".into(), self.nmi.map_or(Value::Null, Value::from));
        m.insert("map@r".into(), Value::from(self.map_at_r));
        m.insert("r_precision".into(), Value::from(self.r_precision));
        m
    }

    /// A one-row Markdown table in percent, two decimals — the way the papers print them
    /// (see the published figures in `docs/protocol.md`). NMI shows `–` when not computed.
    pub fn table(&self) -> String {
        let pct = |v: f64| format!("{:.2}", 100.0 * v);
        let mut head: Vec<String> = self.recall.iter().map(|(k, _)| format!("R@{k}")).collect();
        let mut row: Vec<String> = self.recall.iter().map(|(_, r)| pct(*r)).collect();
        head.extend(["NMI", "MAP@R", "RP"].map(String::from));
        row.push(self.nmi.map_or("–".into(), pct));
        row.push(pct(self.map_at_r));
        row.push(pct(self.r_precision));
        let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
        let rule = vec!["---:".to_string(); head.len()];
        format!("{}{}{}", line(&head), line(&rule), line(&row))
    }
}

/// Runs the evaluation protocol on a test split whose rows are both queries and gallery:
/// exact kNN with k = max(max `ks`, largest R) so that every metric sees complete lists,
/// Recall@K for `ks`, MAP@R, R-Precision, and NMI of k-means (k = number of distinct labels,
/// seeded with `seed`).
///
/// `data` is row-major `labels.len() × dim`, L2-normalised (see [`knn_exact`]).
pub fn evaluate(data: &[f32], dim: usize, labels: &[u32], ks: &[usize], seed: u64) -> Result<RetrievalMetrics> {
    let mut metrics = evaluate_retrieval(data, dim, labels, ks)?;
    let classes = class_counts(labels).len();
    let clusters = kmeans_pp(data, dim, classes, seed, KMEANS_MAX_ITER)?;
    metrics.nmi = Some(nmi(&clusters, labels)?);
    Ok(metrics)
}

/// [`evaluate`] without NMI: exact kNN and the retrieval metrics only.
///
/// NMI's k-means costs O(n · #classes · dim) per Lloyd iteration, which is negligible for CUB or
/// Cars (~100 classes) but dominates on SOP (11,316 classes, 60,000 images): use this there when
/// NMI is not needed (e.g. for model selection during training).
pub fn evaluate_retrieval(data: &[f32], dim: usize, labels: &[u32], ks: &[usize]) -> Result<RetrievalMetrics> {
    let n = rows(data, dim)?;
    if n != labels.len() {
        return Err(Error::Invalid(format!("{n} embeddings but {} labels", labels.len())));
    }
    if ks.is_empty() {
        return Err(Error::Invalid("no Recall@K requested (empty K list)".into()));
    }
    let max_r = class_counts(labels).values().max().map_or(0, |c| c - 1);
    let k = ks.iter().copied().max().unwrap_or(1).max(max_r);
    let neighbors = knn_exact(data, dim, k)?;
    RetrievalMetrics::from_neighbors(&neighbors, labels, ks)
}

/// The Recall@K cut-offs the papers report: 1, 10, 100, 1000 on Stanford Online Products,
/// 1, 2, 4, 8 on CUB-200 and Cars-196.
pub fn default_ks(dataset_is_sop: bool) -> &'static [usize] {
    if dataset_is_sop {
        &[1, 10, 100, 1000]
    } else {
        &[1, 2, 4, 8]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn json_keys_and_table() {
        let m = RetrievalMetrics { recall: vec![(1, 0.5), (2, 0.75)], nmi: None, map_at_r: 0.25, r_precision: 0.3 };
        let j = m.to_json();
        let keys: Vec<&str> = j.keys().map(String::as_str).collect();
        for key in ["recall@1", "recall@2", "nmi", "map@r", "r_precision"] {
            assert!(keys.contains(&key), "{keys:?}");
        }
        assert_eq!(j.len(), 5);
        assert_eq!(j["recall@2"], Value::from(0.75));
        assert_eq!(j["nmi"], Value::Null);
        assert_eq!(
            m.table(),
            "| R@1 | R@2 | NMI | MAP@R | RP |\n| ---: | ---: | ---: | ---: | ---: |\n| 50.00 | 75.00 | – | 25.00 | 30.00 |\n"
        );
        let m = RetrievalMetrics { nmi: Some(0.123456), ..m };
        assert_eq!(m.to_json()["nmi"], Value::from(0.123456));
        assert!(m.table().contains("| 12.35 |"));
        assert_eq!(m.recall_at(2), Some(0.75));
        assert_eq!(m.recall_at(4), None);
    }

    #[test]
    fn default_ks_follow_the_papers() {
        assert_eq!(default_ks(true), &[1, 10, 100, 1000]);
        assert_eq!(default_ks(false), &[1, 2, 4, 8]);
    }

    /// `classes` tight clusters of `per` unit vectors each, around random directions.
    fn clustered(classes: usize, per: usize, dim: usize, noise: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let centres: Vec<Vec<f32>> =
            (0..classes).map(|_| (0..dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect()).collect();
        let (mut data, mut labels) = (Vec::new(), Vec::new());
        for i in 0..classes * per {
            let c = i % classes;
            let mut v: Vec<f32> = centres[c].iter().map(|&x| x + rng.gen_range(-noise..noise)).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter_mut().for_each(|x| *x /= norm);
            data.extend(v);
            labels.push(c as u32);
        }
        (data, labels)
    }

    #[test]
    fn perfectly_separable_split_scores_one_everywhere() {
        let (data, labels) = clustered(8, 10, 16, 0.02, 5);
        let m = evaluate(&data, 16, &labels, &[1, 2, 4, 8], 0).unwrap();
        for (k, r) in &m.recall {
            assert_eq!(*r, 1.0, "R@{k}");
        }
        assert_eq!(m.map_at_r, 1.0);
        assert_eq!(m.r_precision, 1.0);
        assert_eq!(m.nmi, Some(1.0));
    }

    #[test]
    fn evaluate_agrees_with_the_parts() {
        // Overlapping classes, so nothing is trivially 1.
        let (data, labels) = clustered(6, 12, 8, 1.5, 6);
        let ks = [1, 2, 4, 8];
        let m = evaluate(&data, 8, &labels, &ks, 3).unwrap();
        // Largest R is 11 > 8: evaluate must search deep enough for MAP@R.
        let nb = knn_exact(&data, 8, 11).unwrap();
        assert_eq!(m.recall, recall_at_k(&nb, &labels, &ks).unwrap());
        assert_eq!((m.map_at_r, m.r_precision), map_at_r(&nb, &labels).unwrap());
        let clusters = kmeans_pp(&data, 8, 6, 3, KMEANS_MAX_ITER).unwrap();
        assert_eq!(m.nmi, Some(nmi(&clusters, &labels).unwrap()));
        assert!(m.recall[0].1 < 1.0 && m.map_at_r < 1.0, "{m:?}");
        // Recall@K is non-decreasing in K.
        assert!(m.recall.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn evaluate_rejects_inconsistent_inputs() {
        let e = evaluate(&[1.0, 0.0, 0.0, 1.0], 2, &[0], &[1], 0).unwrap_err().to_string();
        assert!(e.contains("2 embeddings but 1 labels"), "{e}");
        assert!(evaluate(&[1.0, 0.0, 0.0, 1.0], 2, &[0, 0], &[], 0).is_err());
    }

    /// Times exact search, scoring and the full `evaluate` on synthetic clustered unit vectors.
    fn bench(n: usize, dim: usize, classes: usize, ks: &[usize]) {
        use std::time::Instant;
        let (data, labels) = clustered(classes, n.div_ceil(classes), dim, 2.0, 1);
        let (data, labels) = (&data[..n * dim], &labels[..n]);
        let k = ks.iter().copied().max().unwrap();
        let t = Instant::now();
        let nb = knn_exact(data, dim, k).unwrap();
        let t_knn = t.elapsed();
        let t = Instant::now();
        let m = RetrievalMetrics::from_neighbors(&nb, labels, ks).unwrap();
        let t_score = t.elapsed();
        drop(nb);
        let t = Instant::now();
        let full = evaluate(data, dim, labels, ks, 0).unwrap();
        let t_eval = t.elapsed();
        assert_eq!(full.recall, m.recall);
        eprintln!(
            "{n} x {dim}, k = {k}: knn_exact {t_knn:.2?}, scoring {t_score:.2?}; \
             evaluate (kNN + scoring + k-means with {classes} clusters + NMI) {t_eval:.2?}\n{}",
            full.table()
        );
    }

    /// CUB-sized timing (run with `--ignored --nocapture`).
    #[test]
    #[ignore = "benchmark"]
    fn bench_cub_sized() {
        bench(2_903, 1280, 50, default_ks(false));
    }

    /// SOP-sized timing (run with `--ignored --nocapture`): several minutes on 2 cores, so the
    /// k-means part is timed as seeding + one assignment (`max_iter = 0`) and one more Lloyd
    /// iteration rather than run to convergence.
    #[test]
    #[ignore = "benchmark: minutes"]
    fn bench_sop_sized() {
        use std::time::Instant;
        let (n, dim, classes, ks) = (60_000usize, 512usize, 11_316usize, default_ks(true));
        let (data, labels) = clustered(classes, n.div_ceil(classes), dim, 6.0, 1);
        let (data, labels) = (&data[..n * dim], &labels[..n]);
        let t = Instant::now();
        let m = evaluate_retrieval(data, dim, labels, ks).unwrap();
        eprintln!("{n} x {dim}, k = 1000: evaluate_retrieval (knn_exact + scoring) {:.2?}", t.elapsed());
        eprintln!("{}", m.table());
        let t = Instant::now();
        kmeans_pp(data, dim, classes, 0, 0).unwrap();
        let t0 = t.elapsed();
        let t = Instant::now();
        kmeans_pp(data, dim, classes, 0, 1).unwrap();
        let t1 = t.elapsed();
        eprintln!("k-means, {classes} clusters: seeding + 1 assignment {t0:.2?}; + 1 Lloyd iteration {t1:.2?}");
    }
}
