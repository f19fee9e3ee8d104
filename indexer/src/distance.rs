//! Distances on L2-normalised vectors.
//!
//! The gallery is a cosine index: every vector is normalised on the way in, so Euclidean
//! distance `d` and cosine similarity `s` are tied by `d² = 2 − 2s`. The graph is built with
//! Euclidean distance ([`UnitL2`]) rather than hnsw_rs's `DistDot`, which panics when rounding
//! pushes a unit-vector dot product above 1.

use hnsw_rs::prelude::Distance;
use trainer::error::{Error, Result};

/// Euclidean distance, written with independent accumulators so the compiler vectorises it
/// (hnsw_rs's scalar `DistL2` is a single sequential sum). Must implement `Default`: hnsw_rs
/// reloads a dumped graph by distance type name.
#[derive(Debug, Default, Clone, Copy)]
pub struct UnitL2;

impl Distance<f32> for UnitL2 {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        squared_l2(va, vb).sqrt()
    }
}

/// Σ (a − b)², 16 lanes at a time.
pub fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            let d = x[i] - y[i];
            acc[i] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += (x - y) * (x - y);
    }
    s
}

/// Σ a·b, 16 lanes at a time.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0f32; 16];
    let ca = a.chunks_exact(16);
    let cb = b.chunks_exact(16);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Cosine similarity of two unit vectors from their Euclidean distance.
pub fn cosine_from_distance(d: f32) -> f32 {
    (1.0 - 0.5 * d * d).clamp(-1.0, 1.0)
}

/// Euclidean distance of two unit vectors from their dot product (clamped against rounding).
pub fn distance_from_cosine(s: f32) -> f32 {
    (2.0 - 2.0 * s).max(0.0).sqrt()
}

/// Checks a vector's length and values and returns it L2-normalised.
/// `what` names the vector in the error ("query", "item 'a.jpg'").
pub fn normalized(v: &[f32], dim: usize, what: &str) -> Result<Vec<f32>> {
    if v.len() != dim {
        return Err(Error::Invalid(format!(
            "{what}: vector has {} values, the index holds {dim}-d vectors",
            v.len()
        )));
    }
    if let Some(i) = v.iter().position(|x| !x.is_finite()) {
        return Err(Error::Invalid(format!(
            "{what}: value {i} is not finite ({})",
            v[i]
        )));
    }
    let norm = dot(v, v).sqrt();
    if norm < 1e-12 {
        return Err(Error::Invalid(format!(
            "{what}: zero vector has no direction"
        )));
    }
    Ok(v.iter().map(|x| x / norm).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_match_naive_sums() {
        let a: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let naive_l2: f32 = a.iter().zip(&b).map(|(x, y)| (x - y) * (x - y)).sum();
        let naive_dot: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        assert!((squared_l2(&a, &b) - naive_l2).abs() < 1e-4);
        assert!((dot(&a, &b) - naive_dot).abs() < 1e-4);
    }

    #[test]
    fn normalisation_rejects_bad_vectors() {
        assert!(normalized(&[1.0, 2.0], 3, "q")
            .unwrap_err()
            .to_string()
            .contains("3-d"));
        assert!(normalized(&[0.0, 0.0], 2, "q")
            .unwrap_err()
            .to_string()
            .contains("zero"));
        assert!(normalized(&[f32::NAN, 1.0], 2, "q")
            .unwrap_err()
            .to_string()
            .contains("finite"));
        let v = normalized(&[3.0, 4.0], 2, "q").unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
        let d = UnitL2.eval(&[1.0, 0.0], &[0.0, 1.0]);
        assert!((cosine_from_distance(d)).abs() < 1e-6);
        assert!((distance_from_cosine(0.0) - d).abs() < 1e-6);
    }
}
