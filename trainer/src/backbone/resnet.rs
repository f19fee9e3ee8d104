//! ResNet-18 and ResNet-50 (He et al. 2016) in the torchvision/timm layout: stride on the
//! 3×3 conv of bottlenecks ("v1.5"), 1×1 projection shortcuts (`downsample.0` conv +
//! `downsample.1` BN), batch-norm ε = 1e-5. Variable names are the published ones
//! (`conv1`, `bn1`, `layer1.0.conv1`, …), so timm and torchvision checkpoints load as they are.
//!
//! Stages of the [`Backbone`] trait: 0 = stem (conv1, bn1, ReLU, 3×3/2 max pool),
//! 1–4 = `layer1`–`layer4`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::bias_act::Activation;
use super::layers::{ConvBn, ConvSpec, Padding};
use super::{Backbone, BackboneKind};
use crate::ops;

/// PyTorch's batch-norm default, which both timm and torchvision ResNets use.
pub const BN_EPS: f64 = 1e-5;
pub const RESNET18_FEATURE_DIM: usize = 512;
pub const RESNET50_FEATURE_DIM: usize = 2048;

fn conv_bn(vb: &VarBuilder, conv: &str, bn: &str, spec: ConvSpec) -> Result<ConvBn> {
    ConvBn::new(spec, BN_EPS, vb.pp(conv), vb.pp(bn))
}

/// A residual block: basic (two 3×3) or bottleneck (1×1 → 3×3 → 1×1, ×4 expansion).
#[derive(Debug, Clone)]
pub struct Block {
    convs: Vec<ConvBn>,
    downsample: Option<ConvBn>,
}

impl Block {
    fn basic(in_ch: usize, width: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let convs = vec![
            conv_bn(
                &vb,
                "conv1",
                "bn1",
                ConvSpec::dense(in_ch, width, 3, stride, Padding::Symmetric(1)),
            )?,
            conv_bn(
                &vb,
                "conv2",
                "bn2",
                ConvSpec::dense(width, width, 3, 1, Padding::Symmetric(1)),
            )?,
        ];
        Ok(Self {
            convs,
            downsample: Self::shortcut(in_ch, width, stride, &vb)?,
        })
    }

    fn bottleneck(in_ch: usize, width: usize, stride: usize, vb: VarBuilder) -> Result<Self> {
        let out = width * 4;
        let convs = vec![
            conv_bn(
                &vb,
                "conv1",
                "bn1",
                ConvSpec::dense(in_ch, width, 1, 1, Padding::Symmetric(0)),
            )?,
            conv_bn(
                &vb,
                "conv2",
                "bn2",
                ConvSpec::dense(width, width, 3, stride, Padding::Symmetric(1)),
            )?,
            conv_bn(
                &vb,
                "conv3",
                "bn3",
                ConvSpec::dense(width, out, 1, 1, Padding::Symmetric(0)),
            )?,
        ];
        Ok(Self {
            convs,
            downsample: Self::shortcut(in_ch, out, stride, &vb)?,
        })
    }

    fn shortcut(
        in_ch: usize,
        out: usize,
        stride: usize,
        vb: &VarBuilder,
    ) -> Result<Option<ConvBn>> {
        if stride == 1 && in_ch == out {
            return Ok(None);
        }
        let spec = ConvSpec::dense(in_ch, out, 1, stride, Padding::Symmetric(0));
        Ok(Some(conv_bn(vb, "downsample.0", "downsample.1", spec)?))
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let last = self.convs.len() - 1;
        let mut h = x.clone();
        for (i, c) in self.convs.iter().enumerate() {
            let act = if i == last {
                Activation::Identity
            } else {
                Activation::Relu
            };
            h = c.forward_act(&h, act)?;
        }
        let identity = match &self.downsample {
            Some(d) => d.forward(x)?,
            None => x.clone(),
        };
        (h + identity)?.relu()
    }
}

/// A ResNet feature extractor: `[B, 3, H, W]` → `[B, C, H/32, W/32]`.
#[derive(Debug, Clone)]
pub struct ResNet {
    kind: BackboneKind,
    stem: ConvBn,
    layers: Vec<Vec<Block>>,
    feature_dim: usize,
}

impl ResNet {
    pub fn resnet18(vb: VarBuilder) -> Result<Self> {
        Self::new(BackboneKind::Resnet18, [2, 2, 2, 2], false, vb)
    }

    pub fn resnet50(vb: VarBuilder) -> Result<Self> {
        Self::new(BackboneKind::Resnet50, [3, 4, 6, 3], true, vb)
    }

    fn new(
        kind: BackboneKind,
        depths: [usize; 4],
        bottleneck: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let stem = conv_bn(
            &vb,
            "conv1",
            "bn1",
            ConvSpec::dense(3, 64, 7, 2, Padding::Symmetric(3)),
        )?;
        let mut in_ch = 64;
        let mut layers = Vec::with_capacity(4);
        for (i, &depth) in depths.iter().enumerate() {
            let width = 64 << i;
            let mut blocks = Vec::with_capacity(depth);
            for j in 0..depth {
                let stride = if i > 0 && j == 0 { 2 } else { 1 };
                let vb_b = vb.pp(format!("layer{}.{j}", i + 1));
                let block = if bottleneck {
                    Block::bottleneck(in_ch, width, stride, vb_b)?
                } else {
                    Block::basic(in_ch, width, stride, vb_b)?
                };
                in_ch = if bottleneck { width * 4 } else { width };
                blocks.push(block);
            }
            layers.push(blocks);
        }
        Ok(Self {
            kind,
            stem,
            layers,
            feature_dim: in_ch,
        })
    }
}

impl Backbone for ResNet {
    fn kind(&self) -> BackboneKind {
        self.kind
    }

    fn num_stages(&self) -> usize {
        1 + self.layers.len()
    }

    fn stage_names(&self) -> Vec<String> {
        let mut names = vec!["stem".to_string()];
        names.extend((1..=self.layers.len()).map(|i| format!("layer{i}")));
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
                let s = self.stem.forward_act(&h, Activation::Relu)?;
                ops::max_pool2d(&s, 3, 2, [1, 1, 1, 1])?
            } else {
                self.layers[i - 1]
                    .iter()
                    .try_fold(h, |h, b| b.forward(&h))?
            };
        }
        Ok(h)
    }

    fn feature_dim(&self) -> usize {
        self.feature_dim
    }

    fn param_stage(&self, name: &str) -> Option<usize> {
        if name.starts_with("conv1.") || name.starts_with("bn1.") {
            return Some(0);
        }
        let rest = name.strip_prefix("layer")?;
        let i: usize = rest.split('.').next()?.parse().ok()?;
        (1..=self.layers.len()).contains(&i).then_some(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    #[test]
    fn layouts_match_torchvision() {
        let varmap = VarMap::new();
        let net =
            ResNet::resnet50(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        let data = varmap.data().lock().unwrap();
        // torchvision's resnet50 state dict: 161 weights/biases + 106 running stats − fc (2).
        assert_eq!(data.len(), 320 - 53 - 2);
        assert_eq!(
            data["layer2.0.downsample.0.weight"].dims(),
            &[512, 256, 1, 1]
        );
        assert_eq!(data["layer4.2.conv3.weight"].dims(), &[2048, 512, 1, 1]);
        assert_eq!(net.feature_dim(), RESNET50_FEATURE_DIM);
        assert_eq!(net.param_stage("bn1.running_var"), Some(0));
        assert_eq!(net.param_stage("layer3.5.bn2.weight"), Some(3));
        assert_eq!(net.param_stage("fc.weight"), None);
        for name in data.keys() {
            assert!(net.param_stage(name).is_some(), "{name}");
        }
        drop(data);
        let varmap = VarMap::new();
        let net =
            ResNet::resnet18(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu)).unwrap();
        // torchvision's resnet18 state dict has 122 entries: 102 without fc and num_batches_tracked.
        assert_eq!(varmap.data().lock().unwrap().len(), 122 - 20 - 2);
        assert_eq!(net.feature_dim(), RESNET18_FEATURE_DIM);
    }
}
