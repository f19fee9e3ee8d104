//! The HNSW graph over the gallery vectors: build, extend, search, dump and reload.
//!
//! The graph is a *derived* structure: the vectors file is the source of truth, and a graph
//! that is missing or fails its checksum is rebuilt from it. hnsw_rs's loader asserts and
//! unwraps on malformed input, so a dump is only ever loaded after its checksum matched the
//! manifest, and the load additionally runs under `catch_unwind`.
//!
//! A reloaded `Hnsw` borrows the `HnswIo` that loaded it (hnsw_rs issue #19: it may point
//! into a memory map). We never memory-map, so the borrow is only nominal; the `HnswIo`
//! (a path, a name and a counter, under 200 bytes) is leaked to give the graph a `'static`
//! lifetime instead of building a self-referential struct.

use std::path::Path;

use crate::store::{Result, StoreError};
use hnsw_rs::prelude::{AnnT, Hnsw, HnswIo};

use crate::distance::UnitL2;
use crate::flat::FlatGraph;
use crate::params::HnswParams;

/// Suffixes hnsw_rs appends to a dump's basename.
pub const GRAPH_SUFFIX: &str = ".hnsw.graph";
pub const DATA_SUFFIX: &str = ".hnsw.data";

/// Below this many vectors per insert call, serial insertion avoids rayon's overhead.
const PARALLEL_INSERT_MIN: usize = 64;

/// Up to this many points the flat copy is refreshed after every insert (a walk over the
/// graph, tens of ms at the limit); above it, a few single inserts leave it stale until
/// [`Graph::refresh`] (called on commit) and searches go through hnsw_rs meanwhile.
const FLAT_REBUILD_MAX: usize = 100_000;

/// The graph as hnsw_rs builds and stores it, plus its [`FlatGraph`] copy for searching.
pub struct Graph {
    hnsw: Hnsw<'static, f32, UnitL2>,
    /// `None` when the graph is empty (or not one the copy can represent).
    flat: Option<FlatGraph>,
    /// The graph has grown since `flat` was refreshed (see [`FLAT_REBUILD_MAX`]).
    stale: bool,
}

impl Graph {
    /// An empty graph sized for about `capacity` vectors (a hint only).
    pub fn new(params: &HnswParams, capacity: usize) -> Result<Self> {
        params.validate()?;
        let mut hnsw = Hnsw::new(
            params.m,
            capacity.max(1),
            params.max_layer,
            params.ef_construction,
            UnitL2,
        );
        hnsw.set_searching_mode(true);
        Ok(Self {
            hnsw,
            flat: None,
            stale: false,
        })
    }

    /// Builds a graph over `vectors` (row-major, `dim` per row; row i gets id i).
    pub fn build(params: &HnswParams, vectors: &[f32], dim: usize) -> Result<Self> {
        let mut g = Self::new(params, vectors.len() / dim.max(1))?;
        g.insert_rows(vectors, dim, 0);
        Ok(g)
    }

    /// Inserts the rows of `vectors` from `first_id` on (row i gets id i). `vectors` holds
    /// every point, old ones included: the flat copy's pruning reads them.
    pub fn insert_rows(&mut self, vectors: &[f32], dim: usize, first_id: usize) {
        let rows = &vectors[(first_id * dim).min(vectors.len())..];
        let n = rows.len() / dim;
        if n == 0 {
            return;
        }
        if n < PARALLEL_INSERT_MIN {
            for (i, r) in rows.chunks_exact(dim).enumerate() {
                self.hnsw.insert_slice((r, first_id + i));
            }
        } else {
            let data: Vec<(&[f32], usize)> = rows
                .chunks_exact(dim)
                .enumerate()
                .map(|(i, r)| (r, first_id + i))
                .collect();
            self.hnsw.set_searching_mode(false);
            self.hnsw.parallel_insert_slice(&data);
            self.hnsw.set_searching_mode(true);
        }
        if n >= PARALLEL_INSERT_MIN || self.len() <= FLAT_REBUILD_MAX {
            self.refresh(vectors, dim);
        } else {
            self.stale = true;
        }
    }

    /// Brings the flat search copy up to date with the graph (no-op when it is).
    /// `vectors` are all the graph's points, as for [`Graph::insert_rows`].
    pub fn refresh(&mut self, vectors: &[f32], dim: usize) {
        if !self.stale && self.flat.as_ref().map(FlatGraph::len) == Some(self.len()) {
            return;
        }
        let mut flat = self.flat.take().unwrap_or_default();
        self.flat = flat.refresh(&self.hnsw, vectors, dim).then_some(flat);
        self.stale = false;
    }

    /// The flat search copy, if current (for tests and diagnostics).
    pub fn flat_copy(&self) -> Option<&FlatGraph> {
        self.flat.as_ref().filter(|_| !self.stale)
    }

    /// The hnsw_rs graph itself.
    pub fn hnsw(&self) -> &Hnsw<'static, f32, UnitL2> {
        &self.hnsw
    }

    /// Whether searches use the flat copy (false while it is stale).
    pub fn is_flat(&self) -> bool {
        self.flat_copy().is_some()
    }

    pub fn len(&self) -> usize {
        self.hnsw.get_nb_point()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `(id, euclidean distance)` of up to `k` approximate nearest neighbours, nearest first.
    /// `vectors` are the graph's points (row i = id i), read by the flat search.
    pub fn search(&self, vectors: &[f32], query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        if let Some(flat) = self.flat_copy() {
            return flat.search(vectors, query, k, ef);
        }
        self.search_hnsw_rs(query, k, ef)
    }

    /// [`Graph::search`] returning only ids `accept` takes, walking through the others
    /// (see [`FlatGraph::search_filtered`]; hnsw_rs's `search_filter` while the copy is stale).
    pub fn search_filtered(
        &self,
        vectors: &[f32],
        query: &[f32],
        k: usize,
        ef: usize,
        accept: &(dyn Fn(usize) -> bool + Sync),
    ) -> Vec<(usize, f32)> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        if let Some(flat) = self.flat_copy() {
            return flat.search_filtered(vectors, query, k, ef, |v| accept(v as usize));
        }
        let filter = |id: &usize| accept(*id);
        self.hnsw
            .search_filter(query, k, ef.max(k), Some(&filter))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// The same search through hnsw_rs's own implementation (the reference the flat search
    /// is tested and benchmarked against).
    pub fn search_hnsw_rs(&self, query: &[f32], k: usize, ef: usize) -> Vec<(usize, f32)> {
        if self.is_empty() || k == 0 {
            return Vec::new();
        }
        self.hnsw
            .search(query, k, ef.max(k))
            .into_iter()
            .map(|n| (n.d_id, n.distance))
            .collect()
    }

    /// Writes `dir/<basename>.hnsw.graph` and `.hnsw.data`. The files are not durable until
    /// the caller fsyncs them. An empty graph cannot be dumped (hnsw_rs has no entry point).
    pub fn dump(&self, dir: &Path, basename: &str) -> Result<()> {
        let graph_path = dir.join(format!("{basename}{GRAPH_SUFFIX}"));
        // hnsw_rs panics (instead of erroring) when it cannot create its files.
        let dumped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.hnsw.file_dump(dir, basename)
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
    pub fn load(dir: &Path, basename: &str, vectors: &[f32], dim: usize) -> Result<Self> {
        let expect_len = vectors.len() / dim.max(1);
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
        let flat = FlatGraph::from_hnsw(&hnsw, vectors, dim);
        Ok(Self {
            hnsw,
            flat,
            stale: false,
        })
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
