//! The two things the HTTP layer needs from the outside world, as small traits: a model that
//! turns images into vectors and a gallery that finds the nearest stored vectors.
//!
//! Keeping them abstract lets the routes, batching and error handling be tested with the
//! deterministic fakes in [`crate::testing`], in milliseconds, while the binary wires the
//! real EfficientNet embedder and the on-disk HNSW index ([`crate::real`]).

use std::path::PathBuf;

use image::DynamicImage;
use indexer::{Filter, Metadata};
use serde::Serialize;

/// Turns decoded images into L2-normalised embeddings. Called only from the inference
/// thread(s), never from the async workers, so it may take as long as it needs.
pub trait EmbedBackend: Send + Sync + 'static {
    /// One vector of length [`EmbedBackend::dim`] per input image, in order.
    fn embed(&self, images: &[DynamicImage]) -> anyhow::Result<Vec<Vec<f32>>>;
    /// Reduces a decoded image to what the model reads (its input view), so a large decode
    /// can be dropped at once instead of waiting for its batch. `embed_prepared` of the
    /// result must equal `embed` of the original. Default: the image itself.
    fn prepare(&self, image: DynamicImage) -> DynamicImage {
        image
    }
    /// [`EmbedBackend::embed`] for images that went through [`EmbedBackend::prepare`].
    fn embed_prepared(&self, images: &[DynamicImage]) -> anyhow::Result<Vec<Vec<f32>>> {
        self.embed(images)
    }
    /// Dimension of the vectors.
    fn dim(&self) -> usize;
    /// A short human description of the model, shown on `/healthz` and the page.
    fn describe(&self) -> String;
}

/// One image of the gallery, as recorded in the index.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GalleryItem {
    pub id: u64,
    /// Where the image file lives. Only paths recorded here are ever served.
    pub path: PathBuf,
    pub label: Option<String>,
    /// SHA-256 of the file's bytes, hex.
    pub sha256: String,
    /// The JSON object stored with the item, if any.
    pub metadata: Option<Metadata>,
}

/// A search result: the item and its similarity (higher is closer; cosine for unit vectors).
#[derive(Debug, Clone, PartialEq)]
pub struct SearchHit {
    pub item: GalleryItem,
    pub score: f32,
}

/// What to store for a new gallery image.
#[derive(Debug, Clone)]
pub struct NewGalleryItem {
    pub path: PathBuf,
    pub label: Option<String>,
    pub sha256: String,
    /// Checked by the index ([`indexer::filter::validate_metadata`]).
    pub metadata: Option<Metadata>,
    pub embedding: Vec<f32>,
}

/// Result of an add: the id, and whether the same bytes were already in the gallery (in
/// which case nothing was written and `id` is the existing item's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddOutcome {
    pub id: u64,
    pub duplicate: bool,
}

/// The gallery index. Implementations do their own locking: searches run concurrently
/// from the blocking pool while adds come in. Every method may block (a remote store waits
/// on the network), so the routes call them through `web::block`; an engine that cannot be
/// reached is an error [`is_unavailable`] recognises (answered 503).
pub trait SearchBackend: Send + Sync + 'static {
    /// The `k` nearest items to `query` among those `filter` matches (all when `None`),
    /// best first. Deleted items are never returned.
    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Vec<SearchHit>>;
    /// The live item with this id (`None` when unknown or deleted).
    fn item(&self, id: u64) -> anyhow::Result<Option<GalleryItem>>;
    /// The stored (unit) embedding of a live item, for "more like this".
    fn vector(&self, id: u64) -> anyhow::Result<Option<Vec<f32>>>;
    /// Deletes an item; returns only once the delete is durable (a deleted item never
    /// comes back after `kill -9`) and the item has left every search. `Ok(false)` when
    /// there is no live item with this id.
    fn delete(&self, id: u64) -> anyhow::Result<bool>;
    /// Live items matching `filter` in id order from `offset`, at most `limit`, with the
    /// total that match.
    fn page(
        &self,
        offset: usize,
        limit: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<(usize, Vec<GalleryItem>)>;
    /// Whether content with this hash was deleted (and not added again): the start-up
    /// folder scan leaves such files out, so a delete sticks across restarts.
    fn was_deleted(&self, _sha256: &str) -> anyhow::Result<bool> {
        Ok(false)
    }
    /// The id of the item whose file has this SHA-256, if any.
    fn find_sha256(&self, sha256: &str) -> anyhow::Result<Option<u64>>;
    /// Adds an item; returns only once the item is durable (survives `kill -9`) and is
    /// visible to [`SearchBackend::search`]. Adding bytes already present is a no-op that
    /// returns the existing id.
    fn add_durable(&self, item: NewGalleryItem) -> anyhow::Result<AddOutcome>;
    /// Adds many items (the start-up folder scan, a batch upload), durable when it returns.
    /// All are checked before any is added, so an invalid one adds none. The default adds
    /// them one by one; an index with a cheaper bulk path overrides it.
    fn add_batch(&self, items: Vec<NewGalleryItem>) -> anyhow::Result<Vec<AddOutcome>> {
        items.into_iter().map(|i| self.add_durable(i)).collect()
    }
    /// Flushes whatever the index keeps in a log into its main files (clean shutdown).
    fn close(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Live (not deleted) items.
    fn len(&self) -> anyhow::Result<usize>;
    fn is_empty(&self) -> anyhow::Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// Whether `e` says the gallery's engine cannot be reached right now (a remote store that
/// is down or restarting): the client should retry, and the server recovers by itself.
pub fn is_unavailable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        matches!(
            c.downcast_ref::<indexer::remote::RemoteError>(),
            Some(indexer::remote::RemoteError::Unavailable { .. })
        )
    })
}
