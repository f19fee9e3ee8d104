"""Does re-estimating BatchNorm statistics on the target data (AdaBN) help the pretrained metric?

Measures test-split Recall@1 of the bare pretrained EfficientNet-Lite0 features (global average
pool, L2) at one input size, first with ImageNet's BN statistics, then with every BN layer's
running statistics re-estimated (cumulative average) over the training split's eval views. It
answers whether `--bn train` / BN adaptation is worth its cost on a dataset before training
anything (bench/RESULTS-learning.md).

    python3 bench/peers/bn_adapt_probe.py --data ../shared/data/omniglot --size 128
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from efficientnet_lite0 import EfficientNetLite0  # noqa: E402
from learn_peer import eval_view, load_cub, load_folder  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dataset", choices=["folder", "cub"], default="folder")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--weights", default=os.path.join(os.path.dirname(__file__), "../../../shared/models/efficientnet-lite0/efficientnet-lite0-57934424.pth"))
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    data = load_folder(a.data) if a.dataset == "folder" else load_cub(a.data)
    trp, _ = data["train"]
    tep, tel = data["test"]
    model = EfficientNetLite0().load_pth(a.weights).eval()

    def forward(paths, batch=64):
        out = []
        with torch.no_grad():
            for i in range(0, len(paths), batch):
                h = torch.stack([eval_view(p, a.size) for p in paths[i:i + batch]])
                for s in model.stages():
                    h = s(h)
                out.append(F.normalize(h.mean((2, 3)), dim=1))
        return torch.cat(out)

    def recall1(e, y):
        s = e @ e.T
        s.fill_diagonal_(-9.0)
        y = torch.from_numpy(y)
        return (y[s.argmax(1)] == y).float().mean().item()

    before = recall1(forward(tep), tel)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
            m.train()
    order = np.random.RandomState(0).permutation(len(trp))
    forward([trp[j] for j in order], batch=80)
    model.eval()
    after = recall1(forward(tep), tel)
    print(f"R@1 at {a.size} px: ImageNet BN statistics {100 * before:.2f}, re-estimated on the training split {100 * after:.2f}")


if __name__ == "__main__":
    main()
