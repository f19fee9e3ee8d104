//! Times EfficientNet-Lite0 (224×224) embedding and training steps on one device, and prints
//! one JSON line; the GPU check (scripts/gpu-check.sh) compares it with the PyTorch peer
//! (bench/peers/cuda_bench.py) on the same batch size.
//!
//! ```text
//! cargo run --release --features cuda -p trainer --example cuda_bench -- --device cuda --batch 128
//! ```
//!
//! Weights are randomly initialised: speed does not depend on their values, and the GPU
//! machines do not have the weight file. A train step is what `trainer` does with every
//! stage unfrozen and frozen BatchNorm statistics: forward, pooled + L2-normalised embedding,
//! a loss, backward through the whole network, AdamW update of every weight.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW, VarBuilder, VarMap};
use trainer::backbone::{self, BackboneKind};
use trainer::device::DeviceChoice;

struct Args {
    device: DeviceChoice,
    batch: usize,
    iters: usize,
    size: usize,
}

fn parse_args() -> Result<Args> {
    let mut a = Args {
        device: DeviceChoice::Cuda(0),
        batch: 128,
        iters: 10,
        size: 224,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--device" => a.device = value()?.parse().map_err(anyhow::Error::msg)?,
            "--batch" => {
                a.batch = value()?
                    .parse()
                    .context("--batch: expected a positive integer")?
            }
            "--iters" => {
                a.iters = value()?
                    .parse()
                    .context("--iters: expected a positive integer")?
            }
            "--size" => {
                a.size = value()?
                    .parse()
                    .context("--size: expected a positive integer")?
            }
            "-h" | "--help" => {
                println!(
                    "cuda_bench [--device cpu|cuda|cuda:N] [--batch 128] [--iters 10] [--size 224]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument '{other}' (see --help)"),
        }
    }
    if a.batch == 0 || a.iters == 0 || a.size < 32 {
        bail!("--batch and --iters must be positive and --size at least 32");
    }
    Ok(a)
}

/// Runs `f` twice to warm up (kernel loading, allocator), then `iters` times; returns
/// images per second.
fn time(
    dev: &Device,
    batch: usize,
    iters: usize,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok((batch * iters) as f64 / t.elapsed().as_secs_f64())
}

fn main() -> Result<()> {
    let a = parse_args()?;
    let dev = a.device.device()?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let net = backbone::build(BackboneKind::EfficientnetLite0, vb.pp("backbone"))?;
    let stages = 0..net.num_stages();
    let x = Tensor::randn(0f32, 1.0, (a.batch, 3, a.size, a.size), &dev)?;
    let embed = |x: &Tensor| -> Result<Tensor> {
        let f = net.pool(&net.forward_stages(x, stages.clone())?)?;
        Ok(trainer::embed::l2_normalize(&f)?)
    };

    let embed_ips = time(&dev, a.batch, a.iters, || {
        embed(&x)?;
        Ok(())
    })?;

    let dim = embed(&x)?.dim(1)?;
    let target = Tensor::randn(0f32, 1.0, (a.batch, dim), &dev)?;
    let vars: Vec<_> = varmap
        .data()
        .lock()
        .expect("varmap lock")
        .iter()
        .filter(|(name, _)| !backbone::is_running_stat(name))
        .map(|(_, v)| v.clone())
        .collect();
    let mut opt = AdamW::new(
        vars,
        ParamsAdamW {
            lr: 1e-5,
            ..Default::default()
        },
    )?;
    let train_ips = time(&dev, a.batch, a.iters, || {
        let loss = (embed(&x)? * &target)?.sum_all()?;
        opt.backward_step(&loss)?;
        Ok(())
    })?;

    println!(
        "{}",
        serde_json::json!({
            "impl": "candle+deep-metric-kernels",
            "device": a.device.to_string(),
            "model": "efficientnet-lite0",
            "batch": a.batch,
            "size": a.size,
            "iters": a.iters,
            "embed_images_per_sec": embed_ips,
            "train_images_per_sec": train_ips,
        })
    );
    Ok(())
}
