//! The storage interface of the `indexer` commands: where a gallery lives — the embedded
//! HNSW index in a directory (`--index DIR`, the default) or a collection in a remote
//! vector engine (`--store postgres://…`, see [`crate::remote`]) — and what a command may
//! do with it. Both keep the same promises: an add or delete is durable when it returns,
//! the model identity travels with the gallery and another model is refused.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use trainer::checkpoint::ModelIdentity;

use crate::commands::ModelSource;
use crate::filter::Filter;
use crate::remote::{PgStore, RemoteError};
use crate::{AddReport, GalleryIndex, Hit, ItemMeta, NewItem};

/// Connections a command-line store keeps (the benchmark's parallel queries use them).
pub const CLI_POOL: u32 = 8;

/// Where a gallery lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded store: an index directory.
    Index(PathBuf),
    /// A remote store URL (`postgres://USER@HOST:PORT/DB?collection=NAME`).
    Remote(String),
}

impl Location {
    /// From the `--index` / `--store` pair of a command (exactly one must be given).
    pub fn from_args(index: Option<PathBuf>, store: Option<String>) -> Result<Self> {
        match (index, store) {
            (Some(dir), None) => Ok(Location::Index(dir)),
            (None, Some(url)) => Ok(Location::Remote(url)),
            (Some(_), Some(_)) => bail!("give --index DIR or --store URL, not both"),
            (None, None) => {
                bail!("give --index DIR (an index on disk) or --store URL (a remote store)")
            }
        }
    }

    /// For messages: the directory, or the URL without its password.
    pub fn describe(&self) -> String {
        match self {
            Location::Index(dir) => dir.display().to_string(),
            Location::Remote(url) => crate::remote::redact(url),
        }
    }
}

/// One search result and its item.
pub type StoredHit = (Hit, ItemMeta);

/// What the commands need from a gallery store.
pub trait GalleryStore {
    /// `index DIR` or `collection 'NAME' at HOST`, for messages.
    fn describe(&self) -> String;
    /// The model whose vectors the store holds.
    fn identity(&self) -> &ModelIdentity;
    /// The model recorded when the gallery was built (to embed queries without `--model`).
    fn model_source(&self) -> Result<ModelSource>;
    /// Adds items, durable when it returns; known content is reported as duplicate.
    fn add(&mut self, items: Vec<NewItem>) -> Result<AddReport>;
    /// Deletes items (all or none), durable and out of every search when it returns.
    fn delete(&mut self, ids: &[u64]) -> Result<()>;
    /// The `k` nearest live items matching `filter`, through the HNSW graph (`ef` wide) or
    /// exactly.
    fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        exact: bool,
    ) -> Result<Vec<StoredHit>>;
    /// The live item holding this content, if any.
    fn find_sha256(&self, sha256: &str) -> Result<Option<u64>>;
    /// Live items.
    fn count(&self) -> Result<usize>;
}

/// Opens the gallery at `location`; `write` takes the embedded index's writer lock now, so
/// a concurrent writer is refused before any embedding work.
pub fn open(location: &Location, write: bool) -> Result<Box<dyn GalleryStore>> {
    match location {
        Location::Index(dir) => {
            let mut index = GalleryIndex::open(dir)?;
            if write {
                index.lock_for_writing()?;
            }
            Ok(Box::new(index))
        }
        Location::Remote(url) => Ok(Box::new(PgStore::open(url, CLI_POOL)?)),
    }
}

impl GalleryStore for GalleryIndex {
    fn describe(&self) -> String {
        format!("index {}", self.dir().display())
    }

    fn identity(&self) -> &ModelIdentity {
        GalleryIndex::identity(self)
    }

    fn model_source(&self) -> Result<ModelSource> {
        ModelSource::read(self.dir())
    }

    /// In memory, then one commit (the CLI writes whole batches).
    fn add(&mut self, items: Vec<NewItem>) -> Result<AddReport> {
        let report = GalleryIndex::add(self, items)?;
        self.commit()?;
        Ok(report)
    }

    /// Durable at once (a WAL batch of tombstones), then compacted by a commit.
    fn delete(&mut self, ids: &[u64]) -> Result<()> {
        let dir = self.dir().to_path_buf();
        self.delete_durable(ids)
            .with_context(|| format!("{}: nothing was deleted", dir.display()))?;
        self.commit()?;
        Ok(())
    }

    fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        exact: bool,
    ) -> Result<Vec<StoredHit>> {
        self.validate_query(query)?;
        let hits = if exact {
            self.search_exact_filtered(query, k, filter)
        } else {
            self.search_filtered(query, k, ef.max(k), filter)
        };
        hits.into_iter()
            .map(|h| {
                let item = self
                    .item(h.id)
                    .ok_or_else(|| anyhow!("search returned an unknown id {}", h.id))?;
                Ok((h, item.clone()))
            })
            .collect()
    }

    fn find_sha256(&self, sha256: &str) -> Result<Option<u64>> {
        Ok(GalleryIndex::find_sha256(self, sha256))
    }

    fn count(&self) -> Result<usize> {
        Ok(self.live_len())
    }
}

impl GalleryStore for PgStore {
    fn describe(&self) -> String {
        PgStore::describe(self)
    }

    fn identity(&self) -> &ModelIdentity {
        PgStore::identity(self)
    }

    fn model_source(&self) -> Result<ModelSource> {
        let record = self.model_record().ok_or_else(|| {
            anyhow!(
                "{} does not record its model (it was created by the search server); pass --model",
                self.describe()
            )
        })?;
        serde_json::from_value(record.clone())
            .with_context(|| format!("{}: invalid model record", self.describe()))
    }

    fn add(&mut self, items: Vec<NewItem>) -> Result<AddReport> {
        Ok(PgStore::add(self, items)?)
    }

    fn delete(&mut self, ids: &[u64]) -> Result<()> {
        PgStore::delete(self, ids).map_err(|e| match e {
            RemoteError::NoSuchItem(_) => anyhow!("{}: {e}", self.describe()),
            other => other.into(),
        })
    }

    fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        exact: bool,
    ) -> Result<Vec<StoredHit>> {
        Ok(PgStore::search(self, query, k, ef, filter, exact)?)
    }

    fn find_sha256(&self, sha256: &str) -> Result<Option<u64>> {
        Ok(PgStore::find_sha256(self, sha256)?)
    }

    fn count(&self) -> Result<usize> {
        Ok(PgStore::count(self)?)
    }
}

/// Refuses a model whose vectors are not comparable with the store's.
pub fn ensure_model(store: &dyn GalleryStore, model: &ModelIdentity) -> Result<()> {
    model.ensure_matches(store.identity()).map_err(|e| {
        anyhow!(
            "{e}: the {} was built with another model, and its vectors are not comparable with this one's; use its model (omit --model) or build a new one",
            store.describe()
        )
    })
}
