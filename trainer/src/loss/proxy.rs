//! Losses with a learned representative per training class: Proxy-Anchor (Kim et al., CVPR
//! 2020) and the normalized-softmax / CosFace classification loss (Zhai & Wu 2018; Wang et
//! al. 2018).
//!
//! Pair losses only see the relations inside one P×K batch, so with small CPU batches most
//! steps carry little signal. A proxy stands for its whole class and every batch pulls or
//! pushes against all of them, which is why these losses converge in a few epochs (the
//! Proxy-Anchor paper's motivation). The proxies are parameters: the trainer optimises them
//! in their own parameter group with their own learning rate (`--proxy-lr`), and saves them
//! with the run so `--resume` continues them.
//!
//! Both work on cosine similarities `S = x · p̂ᵀ` between the (already L2-normalised)
//! embeddings and the L2-normalised proxies; `labels` must be the dense training labels
//! `0..classes`.

use candle_core::{bail, DType, Device, Result, Tensor, Var};

use super::pairwise::{check_constant, host_mask, masked_logsumexp};
use super::{LossOutput, MetricLoss};
use crate::embed::l2_normalize;

/// The class space a proxy loss is built for.
#[derive(Debug, Clone)]
pub struct ClassSpace {
    /// Number of training classes (dense labels `0..classes`).
    pub classes: usize,
    /// Embedding dimension.
    pub dim: usize,
    /// Seed of the proxies' initialisation.
    pub seed: u64,
    pub device: Device,
}

impl ClassSpace {
    /// Fresh proxies `[classes, dim]`: seeded standard normal rows (their scale is irrelevant,
    /// the losses normalise them; the paper uses Kaiming-normal).
    pub fn init_proxies(&self) -> Result<Var> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ 0x9e37_79b9_7f4a_7c15);
        // Box–Muller: two uniforms → one standard normal.
        let values: Vec<f32> = (0..self.classes * self.dim)
            .map(|_| {
                let u: f64 = 1.0 - rng.gen::<f64>();
                let v: f64 = rng.gen();
                ((-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
            })
            .collect();
        Var::from_tensor(&Tensor::from_vec(
            values,
            (self.classes, self.dim),
            &self.device,
        )?)
    }
}

/// Variable name of the proxies in a run's `loss.safetensors`.
pub const PROXIES: &str = "proxies";

/// Checks that every label has a proxy and returns the `[n, classes]` positive mask.
fn class_mask(
    loss: &str,
    labels: &[u32],
    classes: usize,
    like: &Tensor,
) -> Result<(Tensor, Vec<bool>)> {
    if let Some(&bad) = labels.iter().find(|&&y| y as usize >= classes) {
        bail!("{loss} loss: label {bad} has no proxy (the loss was built for {classes} classes)");
    }
    let n = labels.len();
    let mut mask = vec![false; n * classes];
    let mut present = vec![false; classes];
    for (i, &y) in labels.iter().enumerate() {
        mask[i * classes + y as usize] = true;
        present[y as usize] = true;
    }
    Ok((host_mask(mask, &[n, classes], like)?, present))
}

/// Cosine similarities `[n, classes]` of the embeddings to the normalised proxies, in the
/// embeddings' dtype.
fn similarities(embeddings: &Tensor, proxies: &Var) -> Result<Tensor> {
    let p = l2_normalize(&proxies.as_tensor().to_dtype(embeddings.dtype())?)?;
    embeddings.matmul(&p.t()?)
}

fn check_proxies(loss: &str, embeddings: &Tensor, proxies: &Var) -> Result<()> {
    let (_, d) = embeddings.dims2()?;
    let (_, pd) = proxies.as_tensor().dims2()?;
    if d != pd {
        bail!("{loss} loss: embeddings are {d}-d but the proxies {pd}-d");
    }
    Ok(())
}

/// Proxy-Anchor: for each class proxy p with positives X⁺_p in the batch,
/// `(1/|P⁺|) Σ_{p∈P⁺} log(1 + Σ_{x∈X⁺_p} e^{−α(s(x,p)−δ)})` pulls them in, and
/// `(1/|P|) Σ_{p∈P} log(1 + Σ_{x∈X⁻_p} e^{α(s(x,p)+δ)})` pushes every other batch item away
/// from every proxy. `active` counts the proxies with positives in the batch.
#[derive(Debug, Clone)]
pub struct ProxyAnchor {
    pub proxies: Var,
    /// Scale α (paper: 32).
    pub alpha: f64,
    /// Margin δ (paper: 0.1).
    pub delta: f64,
}

impl MetricLoss for ProxyAnchor {
    fn name(&self) -> &'static str {
        "proxy-anchor"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "pa-alpha", self.alpha, true)?;
        check_constant(self.name(), "pa-delta", self.delta, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], _n: usize) -> Result<LossOutput> {
        check_proxies(self.name(), embeddings, &self.proxies)?;
        let classes = self.proxies.as_tensor().dim(0)?;
        let sim = similarities(embeddings, &self.proxies)?.t()?; // [classes, n]
        let (pos, present) = class_mask(self.name(), labels, classes, &sim)?;
        let pos = pos.t()?;
        let neg = pos.ones_like()?.sub(&pos)?;
        let with_pos = present.iter().filter(|&&p| p).count();
        let pull = masked_logsumexp(&((&sim - self.delta)? * -self.alpha)?, &pos, true)?;
        let push = masked_logsumexp(&((&sim + self.delta)? * self.alpha)?, &neg, true)?;
        // Rows of classes without positives contribute log(1 + 0) = 0 to the pull sum.
        let loss = ((pull.sum_all()? / with_pos as f64)? + (push.sum_all()? / classes as f64)?)?;
        Ok(LossOutput {
            loss,
            active: with_pos,
        })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![(PROXIES.to_string(), self.proxies.clone())]
    }
}

/// Normalized softmax with an additive cosine margin (CosFace): logits
/// `s · (cos(x, w_c) − m·[c = y])`, cross-entropy averaged over the batch. `m = 0` is the
/// normalized softmax of Zhai & Wu (2018; temperature 0.05 = scale 20). `active` = n.
#[derive(Debug, Clone)]
pub struct NormSoftmax {
    /// Class weights (one proxy per class).
    pub proxies: Var,
    /// Scale s = 1 / temperature.
    pub scale: f64,
    /// Additive cosine margin m.
    pub margin: f64,
}

impl MetricLoss for NormSoftmax {
    fn name(&self) -> &'static str {
        "norm-softmax"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "softmax-scale", self.scale, true)?;
        check_constant(self.name(), "softmax-margin", self.margin, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        check_proxies(self.name(), embeddings, &self.proxies)?;
        let classes = self.proxies.as_tensor().dim(0)?;
        let sim = similarities(embeddings, &self.proxies)?; // [n, classes]
        let (target, _) = class_mask(self.name(), labels, classes, &sim)?;
        let target_f = target.to_dtype(sim.dtype())?;
        let logits = ((&sim - (&target_f * self.margin)?)? * self.scale)?;
        let all = target.ones_like()?;
        let lse = masked_logsumexp(&logits, &all, false)?;
        let picked = (&logits * &target_f)?.sum(1)?;
        let loss = ((lse - picked)?.sum_all()? / n as f64)?;
        Ok(LossOutput { loss, active: n })
    }

    fn parameters(&self) -> Vec<(String, Var)> {
        vec![(PROXIES.to_string(), self.proxies.clone())]
    }
}

/// The proxies as f32 (for saving), whatever dtype the loss ran in.
pub fn proxies_f32(var: &Var) -> Result<Tensor> {
    var.as_tensor().to_dtype(DType::F32)
}
