//! Inference throughput of the backbones at batch 32 (`cargo test --test backbone_throughput
//! -- --ignored --nocapture`). Ignored by default: it measures, it does not check.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use trainer::backbone::{self, BackboneKind};

fn throughput(kind: BackboneKind, batch: usize, reps: usize) {
    let varmap = VarMap::new();
    let net = backbone::build(
        kind,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let side = backbone::default_preprocess(kind).crop as usize;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, side, side), &Device::Cpu).unwrap();
    net.features(&x).unwrap(); // warm-up
                               // Per-stage split, to see where the time goes.
    let mut h = x.clone();
    for (i, name) in net.stage_names().iter().enumerate() {
        let t = Instant::now();
        h = net.forward_stages(&h, i..i + 1).unwrap();
        eprintln!(
            "  {kind} stage {i} ({name}): {:.3} s -> {:?}",
            t.elapsed().as_secs_f64(),
            h.dims()
        );
    }
    let t = Instant::now();
    for _ in 0..reps {
        net.features(&x).unwrap();
    }
    let s = t.elapsed().as_secs_f64();
    eprintln!(
        "{kind}: {:.1} img/s at batch {batch} ({reps} batches in {s:.2} s)",
        (batch * reps) as f64 / s
    );
}

#[test]
#[ignore]
fn efficientnet_lite0_throughput() {
    throughput(BackboneKind::EfficientnetLite0, 32, 3);
}

#[test]
#[ignore]
fn resnet_and_inception_throughput() {
    throughput(BackboneKind::Resnet18, 32, 1);
    throughput(BackboneKind::BnInception, 32, 1);
}
