//! Hard-class batches: P×K batches whose classes come in groups of near neighbours in the
//! current metric.
//!
//! A pair loss only learns from the negatives in its batch. With P = 16 classes drawn at
//! random out of hundreds, most batches hold no class the metric still confuses with
//! another, so losses that mine within the batch (the seed's fuzzy loss above all: it only
//! looks at negatives nearer than the nearest positive) see few violations and stop
//! learning long before the metric is good. Grouping each batch's classes with their nearest
//! classes puts those negatives in the batch (stochastic class-based hard mining, Suh et
//! al. CVPR 2019; "doppelganger" mining, Smirnov et al. 2018).
//!
//! The class centroids come for free from the training steps themselves: every batch's
//! embeddings replace the centroid of each class it holds (the most recent one, since the
//! metric moves under training: older embeddings drift, which is what made a cross-batch
//! memory hurt here). A class not yet seen has no centroid and is grouped at random.

use std::collections::HashMap;

/// The latest mean embedding of each class, indexed like the sampler's classes.
#[derive(Debug, Clone)]
pub struct ClassCentroids {
    index: HashMap<u32, usize>,
    /// The embedding size, set by the first update.
    dim: usize,
    /// `classes × dim`, each row L2-normalised, valid where `seen`.
    rows: Vec<f32>,
    seen: Vec<bool>,
}

impl ClassCentroids {
    /// `labels` in the sampler's class order ([`super::PkSampler::class_labels`]).
    pub fn new(labels: &[u32]) -> Self {
        Self {
            index: labels.iter().enumerate().map(|(i, &l)| (l, i)).collect(),
            dim: 0,
            rows: Vec::new(),
            seen: vec![false; labels.len()],
        }
    }

    /// Replaces the centroid of every class in a batch by the mean of its rows of `emb`
    /// (`labels.len()` rows, row-major). Labels the sampler does not know are ignored.
    pub fn update(&mut self, emb: &[f32], labels: &[u32]) {
        if labels.is_empty() || !emb.len().is_multiple_of(labels.len()) {
            return;
        }
        if self.dim == 0 {
            self.dim = emb.len() / labels.len();
            self.rows = vec![0.0; self.seen.len() * self.dim];
        }
        let d = self.dim;
        if emb.len() != labels.len() * d {
            return;
        }
        let mut sums: HashMap<usize, Vec<f32>> = HashMap::new();
        for (row, l) in emb.chunks_exact(d).zip(labels) {
            let Some(&c) = self.index.get(l) else {
                continue;
            };
            let s = sums.entry(c).or_insert_with(|| vec![0.0; d]);
            for (a, b) in s.iter_mut().zip(row) {
                *a += b;
            }
        }
        for (c, s) in sums {
            let norm = s.iter().map(|v| v * v).sum::<f32>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                continue;
            }
            for (dst, v) in self.rows[c * d..(c + 1) * d].iter_mut().zip(&s) {
                *dst = v / norm;
            }
            self.seen[c] = true;
        }
    }

    /// How many classes have a centroid.
    #[cfg(test)]
    fn known(&self) -> usize {
        self.seen.iter().filter(|&&s| s).count()
    }

    fn row(&self, c: usize) -> Option<&[f32]> {
        self.seen[c].then(|| &self.rows[c * self.dim..(c + 1) * self.dim])
    }

    /// Reorders the (shuffled) class `order` into consecutive groups of `group` classes:
    /// each group is the next unplaced class in `order` and its `group − 1` nearest unplaced
    /// classes by centroid (cosine), looked for among the next [`CANDIDATES`] unplaced ones so
    /// that a pass stays linear in the classes. Classes without a centroid, and seeds without
    /// one, take the next unplaced classes in `order`, as random P×K sampling would.
    pub fn group(&self, order: &[usize], group: usize) -> Vec<usize> {
        let n = order.len();
        if group <= 1 {
            return order.to_vec();
        }
        let mut placed = vec![false; self.seen.len()];
        let mut out = Vec::with_capacity(n);
        let mut cursor = 0;
        while out.len() < n {
            while placed[order[cursor]] {
                cursor += 1;
            }
            let seed = order[cursor];
            placed[seed] = true;
            out.push(seed);
            let want = (group - 1).min(n - out.len());
            let mut near: Vec<(f32, usize)> = Vec::with_capacity(want + 1);
            if let Some(s) = self.row(seed) {
                for &c in order[cursor + 1..]
                    .iter()
                    .filter(|&&c| !placed[c])
                    .take(CANDIDATES)
                {
                    let Some(r) = self.row(c) else { continue };
                    let sim: f32 = s.iter().zip(r).map(|(a, b)| a * b).sum();
                    if near.len() < want || near.last().is_some_and(|&(w, _)| sim > w) {
                        let at = near.partition_point(|&(v, _)| v >= sim);
                        near.insert(at, (sim, c));
                        near.truncate(want);
                    }
                }
            }
            let mut need = want - near.len();
            for (_, c) in near {
                placed[c] = true;
                out.push(c);
            }
            // Fill up what the centroids could not (unseen classes) in shuffled order.
            for &c in &order[cursor + 1..] {
                if need == 0 {
                    break;
                }
                if !placed[c] {
                    placed[c] = true;
                    out.push(c);
                    need -= 1;
                }
            }
        }
        out
    }
}

/// How many unplaced classes a group's seed is compared with (SOP's 11,318 classes would
/// otherwise cost a quadratic pass).
pub const CANDIDATES: usize = 1024;

#[cfg(test)]
mod tests {
    use super::*;

    /// 12 classes (labels 10, 20, …) in three tight clusters of four along the axes of a
    /// 3-d space: class c lies near axis c % 3.
    fn clustered() -> ClassCentroids {
        let labels: Vec<u32> = (1..=12).map(|c| c * 10).collect();
        let mut cents = ClassCentroids::new(&labels);
        for (c, &l) in labels.iter().enumerate() {
            let mut v = [0.1f32 * (c as f32 / 12.0); 3];
            v[c % 3] = 1.0;
            // Two rows per class, as a batch holds K images: the centroid is their mean.
            let emb: Vec<f32> = v.iter().chain(v.iter()).map(|x| x * 2.0).collect();
            cents.update(&emb, &[l, l]);
        }
        cents
    }

    #[test]
    fn groups_hold_near_classes_and_every_class_once() {
        let cents = clustered();
        assert_eq!(cents.known(), 12);
        let order = [7, 0, 11, 4, 2, 9, 5, 1, 10, 3, 8, 6];
        let out = cents.group(&order, 4);
        let mut sorted = out.clone();
        sorted.sort();
        assert_eq!(sorted, (0..12).collect::<Vec<_>>(), "a permutation");
        for g in out.chunks(4) {
            assert!(
                g.iter().all(|c| c % 3 == g[0] % 3),
                "one cluster per group: {out:?}"
            );
        }
        assert_eq!(out[0], 7, "groups start at the shuffled order's next class");
        assert_eq!(cents.group(&order, 1), order.to_vec());
    }

    #[test]
    fn unseen_classes_fill_groups_in_the_given_order() {
        let labels: Vec<u32> = (0..6).collect();
        let mut cents = ClassCentroids::new(&labels);
        // Only classes 0 and 3 have centroids (identical ones); 99 is not a sampler class.
        cents.update(&[1.0, 0.0, 1.0, 0.0, 5.0, 5.0], &[0, 3, 99]);
        assert_eq!(cents.known(), 2);
        let out = cents.group(&[0, 1, 2, 3, 4, 5], 2);
        assert_eq!(out, vec![0, 3, 1, 2, 4, 5]);
        // A group size that does not divide the classes: the last group is short.
        let out = cents.group(&[5, 4, 3, 2, 1, 0], 4);
        assert_eq!(out, vec![5, 4, 3, 2, 1, 0]);
        let out = cents.group(&[3, 5, 4, 2, 1, 0], 4);
        assert_eq!(out, vec![3, 0, 5, 4, 2, 1]);
    }

    #[test]
    fn a_centroid_is_the_latest_batch_mean_normalised() {
        let mut cents = ClassCentroids::new(&[1, 2]);
        cents.update(&[3.0, 0.0, 0.0, 4.0], &[1, 1]);
        assert_eq!(cents.row(0).unwrap(), &[0.6, 0.8]);
        assert!(cents.row(1).is_none());
        cents.update(&[0.0, 2.0], &[1]);
        assert_eq!(cents.row(0).unwrap(), &[0.0, 1.0], "replaced, not averaged");
        // A zero or non-finite mean leaves the centroid as it was.
        cents.update(&[f32::NAN, 0.0], &[1]);
        assert_eq!(cents.row(0).unwrap(), &[0.0, 1.0]);
    }
}
