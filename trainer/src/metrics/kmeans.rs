//! Seeded k-means (k-means++ initialisation, then Lloyd iterations) for the NMI metric.

use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::{row_norms_sq, rows};
use crate::error::{Error, Result};

/// Floats of the point × centre score block held at once (64 MiB), as in `knn`.
const BLOCK_FLOATS: usize = 16 << 20;
/// Points per parallel work unit of the k-means++ distance update. Fixed (not left to rayon's
/// adaptive splitting) so that the partial sums, and hence the sampled seeds, are bit-for-bit
/// reproducible for a given seed whatever the thread count.
const CHUNK: usize = 2048;

/// Clusters the rows of `data` (row-major `n × dim`) into `k` clusters and returns each row's
/// cluster in `0..k`.
///
/// Initialisation is k-means++ (Arthur & Vassilvitskii 2007): the first centre is a uniformly
/// random row, each next one a row drawn with probability proportional to its squared distance
/// to the nearest centre so far. Then up to `max_iter` Lloyd iterations (assign every row to
/// its nearest centre — a blocked matrix product, parallel — then move each centre to its
/// members' mean), stopping early when no assignment changes. `max_iter = 0` returns the
/// assignment to the k-means++ seeds.
///
/// A cluster left empty by an update is re-seeded at the row farthest from its own centre (a
/// standard remedy, also sklearn's), so the result always uses `k` centres.
///
/// Deterministic for a given `seed`: the random draws come from ChaCha8 and every floating-point
/// reduction runs in a fixed order. Ties (equidistant centres) go to the smaller centre index.
///
/// Errors on a malformed matrix or when `k` is 0 or exceeds the number of rows.
pub fn kmeans_pp(data: &[f32], dim: usize, k: usize, seed: u64, max_iter: usize) -> Result<Vec<u32>> {
    let n = rows(data, dim)?;
    if k == 0 || k > n {
        return Err(Error::Invalid(format!("k-means needs 1 ≤ k ≤ number of points; got k = {k} for {n} points")));
    }
    if k > u32::MAX as usize {
        return Err(Error::Invalid(format!("k = {k} exceeds the u32 cluster id range")));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centres = init_plus_plus(data, n, dim, k, &mut rng);

    let points = Tensor::from_slice(data, (n, dim), &Device::Cpu)?;
    let point_norms = row_norms_sq(data, dim);
    let mut labels = vec![u32::MAX; n];
    for iter in 0..=max_iter {
        let (assigned, dist) = assign(&points, &point_norms, &centres, n, dim, k)?;
        let changed = assigned != labels;
        labels = assigned;
        if !changed || iter == max_iter {
            break;
        }
        centres = update(data, dim, k, &labels, &dist);
    }
    Ok(labels)
}

/// k-means++ seeding; returns the `k × dim` centres.
fn init_plus_plus(data: &[f32], n: usize, dim: usize, k: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let row = |i: usize| &data[i * dim..(i + 1) * dim];
    let mut centres = Vec::with_capacity(k * dim);
    let first = rng.gen_range(0..n);
    centres.extend_from_slice(row(first));
    // Squared distance of every point to its nearest centre so far.
    let mut d2 = vec![f32::INFINITY; n];
    let mut partial = lower_d2(data, dim, &mut d2, row(first));
    for _ in 1..k {
        let total: f64 = partial.iter().sum();
        let next = if total > 0.0 {
            let target = rng.gen::<f64>() * total;
            pick(&d2, &partial, target)
        } else {
            // Every point coincides with a centre already (fewer distinct points than k):
            // any choice is as good; the empty clusters are re-seeded by Lloyd's update.
            rng.gen_range(0..n)
        };
        centres.extend_from_slice(row(next));
        partial = lower_d2(data, dim, &mut d2, row(next));
    }
    centres
}

/// `d2[i] = min(d2[i], ‖x_i − c‖²)` in parallel; returns the per-`CHUNK` sums of `d2` in order.
fn lower_d2(data: &[f32], dim: usize, d2: &mut [f32], c: &[f32]) -> Vec<f64> {
    d2.par_chunks_mut(CHUNK)
        .zip(data.par_chunks(CHUNK * dim))
        .map(|(d2, xs)| {
            let mut sum = 0.0f64;
            for (d, x) in d2.iter_mut().zip(xs.chunks_exact(dim)) {
                let dist: f32 = x.iter().zip(c).map(|(a, b)| (a - b) * (a - b)).sum();
                *d = d.min(dist);
                sum += *d as f64;
            }
            sum
        })
        .collect()
}

/// The point where the running sum of `d2` first exceeds `target` (0 ≤ target < Σ d2), found
/// by skipping whole chunks via their partial sums. Only points with d2 > 0 can be picked.
fn pick(d2: &[f32], partial: &[f64], mut target: f64) -> usize {
    let mut last_positive = None;
    for (c, &s) in partial.iter().enumerate() {
        if target >= s {
            target -= s;
            continue;
        }
        for (i, &d) in d2[c * CHUNK..(c * CHUNK + CHUNK).min(d2.len())].iter().enumerate() {
            if d > 0.0 {
                last_positive = Some(c * CHUNK + i);
                if target < d as f64 {
                    return c * CHUNK + i;
                }
                target -= d as f64;
            }
        }
    }
    // Rounding can leave a sliver of `target` past the end: take the last eligible point seen,
    // else the last point with positive distance anywhere (one exists since Σ d2 > 0).
    last_positive.or_else(|| d2.iter().rposition(|&d| d > 0.0)).unwrap_or(0)
}

/// Nearest centre of every point (ties → smaller centre index) and the squared distance to it.
fn assign(
    points: &Tensor,
    point_norms: &[f32],
    centres: &[f32],
    n: usize,
    dim: usize,
    k: usize,
) -> Result<(Vec<u32>, Vec<f32>)> {
    let centre_norms = row_norms_sq(centres, dim);
    let centres_t = Tensor::from_slice(centres, (k, dim), &Device::Cpu)?.t()?;
    let block = (BLOCK_FLOATS / k).clamp(1, n);
    let mut labels = Vec::with_capacity(n);
    let mut dists = Vec::with_capacity(n);
    for start in (0..n).step_by(block) {
        let len = block.min(n - start);
        let dots = points.narrow(0, start, len)?.matmul(&centres_t)?.flatten_all()?.to_vec1::<f32>()?;
        let best: Vec<(u32, f32)> = dots
            .par_chunks_exact(k)
            .enumerate()
            .map(|(r, row)| {
                // Maximise 2·x·c − ‖c‖² = ‖x‖² − ‖x − c‖².
                let (mut arg, mut best) = (0usize, f32::NEG_INFINITY);
                for (j, (&dot, &cn)) in row.iter().zip(&centre_norms).enumerate() {
                    let s = 2.0 * dot - cn;
                    if s > best {
                        (arg, best) = (j, s);
                    }
                }
                (arg as u32, (point_norms[start + r] - best).max(0.0))
            })
            .collect();
        for (l, d) in best {
            labels.push(l);
            dists.push(d);
        }
    }
    Ok((labels, dists))
}

/// New centres: the mean of each cluster's members (accumulated in f64, in point order), or,
/// for an empty cluster, the point farthest from its own centre not already used for that.
fn update(data: &[f32], dim: usize, k: usize, labels: &[u32], dist: &[f32]) -> Vec<f32> {
    let mut sums = vec![0.0f64; k * dim];
    let mut counts = vec![0usize; k];
    for (x, &l) in data.chunks_exact(dim).zip(labels) {
        let l = l as usize;
        counts[l] += 1;
        for (s, &v) in sums[l * dim..(l + 1) * dim].iter_mut().zip(x) {
            *s += v as f64;
        }
    }
    let mut centres: Vec<f32> = sums
        .chunks_exact(dim)
        .zip(&counts)
        .flat_map(|(s, &c)| s.iter().map(move |&v| if c > 0 { (v / c as f64) as f32 } else { 0.0 }))
        .collect();
    let empty: Vec<usize> = (0..k).filter(|&c| counts[c] == 0).collect();
    if !empty.is_empty() {
        let mut far: Vec<usize> = (0..labels.len()).collect();
        // Farthest first; equal distances by smaller index (sort is stable).
        far.sort_by(|&a, &b| dist[b].total_cmp(&dist[a]));
        for (c, &p) in empty.iter().zip(&far) {
            centres[c * dim..(c + 1) * dim].copy_from_slice(&data[p * dim..(p + 1) * dim]);
        }
    }
    centres
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::nmi;

    /// `per` points around each of `centres` (uniform noise of half-width `spread`).
    fn blobs(centres: &[Vec<f32>], per: usize, spread: f32, seed: u64) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (mut data, mut labels) = (Vec::new(), Vec::new());
        for _ in 0..per {
            for (c, centre) in centres.iter().enumerate() {
                data.extend(centre.iter().map(|&v| v + rng.gen_range(-spread..spread)));
                labels.push(c as u32);
            }
        }
        (data, labels)
    }

    fn corners(k: usize, dim: usize) -> Vec<Vec<f32>> {
        (0..k).map(|c| (0..dim).map(|d| if d == c { 10.0 } else { 0.0 }).collect()).collect()
    }

    #[test]
    fn recovers_well_separated_blobs() {
        let (data, truth) = blobs(&corners(6, 8), 40, 1.0, 1);
        for seed in [0, 1, 2, 3] {
            let pred = kmeans_pp(&data, 8, 6, seed, 50).unwrap();
            assert_eq!(nmi(&pred, &truth).unwrap(), 1.0, "seed {seed}");
        }
    }

    #[test]
    fn deterministic_for_a_seed() {
        // Overlapping blobs so that the result actually depends on the initialisation.
        let (data, _) = blobs(&corners(5, 6), 60, 9.0, 2);
        let a = kmeans_pp(&data, 6, 5, 42, 20).unwrap();
        let b = kmeans_pp(&data, 6, 5, 42, 20).unwrap();
        assert_eq!(a, b);
        let differs = (0..20u64).any(|s| kmeans_pp(&data, 6, 5, s, 20).unwrap() != a);
        assert!(differs, "the seed has no effect at all");
    }

    #[test]
    fn lloyd_improves_on_the_seeding() {
        // Inertia after Lloyd must not exceed inertia of the k-means++ seeds alone.
        let (data, _) = blobs(&corners(4, 5), 50, 6.0, 3);
        let inertia = |labels: &[u32]| -> f64 {
            let mut c = vec![0.0f64; 4 * 5];
            let mut cnt = [0usize; 4];
            for (x, &l) in data.chunks_exact(5).zip(labels) {
                cnt[l as usize] += 1;
                for d in 0..5 {
                    c[l as usize * 5 + d] += x[d] as f64;
                }
            }
            data.chunks_exact(5)
                .zip(labels)
                .map(|(x, &l)| {
                    (0..5).map(|d| (x[d] as f64 - c[l as usize * 5 + d] / cnt[l as usize] as f64).powi(2)).sum::<f64>()
                })
                .sum()
        };
        let seeds_only = kmeans_pp(&data, 5, 4, 9, 0).unwrap();
        let full = kmeans_pp(&data, 5, 4, 9, 100).unwrap();
        assert!(inertia(&full) <= inertia(&seeds_only) + 1e-9);
    }

    #[test]
    fn fewer_distinct_points_than_k_still_gives_valid_ids() {
        // 3 distinct points, k = 5: duplicate seeds and empty clusters must not panic.
        let data = [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 5.0, 5.0, 5.0, 5.0];
        let labels = kmeans_pp(&data, 2, 5, 0, 10).unwrap();
        assert!(labels.iter().all(|&l| l < 5));
        // k-means++ seeds the three distinct values first (the others have zero probability),
        // so they are never merged.
        assert_ne!(labels[0], labels[2]);
        assert_ne!(labels[2], labels[4]);
        assert_ne!(labels[0], labels[4]);
    }

    #[test]
    fn invalid_k_is_an_error() {
        let e = kmeans_pp(&[0.0, 1.0], 1, 3, 0, 5).unwrap_err().to_string();
        assert!(e.contains("k = 3 for 2 points"), "{e}");
        assert!(kmeans_pp(&[0.0, 1.0], 1, 0, 0, 5).is_err());
    }
}
