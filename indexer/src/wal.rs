//! The write-ahead log: durable single adds without rewriting the index.
//!
//! Each generation has its own log (`wal.g<N>.log`), holding items added after that
//! generation was committed. A record is
//!
//! ```text
//! "DMW1" | payload length: u32 LE | SHA-256 of payload (32 bytes) | payload
//! payload = id: u64 LE | meta length: u32 LE | meta JSON {path,label,sha256} | dim × f32 LE
//! ```
//!
//! Records are appended and fsynced before an add is acknowledged. A crash can only leave a
//! torn *last* record (short, or failing its checksum, or zero-filled): replay drops it with
//! a warning — it was never acknowledged — and the next append truncates it away. A bad
//! record followed by more data is real corruption and an error naming the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use trainer::error::{Error, Result};

use crate::ItemMeta;

const MAGIC: &[u8; 4] = b"DMW1";
const HEADER: usize = 4 + 4 + 32;

/// One logged item.
#[derive(Debug, Clone, PartialEq)]
pub struct WalRecord {
    pub meta: ItemMeta,
    pub vector: Vec<f32>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RecordMeta {
    path: String,
    label: Option<String>,
    sha256: String,
}

/// What a log held.
#[derive(Debug, Default)]
pub struct Replay {
    pub records: Vec<WalRecord>,
    /// Bytes of complete, valid records; anything after is a torn tail.
    pub valid_len: u64,
    /// Set when a torn tail was dropped.
    pub torn_tail: Option<String>,
}

/// Encodes one record.
pub fn encode(meta: &ItemMeta, vector: &[f32]) -> Vec<u8> {
    let rm = RecordMeta {
        path: meta.path.clone(),
        label: meta.label.clone(),
        sha256: meta.sha256.clone(),
    };
    let json = serde_json::to_vec(&rm).expect("record meta serialises");
    let mut payload = Vec::with_capacity(12 + json.len() + 4 * vector.len());
    payload.extend_from_slice(&meta.id.to_le_bytes());
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    for x in vector {
        payload.extend_from_slice(&x.to_le_bytes());
    }
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// Reads `path` (a missing file is an empty log). Record ids must continue from `first_id`.
pub fn replay(path: &Path, dim: usize, first_id: u64) -> Result<Replay> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Replay::default()),
        Err(e) => {
            return Err(Error::file(
                path,
                format!("cannot read write-ahead log: {e}"),
            ))
        }
    };
    let mut out = Replay::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let torn = |why: &str| {
            Some(format!("{}: dropped an incomplete last record at byte {pos} ({why}); it was never acknowledged", path.display()))
        };
        if rest.iter().all(|&b| b == 0) {
            out.torn_tail = torn("zero-filled tail");
            break;
        }
        if rest.len() < HEADER {
            if rest.starts_with(&MAGIC[..rest.len().min(4)]) {
                out.torn_tail = torn("short header");
                break;
            }
            return Err(Error::file(
                path,
                format!("write-ahead log is corrupt at byte {pos} (bad record marker)"),
            ));
        }
        if &rest[..4] != MAGIC {
            return Err(Error::file(
                path,
                format!("write-ahead log is corrupt at byte {pos} (bad record marker)"),
            ));
        }
        let len = u32::from_le_bytes(rest[4..8].try_into().unwrap()) as usize;
        if rest.len() < HEADER + len {
            out.torn_tail = torn("short payload");
            break;
        }
        let payload = &rest[HEADER..HEADER + len];
        let last = rest.len() == HEADER + len;
        if Sha256::digest(payload).as_slice() != &rest[8..40] {
            if last {
                out.torn_tail = torn("checksum mismatch");
                break;
            }
            return Err(Error::file(
                path,
                format!("write-ahead log record at byte {pos} fails its checksum"),
            ));
        }
        let expect_id = first_id + out.records.len() as u64;
        out.records
            .push(decode_payload(path, pos, payload, dim, expect_id)?);
        pos += HEADER + len;
        out.valid_len = pos as u64;
    }
    Ok(out)
}

fn decode_payload(
    path: &Path,
    pos: usize,
    p: &[u8],
    dim: usize,
    expect_id: u64,
) -> Result<WalRecord> {
    let bad =
        |why: String| Error::file(path, format!("write-ahead log record at byte {pos}: {why}"));
    if p.len() < 12 {
        return Err(bad("payload too short".into()));
    }
    let id = u64::from_le_bytes(p[..8].try_into().unwrap());
    if id != expect_id {
        return Err(bad(format!(
            "item id {id}, expected {expect_id} (log does not continue this index)"
        )));
    }
    let jlen = u32::from_le_bytes(p[8..12].try_into().unwrap()) as usize;
    if p.len() != 12 + jlen + 4 * dim {
        return Err(bad(format!(
            "payload of {} bytes does not hold a {dim}-d vector",
            p.len()
        )));
    }
    let rm: RecordMeta =
        serde_json::from_slice(&p[12..12 + jlen]).map_err(|e| bad(format!("bad metadata: {e}")))?;
    let vector = p[12 + jlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(WalRecord {
        meta: ItemMeta {
            id,
            path: rm.path,
            label: rm.label,
            sha256: rm.sha256,
        },
        vector,
    })
}

/// An open log, positioned after its last valid record.
pub struct WalWriter {
    path: PathBuf,
    file: File,
    /// Bytes of complete records; a failed append is cut back to this.
    len: u64,
}

impl WalWriter {
    /// Opens (creating if needed) `path` for appending, cutting off a torn tail at `valid_len`.
    pub fn open(path: &Path, valid_len: u64) -> Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| Error::file(path, format!("cannot open write-ahead log: {e}")))?;
        let len = file.metadata().map_err(|e| Error::file(path, e))?.len();
        if len > valid_len {
            file.set_len(valid_len)
                .map_err(|e| Error::file(path, format!("cannot cut torn tail: {e}")))?;
            file.sync_all().map_err(|e| Error::file(path, e))?;
        }
        if !existed {
            if let Some(dir) = path.parent() {
                crate::manifest::sync_dir(dir)?;
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len: len.min(valid_len),
        })
    }

    /// Appends already-encoded records and fsyncs them: once this returns they survive a crash.
    /// A failed write is cut back off so the log never holds a partial record mid-file.
    pub fn append(&mut self, encoded: &[u8]) -> Result<()> {
        let res = self
            .file
            .write_all(encoded)
            .and_then(|_| self.file.sync_data());
        if let Err(e) = res {
            let _ = self.file.set_len(self.len);
            return Err(Error::file(
                &self.path,
                format!("cannot append to write-ahead log: {e}"),
            ));
        }
        self.len += encoded.len() as u64;
        Ok(())
    }
}
