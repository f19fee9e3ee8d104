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
    let classes = classes.max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centres = vec![0f32; classes * dim];
    for c in centres.chunks_exact_mut(dim) {
        c.iter_mut().for_each(|x| *x = gaussian(&mut rng));
        normalize(c);
    }
    let sigma = noise / (dim as f32).sqrt();
    let labels: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    let mut vectors = vec![0f32; n * dim];
    vectors
        .par_chunks_mut(dim * 1024)
        .enumerate()
        .for_each(|(block, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(
                seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(block as u64 + 1)),
            );
            for (j, row) in chunk.chunks_exact_mut(dim).enumerate() {
                let label = labels[block * 1024 + j] as usize;
                let c = &centres[label * dim..(label + 1) * dim];
                for (x, m) in row.iter_mut().zip(c) {
                    *x = m + sigma * gaussian(&mut rng);
                }
                normalize(row);
            }
        });
    (vectors, labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_unit_and_deterministic() {
        let (a, la) = clustered(100, 16, 5, 0.5, 7);
        let (b, _) = clustered(100, 16, 5, 0.5, 7);
        assert_eq!(a, b);
        assert_eq!(la[7], 2);
        for r in a.chunks_exact(16) {
            let n: f32 = r.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
    }
}
