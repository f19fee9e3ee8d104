//! The training loop: P×K batches → embedding → metric loss → Adam(W), with periodic
//! evaluation on the held-out classes, checkpoints, `--resume` and a NaN guard.
//!
//! With `--freeze-until S` the stages `0..S` never change, so their outputs are computed once
//! per image (and per cached augmented view) and reused every epoch: a CPU user fine-tunes
//! the top of the network in minutes instead of hours.
//!
//! With `--time-budget` the depth, image size, epochs, views and learning rates come from
//! [`crate::plan`], measured on this machine, and the run keeps to the budget.

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
    /// Pretrained backbone weights (.pth legacy/zip or .safetensors); default: $DEEP_METRIC_WEIGHTS,
    /// else the Hugging Face cache, else downloaded from the hub into it (efficientnet-lite0: timm/tf_efficientnet_lite0.in1k; resnet18/50: timm/resnet*.a1_in1k; dinov2-vits14/vitb14: timm/vit_{small,base}_patch14_dinov2.lvd142m; clip-vitb16: openai/clip-vit-base-patch16; bn-inception has no hub repo and needs this flag).
    #[arg(long)]
    pub weights: Option<PathBuf>,
    /// Embedding dimension of the linear head (the seed: 512).
    #[arg(long, default_value_t = 512)]
    pub embedding_dim: usize,
    /// Global pooling of the last feature map: `avg` (ImageNet's), `max`, or `avg-max` (their
    /// sum, as Proxy-Anchor trains CUB and Cars); transformers also `cls` (the class token,
    /// CLIP's projected) and `cls-mean` (class token + mean patch token), and pool avg/max
    /// over the patch tokens. Default: `avg-max` for CNNs (it beat average pooling on photos
    /// and on characters, see bench/RESULTS-learning.md), `cls` for transformers. Recorded in
    /// the checkpoint.
    #[arg(long, value_enum)]
    pub pooling: Option<crate::backbone::Pooling>,
    /// Head initialisation: `identity` starts training from the pretrained metric itself
    /// (best with --embedding-dim equal to the backbone's feature dim, 1280 for EfficientNet-Lite0).
    #[arg(long, value_enum, default_value = "random")]
    pub head_init: HeadInit,
    /// Metric-learning loss. Multi-similarity (the seed author's later loss) learns fastest
    /// with CPU-sized P×K batches; `fuzzy` is the seed's own loss.
    #[arg(long, value_enum, default_value = "multi-similarity")]
    pub loss: LossKind,
    #[command(flatten)]
    pub loss_args: LossArgs,
    /// P: classes per batch. Default: 32 for the fuzzy loss, whose anchors learn only from
    /// the negatives inside their window, which a larger batch fills (and which runs faster
    /// per image on a CPU); 16 for the others. Never more than the training split has.
    #[arg(long, value_name = "P")]
    pub classes_per_batch: Option<usize>,
    /// K: images per class in a batch (sampled with replacement only for smaller classes).
    #[arg(long, default_value_t = 5)]
    pub images_per_class: usize,
    /// Hard-class batches: the P classes of a batch come in groups of G that lie nearest
    /// each other in the metric being trained (class centroids from the training steps
    /// themselves, from the second epoch on), so the losses see the negatives the metric
    /// still confuses; 1 = classes at random (the seed's P×K). Default: groups of 8 (at
    /// most P) for the fuzzy loss, which only learns from negatives nearer than an anchor's
    /// nearest positive; 1 for the others.
    #[arg(long, value_name = "G")]
    #[serde(default = "classes_at_random")]
    pub hard_classes: Option<usize>,
    /// Training epochs.
    #[arg(long, default_value_t = 20, conflicts_with = "time_budget")]
    pub epochs: usize,
    /// Batches per epoch; default: enough for every training image once (images / (P·K)).
    #[arg(long)]
    pub batches_per_epoch: Option<usize>,
    /// Optimiser.
    #[arg(long, value_enum, default_value = "adam")]
    pub optimizer: OptimizerKind,
    /// Learning rate of the backbone (the seed: 1e-5).
    #[arg(long, default_value_t = 1e-5, conflicts_with = "time_budget")]
    pub lr: f64,
    /// Learning rate of the new embedding head; default 10 × --lr.
    #[arg(long, conflicts_with = "time_budget")]
    pub head_lr: Option<f64>,
    /// Layer-wise learning-rate decay: the backbone's last stage trains at --lr, each stage
    /// before it at this factor times the next one's (0.65–0.75 is usual for fine-tuning
    /// transformers, whose early blocks hold the most general features). 1 = off.
    #[arg(long, default_value_t = 1.0, value_parser = parse_layer_decay)]
    #[serde(default = "default_layer_decay")]
    pub layer_decay: f64,
    /// Weight decay (the seed: 5e-4).
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f64,
    /// Learning-rate schedule after warm-up.
    #[arg(long, value_enum, default_value = "cosine")]
    pub schedule: Schedule,
    /// Linear warm-up, in epochs.
    #[arg(long, default_value_t = 0.0, conflicts_with = "time_budget")]
    pub warmup_epochs: f64,
    /// Freeze stages before this one (index or name; see `trainer stages`). Frozen stages are
    /// computed once per image and cached. 0 = train everything.
    #[arg(long, default_value = "0", conflicts_with = "time_budget")]
    pub freeze_until: String,
    /// With --freeze-until: cached views per training image (1 = the eval view only; more adds
    /// seeded random-resized-crop/flip views, one drawn per image per step).
    #[arg(long, default_value_t = 1, conflicts_with = "time_budget")]
    pub cached_views: usize,
    /// With --freeze-until: keep the frozen stages' activations here and reuse them in later
    /// runs with the same data, backbone weights, stage and preprocessing.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Evaluate on --eval-split every N epochs (0 = only at the end).
    #[arg(long, default_value_t = 1, conflicts_with = "time_budget")]
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
    /// Fit the whole run (caching and evaluation included) into this much time, e.g. 30m or
    /// 1h30m: the trainer measures this machine, then chooses the freeze depth, image size,
    /// epochs, cached views and learning rates itself (and prints the plan).
    #[arg(long)]
    pub time_budget: Option<String>,
    /// Square network input size in pixels (default: the backbone's, 224 for
    /// EfficientNet-Lite0). Small images (32–128 px) train several times faster near their
    /// own size.
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=1024), conflicts_with = "time_budget")]
    pub image_size: Option<u32>,
    /// Square input size the trained model embeds at (evaluations, `indexer`, the server),
    /// recorded in the checkpoint. Default: the training size times the mean magnification of
    /// the random-resized crops (about 1.5× at the default --crop-scale 0.16), rounded to 32 px,
    /// never below the training size nor above the backbone's own (224) — a network trained
    /// on crops that enlarge the objects recognises them best enlarged (FixRes, Touvron et
    /// al. 2019). So a model trained at 128 px embeds at 192 px.
    #[arg(long, value_parser = clap::value_parser!(u32).range(32..=1024))]
    pub inference_size: Option<u32>,
    /// Also embed at these square sizes (comma-separated px, e.g. 160) and sum the
    /// normalised vectors with the one at the inference size: multi-scale embedding,
    /// recorded in the checkpoint, so evaluations, `indexer` and the server embed this way
    /// too (each extra size costs one more forward pass). Default: when the inference size
    /// is at least 64 px above the training size (small images, see --inference-size), also
    /// halfway between the two — the training crops showed objects at every magnification
    /// from 1× up, not only at the mean; else one size. `0` = one size.
    #[arg(long, value_delimiter = ',', value_parser = parse_extra_size)]
    #[serde(default)]
    pub extra_sizes: Vec<u32>,
    /// Smallest area fraction of the random-resized-crop augmentation (the seed: 0.16; raise
    /// it when a small crop loses what identifies the class, e.g. characters or logos).
    #[arg(long, default_value_t = 0.16)]
    #[serde(default = "default_crop_scale")]
    pub crop_scale: f64,
    /// Which training views suit the data: `photos` (the seed's: mirrored half the time,
    /// upright), `glyphs` (characters, symbols, line drawings: never mirrored, turned by up
    /// to ±15°, and each class also turned by 90°, 180° and 270° as three new classes), or
    /// `auto`: glyphs when most of 64 sampled training images are grey, mostly background,
    /// with high-contrast ink; photos otherwise. --flip, --rotate and --turned-classes
    /// override the preset one by one.
    #[arg(long, value_enum, default_value = "auto")]
    #[serde(default)]
    pub views: ViewPreset,
    /// Probability of a horizontal flip of a training view (photos: 0.5, glyphs: 0). Use 0
    /// for data whose mirror image is another class: text, characters, some logos and symbols.
    #[arg(long)]
    #[serde(default)]
    pub flip: Option<f64>,
    /// Largest random rotation of a training crop, in degrees (each view turns by an angle
    /// drawn uniformly in ±DEG; photos: 0, glyphs: 15). A few degrees to 15 imitate the
    /// slant of handwriting, scans and hand-held photos.
    #[arg(long, value_name = "DEG")]
    #[serde(default)]
    pub rotate: Option<f64>,
    /// Probability of random erasing a training view (Zhong et al. 2020): a rectangle of
    /// 2–40 % of the view is painted with the normalisation mean, so the metric cannot lean
    /// on any one part of an object. The seed: 0.
    #[arg(long, value_name = "P", default_value_t = 0.0)]
    #[serde(default)]
    pub erase: f64,
    /// Train on every listed file even when the same file is listed twice. By default a
    /// repeated file is trained on once (the first copy in dataset order): identical images
    /// under two labels are negatives no metric can separate. The evaluation split is never
    /// changed; repeats touching it are reported.
    #[arg(long)]
    #[serde(default)]
    pub keep_duplicates: bool,
    /// Train on each training class also turned by 90°, 180° and 270°, as three new classes
    /// (four times the classes from the same files; glyphs: on, photos: off;
    /// `--turned-classes false` turns it off). For characters, symbols and icons, where a
    /// turned glyph is another glyph (the few-shot Omniglot practice); never for photos,
    /// whose objects stay what they are when turned. The evaluation split is not changed.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    #[serde(default)]
    pub turned_classes: Option<bool>,
    /// Learning rate of a proxy loss's proxies; default 100 × --lr (Kim et al. 2020).
    #[arg(long, conflicts_with = "time_budget")]
    pub proxy_lr: Option<f64>,
    /// Cross-batch memory: also mine pairs against the last SIZE training embeddings (XBM,
    /// Wang et al. 2020; pair losses only).
    #[arg(long, value_name = "SIZE")]
    pub xbm: Option<usize>,
    /// Gradient accumulation: one optimiser step every N P×K batches (a larger effective batch
    /// for the proxy losses and --xbm; pair losses still mine within each batch).
    #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024))]
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// Batch norm while training: `frozen` (ImageNet statistics, the metric-learning
    /// protocol) or `train` (batch statistics, running averages updated; helps data far
    /// from photos, costs some speed).
    #[arg(long, value_enum, default_value = "frozen")]
    #[serde(default)]
    pub bn: BnMode,
}

/// How batch norm behaves in training steps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BnMode {
    #[default]
    Frozen,
    Train,
}

impl TrainArgs {
    /// P, once [`resolve_batch`] has filled it from the loss and the data.
    fn batch_classes(&self) -> usize {
        self.classes_per_batch
            .expect("--classes-per-batch is resolved when the data is loaded")
    }

    /// (flip probability, largest rotation, turned classes) this run trains with: each flag
    /// as given, else its `--views` preset's value (the photo views while `auto` is
    /// undecided; [`resolve_views`] decides it before training).
    pub fn view_options(&self) -> (f64, f64, bool) {
        let (flip, rotate, turned) = self.views.views().unwrap_or(PHOTO_VIEWS);
        (
            self.flip.unwrap_or(flip),
            self.rotate.unwrap_or(rotate),
            self.turned_classes.unwrap_or(turned),
        )
    }
}

/// Training-view presets (`--views`); see [`TrainArgs::views`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ViewPreset {
    /// Glyphs when most sampled training images look like glyphs, else photos.
    #[default]
    Auto,
    /// Mirrored half the time, upright, classes as given (the seed's views).
    Photos,
    /// Never mirrored, turned by up to ±15°, classes also turned by quarter turns.
    Glyphs,
}

impl ViewPreset {
    /// (flip probability, largest rotation in degrees, turned classes) of a preset; `auto`
    /// has none until it is decided.
    pub fn views(self) -> Option<(f64, f64, bool)> {
        match self {
            ViewPreset::Auto => None,
            ViewPreset::Photos => Some(PHOTO_VIEWS),
            ViewPreset::Glyphs => Some((0.0, 15.0, true)),
        }
    }
}

/// The seed's photo views: mirrored half the time, no rotation, no turned classes.
const PHOTO_VIEWS: (f64, f64, bool) = (0.5, 0.0, false);

pub fn parse_extra_size(s: &str) -> std::result::Result<u32, String> {
    let v: u32 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size in pixels"))?;
    if v == 0 || (32..=1024).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} px is outside 32..=1024 (0 = one size only)"))
    }
}

fn default_layer_decay() -> f64 {
    1.0
}

fn parse_layer_decay(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("'{s}' is not a number"))?;
    if v > 0.0 && v <= 1.0 {
        Ok(v)
    } else {
        Err(format!("{v} is outside (0, 1] (1 = every stage at --lr)"))
    }
}

fn default_crop_scale() -> f64 {
    0.16
}

/// Runs saved before `--hard-classes` existed drew their classes at random.
fn classes_at_random() -> Option<usize> {
    Some(1)
}

/// `--hard-classes` default for the fuzzy loss: groups of eight classes (Omniglot, 4 fixed
/// epochs: R@1 84.8 at random, 86.0 with groups of 4, 87.7 with 8); multi-similarity, which
/// weighs every pair, lost MAP@R with groups of 4 (`bench/RESULTS-learning.md`, sessions
/// 22–23).
pub const HARD_CLASSES: usize = 8;

/// `--classes-per-batch` default for the fuzzy loss (Omniglot, 4 fixed epochs: R@1 85.21
/// with P = 8, 87.29 with 16, 86.99 with 32, but +1.1 MAP@R and a faster step: a 30-minute
/// budget fitted 8 epochs instead of 7 when its timed steps were not slow;
/// bench/RESULTS-learning.md, session 27).
pub const FUZZY_CLASSES_PER_BATCH: usize = 32;
/// `--classes-per-batch` default for the other losses (the seed's P×K sampling).
pub const CLASSES_PER_BATCH: usize = 16;

fn default_classes_per_batch(loss: LossKind) -> usize {
    match loss {
        LossKind::Fuzzy => FUZZY_CLASSES_PER_BATCH,
        _ => CLASSES_PER_BATCH,
    }
}

fn default_hard_classes(loss: LossKind, classes_per_batch: usize) -> usize {
    match loss {
        LossKind::Fuzzy => HARD_CLASSES.min(classes_per_batch),
        _ => 1,
    }
}

fn default_accumulate() -> usize {
    1
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
    // Backbone variables by stage (one group per stage with --layer-decay, else one group).
    let last = model.backbone.num_stages().saturating_sub(1);
    let decayed = args.layer_decay < 1.0;
    let mut bb: std::collections::BTreeMap<usize, Vec<(String, candle_core::Var)>> =
        Default::default();
    let mut head = Vec::new();
    let bprefix = format!("{}.", crate::embed::BACKBONE_PREFIX);
    for name in names {
        if crate::backbone::is_running_stat(name) {
            continue;
        }
        let var = data[name].clone();
        if let Some(inner) = name.strip_prefix(&bprefix) {
            if let Some(stage) = model.backbone.param_stage(inner).filter(|&s| s >= frozen) {
                let key = if decayed { stage } else { last };
                bb.entry(key).or_default().push((name.clone(), var));
            }
        } else {
            head.push((name.clone(), var));
        }
    }
    let mut groups: Vec<ParamGroup> = bb
        .into_iter()
        .map(|(stage, vars)| ParamGroup {
            name: "backbone",
            vars,
            lr: args.lr * args.layer_decay.powi((last - stage.min(last)) as i32),
        })
        .collect();
    if groups.is_empty() {
        groups.push(ParamGroup {
            name: "backbone",
            vars: Vec::new(),
            lr: args.lr,
        });
    }
    groups.push(ParamGroup {
        name: "head",
        vars: head,
        lr: args.head_lr.unwrap_or(10.0 * args.lr),
    });
    groups
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

/// Receives one batch of [`Encoding::run`]: its activations and its views (`None`: unreadable).
type BatchSink<'a> = dyn FnMut(Tensor, &[Option<image::RgbImage>]) -> Result<()> + 'a;

/// Images → stage-`upto` activations for views of `count` samples, in batches of `batch`,
/// with a progress bar named `what`.
struct Encoding<'a> {
    model: &'a EmbeddingModel,
    pre: &'a crate::preprocess::Preprocess,
    count: usize,
    upto: usize,
    batch: usize,
    what: &'a str,
}

impl Encoding<'_> {
    /// `view(i)` produces the network-sized RGB view of item `i`; each batch's activations go
    /// to `sink` in order with the batch's views (`None`: unreadable), so the caller keeps
    /// only what it needs (one cache buffer, or embeddings) and memory stays bounded by one
    /// batch. Returns which items could be read.
    fn run(
        &self,
        view: &(dyn Fn(usize) -> Result<Option<image::RgbImage>> + Sync),
        sink: &mut BatchSink<'_>,
    ) -> Result<Vec<bool>> {
        use rayon::prelude::*;
        let side = self.pre.crop as usize;
        let count = self.count;

        let pb = bar(count as u64, self.what);
        let mut ok = vec![true; count];
        for start in (0..count).step_by(self.batch.max(1)) {
            let end = (start + self.batch).min(count);
            let views: Vec<Option<image::RgbImage>> = (start..end)
                .into_par_iter()
                .map(view)
                .collect::<Result<_>>()?;
            let mut buf = Vec::with_capacity((end - start) * 3 * side * side);
            for (i, v) in views.iter().enumerate() {
                match v {
                    Some(img) => self.pre.normalize_into(img, &mut buf),
                    None => {
                        ok[start + i] = false;
                        buf.resize(buf.len() + 3 * side * side, 0.0);
                    }
                }
            }
            let x = Tensor::from_vec(buf, (end - start, 3, side, side), &self.model.device)?;
            // Detached: a cached activation must not keep the forward graph alive.
            let y = if self.upto == 0 {
                x
            } else {
                self.model
                    .backbone
                    .forward_stages(&x, 0..self.upto)?
                    .detach()
            };
            sink(y, &views)?;
            pb.inc((end - start) as u64);
        }
        pb.finish_and_clear();
        Ok(ok)
    }

    /// [`Encoding::run`] into one tensor of `count` rows, written into a single buffer sized
    /// after the first batch: concatenating per-batch tensors at the end held the cache twice
    /// at its peak, and the allocator kept both (`bench/RESULTS-learning.md`, session 19).
    fn to_tensor(
        &self,
        view: &(dyn Fn(usize) -> Result<Option<image::RgbImage>> + Sync),
    ) -> Result<(Tensor, Vec<bool>)> {
        let mut rows: Vec<f32> = Vec::new();
        let mut item_shape: Vec<usize> = Vec::new();
        let ok = self.run(view, &mut |y, _| {
            if item_shape.is_empty() {
                item_shape = y.dims()[1..].to_vec();
                rows.reserve_exact(self.count * item_shape.iter().product::<usize>());
            }
            rows.extend(y.flatten_all()?.to_vec1::<f32>()?);
            Ok(())
        })?;
        let mut shape = vec![self.count];
        shape.extend(item_shape);
        Ok((Tensor::from_vec(rows, shape, &self.model.device)?, ok))
    }
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
/// directory) stores them atomically for the next run. Loaded onto `device` (the file is
/// device-independent).
fn cached(
    dir: Option<&Path>,
    key: &str,
    device: &Device,
    compute: impl FnOnce() -> Result<(Tensor, Vec<bool>)>,
) -> Result<(Tensor, Vec<bool>)> {
    let path = dir.map(|d| d.join(format!("{key}.safetensors")));
    if let Some(p) = path.as_ref().filter(|p| p.exists()) {
        match candle_core::safetensors::load(p, device) {
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
    let (x, ok) = compute()?;
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

/// Runs (or resumes) training on `device`. Returns after the last epoch; errors leave the
/// last good checkpoint in `args.out`. The device is not part of the run: a run started on a
/// GPU resumes on the CPU and vice versa.
pub fn train(args: TrainArgs, resume: bool, device: &Device) -> Result<TrainSummary> {
    let started = Instant::now();
    let (mut args, start_epoch, opt_steps) = open_run(args, resume)?;
    // Checked before any data is read, so a mistyped budget fails at once.
    let budget = args
        .time_budget
        .as_deref()
        .map(crate::plan::parse_budget)
        .transpose()
        .map_err(|e| Error::Invalid(format!("--time-budget: {e}")))?;
    let out = args.out.clone();
    let (train_set, eval_set, duplicates_dropped) = load_splits(&mut args, resume)?;
    let mut model = build_model(&args, resume, device)?;
    args.pooling = Some(model.config.pooling);
    args.loss_args.validate(args.loss)?;
    let loss_fn = build_loss(&args, &model, &train_set, resume)?;

    let mut deadline = None;
    let mut plan = None;
    args.time_budget = None;
    if let Some(budget) = budget {
        let d = crate::plan::Deadline {
            start: started,
            budget,
        };
        let p = plan_run(
            &mut args,
            &mut model,
            loss_fn.as_ref(),
            &train_set,
            &eval_set,
            d,
        )?;
        crate::checkpoint::write_atomic(
            &out.join(PLAN_FILE),
            serde_json::to_string_pretty(&p)
                .expect("plan serialises")
                .as_bytes(),
        )?;
        plan = Some(p);
        deadline = Some(d);
    }
    let train_pre = resolve_sizes(&mut args, &mut model, resume);
    // A resumed budgeted run keeps recording the plan it was made with.
    let plan = plan.or_else(|| {
        let text = std::fs::read_to_string(out.join(PLAN_FILE)).ok()?;
        serde_json::from_str::<crate::plan::Plan>(&text).ok()
    });
    model.config.training = serde_json::json!({
        "dataset": args.dataset, "data": args.data, "split": args.split, "loss": args.loss,
        "loss_args": args.loss_args, "epochs": args.epochs, "lr": args.lr, "head_lr": args.head_lr,
        "proxy_lr": args.proxy_lr, "xbm": args.xbm, "accumulate": args.accumulate,
        "optimizer": args.optimizer, "classes_per_batch": args.classes_per_batch,
        "images_per_class": args.images_per_class, "hard_classes": args.hard_classes, "head_init": args.head_init, "pooling": args.pooling, "layer_decay": args.layer_decay,
        "freeze_until": args.freeze_until, "cached_views": args.cached_views,
        "crop_scale": args.crop_scale, "views": args.views, "flip": args.flip, "rotate": args.rotate, "erase": args.erase, "turned_classes": args.turned_classes, "duplicates_dropped": duplicates_dropped, "image_size": train_pre.crop,
        "inference_size": model.config.preprocess.crop, "extra_sizes": model.config.preprocess.extra_sizes, "bn": args.bn, "seed": args.seed, "plan": plan,
    });
    let frozen = resolve_stage(&model, &args.freeze_until)?;
    let mut groups = param_groups(&model, frozen, &args);
    let proxy_vars = loss_fn.parameters();
    if !proxy_vars.is_empty() {
        groups.push(ParamGroup {
            name: "proxies",
            vars: proxy_vars,
            lr: args.proxy_lr.unwrap_or(100.0 * args.lr),
        });
    }
    let mut opt = Adam::new(args.optimizer, groups, args.weight_decay)?;
    if resume && opt_steps > 0 {
        opt.load(&out.join(OPTIMIZER_FILE), opt_steps)?;
    }
    let extra: String = model
        .config
        .preprocess
        .extra_sizes
        .iter()
        .map(|x| format!(" + {x}×{x}"))
        .collect();
    tracing::info!(
        "{} trainable parameters; stages 0..{frozen} frozen; training views {s}×{s} px, embedding at {e}×{e}{extra} px",
        opt.num_params(),
        s = train_pre.crop,
        e = model.config.preprocess.crop
    );
    match args.hard_classes.unwrap_or(1) {
        1 => tracing::info!(
            "P×K batches: {} classes at random × {} images",
            args.batch_classes(),
            args.images_per_class
        ),
        g => tracing::info!(
            "P×K batches: {} classes × {} images, in groups of {g} classes the metric finds alike \
             (from epoch 2; --hard-classes 1 draws them at random)",
            args.batch_classes(),
            args.images_per_class
        ),
    }

    let mut augment = data::Augment::new(train_pre, args.seed);
    augment.crop.scale.0 = args.crop_scale;
    (augment.flip_p, augment.rotate_deg, _) = args.view_options();
    augment.erase_p = args.erase;
    let images = Images {
        skip_bad: args.skip_bad_images,
        bad: std::sync::Mutex::new(Vec::new()),
    };
    let caches = build_caches(
        &args, &model, frozen, &train_set, &eval_set, &augment, &images,
    )?;
    let epochs_planned = args.epochs;
    let mut run = Run {
        args,
        model,
        opt,
        loss_fn,
        frozen,
        train_set,
        eval_set,
        augment,
        images,
        caches,
        deadline,
        planned_epochs: epochs_planned,
        eval_seconds: None,
        baseline: None,
    };
    run.baseline = run.pretrained_baseline(resume)?;
    let last_metrics = run.epochs(start_epoch)?;
    run.images.report();
    Ok(TrainSummary {
        epochs_done: run.args.epochs,
        last_metrics,
    })
}

/// The plan `--time-budget` chose, written beside the checkpoint.
pub const PLAN_FILE: &str = "plan.json";
/// The learned parameters of a proxy loss (`--loss proxy-anchor | norm-softmax`).
pub const LOSS_FILE: &str = "loss.safetensors";

/// Checks the run directory and, with `--resume`, restores the arguments and progress.
fn open_run(mut args: TrainArgs, resume: bool) -> Result<(TrainArgs, usize, usize)> {
    let out = args.out.clone();
    let state_path = out.join(STATE_FILE);
    let (mut start_epoch, mut opt_steps) = (0, 0);
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
        // The saved arguments already carry the plan of a budgeted run: never plan again.
        args = TrainArgs {
            epochs: epochs.max(st.args.epochs),
            time_budget: None,
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
    check_views(&args)?;
    check_batch(&args)?;
    std::fs::create_dir_all(&out).map_err(|e| Error::file(&out, e))?;
    Ok((args, start_epoch, opt_steps))
}

/// Refuses P×K options out of range, before the run directory is created; P is checked
/// against its default when left unset (the data may lower it later, see [`resolve_batch`]).
fn check_batch(args: &TrainArgs) -> Result<()> {
    let p = args
        .classes_per_batch
        .unwrap_or_else(|| default_classes_per_batch(args.loss));
    if p < 2 || args.images_per_class < 2 {
        return Err(Error::Invalid("P×K batches need --classes-per-batch ≥ 2 and --images-per-class ≥ 2 (positives and negatives)".into()));
    }
    match args.hard_classes {
        Some(g) if g == 0 || g > p => Err(Error::Invalid(format!(
            "--hard-classes {g} must be between 1 (classes at random) and --classes-per-batch ({p})"
        ))),
        _ => Ok(()),
    }
}

/// Fills P (at most the training split's classes when left unset) and the hard-class
/// groups (at most P) from the loss's defaults, so the run records, and a resume repeats,
/// the batches it trained with.
fn resolve_batch(args: &mut TrainArgs, classes: usize) -> Result<()> {
    let p = match args.classes_per_batch {
        Some(p) if p > classes => {
            return Err(Error::Invalid(format!(
                "the training split has {classes} classes, fewer than --classes-per-batch {p}"
            )))
        }
        Some(p) => p,
        None if classes < 2 => {
            return Err(Error::Invalid(format!(
                "the training split has {classes} class(es): P×K batches need at least 2"
            )))
        }
        None => default_classes_per_batch(args.loss).min(classes),
    };
    args.classes_per_batch = Some(p);
    let group = *args
        .hard_classes
        .get_or_insert_with(|| default_hard_classes(args.loss, p));
    if group > p {
        return Err(Error::Invalid(format!(
            "--hard-classes {group} must be between 1 (classes at random) and --classes-per-batch ({p})"
        )));
    }
    Ok(())
}

/// Refuses training-view options out of range, before the run directory is created.
fn check_views(args: &TrainArgs) -> Result<()> {
    let bounded = [
        (
            "--flip",
            "a probability",
            args.flip.unwrap_or(0.0),
            0.0..=1.0,
        ),
        ("--erase", "a probability", args.erase, 0.0..=1.0),
        (
            "--rotate",
            "the largest angle in degrees",
            args.rotate.unwrap_or(0.0),
            0.0..=180.0,
        ),
    ];
    for (flag, what, value, range) in bounded {
        if !range.contains(&value) {
            return Err(Error::Invalid(format!(
                "{flag} is {what} in [{}, {}], got {value}",
                range.start(),
                range.end()
            )));
        }
    }
    if !(args.crop_scale > 0.0 && args.crop_scale <= 1.0) {
        return Err(Error::Invalid(format!(
            "--crop-scale must be in (0, 1], got {}",
            args.crop_scale
        )));
    }
    Ok(())
}

/// The training and evaluation splits, and how many repeated files were left out of training
/// ([`data::duplicates`]).
fn load_splits(
    args: &mut TrainArgs,
    resume: bool,
) -> Result<(std::sync::Arc<Dataset>, Dataset, usize)> {
    let train_split: SplitSpec = args
        .split
        .parse()
        .map_err(|e| Error::Invalid(format!("--split: {e}")))?;
    let eval_split: SplitSpec = args
        .eval_split
        .parse()
        .map_err(|e| Error::Invalid(format!("--eval-split: {e}")))?;
    let train_set = data::load_dataset(args.dataset, &args.data, &train_split)?;
    let eval_set = data::load_dataset(args.dataset, &args.data, &eval_split)?;
    let (train_set, dropped) =
        data::duplicates::clean_training_split(train_set, &eval_set, args.keep_duplicates);
    resolve_views(args, &train_set, resume);
    let train_set = if args.view_options().2 {
        data::with_turned_classes(train_set)
    } else {
        train_set
    };
    let train_set = std::sync::Arc::new(train_set);
    resolve_batch(args, train_set.class_names.len())?;
    tracing::info!(
        "train: {} images / {} classes; eval: {} images / {} classes",
        train_set.samples.len(),
        train_set.class_names.len(),
        eval_set.samples.len(),
        eval_set.class_names.len()
    );
    Ok((train_set, eval_set, dropped))
}

/// Fills the view options left unset from `--views`, deciding `auto` from the training
/// images ([`data::glyphs`]), so the run records, and a resume repeats, the views it
/// trained with. A resumed run made before `--views` existed gets the photo views it had.
fn resolve_views(args: &mut TrainArgs, train_set: &Dataset, resume: bool) {
    let unset = args.flip.is_none() || args.rotate.is_none() || args.turned_classes.is_none();
    if args.views == ViewPreset::Auto && unset {
        args.views = if resume {
            ViewPreset::Photos
        } else {
            let paths: Vec<&Path> = train_set.samples.iter().map(|s| s.path.as_path()).collect();
            let count = data::glyphs::count_glyphs(&paths);
            let preset = if count.is_glyph_set() {
                ViewPreset::Glyphs
            } else {
                ViewPreset::Photos
            };
            tracing::info!(
                "--views auto: {} of {} sampled training images look like glyphs (grey, mostly \
                 background, high-contrast ink): training views for {}",
                count.glyphs,
                count.sampled,
                if preset == ViewPreset::Glyphs {
                    "glyphs (no mirroring, ±15° turns, quarter-turned classes; --views photos for the seed's)"
                } else {
                    "photos (mirrored half the time; --views glyphs for characters and symbols)"
                }
            );
            preset
        };
    }
    let (flip, rotate, turned) = args.view_options();
    args.flip = Some(flip);
    args.rotate = Some(rotate);
    args.turned_classes = Some(turned);
}

/// The pretrained network with a new head, or the checkpoint being resumed.
fn build_model(args: &TrainArgs, resume: bool, device: &Device) -> Result<EmbeddingModel> {
    if resume {
        return EmbeddingModel::load(&args.out, device);
    }
    let weights = crate::weights::resolve_pretrained(args.backbone, args.weights.as_deref())?;
    seed_candle(args.seed, device);
    let pooling = args
        .pooling
        .unwrap_or_else(|| crate::backbone::default_training_pooling(args.backbone));
    let m = EmbeddingModel::pretrained_pooled(
        args.backbone,
        &weights,
        Some(args.embedding_dim),
        pooling,
        device,
    )?;
    if args.head_init == HeadInit::Identity {
        m.init_head_identity()?;
    }
    Ok(m)
}

/// The loss (with its proxies, restored on `--resume`), wrapped in a cross-batch memory
/// with `--xbm`.
fn build_loss(
    args: &TrainArgs,
    model: &EmbeddingModel,
    train_set: &Dataset,
    resume: bool,
) -> Result<Box<dyn loss::MetricLoss>> {
    let space = loss::ClassSpace {
        classes: train_set.num_classes(),
        dim: model.config.output_dim(),
        seed: args.seed,
        device: model.device.clone(),
    };
    let mut l = loss::build(args.loss, &args.loss_args, Some(&space))?;
    let params = l.parameters();
    if resume && !params.is_empty() {
        let path = args.out.join(LOSS_FILE);
        let saved = candle_core::safetensors::load(&path, &model.device).map_err(|e| {
            Error::file(&path, format!("cannot resume the {} loss: {e}", args.loss))
        })?;
        for (name, var) in &params {
            let t = saved.get(name).ok_or_else(|| {
                Error::file(
                    &path,
                    format!(
                        "'{name}' is missing; was this run trained with --loss {}?",
                        args.loss
                    ),
                )
            })?;
            if t.dims() != var.dims() {
                return Err(Error::file(
                    &path,
                    format!(
                        "'{name}' has shape {:?}, the training split needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(t)?;
        }
    }
    if let Some(size) = args.xbm {
        l = Box::new(loss::CrossBatchMemory::new(l, size)?);
    }
    l.check()?;
    Ok(l)
}

/// The training views' preprocessing, and the model's (what it embeds at and the checkpoint
/// records) set to the inference size: `--inference-size`, else [`inference_size`] of the
/// training size. A resumed run keeps both as they were.
fn resolve_sizes(
    args: &mut TrainArgs,
    model: &mut EmbeddingModel,
    resume: bool,
) -> crate::preprocess::Preprocess {
    let mut train_pre = model.config.preprocess.clone();
    if let Some(size) = args.image_size {
        set_image_size(&mut train_pre, size);
    }
    if resume {
        return train_pre;
    }
    let size = *args.inference_size.get_or_insert_with(|| {
        default_inference_size(model.config.backbone, &train_pre, args.crop_scale)
    });
    set_image_size(&mut model.config.preprocess, size);
    model.config.preprocess.extra_sizes = resolve_extra_sizes(args, train_pre.crop, size);
    train_pre
}

/// The extra embedding sizes of a run training at `train` and embedding at `inference`
/// (`--extra-sizes`, else [`default_extra_sizes`]); the choice is written back into `args`
/// (`[0]` for an explicit "one size"), so resolving again gives the same.
fn resolve_extra_sizes(args: &mut TrainArgs, train: u32, inference: u32) -> Vec<u32> {
    if args.extra_sizes.is_empty() {
        args.extra_sizes = default_extra_sizes(train, inference);
        if args.extra_sizes.is_empty() {
            args.extra_sizes = vec![0];
        }
    }
    args.extra_sizes
        .iter()
        .copied()
        .filter(|&s| s != 0)
        .collect()
}

/// Halfway between the training and the inference size, rounded to 32 px, when they are at
/// least 64 px apart: random-resized crops enlarge objects by 1× to 2.5×, the inference size
/// matches the mean enlargement, and a second embedding nearer the training size covers the
/// crops that enlarged less (measured on Omniglot, 128-px training: +1.4 R@1 at 192 + 160).
/// Photos trained at the backbone's own size get none: their inference size is the same.
pub fn default_extra_sizes(train: u32, inference: u32) -> Vec<u32> {
    if inference < train + 64 {
        return Vec::new();
    }
    vec![((train + inference) as f64 / 64.0).round() as u32 * 32]
}

/// [`inference_size`] for `kind`; transformers keep their training size, since their patch
/// grid (14 or 16 px) does not divide the 32-px steps (`--inference-size` still applies).
fn default_inference_size(
    kind: crate::backbone::BackboneKind,
    train: &crate::preprocess::Preprocess,
    crop_scale: f64,
) -> u32 {
    if kind.is_transformer() {
        return train.crop;
    }
    let native = crate::backbone::default_preprocess(kind).crop;
    inference_size(train, crop_scale, native)
}

/// The default inference size for a model trained on `train`-sized random-resized crops of
/// smallest area `crop_scale`: where objects appear as large as in the training views on
/// average (see [`data::RandomResizedCrop::mean_magnification`]), rounded to 32 px, at least
/// the training size and at most the backbone's `native` size (embedding stays as cheap as
/// the backbone was designed for).
pub fn inference_size(train: &crate::preprocess::Preprocess, crop_scale: f64, native: u32) -> u32 {
    let crop = data::RandomResizedCrop {
        scale: (crop_scale, 1.0),
        ..Default::default()
    };
    // The eval view resizes the shorter side to `resize` (then center-crops), the training
    // crop is drawn on that image and resized to `crop`.
    let apparent =
        train.crop as f64 * crop.mean_magnification() * train.crop as f64 / train.resize as f64;
    let rounded = ((apparent / 32.0).round() as u32).max(1) * 32;
    rounded.min(native).max(train.crop)
}

/// Sets the network input to `size`×`size`, keeping the backbone's resize-to-crop ratio.
pub fn set_image_size(pre: &mut crate::preprocess::Preprocess, size: u32) {
    let ratio = pre.resize as f64 / pre.crop as f64;
    pre.crop = size;
    pre.resize = ((size as f64 * ratio).round() as u32).max(size);
}

/// `--time-budget`: measure this machine, choose the recipe, write it into `args` and the
/// model's preprocessing, and print it.
fn plan_run(
    args: &mut TrainArgs,
    model: &mut EmbeddingModel,
    loss_fn: &dyn loss::MetricLoss,
    train_set: &Dataset,
    eval_set: &Dataset,
    deadline: crate::plan::Deadline,
) -> Result<crate::plan::Plan> {
    use crate::plan;
    let paths: Vec<&Path> = train_set.samples.iter().map(|s| s.path.as_path()).collect();
    let native = model.config.preprocess.crop;
    let size = plan::image_size_for(plan::median_side(&paths)?, native);
    set_image_size(&mut model.config.preprocess, size);
    let inference = args.inference_size.unwrap_or_else(|| {
        default_inference_size(
            model.config.backbone,
            &model.config.preprocess,
            args.crop_scale,
        )
    });
    args.inference_size = Some(inference);
    let extra = resolve_extra_sizes(args, size, inference);
    eprintln!("measuring this machine at {size}×{size} px …");
    let p = args.batch_classes();
    let labels: Vec<u32> = (0..p * args.images_per_class)
        .map(|i| (i % p) as u32)
        .collect();
    let mut speeds = plan::measure(model, loss_fn, &labels, &paths, args.bn == BnMode::Train)?;
    speeds.eval_size = inference;
    speeds.extra_sizes = extra;
    let data = plan::DataStats {
        train_images: train_set.len(),
        eval_images: eval_set.len(),
    };
    let mut p = plan::plan(deadline.left(), &data, &speeds, args.loss.has_proxies())?;
    eprintln!(
        "{}",
        p.describe(&model.backbone.stage_names(), deadline.budget)
    );
    args.image_size = Some(p.image_size);
    args.freeze_until = p.freeze_until.to_string();
    args.epochs = p.epochs;
    args.cached_views = p.cached_views;
    args.lr = p.lr;
    args.head_lr = Some(p.head_lr);
    args.proxy_lr = Some(p.proxy_lr);
    args.warmup_epochs = p.warmup_epochs;
    args.eval_every = p.eval_every;
    p.measured = Some(speeds);
    Ok(p)
}

/// Frozen-stage activations of the eval views and of the cached training views.
struct Caches {
    eval: Option<(Tensor, Vec<bool>)>,
    train: Option<(Tensor, Vec<bool>)>,
    views: usize,
}

/// Reads images for training, honouring `--skip-bad-images`.
struct Images {
    skip_bad: bool,
    bad: std::sync::Mutex<Vec<String>>,
}

impl Images {
    fn load(&self, set: &Dataset, i: usize) -> Result<Option<image::DynamicImage>> {
        match set.samples[i].decode() {
            Ok(img) => Ok(Some(img)),
            Err(e) if self.skip_bad => {
                self.bad.lock().expect("lock").push(e.to_string());
                Ok(None)
            }
            Err(e) => Err(Error::Invalid(format!(
                "{e} (listed at {})",
                set.samples[i].origin
            ))),
        }
    }

    fn report(&self) {
        let bad = self.bad.lock().expect("lock");
        if !bad.is_empty() {
            eprintln!("skipped {} unreadable image(s):", bad.len());
            for b in bad.iter().take(20) {
                eprintln!("  {b}");
            }
        }
    }
}

/// Frozen stages never change, so their outputs are computed once per image (and per cached
/// view) and, with --cache-dir, kept across runs keyed by everything that determines them.
fn build_caches(
    args: &TrainArgs,
    model: &EmbeddingModel,
    frozen: usize,
    train_set: &Dataset,
    eval_set: &Dataset,
    augment: &data::Augment,
    images: &Images,
) -> Result<Caches> {
    let views = args.cached_views.max(1);
    if frozen == 0 {
        return Ok(Caches {
            eval: None,
            train: None,
            views,
        });
    }
    let pre = &model.config.preprocess;
    let frozen_digest = frozen_weights_digest(model, frozen)?;
    // Eval views at the inference size, training views at the training size.
    let train_pre = &augment.preprocess;
    let cache_key = |set: &Dataset, views: usize, what: &str| -> String {
        let pre = if what == "eval" { pre } else { train_pre };
        let mut h = Sha256::new();
        h.update(format!(
            "{what}|{}|{frozen}|{views}|{}|{}|",
            model.config.backbone, args.seed, args.crop_scale
        ));
        h.update(&frozen_digest);
        h.update(serde_json::to_vec(pre).expect("preprocess serialises"));
        for smp in &set.samples {
            h.update(smp.path.to_string_lossy().as_bytes());
            if smp.turns != 0 {
                h.update([b'@', smp.turns]);
            }
            h.update(b"\n");
        }
        format!("{what}-{}", &hex::encode(h.finalize())[..24])
    };
    let cache_dir = args.cache_dir.as_deref();
    // Eval views of the held-out classes never change: cache their frozen activations.
    let eval = cached(
        cache_dir,
        &cache_key(eval_set, 1, "eval"),
        &model.device,
        || {
            Encoding {
                model,
                pre,
                count: eval_set.samples.len(),
                upto: frozen,
                batch: args.eval_batch_size,
                what: "cache eval",
            }
            .to_tensor(&|i| Ok(images.load(eval_set, i)?.map(|im| pre.eval_view(&im))))
        },
    )?;
    // Training views: view 0 = eval view, views 1.. = seeded augmentations.
    let n = train_set.samples.len();
    let train = cached(
        cache_dir,
        &cache_key(train_set, views, "train"),
        &model.device,
        || {
            Encoding {
                model,
                pre: train_pre,
                count: n * views,
                upto: frozen,
                batch: args.eval_batch_size,
                what: "cache train",
            }
            .to_tensor(&|j| {
                let (v, i) = (j / n, j % n);
                Ok(images.load(train_set, i)?.map(|im| {
                    if v == 0 {
                        augment.eval_view(&im)
                    } else {
                        augment.train_view(&im, 0, i, v as u32)
                    }
                }))
            })
        },
    )?;
    Ok(Caches {
        eval: Some(eval),
        train: Some(train),
        views,
    })
}

/// Everything a run's epochs need.
struct Run {
    args: TrainArgs,
    model: EmbeddingModel,
    opt: Adam,
    loss_fn: Box<dyn loss::MetricLoss>,
    frozen: usize,
    train_set: std::sync::Arc<Dataset>,
    eval_set: Dataset,
    augment: data::Augment,
    images: Images,
    caches: Caches,
    deadline: Option<crate::plan::Deadline>,
    /// The epochs this run set out to train (the plan's, with `--time-budget`), which the
    /// deadline guard may restore after cutting them.
    planned_epochs: usize,
    /// Wall seconds of the latest evaluation: what the deadline guard keeps for the last one.
    eval_seconds: Option<f64>,
    /// Recall@1 of the bare pretrained features on the eval split.
    baseline: Option<f64>,
}

impl Run {
    /// The eval split's embeddings (rows of unreadable images left out) and their labels.
    /// `pretrained` embeds the bare pooled features instead of the trained head's output.
    fn embed_eval(&self, pretrained: bool) -> Result<(Vec<f32>, Vec<u32>)> {
        let model = &self.model;
        // The folded inference network of this epoch's weights: ~10× faster than the training
        // graph, which would spend a fifth of a time budget on evaluations.
        let fused = crate::embed::fused_backbone(model)?;
        let embed = |x: &Tensor, start: usize| -> candle_core::Result<Tensor> {
            if let Some(net) = &fused {
                let pooled = net.pooled_features_from_stage(x, start)?;
                return if pretrained {
                    crate::embed::l2_normalize(&pooled)
                } else {
                    model.embed_pooled(&pooled)
                };
            }
            if pretrained {
                let n = model.backbone.num_stages();
                crate::embed::l2_normalize(&model.backbone.pool_with(
                    &model.backbone.forward_stages(x, start..n)?,
                    model.config.pooling,
                )?)
            } else {
                model.embed_from_stage(x, start)
            }
        };
        let step = self.args.eval_batch_size.max(1);
        let cached = match &self.caches.eval {
            Some((cache, ok)) => {
                let mut out = Vec::new();
                for start in (0..ok.len()).step_by(step) {
                    let chunk = cache.narrow(0, start, step.min(ok.len() - start))?;
                    out.extend(
                        embed(&chunk, self.frozen)?
                            .flatten_all()?
                            .to_vec1::<f32>()?,
                    );
                }
                Some((out, ok.clone()))
            }
            None => None,
        };
        let (emb, ok) = self.embed_eval_images(cached, &embed)?;
        let dim = emb.len() / ok.len().max(1);
        let mut e = Vec::with_capacity(emb.len());
        let mut l = Vec::with_capacity(ok.len());
        for ((row, o), smp) in emb.chunks(dim.max(1)).zip(&ok).zip(&self.eval_set.samples) {
            if *o {
                e.extend_from_slice(row);
                l.push(smp.label);
            }
        }
        Ok((e, l))
    }

    /// What the eval cache does not hold, embedded in one pass over the images: the model's
    /// own size when nothing is cached (`cached` is `None`), and each extra size of a
    /// multi-scale model ([`crate::preprocess::Preprocess::extra_sizes`]) from the same main
    /// views, resampled as the `Embedder` does; the vectors of all sizes are summed and
    /// normalised. One row per eval sample, and which samples could be read.
    fn embed_eval_images(
        &self,
        cached: Option<(Vec<f32>, Vec<bool>)>,
        embed: &dyn Fn(&Tensor, usize) -> candle_core::Result<Tensor>,
    ) -> Result<(Vec<f32>, Vec<bool>)> {
        let model = &self.model;
        let pre = &model.config.preprocess;
        let cached = match cached {
            Some(c) if pre.extra_sizes.is_empty() => return Ok(c),
            other => other,
        };
        let count = self.eval_set.samples.len();
        let mut out: Vec<f32> = Vec::new();
        let mut start = 0;
        let encoding = Encoding {
            model,
            pre,
            count,
            upto: 0,
            batch: self.args.eval_batch_size.max(1),
            what: "evaluate",
        };
        let read = encoding.run(
            &|i| {
                Ok(self
                    .images
                    .load(&self.eval_set, i)?
                    .map(|im| pre.eval_view(&im)))
            },
            &mut |x, views| {
                let b = views.len();
                let mut sum = match &cached {
                    None => embed(&x, 0)?,
                    Some((rows, _)) => {
                        let dim = rows.len() / count.max(1);
                        Tensor::from_slice(
                            &rows[start * dim..(start + b) * dim],
                            (b, dim),
                            &model.device,
                        )?
                    }
                };
                for &size in &pre.extra_sizes {
                    let extra: Vec<image::RgbImage> = views
                        .iter()
                        .map(|v| match v {
                            Some(v) => pre.extra_view(v, size),
                            None => image::RgbImage::new(size, size),
                        })
                        .collect();
                    let x = crate::embed::view_batch(pre, &extra, size, &model.device)?;
                    sum = (sum + embed(&x, 0)?)?;
                }
                if !pre.extra_sizes.is_empty() {
                    sum = crate::embed::l2_normalize(&sum)?;
                }
                out.extend(sum.flatten_all()?.to_vec1::<f32>()?);
                start += b;
                Ok(())
            },
        )?;
        let ok = match cached {
            Some((_, ok)) => ok.iter().zip(read).map(|(&c, r)| c && r).collect(),
            None => read,
        };
        Ok((out, ok))
    }

    /// Metrics of the eval split after `epoch` epochs (0 with `pretrained`: the bare features).
    fn evaluate(&mut self, pretrained: bool, epoch: usize) -> Result<metrics::RetrievalMetrics> {
        let t0 = Instant::now();
        let (emb, labels) = self.embed_eval(pretrained)?;
        if emb.iter().any(|v| !v.is_finite()) {
            return Err(if pretrained {
                Error::Invalid(
                    "the pretrained features are non-finite: check the weights file".into(),
                )
            } else {
                diverged(
                    "the embeddings became non-finite",
                    epoch.saturating_sub(1),
                    None,
                    &self.args.out,
                )
            });
        }
        let dim = emb.len() / labels.len().max(1);
        let ks = metrics::default_ks(self.args.dataset == DatasetKind::Sop);
        let m = metrics::evaluate(&emb, dim, &labels, ks, self.args.seed);
        self.eval_seconds = Some(t0.elapsed().as_secs_f64());
        m
    }

    /// Recall@1 of the pretrained features, measured once per run directory and kept in
    /// `metrics.jsonl` (epoch 0, `"model": "pretrained"`), so every later evaluation can say
    /// what training gained.
    fn pretrained_baseline(&mut self, resume: bool) -> Result<Option<f64>> {
        let path = self.args.out.join(METRICS_FILE);
        if resume {
            let lines = read_jsonl(&path);
            let (b, _) = crate::curves::points(&lines);
            return Ok(b);
        }
        let m = self.evaluate(true, 0)?;
        let r1 = m.recall.first().map(|&(_, r)| r);
        eprintln!("pretrained features on the eval split:\n{}", m.table());
        let mut line = serde_json::Map::new();
        line.insert("epoch".into(), 0.into());
        line.insert("model".into(), "pretrained".into());
        line.insert(
            "image_size".into(),
            self.model.config.preprocess.crop.into(),
        );
        line.extend(m.to_json());
        append_jsonl(&path, &serde_json::Value::Object(line))?;
        Ok(r1)
    }

    /// Trains epochs `start..args.epochs`, evaluating and checkpointing as asked. Returns the
    /// last metrics.
    fn epochs(
        &mut self,
        start: usize,
    ) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
        let labels: Vec<u32> = self.train_set.samples.iter().map(|s| s.label).collect();
        let sampler = data::PkSampler::new(
            &labels,
            self.args.batch_classes(),
            self.args.images_per_class,
            self.args.seed,
        )?;
        let per_epoch = per_epoch_hint(&self.args, labels.len());
        let mut batches = BatchQueue {
            sampler: &sampler,
            queue: std::collections::VecDeque::new(),
            epoch: (start * per_epoch) as u64,
        };
        let mut view_rng =
            ChaCha8Rng::seed_from_u64(self.args.seed ^ 0x5eed_u64.wrapping_mul(start as u64 + 1));
        // A resumed run gathers its centroids again: its first epoch samples classes at random.
        let group = self.args.hard_classes.unwrap_or(1);
        let mut centroids = (group > 1).then(|| data::ClassCentroids::new(sampler.class_labels()));
        let mut last_metrics = None;
        let mut epoch = start;
        // The deadline guard judges the mean pace of this run's epochs (evaluations and
        // checkpoints included), not one epoch's, so a single slow or fast one does not move it.
        let since = Instant::now();
        while epoch < self.args.epochs {
            let plan: Vec<Vec<usize>> = (0..per_epoch)
                .map(|_| batches.next(centroids.as_ref().map(|c| (c, group))))
                .collect();
            let (mean_loss, ips) =
                self.train_epoch(epoch, plan, &labels, &mut view_rng, centroids.as_mut())?;
            let done = epoch + 1;
            eprintln!(
                "epoch {done}/{}: loss {mean_loss:.4}, {ips:.1} img/s",
                self.args.epochs
            );
            self.keep_to_deadline(done, since.elapsed().as_secs_f64() / (done - start) as f64);
            let last = done == self.args.epochs;
            if (self.args.eval_every > 0 && done.is_multiple_of(self.args.eval_every)) || last {
                let m = self.evaluate(false, done)?;
                last_metrics = Some(self.record(done, mean_loss, ips, &m)?);
            }
            if (self.args.checkpoint_every > 0 && done.is_multiple_of(self.args.checkpoint_every))
                || last
            {
                self.checkpoint(done)?;
            }
            epoch = done;
        }
        Ok(last_metrics)
    }

    /// With `--time-budget`: if the epochs left would overrun the deadline at the speed just
    /// measured, train fewer; if the machine turned out faster than measured, train more
    /// (see [`crate::plan::deadline_epochs`]). The schedule follows the new total either way.
    fn keep_to_deadline(&mut self, done: usize, epoch_seconds: f64) {
        let Some(deadline) = self.deadline else {
            return;
        };
        // The last evaluation costs what the latest one did (0.15 of an epoch if none ran
        // yet: a resumed run that kept its baseline), plus a margin for the checkpoint.
        let reserve = self.eval_seconds.unwrap_or(0.15 * epoch_seconds) + 10.0;
        let fit = ((deadline.left() - reserve) / epoch_seconds)
            .floor()
            .max(0.0) as usize;
        let remaining = self.args.epochs - done;
        let epochs = match crate::plan::deadline_epochs(done, remaining, fit, self.planned_epochs) {
            Some(e) if e != self.args.epochs => e,
            _ => return,
        };
        let why = if epochs < self.args.epochs {
            "behind"
        } else {
            "ahead of"
        };
        eprintln!(
            "time budget: {} s left, {epoch_seconds:.0} s per epoch ({why} the plan): training {epochs} epochs instead of {}",
            deadline.left().round(),
            self.args.epochs
        );
        self.args.epochs = epochs;
    }

    /// One epoch over the batches `plan`; returns (mean loss, images per second).
    fn train_epoch(
        &mut self,
        epoch: usize,
        plan: Vec<Vec<usize>>,
        labels: &[u32],
        view_rng: &mut ChaCha8Rng,
        mut centroids: Option<&mut data::ClassCentroids>,
    ) -> Result<(f64, f64)> {
        let per_epoch = plan.len();
        let accumulate = self.args.accumulate.max(1);
        let total_steps = (per_epoch * self.args.epochs).div_ceil(accumulate);
        let warmup =
            (self.args.warmup_epochs * per_epoch as f64 / accumulate as f64).round() as usize;
        let pb = bar(per_epoch as u64, &format!("epoch {}", epoch + 1));
        let t0 = Instant::now();
        let (mut loss_sum, mut seen) = (0.0f64, 0usize);
        // Without a cache, images are decoded and augmented in the background (parallel, with
        // prefetch) while the model trains on the previous batch.
        let mut loader = match self.caches.train {
            Some(_) => None,
            None => Some(data::BatchLoader::train_batches(
                self.train_set.clone(),
                plan.clone(),
                epoch as u64 + 1,
                self.augment.clone(),
                data::LoaderOptions {
                    skip_bad_images: self.args.skip_bad_images,
                    ..Default::default()
                },
            )?),
        };
        let mut pending: Option<candle_core::backprop::GradStore> = None;
        let mut micro = 0usize;
        for (step, batch) in plan.into_iter().enumerate() {
            let mut blabels: Vec<u32> = batch.iter().map(|&i| labels[i]).collect();
            let bn_guard = (self.args.bn == BnMode::Train)
                .then(crate::backbone::layers::BatchNormTraining::start);
            let emb = match &self.caches.train {
                Some((cache, ok)) => {
                    let n = labels.len();
                    let views = self.caches.views;
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
                    let idx = Tensor::from_vec(idx, batch.len(), &self.model.device)?;
                    self.model
                        .embed_from_stage(&cache.index_select(&idx, 0)?, self.frozen)?
                }
                None => {
                    let b = loader
                        .as_mut()
                        .and_then(|l| l.next())
                        .ok_or_else(|| Error::Invalid("the batch loader stopped early".into()))??;
                    blabels = b.labels;
                    let x = Tensor::from_vec(b.images, b.shape, &self.model.device)?;
                    self.model.forward(&x)?
                }
            };
            if let Some(g) = bn_guard {
                let stats = g.finish();
                crate::backbone::layers::update_running_stats(&self.model.varmap, &stats, 0.1)?;
            }
            if let Some(c) = centroids.as_deref_mut() {
                let rows = emb.detach().to_dtype(candle_core::DType::F32)?;
                c.update(&rows.flatten_all()?.to_vec1::<f32>()?, &blabels);
            }
            let out_loss = self.loss_fn.forward(&emb, &blabels)?;
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
                    &self.args.out,
                ));
            }
            let grads = out_loss.loss.backward()?;
            pending = Some(match pending.take() {
                None => grads,
                Some(acc) => add_grads(acc, &grads, &self.opt)?,
            });
            micro += 1;
            if micro == accumulate || step + 1 == per_epoch {
                let mut g = pending.take().expect("gradients pending");
                if micro > 1 {
                    g = scale_grads(g, 1.0 / micro as f64, &self.opt)?;
                }
                let factor = optim::lr_factor(
                    self.args.schedule,
                    self.opt.steps_taken(),
                    total_steps,
                    warmup,
                );
                self.opt.step(&g, factor)?;
                micro = 0;
            }
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
        Ok((
            loss_sum / per_epoch as f64,
            seen as f64 / t0.elapsed().as_secs_f64(),
        ))
    }

    /// Prints the metrics beside the pretrained baseline, appends them to `metrics.jsonl`
    /// and redraws `curves.svg`.
    fn record(
        &mut self,
        epoch: usize,
        loss: f64,
        ips: f64,
        m: &metrics::RetrievalMetrics,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        eprintln!("{}", m.table());
        let r1 = m.recall.first().map(|&(_, r)| r);
        if let Some(line) = versus_baseline(r1, self.baseline) {
            eprintln!("{line}");
        }
        let mut line = serde_json::Map::new();
        line.insert("epoch".into(), epoch.into());
        line.insert("loss".into(), loss.into());
        line.extend(m.to_json());
        line.insert("train_images_per_sec".into(), ips.into());
        if let Some(b) = self.baseline {
            line.insert("pretrained_recall@1".into(), b.into());
        }
        let path = self.args.out.join(METRICS_FILE);
        append_jsonl(&path, &serde_json::Value::Object(line.clone()))?;
        self.model.config.metrics = serde_json::Value::Object(line.clone());
        let (baseline, points) = crate::curves::points(&read_jsonl(&path));
        let title = format!(
            "{} — {} loss, {}",
            self.args.out.display(),
            self.args.loss,
            self.args.data.display()
        );
        crate::curves::write(&self.args.out.join(CURVES_FILE), &title, baseline, &points)?;
        Ok(line)
    }

    /// Model, optimiser state, loss parameters, then the progress record (last, so a
    /// crash in between resumes from the previous complete checkpoint).
    fn checkpoint(&mut self, done: usize) -> Result<()> {
        let out = &self.args.out;
        self.model.config.epoch = done;
        self.model.save(out)?;
        let opt_path = out.join(OPTIMIZER_FILE);
        let tmp = crate::checkpoint::tmp_sibling(&opt_path);
        self.opt.save(&tmp)?;
        std::fs::rename(&tmp, &opt_path).map_err(|e| Error::file(&opt_path, e))?;
        let params = self.loss_fn.parameters();
        if !params.is_empty() {
            let path = out.join(LOSS_FILE);
            let tmp = crate::checkpoint::tmp_sibling(&path);
            let tensors: std::collections::HashMap<String, Tensor> = params
                .iter()
                .map(|(n, v)| Ok((n.clone(), loss::proxies_f32(v)?)))
                .collect::<candle_core::Result<_>>()?;
            candle_core::safetensors::save(&tensors, &tmp).map_err(|e| Error::file(&tmp, e))?;
            std::fs::rename(&tmp, &path).map_err(|e| Error::file(&path, e))?;
        }
        let st = TrainState {
            epochs_done: done,
            optimizer_steps: self.opt.steps_taken(),
            args: self.args.clone(),
        };
        crate::checkpoint::write_atomic(
            &out.join(STATE_FILE),
            serde_json::to_string_pretty(&st)
                .expect("state serialises")
                .as_bytes(),
        )
    }
}

/// The run's learning curves, redrawn at every evaluation.
pub const CURVES_FILE: &str = "curves.svg";

/// "R@1 92.3 % — pretrained 56.9 % (+35.4 points)".
pub fn versus_baseline(r1: Option<f64>, baseline: Option<f64>) -> Option<String> {
    let (r, b) = (r1?, baseline?);
    Some(format!(
        "R@1 {:.1} % — pretrained {:.1} % ({:+.1} points)",
        100.0 * r,
        100.0 * b,
        100.0 * (r - b)
    ))
}

/// The JSON lines of a `metrics.jsonl` (unparsable lines skipped; a missing file is empty).
pub fn read_jsonl(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `acc + new` for every trainable variable (gradient accumulation).
fn add_grads(
    mut acc: candle_core::backprop::GradStore,
    new: &candle_core::backprop::GradStore,
    opt: &Adam,
) -> Result<candle_core::backprop::GradStore> {
    for g in opt.groups() {
        for (_, var) in &g.vars {
            let t = var.as_tensor();
            let sum = match (acc.get(t), new.get(t)) {
                (Some(a), Some(b)) => (a + b)?,
                (None, Some(b)) => b.clone(),
                _ => continue,
            };
            acc.insert(t, sum);
        }
    }
    Ok(acc)
}

/// Every trainable variable's gradient times `factor` (the mean over accumulated batches).
fn scale_grads(
    mut g: candle_core::backprop::GradStore,
    factor: f64,
    opt: &Adam,
) -> Result<candle_core::backprop::GradStore> {
    for grp in opt.groups() {
        for (_, var) in &grp.vars {
            let t = var.as_tensor();
            if let Some(x) = g.get(t) {
                let scaled = (x * factor)?;
                g.insert(t, scaled);
            }
        }
    }
    Ok(g)
}

/// Batches per epoch: `--batches-per-epoch`, else one pass over the training images.
fn per_epoch_hint(args: &TrainArgs, images: usize) -> usize {
    args.batches_per_epoch
        .unwrap_or_else(|| (images / (args.batch_classes() * args.images_per_class)).max(1))
}

/// An endless stream of P×K batches drawn from the sampler's (class-pass) epochs.
struct BatchQueue<'a> {
    sampler: &'a data::PkSampler,
    queue: std::collections::VecDeque<Vec<usize>>,
    epoch: u64,
}

impl BatchQueue<'_> {
    /// The next batch; a new class pass is grouped by `near` when given (`--hard-classes`).
    fn next(&mut self, near: Option<(&data::ClassCentroids, usize)>) -> Vec<usize> {
        while self.queue.is_empty() {
            self.queue
                .extend(self.sampler.epoch_grouped(self.epoch, near));
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

/// candle's RNG of `device` (used by the head initialiser) is global; seed it for
/// reproducible runs.
fn seed_candle(seed: u64, device: &Device) {
    let _ = device.set_seed(seed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preprocess::Preprocess;

    #[test]
    fn inference_size_follows_the_crops_magnification_within_bounds() {
        let lite = |size| {
            let mut p = Preprocess::efficientnet_lite();
            set_image_size(&mut p, size);
            p
        };
        // 128 × 1.5 = 192; 64 → 96.
        assert_eq!(inference_size(&lite(128), 0.16, 224), 192);
        assert_eq!(inference_size(&lite(64), 0.16, 224), 96);
        // Never above the backbone's own size, never below the training size.
        assert_eq!(inference_size(&lite(224), 0.16, 224), 224);
        assert_eq!(inference_size(&lite(320), 0.16, 224), 320);
        // Whole-image crops magnify nothing.
        assert_eq!(inference_size(&lite(128), 1.0, 224), 128);
        // A center-cropping backbone (resize 256, crop 224) already enlarges its eval view.
        let mut resnet = Preprocess::imagenet(256, 224);
        set_image_size(&mut resnet, 112);
        assert_eq!(inference_size(&resnet, 0.16, 224), 160);
    }

    /// `trainer --dataset folder --data d --out o EXTRA…` as the training flags parse it.
    fn parse_train_args(extra: &[&str]) -> TrainArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: TrainArgs,
        }
        let mut v = vec![
            "trainer",
            "--dataset",
            "folder",
            "--data",
            "d",
            "--out",
            "o",
        ];
        v.extend(extra);
        <Cli as clap::Parser>::try_parse_from(v).unwrap().args
    }

    #[test]
    fn batches_follow_the_flags_then_the_loss_then_the_data() {
        let parse = parse_train_args;
        let resolved = |extra: &[&str], classes| {
            let mut a = parse(extra);
            check_batch(&a).and_then(|()| resolve_batch(&mut a, classes))?;
            Ok::<_, Error>((a.batch_classes(), a.hard_classes.unwrap()))
        };
        // The loss's defaults, lowered to the classes there are.
        assert_eq!(resolved(&[], 500).unwrap(), (16, 1));
        assert_eq!(resolved(&["--loss", "fuzzy"], 500).unwrap(), (32, 8));
        assert_eq!(resolved(&["--loss", "fuzzy"], 20).unwrap(), (20, 8));
        assert_eq!(resolved(&["--loss", "fuzzy"], 5).unwrap(), (5, 5));
        assert_eq!(resolved(&[], 3).unwrap(), (3, 1));
        // Flags win, and a P the data cannot fill is an error, not a smaller batch.
        let given = ["--loss", "fuzzy", "--classes-per-batch", "16"];
        assert_eq!(resolved(&given, 500).unwrap(), (16, 8));
        let err = resolved(&["--classes-per-batch", "40"], 30).unwrap_err();
        assert!(
            err.to_string()
                .contains("fewer than --classes-per-batch 40"),
            "{err}"
        );
        let err = resolved(&[], 1).unwrap_err();
        assert!(err.to_string().contains("1 class(es)"), "{err}");
        // Out of range before any data is read: against P given or P's default.
        for bad in [
            &["--classes-per-batch", "1"][..],
            &["--images-per-class", "1"],
            &["--hard-classes", "0"],
            &["--hard-classes", "17"],
            &["--classes-per-batch", "4", "--hard-classes", "5"],
        ] {
            assert!(check_batch(&parse(bad)).is_err(), "{bad:?}");
        }
        assert!(check_batch(&parse(&["--loss", "fuzzy", "--hard-classes", "17"])).is_ok());
        // The data lowers P below the groups asked for: refused once it is known.
        let err = resolved(&["--hard-classes", "8"], 6).unwrap_err();
        assert!(err.to_string().contains("--hard-classes 8"), "{err}");
    }

    #[test]
    fn views_follow_the_flags_then_the_preset_then_the_data() {
        let parse = parse_train_args;
        // A folder of glyphs (black strokes on white) and one of colour pictures.
        let dir = tempfile::tempdir().unwrap();
        for (set, class) in [
            ("glyphs", "a"),
            ("glyphs", "b"),
            ("photos", "a"),
            ("photos", "b"),
        ] {
            let d = dir.path().join(set).join(class);
            std::fs::create_dir_all(&d).unwrap();
            for i in 0..3u32 {
                let img = if set == "glyphs" {
                    image::RgbImage::from_fn(64, 64, |x, y| {
                        let on = x.abs_diff(y + i) < 3 && x > 10;
                        image::Rgb(if on { [0, 0, 0] } else { [255, 255, 255] })
                    })
                } else {
                    crate::data::test_util::gradient(64, 48)
                };
                img.save(d.join(format!("{i}.png"))).unwrap();
            }
        }
        let load = |set: &str| {
            data::load_dataset(DatasetKind::Folder, &dir.path().join(set), &SplitSpec::ALL).unwrap()
        };
        let (glyphs, photos) = (load("glyphs"), load("photos"));

        let mut a = parse(&[]);
        assert_eq!(
            (a.views, a.flip, a.turned_classes),
            (ViewPreset::Auto, None, None)
        );
        resolve_views(&mut a, &glyphs, false);
        assert_eq!(a.views, ViewPreset::Glyphs);
        assert_eq!(
            (a.flip, a.rotate, a.turned_classes),
            (Some(0.0), Some(15.0), Some(true))
        );

        let mut a = parse(&[]);
        resolve_views(&mut a, &photos, false);
        assert_eq!(a.views, ViewPreset::Photos);
        assert_eq!(
            (a.flip, a.rotate, a.turned_classes),
            (Some(0.5), Some(0.0), Some(false))
        );

        // Flags win over the preset, one by one; `--turned-classes` alone means true.
        let mut a = parse(&[
            "--views",
            "glyphs",
            "--flip",
            "0.3",
            "--turned-classes",
            "false",
        ]);
        resolve_views(&mut a, &photos, false);
        assert_eq!(
            (a.flip, a.rotate, a.turned_classes),
            (Some(0.3), Some(15.0), Some(false))
        );
        let mut a = parse(&["--turned-classes", "--rotate", "5"]);
        resolve_views(&mut a, &glyphs, false);
        assert_eq!(
            (a.flip, a.rotate, a.turned_classes),
            (Some(0.0), Some(5.0), Some(true))
        );

        // A run saved before `--views` existed resumes with the photo views it had.
        let mut a = parse(&[]);
        resolve_views(&mut a, &glyphs, true);
        assert_eq!(
            (a.flip, a.rotate, a.turned_classes),
            (Some(0.5), Some(0.0), Some(false))
        );
    }

    #[test]
    fn extra_sizes_default_to_halfway_for_small_images_and_resolve_once() {
        assert_eq!(default_extra_sizes(128, 192), vec![160]);
        assert_eq!(default_extra_sizes(96, 160), vec![128]);
        assert_eq!(default_extra_sizes(128, 224), vec![192]);
        // Photos at the backbone's size, or sizes under 64 px apart: one size.
        assert!(default_extra_sizes(224, 224).is_empty());
        assert!(default_extra_sizes(64, 96).is_empty());

        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: TrainArgs,
        }
        let parse = |extra: &[&str]| {
            let mut v = vec!["trainer", "--data", "d", "--out", "o"];
            v.extend(extra);
            <Cli as clap::Parser>::try_parse_from(v).map(|c| c.args)
        };
        let mut a = parse(&[]).unwrap();
        assert_eq!(resolve_extra_sizes(&mut a, 128, 192), vec![160]);
        assert_eq!(resolve_extra_sizes(&mut a, 128, 192), vec![160]);
        // `0`: one size, and it stays one size when resolved again.
        let mut a = parse(&["--extra-sizes", "0"]).unwrap();
        assert!(resolve_extra_sizes(&mut a, 128, 192).is_empty());
        assert!(resolve_extra_sizes(&mut a, 128, 192).is_empty());
        // No default: recorded as one size.
        let mut a = parse(&[]).unwrap();
        assert!(resolve_extra_sizes(&mut a, 224, 224).is_empty());
        assert_eq!(a.extra_sizes, vec![0]);
        let mut a = parse(&["--extra-sizes", "144,176"]).unwrap();
        assert_eq!(resolve_extra_sizes(&mut a, 128, 192), vec![144, 176]);
        assert!(parse(&["--extra-sizes", "16"]).is_err());
        assert!(parse(&["--extra-sizes", "big"]).is_err());
    }
}
