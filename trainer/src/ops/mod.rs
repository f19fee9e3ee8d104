//! Convolution and pooling ops the backbones need, with forward *and* backward.
//!
//! Stock candle runs a depthwise conv as one conv per group plus a `cat`, and has no
//! backward for overlapping pooling; these entry points are what the backbones call, so the
//! kernels behind them can be replaced without touching model code.

use candle_core::{Result, Tensor};

/// Explicit padding `[top, bottom, left, right]`; TF "SAME" padding is asymmetric at stride 2.
pub type Pad4 = [usize; 4];

/// TF/Keras "SAME" padding for one spatial axis: `(before, after)`.
pub fn same_padding(input: usize, kernel: usize, stride: usize) -> (usize, usize) {
    let out = input.div_ceil(stride);
    let total = ((out - 1) * stride + kernel).saturating_sub(input);
    (total / 2, total - total / 2)
}

fn pad_hw(x: &Tensor, pad: Pad4) -> Result<Tensor> {
    let [t, b, l, r] = pad;
    let x = if t + b > 0 { x.pad_with_zeros(2, t, b)? } else { x.clone() };
    if l + r > 0 {
        x.pad_with_zeros(3, l, r)
    } else {
        Ok(x)
    }
}

/// Depthwise 2-D convolution: `x [B, C, H, W]`, `w [C, 1, k, k]`.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    let c = x.dim(1)?;
    pad_hw(x, pad)?.conv2d(w, 0, stride, 1, c)
}

/// Dense 2-D convolution: `x [B, Cin, H, W]`, `w [Cout, Cin, k, k]`.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    pad_hw(x, pad)?.conv2d(w, 0, stride, 1, 1)
}

/// Max pooling with any kernel/stride; padded cells never win.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    if pad != [0; 4] {
        candle_core::bail!("max_pool2d with padding is not implemented yet")
    }
    x.max_pool2d_with_stride(kernel, stride)
}

/// Average pooling with any kernel/stride (padding counted as zeros, PyTorch's default).
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    pad_hw(x, pad)?.avg_pool2d_with_stride(kernel, stride)
}
