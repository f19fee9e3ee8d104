//! ResNet-18/50 and BN-Inception from random weights written in their published key layouts:
//! the file loads through `weights::load_backbone_weights`, the forward pass has the right
//! shape, and it is deterministic (same output twice, and from a second load of the file).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use trainer::backbone::{self, BackboneKind};
use trainer::embed::EmbeddingModel;
use trainer::ops::max_abs_diff;
use trainer::weights;

/// Random weights for every variable `kind` builds, plus what real checkpoints also carry
/// (`num_batches_tracked`, the classifier), with `module.` prefixes as DataParallel saves do.
fn write_random_checkpoint(kind: BackboneKind, classifier: &str, path: &Path) {
    let dev = Device::Cpu;
    let mut tensors = HashMap::new();
    for (name, shape) in weights::expected_variables(kind).unwrap() {
        let t = if name.ends_with(".running_var") {
            Tensor::rand(0.5f32, 1.5, shape, &dev).unwrap()
        } else if name.ends_with(".weight") && shape.rank() == 4 {
            // He-normal-ish, so activations neither vanish nor explode through the depth.
            let fan_in: usize = shape.dims()[1..].iter().product();
            Tensor::randn(0f32, (2.0 / fan_in as f64).sqrt() as f32, shape, &dev).unwrap()
        } else {
            Tensor::randn(0f32, 0.1, shape, &dev).unwrap()
        };
        if name.ends_with(".running_var") {
            let stat = name.replace(".running_var", ".num_batches_tracked");
            tensors.insert(format!("module.{stat}"), Tensor::new(7i64, &dev).unwrap());
        }
        tensors.insert(format!("module.{name}"), t);
    }
    let dim = backbone::feature_dim(kind);
    tensors.insert(
        format!("module.{classifier}.weight"),
        Tensor::zeros((10, dim), DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn check(kind: BackboneKind, classifier: &str, side: usize) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("weights.safetensors");
    write_random_checkpoint(kind, classifier, &path);

    let loaded = weights::load_backbone_weights(kind, &path, &Device::Cpu).unwrap();
    assert!(
        loaded.contains_key(&format!("{classifier}.weight")),
        "classifier kept under its own name"
    );
    assert!(!loaded.keys().any(|k| k.ends_with("num_batches_tracked")));

    let x = Tensor::randn(0f32, 1.0, (2, 3, side, side), &Device::Cpu).unwrap();
    let model = EmbeddingModel::pretrained(kind, &path, None, &Device::Cpu).unwrap();
    let a = model.backbone.features(&x).unwrap();
    assert_eq!(a.dims(), &[2, backbone::feature_dim(kind)]);
    let b = model.backbone.features(&x).unwrap();
    let again = EmbeddingModel::pretrained(kind, &path, None, &Device::Cpu).unwrap();
    let c = again.backbone.features(&x).unwrap();
    let max_diff = |p: &Tensor, q: &Tensor| max_abs_diff(p, q).unwrap();
    assert_eq!(max_diff(&a, &b), 0.0, "{kind}: two runs differ");
    assert_eq!(max_diff(&a, &c), 0.0, "{kind}: a second load differs");
    // The weights were really used: features are finite, not all equal, and differ per image.
    let v = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        v.iter().all(|x| x.is_finite()),
        "{kind}: non-finite features"
    );
    assert!(
        max_diff(&a.get(0).unwrap(), &a.get(1).unwrap()) > 0.0,
        "{kind}: images not told apart"
    );

    // Checkpoint identity: the unified L2-normalised embedding has the feature dimension.
    let e = model.forward(&x).unwrap();
    assert_eq!(e.dims(), &[2, backbone::feature_dim(kind)]);
}

#[test]
fn resnet18_from_synthetic_weights() {
    check(BackboneKind::Resnet18, "fc", 64);
}

#[test]
fn resnet50_from_synthetic_weights() {
    check(BackboneKind::Resnet50, "fc", 64);
}

#[test]
fn bn_inception_from_synthetic_weights() {
    check(BackboneKind::BnInception, "last_linear", 96);
}

#[test]
fn wrong_shape_is_reported_with_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r18.safetensors");
    write_random_checkpoint(BackboneKind::Resnet18, "fc", &path);
    // A ResNet-18 file offered as ResNet-50: layer1.0.conv1 is 3×3 there, 1×1 here.
    let err = weights::load_backbone_weights(BackboneKind::Resnet50, &path, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("r18.safetensors") && err.contains("layer1.0."),
        "{err}"
    );
}
