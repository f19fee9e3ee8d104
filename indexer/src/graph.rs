//! The HNSW graph over the gallery vectors: build, extend, search, dump and reload.
//!
//! Indexes of format version 4 hold a [`LayeredGraph`] (built by this crate, one
//! `graph.g<N>.layers` file); older ones an hnsw_rs dump, which is still loaded and extended
//! as described below.
//!
//! The graph is a *derived* structure: the vectors file is the source of truth, and a graph
//! that is missing or fails its checksum is rebuilt from it. hnsw_rs's loader asserts and
//! unwraps on malformed input, so a dump is only ever loaded after its checksum matched the
//! manifest, and the load additionally runs under `catch_unwind`.
//!
//! A reloaded `Hnsw` borrows the `HnswIo` that loaded it (hnsw_rs issue #19: it may point
//! into a memory map). We never memory-map a dump (only this crate's own files are mapped,
//! see [`crate::vectors`]), so the borrow is only nominal; the `HnswIo` (a path, a name and
//! a counter, under 200 bytes) is leaked to give the graph a `'static` lifetime instead of
//! building a self-referential struct.

use std::path::Path;

use crate::layered::LayeredGraph;
use crate::manifest::GraphFiles;
use crate::quant::Int8Codes;
use crate::store::{Directory, FileEntry, Result, StoreError};
use crate::vectors::Rows;
use hnsw_rs::prelude::{AnnT, Hnsw, HnswIo};

use crate::distance::UnitL2;
use crate::flat::FlatGraph;
use crate::params::HnswParams;

/// Suffixes hnsw_rs appends to a dump's basename.
pub const GRAPH_SUFFIX: &str = ".hnsw.graph";
pub const DATA_SUFFIX: &str = ".hnsw.data";
/// Suffix of a [`LayeredGraph`] file.
pub const LAYERED_SUFFIX: &str = ".layers";

/// Below this many vectors per insert call, serial insertion avoids rayon's overhead.
const PARALLEL_INSERT_MIN: usize = 64;

/// Up to this many points the flat copy is refreshed after every insert (a walk over the
/// graph, tens of ms at the limit); above it, a few single inserts leave it stale until
/// [`Graph::refresh`] (called on commit) and searches go through hnsw_rs meanwhile.
const FLAT_REBUILD_MAX: usize = 100_000;

/// The graph of an index: the [`LayeredGraph`] this crate builds (every index written by
/// this version), or, for an index written before it, the hnsw_rs graph it holds with its
/// [`FlatGraph`] search copy (still read and extended; converting it would cost a full
/// build, so that happens only when the graph has to be rebuilt anyway).
pub struct Graph {
    kind: Kind,
}

enum Kind {
    Layered(LayeredGraph),
    HnswRs(RsGraph),
}

/// An hnsw_rs graph and its flat search copy.
struct RsGraph {
    hnsw: Hnsw<'static, f32, UnitL2>,
    /// `None` when the graph is empty (or not one the copy can represent).
    flat: Option<FlatGraph>,
    /// The graph has grown since `flat` was refreshed (see [`FLAT_REBUILD_MAX`]).
    stale: bool,
}

/// Where [`Graph::write`] put the graph: the manifest records one or the other.
pub enum StoredGraph {
    Layered(FileEntry),
    HnswRs(GraphFiles),
}

impl Graph {
    /// An empty graph.
    pub fn new(params: &HnswParams, _capacity: usize) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            kind: Kind::Layered(LayeredGraph::new(params)),
        })
    }

    /// Builds a graph over `vectors` (row i gets id i).
    pub fn build(params: &HnswParams, vectors: Rows<'_>) -> Result<Self> {
        let mut g = Self::new(params, vectors.len())?;
        g.insert_rows(vectors, 0);
        Ok(g)
    }

    /// Builds an hnsw_rs graph (what indexes before format version 4 hold), for the tests
    /// of that path (opening, extending and searching such an index).
    pub fn build_hnsw_rs(params: &HnswParams, vectors: Rows<'_>) -> Result<Self> {
        params.validate()?;
        let mut hnsw = Hnsw::new(
            params.m,
            vectors.len().max(1),
            params.max_layer,
            params.ef_construction,
            UnitL2,
        );
        hnsw.set_searching_mode(true);
        let mut g = Self {
            kind: Kind::HnswRs(RsGraph {
                hnsw,
                flat: None,
                stale: false,
            }),
        };
        g.insert_rows(vectors, 0);
        Ok(g)
    }

    /// Inserts the rows of `vectors` from `first_id` on (row i gets id i). `vectors` holds
    /// every point, old ones included: the linking reads them.
    pub fn insert_rows(&mut self, vectors: Rows<'_>, first_id: usize) {
        match &mut self.kind {
            Kind::Layered(g) => g.insert_rows(vectors, first_id),
            Kind::HnswRs(g) => g.insert_rows(vectors, first_id),
        }
    }

    /// Brings an hnsw_rs graph's flat search copy up to date (no-op otherwise).
    /// `vectors` are all the graph's points, as for [`Graph::insert_rows`].
    pub fn refresh(&mut self, vectors: Rows<'_>) {
        if let Kind::HnswRs(g) = &mut self.kind {
            g.refresh(vectors);
        }
    }

    /// The flat search copy of an hnsw_rs graph, if current (for tests and diagnostics).
    pub fn flat_copy(&self) -> Option<&FlatGraph> {
        match &self.kind {
            Kind::HnswRs(g) => g.flat.as_ref().filter(|_| !g.stale),
            Kind::Layered(_) => None,
        }
    }

    /// The hnsw_rs graph, for an index that holds one.
    pub fn hnsw(&self) -> Option<&Hnsw<'static, f32, UnitL2>> {
        match &self.kind {
            Kind::HnswRs(g) => Some(&g.hnsw),
            Kind::Layered(_) => None,
        }
    }

    /// The layered graph, for an index that holds one.
    pub fn layered(&self) -> Option<&LayeredGraph> {
        match &self.kind {
            Kind::Layered(g) => Some(g),
            Kind::HnswRs(_) => None,
        }
    }

    /// Whether searches use flat rows (a layered graph, or a current hnsw_rs copy).
    pub fn is_flat(&self) -> bool {
        self.layered().is_some() || self.flat_copy().is_some()
    }

    pub fn len(&self) -> usize {
        match &self.kind {
            Kind::Layered(g) => g.len(),
            Kind::HnswRs(g) => g.hnsw.get_nb_point(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(id, euclidean distance)` of up to `k` approximate nearest neighbours, nearest first.
    /// `vectors` are the graph's points (row i = id i).
    pub fn search(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Vec<(usize, f32)> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        if let Some(g) = self.layered() {
            return g.search(vectors, query, k, ef);
        }
        if let Some(flat) = self.flat_copy() {
            return flat.search(vectors, query, k, ef);
        }
        self.search_hnsw_rs(query, k, ef).unwrap_or_default()
    }

    /// [`Graph::search`] walking the int8 `codes` and re-ranking exactly (see
    /// [`LayeredGraph::search_int8`]); an hnsw_rs graph searches the f32 vectors.
    pub fn search_int8(
        &self,
        vectors: Rows<'_>,
        codes: &Int8Codes,
        query: &[f32],
        k: usize,
        ef: usize,
    ) -> Vec<(usize, f32)> {
        match self.layered() {
            Some(g) if k > 0 => g.search_int8(vectors, codes, query, k, ef),
            _ => self.search(vectors, query, k, ef),
        }
    }

    /// [`Graph::search`] returning only ids `accept` takes, walking through the others
    /// (see [`FlatGraph::search_filtered`]; hnsw_rs's `search_filter` while the copy is stale).
    pub fn search_filtered(
        &self,
        vectors: Rows<'_>,
        query: &[f32],
        k: usize,
        ef: usize,
        accept: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<(usize, f32)> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        let rs = match &self.kind {
            Kind::Layered(g) => {
                return g.search_filtered(vectors, query, k, ef, |v| accept(v as usize))
            }
            Kind::HnswRs(rs) => rs,
        };
        if let Some(flat) = self.flat_copy() {
            return flat.search_filtered(vectors, query, k, ef, |v| accept(v as usize));
        }
        let filter = |id: &usize| accept(*id);
        rs.hnsw
            .search_filter(query, k, ef.max(k), Some(&filter))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// The same search through hnsw_rs's own implementation (the reference the flat search
    /// is tested and benchmarked against); `None` for a layered graph.
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: usize) -> Option<Vec<(usize, f32)>> {
        let hnsw = self.hnsw()?;
        if self.is_empty() || k == 0 {
            return Some(Vec::new());
        }
        Some(
            hnsw.search(query, k, ef.max(k))
                .into_iter()
                .map(|n| (n.d_id, n.distance))
                .collect(),
        )
    }

    /// Writes the graph into `store` under `basename` (`<basename>.layers`, or hnsw_rs's
    /// two dump files), fsynced; durable by name after the store's next sync. An empty
    /// graph is not written (`None`).
    pub fn write(&self, store: &Directory, basename: &str) -> Result<Option<StoredGraph>> {
        if self.is_empty() {
            return Ok(None);
        }
        Ok(Some(match &self.kind {
            Kind::Layered(g) => {
                StoredGraph::Layered(g.write(store, &format!("{basename}{LAYERED_SUFFIX}"))?)
            }
            Kind::HnswRs(_) => {
                self.dump(store.path(), basename)?;
                StoredGraph::HnswRs(GraphFiles {
                    graph: store.seal(&format!("{basename}{GRAPH_SUFFIX}"))?,
                    data: store.seal(&format!("{basename}{DATA_SUFFIX}"))?,
                    basename: basename.to_string(),
                })
            }
        }))
    }

    /// Maps a layered graph file listed as `entry` (size, checksum and rows verified here,
    /// see [`LayeredGraph::open`]) for the `n` vectors of an index with `params`.
    pub fn load_layered(
        store: &Directory,
        entry: &FileEntry,
        params: &HnswParams,
        n: usize,
    ) -> Result<Self> {
        let g = LayeredGraph::open(store, entry, params, n)?;
        Ok(Self {
            kind: Kind::Layered(g),
        })
    }

    /// Writes `dir/<basename>.hnsw.graph` and `.hnsw.data`. The files are not durable until
    /// the caller fsyncs them. An empty graph cannot be dumped (hnsw_rs has no entry point).
    fn dump(&self, dir: &Path, basename: &str) -> Result<()> {
        let graph_path = dir.join(format!("{basename}{GRAPH_SUFFIX}"));
        let Some(hnsw) = self.hnsw() else {
            return Err(failed(&graph_path, "not an hnsw_rs graph"));
        };
        // hnsw_rs panics (instead of erroring) when it cannot create its files.
        let dumped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            hnsw.file_dump(dir, basename)
        }));
        let name = match dumped {
            Ok(Ok(name)) => name,
            Ok(Err(e)) => return Err(failed(&graph_path, format!("cannot write HNSW graph: {e}"))),
            Err(_) => {
                return Err(failed(
                    &graph_path,
                    "cannot create the HNSW graph files (is the directory writable?)",
                ))
            }
        };
        if name != basename {
            // hnsw_rs only renames when it must not overwrite a memory-mapped dump, which we never use.
            return Err(failed(
                dir,
                format!("hnsw_rs wrote the graph as '{name}' instead of '{basename}'"),
            ));
        }
        Ok(())
    }

    /// Loads a dump written by [`Graph::dump`]. `vectors` (`dim` per row) are the points the
    /// graph was built from: their count guards against a graph that does not belong to
    /// them, and the flat copy reads them.
    pub fn load(dir: &Path, basename: &str, vectors: Rows<'_>) -> Result<Self> {
        let (expect_len, dim) = (vectors.len(), vectors.dim());
        let graph_path = dir.join(format!("{basename}{GRAPH_SUFFIX}"));
        let mut io: Option<&'static mut HnswIo> =
            Some(Box::leak(Box::new(HnswIo::new(dir, basename))));
        let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            load_static(io.take().expect("loader used once"))
        }));
        let mut hnsw = match loaded {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                return Err(StoreError::corrupt(
                    &graph_path,
                    format!("cannot load HNSW graph: {e}"),
                ))
            }
            Err(_) => {
                return Err(StoreError::corrupt(
                    &graph_path,
                    "malformed HNSW graph (the loader panicked)",
                ))
            }
        };
        if hnsw.get_nb_point() != expect_len {
            return Err(StoreError::corrupt(
                &graph_path,
                format!(
                    "graph holds {} points, the index has {expect_len} vectors",
                    hnsw.get_nb_point()
                ),
            ));
        }
        if expect_len > 0 && hnsw.get_point_indexation().get_data_dimension() != dim {
            return Err(StoreError::corrupt(
                &graph_path,
                format!(
                    "graph holds {}-d points, the index is {dim}-d",
                    hnsw.get_point_indexation().get_data_dimension()
                ),
            ));
        }
        hnsw.set_searching_mode(true);
        let flat = FlatGraph::from_hnsw(&hnsw, vectors);
        Ok(Self {
            kind: Kind::HnswRs(RsGraph {
                hnsw,
                flat,
                stale: false,
            }),
        })
    }
}

impl RsGraph {
    fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    fn insert_rows(&mut self, vectors: Rows<'_>, first_id: usize) {
        let n = vectors.len().saturating_sub(first_id);
        if n == 0 {
            return;
        }
        if n < PARALLEL_INSERT_MIN {
            for (i, r) in vectors.iter_from(first_id).enumerate() {
                self.hnsw.insert_slice((r, first_id + i));
            }
        } else {
            let data: Vec<(&[f32], usize)> = vectors
                .iter_from(first_id)
                .enumerate()
                .map(|(i, r)| (r, first_id + i))
                .collect();
            self.hnsw.set_searching_mode(false);
            self.hnsw.parallel_insert_slice(&data);
            self.hnsw.set_searching_mode(true);
        }
        if n >= PARALLEL_INSERT_MIN || self.len() <= FLAT_REBUILD_MAX {
            self.refresh(vectors);
        } else {
            self.stale = true;
        }
    }

    fn refresh(&mut self, vectors: Rows<'_>) {
        if !self.stale && self.flat.as_ref().map(FlatGraph::len) == Some(self.len()) {
            return;
        }
        let mut flat = self.flat.take().unwrap_or_default();
        self.flat = flat.refresh(&self.hnsw, vectors).then_some(flat);
        self.stale = false;
    }
}

fn load_static(io: &'static mut HnswIo) -> anyhow::Result<Hnsw<'static, f32, UnitL2>> {
    io.load_hnsw::<f32, UnitL2>()
}

fn failed(path: &Path, msg: impl std::fmt::Display) -> StoreError {
    StoreError::Failed {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}
