//! P×K batch sampling: every batch holds P distinct classes with K images each, so every
//! anchor has positives and negatives in the batch (what pair/triplet losses need).
//!
//! An epoch is one pass over the classes: the classes are shuffled and cut into
//! ⌈#classes / P⌉ batches; a last, short group is topped up with other classes drawn at
//! random, so every batch has exactly P·K images and every class appears at least once per
//! epoch. (This is the seed's "epoch of #classes × K images"; an epoch therefore covers
//! about #classes·K images, not the whole split.)
//!
//! Each appearance of a class draws K of its images without replacement; a class with fewer
//! than K images contributes all of them and tops up with random repeats (sampling with
//! replacement, but never dropping an image it has).
//!
//! Batches depend only on (labels, P, K, seed, epoch): [`PkSampler::epoch`] can be called
//! in any order, e.g. when training resumes at epoch 37.

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::class_mining::ClassCentroids;
use crate::error::{Error, Result};

#[derive(Debug, Clone)]
pub struct PkSampler {
    /// Sample indices of each class, classes in label order.
    classes: Vec<Vec<usize>>,
    /// The label of each class, ascending.
    labels: Vec<u32>,
    p: usize,
    k: usize,
    seed: u64,
}

impl PkSampler {
    /// `labels[i]` is the label of sample `i`; labels need not be dense.
    pub fn new(
        labels: &[u32],
        classes_per_batch: usize,
        images_per_class: usize,
        seed: u64,
    ) -> Result<Self> {
        if classes_per_batch == 0 || images_per_class == 0 {
            return Err(Error::Invalid(format!(
                "P×K sampling needs P ≥ 1 classes and K ≥ 1 images per class, got P = {classes_per_batch}, K = {images_per_class}"
            )));
        }
        let mut by_label: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
        for (i, &l) in labels.iter().enumerate() {
            by_label.entry(l).or_default().push(i);
        }
        if by_label.len() < classes_per_batch {
            return Err(Error::Invalid(format!(
                "P×K sampling with P = {classes_per_batch} classes per batch, but the data has only {} classes; \
                 lower the classes per batch",
                by_label.len()
            )));
        }
        Ok(Self {
            labels: by_label.keys().copied().collect(),
            classes: by_label.into_values().collect(),
            p: classes_per_batch,
            k: images_per_class,
            seed,
        })
    }

    pub fn classes_per_batch(&self) -> usize {
        self.p
    }
    pub fn images_per_class(&self) -> usize {
        self.k
    }
    pub fn batch_size(&self) -> usize {
        self.p * self.k
    }
    pub fn num_classes(&self) -> usize {
        self.classes.len()
    }
    /// The label of each class, in the order [`ClassCentroids`] indexes them.
    pub fn class_labels(&self) -> &[u32] {
        &self.labels
    }
    /// ⌈#classes / P⌉.
    pub fn batches_per_epoch(&self) -> usize {
        self.classes.len().div_ceil(self.p)
    }

    /// The batches of `epoch`, each a list of P·K sample indices (K consecutive per class).
    pub fn epoch(&self, epoch: u64) -> Vec<Vec<usize>> {
        self.epoch_grouped(epoch, None)
    }

    /// [`Self::epoch`] with the shuffled classes regrouped `near.1` at a time by the
    /// centroids `near.0` (see [`ClassCentroids::group`]), so each batch holds groups of
    /// classes the metric finds alike. With `None`, or groups of one, the same as `epoch`.
    pub fn epoch_grouped(
        &self,
        epoch: u64,
        near: Option<(&ClassCentroids, usize)>,
    ) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        let mut order: Vec<usize> = (0..self.classes.len()).collect();
        order.shuffle(&mut rng);
        if let Some((centroids, group)) = near {
            order = centroids.group(&order, group);
        }
        let mut batches = Vec::with_capacity(self.batches_per_epoch());
        for start in (0..order.len()).step_by(self.p) {
            let mut group: Vec<usize> = order[start..(start + self.p).min(order.len())].to_vec();
            if group.len() < self.p {
                // Top up with distinct classes from earlier groups (there are enough: C ≥ P).
                let extra = rand::seq::index::sample(&mut rng, start, self.p - group.len());
                group.extend(extra.into_iter().map(|i| order[i]));
            }
            let mut batch = Vec::with_capacity(self.batch_size());
            for c in group {
                self.draw(&self.classes[c], &mut rng, &mut batch);
            }
            batches.push(batch);
        }
        batches
    }

    /// Appends K images of one class.
    fn draw(&self, members: &[usize], rng: &mut ChaCha8Rng, out: &mut Vec<usize>) {
        let n = members.len();
        if n >= self.k {
            out.extend(
                rand::seq::index::sample(rng, n, self.k)
                    .into_iter()
                    .map(|i| members[i]),
            );
        } else {
            let start = out.len();
            out.extend_from_slice(members);
            out[start..].shuffle(rng);
            out.extend((n..self.k).map(|_| members[rng.gen_range(0..n)]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// 13 classes with 1..=13 images: class c has c + 1 images.
    fn labels() -> Vec<u32> {
        (0..13u32)
            .flat_map(|c| std::iter::repeat_n(c * 10, c as usize + 1))
            .collect()
    }

    #[test]
    fn batches_have_p_distinct_classes_with_k_images_each() {
        let labels = labels();
        let s = PkSampler::new(&labels, 4, 5, 42).unwrap();
        assert_eq!(s.batches_per_epoch(), 4); // ⌈13 / 4⌉
        for epoch in 0..20 {
            let batches = s.epoch(epoch);
            assert_eq!(batches.len(), 4);
            let mut seen_classes = HashSet::new();
            for b in &batches {
                assert_eq!(b.len(), 20);
                let mut per_class: HashMap<u32, Vec<usize>> = HashMap::new();
                for &i in b {
                    per_class.entry(labels[i]).or_default().push(i);
                }
                assert_eq!(per_class.len(), 4, "P distinct classes");
                for (label, members) in per_class {
                    seen_classes.insert(label);
                    assert_eq!(members.len(), 5, "K images of class {label}");
                    let distinct: HashSet<_> = members.iter().collect();
                    let available = labels.iter().filter(|&&l| l == label).count();
                    // Without replacement when the class is big enough; otherwise every image
                    // of the class, plus repeats.
                    assert_eq!(
                        distinct.len(),
                        available.min(5),
                        "class {label} with {available} images"
                    );
                }
            }
            assert_eq!(seen_classes.len(), 13, "every class appears in every epoch");
        }
    }

    #[test]
    fn reproducible_by_seed_and_epoch() {
        let labels = labels();
        let a = PkSampler::new(&labels, 3, 2, 7).unwrap();
        let b = PkSampler::new(&labels, 3, 2, 7).unwrap();
        assert_eq!(a.epoch(5), b.epoch(5));
        assert_eq!(
            a.epoch(5),
            a.epoch(5),
            "epochs can be replayed in any order"
        );
        assert_ne!(a.epoch(5), a.epoch(6));
        assert_ne!(
            a.epoch(5),
            PkSampler::new(&labels, 3, 2, 8).unwrap().epoch(5)
        );
    }

    #[test]
    fn images_of_big_classes_are_all_used_over_epochs() {
        let labels = labels();
        let s = PkSampler::new(&labels, 13, 2, 1).unwrap();
        let used: HashSet<usize> = (0..200).flat_map(|e| s.epoch(e)).flatten().collect();
        assert_eq!(used.len(), labels.len());
    }

    #[test]
    fn grouped_epochs_keep_p_by_k_and_put_near_classes_together() {
        // 12 classes of 3 images; class c's centroid points along axis c % 3, so the classes
        // form three clusters of four.
        let labels: Vec<u32> = (0..12u32).flat_map(|c| [c * 10; 3]).collect();
        let s = PkSampler::new(&labels, 4, 2, 3).unwrap();
        let mut cents = ClassCentroids::new(s.class_labels());
        assert_eq!(
            s.epoch_grouped(2, Some((&cents, 4))),
            s.epoch(2),
            "no centroids yet"
        );
        for (c, &l) in s.class_labels().iter().enumerate() {
            let mut v = [0.0f32; 3];
            v[c % 3] = 1.0;
            cents.update(&v, &[l]);
        }
        for epoch in 0..10 {
            let batches = s.epoch_grouped(epoch, Some((&cents, 4)));
            assert_eq!(batches.len(), 3);
            let mut clusters = HashSet::new();
            for b in &batches {
                assert_eq!(b.len(), 8);
                let classes: HashSet<u32> = b.iter().map(|&i| labels[i] / 10).collect();
                assert_eq!(classes.len(), 4, "P distinct classes");
                let cluster: HashSet<u32> = classes.iter().map(|c| c % 3).collect();
                assert_eq!(
                    cluster.len(),
                    1,
                    "epoch {epoch}: one cluster per batch {b:?}"
                );
                clusters.extend(cluster);
            }
            assert_eq!(clusters.len(), 3, "every class once per pass");
        }
        // Groups of two: pairs of one cluster, the batches otherwise as random.
        let batches = s.epoch_grouped(0, Some((&cents, 2)));
        for b in &batches {
            for pair in b.chunks(4) {
                assert_eq!(labels[pair[0]] / 10 % 3, labels[pair[2]] / 10 % 3, "{b:?}");
            }
        }
    }

    #[test]
    fn rejects_impossible_settings() {
        let labels = labels();
        assert!(PkSampler::new(&labels, 14, 2, 0)
            .unwrap_err()
            .to_string()
            .contains("only 13 classes"));
        assert!(PkSampler::new(&labels, 0, 2, 0).is_err());
        assert!(PkSampler::new(&labels, 2, 0, 0).is_err());
        assert!(PkSampler::new(&[], 1, 1, 0).is_err());
    }
}
