#!/usr/bin/env python3
"""Reference outputs of the transformer backbones from their own code (timm, open_clip), with
random weights saved under the published key names, for the Rust parity tests.

The real weights cannot be downloaded here, so parity is shown on random ones: the same
architectures are built in PyTorch (timm's DINOv2 ViTs, open_clip's OpenAI CLIP image tower
converted to the Hugging Face `openai/clip-vit-base-patch16` names exactly as transformers'
own conversion script does), every parameter is drawn at random (layer scales and norms
included, so no block is a near-identity), and the state dicts are saved as safetensors.

    # the small reduced-depth fixture committed for CI (forward + gradients)
    python3 bench/peers/vit_reference.py fixture DIR   (the parity test runs this itself)
    # full-size ViT-S/14, ViT-B/14 and CLIP ViT-B/16 on the reference photos, then the
    # Rust check (`cargo test -p trainer --test vit_parity full_size`)
    python3 bench/peers/vit_reference.py full /tmp/vit-full --images ../shared/models/efficientnet-lite0/reference

Outputs per model: `NAME.safetensors` (the weights, published layout) and `NAME.ref.safetensors`
with `input` (the preprocessed batch), `cls` / `cls_mean` (pooled features) and, for the
fixture, `probe` (a fixed random matrix), `grad.input` and `grad.<param>` — the gradients of
`sum(features * probe)`.
"""
import argparse
import glob
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vit_models import (clip_features, clip_features_resampled, clip_to_hf, clip_tower,  # noqa: E402
                        dinov2, dinov2_features)

torch.backends.mkldnn.enabled = True
torch.set_grad_enabled(True)


def randomize(model, seed):
    """Every parameter at random: weights ~ N(0, 0.02·√(768/fan_in)), biases, norms around 1,
    layer scales around 0.1 (the published ones are of that order)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if name.endswith("gamma") or ".ls" in name:
                v = 0.1 + 0.05 * torch.randn(shape, generator=g)
            elif ("norm" in name or "ln_" in name) and name.endswith("weight"):
                v = 1.0 + 0.1 * torch.randn(shape, generator=g)
            elif name.endswith("bias") or len(shape) == 1:
                v = 0.05 * torch.randn(shape, generator=g)
            else:
                fan_in = max(1, p[0].numel()) if len(shape) > 1 else shape[-1]
                if name in ("cls_token", "pos_embed") or "embedding" in name:
                    std = 0.5
                else:
                    std = (1.0 / fan_in) ** 0.5
                v = std * torch.randn(shape, generator=g)
            p.copy_(v)


def clip_grad_name(name, depth):
    """HF name of an open_clip parameter whose gradient is compared (in_proj is split)."""
    m = {"class_embedding": "vision_model.embeddings.class_embedding",
         "positional_embedding": "vision_model.embeddings.position_embedding.weight",
         "ln_pre.weight": "vision_model.pre_layrnorm.weight",
         "ln_post.bias": "vision_model.post_layernorm.bias"}
    if name in m:
        return m[name]
    if name == "proj":
        return "visual_projection.weight"
    for i in range(depth):
        a, b = f"transformer.resblocks.{i}.", f"vision_model.encoder.layers.{i}."
        if name == a + "attn.out_proj.weight":
            return b + "self_attn.out_proj.weight"
        if name == a + "mlp.c_fc.weight":
            return b + "mlp.fc1.weight"
        if name == a + "ln_2.bias":
            return b + "layer_norm2.bias"
    return None


def load_images(paths, resize, crop, mean, std, shorter_side=True):
    """PIL bicubic resize of the shorter side, center crop, normalise (timm's/CLIP's eval)."""
    from PIL import Image
    xs = []
    for p in paths:
        im = Image.open(p).convert("RGB")
        w, h = im.size
        s = resize / min(w, h)
        nw, nh = max(crop, round(w * s)), max(crop, round(h * s))
        im = im.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - crop) // 2, (nh - crop) // 2
        im = im.crop((left, top, left + crop, top + crop))
        t = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        xs.append((t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(xs)


IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP_NORM = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])


def reference(model, feats, x, probe_key, grads, seed, input_grad=True):
    """Pooled features and the gradients of sum(features[probe_key] · probe)."""
    x = x.clone().requires_grad_(True)
    model.zero_grad()
    out = feats(model, x)
    ref = {"input": x.detach().clone()}
    ref.update({k: v.detach().clone() for k, v in out.items()})
    if grads is not None:
        g = torch.Generator().manual_seed(seed + 1)
        probe = torch.randn(out[probe_key].shape, generator=g)
        (out[probe_key] * probe).sum().backward()
        ref["probe"] = probe
        if input_grad:
            ref["grad.input"] = x.grad.detach().clone()
        named = dict(model.named_parameters())
        for src, dst in grads:
            ref["grad." + dst] = named[src].grad.detach().clone()
    return {k: v.contiguous() for k, v in ref.items()}


def synthetic_images(n, size, seed):
    """`n` normalised inputs, seeded: the committed fixture holds no photo (the parity check
    compares the networks on the same tensor; the full-size check uses real photos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, 3, size, size), generator=g)


def fixture(out_dir):
    os.makedirs(out_dir, exist_ok=True)
    # DINOv2, reduced: depth 2, width 32; its position embedding is for 70 px (5×5) and the
    # input is 56 px (4×4), so the bicubic resampling of the embedding is checked too.
    m = dinov2(depth=2, dim=32, heads=2, img_size=70)
    randomize(m, 1)
    x = synthetic_images(2, 56, 11)
    names = ["patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight",
             "blocks.0.ls1.gamma", "blocks.1.mlp.fc2.weight", "blocks.1.norm2.weight",
             "norm.bias"]
    ref = reference(m, dinov2_features, x, "cls_mean", [(n, n) for n in names], 1)
    save_file({k: v.contiguous() for k, v in m.state_dict().items()},
              f"{out_dir}/dinov2-tiny.safetensors")
    save_file(ref, f"{out_dir}/dinov2-tiny.ref.safetensors")
    # CLIP, reduced: depth 2, width 32, patch 16, 64 px position grid (4×4) run at 48 px
    # (3×3), projection to 16. (The input gradient is checked on DINOv2 only, to keep the
    # fixture small.)
    c = clip_tower(depth=2, width=32, heads=2, image_size=64, patch=16, out_dim=16, mlp_ratio=2.0)
    randomize(c, 2)
    x = synthetic_images(2, 48, 12)
    grads = [(n, clip_grad_name(n, 2)) for n, _ in c.named_parameters()
             if clip_grad_name(n, 2)]
    ref = reference(c, clip_features_resampled, x, "cls", grads, 2, input_grad=False)
    # open_clip's proj is [width, out], HF's visual_projection is its transpose.
    ref["grad.visual_projection.weight"] = ref["grad.visual_projection.weight"].t().contiguous()
    save_file(clip_to_hf(c.state_dict(), 2), f"{out_dir}/clip-tiny.safetensors")
    save_file(ref, f"{out_dir}/clip-tiny.ref.safetensors")
    with open(f"{out_dir}/README.md", "w") as f:
        f.write("Written by `python3 bench/peers/vit_reference.py fixture "
                f"{out_dir}` (timm {__import__('timm').__version__}, open_clip "
                f"{__import__('open_clip').__version__}, torch {torch.__version__}); "
                "checked by `trainer/tests/vit_parity.rs`.\n\n"
                "- `dinov2-tiny`: timm VisionTransformer, patch 14, width 32, depth 2, 2 heads, "
                "layer scale, position embedding for 70 px, run at 56 px.\n"
                "- `clip-tiny`: open_clip's OpenAI image tower (quick GELU), patch 16, width 32, "
                "depth 2, 2 heads, MLP 64, projection 16, position embedding for 64 px, run at 48 px; saved in the Hugging Face "
                "names.\n\nInputs: two seeded N(0, 1) tensors per network (no photo).\n")
    print(f"fixture written to {out_dir}")


def full(out_dir, images, run_rust):
    os.makedirs(out_dir, exist_ok=True)
    meta = {}
    # timm's published files are for 518 px (37×37 position grid); we run at 224.
    for name, dim, heads in [("dinov2-vits14", 384, 6), ("dinov2-vitb14", 768, 12)]:
        m = dinov2(depth=12, dim=dim, heads=heads, img_size=518)
        randomize(m, 10 + dim)
        x = load_images(images, 256, 224, *IMAGENET)
        with torch.no_grad():
            ref = {"input": x, **dinov2_features(m, x)}
        save_file({k: v.contiguous() for k, v in m.state_dict().items()},
                  f"{out_dir}/{name}.safetensors")
        save_file({k: v.contiguous() for k, v in ref.items()}, f"{out_dir}/{name}.ref.safetensors")
        meta[name] = {"params": sum(p.numel() for p in m.parameters())}
        print(f"{name}: {meta[name]['params'] / 1e6:.1f} M parameters", flush=True)
    c = clip_tower(depth=12, width=768, heads=12, image_size=224, patch=16, out_dim=512)
    randomize(c, 3)
    x = load_images(images, 224, 224, *CLIP_NORM)
    with torch.no_grad():
        ref = {"input": x, **clip_features(c, x)}
    save_file(clip_to_hf(c.state_dict(), 12), f"{out_dir}/clip-vitb16.safetensors")
    save_file({k: v.contiguous() for k, v in ref.items()}, f"{out_dir}/clip-vitb16.ref.safetensors")
    with open(f"{out_dir}/images.json", "w") as f:
        json.dump([os.path.abspath(p) for p in images], f)
    print(f"full-size references written to {out_dir}", flush=True)
    if run_rust:
        env = dict(os.environ, VIT_REFERENCE_DIR=os.path.abspath(out_dir))
        cmd = ["cargo", "test", "-p", "trainer", "--test", "vit_parity", "full_size", "--",
               "--nocapture"]
        print("running", " ".join(cmd), flush=True)
        sys.exit(subprocess.call(cmd, env=env))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("mode", choices=["fixture", "full"])
    ap.add_argument("out")
    ap.add_argument("--images", default=os.path.join(
        os.path.dirname(__file__), "../../../shared/models/efficientnet-lite0/reference"))
    ap.add_argument("--no-rust", action="store_true", help="full: do not run the Rust check")
    a = ap.parse_args()
    torch.manual_seed(0)
    if a.mode == "fixture":
        fixture(a.out)
        return
    paths = sorted(glob.glob(os.path.join(a.images, "*.png")))
    if not paths:
        sys.exit(f"no .png images in {a.images}")
    full(a.out, paths, not a.no_rust)


if __name__ == "__main__":
    main()
