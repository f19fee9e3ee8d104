"""ONNX Runtime peer of `trainer bench`: EfficientNet-Lite0 (same .pth), or with `--backbone`
a transformer from the same safetensors (built as bench_torch.py does), exported to ONNX
(opset 17, dynamic batch) into a temporary directory, then run by ORT's CPU provider with all
graph optimisations (BN folding, conv+activation fusion).

Phases (each in its own process, peak RSS per phase): embed1 / embed = pooled features at
batch 1 / --batch, L2-normalised in numpy. ORT cannot train, so there is no train phase.
Threads: intra_op_num_threads=--threads, inter_op 1, sequential execution. Prints one JSON line.

    python3 bench/peers/bench_ort.py --weights efficientnet-lite0-57934424.pth
"""
import os
import sys
import tempfile

import numpy as np
import onnxruntime as ort
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import input_batch, parse_args, print_phase, run_phases, time_median  # noqa: E402
from efficientnet_lite0 import EfficientNetLite0  # noqa: E402

PHASES = ["embed1", "embed"]


class Features(torch.nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.features(x)


def export(args, path):
    if args.backbone == "efficientnet-lite0":
        m = Features(EfficientNetLite0().load_pth(args.weights).eval())
    else:
        from vit_models import load_vit
        m = load_vit(args.backbone, args.weights, args.size).eval()
    x = torch.zeros(1, 3, args.size, args.size)
    torch.onnx.export(m, (x,), path, input_names=["x"], output_names=["f"],
                      dynamic_axes={"x": {0: "b"}, "f": {0: "b"}}, opset_version=17, dynamo=False)


def embed(args, batch):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "efficientnet_lite0.onnx")
        export(args, path)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    x = input_batch(batch, args.size)

    def step():
        f = sess.run(None, {"x": x})[0]
        f / np.linalg.norm(f, axis=1, keepdims=True)

    return time_median(args.iters, step)


def main():
    args = parse_args(PHASES)
    if args.phase is None:
        run_phases(os.path.abspath(__file__), args, PHASES, f"ONNX Runtime {ort.__version__}")
    else:
        b = 1 if args.phase == "embed1" else args.batch
        print_phase(args.phase, embed(args, b), b)


if __name__ == "__main__":
    main()
