//! The seed's positive-mining loss ("fuzzy clustering", NeighbourLoss in its code).
//!
//! Per anchor i, with P_k the k nearest positives (k = 1 by default: the nearest only) and
//! N_i the negatives closer than the k-th positive + m:
//! `l_i = mean(P_k) − mean(N_i) + m` if N_i is non-empty, else nothing; `loss = Σ l_i / n`.
//! Only pulling the *nearest* positives (rather than all of them) lets a class spread into
//! several clusters, which is the point of the loss. Every `l_i` that exists is > 0 because
//! each selected negative is closer than the threshold.

use candle_core::{Result, Tensor};

use super::pairwise::{check_constant, distances_for_mining, host_tensor, inverse_or_zero};
use super::{LossOutput, MetricLoss};

/// Positive-mining loss. `active` counts anchors with a non-empty N_i.
#[derive(Debug, Clone)]
pub struct Fuzzy {
    /// Margin m added to the threshold and to each anchor's term.
    pub margin: f64,
    /// Number k of nearest positives per anchor (≥ 1).
    pub positives: usize,
}

impl MetricLoss for Fuzzy {
    fn name(&self) -> &'static str {
        "fuzzy"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "fuzzy-margin", self.margin, false)?;
        if self.positives == 0 {
            candle_core::bail!("fuzzy loss: --fuzzy-positives must be at least 1");
        }
        Ok(())
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (dist, host, classes) = distances_for_mining(embeddings, labels)?;

        // Σ_i l_i = Σ_ij W_ij d_ij + m · #active, with W = +1/k on the k nearest positives
        // and −1/|N_i| on the selected negatives of each active anchor.
        let mut weights = vec![0.0; n * n];
        let mut active = 0usize;
        for (i, row) in host.iter().enumerate() {
            let mut pos: Vec<usize> = classes.positives(i).collect();
            if pos.is_empty() {
                continue;
            }
            pos.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
            pos.truncate(self.positives);
            let threshold = row[pos[pos.len() - 1]] + self.margin;
            let neg: Vec<usize> = classes
                .negatives(i)
                .filter(|&j| row[j] < threshold)
                .collect();
            if neg.is_empty() {
                continue;
            }
            active += 1;
            let w = &mut weights[i * n..(i + 1) * n];
            let wp = inverse_or_zero(pos.len());
            let wn = inverse_or_zero(neg.len());
            pos.iter().for_each(|&j| w[j] += wp);
            neg.iter().for_each(|&j| w[j] -= wn);
        }
        let weights = host_tensor(weights, &[n, n], &dist)?;
        let total = ((dist * weights)?.sum_all()? + self.margin * active as f64)?;
        Ok(LossOutput {
            loss: (total / n as f64)?,
            active,
        })
    }
}
