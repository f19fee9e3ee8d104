//! Small JPEG thumbnails of gallery images for the result grid.
//!
//! A thumbnail is keyed by the SHA-256 of its source file (not the item id, which is only
//! meaningful within one index), kept in a bounded in-memory cache and, when a directory
//! is given, on disk so a restart does not re-decode the whole gallery.

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Mutex;

use actix_web::web::Bytes;
use image::ImageFormat;

use crate::backend::GalleryItem;
use crate::decode::DecodeLimits;
use crate::store::write_durable;

/// Why a thumbnail could not be produced.
#[derive(Debug, thiserror::Error)]
pub enum ThumbError {
    #[error("cannot read the gallery file: {0}")]
    Read(std::io::Error),
    #[error("the gallery file is not a readable image: {0}")]
    Decode(String),
    #[error("cannot encode the thumbnail: {0}")]
    Encode(image::ImageError),
}

#[derive(Default)]
struct Lru {
    map: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

/// Thumbnail maker and cache.
pub struct Thumbnails {
    /// Longest side of a thumbnail, px.
    size: u32,
    disk: Option<PathBuf>,
    mem: Mutex<Lru>,
    mem_budget: usize,
    limits: DecodeLimits,
}

impl Thumbnails {
    /// `disk`: directory for cached thumbnails (created on demand); `mem_budget`: bytes of
    /// JPEG data kept in memory.
    pub fn new(size: u32, disk: Option<PathBuf>, mem_budget: usize, limits: DecodeLimits) -> Self {
        Self {
            size: size.max(16),
            disk,
            mem: Mutex::new(Lru::default()),
            mem_budget,
            limits,
        }
    }

    fn key(&self, item: &GalleryItem) -> String {
        format!("{}-{}", item.sha256, self.size)
    }

    /// The thumbnail of `item` as JPEG bytes. Blocking (file I/O, decoding): call from
    /// `web::block`.
    pub fn get(&self, item: &GalleryItem) -> Result<Bytes, ThumbError> {
        let key = self.key(item);
        if let Some(b) = self
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(&key)
        {
            return Ok(b.clone());
        }
        let disk_path = self
            .disk
            .as_ref()
            .filter(|_| !item.sha256.is_empty())
            .map(|d| d.join(format!("{key}.jpg")));
        if let Some(p) = &disk_path {
            if let Ok(b) = std::fs::read(p) {
                let b = Bytes::from(b);
                self.remember(key, b.clone());
                return Ok(b);
            }
        }
        let bytes = std::fs::read(&item.path).map_err(ThumbError::Read)?;
        let img = crate::decode::decode_image(&bytes, self.limits)
            .map_err(|e| ThumbError::Decode(e.to_string()))?;
        let thumb = img.thumbnail(self.size, self.size).to_rgb8();
        let mut out = Cursor::new(Vec::with_capacity(32 * 1024));
        let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82);
        enc.encode_image(&thumb).map_err(ThumbError::Encode)?;
        let b = Bytes::from(out.into_inner());
        if let Some(p) = &disk_path {
            // Best effort: a read-only data dir only costs re-encoding later.
            if let Err(e) = write_durable(p, &b) {
                tracing::debug!("cannot cache thumbnail {}: {e}", p.display());
            }
        }
        self.remember(key, b.clone());
        Ok(b)
    }

    fn remember(&self, key: String, b: Bytes) {
        let mut g = self.mem.lock().unwrap_or_else(|p| p.into_inner());
        if g.map.contains_key(&key) || b.len() > self.mem_budget {
            return;
        }
        g.bytes += b.len();
        g.order.push_back(key.clone());
        g.map.insert(key, b);
        while g.bytes > self.mem_budget {
            let Some(old) = g.order.pop_front() else {
                break;
            };
            if let Some(v) = g.map.remove(&old) {
                g.bytes -= v.len();
            }
        }
    }
}

/// Content type of an image file, from its bytes.
pub fn content_type(bytes: &[u8]) -> &'static str {
    match image::guess_format(bytes) {
        Ok(ImageFormat::Jpeg) => "image/jpeg",
        Ok(ImageFormat::Png) => "image/png",
        Ok(ImageFormat::WebP) => "image/webp",
        Ok(ImageFormat::Gif) => "image/gif",
        Ok(ImageFormat::Bmp) => "image/bmp",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn makes_caches_and_evicts() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("a.png");
        image::RgbImage::from_pixel(600, 300, image::Rgb([200, 0, 0]))
            .save(&src)
            .unwrap();
        let item = GalleryItem {
            id: 0,
            path: src.clone(),
            label: None,
            sha256: "ab".repeat(32),
        };
        let t = Thumbnails::new(
            128,
            Some(dir.path().join("thumbs")),
            1 << 20,
            DecodeLimits::default(),
        );
        let b = t.get(&item).unwrap();
        let img = image::load_from_memory(&b).unwrap();
        assert_eq!((img.width(), img.height()), (128, 64));
        assert!(dir
            .path()
            .join("thumbs")
            .join(format!("{}-128.jpg", item.sha256))
            .is_file());
        // Served from the cache once the source is gone.
        std::fs::remove_file(&src).unwrap();
        assert_eq!(t.get(&item).unwrap(), b);
        // A budget smaller than one thumbnail keeps nothing in memory.
        let t0 = Thumbnails::new(128, None, 10, DecodeLimits::default());
        assert!(t0.get(&item).is_err());
    }
}
