//! Byte-identical image files, found by content hash before training.
//!
//! Real collections repeat files: the same photo filed under two products, a character set
//! copied into two alphabets. Two identical images with different labels are a pair the loss
//! can only "separate" by memorising augmentation noise, and with a pair loss such a pair is the
//! hardest negative of its batch, so it dominates the gradient. Omniglot as shipped in
//! `../shared` has 50 classes stored twice (Greek and Latin, in both of its halves): ten such
//! pairs fall inside the training classes, forty repeat a training class among the test classes.
//!
//! So the trainer keeps one copy of each repeated file in the training split (classes left
//! empty are dropped), and reports repeats that touch the evaluation split — which it never
//! changes, since that is the benchmark's protocol — so a user knows what its figures mean.

use std::collections::HashMap;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::{Dataset, Sample};

/// SHA-256 of a file's bytes.
pub type ContentHash = [u8; 32];

/// Hashes every sample's file, in parallel. `None`: the file could not be read; it counts as
/// unique here, and the loader reports it (or skips it, `--skip-bad-images`) as for any
/// unreadable image.
pub fn hash_files(samples: &[Sample]) -> Vec<Option<ContentHash>> {
    samples
        .par_iter()
        .map(|s| {
            let bytes = std::fs::read(&s.path).ok()?;
            Some(Sha256::digest(&bytes).into())
        })
        .collect()
}

/// What [`drop_duplicates`] removed from a training split.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TrainDuplicates {
    /// Later copies of a file already in the same class.
    pub within_class: usize,
    /// Later copies of a file already in another class.
    pub across_classes: usize,
    /// Pairs of class names sharing files (kept class, class of the dropped copy), with how
    /// many files, most first.
    pub class_pairs: Vec<(String, String, usize)>,
    /// Classes left without images, dropped from training.
    pub emptied_classes: Vec<String>,
}

impl TrainDuplicates {
    pub fn dropped(&self) -> usize {
        self.within_class + self.across_classes
    }
}

/// Keeps the first sample (in dataset order) of every distinct file; labels are made dense
/// again over the classes that still have images. `hashes[i]` is sample `i`'s.
pub fn drop_duplicates(ds: Dataset, hashes: &[Option<ContentHash>]) -> (Dataset, TrainDuplicates) {
    assert_eq!(ds.samples.len(), hashes.len(), "one hash per sample");
    let mut first: HashMap<&ContentHash, u32> = HashMap::with_capacity(hashes.len());
    let mut report = TrainDuplicates::default();
    let mut pairs: HashMap<(u32, u32), usize> = HashMap::new();
    let mut kept = Vec::with_capacity(ds.samples.len());
    for (sample, hash) in ds.samples.into_iter().zip(hashes) {
        let Some(hash) = hash else {
            kept.push(sample);
            continue;
        };
        match first.get(hash) {
            None => {
                first.insert(hash, sample.label);
                kept.push(sample);
            }
            Some(&label) if label == sample.label => report.within_class += 1,
            Some(&label) => {
                report.across_classes += 1;
                *pairs.entry((label, sample.label)).or_default() += 1;
            }
        }
    }
    let mut pairs: Vec<_> = pairs.into_iter().collect();
    pairs.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    report.class_pairs = pairs
        .into_iter()
        .map(|((a, b), n)| {
            (
                ds.class_names[a as usize].clone(),
                ds.class_names[b as usize].clone(),
                n,
            )
        })
        .collect();

    // Dense labels over the classes that kept images, in their original order.
    let mut used = vec![false; ds.class_names.len()];
    kept.iter().for_each(|s| used[s.label as usize] = true);
    let mut remap = vec![u32::MAX; ds.class_names.len()];
    let mut class_names = Vec::with_capacity(ds.class_names.len());
    for (old, name) in ds.class_names.into_iter().enumerate() {
        if used[old] {
            remap[old] = class_names.len() as u32;
            class_names.push(name);
        } else {
            report.emptied_classes.push(name);
        }
    }
    kept.iter_mut()
        .for_each(|s| s.label = remap[s.label as usize]);
    let ds = Dataset {
        samples: kept,
        class_names,
        ..ds
    };
    (ds, report)
}

/// Repeats that touch the evaluation split (reported, never changed).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalDuplicates {
    /// Evaluation images whose file is also a training image.
    pub seen_in_training: usize,
    /// Evaluation classes with at least one such image, and the training class it repeats.
    pub seen_classes: Vec<(String, String)>,
    /// Evaluation images with an identical file in another evaluation class: their nearest
    /// neighbour is that copy at distance 0, so R@1 cannot count them.
    pub across_eval_classes: usize,
}

/// Compares the evaluation split's files with the training split's and with each other.
pub fn eval_duplicates(
    train: &Dataset,
    train_hashes: &[Option<ContentHash>],
    eval: &Dataset,
    eval_hashes: &[Option<ContentHash>],
) -> EvalDuplicates {
    let in_train: HashMap<&ContentHash, u32> = train_hashes
        .iter()
        .zip(&train.samples)
        .filter_map(|(h, s)| Some((h.as_ref()?, s.label)))
        .collect();
    let eval_pairs: Vec<(&ContentHash, &Sample)> = eval_hashes
        .iter()
        .zip(&eval.samples)
        .filter_map(|(h, s)| Some((h.as_ref()?, s)))
        .collect();
    let mut labels_of: HashMap<&ContentHash, Vec<u32>> = HashMap::new();
    for &(h, s) in &eval_pairs {
        let labels = labels_of.entry(h).or_default();
        if !labels.contains(&s.label) {
            labels.push(s.label);
        }
    }
    let mut report = EvalDuplicates::default();
    let mut seen: HashMap<u32, u32> = HashMap::new();
    for &(h, s) in &eval_pairs {
        if let Some(&t) = in_train.get(h) {
            report.seen_in_training += 1;
            seen.entry(s.label).or_insert(t);
        }
        if labels_of[h].len() > 1 {
            report.across_eval_classes += 1;
        }
    }
    let mut seen: Vec<_> = seen.into_iter().collect();
    seen.sort_unstable();
    report.seen_classes = seen
        .into_iter()
        .map(|(e, t)| {
            (
                eval.class_names[e as usize].clone(),
                train.class_names[t as usize].clone(),
            )
        })
        .collect();
    report
}

/// "a = b, c = d, … (N more)": the first few pairs of a report line.
pub fn list_pairs<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)>, shown: usize) -> String {
    let pairs: Vec<_> = pairs.collect();
    let mut text = pairs
        .iter()
        .take(shown)
        .map(|(a, b)| format!("{a} = {b}"))
        .collect::<Vec<_>>()
        .join(", ");
    if pairs.len() > shown {
        text.push_str(&format!(", … ({} more)", pairs.len() - shown));
    }
    text
}

/// Hashes both splits, drops repeated files from `train` unless `keep`, and logs what was
/// found: the training classes that repeat each other, and evaluation images that are
/// training images or repeat across evaluation classes. Returns the training split to use
/// and how many files were dropped.
pub fn clean_training_split(train: Dataset, eval: &Dataset, keep: bool) -> (Dataset, usize) {
    let started = std::time::Instant::now();
    let train_hashes = hash_files(&train.samples);
    // Splits that overlap by construction (`all`, or the same split) are not compared.
    let disjoint = train.split != eval.split
        && train.split != super::SplitSpec::ALL
        && eval.split != super::SplitSpec::ALL;
    if disjoint {
        let eval_hashes = hash_files(&eval.samples);
        report_eval(
            &eval_duplicates(&train, &train_hashes, eval, &eval_hashes),
            eval,
        );
    }
    let (cleaned, report) = drop_duplicates(train.clone(), &train_hashes);
    tracing::debug!("duplicate check: {:.1} s", started.elapsed().as_secs_f64());
    if report.dropped() == 0 {
        return (train, 0);
    }
    let pairs = list_pairs(
        report
            .class_pairs
            .iter()
            .map(|(a, b, _)| (a.as_str(), b.as_str())),
        4,
    );
    if keep {
        tracing::warn!(
            "the training split repeats {} image file(s): {} inside a class, {} across classes \
             ({pairs}); kept, as --keep-duplicates asks — identical images under different \
             labels are negatives the loss cannot separate",
            report.dropped(),
            report.within_class,
            report.across_classes
        );
        return (train, 0);
    }
    tracing::warn!(
        "the training split repeats {} image file(s): {} inside a class, {} across classes \
         ({pairs}); training keeps the first copy of each{} (--keep-duplicates keeps them all)",
        report.dropped(),
        report.within_class,
        report.across_classes,
        if report.emptied_classes.is_empty() {
            String::new()
        } else {
            format!(
                ", so {} class(es) that only repeated others are left out",
                report.emptied_classes.len()
            )
        }
    );
    (cleaned, report.dropped())
}

fn report_eval(r: &EvalDuplicates, eval: &Dataset) {
    if r.seen_in_training > 0 {
        let pairs = list_pairs(
            r.seen_classes.iter().map(|(e, t)| (e.as_str(), t.as_str())),
            4,
        );
        tracing::warn!(
            "{} of the {} evaluation images ({} classes: {pairs}) are files of the training \
             split: those classes are not unseen, so the evaluation overstates how the metric \
             generalises to new classes",
            r.seen_in_training,
            eval.len(),
            r.seen_classes.len()
        );
    }
    if r.across_eval_classes > 0 {
        tracing::warn!(
            "{} evaluation images have an identical file in another evaluation class: their \
             nearest neighbour is that copy, so Recall@1 is capped near {:.1} %",
            r.across_eval_classes,
            100.0 * (1.0 - r.across_eval_classes as f64 / eval.len().max(1) as f64)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{DatasetKind, Origin, SplitSpec};
    use std::path::PathBuf;

    fn dataset(labels: &[u32], names: &[&str]) -> Dataset {
        Dataset {
            kind: DatasetKind::Folder,
            root: PathBuf::from("/data"),
            split: SplitSpec::ALL,
            samples: labels
                .iter()
                .enumerate()
                .map(|(i, &label)| Sample {
                    path: PathBuf::from(format!("/data/{i}.png")),
                    label,
                    origin: Origin {
                        file: PathBuf::from("/data"),
                        line: Some(i + 1),
                    },
                    turns: 0,
                })
                .collect(),
            class_names: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn h(n: u8) -> Option<ContentHash> {
        Some([n; 32])
    }

    #[test]
    fn keeps_the_first_copy_and_drops_emptied_classes() {
        // Class b is a copy of class a; class c repeats one of its own files and one of a's.
        let ds = dataset(&[0, 0, 1, 1, 2, 2, 2, 2], &["a", "b", "c"]);
        let hashes = [h(1), h(2), h(1), h(2), h(3), h(3), h(4), h(1)];
        let (out, report) = drop_duplicates(ds, &hashes);
        assert_eq!(out.class_names, vec!["a".to_string(), "c".to_string()]);
        assert_eq!(out.labels(), vec![0, 0, 1, 1]);
        let kept: Vec<_> = out.samples.iter().map(|s| s.path.clone()).collect();
        assert_eq!(
            kept,
            [0, 1, 4, 6].map(|i| PathBuf::from(format!("/data/{i}.png")))
        );
        assert_eq!(report.within_class, 1);
        assert_eq!(report.across_classes, 3);
        assert_eq!(report.dropped(), 4);
        assert_eq!(
            report.class_pairs,
            vec![
                ("a".to_string(), "b".to_string(), 2),
                ("a".to_string(), "c".to_string(), 1)
            ]
        );
        assert_eq!(report.emptied_classes, vec!["b".to_string()]);
    }

    #[test]
    fn a_set_without_repeats_is_unchanged() {
        let ds = dataset(&[0, 1, 1], &["a", "b"]);
        let (out, report) = drop_duplicates(ds.clone(), &[h(1), h(2), None]);
        assert_eq!(out.samples, ds.samples);
        assert_eq!(out.class_names, ds.class_names);
        assert_eq!(report, TrainDuplicates::default());
    }

    #[test]
    fn reports_evaluation_images_seen_in_training_and_repeated_across_eval_classes() {
        let train = dataset(&[0, 1], &["t0", "t1"]);
        let eval = dataset(&[0, 0, 1, 2, 2], &["e0", "e1", "e2"]);
        // e0 repeats t1's file twice over; e1's file is also in e2.
        let report = eval_duplicates(
            &train,
            &[h(1), h(2)],
            &eval,
            &[h(2), h(2), h(7), h(7), h(8)],
        );
        assert_eq!(report.seen_in_training, 2);
        assert_eq!(
            report.seen_classes,
            vec![("e0".to_string(), "t1".to_string())]
        );
        assert_eq!(report.across_eval_classes, 2);
    }

    #[test]
    fn hashes_file_contents_and_leaves_unreadable_files_to_the_loader() {
        let dir = tempfile::tempdir().unwrap();
        let mut ds = dataset(&[0, 0, 1], &["a", "b"]);
        for (i, s) in ds.samples.iter_mut().enumerate() {
            s.path = dir.path().join(format!("{i}.bin"));
            std::fs::write(&s.path, if i == 2 { b"x" } else { b"y" }).unwrap();
        }
        let hashes = hash_files(&ds.samples);
        assert!(hashes[0].is_some());
        assert_eq!(hashes[0], hashes[1]);
        assert_ne!(hashes[0], hashes[2]);
        std::fs::remove_file(&ds.samples[1].path).unwrap();
        let hashes = hash_files(&ds.samples);
        assert_eq!(hashes[1], None);
        // An unreadable file is kept: the loader reports it.
        let (out, report) = drop_duplicates(ds, &hashes);
        assert_eq!(out.len(), 3);
        assert_eq!(report.dropped(), 0);
    }

    #[test]
    fn lists_a_few_pairs_then_counts_the_rest() {
        let pairs = [("a", "b"), ("c", "d"), ("e", "f")];
        assert_eq!(list_pairs(pairs.into_iter(), 2), "a = b, c = d, … (1 more)");
        assert_eq!(list_pairs(pairs.into_iter(), 3), "a = b, c = d, e = f");
    }
}
