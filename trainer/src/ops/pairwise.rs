//! Fused pairwise squared Euclidean distances of a batch of embeddings, for metric losses.
//!
//! `D[i][j] = |x_i|² + |x_j|² - 2·x_i·x_j`, with the Gram matrix from one `gemm` on the
//! row-major `[n, d]` batch (`X·Xᵀ`, reading `Xᵀ` through strides: no transpose copy), then
//! clamped at 0 (rounding can make near-duplicate pairs slightly negative) with an exact-zero
//! diagonal. The stock composition ([`super::stock::pairwise_sq_dist`]) materialises the
//! products, broadcasts and `relu` as separate `[n, n]` tensors.
//!
//! Backward, with `S = (G + Gᵀ) ⊙ [D > 0]`: `∂L/∂x_i = 2·(Σ_j S_ij · x_i − (S·X)_i)`. Pairs
//! clamped to zero get no gradient, which is also the true gradient for exact duplicates.

use super::conv::{matmul, Mat};
use super::elem::{checked_slice, num_threads, with_float_storage, Elem};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;

pub(crate) struct PairwiseSqDist {
    pub(crate) n: usize,
    pub(crate) d: usize,
}

fn forward<T: Elem>(x: &[T], n: usize, d: usize) -> Vec<T> {
    let mut dist = vec![T::zero(); n * n];
    let par = if num_threads() > 1 && n * n * d > 1 << 20 {
        Parallelism::Rayon(num_threads())
    } else {
        Parallelism::None
    };
    matmul(&mut dist, false, Mat::rm(x, n, d), Mat::rm_t(x, d, n), par);
    let norms: Vec<T> = (0..n).map(|i| dist[i * n + i]).collect();
    let two = T::from_f64(2.0);
    for (i, row) in dist.chunks_exact_mut(n).enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            let d2 = norms[i] + norms[j] - two * *v;
            *v = if i == j || d2 < T::zero() {
                T::zero()
            } else {
                d2
            };
        }
    }
    dist
}

impl CustomOp1 for PairwiseSqDist {
    fn name(&self) -> &'static str {
        "pairwise_sq_dist"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, d) = (self.n, self.d);
        with_float_storage!(self.name(), s, |T| {
            let x = checked_slice::<T>(s, l, self.name(), "input", n * d)?;
            Ok((
                T::to_cpu_storage_owned(forward(x, n, d)),
                Shape::from((n, n)),
            ))
        })
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let mask = res.gt(0.0)?.to_dtype(x.dtype())?;
        let s = ((grad + grad.t()?)? * mask)?;
        let gx = (s.sum_keepdim(1)?.broadcast_mul(x)? - s.matmul(x)?)?;
        Ok(Some((gx * 2.0)?))
    }
}
