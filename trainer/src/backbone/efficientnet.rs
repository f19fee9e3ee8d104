//! EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variants of the TF reference for mobile):
//! no squeeze-excitation, ReLU6 everywhere, stem (32) and head (1280) widths fixed, batch-norm
//! ε = 1e-3, and TensorFlow "SAME" padding — asymmetric (bottom/right) at stride 2. The
//! ImageNet checkpoint was converted from TensorFlow, so matching TF's padding is what makes
//! its features exact (checked against reference outputs in `tests/reference.rs`).
//!
//! Variable names (the canonical names, see [`crate::weights`] for the published layouts
//! mapped onto them):
//! `stem.{conv,bn}`, `blocks.S.B.{expand,dw,project}.{conv,bn}` (S = stage 0–6, B = block in
//! stage; the first stage has no `expand`), `head.{conv,bn}`; each `conv` has `.weight`, each
//! `bn` has `.weight/.bias/.running_mean/.running_var`.
//!
//! Stages of the [`Backbone`] trait: 0 = stem, 1–7 = the seven block groups of the
//! architecture (one resolution/width each), 8 = head conv. Block groups rather than single
//! blocks because they are the natural freezing points (and keep cached activations few).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::bias_act::Activation::Relu6;
use super::layers::{ConvBn, ConvSpec, Padding};
use super::{Backbone, BackboneKind};
use crate::ops::fused::{global_avg_pool, global_max_pool, Act, Activation, BnParams, FusedConv};
use crate::ops::MemoryFormat;
use crate::ops::Threads;
use rayon::prelude::*;

/// Batch-norm ε of the TF reference (PyTorch's default 1e-5 is measurably off).
pub const BN_EPS: f64 = 1e-3;
/// Stem width (fixed in the Lite variants).
pub const STEM_CHANNELS: usize = 32;
/// Head width = pooled feature size (fixed in the Lite variants).
pub const FEATURE_DIM: usize = 1280;

/// One group of MBConv blocks with the same output width.
#[derive(Debug, Clone, Copy)]
pub struct StageConfig {
    pub repeats: usize,
    pub kernel: usize,
    /// Stride of the group's first block (the others have stride 1).
    pub stride: usize,
    pub expand_ratio: usize,
    pub out_channels: usize,
}

/// EfficientNet-Lite0 = B0's block table (width and depth multipliers 1.0).
pub const LITE0_STAGES: [StageConfig; 7] = [
    StageConfig {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand_ratio: 1,
        out_channels: 16,
    },
    StageConfig {
        repeats: 2,
        kernel: 3,
        stride: 2,
        expand_ratio: 6,
        out_channels: 24,
    },
    StageConfig {
        repeats: 2,
        kernel: 5,
        stride: 2,
        expand_ratio: 6,
        out_channels: 40,
    },
    StageConfig {
        repeats: 3,
        kernel: 3,
        stride: 2,
        expand_ratio: 6,
        out_channels: 80,
    },
    StageConfig {
        repeats: 3,
        kernel: 5,
        stride: 1,
        expand_ratio: 6,
        out_channels: 112,
    },
    StageConfig {
        repeats: 4,
        kernel: 5,
        stride: 2,
        expand_ratio: 6,
        out_channels: 192,
    },
    StageConfig {
        repeats: 1,
        kernel: 3,
        stride: 1,
        expand_ratio: 6,
        out_channels: 320,
    },
];

fn conv_bn(spec: ConvSpec, vb: &VarBuilder) -> Result<ConvBn> {
    ConvBn::new(spec, BN_EPS, vb.pp("conv"), vb.pp("bn"))
}

/// Mobile inverted bottleneck: [1×1 expand + ReLU6] → k×k depthwise + ReLU6 → 1×1 project,
/// plus the identity when shapes allow (no drop-connect: the project freezes BN and trains
/// with small learning rates, where stochastic depth buys nothing).
#[derive(Debug, Clone)]
pub struct MbConv {
    expand: Option<ConvBn>,
    depthwise: ConvBn,
    project: ConvBn,
    residual: bool,
}

impl MbConv {
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        kernel: usize,
        stride: usize,
        expand_ratio: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let mid = in_ch * expand_ratio;
        let expand = if expand_ratio != 1 {
            Some(conv_bn(
                ConvSpec::dense(in_ch, mid, 1, 1, Padding::Same),
                &vb.pp("expand"),
            )?)
        } else {
            None
        };
        let depthwise = conv_bn(
            ConvSpec::depthwise(mid, kernel, stride, Padding::Same),
            &vb.pp("dw"),
        )?;
        let project = conv_bn(
            ConvSpec::dense(mid, out_ch, 1, 1, Padding::Same),
            &vb.pp("project"),
        )?;
        Ok(Self {
            expand,
            depthwise,
            project,
            residual: stride == 1 && in_ch == out_ch,
        })
    }
}

impl Module for MbConv {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match &self.expand {
            Some(e) => e.forward_act(x, Relu6)?,
            None => x.clone(),
        };
        h = self.depthwise.forward_act(&h, Relu6)?;
        h = self.project.forward(&h)?;
        if self.residual {
            h + x
        } else {
            Ok(h)
        }
    }
}

/// EfficientNet-Lite0 feature extractor: `[B, 3, H, W]` → `[B, 1280, H/32, W/32]`.
#[derive(Debug, Clone)]
pub struct EfficientNetLite {
    stem: ConvBn,
    stages: Vec<Vec<MbConv>>,
    head: ConvBn,
}

impl EfficientNetLite {
    pub fn lite0(vb: VarBuilder) -> Result<Self> {
        Self::new(&LITE0_STAGES, vb)
    }

    pub fn new(config: &[StageConfig], vb: VarBuilder) -> Result<Self> {
        let stem = conv_bn(
            ConvSpec::dense(3, STEM_CHANNELS, 3, 2, Padding::Same),
            &vb.pp("stem"),
        )?;
        let mut in_ch = STEM_CHANNELS;
        let mut stages = Vec::with_capacity(config.len());
        for (s, cfg) in config.iter().enumerate() {
            let mut blocks = Vec::with_capacity(cfg.repeats);
            for b in 0..cfg.repeats {
                let stride = if b == 0 { cfg.stride } else { 1 };
                let vb_b = vb.pp(format!("blocks.{s}.{b}"));
                blocks.push(MbConv::new(
                    in_ch,
                    cfg.out_channels,
                    cfg.kernel,
                    stride,
                    cfg.expand_ratio,
                    vb_b,
                )?);
                in_ch = cfg.out_channels;
            }
            stages.push(blocks);
        }
        let head = conv_bn(
            ConvSpec::dense(in_ch, FEATURE_DIM, 1, 1, Padding::Same),
            &vb.pp("head"),
        )?;
        Ok(Self { stem, stages, head })
    }

    fn run_stage(&self, index: usize, x: &Tensor) -> Result<Tensor> {
        let last = self.stages.len() + 1;
        match index {
            0 => self.stem.forward_act(x, Relu6),
            i if i == last => self.head.forward_act(x, Relu6),
            i => self.stages[i - 1]
                .iter()
                .try_fold(x.clone(), |h, block| block.forward(&h)),
        }
    }
}

impl Backbone for EfficientNetLite {
    fn kind(&self) -> BackboneKind {
        BackboneKind::EfficientnetLite0
    }

    fn num_stages(&self) -> usize {
        self.stages.len() + 2
    }

    fn stage_names(&self) -> Vec<String> {
        let mut names = vec!["stem".to_string()];
        names.extend((1..=self.stages.len()).map(|i| format!("blocks{i}")));
        names.push("head".to_string());
        names
    }

    fn forward_stages(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        if range.end > self.num_stages() {
            candle_core::bail!(
                "stage range {range:?} is past the {} stages of efficientnet-lite0",
                self.num_stages()
            )
        }
        range
            .into_iter()
            .try_fold(x.clone(), |h, i| self.run_stage(i, &h))
    }

    fn feature_dim(&self) -> usize {
        FEATURE_DIM
    }

    fn param_stage(&self, name: &str) -> Option<usize> {
        param_stage(name, self.stages.len())
    }
}

/// How [`FusedEfficientNetLite`] spreads a batch over the threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Each thread takes whole images through the whole network, one after the other: an
    /// image's activations (a few MB) stay in cache from layer to layer and the threads never
    /// wait for each other. Layer by layer, a batch of 32 round-trips every activation (up
    /// to 150 MB) through memory and meets at a barrier after each of the ~65 layers
    /// (batch-32 embedding on 2 cores: 105 → 145 img/s, peak RSS 357 → 95 MB).
    DepthFirst,
    /// Every layer split over the threads: what a lone image needs.
    LayerByLayer,
}

impl Schedule {
    /// Depth first when the images split evenly over the threads, or are many.
    pub fn for_batch(batch: usize, threads: usize) -> Self {
        if threads > 1 && (batch.is_multiple_of(threads) || batch >= 4 * threads) {
            Self::DepthFirst
        } else {
            Self::LayerByLayer
        }
    }
}

/// `(expand, depthwise, project, residual)` of one fused inverted-residual block.
type Block = (Option<FusedConv>, FusedConv, FusedConv, bool);

/// Activations of at most this many pixels (14 × 14 at 224 × 224 input) run in groups of
/// images in [`Schedule::DepthFirst`]: from there on a layer's weights outweigh one image's
/// activations.
const GROUPED_PIXELS: usize = 14 * 14;

/// Images a thread takes through the late layers together in [`Schedule::DepthFirst`]: up
/// to four, in groups that still split the batch evenly over the threads where they can.
fn depth_first_group(batch: usize, threads: usize) -> usize {
    let per_thread = batch.div_ceil(threads.max(1));
    (1..=4)
        .rev()
        .find(|&g| per_thread.is_multiple_of(g))
        .unwrap_or(1)
}

/// Inference-only EfficientNet-Lite0: every conv + frozen BN folded once, ReLU6 and the
/// residual add fused into the conv output pass (see [`crate::ops::fused`]). Built from the
/// same variables as [`EfficientNetLite`], so its features are the training network's; the
/// [`crate::embed::Embedder`] uses it because it needs no backprop graph (the training
/// network's output keeps every intermediate activation alive) and makes fewer passes.
#[derive(Debug, Clone)]
pub struct FusedEfficientNetLite {
    stem: FusedConv,
    /// Every block, all groups in order.
    blocks: Vec<Block>,
    /// Index in `blocks` of each group's first block, so a run can start at a stage boundary.
    group_starts: Vec<usize>,
    head: FusedConv,
    pooling: crate::backbone::Pooling,
}

impl FusedEfficientNetLite {
    /// Folds the variables named as in [`EfficientNetLite`] (`get` returns the tensor of a
    /// canonical name, e.g. `stem.conv.weight`, or an error naming what is missing).
    pub fn from_vars(config: &[StageConfig], get: impl Fn(&str) -> Result<Tensor>) -> Result<Self> {
        let conv = |name: &str, stride: usize, depthwise: bool, act: Act| -> Result<FusedConv> {
            let bn = |p: &str| get(&format!("{name}.bn.{p}"));
            let (gamma, beta, mean, var) = (
                bn("weight")?,
                bn("bias")?,
                bn("running_mean")?,
                bn("running_var")?,
            );
            let params = BnParams {
                gamma: &gamma,
                beta: &beta,
                mean: &mean,
                var: &var,
                eps: BN_EPS,
            };
            FusedConv::new(
                &get(&format!("{name}.conv.weight"))?,
                params,
                stride,
                depthwise,
                act,
            )
        };
        let stem = conv("stem", 2, false, Act::Relu6)?;
        let mut in_ch = STEM_CHANNELS;
        let mut blocks = Vec::new();
        let mut group_starts = Vec::with_capacity(config.len());
        for (s, cfg) in config.iter().enumerate() {
            group_starts.push(blocks.len());
            for b in 0..cfg.repeats {
                let stride = if b == 0 { cfg.stride } else { 1 };
                let p = format!("blocks.{s}.{b}");
                let expand = if cfg.expand_ratio != 1 {
                    Some(conv(&format!("{p}.expand"), 1, false, Act::Relu6)?)
                } else {
                    None
                };
                let dw = conv(&format!("{p}.dw"), stride, true, Act::Relu6)?;
                let project = conv(&format!("{p}.project"), 1, false, Act::None)?;
                blocks.push((
                    expand,
                    dw,
                    project,
                    stride == 1 && in_ch == cfg.out_channels,
                ));
                in_ch = cfg.out_channels;
            }
        }
        let head = conv("head", 1, false, Act::Relu6)?;
        Ok(Self {
            stem,
            blocks,
            group_starts,
            head,
            pooling: crate::backbone::Pooling::Avg,
        })
    }

    /// The same network pooling its last feature map as `pooling` (default: average).
    pub fn with_pooling(mut self, pooling: crate::backbone::Pooling) -> Self {
        self.pooling = pooling;
        self
    }

    /// Pooled features `[B, 1280]` from the training network's activation entering stage
    /// `stage` (numbered as [`EfficientNetLite`]'s: 0 = stem, so `x` is then the image batch;
    /// the last = head). The trainer evaluates cached frozen-stage activations this way.
    pub fn pooled_features_from_stage(&self, x: &Tensor, stage: usize) -> Result<Tensor> {
        if stage == 0 {
            return self.pooled_features(x);
        }
        let first_block = match stage - 1 {
            g if g < self.group_starts.len() => self.group_starts[g],
            g if g == self.group_starts.len() => self.blocks.len(),
            _ => candle_core::bail!("stage {stage} is past the stages of efficientnet-lite0"),
        };
        let b = x.dim(0)?;
        let pooled = rayon::scope(|_| {
            let h = Activation::from_tensor(x)?.to_format(MemoryFormat::Nhwc);
            let h = self.run_blocks(h, first_block..self.blocks.len(), Threads::Pool)?;
            self.head_and_pool(&h, Threads::Pool)
        })?;
        Tensor::from_vec(
            pooled,
            (b, self.head.out_channels()),
            &candle_core::Device::Cpu,
        )
    }

    /// Pooled features `[B, 1280]` of a normalised image batch `[B, 3, H, W]` (f32, CPU), in
    /// the [`Schedule`] that suits the batch.
    pub fn pooled_features(&self, x: &Tensor) -> Result<Tensor> {
        let schedule = Schedule::for_batch(x.dim(0)?, rayon::current_num_threads());
        self.pooled_features_in(x, schedule)
    }

    /// [`FusedEfficientNetLite::pooled_features`] in a given schedule (same results).
    pub fn pooled_features_in(&self, x: &Tensor, schedule: Schedule) -> Result<Tensor> {
        // Run on a pool thread: every layer's parallel region then starts from inside the pool
        // instead of handing its work over from outside and sleeping until it is done, which
        // cost two thread switches per layer (~65 per image).
        rayon::scope(|_| self.pooled_features_on_pool(x, schedule))
    }

    fn pooled_features_on_pool(&self, x: &Tensor, schedule: Schedule) -> Result<Tensor> {
        let b = x.dim(0)?;
        let pooled = match schedule {
            Schedule::DepthFirst => {
                let g = depth_first_group(b, rayon::current_num_threads());
                let per_group: Vec<Vec<f32>> = (0..b.div_ceil(g))
                    .into_par_iter()
                    .map(|k| self.pooled_group(x, k * g..b.min(k * g + g)))
                    .collect::<Result<_>>()?;
                per_group.concat()
            }
            Schedule::LayerByLayer => self.pooled(Activation::from_tensor(x)?, Threads::Pool)?,
        };
        Tensor::from_vec(
            pooled,
            (b, self.head.out_channels()),
            &candle_core::Device::Cpu,
        )
    }

    /// Pooled features of `x`, row-major `[B, 1280]`, every layer run on `threads`.
    ///
    /// Activations after the stem are channels-last: the depthwise convs vectorise over
    /// channels there, and the 1×1 convs just take their gemm operands transposed.
    fn pooled(&self, x: Activation, threads: Threads) -> Result<Vec<f32>> {
        let h = self.stem(&x, threads)?;
        drop(x);
        let h = self.run_blocks(h, 0..self.blocks.len(), threads)?;
        self.head_and_pool(&h, threads)
    }

    /// [`FusedEfficientNetLite::pooled`] of images `range` of `x` on the calling thread: each
    /// image alone through the high-resolution blocks, whose activations are large, then the
    /// group together through the rest, where each 1×1 conv then reads its weights (larger
    /// than those layers' activations) once for the group instead of once per image.
    fn pooled_group(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let (_, _, h, w) = x.dims4()?;
        let split = self.first_grouped_block(h, w);
        let early = range
            .map(|i| {
                let image = Activation::from_tensor(&x.narrow(0, i, 1)?)?;
                let h = self.stem(&image, Threads::Caller)?;
                self.run_blocks(h, 0..split, Threads::Caller)
            })
            .collect::<Result<Vec<_>>>()?;
        let rest = split..self.blocks.len();
        let h = self.run_blocks(Activation::concat(early)?, rest, Threads::Caller)?;
        self.head_and_pool(&h, Threads::Caller)
    }

    /// The first block whose input, for an `h × w` image, has at most [`GROUPED_PIXELS`]
    /// pixels (only the stem and the depthwise convs change the size).
    fn first_grouped_block(&self, h: usize, w: usize) -> usize {
        let (mut h, mut w) = self.stem.out_size(h, w);
        for (k, (_, dw, _, _)) in self.blocks.iter().enumerate() {
            if h * w <= GROUPED_PIXELS {
                return k;
            }
            (h, w) = dw.out_size(h, w);
        }
        self.blocks.len()
    }

    fn stem(&self, x: &Activation, threads: Threads) -> Result<Activation> {
        self.stem.forward_to(x, None, MemoryFormat::Nhwc, threads)
    }

    fn run_blocks(
        &self,
        mut h: Activation,
        range: std::ops::Range<usize>,
        threads: Threads,
    ) -> Result<Activation> {
        for block in &self.blocks[range] {
            h = self.block(block, h, threads)?;
        }
        Ok(h)
    }

    /// One inverted-residual block, channels-last in and out.
    fn block(&self, block: &Block, h: Activation, threads: Threads) -> Result<Activation> {
        let nhwc = MemoryFormat::Nhwc;
        let (expand, dw, project, residual) = block;
        let e = match expand {
            Some(e) => Some(e.forward_to(&h, None, nhwc, threads)?),
            None => None,
        };
        let d = dw.forward_to(e.as_ref().unwrap_or(&h), None, nhwc, threads)?;
        drop(e);
        project.forward_to(&d, residual.then_some(&h), nhwc, threads)
    }

    fn head_and_pool(&self, h: &Activation, threads: Threads) -> Result<Vec<f32>> {
        let f = self.head.forward_to(h, None, MemoryFormat::Nhwc, threads)?;
        Ok(match self.pooling {
            crate::backbone::Pooling::Avg => global_avg_pool(&f),
            crate::backbone::Pooling::Max => global_max_pool(&f),
            crate::backbone::Pooling::AvgMax => global_avg_pool(&f)
                .into_iter()
                .zip(global_max_pool(&f))
                .map(|(a, m)| a + m)
                .collect(),
            p @ (crate::backbone::Pooling::Cls | crate::backbone::Pooling::ClsMean) => {
                candle_core::bail!("pooling {p:?} reads a class token, which a CNN has not")
            }
        })
    }
}

/// Stage of a canonical variable name (`stem.*` → 0, `blocks.S.*` → S + 1, `head.*` → last).
fn param_stage(name: &str, n_groups: usize) -> Option<usize> {
    let (first, rest) = name.split_once('.')?;
    match first {
        "stem" => Some(0),
        "head" => Some(n_groups + 1),
        "blocks" => {
            let s: usize = rest.split('.').next()?.parse().ok()?;
            (s < n_groups).then_some(s + 1)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn variables_have_stages_and_shapes() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = EfficientNetLite::lite0(vb).unwrap();
        let data = varmap.data().lock().unwrap();
        // 16 blocks: 1 without expand (2 conv-bn) + 15 with (3 conv-bn), plus stem and head;
        // 5 variables per conv-bn.
        assert_eq!(data.len(), 5 * (2 + 15 * 3 + 2));
        for name in data.keys() {
            let stage = net
                .param_stage(name)
                .unwrap_or_else(|| panic!("no stage for {name}"));
            assert!(stage < net.num_stages());
        }
        assert_eq!(data["blocks.5.3.dw.conv.weight"].dims(), &[1152, 1, 5, 5]);
        assert_eq!(data["head.conv.weight"].dims(), &[1280, 320, 1, 1]);
        assert_eq!(net.param_stage("blocks.0.0.dw.conv.weight"), Some(1));
        assert_eq!(net.param_stage("head.bn.weight"), Some(8));
        assert_eq!(net.param_stage("classifier.weight"), None);
    }

    #[test]
    fn batches_that_split_over_the_threads_run_depth_first() {
        use Schedule::*;
        let cases = [
            (1, 2, LayerByLayer),
            (3, 2, LayerByLayer),
            (8, 2, DepthFirst),
            (9, 2, DepthFirst),
            (32, 2, DepthFirst),
            (6, 4, LayerByLayer),
            (32, 1, LayerByLayer),
        ];
        for (batch, threads, want) in cases {
            assert_eq!(
                Schedule::for_batch(batch, threads),
                want,
                "{batch} on {threads}"
            );
        }
        // Groups of up to four that divide each thread's share where one does.
        for (batch, threads, group) in [(32, 2, 4), (6, 2, 3), (10, 2, 1), (12, 4, 3), (9, 2, 1)] {
            assert_eq!(
                depth_first_group(batch, threads),
                group,
                "{batch} on {threads}"
            );
        }
    }

    #[test]
    fn fused_inference_copy_matches_the_training_network() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = EfficientNetLite::lite0(vb).unwrap();
        // Non-trivial BN statistics, so folding errors (scale, shift, ε) would show.
        {
            let data = varmap.data().lock().unwrap();
            for (name, var) in data.iter() {
                let t = Tensor::rand(0.5f32, 1.5, var.elem_count(), &Device::Cpu).unwrap();
                if name.ends_with("bn.bias") || name.ends_with("running_mean") {
                    var.set(&(t - 1.0).unwrap()).unwrap();
                } else if name.contains(".bn.") {
                    var.set(&t).unwrap();
                }
            }
        }
        let fused = {
            let data = varmap.data().lock().unwrap();
            FusedEfficientNetLite::from_vars(&LITE0_STAGES, |n| Ok(data[n].as_tensor().detach()))
                .unwrap()
        };
        // Groups start at the 14 × 14 blocks (224 input: stem 112, blocks 1/3/5 halve it),
        // at 9 × 9 for the 65 × 65 input below.
        assert_eq!(fused.first_grouped_block(224, 224), 6);
        assert_eq!(fused.first_grouped_block(65, 65), 4);
        // Odd size: asymmetric SAME padding; batch 1 and 3 take both threading paths of the
        // convolutions, in both schedules.
        let schedules = [Schedule::LayerByLayer, Schedule::DepthFirst];
        for (b, schedule) in [1, 3].into_iter().flat_map(|b| schedules.map(|s| (b, s))) {
            let x = Tensor::randn(0f32, 1.0, (b, 3, 65, 65), &Device::Cpu).unwrap();
            let want = net
                .pool(&net.forward_stages(&x, 0..net.num_stages()).unwrap())
                .unwrap();
            let got = fused.pooled_features_in(&x, schedule).unwrap();
            assert_eq!(got.dims(), &[b, FEATURE_DIM]);
            let scale = want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let diff = max_abs_diff(&got, &want).unwrap();
            assert!(
                diff <= 1e-5 * f64::from(scale.max(1.0)),
                "{schedule:?}, batch {b}: fused differs by {diff} (scale {scale})"
            );
        }
        // Starting at a stage boundary from the training network's activation (the trainer's
        // cached frozen stages) gives the same features as the whole network.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 65, 65), &Device::Cpu).unwrap();
        let want = net
            .pool(&net.forward_stages(&x, 0..net.num_stages()).unwrap())
            .unwrap();
        let scale = f64::from(
            want.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
        );
        for stage in 0..net.num_stages() {
            let h = net.forward_stages(&x, 0..stage).unwrap();
            let got = fused.pooled_features_from_stage(&h, stage).unwrap();
            let diff = max_abs_diff(&got, &want).unwrap();
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "from stage {stage}: differs by {diff} (scale {scale})"
            );
        }
        assert!(fused
            .pooled_features_from_stage(&x, net.num_stages())
            .is_err());
        // The other poolings, from the images and from a cached stage.
        for pooling in [
            crate::backbone::Pooling::Max,
            crate::backbone::Pooling::AvgMax,
        ] {
            let want = crate::backbone::pool(
                &net.forward_stages(&x, 0..net.num_stages()).unwrap(),
                pooling,
            )
            .unwrap();
            let f = fused.clone().with_pooling(pooling);
            let h = net.forward_stages(&x, 0..3).unwrap();
            for got in [
                f.pooled_features(&x).unwrap(),
                f.pooled_features_from_stage(&h, 3).unwrap(),
            ] {
                let diff = max_abs_diff(&got, &want).unwrap();
                assert!(
                    diff <= 1e-5 * scale.max(1.0),
                    "{pooling:?}: differs by {diff}"
                );
            }
        }
        let missing =
            FusedEfficientNetLite::from_vars(&LITE0_STAGES, |n| candle_core::bail!("no {n}"));
        assert!(missing.unwrap_err().to_string().contains("stem.bn.weight"));
    }

    #[test]
    fn stages_compose_and_shapes_follow_same_padding() {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = EfficientNetLite::lite0(vb).unwrap();
        // An odd size exercises the asymmetric "SAME" padding: ⌈65/2⌉ = 33, …, ⌈65/32⌉ = 3.
        let x = Tensor::randn(0f32, 1.0, (2, 3, 65, 65), &Device::Cpu).unwrap();
        let split = net.forward_stages(&x, 0..3).unwrap();
        assert_eq!(split.dims(), &[2, 24, 17, 17]);
        let full = net.forward_stages(&x, 0..net.num_stages()).unwrap();
        let resumed = net.forward_stages(&split, 3..net.num_stages()).unwrap();
        assert_eq!(full.dims(), &[2, 1280, 3, 3]);
        let diff = max_abs_diff(&full, &resumed).unwrap();
        assert_eq!(diff, 0.0);
        assert!(net.forward_stages(&x, 0..10).is_err());
    }

    #[test]
    fn trains_through_autograd_with_frozen_statistics() {
        // f64 so a central difference can check the analytic gradient tightly.
        let varmap = VarMap::new();
        let net =
            EfficientNetLite::lite0(VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu))
                .unwrap();
        // Seeded weights and data: with candle's unseeded initialisation, now and then a
        // ReLU6 input sat within the finite difference's step of a kink and the check failed.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut seeded = |shape: &[usize], scale: f64| {
            let n = shape.iter().product();
            let v: Vec<f64> = (0..n).map(|_| rng.gen_range(-scale..scale)).collect();
            Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
        };
        {
            let data = varmap.data().lock().unwrap();
            let mut names: Vec<_> = data.keys().filter(|n| n.ends_with("conv.weight")).collect();
            names.sort();
            for name in names {
                let var = &data[name];
                let fan_in = var.elem_count() / var.dims()[0];
                var.set(&seeded(var.dims(), (3.0 / fan_in as f64).sqrt()))
                    .unwrap();
            }
        }
        let x = seeded(&[2, 3, 32, 32], 1.7);
        let target = seeded(&[2, FEATURE_DIM], 1.7);
        let loss = |net: &EfficientNetLite| {
            (net.features(&x).unwrap() * &target)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let grads = loss(&net).backward().unwrap();
        let vars = varmap.data().lock().unwrap().clone();
        for name in [
            "stem.conv.weight",
            "blocks.2.1.dw.conv.weight",
            "blocks.5.0.expand.bn.weight",
            "head.bn.bias",
        ] {
            let g = grads
                .get(vars[name].as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(
                g.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0,
                "zero gradient for {name}"
            );
        }
        for name in ["stem.bn.running_mean", "blocks.3.0.dw.bn.running_var"] {
            assert!(
                grads.get(vars[name].as_tensor()).is_none(),
                "{name} is a buffer and must not get a gradient"
            );
        }
        // Central difference on one depthwise weight.
        let var = &vars["blocks.1.0.dw.conv.weight"];
        let analytic = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .get(4)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let original = var.as_tensor().copy().unwrap();
        let eps = 1e-5;
        let bump = |delta: f64| {
            let mut w = original.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            w[4] += delta;
            var.set(&Tensor::from_vec(w, original.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&net).to_scalar::<f64>().unwrap()
        };
        let numeric = (bump(eps) - bump(-eps)) / (2.0 * eps);
        var.set(&original).unwrap();
        assert!(
            (numeric - analytic).abs() <= 1e-6 * (1.0 + analytic.abs()),
            "numeric {numeric} vs analytic {analytic}"
        );
    }
}
