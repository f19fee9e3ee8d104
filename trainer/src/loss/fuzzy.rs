//! The seed's positive-mining loss ("fuzzy clustering", NeighbourLoss in its code).
//!
//! Per anchor i, with P_k the k nearest positives (k = 1 by default: the nearest only) and
//! N_i the negatives closer than the k-th positive + m:
//! `l_i = mean(P_k) − mean(N_i) + m` if N_i is non-empty, else nothing; `loss = Σ l_i / n`.
//! Only pulling the *nearest* positives (rather than all of them) lets a class spread into
//! several clusters, which is the point of the loss. Every `l_i` that exists is > 0 because
//! each selected negative is closer than the threshold.
//!
//! Optionally (`hard_positive` = w > 0, a later variant of the seed's code) each anchor
//! also pulls its *hard* positives, those farther than its 80th-percentile negative:
//! `+ w · mean(H_i)`. The nearest-positive rule never touches a positive that sits among
//! the other classes; this term does, but only for the few that are clearly misplaced, so
//! a class may still form several clusters.

use candle_core::{Result, Tensor};

use super::pairwise::{check_constant, distances_for_mining, host_tensor, inverse_or_zero};
use super::{LossOutput, MetricLoss};

/// Positive-mining loss. `active` counts anchors with a non-empty N_i or H_i.
#[derive(Debug, Clone)]
pub struct Fuzzy {
    /// Margin m added to the threshold and to each anchor's term.
    pub margin: f64,
    /// Number k of nearest positives per anchor (≥ 1).
    pub positives: usize,
    /// Weight w of the hard-positive term (0 = off).
    pub hard_positive: f64,
}

/// Which negative (by rank, nearest first) bounds the hard positives: the seed's
/// `neg_pair[int(num_neg * 0.8)]`.
fn percentile_80(negatives: usize) -> usize {
    negatives * 4 / 5
}

impl MetricLoss for Fuzzy {
    fn name(&self) -> &'static str {
        "fuzzy"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "fuzzy-margin", self.margin, false)?;
        // Negative would push far positives away: not the seed's term.
        if !(self.hard_positive.is_finite() && self.hard_positive >= 0.0) {
            candle_core::bail!(
                "fuzzy loss: --fuzzy-hard-positive must be a finite number ≥ 0, got {}",
                self.hard_positive
            );
        }
        if self.positives == 0 {
            candle_core::bail!("fuzzy loss: --fuzzy-positives must be at least 1");
        }
        Ok(())
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (dist, host, classes) = distances_for_mining(embeddings, labels)?;

        // Σ_i l_i = Σ_ij W_ij d_ij + m · #mined, with W = +1/k on the k nearest positives
        // and −1/|N_i| on the selected negatives of each mined anchor, plus w/|H_i| on the
        // hard positives.
        let mut weights = vec![0.0; n * n];
        let mut mined = 0usize;
        let mut active = 0usize;
        for (i, row) in host.iter().enumerate() {
            let mut pos: Vec<usize> = classes.positives(i).collect();
            if pos.is_empty() {
                continue;
            }
            pos.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
            let w = &mut weights[i * n..(i + 1) * n];
            let hard = self.hard_positives(row, &pos, classes.negatives(i));
            let nearest = &pos[..self.positives.min(pos.len())];
            let threshold = row[nearest[nearest.len() - 1]] + self.margin;
            let neg: Vec<usize> = classes
                .negatives(i)
                .filter(|&j| row[j] < threshold)
                .collect();
            let wh = self.hard_positive * inverse_or_zero(hard.len());
            hard.iter().for_each(|&j| w[j] += wh);
            if !neg.is_empty() {
                mined += 1;
                let wp = inverse_or_zero(nearest.len());
                let wn = inverse_or_zero(neg.len());
                nearest.iter().for_each(|&j| w[j] += wp);
                neg.iter().for_each(|&j| w[j] -= wn);
            }
            if !neg.is_empty() || !hard.is_empty() {
                active += 1;
            }
        }
        let weights = host_tensor(weights, &[n, n], &dist)?;
        let total = ((dist * weights)?.sum_all()? + self.margin * mined as f64)?;
        Ok(LossOutput {
            loss: (total / n as f64)?,
            active,
        })
    }
}

impl Fuzzy {
    /// H_i: the positives `pos` of an anchor (its distances in `row`) farther than its
    /// 80th-percentile negative; empty when the term is off or there are no negatives.
    fn hard_positives(
        &self,
        row: &[f64],
        pos: &[usize],
        negatives: impl Iterator<Item = usize>,
    ) -> Vec<usize> {
        if self.hard_positive == 0.0 {
            return Vec::new();
        }
        let mut neg: Vec<f64> = negatives.map(|j| row[j]).collect();
        if neg.is_empty() {
            return Vec::new();
        }
        let rank = percentile_80(neg.len());
        let (_, &mut bound, _) = neg.select_nth_unstable_by(rank, f64::total_cmp);
        pos.iter().copied().filter(|&j| row[j] > bound).collect()
    }
}
