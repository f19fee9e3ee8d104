//! Deep Metric's gallery index: image embeddings on disk, searchable through HNSW.
//!
//! # On-disk layout and durability
//!
//! An index is a directory:
//!
//! | file | content |
//! |---|---|
//! | `manifest.json` | format name + version, model identity, dim, metric, HNSW params, generation, item count, name/size/SHA-256 of every file below, and its own SHA-256 |
//! | `vectors.g<N>.f32` | raw little-endian f32, `count × dim`, L2-normalised; row i = item id i |
//! | `items.g<N>.jsonl` | one `ItemMeta` JSON per line (id, path, label, content sha256) |
//! | `graph.g<N>.layers` | the layered graph (format 4; see [`layered`]): fixed-stride neighbour rows and levels |
//! | `graph.g<N>.hnsw.graph` / `.hnsw.data` | instead, in an index built before format 4: the hnsw_rs dump of the graph |
//! | `codes.g<N>.int8` | with `--quantize int8`: the int8 copy of the vectors the graph walk reads (see [`quant`]) |
//! | `wal.g<N>.log` | write-ahead log of items added after generation N was committed (header written by the commit) |
//! | `LOCK` | exclusive lock held by the one process that writes |
//!
//! All file IO goes through [`store`] (atomic replace, fsync of file and directory, verified
//! reads, the lock, staged creation); errors are [`StoreError`]s naming the file.
//!
//! **Commit** ([`GalleryIndex::commit`]) writes generation N+1's files (and its empty WAL)
//! under new names, fsyncs them and the directory, then replaces `manifest.json` by rename
//! (the commit point), fsyncs the directory and only then deletes generation N. Whatever
//! instant a process is killed, the manifest names a complete, checksummed generation;
//! leftovers of the interrupted commit are ignored by `open` and deleted by the next commit.
//! A commit rewrites everything (the graph files are not appended to), so it costs
//! O(gallery).
//!
//! **Single durable adds** ([`GalleryIndex::append_durable`]) append a batch of checksummed
//! records to the generation's WAL, fsync, then a commit record, fsync; `open` replays the
//! log into memory. A batch without its commit record was never acknowledged and is dropped
//! with a warning; a damaged acknowledged record, or a missing or foreign log, is an error
//! naming the file (see [`wal`]); [`GalleryIndex::open_salvaging_wal`] (`indexer recover`)
//! is the explicit way past it.
//!
//! **Open** ([`GalleryIndex::open`]) checks format/version and the manifest's own checksum,
//! then every file's size and SHA-256 against the manifest: a bad vectors, items or WAL file
//! is an error naming it; a bad or missing graph is rebuilt from the vectors with a warning,
//! because the vectors are the source of truth and the graph is derived. Loading the dump is
//! much faster than rebuilding (see `bench/RESULTS-indexer.md`). Index files without a
//! manifest are an error ([`StoreError::NoManifest`]), never an empty index.
//!
//! **Memory**: the vectors, the int8 codes and the layered graph are memory-mapped, not
//! read onto the heap ([`vectors`], [`store::Directory::map_verified`]), so a search
//! process's resident set follows what its searches touch (with int8: codes and graph for
//! the walk, `ef` f32 rows per query for the re-rank). The checksum is still checked at
//! every open, through the map, dropping each chunk again. Mapping is safe because files
//! are immutable: a commit writes new names, and retiring a generation unlinks its files,
//! which a reader that still maps them keeps until it closes. Rows added after the open
//! (WAL replay, adds) live on the heap until the next commit, which maps its new files.
//!
//! **Create** ([`GalleryIndex::create_with`], used by `indexer build`) writes the new index in
//! a hidden sibling directory and renames it into place at the end, so an interrupted build
//! leaves nothing that a rerun would refuse.
//!
//! Distances: vectors are L2-normalised on the way in; the graph uses Euclidean distance
//! and [`Hit::score`] is the cosine similarity `1 − d²/2`.

pub mod bench;
pub mod commands;
pub mod distance;
pub mod export;
pub mod filter;
pub mod flat;
pub mod gallery;
pub mod graph;
pub mod images;
pub mod layered;
pub mod manifest;
pub mod params;
pub mod quant;
pub mod remote;
pub mod remote_bench;
pub mod storage;
pub mod store;
pub mod synthetic;
pub mod vectors;
pub mod wal;

#[cfg(test)]
mod gallery_tests;

pub use filter::{Filter, FilterError, Metadata};
pub use gallery::{GalleryIndex, Page};
pub use params::HnswParams;
pub use store::StoreError;
pub use trainer::checkpoint::ModelIdentity;

use serde::{Deserialize, Serialize};

/// What the index knows about one gallery image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemMeta {
    /// Dense, assigned in insertion order from 0.
    pub id: u64,
    /// Path as given at indexing time (relative to the `--images` root when built from one).
    pub path: String,
    pub label: Option<String>,
    /// SHA-256 of the image file's bytes; duplicates are detected by it.
    pub sha256: String,
    /// The item's metadata (a JSON object, see [`filter`]); absent in indexes written
    /// before metadata existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
    /// Deleted: a tombstone kept so ids stay dense (row i = id i). Its label, path and
    /// metadata are gone; its vector stays in the graph as a waypoint that is never
    /// returned, and its sha256 stays so a folder scan does not bring it back.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// An item to add: its metadata and embedding (any length-`dim` non-zero vector; it is
/// normalised on insertion).
#[derive(Debug, Clone, PartialEq)]
pub struct NewItem {
    pub path: String,
    pub label: Option<String>,
    pub sha256: String,
    /// Checked by [`filter::validate_metadata`] on add.
    pub metadata: Option<Metadata>,
    pub vector: Vec<f32>,
}

/// Outcome of an add.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddReport {
    /// Ids given to the new items, in input order.
    pub added: Vec<u64>,
    /// `(path, id of the item already holding this content)` for each skipped duplicate.
    pub duplicates: Vec<(String, u64)>,
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u64,
    /// Euclidean distance between the unit vectors.
    pub distance: f32,
    /// Cosine similarity, `1 − distance² / 2`.
    pub score: f32,
}
