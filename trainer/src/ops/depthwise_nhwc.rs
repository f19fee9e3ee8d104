//! Inference depthwise convolution on channels-last (`[B, H, W, C]`) activations, with the
//! folded-BN shift and ReLU6 applied in registers before the single store.
//!
//! Channels are the vector lanes: every output pixel is `C` independent dot products over the
//! same taps, so a 7 × 7 plane vectorises exactly as well as a 112 × 112 one, and a block of
//! neighbouring pixels shares each tap's weight vector. Padding costs no copy: each block
//! first lists where each of its taps reads, a pixel of the input or, outside the image, a
//! row of zeros, so edge pixels run the same code as interior ones. On EfficientNet-Lite0
//! the planar kernel ([`super::depthwise`]) spent more time on its phase copies, the late
//! layers' short planes and the separate bias/activation pass than on the taps themselves.
//!
//! Taps are accumulated in the planar kernel's order (row by row, from zero), reading zeros
//! where it reads its padding, so outputs match [`super::depthwise::forward`] bit for bit.

use super::elem::has_avx2_fma;
use super::{for_each_chunk, uninit_vec, Geom, Threads};

/// Channel lanes per vector block (one AVX2 register of f32).
const LANES: usize = 8;
/// Output pixels computed together, sharing each tap's weight load.
const PIXELS: usize = 4;

/// What happens to each accumulated output before it is stored: `+ shift[c]`, then ReLU6
/// when `relu6`.
#[derive(Clone, Copy)]
pub(crate) struct Epilogue<'a> {
    pub shift: &'a [f32],
    pub relu6: bool,
}

impl Epilogue<'_> {
    #[inline(always)]
    fn apply(&self, v: f32, c: usize) -> f32 {
        let v = v + self.shift[c];
        if self.relu6 {
            v.clamp(0.0, 6.0)
        } else {
            v
        }
    }
}

/// `out[b][oy][ox][c] = epi(Σ_taps taps[ky·kw + kx][c] · x[b][oy·s + ky − top][ox·s + kx −
/// left][c])`, channels-last in and out; output rows are spread over `threads`. `taps` is
/// the planar `[C, kh·kw]` filter transposed: one contiguous channel vector per tap.
pub(crate) fn forward(
    x: &[f32],
    taps: &[f32],
    g: &Geom,
    epi: Epilogue,
    threads: Threads,
) -> Vec<f32> {
    assert_eq!(x.len(), g.in_len(), "depthwise input size");
    assert_eq!(taps.len(), g.c * g.kh * g.kw, "depthwise weight size");
    assert_eq!(epi.shift.len(), g.c, "depthwise shift size");
    assert_eq!(g.co, g.c, "depthwise keeps the channel count");
    let row_len = g.wo * g.c;
    let zeros = vec![0.0; g.c];
    let layer = Layer {
        taps,
        g,
        epi,
        interior: interior(g),
    };
    // SAFETY: `row` writes every element of its output row.
    let mut out = unsafe { uninit_vec(g.b * g.ho * row_len) };
    for_each_chunk(
        &mut out,
        row_len,
        threads,
        <(Table, Table)>::default,
        |tables, (r, o)| {
            let (img, oy) = (r / g.ho, r % g.ho);
            let xi = &x[img * g.h * g.w * g.c..(img + 1) * g.h * g.w * g.c];
            let src = Source {
                x: xi,
                zeros: &zeros,
            };
            row_mv(layer, src, oy, o, tables);
        },
    );
    out
}

/// What every row of one layer shares: tap-major weights, geometry, epilogue, and the
/// output columns whose taps all fall inside the input ([`interior`]).
#[derive(Clone, Copy)]
struct Layer<'a> {
    taps: &'a [f32],
    g: &'a Geom,
    epi: Epilogue<'a>,
    interior: (usize, usize),
}

/// One image's input and a pixel's worth of zeros, what a tap outside the image reads.
#[derive(Clone, Copy)]
struct Source<'a> {
    x: &'a [f32],
    zeros: &'a [f32],
}

/// Output columns whose taps all fall inside the input: `[lo, hi)`.
fn interior(g: &Geom) -> (usize, usize) {
    let [_, _, pl, _] = g.pad;
    let lo = pl.div_ceil(g.stride).min(g.wo);
    let hi = if g.w + pl >= g.kw {
        ((g.w + pl - g.kw) / g.stride + 1).min(g.wo)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Where a block's taps read: `ptrs[t · P + p]` for tap `t` of pixel `p`, each the start of
/// `c` readable floats (an input pixel, or zeros outside the image).
type Table = Vec<*const f32>;

/// Fills `table` for the [`PIXELS`] pixels from `ox` of row `oy`, kernel rows `ky0..ky1`.
/// Pixels past the row's end read zeros; their results are not stored.
fn fill_table(
    src: Source,
    g: &Geom,
    oy: usize,
    ox: usize,
    (ky0, ky1): (usize, usize),
    table: &mut Table,
) {
    let [pt, _, pl, _] = g.pad;
    let (s, c) = (g.stride, g.c);
    table.clear();
    for ky in ky0..ky1 {
        let iy = oy * s + ky - pt;
        for kx in 0..g.kw {
            for p in 0..PIXELS {
                let ix = ((ox + p) * s + kx).checked_sub(pl).filter(|&ix| ix < g.w);
                table.push(match ix {
                    Some(ix) if ox + p < g.wo => src.x[(iy * g.w + ix) * c..][..c].as_ptr(),
                    _ => src.zeros.as_ptr(),
                });
            }
        }
    }
}

/// One output row `oy` of one image, in blocks of [`PIXELS`] pixels. A block whose taps all
/// fall inside the image reads through the row's first such block's table, shifted by the
/// pixels between them (building a table per block cost more than the taps on 32-channel
/// layers); the blocks at the edges build their own, with zeros for the padding.
#[inline(always)]
fn row<const FMA: bool>(
    layer: Layer,
    src: Source,
    oy: usize,
    out: &mut [f32],
    (edge, inner): &mut (Table, Table),
) {
    let Layer {
        taps,
        g,
        epi,
        interior: (lo, hi),
    } = layer;
    let [pt, _, _, _] = g.pad;
    let (s, c) = (g.stride, g.c);
    // Kernel rows whose input row lies inside the image; the others are skipped outright.
    let ky0 = pt.saturating_sub(oy * s);
    let ky1 = g.kh.min((g.h + pt).saturating_sub(oy * s)).max(ky0);
    let n_taps = (ky1 - ky0) * g.kw;
    let tap_weights = &taps[ky0 * g.kw * c..ky1 * g.kw * c];
    let mut inner_ox = None;
    for ox in (0..g.wo).step_by(PIXELS) {
        let (table, delta) = if ox >= lo && ox + PIXELS <= hi {
            let first = *inner_ox.get_or_insert_with(|| {
                fill_table(src, g, oy, ox, (ky0, ky1), inner);
                ox
            });
            (&*inner, (ox - first) * s * c)
        } else {
            fill_table(src, g, oy, ox, (ky0, ky1), edge);
            (&*edge, 0)
        };
        debug_assert_eq!(table.len(), n_taps * PIXELS);
        let n = PIXELS.min(g.wo - ox);
        let out = &mut out[ox * c..(ox + n) * c];
        // SAFETY: every table entry plus `delta` points at `c` readable floats (an input
        // pixel of this block, or `zeros` with `delta` 0), `tap_weights` holds `c` weights
        // for each of the `n_taps` taps, `epi.shift` has `c` values and `out` holds the `n`
        // pixels stored.
        unsafe { block::<FMA>(table, delta, tap_weights, n_taps, c, epi, out, n) };
    }
}

/// `out[p][ch] = epi(Σ_t w[t][ch] · (table[t·P + p] + delta)[ch])` for the first `n` of
/// [`PIXELS`] pixels, full lane blocks vectorised where `FMA` (AVX2 + FMA), the rest lane
/// by lane.
///
/// # Safety
/// Every `table` entry plus `delta` must point at `c` readable floats; `w` holds `n_taps · c`
/// weights, `table` `n_taps · PIXELS` entries, `out` `n · c` floats, `epi.shift` `c` values.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn block<const FMA: bool>(
    table: &[*const f32],
    delta: usize,
    w: &[f32],
    n_taps: usize,
    c: usize,
    epi: Epilogue,
    out: &mut [f32],
    n: usize,
) {
    #[cfg(target_arch = "x86_64")]
    let done = if FMA {
        avx2::block(
            table,
            delta,
            w.as_ptr(),
            n_taps,
            c,
            epi,
            out.as_mut_ptr(),
            n,
        )
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let madd = |a: f32, b: f32, acc: f32| if FMA { a.mul_add(b, acc) } else { a * b + acc };
    for ch in done..c {
        let mut acc = [0.0f32; PIXELS];
        for t in 0..n_taps {
            let wt = w[t * c + ch];
            for (p, a) in acc.iter_mut().enumerate() {
                *a = madd(wt, *table[t * PIXELS + p].add(delta + ch), *a);
            }
        }
        for (p, a) in acc.iter().take(n).enumerate() {
            out[p * c + ch] = epi.apply(*a, ch);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(layer: Layer, src: Source, oy: usize, out: &mut [f32], tables: &mut (Table, Table)) {
    row::<true>(layer, src, oy, out, tables)
}

/// [`row`] with FMA and 8-lane vectors where the CPU has them.
fn row_mv(layer: Layer, src: Source, oy: usize, out: &mut [f32], tables: &mut (Table, Table)) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU was just checked to support AVX2 and FMA.
        return unsafe { row_avx2(layer, src, oy, out, tables) };
    }
    row::<false>(layer, src, oy, out, tables)
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Epilogue, LANES, PIXELS};
    use std::arch::x86_64::*;

    /// The full 8-channel blocks of [`super::block`]; returns how many channels it did.
    ///
    /// # Safety
    /// As [`super::block`], and the CPU must have AVX2 and FMA.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(
        table: &[*const f32],
        delta: usize,
        w: *const f32,
        n_taps: usize,
        c: usize,
        epi: Epilogue,
        out: *mut f32,
        n: usize,
    ) -> usize {
        let full = c / LANES * LANES;
        let pairs = c / (2 * LANES) * 2 * LANES;
        let args = (table, delta, w, n_taps, c, epi, out, n);
        for c0 in (0..pairs).step_by(2 * LANES) {
            lanes::<2>(args, c0);
        }
        if pairs < full {
            lanes::<1>(args, pairs);
        }
        full
    }

    type Args<'a> = (
        &'a [*const f32],
        usize,
        *const f32,
        usize,
        usize,
        Epilogue<'a>,
        *mut f32,
        usize,
    );

    /// `CB` blocks of 8 channels from `c0`: `CB · PIXELS` independent accumulator chains,
    /// enough to cover the FMA latency (one 8-channel block left only 4 in flight).
    #[inline(always)]
    unsafe fn lanes<const CB: usize>((table, delta, w, n_taps, c, epi, out, n): Args, c0: usize) {
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        let mut acc = [[zero; PIXELS]; CB];
        for (t, src) in table.chunks_exact(PIXELS).take(n_taps).enumerate() {
            for (b, acc) in acc.iter_mut().enumerate() {
                let wv = _mm256_loadu_ps(w.add(t * c + c0 + b * LANES));
                for (a, &px) in acc.iter_mut().zip(src) {
                    let xv = _mm256_loadu_ps(px.add(delta + c0 + b * LANES));
                    *a = _mm256_fmadd_ps(wv, xv, *a);
                }
            }
        }
        for (b, acc) in acc.iter().enumerate() {
            let cb = c0 + b * LANES;
            let shift = _mm256_loadu_ps(epi.shift.as_ptr().add(cb));
            for (p, a) in acc.iter().take(n).enumerate() {
                let mut v = _mm256_add_ps(*a, shift);
                if epi.relu6 {
                    v = _mm256_min_ps(_mm256_max_ps(v, zero), six);
                }
                _mm256_storeu_ps(out.add(p * c + cb), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{depthwise, same_padding, transpose};

    /// The portable instance (what CPUs without AVX2 + FMA run) against the planar kernel,
    /// which may use FMA here: equal up to rounding.
    #[test]
    fn portable_rows_match_the_planar_kernel() {
        for (c, h, w, k, s) in [(11, 9, 8, 3, 2), (16, 7, 7, 5, 1), (3, 2, 5, 3, 1)] {
            let (pt, pb) = same_padding(h, k, s);
            let (pl, pr) = same_padding(w, k, s);
            let g = Geom {
                b: 1,
                c,
                h,
                w,
                co: c,
                kh: k,
                kw: k,
                stride: s,
                pad: [pt, pb, pl, pr],
                ho: (h + pt + pb - k) / s + 1,
                wo: (w + pl + pr - k) / s + 1,
            };
            let planar: Vec<f32> = (0..c * h * w)
                .map(|i| ((i * 7919) % 23) as f32 - 11.0)
                .collect();
            let wts: Vec<f32> = (0..c * k * k)
                .map(|i| ((i * 104729) % 13) as f32 / 6.5 - 1.0)
                .collect();
            let want = depthwise::forward(&planar, &wts, &g);
            let x = transpose(&planar, c, h * w);
            let shift = vec![0.0; c];
            let epi = Epilogue {
                shift: &shift,
                relu6: false,
            };
            let taps = transpose(&wts, c, k * k);
            let mut out = vec![f32::NAN; g.ho * g.wo * c];
            let zeros = vec![0.0; c];
            let src = Source {
                x: &x,
                zeros: &zeros,
            };
            let mut tables = Default::default();
            for (oy, o) in out.chunks_mut(g.wo * c).enumerate() {
                let layer = Layer {
                    taps: &taps,
                    g: &g,
                    epi,
                    interior: interior(&g),
                };
                row::<false>(layer, src, oy, o, &mut tables);
            }
            for ch in 0..c {
                for p in 0..g.ho * g.wo {
                    let (a, b) = (out[p * c + ch], want[ch * g.ho * g.wo + p]);
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1.0),
                        "c {c} k {k} s {s}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
