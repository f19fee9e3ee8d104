//! Inference depthwise convolution on channels-last (`[B, H, W, C]`) activations, with the
//! folded-BN shift and ReLU6 applied in registers before the single store.
//!
//! Channels are the vector lanes: every output pixel is `C` independent dot products over the
//! same taps, so a 7 × 7 plane vectorises exactly as well as a 112 × 112 one, the padding is
//! a per-pixel choice of which taps to run (no padded copy of the input, no scratch columns),
//! and a block of neighbouring pixels shares each tap's weight vector. On EfficientNet-Lite0
//! the planar kernel ([`super::depthwise`]) spent more time on its phase copies, the late
//! layers' short planes and the separate bias/activation pass than on the taps themselves.
//!
//! Taps are accumulated in the planar kernel's order (row by row, from zero) and the
//! out-of-plane taps it multiplies by padding zeros are skipped, which leaves every sum
//! unchanged: outputs match [`super::depthwise::forward`] bit for bit.

use super::elem::has_avx2_fma;
use super::{for_each_chunk, uninit_vec, Geom, Threads};

/// Channel lanes per vector block (one AVX2 register of f32).
const LANES: usize = 8;
/// Interior output pixels computed together, sharing each tap's weight load.
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

/// Repacks planar depthwise weights `[C, 1, kh, kw]` into the tap-major `[kh·kw, C]` this
/// kernel reads (one contiguous channel vector per tap).
pub(crate) fn taps_major(w: &[f32], c: usize, kk: usize) -> Vec<f32> {
    assert_eq!(w.len(), c * kk, "depthwise weight size");
    let mut t = vec![0.0; c * kk];
    for (ch, wc) in w.chunks_exact(kk).enumerate() {
        for (tap, &v) in wc.iter().enumerate() {
            t[tap * c + ch] = v;
        }
    }
    t
}

/// `out[b][oy][ox][c] = epi(Σ_taps taps[ky·kw + kx][c] · x[b][oy·s + ky − top][ox·s + kx −
/// left][c])`, channels-last in and out; output rows are spread over `threads`.
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
    // SAFETY: `row` writes every element of its output row.
    let mut out = unsafe { uninit_vec(g.b * g.ho * row_len) };
    for_each_chunk(
        &mut out,
        row_len,
        threads,
        || (),
        |_, (r, o)| {
            let (img, oy) = (r / g.ho, r % g.ho);
            let xi = &x[img * g.h * g.w * g.c..(img + 1) * g.h * g.w * g.c];
            row_mv(xi, taps, g, epi, oy, o);
        },
    );
    out
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

/// One output row `oy` of one image (`x` is that image, `[H, W, C]`).
#[inline(always)]
fn row<const FMA: bool>(
    x: &[f32],
    taps: &[f32],
    g: &Geom,
    epi: Epilogue,
    oy: usize,
    out: &mut [f32],
) {
    let [pt, _, pl, _] = g.pad;
    let s = g.stride;
    // Kernel rows whose input row lies inside the image.
    let ky0 = pt.saturating_sub(oy * s);
    let ky1 = g.kh.min((g.h + pt).saturating_sub(oy * s));
    let (lo, hi) = interior(g);
    let kx_range = |ox: usize| {
        let kx0 = pl.saturating_sub(ox * s);
        let kx1 = g.kw.min((g.w + pl).saturating_sub(ox * s));
        (kx0, kx1.max(kx0))
    };
    let mut ox = 0;
    while ox < g.wo {
        if ox >= lo && ox + PIXELS <= hi {
            pixels::<PIXELS, FMA>(x, taps, g, epi, oy, ox, (ky0, ky1), (0, g.kw), out);
            ox += PIXELS;
        } else {
            pixels::<1, FMA>(x, taps, g, epi, oy, ox, (ky0, ky1), kx_range(ox), out);
            ox += 1;
        }
    }
}

/// Output pixels `ox .. ox + P` of row `oy`, all running the taps `ky0..ky1 × kx0..kx1`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn pixels<const P: usize, const FMA: bool>(
    x: &[f32],
    taps: &[f32],
    g: &Geom,
    epi: Epilogue,
    oy: usize,
    ox: usize,
    (ky0, ky1): (usize, usize),
    (kx0, kx1): (usize, usize),
    out: &mut [f32],
) {
    let c = g.c;
    let [pt, _, pl, _] = g.pad;
    let s = g.stride;
    // Where input pixel (iy, ix) of tap (ky, kx) for pixel p starts: the callers only pass
    // taps that land inside the image, so these never underflow or overrun `x`.
    let at = |ky: usize, kx: usize, p: usize| {
        let iy = oy * s + ky - pt;
        let ix = (ox + p) * s + kx - pl;
        (iy * g.w + ix) * c
    };
    let out = &mut out[ox * c..(ox + P) * c];
    let madd = |a: f32, b: f32, acc: f32| if FMA { a.mul_add(b, acc) } else { a * b + acc };
    let full = c / LANES * LANES;
    #[cfg(target_arch = "x86_64")]
    let done = if FMA {
        // SAFETY: `FMA` is only instantiated under `avx2,fma` (see `row_avx2`); the taps
        // `ky0..ky1 × kx0..kx1` land inside the image for all P pixels (the caller's
        // contract), so every load of `at(..) + c0 .. + LANES` with `c0 + LANES <= c` is
        // inside `x`, and the stores inside `out`.
        unsafe {
            avx2::pixels::<P>(
                x.as_ptr(),
                taps.as_ptr(),
                epi,
                out.as_mut_ptr(),
                c,
                at(ky0, kx0, 0),
                Strides {
                    row: g.w * c,
                    pixel: s * c,
                    tap_row: g.kw * c,
                },
                (ky1 - ky0, kx1 - kx0),
                ky0 * g.kw + kx0,
            );
        }
        full
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for c0 in (done..full).step_by(LANES) {
        let mut acc = [[0.0f32; LANES]; P];
        for ky in ky0..ky1 {
            for kx in kx0..kx1 {
                let wv: &[f32; LANES] = taps[(ky * g.kw + kx) * c + c0..][..LANES]
                    .try_into()
                    .expect("a lane block");
                for (p, a) in acc.iter_mut().enumerate() {
                    let i = at(ky, kx, p) + c0;
                    let xv: &[f32; LANES] = x[i..i + LANES].try_into().expect("a lane block");
                    for l in 0..LANES {
                        a[l] = madd(wv[l], xv[l], a[l]);
                    }
                }
            }
        }
        for (p, a) in acc.iter().enumerate() {
            let o: &mut [f32; LANES] = (&mut out[p * c + c0..p * c + c0 + LANES])
                .try_into()
                .expect("a lane block");
            for l in 0..LANES {
                o[l] = epi.apply(a[l], c0 + l);
            }
        }
    }
    // Channels past the last full lane block.
    for ch in full..c {
        for p in 0..P {
            let mut acc = 0.0f32;
            for ky in ky0..ky1 {
                for kx in kx0..kx1 {
                    acc = madd(taps[(ky * g.kw + kx) * c + ch], x[at(ky, kx, p) + ch], acc);
                }
            }
            out[p * c + ch] = epi.apply(acc, ch);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(x: &[f32], taps: &[f32], g: &Geom, epi: Epilogue, oy: usize, out: &mut [f32]) {
    row::<true>(x, taps, g, epi, oy, out)
}

/// [`row`] with FMA and 8-lane vectors where the CPU has them.
fn row_mv(x: &[f32], taps: &[f32], g: &Geom, epi: Epilogue, oy: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU was just checked to support AVX2 and FMA.
        return unsafe { row_avx2(x, taps, g, epi, oy, out) };
    }
    row::<false>(x, taps, g, epi, oy, out)
}

/// Element strides of the channels-last input and the tap-major weights.
#[derive(Clone, Copy)]
struct Strides {
    /// One input row.
    row: usize,
    /// One output pixel's step in the input (stride · C).
    pixel: usize,
    /// One kernel row of taps.
    tap_row: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Epilogue, Strides, LANES};
    use std::arch::x86_64::*;

    /// The full 8-channel blocks of [`super::pixels`] in AVX2 + FMA: `P` accumulators per
    /// block, one weight load per tap shared by the `P` pixels. `x0` is the input offset of
    /// the first tap of pixel 0 (channel 0), `t0` the index of the first tap; `n_ky × n_kx`
    /// taps run.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; every tap of every pixel, for every channel `< c`,
    /// must lie inside the buffers `x` and `taps` point to, and `out` must hold `P · c`.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn pixels<const P: usize>(
        x: *const f32,
        taps: *const f32,
        epi: Epilogue,
        out: *mut f32,
        c: usize,
        x0: usize,
        st: Strides,
        (n_ky, n_kx): (usize, usize),
        t0: usize,
    ) {
        let zero = _mm256_setzero_ps();
        let six = _mm256_set1_ps(6.0);
        let full = c / LANES * LANES;
        let mut c0 = 0;
        while c0 < full {
            let mut acc = [zero; P];
            // Wrapping: the pointers step one row past the last tap after the loops.
            let mut xr = x.wrapping_add(x0 + c0);
            let mut tr = taps.wrapping_add(t0 * c + c0);
            for _ in 0..n_ky {
                let (mut xp, mut tp) = (xr, tr);
                for _ in 0..n_kx {
                    let w = _mm256_loadu_ps(tp);
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(w, _mm256_loadu_ps(xp.add(p * st.pixel)), *a);
                    }
                    xp = xp.wrapping_add(c);
                    tp = tp.wrapping_add(c);
                }
                xr = xr.wrapping_add(st.row);
                tr = tr.wrapping_add(st.tap_row);
            }
            let shift = _mm256_loadu_ps(epi.shift.as_ptr().add(c0));
            for (p, a) in acc.iter().enumerate() {
                let mut v = _mm256_add_ps(*a, shift);
                if epi.relu6 {
                    v = _mm256_min_ps(_mm256_max_ps(v, zero), six);
                }
                _mm256_storeu_ps(out.add(p * c + c0), v);
            }
            c0 += LANES;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{depthwise, same_padding};

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
            let mut x = vec![0.0; planar.len()];
            for ch in 0..c {
                for p in 0..h * w {
                    x[p * c + ch] = planar[ch * h * w + p];
                }
            }
            let shift = vec![0.0; c];
            let epi = Epilogue {
                shift: &shift,
                relu6: false,
            };
            let taps = taps_major(&wts, c, k * k);
            let mut out = vec![f32::NAN; g.ho * g.wo * c];
            for (oy, o) in out.chunks_mut(g.wo * c).enumerate() {
                row::<false>(&x, &taps, &g, epi, oy, o);
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
