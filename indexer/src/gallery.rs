//! [`GalleryIndex`]: the on-disk gallery — vectors, item metadata, model identity and the
//! HNSW graph — with atomic commits and a write-ahead log. See the crate docs for the layout.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use trainer::checkpoint::ModelIdentity;

use crate::distance::{self, cosine_from_distance, distance_from_cosine};
use crate::filter::{self, Filter};
use crate::graph::{Graph, StoredGraph, DATA_SUFFIX, GRAPH_SUFFIX, LAYERED_SUFFIX};
use crate::manifest::{Manifest, FORMAT, FORMAT_VERSION, MANIFEST_FILE, METRIC};
use crate::params::HnswParams;
use crate::params::Quantize;
use crate::quant::Int8Codes;
use crate::store::{DirLock, Directory, FileEntry, Result, Staging, StoreError as Error};
use crate::vectors::{Rows, Vectors};
use crate::wal::{self, WalWriter};
use crate::{AddReport, Hit, ItemMeta, NewItem};

/// Advisory lock file held by the process that writes the index.
pub const LOCK_FILE: &str = "LOCK";

/// Exact search over fewer rows than this stays on one thread.
const PARALLEL_EXACT_MIN: usize = 20_000;

/// A filtered search whose filter is estimated to match at most this many items scans the
/// matches exactly instead of walking the graph: below it the walk must pass through so
/// many rejected nodes to gather `ef` matches that scoring every match is cheaper (and
/// exact). Measured with `indexer bench-synthetic --filter-selectivity` on 100k × 128-d
/// (`bench/RESULTS-indexer.md`, "Filtered search"): at recall@10 ≥ 0.99 the exact scan wins
/// at 5,000 matches (270 vs 95 QPS) and the walk at 10,000 (420 vs 339 QPS); the crossover
/// lies between, so 7,500.
pub const EXACT_FILTER_MAX: usize = 7_500;

/// Items a filter is tried on to estimate how many it matches (strided over the ids).
const SELECTIVITY_SAMPLE: usize = 1_024;

/// One page of the gallery (see [`GalleryIndex::page`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Page<'a> {
    /// Live items matching the filter, in all pages.
    pub total: usize,
    /// This page's items, in id order.
    pub items: Vec<&'a ItemMeta>,
}

/// How a filtered search was answered, for the benchmark and the tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterPlan {
    /// No filter and no deletions: the plain graph search.
    Graph,
    /// The graph walk that skips non-matching nodes in its results.
    FilteredGraph,
    /// Every match scored exactly.
    Exact,
}

/// Where a commit can be interrupted, for the crash tests.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CrashPoint {
    /// New generation files written, manifest not yet replaced.
    BeforeManifest,
    /// Manifest replaced, old generation not yet deleted.
    BeforeCleanup,
}

pub struct GalleryIndex {
    dir: PathBuf,
    store: Directory,
    /// The last committed state.
    manifest: Manifest,
    items: Vec<ItemMeta>,
    /// L2-normalised, row i = id i: the committed rows mapped from the vectors file, later
    /// ones on the heap (see [`crate::vectors`]).
    vectors: Vectors,
    /// The next generation's vectors file, already written by
    /// [`GalleryIndex::add_streamed`] (and mapped as `vectors`): the next commit uses it
    /// instead of writing the vectors again.
    staged_vectors: Option<FileEntry>,
    /// Content hash → id of the live item holding it.
    by_sha: HashMap<String, u64>,
    /// Content hashes whose items were all deleted, so a folder scan does not add them back.
    deleted_shas: HashSet<String>,
    /// Tombstoned items (rows kept, see [`ItemMeta::deleted`]).
    deleted: usize,
    /// Deletes since the last commit (logged in the WAL): the next commit must rewrite.
    uncommitted_deletes: usize,
    graph: Graph,
    /// The int8 copy the walk reads (`params.quantize` int8), one row per vector.
    codes: Option<Int8Codes>,
    /// Items that survive a crash: committed plus logged in the WAL.
    durable_len: usize,
    /// Bytes of the header and acknowledged batches of the current generation's WAL
    /// (0 for a version-1 index whose log does not exist yet).
    wal_len: u64,
    wal: Option<WalWriter>,
    /// Held (exclusively) from the first write on; released on drop.
    lock: Option<DirLock>,
    warnings: Vec<String>,
    /// The graph (or the int8 codes) on disk is missing or bad (rebuilt at open): the next
    /// commit must rewrite it.
    graph_stale: bool,
    /// Opened by [`GalleryIndex::open_salvaging_wal`] over a missing or damaged WAL: the
    /// next commit must replace it (keeping the damaged file aside).
    wal_damaged: bool,
    #[cfg(test)]
    pub(crate) crash_at: Option<CrashPoint>,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn gen_names(gen: u64) -> (String, String, String, String) {
    (
        format!("vectors.g{gen}.f32"),
        format!("items.g{gen}.jsonl"),
        format!("graph.g{gen}"),
        format!("wal.g{gen}.log"),
    )
}

/// True for the data files of a generation (what a manifest names).
fn is_generation_file(name: &str) -> bool {
    let gen_file = |prefix: &str, suffix: &str| {
        name.strip_prefix(prefix)
            .and_then(|r| r.strip_suffix(suffix))
            .is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
    };
    gen_file("vectors.g", ".f32")
        || gen_file("items.g", ".jsonl")
        || gen_file("wal.g", ".log")
        || gen_file("graph.g", GRAPH_SUFFIX)
        || gen_file("graph.g", DATA_SUFFIX)
        || gen_file("graph.g", LAYERED_SUFFIX)
        || gen_file("codes.g", ".int8")
}

/// True for file names this module writes (so cleanup never touches anything else).
fn is_index_file(name: &str) -> bool {
    is_generation_file(name) || name.starts_with(&format!("{MANIFEST_FILE}.tmp-"))
}

/// What a staging directory of [`GalleryIndex::create_with`] may hold: the index, its lock,
/// and the model record `indexer build` writes beside it.
fn is_staged_file(name: &str) -> bool {
    is_index_file(name)
        || name == MANIFEST_FILE
        || name == LOCK_FILE
        || name.starts_with("model.json")
}

/// The generation files in `dir` (at most a few named), for messages.
fn generation_files(store: &Directory) -> Result<Vec<String>> {
    let mut found: Vec<String> = store
        .names()?
        .into_iter()
        .filter(|n| is_generation_file(n))
        .collect();
    if found.len() > 6 {
        let more = found.len() - 5;
        found.truncate(5);
        found.push(format!("and {more} more"));
    }
    Ok(found)
}

impl GalleryIndex {
    /// Whether `dir` holds an index. A directory with generation files but no manifest is
    /// an error ([`Error::NoManifest`]): it is a damaged index, and treating it as "no
    /// index" would let a new one delete those files.
    pub fn exists(dir: &Path) -> Result<bool> {
        let m = dir.join(MANIFEST_FILE);
        if m.try_exists()
            .map_err(|e| Error::io(&m, "cannot check for the manifest", e))?
        {
            return Ok(true);
        }
        if !dir.is_dir() {
            return Ok(false);
        }
        let found = generation_files(&Directory::new(dir))?;
        if found.is_empty() {
            Ok(false)
        } else {
            Err(Error::NoManifest {
                dir: dir.to_path_buf(),
                found,
                why: String::new(),
            })
        }
    }

    /// Creates an empty index in `dir` and commits it, so the directory is a valid, loadable
    /// index from the start. See [`GalleryIndex::create_with`].
    pub fn create(
        dir: &Path,
        identity: ModelIdentity,
        dim: usize,
        params: HnswParams,
    ) -> Result<Self> {
        Self::create_with(dir, identity, dim, params, |_| Ok::<(), Error>(()))
    }

    /// Creates an index in `dir` holding what `fill` adds (and commits). Everything is
    /// written in a hidden sibling directory renamed onto `dir` at the end, so a crash
    /// leaves no index at `dir` (a rerun starts clean) rather than an empty or partial one.
    /// Refuses a `dir` that holds an index, index files, or anything else.
    pub fn create_with<E: From<Error>>(
        dir: &Path,
        identity: ModelIdentity,
        dim: usize,
        params: HnswParams,
        fill: impl FnOnce(&mut GalleryIndex) -> std::result::Result<(), E>,
    ) -> std::result::Result<Self, E> {
        params.validate()?;
        if dim == 0 {
            return Err(Error::Invalid("embedding dim must be positive".into()).into());
        }
        if identity.dim != dim {
            return Err(Error::Invalid(format!(
                "index dim {dim} differs from the model's embedding dim {}",
                identity.dim
            ))
            .into());
        }
        Self::check_new_dir(dir)?;
        let staging = Staging::begin(dir, is_staged_file)?;
        let mut idx = Self::create_in(staging.path(), identity, dim, params)?;
        fill(&mut idx)?;
        idx.commit()?;
        // The writer's path points into the staging directory; reopened on the next append.
        idx.wal = None;
        let dir = staging.finish()?;
        idx.store = Directory::new(&dir);
        idx.dir = dir;
        Ok(idx)
    }

    /// Errors unless `dir` is absent or an empty directory (checked again by the create).
    pub fn check_new_dir(dir: &Path) -> Result<()> {
        if Self::exists(dir)? {
            return Err(Error::Exists {
                path: dir.to_path_buf(),
                msg: "this directory already holds an index; use `indexer add` to extend it, or choose a new directory".into(),
            });
        }
        Staging::check_target(dir)
    }

    /// Writes generation 0 (empty files, WAL header, manifest) into `dir`.
    fn create_in(
        dir: &Path,
        identity: ModelIdentity,
        dim: usize,
        params: HnswParams,
    ) -> Result<Self> {
        let store = Directory::new(dir);
        let lock = DirLock::acquire(dir, LOCK_FILE, "the index")?;
        let (vname, iname, _, walname) = gen_names(0);
        let vectors = store.write_bytes(&vname, &[])?;
        let items = store.write_bytes(&iname, &[])?;
        wal::create(
            &store,
            &walname,
            wal::Expect {
                generation: 0,
                first_id: 0,
                dim,
            },
        )?;
        store.sync()?;
        let m = Manifest {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            generation: 0,
            identity,
            dim,
            metric: METRIC.into(),
            params,
            count: 0,
            vectors,
            items,
            graph: None,
            layered_graph: None,
            int8_codes: None,
            wal: walname,
            committed_unix: now_unix(),
            manifest_sha256: None,
        }
        .write(&store)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            store,
            manifest: m,
            items: Vec::new(),
            vectors: Vectors::empty(dim),
            staged_vectors: None,
            by_sha: HashMap::new(),
            deleted_shas: HashSet::new(),
            deleted: 0,
            uncommitted_deletes: 0,
            graph: Graph::new(&params, 1024)?,
            codes: (params.quantize == Quantize::Int8)
                .then(|| Int8Codes::train(Rows::new(&[], dim))),
            durable_len: 0,
            wal_len: wal::HEADER_LEN,
            wal: None,
            lock: Some(lock),
            warnings: Vec::new(),
            graph_stale: false,
            wal_damaged: false,
            #[cfg(test)]
            crash_at: None,
        })
    }

    /// Reads the manifest; a missing one beside generation files is [`Error::NoManifest`].
    fn read_manifest(store: &Directory) -> Result<Manifest> {
        match Manifest::read(store.path()) {
            Err(Error::Missing { path, msg }) => {
                let found = generation_files(store)?;
                if found.is_empty() {
                    Err(Error::Missing { path, msg })
                } else {
                    Err(Error::NoManifest {
                        dir: store.path().to_path_buf(),
                        found,
                        why: String::new(),
                    })
                }
            }
            other => other,
        }
    }

    /// Loads the last committed state plus its write-ahead log. Every file is checked against
    /// the manifest (size, SHA-256); errors name the file. A missing or corrupt graph is
    /// rebuilt from the vectors, with a warning (see [`GalleryIndex::warnings`]); a missing
    /// or damaged WAL is an error (it may hold acknowledged items).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_inner(dir, false)
    }

    /// [`GalleryIndex::open`] for `indexer recover`: a missing or damaged WAL is not an
    /// error but a warning, keeping the acknowledged items before the damage and losing
    /// the rest; the next commit writes a new generation and keeps the damaged log aside
    /// as `<name>.damaged-<unix time>`. Everything else is checked as by `open`.
    pub fn open_salvaging_wal(dir: &Path) -> Result<Self> {
        Self::open_inner(dir, true)
    }

    fn open_inner(dir: &Path, salvage: bool) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Missing {
                path: dir.to_path_buf(),
                msg: "index directory not found".into(),
            });
        }
        let store = Directory::new(dir);
        let m = Self::read_manifest(&store)?;
        let dim = m.dim;
        let vpath = dir.join(&m.vectors.name);
        let expect_bytes = (m.count * dim * 4) as u64;
        if m.vectors.bytes != expect_bytes {
            return Err(Error::corrupt(
                dir.join(MANIFEST_FILE),
                format!(
                    "manifest lists {} bytes of vectors for {} × {dim} floats",
                    m.vectors.bytes, m.count
                ),
            ));
        }
        // The log first: a missing or damaged one fails fast, before the big files are read.
        let wal_path = store.file(&m.wal);
        let expect = wal::Expect {
            generation: m.generation,
            first_id: m.count as u64,
            dim,
        };
        let (replay, wal_damaged) = match (m.is_legacy(), salvage) {
            (true, false) => (wal::replay_v1(&wal_path, dim, m.count as u64)?, false),
            (true, true) => match wal::replay_v1(&wal_path, dim, m.count as u64) {
                Ok(r) => (r, false),
                Err(e) => (
                    wal::Replay {
                        torn_tail: Some(format!("{e}; dropped the whole log")),
                        ..Default::default()
                    },
                    true,
                ),
            },
            (false, false) => (wal::replay(&wal_path, expect)?, false),
            (false, true) => {
                let damaged = wal::replay(&wal_path, expect).is_err();
                (wal::salvage(&wal_path, expect), damaged)
            }
        };
        let quantized = m.params.quantize == Quantize::Int8;
        // With int8 codes only the re-rank reads f32 rows, one at a time.
        let mut vectors = Vectors::map(&store, &m.vectors, dim, quantized)?;
        if vectors.len() != m.count {
            return Err(Error::corrupt(
                &vpath,
                "the file does not hold the manifest's count",
            ));
        }
        let ibytes = store.read_verified(&m.items)?;
        let mut items = parse_items(&dir.join(&m.items.name), &ibytes, m.count)?;
        drop(ibytes);

        let mut warnings = Vec::new();
        let mut graph_stale = false;
        let loaded = match (&m.layered_graph, &m.graph) {
            (Some(entry), _) => Some(Graph::load_layered(&store, entry, &m.params, m.count)),
            (None, Some(g)) => Some(
                store
                    .verify(&g.graph)
                    .and_then(|_| store.verify(&g.data))
                    .and_then(|_| Graph::load(dir, &g.basename, vectors.rows())),
            ),
            (None, None) => None,
        };
        let mut graph = match loaded {
            Some(Ok(graph)) => graph,
            Some(Err(e)) => {
                warnings.push(format!(
                    "{e}; rebuilding the HNSW graph from the vectors (the next commit rewrites it)"
                ));
                graph_stale = true;
                Graph::build(&m.params, vectors.rows())?
            }
            None if m.count > 0 => {
                warnings.push(format!(
                    "{}: no HNSW graph recorded for {} vectors; rebuilding it",
                    dir.join(MANIFEST_FILE).display(),
                    m.count
                ));
                graph_stale = true;
                Graph::build(&m.params, vectors.rows())?
            }
            None => Graph::new(&m.params, 1024)?,
        };
        let codes = match (m.params.quantize, &m.int8_codes) {
            (Quantize::None, _) => None,
            (Quantize::Int8, Some(entry)) => match Int8Codes::map(&store, entry, dim, m.count) {
                Ok(c) => Some(c),
                Err(e) => {
                    warnings.push(format!("{e}; re-encoding the int8 copy from the vectors (the next commit rewrites it)"));
                    graph_stale = true;
                    Some(Int8Codes::train(vectors.rows()))
                }
            },
            (Quantize::Int8, None) => {
                graph_stale = m.count > 0;
                Some(Int8Codes::train(vectors.rows()))
            }
        };

        if let Some(w) = &replay.torn_tail {
            warnings.push(w.clone());
        }
        let first = m.count;
        for r in &replay.records {
            let v = distance::normalized(
                &r.vector,
                dim,
                &format!("{}: record for '{}'", m.wal, r.meta.path),
            )
            .map_err(|e| Error::corrupt(&wal_path, e))?;
            vectors.push(&v);
            items.push(r.meta.clone());
        }
        graph.insert_rows(vectors.rows(), first);
        let mut codes = codes;
        if let Some(c) = &mut codes {
            c.push_rows(vectors.rows().iter_from(first));
        }
        for &id in &replay.deleted {
            if let Some(it) = items.get_mut(id as usize) {
                tombstone(it);
            }
        }

        let mut by_sha = HashMap::with_capacity(items.len());
        let mut deleted_shas = HashSet::new();
        for it in &items {
            if it.deleted {
                deleted_shas.insert(it.sha256.clone());
            } else {
                by_sha.entry(it.sha256.clone()).or_insert(it.id);
            }
        }
        deleted_shas.retain(|s| !by_sha.contains_key(s));
        let deleted = items.iter().filter(|it| it.deleted).count();
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let len = items.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            store,
            manifest: m,
            items,
            vectors,
            staged_vectors: None,
            by_sha,
            deleted_shas,
            deleted,
            uncommitted_deletes: replay.deleted.len(),
            graph,
            codes,
            durable_len: len,
            wal_len: replay.valid_len,
            wal: None,
            lock: None,
            graph_stale,
            wal_damaged,
            warnings,
            #[cfg(test)]
            crash_at: None,
        })
    }

    pub fn identity(&self) -> &ModelIdentity {
        &self.manifest.identity
    }
    pub fn dim(&self) -> usize {
        self.manifest.dim
    }
    /// Rows, deleted ones included (the next id to be given).
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    /// Items not deleted.
    pub fn live_len(&self) -> usize {
        self.items.len() - self.deleted
    }
    /// Deleted items (tombstones) among [`len`](GalleryIndex::len).
    pub fn deleted_len(&self) -> usize {
        self.deleted
    }
    pub fn params(&self) -> &HnswParams {
        &self.manifest.params
    }
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// The on-disk format version (1 until the first write upgrades an old index).
    pub fn format_version(&self) -> u32 {
        self.manifest.format_version
    }
    /// The committed generation number (bumped by every commit).
    pub fn generation(&self) -> u64 {
        self.manifest.generation
    }
    /// Items added but not yet durable (neither committed nor in the write-ahead log).
    pub fn pending(&self) -> usize {
        self.items.len() - self.durable_len
    }
    /// Items that live only in the write-ahead log (durable, not yet compacted by a commit).
    pub fn logged(&self) -> usize {
        self.durable_len - self.manifest.count
    }
    /// Problems `open` recovered from (graph rebuilt, torn WAL tail dropped).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }
    /// Every row in id order, tombstones of deleted items included (see
    /// [`ItemMeta::deleted`]).
    pub fn items(&self) -> &[ItemMeta] {
        &self.items
    }
    /// The live item with this id (`None` for an unknown or deleted id).
    pub fn item(&self, id: u64) -> Option<&ItemMeta> {
        self.items
            .get(usize::try_from(id).ok()?)
            .filter(|it| !it.deleted)
    }
    /// The id of the live item with this content hash, if present.
    pub fn find_sha256(&self, sha256: &str) -> Option<u64> {
        self.by_sha.get(sha256).copied()
    }
    /// Whether content with this hash was in the gallery and was deleted (and not added
    /// again), so a folder scan can leave it out.
    pub fn was_deleted(&self, sha256: &str) -> bool {
        self.deleted_shas.contains(sha256)
    }
    /// All vectors (`len()` rows of `dim()`), L2-normalised; row i is item id i.
    pub fn vectors(&self) -> Rows<'_> {
        self.vectors.rows()
    }
    pub fn vector(&self, id: u64) -> Option<&[f32]> {
        self.vectors.row(usize::try_from(id).ok()?)
    }
    /// Rows held on the heap rather than mapped from the committed vectors file (added
    /// since the last commit; for tests and diagnostics).
    pub fn heap_rows(&self) -> usize {
        self.vectors.heap_rows()
    }
    /// Whether the graph's rows are read from a map of the graph file.
    pub fn graph_is_mapped(&self) -> bool {
        self.graph.layered().is_some_and(|g| g.is_mapped())
    }

    /// Bytes on disk of the committed files plus the write-ahead log.
    pub fn disk_bytes(&self) -> u64 {
        self.manifest
            .referenced_files()
            .iter()
            .chain(std::iter::once(&MANIFEST_FILE.to_string()))
            .filter_map(|n| std::fs::metadata(self.dir.join(n)).ok())
            .map(|md| md.len())
            .sum()
    }

    /// Errors when `query` cannot be searched (wrong length, non-finite or zero).
    pub fn validate_query(&self, query: &[f32]) -> Result<()> {
        distance::normalized(query, self.dim(), "query").map(|_| ())
    }

    /// Adds items in memory; they are searchable at once and durable after [`commit`]
    /// (or [`make_durable`]). Items whose sha256 is already indexed (or repeated within the
    /// batch) are reported as duplicates and not added. All vectors are checked before
    /// anything is added, so an error leaves the index unchanged.
    ///
    /// [`commit`]: GalleryIndex::commit
    /// [`make_durable`]: GalleryIndex::make_durable
    pub fn add(&mut self, items: Vec<NewItem>) -> Result<AddReport> {
        let dim = self.dim();
        let mut normalized = Vec::with_capacity(items.len());
        for it in &items {
            normalized.push(check_item(it, dim)?);
        }
        let mut report = AddReport::default();
        let first = self.items.len();
        for (it, v) in items.into_iter().zip(normalized) {
            let Some(id) = register_item(&mut self.by_sha, &mut self.items, it, &mut report) else {
                continue;
            };
            self.deleted_shas.remove(&self.items[id as usize].sha256);
            self.vectors.push(&v);
        }
        self.link_new_rows(first);
        Ok(report)
    }

    /// Adds items to an empty index without holding their vectors: each is checked,
    /// normalised and written straight into the next generation's vectors file, which is
    /// then mapped, and the graph (and int8 copy) are built over the map; the next
    /// [`commit`](GalleryIndex::commit) writes the rest of that generation around the file.
    /// A build thus holds one copy of the vectors (the mapped file) instead of the input,
    /// the normalised copy and the array. On an index that holds rows it is
    /// [`add`](GalleryIndex::add). An invalid item fails the call and leaves the index empty.
    pub fn add_streamed(&mut self, items: impl IntoIterator<Item = NewItem>) -> Result<AddReport> {
        if !self.items.is_empty() || !self.vectors.is_empty() {
            return self.add(items.into_iter().collect());
        }
        self.ensure_writer()?;
        let dim = self.dim();
        let (vname, ..) = gen_names(self.manifest.generation + 1);
        let store = self.store.clone();
        let mut report = AddReport::default();
        let mut invalid: Option<Error> = None;
        let (by_sha, all) = (&mut self.by_sha, &mut self.items);
        let written = store.write_new(&vname, |w| {
            let mut buf = Vec::with_capacity(4 * dim);
            for it in items {
                let v = match check_item(&it, dim) {
                    Ok(v) => v,
                    Err(e) => {
                        invalid = Some(e);
                        return Err(std::io::Error::other("invalid item"));
                    }
                };
                if register_item(by_sha, all, it, &mut report).is_some() {
                    write_row(w, &mut buf, &v)?;
                }
            }
            Ok(())
        });
        let quantized = self.manifest.params.quantize == Quantize::Int8;
        let mapped =
            written.and_then(|entry| Ok((Vectors::map(&store, &entry, dim, quantized)?, entry)));
        match mapped {
            Ok((vectors, entry)) => {
                self.vectors = vectors;
                self.staged_vectors = Some(entry);
                self.link_new_rows(0);
                Ok(report)
            }
            Err(e) => {
                self.items.clear();
                self.by_sha.clear();
                let _ = store.remove(&vname);
                Err(invalid.unwrap_or(e))
            }
        }
    }

    /// Links rows `first..` into the graph and encodes them into the int8 copy.
    fn link_new_rows(&mut self, first: usize) {
        let rows = self.vectors.rows();
        self.graph.insert_rows(rows, first);
        if let Some(c) = &mut self.codes {
            if c.is_empty() {
                // The first rows: learn the ranges from them.
                *c = Int8Codes::train(rows);
            } else {
                c.push_rows(rows.iter_from(first));
            }
        }
    }

    /// Adds one item and makes it durable with a single fsync of the write-ahead log, so a
    /// server can acknowledge it without rewriting the index. Any earlier pending adds are
    /// logged with it (ids must stay in order). If logging fails the item stays searchable
    /// but pending; the error says so and a later commit or durable add persists it.
    pub fn append_durable(&mut self, item: NewItem) -> Result<AddReport> {
        self.ensure_writer()?;
        let report = self.add(vec![item])?;
        self.make_durable()?;
        Ok(report)
    }

    /// Appends all pending items to the write-ahead log as one batch (two fsyncs: records,
    /// then their commit record; see [`crate::wal`]).
    pub fn make_durable(&mut self) -> Result<()> {
        if self.pending() == 0 {
            return Ok(());
        }
        self.ensure_writer()?;
        if self.pending() == 0 {
            return Ok(()); // upgrading a version-1 index committed them
        }
        let mut buf = Vec::new();
        for it in &self.items[self.durable_len..] {
            let v = self.vector(it.id).expect("item has a vector");
            buf.extend_from_slice(&wal::encode(it, v));
        }
        let (count, next_id) = (self.pending() as u32, self.items.len() as u64);
        let wal = self.wal_writer()?;
        wal.append(&buf, count, next_id)?;
        self.wal_len = wal.valid_len();
        self.durable_len = self.items.len();
        Ok(())
    }

    /// Deletes items durably: one WAL batch of tombstones (after any pending adds, which are
    /// logged first so ids stay in order), fsynced before anything changes in memory, so a
    /// delete that returned never comes back after a crash, and one that failed left the
    /// index as it was. The items leave every search at once; the next commit drops their
    /// label, path and metadata from the index files (see [`ItemMeta::deleted`]).
    /// Every id must name a live item ([`Error::NoSuchItem`] otherwise, nothing deleted).
    pub fn delete_durable(&mut self, ids: &[u64]) -> Result<()> {
        let mut unique: Vec<u64> = ids.to_vec();
        unique.sort_unstable();
        unique.dedup();
        if let Some(&id) = unique.iter().find(|&&id| self.item(id).is_none()) {
            return Err(Error::NoSuchItem(id));
        }
        if unique.is_empty() {
            return Ok(());
        }
        self.make_durable()?;
        let buf: Vec<u8> = unique
            .iter()
            .flat_map(|&id| wal::encode_delete(id))
            .collect();
        let (count, next_id) = (unique.len() as u32, self.items.len() as u64);
        self.wal_writer()?.append(&buf, count, next_id)?;
        self.wal_len = self.wal_writer()?.valid_len();
        for &id in &unique {
            let it = &mut self.items[id as usize];
            if self.by_sha.get(&it.sha256) == Some(&id) {
                self.by_sha.remove(&it.sha256);
                self.deleted_shas.insert(it.sha256.clone());
            }
            tombstone(it);
        }
        self.deleted += unique.len();
        self.uncommitted_deletes += unique.len();
        Ok(())
    }

    /// The open WAL writer (opened on first use, after [`ensure_writer`](Self::ensure_writer)).
    fn wal_writer(&mut self) -> Result<&mut WalWriter> {
        self.ensure_writer()?;
        if self.wal.is_none() {
            self.wal = Some(WalWriter::open(
                &self.store.file(&self.manifest.wal),
                self.manifest.generation,
                self.wal_len,
            )?);
        }
        Ok(self.wal.as_mut().expect("wal opened"))
    }

    /// Writes the whole index as a new generation and switches to it atomically.
    ///
    /// Steps: new generation files (vectors, items, graph, and the new WAL holding only its
    /// header) are written and fsynced, then the directory; the manifest is replaced by
    /// rename (the commit point) and the directory fsynced; only then are the previous
    /// generation and its WAL deleted. A crash before the rename leaves the previous state
    /// (plus its WAL) loadable; after it, the new one. Leftovers of an interrupted commit
    /// are ignored by `open` and deleted by the next commit.
    pub fn commit(&mut self) -> Result<()> {
        self.ensure_writer()?;
        if self.items.len() == self.manifest.count
            && self.uncommitted_deletes == 0
            && !self.graph_stale
            && !self.wal_damaged
            && !self.manifest.needs_upgrade()
        {
            return Ok(());
        }
        if self.wal_damaged {
            // Kept for inspection; not an index file name, so no cleanup deletes it.
            let from = self.store.file(&self.manifest.wal);
            if from.exists() {
                let to = self
                    .store
                    .file(&format!("{}.damaged-{}", self.manifest.wal, now_unix()));
                std::fs::rename(&from, &to)
                    .map_err(|e| Error::io(&from, "cannot move the damaged log aside", e))?;
                tracing::warn!("kept the damaged write-ahead log as {}", to.display());
            }
        }
        self.remove_unreferenced()?;
        self.graph.refresh(self.vectors.rows());
        let gen = self.manifest.generation + 1;
        let (vname, iname, gname, walname) = gen_names(gen);
        let store = self.store.clone();
        let vectors = match &self.staged_vectors {
            Some(e) if e.name == vname && self.vectors.heap_rows() == 0 => e.clone(),
            _ => self
                .vectors
                .scan(|rows| write_vectors(&store, &vname, rows))?,
        };
        let items = write_items(&store, &iname, &self.items)?;
        let (graph, layered_graph) = match self.graph.write(&store, &gname)? {
            Some(StoredGraph::Layered(entry)) => (None, Some(entry)),
            Some(StoredGraph::HnswRs(files)) => (Some(files), None),
            None => (None, None),
        };
        let int8_codes = match &self.codes {
            Some(c) if !c.is_empty() => Some(c.write(&store, &format!("codes.g{gen}.int8"))?),
            _ => None,
        };
        wal::create(
            &store,
            &walname,
            wal::Expect {
                generation: gen,
                first_id: self.items.len() as u64,
                dim: self.dim(),
            },
        )?;
        store.sync()?;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::BeforeManifest) {
            return Err(Error::Invalid("injected crash before the manifest".into()));
        }
        let m = Manifest {
            generation: gen,
            count: self.items.len(),
            vectors,
            items,
            graph,
            layered_graph,
            int8_codes,
            wal: walname,
            committed_unix: now_unix(),
            ..self.manifest.clone()
        }
        .write(&store)?;
        self.manifest = m;
        self.durable_len = self.items.len();
        self.wal = None;
        self.wal_len = wal::HEADER_LEN;
        self.graph_stale = false;
        self.wal_damaged = false;
        self.uncommitted_deletes = 0;
        self.staged_vectors = None;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::BeforeCleanup) {
            return Err(Error::Invalid("injected crash before cleanup".into()));
        }
        self.remove_unreferenced()?;
        self.remap();
        Ok(())
    }

    /// After a commit: reads vectors, codes and graph from the new generation's maps
    /// instead of the heap rows and copied pages they grew into since the last one, so a
    /// long-running writer's resident set shrinks back to what its searches touch. The
    /// commit is done either way; a failure keeps the in-memory copies (which are the same
    /// data) and is logged.
    fn remap(&mut self) {
        let m = &self.manifest;
        let quantized = m.params.quantize == Quantize::Int8;
        let remapped = (|| -> Result<_> {
            let vectors = Vectors::map(&self.store, &m.vectors, m.dim, quantized)?;
            let graph = match &m.layered_graph {
                Some(e) => Some(Graph::load_layered(&self.store, e, &m.params, m.count)?),
                None => None,
            };
            let codes = match &m.int8_codes {
                Some(e) if quantized => Some(Int8Codes::map(&self.store, e, m.dim, m.count)?),
                _ => None,
            };
            Ok((vectors, graph, codes))
        })();
        match remapped {
            Ok((vectors, graph, codes)) => {
                self.vectors = vectors;
                if let Some(g) = graph {
                    self.graph = g;
                }
                if let Some(c) = codes {
                    self.codes = Some(c);
                }
            }
            Err(e) => tracing::warn!(
                "{e}: keeping the index in memory after the commit instead of mapping its new files"
            ),
        }
    }

    /// Approximate k nearest neighbours through the HNSW graph (`ef` ≥ k is the search
    /// width; larger = better recall, slower). A query that fails
    /// [`validate_query`](GalleryIndex::validate_query) returns no hits.
    /// Deleted items are never returned.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        self.search_filtered(query, k, ef, None)
    }

    /// [`search`](GalleryIndex::search) among the items `filter` matches (all live items
    /// when `None`). See [`GalleryIndex::plan`] for how it is answered.
    pub fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
    ) -> Vec<Hit> {
        self.search_planned(query, k, ef, filter).0
    }

    /// [`search_filtered`](GalleryIndex::search_filtered), also saying how it was answered.
    pub fn search_planned(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
    ) -> (Vec<Hit>, FilterPlan) {
        let filter = filter.filter(|f| !f.is_empty());
        let plan = self.plan(filter);
        self.search_with_plan(query, k, ef, filter, plan)
    }

    /// A search answered the way `plan` says (the benchmark measures each plan this way;
    /// [`FilterPlan::Graph`] ignores the filter and deletions). Returns the plan used,
    /// which is [`FilterPlan::Exact`] when the filtered walk found fewer than `k` matches.
    pub fn search_with_plan(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
        plan: FilterPlan,
    ) -> (Vec<Hit>, FilterPlan) {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return (Vec::new(), plan);
        };
        let accept = |i: usize| match filter {
            Some(f) => f.matches(&self.items[i]),
            None => !self.items[i].deleted,
        };
        let hits = match plan {
            FilterPlan::Graph => to_hits(match &self.codes {
                Some(c) => self.graph.search_int8(self.vectors.rows(), c, &q, k, ef),
                None => self.graph.search(self.vectors.rows(), &q, k, ef),
            }),
            FilterPlan::Exact => self.exact_among(&q, k, &accept),
            FilterPlan::FilteredGraph => {
                let hits =
                    to_hits(
                        self.graph
                            .search_filtered(self.vectors.rows(), &q, k, ef, &accept),
                    );
                // Fewer than k: the filter matches fewer than k items (or the walk found
                // too few of its matches); the exact scan then returns all there are.
                if hits.len() < k.min(self.live_len()) {
                    return (self.exact_among(&q, k, &accept), FilterPlan::Exact);
                }
                hits
            }
        };
        (hits, plan)
    }

    /// How a search with `filter` is answered: the plain graph search when nothing is
    /// excluded; an exact scan of the matches when they are estimated to be at most
    /// [`EXACT_FILTER_MAX`] (from a sample of [`SELECTIVITY_SAMPLE`] items, so planning
    /// costs no full scan); the filtered graph walk otherwise.
    pub fn plan(&self, filter: Option<&Filter>) -> FilterPlan {
        let n = self.items.len();
        let estimate = match filter.filter(|f| !f.is_empty()) {
            None if self.deleted == 0 => return FilterPlan::Graph,
            None => self.live_len(),
            Some(f) => {
                let sampled = n.min(SELECTIVITY_SAMPLE);
                let hits = sample_ids(n, sampled)
                    .filter(|&i| f.matches(&self.items[i]))
                    .count();
                hits * n / sampled.max(1)
            }
        };
        if estimate <= EXACT_FILTER_MAX {
            FilterPlan::Exact
        } else {
            FilterPlan::FilteredGraph
        }
    }

    /// Exact top-k among the rows `accept` takes.
    fn exact_among(
        &self,
        q: &[f32],
        k: usize,
        accept: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<Hit> {
        let ids: Vec<u32> = (0..self.items.len())
            .filter(|&i| accept(i))
            .map(|i| i as u32)
            .collect();
        exact_top_k_of(self.vectors.rows(), q, &ids, k)
    }

    /// Exact top-k among the items `filter` matches (all live items when `None`): the
    /// reference filtered searches are measured against.
    pub fn search_exact_filtered(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
    ) -> Vec<Hit> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        match filter {
            Some(f) => self.exact_among(&q, k, &|i| f.matches(&self.items[i])),
            None => self.exact_among(&q, k, &|i| !self.items[i].deleted),
        }
    }

    /// Live items matching `filter` (all when `None`), in id order, from `offset` on, at
    /// most `limit` of them, with the total count for paging.
    pub fn page(&self, offset: usize, limit: usize, filter: Option<&Filter>) -> Page<'_> {
        let mut total = 0;
        let mut items = Vec::with_capacity(limit.min(1024));
        for it in &self.items {
            let ok = match filter {
                Some(f) => f.matches(it),
                None => !it.deleted,
            };
            if ok {
                if total >= offset && items.len() < limit {
                    items.push(it);
                }
                total += 1;
            }
        }
        Page { total, items }
    }

    /// [`search`](GalleryIndex::search) through hnsw_rs's own search instead of the flat copy
    /// of its graph: the reference the flat search is benchmarked against. `None` for an
    /// index whose graph is not an hnsw_rs graph (format version 4 builds its own).
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<Hit>> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Some(Vec::new());
        };
        self.graph.search_hnsw_rs(&q, k, ef).map(to_hits)
    }

    /// [`search`](GalleryIndex::search) walking the f32 vectors even in an int8 index (the
    /// reference its quantised walk is measured against).
    pub fn search_f32_walk(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        to_hits(self.graph.search(self.vectors.rows(), &q, k, ef))
    }

    /// Exact k nearest neighbours by brute force (the reference for recall measurements).
    pub fn search_exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        if self.deleted > 0 {
            return self.search_exact_filtered(query, k, None);
        }
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        exact_top_k(self.vectors.rows(), &q, k)
    }

    /// Takes the index's writer lock now rather than at the first write, so a second
    /// writer (another server, `indexer add`) is refused at start-up, not after work.
    /// Upgrades a version-1 index to the current format (one commit).
    pub fn lock_for_writing(&mut self) -> Result<()> {
        self.ensure_writer()
    }

    /// Takes the writer lock on first use and checks nobody committed since `open`.
    fn ensure_writer(&mut self) -> Result<()> {
        if self.lock.is_some() {
            return Ok(());
        }
        let lock = DirLock::acquire(&self.dir, LOCK_FILE, "the index")?;
        let on_disk = Manifest::read(&self.dir)?;
        let wal_on_disk = std::fs::metadata(self.store.file(&on_disk.wal))
            .map(|m| m.len())
            .unwrap_or(0);
        if on_disk.generation != self.manifest.generation || wal_on_disk < self.wal_len {
            return Err(Error::Stale {
                path: self.dir.join(MANIFEST_FILE),
            });
        }
        self.lock = Some(lock);
        if self.manifest.needs_upgrade() {
            tracing::info!(
                "{}: upgrading the index from format version {} to {FORMAT_VERSION}",
                self.dir.display(),
                self.manifest.format_version
            );
            self.commit()?;
        }
        Ok(())
    }

    /// Deletes index files the current manifest does not reference (an old generation, or
    /// the leftovers of an interrupted commit), except the vectors file staged for the next
    /// commit. Never touches other files. Only called with `self.manifest` durable on disk,
    /// so nothing it deletes is still needed.
    fn remove_unreferenced(&self) -> Result<()> {
        let keep = self.manifest.referenced_files();
        let staged = self.staged_vectors.as_ref().map(|e| e.name.as_str());
        for name in self.store.names()? {
            if is_index_file(&name) && !keep.contains(&name) && staged != Some(name.as_str()) {
                self.store.remove(&name)?;
            }
        }
        self.store.sync()
    }
}

/// An item's normalised vector, once vector and metadata passed their checks.
/// Gives `it` the next id and records it in `report.added`, or, when its content is already
/// indexed, records it in `report.duplicates` and returns `None`. (One rule for the in-memory
/// and the streamed add.)
fn register_item(
    by_sha: &mut HashMap<String, u64>,
    items: &mut Vec<ItemMeta>,
    it: NewItem,
    report: &mut AddReport,
) -> Option<u64> {
    if let Some(&existing) = by_sha.get(&it.sha256) {
        report.duplicates.push((it.path, existing));
        return None;
    }
    let id = items.len() as u64;
    by_sha.insert(it.sha256.clone(), id);
    items.push(ItemMeta {
        id,
        path: it.path,
        label: it.label,
        sha256: it.sha256,
        metadata: it.metadata,
        deleted: false,
    });
    report.added.push(id);
    Some(id)
}

fn check_item(it: &NewItem, dim: usize) -> Result<Vec<f32>> {
    let v = distance::normalized(&it.vector, dim, &format!("item '{}'", it.path))?;
    if let Some(m) = &it.metadata {
        filter::validate_metadata(serde_json::Value::Object(m.clone()))
            .map_err(|e| Error::Invalid(format!("item '{}': {e}", it.path)))?;
    }
    Ok(v)
}

/// Graph results `(id, euclidean distance)` as hits with their cosine score.
fn to_hits(found: Vec<(usize, f32)>) -> Vec<Hit> {
    found
        .into_iter()
        .map(|(id, d)| Hit {
            id: id as u64,
            distance: d,
            score: cosine_from_distance(d),
        })
        .collect()
}

/// Brute-force top-k by dot product over unit rows (`q` must be unit length).
pub fn exact_top_k(vectors: Rows<'_>, q: &[f32], k: usize) -> Vec<Hit> {
    let n = vectors.len();
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let scores: Vec<f32> = if n >= PARALLEL_EXACT_MIN {
        (0..n)
            .into_par_iter()
            .map(|i| distance::dot(vectors.row(i), q))
            .collect()
    } else {
        vectors.iter_from(0).map(|r| distance::dot(r, q)).collect()
    };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    let by_score = |a: &u32, b: &u32| {
        scores[*b as usize]
            .total_cmp(&scores[*a as usize])
            .then(a.cmp(b))
    };
    if k < n {
        idx.select_nth_unstable_by(k - 1, by_score);
        idx.truncate(k);
    }
    idx.sort_unstable_by(by_score);
    idx.into_iter()
        .map(|i| {
            let s = scores[i as usize].clamp(-1.0, 1.0);
            Hit {
                id: i as u64,
                distance: distance_from_cosine(s),
                score: s,
            }
        })
        .collect()
}

/// `count` ids spread over `0..n` by the golden-ratio sequence: deterministic, and unlike a
/// fixed stride not in step with periodic patterns in the ids (every 2nd item, every 100th).
fn sample_ids(n: usize, count: usize) -> impl Iterator<Item = usize> {
    const PHI_FRAC: f64 = 0.618_033_988_749_894_9;
    (0..count).map(move |j| (((j as f64 + 0.5) * PHI_FRAC).fract() * n as f64) as usize % n.max(1))
}

/// Exact top-k by dot product over the rows `ids` (unit rows, unit `q`).
fn exact_top_k_of(vectors: Rows<'_>, q: &[f32], ids: &[u32], k: usize) -> Vec<Hit> {
    let row = |i: u32| vectors.row(i as usize);
    let mut scored: Vec<(f32, u32)> = if ids.len() >= PARALLEL_EXACT_MIN {
        ids.par_iter()
            .map(|&i| (distance::dot(row(i), q), i))
            .collect()
    } else {
        ids.iter().map(|&i| (distance::dot(row(i), q), i)).collect()
    };
    let by_score = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = k.min(scored.len());
    if k == 0 {
        return Vec::new();
    }
    if k < scored.len() {
        scored.select_nth_unstable_by(k - 1, by_score);
        scored.truncate(k);
    }
    scored.sort_unstable_by(by_score);
    scored
        .into_iter()
        .map(|(s, i)| {
            let s = s.clamp(-1.0, 1.0);
            Hit {
                id: i as u64,
                distance: distance_from_cosine(s),
                score: s,
            }
        })
        .collect()
}

/// What a delete leaves of an item: the row (its vector stays a graph waypoint) and its
/// content hash; label, path and metadata are dropped.
fn tombstone(it: &mut ItemMeta) {
    it.deleted = true;
    it.label = None;
    it.metadata = None;
    it.path.clear();
}

fn parse_items(path: &Path, bytes: &[u8], count: usize) -> Result<Vec<ItemMeta>> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| Error::corrupt(path, "item metadata is not UTF-8"))?;
    let mut items = Vec::with_capacity(count);
    for (line_no, line) in text.lines().enumerate() {
        let it: ItemMeta = serde_json::from_str(line).map_err(|e| {
            Error::corrupt(
                path,
                format!("line {}: invalid item metadata: {e}", line_no + 1),
            )
        })?;
        if it.id != items.len() as u64 {
            return Err(Error::corrupt(
                path,
                format!("line {}: item id {} out of order", line_no + 1, it.id),
            ));
        }
        items.push(it);
    }
    if items.len() != count {
        return Err(Error::corrupt(
            path,
            format!("holds {} items, the manifest says {count}", items.len()),
        ));
    }
    Ok(items)
}

/// Streams vectors as little-endian f32 into a new file, hashing on the way.
fn write_vectors(store: &Directory, name: &str, vectors: Rows<'_>) -> Result<FileEntry> {
    store.write_new(name, |w| {
        let mut buf = Vec::with_capacity(1 << 16);
        for row in vectors.iter_from(0) {
            write_row(w, &mut buf, row)?;
        }
        Ok(())
    })
}

/// Writes one row as little-endian f32 (through `buf`, reused).
fn write_row(w: &mut impl Write, buf: &mut Vec<u8>, row: &[f32]) -> std::io::Result<()> {
    buf.clear();
    buf.extend(row.iter().flat_map(|x| x.to_le_bytes()));
    w.write_all(buf)
}

fn write_items(store: &Directory, name: &str, items: &[ItemMeta]) -> Result<FileEntry> {
    store.write_new(name, |w| {
        for it in items {
            serde_json::to_writer(&mut *w, it)?;
            w.write_all(b"\n")?;
        }
        Ok(())
    })
}

/// The search server shares one index between worker threads (behind a lock).
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GalleryIndex>();
};
