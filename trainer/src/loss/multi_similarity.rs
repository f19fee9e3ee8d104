//! Multi-similarity loss (Wang et al., CVPR 2019) on cosine similarities S = x xᵀ.
//!
//! Mining per anchor i: keep negatives with `S_in + ε > min_p S_ip` and positives with
//! `S_ip − ε < max_n S_in`; then
//! `l_i = (1/α) log(1 + Σ_p exp(−α(S_ip − λ))) + (1/β) log(1 + Σ_n exp(β(S_in − λ)))`,
//! `loss = Σ l_i / n` (the authors' code divides by the batch size, so anchors with nothing
//! mined count as zeros). The two mined sets are empty together: if any negative is kept,
//! the least similar positive is kept too, and vice versa; the loss skips an anchor when
//! they are.

use candle_core::{Result, Tensor};

use super::pairwise::{
    check_constant, host_mask, host_tensor, masked_logsumexp, pairwise_similarities, to_host,
    Classes,
};
use super::{LossOutput, MetricLoss};

/// Multi-similarity loss. `active` counts anchors with mined pairs.
#[derive(Debug, Clone)]
pub struct MultiSimilarity {
    /// Positive scale α.
    pub alpha: f64,
    /// Negative scale β.
    pub beta: f64,
    /// Similarity offset λ.
    pub lambda: f64,
    /// Mining margin ε.
    pub epsilon: f64,
}

impl MetricLoss for MultiSimilarity {
    fn name(&self) -> &'static str {
        "multi-similarity"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "ms-alpha", self.alpha, true)?;
        check_constant(self.name(), "ms-beta", self.beta, true)?;
        check_constant(self.name(), "ms-lambda", self.lambda, false)?;
        check_constant(self.name(), "ms-epsilon", self.epsilon, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let sim = pairwise_similarities(embeddings)?;
        let host = to_host(&sim)?;
        let classes = Classes::new(labels);

        let mut pos = vec![false; n * n];
        let mut neg = vec![false; n * n];
        let mut anchor = vec![0.0; n];
        let mut active = 0usize;
        for (i, row) in host.iter().enumerate() {
            let min_pos = classes
                .positives(i)
                .map(|j| row[j])
                .fold(f64::INFINITY, f64::min);
            let max_neg = classes
                .negatives(i)
                .map(|j| row[j])
                .fold(f64::NEG_INFINITY, f64::max);
            let mined_pos: Vec<usize> = classes
                .positives(i)
                .filter(|&j| row[j] - self.epsilon < max_neg)
                .collect();
            let mined_neg: Vec<usize> = classes
                .negatives(i)
                .filter(|&j| row[j] + self.epsilon > min_pos)
                .collect();
            if mined_pos.is_empty() || mined_neg.is_empty() {
                continue;
            }
            active += 1;
            anchor[i] = 1.0;
            mined_pos.iter().for_each(|&j| pos[i * n + j] = true);
            mined_neg.iter().for_each(|&j| neg[i * n + j] = true);
        }
        let pos = host_mask(pos, &[n, n], &sim)?;
        let neg = host_mask(neg, &[n, n], &sim)?;
        let anchor = host_tensor(anchor, &[n], &sim)?;

        let shifted = (&sim - self.lambda)?;
        let pull = (masked_logsumexp(&(&shifted * -self.alpha)?, &pos, true)? / self.alpha)?;
        let push = (masked_logsumexp(&(&shifted * self.beta)?, &neg, true)? / self.beta)?;
        let total = ((pull + push)? * anchor)?.sum_all()?;
        Ok(LossOutput {
            loss: (total / n as f64)?,
            active,
        })
    }
}
