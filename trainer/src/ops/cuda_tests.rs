//! CPU/CUDA parity of the ops that have CUDA kernels: depthwise conv (output, input and
//! weight gradients) and max/avg pooling (output and input gradient), in f32 and f64, on odd
//! shapes: stride 1/2/3, asymmetric TF-SAME padding, batch 1, 3×3/5×5 (specialised kernels)
//! and non-square runtime-sized filters, plus one case large enough to need many blocks.
//!
//! The CPU ops are themselves checked against naive loops and finite differences in
//! `tests`, so agreeing with them is agreeing with the maths.
//!
//! Tolerance: `|cuda - cpu| <= tol · (1 + max|cpu|)` element-wise, `tol = 1e-5` in f32 and
//! `1e-12` in f64. The two devices sum the same products in different orders (vector lanes
//! on CPU, per-thread and tree reductions on GPU), which costs a few ulps per term: at most
//! ~`k²·ε` for outputs and input gradients, ~`log2(B·Ho·Wo)·ε` relative for the weight
//! gradient's long sums. Max pooling picks the same arg-max on both (random inputs, no ties).
//!
//! Without a CUDA device (or driver) at run time every test prints "skipping: …" and passes.

use super::*;
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The first CUDA device, or `None` (with a message) when there is none to test on.
fn cuda_device() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            let e = e.to_string(); // first line: candle may append a backtrace
            eprintln!(
                "skipping: no usable CUDA device ({})",
                e.lines().next().unwrap_or_default()
            );
            None
        }
    }
}

fn rand_vec(n: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        1e-5
    } else {
        1e-12
    }
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_parity(cpu: &Tensor, gpu: &Tensor, dtype: DType, what: &str) {
    assert_within(cpu, gpu, tol(dtype), what)
}

/// `|cuda - cpu| <= tol · (1 + max|cpu|)` element-wise.
fn assert_within(cpu: &Tensor, gpu: &Tensor, tol: f64, what: &str) {
    let dtype = cpu.dtype();
    assert_eq!(cpu.dims(), gpu.dims(), "{what}: shapes differ");
    assert!(gpu.device().is_cuda(), "{what}: result left the GPU");
    let (c, g) = (to_f64(cpu), to_f64(gpu));
    let scale = 1.0 + c.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let (worst, at) = c
        .iter()
        .zip(&g)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold(
            (0.0, 0),
            |(m, mi), (i, d)| if d > m { (d, i) } else { (m, mi) },
        );
    assert!(
        worst <= tol * scale,
        "{what} ({dtype:?}): max |cuda - cpu| = {worst:e} at {at} (cpu {}, cuda {}), \
         allowed {:e}",
        c[at],
        g[at],
        tol * scale
    );
}

/// A `Var` with the given values on `device`, in `dtype`.
fn var(v: &[f64], shape: &[usize], dtype: DType, device: &Device) -> Var {
    let t = Tensor::from_vec(v.to_vec(), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(device)
        .unwrap();
    Var::from_tensor(&t).unwrap()
}

/// Runs `f` on each device with the same inputs, backpropagates `sum(out · r)`, and returns
/// `(out, grads of inputs)` per device.
fn run_both(
    inputs: &[(Vec<f64>, Vec<usize>)],
    dtype: DType,
    gpu: &Device,
    seed: u64,
    f: &dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>,
) -> [(Tensor, Vec<Tensor>); 2] {
    [Device::Cpu, gpu.clone()].map(|dev| {
        let vars: Vec<Var> = inputs.iter().map(|(v, s)| var(v, s, dtype, &dev)).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let out = f(&ts).unwrap();
        let r = rand_vec(out.elem_count(), seed);
        let r = var(&r, out.dims(), dtype, &dev);
        let grads = (&out * r.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gs = vars
            .iter()
            .map(|v| grads.get(v).expect("gradient of a tracked input").clone())
            .collect();
        (out, gs)
    })
}

fn same4(h: usize, w: usize, kh: usize, kw: usize, s: usize) -> Pad4 {
    let (t, b) = same_padding(h, kh, s);
    let (l, r) = same_padding(w, kw, s);
    [t, b, l, r]
}

/// Input `[B, C, H, W]`, filter `(kh, kw)`, stride, padding (`None` = TF SAME).
type ConvCase = ([usize; 4], (usize, usize), usize, Option<Pad4>);

/// Input, kernel, stride, padding (`None` = TF SAME), whether to test max pooling too.
type PoolCase = ([usize; 4], usize, usize, Option<Pad4>, bool);

#[test]
fn depthwise_cuda_matches_cpu() {
    let Some(gpu) = cuda_device() else { return };
    let cases: &[ConvCase] = &[
        ([1, 3, 7, 9], (3, 3), 1, None),
        ([2, 5, 11, 8], (3, 3), 2, None),
        ([1, 4, 13, 13], (5, 5), 2, None),
        ([3, 2, 6, 5], (5, 5), 1, None),
        ([2, 3, 9, 10], (2, 3), 3, Some([0, 1, 1, 1])),
        ([1, 2, 8, 7], (7, 7), 1, Some([3, 3, 3, 3])),
        ([4, 24, 28, 30], (3, 3), 2, None),
    ];
    for (i, &(xs, (kh, kw), s, pad)) in cases.iter().enumerate() {
        let [b, c, h, w] = xs;
        let pad = pad.unwrap_or_else(|| same4(h, w, kh, kw, s));
        for dtype in [DType::F32, DType::F64] {
            let seed = 100 + i as u64;
            let inputs = [
                (rand_vec(b * c * h * w, seed), xs.to_vec()),
                (rand_vec(c * kh * kw, seed + 50), vec![c, 1, kh, kw]),
            ];
            let [(yc, gc), (yg, gg)] = run_both(&inputs, dtype, &gpu, seed + 7, &|t| {
                depthwise_conv2d(&t[0], &t[1], s, pad)
            });
            let what = format!("depthwise {xs:?} k{kh}x{kw} s{s} pad {pad:?}");
            assert_parity(&yc, &yg, dtype, &format!("{what}: output"));
            assert_parity(&gc[0], &gg[0], dtype, &format!("{what}: input gradient"));
            assert_parity(&gc[1], &gg[1], dtype, &format!("{what}: weight gradient"));
        }
    }
}

#[test]
fn pools_cuda_match_cpu() {
    let Some(gpu) = cuda_device() else { return };
    let cases: &[PoolCase] = &[
        ([1, 3, 7, 9], 3, 2, None, true),
        ([2, 4, 8, 8], 2, 2, Some([0, 0, 0, 0]), true),
        ([1, 2, 10, 7], 3, 1, Some([1, 1, 1, 1]), true),
        ([2, 3, 15, 14], 5, 3, Some([2, 2, 1, 2]), true),
        ([3, 16, 56, 57], 3, 2, Some([1, 1, 1, 1]), true),
        // Padding wider than the kernel: some windows lie entirely in the padding (average only).
        ([1, 2, 5, 5], 2, 1, Some([2, 2, 2, 2]), false),
    ];
    for (i, &(xs, k, s, pad, with_max)) in cases.iter().enumerate() {
        let [_, _, h, w] = xs;
        let pad = pad.unwrap_or_else(|| same4(h, w, k, k, s));
        for dtype in [DType::F32, DType::F64] {
            let seed = 300 + i as u64;
            let inputs = [(rand_vec(xs.iter().product(), seed), xs.to_vec())];
            let mut ops: Vec<(&str, PoolFn)> = vec![("avg_pool2d", avg_pool2d)];
            if with_max {
                ops.push(("max_pool2d", max_pool2d));
            }
            for (name, op) in ops {
                let [(yc, gc), (yg, gg)] =
                    run_both(&inputs, dtype, &gpu, seed + 7, &|t| op(&t[0], k, s, pad));
                let what = format!("{name} {xs:?} k{k} s{s} pad {pad:?}");
                assert_parity(&yc, &yg, dtype, &format!("{what}: output"));
                assert_parity(&gc[0], &gg[0], dtype, &format!("{what}: input gradient"));
            }
        }
    }
}

type PoolFn = fn(&Tensor, usize, usize, Pad4) -> candle_core::Result<Tensor>;

#[test]
fn frozen_depthwise_weight_on_cuda_gets_no_gradient() {
    let Some(gpu) = cuda_device() else { return };
    let x = var(&rand_vec(2 * 3 * 9 * 9, 1), &[2, 3, 9, 9], DType::F32, &gpu);
    let w = Tensor::from_vec(rand_vec(27, 2), (3, 1, 3, 3), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&gpu)
        .unwrap();
    let y = depthwise_conv2d(x.as_tensor(), &w, 2, same4(9, 9, 3, 3, 2)).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&w).is_none(), "a constant filter got a gradient");
    assert!(grads.get(&x).is_some(), "the input got no gradient");
}

/// The whole training network on CUDA — EfficientNet-Lite0 forward (frozen BN), pooled and
/// L2-normalised embedding, a loss, backward into every weight — agrees with the CPU: this is
/// the device-generic path `trainer train --device cuda` runs (our kernels where we have them,
/// stock candle ops elsewhere). f64 checks the maths tightly; f32 allows for the different
/// summation orders accumulated over ~40 layers.
#[test]
fn lite0_training_step_on_cuda_matches_cpu() {
    use crate::backbone::{self, BackboneKind};
    use candle_nn::{VarBuilder, VarMap};
    let Some(gpu) = cuda_device() else { return };
    for (dtype, tol) in [(DType::F64, 1e-9), (DType::F32, 2e-3)] {
        let maps = [VarMap::new(), VarMap::new()];
        let devices = [Device::Cpu, gpu.clone()];
        let nets: Vec<_> = maps
            .iter()
            .zip(&devices)
            .map(|(vm, dev)| {
                let vb = VarBuilder::from_varmap(vm, dtype, dev);
                backbone::build(BackboneKind::EfficientnetLite0, vb).unwrap()
            })
            .collect();
        // The same weights on both devices: the CPU's random initialisation, copied.
        let cpu_vars = maps[0].data().lock().unwrap().clone();
        let gpu_vars = maps[1].data().lock().unwrap().clone();
        for (name, v) in &cpu_vars {
            gpu_vars[name]
                .set(&v.as_tensor().to_device(&gpu).unwrap())
                .unwrap();
        }
        let (x, target) = (rand_vec(2 * 3 * 65 * 65, 11), rand_vec(2 * 1280, 12));
        let runs: Vec<_> = nets
            .iter()
            .zip(&devices)
            .map(|(net, dev)| {
                let x = var(&x, &[2, 3, 65, 65], dtype, dev);
                let t = var(&target, &[2, 1280], dtype, dev);
                let n = net.num_stages();
                let feats = net.forward_stages(x.as_tensor(), 0..n).unwrap();
                let emb = crate::embed::l2_normalize(&net.pool(&feats).unwrap()).unwrap();
                let grads = (&emb * t.as_tensor())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (emb, grads)
            })
            .collect();
        assert_within(&runs[0].0, &runs[1].0, tol, "Lite0 embedding");
        let mut compared = 0;
        for (name, v) in &cpu_vars {
            let Some(gc) = runs[0].1.get(v.as_tensor()) else {
                continue; // BN running statistics: not trained
            };
            let gg = runs[1].1.get(gpu_vars[name].as_tensor());
            let gg = gg.unwrap_or_else(|| panic!("{name}: no gradient on CUDA"));
            assert_within(gc, gg, tol, &format!("gradient of {name}"));
            compared += 1;
        }
        assert!(compared > 100, "only {compared} weights got gradients");
    }
}
