//! Triplet losses on a batch: every valid triplet (batch-all), or each anchor's hardest
//! positive and negative (batch-hard, Hermans et al. 2017).

use candle_core::{Result, Tensor};

use super::pairwise::{check_constant, distances_for_mining, host_tensor};
use super::{LossOutput, MetricLoss};

/// Batch-all triplet loss: `max(0, d_ap − d_an + m)` over every (anchor, positive,
/// negative), averaged over all valid triplets, zeros included (seed), or over the non-zero
/// ones only (`nonzero_mean`, as pytorch-metric-learning). `active` counts non-zero triplets.
#[derive(Debug, Clone)]
pub struct BatchAll {
    /// Margin m.
    pub margin: f64,
    /// Divide by the number of non-zero triplets instead of all valid triplets.
    pub nonzero_mean: bool,
}

impl MetricLoss for BatchAll {
    fn name(&self) -> &'static str {
        "batch-all"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "triplet-margin", self.margin, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (dist, host, classes) = distances_for_mining(embeddings, labels)?;

        // Where a triplet's hinge is active it is linear: d_ap − d_aq + m. So the sum over
        // active triplets is Σ W ⊙ d + m · #active, with W[a, p] = +(active triplets through
        // (a, p)) and W[a, q] = −(active triplets through (a, q)). Deciding activity is
        // mining (no gradient), done on the host in O(n · K · n) for a P×K batch; the tensor
        // side stays O(n²) in time and memory instead of an [n, n, n] hinge tensor.
        let mut weights = vec![0.0; n * n];
        let (mut valid, mut active) = (0usize, 0usize);
        for (a, row) in host.iter().enumerate() {
            let negatives: Vec<usize> = classes.negatives(a).collect();
            for p in classes.positives(a) {
                valid += negatives.len();
                for &q in &negatives {
                    if row[p] - row[q] + self.margin > 0.0 {
                        active += 1;
                        weights[a * n + p] += 1.0;
                        weights[a * n + q] -= 1.0;
                    }
                }
            }
        }
        let weights = host_tensor(weights, &[n, n], &dist)?;
        let total = ((dist * weights)?.sum_all()? + self.margin * active as f64)?;
        let denominator = if self.nonzero_mean { active } else { valid };
        Ok(LossOutput {
            loss: (total / denominator.max(1) as f64)?,
            active,
        })
    }
}

/// Batch-hard triplet loss: per anchor, the farthest positive and the nearest negative;
/// hinge `max(0, d_ap − d_an + m)` or soft margin `log(1 + exp(d_ap − d_an))`, averaged over
/// the anchors that have both a positive and a negative (all of them in a P×K batch).
/// `active` counts anchors with a non-zero term (for the soft margin: every valid anchor).
#[derive(Debug, Clone)]
pub struct BatchHard {
    /// Margin m of the hinge form (unused by the soft margin).
    pub margin: f64,
    /// Soft margin instead of the hinge.
    pub soft: bool,
}

impl MetricLoss for BatchHard {
    fn name(&self) -> &'static str {
        "batch-hard"
    }

    fn check(&self) -> Result<()> {
        check_constant(self.name(), "triplet-margin", self.margin, false)
    }

    fn forward_batch(&self, embeddings: &Tensor, labels: &[u32], n: usize) -> Result<LossOutput> {
        let (dist, host, classes) = distances_for_mining(embeddings, labels)?;

        // One-hot selectors of each anchor's hardest positive (+1) and negative (−1): the
        // row sums of W ⊙ d are then d_ap − d_an.
        let mut selector = vec![0.0; n * n];
        let mut valid = vec![0.0; n];
        let mut gaps = Vec::with_capacity(n);
        for (i, row) in host.iter().enumerate() {
            let hardest_pos = classes
                .positives(i)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]));
            let hardest_neg = classes
                .negatives(i)
                .min_by(|&a, &b| row[a].total_cmp(&row[b]));
            if let (Some(p), Some(q)) = (hardest_pos, hardest_neg) {
                selector[i * n + p] = 1.0;
                selector[i * n + q] = -1.0;
                valid[i] = 1.0;
                gaps.push(row[p] - row[q]);
            }
        }
        let anchors = gaps.len();
        let active = if self.soft {
            anchors
        } else {
            gaps.iter().filter(|&&g| g + self.margin > 0.0).count()
        };
        let selector = host_tensor(selector, &[n, n], &dist)?;
        let valid = host_tensor(valid, &[n], &dist)?;
        let gap = (dist * selector)?.sum(1)?;
        let per_anchor = if self.soft {
            // softplus(x) = relu(x) + log(1 + exp(−|x|)): no overflow for large gaps.
            (gap.relu()? + (gap.abs()?.neg()?.exp()? + 1.0)?.log()?)?
        } else {
            (gap + self.margin)?.relu()?
        };
        let total = (per_anchor * valid)?.sum_all()?;
        Ok(LossOutput {
            loss: (total / anchors.max(1) as f64)?,
            active,
        })
    }
}
