//! A folder per class: `ROOT/<class name>/**/<image>`. Classes are the subfolder names in
//! byte order; images are found recursively by extension (case-insensitive, see
//! [`IMAGE_EXTENSIONS`]); hidden files and folders (names starting with `.`) are ignored.
//! A class folder without any image is skipped with a warning, so stray folders (logs,
//! thumbnails) do not become empty classes.

use std::path::{Path, PathBuf};

use super::decode::IMAGE_EXTENSIONS;
use super::{Catalogue, Item, OfficialSplit, Origin};
use crate::error::{Error, Result};

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Sorted, non-hidden entries of `dir`.
fn entries(dir: &Path) -> Result<Vec<(PathBuf, bool)>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| Error::file(dir, format!("cannot list folder: {e}")))?;
        if is_hidden(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        // `metadata` follows symlinks: a linked class folder or image counts as what it points to.
        let is_dir = std::fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false);
        out.push((path, is_dir));
    }
    out.sort();
    Ok(out)
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<()> {
    if depth > 32 {
        return Err(Error::file(dir, "folders nested more than 32 deep (a symlink loop?)"));
    }
    for (path, is_dir) in entries(dir)? {
        if is_dir {
            collect_images(&path, out, depth + 1)?;
        } else if has_image_extension(&path) {
            out.push(path);
        }
    }
    Ok(())
}

pub(super) fn read(root: &Path) -> Result<Catalogue> {
    if !root.is_dir() {
        return Err(Error::file(
            root,
            "not a folder; the folder dataset expects ROOT/<class name>/<images> (one subfolder per class)",
        ));
    }
    let mut classes = Vec::new();
    let mut items = Vec::new();
    let mut loose = 0usize;
    for (class_dir, is_dir) in entries(root)? {
        if !is_dir {
            loose += usize::from(has_image_extension(&class_dir));
            continue;
        }
        let mut images = Vec::new();
        collect_images(&class_dir, &mut images, 0)?;
        if images.is_empty() {
            tracing::warn!("{}: no images ({}); not a class", class_dir.display(), IMAGE_EXTENSIONS.join(", "));
            continue;
        }
        let class = classes.len();
        classes.push(class_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let origin = Origin { file: class_dir.clone(), line: None };
        items.extend(images.into_iter().map(|path| Item { path, class, origin: origin.clone(), train: true }));
    }
    if loose > 0 {
        tracing::warn!("{}: {loose} images directly in the root are ignored (they belong to no class folder)", root.display());
    }
    if classes.is_empty() {
        return Err(Error::file(
            root,
            format!("no class folders with images ({}); expected ROOT/<class name>/<images>", IMAGE_EXTENSIONS.join(", ")),
        ));
    }
    Ok(Catalogue { classes, items, official: OfficialSplit::ClassHalves })
}
