//! Vision transformers: DINOv2 ViT-S/14 and ViT-B/14 in timm's layout
//! (`vit_small_patch14_dinov2.lvd142m`, `vit_base_patch14_dinov2.lvd142m`) and CLIP ViT-B/16's
//! image tower in the Hugging Face layout (`openai/clip-vit-base-patch16`).
//!
//! candle-transformers has both models, but they cannot serve here as they are: their fused
//! layer norm has no backward (fine-tuning would silently stop at the first norm), their
//! blocks are private (no stages to freeze or cache), and its DINOv2 differs from timm's
//! (layer-norm ε 1e-5 instead of 1e-6, tanh-approximated GELU instead of erf). So the network
//! is written here in the published variable names, reusing candle-transformers' CLIP
//! configuration and quick-GELU and candle-nn's differentiable layer norm and softmax; the
//! fused kernels run only in the inference copy ([`Vit::inference_copy`]), which needs no
//! backward. A test checks the CLIP tower against candle-transformers' own.
//!
//! Stages of the [`Backbone`] trait: 0 = `patch-embed` (patches, class token, position
//! embedding; CLIP's pre-norm), then one per transformer block (`blocks.0`, …). The final
//! norm, the token pooling and CLIP's projection run in [`Backbone::pool_with`] and belong
//! to the last block's stage for freezing.

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor, D};
use candle_nn::{Linear, VarBuilder};
use candle_transformers::models::clip::{
    text_model::Activation as ClipActivation, vision_model::ClipVisionConfig,
};

use super::{Backbone, BackboneKind, Pooling};

/// The two published model families, which differ in layout and in a few layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// timm's DINOv2: fused `qkv`, layer scale, erf GELU, ε 1e-6, final norm on all tokens.
    Dinov2,
    /// OpenAI CLIP (Hugging Face names): separate q/k/v, quick GELU, ε 1e-5, pre-norm,
    /// post-norm on the pooled token, then a bias-free projection.
    Clip,
}

/// Architecture of a ViT backbone.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    pub family: Family,
    pub dim: usize,
    pub depth: usize,
    pub heads: usize,
    pub mlp_hidden: usize,
    pub patch: usize,
    /// Side of the patch grid the position embedding is built for (input side / patch).
    /// Files published for another grid are resampled at load time, other input sizes in
    /// the forward pass (both bicubic, as timm does).
    pub grid: usize,
    pub ln_eps: f64,
    /// Output dimension of CLIP's projection.
    pub proj_dim: Option<usize>,
}

impl VitConfig {
    fn dinov2(dim: usize, heads: usize) -> Self {
        Self {
            family: Family::Dinov2,
            dim,
            depth: 12,
            heads,
            mlp_hidden: 4 * dim,
            patch: 14,
            grid: 16,
            ln_eps: 1e-6,
            proj_dim: None,
        }
    }

    pub fn dinov2_vits14() -> Self {
        Self::dinov2(384, 6)
    }

    pub fn dinov2_vitb14() -> Self {
        Self::dinov2(768, 12)
    }

    /// CLIP ViT-B/16 at 224 px, from candle-transformers' CLIP vision configuration.
    pub fn clip_vitb16() -> Self {
        let c = ClipVisionConfig {
            patch_size: 16,
            ..ClipVisionConfig::vit_base_patch32()
        };
        Self::from_clip(&c)
    }

    pub fn from_clip(c: &ClipVisionConfig) -> Self {
        Self {
            family: Family::Clip,
            dim: c.embed_dim,
            depth: c.num_hidden_layers,
            heads: c.num_attention_heads,
            mlp_hidden: c.intermediate_size,
            patch: c.patch_size,
            grid: c.image_size / c.patch_size,
            ln_eps: 1e-5,
            proj_dim: Some(c.projection_dim),
        }
    }

    /// The configuration of a ViT backbone kind; `None` for the CNNs.
    pub fn for_kind(kind: BackboneKind) -> Option<Self> {
        match kind {
            BackboneKind::Dinov2Vits14 => Some(Self::dinov2_vits14()),
            BackboneKind::Dinov2Vitb14 => Some(Self::dinov2_vitb14()),
            BackboneKind::ClipVitb16 => Some(Self::clip_vitb16()),
            _ => None,
        }
    }

    /// Width of one pooled token after the (optional) projection.
    pub fn token_dim(&self) -> usize {
        self.proj_dim.unwrap_or(self.dim)
    }

    /// Dimension of the pooled feature under `pooling` (CLS + mean is two tokens wide).
    pub fn pooled_dim(&self, pooling: Pooling) -> usize {
        match pooling {
            Pooling::ClsMean => 2 * self.token_dim(),
            _ => self.token_dim(),
        }
    }

    /// Variable names of the position embedding and the class token in this layout.
    pub fn position_embedding_name(&self) -> &'static str {
        match self.family {
            Family::Dinov2 => "pos_embed",
            Family::Clip => "vision_model.embeddings.position_embedding.weight",
        }
    }
}

/// Layer norm over the last dimension.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl Norm {
    fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    /// candle's fused kernel has no backward, so training takes the composed version.
    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        if fused {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps as f32)
        } else {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps as f32)
        }
    }
}

fn linear(vb: VarBuilder, i: usize, o: usize, bias: bool) -> Result<Linear> {
    if bias {
        candle_nn::linear(i, o, vb)
    } else {
        candle_nn::linear_no_bias(i, o, vb)
    }
}

#[derive(Debug, Clone)]
enum Qkv {
    /// timm: one `[3·dim, dim]` projection.
    Fused(Linear),
    /// Hugging Face CLIP: `q_proj`, `k_proj`, `v_proj`.
    Split([Linear; 3]),
}

#[derive(Debug, Clone)]
struct Attention {
    qkv: Qkv,
    out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    fn new(c: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let d = c.dim;
        let (qkv, out) = match c.family {
            Family::Dinov2 => (
                Qkv::Fused(linear(vb.pp("qkv"), d, 3 * d, true)?),
                linear(vb.pp("proj"), d, d, true)?,
            ),
            Family::Clip => (
                Qkv::Split([
                    linear(vb.pp("q_proj"), d, d, true)?,
                    linear(vb.pp("k_proj"), d, d, true)?,
                    linear(vb.pp("v_proj"), d, d, true)?,
                ]),
                linear(vb.pp("out_proj"), d, d, true)?,
            ),
        };
        Ok(Self {
            qkv,
            out,
            heads: c.heads,
            scale: 1.0 / ((d / c.heads) as f64).sqrt(),
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (h, hd) = (self.heads, c / self.heads);
        let (q, k, v) = match &self.qkv {
            Qkv::Fused(l) => {
                // [b, n, 3, h, hd] → [3, b, h, n, hd]
                let t = l
                    .forward(x)?
                    .reshape((b, n, 3, h, hd))?
                    .permute((2, 0, 3, 1, 4))?;
                (t.i(0)?, t.i(1)?, t.i(2)?)
            }
            Qkv::Split(ls) => {
                let heads = |l: &Linear| l.forward(x)?.reshape((b, n, h, hd))?.transpose(1, 2);
                (heads(&ls[0])?, heads(&ls[1])?, heads(&ls[2])?)
            }
        };
        let q = (q.contiguous()? * self.scale)?;
        let att = q.matmul(&k.contiguous()?.t()?)?;
        let att = if fused {
            candle_nn::ops::softmax_last_dim(&att)?
        } else {
            candle_nn::ops::softmax(&att, D::Minus1)?
        };
        let y = att
            .matmul(&v.contiguous()?)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        self.out.forward(&y)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm1: Norm,
    attn: Attention,
    /// DINOv2's layer scale (`ls1.gamma`, `ls2.gamma`).
    scales: Option<[Tensor; 2]>,
    norm2: Norm,
    fc1: Linear,
    fc2: Linear,
    family: Family,
}

impl Block {
    fn new(c: &VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, e) = (c.dim, c.ln_eps);
        Ok(match c.family {
            Family::Dinov2 => Self {
                norm1: Norm::new(d, e, vb.pp("norm1"))?,
                attn: Attention::new(c, vb.pp("attn"))?,
                scales: Some([
                    vb.get_with_hints(d, "ls1.gamma", candle_nn::Init::Const(1e-5))?,
                    vb.get_with_hints(d, "ls2.gamma", candle_nn::Init::Const(1e-5))?,
                ]),
                norm2: Norm::new(d, e, vb.pp("norm2"))?,
                fc1: linear(vb.pp("mlp.fc1"), d, c.mlp_hidden, true)?,
                fc2: linear(vb.pp("mlp.fc2"), c.mlp_hidden, d, true)?,
                family: c.family,
            },
            Family::Clip => Self {
                norm1: Norm::new(d, e, vb.pp("layer_norm1"))?,
                attn: Attention::new(c, vb.pp("self_attn"))?,
                scales: None,
                norm2: Norm::new(d, e, vb.pp("layer_norm2"))?,
                fc1: linear(vb.pp("mlp.fc1"), d, c.mlp_hidden, true)?,
                fc2: linear(vb.pp("mlp.fc2"), c.mlp_hidden, d, true)?,
                family: c.family,
            },
        })
    }

    fn forward(&self, x: &Tensor, fused: bool) -> Result<Tensor> {
        let scale = |y: Tensor, i: usize| match &self.scales {
            Some(s) => y.broadcast_mul(&s[i]),
            None => Ok(y),
        };
        let a = self.attn.forward(&self.norm1.forward(x, fused)?, fused)?;
        let x = (x + scale(a, 0)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x, fused)?)?;
        let h = match self.family {
            Family::Dinov2 => h.gelu_erf()?,
            Family::Clip => ClipActivation::QuickGelu.forward(&h)?,
        };
        let m = self.fc2.forward(&h)?;
        x + scale(m, 1)?
    }
}

/// A ViT feature extractor: `[B, 3, H, W]` → tokens `[B, 1 + (H/p)(W/p), dim]`, pooled by
/// [`Backbone::pool_with`].
#[derive(Debug, Clone)]
pub struct Vit {
    kind: BackboneKind,
    cfg: VitConfig,
    /// `[dim, 3, p, p]`.
    patch_weight: Tensor,
    patch_bias: Option<Tensor>,
    cls: Tensor,
    /// `[1 + grid², dim]` (DINOv2 stores `[1, 1 + grid², dim]`).
    pos: Tensor,
    pre_norm: Option<Norm>,
    blocks: Vec<Block>,
    /// DINOv2's `norm` (on every token) or CLIP's `post_layernorm` (on the pooled token).
    norm: Norm,
    /// CLIP's `visual_projection.weight`, `[proj_dim, dim]`.
    proj: Option<Tensor>,
    /// Fused layer-norm and softmax kernels (no backward): the inference copy only.
    fused: bool,
}

impl Vit {
    pub fn new(kind: BackboneKind, cfg: VitConfig, vb: VarBuilder) -> Result<Self> {
        let (d, p, n) = (cfg.dim, cfg.patch, 1 + cfg.grid * cfg.grid);
        let std = |s: f64| candle_nn::Init::Randn {
            mean: 0.0,
            stdev: s,
        };
        let (patch_weight, patch_bias, cls, pos, pre_norm, norm, proj, blocks_vb) = match cfg.family
        {
            Family::Dinov2 => (
                vb.get_with_hints((d, 3, p, p), "patch_embed.proj.weight", std(0.02))?,
                Some(vb.get_with_hints(d, "patch_embed.proj.bias", candle_nn::Init::Const(0.0))?),
                vb.get_with_hints((1, 1, d), "cls_token", std(1e-6))?,
                vb.get_with_hints((1, n, d), "pos_embed", std(0.02))?,
                None,
                Norm::new(d, cfg.ln_eps, vb.pp("norm"))?,
                None,
                vb.pp("blocks"),
            ),
            Family::Clip => {
                let v = vb.pp("vision_model");
                let e = v.pp("embeddings");
                let pd = cfg.proj_dim.unwrap_or(d);
                (
                    e.get_with_hints((d, 3, p, p), "patch_embedding.weight", std(0.02))?,
                    None,
                    e.get_with_hints(d, "class_embedding", std(0.02))?,
                    e.get_with_hints((n, d), "position_embedding.weight", std(0.02))?,
                    Some(Norm::new(d, cfg.ln_eps, v.pp("pre_layrnorm"))?),
                    Norm::new(d, cfg.ln_eps, v.pp("post_layernorm"))?,
                    Some(vb.get_with_hints((pd, d), "visual_projection.weight", std(0.02))?),
                    v.pp("encoder.layers"),
                )
            }
        };
        let blocks = (0..cfg.depth)
            .map(|i| Block::new(&cfg, blocks_vb.pp(i.to_string())))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind,
            cfg,
            patch_weight,
            patch_bias,
            cls,
            pos,
            pre_norm,
            blocks,
            norm,
            proj,
            fused: false,
        })
    }

    pub fn config(&self) -> &VitConfig {
        &self.cfg
    }

    /// The same network on detached copies of `vars` (names as [`Vit::new`] creates them)
    /// with candle's fused layer-norm and softmax kernels: faster, and never trained.
    pub fn inference_copy(
        kind: BackboneKind,
        cfg: VitConfig,
        vars: std::collections::HashMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let vb = VarBuilder::from_tensors(vars, DType::F32, device);
        let mut net = Self::new(kind, cfg, vb)?;
        net.fused = true;
        Ok(net)
    }

    /// Patches → tokens with the class token and position embedding (stage 0).
    fn embed(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.cfg.patch;
        let (gh, gw) = (h / p, w / p);
        if gh == 0 || gw == 0 || c != 3 {
            candle_core::bail!(
                "{}: input {b}×{c}×{h}×{w} is smaller than one {p}×{p} patch or not RGB",
                self.kind
            )
        }
        // Patch embedding as one matmul (a stride-p p×p convolution is exactly that); a
        // side that is not a multiple of p loses its last pixels, as a strided conv would.
        let x = x.narrow(2, 0, gh * p)?.narrow(3, 0, gw * p)?;
        let patches = x
            .reshape((b * c * gh, p, gw, p))?
            .transpose(1, 2)?
            .reshape((b, c, gh, gw, p * p))?
            .permute((0, 2, 3, 1, 4))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let wt = self.patch_weight.reshape((self.cfg.dim, c * p * p))?.t()?;
        let mut tokens = patches.broadcast_matmul(&wt)?;
        if let Some(bias) = &self.patch_bias {
            tokens = tokens.broadcast_add(bias)?;
        }
        let d = self.cfg.dim;
        let cls = self.cls.reshape((1, 1, d))?.broadcast_as((b, 1, d))?;
        let tokens = Tensor::cat(&[&cls, &tokens], 1)?;
        let pos = self.position_embedding(gh, gw)?;
        let tokens = tokens.broadcast_add(&pos)?;
        match &self.pre_norm {
            Some(n) => n.forward(&tokens, self.fused),
            None => Ok(tokens),
        }
    }

    /// `[1 + gh·gw, dim]`: the stored embedding, resampled when the grid differs.
    fn position_embedding(&self, gh: usize, gw: usize) -> Result<Tensor> {
        let d = self.cfg.dim;
        let pos = self.pos.reshape(((), d))?;
        let g = self.cfg.grid;
        if (gh, gw) == (g, g) {
            return Ok(pos);
        }
        let m = grid_resample_matrix((g, g), (gh, gw), pos.device())?;
        let patches = m.matmul(&pos.narrow(0, 1, g * g)?)?;
        Tensor::cat(&[&pos.narrow(0, 0, 1)?, &patches], 0)
    }

    /// One pooled token group `[B, dim]` → CLIP's post-norm and projection (CLIP only).
    fn project(&self, t: &Tensor) -> Result<Tensor> {
        let t = self.norm.forward(&t.contiguous()?, self.fused)?;
        match &self.proj {
            Some(w) => t.matmul(&w.t()?),
            None => Ok(t),
        }
    }
}

/// `tokens [B, N, dim]` → the pooled vectors of `pooling`, one `[B, dim]` per part.
fn pool_parts(tokens: &Tensor, pooling: Pooling) -> Result<Vec<Tensor>> {
    let cls = || tokens.i((.., 0));
    let patches = || tokens.narrow(1, 1, tokens.dim(1)? - 1);
    let mean = || patches()?.mean(1);
    let max = || patches()?.max(1);
    Ok(match pooling {
        Pooling::Cls => vec![cls()?],
        Pooling::ClsMean => vec![cls()?, mean()?],
        Pooling::Avg => vec![mean()?],
        Pooling::Max => vec![max()?],
        Pooling::AvgMax => vec![(mean()? + max()?)?],
    })
}

impl Backbone for Vit {
    fn kind(&self) -> BackboneKind {
        self.kind
    }

    fn num_stages(&self) -> usize {
        1 + self.blocks.len()
    }

    fn stage_names(&self) -> Vec<String> {
        let mut names = vec!["patch-embed".to_string()];
        names.extend((0..self.blocks.len()).map(|i| format!("blocks.{i}")));
        names
    }

    fn forward_stages(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        if range.end > self.num_stages() {
            candle_core::bail!(
                "stage range {range:?} is past the {} stages of {}",
                self.num_stages(),
                self.kind
            )
        }
        let mut h = x.clone();
        for i in range {
            h = if i == 0 {
                self.embed(&h)?
            } else {
                self.blocks[i - 1].forward(&h, self.fused)?
            };
        }
        Ok(h)
    }

    fn pool(&self, x: &Tensor) -> Result<Tensor> {
        self.pool_with(x, Pooling::Cls)
    }

    fn pool_with(&self, tokens: &Tensor, pooling: Pooling) -> Result<Tensor> {
        let parts = match self.cfg.family {
            // timm: the final norm runs on every token, then the pooling.
            Family::Dinov2 => pool_parts(&self.norm.forward(tokens, self.fused)?, pooling)?,
            // Hugging Face / OpenAI: pool, then post-norm and projection per pooled token.
            Family::Clip => pool_parts(tokens, pooling)?
                .iter()
                .map(|t| self.project(t))
                .collect::<Result<Vec<_>>>()?,
        };
        if parts.len() == 1 {
            Ok(parts.into_iter().next().expect("one part"))
        } else {
            Tensor::cat(&parts, D::Minus1)
        }
    }

    fn feature_dim(&self) -> usize {
        self.cfg.token_dim()
    }

    fn param_stage(&self, name: &str) -> Option<usize> {
        let last = self.blocks.len();
        let block = |rest: &str| -> Option<usize> {
            let i: usize = rest.split('.').next()?.parse().ok()?;
            (i < last).then_some(i + 1)
        };
        match self.cfg.family {
            Family::Dinov2 => {
                if let Some(rest) = name.strip_prefix("blocks.") {
                    return block(rest);
                }
                if name.starts_with("patch_embed.") || name == "cls_token" || name == "pos_embed" {
                    return Some(0);
                }
                name.starts_with("norm.").then_some(last)
            }
            Family::Clip => {
                if let Some(rest) = name.strip_prefix("vision_model.encoder.layers.") {
                    return block(rest);
                }
                if name.starts_with("vision_model.embeddings.")
                    || name.starts_with("vision_model.pre_layrnorm.")
                {
                    return Some(0);
                }
                (name.starts_with("vision_model.post_layernorm.")
                    || name == "visual_projection.weight")
                    .then_some(last)
            }
        }
    }
}

/// PyTorch's antialiased bicubic kernel (a = −0.5, as PIL), which `F.interpolate(…,
/// mode="bicubic", antialias=True)` and so timm's `resample_abs_pos_embed` use.
fn aa_bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The `[out, in]` matrix of a 1-D antialiased bicubic resize (align_corners = false),
/// computed as PyTorch's `_upsample_bicubic2d_aa` does.
pub fn resample_matrix_1d(n_in: usize, n_out: usize) -> Vec<f64> {
    let scale = n_in as f64 / n_out as f64;
    let support = if scale >= 1.0 { 2.0 * scale } else { 2.0 };
    let inv = if scale >= 1.0 { 1.0 / scale } else { 1.0 };
    let mut m = vec![0.0; n_out * n_in];
    for i in 0..n_out {
        let center = scale * (i as f64 + 0.5);
        // PyTorch truncates toward zero here.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(n_in as i64).max(0) as usize;
        let row = &mut m[i * n_in..(i + 1) * n_in];
        let mut total = 0.0;
        for (j, r) in row.iter_mut().enumerate().take(hi).skip(lo) {
            *r = aa_bicubic((j as f64 - center + 0.5) * inv);
            total += *r;
        }
        if total != 0.0 {
            row.iter_mut().for_each(|r| *r /= total);
        }
    }
    m
}

/// `[gh·gw, h·w]`: resamples a row-major `h×w` grid of vectors to `gh×gw` as one matmul
/// (so it is differentiable and trains the stored embedding).
pub fn grid_resample_matrix(
    from: (usize, usize),
    to: (usize, usize),
    device: &Device,
) -> Result<Tensor> {
    let my = resample_matrix_1d(from.0, to.0);
    let mx = resample_matrix_1d(from.1, to.1);
    let (n_in, n_out) = (from.0 * from.1, to.0 * to.1);
    let mut m = vec![0f32; n_out * n_in];
    for i in 0..to.0 {
        for j in 0..to.1 {
            let row = &mut m[(i * to.1 + j) * n_in..][..n_in];
            for a in 0..from.0 {
                let wy = my[i * from.0 + a];
                if wy == 0.0 {
                    continue;
                }
                for b in 0..from.1 {
                    row[a * from.1 + b] = (wy * mx[j * from.1 + b]) as f32;
                }
            }
        }
    }
    Tensor::from_vec(m, (n_out, n_in), device)
}

/// A published position embedding for another grid (timm's DINOv2 files are made for
/// 518 px, 37×37 patches), resampled to `want`'s grid the way timm does when it loads them.
/// `None` when `name` is not the position embedding or the shapes cannot be reconciled.
pub fn fit_position_embedding(
    kind: BackboneKind,
    name: &str,
    found: &Tensor,
    want: &[usize],
) -> Result<Option<Tensor>> {
    let Some(cfg) = VitConfig::for_kind(kind) else {
        return Ok(None);
    };
    if name != cfg.position_embedding_name() || found.dims().last() != want.last() {
        return Ok(None);
    }
    let d = cfg.dim;
    let n = found.elem_count() / d;
    let side = ((n.saturating_sub(1)) as f64).sqrt().round() as usize;
    if n < 2 || side * side != n - 1 {
        return Ok(None);
    }
    let pos = found.reshape((n, d))?.to_dtype(DType::F32)?;
    let m = grid_resample_matrix((side, side), (cfg.grid, cfg.grid), found.device())?;
    let patches = m.matmul(&pos.narrow(0, 1, n - 1)?)?;
    let out = Tensor::cat(&[&pos.narrow(0, 0, 1)?, &patches], 0)?;
    Ok(Some(out.reshape(want)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::VarMap;

    fn varmap_of(kind: BackboneKind) -> (VarMap, Vit) {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        let net = Vit::new(kind, VitConfig::for_kind(kind).unwrap(), vb).unwrap();
        (varmap, net)
    }

    #[test]
    fn layouts_match_the_published_files() {
        // timm vit_small_patch14_dinov2: 4 embedding tensors + 12 × 14 per block + 2 (norm).
        let (vm, net) = varmap_of(BackboneKind::Dinov2Vits14);
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), 4 + 12 * 14 + 2);
        assert_eq!(data["blocks.11.attn.qkv.weight"].dims(), &[1152, 384]);
        assert_eq!(data["pos_embed"].dims(), &[1, 257, 384]);
        for name in data.keys() {
            assert!(net.param_stage(name).is_some(), "{name}");
        }
        assert_eq!(net.param_stage("blocks.3.ls2.gamma"), Some(4));
        assert_eq!(net.param_stage("norm.bias"), Some(12));
        assert_eq!(net.param_stage("head.weight"), None);
        drop(data);
        // HF CLIPVisionModelWithProjection: 3 embedding + 2 pre-norm + 12 × 16 + 2 + 1.
        let (vm, net) = varmap_of(BackboneKind::ClipVitb16);
        let data = vm.data().lock().unwrap();
        assert_eq!(data.len(), 3 + 2 + 12 * 16 + 2 + 1);
        assert_eq!(
            data["vision_model.embeddings.position_embedding.weight"].dims(),
            &[197, 768]
        );
        assert_eq!(data["visual_projection.weight"].dims(), &[512, 768]);
        for name in data.keys() {
            assert!(net.param_stage(name).is_some(), "{name}");
        }
        assert_eq!(net.stage_names()[1], "blocks.0");
        assert_eq!(net.num_stages(), 13);
    }

    #[test]
    fn resample_matrix_rows_sum_to_one_and_identity_keeps() {
        for (a, b) in [(37, 16), (16, 37), (16, 8), (14, 14)] {
            let m = resample_matrix_1d(a, b);
            for i in 0..b {
                let s: f64 = m[i * a..(i + 1) * a].iter().sum();
                assert!((s - 1.0).abs() < 1e-9, "{a}->{b} row {i}: {s}");
            }
        }
        let m = resample_matrix_1d(5, 5);
        for i in 0..5 {
            for j in 0..5 {
                assert!((m[i * 5 + j] - (i == j) as u8 as f64).abs() < 1e-12);
            }
        }
    }

    /// The CLIP tower equals candle-transformers' `ClipVisionTransformer` (its pooled,
    /// post-normed class token) on the same weights; both training and fused paths.
    #[test]
    fn clip_tower_matches_candle_transformers() {
        use candle_transformers::models::clip::vision_model::ClipVisionTransformer;
        let c = ClipVisionConfig {
            embed_dim: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            projection_dim: 16,
            image_size: 64,
            patch_size: 16,
            ..ClipVisionConfig::vit_base_patch32()
        };
        let cfg = VitConfig::from_clip(&c);
        let dev = Device::Cpu;
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
        let ours = Vit::new(BackboneKind::ClipVitb16, cfg.clone(), vb.clone()).unwrap();
        // Non-trivial norms, so a swapped weight/bias would show.
        for (name, var) in varmap.data().lock().unwrap().iter() {
            if name.contains("norm") {
                var.set(&Tensor::randn(0.5f32, 0.2, var.shape(), &dev).unwrap())
                    .unwrap();
            }
        }
        let theirs = ClipVisionTransformer::new(vb.pp("vision_model"), &c).unwrap();
        let x = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), &dev).unwrap();
        let want = theirs.forward(&x).unwrap();
        let tokens = ours.forward_stages(&x, 0..ours.num_stages()).unwrap();
        let got = ours
            .norm
            .forward(&tokens.i((.., 0)).unwrap().contiguous().unwrap(), false)
            .unwrap();
        let diff = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-4);
        let vars = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect();
        let fused = Vit::inference_copy(BackboneKind::ClipVitb16, cfg, vars, &dev).unwrap();
        let a = ours
            .pool_with(&tokens, Pooling::Cls)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let b = fused.features(&x).unwrap().to_vec2::<f32>().unwrap();
        for (ra, rb) in a.iter().zip(&b) {
            for (u, v) in ra.iter().zip(rb) {
                assert!((u - v).abs() < 1e-4, "{u} vs {v}");
            }
        }
    }
}
