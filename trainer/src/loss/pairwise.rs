//! Shared building blocks: input checks, the pairwise distance/similarity matrices, the host
//! copies mining reads, host-built mask tensors and a masked log-sum-exp.

use candle_core::{bail, DType, Result, Tensor, D};

/// Lower clamp on squared distances. `sqrt` has an infinite derivative at 0, and the
/// diagonal (and duplicated embeddings) land exactly there; clamping keeps every gradient
/// finite while changing distances by at most 1e-6.
pub const DISTANCE_SQ_CLAMP: f64 = 1e-12;

/// Stand-in for "minus infinity" in masked log-sum-exps: `exp(MASKED - m)` is exactly 0 in
/// f32/f64 for any realistic row maximum `m` (the losses' exponents on unit vectors are within
/// a few hundred of 0), and unlike `-inf` it never produces `inf - inf = NaN` on a row that
/// is masked entirely. Representable in f16/bf16 too.
const MASKED: f64 = -1e4;

/// Validates the batch and returns n. Errors name the mismatch so a data bug is easy to find.
pub(crate) fn check_batch(loss: &str, embeddings: &Tensor, labels: &[u32]) -> Result<usize> {
    let (n, _d) = match embeddings.dims() {
        [n, d] => (*n, *d),
        dims => bail!("{loss} loss: embeddings must be [n, d], got shape {dims:?}"),
    };
    if !embeddings.dtype().is_float() {
        bail!(
            "{loss} loss: embeddings must be a float tensor, got {:?}",
            embeddings.dtype()
        );
    }
    if labels.len() != n {
        bail!(
            "{loss} loss: {n} embeddings but {} labels; every embedding needs one label",
            labels.len()
        );
    }
    Ok(n)
}

/// A zero loss for an empty batch, with the embeddings' dtype and device.
pub(crate) fn zero_loss(embeddings: &Tensor) -> Result<Tensor> {
    Tensor::zeros((), embeddings.dtype(), embeddings.device())
}

/// Euclidean distances `d_ij = sqrt(max(|x_i|² + |x_j|² − 2 x_i·x_j, 1e-12))`, `[n, n]`,
/// differentiable. The Gram-matrix form is one matmul instead of an `[n, n, d]` difference.
pub fn pairwise_distances(x: &Tensor) -> Result<Tensor> {
    let sq = x.sqr()?.sum_keepdim(1)?; // [n, 1]
    let gram = x.matmul(&x.t()?)?;
    let d2 = sq.broadcast_add(&sq.t()?)?.sub(&(gram * 2.0)?)?;
    d2.maximum(DISTANCE_SQ_CLAMP)?.sqrt()
}

/// Cosine similarities `S = x xᵀ` of already-normalised rows, `[n, n]`.
pub(crate) fn pairwise_similarities(x: &Tensor) -> Result<Tensor> {
    x.matmul(&x.t()?)
}

/// Host copy of a square matrix for mining decisions (always f64, whatever the dtype).
pub(crate) fn to_host(m: &Tensor) -> Result<Vec<Vec<f64>>> {
    m.detach().to_dtype(DType::F64)?.to_vec2::<f64>()
}

/// What the distance-mining losses start from: the differentiable distance matrix, its host
/// copy for the mining decisions, and who is whose positive.
pub(crate) fn distances_for_mining<'a>(
    embeddings: &Tensor,
    labels: &'a [u32],
) -> Result<(Tensor, Vec<Vec<f64>>, Classes<'a>)> {
    let dist = pairwise_distances(embeddings)?;
    let host = to_host(&dist)?;
    Ok((dist, host, Classes::new(labels)))
}

/// Who is a positive or a negative of whom: positives are `j ≠ i` with the same label.
pub(crate) struct Classes<'a> {
    labels: &'a [u32],
}

impl<'a> Classes<'a> {
    pub fn new(labels: &'a [u32]) -> Self {
        Self { labels }
    }
    pub fn n(&self) -> usize {
        self.labels.len()
    }
    pub fn is_pos(&self, i: usize, j: usize) -> bool {
        i != j && self.labels[i] == self.labels[j]
    }
    pub fn is_neg(&self, i: usize, j: usize) -> bool {
        self.labels[i] != self.labels[j]
    }
    /// Indices of the positives of `i`.
    pub fn positives(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.n()).filter(move |&j| self.is_pos(i, j))
    }
    /// Indices of the negatives of `i`.
    pub fn negatives(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.n()).filter(move |&j| self.is_neg(i, j))
    }
}

/// Row-major host values → tensor of `like`'s dtype and device, shaped `shape`.
pub(crate) fn host_tensor(values: Vec<f64>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(values, shape, like.device())?.to_dtype(like.dtype())
}

/// Row-major boolean mask → `u8` tensor for `where_cond`.
pub(crate) fn host_mask(values: Vec<bool>, shape: &[usize], like: &Tensor) -> Result<Tensor> {
    let bytes: Vec<u8> = values.into_iter().map(u8::from).collect();
    Tensor::from_vec(bytes, shape, like.device())
}

/// Per-row `log Σ_{j: mask_ij} exp(z_ij)` of a `[n, m]` matrix, plus a constant `exp(0) = 1`
/// term inside the sum when `with_one` (the `log(1 + Σ …)` of multi-similarity). Stable:
/// the (detached) row maximum is factored out, which leaves value and gradient unchanged.
/// Masked entries get no gradient. A fully masked row yields `log 1 = 0` with `with_one`,
/// and a very negative finite number (≈ −1e4, "log 0") without.
pub(crate) fn masked_logsumexp(z: &Tensor, mask: &Tensor, with_one: bool) -> Result<Tensor> {
    let fill = Tensor::full(MASKED, z.dims(), z.device())?.to_dtype(z.dtype())?;
    let zm = mask.where_cond(z, &fill)?;
    let mut shift = zm.max_keepdim(D::Minus1)?.detach();
    if with_one {
        shift = shift.maximum(0.0)?;
    }
    let mut sum = zm.broadcast_sub(&shift)?.exp()?.sum_keepdim(D::Minus1)?;
    if with_one {
        sum = (sum + shift.neg()?.exp()?)?;
    }
    (sum.log()? + shift)?.squeeze(D::Minus1)
}

/// Counts of a host mask row by row, as f64 divisors (0 stays 0; callers skip such rows).
pub(crate) fn inverse_or_zero(count: usize) -> f64 {
    if count == 0 {
        0.0
    } else {
        1.0 / count as f64
    }
}

/// Fails with a message naming `flag` unless `value` is finite (and, when `positive`, > 0).
pub(crate) fn check_constant(loss: &str, flag: &str, value: f64, positive: bool) -> Result<()> {
    if !value.is_finite() || (positive && value <= 0.0) {
        let need = if positive {
            "a finite number > 0"
        } else {
            "a finite number"
        };
        bail!("{loss} loss: --{flag} must be {need}, got {value}");
    }
    Ok(())
}
