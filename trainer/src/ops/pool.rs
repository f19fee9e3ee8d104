//! Max and average pooling with any kernel, stride and padding, forward and backward.
//!
//! Windows are clipped to the real input: padded cells never win a max (so the max-pool
//! gradient always lands on a real pixel), and count as zeros in an average, which always
//! divides by `kernel²` (PyTorch's `count_include_pad=True`; with floor-mode output sizes no
//! window reaches past the padding). Work is split over `(batch, channel)` planes.

#[cfg(feature = "cuda")]
use super::cuda;
use super::elem::{checked_slice, with_float_storage, Elem};
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

/// Pooling forward, separable: per output row, the window's input rows are reduced
/// element-wise (vectorised) into a padded row, then each output reduces `kw` cells of it.
/// `MAX` selects max (padding = −∞, never wins) or average (padding = 0, divide by `kh·kw`).
fn pool_forward<T: Elem, const MAX: bool>(x: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo) = (g.h * g.w, g.ho * g.wo);
    let [pt, _, pl, _] = g.pad;
    let s = g.stride;
    let ident = if MAX { T::neg_infinity() } else { T::zero() };
    let inv = T::from_f64(1.0 / (g.kh * g.kw) as f64);
    // Padded row: cell c holds input column c - left; only the cells windows read.
    let row_len = (g.wo - 1) * s + g.kw;
    // A left padding past the row (possible for average pooling) leaves no input cell.
    let pl = pl.min(row_len);
    let n_in = g.w.min(row_len - pl);
    let mut out = vec![T::zero(); g.b * g.c * howo];
    out.par_chunks_mut(howo).enumerate().for_each_init(
        || vec![ident; row_len],
        |row, (p, o)| {
            let xp = &x[p * hw..(p + 1) * hw];
            for (oy, orow) in o.chunks_exact_mut(g.wo).enumerate() {
                let (y0, y1) = window(oy, s, g.kh, pt, g.h);
                let r = &mut row[pl..pl + n_in];
                if y0 >= y1 {
                    // The window lies entirely in the top/bottom padding.
                    r.fill(ident);
                } else {
                    r.copy_from_slice(&xp[y0 * g.w..y0 * g.w + n_in]);
                }
                for iy in y0 + 1..y1 {
                    let src = &xp[iy * g.w..iy * g.w + n_in];
                    for (a, &v) in r.iter_mut().zip(src) {
                        *a = if MAX {
                            if v > *a {
                                v
                            } else {
                                *a
                            }
                        } else {
                            *a + v
                        };
                    }
                }
                for (ox, ov) in orow.iter_mut().enumerate() {
                    let cells = &row[ox * s..ox * s + g.kw];
                    let mut acc = cells[0];
                    for &v in &cells[1..] {
                        acc = if MAX {
                            if v > acc {
                                v
                            } else {
                                acc
                            }
                        } else {
                            acc + v
                        };
                    }
                    *ov = if MAX { acc } else { acc * inv };
                }
            }
        },
    );
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
            let x = checked_slice::<T>(s, l, self.name(), "input", g.in_len())?;
            Ok((
                T::to_cpu_storage_owned(pool_forward::<T, true>(x, g)),
                g.out_shape(),
            ))
        })
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(x.apply_op2_no_bwd(&grad, &MaxPoolBwd { g: self.g })?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.g;
        let n = g.out_len();
        let out = cuda::launch(
            self.name(),
            cuda::Module::Pool,
            "max_pool_fwd",
            &[(s, l, g.in_len())],
            n,
            cuda::Grid::Threads(n),
            g,
        )?;
        Ok((out, g.out_shape()))
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
            let x = checked_slice::<T>(s1, l1, self.name(), "input", g.in_len())?;
            let gout = checked_slice::<T>(s2, l2, self.name(), "grad", g.out_len())?;
            Ok((
                T::to_cpu_storage_owned(max_backward(x, gout, g)),
                g.in_shape(),
            ))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.g;
        let n_in = g.in_len();
        let gx = cuda::launch(
            self.name(),
            cuda::Module::Pool,
            "max_pool_bwd",
            &[(s1, l1, n_in), (s2, l2, g.out_len())],
            n_in,
            cuda::Grid::Threads(n_in),
            g,
        )?;
        Ok((gx, g.in_shape()))
    }
}

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg_pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s, |T| {
            let x = checked_slice::<T>(s, l, self.name(), "input", g.in_len())?;
            Ok((
                T::to_cpu_storage_owned(pool_forward::<T, false>(x, g)),
                g.out_shape(),
            ))
        })
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(&AvgPoolBwd { g: self.g })?))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.g;
        let n = g.out_len();
        let out = cuda::launch(
            self.name(),
            cuda::Module::Pool,
            "avg_pool_fwd",
            &[(s, l, g.in_len())],
            n,
            cuda::Grid::Threads(n),
            g,
        )?;
        Ok((out, g.out_shape()))
    }
}

impl CustomOp1 for AvgPoolBwd {
    fn name(&self) -> &'static str {
        "avg_pool2d_bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = &self.g;
        with_float_storage!(self.name(), s, |T| {
            let gout = checked_slice::<T>(s, l, self.name(), "grad", g.out_len())?;
            Ok((T::to_cpu_storage_owned(avg_backward(gout, g)), g.in_shape()))
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let g = &self.g;
        let n = g.in_len();
        let out = cuda::launch(
            self.name(),
            cuda::Module::Pool,
            "avg_pool_bwd",
            &[(s, l, g.out_len())],
            n,
            cuda::Grid::Threads(n),
            g,
        )?;
        Ok((out, g.in_shape()))
    }
}
