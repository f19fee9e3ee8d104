//! Training-path convolution + folded-BN shift + activation as one autograd node.
//!
//! As three nodes (conv, then [`bias_act`]) the graph kept the conv's raw output alive next
//! to the activation, and candle's backward gave that intermediate its own gradient: for
//! every tensor that receives a gradient it allocates a zero tensor and adds the gradient
//! to it, one more activation-sized allocation and two more passes per layer (at batch 32
//! EfficientNet's expanded activations are 150 MB each). Fused, the shift and activation
//! run in the conv's output pass and the backward goes straight from the activation's
//! gradient to the conv's input and weight gradients.

use super::bias_act::{self, bias_act, Activation, BiasAct};
use super::conv::{self, Conv2d, DenseWeights};
use super::depthwise::{self, DepthwiseConv};
use super::elem::{checked_slice, with_float_storage};
use super::{check_weight, conv2d, depthwise_conv2d, Geom, MemoryFormat, Pad4, Threads};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
};

/// `act(conv(x, w) + shift[c])` (depthwise when `depthwise`): `x [B, Cin, H, W]`, `w [Cout,
/// Cin, k, k]` or `[C, 1, k, k]`, `shift [Cout]`. Differentiable w.r.t. all three; on devices
/// or dtypes without the fused CPU kernel it is the same maths unfused.
pub fn conv_bias_act(
    x: &Tensor,
    w: &Tensor,
    shift: &Tensor,
    stride: usize,
    pad: Pad4,
    depthwise: bool,
    act: Activation,
) -> Result<Tensor> {
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        let y = if depthwise {
            depthwise_conv2d(x, w, stride, pad)?
        } else {
            conv2d(x, w, stride, pad)?
        };
        return bias_act(&y, shift, act);
    }
    const OP: &str = "conv_bias_act";
    let cin = x.dims().get(1).copied().unwrap_or(0);
    let (want_in, in_name) = if depthwise {
        (1, "1 (depthwise)")
    } else {
        (cin, "Cin")
    };
    check_weight(OP, x, w, want_in, in_name)?;
    let (co, _, kh, kw) = w.dims4()?;
    let g = Geom::new(OP, x, co, (kh, kw), stride, pad)?;
    if depthwise && co != g.c {
        candle_core::bail!(
            "{OP}: depthwise weight has {co} filters for {} input channels",
            g.c
        )
    }
    if shift.dims() != [co] || shift.dtype() != x.dtype() {
        candle_core::bail!(
            "conv_bias_act: shift {:?} {:?} must be [{co}] {:?}",
            shift.dims(),
            shift.dtype(),
            x.dtype()
        )
    }
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &shift.contiguous()?,
        ConvBiasAct { g, depthwise, act },
    )
}

struct ConvBiasAct {
    g: Geom,
    depthwise: bool,
    act: Activation,
}

impl CustomOp3 for ConvBiasAct {
    fn name(&self) -> &'static str {
        "conv_bias_act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, act) = (&self.g, self.act);
        let per_filter = if self.depthwise { 1 } else { g.c } * g.kh * g.kw;
        with_float_storage!(self.name(), s1, |T| {
            let x = checked_slice::<T>(s1, l1, self.name(), "input", g.in_len())?;
            let w = checked_slice::<T>(s2, l2, self.name(), "weight", g.co * per_filter)?;
            let b = checked_slice::<T>(s3, l3, self.name(), "shift", g.co)?;
            let howo = g.ho * g.wo;
            let out = if self.depthwise {
                depthwise::forward_with(x, w, g, Threads::Pool, |plane, o| {
                    bias_act::in_place(o, b[plane % g.c], act)
                })
            } else {
                let w = DenseWeights::OutIn(w);
                conv::forward_with(x, MemoryFormat::Nchw, w, g, Threads::Pool, |_, ch0, o| {
                    for (k, o) in o.chunks_mut(howo).enumerate() {
                        bias_act::in_place(o, b[ch0 + k], act)
                    }
                })
            };
            Ok((T::to_cpu_storage_owned(out), g.out_shape()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        shift: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The activation's backward reads only `res` and `grad`; then the conv's.
        let (gy, gb) = BiasAct(self.act).bwd(x, shift, res, grad)?;
        let gy = gy.expect("bias_act always returns an input gradient");
        let (gx, gw) = if self.depthwise {
            DepthwiseConv { g: self.g }.bwd(x, w, res, &gy)?
        } else {
            Conv2d { g: self.g }.bwd(x, w, res, &gy)?
        };
        let gb = if shift.track_op() { gb } else { None };
        Ok((gx, gw, gb))
    }
}
