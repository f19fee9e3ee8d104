//! The gallery's vectors: the committed rows memory-mapped from the generation's vectors
//! file, the rows added since (WAL replay, adds) on the heap until the next commit writes
//! them into a new generation, whose file then replaces the map.
//!
//! Mapping instead of reading means a searcher's resident set holds the rows it touches,
//! not the file: with `--quantize int8` the walk reads the codes and only the re-rank reads
//! f32 rows (`ef` per query), so most of the vectors file stays on disk or in the
//! (reclaimable) page cache.

use memmap2::{Advice, Mmap};

use crate::store::{Directory, FileEntry, Result, StoreError};

// The vectors file is little-endian f32, read in place.
const _: () = assert!(
    cfg!(target_endian = "little"),
    "the index files are little-endian and are mapped as they are"
);

/// A view of every row, row i = id i: a mapped prefix and a heap tail. `Copy`, so the
/// graph code can pass it around like the slice it replaces.
#[derive(Clone, Copy, Debug)]
pub struct Rows<'a> {
    dim: usize,
    base: &'a [f32],
    tail: &'a [f32],
}

impl<'a> Rows<'a> {
    /// All rows in one slice (`dim` per row).
    pub fn new(data: &'a [f32], dim: usize) -> Self {
        Self {
            dim: dim.max(1),
            base: data,
            tail: &[],
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        (self.base.len() + self.tail.len()) / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` (panics past the end, like slice indexing).
    #[inline]
    pub fn row(&self, i: usize) -> &'a [f32] {
        let at = i * self.dim;
        if at < self.base.len() {
            &self.base[at..at + self.dim]
        } else {
            let at = at - self.base.len();
            &self.tail[at..at + self.dim]
        }
    }

    /// Rows `from..` in order.
    pub fn iter_from(&self, from: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let dim = self.dim;
        let base_rows = self.base.len() / dim;
        let (base, tail) = if from <= base_rows {
            (&self.base[from * dim..], self.tail)
        } else {
            (&self.base[..0], &self.tail[(from - base_rows) * dim..])
        };
        base.chunks_exact(dim).chain(tail.chunks_exact(dim))
    }

    /// The first `n` rows.
    pub fn prefix(&self, n: usize) -> Self {
        let cells = n * self.dim;
        if cells <= self.base.len() {
            Self {
                dim: self.dim,
                base: &self.base[..cells],
                tail: &[],
            }
        } else {
            Self {
                dim: self.dim,
                base: self.base,
                tail: &self.tail[..cells - self.base.len()],
            }
        }
    }
}

/// The vectors of an open index (see the module note).
#[derive(Debug)]
pub struct Vectors {
    dim: usize,
    /// The committed rows, `None` when the generation holds none.
    map: Option<Mmap>,
    base_rows: usize,
    /// The map is read a row at a time (`MADV_RANDOM`, see [`Vectors::map`]).
    random: bool,
    /// Rows added since the map's generation was committed.
    tail: Vec<f32>,
}

impl Vectors {
    /// No rows.
    pub fn empty(dim: usize) -> Self {
        Self {
            dim: dim.max(1),
            map: None,
            base_rows: 0,
            random: false,
            tail: Vec::new(),
        }
    }

    /// Maps the vectors file listed as `entry` (size and SHA-256 checked, every value
    /// checked finite, in one pass that leaves nothing resident; see
    /// [`Directory::map_verified`]). `random` tells the kernel rows will be read one at a
    /// time in no order (the int8 re-rank), so a fault does not read ahead around them.
    pub fn map(store: &Directory, entry: &FileEntry, dim: usize, random: bool) -> Result<Self> {
        let dim = dim.max(1);
        let path = store.file(&entry.name);
        if !entry.bytes.is_multiple_of(4 * dim as u64) {
            return Err(StoreError::corrupt(
                &path,
                format!("the manifest lists a size that is not whole rows of {dim} floats"),
            ));
        }
        let mut bad_row = None;
        let map = store.map_verified_with(entry, |offset, chunk| {
            if bad_row.is_none() {
                if let Some(j) = chunk
                    .chunks_exact(4)
                    .position(|b| !f32::from_le_bytes(b.try_into().expect("4 bytes")).is_finite())
                {
                    bad_row = Some((offset / 4 + j) / dim);
                }
            }
        })?;
        if let Some(row) = bad_row {
            return Err(StoreError::corrupt(
                &path,
                format!("vector {row} holds a non-finite value"),
            ));
        }
        if random {
            // Advisory: without it the map works the same, only with read-ahead.
            let _ = map.advise(Advice::Random);
        }
        Ok(Self {
            dim,
            base_rows: map.len() / (4 * dim),
            map: Some(map),
            random,
            tail: Vec::new(),
        })
    }

    /// Runs `f` over the rows with the map read ahead as a sequential scan (a commit
    /// copying the rows into the next generation), then restores the row-at-a-time hint.
    pub fn scan<T>(&self, f: impl FnOnce(Rows<'_>) -> T) -> T {
        let advise = |a: Advice| {
            if let Some(m) = self.map.as_ref().filter(|_| self.random) {
                let _ = m.advise(a); // advisory, see `Vectors::map`
            }
        };
        advise(Advice::Sequential);
        let out = f(self.rows());
        advise(Advice::Random);
        out
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn len(&self) -> usize {
        self.base_rows + self.tail.len() / self.dim
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows on the heap (not yet in a committed generation's file).
    pub fn heap_rows(&self) -> usize {
        self.tail.len() / self.dim
    }

    fn base(&self) -> &[f32] {
        match &self.map {
            // SAFETY: the map is page-aligned, so aligned for f32; its length is whole
            // floats (checked when mapped); any bit pattern is an f32; the bytes never
            // change (index files are immutable, see `Directory::map_verified`).
            Some(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr().cast::<f32>(), self.base_rows * self.dim)
            },
            None => &[],
        }
    }

    pub fn rows(&self) -> Rows<'_> {
        Rows {
            dim: self.dim,
            base: self.base(),
            tail: &self.tail,
        }
    }

    pub fn row(&self, i: usize) -> Option<&[f32]> {
        (i < self.len()).then(|| self.rows().row(i))
    }

    /// Appends one row (already normalised) on the heap.
    pub fn push(&mut self, row: &[f32]) {
        debug_assert_eq!(row.len(), self.dim);
        self.tail.extend_from_slice(row);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_span_the_map_and_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let store = Directory::new(dir.path());
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = store.write_bytes("v.f32", &bytes).unwrap();
        let mut v = Vectors::map(&store, &e, 3, true).unwrap();
        v.push(&[12.0, 13.0, 14.0]);
        assert_eq!((v.len(), v.heap_rows()), (5, 1));
        let r = v.rows();
        assert_eq!(r.row(3), &[9.0, 10.0, 11.0]);
        assert_eq!(r.row(4), &[12.0, 13.0, 14.0]);
        let from2: Vec<f32> = r.iter_from(2).flatten().copied().collect();
        assert_eq!(from2, (6..15).map(|x| x as f32).collect::<Vec<_>>());
        assert_eq!(r.iter_from(4).count(), 1);
        assert_eq!(r.prefix(2).len(), 2);
        assert_eq!(r.prefix(5).row(4), &[12.0, 13.0, 14.0]);
        assert!(v.row(5).is_none());

        // A non-finite value is refused with its row, after the checksum matched.
        let mut bad = bytes.clone();
        bad[7 * 4..8 * 4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = store.write_bytes("w.f32", &bad).unwrap();
        let err = Vectors::map(&store, &e, 3, false).unwrap_err().to_string();
        assert!(err.contains("w.f32") && err.contains("vector 2"), "{err}");
    }
}
