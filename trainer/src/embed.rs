//! The embedding model (backbone → global pool → optional linear head → L2) and the
//! [`Embedder`] the indexer and the server use to turn images into vectors.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder, VarMap};
use rayon::prelude::*;

use crate::backbone::efficientnet::{FusedEfficientNetLite, LITE0_STAGES};
use crate::backbone::{self, Backbone, BackboneKind};
use crate::checkpoint::{self, ModelConfig, ModelIdentity};
use crate::error::{Error, Result};

/// Variable-name prefix of backbone weights inside a checkpoint.
pub const BACKBONE_PREFIX: &str = "backbone";
/// Variable-name prefix of the embedding head inside a checkpoint.
pub const HEAD_PREFIX: &str = "head";

/// Backbone + head, all weights held in one `VarMap` so training and saving see them all.
pub struct EmbeddingModel {
    pub backbone: Box<dyn Backbone>,
    pub head: Option<Linear>,
    pub config: ModelConfig,
    pub varmap: VarMap,
    pub device: Device,
}

impl EmbeddingModel {
    /// Builds the network with fresh variables (head initialised randomly) on `device`.
    fn build(config: ModelConfig, device: &Device) -> Result<Self> {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
        let backbone = backbone::build(config.backbone, vb.pp(BACKBONE_PREFIX))?;
        let head = match config.embedding_dim {
            Some(dim) => Some(candle_nn::linear(
                config.feature_dim,
                dim,
                vb.pp(HEAD_PREFIX),
            )?),
            None => None,
        };
        Ok(Self {
            backbone,
            head,
            config,
            varmap,
            device: device.clone(),
        })
    }

    /// A pretrained backbone from a weight file (legacy/zip `.pth` or safetensors) plus,
    /// when `embedding_dim` is set, a freshly initialised linear head; pooled as the
    /// backbone's pretrained features are ([`backbone::default_pooling`]).
    pub fn pretrained(
        kind: BackboneKind,
        weights: &Path,
        embedding_dim: Option<usize>,
        device: &Device,
    ) -> Result<Self> {
        let pooling = backbone::default_pooling(kind);
        Self::pretrained_pooled(kind, weights, embedding_dim, pooling, device)
    }

    /// [`EmbeddingModel::pretrained`] with the given pooling (which sets the width of the
    /// pooled feature the head reads: a transformer's CLS + mean is twice as wide).
    pub fn pretrained_pooled(
        kind: BackboneKind,
        weights: &Path,
        embedding_dim: Option<usize>,
        pooling: backbone::Pooling,
        device: &Device,
    ) -> Result<Self> {
        let preprocess = backbone::default_preprocess(kind);
        let feature_dim = backbone::pooled_dim(kind, pooling)?;
        let mut config = ModelConfig::new(kind, feature_dim, embedding_dim, preprocess);
        config.pooling = pooling;
        let model = Self::build(config, device)?;
        let loaded = crate::weights::load_backbone_weights(kind, weights, device)?;
        let data = model.varmap.data().lock().expect("varmap lock");
        let prefix = format!("{BACKBONE_PREFIX}.");
        for (name, var) in data.iter() {
            let Some(inner) = name.strip_prefix(&prefix) else {
                continue;
            };
            let t = loaded.get(inner).ok_or_else(|| {
                Error::file(
                    weights,
                    format!("weight '{inner}' needed by {kind} is missing from this file"),
                )
            })?;
            if t.dims() != var.dims() {
                return Err(Error::file(
                    weights,
                    format!(
                        "weight '{inner}' has shape {:?}, {kind} needs {:?}",
                        t.dims(),
                        var.dims()
                    ),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(device)?)?;
        }
        drop(data);
        Ok(model)
    }

    /// Loads a checkpoint directory written by [`EmbeddingModel::save`].
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ModelConfig::read(dir)?;
        let mut model = Self::build(config, device)?;
        let path = dir.join(checkpoint::WEIGHTS_FILE);
        model
            .varmap
            .load(&path)
            .map_err(|e| Error::file(&path, format!("cannot load checkpoint weights: {e}")))?;
        Ok(model)
    }

    /// Writes weights then config, each atomically; the config is written last so a
    /// directory with a config always has complete weights.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let path = dir.join(checkpoint::WEIGHTS_FILE);
        let tmp = checkpoint::tmp_sibling(&path);
        self.varmap.save(&tmp).map_err(|e| Error::file(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::file(&path, e))?;
        self.config.write(dir)
    }

    /// Sets the head to a (truncated) identity with zero bias, so training starts from the
    /// pretrained metric itself: with `embedding_dim == feature_dim` the initial embedding
    /// equals the L2-normalised pooled features.
    pub fn init_head_identity(&self) -> Result<()> {
        let Some(head) = &self.head else {
            return Ok(());
        };
        let (dim, feat) = (self.config.output_dim(), self.config.feature_dim);
        let eye = Tensor::eye(feat, DType::F32, &self.device)?.narrow(0, 0, dim.min(feat))?;
        let w = if dim > feat {
            Tensor::cat(
                &[
                    eye,
                    Tensor::zeros((dim - feat, feat), DType::F32, &self.device)?,
                ],
                0,
            )?
        } else {
            eye
        };
        let data = self.varmap.data().lock().expect("varmap lock");
        for (name, value) in [
            (format!("{HEAD_PREFIX}.weight"), w),
            (
                format!("{HEAD_PREFIX}.bias"),
                Tensor::zeros(dim, DType::F32, &self.device)?,
            ),
        ] {
            let var = data
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("head variable {name} missing")))?;
            var.set(&value)?;
        }
        let _ = head;
        Ok(())
    }

    /// Pooled features → head → L2 normalisation.
    pub fn embed_pooled(&self, pooled: &Tensor) -> candle_core::Result<Tensor> {
        let z = match &self.head {
            Some(h) => h.forward(pooled)?,
            None => pooled.clone(),
        };
        l2_normalize(&z)
    }

    /// Embeds from an activation after stage `start - 1` (an image batch when `start == 0`).
    pub fn embed_from_stage(&self, x: &Tensor, start: usize) -> candle_core::Result<Tensor> {
        let n = self.backbone.num_stages();
        let feats = self.backbone.pool_with(
            &self.backbone.forward_stages(x, start..n)?,
            self.config.pooling,
        )?;
        self.embed_pooled(&feats)
    }

    /// Embeds an image batch `[B, 3, H, W]`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.embed_from_stage(x, 0)
    }
}

/// `views` (each `side`×`side`) normalised by `pre` into one batch tensor `[B, 3, side, side]`.
pub fn view_batch(
    pre: &crate::preprocess::Preprocess,
    views: &[image::RgbImage],
    side: u32,
    device: &Device,
) -> Result<Tensor> {
    let s = side as usize;
    let mut buf = Vec::with_capacity(views.len() * 3 * s * s);
    for v in views {
        pre.normalize_into(v, &mut buf);
    }
    Ok(Tensor::from_vec(buf, (views.len(), 3, s, s), device)?)
}

/// Row-wise L2 normalisation with an epsilon so a zero vector stays finite.
pub fn l2_normalize(x: &Tensor) -> candle_core::Result<Tensor> {
    let norm = (x.sqr()?.sum_keepdim(D::Minus1)? + 1e-12)?.sqrt()?;
    x.broadcast_div(&norm)
}

/// Where an embedding model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSpec {
    /// A run directory (checkpoint) written by `trainer`.
    Run(PathBuf),
    /// A bare pretrained backbone; its pooled features are the embedding.
    Pretrained {
        backbone: BackboneKind,
        weights: Option<PathBuf>,
    },
}

impl ModelSpec {
    /// Parses `RUN_DIR` or `pretrained:BACKBONE`; `weights` applies to the latter.
    pub fn parse(s: &str, weights: Option<PathBuf>) -> Result<Self> {
        match s.strip_prefix("pretrained:") {
            Some(kind) => Ok(ModelSpec::Pretrained {
                backbone: kind.parse().map_err(Error::Invalid)?,
                weights,
            }),
            None => Ok(ModelSpec::Run(PathBuf::from(s))),
        }
    }
}

/// Embeds decoded images; thread-safe, shared by the indexer's and the server's workers.
pub struct Embedder {
    model: EmbeddingModel,
    identity: ModelIdentity,
    batch_size: usize,
    /// Faster inference copy of the backbone, where one exists for its kind (others run the
    /// training network, detached).
    fused: Option<InferenceNet>,
}

impl Embedder {
    /// Loads `spec` onto `device` (`--device`; see [`crate::device`]).
    pub fn load(spec: &ModelSpec, device: &Device) -> Result<Self> {
        let (model, weights_file) = match spec {
            ModelSpec::Run(dir) => (
                EmbeddingModel::load(dir, device)?,
                dir.join(checkpoint::WEIGHTS_FILE),
            ),
            ModelSpec::Pretrained { backbone, weights } => {
                let path = crate::weights::resolve_pretrained(*backbone, weights.as_deref())?;
                (
                    EmbeddingModel::pretrained(*backbone, &path, None, device)?,
                    path,
                )
            }
        };
        let identity = ModelIdentity::new(&model.config, checkpoint::sha256_file(&weights_file)?);
        Self::from_model(model, identity)
    }

    /// Wraps a loaded model; folds its backbone for inference when the kind supports it.
    /// The fused copy is a snapshot: later changes to the model's variables are not seen.
    pub fn from_model(model: EmbeddingModel, identity: ModelIdentity) -> Result<Self> {
        let fused = fused_backbone(&model)?;
        Ok(Self {
            model,
            identity,
            batch_size: 32,
            fused,
        })
    }

    /// The same network fed `size`×`size` inputs, so a bare pretrained backbone can be
    /// compared with a checkpoint trained at that size (`trainer eval --image-size`).
    pub fn with_image_size(mut self, size: u32) -> Self {
        crate::train::set_image_size(&mut self.model.config.preprocess, size);
        self.identity = ModelIdentity::new(
            &self.model.config,
            std::mem::take(&mut self.identity.weights_sha256),
        );
        self
    }

    pub fn dim(&self) -> usize {
        self.model.config.output_dim()
    }
    pub fn identity(&self) -> &ModelIdentity {
        &self.identity
    }
    pub fn config(&self) -> &ModelConfig {
        &self.model.config
    }
    pub fn model(&self) -> &EmbeddingModel {
        &self.model
    }

    /// Preprocesses (in parallel) and embeds images; rows are L2-normalised.
    pub fn embed_images(&self, images: &[image::DynamicImage]) -> Result<Vec<Vec<f32>>> {
        let pre = &self.model.config.preprocess;
        let views: Vec<image::RgbImage> = images.par_iter().map(|im| pre.eval_view(im)).collect();
        self.embed_views(&views)
    }

    /// Embeds a normalised image batch `[B, 3, H, W]` → `[B, dim]` (L2-normalised rows): the
    /// network part of [`Embedder::embed_views`], also what `trainer bench` times.
    pub fn embed_tensor(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.fused {
            Some(net) => self.model.embed_pooled(&net.pooled_features(x)?)?,
            None => self.model.forward(x)?,
        };
        // Detached: the caller keeps the vectors, not the graph of every activation.
        Ok(y.detach())
    }

    /// Embeds images already at the model's input size (see `Preprocess::eval_view`); a
    /// multi-scale model ([`Preprocess::extra_sizes`]) also embeds each at its extra sizes.
    pub fn embed_views(&self, views: &[image::RgbImage]) -> Result<Vec<Vec<f32>>> {
        let pre = &self.model.config.preprocess;
        let side = pre.crop as usize;
        let mut out = Vec::with_capacity(views.len());
        for chunk in views.chunks(self.batch_size) {
            if let Some(v) = chunk
                .iter()
                .find(|v| v.dimensions() != (pre.crop, pre.crop))
            {
                return Err(Error::Invalid(format!(
                    "image view is {:?}, the model takes {side}×{side}",
                    v.dimensions()
                )));
            }
            let mut sum =
                self.embed_tensor(&view_batch(pre, chunk, pre.crop, &self.model.device)?)?;
            for &size in &pre.extra_sizes {
                let extra: Vec<image::RgbImage> =
                    chunk.par_iter().map(|v| pre.extra_view(v, size)).collect();
                sum = (sum
                    + self.embed_tensor(&view_batch(pre, &extra, size, &self.model.device)?)?)?;
            }
            if !pre.extra_sizes.is_empty() {
                sum = l2_normalize(&sum)?;
            }
            out.extend(sum.to_vec2::<f32>()?);
        }
        Ok(out)
    }

    /// The same model embedding at `sizes` besides its input size (multi-scale; empty: one
    /// size), e.g. to try it on a checkpoint (`trainer eval --extra-sizes`).
    pub fn with_extra_sizes(mut self, mut sizes: Vec<u32>) -> Self {
        // `0` is `--extra-sizes`' "main size only", not a size.
        sizes.retain(|&s| s != 0);
        self.model.config.preprocess.extra_sizes = sizes;
        self.identity = ModelIdentity::new(
            &self.model.config,
            std::mem::take(&mut self.identity.weights_sha256),
        );
        self
    }
}

/// A faster, never-trained copy of a backbone for embedding: EfficientNet-Lite0 with batch
/// norm folded into its convolutions (CPU), or a transformer on candle's fused layer-norm and
/// softmax kernels (which have no backward, so training cannot use them).
pub enum InferenceNet {
    EfficientNet(Box<FusedEfficientNetLite>),
    Vit {
        net: Box<crate::backbone::vit::Vit>,
        pooling: backbone::Pooling,
    },
}

impl InferenceNet {
    /// Pooled features of an image batch.
    pub fn pooled_features(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.pooled_features_from_stage(x, 0)
    }

    /// Pooled features from the activation after stage `stage - 1` (images when 0).
    pub fn pooled_features_from_stage(
        &self,
        x: &Tensor,
        stage: usize,
    ) -> candle_core::Result<Tensor> {
        match self {
            InferenceNet::EfficientNet(net) => net.pooled_features_from_stage(x, stage),
            InferenceNet::Vit { net, pooling } => {
                let n = net.num_stages();
                net.pool_with(&net.forward_stages(x, stage..n)?, *pooling)
            }
        }
    }
}

/// The inference copy of `model`'s backbone where one exists for its kind (CPU
/// EfficientNet-Lite0, transformers on any device): a snapshot, later changes to the model's
/// variables are not seen.
pub fn fused_backbone(model: &EmbeddingModel) -> Result<Option<InferenceNet>> {
    let kind = model.config.backbone;
    let data = model.varmap.data().lock().expect("varmap lock");
    let prefix = format!("{BACKBONE_PREFIX}.");
    if let Some(cfg) = crate::backbone::vit::VitConfig::for_kind(kind) {
        let vars = data
            .iter()
            .filter_map(|(k, v)| {
                Some((k.strip_prefix(&prefix)?.to_string(), v.as_tensor().detach()))
            })
            .collect();
        let net = crate::backbone::vit::Vit::inference_copy(kind, cfg, vars, &model.device)?;
        return Ok(Some(InferenceNet::Vit {
            net: Box::new(net),
            pooling: model.config.pooling,
        }));
    }
    if kind != BackboneKind::EfficientnetLite0 || !model.device.is_cpu() {
        return Ok(None);
    }
    let get = |name: &str| {
        let full = format!("{prefix}{name}");
        data.get(&full)
            .map(|v| v.as_tensor().detach())
            .ok_or_else(|| {
                candle_core::Error::Msg(format!("variable {full} missing from the model"))
            })
    };
    Ok(Some(InferenceNet::EfficientNet(Box::new(
        FusedEfficientNetLite::from_vars(&LITE0_STAGES, get)?.with_pooling(model.config.pooling),
    ))))
}

/// Vectors of a whole dataset, in sample order.
pub struct DatasetEmbeddings {
    /// Row-major `len × dim`.
    pub data: Vec<f32>,
    pub dim: usize,
    /// Labels of the rows that were embedded.
    pub labels: Vec<u32>,
    /// Sample indices of the rows (skipped samples are absent).
    pub indices: Vec<usize>,
    /// Unreadable images that were skipped (with `skip_bad`), as messages naming the file.
    pub skipped: Vec<String>,
    pub seconds: f64,
}

impl Embedder {
    /// Embeds every sample of `set` with its eval view: parallel decoding, batched forward
    /// passes, and a progress bar (img/s, ETA) on stderr when `progress` is set.
    pub fn embed_dataset(
        &self,
        set: &crate::data::Dataset,
        skip_bad: bool,
        progress: bool,
    ) -> Result<DatasetEmbeddings> {
        let t0 = std::time::Instant::now();
        let pb = if progress {
            let pb = indicatif::ProgressBar::new(set.samples.len() as u64);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            pb.set_prefix("embed");
            pb
        } else {
            indicatif::ProgressBar::hidden()
        };
        let pre = &self.model.config.preprocess;
        let mut out = DatasetEmbeddings {
            data: Vec::with_capacity(set.samples.len() * self.dim()),
            dim: self.dim(),
            labels: Vec::new(),
            indices: Vec::new(),
            skipped: Vec::new(),
            seconds: 0.0,
        };
        let idx: Vec<usize> = (0..set.samples.len()).collect();
        for chunk in idx.chunks(self.batch_size) {
            let views: Vec<(usize, Result<image::RgbImage>)> = chunk
                .par_iter()
                .map(|&i| (i, set.samples[i].decode().map(|im| pre.eval_view(&im))))
                .collect();
            let (mut ids, mut imgs) = (
                Vec::with_capacity(views.len()),
                Vec::with_capacity(views.len()),
            );
            for (i, v) in views {
                match v {
                    Ok(img) => {
                        ids.push(i);
                        imgs.push(img);
                    }
                    Err(e) if skip_bad => out.skipped.push(e.to_string()),
                    Err(e) => {
                        return Err(Error::Invalid(format!(
                            "{e} (listed at {})",
                            set.samples[i].origin
                        )))
                    }
                }
            }
            for (row, i) in self.embed_views(&imgs)?.into_iter().zip(ids) {
                out.data.extend(row);
                out.labels.push(set.samples[i].label);
                out.indices.push(i);
            }
            pb.inc(chunk.len() as u64);
        }
        pb.finish_and_clear();
        out.seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    /// A randomly initialised Lite0 with a 16-d head, embedding at 64 px.
    fn small_embedder() -> Result<Embedder> {
        let mut pre = crate::preprocess::Preprocess::efficientnet_lite();
        crate::train::set_image_size(&mut pre, 64);
        let cfg = ModelConfig::new(BackboneKind::EfficientnetLite0, 1280, Some(16), pre);
        let model = EmbeddingModel::build(cfg, &Device::Cpu)?;
        let identity = ModelIdentity::new(&model.config, "0".repeat(64));
        Embedder::from_model(model, identity)
    }

    /// With an extra size, a vector is the normalised sum of the one at the input size and
    /// the one of the view resampled to the extra size; the identity changes with it.
    #[test]
    fn extra_sizes_sum_the_normalised_vectors_of_each_size() -> Result<()> {
        let views: Vec<RgbImage> = (0..3u32)
            .map(|k| {
                RgbImage::from_fn(64, 64, |x, y| {
                    Rgb([
                        (x * 4 + k * 40) as u8,
                        (y * 4) as u8,
                        ((x * y + k) % 251) as u8,
                    ])
                })
            })
            .collect();
        let one = small_embedder()?;
        let main = one.embed_views(&views)?;
        let pre = one.config().preprocess.clone();
        let small: Vec<RgbImage> = views.iter().map(|v| pre.extra_view(v, 32)).collect();
        let at32 = one
            .embed_tensor(&view_batch(&pre, &small, 32, &Device::Cpu)?)?
            .to_vec2::<f32>()?;
        let before = one.identity().clone();
        let multi = one.with_extra_sizes(vec![32]);
        assert_ne!(multi.identity(), &before);
        let got = multi.embed_views(&views)?;
        for ((g, a), b) in got.iter().zip(&main).zip(&at32) {
            let sum: Vec<f32> = a.iter().zip(b).map(|(x, y)| x + y).collect();
            let norm = sum.iter().map(|v| v * v).sum::<f32>().sqrt();
            for (x, s) in g.iter().zip(&sum) {
                assert!((x - s / norm).abs() < 1e-5, "{g:?} vs {sum:?}");
            }
            // The sizes disagree, so the sum is not the single-size vector again.
            let apart: f32 = g.iter().zip(a).map(|(x, y)| (x - y).abs()).sum();
            assert!(apart > 1e-3, "{apart}");
        }
        Ok(())
    }
}
