//! The int8 scalar-quantised copy of the vectors the graph walk reads (`--quantize int8`).
//!
//! A graph search touches a few thousand vectors per query at random; at a million 512-d
//! vectors those reads miss the cache and dominate. One byte per dimension instead of four
//! makes the walked copy a quarter of the size. Each dimension gets its own range
//! (`lo`, `step` = range / 255), learnt from the vectors when the copy is made; later rows
//! outside it are clamped. Distances are asymmetric (the query stays f32):
//! Σ step²·(q' − c)² with q' = (q − lo) / step, so a query pays one rescale and each
//! candidate one SIMD pass over its bytes. The walk's top candidates are then re-ranked with
//! the exact f32 distance, so what a search returns is as exact as without quantisation;
//! only which candidates the walk visits changes.
//!
//! An open index maps its codes file (the rows are read in place; rows added since the
//! commit are on the heap), so the walk's working set, not the file, is what stays resident.

use std::io::Write;

use memmap2::Mmap;

use crate::store::{Directory, FileEntry, Result, StoreError};
use crate::vectors::Rows;

/// First bytes of a codes file; the digit is the layout's version.
const MAGIC: &[u8; 8] = b"DMINT8C1";
const HEADER_LEN: usize = 8 + 8 + 8;

/// The codes of every row plus each dimension's range.
#[derive(Debug)]
pub struct Int8Codes {
    dim: usize,
    lo: Vec<f32>,
    step: Vec<f32>,
    /// step², the weight of each dimension's squared code difference.
    weight: Vec<f32>,
    /// The committed codes file, its rows starting at `HEADER_LEN + 8 * dim`.
    map: Option<Mmap>,
    mapped_rows: usize,
    /// Rows encoded since (on the heap).
    codes: Vec<u8>,
}

impl Int8Codes {
    /// Learns each dimension's range from `vectors` and encodes them.
    pub fn train(vectors: Rows<'_>) -> Self {
        let dim = vectors.dim();
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for row in vectors.iter_from(0) {
            for ((l, h), &x) in lo.iter_mut().zip(hi.iter_mut()).zip(row) {
                *l = l.min(x);
                *h = h.max(x);
            }
        }
        if vectors.is_empty() {
            // No rows yet: the whole range of a unit vector's coordinate.
            lo.fill(-1.0);
            hi.fill(1.0);
        }
        let step: Vec<f32> = lo
            .iter()
            .zip(&hi)
            .map(|(l, h)| ((h - l) / 255.0).max(1e-9))
            .collect();
        let mut c = Self::with_ranges(dim, lo, step);
        c.push_rows(vectors.iter_from(0));
        c
    }

    fn with_ranges(dim: usize, lo: Vec<f32>, step: Vec<f32>) -> Self {
        let weight = step.iter().map(|s| s * s).collect();
        Self {
            dim,
            lo,
            step,
            weight,
            map: None,
            mapped_rows: 0,
            codes: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.mapped_rows + self.codes.len() / self.dim.max(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the codes of `rows` (clamped to the learnt ranges).
    pub fn push_rows<'a>(&mut self, rows: impl Iterator<Item = &'a [f32]>) {
        for row in rows {
            for ((&x, &l), &s) in row.iter().zip(&self.lo).zip(&self.step) {
                self.codes
                    .push(((x - l) / s).round().clamp(0.0, 255.0) as u8);
            }
        }
    }

    /// The query in code units, ready for [`Int8Codes::distance`].
    pub fn prepare(&self, query: &[f32]) -> Vec<f32> {
        query
            .iter()
            .zip(&self.lo)
            .zip(&self.step)
            .map(|((&q, &l), &s)| (q - l) / s)
            .collect()
    }

    /// Approximate squared Euclidean distance of a prepared query to row `v`.
    #[inline]
    pub fn distance(&self, prepared: &[f32], v: u32) -> f32 {
        crate::distance::weighted_sq_u8(prepared, &self.weight, self.row(v))
    }

    /// Row v's codes (also for prefetching).
    #[inline]
    pub fn row(&self, v: u32) -> &[u8] {
        let v = v as usize;
        match &self.map {
            Some(m) if v < self.mapped_rows => {
                let at = HEADER_LEN + 8 * self.dim + v * self.dim;
                &m[at..at + self.dim]
            }
            _ => {
                let at = (v - self.mapped_rows) * self.dim;
                &self.codes[at..at + self.dim]
            }
        }
    }

    /// Writes the codes as `name` in `store` (fsynced). Layout: [`MAGIC`], dim and rows
    /// (u64 LE), `lo` and `step` (dim f32 LE each), the codes (rows × dim bytes).
    pub fn write(&self, store: &Directory, name: &str) -> Result<FileEntry> {
        store.write_new(name, |w| {
            w.write_all(MAGIC)?;
            w.write_all(&(self.dim as u64).to_le_bytes())?;
            w.write_all(&(self.len() as u64).to_le_bytes())?;
            for x in self.lo.iter().chain(&self.step) {
                w.write_all(&x.to_le_bytes())?;
            }
            if let Some(m) = &self.map {
                w.write_all(&m[HEADER_LEN + 8 * self.dim..])?;
            }
            w.write_all(&self.codes)
        })
    }

    /// Maps the codes file listed as `entry` for `n` rows of `dim` (checksum verified
    /// without leaving the file resident, see [`Directory::map_verified`]); a file that is
    /// not that is a [`StoreError::Corrupt`] naming it.
    pub fn map(store: &Directory, entry: &FileEntry, dim: usize, n: usize) -> Result<Self> {
        let map = store.map_verified(entry)?;
        let mut c = Self::parse_header(&store.file(&entry.name), &map, dim, n)?;
        c.map = Some(map);
        c.mapped_rows = n;
        Ok(c)
    }

    /// Reads codes written by [`Int8Codes::write`] for `n` rows of `dim` (checksummed by the
    /// caller) into memory; anything else is a [`StoreError::Corrupt`] naming `path`.
    pub fn parse(path: &std::path::Path, bytes: &[u8], dim: usize, n: usize) -> Result<Self> {
        let mut c = Self::parse_header(path, bytes, dim, n)?;
        c.codes = bytes[HEADER_LEN + 8 * dim..].to_vec();
        Ok(c)
    }

    /// The ranges of a codes file whose size fits `n` rows of `dim`; no codes yet.
    fn parse_header(path: &std::path::Path, bytes: &[u8], dim: usize, n: usize) -> Result<Self> {
        let bad = |msg: String| StoreError::corrupt(path, format!("int8 codes file: {msg}"));
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(bad(
                "not an int8 codes file of this version (bad header)".into()
            ));
        }
        let u64_at = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        let (d, rows) = (u64_at(8), u64_at(16));
        if d != dim as u64 || rows != n as u64 {
            return Err(bad(format!(
                "holds {rows} rows of {d}, the index has {n} vectors of {dim}"
            )));
        }
        let expect = HEADER_LEN + 8 * dim + n * dim;
        if bytes.len() != expect {
            return Err(bad(format!("{} bytes, expected {expect}", bytes.len())));
        }
        let floats: Vec<f32> = bytes[HEADER_LEN..HEADER_LEN + 8 * dim]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let (lo, step) = floats.split_at(dim);
        if lo.iter().chain(step).any(|x| !x.is_finite()) || step.iter().any(|&s| s <= 0.0) {
            return Err(bad("a dimension's range is not finite and positive".into()));
        }
        Ok(Self::with_ranges(dim, lo.to_vec(), step.to_vec()))
    }

    /// Same dimension ranges and the same codes (a map and a heap copy compare equal).
    #[cfg(test)]
    pub fn same_as(&self, other: &Self) -> bool {
        self.dim == other.dim
            && self.lo == other.lo
            && self.step == other.step
            && self.len() == other.len()
            && (0..self.len() as u32).all(|v| self.row(v) == other.row(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::distance::squared_l2;
    use crate::synthetic::clustered;

    #[test]
    fn distances_track_the_exact_ones_and_files_read_back() {
        let dim = 40;
        let (v, _) = clustered(300, dim, 5, 1.0, 4);
        let c = Int8Codes::train(Rows::new(&v, dim));
        assert_eq!(c.len(), 300);
        let q = &v[7 * dim..8 * dim];
        let pq = c.prepare(q);
        for u in [0u32, 7, 150, 299] {
            let exact = squared_l2(q, &v[u as usize * dim..(u as usize + 1) * dim]);
            let approx = c.distance(&pq, u);
            assert!((exact - approx).abs() < 0.01, "{u}: {exact} vs {approx}");
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Directory::new(dir.path());
        let e = c.write(&store, "c.int8").unwrap();
        let bytes = store.read_verified(&e).unwrap();
        let p = dir.path().join("c.int8");
        assert!(Int8Codes::parse(&p, &bytes, dim, 300).unwrap().same_as(&c));
        let mapped = Int8Codes::map(&store, &e, dim, 300).unwrap();
        assert!(mapped.same_as(&c));
        // Mapped rows plus heap rows write out as one file.
        let mut grown = mapped;
        grown.push_rows(v.chunks_exact(dim).take(2));
        let e2 = grown.write(&store, "c2.int8").unwrap();
        let back = Int8Codes::map(&store, &e2, dim, 302).unwrap();
        assert!(back.same_as(&grown) && back.row(301) == c.row(1));
        assert!(Int8Codes::map(&store, &e, dim, 299).is_err());
        assert!(Int8Codes::parse(&p, &bytes, dim, 299).is_err());
        assert!(Int8Codes::parse(&p, &bytes[..bytes.len() - 1], dim, 300).is_err());
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 4 * dim..HEADER_LEN + 4 * dim + 4].copy_from_slice(&(-1f32).to_le_bytes());
        let e = Int8Codes::parse(&p, &bad, dim, 300)
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.int8") && e.contains("range"), "{e}");
    }
}
