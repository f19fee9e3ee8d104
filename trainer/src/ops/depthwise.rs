//! Depthwise 2-D convolution (one `kh × kw` filter per channel), forward and backward.
//!
//! Every kernel works on one `H × W` plane at a time, so rayon splits the work over
//! `(batch, channel)` planes (or over channels for the weight gradient, which sums over the
//! batch). The input plane is first copied into a zero-padded, *phase-split* buffer
//! ([`Phases`]): with it, each tap of a stride-`s` filter reads one contiguous run covering
//! the whole output plane (laid out at the buffer's pitch, a few scratch columns per row),
//! so stride 2 vectorises as well as stride 1, a 7 × 7 plane as well as a 112 × 112 one
//! (row-by-row loops ran the late layers' 7- and 14-wide rows mostly as scalar tails), and
//! the padding never needs a bounds check in the inner loop.
//!
//! The input gradient of a stride-`s` convolution splits into `s²` stride-1 correlations of
//! the output gradient with the sub-kernels `w[py + s·a][px + s·b]` (flipped); each output
//! phase is computed with the same tap kernel as the forward pass.

#[cfg(feature = "cuda")]
use super::cuda;
use super::elem::{checked_slice, has_avx2_fma, with_float_storage, Elem};
use super::{for_each_chunk, input_and_weight_grads, uninit_vec, Geom, Threads};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// Lanes of the explicit partial sums in the weight-gradient dot products (float reductions
/// are not auto-vectorised, since that would reorder additions).
const LANES: usize = 8;

/// Forward op: `x [B, C, H, W]`, `w [C, 1, kh, kw]` → `[B, C, Ho, Wo]`.
pub(crate) struct DepthwiseConv {
    pub(crate) g: Geom,
}

/// Input gradient: `(grad_out, w)` → `[B, C, H, W]`.
struct DepthwiseBwdInput {
    g: Geom,
}

/// Weight gradient: `(x, grad_out)` → `[C, 1, kh, kw]`.
struct DepthwiseBwdWeight {
    g: Geom,
}

impl CustomOp2 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise_conv2d"
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
            let w = checked_slice::<T>(s2, l2, self.name(), "weight", g.c * g.kh * g.kw)?;
            let out = forward(x, w, g);
            Ok((T::to_cpu_storage_owned(out), g.out_shape()))
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
        let n_out = g.out_len();
        let out = cuda::launch(
            self.name(),
            cuda::Module::Depthwise,
            "dw_fwd",
            &[(s1, l1, g.in_len()), (s2, l2, g.c * g.kh * g.kw)],
            n_out,
            cuda::Grid::Threads(n_out),
            g,
        )?;
        Ok((out, g.out_shape()))
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
            &DepthwiseBwdInput { g: self.g },
            &DepthwiseBwdWeight { g: self.g },
        )
    }
}

impl CustomOp2 for DepthwiseBwdInput {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_bwd_input"
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
            let w = checked_slice::<T>(s2, l2, self.name(), "weight", g.c * g.kh * g.kw)?;
            let gx = backward_input(gout, w, g);
            Ok((T::to_cpu_storage_owned(gx), g.in_shape()))
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
            cuda::Module::Depthwise,
            "dw_bwd_input",
            &[(s1, l1, g.out_len()), (s2, l2, g.c * g.kh * g.kw)],
            n_in,
            cuda::Grid::Threads(n_in),
            g,
        )?;
        Ok((gx, g.in_shape()))
    }
}

impl CustomOp2 for DepthwiseBwdWeight {
    fn name(&self) -> &'static str {
        "depthwise_conv2d_bwd_weight"
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
            let gw = backward_weight(x, gout, g);
            Ok((
                T::to_cpu_storage_owned(gw),
                Shape::from((g.c, 1, g.kh, g.kw)),
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
        let taps = g.c * g.kh * g.kw;
        let gw = cuda::launch(
            self.name(),
            cuda::Module::Depthwise,
            "dw_bwd_weight",
            &[(s1, l1, g.in_len()), (s2, l2, g.out_len())],
            taps,
            cuda::Grid::Blocks(taps),
            g,
        )?;
        Ok((gw, Shape::from((g.c, 1, g.kh, g.kw))))
    }
}

/// One input plane as the forward pass and the weight gradient read it: zero-padded and
/// split into `s × s` phases, phase `(py, px)` holding padded pixel `(s·i + py, s·j + px)` at
/// `[i][j]`, each phase `rows × pitch`. Output pixel `(oy, ox)` of tap `(ky, kx)` reads phase
/// `(ky % s, kx % s)` at `[oy + ky / s][ox + kx / s]`, so with the output laid out at the same
/// pitch every tap is one contiguous run over the whole plane ([`Phases::tap`]): a 7 × 7
/// plane vectorises as well as a 112 × 112 one, and the padding needs no bounds checks.
#[derive(Debug, Clone, Copy)]
struct Phases {
    rows: usize,
    pitch: usize,
}

impl Phases {
    fn of(g: &Geom) -> Self {
        Self {
            rows: g.ho + (g.kh - 1) / g.stride,
            pitch: g.wo + (g.kw - 1) / g.stride,
        }
    }

    fn plane(&self) -> usize {
        self.rows * self.pitch
    }

    /// Length of an output plane laid out at `pitch` (the last row unpadded): the run of
    /// every tap. Columns `wo..pitch` of each row are scratch.
    fn run_len(&self, g: &Geom) -> usize {
        (g.ho - 1) * self.pitch + g.wo
    }

    /// Where tap `(ky, kx)`'s run starts in the phase buffer.
    fn tap(&self, g: &Geom, ky: usize, kx: usize) -> usize {
        let s = g.stride;
        ((ky % s) * s + kx % s) * self.plane() + (ky / s) * self.pitch + kx / s
    }
}

/// Copies one input plane into the phase layout of [`Phases`].
///
/// Only the cells that hold input pixels are written; the padding cells are zeroed when the
/// buffer is first sized. So `buf` must be empty or come from an earlier call with the same
/// geometry (each kernel keeps one per worker for the duration of one op), and then every
/// call writes the same cells: on late layers' 7 × 7 planes, re-zeroing the padding cost as
/// much as the convolution.
fn load_phases<T: Elem>(x: &[T], g: &Geom, buf: &mut Vec<T>) {
    let d = Phases::of(g);
    let s = g.stride;
    let [pt, _, pl, _] = g.pad;
    let size = s * s * d.plane();
    if buf.len() != size {
        buf.clear();
        buf.resize(size, T::zero());
    }
    // Row phase py: the s column phases of its rows, one after the other. Phase row i holds
    // input row s·i + py − top, when that is inside the plane.
    for (py, phases) in buf.chunks_exact_mut(s * d.plane()).enumerate() {
        let first = (pt.saturating_sub(py)).div_ceil(s);
        let end = (g.h + pt).saturating_sub(py).div_ceil(s).min(d.rows);
        let src_rows = (first..end).map(|i| {
            let iy = s * i + py - pt;
            (i, &x[iy * g.w..(iy + 1) * g.w])
        });
        if s == 2 {
            let (even, odd) = phases.split_at_mut(d.plane());
            for (i, src) in src_rows {
                let row = i * d.pitch..(i + 1) * d.pitch;
                load_row_stride2(src, pl, &mut even[row.clone()], &mut odd[row]);
            }
            continue;
        }
        for (px, dst) in phases.chunks_exact_mut(d.plane()).enumerate() {
            // Columns j with 0 <= s·j + px − left < W, the same for every row.
            let lo = (pl.saturating_sub(px)).div_ceil(s);
            let hi = (g.w + pl).saturating_sub(px).div_ceil(s).min(d.pitch);
            if lo >= hi {
                continue;
            }
            let start = s * lo + px - pl;
            for (i, src) in src_rows.clone() {
                let d = &mut dst[i * d.pitch + lo..i * d.pitch + hi];
                if s == 1 {
                    d.copy_from_slice(&src[start..start + d.len()]);
                } else {
                    for (v, &xv) in d.iter_mut().zip(src[start..].iter().step_by(s)) {
                        *v = xv;
                    }
                }
            }
        }
    }
}

/// Stride-2 case of [`load_phases`] for both column phases of one row at once:
/// de-interleaves input column pairs into `even` and `odd` (`pitch` each) in one pass,
/// writing only the cells that hold input pixels.
fn load_row_stride2<T: Elem>(src: &[T], pl: usize, even: &mut [T], odd: &mut [T]) {
    let pitch = even.len();
    // Input columns that land inside the buffer: padded column ix + left < 2·pitch.
    let n = src.len().min((2 * pitch).saturating_sub(pl));
    let src = &src[..n];
    // Input column ix sits at padded column c = ix + left, phase c % 2, index c / 2.
    let (first, second, j_first, j_second) = if pl.is_multiple_of(2) {
        (even, odd, pl / 2, pl / 2)
    } else {
        (odd, even, pl / 2, pl / 2 + 1)
    };
    let pairs = src.chunks_exact(2);
    let rest = pairs.remainder();
    let np = pairs.len();
    for ((a, b), pair) in first[j_first..]
        .iter_mut()
        .zip(second[j_second..].iter_mut())
        .zip(pairs)
    {
        *a = pair[0];
        *b = pair[1];
    }
    if let Some(&v) = rest.first() {
        first[j_first + np] = v;
    }
}

/// `out[j] = Σ w[a][b] · seg[a][b][j]`, all taps accumulated in a register per output.
///
/// `KH == 0` selects the runtime-sized path (`kh × kw` taps from `wr`), written as one
/// vectorisable axpy per tap.
#[inline(always)]
fn taps_row<T: Elem, const KH: usize, const KW: usize, const FMA: bool>(
    w: &[[T; KW]; KH],
    seg: &[[&[T]; KW]; KH],
    out: &mut [T],
) {
    let n = out.len();
    for row in seg {
        for s in row {
            assert!(s.len() >= n);
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        let mut acc = T::zero();
        for a in 0..KH {
            for b in 0..KW {
                // SAFETY: every segment was checked above to hold at least `n > j` values.
                let v = unsafe { *seg[a][b].get_unchecked(j) };
                acc = T::madd::<FMA>(w[a][b], v, acc);
            }
        }
        *o = acc;
    }
}

/// Runtime-sized fallback of [`taps_row`]: `out = Σ_t w[t] · seg[t]`.
#[inline(always)]
fn taps_row_any<T: Elem, const FMA: bool>(w: &[T], seg: &[&[T]], out: &mut [T]) {
    out.fill(T::zero());
    for (&wt, s) in w.iter().zip(seg) {
        let s = &s[..out.len()];
        for (o, &v) in out.iter_mut().zip(s) {
            *o = T::madd::<FMA>(wt, v, *o);
        }
    }
}

/// Forward of one plane: `buf` is the input in the [`Phases`] layout, `w` this channel's
/// `kh·kw` filter, `out` the output plane at the phases' pitch ([`Phases::run_len`]).
#[inline(always)]
fn fwd_plane<T: Elem, const KH: usize, const KW: usize, const FMA: bool>(
    buf: &[T],
    w: &[T],
    g: &Geom,
    out: &mut [T],
) {
    let d = Phases::of(g);
    let n = out.len();
    let run = |ky: usize, kx: usize| {
        let st = d.tap(g, ky, kx);
        &buf[st..st + n]
    };
    if KH == 0 {
        let seg: Vec<&[T]> = (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| run(ky, kx))
            .collect();
        taps_row_any::<T, FMA>(w, &seg, out);
        return;
    }
    let wk: [[T; KW]; KH] = std::array::from_fn(|a| std::array::from_fn(|b| w[a * KW + b]));
    let seg: [[&[T]; KW]; KH] = std::array::from_fn(|ky| std::array::from_fn(|kx| run(ky, kx)));
    taps_row::<T, KH, KW, FMA>(&wk, &seg, out);
}

/// Builds the zero-padded output-gradient plane for the input gradient:
/// `gbuf[u][v] = gout[u - (qh-1)][v - (qw-1)]`, `rows × cols` (see [`bwd_input_dims`]).
fn load_grad_plane<T: Elem>(gout: &[T], g: &Geom, buf: &mut Vec<T>) {
    let d = bwd_input_dims(g);
    buf.clear();
    buf.resize(d.rows * d.cols, T::zero());
    for oy in 0..g.ho {
        let u = oy + d.qh - 1;
        if u >= d.rows {
            break;
        }
        let n = g.wo.min(d.cols - (d.qw - 1));
        buf[u * d.cols + d.qw - 1..u * d.cols + d.qw - 1 + n]
            .copy_from_slice(&gout[oy * g.wo..oy * g.wo + n]);
    }
}

/// Sizes of the input-gradient computation: sub-kernel `qh × qw`, gradient buffer
/// `rows × cols`.
struct BwdInputDims {
    qh: usize,
    qw: usize,
    rows: usize,
    cols: usize,
}

fn bwd_input_dims(g: &Geom) -> BwdInputDims {
    let s = g.stride;
    let [pt, _, pl, _] = g.pad;
    let qh = g.kh.div_ceil(s);
    let qw = g.kw.div_ceil(s);
    // Phase indices jy = r / s for padded rows r < top + H; likewise for columns.
    let jrows = (pt + g.h - 1) / s + 1;
    let jcols = (pl + g.w - 1) / s + 1;
    BwdInputDims {
        qh,
        qw,
        rows: jrows + qh - 1,
        cols: jcols + qw - 1,
    }
}

/// Input gradient of one plane. For padded row `r = s·jy + py` and column phase `px`,
/// `gpad[r][s·j + px] = Σ_{a,b} w[py + s·(qh-1-a)][px + s·(qw-1-b)] · gbuf[jy + a][j + b]`.
#[inline(always)]
fn bwd_input_plane<T: Elem, const QH: usize, const QW: usize, const FMA: bool>(
    gbuf: &[T],
    w: &[T],
    g: &Geom,
    gx: &mut [T],
    tmp: &mut Vec<T>,
) {
    let d = bwd_input_dims(g);
    let s = g.stride;
    let [pt, _, pl, _] = g.pad;
    let (kh, kw) = (g.kh, g.kw);
    // Flipped, zero-padded sub-kernel for phase (py, px).
    let sub = |py: usize, px: usize, a: usize, b: usize| -> T {
        let ky = py + s * (d.qh - 1 - a);
        let kx = px + s * (d.qw - 1 - b);
        if ky < kh && kx < kw {
            w[ky * kw + kx]
        } else {
            T::zero()
        }
    };
    let mut wany: Vec<T> = Vec::new();
    let mut seg_any: Vec<&[T]> = Vec::new();
    for iy in 0..g.h {
        let r = iy + pt;
        let (jy, py) = (r / s, r % s);
        for px in 0..s {
            // Column phases j whose padded column s·j + px lands inside the plane.
            let lo = if pl > px { (pl - px).div_ceil(s) } else { 0 };
            let hi = (g.w + pl - px).div_ceil(s);
            if lo >= hi {
                continue;
            }
            let n = hi - lo;
            let row_out: &mut [T] = if s == 1 {
                &mut gx[iy * g.w..(iy + 1) * g.w]
            } else {
                tmp.clear();
                tmp.resize(n, T::zero());
                &mut tmp[..]
            };
            if QH == 0 {
                wany.clear();
                seg_any.clear();
                for a in 0..d.qh {
                    let row = &gbuf[(jy + a) * d.cols..(jy + a + 1) * d.cols];
                    for b in 0..d.qw {
                        wany.push(sub(py, px, a, b));
                        seg_any.push(&row[lo + b..lo + b + n]);
                    }
                }
                taps_row_any::<T, FMA>(&wany, &seg_any, row_out);
            } else {
                let wk: [[T; QW]; QH] =
                    std::array::from_fn(|a| std::array::from_fn(|b| sub(py, px, a, b)));
                let seg: [[&[T]; QW]; QH] = std::array::from_fn(|a| {
                    let row = &gbuf[(jy + a) * d.cols..(jy + a + 1) * d.cols];
                    std::array::from_fn(|b| &row[lo + b..lo + b + n])
                });
                taps_row::<T, QH, QW, FMA>(&wk, &seg, row_out);
            }
            if s != 1 {
                let dst = &mut gx[iy * g.w..(iy + 1) * g.w];
                for (k, &v) in tmp.iter().enumerate() {
                    dst[s * (lo + k) + px - pl] = v;
                }
            }
        }
    }
}

/// Weight gradient of one plane, accumulated into `gw` (`kh·kw`): `gw[ky][kx] += Σ_t
/// gflat[t] · run(ky, kx)[t]`, where `buf` is the input in the [`Phases`] layout and `gflat`
/// the output gradient at the phases' pitch with zeros in the scratch columns.
#[inline(always)]
fn bwd_weight_plane<T: Elem, const KW: usize, const FMA: bool>(
    buf: &[T],
    gflat: &[T],
    g: &Geom,
    gw: &mut [T],
) {
    let d = Phases::of(g);
    let n = gflat.len();
    let full = n / LANES * LANES;
    let run = |ky: usize, kx: usize| {
        let st = d.tap(g, ky, kx);
        &buf[st..st + n]
    };
    for ky in 0..g.kh {
        if KW == 0 {
            for kx in 0..g.kw {
                let sg = run(ky, kx);
                let mut acc = [T::zero(); LANES];
                dot_lanes::<T, FMA>(&gflat[..full], &sg[..full], &mut acc);
                let tail = (full..n).fold(T::zero(), |t, j| T::madd::<FMA>(gflat[j], sg[j], t));
                gw[ky * g.kw + kx] += acc.iter().fold(tail, |a, &b| a + b);
            }
            continue;
        }
        // The KW taps of a kernel row share the loads of `gflat`; two chunks at a time give
        // 2·KW independent accumulator chains (KW alone left the FMAs waiting on each other).
        let seg: [&[T]; KW] = std::array::from_fn(|kx| run(ky, kx));
        let mut acc = [[[T::zero(); LANES]; KW]; 2];
        // The odd last chunk repeats the loop body on purpose: one closure for both (taking
        // `&mut acc[u]`) kept the accumulators out of registers, and the whole training
        // step ran 2× slower (1.03 → 2.05 s at batch 32).
        let pairs = full / (2 * LANES) * 2 * LANES;
        for (i, gc) in gflat[..pairs].chunks_exact(2 * LANES).enumerate() {
            for (u, acc) in acc.iter_mut().enumerate() {
                let at = (2 * i + u) * LANES;
                let gv: &[T; LANES] = gc[u * LANES..][..LANES].try_into().expect("a chunk");
                for kx in 0..KW {
                    let sv: &[T; LANES] = seg[kx][at..at + LANES].try_into().expect("a chunk");
                    for l in 0..LANES {
                        acc[kx][l] = T::madd::<FMA>(gv[l], sv[l], acc[kx][l]);
                    }
                }
            }
        }
        if pairs < full {
            let gv: &[T; LANES] = gflat[pairs..full].try_into().expect("a chunk");
            for kx in 0..KW {
                let sv: &[T; LANES] = seg[kx][pairs..full].try_into().expect("a chunk");
                for l in 0..LANES {
                    acc[0][kx][l] = T::madd::<FMA>(gv[l], sv[l], acc[0][kx][l]);
                }
            }
        }
        for kx in 0..KW {
            let tail = (full..n).fold(T::zero(), |t, j| T::madd::<FMA>(gflat[j], seg[kx][j], t));
            let lanes = acc[0][kx].iter().chain(&acc[1][kx]);
            gw[ky * g.kw + kx] += lanes.fold(tail, |a, &b| a + b);
        }
    }
}

#[inline(always)]
fn dot_lanes<T: Elem, const FMA: bool>(a: &[T], b: &[T], acc: &mut [T; LANES]) {
    for (ac, bc) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            acc[l] = T::madd::<FMA>(ac[l], bc[l], acc[l]);
        }
    }
}

/// Instantiates a plane kernel twice (plain and `avx2,fma`) behind one safe entry point.
/// (An `avx512f` instance measured no faster: these loops are bound by loads, not lanes.)
macro_rules! multiversion {
    ($entry:ident, $avx:ident, $kernel:ident, <$($c:ident),*>, ($($arg:ident : $ty:ty),*)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        fn $avx<T: Elem, $(const $c: usize),*>($($arg: $ty),*) {
            $kernel::<T, $($c,)* true>($($arg),*)
        }

        fn $entry<T: Elem, $(const $c: usize),*>($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            if has_avx2_fma() {
                // SAFETY: the CPU was just checked to support AVX2 and FMA.
                return unsafe { $avx::<T, $($c),*>($($arg),*) };
            }
            $kernel::<T, $($c,)* false>($($arg),*)
        }
    };
}

multiversion!(fwd_plane_mv, fwd_plane_avx2, fwd_plane, <KH, KW>,
    (buf: &[T], w: &[T], g: &Geom, out: &mut [T]));
multiversion!(bwd_input_plane_mv, bwd_input_plane_avx2, bwd_input_plane, <QH, QW>,
    (gbuf: &[T], w: &[T], g: &Geom, gx: &mut [T], tmp: &mut Vec<T>));
multiversion!(bwd_weight_plane_mv, bwd_weight_plane_avx2, bwd_weight_plane, <KW>,
    (buf: &[T], gflat: &[T], g: &Geom, gw: &mut [T]));

/// Calls `$f::<T, N, N>` for the square sizes with a specialised kernel, `$f::<T, 0, 0>`
/// (runtime sizes) otherwise.
macro_rules! square_dispatch {
    ($f:ident, $kh:expr, $kw:expr, ($($arg:expr),*)) => {
        match ($kh, $kw) {
            (1, 1) => $f::<T, 1, 1>($($arg),*),
            (2, 2) => $f::<T, 2, 2>($($arg),*),
            (3, 3) => $f::<T, 3, 3>($($arg),*),
            (4, 4) => $f::<T, 4, 4>($($arg),*),
            (5, 5) => $f::<T, 5, 5>($($arg),*),
            (7, 7) => $f::<T, 7, 7>($($arg),*),
            _ => $f::<T, 0, 0>($($arg),*),
        }
    };
}

/// Depthwise forward over all planes.
pub(crate) fn forward<T: Elem>(x: &[T], w: &[T], g: &Geom) -> Vec<T> {
    forward_with(x, w, g, Threads::Pool, |_, _| {})
}

/// [`forward`], then `epilogue(plane, out_plane)` on each output plane right after it is
/// computed (hot in L1/L2): inference fuses bias and activation this way.
pub(crate) fn forward_with<T: Elem, E>(
    x: &[T],
    w: &[T],
    g: &Geom,
    threads: Threads,
    epilogue: E,
) -> Vec<T>
where
    E: Fn(usize, &mut [T]) + Sync,
{
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.kh * g.kw);
    let d = Phases::of(g);
    let n = d.run_len(g);
    // SAFETY: every output plane is written in full (by `fwd_plane`, or by copying the rows
    // out of `wide`) before the epilogue reads it.
    let mut out = unsafe { uninit_vec(g.b * g.c * howo) };
    for_each_chunk(
        &mut out,
        howo,
        threads,
        || (Vec::new(), Vec::new()),
        |(buf, wide), (plane, o)| {
            let ch = plane % g.c;
            load_phases(&x[plane * hw..(plane + 1) * hw], g, buf);
            let wc = &w[ch * kk..(ch + 1) * kk];
            if d.pitch == g.wo {
                square_dispatch!(fwd_plane_mv, g.kh, g.kw, (buf, wc, g, o));
            } else {
                // Computed at the phases' pitch, then the scratch columns dropped.
                wide.resize(n, T::zero());
                square_dispatch!(fwd_plane_mv, g.kh, g.kw, (buf, wc, g, wide));
                for (dst, src) in o.chunks_exact_mut(g.wo).zip(wide.chunks(d.pitch)) {
                    dst.copy_from_slice(&src[..g.wo]);
                }
            }
            epilogue(plane, o);
        },
    );
    out
}

/// Depthwise input gradient over all planes.
///
/// At stride 1 (with padding smaller than the kernel) this is the forward correlation of the
/// output gradient with the flipped filter, so it runs on the forward kernel's whole-plane
/// tap runs; the row-by-row kernel below ran the late 7- and 14-wide rows mostly as scalar
/// tails.
pub(crate) fn backward_input<T: Elem>(gout: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.kh * g.kw);
    let [pt, pb, pl, pr] = g.pad;
    if g.stride == 1 && pt.max(pb) < g.kh && pl.max(pr) < g.kw {
        let transposed = Geom {
            h: g.ho,
            w: g.wo,
            pad: [g.kh - 1 - pt, g.kh - 1 - pb, g.kw - 1 - pl, g.kw - 1 - pr],
            ho: g.h,
            wo: g.w,
            ..*g
        };
        let flipped: Vec<T> = w.chunks(kk).flat_map(|f| f.iter().rev().copied()).collect();
        return forward(gout, &flipped, &transposed);
    }
    let d = bwd_input_dims(g);
    let mut gx = vec![T::zero(); g.b * g.c * hw];
    gx.par_chunks_mut(hw).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(gbuf, tmp), (plane, gxp)| {
            let ch = plane % g.c;
            load_grad_plane(&gout[plane * howo..(plane + 1) * howo], g, gbuf);
            let wc = &w[ch * kk..(ch + 1) * kk];
            square_dispatch!(bwd_input_plane_mv, d.qh, d.qw, (gbuf, wc, g, gxp, tmp));
        },
    );
    gx
}

/// Depthwise weight gradient, summed over the batch; parallel over channels.
pub(crate) fn backward_weight<T: Elem>(x: &[T], gout: &[T], g: &Geom) -> Vec<T> {
    let (hw, howo, kk) = (g.h * g.w, g.ho * g.wo, g.kh * g.kw);
    let d = Phases::of(g);
    let n = d.run_len(g);
    let mut gw = vec![T::zero(); g.c * kk];
    gw.par_chunks_mut(kk).enumerate().for_each_init(
        || (Vec::new(), Vec::new()),
        |(buf, gflat), (ch, gwc)| {
            for b in 0..g.b {
                let plane = b * g.c + ch;
                load_phases(&x[plane * hw..(plane + 1) * hw], g, buf);
                let gp = &gout[plane * howo..(plane + 1) * howo];
                let gp: &[T] = if d.pitch == g.wo {
                    gp
                } else {
                    // The gradient at the phases' pitch, zero in the scratch columns: they
                    // are zeroed when the buffer is sized and never written after.
                    if gflat.len() != n {
                        gflat.clear();
                        gflat.resize(n, T::zero());
                    }
                    for (dst, src) in gflat.chunks_mut(d.pitch).zip(gp.chunks_exact(g.wo)) {
                        dst[..g.wo].copy_from_slice(src);
                    }
                    gflat
                };
                match g.kw {
                    3 => bwd_weight_plane_mv::<T, 3>(buf, gp, g, gwc),
                    5 => bwd_weight_plane_mv::<T, 5>(buf, gp, g, gwc),
                    7 => bwd_weight_plane_mv::<T, 7>(buf, gp, g, gwc),
                    _ => bwd_weight_plane_mv::<T, 0>(buf, gp, g, gwc),
                }
            }
        },
    );
    gw
}
