//! Lifted structure loss (Song et al., CVPR 2016), with margin α on distances:
//! for each positive pair (i, j),
//! `J_ij = log(Σ_{k∈neg(i)} exp(α − d_ik) + Σ_{l∈neg(j)} exp(α − d_jl)) + d_ij`,
//! `loss = 1/(2|P|) Σ_{(i,j)∈P} max(J_ij, 0)²`.
//!
//! Vectorised as `J = logaddexp(L_i, L_j) + d_ij` with `L_i = log Σ_{k∈neg(i)} exp(α − d_ik)`
//! (a stable masked log-sum-exp per row), evaluated on the ordered pairs: J is symmetric, so
//! the ordered sum is twice the unordered one and `1/(2|P|)` becomes `1/(2|P_ordered|)`.
//! A pair where neither end has a negative has `J = −∞`, i.e. contributes 0 (it still
//! counts in |P|, as in the formula).

use candle_core::{Result, Tensor};

use super::pairwise::{
    check_constant, host_mask, host_tensor, masked_logsumexp, pairwise_distances, to_host, Classes,
};
use super::{LossOutput, MetricLoss};

/// Lifted structure loss. `active` counts unordered positive pairs with `J_ij > 0`.
#[derive(Debug, Clone)]
pub struct Lifted {
    /// Margin α.
    pub margin: f64,
}

impl MetricLoss for Lifted {
    fn name(&self) -> &'static str {
        "lifted"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "lifted-margin", self.margin, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let dist = pairwise_distances(embeddings)?;
        let classes = Classes::new(labels);
        let mut neg = vec![false; n * n];
        let mut pos = vec![0.0; n * n];
        let mut pairs = 0usize;
        for i in 0..n {
            classes.negatives(i).for_each(|j| neg[i * n + j] = true);
            for j in classes.positives(i) {
                pos[i * n + j] = 1.0;
                pairs += 1;
            }
        }
        let neg = host_mask(neg, &[n, n], &dist)?;
        let pos = host_tensor(pos, &[n, n], &dist)?;

        // L_i, then J_ij = logaddexp(L_i, L_j) + d_ij with the larger of the two factored out.
        let l = masked_logsumexp(&(self.margin - &dist)?, &neg, false)?;
        let (li, lj) = (l.unsqueeze(1)?, l.unsqueeze(0)?);
        let shift = li.broadcast_maximum(&lj)?.detach();
        let sum = (li.broadcast_sub(&shift)?.exp()? + lj.broadcast_sub(&shift)?.exp()?)?;
        let j = ((sum.log()? + shift)? + &dist)?;

        let hinge = j.relu()?.sqr()?;
        let total = (hinge * &pos)?.sum_all()?;
        let loss = (total / (2 * pairs.max(1)) as f64)?;

        let j_host = to_host(&j)?;
        let ordered_active = (0..n)
            .flat_map(|a| classes.positives(a).map(move |b| (a, b)))
            .filter(|&(a, b)| j_host[a][b] > 0.0)
            .count();
        Ok(LossOutput {
            loss,
            active: ordered_active / 2,
        })
    }
}
