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

use std::cell::RefCell;

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};

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

thread_local! {
    /// `Some` while a [`BatchNormTraining`] guard is alive on this thread.
    static BATCH_STATS: RefCell<Option<Vec<BatchStat>>> = const { RefCell::new(None) };
}

/// The statistics one batch-norm layer normalised a training batch with.
#[derive(Debug, Clone)]
pub struct BatchStat {
    /// The BN's variable prefix (`backbone.blocks.3.0.dw.bn`).
    pub bn: String,
    /// Per-channel batch mean, `[C]`.
    pub mean: Tensor,
    /// Per-channel unbiased batch variance, `[C]` (what running statistics average).
    pub var: Tensor,
}

/// Train-mode batch norm (`trainer --bn train`) for the forward passes run on this thread
/// while the guard lives: every [`ConvBn`] normalises with its batch's own statistics
/// (differentiably, as PyTorch's `model.train()`) and records them, so the caller can
/// move the running statistics towards them with [`update_running_stats`] after the step.
/// Data far from ImageNet (characters, medical scans) can then re-centre every layer
/// instead of compensating through the weights. Frozen statistics stay the default: with
/// small P×K batches batch statistics are noisy, and the metric-learning protocol freezes them.
pub struct BatchNormTraining(());

impl BatchNormTraining {
    pub fn start() -> Self {
        BATCH_STATS.with(|s| *s.borrow_mut() = Some(Vec::new()));
        Self(())
    }

    /// Ends train mode and returns the statistics the layers used.
    pub fn finish(self) -> Vec<BatchStat> {
        BATCH_STATS.with(|s| s.borrow_mut().take().unwrap_or_default())
    }
}

impl Drop for BatchNormTraining {
    fn drop(&mut self) {
        BATCH_STATS.with(|s| *s.borrow_mut() = None);
    }
}

fn batch_stats_active() -> bool {
    BATCH_STATS.with(|s| s.borrow().is_some())
}

/// `running ← (1 − momentum)·running + momentum·batch` for each recorded layer (PyTorch's
/// rule, momentum 0.1), on the variables of `varmap`.
pub fn update_running_stats(varmap: &VarMap, stats: &[BatchStat], momentum: f64) -> Result<()> {
    let data = varmap.data().lock().expect("varmap lock");
    for st in stats {
        for (suffix, batch) in [("running_mean", &st.mean), ("running_var", &st.var)] {
            let name = format!("{}.{suffix}", st.bn);
            let Some(var) = data.get(&name) else {
                candle_core::bail!("batch norm statistic {name} is not a model variable");
            };
            let old = var.as_tensor().detach();
            let new = ((old * (1.0 - momentum))? + (batch.to_dtype(var.dtype())? * momentum)?)?;
            var.set(&new)?;
        }
    }
    Ok(())
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
    /// The BN's variable prefix, naming its statistics in train mode.
    bn_name: String,
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
        let bn_name = bn_vb.prefix();
        let bn = FrozenBatchNorm::new(spec.out_channels, bn_eps, bn_vb)?;
        Ok(Self {
            spec,
            weight,
            bias,
            bn,
            bn_name,
        })
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }
}

impl ConvBn {
    /// `act(bn(conv(x)))`, the bias and activation fused into one pass.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        if batch_stats_active() {
            return self.forward_batch_stats(x, act);
        }
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

impl ConvBn {
    /// Train-mode BN: `act(γ·(y − μ_B)/√(σ²_B + ε) + β)` with `y = conv(x)` and the batch's
    /// per-channel mean and (biased) variance, all differentiable; records the statistics.
    fn forward_batch_stats(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let c = self.spec.out_channels;
        let pad = self
            .spec
            .padding
            .resolve(h, w, self.spec.kernel, self.spec.stride);
        let shift = match &self.bias {
            Some(b) => b.clone(),
            None => Tensor::zeros(c, x.dtype(), x.device())?,
        };
        let y = ops::conv_bias_act(
            x,
            &self.weight,
            &shift,
            self.spec.stride,
            pad,
            self.spec.depthwise,
            Activation::Identity,
        )?;
        let (b, _, oh, ow) = y.dims4()?;
        let count = (b * oh * ow) as f64;
        let channel_mean = |t: &Tensor| -> Result<Tensor> {
            t.transpose(0, 1)?
                .reshape((c, ()))?
                .mean_keepdim(1)?
                .reshape((1, c, 1, 1))
        };
        let mean = channel_mean(&y)?;
        let centered = y.broadcast_sub(&mean)?;
        let var = channel_mean(&centered.sqr()?)?;
        let inv_std = (&var + self.bn.eps)?.sqrt()?.recip()?;
        let scale = self
            .bn
            .weight
            .reshape((1, c, 1, 1))?
            .broadcast_mul(&inv_std)?;
        let z = centered
            .broadcast_mul(&scale)?
            .broadcast_add(&self.bn.bias.reshape((1, c, 1, 1))?)?;
        let z = match act {
            Activation::Identity => z,
            Activation::Relu => z.relu()?,
            Activation::Relu6 => z.clamp(0.0, 6.0)?,
        };
        let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?;
        BATCH_STATS.with(|s| {
            if let Some(v) = s.borrow_mut().as_mut() {
                v.push(BatchStat {
                    bn: self.bn_name.clone(),
                    mean: mean.detach().flatten_all()?,
                    var: unbiased.flatten_all()?,
                });
            }
            Ok::<(), candle_core::Error>(())
        })?;
        Ok(z)
    }
}

impl Module for ConvBn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::Identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// A 3→4 3×3 conv + BN with non-trivial statistics and affine parameters, in f64.
    fn layer(varmap: &VarMap) -> ConvBn {
        let vb = VarBuilder::from_varmap(varmap, DType::F64, &Device::Cpu);
        let l = ConvBn::new(
            ConvSpec::dense(3, 4, 3, 1, Padding::Symmetric(1)),
            1e-3,
            vb.pp("conv"),
            vb.pp("bn"),
        )
        .unwrap();
        let data = varmap.data().lock().unwrap();
        for (name, v) in [
            ("bn.weight", [1.5, 0.5, 2.0, 1.0]),
            ("bn.bias", [0.1, -0.2, 0.3, 0.0]),
            ("bn.running_mean", [0.5, -0.5, 0.0, 1.0]),
            ("bn.running_var", [2.0, 0.5, 1.0, 4.0]),
        ] {
            data[name]
                .set(&Tensor::new(&v, &Device::Cpu).unwrap())
                .unwrap();
        }
        l
    }

    fn input() -> Tensor {
        Tensor::randn(0f64, 1.0, (3, 3, 5, 5), &Device::Cpu).unwrap()
    }

    #[test]
    fn train_mode_normalises_with_batch_statistics_and_updates_running_ones() {
        let varmap = VarMap::new();
        let l = layer(&varmap);
        let x = input();
        let guard = BatchNormTraining::start();
        let z = l.forward_act(&x, Activation::Identity).unwrap();
        let stats = guard.finish();
        assert_eq!(stats.len(), 1);
        assert_eq!(stats[0].bn, "bn");
        // Per channel the output has mean β and standard deviation ≈ γ.
        let z = z.transpose(0, 1).unwrap().reshape((4, ())).unwrap();
        let rows = z.to_vec2::<f64>().unwrap();
        for (c, row) in rows.iter().enumerate() {
            let m = row.iter().sum::<f64>() / row.len() as f64;
            let sd = (row.iter().map(|v| (v - m).powi(2)).sum::<f64>() / row.len() as f64).sqrt();
            let (gamma, beta) = ([1.5, 0.5, 2.0, 1.0][c], [0.1, -0.2, 0.3, 0.0][c]);
            assert!((m - beta).abs() < 1e-9, "channel {c}: mean {m}");
            assert!((sd - gamma).abs() < 1e-2 * gamma, "channel {c}: sd {sd}");
        }
        // Outside the guard the same layer uses the running statistics again.
        let frozen = l.forward_act(&x, Activation::Identity).unwrap();
        assert!(BatchNormTraining::start().finish().is_empty());
        update_running_stats(&varmap, &stats, 0.1).unwrap();
        let data = varmap.data().lock().unwrap();
        let rm = data["bn.running_mean"]
            .as_tensor()
            .to_vec1::<f64>()
            .unwrap();
        let bm = stats[0].mean.to_vec1::<f64>().unwrap();
        for c in 0..4 {
            let want = 0.9 * [0.5, -0.5, 0.0, 1.0][c] + 0.1 * bm[c];
            assert!((rm[c] - want).abs() < 1e-12);
        }
        drop(data);
        let after = l.forward_act(&x, Activation::Identity).unwrap();
        let moved = (after - frozen).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            moved.to_scalar::<f64>().unwrap() > 1e-6,
            "running statistics did not move"
        );
    }

    #[test]
    fn train_mode_gradients_match_finite_differences() {
        let varmap = VarMap::new();
        let l = layer(&varmap);
        let x = Var::from_tensor(&input()).unwrap();
        let f = |t: &Tensor| -> f64 {
            let _g = BatchNormTraining::start();
            let z = l.forward_act(t, Activation::Relu6).unwrap();
            // A loss that weights positions differently, so the gradient is not zero.
            let w = Tensor::arange(0f64, z.elem_count() as f64, &Device::Cpu)
                .unwrap()
                .reshape(z.dims())
                .unwrap();
            (z.sqr().unwrap() * (w * 1e-2).unwrap().cos().unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let guard = BatchNormTraining::start();
        let z = l.forward_act(x.as_tensor(), Activation::Relu6).unwrap();
        drop(guard);
        let w = Tensor::arange(0f64, z.elem_count() as f64, &Device::Cpu)
            .unwrap()
            .reshape(z.dims())
            .unwrap();
        let loss = (z.sqr().unwrap() * (w * 1e-2).unwrap().cos().unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap();
        let gx = gx.to_vec1::<f64>().unwrap();
        let base = x
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let eps = 1e-6;
        for k in (0..base.len()).step_by(7) {
            let mut p = base.clone();
            p[k] += eps;
            let mut m = base.clone();
            m[k] -= eps;
            let shape = x.dims().to_vec();
            let tp = Tensor::from_vec(p, shape.clone(), &Device::Cpu).unwrap();
            let tm = Tensor::from_vec(m, shape, &Device::Cpu).unwrap();
            let numeric = (f(&tp) - f(&tm)) / (2.0 * eps);
            assert!(
                (gx[k] - numeric).abs() <= 1e-4 * numeric.abs().max(1.0),
                "d/dx[{k}]: autograd {} vs finite differences {numeric}",
                gx[k]
            );
        }
    }
}
