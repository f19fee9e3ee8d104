//! Exact k-nearest-neighbour search: blocked matrix product plus per-row bounded selection.

use std::collections::BinaryHeap;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use super::{row_norms_sq, rows};
use crate::error::{Error, Result};

/// Upper bound on the similarity block held in memory at once (floats): 16 Mi floats = 64 MiB,
/// i.e. 279 query rows against a 60,000-item gallery. Large enough for the matrix product to
/// run at full speed, small enough for SOP to fit comfortably beside its 240 MB of results.
const BLOCK_FLOATS: usize = 16 << 20;

/// Exact `k` nearest neighbours of every row of `data` (row-major `n × dim`) among all the
/// other rows, by Euclidean distance — for L2-normalised embeddings (what
/// [`crate::embed::Embedder`] produces) this is the same order as cosine similarity.
///
/// * The query is excluded **by index**: an exact duplicate of the query stored at another
///   index is a legitimate neighbour (distance 0) and is kept, as the paper protocol wants.
/// * Each list is sorted nearest first; equal distances are ordered by smaller index, so the
///   result is deterministic and identical to a stable sort of the brute-force distances.
/// * Lists have `min(k, n − 1)` entries.
///
/// Distances are ranked as `2·q·x − ‖x‖²` (which is `‖q‖² − ‖q − x‖²`), computed block by block
/// with a matrix product (candle's multi-threaded gemm); each row of a block is then reduced to
/// its top `k` with a bounded heap in parallel, so memory is O(block + n·k) rather than O(n²).
/// n = 60,000, dim = 512, k = 1000 (SOP) needs about 0.5 GB.
///
/// Errors on a malformed matrix (see [`super::rows`]) or when `n` does not fit a `u32` index.
pub fn knn_exact(data: &[f32], dim: usize, k: usize) -> Result<Vec<Vec<u32>>> {
    let n = rows(data, dim)?;
    if n > u32::MAX as usize {
        return Err(Error::Invalid(format!("{n} embeddings exceed the u32 index range")));
    }
    let k = k.min(n.saturating_sub(1));
    if k == 0 {
        return Ok(vec![Vec::new(); n]);
    }
    knn_blocked(data, n, dim, k, (BLOCK_FLOATS / n).clamp(1, n))
}

/// [`knn_exact`] on a validated `n × dim` matrix, `block` query rows at a time, 1 ≤ k < n.
fn knn_blocked(data: &[f32], n: usize, dim: usize, k: usize, block: usize) -> Result<Vec<Vec<u32>>> {
    let norms = row_norms_sq(data, dim);
    let all = Tensor::from_slice(data, (n, dim), &Device::Cpu)?;
    let gallery_t = all.t()?;

    let mut out = Vec::with_capacity(n);
    for start in (0..n).step_by(block) {
        let len = block.min(n - start);
        let dots = all.narrow(0, start, len)?.matmul(&gallery_t)?;
        let dots = dots.flatten_all()?.to_vec1::<f32>()?;
        let lists: Vec<Vec<u32>> = dots
            .par_chunks_exact(n)
            .enumerate()
            .map(|(r, row)| top_k(row, &norms, start + r, k))
            .collect();
        out.extend(lists);
    }
    Ok(out)
}

/// A candidate neighbour, ordered so that the *worst* candidate is the heap's maximum:
/// lower score is worse, and among equal scores the larger index is worse.
#[derive(Clone, Copy)]
struct Cand {
    score: f32,
    idx: u32,
}

impl PartialEq for Cand {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}
impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Cand {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        use std::cmp::Ordering::*;
        // Scores are finite (inputs are validated); `<`/`>` rather than `total_cmp` so that
        // 0.0 and -0.0 count as the tie they are.
        if self.score < other.score {
            Greater
        } else if self.score > other.score {
            Less
        } else {
            self.idx.cmp(&other.idx)
        }
    }
}

/// Top `k` (k ≥ 1) of one row of dot products, `query` excluded, best first.
///
/// Items are visited in increasing index order, so a newcomer whose score merely *equals* the
/// current worst kept score is worse than it (larger index) and is rejected by the single
/// comparison `score > worst` — the common case after the heap fills.
fn top_k(dots: &[f32], norms: &[f32], query: usize, k: usize) -> Vec<u32> {
    let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
    let mut worst = f32::NEG_INFINITY;
    for (j, (&dot, &norm)) in dots.iter().zip(norms).enumerate() {
        if j == query {
            continue;
        }
        let score = 2.0 * dot - norm + 0.0; // `+ 0.0` turns a -0.0 into 0.0
        if heap.len() < k {
            heap.push(Cand { score, idx: j as u32 });
            if heap.len() == k {
                worst = heap.peek().map_or(f32::NEG_INFINITY, |c| c.score);
            }
        } else if score > worst {
            if let Some(mut top) = heap.peek_mut() {
                *top = Cand { score, idx: j as u32 };
            }
            worst = heap.peek().map_or(f32::NEG_INFINITY, |c| c.score);
        }
    }
    heap.into_sorted_vec().into_iter().map(|c| c.idx).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Reference: all distances in f64, stable sort by (distance, index).
    fn brute_force(data: &[f32], dim: usize, k: usize) -> Vec<Vec<u32>> {
        let n = data.len() / dim;
        (0..n)
            .map(|q| {
                let qv = &data[q * dim..(q + 1) * dim];
                let mut d: Vec<(f64, u32)> = (0..n)
                    .filter(|&j| j != q)
                    .map(|j| {
                        let x = &data[j * dim..(j + 1) * dim];
                        let dist = qv.iter().zip(x).map(|(a, b)| (*a as f64 - *b as f64).powi(2)).sum();
                        (dist, j as u32)
                    })
                    .collect();
                d.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap().then(a.1.cmp(&b.1)));
                d.into_iter().take(k).map(|(_, j)| j).collect()
            })
            .collect()
    }

    #[test]
    fn equals_brute_force_on_random_unit_vectors() {
        let (n, dim, k) = (300, 24, 17);
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut data: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        for row in data.chunks_exact_mut(dim) {
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            row.iter_mut().for_each(|v| *v /= norm);
        }
        let got = knn_exact(&data, dim, k).unwrap();
        let want = brute_force(&data, dim, k);
        assert_eq!(got.len(), n);
        // Random continuous data has no ties closer than f32 rounding, so the lists must match
        // exactly, order included.
        assert_eq!(got, want);
    }

    #[test]
    fn equals_brute_force_with_many_exact_ties() {
        // Small integer components: every dot product and norm is exact in f32, so ties are
        // exact and the tie rule (smaller index first) is checked against the reference sort.
        let (n, dim, k) = (120, 3, 30);
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-2i32..=2) as f32).collect();
        assert_eq!(knn_exact(&data, dim, k).unwrap(), brute_force(&data, dim, k));
    }

    #[test]
    fn ties_go_to_the_smaller_index() {
        // Query 0 = (1, 0). Items 1, 2 and 3 are all at the same distance from it: (0, 1),
        // (0, -1) and (0, 1) again; item 4 = (1, 0) duplicates the query. Expected order for
        // query 0: 4 (distance 0), then 1, 2, 3 (distance² 2 each, by index).
        let data = [1.0, 0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 1.0, 0.0];
        let nn = knn_exact(&data, 2, 4).unwrap();
        assert_eq!(nn[0], vec![4, 1, 2, 3]);
        // With k = 2 the tie at rank 2 is cut by index: 1 is kept, 2 and 3 are not.
        assert_eq!(knn_exact(&data, 2, 2).unwrap()[0], vec![4, 1]);
        // Query 1 = (0, 1): item 3 is its duplicate (distance 0); items 0 and 4 tie at
        // distance² 2 → 0 before 4; item 2 is farthest (distance² 4).
        assert_eq!(nn[1], vec![3, 0, 4, 2]);
    }

    #[test]
    fn query_is_excluded_by_index_but_duplicates_stay() {
        // Three identical vectors: each query's neighbours are the two others, never itself.
        let data = [0.6, 0.8, 0.6, 0.8, 0.6, 0.8];
        let nn = knn_exact(&data, 2, 5).unwrap();
        assert_eq!(nn, vec![vec![1, 2], vec![0, 2], vec![0, 1]]);
    }

    #[test]
    fn degenerate_sizes() {
        assert_eq!(knn_exact(&[], 4, 3).unwrap(), Vec::<Vec<u32>>::new());
        assert_eq!(knn_exact(&[1.0, 0.0], 2, 3).unwrap(), vec![Vec::<u32>::new()]);
        assert_eq!(knn_exact(&[1.0, 0.0, 0.0, 1.0], 2, 0).unwrap(), vec![Vec::<u32>::new(); 2]);
        assert!(knn_exact(&[1.0, 0.0, 0.0], 2, 1).is_err());
    }

    #[test]
    fn blocking_does_not_change_results() {
        // SOP-sized inputs run in many blocks; force that here with 7-row blocks (the last one
        // partial) and compare with a single block.
        let (n, dim, k) = (50, 5, 10);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let data: Vec<f32> = (0..n * dim).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        let one = knn_blocked(&data, n, dim, k, n).unwrap();
        assert_eq!(knn_blocked(&data, n, dim, k, 7).unwrap(), one);
        assert_eq!(one, brute_force(&data, dim, k));
    }
}
