//! Tests of the proxy losses and the cross-batch memory: tensor code vs the naive f64 loops
//! of `reference.rs` (values, gradients w.r.t. embeddings *and* proxies), degenerate batches,
//! descent, and the memory's bookkeeping.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{Optimizer, SGD};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reference::{naive, norm_softmax, proxy_anchor};
// Rows drawn around their class's proxy, so some similarities are high and some low.
use super::tests::{around, to_tensor};
use super::{
    build, ClassSpace, CrossBatchMemory, LossArgs, LossKind, MetricLoss, NormSoftmax, ProxyAnchor,
};

fn unit_rows(n: usize, d: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    (0..n)
        .map(|_| {
            let v: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.into_iter().map(|a| a / norm).collect()
        })
        .collect()
}

/// The two proxy losses (and the CosFace variant) over `proxies`, with their naive values.
type Naive = Box<dyn Fn(&[Vec<f64>], &[Vec<f64>], &[u32]) -> f64>;

fn proxy_losses(proxies: &Var) -> Vec<(&'static str, Box<dyn MetricLoss>, Naive)> {
    let d = LossArgs::default();
    let (a, dl, s) = (d.pa_alpha, d.pa_delta, d.softmax_scale);
    vec![
        (
            "proxy-anchor",
            Box::new(ProxyAnchor {
                proxies: proxies.clone(),
                alpha: a,
                delta: dl,
            }),
            Box::new(move |x, p, y| proxy_anchor(x, p, y, a, dl)),
        ),
        (
            "proxy-anchor[alpha=8]",
            Box::new(ProxyAnchor {
                proxies: proxies.clone(),
                alpha: 8.0,
                delta: 0.2,
            }),
            Box::new(|x, p, y| proxy_anchor(x, p, y, 8.0, 0.2)),
        ),
        (
            "norm-softmax",
            Box::new(NormSoftmax {
                proxies: proxies.clone(),
                scale: s,
                margin: 0.0,
            }),
            Box::new(move |x, p, y| norm_softmax(x, p, y, s, 0.0)),
        ),
        (
            "cosface",
            Box::new(NormSoftmax {
                proxies: proxies.clone(),
                scale: 16.0,
                margin: 0.35,
            }),
            Box::new(|x, p, y| norm_softmax(x, p, y, 16.0, 0.35)),
        ),
    ]
}

/// A named batch: embeddings and labels.
type Case = (&'static str, Vec<Vec<f64>>, Vec<u32>);

fn layouts() -> Vec<Vec<u32>> {
    vec![
        (0..12).map(|i| i % 3).collect(),
        (0..12).map(|i| i % 4).collect(),
        vec![0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
        vec![5, 5, 1, 1],
    ]
}

const CLASSES: usize = 7; // more than any layout uses: some proxies have no positives

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn proxy_losses_equal_naive_loops() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for labels in layouts() {
        for noise in [0.3, 1.0, 3.0] {
            let p = unit_rows(CLASSES, 8, &mut rng);
            let x = around(&p, &labels, noise, &mut rng);
            let pv = Var::from_tensor(&to_tensor(&p)).unwrap();
            for (name, loss, want) in proxy_losses(&pv) {
                let got = loss.forward(&to_tensor(&x), &labels).unwrap();
                let got = got.loss.to_scalar::<f64>().unwrap();
                let want = want(&x, &p, &labels);
                assert!(close(got, want, 1e-9), "{name}: {got} vs naive {want}");
            }
        }
    }
}

#[test]
fn proxy_gradients_match_finite_differences_for_embeddings_and_proxies() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    for labels in layouts() {
        // Unnormalised proxies: the loss's own normalisation is part of what is checked.
        let p: Vec<Vec<f64>> = unit_rows(CLASSES, 5, &mut rng)
            .into_iter()
            .map(|r| r.into_iter().map(|v| 1.7 * v).collect())
            .collect();
        let x = around(&p, &labels, 1.0, &mut rng);
        let pv = Var::from_tensor(&to_tensor(&p)).unwrap();
        for (name, loss, naive_fn) in proxy_losses(&pv) {
            let xv = Var::from_tensor(&to_tensor(&x)).unwrap();
            let out = loss.forward(xv.as_tensor(), &labels).unwrap();
            let grads = out.loss.backward().unwrap();
            for (what, var, base) in [("x", &xv, &x), ("proxies", &pv, &p)] {
                let analytic = grads
                    .get(var.as_tensor())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap();
                let eps = 1e-6;
                let mut k = 0;
                for i in 0..base.len() {
                    for j in 0..base[i].len() {
                        let (mut plus, mut minus) = (base.clone(), base.clone());
                        plus[i][j] += eps;
                        minus[i][j] -= eps;
                        let (fp, fm) = if what == "x" {
                            (naive_fn(&plus, &p, &labels), naive_fn(&minus, &p, &labels))
                        } else {
                            (naive_fn(&x, &plus, &labels), naive_fn(&x, &minus, &labels))
                        };
                        let numeric = (fp - fm) / (2.0 * eps);
                        assert!(
                            (analytic[k] - numeric).abs() <= 1e-5 * numeric.abs().max(0.1),
                            "{name}: d/d{what}[{i},{j}] autograd {} vs finite differences {numeric} (labels {labels:?})",
                            analytic[k]
                        );
                        k += 1;
                    }
                }
                assert!(
                    analytic.iter().any(|g| g.abs() > 1e-4),
                    "{name}: gradient w.r.t. {what} vanishes, test is vacuous"
                );
            }
        }
    }
}

#[test]
fn proxy_losses_on_degenerate_batches_are_finite() {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let p = unit_rows(CLASSES, 8, &mut rng);
    let same = unit_rows(1, 8, &mut rng)[0].clone();
    let cases: Vec<Case> = vec![
        ("n = 1", unit_rows(1, 8, &mut rng), vec![4]),
        ("single class", unit_rows(5, 8, &mut rng), vec![2; 5]),
        (
            "all classes distinct",
            unit_rows(5, 8, &mut rng),
            vec![0, 1, 2, 3, 4],
        ),
        ("all rows identical", vec![same; 4], vec![0, 0, 1, 1]),
    ];
    for dtype in [DType::F64, DType::F32] {
        let pv = Var::from_tensor(&to_tensor(&p).to_dtype(dtype).unwrap()).unwrap();
        for (case, x, labels) in &cases {
            for (name, loss, want) in proxy_losses(&pv) {
                let xv = Var::from_tensor(&to_tensor(x).to_dtype(dtype).unwrap()).unwrap();
                let out = loss.forward(xv.as_tensor(), labels).unwrap();
                let got = out
                    .loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                let tol = if dtype == DType::F64 { 1e-9 } else { 1e-4 };
                let want = want(x, &p, labels);
                assert!(
                    close(got, want, tol),
                    "{name} on {case} ({dtype:?}): {got} vs {want}"
                );
                let grads = out.loss.backward().unwrap();
                for v in [&xv, &pv] {
                    let g = grads.get(v.as_tensor()).unwrap();
                    let g = g.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
                    assert!(
                        g.to_vec1::<f64>().unwrap().iter().all(|v| v.is_finite()),
                        "{name} on {case}: non-finite gradient"
                    );
                }
            }
        }
        // The empty batch is zero; a label without a proxy and a dimension mismatch are errors.
        for (name, loss, _) in proxy_losses(&pv) {
            let empty = Tensor::zeros((0, 8), dtype, &Device::Cpu).unwrap();
            let out = loss.forward(&empty, &[]).unwrap();
            assert_eq!(
                out.loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap(),
                0.0
            );
            let x = Tensor::zeros((2, 8), dtype, &Device::Cpu).unwrap();
            let err = loss
                .forward(&x, &[0, CLASSES as u32])
                .unwrap_err()
                .to_string();
            assert!(err.contains("has no proxy"), "{name}: {err}");
            let x = Tensor::zeros((2, 3), dtype, &Device::Cpu).unwrap();
            let err = loss.forward(&x, &[0, 1]).unwrap_err().to_string();
            assert!(err.contains("8-d"), "{name}: {err}");
        }
    }
}

#[test]
fn proxy_losses_descend_in_embeddings_and_proxies() {
    let labels: Vec<u32> = (0..16).map(|i| i % 4).collect();
    for kind in [LossKind::ProxyAnchor, LossKind::NormSoftmax] {
        let space = ClassSpace {
            classes: 4,
            dim: 8,
            seed: 1,
            device: Device::Cpu,
        };
        let loss = build(kind, &LossArgs::default(), Some(&space)).unwrap();
        let params = loss.parameters();
        assert_eq!(params.len(), 1);
        assert_eq!(params[0].1.dims(), [4, 8]);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let x = Var::from_tensor(
            &to_tensor(&unit_rows(16, 8, &mut rng))
                .to_dtype(DType::F32)
                .unwrap(),
        )
        .unwrap();
        let mut sgd = SGD::new(vec![x.clone(), params[0].1.clone()], 0.05).unwrap();
        let eval = |v: &Var| {
            let unit = crate::embed::l2_normalize(v.as_tensor()).unwrap();
            loss.forward(&unit, &labels).unwrap().loss
        };
        let first = eval(&x).to_scalar::<f32>().unwrap();
        for _ in 0..40 {
            sgd.backward_step(&eval(&x)).unwrap();
        }
        let last = eval(&x).to_scalar::<f32>().unwrap();
        assert!(
            first > 0.0 && last < 0.7 * first,
            "{kind}: {first} → {last}"
        );
    }
}

#[test]
fn proxy_losses_need_their_class_space_and_check_constants() {
    let err = build(LossKind::ProxyAnchor, &LossArgs::default(), None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("number of training classes"), "{err}");
    let bad = LossArgs {
        pa_alpha: 0.0,
        ..LossArgs::default()
    };
    let err = bad.validate(LossKind::ProxyAnchor).unwrap_err().to_string();
    assert!(err.contains("--pa-alpha"), "{err}");
    assert!(bad.validate(LossKind::NormSoftmax).is_ok());
    // Seeded: the same space gives the same proxies.
    let space = ClassSpace {
        classes: 3,
        dim: 4,
        seed: 5,
        device: Device::Cpu,
    };
    let a = space
        .init_proxies()
        .unwrap()
        .as_tensor()
        .to_vec2::<f32>()
        .unwrap();
    let b = space
        .init_proxies()
        .unwrap()
        .as_tensor()
        .to_vec2::<f32>()
        .unwrap();
    assert_eq!(a, b);
}

#[test]
fn cross_batch_memory_extends_a_pair_loss_with_past_batches() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let args = LossArgs::default();
    for kind in [
        LossKind::Contrastive,
        LossKind::MultiSimilarity,
        LossKind::Fuzzy,
    ] {
        let xbm = CrossBatchMemory::new(build(kind, &args, None).unwrap(), 10).unwrap();
        let l1: Vec<u32> = vec![0, 0, 1, 1, 2, 2];
        // The memory keeps f32 rows: start from values f32 represents exactly.
        let x1: Vec<Vec<f64>> = unit_rows(6, 5, &mut rng)
            .into_iter()
            .map(|r| r.into_iter().map(|v| v as f32 as f64).collect())
            .collect();
        // Empty memory: exactly the inner loss.
        let out = xbm.forward(&to_tensor(&x1), &l1).unwrap();
        let want = naive(kind, &args, &x1, &l1);
        assert!(
            close(out.loss.to_scalar::<f64>().unwrap(), want, 1e-9),
            "{kind}"
        );
        assert_eq!(xbm.len(), 6);
        // Next batch: the inner loss over batch + memory, rescaled to the batch's anchors.
        let l2: Vec<u32> = vec![1, 1, 3, 3];
        let x2 = unit_rows(4, 5, &mut rng);
        let v2 = Var::from_tensor(&to_tensor(&x2)).unwrap();
        let out = xbm.forward(v2.as_tensor(), &l2).unwrap();
        let all: Vec<Vec<f64>> = x2.iter().chain(&x1).cloned().collect();
        let all_labels: Vec<u32> = l2.iter().chain(&l1).copied().collect();
        let want = naive(kind, &args, &all, &all_labels) * 10.0 / 4.0;
        assert!(
            close(out.loss.to_scalar::<f64>().unwrap(), want, 1e-9),
            "{kind}"
        );
        // Gradients reach the batch (and match finite differences); the memory is constant.
        let g = out.loss.backward().unwrap();
        let g = g.get(v2.as_tensor()).unwrap().flatten_all().unwrap();
        let g = g.to_vec1::<f64>().unwrap();
        let eps = 1e-6;
        for (k, ga) in g.iter().enumerate() {
            let (i, j) = (k / 5, k % 5);
            let (mut plus, mut minus) = (all.clone(), all.clone());
            plus[i][j] += eps;
            minus[i][j] -= eps;
            let numeric = (naive(kind, &args, &plus, &all_labels)
                - naive(kind, &args, &minus, &all_labels))
                / (2.0 * eps)
                * 10.0
                / 4.0;
            assert!(
                (ga - numeric).abs() <= 1e-5 * numeric.abs().max(0.1),
                "{kind}: xbm d/dx[{i},{j}] {ga} vs {numeric}"
            );
        }
        // FIFO: 6 + 4 = 10 rows fit; the next batch evicts the oldest.
        assert_eq!(xbm.len(), 10);
        xbm.forward(&to_tensor(&x2), &l2).unwrap();
        assert_eq!(xbm.len(), 10);
    }
    let space = ClassSpace {
        classes: 2,
        dim: 3,
        seed: 0,
        device: Device::Cpu,
    };
    let proxy = build(LossKind::ProxyAnchor, &args, Some(&space)).unwrap();
    let err = CrossBatchMemory::new(proxy, 8).err().unwrap().to_string();
    assert!(err.contains("pair losses"), "{err}");
}
