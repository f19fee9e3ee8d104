//! More training classes from the same files: each class turned by 90°, 180° and 270° as three
//! new classes (`trainer train --turned-classes`).
//!
//! A turned character, symbol or icon is a different one, so a set of glyphs yields four times
//! its classes, and the metric learns from four times as many identities: the standard
//! augmentation of few-shot Omniglot (Santoro et al. 2016, Vinyals et al. 2016, Snell et al.
//! 2017). A turned photo shows the same object, so this is opt-in and never for photos.

use image::DynamicImage;

use super::{Dataset, Sample};

/// `img` turned clockwise by `turns` quarter turns (taken modulo 4).
pub(crate) fn turn(img: DynamicImage, turns: u8) -> DynamicImage {
    match turns % 4 {
        0 => img,
        1 => img.rotate90(),
        2 => img.rotate180(),
        _ => img.rotate270(),
    }
}

/// `set` with three more copies of every class, turned by 1, 2 and 3 quarter turns: class `c`
/// of `n` turned `t` times gets label `t·n + c` and the name `<name>@<90·t>°`, so labels stay
/// dense and the original classes keep theirs. Samples already turned keep adding up.
pub fn with_turned_classes(mut set: Dataset) -> Dataset {
    let n = set.class_names.len() as u32;
    let originals = std::mem::take(&mut set.samples);
    let names = set.class_names.clone();
    for t in 1..4u8 {
        set.class_names.extend(
            names
                .iter()
                .map(|name| format!("{name}@{}°", 90 * t as u32)),
        );
    }
    set.samples = (0..4u8)
        .flat_map(|t| {
            originals.iter().map(move |s| Sample {
                label: t as u32 * n + s.label,
                turns: (s.turns + t) % 4,
                ..s.clone()
            })
        })
        .collect();
    set
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::test_util::{encode, gradient};
    use crate::data::{DatasetKind, Origin, SplitSpec};
    use std::path::PathBuf;

    fn set(labels: &[u32], dir: &std::path::Path) -> Dataset {
        Dataset {
            kind: DatasetKind::Folder,
            root: dir.to_path_buf(),
            split: SplitSpec::ALL,
            samples: labels
                .iter()
                .enumerate()
                .map(|(i, &label)| Sample {
                    path: dir.join(format!("{i}.png")),
                    label,
                    origin: Origin {
                        file: PathBuf::from("list.txt"),
                        line: Some(i + 1),
                    },
                    turns: 0,
                })
                .collect(),
            class_names: vec!["a".into(), "b".into()],
        }
    }

    #[test]
    fn four_times_the_classes_with_dense_labels_and_the_originals_first() {
        let dir = tempfile::tempdir().unwrap();
        let base = set(&[0, 1, 1], dir.path());
        let t = with_turned_classes(base.clone());
        assert_eq!(
            t.class_names,
            ["a", "b", "a@90°", "b@90°", "a@180°", "b@180°", "a@270°", "b@270°"]
        );
        assert_eq!(t.labels(), [0, 1, 1, 2, 3, 3, 4, 5, 5, 6, 7, 7]);
        assert_eq!(&t.samples[..3], &base.samples[..]);
        for (k, s) in t.samples.iter().enumerate() {
            let original = &base.samples[k % 3];
            assert_eq!((&s.path, &s.origin), (&original.path, &original.origin));
            assert_eq!(s.turns as usize, k / 3);
            // The turned class is the original class of the same file.
            assert_eq!(s.label % 2, original.label);
        }
        // Turning a set twice keeps counting turns modulo four.
        let twice = with_turned_classes(t);
        assert_eq!(twice.num_classes(), 32);
        assert_eq!(twice.samples[12 * 3 + 4].turns, 0); // 1 + 3 turns
    }

    #[test]
    fn a_sample_decodes_turned_clockwise() {
        let dir = tempfile::tempdir().unwrap();
        // A 3×2 image with a distinct pixel at the top-left corner.
        let mut img = gradient(3, 2);
        img.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        std::fs::write(
            dir.path().join("0.png"),
            encode(&img, image::ImageFormat::Png),
        )
        .unwrap();
        let t = with_turned_classes(set(&[0], dir.path()));
        let decoded: Vec<_> = t
            .samples
            .iter()
            .map(|s| s.decode().unwrap().to_rgb8())
            .collect();
        assert_eq!(decoded[0], img);
        // A clockwise quarter turn takes the top-left corner to the top-right.
        assert_eq!(decoded[1].dimensions(), (2, 3));
        assert_eq!(decoded[1].get_pixel(1, 0), &image::Rgb([255, 0, 0]));
        assert_eq!(decoded[2].get_pixel(2, 1), &image::Rgb([255, 0, 0]));
        assert_eq!(decoded[3].get_pixel(0, 2), &image::Rgb([255, 0, 0]));
    }
}
