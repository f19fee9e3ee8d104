//! The transformer backbones against their reference implementations (timm's DINOv2,
//! open_clip's OpenAI CLIP tower in the Hugging Face names), on random weights written by
//! `bench/peers/vit_reference.py`:
//!
//! - reduced-depth fixtures, written on first use into the test target directory by
//!   `bench/peers/vit_reference.py fixture` (seeded, deterministic, a few seconds; weight files
//!   are not committed), skipped with a message where Python lacks torch/timm/open_clip:
//!   pooled features within
//!   1e-4 of PyTorch's, through the training path and the fused inference copy, and the
//!   gradients of `sum(features · probe)` against PyTorch's autograd;
//! - `full_size` (run by the script, which sets `VIT_REFERENCE_DIR`): ViT-S/14, ViT-B/14 and
//!   CLIP ViT-B/16 at full size, loaded from the published layouts as a user's file is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use trainer::backbone::vit::{Family, Vit, VitConfig};
use trainer::backbone::{Backbone, BackboneKind, Pooling};
use trainer::weights;

/// The fixture directory, written once per test binary; `None` (with a message) when the
/// reference script cannot run here.
fn fixture_dir() -> Option<&'static Path> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("vit-fixtures");
        if dir.join("clip-tiny.ref.safetensors").exists() {
            return Some(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/vit_reference.py");
        let out = std::process::Command::new("python3")
            .arg(&script)
            .arg("fixture")
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(dir),
            Ok(o) => {
                eprintln!(
                    "skipping: {} fixture failed (needs torch, timm, open_clip): {}",
                    script.display(),
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("skipping: cannot run python3 for the ViT fixtures: {e}");
                None
            }
        }
    })
    .as_deref()
}

fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

/// The network of `cfg` with every variable set from `file` (keys mapped as for `kind`).
fn build(kind: BackboneKind, cfg: VitConfig, file: &Path) -> (VarMap, Vit) {
    let raw = weights::read_tensor_file(file, &Device::Cpu).unwrap();
    let keys: Vec<&str> = raw.iter().map(|(k, _)| k.as_str()).collect();
    let mut named = HashMap::new();
    for (k, t) in &raw {
        if let Some(n) = weights::names::canonical_name(kind, k, &keys) {
            named.insert(n, t.clone());
        }
    }
    let varmap = VarMap::new();
    let net = Vit::new(
        kind,
        cfg,
        VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let data = varmap.data().lock().unwrap();
    assert_eq!(data.len(), named.len(), "every tensor of the file is used");
    for (name, var) in data.iter() {
        let t = named.get(name).unwrap_or_else(|| panic!("{name} missing"));
        var.set(t).unwrap();
    }
    drop(data);
    (varmap, net)
}

/// max |a − b| and max |b|.
fn diff(a: &Tensor, b: &Tensor) -> (f32, f32) {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    (d.to_scalar().unwrap(), m.to_scalar().unwrap())
}

fn inference_copy(kind: BackboneKind, cfg: VitConfig, varmap: &VarMap) -> Vit {
    let vars = varmap
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect();
    Vit::inference_copy(kind, cfg, vars, &Device::Cpu).unwrap()
}

/// Forward (both paths) and gradients of one fixture.
fn check(kind: BackboneKind, cfg: VitConfig, name: &str, outputs: &[(&str, Pooling)]) {
    let Some(dir) = fixture_dir() else {
        return;
    };
    let (varmap, net) = build(kind, cfg.clone(), &dir.join(format!("{name}.safetensors")));
    let refs = load(&dir.join(format!("{name}.ref.safetensors")));
    let x = Var::from_tensor(&refs["input"]).unwrap();
    let tokens = net
        .forward_stages(x.as_tensor(), 0..net.num_stages())
        .unwrap();
    let fused = inference_copy(kind, cfg, &varmap);
    for (key, pooling) in outputs {
        let got = net.pool_with(&tokens, *pooling).unwrap();
        let (d, m) = diff(&got, &refs[*key]);
        eprintln!("{name} {key}: max |ours − PyTorch| = {d:.2e} (max |value| {m:.2})");
        assert!(d < 1e-4, "{name} {key}: {d}");
        let f = fused
            .pool_with(
                &fused
                    .forward_stages(x.as_tensor(), 0..net.num_stages())
                    .unwrap(),
                *pooling,
            )
            .unwrap();
        let (d, _) = diff(&f, &refs[*key]);
        assert!(d < 1e-4, "{name} {key}, fused: {d}");
    }
    // Gradients of sum(features · probe), with the last output's pooling.
    let (key, pooling) = outputs[outputs.len() - 1];
    let feats = net.pool_with(&tokens, pooling).unwrap();
    assert_eq!(feats.dims(), refs[key].dims());
    let loss = (feats * &refs["probe"]).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = varmap.data().lock().unwrap();
    let mut checked = 0;
    for (k, want) in &refs {
        let Some(param) = k.strip_prefix("grad.") else {
            continue;
        };
        let t = if param == "input" {
            x.as_tensor().clone()
        } else {
            vars[param].as_tensor().clone()
        };
        let got = grads
            .get(&t)
            .unwrap_or_else(|| panic!("{name}: no gradient reaches {param}"));
        let want = want.reshape(got.dims()).unwrap();
        let (d, m) = diff(got, &want);
        eprintln!("{name} grad {param}: max |ours − PyTorch| = {d:.2e} (max |grad| {m:.2e})");
        assert!(
            d <= 1e-4 * m.max(1.0),
            "{name}: gradient of {param} differs by {d} (max {m})"
        );
        checked += 1;
    }
    assert!(
        checked >= 6,
        "{name}: only {checked} gradients in the fixture"
    );
}

fn tiny(family: Family) -> VitConfig {
    match family {
        Family::Dinov2 => VitConfig {
            dim: 32,
            depth: 2,
            heads: 2,
            mlp_hidden: 128,
            grid: 5,
            ..VitConfig::dinov2_vits14()
        },
        Family::Clip => VitConfig {
            dim: 32,
            depth: 2,
            heads: 2,
            mlp_hidden: 64,
            grid: 4,
            proj_dim: Some(16),
            ..VitConfig::clip_vitb16()
        },
    }
}

#[test]
fn dinov2_matches_timm_forward_and_gradients() {
    check(
        BackboneKind::Dinov2Vits14,
        tiny(Family::Dinov2),
        "dinov2-tiny",
        &[("cls", Pooling::Cls), ("cls_mean", Pooling::ClsMean)],
    );
}

#[test]
fn clip_matches_open_clip_forward_and_gradients() {
    check(
        BackboneKind::ClipVitb16,
        tiny(Family::Clip),
        "clip-tiny",
        &[("cls", Pooling::Cls)],
    );
}

/// Full-size models written by `bench/peers/vit_reference.py full DIR` (which runs this
/// test with `VIT_REFERENCE_DIR=DIR`); skipped otherwise.
#[test]
fn full_size() {
    let Some(dir) = std::env::var_os("VIT_REFERENCE_DIR").map(PathBuf::from) else {
        eprintln!(
            "skipping: VIT_REFERENCE_DIR not set (bench/peers/vit_reference.py full sets it)"
        );
        return;
    };
    use trainer::embed::{Embedder, EmbeddingModel, ModelSpec};
    let images: Vec<PathBuf> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("images.json")).unwrap()).unwrap();
    for kind in [
        BackboneKind::Dinov2Vits14,
        BackboneKind::Dinov2Vitb14,
        BackboneKind::ClipVitb16,
    ] {
        let file = dir.join(format!("{kind}.safetensors"));
        if !file.exists() {
            eprintln!("{kind}: {} absent, skipped", file.display());
            continue;
        }
        let refs = load(&dir.join(format!("{kind}.ref.safetensors")));
        let poolings: &[(&str, Pooling)] = if kind == BackboneKind::ClipVitb16 {
            &[("cls", Pooling::Cls)]
        } else {
            &[("cls", Pooling::Cls), ("cls_mean", Pooling::ClsMean)]
        };
        for (key, pooling) in poolings {
            let model =
                EmbeddingModel::pretrained_pooled(kind, &file, None, *pooling, &Device::Cpu)
                    .unwrap();
            let n = model.backbone.num_stages();
            let x = &refs["input"];
            let got = model
                .backbone
                .pool_with(&model.backbone.forward_stages(x, 0..n).unwrap(), *pooling)
                .unwrap();
            let (d, m) = diff(&got, &refs[*key]);
            let fused = trainer::embed::fused_backbone(&model).unwrap().unwrap();
            let (df, _) = diff(&fused.pooled_features(x).unwrap(), &refs[*key]);
            eprintln!(
                "{kind} {key}: max |ours − PyTorch| = {d:.2e} training path, {df:.2e} inference \
                 copy (max |value| {m:.2})"
            );
            assert!(d < 1e-3 && df < 1e-3, "{kind} {key}: {d} / {df}");
        }
        // From the image files through our own preprocessing (resampler differences only).
        let embedder = Embedder::load(
            &ModelSpec::Pretrained {
                backbone: kind,
                weights: Some(file.clone()),
            },
            &Device::Cpu,
        )
        .unwrap();
        let decoded: Vec<_> = images.iter().map(|p| image::open(p).unwrap()).collect();
        let ours = embedder.embed_images(&decoded).unwrap();
        let want = trainer::embed::l2_normalize(&refs["cls"])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let cos: Vec<f32> = ours
            .iter()
            .zip(&want)
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
            .collect();
        let min = cos.iter().cloned().fold(f32::INFINITY, f32::min);
        eprintln!(
            "{kind} from the image files: cosine to PyTorch's embedding ≥ {min:.5} ({cos:?})"
        );
        assert!(min > 0.99, "{kind}: {cos:?}");
    }
}
