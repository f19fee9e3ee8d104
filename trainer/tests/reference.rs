//! EfficientNet-Lite0 against reference outputs of the original PyTorch model: pooled
//! 1280-d features within 1e-3 and the same ImageNet top-5 for five images.
//!
//! Needs `<workspace>/../shared/models/efficientnet-lite0` (real weights, reference images and
//! `expected.json`); skips with a message when it is absent.

use std::path::PathBuf;

use candle_core::{Device, Tensor, D};
use trainer::backbone::{self, BackboneKind};
use trainer::embed::EmbeddingModel;
use trainer::ops::max_abs_diff;

/// `<workspace root>/../shared`, or `$DEEP_METRIC_SHARED` (for checkouts not beside it).
fn shared_dir() -> Option<PathBuf> {
    let shared = std::env::var_os("DEEP_METRIC_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("models/efficientnet-lite0");
    if dir.is_dir() {
        Some(dir)
    } else {
        eprintln!("skipping: ../shared not found ({})", dir.display());
        None
    }
}

#[test]
fn efficientnet_lite0_matches_reference_features_and_top5() {
    let Some(dir) = shared_dir() else { return };
    let weights = dir.join("efficientnet-lite0-57934424.pth");
    let kind = BackboneKind::EfficientnetLite0;
    let device = Device::Cpu;
    let model =
        EmbeddingModel::pretrained(kind, &weights, None, &device).expect("load pretrained model");
    // The classifier is not part of the backbone; apply it from the loaded weight map.
    let loaded = trainer::weights::load_backbone_weights(kind, &weights, &device).unwrap();
    let (fc_w, fc_b) = (&loaded["classifier.weight"], &loaded["classifier.bias"]);

    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("reference/expected.json")).unwrap(),
    )
    .unwrap();
    let names = ["cat", "dragonfly", "grace_hopper", "owl", "parrot"];
    let pre = backbone::default_preprocess(kind);
    let mut buf = Vec::new();
    for name in names {
        let img = image::open(dir.join(format!("reference/{name}.png"))).unwrap();
        pre.normalize_into(&pre.eval_view(&img), &mut buf);
    }
    let side = pre.crop as usize;
    let x = Tensor::from_vec(buf, (names.len(), 3, side, side), &device).unwrap();
    let pooled = model.backbone.features(&x).unwrap();
    let logits = pooled
        .matmul(&fc_w.t().unwrap())
        .unwrap()
        .broadcast_add(fc_b)
        .unwrap();

    let mut worst = 0f32;
    for (i, name) in names.iter().enumerate() {
        let exp = &expected[format!("{name}.png")];
        let want: Vec<f32> = serde_json::from_value(exp["pooled_feature_1280"].clone()).unwrap();
        let got = pooled.get(i).unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(got.len(), want.len());
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let row = logits.get(i).unwrap();
        let top5: Vec<u32> = row
            .arg_sort_last_dim(false)
            .unwrap()
            .narrow(D::Minus1, 0, 5)
            .unwrap()
            .to_vec1()
            .unwrap();
        let want_top5: Vec<u32> = serde_json::from_value(exp["top5_class_index"].clone()).unwrap();
        let want_logits: Vec<f32> = serde_json::from_value(exp["top5_logit"].clone()).unwrap();
        let got_logits: Vec<f32> = want_top5
            .iter()
            .map(|&c| row.get(c as usize).unwrap().to_scalar().unwrap())
            .collect();
        eprintln!("{name}: max |Δfeature| = {err:.2e}, top-5 {top5:?} (expected {want_top5:?}), logits {got_logits:?} vs {want_logits:?}");
        assert_eq!(top5, want_top5, "{name}: top-5 classes differ");
        for (g, w) in got_logits.iter().zip(&want_logits) {
            assert!((g - w).abs() < 1e-3, "{name}: logit {g} vs expected {w}");
        }
        worst = worst.max(err);
        assert!(
            err < 1e-3,
            "{name}: pooled feature differs by {err} (max abs)"
        );
    }
    eprintln!("worst max |Δfeature| over the five images: {worst:.2e}");
}

/// timm's name for a canonical EfficientNet-Lite0 variable (the inverse of the loader's map).
fn timm_name(canonical: &str) -> String {
    let parts: Vec<&str> = canonical.split('.').collect();
    match parts.as_slice() {
        ["stem", "conv", p] => format!("conv_stem.{p}"),
        ["stem", "bn", p] => format!("bn1.{p}"),
        ["head", "conv", p] => format!("conv_head.{p}"),
        ["head", "bn", p] => format!("bn2.{p}"),
        ["classifier", p] => format!("classifier.{p}"),
        ["blocks", s, b, unit, kind, p] => {
            let depthwise_separable = *s == "0";
            let layer = match (depthwise_separable, *unit, *kind) {
                (true, "dw", "conv") => "conv_dw",
                (true, "dw", "bn") => "bn1",
                (true, "project", "conv") => "conv_pw",
                (true, "project", "bn") => "bn2",
                (false, "expand", "conv") => "conv_pw",
                (false, "expand", "bn") => "bn1",
                (false, "dw", "conv") => "conv_dw",
                (false, "dw", "bn") => "bn2",
                (false, "project", "conv") => "conv_pwl",
                (false, "project", "bn") => "bn3",
                other => panic!("unexpected {other:?}"),
            };
            format!("blocks.{s}.{b}.{layer}.{p}")
        }
        _ => panic!("unexpected canonical name {canonical}"),
    }
}

#[test]
fn timm_safetensors_layout_loads_to_the_same_weights() {
    let Some(dir) = shared_dir() else { return };
    let kind = BackboneKind::EfficientnetLite0;
    let device = Device::Cpu;
    let from_pth = trainer::weights::load_backbone_weights(
        kind,
        &dir.join("efficientnet-lite0-57934424.pth"),
        &device,
    )
    .unwrap();
    let timm: std::collections::HashMap<String, Tensor> = from_pth
        .iter()
        .map(|(k, v)| (timm_name(k), v.clone()))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    // An extension that says nothing: the format is recognised by content.
    let path = tmp.path().join("model.bin");
    candle_core::safetensors::save(&timm, &path).unwrap();
    let from_st = trainer::weights::load_backbone_weights(kind, &path, &device).unwrap();
    assert_eq!(from_st.len(), from_pth.len());
    for (k, v) in &from_pth {
        let w = from_st
            .get(k)
            .unwrap_or_else(|| panic!("{k} missing after the timm round trip"));
        let d = max_abs_diff(v, w).unwrap();
        assert_eq!(d, 0.0, "{k} differs");
    }
}
