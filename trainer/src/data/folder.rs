//! A folder per class: `ROOT/<class name>/**/<image>`. Classes are the subfolder names in
//! byte order. Images are found by the shared walker (`intake::walk_images`), so hidden
//! entries, symlinks, extensions and labels follow the same rules as `indexer build DIR` and
//! the server's `--gallery DIR`: a file's class is its top-level folder. A class folder
//! without any image is skipped with a warning, so stray folders (logs, thumbnails) do not
//! become empty classes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::decode::IMAGE_EXTENSIONS;
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

pub(super) fn read(root: &Path) -> Result<Catalogue> {
    if !root.is_dir() {
        return Err(Error::file(
            root,
            "not a folder; the folder dataset expects ROOT/<class name>/<images> (one subfolder per class)",
        ));
    }
    let files = intake::walk_images(root)
        .map_err(|e| Error::file(&e.path, format!("cannot list folder: {}", e.source)))?;
    let mut by_class: BTreeMap<String, Vec<PathBuf>> = BTreeMap::new();
    let mut loose = 0usize;
    for f in files {
        match f.label {
            Some(label) => by_class.entry(label).or_default().push(f.path),
            None => loose += 1,
        }
    }
    // Say which top-level folders hold no image, so a wrong layout is easy to spot.
    if let Ok(rd) = std::fs::read_dir(root) {
        for entry in rd.flatten() {
            let name = entry.file_name();
            let is_dir = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_dir());
            if is_dir
                && !intake::is_hidden(&name)
                && !by_class.contains_key(name.to_string_lossy().as_ref())
            {
                tracing::warn!(
                    "{}: no images ({}); not a class",
                    entry.path().display(),
                    IMAGE_EXTENSIONS.join(", ")
                );
            }
        }
    }
    if loose > 0 {
        tracing::warn!(
            "{}: {loose} images directly in the root are ignored (they belong to no class folder)",
            root.display()
        );
    }
    if by_class.is_empty() {
        return Err(Error::file(
            root,
            format!(
                "no class folders with images ({}); expected ROOT/<class name>/<images>",
                IMAGE_EXTENSIONS.join(", ")
            ),
        ));
    }
    let mut classes = Vec::with_capacity(by_class.len());
    let mut items = Vec::new();
    for (class, (name, images)) in by_class.into_iter().enumerate() {
        let origin = Origin {
            file: root.join(&name),
            line: None,
        };
        items.extend(images.into_iter().map(|path| Item {
            path,
            class,
            origin: origin.clone(),
            train: true,
        }));
        classes.push(name);
    }
    Ok(Catalogue {
        classes,
        items,
        official: OfficialSplit::ClassHalves,
    })
}
