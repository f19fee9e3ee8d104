//! Building blocks shared by the backbones: frozen-statistics batch norm folded into the
//! convolution before it, and the activations the networks use.
//!
//! The project freezes batch-norm statistics (standard for metric learning with small
//! batches), so a BN layer is the per-channel affine map
//! `y = (x − mean) · γ / √(var + ε) + β`. Because that map follows a bias-free convolution, it
//! is folded into the convolution *on every forward pass*, from the current variables:
//! `w' = w · s`, `b' = β − mean · s` with `s = γ / √(var + ε)`. That costs a pass over the (small)
//! weights instead of two passes over the (large) activations, and since the fold is written
//! in candle ops it stays differentiable in `w`, `γ` and `β` — fine-tuning works unchanged.
//! The running statistics are detached: they are buffers, never trained.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::bias_act::Activation;
use crate::ops::{self, Pad4};

/// Variable-name suffixes of batch-norm running statistics. They are created as variables so
/// they load and save with the rest of the weights, but they never receive gradients.
pub const RUNNING_STAT_SUFFIXES: [&str; 2] = [".running_mean", ".running_var"];

/// Batch norm with frozen running statistics (inference semantics, always).
#[derive(Debug, Clone)]
pub struct FrozenBatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    eps: f64,
}

impl FrozenBatchNorm {
    /// Creates `weight`, `bias`, `running_mean`, `running_var` (all `[channels]`) under `vb`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", Init::Const(1.0))?,
            bias: vb.get_with_hints(channels, "bias", Init::Const(0.0))?,
            running_mean: vb.get_with_hints(channels, "running_mean", Init::Const(0.0))?,
            running_var: vb.get_with_hints(channels, "running_var", Init::Const(1.0))?,
            eps,
        })
    }

    /// Per-channel `(scale, shift)` with `bn(x) = x · scale + shift`; differentiable in γ, β.
    pub fn scale_shift(&self) -> Result<(Tensor, Tensor)> {
        let inv_std = (self.running_var.detach() + self.eps)?.sqrt()?.recip()?;
        let scale = self.weight.mul(&inv_std)?;
        let shift = self.bias.sub(&self.running_mean.detach().mul(&scale)?)?;
        Ok((scale, shift))
    }
}

/// How a convolution pads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// TensorFlow "SAME": output = ⌈input / stride⌉, extra padding at the bottom/right. The
    /// amounts depend on the input size, so they are computed per call.
    Same,
    /// The same number of zeros on every side (PyTorch's `padding=p`).
    Symmetric(usize),
}

impl Padding {
    fn resolve(self, h: usize, w: usize, kernel: usize, stride: usize) -> Pad4 {
        match self {
            Padding::Same => {
                let (t, b) = ops::same_padding(h, kernel, stride);
                let (l, r) = ops::same_padding(w, kernel, stride);
                [t, b, l, r]
            }
            Padding::Symmetric(p) => [p; 4],
        }
    }
}

/// Geometry of a square convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: Padding,
    /// Depthwise (one filter per channel; requires `in_channels == out_channels`).
    pub depthwise: bool,
    /// The convolution has its own bias (BN-Inception's do; ResNet's and EfficientNet's don't).
    pub bias: bool,
}

impl ConvSpec {
    pub fn dense(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: Padding,
    ) -> Self {
        Self {
            in_channels,
            out_channels,
            kernel,
            stride,
            padding,
            depthwise: false,
            bias: false,
        }
    }
    pub fn depthwise(channels: usize, kernel: usize, stride: usize, padding: Padding) -> Self {
        Self {
            in_channels: channels,
            out_channels: channels,
            kernel,
            stride,
            padding,
            depthwise: true,
            bias: false,
        }
    }
    pub fn with_bias(mut self) -> Self {
        self.bias = true;
        self
    }
}

/// Convolution followed by frozen batch norm, folded (see the module docs). Variables:
/// `{conv}.weight` (`[out, in, k, k]`, or `[c, 1, k, k]` depthwise), `{conv}.bias` when the
/// spec has one, and the BN's four under `{bn}`. No activation: callers apply their own.
#[derive(Debug, Clone)]
pub struct ConvBn {
    spec: ConvSpec,
    weight: Tensor,
    bias: Option<Tensor>,
    bn: FrozenBatchNorm,
}

impl ConvBn {
    /// `conv_vb` and `bn_vb` are the builders of the conv's and the BN's variables, so each
    /// backbone keeps the key layout of its published checkpoints.
    pub fn new(
        spec: ConvSpec,
        bn_eps: f64,
        conv_vb: VarBuilder,
        bn_vb: VarBuilder,
    ) -> Result<Self> {
        let in_per_group = if spec.depthwise {
            if spec.in_channels != spec.out_channels {
                candle_core::bail!(
                    "depthwise conv needs equal in/out channels, got {} → {}",
                    spec.in_channels,
                    spec.out_channels
                )
            }
            1
        } else {
            spec.in_channels
        };
        let shape = (spec.out_channels, in_per_group, spec.kernel, spec.kernel);
        let weight =
            conv_vb.get_with_hints(shape, "weight", candle_nn::init::DEFAULT_KAIMING_NORMAL)?;
        let bias = if spec.bias {
            Some(conv_vb.get_with_hints(spec.out_channels, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        let bn = FrozenBatchNorm::new(spec.out_channels, bn_eps, bn_vb)?;
        Ok(Self {
            spec,
            weight,
            bias,
            bn,
        })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }
}

impl ConvBn {
    /// `act(bn(conv(x)))`, the bias and activation fused into one pass.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (scale, shift) = self.bn.scale_shift()?;
        let weight =
            self.weight
                .broadcast_mul(&scale.reshape((self.spec.out_channels, 1, 1, 1))?)?;
        let shift = match &self.bias {
            Some(b) => (b.mul(&scale)? + shift)?,
            None => shift,
        };
        let pad = self
            .spec
            .padding
            .resolve(h, w, self.spec.kernel, self.spec.stride);
        let (stride, depthwise) = (self.spec.stride, self.spec.depthwise);
        ops::conv_bias_act(x, &weight, &shift, stride, pad, depthwise, act)
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }
}
