"""PyTorch peer of a `trainer` run: the same recipe, re-run in PyTorch, for bench/RESULTS-learning.md.

Reads the recipe a run recorded in RUN/config.json (`training`: loss and its constants, image
size, frozen stages, epochs, cached views, P×K, learning rates, warm-up, crop scale — for a
`--time-budget` run, the plan the trainer chose) and trains EfficientNet-Lite0 from the same
weight file on the same data the same way: stages before the freeze point frozen and their
outputs cached for the eval view plus (views − 1) augmented views, or, with nothing frozen,
live random-resized-crop + rotation (`--rotate`) + flip views; with `--turned-classes` every
training class also turned by 90/180/270 degrees as three new classes; BN frozen (eval mode);
P×K batches; Adam with the backbone / head / proxy learning rates, L2 weight decay, linear
warm-up then cosine over the epochs the run trained (`train_state.json`: a budgeted run whose
deadline guard shortened its schedule trained fewer epochs than its plan).
Reports Recall@1,2,4,8 on the held-out classes and the wall time as one JSON line.

    python3 bench/peers/learn_peer.py --run runs/omniglot-30m --data ../shared/data/omniglot --dataset folder

`--cache-dir DIR` keeps the frozen stages' outputs for later runs of the same data and views
(the every-loss table re-runs one recipe per loss; the trainer reuses its cache the same way).
"""
import argparse
import hashlib
import itertools
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
from efficientnet_lite0 import EfficientNetLite0  # noqa: E402
from train_peer import fuzzy_loss, recall_at  # noqa: E402

# The Rust backbone groups Lite0's 16 blocks into 7 stages: stem = 0, groups 1–7, head = 8.
# Here every block is a stage (stem = 0, blocks 1–16, head = 17).
GROUP_START = [0, 1, 2, 4, 6, 9, 12, 16, 17]
STAGE_NAMES = ["stem"] + [f"blocks{i}" for i in range(1, 8)] + ["head"]


def stage_index(freeze_until):
    """`--freeze-until` as the run recorded it: an index or a stage name (`trainer stages`)."""
    s = str(freeze_until)
    return int(s) if s.isdigit() else STAGE_NAMES.index(s)


IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}


def load_folder(root):
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    half = len(classes) // 2
    out = {"train": ([], []), "test": ([], [])}
    for ci, c in enumerate(classes):
        split, label = ("train", ci) if ci < half else ("test", ci - half)
        for f in sorted(os.listdir(os.path.join(root, c))):
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                out[split][0].append(os.path.join(root, c, f))
                out[split][1].append(label)
    return {k: (p, np.array(l)) for k, (p, l) in out.items()}


def load_cub(root):
    paths = dict(l.split() for l in open(os.path.join(root, "images.txt")))
    labels = {i: int(c) for i, c in (l.split() for l in open(os.path.join(root, "image_class_labels.txt")))}
    classes = sorted(set(labels.values()))
    out = {}
    for split, chosen in (("train", classes[: len(classes) // 2]), ("test", classes[len(classes) // 2:])):
        dense = {c: i for i, c in enumerate(chosen)}
        items = sorted((int(i), os.path.join(root, "images", p), dense[labels[i]]) for i, p in paths.items() if labels[i] in dense)
        out[split] = ([p for _, p, _ in items], np.array([l for _, _, l in items]))
    return out


def drop_duplicates(paths, labels):
    """The trainer's default (trainer/src/data/duplicates.rs): keep the first copy of every
    repeated file, then make the labels of the classes that kept images dense again."""
    seen, keep = set(), []
    for i, p in enumerate(paths):
        h = hashlib.sha256(open(p, "rb").read()).digest()
        if h not in seen:
            seen.add(h)
            keep.append(i)
    used = sorted(set(int(labels[i]) for i in keep))
    dense = {c: j for j, c in enumerate(used)}
    print(f"dropped {len(paths) - len(keep)} repeated training files, {len(set(labels.tolist())) - len(used)} emptied classes", file=sys.stderr)
    return [paths[i] for i in keep], np.array([dense[int(labels[i])] for i in keep])


def open_image(path, turns=0):
    """The decoded file turned clockwise by `turns` quarter turns (trainer/src/data/turns.rs)."""
    img = Image.open(path).convert("RGB")
    return img.transpose([None, Image.ROTATE_270, Image.ROTATE_180, Image.ROTATE_90][turns % 4]) if turns % 4 else img


def with_turned_classes(items, labels):
    """Each class also turned 1, 2 and 3 quarter turns as classes t·n + c, as the trainer."""
    n = int(labels.max()) + 1
    return [(p, t) for t in range(4) for p in items], np.concatenate([labels + t * n for t in range(4)])


def rotated_resample(img, region, angle, size):
    """The trainer's rotated crop (trainer/src/data/augment.rs `rotated_resample`): the box
    turned by `angle` radians about its centre; its axis-aligned bounds resampled at the output
    scale first, then read bilinearly, edge pixels repeated beyond the image."""
    sw, sh = img.size
    x, y, w, h = region
    w, h = max(w, 1e-3), max(h, 1e-3)
    cx, cy = x + w / 2, y + h / 2
    sin, cos = math.sin(angle), math.cos(angle)
    bw, bh = w * abs(cos) + h * abs(sin), w * abs(sin) + h * abs(cos)
    left, top = max(cx - bw / 2, 0.0), max(cy - bh / 2, 0.0)
    right, bottom = min(cx + bw / 2, sw), min(cy + bh / 2, sh)
    if right <= left or bottom <= top:
        return img.resize((size, size), Image.BILINEAR, box=(x, y, x + w, y + h))
    kx, ky = size / w, size / h
    iw, ih = max(math.ceil((right - left) * kx), 1), max(math.ceil((bottom - top) * ky), 1)
    inter = np.asarray(img.resize((iw, ih), Image.BILINEAR, box=(left, top, right, bottom)), dtype=np.float32)
    fx, fy = iw / (right - left), ih / (bottom - top)
    d = np.arange(size) + 0.5 - size / 2
    dx, dy = d[None, :] / kx, d[:, None] / ky
    sx = np.clip((cx + cos * dx - sin * dy - left) * fx - 0.5, 0, iw - 1)
    sy = np.clip((cy + sin * dx + cos * dy - top) * fy - 0.5, 0, ih - 1)
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    x1, y1 = np.minimum(x0 + 1, iw - 1), np.minimum(y0 + 1, ih - 1)
    wx, wy = (sx - x0)[..., None], (sy - y0)[..., None]
    top_row = inter[y0, x0] * (1 - wx) + inter[y0, x1] * wx
    bottom_row = inter[y1, x0] * (1 - wx) + inter[y1, x1] * wx
    out = top_row * (1 - wy) + bottom_row * wy
    return Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8))


def to_tensor(img):
    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return ((a - 127.0) / 128.0).permute(2, 0, 1)


def eval_view(item, size):
    return to_tensor(open_image(*as_item(item)).resize((size, size), Image.BILINEAR))


def as_item(item):
    """A training item is a path or (path, quarter turns)."""
    return (item, 0) if isinstance(item, str) else item


def train_view(item, size, scale_min, rng, flip=0.5, rotate=0.0):
    """RandomResizedCrop (scale (scale_min, 1), ratio 3/4–4/3), the box turned by an angle
    uniform in ±`rotate` degrees, + horizontal flip, as the trainer."""
    img = open_image(*as_item(item))
    w, h = img.size
    area = w * h
    box = (0, 0, w, h)
    for _ in range(10):
        target = area * rng.uniform(scale_min, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            box = (x, y, x + cw, y + ch)
            break
    flipped = rng.random() < flip
    angle = math.radians(rng.uniform(-rotate, rotate)) if rotate > 0 else 0.0
    if angle == 0.0:
        view = img.resize((size, size), Image.BILINEAR, box=box)
    else:
        view = rotated_resample(img, (box[0], box[1], box[2] - box[0], box[3] - box[1]), angle, size)
    if flipped:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    return to_tensor(view)


def multi_similarity(x, y, alpha=2.0, beta=50.0, lam=0.5, eps=0.1):
    s = x @ x.t()
    n = x.shape[0]
    same = y[:, None] == y[None, :]
    pos = same & ~torch.eye(n, dtype=torch.bool)
    neg = ~same
    sd = s.detach()
    min_pos = sd.masked_fill(~pos, float("inf")).min(1).values
    max_neg = sd.masked_fill(~neg, -float("inf")).max(1).values
    mp = pos & (sd - eps < max_neg[:, None])
    mn = neg & (sd + eps > min_pos[:, None])
    active = mp.any(1) & mn.any(1)
    pull = torch.log1p((torch.exp(-alpha * (s - lam)) * mp).sum(1)) / alpha
    push = torch.log1p((torch.exp(beta * (s - lam)) * mn).sum(1)) / beta
    return ((pull + push) * active).sum() / n


def pairwise_distance(x):
    """Euclidean distances as the trainer computes them: sqrt(max(|a|² + |b|² − 2ab, 1e-12))."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * x @ x.t()).clamp_min(1e-12).sqrt()


def pair_masks(y):
    n = y.shape[0]
    same = y[:, None] == y[None, :]
    return same & ~torch.eye(n, dtype=torch.bool), ~same


def contrastive(x, y, pos_margin=0.6, neg_margin=1.2):
    """Seed form (../shared/docs/protocol.md): per anchor, mean hinge over positives + over negatives, / n."""
    d = pairwise_distance(x)
    pos, neg = pair_masks(y)
    lp = (F.relu(d - pos_margin) * pos).sum(1) / pos.sum(1).clamp_min(1)
    ln = (F.relu(neg_margin - d) * neg).sum(1) / neg.sum(1).clamp_min(1)
    return (lp + ln).sum() / x.shape[0]


def lifted(x, y, alpha=1.0):
    """Song et al. 2016: J_ij = log(Σ_neg(i) e^(α−d) + Σ_neg(j) e^(α−d)) + d_ij over positive pairs i<j."""
    d = pairwise_distance(x)
    pos, neg = pair_masks(y)
    e = torch.exp(alpha - d) * neg
    row = e.sum(1)
    i, j = torch.triu(pos, 1).nonzero(as_tuple=True)
    if len(i) == 0:
        return (x * 0).sum()
    s = row[i] + row[j]
    ok = s > 0
    big_j = torch.log(s[ok]) + d[i[ok], j[ok]]
    return (F.relu(big_j) ** 2).sum() / (2 * len(i))


def batch_all(x, y, margin=0.2, nonzero=False):
    d = pairwise_distance(x)
    pos, neg = pair_masks(y)
    t = F.relu(d[:, :, None] - d[:, None, :] + margin)
    valid = pos[:, :, None] & neg[:, None, :]
    t = t * valid
    count = (t > 0).sum() if nonzero else valid.sum()
    return t.sum() / count.clamp_min(1)


def batch_hard(x, y, margin=0.2, soft=False):
    d = pairwise_distance(x)
    pos, neg = pair_masks(y)
    hp = d.masked_fill(~pos, -float("inf")).max(1).values
    hn = d.masked_fill(~neg, float("inf")).min(1).values
    ok = pos.any(1) & neg.any(1)
    gap = hp[ok] - hn[ok]
    terms = F.softplus(gap) if soft else F.relu(gap + margin)
    return terms.sum() / ok.sum().clamp_min(1)


def proxy_anchor(x, y, proxies, alpha=32.0, delta=0.1):
    s = x @ F.normalize(proxies, dim=1).t()  # [n, C]
    onehot = F.one_hot(y, proxies.shape[0]).bool()
    pos_exp = torch.exp(-alpha * (s - delta)) * onehot
    neg_exp = torch.exp(alpha * (s + delta)) * ~onehot
    with_pos = onehot.any(0)
    pull = torch.log1p(pos_exp.sum(0))[with_pos].sum() / with_pos.sum()
    push = torch.log1p(neg_exp.sum(0)).sum() / proxies.shape[0]
    return pull + push


def norm_softmax(x, y, proxies, scale=20.0, margin=0.0):
    s = x @ F.normalize(proxies, dim=1).t()
    logits = scale * (s - margin * F.one_hot(y, proxies.shape[0]))
    return F.cross_entropy(logits, y)


def group_near(order, group, cents, candidates=1024):
    """The trainer's hard-class grouping (trainer/src/data/class_mining.rs): each group is the
    next unplaced class of the shuffled `order` and its `group - 1` nearest unplaced classes
    by centroid (among the next `candidates` unplaced), then unseen classes in order."""
    placed, out = set(), []
    for cur, seed in enumerate(order):
        if seed in placed:
            continue
        placed.add(seed)
        out.append(seed)
        want = min(group - 1, len(order) - len(out))
        near = []
        if seed in cents:
            cand = list(itertools.islice((c for c in order[cur + 1:] if c not in placed), candidates))
            sims = [(float(cents[seed] @ cents[c]), i, c) for i, c in enumerate(cand) if c in cents]
            near = [c for _, _, c in sorted(sims, key=lambda t: (-t[0], t[1]))[:want]]
        fill = list(itertools.islice((c for c in order[cur + 1:] if c not in placed and c not in near), want - len(near)))
        for c in near + fill:
            placed.add(c)
            out.append(c)
    return out


def class_groups(classes, p, group, cents, rng):
    """Endless batches of P classes, one shuffled pass over the classes at a time (a short
    last group topped up from the pass), grouped by `group_near` once centroids exist."""
    while True:
        order = list(classes)
        rng.shuffle(order)
        if group > 1 and cents:
            order = group_near(order, group, cents)
        for s in range(0, len(order), p):
            batch = order[s:s + p]
            if len(batch) < p:
                batch += rng.sample(order[:s], p - len(batch))
            yield batch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trainer run directory (its config.json holds the recipe)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", choices=["folder", "cub"], default="folder")
    ap.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "../../../shared/models/efficientnet-lite0/efficientnet-lite0-57934424.pth"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--cache-dir", help="keep the frozen stages' outputs here and reuse them in later runs of the "
                    "same data and views (as the trainer's --cache-dir does)")
    a = ap.parse_args()
    t_start = time.time()
    cfg = json.load(open(os.path.join(a.run, "config.json")))
    tr = cfg["training"]
    la = tr["loss_args"]
    # Training views at the training size, evaluation at the size the model embeds at (they
    # differ when the trainer enlarged the inference size for its random-resized crops).
    size_eval = cfg["preprocess"]["crop"]
    size = int(tr.get("image_size") or size_eval)
    pooling = cfg.get("pooling", "avg")
    dim = cfg["embedding_dim"]
    loss_name = tr["loss"]
    frozen = GROUP_START[stage_index(tr["freeze_until"])]
    views = int(tr.get("cached_views") or 1)
    epochs, p_cls, k_img = int(tr["epochs"]), int(tr["classes_per_batch"]), int(tr["images_per_class"])
    state = os.path.join(a.run, "train_state.json")
    if os.path.exists(state):
        epochs = int(json.load(open(state))["args"]["epochs"])
    lr = float(tr["lr"])
    head_lr = float(tr["head_lr"] if tr["head_lr"] is not None else 10 * lr)
    proxy_lr = float(tr["proxy_lr"] if tr.get("proxy_lr") is not None else 100 * lr)
    warmup_epochs = float((tr.get("plan") or {}).get("warmup_epochs", 0.0))
    crop_scale = float(tr.get("crop_scale", 0.16))
    flip = float(tr.get("flip", 0.5))
    rotate = float(tr.get("rotate", 0.0))
    seed = int(tr.get("seed", 0))
    torch.manual_seed(seed)
    rng = random.Random(seed)
    torch.set_num_threads(a.threads)

    data = load_folder(a.data) if a.dataset == "folder" else load_cub(a.data)
    trp, trl = data["train"]
    if tr.get("duplicates_dropped"):
        trp, trl = drop_duplicates(trp, trl)
    if tr.get("turned_classes"):
        trp, trl = with_turned_classes(trp, trl)
    tep, tel = data["test"]
    ytr, yte = torch.from_numpy(trl), torch.from_numpy(tel)
    model = EfficientNetLite0().load_pth(a.weights).eval()
    stages = model.stages()

    @torch.no_grad()
    def through(x, lo, hi):
        for s in stages[lo:hi]:
            x = s(x)
        return x

    t0 = time.time()
    xte = xtr = None
    cache = None
    if frozen > 0 and a.cache_dir:
        # Everything the cached tensors depend on; the RNG state after caching is kept with
        # them, so that a run reading the cache samples the same batches as one that wrote it.
        key = json.dumps([os.path.abspath(a.data), a.dataset, size, size_eval, frozen, views, crop_scale, flip, rotate,
                          seed, bool(tr.get("turned_classes")), bool(tr.get("duplicates_dropped")),
                          os.path.abspath(a.weights)])
        cache = os.path.join(a.cache_dir, "peer-" + hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt")
        if os.path.exists(cache):
            saved = torch.load(cache)
            xte, xtr = saved["xte"], saved["xtr"]
            rng.setstate(saved["rng"])
    if frozen > 0 and xte is None:
        xte = torch.cat([through(torch.stack([eval_view(p, size_eval) for p in tep[i:i + 32]]), 0, frozen) for i in range(0, len(tep), 32)])
        per_view = []
        for v in range(views):
            def view(p, i=v):
                return eval_view(p, size) if i == 0 else train_view(p, size, crop_scale, rng, flip, rotate)
            per_view.append(torch.cat([through(torch.stack([view(p) for p in trp[i:i + 32]]), 0, frozen) for i in range(0, len(trp), 32)]))
        xtr = torch.stack(per_view)  # [views, n, ...]
        if cache:
            os.makedirs(a.cache_dir, exist_ok=True)
            torch.save({"xte": xte, "xtr": xtr, "rng": rng.getstate()}, cache + ".tmp")
            os.replace(cache + ".tmp", cache)
    cache_s = time.time() - t0

    head = torch.nn.Linear(1280, dim)
    if tr.get("head_init") == "identity":
        with torch.no_grad():
            head.weight.copy_(torch.eye(dim, 1280))
            head.bias.zero_()
    train_stages = torch.nn.ModuleList(stages[frozen:])
    for p in model.parameters():
        p.requires_grad_(False)
    bb = [p for s in train_stages for p in s.parameters()]
    for p in bb:
        p.requires_grad_(True)
    groups = [{"params": bb, "lr": lr, "base": lr}, {"params": list(head.parameters()), "lr": head_lr, "base": head_lr}]
    classes = int(trl.max()) + 1
    proxies = None
    if loss_name in ("proxy-anchor", "norm-softmax"):
        proxies = torch.nn.Parameter(torch.randn(classes, dim))
        groups.append({"params": [proxies], "lr": proxy_lr, "base": proxy_lr})
    opt = torch.optim.Adam(groups, weight_decay=5e-4)

    def pool(x):
        if pooling == "max":
            return x.amax((2, 3))
        if pooling == "avg-max":
            return x.mean((2, 3)) + x.amax((2, 3))
        return x.mean((2, 3))

    def embed(x):
        for s in train_stages:
            x = s(x)
        return F.normalize(head(pool(x)), dim=1)

    def loss_fn(e, y):
        if loss_name == "multi-similarity":
            return multi_similarity(e, y, la["ms_alpha"], la["ms_beta"], la["ms_lambda"], la["ms_epsilon"])
        if loss_name == "proxy-anchor":
            return proxy_anchor(e, y, proxies, la.get("pa_alpha", 32.0), la.get("pa_delta", 0.1))
        if loss_name == "norm-softmax":
            return norm_softmax(e, y, proxies, la.get("softmax_scale", 20.0), la.get("softmax_margin", 0.0))
        if loss_name == "fuzzy":
            return fuzzy_loss(e, y, la["fuzzy_margin"])
        if loss_name == "contrastive":
            return contrastive(e, y, la["contrastive_pos_margin"], la["contrastive_neg_margin"])
        if loss_name == "lifted":
            return lifted(e, y, la["lifted_margin"])
        if loss_name == "batch-all":
            return batch_all(e, y, la["triplet_margin"], la["batch_all_nonzero"])
        if loss_name == "batch-hard":
            return batch_hard(e, y, la["triplet_margin"], la["batch_hard_soft"])
        sys.exit(f"learn_peer.py: loss {loss_name} is not implemented here")

    by_class = {}
    for i, l in enumerate(trl):
        by_class.setdefault(int(l), []).append(i)
    hard = int(tr.get("hard_classes") or 1)
    cents = {}
    groups = class_groups(sorted(by_class), p_cls, hard, cents, rng)
    per_epoch = max(len(trl) // (p_cls * k_img), 1)
    total = per_epoch * epochs
    warmup = round(warmup_epochs * per_epoch)
    step, t_train, r = 0, 0.0, {}
    for epoch in range(epochs):
        t1 = time.time()
        losses = []
        # Planned at the epoch's start, as the trainer plans (and prefetches) an epoch.
        plan = [next(groups) for _ in range(per_epoch)]
        for classes in plan:
            idx = []
            for c in classes:
                members = by_class[c]
                idx += rng.sample(members, k_img) if len(members) >= k_img else rng.choices(members, k=k_img)
            f = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(total - warmup, 1))))
            for g in opt.param_groups:
                g["lr"] = g["base"] * f
            if xtr is None:
                x = torch.stack([train_view(trp[i], size, crop_scale, rng, flip, rotate) for i in idx])
            else:
                x = xtr[torch.randint(0, views, (len(idx),)), torch.tensor(idx)]
            e = embed(x)
            if hard > 1:
                with torch.no_grad():
                    for c in set(int(l) for l in ytr[idx]):
                        m = e[ytr[idx] == c].mean(0)
                        cents[c] = m / m.norm()
            loss = loss_fn(e, ytr[idx])
            opt.zero_grad()
            if loss.requires_grad:
                loss.backward()
                opt.step()
            losses.append(loss.item())
            step += 1
        t_train += time.time() - t1
        print(f"epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}, {per_epoch * p_cls * k_img / (time.time() - t1):.1f} img/s", file=sys.stderr)
    with torch.no_grad():
        if xte is None:
            e = torch.cat([embed(torch.stack([eval_view(p, size_eval) for p in tep[i:i + 64]])) for i in range(0, len(tep), 64)])
        else:
            e = torch.cat([embed(xte[i:i + 256]) for i in range(0, len(xte), 256)])
        # A multi-scale model (`--extra-sizes`): each extra view resampled from the main eval
        # view (decoded once for all sizes), the normalised vectors summed and normalised
        # again, as the trainer embeds.
        extras = cfg["preprocess"].get("extra_sizes", [])
        if extras:
            parts = []
            for i in range(0, len(tep), 64):
                mains = [open_image(*as_item(p)).resize((size_eval, size_eval), Image.BILINEAR) for p in tep[i:i + 64]]
                parts.append(sum(embed(through(torch.stack([to_tensor(m.resize((x, x), Image.BILINEAR)) for m in mains]), 0, frozen))
                                 for x in extras))
            e = F.normalize(e + torch.cat(parts), dim=1)
        r = recall_at(e, yte, [1, 2, 4, 8])
    out = {"peer": f"pytorch {torch.__version__}", "run": a.run, "loss": loss_name, "image_size": size, "inference_size": size_eval, "pooling": pooling, "freeze_until_block": frozen,
           "epochs": epochs, "cached_views": views, "rotate": rotate, "turned_classes": bool(tr.get("turned_classes")), "extra_sizes": extras, "cache_seconds": cache_s, "train_seconds": t_train,
           "total_seconds": time.time() - t_start, **r}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
