//! The real gallery: `indexer`'s on-disk [`GalleryIndex`] behind [`SearchBackend`].
//!
//! Searches share a read lock; an add takes the write lock for one WAL append + fsync
//! (`append_durable`), so it is durable and visible when the lock is released. The start-up
//! scan adds in chunks with one fsync per chunk and commits once at the end; a clean
//! shutdown commits too, folding the WAL into a new generation.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use anyhow::{anyhow, Context};
use indexer::{Filter, GalleryIndex, HnswParams, ItemMeta, NewItem, StoreError};
use trainer::checkpoint::ModelIdentity;

use crate::backend::{AddOutcome, GalleryItem, NewGalleryItem, SearchBackend, SearchHit};

pub struct IndexGallery {
    index: RwLock<GalleryIndex>,
    /// HNSW search breadth (raised to k when k is larger).
    ef: usize,
    /// Base of relative item paths (indexes built by `indexer build --images ROOT`).
    images_root: Option<PathBuf>,
}

/// Why the index cannot be served with this model.
pub fn mismatch_message(
    dir: &Path,
    index: &ModelIdentity,
    model: &ModelIdentity,
    why: &str,
) -> String {
    format!(
        "the index in {} was built with a different model ({why}): index has {} ({}-d, weights sha256 {}…), \
         the server loaded {} ({}-d, weights sha256 {}…). Start the server with the model the index was built \
         with (--model/--weights), or rebuild the index with this one",
        dir.display(),
        index.backbone,
        index.dim,
        &index.weights_sha256[..index.weights_sha256.len().min(12)],
        model.backbone,
        model.dim,
        &model.weights_sha256[..model.weights_sha256.len().min(12)],
    )
}

impl IndexGallery {
    /// Opens the index in `dir`, refusing one built with another model.
    pub fn open(
        dir: &Path,
        model: &ModelIdentity,
        ef: usize,
        images_root: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let index = GalleryIndex::open(dir)
            .with_context(|| format!("cannot open the index in {}", dir.display()))?;
        for w in index.warnings() {
            tracing::warn!("index {}: {w}", dir.display());
        }
        if let Err(e) = model.ensure_matches(index.identity()) {
            return Err(anyhow!(mismatch_message(
                dir,
                index.identity(),
                model,
                &e.to_string()
            )));
        }
        Ok(Self {
            index: RwLock::new(index),
            ef,
            images_root,
        })
    }

    /// Opens the index in `dir`, creating an empty one for `model` when there is none.
    /// Index files without a manifest are an error (naming them), never a new empty index
    /// whose first commit would delete them.
    pub fn open_or_create(dir: &Path, model: &ModelIdentity, ef: usize) -> anyhow::Result<Self> {
        if GalleryIndex::exists(dir)? {
            return Self::open(dir, model, ef, None);
        }
        tracing::info!("creating a new index in {}", dir.display());
        let index = GalleryIndex::create(dir, model.clone(), model.dim, HnswParams::default())
            .with_context(|| format!("cannot create an index in {}", dir.display()))?;
        Ok(Self {
            index: RwLock::new(index),
            ef,
            images_root: None,
        })
    }

    fn read(&self) -> RwLockReadGuard<'_, GalleryIndex> {
        // Writers validate before mutating, so a panic elsewhere leaves a usable index.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, GalleryIndex> {
        self.index.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the index's writer lock for the life of the server, so a second writer is
    /// refused at start-up (not with a 500 at its first add).
    pub fn lock_for_writing(&self) -> anyhow::Result<()> {
        let mut g = self.write();
        let dir = g.dir().to_path_buf();
        g.lock_for_writing()
            .with_context(|| format!("cannot write the index in {}", dir.display()))
    }

    /// Writes a new generation (start-up scan done, clean shutdown).
    pub fn commit(&self) -> anyhow::Result<()> {
        let mut g = self.write();
        g.commit()
            .with_context(|| format!("cannot commit the index in {}", g.dir().display()))
    }

    /// The item's file, resolving a relative path against `images_root`.
    fn to_item(&self, m: &ItemMeta) -> GalleryItem {
        let p = PathBuf::from(&m.path);
        let path = match &self.images_root {
            Some(root) if p.is_relative() => root.join(p),
            _ => p,
        };
        GalleryItem {
            id: m.id,
            path,
            label: m.label.clone(),
            sha256: m.sha256.clone(),
            metadata: m.metadata.clone(),
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

    /// The first item whose file cannot be found, to warn about a wrong `--images-root`.
    pub fn first_missing_file(&self) -> Option<PathBuf> {
        let g = self.read();
        g.items()
            .iter()
            .filter(|m| !m.deleted)
            .take(20)
            .map(|m| self.to_item(m).path)
            .find(|p| !p.is_file())
    }
}

impl SearchBackend for IndexGallery {
    fn search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<Vec<SearchHit>> {
        let g = self.read();
        if GalleryIndex::is_empty(&g) {
            return Ok(Vec::new());
        }
        g.validate_query(query)?;
        let hits = g.search_filtered(query, k, self.ef.max(k), filter);
        Ok(hits
            .into_iter()
            .filter_map(|h| {
                g.item(h.id).map(|m| SearchHit {
                    item: self.to_item(m),
                    score: h.score,
                })
            })
            .collect())
    }

    fn item(&self, id: u64) -> anyhow::Result<Option<GalleryItem>> {
        Ok(self.read().item(id).map(|m| self.to_item(m)))
    }

    fn find_sha256(&self, sha256: &str) -> anyhow::Result<Option<u64>> {
        Ok(self.read().find_sha256(sha256))
    }

    fn vector(&self, id: u64) -> anyhow::Result<Option<Vec<f32>>> {
        let g = self.read();
        if g.item(id).is_none() {
            return Ok(None);
        }
        Ok(g.vector(id).map(<[f32]>::to_vec))
    }

    fn delete(&self, id: u64) -> anyhow::Result<bool> {
        let mut g = self.write();
        match g.delete_durable(&[id]) {
            Ok(()) => Ok(true),
            Err(StoreError::NoSuchItem(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    fn page(
        &self,
        offset: usize,
        limit: usize,
        filter: Option<&Filter>,
    ) -> anyhow::Result<(usize, Vec<GalleryItem>)> {
        let g = self.read();
        let page = g.page(offset, limit, filter);
        Ok((
            page.total,
            page.items.into_iter().map(|m| self.to_item(m)).collect(),
        ))
    }

    fn was_deleted(&self, sha256: &str) -> anyhow::Result<bool> {
        Ok(self.read().was_deleted(sha256))
    }

    fn add_durable(&self, item: NewGalleryItem) -> anyhow::Result<AddOutcome> {
        let mut g = self.write();
        if let Some(id) = g.find_sha256(&item.sha256) {
            return Ok(AddOutcome {
                id,
                duplicate: true,
            });
        }
        let report = g.append_durable(Self::new_item(item))?;
        match (report.added.first(), report.duplicates.first()) {
            (Some(&id), _) => Ok(AddOutcome {
                id,
                duplicate: false,
            }),
            (None, Some(&(_, id))) => Ok(AddOutcome {
                id,
                duplicate: true,
            }),
            (None, None) => Err(anyhow!("the index neither added nor matched the item")),
        }
    }

    fn add_batch(&self, items: Vec<NewGalleryItem>) -> anyhow::Result<Vec<AddOutcome>> {
        let shas: Vec<String> = items.iter().map(|i| i.sha256.clone()).collect();
        let mut g = self.write();
        let report = g.add(items.into_iter().map(Self::new_item).collect())?;
        g.make_durable()?;
        let added: HashSet<u64> = report.added.into_iter().collect();
        shas.iter()
            .map(|sha| {
                let id = g
                    .find_sha256(sha)
                    .ok_or_else(|| anyhow!("item {sha} missing after add"))?;
                Ok(AddOutcome {
                    id,
                    duplicate: !added.contains(&id),
                })
            })
            .collect()
    }

    fn len(&self) -> anyhow::Result<usize> {
        Ok(self.read().live_len())
    }

    fn close(&self) -> anyhow::Result<()> {
        self.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trainer::backbone::BackboneKind;

    fn identity(weights: &str) -> ModelIdentity {
        ModelIdentity {
            backbone: BackboneKind::EfficientnetLite0,
            dim: 3,
            weights_sha256: weights.repeat(64 / weights.len()),
            preprocess_sha256: "0".repeat(64),
        }
    }

    fn item(path: &str, sha: &str, v: [f32; 3]) -> NewGalleryItem {
        NewGalleryItem {
            path: PathBuf::from(path),
            label: Some("l".into()),
            sha256: sha.into(),
            metadata: None,
            embedding: v.to_vec(),
        }
    }

    #[test]
    fn durable_adds_survive_reopen_and_a_mismatched_model_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("index");
        {
            let g = IndexGallery::open_or_create(&idx, &identity("a"), 16).unwrap();
            assert!(
                g.search(&[1.0, 0.0, 0.0], 3, None).unwrap().is_empty(),
                "empty index searches fine"
            );
            let out = g
                .add_batch(vec![
                    item("/x/r.png", "r", [1.0, 0.0, 0.0]),
                    item("/x/g.png", "g", [0.0, 1.0, 0.0]),
                ])
                .unwrap();
            assert_eq!(
                out,
                vec![
                    AddOutcome {
                        id: 0,
                        duplicate: false
                    },
                    AddOutcome {
                        id: 1,
                        duplicate: false
                    }
                ]
            );
            assert_eq!(
                g.add_durable(item("/x/b.png", "b", [0.0, 0.0, 1.0]))
                    .unwrap(),
                AddOutcome {
                    id: 2,
                    duplicate: false
                }
            );
            assert_eq!(
                g.add_durable(item("/y/b.png", "b", [0.0, 0.0, 1.0]))
                    .unwrap(),
                AddOutcome {
                    id: 2,
                    duplicate: true
                }
            );
            let hits = g.search(&[0.1, 0.0, 0.9], 2, None).unwrap();
            assert_eq!(hits[0].item.id, 2);
            assert!(hits[0].score > hits[1].score);
            // Dropped without commit: the WAL must carry the adds.
        }
        let g = IndexGallery::open_or_create(&idx, &identity("a"), 16).unwrap();
        assert_eq!(g.len().unwrap(), 3);
        assert_eq!(g.find_sha256("g").unwrap(), Some(1));
        assert_eq!(g.item(2).unwrap().unwrap().path, PathBuf::from("/x/b.png"));
        g.close().unwrap();
        drop(g);

        let err = IndexGallery::open(&idx, &identity("b"), 16, None)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("different model") && err.contains("--model"),
            "{err}"
        );
    }

    #[test]
    fn index_files_without_a_manifest_are_refused_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("index");
        let g = IndexGallery::open_or_create(&idx, &identity("a"), 16).unwrap();
        g.add_durable(item("/x/r.png", "r", [1.0, 0.0, 0.0]))
            .unwrap();
        g.close().unwrap();
        g.add_durable(item("/x/g.png", "g", [0.0, 1.0, 0.0]))
            .unwrap();
        drop(g);
        std::fs::remove_file(idx.join("manifest.json")).unwrap();
        let names = || {
            let mut v: Vec<_> = std::fs::read_dir(&idx)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let before = names();
        let err = format!(
            "{:#}",
            IndexGallery::open_or_create(&idx, &identity("a"), 16)
                .err()
                .unwrap()
        );
        assert!(
            err.contains("no manifest.json") && err.contains("vectors.g1.f32"),
            "{err}"
        );
        assert_eq!(names(), before);
    }

    #[test]
    fn a_second_writer_is_refused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("index");
        let g = IndexGallery::open_or_create(&idx, &identity("a"), 16).unwrap();
        g.lock_for_writing().unwrap();
        let second = IndexGallery::open(&idx, &identity("a"), 16, None).unwrap();
        let err = format!("{:#}", second.lock_for_writing().unwrap_err());
        assert!(err.contains("another process"), "{err}");
    }

    #[test]
    fn relative_paths_resolve_against_the_images_root() {
        let dir = tempfile::tempdir().unwrap();
        let idx = dir.path().join("index");
        let g = IndexGallery::open_or_create(&idx, &identity("a"), 16).unwrap();
        g.add_batch(vec![item("birds/1.jpg", "s1", [1.0, 0.0, 0.0])])
            .unwrap();
        g.close().unwrap();
        drop(g);
        let g =
            IndexGallery::open(&idx, &identity("a"), 16, Some(PathBuf::from("/data/cub"))).unwrap();
        assert_eq!(
            g.item(0).unwrap().unwrap().path,
            PathBuf::from("/data/cub/birds/1.jpg")
        );
        assert_eq!(
            g.first_missing_file(),
            Some(PathBuf::from("/data/cub/birds/1.jpg"))
        );
    }
}
