//! `manifest.json`: the single file whose atomic replacement commits a new index state.
//!
//! It names the generation's data files with their sizes and SHA-256, so `open` can tell a
//! complete generation from a torn or foreign one and name the file that is wrong. Since
//! format version 2 it also carries
//!
//! * its own checksum (`manifest_sha256`, over its canonical JSON without that field), so a
//!   damaged manifest is reported as such rather than as a mismatch of an intact data file;
//! * the expected WAL state: the generation's `wal` file is created (with a header naming
//!   generation, first item id and dim) *before* the manifest that names it, so a missing
//!   or foreign WAL is an error instead of "no items were logged".
//!
//! Version 1 (no checksum, WAL optional and headerless) is still read; the first write
//! upgrades the index to version 2 with a commit.

use std::path::Path;

use serde::{Deserialize, Serialize};
use trainer::checkpoint::ModelIdentity;

use crate::params::HnswParams;
use crate::store::{sha256_hex, Directory, Result, StoreError};

pub use crate::store::FileEntry;

pub const MANIFEST_FILE: &str = "manifest.json";
/// Written into every manifest; `open` refuses other values.
pub const FORMAT: &str = "deep-metric-gallery-index";
/// Bumped on any incompatible change of the directory layout or file encodings.
/// Version 3 added item metadata and deletes (tombstones): an older build would ignore
/// both and bring deleted items back, so it must refuse the index instead.
/// Version 4 stores the graph as this crate's layered graph file (`layered_graph`) instead
/// of an hnsw_rs dump (which a version-4 index may still hold when it was upgraded).
pub const FORMAT_VERSION: u32 = 4;
/// The oldest version `open` still reads (upgraded to [`FORMAT_VERSION`] by the next write).
pub const OLDEST_FORMAT_VERSION: u32 = 1;
/// How distances are measured; part of the manifest so a future metric cannot be misread.
pub const METRIC: &str = "euclidean-on-l2-normalised";

/// The hnsw_rs dump: `<basename>.hnsw.graph` + `<basename>.hnsw.data`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFiles {
    pub basename: String,
    pub graph: FileEntry,
    pub data: FileEntry,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub format_version: u32,
    /// Incremented by every commit; names this state's files.
    pub generation: u64,
    pub identity: ModelIdentity,
    pub dim: usize,
    pub metric: String,
    pub params: HnswParams,
    /// Items in the committed files (WAL records come on top).
    pub count: usize,
    /// Raw little-endian f32, `count × dim`, row i = item id i.
    pub vectors: FileEntry,
    /// One JSON `ItemMeta` per line, ids 0..count in order.
    pub items: FileEntry,
    /// The hnsw_rs dump of an index built before version 4 (absent when the gallery is
    /// empty: hnsw_rs cannot dump an empty graph).
    pub graph: Option<GraphFiles>,
    /// Version 4: the layered graph file (see [`crate::layered`]); absent when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layered_graph: Option<FileEntry>,
    /// Version 4 with `params.quantize` int8: the int8 copy of the vectors (see
    /// [`crate::quant`]); absent when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub int8_codes: Option<FileEntry>,
    /// The write-ahead log that extends this generation. Version 2: it exists, and its
    /// header names this generation, `count` as its first id and `dim`. Version 1: it may
    /// not exist yet.
    pub wal: String,
    /// Seconds since the Unix epoch of the commit.
    pub committed_unix: u64,
    /// Version 2: hex SHA-256 of this manifest's canonical JSON (compact, keys sorted)
    /// without this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<String>,
}

/// The checksum a manifest carries: over its JSON value without `manifest_sha256`,
/// serialised compactly with sorted keys (serde_json's map), so it does not depend on
/// whitespace.
fn canonical_sha256(value: &serde_json::Value) -> String {
    let mut v = value.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("manifest_sha256");
    }
    sha256_hex(&serde_json::to_vec(&v).expect("a JSON value serialises"))
}

impl Manifest {
    /// Reads and validates `dir/manifest.json`: format, version, own checksum (version 2),
    /// then dim, metric and params. A missing manifest is [`StoreError::Missing`].
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    path,
                    msg: "no index manifest here; is this a directory written by `indexer build`?"
                        .into(),
                })
            }
            Err(e) => return Err(StoreError::io(&path, "cannot read index manifest", e)),
        };
        let corrupt = |msg: String| StoreError::corrupt(&path, msg);
        let probe: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            corrupt(format!(
                "index manifest is not valid JSON (truncated or corrupt?): {e}"
            ))
        })?;
        let format = probe.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(StoreError::unsupported(
                &path,
                format!("format is '{format}', expected '{FORMAT}'"),
            ));
        }
        // The version before anything else: a newer layout gets a version error, not a
        // checksum or field error.
        let version = probe
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if !(OLDEST_FORMAT_VERSION as u64..=FORMAT_VERSION as u64).contains(&version) {
            return Err(StoreError::unsupported(
                &path,
                format!(
                    "index format version {version} is not supported (this build reads versions {OLDEST_FORMAT_VERSION} to {FORMAT_VERSION}); rebuild the index with this `indexer`"
                ),
            ));
        }
        if version >= 2 {
            let stored = probe.get("manifest_sha256").and_then(|v| v.as_str());
            let actual = canonical_sha256(&probe);
            if stored != Some(actual.as_str()) {
                return Err(corrupt(
                    "the manifest fails its own checksum: manifest.json was damaged after it was written \
                     (the data files it lists were not checked). Restore it from a backup, or rebuild the index"
                        .into(),
                ));
            }
        }
        let m: Manifest = serde_json::from_value(probe)
            .map_err(|e| corrupt(format!("invalid index manifest: {e}")))?;
        if m.metric != METRIC {
            return Err(StoreError::unsupported(
                &path,
                format!(
                    "metric '{}' is not supported (expected '{METRIC}')",
                    m.metric
                ),
            ));
        }
        if m.dim == 0 || m.dim != m.identity.dim {
            return Err(corrupt(format!(
                "index dim {} does not match its model's embedding dim {}",
                m.dim, m.identity.dim
            )));
        }
        m.params
            .validate()
            .map_err(|e| corrupt(format!("invalid HNSW parameters: {e}")))?;
        Ok(m)
    }

    /// True for a version-1 manifest (no checksum, headerless and optional WAL).
    pub fn is_legacy(&self) -> bool {
        self.format_version < 2
    }

    /// True when the first write must commit to move the index to [`FORMAT_VERSION`]
    /// (so an older build refuses it instead of misreading what the write adds).
    pub fn needs_upgrade(&self) -> bool {
        self.format_version < FORMAT_VERSION
    }

    /// Writes `dir/manifest.json` atomically as the current format version, with its own
    /// checksum, and returns the manifest as written.
    pub fn write(mut self, dir: &Directory) -> Result<Self> {
        self.format_version = FORMAT_VERSION;
        self.manifest_sha256 = None;
        let value = serde_json::to_value(&self).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.manifest_sha256 = Some(canonical_sha256(&value));
        let text =
            serde_json::to_string_pretty(&self).map_err(|e| StoreError::Invalid(e.to_string()))?;
        dir.atomic_write(MANIFEST_FILE, text.as_bytes())?;
        Ok(self)
    }

    /// Every file name this manifest references (the WAL included).
    pub fn referenced_files(&self) -> Vec<String> {
        let mut v = vec![
            self.vectors.name.clone(),
            self.items.name.clone(),
            self.wal.clone(),
        ];
        if let Some(g) = &self.graph {
            v.push(g.graph.name.clone());
            v.push(g.data.name.clone());
        }
        if let Some(g) = &self.layered_graph {
            v.push(g.name.clone());
        }
        if let Some(c) = &self.int8_codes {
            v.push(c.name.clone());
        }
        v
    }
}
