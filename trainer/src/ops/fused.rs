//! Inference-only convolutions with frozen batch norm folded in and the bias, ReLU6 and
//! residual add fused into the kernels' output pass.
//!
//! The training path ([`crate::backbone::layers::ConvBn`]) folds BN into the weights on every
//! call, in differentiable candle ops, and then runs `+ shift`, `clamp` and `+ residual` as
//! separate candle ops: three more (single-threaded) passes over each activation, plus a
//! backprop graph that keeps every intermediate alive until the output is dropped. For
//! embedding, none of that is needed: [`FusedConv`] folds once at load time (same f32
//! arithmetic as the training path, so outputs match), works on plain slices, and applies
//! `shift`, activation and residual to each output plane or image while it is still in cache.
//!
//! Activations can be planar or channels-last ([`MemoryFormat`]). EfficientNet's fused path
//! runs channels-last after the stem: its depthwise convs then vectorise over channels
//! (`ops::depthwise_nhwc`; batch-32 embedding on 2 cores 150 → 175 img/s), and its 1×1
//! convs are the same gemms with transposed operands, over a whole group of images at once
//! where several share the call (the late layers: 175 → 205 img/s).

use candle_core::{bail, Result, Tensor};
use rayon::prelude::*;

use super::conv::{self, DenseWeights};
use super::{depthwise, depthwise_nhwc, same_padding, transpose, Geom, MemoryFormat, Threads};

/// Activation applied after the folded batch norm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    None,
    /// `min(max(x, 0), 6)`.
    Relu6,
}

/// Frozen batch-norm statistics and affine parameters of one conv, `[channels]` each.
pub struct BnParams<'a> {
    pub gamma: &'a Tensor,
    pub beta: &'a Tensor,
    pub mean: &'a Tensor,
    pub var: &'a Tensor,
    pub eps: f64,
}

/// A bias-free conv + frozen BN (+ activation), folded, with TF "SAME" padding.
#[derive(Debug, Clone)]
pub struct FusedConv {
    /// Folded weights `[Cout, Cin/groups, k, k]`, row-major.
    weight: Vec<f32>,
    /// Folded BN shift, `[Cout]`.
    shift: Vec<f32>,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    depthwise: bool,
    /// `weight` as the channels-last kernels read it: for a depthwise conv tap-major
    /// (`[k·k, C]`), for a dense one transposed (`[Cin·k·k, Cout]`).
    weight_t: Vec<f32>,
    act: Act,
}

/// An activation of `b` images, `c` channels, `h × w` pixels, as a plain buffer in `format`.
#[derive(Debug, Clone)]
pub struct Activation {
    pub data: Vec<f32>,
    pub b: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub format: MemoryFormat,
}

impl Activation {
    /// Copies a `[B, C, H, W]` f32 tensor.
    pub fn from_tensor(x: &Tensor) -> Result<Self> {
        let (b, c, h, w) = x.dims4()?;
        let data = x
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        Ok(Self {
            data,
            b,
            c,
            h,
            w,
            format: MemoryFormat::Nchw,
        })
    }

    /// The same values in `format` (a copy when it differs).
    pub fn to_format(self, format: MemoryFormat) -> Self {
        if format == self.format {
            return self;
        }
        let (c, hw) = (self.c, self.h * self.w);
        // Each image is a [C, HW] (planar) or [HW, C] (channels-last) matrix.
        let (rows, cols) = match format {
            MemoryFormat::Nhwc => (c, hw),
            MemoryFormat::Nchw => (hw, c),
        };
        let data = self
            .data
            .chunks(c * hw)
            .flat_map(|img| transpose(img, rows, cols))
            .collect();
        Self {
            data,
            format,
            ..self
        }
    }

    /// The batches of `parts` (same channels, size and format) one after the other.
    pub fn concat(parts: Vec<Self>) -> Result<Self> {
        let Some(first) = parts.first() else {
            bail!("concat of no activations")
        };
        let (c, h, w, format) = (first.c, first.h, first.w, first.format);
        if let Some(p) = parts
            .iter()
            .find(|p| (p.c, p.h, p.w, p.format) != (c, h, w, format))
        {
            bail!(
                "concat: [{}, {}, {}] {:?} does not match [{c}, {h}, {w}] {format:?}",
                p.c,
                p.h,
                p.w,
                p.format
            )
        }
        let b = parts.iter().map(|p| p.b).sum();
        let data = parts.into_iter().flat_map(|p| p.data).collect();
        Ok(Self {
            data,
            b,
            c,
            h,
            w,
            format,
        })
    }

    /// A `[B, C, H, W]` tensor (planar, whatever the buffer's format).
    pub fn into_tensor(self) -> Result<Tensor> {
        let s = self.to_format(MemoryFormat::Nchw);
        Tensor::from_vec(s.data, (s.b, s.c, s.h, s.w), &candle_core::Device::Cpu)
    }
}

fn to_vec(t: &Tensor, what: &str, len: usize) -> Result<Vec<f32>> {
    let v = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    if v.len() != len {
        bail!("fused conv: {what} has {} values, expected {len}", v.len())
    }
    Ok(v)
}

impl FusedConv {
    /// Folds `bn` into `weight` (`[Cout, Cin, k, k]`, or `[C, 1, k, k]` when `depthwise`) with
    /// the same f32 operations as the training path: `s = γ · (1 / √(var + ε))`,
    /// `w' = w · s`, `shift = β − mean · s`.
    pub fn new(
        weight: &Tensor,
        bn: BnParams,
        stride: usize,
        depthwise: bool,
        act: Act,
    ) -> Result<Self> {
        let (cout, cin_g, kh, kw) = weight.dims4()?;
        if kh != kw || stride == 0 {
            bail!("fused conv: square kernel and positive stride needed, got {kh}x{kw}/{stride}")
        }
        if depthwise && cin_g != 1 {
            bail!(
                "fused conv: a depthwise weight must be [C, 1, k, k], got {:?}",
                weight.dims()
            )
        }
        let w = to_vec(weight, "weight", cout * cin_g * kh * kw)?;
        let gamma = to_vec(bn.gamma, "bn weight", cout)?;
        let beta = to_vec(bn.beta, "bn bias", cout)?;
        let mean = to_vec(bn.mean, "bn running_mean", cout)?;
        let var = to_vec(bn.var, "bn running_var", cout)?;
        let eps = bn.eps as f32;
        let per_out = cin_g * kh * kw;
        let mut weight = w;
        let mut shift = Vec::with_capacity(cout);
        for o in 0..cout {
            let s = gamma[o] * (var[o] + eps).sqrt().recip();
            weight[o * per_out..(o + 1) * per_out]
                .iter_mut()
                .for_each(|v| *v *= s);
            shift.push(beta[o] - mean[o] * s);
        }
        let cin = if depthwise { cout } else { cin_g };
        let weight_t = transpose(&weight, cout, per_out);
        Ok(Self {
            weight,
            shift,
            cin,
            cout,
            kernel: kh,
            stride,
            depthwise,
            weight_t,
            act,
        })
    }

    pub fn out_channels(&self) -> usize {
        self.cout
    }

    /// Output height and width for an `h × w` input (TF "SAME" padding: `⌈h / stride⌉`).
    pub fn out_size(&self, h: usize, w: usize) -> (usize, usize) {
        (h.div_ceil(self.stride), w.div_ceil(self.stride))
    }

    fn geom(&self, x: &Activation) -> Geom {
        let (k, s) = (self.kernel, self.stride);
        let (pt, pb) = same_padding(x.h, k, s);
        let (pl, pr) = same_padding(x.w, k, s);
        let (hp, wp) = (x.h + pt + pb, x.w + pl + pr);
        Geom {
            b: x.b,
            c: x.c,
            h: x.h,
            w: x.w,
            co: self.cout,
            kh: k,
            kw: k,
            stride: s,
            pad: [pt, pb, pl, pr],
            ho: (hp - k) / s + 1,
            wo: (wp - k) / s + 1,
        }
    }

    /// `act(conv(x) + shift) [+ residual]`, planar. The residual must have the output's
    /// shape.
    pub fn forward(&self, x: &Activation, residual: Option<&Activation>) -> Result<Activation> {
        self.forward_to(x, residual, MemoryFormat::Nchw, Threads::Pool)
    }

    /// [`FusedConv::forward`] into `format` on the given threads. A dense conv takes a
    /// channels-last input only when it is pointwise, and a depthwise conv keeps its input's
    /// format; the residual must be in the output's format.
    pub fn forward_to(
        &self,
        x: &Activation,
        residual: Option<&Activation>,
        format: MemoryFormat,
        threads: Threads,
    ) -> Result<Activation> {
        if x.c != self.cin {
            bail!(
                "fused conv: input has {} channels, the layer takes {}",
                x.c,
                self.cin
            )
        }
        let g = self.geom(x);
        if let Some(r) = residual {
            if (r.b, r.c, r.h, r.w, r.format) != (g.b, g.co, g.ho, g.wo, format) {
                bail!(
                    "fused conv: residual [{}, {}, {}, {}] {:?} does not match the output \
                     [{}, {}, {}, {}] {format:?}",
                    r.b,
                    r.c,
                    r.h,
                    r.w,
                    r.format,
                    g.b,
                    g.co,
                    g.ho,
                    g.wo
                )
            }
        }
        let res = residual.map(|r| r.data.as_slice());
        let data = if self.depthwise {
            self.depthwise(x, &g, res, format, threads)?
        } else {
            if x.format == MemoryFormat::Nhwc && (self.kernel, self.stride) != (1, 1) {
                bail!("fused conv: a channels-last input needs a pointwise conv")
            }
            self.dense(x, &g, res, format, threads)
        };
        Ok(Activation {
            data,
            b: g.b,
            c: g.co,
            h: g.ho,
            w: g.wo,
            format,
        })
    }

    fn depthwise(
        &self,
        x: &Activation,
        g: &Geom,
        res: Option<&[f32]>,
        format: MemoryFormat,
        threads: Threads,
    ) -> Result<Vec<f32>> {
        if format != x.format {
            bail!(
                "fused conv: a depthwise conv keeps its input's format ({:?}), {format:?} asked",
                x.format
            )
        }
        let howo = g.ho * g.wo;
        let act = self.act;
        Ok(match format {
            MemoryFormat::Nchw => {
                depthwise::forward_with(&x.data, &self.weight, g, threads, |plane, o| {
                    let ch = plane % g.c;
                    let r = res.map(|r| &r[plane * howo..(plane + 1) * howo]);
                    epilogue_row(o, self.shift[ch], act, r);
                })
            }
            MemoryFormat::Nhwc => {
                let epi = depthwise_nhwc::Epilogue {
                    shift: &self.shift,
                    relu6: act == Act::Relu6,
                };
                let mut out = depthwise_nhwc::forward(&x.data, &self.weight_t, g, epi, threads);
                if let Some(r) = res {
                    out.iter_mut().zip(r).for_each(|(o, r)| *o += r);
                }
                out
            }
        })
    }

    fn dense(
        &self,
        x: &Activation,
        g: &Geom,
        res: Option<&[f32]>,
        format: MemoryFormat,
        threads: Threads,
    ) -> Vec<f32> {
        // Channels-last in and out, a pointwise conv is one matmul over all the batch's
        // pixels: the weights are read once per batch instead of once per image.
        let merged;
        let g = if x.format == MemoryFormat::Nhwc && format == MemoryFormat::Nhwc {
            merged = Geom {
                b: 1,
                h: 1,
                w: g.b * g.h * g.w,
                ho: 1,
                wo: g.b * g.ho * g.wo,
                ..*g
            };
            &merged
        } else {
            g
        };
        let howo = g.ho * g.wo;
        let act = self.act;
        let w = match format {
            MemoryFormat::Nchw => DenseWeights::OutIn(&self.weight),
            MemoryFormat::Nhwc => DenseWeights::InOut(&self.weight_t),
        };
        conv::forward_with(&x.data, x.format, w, g, threads, |img, first, o| {
            match format {
                // Output channels first.. of image img.
                MemoryFormat::Nchw => {
                    let start = (img * g.co + first) * howo;
                    let r = res.map(|r| &r[start..start + o.len()]);
                    for (k, o) in o.chunks_mut(howo).enumerate() {
                        let r = r.map(|r| &r[k * howo..(k + 1) * howo]);
                        epilogue_row(o, self.shift[first + k], act, r);
                    }
                }
                // Output pixels first.. of image img.
                MemoryFormat::Nhwc => {
                    let start = (img * howo + first) * g.co;
                    let r = res.map(|r| &r[start..start + o.len()]);
                    for (k, o) in o.chunks_mut(g.co).enumerate() {
                        let r = r.map(|r| &r[k * g.co..(k + 1) * g.co]);
                        epilogue_pixel(o, &self.shift, act, r);
                    }
                }
            }
        })
    }
}

/// `o = act(o + shift) [+ r]` over one channel plane; the order of operations is the
/// training path's (`conv + shift`, then activation, then the residual).
#[inline]
fn epilogue_row(o: &mut [f32], shift: f32, act: Act, r: Option<&[f32]>) {
    match (act, r) {
        (Act::None, None) => o.iter_mut().for_each(|v| *v += shift),
        (Act::Relu6, None) => o.iter_mut().for_each(|v| *v = (*v + shift).clamp(0.0, 6.0)),
        (Act::None, Some(r)) => o.iter_mut().zip(r).for_each(|(v, r)| *v = (*v + shift) + r),
        (Act::Relu6, Some(r)) => o
            .iter_mut()
            .zip(r)
            .for_each(|(v, r)| *v = (*v + shift).clamp(0.0, 6.0) + r),
    }
}

/// `o = act(o + shift) [+ r]` over one pixel's channels (channels-last).
#[inline]
fn epilogue_pixel(o: &mut [f32], shift: &[f32], act: Act, r: Option<&[f32]>) {
    let shifted = o.iter_mut().zip(shift);
    match (act, r) {
        (Act::None, None) => shifted.for_each(|(v, s)| *v += s),
        (Act::Relu6, None) => shifted.for_each(|(v, s)| *v = (*v + s).clamp(0.0, 6.0)),
        (Act::None, Some(r)) => shifted.zip(r).for_each(|((v, s), r)| *v = (*v + s) + r),
        (Act::Relu6, Some(r)) => shifted
            .zip(r)
            .for_each(|((v, s), r)| *v = (*v + s).clamp(0.0, 6.0) + r),
    }
}

/// Global average pooling `[b, c, h, w]` → `[b, c]` (row-major), parallel over planes; the
/// mean of the row means, like the backbones' `pool` (two candle `mean`s).
pub fn global_avg_pool(x: &Activation) -> Vec<f32> {
    if x.format == MemoryFormat::Nhwc {
        // The same sums in the same order, a pixel row of channels at a time.
        let c = x.c;
        return x
            .data
            .par_chunks(x.h * x.w * c)
            .flat_map_iter(|img| {
                let mut mean = vec![0.0f32; c];
                let mut row = vec![0.0f32; c];
                for r in img.chunks(x.w * c) {
                    row.fill(0.0);
                    for px in r.chunks(c) {
                        row.iter_mut().zip(px).for_each(|(s, v)| *s += v);
                    }
                    mean.iter_mut()
                        .zip(&row)
                        .for_each(|(m, s)| *m += s / x.w as f32);
                }
                mean.into_iter().map(|m| m / x.h as f32)
            })
            .collect();
    }
    let (h, w) = (x.h, x.w);
    x.data
        .par_chunks(h * w)
        .map(|p| {
            p.chunks(w)
                .map(|row| row.iter().sum::<f32>() / w as f32)
                .sum::<f32>()
                / h as f32
        })
        .collect()
}

/// Global max pooling `[b, c, h, w]` → `[b, c]` (row-major), parallel over images.
pub fn global_max_pool(x: &Activation) -> Vec<f32> {
    let (c, hw) = (x.c, x.h * x.w);
    x.data
        .par_chunks(c * hw)
        .flat_map_iter(|img| {
            let mut max = vec![f32::NEG_INFINITY; c];
            match x.format {
                MemoryFormat::Nhwc => {
                    for px in img.chunks(c) {
                        max.iter_mut().zip(px).for_each(|(m, &v)| *m = m.max(v));
                    }
                }
                MemoryFormat::Nchw => {
                    for (m, plane) in max.iter_mut().zip(img.chunks(hw)) {
                        *m = plane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    }
                }
            }
            max
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_tensor(shape: &[usize], lo: f32, hi: f32, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.gen_range(lo..hi)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// A conv + BN with random weights and statistics.
    fn conv(cin: usize, cout: usize, k: usize, s: usize, depthwise: bool, act: Act) -> FusedConv {
        let seed = (cin * 1000 + cout * 10 + k + s) as u64;
        let w = rand_tensor(
            &[cout, if depthwise { 1 } else { cin }, k, k],
            -1.0,
            1.0,
            seed,
        );
        let [gamma, beta, mean, var] = [(0.5, 1.5), (-1.0, 1.0), (-0.5, 0.5), (0.5, 2.0)]
            .map(|(lo, hi)| rand_tensor(&[cout], lo, hi, seed + hi as u64 + 7));
        let bn = BnParams {
            gamma: &gamma,
            beta: &beta,
            mean: &mean,
            var: &var,
            eps: 1e-3,
        };
        FusedConv::new(&w, bn, s, depthwise, act).unwrap()
    }

    fn activation(b: usize, c: usize, h: usize, w: usize, seed: u64) -> Activation {
        Activation::from_tensor(&rand_tensor(&[b, c, h, w], -3.0, 3.0, seed)).unwrap()
    }

    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        a.iter()
            .zip(b)
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
            / scale
    }

    #[test]
    fn layouts_round_trip_and_pool_alike() {
        let x = activation(2, 5, 3, 4, 1);
        let nhwc = x.clone().to_format(MemoryFormat::Nhwc);
        assert_eq!(nhwc.format, MemoryFormat::Nhwc);
        let (img, y, x_, ch) = (1, 1, 2, 3);
        assert_eq!(
            nhwc.data[((img * 3 + y) * 4 + x_) * 5 + ch],
            x.data[((img * 5 + ch) * 3 + y) * 4 + x_]
        );
        assert_eq!(global_avg_pool(&nhwc), global_avg_pool(&x));
        assert_eq!(global_max_pool(&nhwc), global_max_pool(&x));
        let want = crate::backbone::pool(
            &x.clone().into_tensor().unwrap(),
            crate::backbone::Pooling::Max,
        )
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
        assert_eq!(global_max_pool(&x), want);
        assert_eq!(nhwc.to_format(MemoryFormat::Nchw).data, x.data);
    }

    /// The channels-last depthwise kernel against the planar one: the same sums in the same
    /// order, so the same bits. Channel counts with and without a partial lane block, odd
    /// sizes (asymmetric SAME padding), stride 2, planes narrower than the kernel, both
    /// thread modes.
    #[test]
    fn channels_last_depthwise_matches_the_planar_kernel_exactly() {
        let cases = [
            (1, 8, 7, 7, 5, 1),
            (2, 13, 9, 11, 3, 2),
            (3, 37, 14, 14, 5, 2),
            (1, 16, 3, 2, 5, 1),
            (2, 24, 17, 6, 7, 2),
            (1, 5, 1, 1, 3, 1),
        ];
        for (i, &(b, c, h, w, k, s)) in cases.iter().enumerate() {
            for act in [Act::Relu6, Act::None] {
                let dw = conv(c, c, k, s, true, act);
                let x = activation(b, c, h, w, i as u64);
                let want = dw.forward(&x, None).unwrap();
                let xl = x.to_format(MemoryFormat::Nhwc);
                for threads in [Threads::Pool, Threads::Caller] {
                    let got = dw
                        .forward_to(&xl, None, MemoryFormat::Nhwc, threads)
                        .unwrap();
                    assert_eq!(
                        (got.b, got.c, got.h, got.w),
                        (want.b, want.c, want.h, want.w)
                    );
                    let got = got.to_format(MemoryFormat::Nchw);
                    assert!(
                        got.data == want.data,
                        "case {i} {act:?} {threads:?}: differs by {}",
                        max_rel_diff(&got.data, &want.data)
                    );
                }
            }
        }
    }

    /// Dense convs into a channels-last output, from planar (the stem's im2col) and
    /// channels-last (pointwise) inputs, with and without a residual, against the planar
    /// path; batch 1 takes the split-over-threads branch.
    #[test]
    fn channels_last_dense_convs_match_the_planar_path() {
        let nhwc = MemoryFormat::Nhwc;
        for (b, threads) in [(1, Threads::Pool), (3, Threads::Pool), (2, Threads::Caller)] {
            let stem = conv(3, 16, 3, 2, false, Act::Relu6);
            let x = activation(b, 3, 15, 12, 11);
            let want = stem.forward(&x, None).unwrap();
            let got = stem.forward_to(&x, None, nhwc, threads).unwrap();
            let got = got.to_format(MemoryFormat::Nchw);
            assert!(
                max_rel_diff(&got.data, &want.data) < 1e-6,
                "stem, batch {b}"
            );

            let pw = conv(16, 16, 1, 1, false, Act::None);
            let want = pw.forward(&want, Some(&want)).unwrap();
            let h = stem.forward_to(&x, None, nhwc, threads).unwrap();
            let got = pw.forward_to(&h, Some(&h), nhwc, threads).unwrap();
            let got = got.to_format(MemoryFormat::Nchw);
            assert!(
                max_rel_diff(&got.data, &want.data) < 1e-6,
                "pointwise, batch {b}"
            );
        }
    }

    #[test]
    fn concat_joins_batches_of_one_shape() {
        let a = activation(2, 3, 4, 5, 1).to_format(MemoryFormat::Nhwc);
        let b = activation(1, 3, 4, 5, 2).to_format(MemoryFormat::Nhwc);
        let ab = Activation::concat(vec![a.clone(), b.clone()]).unwrap();
        assert_eq!((ab.b, ab.format), (3, MemoryFormat::Nhwc));
        assert_eq!(ab.data[..a.data.len()], a.data);
        assert_eq!(ab.data[a.data.len()..], b.data);
        let planar = activation(1, 3, 4, 5, 3);
        let err = Activation::concat(vec![a, planar]).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
        assert!(Activation::concat(Vec::new()).is_err());
    }

    #[test]
    fn layout_mismatches_are_errors() {
        let nhwc = MemoryFormat::Nhwc;
        let x = activation(1, 4, 6, 6, 3).to_format(nhwc);
        let dw = conv(4, 4, 3, 1, true, Act::Relu6);
        let err = dw.forward_to(&x, None, MemoryFormat::Nchw, Threads::Pool);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("keeps its input's format"));
        let dense3 = conv(4, 8, 3, 1, false, Act::Relu6);
        let err = dense3.forward_to(&x, None, nhwc, Threads::Pool);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("needs a pointwise conv"));
        let pw = conv(4, 4, 1, 1, false, Act::None);
        let planar = activation(1, 4, 6, 6, 4);
        let err = pw.forward_to(&x, Some(&planar), nhwc, Threads::Pool);
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("does not match the output"));
    }
}
