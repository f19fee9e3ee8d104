//! Naive reference implementations for the tests: plain loops over `Vec<f64>`, written
//! straight from the formulas in docs/protocol.md and independently of the tensor code.

use super::{LossArgs, LossKind};

fn dist(a: &[f64], b: &[f64]) -> f64 {
    let aa: f64 = a.iter().map(|v| v * v).sum();
    let bb: f64 = b.iter().map(|v| v * v).sum();
    let ab: f64 = a.iter().zip(b).map(|(u, v)| u * v).sum();
    (aa + bb - 2.0 * ab).max(1e-12).sqrt()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(u, v)| u * v).sum()
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn hinge(v: f64) -> f64 {
    v.max(0.0)
}

/// The loss `kind` with constants `args` on embeddings `x` (rows) and `labels`.
pub fn naive(kind: LossKind, args: &LossArgs, x: &[Vec<f64>], labels: &[u32]) -> f64 {
    match kind {
        LossKind::Fuzzy => fuzzy(x, labels, args),
        LossKind::Contrastive => contrastive(
            x,
            labels,
            args.contrastive_pos_margin,
            args.contrastive_neg_margin,
        ),
        LossKind::Lifted => lifted(x, labels, args.lifted_margin),
        LossKind::BatchAll => batch_all(x, labels, args.triplet_margin, args.batch_all_nonzero),
        LossKind::BatchHard => batch_hard(x, labels, args.triplet_margin, args.batch_hard_soft),
        LossKind::MultiSimilarity => multi_similarity(x, labels, args),
        LossKind::ProxyAnchor | LossKind::NormSoftmax => {
            panic!("{kind} needs proxies: use reference::proxy_anchor / norm_softmax")
        }
    }
}

fn fuzzy(x: &[Vec<f64>], y: &[u32], args: &LossArgs) -> f64 {
    let (m, k, w) = (
        args.fuzzy_margin,
        args.fuzzy_positives,
        args.fuzzy_hard_positive,
    );
    let n = x.len();
    let mut sum = 0.0;
    for i in 0..n {
        let mut pos: Vec<f64> = (0..n)
            .filter(|&j| j != i && y[j] == y[i])
            .map(|j| dist(&x[i], &x[j]))
            .collect();
        if pos.is_empty() {
            continue;
        }
        pos.sort_by(f64::total_cmp);
        let mut all_neg: Vec<f64> = (0..n)
            .filter(|&j| y[j] != y[i])
            .map(|j| dist(&x[i], &x[j]))
            .collect();
        all_neg.sort_by(f64::total_cmp);
        if w > 0.0 && !all_neg.is_empty() {
            // The seed: neg_pair[int(num_neg * 0.8)].
            let bound = all_neg[(all_neg.len() as f64 * 0.8) as usize];
            let hard: Vec<f64> = pos.iter().copied().filter(|&d| d > bound).collect();
            if !hard.is_empty() {
                sum += w * mean(&hard);
            }
        }
        let kept = &pos[..k.min(pos.len())];
        let limit = kept[kept.len() - 1] + m;
        let neg: Vec<f64> = all_neg.into_iter().filter(|&d| d < limit).collect();
        if neg.is_empty() {
            continue;
        }
        sum += mean(kept) - mean(&neg) + m;
    }
    sum / n as f64
}

fn contrastive(x: &[Vec<f64>], y: &[u32], pm: f64, nm: f64) -> f64 {
    let n = x.len();
    let mut sum = 0.0;
    for i in 0..n {
        let mut pos = Vec::new();
        let mut neg = Vec::new();
        for j in 0..n {
            let d = dist(&x[i], &x[j]);
            if j != i && y[j] == y[i] {
                pos.push(hinge(d - pm));
            } else if y[j] != y[i] {
                neg.push(hinge(nm - d));
            }
        }
        if !pos.is_empty() {
            sum += mean(&pos);
        }
        if !neg.is_empty() {
            sum += mean(&neg);
        }
    }
    sum / n as f64
}

fn lifted(x: &[Vec<f64>], y: &[u32], alpha: f64) -> f64 {
    let n = x.len();
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for i in 0..n {
        for j in i + 1..n {
            if y[i] != y[j] {
                continue;
            }
            pairs += 1;
            let mut s = 0.0;
            for k in 0..n {
                if y[k] != y[i] {
                    s += (alpha - dist(&x[i], &x[k])).exp();
                }
                if y[k] != y[j] {
                    s += (alpha - dist(&x[j], &x[k])).exp();
                }
            }
            if s == 0.0 {
                continue; // J = −∞
            }
            let big_j = s.ln() + dist(&x[i], &x[j]);
            sum += hinge(big_j).powi(2);
        }
    }
    if pairs == 0 {
        0.0
    } else {
        sum / (2.0 * pairs as f64)
    }
}

fn batch_all(x: &[Vec<f64>], y: &[u32], m: f64, nonzero: bool) -> f64 {
    let n = x.len();
    let (mut sum, mut count, mut positive) = (0.0, 0usize, 0usize);
    for a in 0..n {
        for p in 0..n {
            if p == a || y[p] != y[a] {
                continue;
            }
            for q in 0..n {
                if y[q] == y[a] {
                    continue;
                }
                let l = hinge(dist(&x[a], &x[p]) - dist(&x[a], &x[q]) + m);
                sum += l;
                count += 1;
                positive += usize::from(l > 0.0);
            }
        }
    }
    let denominator = if nonzero { positive } else { count };
    if denominator == 0 {
        0.0
    } else {
        sum / denominator as f64
    }
}

fn batch_hard(x: &[Vec<f64>], y: &[u32], m: f64, soft: bool) -> f64 {
    let n = x.len();
    let (mut sum, mut anchors) = (0.0, 0usize);
    for a in 0..n {
        let mut hardest_pos: Option<f64> = None;
        let mut hardest_neg: Option<f64> = None;
        for j in 0..n {
            let d = dist(&x[a], &x[j]);
            if j != a && y[j] == y[a] {
                hardest_pos = Some(hardest_pos.map_or(d, |h| h.max(d)));
            } else if y[j] != y[a] {
                hardest_neg = Some(hardest_neg.map_or(d, |h| h.min(d)));
            }
        }
        if let (Some(p), Some(q)) = (hardest_pos, hardest_neg) {
            anchors += 1;
            sum += if soft {
                (1.0 + (p - q).exp()).ln()
            } else {
                hinge(p - q + m)
            };
        }
    }
    if anchors == 0 {
        0.0
    } else {
        sum / anchors as f64
    }
}

fn multi_similarity(x: &[Vec<f64>], y: &[u32], args: &LossArgs) -> f64 {
    let (alpha, beta, lambda, eps) = (args.ms_alpha, args.ms_beta, args.ms_lambda, args.ms_epsilon);
    let n = x.len();
    let mut sum = 0.0;
    for i in 0..n {
        let pos: Vec<f64> = (0..n)
            .filter(|&j| j != i && y[j] == y[i])
            .map(|j| dot(&x[i], &x[j]))
            .collect();
        let neg: Vec<f64> = (0..n)
            .filter(|&j| y[j] != y[i])
            .map(|j| dot(&x[i], &x[j]))
            .collect();
        if pos.is_empty() || neg.is_empty() {
            continue;
        }
        let min_pos = pos.iter().cloned().fold(f64::INFINITY, f64::min);
        let max_neg = neg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let hard_pos: Vec<f64> = pos.iter().cloned().filter(|s| s - eps < max_neg).collect();
        let hard_neg: Vec<f64> = neg.iter().cloned().filter(|s| s + eps > min_pos).collect();
        if hard_pos.is_empty() || hard_neg.is_empty() {
            continue;
        }
        let p: f64 = hard_pos.iter().map(|s| (-alpha * (s - lambda)).exp()).sum();
        let q: f64 = hard_neg.iter().map(|s| (beta * (s - lambda)).exp()).sum();
        sum += (1.0 + p).ln() / alpha + (1.0 + q).ln() / beta;
    }
    sum / n as f64
}

fn unit(v: &[f64]) -> Vec<f64> {
    let n = dot(v, v).sqrt().max(1e-12);
    v.iter().map(|a| a / n).collect()
}

/// Proxy-Anchor (Kim et al. 2020) with proxies `p` (rows, normalised here).
pub fn proxy_anchor(x: &[Vec<f64>], p: &[Vec<f64>], y: &[u32], alpha: f64, delta: f64) -> f64 {
    let p: Vec<Vec<f64>> = p.iter().map(|r| unit(r)).collect();
    let mut pull = 0.0;
    let mut push = 0.0;
    let mut with_pos = 0;
    for (c, pc) in p.iter().enumerate() {
        let pos: Vec<f64> = (0..x.len())
            .filter(|&i| y[i] as usize == c)
            .map(|i| dot(&x[i], pc))
            .collect();
        let neg: Vec<f64> = (0..x.len())
            .filter(|&i| y[i] as usize != c)
            .map(|i| dot(&x[i], pc))
            .collect();
        if !pos.is_empty() {
            with_pos += 1;
            pull += (1.0
                + pos
                    .iter()
                    .map(|s| (-alpha * (s - delta)).exp())
                    .sum::<f64>())
            .ln();
        }
        push += (1.0 + neg.iter().map(|s| (alpha * (s + delta)).exp()).sum::<f64>()).ln();
    }
    if x.is_empty() {
        return 0.0;
    }
    pull / with_pos as f64 + push / p.len() as f64
}

/// Normalized softmax with a CosFace margin over class weights `w` (rows, normalised here).
pub fn norm_softmax(x: &[Vec<f64>], w: &[Vec<f64>], y: &[u32], scale: f64, margin: f64) -> f64 {
    let w: Vec<Vec<f64>> = w.iter().map(|r| unit(r)).collect();
    let mut sum = 0.0;
    for (xi, &yi) in x.iter().zip(y) {
        let logits: Vec<f64> = w
            .iter()
            .enumerate()
            .map(|(c, wc)| scale * (dot(xi, wc) - if c == yi as usize { margin } else { 0.0 }))
            .collect();
        let lse = logits.iter().map(|l| l.exp()).sum::<f64>().ln();
        sum += lse - logits[yi as usize];
    }
    if x.is_empty() {
        0.0
    } else {
        sum / x.len() as f64
    }
}
