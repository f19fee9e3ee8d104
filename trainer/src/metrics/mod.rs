//! Retrieval metrics of the deep-metric-learning literature, computed the way the papers do.
//!
//! The work is split in two so that exact and approximate search are scored identically:
//!
//! * **finding neighbours** — [`knn_exact`] (brute force, what papers report) here, or the
//!   indexer's HNSW lists;
//! * **scoring neighbours** — [`recall_at_k`], [`map_at_r`] and
//!   [`RetrievalMetrics::from_neighbors`] take neighbour lists (`neighbors[q]` = indices of the
//!   items closest to query `q`, best first, `q` itself excluded) and never look at vectors.
//!
//! Clustering quality (NMI) needs the vectors: [`kmeans_pp`] then [`nmi`]. [`evaluate`] runs the
//! whole protocol of `docs/protocol.md` ("Evaluation") on a test split: the gallery is the whole
//! split, every item is a query, search is exact.

mod evaluate;
mod kmeans;
mod knn;
mod nmi;
mod retrieval;

pub use evaluate::{default_ks, evaluate, evaluate_retrieval, RetrievalMetrics, KMEANS_MAX_ITER};
pub use kmeans::kmeans_pp;
pub use knn::knn_exact;
pub use nmi::nmi;
pub use retrieval::{map_at_r, recall_at_k};

use crate::error::{Error, Result};

/// Checks that `data` is a finite row-major `n × dim` matrix and returns `n`.
///
/// Non-finite values would make every ranking meaningless (NaN compares false with
/// everything), so they are rejected up front with the offending row named.
fn rows(data: &[f32], dim: usize) -> Result<usize> {
    if dim == 0 {
        return Err(Error::Invalid("embedding dimension must be at least 1".into()));
    }
    if data.len() % dim != 0 {
        return Err(Error::Invalid(format!(
            "embedding buffer holds {} values, not a whole number of rows of dimension {dim}",
            data.len()
        )));
    }
    if let Some(pos) = data.iter().position(|v| !v.is_finite()) {
        return Err(Error::Invalid(format!(
            "embedding row {} has a non-finite value ({}) at component {}; check the model's output",
            pos / dim,
            data[pos],
            pos % dim
        )));
    }
    Ok(data.len() / dim)
}

/// Squared L2 norm of every row, in f32 (the same arithmetic for identical rows, so exact
/// duplicates keep exactly equal scores and the index tie rule decides between them).
fn row_norms_sq(data: &[f32], dim: usize) -> Vec<f32> {
    data.chunks_exact(dim).map(|r| r.iter().map(|v| v * v).sum()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_rejects_bad_shapes_and_values() {
        assert_eq!(rows(&[0.0; 6], 3).unwrap(), 2);
        assert_eq!(rows(&[], 3).unwrap(), 0);
        assert!(rows(&[0.0; 6], 0).unwrap_err().to_string().contains("at least 1"));
        assert!(rows(&[0.0; 7], 3).unwrap_err().to_string().contains("7 values"));
        let err = rows(&[0.0, 0.0, 0.0, 0.0, f32::NAN, 0.0], 3).unwrap_err().to_string();
        assert!(err.contains("row 1") && err.contains("component 1"), "{err}");
    }
}
