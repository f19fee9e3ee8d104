"""PyTorch peer of `trainer` on CUB (same data, model, schedule, loss), for a side-by-side.

Runs the recipe of the README: EfficientNet-Lite0 (same weight file), stages before
--freeze-until frozen and their outputs cached once (eval view), P×K batches, the seed's
fuzzy (positive-mining) loss, Adam with backbone/head learning rates, cosine schedule,
Recall@K on the held-out classes. Prints per-epoch figures and a final JSON line.

    python3 bench/peers/train_peer.py --data ../shared/data/cub100/CUB_200_2011 \
        --freeze-until 17 --epochs 20
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from efficientnet_lite0 import EfficientNetLite0, preprocess  # noqa: E402


def load_cub(root, split):
    paths = dict(l.split() for l in open(os.path.join(root, "images.txt")))
    labels = {i: int(c) for i, c in (l.split() for l in open(os.path.join(root, "image_class_labels.txt")))}
    classes = sorted(set(labels.values()))
    half = classes[: len(classes) // 2] if split == "train" else classes[len(classes) // 2:]
    dense = {c: i for i, c in enumerate(half)}
    items = sorted((int(i), os.path.join(root, "images", p), dense[labels[i]]) for i, p in paths.items() if labels[i] in dense)
    return [p for _, p, _ in items], np.array([l for _, _, l in items])


def eval_view(path):
    return preprocess(Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR))


@torch.no_grad()
def cache(model, paths, upto, bs=32):
    stages = model.stages()
    out = []
    for i in range(0, len(paths), bs):
        x = torch.stack([eval_view(p) for p in paths[i:i + bs]])
        for s in stages[:upto]:
            x = s(x)
        out.append(x)
    return torch.cat(out)


def fuzzy_loss(x, labels, margin):
    """The seed's positive-mining loss, vectorised (same definition as the Rust `fuzzy`)."""
    n = x.shape[0]
    sq = (x * x).sum(1)
    d = (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    neg = ~same
    p = d.masked_fill(~pos, float("inf")).min(1).values
    sel = neg & (d < (p.detach() + margin)[:, None])
    cnt = sel.sum(1)
    mean_neg = (d * sel).sum(1) / cnt.clamp_min(1)
    active = (cnt > 0) & torch.isfinite(p)
    return torch.where(active, p - mean_neg + margin, torch.zeros_like(p)).sum() / n


def recall_at(emb, labels, ks):
    sim = emb @ emb.t()
    sim.fill_diagonal_(-float("inf"))
    idx = sim.topk(max(ks), dim=1).indices
    hit = labels[idx] == labels[:, None]
    return {f"recall@{k}": hit[:, :k].any(1).float().mean().item() for k in ks}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "../../../shared/models/efficientnet-lite0/efficientnet-lite0-57934424.pth"))
    # Stages here are single blocks (stem=0, blocks 1..16, head conv=17); the Rust backbone groups
    # blocks, so Rust `--freeze-until head` (8) equals 17 here.
    ap.add_argument("--freeze-until", type=int, default=17)
    ap.add_argument("--embedding-dim", type=int, default=512)
    ap.add_argument("--head-init", choices=["random", "identity"], default="random")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--classes-per-batch", type=int, default=16)
    ap.add_argument("--images-per-class", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--head-lr", type=float, default=None)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--margin", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-file", help="reuse frozen activations across runs (experiments)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.set_num_threads(a.threads)
    head_lr = a.head_lr if a.head_lr is not None else 10 * a.lr

    model = EfficientNetLite0().load_pth(a.weights).eval()
    stages = model.stages()
    trp, trl = load_cub(a.data, "train")
    tep, tel = load_cub(a.data, "test")
    t0 = time.time()
    if a.cache_file and os.path.exists(a.cache_file):
        c = torch.load(a.cache_file)
        assert c["upto"] <= a.freeze_until, "cache file was made for a later stage"
        xtr, xte = c["train"], c["test"]
        with torch.no_grad():
            for s in stages[c["upto"]:a.freeze_until]:
                xtr, xte = s(xtr), s(xte)
    else:
        xtr, xte = cache(model, trp, a.freeze_until), cache(model, tep, a.freeze_until)
        if a.cache_file:
            torch.save({"upto": a.freeze_until, "train": xtr, "test": xte}, a.cache_file)
    cache_s = time.time() - t0
    print(f"cached {len(trp)}+{len(tep)} images in {cache_s:.1f}s", file=sys.stderr)

    head = torch.nn.Linear(1280, a.embedding_dim)
    if a.head_init == "identity":
        with torch.no_grad():
            head.weight.copy_(torch.eye(a.embedding_dim, 1280))
            head.bias.zero_()
    train_stages = torch.nn.ModuleList(stages[a.freeze_until:])
    for p in model.parameters():
        p.requires_grad_(False)
    bb_params = []
    for s in train_stages:
        for name, p in s.named_parameters():
            p.requires_grad_(True)
            bb_params.append(p)
    opt = torch.optim.Adam([{"params": bb_params, "lr": a.lr}, {"params": head.parameters(), "lr": head_lr}], weight_decay=a.weight_decay)

    def embed(x):
        for s in train_stages:
            x = s(x)
        return F.normalize(head(x.mean((2, 3))), dim=1)

    by_class = {}
    for i, l in enumerate(trl):
        by_class.setdefault(int(l), []).append(i)
    per_epoch = max(len(trl) // (a.classes_per_batch * a.images_per_class), 1)
    total = per_epoch * a.epochs
    step = 0
    ytr = torch.from_numpy(trl)
    yte = torch.from_numpy(tel)
    t_train = 0.0
    for epoch in range(a.epochs):
        t1 = time.time()
        losses = []
        for _ in range(per_epoch):
            idx = []
            for c in random.sample(sorted(by_class), a.classes_per_batch):
                pool = by_class[c]
                idx += random.sample(pool, a.images_per_class) if len(pool) >= a.images_per_class else random.choices(pool, k=a.images_per_class)
            for g, base in zip(opt.param_groups, (a.lr, head_lr)):
                g["lr"] = base * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = fuzzy_loss(embed(xtr[idx]), ytr[idx], a.margin)
            opt.zero_grad()
            if loss.requires_grad:
                loss.backward()
                opt.step()
            losses.append(loss.item())
            step += 1
        dt = time.time() - t1
        t_train += dt
        with torch.no_grad():
            r = recall_at(torch.cat([embed(xte[i:i + 256]) for i in range(0, len(xte), 256)]), yte, [1, 2, 4, 8])
        print(f"epoch {epoch + 1}: loss {np.mean(losses):.4f} {per_epoch * a.classes_per_batch * a.images_per_class / dt:.1f} img/s {r}", file=sys.stderr)
    out = {"peer": f"pytorch {torch.__version__}", "epochs": a.epochs, "freeze_until": a.freeze_until,
           "cache_seconds": cache_s, "train_seconds": t_train, "total_seconds": time.time() - t0, **r}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
