//! BN-Inception (Ioffe & Szegedy 2015), the backbone of most deep-metric-learning papers,
//! in the layout of Cadene's `pretrainedmodels.bninception` (converted from Caffe): every
//! conv has a bias and is followed by batch norm (ε = 1e-5) and ReLU; max pools use
//! `ceil_mode`; the inception pool branches average with zero padding counted.
//!
//! Variable names are the published ones (`conv1_7x7_s2`, `conv1_7x7_s2_bn`,
//! `inception_3a_1x1`, `inception_3a_double_3x3_reduce_bn`, …); `last_linear` is not built.
//! Input: BGR, 0–255, minus [104, 117, 128]; output 1024 channels at 1/32 resolution.
//!
//! Stages of the [`Backbone`] trait: 0 = stem (conv1, pool1, conv2 reduce, conv2, pool2),
//! then one stage per inception module: 3a, 3b, 3c, 4a–4e, 5a, 5b (stages 1–10).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::bias_act::Activation::Relu;
use super::layers::{ConvBn, ConvSpec, Padding};
use super::{Backbone, BackboneKind};
use crate::ops;

pub const BN_EPS: f64 = 1e-5;
pub const FEATURE_DIM: usize = 1024;

/// How an inception module's pool branch pools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PoolKind {
    /// 3×3/1 average, padding 1 counted as zeros, then a 1×1 projection.
    Avg,
    /// 3×3/1 max, padding 1, then a 1×1 projection (5b only).
    MaxStride1,
    /// 3×3/2 max with `ceil_mode`, no projection (the grid-reduction modules 3c and 4e).
    MaxStride2,
}

/// One inception module's widths. `None` branches are absent.
struct ModuleConfig {
    name: &'static str,
    in_ch: usize,
    c1x1: Option<usize>,
    /// (reduce, 3×3)
    c3x3: (usize, usize),
    /// (reduce, first 3×3, second 3×3)
    double: (usize, usize, usize),
    pool: PoolKind,
    pool_proj: Option<usize>,
}

const MODULES: [ModuleConfig; 10] = [
    ModuleConfig {
        name: "3a",
        in_ch: 192,
        c1x1: Some(64),
        c3x3: (64, 64),
        double: (64, 96, 96),
        pool: PoolKind::Avg,
        pool_proj: Some(32),
    },
    ModuleConfig {
        name: "3b",
        in_ch: 256,
        c1x1: Some(64),
        c3x3: (64, 96),
        double: (64, 96, 96),
        pool: PoolKind::Avg,
        pool_proj: Some(64),
    },
    ModuleConfig {
        name: "3c",
        in_ch: 320,
        c1x1: None,
        c3x3: (128, 160),
        double: (64, 96, 96),
        pool: PoolKind::MaxStride2,
        pool_proj: None,
    },
    ModuleConfig {
        name: "4a",
        in_ch: 576,
        c1x1: Some(224),
        c3x3: (64, 96),
        double: (96, 128, 128),
        pool: PoolKind::Avg,
        pool_proj: Some(128),
    },
    ModuleConfig {
        name: "4b",
        in_ch: 576,
        c1x1: Some(192),
        c3x3: (96, 128),
        double: (96, 128, 128),
        pool: PoolKind::Avg,
        pool_proj: Some(128),
    },
    ModuleConfig {
        name: "4c",
        in_ch: 576,
        c1x1: Some(160),
        c3x3: (128, 160),
        double: (128, 160, 160),
        pool: PoolKind::Avg,
        pool_proj: Some(128),
    },
    ModuleConfig {
        name: "4d",
        in_ch: 608,
        c1x1: Some(96),
        c3x3: (128, 192),
        double: (160, 192, 192),
        pool: PoolKind::Avg,
        pool_proj: Some(128),
    },
    ModuleConfig {
        name: "4e",
        in_ch: 608,
        c1x1: None,
        c3x3: (128, 192),
        double: (192, 256, 256),
        pool: PoolKind::MaxStride2,
        pool_proj: None,
    },
    ModuleConfig {
        name: "5a",
        in_ch: 1056,
        c1x1: Some(352),
        c3x3: (192, 320),
        double: (160, 224, 224),
        pool: PoolKind::Avg,
        pool_proj: Some(128),
    },
    ModuleConfig {
        name: "5b",
        in_ch: 1024,
        c1x1: Some(352),
        c3x3: (192, 320),
        double: (192, 224, 224),
        pool: PoolKind::MaxStride1,
        pool_proj: Some(128),
    },
];

/// Conv (with bias) + BN named `{name}` / `{name}_bn`, as in the published checkpoint.
fn unit(
    vb: &VarBuilder,
    name: &str,
    in_ch: usize,
    out: usize,
    kernel: usize,
    stride: usize,
) -> Result<ConvBn> {
    let spec =
        ConvSpec::dense(in_ch, out, kernel, stride, Padding::Symmetric(kernel / 2)).with_bias();
    ConvBn::new(spec, BN_EPS, vb.pp(name), vb.pp(format!("{name}_bn")))
}

/// 3×3/2 max pool with PyTorch's `ceil_mode=True`: the last window may hang over the
/// bottom/right edge; those cells are padding, which never wins a max.
fn max_pool_3x3_s2_ceil(x: &Tensor) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let extra = |n: usize| {
        let out = (n.saturating_sub(3)).div_ceil(2) + 1;
        ((out - 1) * 2 + 3).saturating_sub(n)
    };
    ops::max_pool2d(x, 3, 2, [0, extra(h), 0, extra(w)])
}

/// Conv units applied in sequence, each followed by ReLU.
fn chain(units: &[ConvBn], x: &Tensor) -> Result<Tensor> {
    units
        .iter()
        .try_fold(x.clone(), |h, u| u.forward_act(&h, Relu))
}

struct InceptionModule {
    branches: Vec<Vec<ConvBn>>,
    pool: PoolKind,
    pool_proj: Option<ConvBn>,
}

impl InceptionModule {
    fn new(cfg: &ModuleConfig, vb: &VarBuilder) -> Result<Self> {
        let p = format!("inception_{}", cfg.name);
        // The grid-reduction modules (no pool projection) stride their 3×3 branches.
        let stride = if cfg.pool == PoolKind::MaxStride2 {
            2
        } else {
            1
        };
        let mut branches = Vec::new();
        if let Some(c) = cfg.c1x1 {
            branches.push(vec![unit(vb, &format!("{p}_1x1"), cfg.in_ch, c, 1, 1)?]);
        }
        let (r, c) = cfg.c3x3;
        branches.push(vec![
            unit(vb, &format!("{p}_3x3_reduce"), cfg.in_ch, r, 1, 1)?,
            unit(vb, &format!("{p}_3x3"), r, c, 3, stride)?,
        ]);
        let (r, c1, c2) = cfg.double;
        branches.push(vec![
            unit(vb, &format!("{p}_double_3x3_reduce"), cfg.in_ch, r, 1, 1)?,
            unit(vb, &format!("{p}_double_3x3_1"), r, c1, 3, 1)?,
            unit(vb, &format!("{p}_double_3x3_2"), c1, c2, 3, stride)?,
        ]);
        let pool_proj = match cfg.pool_proj {
            Some(c) => Some(unit(vb, &format!("{p}_pool_proj"), cfg.in_ch, c, 1, 1)?),
            None => None,
        };
        Ok(Self {
            branches,
            pool: cfg.pool,
            pool_proj,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::with_capacity(self.branches.len() + 1);
        for b in &self.branches {
            outs.push(chain(b, x)?);
        }
        let pooled = match self.pool {
            PoolKind::Avg => ops::avg_pool2d(x, 3, 1, [1; 4])?,
            PoolKind::MaxStride1 => ops::max_pool2d(x, 3, 1, [1; 4])?,
            PoolKind::MaxStride2 => max_pool_3x3_s2_ceil(x)?,
        };
        outs.push(match &self.pool_proj {
            Some(p) => p.forward_act(&pooled, Relu)?,
            None => pooled,
        });
        Tensor::cat(&outs, 1)
    }
}

/// BN-Inception feature extractor: `[B, 3, H, W]` → `[B, 1024, H/32, W/32]`.
pub struct BnInception {
    stem: Vec<ConvBn>,
    modules: Vec<InceptionModule>,
}

impl BnInception {
    pub fn new(vb: VarBuilder) -> Result<Self> {
        let stem = vec![
            unit(&vb, "conv1_7x7_s2", 3, 64, 7, 2)?,
            unit(&vb, "conv2_3x3_reduce", 64, 64, 1, 1)?,
            unit(&vb, "conv2_3x3", 64, 192, 3, 1)?,
        ];
        let modules = MODULES
            .iter()
            .map(|cfg| InceptionModule::new(cfg, &vb))
            .collect::<Result<_>>()?;
        Ok(Self { stem, modules })
    }

    fn run_stem(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.stem[0].forward_act(x, Relu)?;
        let h = max_pool_3x3_s2_ceil(&h)?;
        let h = chain(&self.stem[1..], &h)?;
        max_pool_3x3_s2_ceil(&h)
    }
}

impl Backbone for BnInception {
    fn kind(&self) -> BackboneKind {
        BackboneKind::BnInception
    }

    fn num_stages(&self) -> usize {
        1 + self.modules.len()
    }

    fn stage_names(&self) -> Vec<String> {
        let mut names = vec!["stem".to_string()];
        names.extend(MODULES.iter().map(|m| format!("inception_{}", m.name)));
        names
    }

    fn forward_stages(&self, x: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor> {
        if range.end > self.num_stages() {
            candle_core::bail!(
                "stage range {range:?} is past the {} stages of bn-inception",
                self.num_stages()
            )
        }
        range.into_iter().try_fold(x.clone(), |h, i| match i {
            0 => self.run_stem(&h),
            i => self.modules[i - 1].forward(&h),
        })
    }

    fn feature_dim(&self) -> usize {
        FEATURE_DIM
    }

    fn param_stage(&self, name: &str) -> Option<usize> {
        if name.starts_with("conv1_") || name.starts_with("conv2_") {
            return Some(0);
        }
        let rest = name.strip_prefix("inception_")?;
        let module = rest.get(..2)?;
        MODULES.iter().position(|m| m.name == module).map(|i| i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn published_layout_and_stages() {
        let varmap = VarMap::new();
        let net =
            BnInception::new(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let data = varmap.data().lock().unwrap();
        // 3 stem convs + 8 × 7 + 2 × 5 (3c, 4e) = 69 conv units, 6 variables each.
        assert_eq!(data.len(), 69 * 6);
        assert_eq!(data["conv1_7x7_s2.weight"].dims(), &[64, 3, 7, 7]);
        assert_eq!(
            data["inception_4e_double_3x3_2_bn.running_var"].dims(),
            &[256]
        );
        assert_eq!(data["inception_5b_pool_proj.bias"].dims(), &[128]);
        for name in data.keys() {
            assert!(net.param_stage(name).is_some(), "{name}");
        }
        assert_eq!(net.param_stage("conv2_3x3_bn.weight"), Some(0));
        assert_eq!(net.param_stage("inception_3c_3x3.weight"), Some(3));
        assert_eq!(net.param_stage("inception_5b_1x1.weight"), Some(10));
        assert_eq!(net.param_stage("last_linear.weight"), None);
    }

    #[test]
    fn ceil_mode_pool_sizes() {
        // PyTorch: ceil((n − 3) / 2) + 1 → 114 → 57, 57 → 28, 28 → 14, 7 → 3.
        for (n, want) in [(114, 57), (57, 28), (28, 14), (14, 7), (7, 3)] {
            let x = Tensor::zeros((1, 1, n, n), DType::F32, &Device::Cpu).unwrap();
            assert_eq!(
                max_pool_3x3_s2_ceil(&x).unwrap().dims(),
                &[1, 1, want, want],
                "n = {n}"
            );
        }
    }
}
