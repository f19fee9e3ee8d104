//! The same ops composed from stock candle primitives.
//!
//! Used as the fallback for non-CPU devices and as the baseline in [`super::bench`]. On CPU
//! these are slow (grouped conv = one conv per channel plus a `cat`) and the pools only have a
//! backward pass when `kernel == stride` and there is no padding.

use super::Pad4;
use candle_core::{Result, Tensor};

fn pad_with(x: &Tensor, pad: Pad4, value: f64) -> Result<Tensor> {
    let [t, b, l, r] = pad;
    if value == 0.0 {
        let x = if t + b > 0 {
            x.pad_with_zeros(2, t, b)?
        } else {
            x.clone()
        };
        return if l + r > 0 {
            x.pad_with_zeros(3, l, r)
        } else {
            Ok(x)
        };
    }
    let mut x = x.clone();
    for (dim, before, after) in [(2, t, b), (3, l, r)] {
        if before + after == 0 {
            continue;
        }
        let mut parts = Vec::with_capacity(3);
        let mut dims = x.dims().to_vec();
        if before > 0 {
            dims[dim] = before;
            parts.push(Tensor::full(value, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
        }
        parts.push(x.clone());
        if after > 0 {
            dims[dim] = after;
            parts.push(Tensor::full(value, dims.as_slice(), x.device())?.to_dtype(x.dtype())?);
        }
        x = Tensor::cat(&parts, dim)?;
    }
    Ok(x)
}

/// Depthwise conv as candle's grouped `conv2d` on an explicitly padded input.
pub fn depthwise_conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    let c = x.dim(1)?;
    pad_with(x, pad, 0.0)?.conv2d(w, 0, stride, 1, c)
}

/// Dense conv as candle's `conv2d` on an explicitly padded input.
pub fn conv2d(x: &Tensor, w: &Tensor, stride: usize, pad: Pad4) -> Result<Tensor> {
    pad_with(x, pad, 0.0)?.conv2d(w, 0, stride, 1, 1)
}

/// Max pool as candle's `max_pool2d_with_stride` on an input padded with `-inf`.
pub fn max_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    pad_with(x, pad, f64::NEG_INFINITY)?.max_pool2d_with_stride(kernel, stride)
}

/// Average pool as candle's `avg_pool2d_with_stride` on a zero-padded input.
pub fn avg_pool2d(x: &Tensor, kernel: usize, stride: usize, pad: Pad4) -> Result<Tensor> {
    pad_with(x, pad, 0.0)?.avg_pool2d_with_stride(kernel, stride)
}
