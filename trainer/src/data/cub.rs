//! CUB-200-2011, in its official layout:
//!
//! ```text
//! ROOT/classes.txt              <class id> <NNN.Name>        (1-based ids)
//! ROOT/images.txt               <image id> <relative path>   (relative to ROOT/images)
//! ROOT/image_class_labels.txt   <image id> <class id>
//! ROOT/images/NNN.Name/*.jpg
//! ```
//!
//! Classes are ordered by id, so the protocol's halves are classes 1–100 / 101–200 (and
//! 1–50 / 51–100 for the 100-class subset in `shared/data/cub100`). `train_test_split.txt`
//! is the classification split and is not used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::text::{fields, id_field, lines, read_annotation};
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

const CLASSES: &str = "classes.txt";
const IMAGES: &str = "images.txt";
const LABELS: &str = "image_class_labels.txt";

/// Accepts the `CUB_200_2011` folder itself or a folder that contains it.
fn resolve_root(root: &Path) -> PathBuf {
    let nested = root.join("CUB_200_2011");
    if !root.join(IMAGES).exists() && nested.join(IMAGES).exists() {
        nested
    } else {
        root.to_path_buf()
    }
}

pub(super) fn read(root: &Path) -> Result<Catalogue> {
    let root = resolve_root(root);
    let layout_hint = "the CUB-200-2011 layout (classes.txt, images.txt, image_class_labels.txt and images/ \
                       in the CUB_200_2011 folder)";

    let classes_path = root.join(CLASSES);
    let text = read_annotation(&classes_path, &format!("'<class id> <class name>' lines, as in {layout_hint}"))?;
    let mut classes: Vec<(u32, String)> = Vec::new();
    for line in lines(&text) {
        let f = fields(&classes_path, &line, 2, "'<class id> <class name>'")?;
        classes.push((id_field(&classes_path, &line, "class id", f[0])?, f[1].to_string()));
    }
    classes.sort_by_key(|c| c.0);
    if let Some(w) = classes.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::file(&classes_path, format!("class id {} is listed twice", w[0].0)));
    }
    let class_pos: HashMap<u32, usize> = classes.iter().enumerate().map(|(i, c)| (c.0, i)).collect();

    let labels_path = root.join(LABELS);
    let text = read_annotation(&labels_path, &format!("'<image id> <class id>' lines, as in {layout_hint}"))?;
    let mut label_of: HashMap<u64, (usize, usize)> = HashMap::new();
    for line in lines(&text) {
        let f = fields(&labels_path, &line, 2, "'<image id> <class id>'")?;
        let image: u64 = id_field(&labels_path, &line, "image id", f[0])?;
        let class: u32 = id_field(&labels_path, &line, "class id", f[1])?;
        let pos = *class_pos.get(&class).ok_or_else(|| {
            Error::file(&labels_path, format!("line {}: class id {class} is not in {CLASSES}", line.number))
        })?;
        if label_of.insert(image, (pos, line.number)).is_some() {
            return Err(Error::file(&labels_path, format!("line {}: image id {image} is labelled twice", line.number)));
        }
    }

    let images_path = root.join(IMAGES);
    let text = read_annotation(&images_path, &format!("'<image id> <path under images/>' lines, as in {layout_hint}"))?;
    let image_dir = root.join("images");
    let mut items = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for line in lines(&text) {
        let f = fields(&images_path, &line, 2, "'<image id> <path under images/>'")?;
        let image: u64 = id_field(&images_path, &line, "image id", f[0])?;
        if !seen.insert(image) {
            return Err(Error::file(&images_path, format!("line {}: image id {image} is listed twice", line.number)));
        }
        let (class, _) = *label_of.get(&image).ok_or_else(|| {
            Error::file(&images_path, format!("line {}: image id {image} has no class in {LABELS}", line.number))
        })?;
        items.push(Item {
            path: image_dir.join(f[1]),
            class,
            origin: Origin { file: images_path.clone(), line: Some(line.number) },
            train: true,
        });
    }
    Ok(Catalogue { classes: classes.into_iter().map(|c| c.1).collect(), items, official: OfficialSplit::ClassHalves })
}
