//! `--time-budget`: choose how deep to fine-tune, at which image size, for how many epochs
//! and with which learning rates, so that a whole run (caching and evaluation included)
//! fits the time a user gives it on *this* machine.
//!
//! A user who knows nothing about metric learning cannot pick a freeze depth or a learning
//! rate, and the right ones depend on the machine as much as on the data: the same 30
//! minutes train the whole network on a small dataset of small images, but only the top
//! stages of a large photo collection. So the trainer first measures this machine (a few
//! timed forward passes and training steps per stage, [`measure`]), then [`plan`] — a pure
//! function of the budget, the dataset's size and the measured speeds — trades depth
//! against epochs: it trains as deep as it can while every training image is still seen
//! often enough ([`MIN_EPOCHS`]), with as many cached augmented views as a slice of the
//! budget and a memory cap allow.
//!
//! The learning rates follow from the depth: the new layers (head, proxies) learn fast
//! from the start, the backbone at 1e-4 — ten times the seed's 1e-5, which leaves the
//! loss flat for the first epochs of a run that has only a handful of them. Not faster for
//! any loss: three times that helped multi-similarity on Omniglot's glyphs, where the
//! pretrained features are weak, but on cub100's photos a budgeted run at it ended 7 R@1
//! behind the same 7 epochs at 1e-4 (bench/RESULTS-learning.md, session 25). Nor slower
//! for the seed's loss: at 0.5× and 0.7× it ended 0.4–0.75 R@1 behind over 4 epochs, at 2×
//! 2.4 (sessions 24 and 27).

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Below this many epochs deeper training does not pay: the planner freezes more instead.
/// Depth matters more than epochs, but not at any price: on Omniglot's turned glyphs (10,880
/// samples), 30 minutes gave R@1 89.1 training the whole network 4 epochs, 90.5 training
/// blocks3.. 7 epochs, and 83.0 after 4 of 12 epochs of blocks6.. (bench/RESULTS-learning.md).
pub const MIN_EPOCHS: usize = 7;
/// More epochs than this rarely help once the schedule has decayed; spare time goes to depth
/// and augmented views instead.
pub const MAX_EPOCHS: usize = 60;
/// Fraction of the budget kept free for what is not modelled (checkpoint writes, start-up,
/// the machine being busier than when it was measured).
pub const SAFETY: f64 = 0.10;
/// At most this fraction of the budget goes to caching augmented views.
pub const VIEW_CACHE_SHARE: f64 = 0.15;
/// Cached activations may use at most this much memory.
pub const CACHE_BYTES: f64 = 6.0 * (1u64 << 30) as f64;
/// At most this many cached views per training image.
pub const MAX_VIEWS: usize = 8;
/// Evaluations (besides the pretrained baseline and the last epoch) may cost at most this
/// fraction of the budget.
pub const EVAL_SHARE: f64 = 0.05;

/// What the planner needs to know of the data.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataStats {
    pub train_images: usize,
    pub eval_images: usize,
}

/// Measured costs on this machine, all in seconds per image at [`Speeds::image_size`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Speeds {
    pub image_size: u32,
    /// Inference forward of each stage (no autograd graph), per image.
    pub forward: Vec<f64>,
    /// One training step (forward, loss, backward, update) when stages `f..` train, per
    /// image, for every `f` in `0..=stages` (`stages` = only the head trains).
    pub train: Vec<f64>,
    /// Decoding a file and making one network-sized view, per image (all threads).
    pub decode: f64,
    /// Floats per image of the activation entering each stage `f` in `0..=stages` (what
    /// the cache holds when stages `0..f` are frozen).
    pub activation_floats: Vec<usize>,
    /// Evaluation forward from the activation entering stage `f` to the pooled features,
    /// per image, for `f` in `0..=stages`: the folded inference network where the backbone
    /// has one (several times faster than [`Speeds::forward`]), else the sum of `forward`.
    /// Empty: the sums of `forward`.
    #[serde(default)]
    pub eval_from: Vec<f64>,
    /// The size evaluations embed at (the model's inference size); 0 = [`Speeds::image_size`].
    /// Their measured costs scale with its area.
    #[serde(default)]
    pub eval_size: u32,
    /// Extra sizes a multi-scale model embeds at (`--extra-sizes`): each evaluation also runs
    /// the whole network from the images at each of them.
    #[serde(default)]
    pub extra_sizes: Vec<u32>,
}

impl Speeds {
    pub fn stages(&self) -> usize {
        self.forward.len()
    }
    fn forward_range(&self, r: std::ops::Range<usize>) -> f64 {
        self.forward[r].iter().sum()
    }
    /// Evaluation cost per image from stage `f` on (see [`Speeds::eval_from`]).
    fn eval_range(&self, f: usize) -> f64 {
        self.eval_at_train_size(f) * self.area_ratio(self.eval_size)
    }
    /// Evaluation cost per image of the extra sizes when stages `0..f` are cached: the whole
    /// network at each of them, from images decoded once for all (and already decoded for
    /// the main size when nothing is cached).
    fn eval_extra(&self, f: usize) -> f64 {
        if self.extra_sizes.is_empty() {
            return 0.0;
        }
        let network: f64 = self
            .extra_sizes
            .iter()
            .map(|&e| self.eval_at_train_size(0) * self.area_ratio(e))
            .sum();
        network + if f > 0 { self.decode } else { 0.0 }
    }
    /// [`Speeds::eval_from`] at `f` as measured at [`Speeds::image_size`].
    fn eval_at_train_size(&self, f: usize) -> f64 {
        match self.eval_from.get(f) {
            Some(&t) => t,
            None => self.forward_range(f..self.stages()),
        }
    }
    /// Cost of an image at `size` relative to the measured size (0: the measured size).
    fn area_ratio(&self, size: u32) -> f64 {
        if size == 0 || self.image_size == 0 {
            return 1.0;
        }
        (size as f64 / self.image_size as f64).powi(2)
    }
}

/// The chosen recipe, printed before training and stored with the run.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Plan {
    /// Training views' size.
    pub image_size: u32,
    /// The size the model embeds at (evaluations, indexer, server); 0 in older plans.
    #[serde(default)]
    pub inference_size: u32,
    /// Stages `0..freeze_until` are frozen (0 = the whole network trains).
    pub freeze_until: usize,
    pub epochs: usize,
    /// Cached views per training image (1 = the eval view only); unused when nothing is frozen.
    pub cached_views: usize,
    pub lr: f64,
    pub head_lr: f64,
    pub proxy_lr: f64,
    pub warmup_epochs: f64,
    pub eval_every: usize,
    /// Predicted seconds of each part.
    pub seconds_cache: f64,
    pub seconds_per_epoch: f64,
    pub seconds_eval: f64,
    pub seconds_total: f64,
    /// The speeds the plan was made from (kept with the run, to see later why it chose so).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Speeds>,
}

impl Plan {
    /// A few lines for the terminal.
    pub fn describe(&self, stage_names: &[String], budget: Duration) -> String {
        let depth = match self.freeze_until {
            0 => "the whole network".to_string(),
            f if f >= stage_names.len() => "the embedding head only".to_string(),
            f => format!("stages {}.. ({} frozen and cached)", stage_names[f], f),
        };
        let views = if self.freeze_until == 0 {
            "live augmentation".to_string()
        } else {
            format!("{} cached view(s) per image", self.cached_views)
        };
        let proxies = if self.proxy_lr > 0.0 {
            format!(" / {:.0e} proxies", self.proxy_lr)
        } else {
            String::new()
        };
        format!(
            "plan for a {} budget: train {depth} at {}×{} px for {} epochs ({views}), embed at {e}×{e} px; \
             lr {:.0e} backbone / {:.0e} head{proxies}, {} warm-up epoch(s), evaluate every {} epoch(s)\n\
             predicted: caching {:.0} s, {:.1} s per epoch, evaluations {:.0} s, total {:.0} s",
            fmt_duration(budget),
            self.image_size,
            self.image_size,
            self.epochs,
            self.lr,
            self.head_lr,
            self.warmup_epochs,
            self.eval_every,
            self.seconds_cache,
            self.seconds_per_epoch,
            self.seconds_eval,
            self.seconds_total,
            e = if self.inference_size == 0 {
                self.image_size
            } else {
                self.inference_size
            },
        )
    }
}

/// Parses a duration such as `30m`, `1h30m`, `90s` or `2h`.
pub fn parse_budget(s: &str) -> std::result::Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}); write it like 30m, 1h30m or 90s"))?;
    if d < Duration::from_secs(60) {
        return Err(format!(
            "a time budget of {} is too short to measure, cache and train; give at least 1m",
            fmt_duration(d)
        ));
    }
    Ok(d)
}

pub fn fmt_duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// The square input size for images of typical shorter side `median_side`: never more than
/// the backbone's native `native` (ImageNet 224), and for small images (characters,
/// icons, 32–128 px datasets) their own size rounded up to a multiple of 32 — upsampling
/// them to 224 costs 3–12× the compute and shows the network no more detail.
pub fn image_size_for(median_side: u32, native: u32) -> u32 {
    let rounded = median_side.div_ceil(32).max(2) * 32;
    rounded.min(native)
}

/// Predicted seconds of a run that freezes `f` stages with `views` cached views, for
/// `epochs` epochs, evaluating `evals` times.
fn cost(
    data: &DataStats,
    s: &Speeds,
    f: usize,
    views: usize,
    epochs: usize,
    evals: usize,
) -> (f64, f64, f64) {
    let n = data.train_images as f64;
    let m = data.eval_images as f64;
    let (cache, per_epoch, per_eval) = if f == 0 {
        // Images are decoded and augmented live by the loader, which shares the cores.
        (
            0.0,
            n * (s.train[0] + s.decode),
            m * (s.decode + s.eval_range(0) + s.eval_extra(0)),
        )
    } else {
        let per_image = s.decode + s.forward_range(0..f);
        (
            (n * views as f64 + m) * per_image,
            n * s.train[f],
            m * (s.eval_range(f) + s.eval_extra(f)),
        )
    };
    (cache, per_epoch * epochs as f64, per_eval * evals as f64)
}

/// Chooses the recipe for `budget` seconds (what is left of the user's budget after
/// loading the data and measuring). See the module documentation for the rules.
pub fn plan(budget: f64, data: &DataStats, s: &Speeds, has_proxies: bool) -> Result<Plan> {
    let stages = s.stages();
    if s.train.len() != stages + 1 || s.activation_floats.len() != stages + 1 {
        return Err(Error::Invalid(
            "planner: speeds must cover every freeze depth 0..=stages".into(),
        ));
    }
    if data.train_images == 0 {
        return Err(Error::Invalid("planner: no training images".into()));
    }
    let usable = budget * (1.0 - SAFETY);
    // Evaluations: the pretrained baseline, the last epoch, and ~4 in between when cheap.
    let base_evals = 2;
    let mut best: Option<Plan> = None;
    for f in 0..=stages {
        let views = if f == 0 {
            1
        } else {
            let per_view = data.train_images as f64 * (s.decode + s.forward_range(0..f));
            let by_time = (VIEW_CACHE_SHARE * usable / per_view.max(1e-9)).floor() as usize;
            let bytes = data.train_images as f64 * s.activation_floats[f] as f64 * 4.0;
            let by_memory = (CACHE_BYTES / bytes.max(1.0)).floor() as usize;
            by_time.min(by_memory).clamp(1, MAX_VIEWS)
        };
        let (cache, epoch1, eval1) = cost(data, s, f, views, 1, 1);
        let fixed = cache + eval1 * base_evals as f64;
        if fixed >= usable {
            continue;
        }
        let fit = ((usable - fixed) / epoch1.max(1e-9)).floor() as usize;
        let epochs = fit.min(MAX_EPOCHS);
        if epochs == 0 {
            continue;
        }
        // Intermediate evaluations within EVAL_SHARE of the budget.
        let extra = ((EVAL_SHARE * usable / eval1.max(1e-9)).floor() as usize).min(4);
        let eval_every = if extra == 0 {
            epochs
        } else {
            epochs.div_ceil(extra + 1).max(1)
        };
        let evals = base_evals + epochs / eval_every;
        let (cache, train, eval) = cost(data, s, f, views, epochs, evals);
        let total = cache + train + eval;
        // Fit the intermediate evaluations by dropping epochs if they pushed us over.
        let over = total - usable;
        let epochs = if over > 0.0 {
            epochs.saturating_sub((over / epoch1).ceil() as usize)
        } else {
            epochs
        };
        if epochs == 0 {
            continue;
        }
        let (cache, train, eval) = cost(data, s, f, views, epochs, evals);
        let candidate = Plan {
            image_size: s.image_size,
            inference_size: if s.eval_size == 0 {
                s.image_size
            } else {
                s.eval_size
            },
            freeze_until: f,
            epochs,
            cached_views: views,
            lr: 1e-4,
            head_lr: 1e-3,
            proxy_lr: if has_proxies { 1e-2 } else { 0.0 },
            warmup_epochs: if epochs >= 4 { 1.0 } else { 0.0 },
            eval_every: eval_every.min(epochs),
            seconds_cache: cache,
            seconds_per_epoch: epoch1,
            seconds_eval: eval,
            seconds_total: cache + train + eval,
            measured: None,
        };
        let good_enough = epochs >= MIN_EPOCHS;
        match &best {
            // The deepest depth with enough epochs wins; stages are tried deepest first.
            _ if good_enough => return Ok(candidate),
            Some(b) if b.epochs >= candidate.epochs => {}
            _ => best = Some(candidate),
        }
    }
    // Nothing reaches MIN_EPOCHS: the depth that gets the most epochs.
    best.ok_or_else(|| {
        Error::Invalid(format!(
            "a budget of {budget:.0} s cannot cache the data and run one epoch even with \
             everything frozen on this machine; give a larger --time-budget"
        ))
    })
}

/// A deadline counted from the start of the run.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub start: Instant,
    pub budget: Duration,
}

impl Deadline {
    pub fn left(&self) -> f64 {
        self.budget.as_secs_f64() - self.start.elapsed().as_secs_f64()
    }
}

/// The new epoch total for a budgeted run that has done `done` epochs, planned `remaining`
/// more, and has time for `fit` more at the speed measured: fewer when they do not fit; more
/// when at least three more fit, keeping two spare, so an epoch a little slower than the
/// last does not take back what was just added; never past [`MAX_EPOCHS`] nor cutting a
/// plan that was already longer. A run cut below its plan (`planned` epochs) earlier goes
/// back up to it as soon as the epochs fit again, without spare ones: the plan kept its own
/// margin ([`SAFETY`]), and early epochs slowed by a busy machine make a cut that the
/// later ones may repay. Once the schedule has run out (`remaining == 0`) it is kept: its
/// learning rate has decayed to the end, and an epoch added then raises it again on a
/// finished model (Omniglot, multi-similarity: a seventh epoch given back after the sixth
/// raised the loss from 0.544 to 0.552 and took R@1 from 90.51 to 90.41). `None`: keep the
/// plan.
pub fn deadline_epochs(done: usize, remaining: usize, fit: usize, planned: usize) -> Option<usize> {
    if remaining == 0 {
        return None;
    }
    if fit < remaining {
        return Some(done + fit);
    }
    let total = done + remaining;
    if total < planned {
        let back = (done + fit).min(planned);
        return (back > total).then_some(back);
    }
    let longer = (done + fit - 2).min(MAX_EPOCHS.max(total));
    (fit >= remaining + 3 && longer > total).then_some(longer)
}

/// The typical shorter side of the training images, read from the headers of up to 200
/// files spread over the set (no pixel is decoded; EXIF rotation does not change it).
pub fn median_side(paths: &[&std::path::Path]) -> Result<u32> {
    let step = (paths.len() / 200).max(1);
    let mut sides: Vec<u32> = paths
        .iter()
        .step_by(step)
        .filter_map(|p| {
            let bytes = std::fs::read(p).ok()?;
            intake::probe(&bytes, crate::data::DECODE_LIMITS).ok()
        })
        .map(|h| h.width.min(h.height))
        .collect();
    if sides.is_empty() {
        return Err(Error::Invalid(
            "none of the training images sampled for --time-budget could be read".into(),
        ));
    }
    sides.sort_unstable();
    Ok(sides[sides.len() / 2])
}

/// Times what [`plan`] needs on this machine with the model as it is (at its current
/// preprocessing size): each stage's forward pass, a training step (forward, `loss`,
/// backward) from every freeze depth on a batch of `labels.len()` images, and decoding
/// `paths`. Nothing is updated: the model and the loss leave unchanged.
pub fn measure(
    model: &crate::embed::EmbeddingModel,
    loss: &dyn crate::loss::MetricLoss,
    labels: &[u32],
    paths: &[&std::path::Path],
    batch_norm_training: bool,
) -> Result<Speeds> {
    use candle_core::{DType, Tensor};
    let size = model.config.preprocess.crop as usize;
    let stages = model.backbone.num_stages();
    let batch = labels.len();
    let x0 = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &model.device)?;

    // Forward of each stage (best of two), and the activation entering each stage.
    let mut forward = Vec::with_capacity(stages);
    let mut acts = vec![x0.clone()];
    let mut floats = vec![3 * size * size];
    for s in 0..stages {
        let mut best = f64::INFINITY;
        let mut y = None;
        for _ in 0..2 {
            let t = Instant::now();
            let out = model.backbone.forward_stages(&acts[s], s..s + 1)?.detach();
            best = best.min(t.elapsed().as_secs_f64());
            y = Some(out);
        }
        let y = y.expect("ran twice");
        floats.push(y.elem_count() / batch);
        acts.push(y);
        forward.push(best / batch as f64);
    }

    // Evaluation from every depth through the folded network, where there is one (without
    // it, `eval_from` stays empty and the planner sums `forward`).
    let mut eval_from = Vec::new();
    if let Some(net) = crate::embed::fused_backbone(model)? {
        eval_from = vec![0.0; stages + 1];
        for (f, t) in eval_from.iter_mut().enumerate().take(stages) {
            let mut best = f64::INFINITY;
            for _ in 0..2 {
                let start = Instant::now();
                std::hint::black_box(net.pooled_features_from_stage(&acts[f], f)?);
                best = best.min(start.elapsed().as_secs_f64());
            }
            *t = best / batch as f64;
        }
    }

    // A training step from every freeze depth (best of two; the first also warms the allocator).
    let mut train = vec![0.0; stages + 1];
    for f in 0..=stages {
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let t = Instant::now();
            let guard = batch_norm_training.then(crate::backbone::layers::BatchNormTraining::start);
            let emb = model.embed_from_stage(&acts[f], f)?;
            drop(guard);
            let out = loss.forward(&emb, labels)?;
            let _ = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            let grads = out.loss.backward()?;
            drop(grads);
            best = best.min(t.elapsed().as_secs_f64());
        }
        train[f] = best / batch as f64;
    }

    // Decoding and making a view, spread over the threads as the loader does.
    let pre = &model.config.preprocess;
    let sample: Vec<&std::path::Path> = paths
        .iter()
        .step_by((paths.len() / 32).max(1))
        .take(32)
        .copied()
        .collect();
    let t = Instant::now();
    {
        use rayon::prelude::*;
        sample.par_iter().for_each(|p| {
            if let Ok(img) = crate::data::decode_image(p) {
                std::hint::black_box(pre.eval_view(&img));
            }
        });
    }
    let decode = t.elapsed().as_secs_f64() / sample.len().max(1) as f64;
    // The cross-batch memory must not keep the random batches measured above.
    loss.reset();
    Ok(Speeds {
        image_size: size as u32,
        forward,
        train,
        decode,
        activation_floats: floats,
        eval_from,
        eval_size: 0,
        extra_sizes: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Lite0-like machine: the early stages are the expensive ones at high resolution.
    fn speeds(scale: f64) -> Speeds {
        let forward: Vec<f64> = [4.0, 3.0, 3.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5]
            .iter()
            .map(|ms| ms * 1e-3 * scale)
            .collect();
        // Training from stage f costs ~3× the forward of stages f.. plus a fixed loss cost.
        let train = (0..=forward.len())
            .map(|f| 3.0 * forward[f..].iter().sum::<f64>() + 1e-4)
            .collect();
        Speeds {
            image_size: 224,
            forward,
            train,
            decode: 2e-3,
            activation_floats: vec![
                150_528, 401_408, 200_704, 75_264, 31_360, 15_680, 21_952, 9_408, 15_680, 62_720,
            ],
            eval_from: Vec::new(),
            eval_size: 0,
            extra_sizes: Vec::new(),
        }
    }

    fn data(n: usize) -> DataStats {
        DataStats {
            train_images: n,
            eval_images: n,
        }
    }

    #[test]
    fn a_small_dataset_with_a_generous_budget_trains_the_whole_network() {
        let p = plan(1800.0, &data(3000), &speeds(0.5), true).unwrap();
        assert_eq!(p.freeze_until, 0, "{p:?}");
        assert!(p.epochs >= MIN_EPOCHS && p.epochs <= MAX_EPOCHS, "{p:?}");
        assert!(p.seconds_total <= 1800.0 * (1.0 - SAFETY), "{p:?}");
        assert_eq!(p.proxy_lr, 1e-2);
    }

    #[test]
    fn a_tighter_budget_or_a_slower_machine_freezes_more() {
        let fast = plan(1800.0, &data(3000), &speeds(1.0), false).unwrap();
        let slow = plan(1800.0, &data(3000), &speeds(8.0), false).unwrap();
        let tight = plan(300.0, &data(3000), &speeds(1.0), false).unwrap();
        assert!(slow.freeze_until > fast.freeze_until, "{fast:?} {slow:?}");
        assert!(tight.freeze_until > fast.freeze_until, "{fast:?} {tight:?}");
        for p in [&fast, &slow, &tight] {
            assert!(p.epochs >= MIN_EPOCHS, "{p:?}");
            assert!(p.freeze_until == 0 || p.cached_views >= 1);
            assert_eq!(p.proxy_lr, 0.0);
        }
        assert!(tight.seconds_total <= 300.0 * (1.0 - SAFETY), "{tight:?}");
    }

    #[test]
    fn a_large_dataset_gets_the_most_epochs_it_can_when_none_reaches_the_minimum() {
        // 20k images, 20 minutes, an expensive loss: not even the head alone reaches MIN_EPOCHS.
        let mut s = speeds(1.0);
        s.train.iter_mut().for_each(|t| *t += 5e-3);
        let p = plan(1200.0, &data(20_000), &s, false).unwrap();
        assert!(p.epochs >= 1 && p.epochs < MIN_EPOCHS, "{p:?}");
        assert!(p.seconds_total <= 1200.0 * (1.0 - SAFETY) + 1e-6, "{p:?}");
        // Every other depth would have fewer epochs.
        assert!(p.freeze_until > 0, "{p:?}");
    }

    #[test]
    fn a_faster_evaluation_network_leaves_more_epochs() {
        let graph = speeds(1.0);
        let mut folded = speeds(1.0);
        folded.eval_from = (0..=folded.stages())
            .map(|f| 0.1 * folded.forward_range(f..folded.stages()))
            .collect();
        let a = plan(1800.0, &data(3000), &graph, false).unwrap();
        let b = plan(1800.0, &data(3000), &folded, false).unwrap();
        assert_eq!(a.freeze_until, b.freeze_until, "{a:?} {b:?}");
        assert!(b.seconds_eval < 0.5 * a.seconds_eval, "{a:?} {b:?}");
        assert!(b.epochs > a.epochs, "{a:?} {b:?}");
    }

    #[test]
    fn evaluating_at_a_larger_inference_size_costs_its_area() {
        let same = speeds(1.0);
        let mut larger = speeds(1.0);
        larger.eval_size = 2 * larger.image_size;
        let a = plan(1800.0, &data(3000), &same, false).unwrap();
        let b = plan(1800.0, &data(3000), &larger, false).unwrap();
        assert_eq!((a.inference_size, b.inference_size), (224, 448));
        assert_eq!(b.image_size, 224);
        // One evaluation from the full network: decoding as before, the forward 4×.
        let decode = 3000.0 * same.decode;
        let (_, _, eval_a) = cost(&data(3000), &same, 0, 1, 1, 1);
        let (_, _, eval_b) = cost(&data(3000), &larger, 0, 1, 1, 1);
        assert!(((eval_b - decode) / (eval_a - decode) - 4.0).abs() < 1e-9);
        // Costlier evaluations leave less for training.
        assert!(b.seconds_total <= 1800.0 * (1.0 - SAFETY), "{b:?}");
    }

    #[test]
    fn views_are_bounded_by_time_and_memory() {
        let p = plan(3600.0, &data(3000), &speeds(20.0), false).unwrap();
        assert!(p.freeze_until > 0, "{p:?}");
        assert!((1..=MAX_VIEWS).contains(&p.cached_views), "{p:?}");
        let bytes = 3000.0
            * speeds(1.0).activation_floats[p.freeze_until] as f64
            * 4.0
            * p.cached_views as f64;
        assert!(bytes <= CACHE_BYTES, "{p:?}");
        assert!(
            p.seconds_cache <= VIEW_CACHE_SHARE * 3600.0 + 3000.0 * 2.0 * 0.03 * 20.0,
            "{p:?}"
        );
    }

    /// Each extra embedding size costs every evaluation a whole-network pass from the images
    /// at that size: the plan predicts it and still fits the budget.
    #[test]
    fn extra_embedding_sizes_cost_evaluation_time() {
        let one = plan(1800.0, &data(3000), &speeds(1.0), false).unwrap();
        let mut s = speeds(1.0);
        s.extra_sizes = vec![160, 112];
        // The whole network (16 ms per image at 224) at each area, and one more decoding
        // when the main size comes from the cache.
        let whole = 0.016 * ((160.0f64 / 224.0).powi(2) + (112.0f64 / 224.0).powi(2));
        assert!((s.eval_extra(0) - whole).abs() < 1e-12);
        assert!((s.eval_extra(3) - (whole + 2e-3)).abs() < 1e-12);
        assert_eq!(speeds(1.0).eval_extra(3), 0.0);
        let multi = plan(1800.0, &data(3000), &s, false).unwrap();
        assert!(multi.seconds_eval > one.seconds_eval, "{one:?} {multi:?}");
        assert!(multi.seconds_total <= 1800.0 * (1.0 - SAFETY), "{multi:?}");
    }

    #[test]
    fn an_impossible_budget_is_a_clear_error() {
        let err = plan(1.0, &data(100_000), &speeds(1.0), false).unwrap_err();
        assert!(err.to_string().contains("larger --time-budget"), "{err}");
        assert!(plan(100.0, &data(0), &speeds(1.0), false).is_err());
    }

    #[test]
    fn the_deadline_shortens_a_late_run_and_lengthens_an_early_one() {
        let d = |done, remaining, fit| deadline_epochs(done, remaining, fit, done + remaining);
        // Behind: only what fits.
        assert_eq!(d(5, 10, 3), Some(8));
        assert_eq!(d(5, 10, 0), Some(5));
        // On time, or up to two epochs spare: the plan stands.
        assert_eq!(d(5, 10, 10), None);
        assert_eq!(d(5, 10, 12), None);
        // Ahead: more epochs, two kept spare, capped at MAX_EPOCHS.
        assert_eq!(d(5, 10, 13), Some(16));
        assert_eq!(d(5, 10, 14), Some(17));
        // Lengthened to 17 with 12 left to do, the next epoch a little slower (11 fit) keeps it.
        assert_eq!(deadline_epochs(5, 12, 13, 15), None);
        assert_eq!(d(5, 10, 500), Some(MAX_EPOCHS));
        // A plan already past the cap is not cut because it is ahead.
        assert_eq!(d(5, 70, 500), None);
    }

    #[test]
    fn a_run_cut_below_its_plan_goes_back_up_when_the_epochs_fit_again() {
        // Planned 8, cut to 7 after epoch 4; after epoch 5 three more fit: back to 8.
        assert_eq!(deadline_epochs(5, 2, 3, 8), Some(8));
        // Only two fit: stays at 7; one fits: cut again.
        assert_eq!(deadline_epochs(5, 2, 2, 8), None);
        assert_eq!(deadline_epochs(5, 2, 1, 8), Some(6));
        // Never past the plan on the way back...
        assert_eq!(deadline_epochs(5, 1, 2, 8), Some(7));
        assert_eq!(deadline_epochs(5, 1, 30, 8), Some(8));
        // ...and once back at it, lengthening past it keeps its two spare epochs.
        assert_eq!(deadline_epochs(6, 2, 4, 8), None);
        assert_eq!(deadline_epochs(6, 2, 5, 8), Some(9));
    }

    #[test]
    fn a_finished_schedule_is_neither_given_back_nor_lengthened() {
        // Cut from 7 to 6, then time for one more after the sixth: the run ends at 6.
        assert_eq!(deadline_epochs(6, 0, 1, 7), None);
        // On plan with plenty of time left after the last epoch: no restart either.
        assert_eq!(deadline_epochs(8, 0, 5, 8), None);
        // One epoch before the end it still gives back and lengthens.
        assert_eq!(deadline_epochs(5, 1, 2, 7), Some(7));
        assert_eq!(deadline_epochs(7, 1, 4, 8), Some(9));
    }

    #[test]
    fn budgets_parse_like_users_write_them() {
        assert_eq!(parse_budget("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_budget("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_budget(" 90s ").unwrap(), Duration::from_secs(90));
        assert!(parse_budget("10s").unwrap_err().contains("at least 1m"));
        assert!(parse_budget("thirty").unwrap_err().contains("30m"));
    }

    #[test]
    fn small_images_run_near_their_own_size() {
        assert_eq!(image_size_for(105, 224), 128);
        assert_eq!(image_size_for(32, 224), 64);
        assert_eq!(image_size_for(28, 224), 64);
        assert_eq!(image_size_for(500, 224), 224);
        assert_eq!(image_size_for(200, 224), 224);
        assert_eq!(image_size_for(150, 224), 160);
    }
}
