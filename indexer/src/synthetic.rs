//! Synthetic clustered unit vectors, for tests and the scale benchmark: `classes` random
//! centres on the sphere, each point a centre plus isotropic Gaussian noise, normalised.
//! With `noise` around 1/sqrt(dim)·k the clusters overlap like real embeddings do.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// A standard normal sample (Box–Muller; `rand_distr` is not a dependency).
fn gaussian(rng: &mut impl Rng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= n);
}

/// `n` unit vectors of `dim` in `classes` clusters; returns `(row-major vectors, labels)`.
/// `noise` is the per-coordinate std relative to a unit centre's per-coordinate scale
/// (1/sqrt(dim)): 0 = all points on their centre, ~1 = a point is as far from its centre
/// as two centres are from each other. Deterministic in `seed`; generated in parallel.
pub fn clustered(
    n: usize,
    dim: usize,
    classes: usize,
    noise: f32,
    seed: u64,
) -> (Vec<f32>, Vec<u32>) {
    let g = Clustered::new(dim, classes, noise, seed);
    let labels: Vec<u32> = (0..n).map(|i| g.label(i)).collect();
    (g.rows(0, n), labels)
}

/// The generator behind [`clustered`], for producing its rows a range at a time (the scale
/// benchmark streams them into the index instead of holding them all): row i is the same
/// whichever range it is generated in.
pub struct Clustered {
    dim: usize,
    classes: usize,
    sigma: f32,
    seed: u64,
    centres: Vec<f32>,
}

/// Rows drawn from one random stream (the unit of parallel generation).
const BLOCK: usize = 1024;

impl Clustered {
    pub fn new(dim: usize, classes: usize, noise: f32, seed: u64) -> Self {
        let classes = classes.max(1);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut centres = vec![0f32; classes * dim];
        for c in centres.chunks_exact_mut(dim) {
            c.iter_mut().for_each(|x| *x = gaussian(&mut rng));
            normalize(c);
        }
        Self {
            dim,
            classes,
            sigma: noise / (dim as f32).sqrt(),
            seed,
            centres,
        }
    }

    /// Row i's cluster.
    pub fn label(&self, i: usize) -> u32 {
        (i % self.classes) as u32
    }

    /// Rows `from..to`, row-major.
    pub fn rows(&self, from: usize, to: usize) -> Vec<f32> {
        let dim = self.dim;
        let mut out = vec![0f32; (to - from) * dim];
        let first_block = from / BLOCK;
        let blocks: Vec<usize> = (first_block..to.div_ceil(BLOCK)).collect();
        // Each block's rows within from..to, generated from the block's own stream.
        let mut chunks: Vec<(usize, &mut [f32])> = Vec::new();
        let mut rest = &mut out[..];
        for &b in &blocks {
            let (lo, hi) = ((b * BLOCK).max(from), ((b + 1) * BLOCK).min(to));
            let (head, tail) = rest.split_at_mut((hi - lo) * dim);
            chunks.push((b, head));
            rest = tail;
        }
        chunks.into_par_iter().for_each(|(b, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                self.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(b as u64 + 1)),
            );
            let start = b * BLOCK;
            let skip = from.saturating_sub(start);
            let mut row = vec![0f32; dim];
            for j in 0..skip + chunk.len() / dim {
                let label = self.label(start + j) as usize;
                let c = &self.centres[label * dim..(label + 1) * dim];
                for (x, m) in row.iter_mut().zip(c) {
                    *x = m + self.sigma * gaussian(&mut rng);
                }
                if j >= skip {
                    normalize(&mut row);
                    chunk[(j - skip) * dim..(j - skip + 1) * dim].copy_from_slice(&row);
                }
            }
        });
        out
    }
}

/// The label `selectivity_labels` gives the items of fraction `i`.
pub fn selectivity_label(i: usize) -> String {
    format!("sel{i}")
}

/// Labels for a filtered-search benchmark: fraction `fractions[i]` of the `n` items (drawn
/// at random, so matches are spread over every cluster: the hard case for a graph walk)
/// gets [`selectivity_label`]`(i)`, the rest none. `None` when no fractions are given.
pub fn selectivity_labels(
    n: usize,
    fractions: &[f64],
    seed: u64,
) -> Result<Option<Vec<Option<String>>>, String> {
    if fractions.is_empty() {
        return Ok(None);
    }
    if fractions.iter().any(|f| !(*f > 0.0 && *f <= 1.0)) || fractions.iter().sum::<f64>() > 1.0 {
        return Err(format!(
            "--filter-selectivity: each fraction must be in (0, 1] and together at most 1, got {fractions:?}"
        ));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5e1e_c7ed);
    let mut order: Vec<usize> = (0..n).collect();
    rand::seq::SliceRandom::shuffle(order.as_mut_slice(), &mut rng);
    let mut labels = vec![None; n];
    let mut next = order.into_iter();
    for (i, f) in fractions.iter().enumerate() {
        let count = (f * n as f64).round() as usize;
        for id in next.by_ref().take(count) {
            labels[id] = Some(selectivity_label(i));
        }
    }
    Ok(Some(labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectivity_labels_have_the_asked_fractions() {
        let l = selectivity_labels(10_000, &[0.01, 0.1], 3)
            .unwrap()
            .unwrap();
        let count = |s: &str| l.iter().filter(|x| x.as_deref() == Some(s)).count();
        assert_eq!((count("sel0"), count("sel1")), (100, 1000));
        assert!(selectivity_labels(10, &[], 1).unwrap().is_none());
        assert!(selectivity_labels(10, &[0.7, 0.7], 1).is_err());
    }

    #[test]
    fn rows_are_unit_and_deterministic() {
        let (a, la) = clustered(100, 16, 5, 0.5, 7);
        let (b, _) = clustered(100, 16, 5, 0.5, 7);
        // Any range of rows is the same as in the whole (the benchmark streams them).
        let (big, _) = clustered(3000, 16, 5, 0.5, 7);
        let g = Clustered::new(16, 5, 0.5, 7);
        for (from, to) in [(0, 3000), (1000, 2100), (1500, 1501), (2047, 3000)] {
            assert_eq!(g.rows(from, to), big[from * 16..to * 16], "{from}..{to}");
        }
        assert_eq!(a, b);
        assert_eq!(la[7], 2);
        for r in a.chunks_exact(16) {
            let n: f32 = r.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
    }
}
