//! Loss tests: tensor code vs the naive loops of `reference.rs` (values and gradients),
//! degenerate batches, descent, and the command-line surface.

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::optim::{Optimizer, SGD};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::reference::naive;
use super::{build, LossArgs, LossKind};

/// Every loss in its default form and each documented variant.
fn configurations() -> Vec<(LossKind, LossArgs)> {
    let d = LossArgs::default;
    vec![
        (LossKind::Fuzzy, d()),
        (
            LossKind::Fuzzy,
            LossArgs {
                fuzzy_margin: 0.05,
                fuzzy_positives: 3,
                ..d()
            },
        ),
        (
            LossKind::Fuzzy,
            LossArgs {
                fuzzy_hard_positive: 0.5,
                ..d()
            },
        ),
        (LossKind::Contrastive, d()),
        (
            LossKind::Contrastive,
            LossArgs {
                contrastive_pos_margin: -0.2,
                contrastive_neg_margin: 0.38,
                ..d()
            },
        ),
        (LossKind::Lifted, d()),
        (LossKind::BatchAll, d()),
        (
            LossKind::BatchAll,
            LossArgs {
                batch_all_nonzero: true,
                ..d()
            },
        ),
        (LossKind::BatchHard, d()),
        (
            LossKind::BatchHard,
            LossArgs {
                batch_hard_soft: true,
                ..d()
            },
        ),
        (LossKind::MultiSimilarity, d()),
    ]
}

/// `kind[flag=value, …]` listing only the constants that differ from the defaults.
fn describe(kind: LossKind, args: &LossArgs) -> String {
    let args = serde_json::to_value(args).unwrap();
    let defaults = serde_json::to_value(LossArgs::default()).unwrap();
    let changed: Vec<String> = args
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| defaults.get(k.as_str()) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{kind}[{}]", changed.join(", "))
}

/// P classes × K items, in an interleaved order so classes are not contiguous.
fn pk_labels(p: usize, k: usize) -> Vec<u32> {
    (0..p * k).map(|i| (i % p) as u32).collect()
}

/// Clustered unit vectors: class centre + noise, so some pairs are easy and some hard.
fn clustered(labels: &[u32], dim: usize, noise: f64, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    let classes = labels.iter().max().map_or(0, |&m| m as usize + 1);
    let centres: Vec<Vec<f64>> = (0..classes)
        .map(|_| (0..dim).map(|_| rng.gen_range(-1.0..1.0)).collect())
        .collect();
    around(&centres, labels, noise, rng)
}

/// Unit vectors around each label's centre (`centres[label]` + uniform noise, normalised).
pub(super) fn around(
    centres: &[Vec<f64>],
    labels: &[u32],
    noise: f64,
    rng: &mut ChaCha8Rng,
) -> Vec<Vec<f64>> {
    labels
        .iter()
        .map(|&y| {
            let v: Vec<f64> = centres[y as usize]
                .iter()
                .map(|c| c + noise * rng.gen_range(-1.0..1.0))
                .collect();
            let norm = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            v.into_iter().map(|a| a / norm).collect()
        })
        .collect()
}

pub(super) fn to_tensor(x: &[Vec<f64>]) -> Tensor {
    let (n, d) = (x.len(), x.first().map_or(0, Vec::len));
    Tensor::from_vec(x.concat(), (n, d), &Device::Cpu).unwrap()
}

/// Label layouts: balanced P×K, an unbalanced one with a singleton class.
fn layouts() -> Vec<Vec<u32>> {
    vec![
        pk_labels(3, 4),
        pk_labels(4, 3),
        pk_labels(2, 5),
        vec![0, 0, 0, 1, 1, 2, 2, 2, 2, 3],
    ]
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn tensor_losses_equal_naive_loops() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for labels in layouts() {
        for noise in [0.4, 0.9, 2.0] {
            let x = clustered(&labels, 8, noise, &mut rng);
            for (kind, args) in configurations() {
                let out = build(kind, &args, None)
                    .unwrap()
                    .forward(&to_tensor(&x), &labels)
                    .unwrap();
                let got = out.loss.to_scalar::<f64>().unwrap();
                let want = naive(kind, &args, &x, &labels);
                assert!(
                    close(got, want, 1e-9),
                    "{}: tensor {got} vs naive {want} on labels {labels:?}",
                    describe(kind, &args)
                );
            }
        }
    }
}

#[test]
fn tensor_losses_equal_naive_loops_on_a_large_batch() {
    // n = 200: realistic batch size, many classes, every anchor with several candidates.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let labels = pk_labels(50, 4);
    let x = clustered(&labels, 16, 1.0, &mut rng);
    for (kind, args) in configurations() {
        let out = build(kind, &args, None)
            .unwrap()
            .forward(&to_tensor(&x), &labels)
            .unwrap();
        let got = out.loss.to_scalar::<f64>().unwrap();
        let want = naive(kind, &args, &x, &labels);
        assert!(
            close(got, want, 1e-9),
            "{}: {got} vs {want}",
            describe(kind, &args)
        );
        assert!(
            out.active > 0,
            "{}: nothing active on a random batch",
            describe(kind, &args)
        );
    }
}

#[test]
fn fuzzy_matches_a_hand_computed_value() {
    // x0 = (1,0), x1 = (0,1) same class; x2 at 60° (class 1). Anchor 0: p = √2, d02 = 1;
    // anchor 1: p = √2, d12 = 2 sin 15°; anchor 2 has no positive.
    let s = 60f64.to_radians();
    let x = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![s.cos(), s.sin()]];
    let labels = [0, 0, 1];
    let out = build(LossKind::Fuzzy, &LossArgs::default(), None)
        .unwrap()
        .forward(&to_tensor(&x), &labels)
        .unwrap();
    let want = (2.0 * 2f64.sqrt() - 1.0 - 2.0 * 15f64.to_radians().sin() + 2.0 * 0.1) / 3.0;
    assert!((out.loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-12);
    assert_eq!(out.active, 2);
}

#[test]
fn fuzzy_hard_positive_term_matches_a_hand_computed_value() {
    // On the unit circle: x0 at 0° and x1 at `second`° share class 0; five singleton classes
    // at 10°..50°. Only anchors 0 and 1 have positives, and the term adds w · d01 / n for
    // each anchor whose 80th-percentile negative (rank ⌊0.8 · 5⌋ = 4, nearest first) is
    // nearer than x1.
    let at = |deg: f64| vec![deg.to_radians().cos(), deg.to_radians().sin()];
    let chord = |deg: f64| 2.0 * (deg.to_radians() / 2.0).sin();
    let labels = [0, 0, 1, 2, 3, 4, 5];
    let w = 0.5;
    let loss = |args: &LossArgs, x: &[Vec<f64>]| {
        let out = build(LossKind::Fuzzy, args, None)
            .unwrap()
            .forward(&to_tensor(x), &labels)
            .unwrap();
        (out.loss.to_scalar::<f64>().unwrap(), out.active)
    };
    let with = LossArgs {
        fuzzy_hard_positive: w,
        ..LossArgs::default()
    };
    // (x1's angle, anchors with a hard positive): at 180° x1 is beyond both anchors'
    // 80th-percentile negatives (50° from x0, 130°..170° from x1: ranks 4 are 50° and
    // 170° away); at 45° only beyond x1's (ranks 4: 50° from x0, 35° from x1), and rank 3
    // instead (40° from x0) would count anchor 0 too.
    for (second, hard) in [(180.0, 2.0), (45.0, 1.0)] {
        let mut x = vec![at(0.0), at(second)];
        x.extend([10.0, 20.0, 30.0, 40.0, 50.0].map(at));
        let (base, _) = loss(&LossArgs::default(), &x);
        let (got, active) = loss(&with, &x);
        let want = w * hard * chord(second) / 7.0;
        assert!(
            (got - base - want).abs() < 1e-12,
            "x1 at {second}°: term {} vs {want}",
            got - base
        );
        assert!((got - naive(LossKind::Fuzzy, &with, &x, &labels)).abs() < 1e-12);
        assert_eq!(active, 2, "x1 at {second}°");
    }
}

/// Gradient of the tensor loss at `x`, and central differences of the naive loss.
fn gradients(
    kind: LossKind,
    args: &LossArgs,
    x: &[Vec<f64>],
    labels: &[u32],
) -> (Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(&to_tensor(x)).unwrap();
    let out = build(kind, args, None)
        .unwrap()
        .forward(var.as_tensor(), labels)
        .unwrap();
    let grads = out.loss.backward().unwrap();
    let analytic = match grads.get(var.as_tensor()) {
        Some(g) => g.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        None => vec![0.0; x.len() * x[0].len()],
    };
    let eps = 1e-6;
    let mut numeric = Vec::new();
    for i in 0..x.len() {
        for k in 0..x[i].len() {
            let mut plus = x.to_vec();
            plus[i][k] += eps;
            let mut minus = x.to_vec();
            minus[i][k] -= eps;
            numeric.push(
                (naive(kind, args, &plus, labels) - naive(kind, args, &minus, labels))
                    / (2.0 * eps),
            );
        }
    }
    (analytic, numeric)
}

#[test]
fn gradients_match_finite_differences_of_naive_loops() {
    let mut rng = ChaCha8Rng::seed_from_u64(23);
    for labels in layouts() {
        let x = clustered(&labels, 6, 0.9, &mut rng);
        for (kind, args) in configurations() {
            let (analytic, numeric) = gradients(kind, &args, &x, &labels);
            let scale = numeric.iter().fold(0.0f64, |m, g| m.max(g.abs()));
            assert!(
                scale > 1e-3,
                "{}: gradient vanishes, test is vacuous",
                describe(kind, &args)
            );
            for (idx, (a, n)) in analytic.iter().zip(&numeric).enumerate() {
                assert!(
                    (a - n).abs() <= 1e-5 * n.abs().max(0.1),
                    "{}: d/dx[{idx}] autograd {a} vs finite differences {n} (labels {labels:?})",
                    describe(kind, &args)
                );
            }
        }
    }
}

/// Degenerate batches: loss finite, equal to the naive value, zero when nothing is active,
/// and a finite gradient; in f64 and in f32 (the training dtype, where the rounding of
/// duplicated rows' squared distances is largest).
/// A named batch: embeddings and labels.
type Case = (&'static str, Vec<Vec<f64>>, Vec<u32>);

#[test]
fn degenerate_batches_are_finite_and_zero_when_inactive() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut cases: Vec<Case> = Vec::new();
    let six = vec![0u32; 6];
    cases.push(("single class", clustered(&six, 8, 1.0, &mut rng), six));
    let distinct: Vec<u32> = (0..6).collect();
    cases.push((
        "all classes distinct",
        clustered(&distinct, 8, 1.0, &mut rng),
        distinct,
    ));
    let one = vec![4u32];
    cases.push(("n = 1", clustered(&one, 8, 1.0, &mut rng), one));
    // Duplicates within a class (positives at distance 0) and across classes (negatives at 0).
    let mut dup = clustered(&[0, 1, 2], 8, 1.0, &mut rng);
    dup = vec![
        dup[0].clone(),
        dup[0].clone(),
        dup[1].clone(),
        dup[1].clone(),
        dup[0].clone(),
        dup[2].clone(),
    ];
    cases.push(("duplicated embeddings", dup, vec![0, 0, 1, 1, 2, 2]));
    let same = clustered(&[0], 8, 1.0, &mut rng)[0].clone();
    cases.push(("all rows identical", vec![same; 6], vec![0, 0, 0, 1, 1, 1]));

    for (case, x, labels) in &cases {
        for (kind, args) in configurations() {
            for dtype in [DType::F64, DType::F32] {
                let what = format!("{} on {case} ({dtype:?})", describe(kind, &args));
                let var = Var::from_tensor(&to_tensor(x).to_dtype(dtype).unwrap()).unwrap();
                let out = build(kind, &args, None)
                    .unwrap()
                    .forward(var.as_tensor(), labels)
                    .unwrap();
                let loss = out
                    .loss
                    .to_dtype(DType::F64)
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
                assert!(loss.is_finite(), "{what}: loss {loss}");
                let grads = out.loss.backward().unwrap();
                let grad: Vec<f64> = match grads.get(var.as_tensor()) {
                    Some(g) => g
                        .to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                    None => Vec::new(),
                };
                assert!(
                    grad.iter().all(|g| g.is_finite()),
                    "{what}: gradient {grad:?}"
                );
                if out.active == 0 {
                    assert_eq!(loss, 0.0, "{what}: nothing active but loss {loss}");
                    assert!(
                        grad.iter().all(|&g| g == 0.0),
                        "{what}: nothing active but gradient {grad:?}"
                    );
                }
                let tol = if dtype == DType::F64 { 1e-9 } else { 1e-3 };
                let want = naive(kind, &args, x, labels);
                assert!(close(loss, want, tol), "{what}: {loss} vs naive {want}");
            }
        }
        // Nothing can be active without both a positive and a negative for some anchor
        // (contrastive's per-side hinges excepted).
        if *case != "duplicated embeddings" && *case != "all rows identical" {
            for (kind, args) in configurations()
                .into_iter()
                .filter(|(k, _)| *k != LossKind::Contrastive)
            {
                let out = build(kind, &args, None)
                    .unwrap()
                    .forward(&to_tensor(x), labels)
                    .unwrap();
                assert_eq!(out.active, 0, "{} on {case}", describe(kind, &args));
            }
        }
    }
}

#[test]
fn empty_batch_gives_zero_and_mismatched_labels_are_an_error() {
    let empty = Tensor::zeros((0, 8), DType::F32, &Device::Cpu).unwrap();
    let x = Tensor::zeros((3, 8), DType::F32, &Device::Cpu).unwrap();
    for (kind, args) in configurations() {
        let loss = build(kind, &args, None).unwrap();
        let out = loss.forward(&empty, &[]).unwrap();
        assert_eq!(out.loss.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(out.active, 0);
        let err = loss.forward(&x, &[0, 1]).unwrap_err().to_string();
        assert!(err.contains("3 embeddings but 2 labels"), "{err}");
        let err = loss
            .forward(&x.flatten_all().unwrap(), &[0, 1, 2])
            .unwrap_err()
            .to_string();
        assert!(err.contains("[n, d]"), "{err}");
    }
}

#[test]
fn a_few_gradient_steps_reduce_each_loss() {
    let labels = pk_labels(4, 4);
    for (kind, args) in configurations() {
        let mut rng = ChaCha8Rng::seed_from_u64(99);
        let x = clustered(&labels, 8, 2.0, &mut rng);
        // Optimise free vectors; the loss sees them L2-normalised, as in training.
        let var = Var::from_tensor(&to_tensor(&x).to_dtype(DType::F32).unwrap()).unwrap();
        let mut sgd = SGD::new(vec![var.clone()], 0.2).unwrap();
        let loss = build(kind, &args, None).unwrap();
        let eval = |v: &Var| {
            let t = v.as_tensor();
            let norm = t.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap();
            let unit = t.broadcast_div(&norm).unwrap();
            loss.forward(&unit, &labels).unwrap().loss
        };
        let first = eval(&var).to_scalar::<f32>().unwrap();
        for _ in 0..30 {
            let l = eval(&var);
            sgd.backward_step(&l).unwrap();
        }
        let last = eval(&var).to_scalar::<f32>().unwrap();
        assert!(
            first > 0.0,
            "{}: initial loss is zero, test is vacuous",
            describe(kind, &args)
        );
        assert!(
            last < 0.8 * first,
            "{}: {first} → {last} after 30 SGD steps",
            describe(kind, &args)
        );
    }
}

/// The trainer flattens `LossArgs` into its own parser; this stands in for it.
#[derive(Parser, Debug)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LossKind::Fuzzy)]
    loss: LossKind,
    #[command(flatten)]
    args: LossArgs,
}

#[test]
fn command_line_defaults_are_the_protocol_defaults() {
    let cli = Cli::try_parse_from(["trainer"]).unwrap();
    assert_eq!(cli.loss, LossKind::Fuzzy);
    assert_eq!(cli.args, LossArgs::default());
    let d = LossArgs::default();
    assert_eq!(
        (d.fuzzy_margin, d.fuzzy_positives, d.fuzzy_hard_positive),
        (0.1, 1, 0.0)
    );
    assert_eq!(
        (d.contrastive_pos_margin, d.contrastive_neg_margin),
        (0.6, 1.2)
    );
    assert_eq!((d.lifted_margin, d.triplet_margin), (1.0, 0.2));
    assert_eq!(
        (d.ms_alpha, d.ms_beta, d.ms_lambda, d.ms_epsilon),
        (2.0, 50.0, 0.5, 0.1)
    );
    assert!(!d.batch_all_nonzero && !d.batch_hard_soft);
}

#[test]
fn command_line_parses_variants_and_rejects_bad_values() {
    let cli = Cli::try_parse_from([
        "trainer",
        "--loss",
        "multi-similarity",
        "--contrastive-pos-margin",
        "-0.2",
        "--fuzzy-positives",
        "3",
        "--fuzzy-hard-positive",
        "0.1",
        "--batch-hard-soft",
    ])
    .unwrap();
    assert_eq!(cli.loss, LossKind::MultiSimilarity);
    assert_eq!(cli.args.contrastive_pos_margin, -0.2);
    assert_eq!(cli.args.fuzzy_positives, 3);
    assert_eq!(cli.args.fuzzy_hard_positive, 0.1);
    assert!(cli.args.batch_hard_soft);
    assert!(Cli::try_parse_from(["trainer", "--fuzzy-positives", "0"]).is_err());
    assert!(Cli::try_parse_from(["trainer", "--loss", "neighbour"]).is_err());

    let pulls_away = LossArgs {
        fuzzy_hard_positive: -0.1,
        ..LossArgs::default()
    };
    let err = pulls_away
        .validate(LossKind::Fuzzy)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--fuzzy-hard-positive"), "{err}");

    let bad = LossArgs {
        ms_alpha: 0.0,
        ..LossArgs::default()
    };
    let err = bad
        .validate(LossKind::MultiSimilarity)
        .unwrap_err()
        .to_string();
    assert!(err.contains("--ms-alpha"), "{err}");
    assert!(
        bad.validate(LossKind::Fuzzy).is_ok(),
        "only the selected loss's flags matter"
    );
    let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(build(LossKind::MultiSimilarity, &bad, None)
        .unwrap()
        .forward(&x, &[0, 1])
        .is_err());
}

#[test]
fn loss_names_round_trip_through_serde_and_match_the_cli() {
    for (kind, args) in configurations() {
        let json = serde_json::to_string(&kind).unwrap();
        assert_eq!(json, format!("\"{}\"", kind.name()));
        assert_eq!(serde_json::from_str::<LossKind>(&json).unwrap(), kind);
        assert_eq!(build(kind, &args, None).unwrap().name(), kind.name());
        let back: LossArgs = serde_json::from_str(&serde_json::to_string(&args).unwrap()).unwrap();
        assert_eq!(back, args);
    }
}

/// Forward + backward time of every loss at the largest batch the trainer uses
/// (n = 256, 512-d, f32). Ignored by default: it measures, it does not check.
/// Run with `trainer-<hash> loss::tests::timings --ignored --nocapture`.
#[test]
#[ignore]
fn timings_at_batch_256() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let labels = pk_labels(64, 4);
    let x = clustered(&labels, 512, 1.0, &mut rng);
    let var = Var::from_tensor(&to_tensor(&x).to_dtype(DType::F32).unwrap()).unwrap();
    for (kind, args) in configurations() {
        let loss = build(kind, &args, None).unwrap();
        let start = std::time::Instant::now();
        let reps = 5;
        for _ in 0..reps {
            let out = loss.forward(var.as_tensor(), &labels).unwrap();
            out.loss.backward().unwrap();
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!("{:<60} {ms:8.2} ms forward+backward", describe(kind, &args));
    }
}
