//! Small deterministic backends for tests and demos: an "embedder" that maps an image to its
//! normalised mean colour, and an in-memory exact-search gallery.
//!
//! They make the HTTP layer (routes, limits, batching, auth) testable in milliseconds with
//! results that can be predicted: a red query's nearest neighbour is the red gallery image.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use image::DynamicImage;
use indexer::Filter;

use crate::backend::{
    AddOutcome, EmbedBackend, GalleryItem, NewGalleryItem, SearchBackend, SearchHit,
};

/// Embeds an image as its L2-normalised mean RGB colour (dim 3); records batch sizes.
#[derive(Default)]
pub struct ColorEmbedder {
    /// Sleeps this long per batch, to make concurrent requests pile up (batching tests).
    pub delay: Duration,
    batches: Mutex<Vec<usize>>,
}

impl ColorEmbedder {
    pub fn with_delay(delay: Duration) -> Self {
        Self {
            delay,
            batches: Mutex::new(Vec::new()),
        }
    }

    /// Sizes of the batches embedded so far, in order.
    pub fn batch_sizes(&self) -> Vec<usize> {
        self.batches.lock().unwrap().clone()
    }
}

/// The normalised mean colour of an image.
pub fn mean_color(img: &DynamicImage) -> Vec<f32> {
    let rgb = img.to_rgb8();
    let mut sum = [0f64; 3];
    for p in rgb.pixels() {
        for (acc, v) in sum.iter_mut().zip(p.0) {
            *acc += f64::from(v);
        }
    }
    let norm = sum.iter().map(|v| v * v).sum::<f64>().sqrt().max(1e-12);
    sum.iter().map(|v| (v / norm) as f32).collect()
}

impl EmbedBackend for ColorEmbedder {
    fn embed(&self, images: &[DynamicImage]) -> anyhow::Result<Vec<Vec<f32>>> {
        std::thread::sleep(self.delay);
        self.batches.lock().unwrap().push(images.len());
        Ok(images.iter().map(mean_color).collect())
    }
    fn dim(&self) -> usize {
        3
    }
    fn describe(&self) -> String {
        "mean colour (test embedder)".into()
    }
}

#[derive(Default)]
struct Items {
    items: Vec<(GalleryItem, Vec<f32>)>,
    by_sha: HashMap<String, u64>,
    deleted: HashSet<u64>,
    deleted_shas: HashSet<String>,
}

impl Items {
    fn live(&self) -> impl Iterator<Item = &(GalleryItem, Vec<f32>)> {
        self.items
            .iter()
            .filter(|(it, _)| !self.deleted.contains(&it.id))
    }
}

fn matches(filter: Option<&Filter>, item: &GalleryItem) -> bool {
    filter.is_none_or(|f| f.matches_parts(item.label.as_deref(), item.metadata.as_ref()))
}

/// Exact cosine search over vectors held in memory. Not durable: for tests only.
#[derive(Default)]
pub struct MemoryGallery {
    inner: RwLock<Items>,
    /// Every call fails as a remote store whose engine is down does (see
    /// [`MemoryGallery::set_unavailable`]).
    down: std::sync::atomic::AtomicBool,
}

impl MemoryGallery {
    /// Makes every call fail (or work again) the way a remote store does while its engine
    /// is down, to test the 503 and the recovery without an engine.
    pub fn set_unavailable(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_up(&self) -> anyhow::Result<()> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(indexer::remote::RemoteError::Unavailable {
                at: "test:0/fake".into(),
                detail: "connection refused".into(),
            }
            .into());
        }
        Ok(())
    }

    /// Adds an item directly (test set-up); returns its id.
    pub fn insert(
        &self,
        path: PathBuf,
        label: Option<&str>,
        sha256: &str,
        embedding: Vec<f32>,
    ) -> u64 {
        self.add_durable(NewGalleryItem {
            path,
            label: label.map(str::to_string),
            sha256: sha256.into(),
            metadata: None,
            embedding,
        })
        .expect("in-memory add cannot fail")
        .id
    }
}

impl SearchBackend for MemoryGallery {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Vec<SearchHit>> {
        self.check_up()?;
        let g = self.inner.read().unwrap();
        let mut hits: Vec<SearchHit> = g
            .live()
            .filter(|(item, _)| matches(filter, item))
            .map(|(item, v)| SearchHit {
                item: item.clone(),
                score: v.iter().zip(query).map(|(a, b)| a * b).sum(),
            })
            .collect();
        hits.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.item.id.cmp(&b.item.id)));
        hits.truncate(k);
        Ok(hits)
    }

    fn item(&self, id: u64) -> anyhow::Result<Option<GalleryItem>> {
        self.check_up()?;
        let g = self.inner.read().unwrap();
        Ok(usize::try_from(id)
            .ok()
            .and_then(|i| g.items.get(i))
            .filter(|_| !g.deleted.contains(&id))
            .map(|(item, _)| item.clone()))
    }

    fn vector(&self, id: u64) -> anyhow::Result<Option<Vec<f32>>> {
        self.check_up()?;
        let g = self.inner.read().unwrap();
        let found = g.live().find(|(it, _)| it.id == id).map(|(_, v)| v.clone());
        Ok(found)
    }

    fn delete(&self, id: u64) -> anyhow::Result<bool> {
        self.check_up()?;
        let mut g = self.inner.write().unwrap();
        let Some(sha) = g
            .live()
            .find(|(it, _)| it.id == id)
            .map(|(it, _)| it.sha256.clone())
        else {
            return Ok(false);
        };
        g.deleted.insert(id);
        g.by_sha.remove(&sha);
        g.deleted_shas.insert(sha);
        Ok(true)
    }

    fn page(
        &self,
        offset: usize,
        limit: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<(usize, Vec<GalleryItem>)> {
        self.check_up()?;
        let g = self.inner.read().unwrap();
        let matching: Vec<&GalleryItem> = g
            .live()
            .map(|(it, _)| it)
            .filter(|it| matches(filter, it))
            .collect();
        let items = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|&it| it.clone())
            .collect();
        Ok((matching.len(), items))
    }

    fn was_deleted(&self, sha256: &str) -> anyhow::Result<bool> {
        self.check_up()?;
        Ok(self.inner.read().unwrap().deleted_shas.contains(sha256))
    }

    fn find_sha256(&self, sha256: &str) -> anyhow::Result<Option<u64>> {
        self.check_up()?;
        Ok(self.inner.read().unwrap().by_sha.get(sha256).copied())
    }

    fn add_durable(&self, new: NewGalleryItem) -> anyhow::Result<AddOutcome> {
        self.check_up()?;
        let mut g = self.inner.write().unwrap();
        if let Some(&id) = g.by_sha.get(&new.sha256) {
            return Ok(AddOutcome {
                id,
                duplicate: true,
            });
        }
        if let Some(m) = &new.metadata {
            indexer::filter::validate_metadata(serde_json::Value::Object(m.clone()))?;
        }
        let id = g.items.len() as u64;
        g.by_sha.insert(new.sha256.clone(), id);
        g.deleted_shas.remove(&new.sha256);
        g.items.push((
            GalleryItem {
                id,
                path: new.path,
                label: new.label,
                sha256: new.sha256,
                metadata: new.metadata,
            },
            new.embedding,
        ));
        Ok(AddOutcome {
            id,
            duplicate: false,
        })
    }

    fn len(&self) -> anyhow::Result<usize> {
        self.check_up()?;
        let g = self.inner.read().unwrap();
        Ok(g.items.len() - g.deleted.len())
    }
}

/// CRC-32 (IEEE), as PNG chunks use.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A well-formed PNG header (signature + IHDR with a valid CRC) that claims `width × height`
/// RGB pixels, followed by a tiny IDAT and IEND: a decompression-bomb probe. A server that
/// allocates from the header alone would ask for `3 × width × height` bytes.
pub fn png_bomb_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::with_capacity(13);
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit, RGB, deflate, no filter, no interlace
    chunk(&mut out, b"IHDR", &ihdr);
    // A zlib stream of a few zero bytes: far too little data for the claimed size.
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_matches_the_png_reference() {
        // CRC of the IEND chunk type, present in every PNG: AE 42 60 82.
        assert_eq!(crc32(b"IEND"), 0xae42_6082);
    }

    #[test]
    fn bomb_header_reports_its_claimed_size() {
        let bytes = png_bomb_header(100_000, 100_000);
        let reader =
            image::ImageReader::with_format(std::io::Cursor::new(&bytes), image::ImageFormat::Png);
        assert_eq!(reader.into_dimensions().unwrap(), (100_000, 100_000));
    }
}
