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
use super::{for_each_chunk, input_and_weight_grads, uninit_vec, Geom, MemoryFormat, Threads};
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

    /// The transposed view.
    fn t(self) -> Self {
        Self {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
        }
    }

    /// Rows `r0..r0 + n`.
    fn row_range(self, r0: usize, n: usize) -> Self {
        assert!(r0 + n <= self.rows, "row range out of the matrix");
        Self {
            data: if n == 0 {
                &[]
            } else {
                &self.data[r0 * self.rs..]
            },
            rows: n,
            ..self
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
fn image_rhs<'a, T: Elem>(
    x: &'a [T],
    i: usize,
    g: &Geom,
    input: MemoryFormat,
    cols: &'a mut Vec<T>,
) -> Mat<'a, T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.c * g.kh * g.kw);
    let xi = &x[i * g.c * hw..(i + 1) * g.c * hw];
    if input == MemoryFormat::Nhwc {
        // Pointwise (checked by the caller): `[HW, C]` is the transposed `[C, HW]`.
        Mat::rm_t(xi, kk, howo)
    } else if is_pointwise(g) {
        Mat::rm(xi, kk, howo)
    } else {
        im2col(xi, g, cols);
        Mat::rm(cols, kk, howo)
    }
}

pub(crate) fn forward<T: Elem>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    forward_with(
        x,
        MemoryFormat::Nchw,
        DenseWeights::OutIn(w),
        g,
        Threads::Pool,
        |_, _, _| {},
    )
}

/// A dense conv's weights, arranged for the output format they produce.
#[derive(Clone, Copy, Debug)]
pub(crate) enum DenseWeights<'a, T> {
    /// `[Cout, Cin·kh·kw]` row-major: a planar output, `out = W · cols`.
    OutIn(&'a [T]),
    /// `[Cin·kh·kw, Cout]` row-major: a channels-last output, `outᵀ = colsᵀ · Wᵀ`. Stored
    /// transposed so the gemm reads it as is: given `[Cout, K]`, the `gemm` crate repacked
    /// it on every call (15 % of an EfficientNet-Lite0 forward).
    InOut(&'a [T]),
}

/// [`forward`] from an input in `input` format into the format `w` is arranged for, then
/// `epilogue(image, first, block)` on each output block right after the gemm wrote it, while
/// it is still warm in cache: inference fuses bias, activation and residual this way instead
/// of three more passes. A planar output hands over channel rows (`block` is `[channels,
/// Ho·Wo]` from channel `first`), a channels-last one pixel rows (`[pixels, Cout]` from
/// pixel `first`).
///
/// A channels-last input must be a pointwise conv's (no im2col of that layout); the caller
/// checks.
///
/// Images are spread over the threads; with fewer images than threads (a lone query) each
/// image's output is split (channels, or pixels when channels-last) over the threads in one
/// parallel region per layer: the gemm's own threading plus a separate parallel epilogue
/// cost two fork-joins per layer, which at batch 1 was a fifth of the time in thread
/// wake-ups.
pub(crate) fn forward_with<T: Elem, E>(
    x: &[T],
    input: MemoryFormat,
    w: DenseWeights<T>,
    g: &Geom,
    threads: Threads,
    epilogue: E,
) -> Vec<T>
where
    E: Fn(usize, usize, &mut [T]) + Sync,
{
    assert!(
        input == MemoryFormat::Nchw || is_pointwise(g),
        "a channels-last input needs a pointwise conv"
    );
    let (howo, kk) = (g.ho * g.wo, g.c * g.kh * g.kw);
    // Rows of one image's output block and the length of one row.
    let (rows, row_len) = match w {
        DenseWeights::OutIn(_) => (g.co, howo),
        DenseWeights::InOut(_) => (howo, g.co),
    };
    // SAFETY: every image's output block is written by its gemm (no accumulation) before
    // the epilogue reads it.
    let mut out = unsafe { uninit_vec(g.b * rows * row_len) };
    // Rows `r0..` of image `i`'s output block, from its gemm operands.
    let block = |o: &mut [T], i: usize, r0: usize, cols: Mat<T>| {
        let n = o.len() / row_len;
        match w {
            DenseWeights::OutIn(w) => {
                let wm = Mat::rm(&w[r0 * kk..(r0 + n) * kk], n, kk);
                matmul(o, false, wm, cols, Parallelism::None);
            }
            DenseWeights::InOut(w) => {
                let wt = Mat::rm(w, kk, g.co);
                matmul(o, false, cols.t().row_range(r0, n), wt, Parallelism::None);
            }
        }
        epilogue(i, r0, o);
    };
    let nt = num_threads();
    if threads == Threads::Pool && g.b < nt && nt > 1 {
        let per_task = rows.div_ceil(nt);
        let mut cols = Vec::new();
        for (i, o) in out.chunks_mut(rows * row_len).enumerate() {
            let b = image_rhs(x, i, g, input, &mut cols);
            o.par_chunks_mut(per_task * row_len)
                .enumerate()
                .for_each(|(t, o)| block(o, i, t * per_task, b));
        }
        return out;
    }
    let image = |cols: &mut Vec<T>, (i, o): (usize, &mut [T])| {
        block(o, i, 0, image_rhs(x, i, g, input, cols));
    };
    for_each_chunk(&mut out, rows * row_len, threads, Vec::new, image);
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
