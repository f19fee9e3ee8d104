"""PyTorch peer of `trainer bench`: EfficientNet-Lite0 (same .pth) on CPU, or with
`--backbone dinov2-vits14|dinov2-vitb14|clip-vitb16` that transformer from the same
published-layout safetensors (timm's DINOv2, open_clip's CLIP tower; see vit_models.py), its
pooled feature being the class token (CLIP: projected).

Phases (each in its own process, peak RSS per phase):
  embed1 / embed  inference at batch 1 / --batch, channels-last, torch.inference_mode,
                  pooled features L2-normalised (the trainer's Embedder output);
  train           one step at --batch: all layers trainable, BN frozen (eval mode: running
                  statistics, affine trained), 1280→512 linear head, the fuzzy metric loss on
                  8 classes × 4, Adam.
Threads: torch.set_num_threads(--threads), interop 1; the trainer also exports
OMP_NUM_THREADS/MKL_NUM_THREADS=--threads. Prints one JSON line.

    python3 bench/peers/bench_torch.py --weights efficientnet-lite0-57934424.pth
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import input_batch, parse_args, print_phase, run_phases, time_median  # noqa: E402
from efficientnet_lite0 import EfficientNetLite0  # noqa: E402
from train_peer import fuzzy_loss  # noqa: E402

PHASES = ["embed1", "embed", "train"]


class CnnFeatures(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.features(x)


def model(args):
    """(pooled-feature module, feature width, channels-last?) of --backbone."""
    if args.backbone != "efficientnet-lite0":
        from vit_models import feature_dim, load_vit
        return load_vit(args.backbone, args.weights, args.size).eval(), feature_dim(args.backbone), False
    m = EfficientNetLite0().load_pth(args.weights)
    m.fc = torch.nn.Identity()
    return CnnFeatures(m.eval()), 1280, True


def embed(args, batch):
    m, _, cl = model(args)
    x = torch.from_numpy(input_batch(batch, args.size))
    if cl:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            F.normalize(m(x), dim=1).numpy()

    return time_median(args.iters, step)


def train(args):
    m, width, _ = model(args)  # eval(): BN uses running statistics (frozen), weights still train
    head = torch.nn.Linear(width, 512)
    with torch.no_grad():
        head.weight.copy_(torch.eye(512, width))
        head.bias.zero_()
    opt = torch.optim.Adam([{"params": m.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 1e-3}])
    x = torch.from_numpy(input_batch(args.batch, args.size))
    labels = torch.arange(args.batch) % 8

    def step():
        opt.zero_grad(set_to_none=True)
        emb = F.normalize(head(m(x)), dim=1)
        loss = fuzzy_loss(emb, labels, 0.1)
        loss.item()
        loss.backward()
        opt.step()

    return time_median(args.iters, step)


def main():
    args = parse_args(PHASES)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    if args.phase is None:
        run_phases(os.path.abspath(__file__), args, PHASES, f"PyTorch {torch.__version__}")
    elif args.phase == "embed1":
        print_phase("embed1", embed(args, 1), 1)
    elif args.phase == "embed":
        print_phase("embed", embed(args, args.batch), args.batch)
    else:
        print_phase("train", train(args), args.batch)


if __name__ == "__main__":
    main()
