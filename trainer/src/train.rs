//! The training loop: P×K batches → embedding → metric loss → Adam(W), with periodic
//! evaluation on the held-out classes, checkpoints, `--resume` and a NaN guard.
//!
//! With `--freeze-until S` the stages `0..S` never change, so their outputs are computed once
//! per image (and per cached augmented view) and reused every epoch: a CPU user fine-tunes
//! the top of the network in minutes instead of hours.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backbone::BackboneKind;
use crate::data::{self, Dataset, DatasetKind, SplitSpec};
use crate::embed::EmbeddingModel;
use crate::error::{Error, Result};
use crate::loss::{self, LossArgs, LossKind};
use crate::metrics;
use crate::optim::{self, Adam, OptimizerKind, ParamGroup, Schedule};

/// Files a run directory holds besides the checkpoint itself.
pub const METRICS_FILE: &str = "metrics.jsonl";
pub const STATE_FILE: &str = "train_state.json";
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Everything that defines a training run; saved with the run so `--resume` continues it.
#[derive(Debug, Clone, Serialize, Deserialize, clap::Args)]
pub struct TrainArgs {
    /// Dataset layout of --data.
    #[arg(long, value_enum, default_value = "cub")]
    pub dataset: DatasetKind,
    /// Dataset root (CUB: the CUB_200_2011 folder; folder: the class folders; list: the list file).
    #[arg(long)]
    pub data: PathBuf,
    /// Classes to train on: `train` (paper protocol: first half of the classes), `test`, `all`, or `classes=A-B`.
    #[arg(long, default_value = "train")]
    pub split: String,
    /// Classes to evaluate on (disjoint from training in the paper protocol).
    #[arg(long, default_value = "test")]
    pub eval_split: String,
    /// Run directory: checkpoint (model.safetensors + config.json), metrics.jsonl, optimizer state.
    #[arg(long, short)]
    pub out: PathBuf,
    /// Backbone network.
    #[arg(long, value_enum, default_value = "efficientnet-lite0")]
    pub backbone: BackboneKind,
    /// Pretrained backbone weights (.pth legacy/zip or .safetensors); default: $DEEP_METRIC_WEIGHTS or the HF cache.
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Embedding dimension of the linear head (the seed: 512).
    #[arg(long, default_value_t = 512)]
    pub embedding_dim: usize,
    /// Head initialisation: `identity` starts training from the pretrained metric itself
    /// (best with --embedding-dim equal to the backbone's feature dim, 1280 for EfficientNet-Lite0).
    #[arg(long, value_enum, default_value = "random")]
    pub head_init: HeadInit,
    /// Metric-learning loss.
    #[arg(long, value_enum, default_value = "fuzzy")]
    pub loss: LossKind,
    #[command(flatten)]
    pub loss_args: LossArgs,
    /// P: classes per batch.
    #[arg(long, default_value_t = 16)]
    pub classes_per_batch: usize,
    /// K: images per class in a batch (sampled with replacement only for smaller classes).
    #[arg(long, default_value_t = 5)]
    pub images_per_class: usize,
    /// Training epochs.
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Batches per epoch; default: enough for every training image once (images / (P·K)).
    #[arg(long)]
    pub batches_per_epoch: Option<usize>,
    /// Optimiser.
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: OptimizerKind,
    /// Learning rate of the backbone (the seed: 1e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub lr: f64,
    /// Learning rate of the new embedding head; default 10 × --lr.
    #[arg(long)]
    pub head_lr: Option<f64>,
    /// Weight decay (the seed: 5e-4).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_epochs: f64,
    /// Freeze stages before this one (index or name; see `trainer stages`). Frozen stages are
    /// computed once per image and cached. 0 = train everything.
    #[arg(long, default_value = "0")]
    pub freeze_until: String,
    /// With --freeze-until: cached views per training image (1 = the eval view only; more adds
    /// seeded random-resized-crop/flip views, one drawn per image per step).
    #[arg(long, default_value_t = 1)]
    pub cached_views: usize,
    /// With --freeze-until: keep the frozen stages' activations here and reuse them in later
    /// runs with the same data, backbone weights, stage and preprocessing.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Evaluate on --eval-split every N epochs (0 = only at the end).
    #[arg(long, default_value_t = 1)]
    pub eval_every: usize,
    /// Write a checkpoint every N epochs (always at the end).
    #[arg(long, default_value_t = 1)]
    pub checkpoint_every: usize,
    /// Random seed (sampling, augmentation, head init, k-means).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Count and report unreadable images instead of stopping at the first one.
    #[arg(long)]
    pub skip_bad_images: bool,
    /// Images per forward pass when embedding for evaluation / caching.
    #[arg(long, default_value_t = 32)]
    pub eval_batch_size: usize,
}

/// How the new linear head starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum HeadInit {
    /// candle-nn's default (Kaiming-uniform weights).
    Random,
    /// A (truncated) identity with zero bias.
    Identity,
}

/// Progress of a run, written last at each checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub epochs_done: usize,
    pub optimizer_steps: usize,
    pub args: TrainArgs,
}

/// The outcome of [`train`].
pub struct TrainSummary {
    pub epochs_done: usize,
    pub last_metrics: Option<serde_json::Map<String, serde_json::Value>>,
}

/// Resolves `--freeze-until` (index or stage name) against the backbone's stages.
pub fn resolve_stage(model: &EmbeddingModel, spec: &str) -> Result<usize> {
    let names = model.backbone.stage_names();
    let n = model.backbone.num_stages();
    if let Ok(i) = spec.parse::<usize>() {
        if i <= n {
            return Ok(i);
        }
        return Err(Error::Invalid(format!(
            "--freeze-until {i}: {} has stages 0..={n}",
            model.config.backbone
        )));
    }
    names.iter().position(|s| s == spec).ok_or_else(|| {
        Error::Invalid(format!(
            "--freeze-until '{spec}' is not a stage of {}; stages: {}",
            model.config.backbone,
            names.join(", ")
        ))
    })
}

/// Backbone variables of stages `>= frozen` and the head, as two parameter groups.
fn param_groups(model: &EmbeddingModel, frozen: usize, args: &TrainArgs) -> Vec<ParamGroup> {
    let data = model.varmap.data().lock().expect("varmap lock");
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let (mut bb, mut head) = (Vec::new(), Vec::new());
    let bprefix = format!("{}.", crate::embed::BACKBONE_PREFIX);
    for name in names {
        if crate::backbone::is_running_stat(name) {
            continue;
        }
        let var = data[name].clone();
        if let Some(inner) = name.strip_prefix(&bprefix) {
            if model
                .backbone
                .param_stage(inner)
                .is_some_and(|s| s >= frozen)
            {
                bb.push((name.clone(), var));
            }
        } else {
            head.push((name.clone(), var));
        }
    }
    vec![
        ParamGroup {
            name: "backbone",
            vars: bb,
            lr: args.lr,
        },
        ParamGroup {
            name: "head",
            vars: head,
            lr: args.head_lr.unwrap_or(10.0 * args.lr),
        },
    ]
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta} {msg}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    pb
}

/// Images → stage-`upto` activations for views of samples, in batches, with a progress bar.
/// `view(i)` produces the network-sized RGB view of item `i`.
fn encode_views(
    model: &EmbeddingModel,
    count: usize,
    upto: usize,
    batch: usize,
    what: &str,
    view: &(dyn Fn(usize) -> Result<Option<image::RgbImage>> + Sync),
) -> Result<(Vec<Tensor>, Vec<bool>)> {
    use rayon::prelude::*;
    let pre = &model.config.preprocess;
    let side = pre.crop as usize;

    let pb = bar(count as u64, what);
    let mut outs = Vec::new();
    let mut ok = vec![true; count];
    for start in (0..count).step_by(batch.max(1)) {
        let end = (start + batch).min(count);
        let views: Vec<Result<Option<image::RgbImage>>> =
            (start..end).into_par_iter().map(view).collect();
        let mut buf = Vec::with_capacity((end - start) * 3 * side * side);
        for (i, v) in views.into_iter().enumerate() {
            match v? {
                Some(img) => pre.normalize_into(&img, &mut buf),
                None => {
                    ok[start + i] = false;
                    buf.resize(buf.len() + 3 * side * side, 0.0);
                }
            }
        }
        let x = Tensor::from_vec(buf, (end - start, 3, side, side), &model.device)?;
        // Detached: a cached activation must not keep the forward graph (all intermediates) alive.
        let y = if upto == 0 {
            x
        } else {
            model.backbone.forward_stages(&x, 0..upto)?.detach()
        };
        outs.push(y);
        pb.inc((end - start) as u64);
    }
    pb.finish_and_clear();
    Ok((outs, ok))
}

/// Hashes the frozen stages' weights, so cached activations are reused only for identical ones.
fn frozen_weights_digest(model: &EmbeddingModel, frozen: usize) -> Result<String> {
    let data = model.varmap.data().lock().expect("varmap lock");
    let prefix = format!("{}.", crate::embed::BACKBONE_PREFIX);
    let mut names: Vec<&String> = data
        .keys()
        .filter(|n| {
            n.strip_prefix(&prefix)
                .and_then(|i| model.backbone.param_stage(i))
                .is_some_and(|s| s < frozen)
        })
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for n in names {
        h.update(n.as_bytes());
        for v in data[n]
            .as_tensor()
            .flatten_all()?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?
        {
            h.update(v.to_le_bytes());
        }
    }
    Ok(hex::encode(h.finalize()))
}

/// Loads `dir/key.safetensors` if present, else computes the activations and (with a
/// directory) stores them atomically for the next run.
fn cached(
    dir: Option<&Path>,
    key: &str,
    compute: impl FnOnce() -> Result<(Vec<Tensor>, Vec<bool>)>,
) -> Result<(Tensor, Vec<bool>)> {
    let path = dir.map(|d| d.join(format!("{key}.safetensors")));
    if let Some(p) = path.as_ref().filter(|p| p.exists()) {
        match candle_core::safetensors::load(p, &Device::Cpu) {
            Ok(mut m) => {
                if let (Some(x), Some(ok)) = (m.remove("x"), m.remove("ok")) {
                    let ok = ok.to_vec1::<u8>()?.into_iter().map(|b| b != 0).collect();
                    tracing::info!("reusing cached activations {}", p.display());
                    return Ok((x, ok));
                }
                tracing::warn!("{}: not an activation cache; recomputing", p.display());
            }
            Err(e) => tracing::warn!("{}: unreadable cache ({e}); recomputing", p.display()),
        }
    }
    let (chunks, ok) = compute()?;
    let x = Tensor::cat(&chunks, 0)?;
    if let (Some(d), Some(p)) = (dir, path) {
        std::fs::create_dir_all(d).map_err(|e| Error::file(d, e))?;
        let okt = Tensor::from_vec(
            ok.iter().map(|&b| b as u8).collect::<Vec<u8>>(),
            ok.len(),
            &Device::Cpu,
        )?;
        let tmp = crate::checkpoint::tmp_sibling(&p);
        candle_core::safetensors::save(
            &std::collections::HashMap::from([
                ("x".to_string(), x.clone()),
                ("ok".to_string(), okt),
            ]),
            &tmp,
        )
        .map_err(|e| Error::file(&tmp, e))?;
        std::fs::rename(&tmp, &p).map_err(|e| Error::file(&p, e))?;
    }
    Ok((x, ok))
}

/// Embeds a dataset's eval views from cached stage activations (or images when `cache` is None).
fn embed_eval(model: &EmbeddingModel, cached: &[Tensor], from_stage: usize) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    for chunk in cached {
        let y = model.embed_from_stage(chunk, from_stage)?;
        out.extend(y.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// Runs (or resumes) training. Returns after the last epoch; errors leave the last good
/// checkpoint in `args.out`.
pub fn train(mut args: TrainArgs, resume: bool) -> Result<TrainSummary> {
    let out = args.out.clone();
    let state_path = out.join(STATE_FILE);
    let mut start_epoch = 0;
    let mut opt_steps = 0;
    if resume {
        let text = std::fs::read_to_string(&state_path).map_err(|e| {
            Error::file(
                &state_path,
                format!("cannot resume: {e} (no checkpoint written yet in this run directory?)"),
            )
        })?;
        let st: TrainState =
            serde_json::from_str(&text).map_err(|e| Error::file(&state_path, e))?;
        let epochs = args.epochs;
        args = TrainArgs {
            epochs: epochs.max(st.args.epochs),
            ..st.args
        };
        start_epoch = st.epochs_done;
        opt_steps = st.optimizer_steps;
        tracing::info!(
            "resuming {} at epoch {start_epoch}/{}",
            out.display(),
            args.epochs
        );
    } else if out.join(crate::checkpoint::CONFIG_FILE).exists() {
        return Err(Error::file(
            &out,
            "already holds a checkpoint; pass --resume to continue it or choose another --out",
        ));
    }
    std::fs::create_dir_all(&out).map_err(|e| Error::file(&out, e))?;
    if args.classes_per_batch < 2 || args.images_per_class < 2 {
        return Err(Error::Invalid("P×K batches need --classes-per-batch ≥ 2 and --images-per-class ≥ 2 (positives and negatives)".into()));
    }

    let device = Device::Cpu;
    let train_split: SplitSpec = args
        .split
        .parse()
        .map_err(|e| Error::Invalid(format!("--split: {e}")))?;
    let eval_split: SplitSpec = args
        .eval_split
        .parse()
        .map_err(|e| Error::Invalid(format!("--eval-split: {e}")))?;
    let train_set =
        std::sync::Arc::new(data::load_dataset(args.dataset, &args.data, &train_split)?);
    let eval_set = data::load_dataset(args.dataset, &args.data, &eval_split)?;
    if train_set.class_names.len() < args.classes_per_batch {
        return Err(Error::Invalid(format!(
            "the training split has {} classes, fewer than --classes-per-batch {}",
            train_set.class_names.len(),
            args.classes_per_batch
        )));
    }
    tracing::info!(
        "train: {} images / {} classes; eval: {} images / {} classes",
        train_set.samples.len(),
        train_set.class_names.len(),
        eval_set.samples.len(),
        eval_set.class_names.len()
    );

    let mut model = if resume {
        EmbeddingModel::load(&out, &device)?
    } else {
        let weights = crate::weights::resolve_pretrained(args.backbone, args.weights.as_deref())?;
        seed_candle(args.seed);
        let m =
            EmbeddingModel::pretrained(args.backbone, &weights, Some(args.embedding_dim), &device)?;
        if args.head_init == HeadInit::Identity {
            m.init_head_identity()?;
        }
        m
    };
    model.config.training = serde_json::json!({
        "dataset": args.dataset, "data": args.data, "split": args.split, "loss": args.loss,
        "loss_args": args.loss_args, "epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr,
        "optimizer": args.optimizer, "classes_per_batch": args.classes_per_batch,
        "images_per_class": args.images_per_class, "head_init": args.head_init, "freeze_until": args.freeze_until, "seed": args.seed,
    });
    let frozen = resolve_stage(&model, &args.freeze_until)?;
    let mut opt = Adam::new(
        args.optimizer,
        param_groups(&model, frozen, &args),
        args.weight_decay,
    )?;
    if resume && opt_steps > 0 {
        opt.load(&out.join(OPTIMIZER_FILE), opt_steps)?;
    }
    tracing::info!(
        "{} trainable parameters; stages 0..{frozen} frozen",
        opt.num_params()
    );

    args.loss_args.validate(args.loss)?;
    let loss_fn = loss::build(args.loss, &args.loss_args);
    let pre = model.config.preprocess.clone();
    let augment = data::Augment::new(pre.clone(), args.seed);
    let bad = std::sync::Mutex::new(Vec::<String>::new());
    let load = |set: &Dataset, i: usize| -> Result<Option<image::DynamicImage>> {
        match data::decode_image(&set.samples[i].path) {
            Ok(img) => Ok(Some(img)),
            Err(e) if args.skip_bad_images => {
                bad.lock().expect("lock").push(e.to_string());
                Ok(None)
            }
            Err(e) => Err(Error::Invalid(format!(
                "{e} (listed at {})",
                set.samples[i].origin
            ))),
        }
    };

    // Frozen stages never change, so their outputs are computed once per image (and per cached
    // view) and, with --cache-dir, kept across runs keyed by everything that determines them.
    let frozen_digest = if frozen > 0 {
        Some(frozen_weights_digest(&model, frozen)?)
    } else {
        None
    };
    let cache_key = |set: &Dataset, views: usize, what: &str| -> String {
        let mut h = Sha256::new();
        h.update(format!(
            "{what}|{}|{frozen}|{views}|{}|",
            model.config.backbone, args.seed
        ));
        h.update(frozen_digest.as_deref().unwrap_or(""));
        h.update(serde_json::to_vec(&pre).expect("preprocess serialises"));
        for smp in &set.samples {
            h.update(smp.path.to_string_lossy().as_bytes());
            h.update(b"\n");
        }
        format!("{what}-{}", &hex::encode(h.finalize())[..24])
    };
    let cache_dir = args.cache_dir.as_deref();
    // Eval views of the held-out classes never change: cache their frozen activations.
    let eval_cache = if frozen > 0 {
        Some(cached(cache_dir, &cache_key(&eval_set, 1, "eval"), || {
            encode_views(
                &model,
                eval_set.samples.len(),
                frozen,
                args.eval_batch_size,
                "cache eval",
                &|i| Ok(load(&eval_set, i)?.map(|im| pre.eval_view(&im))),
            )
        })?)
    } else {
        None
    };
    // Training views: view 0 = eval view, views 1.. = seeded augmentations.
    let views = args.cached_views.max(1);
    let train_cache = if frozen > 0 {
        let n = train_set.samples.len();
        Some(cached(
            cache_dir,
            &cache_key(&train_set, views, "train"),
            || {
                encode_views(
                    &model,
                    n * views,
                    frozen,
                    args.eval_batch_size,
                    "cache train",
                    &|j| {
                        let (v, i) = (j / n, j % n);
                        Ok(load(&train_set, i)?.map(|im| {
                            if v == 0 {
                                pre.eval_view(&im)
                            } else {
                                augment.train_view(&im, 0, i, v as u32)
                            }
                        }))
                    },
                )
            },
        )?)
    } else {
        None
    };

    let labels: Vec<u32> = train_set.samples.iter().map(|s| s.label).collect();
    let sampler = data::PkSampler::new(
        &labels,
        args.classes_per_batch,
        args.images_per_class,
        args.seed,
    )?;
    let mut batches = BatchQueue {
        sampler: &sampler,
        queue: std::collections::VecDeque::new(),
        epoch: (start_epoch * per_epoch_hint(&args, labels.len())) as u64,
    };
    let per_epoch = per_epoch_hint(&args, labels.len());
    let total_steps = per_epoch * args.epochs;
    let warmup = (args.warmup_epochs * per_epoch as f64).round() as usize;
    let metrics_path = out.join(METRICS_FILE);
    let ks = metrics::default_ks(args.dataset == DatasetKind::Sop);
    let mut last_metrics = None;

    let mut view_rng =
        ChaCha8Rng::seed_from_u64(args.seed ^ 0x5eed_u64.wrapping_mul(start_epoch as u64 + 1));

    for epoch in start_epoch..args.epochs {
        let pb = bar(per_epoch as u64, &format!("epoch {}", epoch + 1));
        let t0 = Instant::now();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        // Without a cache, images are decoded and augmented in the background (parallel, with
        // prefetch) while the model trains on the previous batch.
        let plan: Vec<Vec<usize>> = (0..per_epoch).map(|_| batches.next()).collect();
        let mut loader = match train_cache {
            Some(_) => None,
            None => Some(data::BatchLoader::train_batches(
                train_set.clone(),
                plan.clone(),
                epoch as u64 + 1,
                augment.clone(),
                data::LoaderOptions {
                    skip_bad_images: args.skip_bad_images,
                    ..Default::default()
                },
            )?),
        };
        for (step, batch) in plan.into_iter().enumerate() {
            let mut blabels: Vec<u32> = batch.iter().map(|&i| labels[i]).collect();
            let emb = match &train_cache {
                Some((cache, ok)) => {
                    let n = labels.len();
                    let idx: Vec<u32> = batch
                        .iter()
                        .map(|&i| {
                            let v = if views > 1 {
                                view_rng.gen_range(0..views)
                            } else {
                                0
                            };
                            let j = v * n + i;
                            if ok[j] {
                                j as u32
                            } else {
                                i as u32
                            }
                        })
                        .collect();
                    let idx = Tensor::from_vec(idx, batch.len(), &device)?;
                    model.embed_from_stage(&cache.index_select(&idx, 0)?, frozen)?
                }
                None => {
                    let b = loader
                        .as_mut()
                        .and_then(|l| l.next())
                        .ok_or_else(|| Error::Invalid("the batch loader stopped early".into()))??;
                    blabels = b.labels;
                    let x = Tensor::from_vec(b.images, b.shape, &device)?;
                    if frozen > 0 {
                        let f = model.backbone.forward_stages(&x, 0..frozen)?.detach();
                        model.embed_from_stage(&f, frozen)?
                    } else {
                        model.forward(&x)?
                    }
                }
            };
            let out_loss = loss_fn.forward(&emb, &blabels)?;
            let value = out_loss
                .loss
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            // Diverged weights can give non-finite embeddings while a masked loss stays finite.
            let emb_sum = emb
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            let value = if emb_sum.is_finite() { value } else { f64::NAN };
            if !value.is_finite() {
                pb.abandon();
                return Err(diverged(
                    &format!("the loss became {value}"),
                    epoch,
                    Some(step),
                    &out,
                ));
            }
            let grads = out_loss.loss.backward()?;
            let factor = optim::lr_factor(args.schedule, opt.steps_taken(), total_steps, warmup);
            opt.step(&grads, factor)?;
            loss_sum += value;
            seen += batch.len();
            pb.set_message(format!(
                "loss {:.4}  {:.1} img/s",
                loss_sum / (step + 1) as f64,
                seen as f64 / t0.elapsed().as_secs_f64()
            ));
            pb.inc(1);
        }
        pb.finish_and_clear();
        let ips = seen as f64 / t0.elapsed().as_secs_f64();
        let mean_loss = loss_sum / per_epoch as f64;
        let done = epoch + 1;
        eprintln!(
            "epoch {done}/{}: loss {mean_loss:.4}, {ips:.1} img/s",
            args.epochs
        );

        let last = done == args.epochs;
        if (args.eval_every > 0 && done % args.eval_every == 0) || last {
            let (emb, ok) = match &eval_cache {
                Some((cache, ok)) => {
                    let step = args.eval_batch_size.max(1);
                    let chunks = (0..ok.len())
                        .step_by(step)
                        .map(|start| cache.narrow(0, start, step.min(ok.len() - start)))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    (embed_eval(&model, &chunks, frozen)?, ok.clone())
                }
                None => {
                    let (chunks, ok) = encode_views(
                        &model,
                        eval_set.samples.len(),
                        0,
                        args.eval_batch_size,
                        "evaluate",
                        &|i| Ok(load(&eval_set, i)?.map(|im| pre.eval_view(&im))),
                    )?;
                    (embed_eval(&model, &chunks, 0)?, ok)
                }
            };
            // Unreadable (skipped) images are left out of the metrics.
            let dim = model.config.output_dim();
            let (emb, elabels): (Vec<f32>, Vec<u32>) = if ok.iter().all(|&o| o) {
                (emb, eval_set.samples.iter().map(|s| s.label).collect())
            } else {
                let rows = emb
                    .chunks(dim)
                    .zip(&ok)
                    .zip(&eval_set.samples)
                    .filter(|((_, o), _)| **o);
                let (mut e, mut l) = (Vec::new(), Vec::new());
                for ((row, _), smp) in rows {
                    e.extend_from_slice(row);
                    l.push(smp.label);
                }
                (e, l)
            };
            if emb.iter().any(|v| !v.is_finite()) {
                return Err(diverged(
                    "the embeddings became non-finite",
                    epoch,
                    None,
                    &out,
                ));
            }
            let m = metrics::evaluate(&emb, model.config.output_dim(), &elabels, ks, args.seed)?;
            eprintln!("{}", m.table());
            let mut line = serde_json::Map::new();
            line.insert("epoch".into(), done.into());
            line.insert("loss".into(), mean_loss.into());
            line.extend(m.to_json());
            line.insert("train_images_per_sec".into(), ips.into());
            append_jsonl(&metrics_path, &serde_json::Value::Object(line.clone()))?;
            model.config.metrics = serde_json::Value::Object(line.clone());
            last_metrics = Some(line);
        }
        if (args.checkpoint_every > 0 && done % args.checkpoint_every == 0) || last {
            model.config.epoch = done;
            model.save(&out)?;
            opt.save(&crate::checkpoint::tmp_sibling(&out.join(OPTIMIZER_FILE)))?;
            std::fs::rename(
                crate::checkpoint::tmp_sibling(&out.join(OPTIMIZER_FILE)),
                out.join(OPTIMIZER_FILE),
            )
            .map_err(|e| Error::file(out.join(OPTIMIZER_FILE), e))?;
            let st = TrainState {
                epochs_done: done,
                optimizer_steps: opt.steps_taken(),
                args: args.clone(),
            };
            crate::checkpoint::write_atomic(
                &state_path,
                serde_json::to_string_pretty(&st)
                    .expect("state serialises")
                    .as_bytes(),
            )?;
        }
    }
    let bad = bad.into_inner().expect("lock");
    if !bad.is_empty() {
        eprintln!("skipped {} unreadable image(s):", bad.len());
        for b in bad.iter().take(20) {
            eprintln!("  {b}");
        }
    }
    Ok(TrainSummary {
        epochs_done: args.epochs,
        last_metrics,
    })
}

/// Batches per epoch: `--batches-per-epoch`, else one pass over the training images.
fn per_epoch_hint(args: &TrainArgs, images: usize) -> usize {
    args.batches_per_epoch
        .unwrap_or_else(|| (images / (args.classes_per_batch * args.images_per_class)).max(1))
}

/// An endless stream of P×K batches drawn from the sampler's (class-pass) epochs.
struct BatchQueue<'a> {
    sampler: &'a data::PkSampler,
    queue: std::collections::VecDeque<Vec<usize>>,
    epoch: u64,
}

impl BatchQueue<'_> {
    fn next(&mut self) -> Vec<usize> {
        while self.queue.is_empty() {
            self.queue.extend(self.sampler.epoch(self.epoch));
            self.epoch += 1;
        }
        self.queue.pop_front().expect("refilled")
    }
}

/// The error of a diverged run; nothing is saved after it, so the last checkpoint stays good.
fn diverged(what: &str, epoch: usize, step: Option<usize>, out: &Path) -> Error {
    let at = match step {
        Some(s) => format!("epoch {}, step {}", epoch + 1, s + 1),
        None => format!("the end of epoch {}", epoch + 1),
    };
    Error::Invalid(format!(
        "{what} at {at}: training stopped; the last good checkpoint in {} is intact. Try a lower --lr/--head-lr or another --loss.",
        out.display()
    ))
}

/// Appends one JSON line and flushes it to disk.
pub fn append_jsonl(path: &Path, value: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::file(path, e))?;
    writeln!(f, "{value}").map_err(|e| Error::file(path, e))?;
    f.sync_data().map_err(|e| Error::file(path, e))
}

/// candle's CPU RNG (used by the head initialiser) is global; seed it for reproducible runs.
fn seed_candle(seed: u64) {
    let _ = Device::Cpu.set_seed(seed);
}
