//! The write-ahead log: durable single adds without rewriting the index.
//!
//! Each generation has its own log (`wal.g<N>.log`), holding items added after that
//! generation was committed. Format version 2:
//!
//! ```text
//! header (32 B, written by the commit, before the manifest that names the log):
//!   "DMW2" | dim: u32 | generation: u64 | first id: u64 | check: u64
//! then per append, one batch:
//!   record*  = "DMR2" | payload length: u32 | SHA-256 of payload (32 B) | payload
//!            | "DMD2" | 8 | SHA-256 of payload | id: u64            (a delete: tombstone)
//!   padding  = zeros up to a multiple of 32 bytes
//!   commit   = "DMC2" | records in batch: u32 | next id: u64 | batch start: u64 | check: u64
//! payload  = id: u64 | meta length: u32 | meta JSON {path,label,sha256[,metadata]} | dim × f32, all LE
//! check    = first 8 bytes of SHA-256(generation | own offset | the 24 bytes before it)
//! ```
//!
//! An append writes its records and fsyncs, then writes the commit record and fsyncs
//! again; only then is the add acknowledged. So a batch with a valid commit record was
//! acknowledged, and one without was not (its writer crashed in between). That is what
//! tells a torn tail from damage:
//!
//! * records after the last commit record that end the file short, zero-filled or failing
//!   their checksum, with no commit record after them: a torn tail, dropped with a warning;
//! * a damaged record followed by a valid commit record (found by scanning, since a damaged
//!   length field hides where the next record starts): corruption, an error naming the byte;
//! * a commit-record slot that holds non-zero bytes but no valid commit record: corruption.
//!   A commit record is 32-byte aligned, so it never straddles a 512-byte sector and is
//!   written whole or not at all (the assumption SQLite and PostgreSQL make for small
//!   writes); a crash leaves it absent or zero, never half-written. This also assumes a
//!   filesystem that does not expose stale blocks after a crash (ext4 `data=ordered`, XFS).
//!
//! The header ties the log to the manifest (generation, first id, dim); since the commit
//! creates it before writing the manifest, a missing log is an error, not an empty log.
//!
//! A batch's commit record counts adds and tombstones together; its next id counts adds
//! only. A tombstone names an id added before it (committed or earlier in the log), so
//! replaying every add and then every tombstone gives the state the writer had. Metadata
//! and tombstones arrived with index format version 3; the log encoding is unchanged
//! otherwise, so a version-2 log replays as it is.
//!
//! Version-1 logs (`"DMW1"` records, no header, no commit records, file optional) are still
//! replayed with the old rule: a bad last record is a torn tail.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::store::{Directory, Result, StoreError};
use crate::ItemMeta;

const V1_MAGIC: &[u8; 4] = b"DMW1";
const HEADER_MAGIC: &[u8; 4] = b"DMW2";
const RECORD_MAGIC: &[u8; 4] = b"DMR2";
const COMMIT_MAGIC: &[u8; 4] = b"DMC2";
const DELETE_MAGIC: &[u8; 4] = b"DMD2";
/// Bytes of the log header.
pub const HEADER_LEN: u64 = 32;
/// Record header: magic, payload length, payload SHA-256.
const RECORD_HEADER: usize = 4 + 4 + 32;
const COMMIT_LEN: usize = 32;
const ALIGN: usize = 32;

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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metadata: Option<crate::Metadata>,
}

/// What a log held.
#[derive(Debug, Default)]
pub struct Replay {
    /// Acknowledged records, in id order.
    pub records: Vec<WalRecord>,
    /// Ids deleted by acknowledged tombstones, in log order.
    pub deleted: Vec<u64>,
    /// Bytes of the header and acknowledged batches; anything after is a torn tail.
    pub valid_len: u64,
    /// Set when a torn tail was dropped.
    pub torn_tail: Option<String>,
}

/// What the manifest expects of its log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expect {
    pub generation: u64,
    pub first_id: u64,
    pub dim: usize,
}

fn check(generation: u64, offset: u64, bytes: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update(generation.to_le_bytes());
    h.update(offset.to_le_bytes());
    h.update(bytes);
    h.finalize()[..8].try_into().expect("8 bytes")
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn align_up(x: usize) -> usize {
    x.div_ceil(ALIGN) * ALIGN
}

fn header(e: Expect) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..4].copy_from_slice(HEADER_MAGIC);
    h[4..8].copy_from_slice(&(e.dim as u32).to_le_bytes());
    h[8..16].copy_from_slice(&e.generation.to_le_bytes());
    h[16..24].copy_from_slice(&e.first_id.to_le_bytes());
    let c = check(e.generation, 0, &h[..24]);
    h[24..].copy_from_slice(&c);
    h
}

/// Creates the log of a new generation holding only its header, fsynced (its name is made
/// durable by the directory fsync that precedes the manifest).
pub fn create(dir: &Directory, name: &str, e: Expect) -> Result<()> {
    dir.write_bytes(name, &header(e)).map(|_| ())
}

/// Encodes one record.
pub fn encode(meta: &ItemMeta, vector: &[f32]) -> Vec<u8> {
    encode_with(RECORD_MAGIC, meta, vector)
}

/// A version-1 record, for the tests that open an index written by the previous format.
#[cfg(test)]
pub(crate) fn encode_v1(meta: &ItemMeta, vector: &[f32]) -> Vec<u8> {
    encode_with(V1_MAGIC, meta, vector)
}

fn encode_with(magic: &[u8; 4], meta: &ItemMeta, vector: &[f32]) -> Vec<u8> {
    let rm = RecordMeta {
        path: meta.path.clone(),
        label: meta.label.clone(),
        sha256: meta.sha256.clone(),
        metadata: meta.metadata.clone(),
    };
    let json = serde_json::to_vec(&rm).expect("record meta serialises");
    let mut payload = Vec::with_capacity(12 + json.len() + 4 * vector.len());
    payload.extend_from_slice(&meta.id.to_le_bytes());
    payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
    payload.extend_from_slice(&json);
    for x in vector {
        payload.extend_from_slice(&x.to_le_bytes());
    }
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(magic);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// A tombstone record deleting `id`.
pub fn encode_delete(id: u64) -> Vec<u8> {
    let payload = id.to_le_bytes();
    let mut out = Vec::with_capacity(RECORD_HEADER + payload.len());
    out.extend_from_slice(DELETE_MAGIC);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(payload));
    out.extend_from_slice(&payload);
    out
}

/// Padding plus the commit record for a batch of `records` ending at `end`.
fn commit_record(
    generation: u64,
    batch_start: u64,
    end: u64,
    records: u32,
    next_id: u64,
) -> Vec<u8> {
    let at = align_up(end as usize);
    let mut out = vec![0u8; at - end as usize];
    let mut c = [0u8; COMMIT_LEN];
    c[..4].copy_from_slice(COMMIT_MAGIC);
    c[4..8].copy_from_slice(&records.to_le_bytes());
    c[8..16].copy_from_slice(&next_id.to_le_bytes());
    c[16..24].copy_from_slice(&batch_start.to_le_bytes());
    let ck = check(generation, at as u64, &c[..24]);
    c[24..].copy_from_slice(&ck);
    out.extend_from_slice(&c);
    out
}

/// A valid commit record at `at`: (records in batch, next id, batch start).
fn commit_at(bytes: &[u8], at: usize, generation: u64) -> Option<(u32, u64, u64)> {
    let c = bytes.get(at..at + COMMIT_LEN)?;
    (c[..4] == *COMMIT_MAGIC && c[24..] == check(generation, at as u64, &c[..24]))
        .then(|| (u32_at(c, 4), u64_at(c, 8), u64_at(c, 16)))
}

/// A record at the start of `rest` whose checksum holds: (payload, record length).
fn record_at<'a>(rest: &'a [u8], magic: &[u8; 4]) -> Option<(&'a [u8], usize)> {
    if rest.len() < RECORD_HEADER || rest[..4] != *magic {
        return None;
    }
    let len = u32_at(rest, 4) as usize;
    let payload = rest.get(RECORD_HEADER..RECORD_HEADER + len)?;
    (Sha256::digest(payload).as_slice() == &rest[8..40]).then_some((payload, RECORD_HEADER + len))
}

fn read_log(path: &Path) -> std::io::Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Replays a version-2 log, which must exist and match `expect` (see the module docs for
/// what counts as torn and what as corrupt).
pub fn replay(path: &Path, expect: Expect) -> Result<Replay> {
    let mut salvaged = Replay::default();
    replay_into(path, expect, &mut salvaged)
}

/// For `indexer recover`: the acknowledged records before the first damage of a log that
/// [`replay`] refuses (none when it is missing or its header is bad), with the refusal in
/// `torn_tail`. Unlike [`replay`] this loses acknowledged items, so it is never automatic.
pub fn salvage(path: &Path, expect: Expect) -> Replay {
    let mut salvaged = Replay::default();
    match replay_into(path, expect, &mut salvaged) {
        Ok(r) => r,
        Err(e) => Replay {
            torn_tail: Some(format!(
                "{e}; kept the {} record(s) before the damage, dropped the rest",
                salvaged.records.len()
            )),
            ..salvaged
        },
    }
}

/// [`replay`], leaving in `salvaged` what was acknowledged before an error.
fn replay_into(path: &Path, expect: Expect, salvaged: &mut Replay) -> Result<Replay> {
    let bytes = read_log(path)
        .map_err(|e| StoreError::io(path, "cannot read write-ahead log", e))?
        .ok_or_else(|| StoreError::Missing {
            path: path.to_path_buf(),
            msg: format!(
                "write-ahead log not found: the manifest of generation {} names it, and every item \
                 acknowledged since that commit (ids from {}) is only there. Restore the file, or run \
                 `indexer recover` to go on without those items",
                expect.generation, expect.first_id
            ),
        })?;
    let corrupt = |msg: String| StoreError::corrupt(path, msg);
    let h = bytes.get(..HEADER_LEN as usize).ok_or_else(|| {
        corrupt(format!(
            "write-ahead log header is damaged: the file is {} bytes, the header alone is {HEADER_LEN}",
            bytes.len()
        ))
    })?;
    if h[..4] != *HEADER_MAGIC || h[24..] != check(u64_at(h, 8), 0, &h[..24]) {
        return Err(corrupt(
            "write-ahead log header is damaged (bad marker or checksum)".into(),
        ));
    }
    let found = Expect {
        dim: u32_at(h, 4) as usize,
        generation: u64_at(h, 8),
        first_id: u64_at(h, 16),
    };
    if found != expect {
        return Err(corrupt(format!(
            "write-ahead log belongs to generation {} (first id {}, {}-d), the manifest expects generation {} \
             (first id {}, {}-d): it was copied from another index or state",
            found.generation, found.first_id, found.dim, expect.generation, expect.first_id, expect.dim
        )));
    }

    let mut out = Replay {
        valid_len: HEADER_LEN,
        ..Default::default()
    };
    // Keeps `salvaged` up to date with the acknowledged records before returning an error.
    macro_rules! fail {
        ($e:expr) => {{
            let e = $e;
            salvaged.records = std::mem::take(&mut out.records);
            salvaged.deleted = std::mem::take(&mut out.deleted);
            salvaged.valid_len = out.valid_len;
            return Err(e);
        }};
    }
    let mut pending: Vec<WalRecord> = Vec::new();
    let mut pending_deletes: Vec<u64> = Vec::new();
    let mut batch_start = HEADER_LEN as usize;
    let mut pos = batch_start;
    let next_id = |out: &Replay, pending: &Vec<WalRecord>| {
        expect.first_id + (out.records.len() + pending.len()) as u64
    };
    while pos < bytes.len() {
        if let Some((payload, len)) = record_at(&bytes[pos..], RECORD_MAGIC) {
            let id = next_id(&out, &pending);
            match decode_payload(path, pos, payload, expect.dim, id) {
                Ok(r) => pending.push(r),
                Err(e) => fail!(e),
            }
            pos += len;
            continue;
        }
        if let Some((payload, len)) = record_at(&bytes[pos..], DELETE_MAGIC) {
            match decode_delete(path, pos, payload, next_id(&out, &pending)) {
                Ok(id) => pending_deletes.push(id),
                Err(e) => fail!(e),
            }
            pos += len;
            continue;
        }
        let at = align_up(pos);
        let padding_ok = bytes
            .get(pos..at)
            .is_some_and(|p| p.iter().all(|&b| b == 0));
        let entries = pending.len() + pending_deletes.len();
        match commit_at(&bytes, at, expect.generation) {
            Some((n, next, start)) if padding_ok && entries > 0 => {
                if n as usize != entries
                    || next != next_id(&out, &pending)
                    || start != batch_start as u64
                {
                    fail!(corrupt(format!(
                        "write-ahead log commit record at byte {at} does not match the {entries} record(s) before it"
                    )));
                }
                out.records.append(&mut pending);
                out.deleted.append(&mut pending_deletes);
                pos = at + COMMIT_LEN;
                batch_start = pos;
                out.valid_len = pos as u64;
            }
            _ => break,
        }
    }
    let pending_entries = pending.len() + pending_deletes.len();
    if pos >= bytes.len() && pending_entries == 0 {
        return Ok(out);
    }
    // Everything from `batch_start` on was not confirmed by a commit record.
    if let Some(at) = (align_up(pos + 1)..bytes.len())
        .step_by(ALIGN)
        .find(|&at| commit_at(&bytes, at, expect.generation).is_some())
    {
        fail!(corrupt(format!(
            "write-ahead log is damaged at byte {pos} (a record there is cut short or fails its checksum), and the commit record at byte {at} after it \
             shows it was acknowledged: restore the file from a backup, or run `indexer recover` to keep the items before the damage"
        )));
    }
    if pending_entries > 0 {
        // The batch's records are whole; what follows them must be padding and its commit
        // record, or nothing (crash before the commit record was written).
        let at = align_up(pos);
        if let Some(slot) = bytes.get(pos..at + COMMIT_LEN) {
            if slot.iter().any(|&b| b != 0)
                && !slot.starts_with(RECORD_MAGIC)
                && !slot.starts_with(DELETE_MAGIC)
            {
                fail!(corrupt(format!(
                    "write-ahead log commit record at byte {at} (or the padding before it) is damaged; the {pending_entries} \
                     record(s) before it were acknowledged: restore the file from a backup, or run `indexer recover`"
                )));
            }
        }
    }
    out.torn_tail = Some(format!(
        "{}: dropped {} byte(s) after byte {batch_start} ({} whole record(s) without a commit record): \
         an add was interrupted before it was acknowledged",
        path.display(),
        bytes.len() - batch_start,
        pending_entries
    ));
    Ok(out)
}

/// Replays a version-1 log (a missing file is an empty log). Record ids must continue from
/// `first_id`; a bad last record is taken for a torn tail.
pub fn replay_v1(path: &Path, dim: usize, first_id: u64) -> Result<Replay> {
    let Some(bytes) =
        read_log(path).map_err(|e| StoreError::io(path, "cannot read write-ahead log", e))?
    else {
        return Ok(Replay::default());
    };
    let mut out = Replay::default();
    let mut pos = 0usize;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        let torn = |why: &str| {
            Some(format!("{}: dropped an incomplete last record at byte {pos} ({why}); it was never acknowledged", path.display()))
        };
        let bad_marker = || {
            StoreError::corrupt(
                path,
                format!("write-ahead log is corrupt at byte {pos} (bad record marker)"),
            )
        };
        if rest.iter().all(|&b| b == 0) {
            out.torn_tail = torn("zero-filled tail");
            break;
        }
        if rest.len() < RECORD_HEADER {
            if rest.starts_with(&V1_MAGIC[..rest.len().min(4)]) {
                out.torn_tail = torn("short header");
                break;
            }
            return Err(bad_marker());
        }
        if rest[..4] != *V1_MAGIC {
            return Err(bad_marker());
        }
        let len = u32_at(rest, 4) as usize;
        if rest.len() < RECORD_HEADER + len {
            out.torn_tail = torn("short payload");
            break;
        }
        let Some((payload, rec_len)) = record_at(rest, V1_MAGIC) else {
            if rest.len() == RECORD_HEADER + len {
                out.torn_tail = torn("checksum mismatch");
                break;
            }
            return Err(StoreError::corrupt(
                path,
                format!("write-ahead log record at byte {pos} fails its checksum"),
            ));
        };
        let expect_id = first_id + out.records.len() as u64;
        out.records
            .push(decode_payload(path, pos, payload, dim, expect_id)?);
        pos += rec_len;
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
    let bad = |why: String| {
        StoreError::corrupt(path, format!("write-ahead log record at byte {pos}: {why}"))
    };
    if p.len() < 12 {
        return Err(bad("payload too short".into()));
    }
    let id = u64_at(p, 0);
    if id != expect_id {
        return Err(bad(format!(
            "item id {id}, expected {expect_id} (log does not continue this index)"
        )));
    }
    let jlen = u32_at(p, 8) as usize;
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
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(WalRecord {
        meta: ItemMeta {
            id,
            path: rm.path,
            label: rm.label,
            sha256: rm.sha256,
            metadata: rm.metadata,
            deleted: false,
        },
        vector,
    })
}

/// The id a tombstone deletes; it must name an item added before it (below `next_id`).
fn decode_delete(path: &Path, pos: usize, p: &[u8], next_id: u64) -> Result<u64> {
    let bad = |why: String| {
        StoreError::corrupt(
            path,
            format!("write-ahead log tombstone at byte {pos}: {why}"),
        )
    };
    if p.len() != 8 {
        return Err(bad(format!("payload of {} bytes, expected 8", p.len())));
    }
    let id = u64_at(p, 0);
    if id >= next_id {
        return Err(bad(format!(
            "deletes id {id}, which was not added before it (next id {next_id})"
        )));
    }
    Ok(id)
}

/// An open version-2 log, positioned after its last acknowledged batch.
pub struct WalWriter {
    path: PathBuf,
    file: File,
    generation: u64,
    /// Bytes of the header and acknowledged batches; a failed append is cut back to this.
    len: u64,
}

impl WalWriter {
    /// Opens the existing log `path` (created by the commit) for appending, cutting off a
    /// torn tail at `valid_len`.
    pub fn open(path: &Path, generation: u64, valid_len: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io(path, "cannot open write-ahead log", e))?;
        let len = file
            .metadata()
            .map_err(|e| StoreError::io(path, "cannot stat write-ahead log", e))?
            .len();
        if len < valid_len {
            return Err(StoreError::corrupt(
                path,
                format!("write-ahead log shrank to {len} bytes since it was read ({valid_len})"),
            ));
        }
        if len > valid_len {
            file.set_len(valid_len)
                .and_then(|_| file.sync_all())
                .map_err(|e| StoreError::io(path, "cannot cut off the torn tail", e))?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
            generation,
            len: valid_len,
        })
    }

    /// Appends already-encoded `records` (`count` of them, ending before id `next_id`) as
    /// one batch: records, fsync, commit record, fsync. Once this returns they survive a
    /// crash and count as acknowledged. A failed append is cut back off.
    pub fn append(&mut self, records: &[u8], count: u32, next_id: u64) -> Result<()> {
        let end = self.len + records.len() as u64;
        let commit = commit_record(self.generation, self.len, end, count, next_id);
        let res = self.write_at(self.len, records).and_then(|_| {
            self.file.sync_data()?;
            self.write_at(end, &commit)?;
            self.file.sync_data()
        });
        if let Err(e) = res {
            let _ = self.file.set_len(self.len);
            return Err(StoreError::io(
                &self.path,
                "cannot append to write-ahead log",
                e,
            ));
        }
        self.len = end + commit.len() as u64;
        Ok(())
    }

    /// Bytes of the header and acknowledged batches.
    pub fn valid_len(&self) -> u64 {
        self.len
    }

    fn write_at(&mut self, at: u64, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::{Seek, SeekFrom};
        self.file.seek(SeekFrom::Start(at))?;
        self.file.write_all(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: Expect = Expect {
        generation: 3,
        first_id: 10,
        dim: 2,
    };

    fn meta(id: u64) -> ItemMeta {
        ItemMeta {
            id,
            path: format!("p{id}"),
            label: None,
            sha256: format!("s{id}"),
            metadata: None,
            deleted: false,
        }
    }

    /// A log with batches of the given sizes; returns it and each record's start offset.
    fn log(batches: &[usize]) -> (tempfile::TempDir, PathBuf, Vec<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let d = Directory::new(dir.path());
        create(&d, "wal.g3.log", E).unwrap();
        let path = d.file("wal.g3.log");
        let mut w = WalWriter::open(&path, E.generation, HEADER_LEN).unwrap();
        let mut id = E.first_id;
        let mut starts = Vec::new();
        for &n in batches {
            let mut buf = Vec::new();
            for _ in 0..n {
                starts.push(w.valid_len() as usize + buf.len());
                buf.extend(encode(&meta(id), &[id as f32, 1.0]));
                id += 1;
            }
            w.append(&buf, n as u32, id).unwrap();
        }
        (dir, path, starts)
    }

    fn flip(path: &Path, at: usize) {
        let mut b = std::fs::read(path).unwrap();
        b[at] ^= 0x10;
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn batches_replay_in_order() {
        let (_d, path, _) = log(&[1, 3, 1]);
        let r = replay(&path, E).unwrap();
        assert!(r.torn_tail.is_none());
        let ids: Vec<u64> = r.records.iter().map(|r| r.meta.id).collect();
        assert_eq!(ids, (10..15).collect::<Vec<_>>());
        assert_eq!(r.records[4].vector, vec![14.0, 1.0]);
        assert_eq!(r.valid_len, std::fs::metadata(&path).unwrap().len());
        assert_eq!(r.valid_len % ALIGN as u64, 0);
    }

    #[test]
    fn tombstones_and_metadata_replay_and_a_torn_tombstone_is_dropped() {
        let (_d, path, _) = log(&[2]);
        let mut w =
            WalWriter::open(&path, E.generation, replay(&path, E).unwrap().valid_len).unwrap();
        let mut m = meta(12);
        m.metadata = serde_json::json!({"price": 3}).as_object().cloned();
        let mut buf = encode(&m, &[1.0, 2.0]);
        buf.extend(encode_delete(10));
        buf.extend(encode_delete(12));
        w.append(&buf, 3, 13).unwrap();
        let acknowledged = w.valid_len();
        let r = replay(&path, E).unwrap();
        assert_eq!(r.records.len(), 3);
        assert_eq!(r.records[2].meta.metadata, m.metadata);
        assert_eq!(r.deleted, vec![10, 12]);
        // A tombstone whose commit record never came: not acknowledged, dropped.
        w.write_at(acknowledged, &encode_delete(11)).unwrap();
        let r = replay(&path, E).unwrap();
        assert_eq!(r.deleted, vec![10, 12]);
        assert!(r.torn_tail.is_some());
        // A tombstone for an id not added before it is corruption.
        let (_d2, path2, _) = log(&[1]);
        let mut w2 =
            WalWriter::open(&path2, E.generation, replay(&path2, E).unwrap().valid_len).unwrap();
        w2.append(&encode_delete(11), 1, 11).unwrap();
        let e = replay(&path2, E).unwrap_err().to_string();
        assert!(e.contains("not added before it"), "{e}");
    }

    #[test]
    fn a_damaged_last_record_is_corruption_but_an_unconfirmed_one_is_torn() {
        let (_d, path, starts) = log(&[2, 1]);
        let good = std::fs::read(&path).unwrap();
        // A byte flipped inside the last (acknowledged) record's vector.
        flip(&path, starts[2] + RECORD_HEADER + 20);
        let e = replay(&path, E).unwrap_err().to_string();
        assert!(
            e.contains(&format!("damaged at byte {}", starts[2])) && e.contains("acknowledged"),
            "{e}"
        );
        // Its length field instead: the scan still finds the commit record after it.
        std::fs::write(&path, &good).unwrap();
        flip(&path, starts[2] + 5);
        assert!(replay(&path, E)
            .unwrap_err()
            .to_string()
            .contains("acknowledged"));
        // The commit record itself.
        std::fs::write(&path, &good).unwrap();
        flip(&path, good.len() - 3);
        let e = replay(&path, E).unwrap_err().to_string();
        assert!(e.contains("commit record") && e.contains("damaged"), "{e}");
        // Crash between the two fsyncs: the record is whole, its commit record absent or zero.
        let cut = starts[2] + (good.len() - starts[2] - COMMIT_LEN);
        for tail in [&good[..cut], &[&good[..cut], &[0u8; 64][..]].concat()[..]] {
            std::fs::write(&path, tail).unwrap();
            let r = replay(&path, E).unwrap();
            assert_eq!(r.records.len(), 2);
            assert!(r.torn_tail.as_deref().unwrap().contains("1 whole record"));
            assert_eq!(r.valid_len as usize, starts[2]);
        }
        // Crash inside the record write.
        std::fs::write(&path, &good[..starts[2] + 30]).unwrap();
        let r = replay(&path, E).unwrap();
        assert_eq!((r.records.len(), r.valid_len as usize), (2, starts[2]));
        assert!(r.torn_tail.is_some());
    }

    #[test]
    fn a_damaged_middle_record_or_header_and_a_missing_or_foreign_log_are_errors() {
        let (_d, path, starts) = log(&[2, 1]);
        let good = std::fs::read(&path).unwrap();
        flip(&path, starts[0] + RECORD_HEADER + 3);
        let e = replay(&path, E).unwrap_err().to_string();
        assert!(e.contains(&format!("byte {}", starts[0])), "{e}");
        std::fs::write(&path, &good).unwrap();
        flip(&path, 9);
        assert!(replay(&path, E).unwrap_err().to_string().contains("header"));
        std::fs::write(&path, &good).unwrap();
        let other = Expect { first_id: 11, ..E };
        let e = replay(&path, other).unwrap_err().to_string();
        assert!(e.contains("another index"), "{e}");
        std::fs::remove_file(&path).unwrap();
        let e = replay(&path, E).unwrap_err();
        assert!(matches!(e, StoreError::Missing { .. }), "{e}");
        assert!(e.to_string().contains("wal.g3.log"));
    }

    #[test]
    fn reopening_cuts_a_torn_tail_before_appending() {
        let (_d, path, _) = log(&[1]);
        let good_len = std::fs::metadata(&path).unwrap().len();
        let mut b = std::fs::read(&path).unwrap();
        b.extend_from_slice(&encode(&meta(11), &[1.0, 1.0])[..20]);
        std::fs::write(&path, &b).unwrap();
        let r = replay(&path, E).unwrap();
        assert_eq!(r.valid_len, good_len);
        let mut w = WalWriter::open(&path, E.generation, r.valid_len).unwrap();
        w.append(&encode(&meta(11), &[2.0, 1.0]), 1, 12).unwrap();
        let r = replay(&path, E).unwrap();
        assert!(r.torn_tail.is_none());
        assert_eq!(r.records.len(), 2);
    }
}
