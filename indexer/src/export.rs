//! Vector export for peers and external tools: NumPy `.npy` (float32, C order) or `.fvecs`
//! (the ANN-benchmark format: per row an i32 LE dim then dim f32 LE).

use std::path::Path;

use crate::store::{write_atomic_with, Result, StoreError as Error};
use crate::vectors::Rows;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorFormat {
    Npy,
    Fvecs,
}

impl VectorFormat {
    /// From the file extension.
    pub fn from_path(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("npy") => Ok(Self::Npy),
            Some("fvecs") => Ok(Self::Fvecs),
            _ => Err(Error::Invalid(format!(
                "{}: unknown vector format: the file name must end in .npy or .fvecs",
                path.display()
            ))),
        }
    }
}

/// The `.npy` v1.0 header for a `rows × dim` little-endian float32 array.
pub fn npy_header(rows: usize, dim: usize) -> Vec<u8> {
    let dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({rows}, {dim}), }}");
    // magic (6) + version (2) + header length (2) + dict + padding + '\n' is a multiple of 64.
    let unpadded = 10 + dict.len() + 1;
    let pad = (64 - unpadded % 64) % 64;
    let mut h = Vec::with_capacity(unpadded + pad);
    h.extend_from_slice(b"\x93NUMPY\x01\x00");
    h.extend_from_slice(&((dict.len() + pad + 1) as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h.extend(std::iter::repeat_n(b' ', pad));
    h.push(b'\n');
    h
}

/// Writes `vectors` (row-major, `dim` per row) to `path` in `format`, atomically and durably.
pub fn write_vectors(path: &Path, format: VectorFormat, vectors: &[f32], dim: usize) -> Result<()> {
    if dim == 0 || !vectors.len().is_multiple_of(dim) {
        return Err(Error::Invalid(format!(
            "{} floats do not form rows of {dim}",
            vectors.len()
        )));
    }
    write_rows(path, format, Rows::new(vectors, dim))
}

/// [`write_vectors`] for the rows of an index (mapped and heap rows alike).
pub fn write_rows(path: &Path, format: VectorFormat, vectors: Rows<'_>) -> Result<()> {
    let (rows, dim) = (vectors.len(), vectors.dim());
    write_atomic_with(path, |w| {
        if format == VectorFormat::Npy {
            w.write_all(&npy_header(rows, dim))?;
        }
        for row in vectors.iter_from(0) {
            if format == VectorFormat::Fvecs {
                w.write_all(&(dim as i32).to_le_bytes())?;
            }
            for x in row {
                w.write_all(&x.to_le_bytes())?;
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_and_fvecs_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let v = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let p = dir.path().join("v.npy");
        write_vectors(&p, VectorFormat::from_path(&p).unwrap(), &v, 3).unwrap();
        let b = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        let header = std::str::from_utf8(&b[10..10 + hlen]).unwrap();
        assert!(header.contains("'shape': (2, 3)"), "{header}");
        assert_eq!(b.len(), 10 + hlen + 24);
        assert_eq!(
            f32::from_le_bytes(b[10 + hlen + 20..].try_into().unwrap()),
            6.0
        );

        let p = dir.path().join("v.fvecs");
        write_vectors(&p, VectorFormat::Fvecs, &v, 3).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 2 * (4 + 12));
        assert_eq!(i32::from_le_bytes(b[16..20].try_into().unwrap()), 3);
        assert_eq!(f32::from_le_bytes(b[20..24].try_into().unwrap()), 4.0);
        assert!(VectorFormat::from_path(Path::new("x.csv")).is_err());
    }
}
