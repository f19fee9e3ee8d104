//! Fused per-channel bias + activation, `act(x + b[c])`, with backward.
//!
//! After folding batch norm into the convolution (see [`super::layers`]), every conv is
//! followed by a bias add and usually an activation. Written as candle ops that is two or
//! three passes over activations that reach hundreds of MB at batch 32 (EfficientNet's
//! first expanded blocks: 32×96×112×112 floats); this op does it in one pass. Its backward
//! is two parallel passes too ([`ActGrad`] masks the gradient, [`ChannelSum`] reduces it
//! per channel for the bias) instead of the seven single-threaded candle ops it replaced
//! (compare, compare, multiply, cast, multiply and three sums).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType,
};
use rayon::prelude::*;

/// The activation applied after the bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Identity,
    Relu,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// The float types the kernel runs on; `max`/`min` compile to branch-free vector instructions.
trait Float: WithDType + Send + Sync {
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
fn plane<T: Float>(out: &mut [T], x: &[T], bias: T, act: Activation) {
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    let pairs = out.iter_mut().zip(x);
    match act {
        Activation::Identity => pairs.for_each(|(o, &v)| *o = v + bias),
        Activation::Relu => pairs.for_each(|(o, &v)| *o = (v + bias).fmax(zero)),
        Activation::Relu6 => pairs.for_each(|(o, &v)| *o = (v + bias).fmax(zero).fmin(six)),
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

struct BiasAct(Activation);

fn run<T: Float>(x: &[T], lx: &Layout, b: &[T], lb: &Layout, act: Activation) -> Result<Vec<T>> {
    let (x, b) = match (lx.contiguous_offsets(), lb.contiguous_offsets()) {
        (Some((x0, x1)), Some((b0, b1))) => (&x[x0..x1], &b[b0..b1]),
        _ => candle_core::bail!("bias_act: inputs must be contiguous"),
    };
    let dims = lx.dims();
    let (c, plane_len) = (dims[1], dims[2] * dims[3]);
    // Zeroed allocation is lazy (calloc), so pages are first touched by the parallel writers.
    let mut out = vec![T::zero(); x.len()];
    if plane_len == 0 {
        return Ok(out);
    }
    // Several planes per task: small late-stage planes (7×7) would drown in scheduling.
    let per_task = (16_384 / plane_len).max(1) * plane_len;
    out.par_chunks_mut(per_task)
        .zip(x.par_chunks(per_task))
        .enumerate()
        .for_each(|(t, (o, xs))| {
            let first = t * (per_task / plane_len);
            for (j, (o, xs)) in o
                .chunks_mut(plane_len)
                .zip(xs.chunks(plane_len))
                .enumerate()
            {
                plane(o, xs, b[(first + j) % c], act);
            }
        });
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
        // The derivative is 1 where the activation is in its linear part, read off the output
        // (as PyTorch does: 0 at the kinks).
        let g = match self.0 {
            Activation::Identity => grad.clone(),
            act => grad
                .contiguous()?
                .apply_op2_no_bwd(&res.contiguous()?, &ActGrad(act))?,
        };
        let gb = g.contiguous()?.apply_op1_no_bwd(&ChannelSum)?;
        Ok((Some(g), Some(gb)))
    }
}

/// Elements per parallel task of the elementwise passes.
const CHUNK: usize = 16_384;

/// `grad · act'(res)`: the gradient where the output `res` is in the activation's linear
/// part, 0 elsewhere.
struct ActGrad(Activation);

fn act_grad<T: Float>(g: &[T], r: &[T], act: Activation) -> Vec<T> {
    let (zero, six) = (T::zero(), T::from_f64(6.0));
    let mut out = vec![T::zero(); g.len()];
    out.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK).zip(r.par_chunks(CHUNK)))
        .for_each(|(o, (g, r))| {
            let it = o.iter_mut().zip(g.iter().zip(r));
            match act {
                Activation::Identity => it.for_each(|(o, (&g, _))| *o = g),
                Activation::Relu => {
                    it.for_each(|(o, (&g, &r))| *o = if r > zero { g } else { zero })
                }
                Activation::Relu6 => {
                    it.for_each(|(o, (&g, &r))| *o = if r > zero && r < six { g } else { zero })
                }
            }
        });
    out
}

fn contiguous<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("bias_act backward: {what} must be contiguous"),
    }
}

impl CustomOp2 for ActGrad {
    fn name(&self) -> &'static str {
        "bias-act-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            candle_core::bail!("bias_act backward: gradient and output shapes differ")
        }
        let out = match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(r)) => CpuStorage::F32(act_grad(
                contiguous(g, l1, "gradient")?,
                contiguous(r, l2, "output")?,
                self.0,
            )),
            (CpuStorage::F64(g), CpuStorage::F64(r)) => CpuStorage::F64(act_grad(
                contiguous(g, l1, "gradient")?,
                contiguous(r, l2, "output")?,
                self.0,
            )),
            _ => candle_core::bail!("bias_act backward: f32 or f64 of one type expected"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `[B, C, H, W]` → `[C]`: the sum of each channel over batch and plane (the bias gradient).
struct ChannelSum;

fn channel_sum<T: Float>(x: &[T], dims: &[usize]) -> Vec<T> {
    let (b, c, plane) = (dims[0], dims[1], dims[2] * dims[3]);
    (0..c)
        .into_par_iter()
        .map(|ch| {
            // Eight partial sums so the loop vectorises (float sums are not reordered).
            let mut acc = [T::zero(); 8];
            let mut tail = T::zero();
            for img in 0..b {
                let p = &x[(img * c + ch) * plane..(img * c + ch + 1) * plane];
                let chunks = p.chunks_exact(8);
                tail = chunks.remainder().iter().fold(tail, |t, &v| t + v);
                for ck in chunks {
                    for l in 0..8 {
                        acc[l] += ck[l];
                    }
                }
            }
            acc.iter().fold(tail, |t, &v| t + v)
        })
        .collect()
}

impl CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.dims();
        if dims.len() != 4 {
            candle_core::bail!("channel sum: a [B, C, H, W] tensor expected, got {dims:?}")
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(channel_sum(contiguous(x, l, "gradient")?, dims)),
            CpuStorage::F64(x) => CpuStorage::F64(channel_sum(contiguous(x, l, "gradient")?, dims)),
            _ => candle_core::bail!("channel sum: f32 or f64 expected"),
        };
        Ok((out, Shape::from(dims[1])))
    }
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
