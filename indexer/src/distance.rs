//! Distances on L2-normalised vectors.
//!
//! The gallery is a cosine index: every vector is normalised on the way in, so Euclidean
//! distance `d` and cosine similarity `s` are tied by `d² = 2 − 2s`. The graph is built with
//! Euclidean distance ([`UnitL2`]) rather than hnsw_rs's `DistDot`, which panics when rounding
//! pushes a unit-vector dot product above 1.

use crate::store::{Result, StoreError as Error};
use hnsw_rs::prelude::Distance;

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

/// Σ (a − b)²: the inner loop of every HNSW build and search step. Runs the widest SIMD
/// kernel this CPU has (AVX-512, else AVX2 + FMA, else portable code the compiler vectorises
/// for the baseline target), chosen once at first use: the binaries are built for generic
/// x86-64, where auto-vectorisation alone stops at 4-lane SSE2.
#[inline]
pub fn squared_l2(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    (KERNELS.squared_l2)(&a[..n], &b[..n])
}

/// Σ a·b, with the same kernel choice as [`squared_l2`].
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    (KERNELS.dot)(&a[..n], &b[..n])
}

/// Σ w·(q − c)² over f32 `q`, `w` and byte codes `c` (the int8 walk of [`crate::quant`]):
/// an AVX-512 or AVX2 + FMA kernel when the CPU has one, else portable code.
#[inline]
pub fn weighted_sq_u8(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
    let n = q.len().min(w.len()).min(c.len());
    (*WEIGHTED_U8)(&q[..n], &w[..n], &c[..n])
}

type KernelU8 = fn(&[f32], &[f32], &[u8]) -> f32;

static WEIGHTED_U8: std::sync::LazyLock<KernelU8> = std::sync::LazyLock::new(|| {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return simd::weighted_sq_u8_avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return simd::weighted_sq_u8_avx2;
        }
    }
    weighted_sq_u8_portable
});

/// [`weighted_sq_u8`] in 16 independent lanes. The slices have equal lengths.
pub fn weighted_sq_u8_portable(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
    let mut acc = [0f32; 16];
    let (cq, cw, cc) = (q.chunks_exact(16), w.chunks_exact(16), c.chunks_exact(16));
    let (rq, rw, rc) = (cq.remainder(), cw.remainder(), cc.remainder());
    for ((x, y), z) in cq.zip(cw).zip(cc) {
        for i in 0..16 {
            let d = x[i] - z[i] as f32;
            acc[i] += y[i] * d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for ((x, y), z) in rq.iter().zip(rw).zip(rc) {
        let d = x - *z as f32;
        s += y * d * d;
    }
    s
}

type Kernel = fn(&[f32], &[f32]) -> f32;

struct Kernels {
    squared_l2: Kernel,
    dot: Kernel,
}

/// The kernel pair [`squared_l2`] and [`dot`] run, chosen once.
static KERNELS: std::sync::LazyLock<Kernels> =
    std::sync::LazyLock::new(|| available_kernels().swap_remove(0).1);

/// The kernel pairs this CPU can run, widest first; the portable pair is always there (last).
fn available_kernels() -> Vec<(&'static str, Kernels)> {
    let mut found = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            found.push((
                "avx512",
                Kernels {
                    squared_l2: simd::squared_l2_avx512,
                    dot: simd::dot_avx512,
                },
            ));
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            found.push((
                "avx2",
                Kernels {
                    squared_l2: simd::squared_l2_avx2,
                    dot: simd::dot_avx2,
                },
            ));
        }
    }
    found.push((
        "portable",
        Kernels {
            squared_l2: squared_l2_portable,
            dot: dot_portable,
        },
    ));
    found
}

/// Σ (a − b)², 16 independent lanes so the compiler vectorises it for any target.
/// `a` and `b` have equal lengths.
pub fn squared_l2_portable(a: &[f32], b: &[f32]) -> f32 {
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

/// Σ a·b, 16 independent lanes. `a` and `b` have equal lengths.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
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

/// The x86-64 kernels. Each safe wrapper is only ever called (through [`KERNELS`]) after
/// the CPU was checked for the features its inner function is compiled with.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    pub fn squared_l2_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: selected only when avx512f was detected.
        unsafe { sum_512::<true>(a, b) }
    }
    pub fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { sum_512::<false>(a, b) }
    }
    pub fn squared_l2_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: selected only when avx2 and fma were detected.
        unsafe { sum_256::<true>(a, b) }
    }
    pub fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: as above.
        unsafe { sum_256::<false>(a, b) }
    }

    pub fn weighted_sq_u8_avx2(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
        // SAFETY: selected only when avx2 and fma were detected.
        unsafe { weighted_u8_256(q, w, c) }
    }

    pub fn weighted_sq_u8_avx512(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
        // SAFETY: selected only when avx512f was detected.
        unsafe { weighted_u8_512(q, w, c) }
    }

    /// [`weighted_u8_256`] with 16 lanes: half the instructions per row, which is what the
    /// int8 walk spends its time on once the rows are in cache. A scalar tail.
    #[target_feature(enable = "avx512f")]
    unsafe fn weighted_u8_512(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
        #[inline(always)]
        unsafe fn step(q: __m512, w: __m512, bytes: __m128i, acc: __m512) -> __m512 {
            let d = _mm512_sub_ps(q, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(bytes)));
            _mm512_fmadd_ps(_mm512_mul_ps(d, d), w, acc)
        }
        let n = q.len().min(w.len()).min(c.len());
        let (pq, pw, pc) = (q.as_ptr(), w.as_ptr(), c.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            let b = _mm256_loadu_si256(pc.add(i) as *const __m256i);
            s0 = step(
                _mm512_loadu_ps(pq.add(i)),
                _mm512_loadu_ps(pw.add(i)),
                _mm256_castsi256_si128(b),
                s0,
            );
            s1 = step(
                _mm512_loadu_ps(pq.add(i + 16)),
                _mm512_loadu_ps(pw.add(i + 16)),
                _mm256_extracti128_si256(b, 1),
                s1,
            );
            i += 32;
        }
        if i + 16 <= n {
            let bytes = _mm_loadu_si128(pc.add(i) as *const __m128i);
            s0 = step(
                _mm512_loadu_ps(pq.add(i)),
                _mm512_loadu_ps(pw.add(i)),
                bytes,
                s0,
            );
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
            + super::weighted_sq_u8_portable(&q[i..n], &w[i..n], &c[i..n])
    }

    /// Σ w·(q − c)², 16 codes per step (widened u8 → i32 → f32) in two accumulators.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_u8_256(q: &[f32], w: &[f32], c: &[u8]) -> f32 {
        let n = q.len().min(w.len()).min(c.len());
        let (pq, pw, pc) = (q.as_ptr(), w.as_ptr(), c.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            let bytes = _mm_loadu_si128(pc.add(i) as *const __m128i);
            let c0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
            let c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes, 8)));
            let d0 = _mm256_sub_ps(_mm256_loadu_ps(pq.add(i)), c0);
            let d1 = _mm256_sub_ps(_mm256_loadu_ps(pq.add(i + 8)), c1);
            s0 = _mm256_fmadd_ps(_mm256_mul_ps(d0, d0), _mm256_loadu_ps(pw.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_mul_ps(d1, d1), _mm256_loadu_ps(pw.add(i + 8)), s1);
            i += 16;
        }
        let v = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        while i < n {
            let d = *pq.add(i) - *pc.add(i) as f32;
            s += *pw.add(i) * d * d;
            i += 1;
        }
        s
    }

    /// Σ (a − b)² when `L2`, else Σ a·b, 32 lanes per step in two accumulators; the tail
    /// with masked loads, which read only the lanes inside the slices.
    #[target_feature(enable = "avx512f")]
    unsafe fn sum_512<const L2: bool>(a: &[f32], b: &[f32]) -> f32 {
        #[inline(always)]
        unsafe fn step<const L2: bool>(x: __m512, y: __m512, acc: __m512) -> __m512 {
            if L2 {
                let d = _mm512_sub_ps(x, y);
                _mm512_fmadd_ps(d, d, acc)
            } else {
                _mm512_fmadd_ps(x, y, acc)
            }
        }
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        while i + 32 <= n {
            s0 = step::<L2>(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            s1 = step::<L2>(
                _mm512_loadu_ps(pa.add(i + 16)),
                _mm512_loadu_ps(pb.add(i + 16)),
                s1,
            );
            i += 32;
        }
        while i < n {
            let m: __mmask16 = if n - i >= 16 {
                0xffff
            } else {
                (1u16 << (n - i)) - 1
            };
            s0 = step::<L2>(
                _mm512_maskz_loadu_ps(m, pa.add(i)),
                _mm512_maskz_loadu_ps(m, pb.add(i)),
                s0,
            );
            i += 16;
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }

    /// [`sum_512`] with 8-lane AVX2 + FMA; a scalar tail.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum_256<const L2: bool>(a: &[f32], b: &[f32]) -> f32 {
        #[inline(always)]
        unsafe fn step<const L2: bool>(x: __m256, y: __m256, acc: __m256) -> __m256 {
            if L2 {
                let d = _mm256_sub_ps(x, y);
                _mm256_fmadd_ps(d, d, acc)
            } else {
                _mm256_fmadd_ps(x, y, acc)
            }
        }
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            s0 = step::<L2>(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = step::<L2>(
                _mm256_loadu_ps(pa.add(i + 8)),
                _mm256_loadu_ps(pb.add(i + 8)),
                s1,
            );
            i += 16;
        }
        let v = _mm256_add_ps(s0, s1);
        let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        let mut s = _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
        while i < n {
            let (x, y) = (*pa.add(i), *pb.add(i));
            s += if L2 { (x - y) * (x - y) } else { x * y };
            i += 1;
        }
        s
    }
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
    fn weighted_u8_kernels_match_the_naive_sum() {
        for n in (0..40).chain([511, 512, 1280]) {
            let q: Vec<f32> = (0..n)
                .map(|i| (i as f32 * 0.37).sin() * 200.0 + 30.0)
                .collect();
            let w: Vec<f32> = (0..n).map(|i| 1e-4 * (1.0 + (i % 7) as f32)).collect();
            let c: Vec<u8> = (0..n).map(|i| (i * 37 % 256) as u8).collect();
            let naive: f64 = (0..n)
                .map(|i| w[i] as f64 * (q[i] as f64 - c[i] as f64).powi(2))
                .sum();
            let mut kernels: Vec<KernelU8> = vec![weighted_sq_u8_portable, weighted_sq_u8];
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                kernels.push(simd::weighted_sq_u8_avx2);
            }
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx512f") {
                kernels.push(simd::weighted_sq_u8_avx512);
            }
            for k in kernels {
                let got = k(&q, &w, &c) as f64;
                assert!(
                    (got - naive).abs() < 1e-4 * (1.0 + naive),
                    "n={n}: {got} vs {naive}"
                );
            }
        }
    }

    #[test]
    fn kernels_match_naive_sums() {
        // Every length around the SIMD widths (tails of 0..31 lanes), every kernel this CPU has.
        let mut kernels: Vec<(&str, Kernel, Kernel)> = available_kernels()
            .into_iter()
            .map(|(name, k)| (name, k.squared_l2, k.dot))
            .collect();
        assert_eq!(kernels.last().map(|k| k.0), Some("portable"));
        kernels.push(("dispatched", squared_l2, dot));
        for n in (0..70).chain([127, 128, 129, 512, 1280]) {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let naive_l2: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| ((x - y) as f64).powi(2))
                .sum();
            let naive_dot: f64 = a.iter().zip(&b).map(|(x, y)| (x * y) as f64).sum();
            for (name, l2, d) in &kernels {
                let tol = 1e-5 * (1.0 + n as f64);
                assert!(
                    (l2(&a, &b) as f64 - naive_l2).abs() < tol,
                    "{name} l2 n={n}"
                );
                assert!(
                    (d(&a, &b) as f64 - naive_dot).abs() < tol,
                    "{name} dot n={n}"
                );
            }
        }
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
