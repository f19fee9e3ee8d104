//! Inference-only convolutions with frozen batch norm folded in and the bias, ReLU6 and
//! residual add fused into the kernels' output pass.
//!
//! The training path ([`crate::backbone::layers::ConvBn`]) folds BN into the weights on every
//! call, in differentiable candle ops, and then runs `+ shift`, `clamp` and `+ residual` as
//! separate candle ops: three more (single-threaded) passes over each activation, plus a
//! backprop graph that keeps every intermediate alive until the output is dropped. For
//! embedding, none of that is needed: [`FusedConv`] folds once at load time (same f32
//! arithmetic as the training path, so outputs match), works on plain slices, and applies
//! `shift`, activation and residual to each output plane or image while it is still in cache.

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use super::{conv, depthwise, same_padding, Geom, Threads};

/// Activation applied after the folded batch norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// Frozen batch-norm statistics and affine parameters of one conv, `[channels]` each.
pub struct BnParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub mean: &'a Tensor,
    pub var: &'a Tensor,
    pub eps: f64,
}

/// A bias-free conv + frozen BN (+ activation), folded, with TF "SAME" padding.
#[derive(Debug, Clone)]
pub struct FusedConv {
    /// Folded weights `[Cout, Cin/groups, k, k]`, row-major.
    weight: Vec<f32>,
    /// Folded BN shift, `[Cout]`.
    shift: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    depthwise: bool,
    act: Act,
}

/// An activation `[b, c, h, w]` as a plain row-major buffer.
#[derive(Debug, Clone)]
pub struct Activation {
    pub data: Vec<f32>,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
}

impl Activation {
    /// Copies a `[B, C, H, W]` f32 tensor.
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let data = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self { data, b, c, h, w })
    }

    /// Image `i` of the batch, as a batch of one.
    pub fn image(&self, i: usize) -> Self {
        let n = self.c * self.h * self.w;
        Self {
            data: self.data[i * n..(i + 1) * n].to_vec(),
            b: 1,
            ..*self
        }
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        Tensor::from_vec(
            self.data,
            (self.b, self.c, self.h, self.w),
            &candle_core::Device::Cpu,
        )
    }
}

fn to_vec(t: &Tensor, what: &str, len: usize) -> Result<Vec<f32>> {
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        bail!("fused conv: {what} has {} values, expected {len}", v.len())
    }
    Ok(v)
}

impl FusedConv {
    /// Folds `bn` into `weight` (`[Cout, Cin, k, k]`, or `[C, 1, k, k]` when `depthwise`) with
    /// the same f32 operations as the training path: `s = γ · (1 / √(var + ε))`,
    /// `w' = w · s`, `shift = β − mean · s`.
    pub fn new(
        weight: &Tensor,
        bn: BnParams,
        stride: usize,
        depthwise: bool,
        act: Act,
    ) -> Result<Self> {
        let (cout, cin_g, kh, kw) = weight.dims4()?;
        if kh != kw || stride == 0 {
            bail!("fused conv: square kernel and positive stride needed, got {kh}x{kw}/{stride}")
        }
        if depthwise && cin_g != 1 {
            bail!(
                "fused conv: a depthwise weight must be [C, 1, k, k], got {:?}",
                weight.dims()
            )
        }
        let w = to_vec(weight, "weight", cout * cin_g * kh * kw)?;
        let gamma = to_vec(bn.gamma, "bn weight", cout)?;
        let beta = to_vec(bn.beta, "bn bias", cout)?;
        let mean = to_vec(bn.mean, "bn running_mean", cout)?;
        let var = to_vec(bn.var, "bn running_var", cout)?;
        let eps = bn.eps as f32;
        let per_out = cin_g * kh * kw;
        let mut weight = w;
        let mut shift = Vec::with_capacity(cout);
        for o in 0..cout {
            let s = gamma[o] * (var[o] + eps).sqrt().recip();
            weight[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|v| *v *= s);
            shift.push(beta[o] - mean[o] * s);
        }
        let cin = if depthwise { cout } else { cin_g };
        Ok(Self {
            weight,
            shift,
            cin,
            cout,
            kernel: kh,
            stride,
            depthwise,
            act,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    fn geom(&self, x: &Activation) -> Geom {
        let (k, s) = (self.kernel, self.stride);
        let (pt, pb) = same_padding(x.h, k, s);
        let (pl, pr) = same_padding(x.w, k, s);
        let (hp, wp) = (x.h + pt + pb, x.w + pl + pr);
        Geom {
            b: x.b,
            c: x.c,
            h: x.h,
            w: x.w,
            co: self.cout,
            kh: k,
            kw: k,
            stride: s,
            pad: [pt, pb, pl, pr],
            ho: (hp - k) / s + 1,
            wo: (wp - k) / s + 1,
        }
    }

    /// `act(conv(x) + shift) [+ residual]`. The residual must have the output's shape.
    pub fn forward(&self, x: &Activation, residual: Option<&Activation>) -> Result<Activation> {
        self.forward_on(x, residual, Threads::Pool)
    }

    /// [`FusedConv::forward`] on the given threads.
    pub fn forward_on(
        &self,
        x: &Activation,
        residual: Option<&Activation>,
        threads: Threads,
    ) -> Result<Activation> {
        if x.c != self.cin {
            bail!(
                "fused conv: input has {} channels, the layer takes {}",
                x.c,
                self.cin
            )
        }
        let g = self.geom(x);
        let howo = g.ho * g.wo;
        if let Some(r) = residual {
            if (r.b, r.c, r.h, r.w) != (g.b, g.co, g.ho, g.wo) {
                bail!(
                    "fused conv: residual [{}, {}, {}, {}] does not match the output",
                    r.b,
                    r.c,
                    r.h,
                    r.w
                )
            }
        }
        let res = residual.map(|r| r.data.as_slice());
        let act = self.act;
        let data = if self.depthwise {
            depthwise::forward_with(&x.data, &self.weight, &g, threads, |plane, o| {
                let ch = plane % g.c;
                let r = res.map(|r| &r[plane * howo..(plane + 1) * howo]);
                epilogue_row(o, self.shift[ch], act, r);
            })
        } else {
            conv::forward_with(&x.data, &self.weight, &g, threads, |img, ch0, o| {
                // Output channels ch0.. of image img.
                let first = (img * g.co + ch0) * howo;
                let r = res.map(|r| &r[first..first + o.len()]);
                for (k, o) in o.chunks_mut(howo).enumerate() {
                    let r = r.map(|r| &r[k * howo..(k + 1) * howo]);
                    epilogue_row(o, self.shift[ch0 + k], act, r);
                }
            })
        };
        Ok(Activation {
            data,
            b: g.b,
            c: g.co,
            h: g.ho,
            w: g.wo,
        })
    }
}

/// `o = act(o + shift) [+ r]` over one channel plane; the order of operations is the
/// training path's (`conv + shift`, then activation, then the residual).
#[inline]
fn epilogue_row(o: &mut [f32], shift: f32, act: Act, r: Option<&[f32]>) {
    match (act, r) {
        (Act::None, None) => o.iter_mut().for_each(|v| *v += shift),
        (Act::Relu6, None) => o.iter_mut().for_each(|v| *v = (*v + shift).clamp(0.0, 6.0)),
        (Act::None, Some(r)) => o.iter_mut().zip(r).for_each(|(v, r)| *v = (*v + shift) + r),
        (Act::Relu6, Some(r)) => o
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = (*v + shift).clamp(0.0, 6.0) + r),
    }
}

/// Global average pooling `[b, c, h, w]` → `[b, c]` (row-major), parallel over planes; the
/// mean of the row means, like the backbones' `pool` (two candle `mean`s).
pub fn global_avg_pool(x: &Activation) -> Vec<f32> {
    let (h, w) = (x.h, x.w);
    x.data
        .par_chunks(h * w)
        .map(|p| {
            p.chunks(w)
                .map(|row| row.iter().sum::<f32>() / w as f32)
                .sum::<f32>()
                / h as f32
        })
        .collect()
}
