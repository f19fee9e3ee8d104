//! `manifest.json`: the single file whose atomic replacement commits a new index state.
//!
//! It names the generation's data files with their sizes and SHA-256, so `open` can tell a
//! complete generation from a torn or foreign one and name the file that is wrong.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trainer::checkpoint::ModelIdentity;
use trainer::error::{Error, Result};

use crate::params::HnswParams;

pub const MANIFEST_FILE: &str = "manifest.json";
/// Written into every manifest; `open` refuses other values.
pub const FORMAT: &str = "deep-metric-gallery-index";
/// Bumped on any incompatible change of the directory layout or file encodings.
pub const FORMAT_VERSION: u32 = 1;
/// How distances are measured; part of the manifest so a future metric cannot be misread.
pub const METRIC: &str = "euclidean-on-l2-normalised";

/// One data file of a generation, as it must be found on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

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
    /// Absent when the gallery is empty (hnsw_rs cannot dump an empty graph).
    pub graph: Option<GraphFiles>,
    /// The write-ahead log that extends this generation (may not exist yet).
    pub wal: String,
    /// Seconds since the Unix epoch of the commit.
    pub committed_unix: u64,
}

impl Manifest {
    /// Reads and validates `dir/manifest.json` (format, version, dim, params).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::file(
                    &path,
                    "no index manifest here; is this a directory written by `indexer build`?",
                ))
            }
            Err(e) => {
                return Err(Error::file(
                    &path,
                    format!("cannot read index manifest: {e}"),
                ))
            }
        };
        let probe: serde_json::Value = serde_json::from_str(&text).map_err(|e| {
            Error::file(
                &path,
                format!("index manifest is not valid JSON (truncated or corrupt?): {e}"),
            )
        })?;
        let format = probe.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != FORMAT {
            return Err(Error::file(
                &path,
                format!("format is '{format}', expected '{FORMAT}'"),
            ));
        }
        // Check the version before the full parse, so a newer layout gets a version error, not a field error.
        let version = probe
            .get("format_version")
            .and_then(|v| v.as_u64())
            .unwrap_or(0);
        if version != FORMAT_VERSION as u64 {
            return Err(Error::file(
                &path,
                format!(
                    "index format version {version} is not supported (this build reads version {FORMAT_VERSION}); rebuild the index with this `indexer`"
                ),
            ));
        }
        let m: Manifest = serde_json::from_value(probe)
            .map_err(|e| Error::file(&path, format!("invalid index manifest: {e}")))?;
        if m.metric != METRIC {
            return Err(Error::file(
                &path,
                format!(
                    "metric '{}' is not supported (expected '{METRIC}')",
                    m.metric
                ),
            ));
        }
        if m.dim == 0 || m.dim != m.identity.dim {
            return Err(Error::file(
                &path,
                format!(
                    "index dim {} does not match its model's embedding dim {}",
                    m.dim, m.identity.dim
                ),
            ));
        }
        m.params.validate().map_err(|e| Error::file(&path, e))?;
        Ok(m)
    }

    /// Writes `dir/manifest.json` atomically (temp file, fsync, rename, fsync of the directory).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Invalid(e.to_string()))?;
        trainer::checkpoint::write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
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
        v
    }
}

/// Reads a whole file and checks it against its manifest entry (size first: cheap and the
/// usual symptom of truncation).
pub fn read_verified(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>> {
    let path = dir.join(&entry.name);
    let mut f = std::fs::File::open(&path)
        .map_err(|e| Error::file(&path, format!("cannot open index file: {e}")))?;
    let len = f.metadata().map_err(|e| Error::file(&path, e))?.len();
    if len != entry.bytes {
        return Err(Error::file(
            &path,
            format!(
                "file is {len} bytes, the manifest says {} (truncated or overwritten)",
                entry.bytes
            ),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.read_to_end(&mut bytes)
        .map_err(|e| Error::file(&path, e))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    if sha != entry.sha256 {
        return Err(Error::file(&path, "checksum mismatch: the file is corrupt"));
    }
    Ok(bytes)
}

/// Checks a file's size and checksum without keeping its bytes.
pub fn verify_file(dir: &Path, entry: &FileEntry) -> Result<()> {
    let path = dir.join(&entry.name);
    let len = std::fs::metadata(&path)
        .map_err(|e| Error::file(&path, format!("cannot open index file: {e}")))?
        .len();
    if len != entry.bytes {
        return Err(Error::file(
            &path,
            format!(
                "file is {len} bytes, the manifest says {} (truncated or overwritten)",
                entry.bytes
            ),
        ));
    }
    if trainer::checkpoint::sha256_file(&path)? != entry.sha256 {
        return Err(Error::file(&path, "checksum mismatch: the file is corrupt"));
    }
    Ok(())
}

/// Writes `bytes` to a new file `dir/name`, fsyncs it, and returns its manifest entry.
pub fn write_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<FileEntry> {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).map_err(|e| Error::file(&path, e))?;
    f.write_all(bytes).map_err(|e| Error::file(&path, e))?;
    f.sync_all().map_err(|e| Error::file(&path, e))?;
    Ok(FileEntry {
        name: name.to_string(),
        bytes: bytes.len() as u64,
        sha256: hex::encode(Sha256::digest(bytes)),
    })
}

/// Fsyncs a file written by someone else (hnsw_rs) and returns its manifest entry.
pub fn seal_file(dir: &Path, name: &str) -> Result<FileEntry> {
    let path: PathBuf = dir.join(name);
    let f = std::fs::File::open(&path).map_err(|e| Error::file(&path, e))?;
    f.sync_all().map_err(|e| Error::file(&path, e))?;
    let bytes = f.metadata().map_err(|e| Error::file(&path, e))?.len();
    Ok(FileEntry {
        name: name.to_string(),
        bytes,
        sha256: trainer::checkpoint::sha256_file(&path)?,
    })
}

/// Fsyncs a directory so renames and new names in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = std::fs::File::open(dir).map_err(|e| Error::file(dir, e))?;
    d.sync_all().map_err(|e| Error::file(dir, e))
}
