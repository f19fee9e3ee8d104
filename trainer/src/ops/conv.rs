//! Dense 2-D convolution as im2col + gemm, forward and backward.
//!
//! Per image, with `K = Cin·kh·kw` and `cols [K, Ho·Wo]` the im2col matrix:
//! `out = W[Cout, K] · cols`, `dcols = Wᵀ · dout` (then col2im), `dW += dout · colsᵀ`.
//! A 1×1, stride-1, unpadded conv (most of EfficientNet's FLOPs) uses the image itself as
//! `cols`, so it is exactly one matmul per image with no copy.
//!
//! With at least as many images as threads, images run in parallel with single-threaded
//! gemms (each gemm is small); otherwise the gemm itself is parallel.

use super::elem::{checked_slice, num_threads, with_float_storage, Elem};
use super::{for_each_chunk, input_and_weight_grads, uninit_vec, Geom, Threads};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use gemm::Parallelism;
use rayon::prelude::*;

/// Forward op: `(x [B, Cin, H, W], w [Cout, Cin, kh, kw])` → `[B, Cout, Ho, Wo]`.
pub(crate) struct Conv2d {
    pub(crate) g: Geom,
}

/// Input gradient: `(grad_out, w)` → `[B, Cin, H, W]`.
struct Conv2dBwdInput {
    g: Geom,
}

/// Weight gradient: `(x, grad_out)` → `[Cout, Cin, kh, kw]`.
struct Conv2dBwdWeight {
    g: Geom,
}

impl CustomOp2 for Conv2d {
    fn name(&self) -> &'static str {
        "conv2d"
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
            let w = checked_slice::<T>(s2, l2, self.name(), "weight", g.co * g.c * g.kh * g.kw)?;
            Ok((T::to_cpu_storage_owned(forward(x, w, g)), g.out_shape()))
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        input_and_weight_grads(
            x,
            w,
            grad,
            &Conv2dBwdInput { g: self.g },
            &Conv2dBwdWeight { g: self.g },
        )
    }
}

impl CustomOp2 for Conv2dBwdInput {
    fn name(&self) -> &'static str {
        "conv2d_bwd_input"
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
            let gout = checked_slice::<T>(s1, l1, self.name(), "grad", g.out_len())?;
            let w = checked_slice::<T>(s2, l2, self.name(), "weight", g.co * g.c * g.kh * g.kw)?;
            Ok((
                T::to_cpu_storage_owned(backward_input(gout, w, g)),
                g.in_shape(),
            ))
        })
    }
}

impl CustomOp2 for Conv2dBwdWeight {
    fn name(&self) -> &'static str {
        "conv2d_bwd_weight"
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
                T::to_cpu_storage_owned(backward_weight(x, gout, g)),
                Shape::from((g.co, g.c, g.kh, g.kw)),
            ))
        })
    }
}

/// A strided read-only matrix view for [`matmul`].
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    /// Row stride.
    rs: usize,
    /// Column stride.
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// Row-major `rows × cols`.
    pub(crate) fn rm(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `cols × rows` matrix.
    pub(crate) fn rm_t(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    fn check(&self) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.rs + (self.cols - 1) * self.cs;
            assert!(last < self.data.len(), "matrix view out of bounds");
        }
    }
}

/// `dst (row-major m×n) = [dst +] a · b` through the `gemm` crate.
pub(crate) fn matmul<T: Elem>(
    dst: &mut [T],
    accumulate: bool,
    a: Mat<T>,
    b: Mat<T>,
    par: Parallelism,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "matmul inner dimensions");
    assert_eq!(dst.len(), m * n, "matmul destination size");
    a.check();
    b.check();
    let one = T::from_f64(1.0);
    // SAFETY: the three views were bounds-checked above, `dst` is a unique row-major m×n
    // buffer, and `T` is f32 or f64, both supported by `gemm`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            one,
            one,
            false,
            false,
            false,
            par,
        )
    }
}

fn is_pointwise(g: &Geom) -> bool {
    g.kh == 1 && g.kw == 1 && g.stride == 1 && g.pad == [0; 4]
}

/// Output columns `ox` whose input column `ox·s + k - left` lies in `[0, len)`.
fn valid_range(k: usize, pad: usize, s: usize, len: usize, n_out: usize) -> (usize, usize) {
    let lo = if pad > k { (pad - k).div_ceil(s) } else { 0 };
    let hi = if len + pad > k {
        (len + pad - k).div_ceil(s).min(n_out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// `cols[(ci, ky, kx)][oy·Wo + ox] = x[ci][oy·s + ky - top][ox·s + kx - left]` (0 outside).
fn im2col<T: Elem>(x: &[T], g: &Geom, cols: &mut Vec<T>) {
    let howo = g.ho * g.wo;
    let [pt, _, pl, _] = g.pad;
    let s = g.stride;
    cols.clear();
    cols.resize(g.c * g.kh * g.kw * howo, T::zero());
    let mut row_idx = 0;
    for ci in 0..g.c {
        let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy_lo, oy_hi) = valid_range(ky, pt, s, g.h, g.ho);
            for kx in 0..g.kw {
                let (ox_lo, ox_hi) = valid_range(kx, pl, s, g.w, g.wo);
                let dst = &mut cols[row_idx * howo..(row_idx + 1) * howo];
                row_idx += 1;
                for oy in oy_lo..oy_hi {
                    let iy = oy * s + ky - pt;
                    let src = &xc[iy * g.w..(iy + 1) * g.w];
                    let d = &mut dst[oy * g.wo + ox_lo..oy * g.wo + ox_hi];
                    let ix0 = ox_lo * s + kx - pl;
                    if s == 1 {
                        d.copy_from_slice(&src[ix0..ix0 + d.len()]);
                    } else {
                        for (k, v) in d.iter_mut().enumerate() {
                            *v = src[ix0 + k * s];
                        }
                    }
                }
            }
        }
    }
}

/// Adjoint of [`im2col`]: scatters-adds `cols` into the (zeroed) image gradient `dx`.
fn col2im<T: Elem>(cols: &[T], g: &Geom, dx: &mut [T]) {
    let howo = g.ho * g.wo;
    let [pt, _, pl, _] = g.pad;
    let s = g.stride;
    let mut row_idx = 0;
    for ci in 0..g.c {
        let dc = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            let (oy_lo, oy_hi) = valid_range(ky, pt, s, g.h, g.ho);
            for kx in 0..g.kw {
                let (ox_lo, ox_hi) = valid_range(kx, pl, s, g.w, g.wo);
                let src = &cols[row_idx * howo..(row_idx + 1) * howo];
                row_idx += 1;
                for oy in oy_lo..oy_hi {
                    let iy = oy * s + ky - pt;
                    let d = &mut dc[iy * g.w..(iy + 1) * g.w];
                    let sr = &src[oy * g.wo + ox_lo..oy * g.wo + ox_hi];
                    let ix0 = ox_lo * s + kx - pl;
                    if s == 1 {
                        for (o, &v) in d[ix0..ix0 + sr.len()].iter_mut().zip(sr) {
                            *o += v;
                        }
                    } else {
                        for (k, &v) in sr.iter().enumerate() {
                            d[ix0 + k * s] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Runs `f(image, out_chunk, scratch, gemm_parallelism)` for every image: images in parallel
/// when there are enough of them, otherwise one after the other with a parallel gemm.
fn per_image<T, F>(out: &mut [T], chunk: usize, b: usize, f: F)
where
    T: Elem,
    F: Fn(usize, &mut [T], &mut Vec<T>, Parallelism) + Sync,
{
    let nt = num_threads();
    if b >= nt || nt == 1 {
        out.par_chunks_mut(chunk)
            .enumerate()
            .for_each_init(Vec::new, |scratch, (i, o)| {
                f(i, o, scratch, Parallelism::None)
            });
    } else {
        let mut scratch = Vec::new();
        for (i, o) in out.chunks_mut(chunk).enumerate() {
            f(i, o, &mut scratch, Parallelism::Rayon(nt));
        }
    }
}

/// Image `i`'s input as the gemm's right-hand side `[Cin·kh·kw, Ho·Wo]`: the input itself
/// for a pointwise conv, else its im2col, written to `cols`.
fn image_rhs<'a, T: Elem>(x: &'a [T], i: usize, g: &Geom, cols: &'a mut Vec<T>) -> Mat<'a, T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.c * g.kh * g.kw);
    let xi = &x[i * g.c * hw..(i + 1) * g.c * hw];
    if is_pointwise(g) {
        Mat::rm(xi, kk, howo)
    } else {
        im2col(xi, g, cols);
        Mat::rm(cols, kk, howo)
    }
}

pub(crate) fn forward<T: Elem>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    forward_with(x, w, g, Threads::Pool, |_, _, _| {})
}

/// [`forward`], then `epilogue(image, first_channel, rows)` on each block of output channel
/// rows (`[channels, Ho·Wo]`) right after the gemm wrote it, while it is still warm in cache:
/// inference fuses bias, activation and residual this way instead of three more passes.
///
/// Images are spread over the threads; with fewer images than threads (a lone query) each
/// image's output channels are, in one parallel region per layer: the gemm's own threading
/// plus a separate parallel epilogue cost two fork-joins per layer, which at batch 1 was a
/// fifth of the time in thread wake-ups.
pub(crate) fn forward_with<T: Elem, E>(
    x: &[T],
    w: &[T],
    g: &Geom,
    threads: Threads,
    epilogue: E,
) -> Vec<T>
where
    E: Fn(usize, usize, &mut [T]) + Sync,
{
    let (howo, kk) = (g.ho * g.wo, g.c * g.kh * g.kw);
    // SAFETY: every image's [Cout, Ho·Wo] block is written by its gemm (no accumulation)
    // before the epilogue reads it.
    let mut out = unsafe { uninit_vec(g.b * g.co * howo) };
    let nt = num_threads();
    if threads == Threads::Pool && g.b < nt && nt > 1 {
        // Output channels split over the threads, image by image.
        let per_task = g.co.div_ceil(nt);
        let mut cols = Vec::new();
        for (i, o) in out.chunks_mut(g.co * howo).enumerate() {
            let b = image_rhs(x, i, g, &mut cols);
            o.par_chunks_mut(per_task * howo)
                .enumerate()
                .for_each(|(t, o)| {
                    let ch0 = t * per_task;
                    let rows = o.len() / howo;
                    let wm = Mat::rm(&w[ch0 * kk..(ch0 + rows) * kk], rows, kk);
                    matmul(o, false, wm, b, Parallelism::None);
                    epilogue(i, ch0, o);
                });
        }
        return out;
    }
    let wm = Mat::rm(w, g.co, kk);
    let image = |cols: &mut Vec<T>, (i, o): (usize, &mut [T])| {
        matmul(o, false, wm, image_rhs(x, i, g, cols), Parallelism::None);
        epilogue(i, 0, o);
    };
    for_each_chunk(&mut out, g.co * howo, threads, Vec::new, image);
    out
}

pub(crate) fn backward_input<T: Elem>(gout: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.c * g.kh * g.kw);
    let mut gx = vec![T::zero(); g.b * g.c * hw];
    let wt = Mat::rm_t(w, kk, g.co);
    per_image(&mut gx, g.c * hw, g.b, |i, gxi, dcols, par| {
        let gi = Mat::rm(&gout[i * g.co * howo..(i + 1) * g.co * howo], g.co, howo);
        if is_pointwise(g) {
            matmul(gxi, false, wt, gi, par);
        } else {
            dcols.clear();
            dcols.resize(kk * howo, T::zero());
            matmul(dcols, false, wt, gi, par);
            col2im(dcols, g, gxi);
        }
    });
    gx
}

pub(crate) fn backward_weight<T: Elem>(x: &[T], gout: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.c * g.kh * g.kw);
    let accumulate = |i: usize, gw: &mut [T], cols: &mut Vec<T>, par: Parallelism| {
        let xi = &x[i * g.c * hw..(i + 1) * g.c * hw];
        let gi = Mat::rm(&gout[i * g.co * howo..(i + 1) * g.co * howo], g.co, howo);
        if is_pointwise(g) {
            matmul(gw, true, gi, Mat::rm_t(xi, howo, kk), par);
        } else {
            im2col(xi, g, cols);
            matmul(gw, true, gi, Mat::rm_t(cols, howo, kk), par);
        }
    };
    let nt = num_threads();
    if g.b >= nt && nt > 1 {
        (0..g.b)
            .into_par_iter()
            .fold(
                || (vec![T::zero(); g.co * kk], Vec::new()),
                |(mut gw, mut cols), i| {
                    accumulate(i, &mut gw, &mut cols, Parallelism::None);
                    (gw, cols)
                },
            )
            .map(|(gw, _)| gw)
            .reduce(
                || vec![T::zero(); g.co * kk],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        *x += y;
                    }
                    a
                },
            )
    } else {
        let mut gw = vec![T::zero(); g.co * kk];
        let mut cols = Vec::new();
        let par = if nt > 1 {
            Parallelism::Rayon(nt)
        } else {
            Parallelism::None
        };
        for i in 0..g.b {
            accumulate(i, &mut gw, &mut cols, par);
        }
        gw
    }
}
