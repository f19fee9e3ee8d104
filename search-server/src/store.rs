//! Files the server writes under its data directory: uploaded images (content-addressed by
//! SHA-256, so the same bytes are stored once and a path never depends on user input) and
//! the on-disk thumbnail cache.

use std::path::{Path, PathBuf};

use image::ImageFormat;

/// Hex SHA-256 of some bytes (the intake's, so the server and the indexer agree).
pub use intake::sha256_hex;

/// File extension for a stored image of this format.
pub fn extension(format: ImageFormat) -> &'static str {
    match format {
        // `extensions_str` starts with "pbm" (bitmaps); a PNM upload may be any of them.
        ImageFormat::Pnm => "pnm",
        _ => format.extensions_str().first().copied().unwrap_or("img"),
    }
}

/// Where uploaded images live: `<data-dir>/uploads/<first two hex>/<sha256>.<ext>`.
#[derive(Debug, Clone)]
pub struct UploadStore {
    root: PathBuf,
}

impl UploadStore {
    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.join("uploads"),
        }
    }

    pub fn path_for(&self, sha256: &str, format: ImageFormat) -> PathBuf {
        self.root
            .join(&sha256[..2])
            .join(format!("{sha256}.{}", extension(format)))
    }

    /// Writes the bytes durably (temp file, fsync, rename, fsync of the directory) and returns
    /// the final path. Called before the index records the item, so an item that survives a
    /// crash always has its file.
    pub fn save(
        &self,
        bytes: &[u8],
        sha256: &str,
        format: ImageFormat,
    ) -> std::io::Result<PathBuf> {
        let path = self.path_for(sha256, format);
        if path.is_file() {
            return Ok(path);
        }
        write_durable(&path, bytes)?;
        Ok(path)
    }
}

impl UploadStore {
    /// Removes `path` if it is one of the stored uploads (a deleted item's file); files
    /// elsewhere (a `--gallery` folder) are the user's and are left alone. Best effort: a
    /// file that cannot be removed is only logged, since the item is already gone.
    pub fn remove_if_stored(&self, path: &Path) {
        if !path.starts_with(&self.root) {
            return;
        }
        if let Err(e) = std::fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(
                    "cannot remove the deleted image's file {}: {e}",
                    path.display()
                );
            }
        }
    }
}

/// Writes `bytes` to `path` so a crash leaves the old file or the complete new one
/// (creating the folder; the write is the index store's atomic write).
pub fn write_durable(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    indexer::store::write_atomic(path, bytes).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_content_addressed_and_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let store = UploadStore::new(dir.path());
        let sha = sha256_hex(b"abc");
        let p = store.save(b"abc", &sha, ImageFormat::Png).unwrap();
        assert_eq!(
            p,
            dir.path()
                .join("uploads")
                .join(&sha[..2])
                .join(format!("{sha}.png"))
        );
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        assert_eq!(store.save(b"abc", &sha, ImageFormat::Png).unwrap(), p);
    }
}
