//! `--gallery DIR`: adding a folder of images to the index at start-up.
//!
//! Files are identified by content (SHA-256), so restarting with the same folder adds only
//! new files, and a file renamed or copied is not indexed twice. Files are listed by the
//! shared walker (`intake::walk`, the same as `indexer build DIR` and the trainer's folder
//! dataset): a file's label is the name of its top-level folder under DIR
//! (`DIR/cardinal/1.jpg` → `cardinal`). Unreadable files are logged and skipped, never
//! fatal. Each image is reduced to the model's view right after decoding, so a batch of
//! large photos holds one full-size decode at a time.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use crate::backend::{EmbedBackend, NewGalleryItem, SearchBackend};
use crate::decode::{decode_image, DecodeLimits};
use crate::store::sha256_hex;

/// What a scan did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ScanReport {
    pub found: usize,
    pub added: usize,
    pub already_indexed: usize,
    /// Files whose content was deleted through the API: left out, so the delete sticks.
    pub deleted: usize,
    pub unreadable: usize,
}

/// Image files under `root` with their labels, by the shared walker's rules (hidden entries
/// skipped, links followed, label = top-level folder; see `intake::walk`), sorted.
pub fn list_images(root: &Path) -> anyhow::Result<Vec<intake::ImageFile>> {
    Ok(intake::walk_images(root)?)
}

/// Indexes the images under `root` not already in `gallery`, `batch` at a time.
pub fn scan_folder(
    root: &Path,
    model: &dyn EmbedBackend,
    gallery: &dyn SearchBackend,
    limits: DecodeLimits,
    batch: usize,
) -> anyhow::Result<ScanReport> {
    let root = root
        .canonicalize()
        .with_context(|| format!("gallery folder {} not found", root.display()))?;
    let files = list_images(&root)?;
    let mut report = ScanReport {
        found: files.len(),
        ..ScanReport::default()
    };
    tracing::info!("gallery {}: {} image files", root.display(), files.len());
    let start = Instant::now();
    let mut last_log = Instant::now();
    let mut seen = HashSet::new();
    for (chunk_no, chunk) in files.chunks(batch.max(1)).enumerate() {
        let mut images = Vec::new();
        let mut metas = Vec::new();
        for intake::ImageFile { path, label } in chunk {
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!("skipping {}: cannot read it: {e}", path.display());
                    report.unreadable += 1;
                    continue;
                }
            };
            let sha = sha256_hex(&bytes);
            if gallery.find_sha256(&sha)?.is_some() || !seen.insert(sha.clone()) {
                report.already_indexed += 1;
                continue;
            }
            if gallery.was_deleted(&sha)? {
                // Deleted through the API: a delete must stick across restarts.
                report.deleted += 1;
                continue;
            }
            match decode_image(&bytes, limits) {
                Ok(img) => {
                    images.push(model.prepare(img));
                    metas.push((path.clone(), label.clone(), sha));
                }
                Err(e) => {
                    tracing::warn!("skipping {}: {e}", path.display());
                    report.unreadable += 1;
                }
            }
        }
        if !images.is_empty() {
            let vectors = model
                .embed_prepared(&images)
                .with_context(|| format!("embedding gallery images from {}", root.display()))?;
            let items = metas
                .into_iter()
                .zip(vectors)
                .map(|((path, label, sha256), embedding)| NewGalleryItem {
                    path,
                    label,
                    sha256,
                    metadata: None,
                    embedding,
                })
                .collect();
            let outcomes = gallery
                .add_batch(items)
                .context("adding gallery images to the index")?;
            report.added += outcomes.iter().filter(|o| !o.duplicate).count();
            report.already_indexed += outcomes.iter().filter(|o| o.duplicate).count();
        }
        let done = ((chunk_no + 1) * batch.max(1)).min(files.len());
        if last_log.elapsed().as_secs() >= 5 || done == files.len() {
            last_log = Instant::now();
            let rate = report.added as f64 / start.elapsed().as_secs_f64().max(1e-3);
            tracing::info!(
                "gallery: {done}/{} files, {} added, {} already indexed, {} deleted earlier (left out), {} unreadable ({rate:.1} img/s)",
                files.len(),
                report.added,
                report.already_indexed,
                report.deleted,
                report.unreadable
            );
        }
    }
    // The scan's full-size decodes are gone: give their pages back (see trim_malloc).
    trainer::ops::trim_malloc();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ColorEmbedder, MemoryGallery};

    #[test]
    fn scans_recursively_labels_by_folder_and_skips_known_files() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("red/sub")).unwrap();
        std::fs::create_dir_all(root.join("blue")).unwrap();
        let save = |p: &str, c: [u8; 3]| {
            image::RgbImage::from_pixel(16, 16, image::Rgb(c))
                .save(root.join(p))
                .unwrap()
        };
        save("red/1.png", [200, 0, 0]);
        save("red/sub/2.png", [201, 0, 0]);
        save("blue/1.PNG", [0, 0, 200]);
        save("loose.png", [0, 200, 0]);
        std::fs::copy(root.join("blue/1.PNG"), root.join("blue/copy.png")).unwrap();
        std::fs::write(root.join("red/broken.jpg"), b"not really").unwrap();
        std::fs::write(root.join("notes.txt"), b"ignored").unwrap();

        let model = ColorEmbedder::default();
        let gallery = MemoryGallery::default();
        let r = scan_folder(root, &model, &gallery, DecodeLimits::default(), 2).unwrap();
        assert_eq!(
            r,
            ScanReport {
                found: 6,
                added: 4,
                already_indexed: 1,
                deleted: 0,
                unreadable: 1
            }
        );
        let labels: Vec<Option<String>> = (0..4)
            .map(|i| gallery.item(i).unwrap().unwrap().label)
            .collect();
        assert!(labels.contains(&Some("red".into())) && labels.contains(&Some("blue".into())));
        assert!(labels.contains(&None), "a file at the root has no label");
        assert!(gallery.item(0).unwrap().unwrap().path.is_absolute());

        // A second scan adds nothing.
        let again = scan_folder(root, &model, &gallery, DecodeLimits::default(), 4).unwrap();
        assert_eq!((again.added, again.already_indexed), (0, 5));
        assert_eq!(gallery.len().unwrap(), 4);

        // A file deleted through the API is not scanned back in.
        assert!(gallery.delete(0).unwrap());
        let third = scan_folder(root, &model, &gallery, DecodeLimits::default(), 4).unwrap();
        assert_eq!((third.added, third.deleted), (0, 1));
        assert_eq!(gallery.len().unwrap(), 3);
    }

    #[test]
    fn missing_folder_is_a_clear_error() {
        let e = scan_folder(
            Path::new("/definitely/not/here"),
            &ColorEmbedder::default(),
            &MemoryGallery::default(),
            DecodeLimits::default(),
            4,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("/definitely/not/here"), "{e:#}");
    }
}
