"""PyTorch peer of trainer/examples/cuda_bench.rs: EfficientNet-Lite0 embed and train-step
throughput on one GPU, same batch, input size and step definition, one JSON line out.

Train step: BatchNorm frozen (eval mode, the metric-learning protocol), forward, pooled and
L2-normalised embedding, loss = sum(embedding * fixed random target), backward through the
whole network, AdamW update. Weights are random, as in the Rust bench.

--bf16: autocast to bfloat16 (the weights and AdamW state stay float32, as master weights),
the reference the issue's speed goal is measured against.

    python3 bench/peers/cuda_bench.py --batch 128 [--channels-last] [--bf16] [--iters 10]
"""
import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from efficientnet_lite0 import EfficientNetLite0  # noqa: E402


def timed(fn, iters, batch):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return batch * iters / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast, float32 master weights")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: PyTorch sees no CUDA device")
    torch.backends.cudnn.benchmark = True
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    dev = torch.device("cuda")
    model = EfficientNetLite0().to(dev).to(memory_format=fmt).eval()  # eval: frozen BN
    x = torch.randn(a.batch, 3, a.size, a.size, device=dev).to(memory_format=fmt)

    def embed():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=a.bf16):
            return F.normalize(model.features(x), dim=1)

    with torch.no_grad():
        embed_ips = timed(embed, a.iters, a.batch)

    target = torch.randn(a.batch, 1280, device=dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        (embed().float() * target).sum().backward()
        opt.step()

    train_ips = timed(step, a.iters, a.batch)
    print(json.dumps({
        "impl": "pytorch-" + torch.__version__ + ("-channels-last" if a.channels_last else "")
        + ("-bf16" if a.bf16 else ""),
        "device": torch.cuda.get_device_name(),
        "model": "efficientnet-lite0",
        "batch": a.batch,
        "size": a.size,
        "iters": a.iters,
        "embed_images_per_sec": embed_ips,
        "train_images_per_sec": train_ips,
    }))


if __name__ == "__main__":
    main()
