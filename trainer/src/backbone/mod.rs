//! Backbones written on candle: CNNs and vision transformers ([`vit`]). Each maps
//! `[B, 3, H, W]` to pooled features `[B, C]` and exposes its stages so early ones can be
//! frozen and their outputs cached.
//!
//! [`build`] creates every variable through the given `VarBuilder` under the backbone's
//! canonical names; [`crate::weights::load_backbone_weights`] returns pretrained tensors under
//! the same names, whatever layout the file uses.

/// The fused bias + activation op (kept under this path for the backbones' code).
pub use crate::ops::bias_act;
pub mod bn_inception;
pub mod efficientnet;
pub mod layers;
pub mod resnet;
pub mod vit;

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::preprocess::Preprocess;

/// The backbones the project ships. Serialised names are the CLI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum BackboneKind {
    EfficientnetLite0,
    BnInception,
    Resnet18,
    Resnet50,
    /// DINOv2 ViT-S/14 (timm `vit_small_patch14_dinov2.lvd142m`).
    #[serde(rename = "dinov2-vits14")]
    #[value(name = "dinov2-vits14")]
    Dinov2Vits14,
    /// DINOv2 ViT-B/14 (timm `vit_base_patch14_dinov2.lvd142m`).
    #[serde(rename = "dinov2-vitb14")]
    #[value(name = "dinov2-vitb14")]
    Dinov2Vitb14,
    /// CLIP ViT-B/16's image tower (`openai/clip-vit-base-patch16`).
    #[serde(rename = "clip-vitb16")]
    #[value(name = "clip-vitb16")]
    ClipVitb16,
}

impl BackboneKind {
    pub fn name(self) -> &'static str {
        match self {
            BackboneKind::EfficientnetLite0 => "efficientnet-lite0",
            BackboneKind::BnInception => "bn-inception",
            BackboneKind::Resnet18 => "resnet18",
            BackboneKind::Resnet50 => "resnet50",
            BackboneKind::Dinov2Vits14 => "dinov2-vits14",
            BackboneKind::Dinov2Vitb14 => "dinov2-vitb14",
            BackboneKind::ClipVitb16 => "clip-vitb16",
        }
    }

    /// Vision transformers (token maps, CLS pooling) rather than CNNs (feature maps).
    pub fn is_transformer(self) -> bool {
        vit::VitConfig::for_kind(self).is_some()
    }
}

impl std::fmt::Display for BackboneKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackboneKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, true).map_err(|_| {
            format!(
                "unknown backbone '{s}' (expected one of: efficientnet-lite0, bn-inception, resnet18, resnet50, dinov2-vits14, dinov2-vitb14, clip-vitb16)"
            )
        })
    }
}

/// How the last feature map becomes one vector per image.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Pooling {
    /// Global average (ImageNet's; what the pretrained features are).
    #[default]
    Avg,
    /// Global maximum: where a pattern occurs does not dilute it (sparse images such as
    /// strokes or products on a plain background).
    Max,
    /// Average + maximum, summed (Kim et al. 2020's Proxy-Anchor setting).
    AvgMax,
    /// Transformers: the class token (DINOv2's and CLIP's own embedding; CLIP's projected).
    /// Transformers pool `avg`, `max`, `avg-max` over the patch tokens.
    Cls,
    /// Transformers: the class token and the mean patch token, concatenated (DINOv2's
    /// linear-probe feature; twice as wide).
    ClsMean,
}

impl Pooling {
    /// Whether the pooling reads a class token, which only transformers have.
    pub fn needs_class_token(self) -> bool {
        matches!(self, Pooling::Cls | Pooling::ClsMean)
    }
}

/// Pools `[B, C, H, W]` → `[B, C]` (CNN feature maps; transformers pool their tokens in
/// [`Backbone::pool_with`]).
pub fn pool(x: &Tensor, pooling: Pooling) -> Result<Tensor> {
    use candle_core::D;
    let avg = || x.mean(D::Minus1)?.mean(D::Minus1);
    let max = || x.max(D::Minus1)?.max(D::Minus1);
    match pooling {
        Pooling::Avg => avg(),
        Pooling::Max => max(),
        Pooling::AvgMax => avg()? + max()?,
        Pooling::Cls | Pooling::ClsMean => candle_core::bail!(
            "pooling {pooling:?} reads a class token: only transformer backbones have one"
        ),
    }
}

/// A feature extractor split into stages (stem = 0, …, last = head conv).
///
/// `features(x) == pool(forward_stages(x, 0..num_stages()))`. Training with
/// `--freeze-until S` computes `forward_stages(x, 0..S)` once per image and caches it.
pub trait Backbone: Send + Sync {
    fn kind(&self) -> BackboneKind;
    /// Number of stages; stage indices are `0..num_stages()`.
    fn num_stages(&self) -> usize;
    /// Human names of the stages, for `--freeze-until` help and errors.
    fn stage_names(&self) -> Vec<String>;
    /// Runs stages `range` on an unpooled activation (the image batch when `range.start == 0`).
    fn forward_stages(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor>;
    /// Global average pool `[B, C, H, W]` → `[B, C]`.
    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        x.mean(candle_core::D::Minus1)?.mean(candle_core::D::Minus1)
    }
    /// The pooled feature under `pooling` (what embeddings are made of): [`pool`] for CNN
    /// feature maps; transformers pool their tokens and apply their final layers.
    fn pool_with(&self, x: &Tensor, pooling: Pooling) -> Result<Tensor> {
        pool(x, pooling)
    }
    /// Channels of the pooled feature.
    fn feature_dim(&self) -> usize;
    /// The stage a variable (by its name in the backbone's `VarMap`) belongs to, so the
    /// trainer hands only unfrozen ones to the optimiser.
    fn param_stage(&self, name: &str) -> Option<usize>;
    /// Pooled features of an image batch.
    fn features(&self, x: &Tensor) -> Result<Tensor> {
        self.pool(&self.forward_stages(x, 0..self.num_stages())?)
    }
}

/// Builds `kind` with all its variables created through `vb` (names relative to `vb`'s prefix).
/// No classifier is created: the backbones are feature extractors.
pub fn build(kind: BackboneKind, vb: VarBuilder) -> Result<Box<dyn Backbone>> {
    Ok(match kind {
        BackboneKind::EfficientnetLite0 => Box::new(efficientnet::EfficientNetLite::lite0(vb)?),
        BackboneKind::Resnet18 => Box::new(resnet::ResNet::resnet18(vb)?),
        BackboneKind::Resnet50 => Box::new(resnet::ResNet::resnet50(vb)?),
        BackboneKind::BnInception => Box::new(bn_inception::BnInception::new(vb)?),
        BackboneKind::Dinov2Vits14 | BackboneKind::Dinov2Vitb14 | BackboneKind::ClipVitb16 => {
            let cfg = vit::VitConfig::for_kind(kind).expect("a transformer kind");
            Box::new(vit::Vit::new(kind, cfg, vb)?)
        }
    })
}

/// The preprocessing the pretrained weights of `kind` were trained with.
pub fn default_preprocess(kind: BackboneKind) -> Preprocess {
    match kind {
        BackboneKind::EfficientnetLite0 => Preprocess::efficientnet_lite(),
        BackboneKind::Resnet18 | BackboneKind::Resnet50 => Preprocess::imagenet(256, 224),
        BackboneKind::BnInception => Preprocess::bn_inception(),
        BackboneKind::Dinov2Vits14 | BackboneKind::Dinov2Vitb14 => Preprocess::dinov2(),
        BackboneKind::ClipVitb16 => Preprocess::clip(),
    }
}

/// The pooling a pretrained `kind` is used with: the class token for transformers, the
/// global average for CNNs.
pub fn default_pooling(kind: BackboneKind) -> Pooling {
    if kind.is_transformer() {
        Pooling::Cls
    } else {
        Pooling::Avg
    }
}

/// The pooling a fine-tuned `kind` gets unless told otherwise: the class token for
/// transformers; average + maximum for CNNs, which beat average pooling after training on
/// photos and on characters (bench/RESULTS-learning.md).
pub fn default_training_pooling(kind: BackboneKind) -> Pooling {
    if kind.is_transformer() {
        Pooling::Cls
    } else {
        Pooling::AvgMax
    }
}

/// Width of `kind`'s pooled feature under `pooling`; an error naming both when the pooling
/// does not apply to the backbone (a class token on a CNN).
pub fn pooled_dim(kind: BackboneKind, pooling: Pooling) -> crate::error::Result<usize> {
    match vit::VitConfig::for_kind(kind) {
        Some(cfg) => Ok(cfg.pooled_dim(pooling)),
        None if pooling.needs_class_token() => Err(crate::error::Error::Invalid(format!(
            "--pooling {} needs a class token, which {kind} (a CNN) has not; use avg, max or \
             avg-max, or a transformer backbone (dinov2-vits14, dinov2-vitb14, clip-vitb16)",
            clap::ValueEnum::to_possible_value(&pooling)
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        ))),
        None => Ok(feature_dim(kind)),
    }
}

/// Channels of the pooled feature of `kind`.
pub fn feature_dim(kind: BackboneKind) -> usize {
    match kind {
        BackboneKind::EfficientnetLite0 => efficientnet::FEATURE_DIM,
        BackboneKind::Resnet18 => resnet::RESNET18_FEATURE_DIM,
        BackboneKind::Resnet50 => resnet::RESNET50_FEATURE_DIM,
        BackboneKind::BnInception => bn_inception::FEATURE_DIM,
        BackboneKind::Dinov2Vits14 | BackboneKind::Dinov2Vitb14 | BackboneKind::ClipVitb16 => {
            vit::VitConfig::for_kind(kind)
                .expect("a transformer kind")
                .token_dim()
        }
    }
}

/// True for batch-norm running statistics: variables that load and save with the weights
/// but are buffers, never trained (every backbone detaches them, so they get no gradient;
/// the trainer may also leave them out of the optimiser by this test).
pub fn is_running_stat(name: &str) -> bool {
    layers::RUNNING_STAT_SUFFIXES
        .iter()
        .any(|s| name.ends_with(s))
}
