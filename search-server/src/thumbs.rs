//! Small JPEG thumbnails of gallery images for the result grid.
//!
//! A thumbnail is keyed by the SHA-256 of its source file (not the item id, which is only
//! meaningful within one index), kept in a bounded in-memory cache and on disk when a
//! directory is given. Uploads get theirs at add time, from the decode that embeds them
//! ([`render`]), so serving one never decodes the upload again; items indexed another way
//! get theirs on first request, made once however many requests ask at the same time
//! ([`Thumbnails::flight`]: 16 concurrent GETs of a new 40 MP image decode it once).

use std::collections::{HashMap, VecDeque};
use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use actix_web::web::Bytes;
use image::{DynamicImage, ImageFormat};

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

/// One thumbnail being made; every request for it waits on the same cell.
pub type Flight = Arc<tokio::sync::OnceCell<Bytes>>;

/// Thumbnail maker and cache.
pub struct Thumbnails {
    /// Longest side of a thumbnail, px.
    size: u32,
    disk: Option<PathBuf>,
    mem: Mutex<Lru>,
    mem_budget: usize,
    limits: DecodeLimits,
    flights: Mutex<HashMap<String, Flight>>,
    /// Thumbnails made by decoding a gallery file (not those stored at add time).
    decoded: std::sync::atomic::AtomicUsize,
}

/// The thumbnail of a decoded image: at most `size` px per side, JPEG.
pub fn render(img: &DynamicImage, size: u32) -> Result<Bytes, ThumbError> {
    let thumb = img.thumbnail(size, size).to_rgb8();
    let mut out = Cursor::new(Vec::with_capacity(32 * 1024));
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 82);
    enc.encode_image(&thumb).map_err(ThumbError::Encode)?;
    Ok(Bytes::from(out.into_inner()))
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
            flights: Mutex::new(HashMap::new()),
            decoded: Default::default(),
        }
    }

    /// Longest side of the thumbnails, px.
    pub fn size(&self) -> u32 {
        self.size
    }

    pub fn key(&self, sha256: &str) -> String {
        format!("{sha256}-{}", self.size)
    }

    fn disk_path(&self, sha256: &str) -> Option<PathBuf> {
        self.disk
            .as_ref()
            .filter(|_| !sha256.is_empty())
            .map(|d| d.join(format!("{}.jpg", self.key(sha256))))
    }

    /// The cached thumbnail of `item`, from memory or disk. Blocking (file I/O).
    pub fn cached(&self, item: &GalleryItem) -> Option<Bytes> {
        let key = self.key(&item.sha256);
        if let Some(b) = self
            .mem
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(&key)
        {
            return Some(b.clone());
        }
        let b = Bytes::from(std::fs::read(self.disk_path(&item.sha256)?).ok()?);
        self.remember(key, b.clone());
        Some(b)
    }

    /// Keeps a thumbnail made elsewhere (at add time) on disk and in memory. Blocking.
    pub fn store(&self, sha256: &str, b: Bytes) {
        if let Some(p) = self.disk_path(sha256) {
            // Best effort: a read-only data dir only costs re-encoding later.
            if let Err(e) = write_durable(&p, &b) {
                tracing::debug!("cannot cache thumbnail {}: {e}", p.display());
            }
        }
        self.remember(self.key(sha256), b);
    }

    /// Reads and decodes `item`'s file and makes its thumbnail (and caches it). Blocking.
    pub fn make(&self, item: &GalleryItem, bytes: &[u8]) -> Result<Bytes, ThumbError> {
        self.decoded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let img = crate::decode::decode_image(bytes, self.limits)
            .map_err(|e| ThumbError::Decode(e.to_string()))?;
        let b = render(&img, self.size)?;
        drop(img);
        self.store(&item.sha256, b.clone());
        Ok(b)
    }

    /// The thumbnail of `item` as JPEG bytes, cached or made now. Blocking (file I/O,
    /// decoding) and outside the decode budget: the server goes through
    /// [`Thumbnails::flight`] and the budget instead.
    pub fn get(&self, item: &GalleryItem) -> Result<Bytes, ThumbError> {
        if let Some(b) = self.cached(item) {
            return Ok(b);
        }
        let bytes = std::fs::read(&item.path).map_err(ThumbError::Read)?;
        self.make(item, &bytes)
    }

    /// The shared cell of the thumbnail being made for `key`: the first caller fills it,
    /// the others wait on it. Call [`Thumbnails::land`] when done.
    pub fn flight(&self, key: &str) -> Flight {
        self.flights
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Forgets the flight for `key` (the thumbnail is cached now, or making it failed and a
    /// later request should try again).
    pub fn land(&self, key: &str, flight: &Flight) {
        let mut g = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if g.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            g.remove(key);
        }
    }

    /// Gallery files decoded to make a thumbnail so far (tests: single flight, add time).
    pub fn decodes(&self) -> usize {
        self.decoded.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Thumbnails being made now (tests).
    pub fn in_flight(&self) -> usize {
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).len()
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
        Ok(ImageFormat::Tiff) => "image/tiff",
        Ok(ImageFormat::Pnm) => "image/x-portable-anymap",
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
            metadata: None,
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
