//! Maps the key layouts of published checkpoints onto each backbone's canonical variable
//! names (the names [`crate::backbone::build`] creates).
//!
//! - EfficientNet-Lite0: the `efficientnet_lite_pytorch` / lukemelas layout
//!   (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, …, `_conv_head`, `_bn1`, `_fc`) and timm's
//!   `tf_efficientnet_lite0` layout (`conv_stem`, `bn1`, `blocks.S.B.conv_pw/bn1/conv_dw/bn2/
//!   conv_pwl/bn3`, `conv_head`, `bn2`, `classifier`) both map onto `stem.*`, `blocks.S.B.*`,
//!   `head.*`, `classifier.*`.
//! - ResNet-18/50 and BN-Inception: the canonical names *are* the published layouts
//!   (torchvision/timm `conv1`, `layer1.0.downsample.0`, …; Cadene's `conv1_7x7_s2`, …).
//!
//! - DINOv2: timm's layout (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.attn.qkv`,
//!   `blocks.N.ls1.gamma`, …, `norm`), which is also Meta's original one; `mask_token` and a
//!   classifier `head` are dropped.
//! - CLIP: the Hugging Face layout (`vision_model.*`, `visual_projection.weight`) of a full
//!   `CLIPModel` file, whose text tower (`text_model.*`, `text_projection`, `logit_scale`)
//!   is dropped.
//!
//! Keys every layout carries but no model uses (`num_batches_tracked`) are dropped here.

use crate::backbone::efficientnet::LITE0_STAGES;
use crate::backbone::BackboneKind;

/// Canonical name of a raw checkpoint key for `kind`, or `None` for keys the backbone has
/// no use for. `all_keys` is the file's full key list (the timm layout needs it to tell
/// depthwise-separable blocks from inverted-residual ones).
pub fn canonical_name(kind: BackboneKind, key: &str, all_keys: &[&str]) -> Option<String> {
    let key = key.strip_prefix("module.").unwrap_or(key);
    if key.ends_with(".num_batches_tracked") {
        return None;
    }
    match kind {
        BackboneKind::EfficientnetLite0 => efficientnet_name(key, all_keys),
        BackboneKind::Resnet18 | BackboneKind::Resnet50 | BackboneKind::BnInception => {
            Some(key.to_string())
        }
        BackboneKind::Dinov2Vits14 | BackboneKind::Dinov2Vitb14 => {
            (key != "mask_token" && !key.starts_with("head.")).then(|| key.to_string())
        }
        // `position_ids` is an index buffer older Hugging Face files carry.
        BackboneKind::ClipVitb16 => ((key.starts_with("vision_model.")
            && !key.ends_with(".position_ids"))
            || key == "visual_projection.weight")
            .then(|| key.to_string()),
    }
}

/// `(stage, block)` of the `n`-th block in lukemelas' flat numbering.
fn lite0_block_position(n: usize) -> Option<(usize, usize)> {
    let mut first = 0;
    for (s, cfg) in LITE0_STAGES.iter().enumerate() {
        if n < first + cfg.repeats {
            return Some((s, n - first));
        }
        first += cfg.repeats;
    }
    None
}

/// `bn.*` suffix mapping shared by both layouts: `_bn1.weight` → `bn.weight`.
fn bn_param(param: &str) -> Option<&str> {
    matches!(param, "weight" | "bias" | "running_mean" | "running_var").then_some(param)
}

fn efficientnet_name(key: &str, all_keys: &[&str]) -> Option<String> {
    if key.starts_with('_') {
        lukemelas_name(key)
    } else {
        timm_name(key, all_keys)
    }
}

fn lukemelas_name(key: &str) -> Option<String> {
    let (module, param) = key.rsplit_once('.')?;
    match module {
        "_conv_stem" if param == "weight" => return Some("stem.conv.weight".into()),
        "_bn0" => return bn_param(param).map(|p| format!("stem.bn.{p}")),
        "_conv_head" if param == "weight" => return Some("head.conv.weight".into()),
        "_bn1" => return bn_param(param).map(|p| format!("head.bn.{p}")),
        "_fc" => return matches!(param, "weight" | "bias").then(|| format!("classifier.{param}")),
        _ => {}
    }
    let rest = module.strip_prefix("_blocks.")?;
    let (n, layer) = rest.split_once('.')?;
    let (s, b) = lite0_block_position(n.parse().ok()?)?;
    let unit = match layer {
        "_expand_conv" | "_bn0" => "expand",
        "_depthwise_conv" | "_bn1" => "dw",
        "_project_conv" | "_bn2" => "project",
        _ => return None,
    };
    let part = if layer.ends_with("_conv") {
        (param == "weight").then_some("conv.weight".to_string())?
    } else {
        format!("bn.{}", bn_param(param)?)
    };
    Some(format!("blocks.{s}.{b}.{unit}.{part}"))
}

fn timm_name(key: &str, all_keys: &[&str]) -> Option<String> {
    let (module, param) = key.rsplit_once('.')?;
    match module {
        "conv_stem" if param == "weight" => return Some("stem.conv.weight".into()),
        "bn1" => return bn_param(param).map(|p| format!("stem.bn.{p}")),
        "conv_head" if param == "weight" => return Some("head.conv.weight".into()),
        "bn2" => return bn_param(param).map(|p| format!("head.bn.{p}")),
        "classifier" => {
            return matches!(param, "weight" | "bias").then(|| format!("classifier.{param}"))
        }
        _ => {}
    }
    let rest = module.strip_prefix("blocks.")?;
    let mut it = rest.splitn(3, '.');
    let (s, b, layer) = (it.next()?, it.next()?, it.next()?);
    let (s, b): (usize, usize) = (s.parse().ok()?, b.parse().ok()?);
    // timm's DepthwiseSeparableConv (conv_dw, bn1, conv_pw, bn2) vs InvertedResidual
    // (conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3): only the latter has a `conv_pwl`.
    let block = format!("blocks.{s}.{b}.");
    let inverted = all_keys.iter().any(|k| {
        k.strip_prefix("module.")
            .unwrap_or(k)
            .strip_prefix(&block)
            .is_some_and(|r| r.starts_with("conv_pwl."))
    });
    let unit = match (inverted, layer) {
        (true, "conv_pw" | "bn1") => "expand",
        (true, "conv_dw" | "bn2") => "dw",
        (true, "conv_pwl" | "bn3") => "project",
        (false, "conv_dw" | "bn1") => "dw",
        (false, "conv_pw" | "bn2") => "project",
        _ => return None,
    };
    let part = if layer.starts_with("conv_") {
        (param == "weight").then_some("conv.weight".to_string())?
    } else {
        format!("bn.{}", bn_param(param)?)
    };
    Some(format!("blocks.{s}.{b}.{unit}.{part}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: BackboneKind = BackboneKind::EfficientnetLite0;

    #[test]
    fn lukemelas_layout() {
        let n = |k: &str| canonical_name(E, k, &[]);
        assert_eq!(n("_conv_stem.weight").as_deref(), Some("stem.conv.weight"));
        assert_eq!(
            n("_bn0.running_var").as_deref(),
            Some("stem.bn.running_var")
        );
        assert_eq!(
            n("_blocks.0._depthwise_conv.weight").as_deref(),
            Some("blocks.0.0.dw.conv.weight")
        );
        assert_eq!(
            n("_blocks.0._bn2.bias").as_deref(),
            Some("blocks.0.0.project.bn.bias")
        );
        assert_eq!(
            n("_blocks.2._bn0.weight").as_deref(),
            Some("blocks.1.1.expand.bn.weight")
        );
        assert_eq!(
            n("_blocks.14._project_conv.weight").as_deref(),
            Some("blocks.5.3.project.conv.weight")
        );
        assert_eq!(
            n("_blocks.15._bn1.running_mean").as_deref(),
            Some("blocks.6.0.dw.bn.running_mean")
        );
        assert_eq!(n("_conv_head.weight").as_deref(), Some("head.conv.weight"));
        assert_eq!(n("module._bn1.weight").as_deref(), Some("head.bn.weight"));
        assert_eq!(n("_fc.bias").as_deref(), Some("classifier.bias"));
        assert_eq!(n("_blocks.3._bn0.num_batches_tracked"), None);
        assert_eq!(n("_blocks.16._bn0.weight"), None, "lite0 has 16 blocks");
    }

    #[test]
    fn timm_layout() {
        let keys = [
            "conv_stem.weight",
            "blocks.0.0.conv_dw.weight",
            "blocks.0.0.bn1.weight",
            "blocks.0.0.conv_pw.weight",
            "blocks.0.0.bn2.weight",
            "blocks.1.0.conv_pw.weight",
            "blocks.1.0.bn1.weight",
            "blocks.1.0.conv_dw.weight",
            "blocks.1.0.bn2.running_mean",
            "blocks.1.0.conv_pwl.weight",
            "blocks.1.0.bn3.bias",
            "bn2.weight",
        ];
        let n = |k: &str| canonical_name(E, k, &keys);
        assert_eq!(n("conv_stem.weight").as_deref(), Some("stem.conv.weight"));
        assert_eq!(n("bn1.bias").as_deref(), Some("stem.bn.bias"));
        assert_eq!(
            n("blocks.0.0.conv_dw.weight").as_deref(),
            Some("blocks.0.0.dw.conv.weight")
        );
        assert_eq!(
            n("blocks.0.0.bn1.weight").as_deref(),
            Some("blocks.0.0.dw.bn.weight")
        );
        assert_eq!(
            n("blocks.0.0.conv_pw.weight").as_deref(),
            Some("blocks.0.0.project.conv.weight")
        );
        assert_eq!(
            n("blocks.0.0.bn2.weight").as_deref(),
            Some("blocks.0.0.project.bn.weight")
        );
        assert_eq!(
            n("blocks.1.0.conv_pw.weight").as_deref(),
            Some("blocks.1.0.expand.conv.weight")
        );
        assert_eq!(
            n("blocks.1.0.bn1.weight").as_deref(),
            Some("blocks.1.0.expand.bn.weight")
        );
        assert_eq!(
            n("blocks.1.0.bn2.running_mean").as_deref(),
            Some("blocks.1.0.dw.bn.running_mean")
        );
        assert_eq!(
            n("blocks.1.0.conv_pwl.weight").as_deref(),
            Some("blocks.1.0.project.conv.weight")
        );
        assert_eq!(
            n("blocks.1.0.bn3.bias").as_deref(),
            Some("blocks.1.0.project.bn.bias")
        );
        assert_eq!(n("bn2.weight").as_deref(), Some("head.bn.weight"));
        assert_eq!(n("classifier.weight").as_deref(), Some("classifier.weight"));
    }

    #[test]
    fn resnet_and_inception_keep_their_layouts() {
        let r = canonical_name(
            BackboneKind::Resnet50,
            "module.layer1.0.downsample.1.running_var",
            &[],
        );
        assert_eq!(r.as_deref(), Some("layer1.0.downsample.1.running_var"));
        assert_eq!(
            canonical_name(BackboneKind::Resnet18, "bn1.num_batches_tracked", &[]),
            None
        );
        let b = canonical_name(BackboneKind::BnInception, "inception_3a_1x1_bn.weight", &[]);
        assert_eq!(b.as_deref(), Some("inception_3a_1x1_bn.weight"));
    }

    #[test]
    fn transformer_layouts_drop_what_the_tower_does_not_use() {
        let d = |k: &str| canonical_name(BackboneKind::Dinov2Vits14, k, &[]);
        assert_eq!(
            d("blocks.3.ls1.gamma").as_deref(),
            Some("blocks.3.ls1.gamma")
        );
        assert_eq!(d("module.pos_embed").as_deref(), Some("pos_embed"));
        assert_eq!(d("mask_token"), None);
        assert_eq!(d("head.weight"), None);
        let c = |k: &str| canonical_name(BackboneKind::ClipVitb16, k, &[]);
        assert_eq!(
            c("vision_model.encoder.layers.0.self_attn.q_proj.bias").as_deref(),
            Some("vision_model.encoder.layers.0.self_attn.q_proj.bias")
        );
        assert_eq!(
            c("visual_projection.weight").as_deref(),
            Some("visual_projection.weight")
        );
        assert_eq!(c("text_model.embeddings.token_embedding.weight"), None);
        assert_eq!(c("text_projection.weight"), None);
        assert_eq!(c("logit_scale"), None);
        assert_eq!(c("vision_model.embeddings.position_ids"), None);
    }
}
