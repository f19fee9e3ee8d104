//! Fused per-channel bias + activation, `act(x + b[c])`, with backward.
//!
//! After folding batch norm into the convolution (see [`crate::backbone::layers`]), every conv is
//! followed by a bias add and usually an activation. Written as candle ops that is two or
//! three passes over activations that reach hundreds of MB at batch 32 (EfficientNet's
//! first expanded blocks: 32×96×112×112 floats); this op does it in one pass, and its
//! backward (input and bias gradients) in one pass too ([`act_grad_and_bias`]).

use candle_core::{
    CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// The activation applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// The float types the kernel runs on; `max`/`min` compile to branch-free vector instructions.
pub(crate) trait Float: WithDType + Send + Sync {
    fn fmax(self, o: Self) -> Self;
    fn fmin(self, o: Self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn fmax(self, o: Self) -> Self {
        f32::max(self, o)
    }
    #[inline(always)]
    fn fmin(self, o: Self) -> Self {
        f32::min(self, o)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn fmax(self, o: Self) -> Self {
        f64::max(self, o)
    }
    #[inline(always)]
    fn fmin(self, o: Self) -> Self {
        f64::min(self, o)
    }
}

/// `out[i] = act(x[i] + bias)` over one channel plane; one loop per activation so each
/// vectorises.
#[inline(always)]
fn plane<T: Float>(out: &mut [MaybeUninit<T>], x: &[T], bias: T, act: Activation) {
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    let pairs = out.iter_mut().zip(x);
    match act {
        Activation::Identity => pairs.for_each(|(o, &v)| {
            o.write(v + bias);
        }),
        Activation::Relu => pairs.for_each(|(o, &v)| {
            o.write((v + bias).fmax(zero));
        }),
        Activation::Relu6 => pairs.for_each(|(o, &v)| {
            o.write((v + bias).fmax(zero).fmin(six));
        }),
    }
}

/// `o = act(o + bias)` over one channel plane, in place: the epilogue of the fused
/// convolution ([`super::conv_bias_act`]), same arithmetic as [`plane`].
#[inline]
pub(crate) fn in_place<T: Float>(o: &mut [T], bias: T, act: Activation) {
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    match act {
        Activation::Identity => o.iter_mut().for_each(|v| *v += bias),
        Activation::Relu => o.iter_mut().for_each(|v| *v = (*v + bias).fmax(zero)),
        Activation::Relu6 => o
            .iter_mut()
            .for_each(|v| *v = (*v + bias).fmax(zero).fmin(six)),
    }
}

/// `act(x + bias)` with `x: [B, C, H, W]` (any layout) and `bias: [C]`.
pub fn bias_act(x: &Tensor, bias: &Tensor, act: Activation) -> Result<Tensor> {
    let (_, c, _, _) = x.dims4()?;
    if bias.dims() != [c] {
        candle_core::bail!(
            "bias_act: bias shape {:?} does not match {c} channels",
            bias.dims()
        )
    }
    if !x.device().is_cpu() || !matches!(x.dtype(), DType::F32 | DType::F64) {
        // Same maths with stock ops on other devices/dtypes.
        let y = x.broadcast_add(&bias.reshape((1, c, 1, 1))?)?;
        return match act {
            Activation::Identity => Ok(y),
            Activation::Relu => y.relu(),
            Activation::Relu6 => y.clamp(0f32, 6f32),
        };
    }
    let x = x.contiguous()?;
    let bias = bias.contiguous()?;
    x.apply_op2(&bias, BiasAct(act))
}

pub(crate) struct BiasAct(pub(crate) Activation);

/// Channel planes of `plane` values each per parallel task (about 16k values: late-stage
/// 7×7 planes one by one would drown in scheduling); `None` for empty planes.
fn planes_per_task(plane: usize) -> Option<usize> {
    16_384usize.checked_div(plane).map(|n| n.max(1))
}

fn run<T: Float>(x: &[T], lx: &Layout, b: &[T], lb: &Layout, act: Activation) -> Result<Vec<T>> {
    let (x, b) = (slice(x, lx)?, slice(b, lb)?);
    let dims = lx.dims();
    let (c, plane_len) = (dims[1], dims[2] * dims[3]);
    let Some(planes) = planes_per_task(plane_len) else {
        return Ok(x.to_vec());
    };
    let per_task = planes * plane_len;
    // Written in place of uninitialised memory: no zeroing pass before the real one.
    let mut out: Vec<T> = Vec::with_capacity(x.len());
    out.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .enumerate()
        .for_each(|(t, (o, xs))| {
            let first = t * planes;
            for (j, (o, xs)) in o
                .chunks_mut(plane_len)
                .zip(xs.chunks(plane_len))
                .enumerate()
            {
                plane(o, xs, b[(first + j) % c], act);
            }
        });
    // SAFETY: `plane` wrote every element of every chunk of the first x.len().
    unsafe { out.set_len(x.len()) };
    Ok(out)
}

impl CustomOp2 for BiasAct {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(b)) => CpuStorage::F32(run(x, l1, b, l2, self.0)?),
            (CpuStorage::F64(x), CpuStorage::F64(b)) => CpuStorage::F64(run(x, l1, b, l2, self.0)?),
            _ => candle_core::bail!("bias_act: input and bias must both be f32 or both f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        let dims = grad.dims().to_vec();
        let (gs, gl) = grad.storage_and_layout();
        let (rs, rl) = res.storage_and_layout();
        let (g_in, g_b) = match (&*gs, &*rs) {
            (Storage::Cpu(CpuStorage::F32(g)), Storage::Cpu(CpuStorage::F32(r))) => {
                grads(slice(g, gl)?, slice(r, rl)?, &dims, self.0, &grad)?
            }
            (Storage::Cpu(CpuStorage::F64(g)), Storage::Cpu(CpuStorage::F64(r))) => {
                grads(slice(g, gl)?, slice(r, rl)?, &dims, self.0, &grad)?
            }
            _ => {
                candle_core::bail!("bias_act backward: CPU f32 or f64 tensors of one type expected")
            }
        };
        Ok((Some(g_in), Some(g_b)))
    }
}

/// Input and bias gradients as tensors (see [`act_grad_and_bias`]).
fn grads<T: Float>(
    g: &[T],
    r: &[T],
    dims: &[usize],
    act: Activation,
    grad: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (gx, gb) = act_grad_and_bias(g, r, dims, act);
    let dev = grad.device();
    let gx = match gx {
        // Identity: the gradient passes through unchanged.
        None => grad.clone(),
        Some(v) => Tensor::from_vec(v, dims, dev)?,
    };
    Ok((gx, Tensor::from_vec(gb, dims[1], dev)?))
}

/// The contiguous part of a storage slice that `l` describes.
fn slice<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("bias_act: tensors must be contiguous"),
    }
}

/// The backward of `act(x + b)` for `[B, C, H, W]` in one parallel pass: the input gradient
/// `grad · act'(res)` (`None` for the identity, where it is `grad` itself) and the bias
/// gradient, its sum per channel. The derivative is 1 where the activation is in its linear
/// part, read off the output `res` (as PyTorch does: 0 at the kinks).
///
/// Written as candle ops this was seven single-threaded passes (two compares, a multiply, a
/// cast, a multiply and three sums); it is memory-bound either way, so one pass that reads
/// `grad` and `res` once and writes the result into uninitialised memory is what pays.
pub(crate) fn act_grad_and_bias<T: Float>(
    grad: &[T],
    res: &[T],
    dims: &[usize],
    act: Activation,
) -> (Option<Vec<T>>, Vec<T>) {
    let (c, plane) = (dims[1], dims[2] * dims[3]);
    let planes = grad.len() / plane.max(1);
    let mut sums = vec![T::zero(); planes];
    let mut out: Vec<T> = Vec::new();
    if let Some(per_task) = planes_per_task(plane) {
        let sum_plane = |p: usize, dst: Option<&mut [std::mem::MaybeUninit<T>]>| {
            let g = &grad[p * plane..(p + 1) * plane];
            let r = &res[p * plane..(p + 1) * plane];
            masked_sum(g, r, act, dst)
        };
        if act == Activation::Identity {
            sums.par_chunks_mut(per_task)
                .enumerate()
                .for_each(|(t, s)| {
                    for (j, s) in s.iter_mut().enumerate() {
                        *s = sum_plane(t * per_task + j, None);
                    }
                });
        } else {
            out.reserve_exact(grad.len());
            out.spare_capacity_mut()[..grad.len()]
                .par_chunks_mut(per_task * plane)
                .zip(sums.par_chunks_mut(per_task))
                .enumerate()
                .for_each(|(t, (o, s))| {
                    for (j, (o, s)) in o.chunks_mut(plane).zip(s).enumerate() {
                        *s = sum_plane(t * per_task + j, Some(o));
                    }
                });
            // SAFETY: every element of the first grad.len() was written by `masked_sum`.
            unsafe { out.set_len(grad.len()) };
        }
    }
    let mut gb = vec![T::zero(); c];
    for (p, s) in sums.into_iter().enumerate() {
        gb[p % c] += s;
    }
    let gx = (act != Activation::Identity).then_some(out);
    (gx, gb)
}

/// `Σ mask(g, r)` over one plane, writing the masked values to `dst` when given.
#[inline(always)]
fn masked_sum<T: Float>(
    g: &[T],
    r: &[T],
    act: Activation,
    dst: Option<&mut [std::mem::MaybeUninit<T>]>,
) -> T {
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    match act {
        Activation::Identity => lanes(g, r, dst, |g, _| g),
        Activation::Relu => lanes(g, r, dst, |g, r| if r > zero { g } else { zero }),
        Activation::Relu6 => lanes(g, r, dst, |g, r| if r > zero && r < six { g } else { zero }),
    }
}

/// [`masked_sum`] for one mask, over fixed 8-wide chunks so it vectorises: eight partial
/// sums (float sums are not reordered otherwise) and no bounds checks in the loop.
#[inline(always)]
fn lanes<T: Float>(
    g: &[T],
    r: &[T],
    dst: Option<&mut [std::mem::MaybeUninit<T>]>,
    mask: impl Fn(T, T) -> T,
) -> T {
    const L: usize = 8;
    let full = g.len() / L * L;
    let pairs = g[..full].chunks_exact(L).zip(r[..full].chunks_exact(L));
    let mut acc = [T::zero(); L];
    let mut tail = T::zero();
    match dst {
        Some(d) => {
            let (d_full, d_tail) = d.split_at_mut(full);
            for ((g8, r8), d8) in pairs.zip(d_full.chunks_exact_mut(L)) {
                let (g8, r8): (&[T; L], &[T; L]) = (g8.try_into().unwrap(), r8.try_into().unwrap());
                let d8: &mut [_; L] = d8.try_into().unwrap();
                for l in 0..L {
                    let m = mask(g8[l], r8[l]);
                    d8[l].write(m);
                    acc[l] += m;
                }
            }
            for ((&g, &r), d) in g[full..].iter().zip(&r[full..]).zip(d_tail) {
                let m = mask(g, r);
                d.write(m);
                tail += m;
            }
        }
        None => {
            for (g8, r8) in pairs {
                let (g8, r8): (&[T; L], &[T; L]) = (g8.try_into().unwrap(), r8.try_into().unwrap());
                for l in 0..L {
                    acc[l] += mask(g8[l], r8[l]);
                }
            }
            for (&g, &r) in g[full..].iter().zip(&r[full..]) {
                tail += mask(g, r);
            }
        }
    }
    acc.iter().fold(tail, |t, &v| t + v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::max_abs_diff;
    use candle_core::{Device, Var};

    fn reference(x: &Tensor, b: &Tensor, act: Activation) -> Tensor {
        let y = x
            .broadcast_add(&b.reshape((1, b.dim(0).unwrap(), 1, 1)).unwrap())
            .unwrap();
        match act {
            Activation::Identity => y,
            Activation::Relu => y.relu().unwrap(),
            Activation::Relu6 => y.clamp(0f64, 6f64).unwrap(),
        }
    }

    #[test]
    fn forward_and_gradients_match_stock_ops() {
        let dev = Device::Cpu;
        // f64 and values spread over [-9, 9] so all three regions of ReLU6 are hit.
        let x = Var::from_tensor(
            &(Tensor::randn(0f64, 1.0, (2, 3, 4, 5), &dev).unwrap() * 4.0).unwrap(),
        )
        .unwrap();
        let b = Var::from_tensor(&Tensor::new(&[0.5f64, -1.0, 5.0], &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f64, 1.0, (2, 3, 4, 5), &dev).unwrap();
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
            let fused = bias_act(x.as_tensor(), b.as_tensor(), act).unwrap();
            let stock = reference(x.as_tensor(), b.as_tensor(), act);
            let d = max_abs_diff(&fused, &stock).unwrap();
            assert!(d < 1e-12, "{act:?} forward differs by {d}");
            let gf = (fused * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gs = (stock * &w).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &b] {
                let (a, s) = (gf.get(v).unwrap(), gs.get(v).unwrap());
                let d = max_abs_diff(a, s).unwrap();
                assert!(d < 1e-12, "{act:?} gradient differs by {d}");
            }
        }
    }

    #[test]
    fn non_contiguous_input_is_handled() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 5, 4, 3), &dev)
            .unwrap()
            .permute((0, 3, 2, 1))
            .unwrap();
        let b = Tensor::new(&[1f32, 2.0, 3.0], &dev).unwrap();
        let fused = bias_act(&x, &b, Activation::Relu).unwrap();
        let want = reference(
            &x.to_dtype(DType::F64).unwrap(),
            &b.to_dtype(DType::F64).unwrap(),
            Activation::Relu,
        )
        .to_dtype(DType::F32)
        .unwrap();
        let d = max_abs_diff(&fused, &want).unwrap();
        assert!(d < 1e-6);
    }
}
