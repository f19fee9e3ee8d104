"""The transformer backbones in PyTorch, as their own libraries build them: timm's DINOv2
ViTs and open_clip's OpenAI CLIP image tower, with the conversion between open_clip's and the
Hugging Face (`openai/clip-vit-base-patch16`) key names. Shared by `vit_reference.py` (parity
references) and the `trainer bench --backbone …` peers (`bench_torch.py`, `bench_ort.py`)."""
import torch


def dinov2(depth, dim, heads, img_size):
    import timm.models.vision_transformer as vt
    # The architecture of timm's vit_{small,base}_patch14_dinov2 (init_values → layer scale,
    # erf GELU, ε 1e-6 norms, class token), with the image-size dynamic like theirs.
    m = vt.VisionTransformer(
        img_size=img_size, patch_size=14, embed_dim=dim, depth=depth, num_heads=heads,
        mlp_ratio=4, init_values=1e-5, num_classes=0, dynamic_img_size=True)
    return m.eval()


def dinov2_features(m, x):
    t = m.forward_features(x)  # final norm applied to every token
    cls = t[:, 0]
    return {"cls": cls, "cls_mean": torch.cat([cls, t[:, 1:].mean(1)], -1)}


def clip_tower(depth, width, heads, image_size, patch, out_dim, mlp_ratio=4.0):
    from open_clip.transformer import VisionTransformer
    from open_clip.model import QuickGELU
    m = VisionTransformer(image_size=image_size, patch_size=patch, width=width, layers=depth,
                          heads=heads, mlp_ratio=mlp_ratio, output_dim=out_dim,
                          act_layer=QuickGELU)
    return m.eval()


def clip_features(m, x):
    return {"cls": m(x)}


def clip_features_resampled(m, x):
    """open_clip's forward at another input size: its position embedding resampled as timm
    does (bicubic, antialiased), which is what our tower does for every ViT."""
    from timm.layers import resample_abs_pos_embed
    g = x.shape[-1] // m.patch_size[0]
    t = m.conv1(x).flatten(2).transpose(1, 2)
    cls = m.class_embedding.to(t.dtype).expand(t.shape[0], 1, -1)
    t = torch.cat([cls, t], 1)
    pos = resample_abs_pos_embed(m.positional_embedding[None], [g, g], num_prefix_tokens=1)
    t = m.ln_pre(t + pos)
    t = m.transformer(t)
    return {"cls": m.ln_post(t[:, 0]) @ m.proj}


def clip_to_hf(sd, depth):
    """open_clip's OpenAI layout → transformers' CLIP names (as its conversion script does)."""
    out = {}
    v = "vision_model."
    out[v + "embeddings.class_embedding"] = sd["class_embedding"]
    out[v + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = sd["conv1.weight"]
    n = sd["positional_embedding"].shape[0]
    # Older HF files carry this int64 buffer; the loader must ignore it.
    out[v + "embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    for s in ("weight", "bias"):
        out[v + "pre_layrnorm." + s] = sd["ln_pre." + s]
        out[v + "post_layernorm." + s] = sd["ln_post." + s]
    for i in range(depth):
        a, b = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for s in ("weight", "bias"):
            q, k, vv = sd[a + "attn.in_proj_" + s].chunk(3, 0)
            out[b + "self_attn.q_proj." + s] = q
            out[b + "self_attn.k_proj." + s] = k
            out[b + "self_attn.v_proj." + s] = vv
            out[b + "self_attn.out_proj." + s] = sd[a + "attn.out_proj." + s]
            out[b + "layer_norm1." + s] = sd[a + "ln_1." + s]
            out[b + "layer_norm2." + s] = sd[a + "ln_2." + s]
            out[b + "mlp.fc1." + s] = sd[a + "mlp.c_fc." + s]
            out[b + "mlp.fc2." + s] = sd[a + "mlp.c_proj." + s]
    out["visual_projection.weight"] = sd["proj"].t()
    # A full CLIPModel file also holds the text tower: a few keys of it, to be dropped.
    out["text_projection.weight"] = torch.zeros(4, 4)
    out["logit_scale"] = torch.tensor(2.6592)
    return {k: t.contiguous() for k, t in out.items()}


def hf_to_clip(sd, depth):
    """The inverse of `clip_to_hf`: a Hugging Face CLIP file → open_clip's visual state dict."""
    v = "vision_model."
    out = {"class_embedding": sd[v + "embeddings.class_embedding"],
           "positional_embedding": sd[v + "embeddings.position_embedding.weight"],
           "conv1.weight": sd[v + "embeddings.patch_embedding.weight"],
           "proj": sd["visual_projection.weight"].t().contiguous()}
    for s in ("weight", "bias"):
        out["ln_pre." + s] = sd[v + "pre_layrnorm." + s]
        out["ln_post." + s] = sd[v + "post_layernorm." + s]
    for i in range(depth):
        a, b = f"transformer.resblocks.{i}.", f"{v}encoder.layers.{i}."
        for s in ("weight", "bias"):
            out[a + "attn.in_proj_" + s] = torch.cat(
                [sd[b + f"self_attn.{p}_proj." + s] for p in "qkv"], 0)
            out[a + "attn.out_proj." + s] = sd[b + "self_attn.out_proj." + s]
            out[a + "ln_1." + s] = sd[b + "layer_norm1." + s]
            out[a + "ln_2." + s] = sd[b + "layer_norm2." + s]
            out[a + "mlp.c_fc." + s] = sd[b + "mlp.fc1." + s]
            out[a + "mlp.c_proj." + s] = sd[b + "mlp.fc2." + s]
    return out


# name → (family, width, heads); every one has depth 12.
BACKBONES = {"dinov2-vits14": ("dinov2", 384, 6), "dinov2-vitb14": ("dinov2", 768, 12),
             "clip-vitb16": ("clip", 768, 12)}


def feature_dim(backbone):
    """Width of the pooled feature: the token width, CLIP's projection (512)."""
    family, width, _ = BACKBONES[backbone]
    return 512 if family == "clip" else width


def load_vit(backbone, weights, size):
    """`backbone` at `size` px from a published-layout safetensors file, as a module mapping
    images to the pooled feature (DINOv2: the normed class token; CLIP: the projected one).
    A DINOv2 position embedding for another size is resampled once here, as timm does."""
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed
    family, width, heads = BACKBONES[backbone]
    sd = load_file(weights)
    if family == "dinov2":
        m = dinov2(depth=12, dim=width, heads=heads, img_size=size)
        g = size // 14
        sd = {k: v for k, v in sd.items() if k != "mask_token" and not k.startswith("head.")}
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [g, g], num_prefix_tokens=1)
        m.load_state_dict(sd)
        return DinoCls(m)
    m = clip_tower(depth=12, width=width, heads=heads, image_size=size, patch=16, out_dim=512)
    m.load_state_dict(hf_to_clip(sd, 12))
    return m


class DinoCls(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.forward_features(x)[:, 0]
