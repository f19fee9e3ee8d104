//! Convolution and pooling ops the backbones need, with forward *and* backward.
//!
//! Stock candle 0.11 on CPU runs a depthwise conv as one conv per group plus a `cat`, computes
//! conv gradients through a direct-loop `conv_transpose2d`, and has no backward for
//! overlapping pooling (ResNet's 3×3/2 max-pool errors out). The entry points here are candle
//! custom ops with CPU kernels and real backward passes:
//!
//! * [`depthwise_conv2d`]: per-plane tap kernels on a padded, phase-split copy of the plane
//!   (see [`depthwise`] internals), specialised for 3×3/5×5/7×7, any stride.
//! * [`conv2d`]: im2col + `gemm` (a 1×1 stride-1 conv is a plain matmul, no copy).
//! * [`conv_bias_act`]: either conv with the folded-BN shift and activation in its output
//!   pass, one autograd node (what the backbones train with); [`bias_act`] alone.
//! * [`max_pool2d`] / [`avg_pool2d`]: any kernel, stride and padding.
//! * [`fused`]: inference-only conv + folded BN + ReLU6 + residual in one output pass, on
//!   planar or channels-last activations (`depthwise_nhwc` internals: the depthwise conv
//!   vectorised over channels, bias and ReLU6 applied in registers).
//! * [`pairwise_sq_dist`]: fused `[n, n]` squared distances for metric losses.
//!
//! Large activations are allocated afresh by every candle op; see [`tune_glibc_malloc`],
//! which the binaries should call at start-up.
//!
//! With the `cuda` feature, [`depthwise_conv2d`], [`max_pool2d`] and [`avg_pool2d`] also have
//! CUDA kernels (`cuda` internals; parity-tested against the CPU kernels in `cuda_tests`).
//! Tensors on other devices, and the other ops on CUDA, fall back to the stock candle
//! composition ([`stock`]), so model code can call these functions unconditionally.

mod alloc;
pub mod bias_act;
mod conv;
mod conv_act;
#[cfg(feature = "cuda")]
mod cuda;
mod depthwise;
mod depthwise_nhwc;
mod elem;
pub mod fused;
mod pairwise;
mod pool;

pub mod bench;
pub mod stock;

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(test)]
mod tests;

pub(crate) use alloc::uninit_vec;
pub use alloc::{single_malloc_arena, trim_malloc, tune_glibc_malloc};
use candle_core::{bail, DType, Device, Result, Shape, Tensor};
pub use conv_act::conv_bias_act;

/// Whether the ops with GPU kernels (depthwise conv, pooling) run as custom ops on `device`:
/// always on CPU, on CUDA when built with the `cuda` feature.
fn has_gpu_kernels(device: &Device) -> bool {
    device.is_cpu() || (cfg!(feature = "cuda") && device.is_cuda())
}

/// Memory order of an activation's axes. The candle ops and the backbones' tensors are
/// planar; the fused inference path keeps the expanded activations of an inverted-residual
/// block channels-last, where a depthwise conv vectorises over channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryFormat {
    /// `[B, C, H, W]`: each channel a contiguous plane.
    Nchw,
    /// `[B, H, W, C]`: each pixel's channels contiguous.
    Nhwc,
}

/// `[cols, rows]` row-major from `[rows, cols]` row-major: what turns planar weights or
/// activations channels-last and back.
pub(crate) fn transpose(m: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(m.len(), rows * cols, "transpose of a {rows}×{cols} matrix");
    let mut t = vec![0.0; m.len()];
    for (r, row) in m.chunks_exact(cols).enumerate() {
        for (c, &v) in row.iter().enumerate() {
            t[c * rows + r] = v;
        }
    }
    t
}

/// Where a kernel runs its work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Threads {
    /// Split over rayon's thread pool (one op over a whole batch).
    Pool,
    /// On the calling thread only: the caller already keeps every core busy, e.g. with one
    /// image per thread (see [`crate::backbone::efficientnet::FusedEfficientNetLite`]).
    Caller,
}

/// `f(scratch, (index, chunk))` over the `chunk`-sized pieces of `out`, on the pool or the
/// calling thread; `init` makes a worker's scratch (once per rayon job, or once here).
pub(crate) fn for_each_chunk<T, S, I, F>(
    out: &mut [T],
    chunk: usize,
    threads: Threads,
    init: I,
    f: F,
) where
    T: Send,
    I: Fn() -> S + Sync + Send,
    F: Fn(&mut S, (usize, &mut [T])) + Sync + Send,
{
    use rayon::prelude::*;
    match threads {
        Threads::Pool => out.par_chunks_mut(chunk).enumerate().for_each_init(init, f),
        Threads::Caller => {
            let mut scratch = init();
            out.chunks_mut(chunk)
                .enumerate()
                .for_each(|item| f(&mut scratch, item));
        }
    }
}

/// Explicit padding `[top, bottom, left, right]`; TF "SAME" padding is asymmetric at stride 2.
pub type Pad4 = [usize; 4];

/// TF/Keras "SAME" padding for one spatial axis: `(before, after)`.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

/// Shapes of one conv/pool call: input `[b, c, h, w]`, kernel `kh × kw`, output `[b, co, ho,
/// wo]` (`co == c` except for dense convs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geom {
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub co: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: Pad4,
    pub ho: usize,
    pub wo: usize,
}

impl Geom {
    /// Validates the hyper-parameters and computes the output size
    /// `(H + top + bottom - kh) / stride + 1` (floor, like PyTorch and TF).
    pub(crate) fn new(
        op: &str,
        x: &Tensor,
        co: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        pad: Pad4,
    ) -> Result<Self> {
        let (b, c, h, w) = x.dims4().map_err(|e| {
            candle_core::Error::Msg(format!("{op}: input must be [B, C, H, W]: {e}"))
        })?;
        if stride == 0 || kh == 0 || kw == 0 {
            bail!("{op}: kernel {kh}x{kw} and stride {stride} must be positive")
        }
        let [pt, pb, pl, pr] = pad;
        let (hp, wp) = (h + pt + pb, w + pl + pr);
        if hp < kh || wp < kw {
            bail!(
                "{op}: kernel {kh}x{kw} is larger than the padded input {hp}x{wp} \
                 (input {h}x{w}, padding {pad:?})"
            )
        }
        if b == 0 || c == 0 || co == 0 {
            bail!(
                "{op}: empty tensor: input {:?}, {co} output channels",
                x.dims()
            )
        }
        match x.dtype() {
            DType::F32 | DType::F64 => {}
            dt => bail!("{op}: only f32 and f64 are supported, got {dt:?}"),
        }
        Ok(Self {
            b,
            c,
            h,
            w,
            co,
            kh,
            kw,
            stride,
            pad,
            ho: (hp - kh) / stride + 1,
            wo: (wp - kw) / stride + 1,
        })
    }

    pub(crate) fn in_shape(&self) -> Shape {
        Shape::from((self.b, self.c, self.h, self.w))
    }

    pub(crate) fn out_shape(&self) -> Shape {
        Shape::from((self.b, self.co, self.ho, self.wo))
    }

    /// Elements of the input (and of its gradient).
    pub(crate) fn in_len(&self) -> usize {
        self.b * self.c * self.h * self.w
    }

    /// Elements of the output (and of its gradient).
    pub(crate) fn out_len(&self) -> usize {
        self.b * self.co * self.ho * self.wo
    }
}

/// Gradients of a two-input op for the inputs that need one: `gx = grad ⊛ op_x(w)`,
/// `gw = op_w(x, grad)`; what conv and depthwise conv share in their `bwd`.
pub(crate) fn input_and_weight_grads(
    x: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    op_x: &impl candle_core::CustomOp2,
    op_w: &impl candle_core::CustomOp2,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let grad = grad.contiguous()?;
    let gx = if x.track_op() {
        Some(grad.apply_op2_no_bwd(w, op_x)?)
    } else {
        None
    };
    let gw = if w.track_op() {
        Some(x.apply_op2_no_bwd(&grad, op_w)?)
    } else {
        None
    };
    Ok((gx, gw))
}

fn check_weight(op: &str, x: &Tensor, w: &Tensor, want_in: usize, in_name: &str) -> Result<()> {
    let (_, wi, _, _) = w.dims4().map_err(|e| {
        candle_core::Error::Msg(format!(
            "{op}: weight must be [Cout, {in_name}, kh, kw]: {e}"
        ))
    })?;
    if wi != want_in {
        bail!(
            "{op}: weight {:?} does not match input {:?}: expected {want_in} in dim 1 ({in_name})",
            w.dims(),
            x.dims()
        )
    }
    if w.dtype() != x.dtype() {
        bail!(
            "{op}: weight dtype {:?} differs from input dtype {:?}",
            w.dtype(),
            x.dtype()
        )
    }
    if !w.device().same_device(x.device()) {
        bail!("{op}: weight and input are on different devices")
    }
    Ok(())
}

/// Depthwise 2-D convolution: `x [B, C, H, W]`, `w [C, 1, kh, kw]` → `[B, C, Ho, Wo]`.
///
/// Differentiable w.r.t. both `x` and `w`; gradients are only computed for arguments that
/// are tracked (a frozen filter costs nothing in the backward pass).
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    const OP: &str = "depthwise_conv2d";
    check_weight(OP, x, w, 1, "1")?;
    let (wc, _, kh, kw) = w.dims4()?;
    let g = Geom::new(OP, x, wc, (kh, kw), stride, pad)?;
    if wc != g.c {
        bail!("{OP}: weight has {wc} filters for {} input channels", g.c)
    }
    if !has_gpu_kernels(x.device()) {
        return stock::depthwise_conv2d(x, w, stride, pad);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, depthwise::DepthwiseConv { g })
}

/// Dense 2-D convolution: `x [B, Cin, H, W]`, `w [Cout, Cin, kh, kw]` → `[B, Cout, Ho, Wo]`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    const OP: &str = "conv2d";
    let cin = x.dims().get(1).copied().unwrap_or(0);
    check_weight(OP, x, w, cin, "Cin")?;
    let (co, _, kh, kw) = w.dims4()?;
    let g = Geom::new(OP, x, co, (kh, kw), stride, pad)?;
    if !x.device().is_cpu() {
        if kh == 1 && kw == 1 && stride == 1 && pad == [0; 4] {
            return conv1x1_matmul(x, w);
        }
        return stock::conv2d(x, w, stride, pad);
    }
    x.contiguous()?
        .apply_op2(&w.contiguous()?, conv::Conv2d { g })
}

/// A 1×1 stride-1 conv as one batched matmul `w [Co, Ci] × x [B, Ci, H·W]` (forward and
/// backward on the GPU's BLAS). candle's GPU conv2d goes through im2col even for 1×1 kernels,
/// which are most of EfficientNet's dense convs.
fn conv1x1_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (b, ci, h, wd) = x.dims4()?;
    let co = w.dim(0)?;
    let w2 = w.reshape((co, ci))?;
    w2.broadcast_matmul(&x.contiguous()?.reshape((b, ci, h * wd))?)?
        .reshape((b, co, h, wd))
}

/// Max pooling with any kernel/stride/padding; padded cells never win, and the gradient goes
/// to the (first) arg-max of each window.
///
/// Each padding must be smaller than the kernel, so that every window sees real input.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    const OP: &str = "max_pool2d";
    let g = pool_geom(OP, x, kernel, stride, pad)?;
    if pad.iter().any(|&p| p >= kernel) {
        bail!("{OP}: padding {pad:?} must be smaller than the kernel {kernel}")
    }
    if !has_gpu_kernels(x.device()) {
        return stock::max_pool2d(x, kernel, stride, pad);
    }
    x.contiguous()?.apply_op1(pool::MaxPool { g })
}

/// Average pooling with any kernel/stride/padding. Padded cells count as zeros in the
/// average (PyTorch's `count_include_pad=True`): every window divides by `kernel²`.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    let g = pool_geom("avg_pool2d", x, kernel, stride, pad)?;
    if !has_gpu_kernels(x.device()) {
        return stock::avg_pool2d(x, kernel, stride, pad);
    }
    x.contiguous()?.apply_op1(pool::AvgPool { g })
}

/// Geometry of a square pooling window over `x` (channels in = channels out).
fn pool_geom(op: &str, x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Geom> {
    let channels = x.dims().get(1).copied().unwrap_or(0);
    Geom::new(op, x, channels, (kernel, kernel), stride, pad)
}

/// Largest `|a − b|` over all elements, as f64 whatever the float dtype: the measure every
/// parity test (fused vs training path, reloaded vs original weights, f32 vs f64) compares.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    (a - b)?
        .abs()?
        .max_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()
}

/// Pairwise squared Euclidean distances of the rows of `x [n, d]` → `[n, n]`, differentiable.
///
/// Computed as `|x_i|² + |x_j|² − 2·x_i·x_j` from one gemm, clamped at 0, diagonal exactly 0
/// (see `pairwise` internals for the gradient).
pub fn pairwise_sq_dist(x: &Tensor) -> Result<Tensor> {
    const OP: &str = "pairwise_sq_dist";
    let (n, d) = x
        .dims2()
        .map_err(|e| candle_core::Error::Msg(format!("{OP}: input must be [n, d]: {e}")))?;
    match x.dtype() {
        DType::F32 | DType::F64 => {}
        dt => bail!("{OP}: only f32 and f64 are supported, got {dt:?}"),
    }
    if n == 0 || d == 0 {
        bail!("{OP}: empty input {:?}", x.dims())
    }
    if !x.device().is_cpu() {
        return stock::pairwise_sq_dist(x);
    }
    x.contiguous()?.apply_op1(pairwise::PairwiseSqDist { n, d })
}
