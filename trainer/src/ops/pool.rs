//! Max and average pooling with any kernel, stride and padding, forward and backward.
//!
//! Windows are clipped to the real input: padded cells never win a max (so the max-pool
//! gradient always lands on a real pixel), and count as zeros in an average, which always
//! divides by `kernel²` (PyTorch's `count_include_pad=True`; with floor-mode output sizes no
//! window reaches past the padding). Work is split over `(batch, channel)` planes.

use super::depthwise::check_len;
use super::elem::{contiguous_slice, with_float_storage, Elem};
use super::Geom;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Max pooling: `x [B, C, H, W]` → `[B, C, Ho, Wo]`.
pub(crate) struct MaxPool {
    pub(crate) g: Geom,
}

/// Max-pool gradient: `(x, grad_out)` → `[B, C, H, W]`, each output's gradient routed to the
/// first (row-major) maximum of its window, recomputed from `x`.
struct MaxPoolBwd {
    g: Geom,
}

/// Average pooling: `x [B, C, H, W]` → `[B, C, Ho, Wo]`.
pub(crate) struct AvgPool {
    pub(crate) g: Geom,
}

/// Average-pool gradient: `grad_out` → `[B, C, H, W]`.
struct AvgPoolBwd {
    g: Geom,
}

/// Input index range `[lo, hi)` of output `o`'s window along one axis, clipped to the input.
#[inline]
fn window(o: usize, s: usize, k: usize, pad: usize, len: usize) -> (usize, usize) {
    let start = o * s;
    let lo = start.saturating_sub(pad);
    let hi = (start + k).saturating_sub(pad).min(len);
    (lo, hi)
}

/// Flat in-plane index of the first maximum in output `(oy, ox)`'s window.
#[inline]
fn argmax<T: Elem>(x: &[T], g: &Geom, oy: usize, ox: usize) -> usize {
    let [pt, _, pl, _] = g.pad;
    let (y0, y1) = window(oy, g.stride, g.kh, pt, g.h);
    let (x0, x1) = window(ox, g.stride, g.kw, pl, g.w);
    let mut best = y0 * g.w + x0;
    let mut best_v = x[best];
    for iy in y0..y1 {
        for ix in x0..x1 {
            let v = x[iy * g.w + ix];
            if v > best_v {
                best_v = v;
                best = iy * g.w + ix;
            }
        }
    }
    best
}

fn max_forward<T: Elem>(x: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo) = (g.h * g.w, g.ho * g.wo);
    let [pt, _, pl, _] = g.pad;
    let mut out = vec![T::zero(); g.b * g.c * howo];
    out.par_chunks_mut(howo).enumerate().for_each(|(p, o)| {
        let xp = &x[p * hw..(p + 1) * hw];
        for oy in 0..g.ho {
            let (y0, y1) = window(oy, g.stride, g.kh, pt, g.h);
            for ox in 0..g.wo {
                let (x0, x1) = window(ox, g.stride, g.kw, pl, g.w);
                let mut m = T::neg_infinity();
                for iy in y0..y1 {
                    for &v in &xp[iy * g.w + x0..iy * g.w + x1] {
                        if v > m {
                            m = v;
                        }
                    }
                }
                o[oy * g.wo + ox] = m;
            }
        }
    });
    out
}

fn max_backward<T: Elem>(x: &[T], gout: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo) = (g.h * g.w, g.ho * g.wo);
    let mut gx = vec![T::zero(); g.b * g.c * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxp)| {
        let xp = &x[p * hw..(p + 1) * hw];
        let gp = &gout[p * howo..(p + 1) * howo];
        for oy in 0..g.ho {
            for ox in 0..g.wo {
                gxp[argmax(xp, g, oy, ox)] += gp[oy * g.wo + ox];
            }
        }
    });
    gx
}

fn avg_forward<T: Elem>(x: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo) = (g.h * g.w, g.ho * g.wo);
    let [pt, _, pl, _] = g.pad;
    let inv = T::from_f64(1.0 / (g.kh * g.kw) as f64);
    let mut out = vec![T::zero(); g.b * g.c * howo];
    out.par_chunks_mut(howo).enumerate().for_each(|(p, o)| {
        let xp = &x[p * hw..(p + 1) * hw];
        for oy in 0..g.ho {
            let (y0, y1) = window(oy, g.stride, g.kh, pt, g.h);
            for ox in 0..g.wo {
                let (x0, x1) = window(ox, g.stride, g.kw, pl, g.w);
                let mut acc = T::zero();
                for iy in y0..y1 {
                    for &v in &xp[iy * g.w + x0..iy * g.w + x1] {
                        acc += v;
                    }
                }
                o[oy * g.wo + ox] = acc * inv;
            }
        }
    });
    out
}

fn avg_backward<T: Elem>(gout: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo) = (g.h * g.w, g.ho * g.wo);
    let [pt, _, pl, _] = g.pad;
    let inv = T::from_f64(1.0 / (g.kh * g.kw) as f64);
    let mut gx = vec![T::zero(); g.b * g.c * hw];
    gx.par_chunks_mut(hw).enumerate().for_each(|(p, gxp)| {
        let gp = &gout[p * howo..(p + 1) * howo];
        for oy in 0..g.ho {
            let (y0, y1) = window(oy, g.stride, g.kh, pt, g.h);
            for ox in 0..g.wo {
                let (x0, x1) = window(ox, g.stride, g.kw, pl, g.w);
                let v = gp[oy * g.wo + ox] * inv;
                for iy in y0..y1 {
                    for d in &mut gxp[iy * g.w + x0..iy * g.w + x1] {
                        *d += v;
                    }
                }
            }
        }
    });
    gx
}

impl CustomOp1 for MaxPool {
    fn name(&self) -> &'static str {
        "max_pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s, |T| {
            let x = contiguous_slice::<T>(s, l, self.name())?;
            check_len(self.name(), "input", x.len(), g.b * g.c * g.h * g.w)?;
            Ok((T::to_cpu_storage_owned(max_forward(x, g)), g.out_shape()))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &MaxPoolBwd { g: self.g })?))
    }
}

impl CustomOp2 for MaxPoolBwd {
    fn name(&self) -> &'static str {
        "max_pool2d_bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s1, |T| {
            let x = contiguous_slice::<T>(s1, l1, self.name())?;
            let gout = contiguous_slice::<T>(s2, l2, self.name())?;
            check_len(self.name(), "input", x.len(), g.b * g.c * g.h * g.w)?;
            check_len(self.name(), "grad", gout.len(), g.b * g.c * g.ho * g.wo)?;
            Ok((
                T::to_cpu_storage_owned(max_backward(x, gout, g)),
                g.in_shape(),
            ))
        })
    }
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg_pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s, |T| {
            let x = contiguous_slice::<T>(s, l, self.name())?;
            check_len(self.name(), "input", x.len(), g.b * g.c * g.h * g.w)?;
            Ok((T::to_cpu_storage_owned(avg_forward(x, g)), g.out_shape()))
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(&AvgPoolBwd { g: self.g })?))
    }
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "avg_pool2d_bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s, |T| {
            let gout = contiguous_slice::<T>(s, l, self.name())?;
            check_len(self.name(), "grad", gout.len(), g.b * g.c * g.ho * g.wo)?;
            Ok((T::to_cpu_storage_owned(avg_backward(gout, g)), g.in_shape()))
        })
    }
}
