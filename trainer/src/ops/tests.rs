//! Checks of every op against naive f64 loops, and of every gradient against central finite
//! differences (f64), on small odd shapes: stride 1/2/3, asymmetric SAME padding, batch 1,
//! kernels 1/3/5/7 and a non-square runtime-sized kernel.

use super::*;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn tensor(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn same4(h: usize, w: usize, kh: usize, kw: usize, s: usize) -> Pad4 {
    let (t, b) = same_padding(h, kh, s);
    let (l, r) = same_padding(w, kw, s);
    [t, b, l, r]
}

fn out_len(n: usize, before: usize, after: usize, k: usize, s: usize) -> usize {
    (n + before + after - k) / s + 1
}

/// Reads padded input at signed coordinates (zero outside).
fn at(x: &[f64], h: usize, w: usize, iy: isize, ix: isize) -> Option<f64> {
    (iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w)
        .then(|| x[iy as usize * w + ix as usize])
}

/// Naive dense/grouped conv: `groups == cin` is depthwise (`w [cout, cin/groups, kh, kw]`).
#[allow(clippy::too_many_arguments)]
fn naive_conv(
    x: &[f64],
    [b, cin, h, w]: [usize; 4],
    wt: &[f64],
    [cout, kh, kw]: [usize; 3],
    groups: usize,
    s: usize,
    pad: Pad4,
) -> (Vec<f64>, [usize; 4]) {
    let ho = out_len(h, pad[0], pad[1], kh, s);
    let wo = out_len(w, pad[2], pad[3], kw, s);
    let cig = cin / groups;
    let cog = cout / groups;
    let mut out = vec![0.0; b * cout * ho * wo];
    for bi in 0..b {
        for co in 0..cout {
            let grp = co / cog;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0.0;
                    for cg in 0..cig {
                        let ci = grp * cig + cg;
                        let xp = &x[(bi * cin + ci) * h * w..(bi * cin + ci + 1) * h * w];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * s + ky) as isize - pad[0] as isize;
                                let ix = (ox * s + kx) as isize - pad[2] as isize;
                                if let Some(v) = at(xp, h, w, iy, ix) {
                                    acc += v * wt[((co * cig + cg) * kh + ky) * kw + kx];
                                }
                            }
                        }
                    }
                    out[((bi * cout + co) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    (out, [b, cout, ho, wo])
}

fn naive_pool(
    x: &[f64],
    [b, c, h, w]: [usize; 4],
    k: usize,
    s: usize,
    pad: Pad4,
    max: bool,
) -> (Vec<f64>, [usize; 4]) {
    let ho = out_len(h, pad[0], pad[1], k, s);
    let wo = out_len(w, pad[2], pad[3], k, s);
    let mut out = Vec::with_capacity(b * c * ho * wo);
    for p in 0..b * c {
        let xp = &x[p * h * w..(p + 1) * h * w];
        for oy in 0..ho {
            for ox in 0..wo {
                let mut m = f64::NEG_INFINITY;
                let mut sum = 0.0;
                for ky in 0..k {
                    for kx in 0..k {
                        let iy = (oy * s + ky) as isize - pad[0] as isize;
                        let ix = (ox * s + kx) as isize - pad[2] as isize;
                        if let Some(v) = at(xp, h, w, iy, ix) {
                            m = m.max(v);
                            sum += v;
                        }
                    }
                }
                out.push(if max { m } else { sum / (k * k) as f64 });
            }
        }
    }
    (out, [b, c, ho, wo])
}

fn assert_close(got: &Tensor, want: &[f64], want_shape: &[usize], tol: f64, what: &str) {
    assert_eq!(got.dims(), want_shape, "{what}: shape");
    let got: Vec<f64> = got
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs() / w.abs().max(1.0);
        assert!(
            err <= tol,
            "{what}: element {i}: got {g}, want {w} (tol {tol})"
        );
    }
}

/// Central finite differences of `f(x)·r` summed, w.r.t. every element of `x`.
fn finite_diff(x: &[f64], r: &[f64], f: &dyn Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let eps = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + eps;
            let up: f64 = f(&xp).iter().zip(r).map(|(a, b)| a * b).sum();
            xp[i] = x[i] - eps;
            let down: f64 = f(&xp).iter().zip(r).map(|(a, b)| a * b).sum();
            xp[i] = x[i];
            (up - down) / (2.0 * eps)
        })
        .collect()
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// One conv test shape: input, output channels, kernel, stride, padding (`None` = SAME).
#[derive(Clone, Copy)]
struct ConvCase {
    xs: [usize; 4],
    co: usize,
    k: (usize, usize),
    s: usize,
    pad: Option<Pad4>,
}

fn case(xs: [usize; 4], co: usize, k: (usize, usize), s: usize, pad: Option<Pad4>) -> ConvCase {
    ConvCase { xs, co, k, s, pad }
}

type ConvFn = fn(&Tensor, &Tensor, usize, Pad4) -> candle_core::Result<Tensor>;

/// Forward vs naive (f64 and f32), gradients vs finite differences (f64), and the f32
/// gradients vs the f64 ones.
fn check_conv(op: ConvFn, depthwise: bool, case: ConvCase, seed: u64) {
    let ConvCase { xs, co, k, s, pad } = case;
    let pad = pad.unwrap_or_else(|| same4(xs[2], xs[3], k.0, k.1, s));
    let [b, cin, h, w] = xs;
    let (kh, kw) = k;
    let wci = if depthwise { 1 } else { cin };
    let ws = [co, wci, kh, kw];
    let x = rand_vec(b * cin * h * w, seed);
    let wt = rand_vec(co * wci * kh * kw, seed + 1);
    let groups = if depthwise { cin } else { 1 };
    let what = format!(
        "{} x{xs:?} k{k:?} s{s} pad{pad:?}",
        if depthwise { "dw" } else { "conv" }
    );
    let (want, os) = naive_conv(&x, xs, &wt, [co, kh, kw], groups, s, pad);

    // Forward, f64 and f32.
    let y = op(&tensor(&x, &xs), &tensor(&wt, &ws), s, pad).unwrap();
    assert_close(&y, &want, &os, 1e-12, &format!("{what} fwd f64"));
    let y32 = op(
        &tensor(&x, &xs).to_dtype(DType::F32).unwrap(),
        &tensor(&wt, &ws).to_dtype(DType::F32).unwrap(),
        s,
        pad,
    )
    .unwrap();
    assert_eq!(y32.dtype(), DType::F32);
    assert_close(&y32, &want, &os, 1e-4, &format!("{what} fwd f32"));

    // Backward vs finite differences of a random linear functional.
    let r = rand_vec(want.len(), seed + 2);
    let grads_for = |dt: DType| {
        let xv = Var::from_tensor(&tensor(&x, &xs).to_dtype(dt).unwrap()).unwrap();
        let wv = Var::from_tensor(&tensor(&wt, &ws).to_dtype(dt).unwrap()).unwrap();
        let rt = tensor(&r, &os).to_dtype(dt).unwrap();
        let loss = (op(xv.as_tensor(), wv.as_tensor(), s, pad).unwrap() * rt)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        (
            vec_of(g.get(xv.as_tensor()).unwrap()),
            vec_of(g.get(wv.as_tensor()).unwrap()),
        )
    };
    let (gx, gw) = grads_for(DType::F64);
    let fd_x = finite_diff(&x, &r, &|xp| {
        naive_conv(xp, xs, &wt, [co, kh, kw], groups, s, pad).0
    });
    let fd_w = finite_diff(&wt, &r, &|wp| {
        naive_conv(&x, xs, wp, [co, kh, kw], groups, s, pad).0
    });
    assert_close(
        &tensor(&gx, &xs),
        &fd_x,
        &xs,
        1e-6,
        &format!("{what} grad x"),
    );
    assert_close(
        &tensor(&gw, &ws),
        &fd_w,
        &ws,
        1e-6,
        &format!("{what} grad w"),
    );
    let (gx32, gw32) = grads_for(DType::F32);
    assert_close(
        &tensor(&gx32, &xs),
        &gx,
        &xs,
        1e-4,
        &format!("{what} grad x f32"),
    );
    assert_close(
        &tensor(&gw32, &ws),
        &gw,
        &ws,
        1e-4,
        &format!("{what} grad w f32"),
    );
}

#[test]
fn depthwise_matches_naive_and_finite_differences() {
    // Depthwise: output channels == input channels.
    let cases = [
        case([1, 3, 7, 9], 3, (3, 3), 1, None),
        case([2, 4, 9, 8], 4, (3, 3), 2, None),
        case([1, 2, 11, 10], 2, (5, 5), 2, None),
        case([2, 3, 6, 7], 3, (5, 5), 1, Some([2, 2, 2, 2])),
        case([1, 2, 13, 12], 2, (7, 7), 1, None),
        case([1, 2, 10, 11], 2, (4, 4), 3, Some([0, 1, 2, 0])),
        case([2, 2, 8, 9], 2, (2, 3), 1, Some([1, 0, 0, 2])),
        case([1, 3, 6, 5], 3, (1, 1), 2, Some([0, 0, 0, 0])),
        case([1, 2, 5, 5], 2, (3, 3), 1, Some([0, 0, 0, 0])),
    ];
    for (i, &c) in cases.iter().enumerate() {
        check_conv(depthwise_conv2d, true, c, 10 * i as u64);
    }
}

#[test]
fn depthwise_wide_planes_use_vector_loops() {
    // Widths past the 8-lane chunks and odd tails, f32 vs f64 op (the f64 op is checked
    // against the naive loops above).
    for (s, k) in [(1, 3), (2, 3), (1, 5), (2, 5)] {
        let c = case([2, 3, 19, 37], 3, (k, k), s, None);
        check_conv(depthwise_conv2d, true, c, 100 + s as u64 * 7 + k as u64);
    }
}

#[test]
fn dense_conv_matches_naive_and_finite_differences() {
    let cases = [
        case([2, 3, 7, 9], 4, (1, 1), 1, Some([0; 4])),
        case([1, 3, 9, 8], 5, (3, 3), 2, None),
        case([2, 2, 7, 6], 3, (3, 3), 1, Some([1, 1, 1, 1])),
        case([1, 2, 11, 10], 2, (5, 5), 2, None),
        case([3, 2, 6, 7], 3, (1, 1), 2, Some([0; 4])),
        case([1, 3, 8, 9], 2, (2, 3), 1, Some([1, 0, 0, 2])),
    ];
    for (i, &c) in cases.iter().enumerate() {
        check_conv(conv2d, false, c, 1000 + 10 * i as u64);
    }
}

type PoolFn = fn(&Tensor, usize, usize, Pad4) -> candle_core::Result<Tensor>;

fn check_pool(op: PoolFn, max: bool, xs: [usize; 4], k: usize, s: usize, pad: Pad4, seed: u64) {
    let what = format!(
        "{} x{xs:?} k{k} s{s} pad{pad:?}",
        if max { "max" } else { "avg" }
    );
    // Shifted so that many windows are all-negative: a padded zero must never win a max.
    let x: Vec<f64> = rand_vec(xs.iter().product(), seed)
        .iter()
        .map(|v| v - 0.5)
        .collect();
    let (want, os) = naive_pool(&x, xs, k, s, pad, max);
    let y = op(&tensor(&x, &xs), k, s, pad).unwrap();
    assert_close(&y, &want, &os, 1e-12, &format!("{what} fwd f64"));
    let y32 = op(&tensor(&x, &xs).to_dtype(DType::F32).unwrap(), k, s, pad).unwrap();
    assert_close(&y32, &want, &os, 1e-5, &format!("{what} fwd f32"));

    let r = rand_vec(want.len(), seed + 1);
    let xv = Var::from_tensor(&tensor(&x, &xs)).unwrap();
    let loss = (op(xv.as_tensor(), k, s, pad).unwrap() * tensor(&r, &os))
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    let gx = g.get(xv.as_tensor()).unwrap();
    let fd = finite_diff(&x, &r, &|xp| naive_pool(xp, xs, k, s, pad, max).0);
    assert_close(gx, &fd, &xs, 1e-6, &format!("{what} grad x"));
}

#[test]
fn pools_match_naive_and_finite_differences() {
    let cases: &[([usize; 4], usize, usize, Pad4)] = &[
        ([2, 3, 9, 8], 3, 2, [1, 1, 1, 1]),
        ([1, 2, 7, 9], 3, 1, [1, 1, 1, 1]),
        ([1, 2, 8, 8], 2, 2, [0; 4]),
        ([2, 2, 9, 10], 3, 2, [0, 1, 0, 1]),
        ([1, 1, 11, 7], 5, 3, [2, 0, 1, 2]),
    ];
    for (i, &(xs, k, s, pad)) in cases.iter().enumerate() {
        check_pool(max_pool2d, true, xs, k, s, pad, 2000 + 10 * i as u64);
        check_pool(avg_pool2d, false, xs, k, s, pad, 3000 + 10 * i as u64);
    }
    // Average pooling allows padding >= kernel: some windows hold only padding (output 0).
    check_pool(avg_pool2d, false, [1, 2, 5, 6], 2, 1, [2, 1, 3, 0], 4000);
}

#[test]
fn frozen_weights_get_no_gradient() {
    let x = Var::from_tensor(&tensor(&rand_vec(2 * 3 * 6 * 6, 1), &[2, 3, 6, 6])).unwrap();
    let w = tensor(&rand_vec(3 * 9, 2), &[3, 1, 3, 3]);
    let loss = depthwise_conv2d(x.as_tensor(), &w, 1, [1; 4])
        .unwrap()
        .sum_all()
        .unwrap();
    let g = loss.backward().unwrap();
    assert!(g.get(&w).is_none());
    assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[2, 3, 6, 6]);
}

#[test]
fn non_contiguous_inputs_are_accepted() {
    // A transposed view must give the same result as its contiguous copy.
    let x = tensor(&rand_vec(2 * 3 * 6 * 7, 5), &[2, 3, 7, 6])
        .transpose(2, 3)
        .unwrap();
    let w = tensor(&rand_vec(3 * 9, 6), &[3, 1, 3, 3]);
    let a = depthwise_conv2d(&x, &w, 2, [0, 1, 0, 1]).unwrap();
    let b = depthwise_conv2d(&x.contiguous().unwrap(), &w, 2, [0, 1, 0, 1]).unwrap();
    assert_close(&a, &vec_of(&b), b.dims(), 0.0, "transposed input");
}

#[test]
fn invalid_arguments_are_errors() {
    let x = tensor(&rand_vec(2 * 3 * 5 * 5, 1), &[2, 3, 5, 5]);
    let w3 = tensor(&rand_vec(3 * 9, 2), &[3, 1, 3, 3]);
    let w4 = tensor(&rand_vec(4 * 9, 2), &[4, 1, 3, 3]);
    let big = tensor(&rand_vec(3 * 49, 2), &[3, 1, 7, 7]);
    assert!(
        depthwise_conv2d(&x, &w4, 1, [0; 4]).is_err(),
        "channel mismatch"
    );
    assert!(
        depthwise_conv2d(&x, &big, 1, [0; 4]).is_err(),
        "kernel larger than input"
    );
    assert!(depthwise_conv2d(&x, &w3, 0, [0; 4]).is_err(), "zero stride");
    assert!(conv2d(&x, &w4, 1, [0; 4]).is_err(), "Cin mismatch");
    assert!(
        max_pool2d(&x, 3, 2, [3, 0, 0, 0]).is_err(),
        "padding >= kernel"
    );
    let xu8 = x.to_dtype(DType::U8).unwrap();
    let err = avg_pool2d(&xu8, 2, 2, [0; 4]).unwrap_err().to_string();
    assert!(err.contains("f32 and f64"), "{err}");
}

#[test]
fn same_padding_is_tf_same() {
    assert_eq!(same_padding(224, 3, 2), (0, 1));
    assert_eq!(same_padding(112, 3, 1), (1, 1));
    assert_eq!(same_padding(56, 5, 2), (1, 2));
    assert_eq!(same_padding(7, 1, 1), (0, 0));
}

#[test]
fn pairwise_sq_dist_matches_naive_and_finite_differences() {
    for &(n, d, seed) in &[(7usize, 5usize, 1u64), (1, 3, 2), (12, 33, 3)] {
        let mut x = rand_vec(n * d, seed);
        if n > 2 {
            // An exact duplicate pair: distance 0, gradient 0.
            let (a, b) = x.split_at_mut(d);
            b[..d].copy_from_slice(a);
        }
        let naive = |x: &[f64]| -> Vec<f64> {
            let mut out = vec![0.0; n * n];
            for i in 0..n {
                for j in 0..n {
                    out[i * n + j] = (0..d).map(|k| (x[i * d + k] - x[j * d + k]).powi(2)).sum();
                }
            }
            out
        };
        let want = naive(&x);
        let y = pairwise_sq_dist(&tensor(&x, &[n, d])).unwrap();
        assert_close(&y, &want, &[n, n], 1e-12, "pairwise f64");
        let y32 = pairwise_sq_dist(&tensor(&x, &[n, d]).to_dtype(DType::F32).unwrap()).unwrap();
        assert_close(&y32, &want, &[n, n], 1e-4, "pairwise f32");
        let stock = stock::pairwise_sq_dist(&tensor(&x, &[n, d])).unwrap();
        assert_close(&stock, &want, &[n, n], 1e-12, "pairwise stock");

        let r = rand_vec(n * n, seed + 1);
        let xv = Var::from_tensor(&tensor(&x, &[n, d])).unwrap();
        let loss = (pairwise_sq_dist(xv.as_tensor()).unwrap() * tensor(&r, &[n, n]))
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss.backward().unwrap();
        let fd = finite_diff(&x, &r, &naive);
        assert_close(
            g.get(xv.as_tensor()).unwrap(),
            &fd,
            &[n, d],
            1e-6,
            "pairwise grad",
        );
    }
}

/// The fused training conv against the three-node composition it replaces: the same
/// forward, and the same gradients for input, weight and shift (f64), dense and depthwise,
/// stride 2 with asymmetric padding, every activation.
#[test]
fn fused_conv_bias_act_matches_the_unfused_ops() {
    use bias_act::{bias_act, Activation};
    let cases: &[(bool, [usize; 4], usize, usize, usize)] = &[
        (false, [2, 3, 9, 8], 5, 3, 2),
        (false, [1, 6, 5, 7], 4, 1, 1),
        (true, [2, 5, 9, 9], 5, 3, 2),
        (true, [1, 4, 7, 6], 4, 5, 1),
    ];
    for (i, &(depthwise, [b, c, h, w], co, k, s)) in cases.iter().enumerate() {
        let seed = 7000 + 10 * i as u64;
        let x = Var::from_tensor(&tensor(&rand_vec(b * c * h * w, seed), &[b, c, h, w])).unwrap();
        let cin = if depthwise { 1 } else { c };
        let co = if depthwise { c } else { co };
        let wt = Var::from_tensor(&tensor(
            &rand_vec(co * cin * k * k, seed + 1),
            &[co, cin, k, k],
        ))
        .unwrap();
        let shift = Var::from_tensor(&tensor(&rand_vec(co, seed + 2), &[co])).unwrap();
        let pad = same4(h, w, k, k, s);
        for act in [Activation::Identity, Activation::Relu, Activation::Relu6] {
            // Scaled so ReLU6 saturates somewhere.
            let (xs, ws, bs) = (x.as_tensor(), wt.as_tensor(), shift.as_tensor());
            let xs = (xs * 4.0).unwrap();
            let fused = conv_bias_act(&xs, ws, bs, s, pad, depthwise, act).unwrap();
            let y = if depthwise {
                depthwise_conv2d(&xs, ws, s, pad).unwrap()
            } else {
                conv2d(&xs, ws, s, pad).unwrap()
            };
            let unfused = bias_act(&y, bs, act).unwrap();
            let what = format!("case {i} {act:?}");
            assert_close(&fused, &vec_of(&unfused), unfused.dims(), 1e-12, &what);
            // A loss that weighs every output differently.
            let weights = tensor(&rand_vec(unfused.elem_count(), seed + 3), unfused.dims());
            let gf = (fused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gu = (unfused * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (v, name) in [(x.as_tensor(), "x"), (ws, "w"), (bs, "shift")] {
                let (a, b) = (gf.get(v).unwrap(), gu.get(v).unwrap());
                assert_close(a, &vec_of(b), b.dims(), 1e-10, &format!("{what} d{name}"));
            }
        }
    }
    // Shapes are checked.
    let x = tensor(&rand_vec(2 * 3 * 5 * 5, 1), &[2, 3, 5, 5]);
    let w = tensor(&rand_vec(4 * 3 * 9, 2), &[4, 3, 3, 3]);
    let bad_shift = tensor(&rand_vec(3, 3), &[3]);
    let err = conv_bias_act(
        &x,
        &w,
        &bad_shift,
        1,
        [1; 4],
        false,
        bias_act::Activation::Relu6,
    );
    assert!(err.unwrap_err().to_string().contains("shift"));
    let shift = tensor(&rand_vec(4, 3), &[4]);
    let err = conv_bias_act(&x, &w, &shift, 1, [1; 4], true, bias_act::Activation::Relu6);
    assert!(err.unwrap_err().to_string().contains("depthwise"));
}
