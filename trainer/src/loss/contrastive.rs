//! Contrastive loss in the seed's form: per anchor, the mean hinge over its positives
//! `max(d − pos_margin, 0)` plus the mean hinge over its negatives `max(neg_margin − d, 0)`,
//! summed over anchors and divided by n. Averaging per anchor (rather than over all pairs)
//! keeps the pull and the push balanced whatever the class layout of the batch.

use candle_core::{Result, Tensor};

use super::pairwise::{check_constant, distances_for_mining, host_tensor, inverse_or_zero};
use super::{LossOutput, MetricLoss};

/// Contrastive loss. `active` counts ordered (anchor, other) pairs whose hinge is non-zero.
#[derive(Debug, Clone)]
pub struct Contrastive {
    /// Positives closer than this cost nothing.
    pub pos_margin: f64,
    /// Negatives farther than this cost nothing.
    pub neg_margin: f64,
}

impl MetricLoss for Contrastive {
    fn name(&self) -> &'static str {
        "contrastive"
    }

    fn check(&self) -> Result<()> {
        check_constant(
            self.name(),
            "contrastive-pos-margin",
            self.pos_margin,
            false,
        )?;
        check_constant(
            self.name(),
            "contrastive-neg-margin",
            self.neg_margin,
            false,
        )
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (dist, host, classes) = distances_for_mining(embeddings, labels)?;

        // Per-row weights 1/|P_i| on positives and 1/|N_i| on negatives turn the per-anchor
        // means into one weighted sum over the matrix.
        let mut wpos = vec![0.0; n * n];
        let mut wneg = vec![0.0; n * n];
        let mut active = 0usize;
        for (i, row) in host.iter().enumerate() {
            let pos: Vec<usize> = classes.positives(i).collect();
            let neg: Vec<usize> = classes.negatives(i).collect();
            let (wp, wn) = (inverse_or_zero(pos.len()), inverse_or_zero(neg.len()));
            for &j in &pos {
                wpos[i * n + j] = wp;
                active += usize::from(row[j] > self.pos_margin);
            }
            for &j in &neg {
                wneg[i * n + j] = wn;
                active += usize::from(row[j] < self.neg_margin);
            }
        }
        let wpos = host_tensor(wpos, &[n, n], &dist)?;
        let wneg = host_tensor(wneg, &[n, n], &dist)?;
        let pull = ((&dist - self.pos_margin)?.relu()? * wpos)?.sum_all()?;
        let push = ((self.neg_margin - &dist)?.relu()? * wneg)?.sum_all()?;
        Ok(LossOutput {
            loss: ((pull + push)? / n as f64)?,
            active,
        })
    }
}
