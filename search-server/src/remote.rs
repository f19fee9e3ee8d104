//! The gallery in a remote vector engine (`--store postgres://…`): indexer's [`PgStore`]
//! behind [`SearchBackend`].
//!
//! Every call is one transaction on a pooled connection, so an upload is committed in the
//! engine before its 200 and a delete leaves every search (of every server sharing the
//! collection) at once. While the engine is down, calls fail with
//! [`indexer::remote::RemoteError::Unavailable`] (answered 503); the pool replaces the dead
//! connections, so the server recovers by itself once the engine is back.

use std::path::PathBuf;

use anyhow::{anyhow, Context};
use indexer::remote::{PgStore, RemoteError};
use indexer::{Filter, HnswParams, ItemMeta, NewItem};
use trainer::checkpoint::ModelIdentity;

use crate::backend::{AddOutcome, GalleryItem, NewGalleryItem, SearchBackend, SearchHit};

/// Connections one server keeps to the engine: enough for the blocking pool's concurrent
/// searches on a small machine, few enough that many servers fit a PostgreSQL's
/// `max_connections` (100 by default).
pub const POOL_SIZE: u32 = 16;

pub struct RemoteGallery {
    store: PgStore,
    /// HNSW search breadth (raised to k when k is larger).
    ef: usize,
    /// Base of relative item paths (collections built by `indexer build --images ROOT`).
    images_root: Option<PathBuf>,
}

impl RemoteGallery {
    /// Opens the collection at `url`, creating an empty one for `model` when there is none;
    /// one built with another model is refused, naming both.
    pub fn open_or_create(
        url: &str,
        model: &ModelIdentity,
        ef: usize,
        images_root: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let store = PgStore::open_or_create(url, model, HnswParams::default(), POOL_SIZE)
            .with_context(|| {
                format!(
                    "cannot use the remote store {}",
                    indexer::remote::redact(url)
                )
            })?;
        Ok(Self {
            store,
            ef,
            images_root,
        })
    }

    pub fn describe(&self) -> String {
        self.store.describe()
    }

    fn to_item(&self, m: ItemMeta) -> GalleryItem {
        let p = PathBuf::from(&m.path);
        let path = match &self.images_root {
            Some(root) if p.is_relative() => root.join(p),
            _ => p,
        };
        GalleryItem {
            id: m.id,
            path,
            label: m.label,
            sha256: m.sha256,
            metadata: m.metadata,
        }
    }

    fn new_item(item: NewGalleryItem) -> NewItem {
        NewItem {
            path: item.path.to_string_lossy().into_owned(),
            label: item.label,
            sha256: item.sha256,
            metadata: item.metadata,
            vector: item.embedding,
        }
    }
}

impl SearchBackend for RemoteGallery {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Vec<SearchHit>> {
        let hits = self.store.search(query, k, self.ef.max(k), filter, false)?;
        Ok(hits
            .into_iter()
            .map(|(h, m)| SearchHit {
                item: self.to_item(m),
                score: h.score,
            })
            .collect())
    }

    fn item(&self, id: u64) -> anyhow::Result<Option<GalleryItem>> {
        Ok(self.store.item(id)?.map(|m| self.to_item(m)))
    }

    fn vector(&self, id: u64) -> anyhow::Result<Option<Vec<f32>>> {
        Ok(self.store.vector(id)?)
    }

    fn delete(&self, id: u64) -> anyhow::Result<bool> {
        match self.store.delete(&[id]) {
            Ok(()) => Ok(true),
            Err(RemoteError::NoSuchItem(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn page(
        &self,
        offset: usize,
        limit: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<(usize, Vec<GalleryItem>)> {
        let (total, items) = self.store.page(offset, limit, filter)?;
        Ok((total, items.into_iter().map(|m| self.to_item(m)).collect()))
    }

    fn was_deleted(&self, sha256: &str) -> anyhow::Result<bool> {
        Ok(self.store.was_deleted(sha256)?)
    }

    fn find_sha256(&self, sha256: &str) -> anyhow::Result<Option<u64>> {
        Ok(self.store.find_sha256(sha256)?)
    }

    fn add_durable(&self, item: NewGalleryItem) -> anyhow::Result<AddOutcome> {
        self.add_batch(vec![item])?
            .pop()
            .ok_or_else(|| anyhow!("the store neither added nor matched the item"))
    }

    /// One transaction: every item is in the engine (committed) when this returns.
    fn add_batch(&self, items: Vec<NewGalleryItem>) -> anyhow::Result<Vec<AddOutcome>> {
        let (_, each) = self
            .store
            .add_each(items.into_iter().map(Self::new_item).collect())?;
        Ok(each
            .into_iter()
            .map(|(id, duplicate)| AddOutcome { id, duplicate })
            .collect())
    }

    fn len(&self) -> anyhow::Result<usize> {
        Ok(self.store.count()?)
    }
}
