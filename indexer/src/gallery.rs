//! [`GalleryIndex`]: the on-disk gallery — vectors, item metadata, model identity and the
//! HNSW graph — with atomic commits and a write-ahead log. See the crate docs for the layout.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};
use trainer::checkpoint::ModelIdentity;
use trainer::error::{Error, Result};

use crate::distance::{self, cosine_from_distance, distance_from_cosine};
use crate::graph::{Graph, DATA_SUFFIX, GRAPH_SUFFIX};
use crate::manifest::{
    self, FileEntry, GraphFiles, Manifest, FORMAT, FORMAT_VERSION, MANIFEST_FILE, METRIC,
};
use crate::params::HnswParams;
use crate::wal::{self, WalWriter};
use crate::{AddReport, Hit, ItemMeta, NewItem};

/// Advisory lock file held by the process that writes the index.
pub const LOCK_FILE: &str = "LOCK";

/// Exact search over fewer rows than this stays on one thread.
const PARALLEL_EXACT_MIN: usize = 20_000;

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
    /// The last committed state.
    manifest: Manifest,
    items: Vec<ItemMeta>,
    /// Row-major, L2-normalised, `len × dim`.
    vectors: Vec<f32>,
    by_sha: HashMap<String, u64>,
    graph: Graph,
    /// Items that survive a crash: committed plus logged in the WAL.
    durable_len: usize,
    /// Bytes of valid records in the current generation's WAL.
    wal_len: u64,
    wal: Option<WalWriter>,
    /// Held (exclusively) from the first write on; released on drop.
    lock: Option<File>,
    warnings: Vec<String>,
    /// The graph on disk is missing or bad (rebuilt at open): the next commit must rewrite it.
    graph_stale: bool,
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

/// True for file names this module writes (so cleanup never touches anything else).
fn is_index_file(name: &str) -> bool {
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
        || name.starts_with(&format!("{MANIFEST_FILE}.tmp-"))
}

impl GalleryIndex {
    /// Creates an empty index in `dir` (created if needed) and commits it, so the directory
    /// is a valid, loadable index from the start. Refuses a directory that already holds one.
    pub fn create(
        dir: &Path,
        identity: ModelIdentity,
        dim: usize,
        params: HnswParams,
    ) -> Result<Self> {
        params.validate()?;
        if dim == 0 {
            return Err(Error::Invalid("embedding dim must be positive".into()));
        }
        if identity.dim != dim {
            return Err(Error::Invalid(format!(
                "index dim {dim} differs from the model's embedding dim {}",
                identity.dim
            )));
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::file(dir, format!("cannot create index directory: {e}")))?;
        let mpath = dir.join(MANIFEST_FILE);
        if mpath.exists() {
            return Err(Error::file(
                &mpath,
                "this directory already holds an index; use `indexer add` to extend it, or choose a new directory",
            ));
        }
        let lock = Self::lock_dir(dir)?;
        let (vname, iname, _, walname) = gen_names(0);
        let vectors = manifest::write_file(dir, &vname, &[])?;
        let items = manifest::write_file(dir, &iname, &[])?;
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
            wal: walname,
            committed_unix: now_unix(),
        };
        m.write(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest: m,
            items: Vec::new(),
            vectors: Vec::new(),
            by_sha: HashMap::new(),
            graph: Graph::new(&params, 1024)?,
            durable_len: 0,
            wal_len: 0,
            wal: None,
            lock: Some(lock),
            warnings: Vec::new(),
            graph_stale: false,
            #[cfg(test)]
            crash_at: None,
        })
    }

    /// Loads the last committed state plus its write-ahead log. Every file is checked against
    /// the manifest (size, SHA-256); errors name the file. A missing or corrupt graph is
    /// rebuilt from the vectors, with a warning (see [`GalleryIndex::warnings`]).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "index directory not found"));
        }
        let m = Manifest::read(dir)?;
        let dim = m.dim;
        let vpath = dir.join(&m.vectors.name);
        let expect_bytes = (m.count * dim * 4) as u64;
        if m.vectors.bytes != expect_bytes {
            return Err(Error::file(
                dir.join(MANIFEST_FILE),
                format!(
                    "manifest lists {} bytes of vectors for {} × {dim} floats",
                    m.vectors.bytes, m.count
                ),
            ));
        }
        let vbytes = manifest::read_verified(dir, &m.vectors)?;
        let mut vectors: Vec<f32> = vbytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        drop(vbytes);
        if let Some(i) = vectors.iter().position(|x| !x.is_finite()) {
            return Err(Error::file(
                &vpath,
                format!("vector {} holds a non-finite value", i / dim),
            ));
        }
        let ibytes = manifest::read_verified(dir, &m.items)?;
        let mut items = parse_items(&dir.join(&m.items.name), &ibytes, m.count)?;
        drop(ibytes);

        let mut warnings = Vec::new();
        let mut graph_stale = false;
        let mut graph = match &m.graph {
            Some(g) => match manifest::verify_file(dir, &g.graph)
                .and_then(|_| manifest::verify_file(dir, &g.data))
                .and_then(|_| Graph::load(dir, &g.basename, &vectors, dim))
            {
                Ok(graph) => graph,
                Err(e) => {
                    warnings.push(format!("{e}; rebuilding the HNSW graph from the vectors (the next commit rewrites it)"));
                    graph_stale = true;
                    Graph::build(&m.params, &vectors, dim)?
                }
            },
            None if m.count > 0 => {
                warnings.push(format!(
                    "{}: no HNSW graph recorded for {} vectors; rebuilding it",
                    dir.join(MANIFEST_FILE).display(),
                    m.count
                ));
                graph_stale = true;
                Graph::build(&m.params, &vectors, dim)?
            }
            None => Graph::new(&m.params, 1024)?,
        };

        let replay = wal::replay(&dir.join(&m.wal), dim, m.count as u64)?;
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
            .map_err(|e| Error::file(dir.join(&m.wal), e))?;
            vectors.extend_from_slice(&v);
            items.push(r.meta.clone());
        }
        graph.insert_rows(&vectors, dim, first);

        let mut by_sha = HashMap::with_capacity(items.len());
        for it in &items {
            by_sha.entry(it.sha256.clone()).or_insert(it.id);
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        let len = items.len();
        Ok(Self {
            dir: dir.to_path_buf(),
            manifest: m,
            items,
            vectors,
            by_sha,
            graph,
            durable_len: len,
            wal_len: replay.valid_len,
            wal: None,
            lock: None,
            graph_stale,
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
    pub fn len(&self) -> usize {
        self.items.len()
    }
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
    pub fn params(&self) -> &HnswParams {
        &self.manifest.params
    }
    pub fn dir(&self) -> &Path {
        &self.dir
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
    pub fn items(&self) -> &[ItemMeta] {
        &self.items
    }
    pub fn item(&self, id: u64) -> Option<&ItemMeta> {
        self.items.get(usize::try_from(id).ok()?)
    }
    /// The id of the item with this content hash, if present.
    pub fn find_sha256(&self, sha256: &str) -> Option<u64> {
        self.by_sha.get(sha256).copied()
    }
    /// All vectors, row-major (`len() × dim()`), L2-normalised; row i is item id i.
    pub fn vectors(&self) -> &[f32] {
        &self.vectors
    }
    pub fn vector(&self, id: u64) -> Option<&[f32]> {
        let i = usize::try_from(id).ok()?;
        let d = self.dim();
        self.vectors.get(i * d..(i + 1) * d)
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
            normalized.push(distance::normalized(
                &it.vector,
                dim,
                &format!("item '{}'", it.path),
            )?);
        }
        let mut report = AddReport::default();
        let first = self.items.len();
        for (it, v) in items.into_iter().zip(normalized) {
            if let Some(&existing) = self.by_sha.get(&it.sha256) {
                report.duplicates.push((it.path, existing));
                continue;
            }
            let id = self.items.len() as u64;
            self.by_sha.insert(it.sha256.clone(), id);
            self.items.push(ItemMeta {
                id,
                path: it.path,
                label: it.label,
                sha256: it.sha256,
            });
            self.vectors.extend_from_slice(&v);
            report.added.push(id);
        }
        self.graph.insert_rows(&self.vectors, dim, first);
        Ok(report)
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

    /// Appends all pending items to the write-ahead log and fsyncs it.
    pub fn make_durable(&mut self) -> Result<()> {
        if self.pending() == 0 {
            return Ok(());
        }
        self.ensure_writer()?;
        let mut buf = Vec::new();
        for it in &self.items[self.durable_len..] {
            let v = self.vector(it.id).expect("item has a vector");
            buf.extend_from_slice(&wal::encode(it, v));
        }
        if self.wal.is_none() {
            self.wal = Some(WalWriter::open(
                &self.dir.join(&self.manifest.wal),
                self.wal_len,
            )?);
        }
        self.wal.as_mut().expect("wal opened").append(&buf)?;
        self.wal_len += buf.len() as u64;
        self.durable_len = self.items.len();
        Ok(())
    }

    /// Writes the whole index as a new generation and switches to it atomically.
    ///
    /// Steps: new generation files (vectors, items, graph) are written and fsynced; the
    /// manifest is replaced by rename (the commit point) and the directory fsynced; then the
    /// previous generation and its WAL are deleted. A crash before the rename leaves the
    /// previous state (plus its WAL) loadable; after it, the new one. Leftovers of an
    /// interrupted commit are ignored by `open` and deleted by the next commit.
    pub fn commit(&mut self) -> Result<()> {
        self.ensure_writer()?;
        if self.items.len() == self.manifest.count && self.wal_len == 0 && !self.graph_stale {
            return Ok(());
        }
        self.remove_unreferenced()?;
        self.graph.refresh(&self.vectors, self.dim());
        let gen = self.manifest.generation + 1;
        let (vname, iname, gname, walname) = gen_names(gen);
        let dir = self.dir.clone();
        let vectors = write_vectors(&dir, &vname, &self.vectors)?;
        let items = write_items(&dir, &iname, &self.items)?;
        let graph = if self.items.is_empty() {
            None
        } else {
            self.graph.dump(&dir, &gname)?;
            Some(GraphFiles {
                graph: manifest::seal_file(&dir, &format!("{gname}{GRAPH_SUFFIX}"))?,
                data: manifest::seal_file(&dir, &format!("{gname}{DATA_SUFFIX}"))?,
                basename: gname,
            })
        };
        manifest::sync_dir(&dir)?;
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
            wal: walname,
            committed_unix: now_unix(),
            ..self.manifest.clone()
        };
        m.write(&dir)?;
        self.manifest = m;
        self.durable_len = self.items.len();
        self.wal = None;
        self.wal_len = 0;
        self.graph_stale = false;
        #[cfg(test)]
        if self.crash_at == Some(CrashPoint::BeforeCleanup) {
            return Err(Error::Invalid("injected crash before cleanup".into()));
        }
        self.remove_unreferenced()
    }

    /// Approximate k nearest neighbours through the HNSW graph (`ef` ≥ k is the search
    /// width; larger = better recall, slower). A query that fails
    /// [`validate_query`](GalleryIndex::validate_query) returns no hits.
    pub fn search(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        to_hits(self.graph.search(&self.vectors, &q, k, ef))
    }

    /// [`search`](GalleryIndex::search) through hnsw_rs's own search instead of the flat copy
    /// of its graph: the reference the flat search is benchmarked against.
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: usize) -> Vec<Hit> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        to_hits(self.graph.search_hnsw_rs(&q, k, ef))
    }

    /// Exact k nearest neighbours by brute force (the reference for recall measurements).
    pub fn search_exact(&self, query: &[f32], k: usize) -> Vec<Hit> {
        let Ok(q) = distance::normalized(query, self.dim(), "query") else {
            return Vec::new();
        };
        exact_top_k(&self.vectors, self.dim(), &q, k)
    }

    fn lock_dir(dir: &Path) -> Result<File> {
        let path = dir.join(LOCK_FILE);
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::file(&path, format!("cannot open lock file: {e}")))?;
        match f.try_lock() {
            Ok(()) => Ok(f),
            Err(std::fs::TryLockError::WouldBlock) => Err(Error::file(
                &path,
                "another process is writing this index (e.g. a running search-server or `indexer add`); stop it first",
            )),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::file(&path, format!("cannot lock: {e}"))),
        }
    }

    /// Takes the writer lock on first use and checks nobody committed since `open`.
    fn ensure_writer(&mut self) -> Result<()> {
        if self.lock.is_some() {
            return Ok(());
        }
        let lock = Self::lock_dir(&self.dir)?;
        let on_disk = Manifest::read(&self.dir)?;
        let wal_on_disk = std::fs::metadata(self.dir.join(&on_disk.wal))
            .map(|m| m.len())
            .unwrap_or(0);
        if on_disk.generation != self.manifest.generation || wal_on_disk < self.wal_len {
            return Err(Error::file(
                self.dir.join(MANIFEST_FILE),
                "the index was changed by another process since it was opened; open it again",
            ));
        }
        self.lock = Some(lock);
        Ok(())
    }

    /// Deletes index files the current manifest does not reference (an old generation, or
    /// the leftovers of an interrupted commit). Never touches other files.
    fn remove_unreferenced(&self) -> Result<()> {
        let keep = self.manifest.referenced_files();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::file(&self.dir, e))?;
        for entry in rd.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_index_file(&name) && !keep.contains(&name) {
                let p = entry.path();
                std::fs::remove_file(&p)
                    .map_err(|e| Error::file(&p, format!("cannot delete stale index file: {e}")))?;
            }
        }
        manifest::sync_dir(&self.dir)
    }
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
pub fn exact_top_k(vectors: &[f32], dim: usize, q: &[f32], k: usize) -> Vec<Hit> {
    let n = vectors.len() / dim;
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let scores: Vec<f32> = if n >= PARALLEL_EXACT_MIN {
        vectors
            .par_chunks_exact(dim)
            .map(|r| distance::dot(r, q))
            .collect()
    } else {
        vectors
            .chunks_exact(dim)
            .map(|r| distance::dot(r, q))
            .collect()
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

fn parse_items(path: &Path, bytes: &[u8], count: usize) -> Result<Vec<ItemMeta>> {
    let text =
        std::str::from_utf8(bytes).map_err(|_| Error::file(path, "item metadata is not UTF-8"))?;
    let mut items = Vec::with_capacity(count);
    for (line_no, line) in text.lines().enumerate() {
        let it: ItemMeta = serde_json::from_str(line).map_err(|e| {
            Error::file(
                path,
                format!("line {}: invalid item metadata: {e}", line_no + 1),
            )
        })?;
        if it.id != items.len() as u64 {
            return Err(Error::file(
                path,
                format!("line {}: item id {} out of order", line_no + 1, it.id),
            ));
        }
        items.push(it);
    }
    if items.len() != count {
        return Err(Error::file(
            path,
            format!("holds {} items, the manifest says {count}", items.len()),
        ));
    }
    Ok(items)
}

/// Streams vectors as little-endian f32 into a new file, hashing on the way.
fn write_vectors(dir: &Path, name: &str, vectors: &[f32]) -> Result<FileEntry> {
    let path = dir.join(name);
    let f = File::create(&path).map_err(|e| Error::file(&path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, f);
    let mut h = Sha256::new();
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in vectors.chunks(1 << 14) {
        buf.clear();
        for x in chunk {
            buf.extend_from_slice(&x.to_le_bytes());
        }
        h.update(&buf);
        w.write_all(&buf).map_err(|e| Error::file(&path, e))?;
    }
    let f = w
        .into_inner()
        .map_err(|e| Error::file(&path, e.error().to_string()))?;
    f.sync_all().map_err(|e| Error::file(&path, e))?;
    Ok(FileEntry {
        name: name.into(),
        bytes: vectors.len() as u64 * 4,
        sha256: hex::encode(h.finalize()),
    })
}

fn write_items(dir: &Path, name: &str, items: &[ItemMeta]) -> Result<FileEntry> {
    let mut bytes = Vec::with_capacity(items.len() * 128);
    for it in items {
        serde_json::to_writer(&mut bytes, it).map_err(|e| Error::Invalid(e.to_string()))?;
        bytes.push(b'\n');
    }
    manifest::write_file(dir, name, &bytes)
}

/// The search server shares one index between worker threads (behind a lock).
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GalleryIndex>();
};
