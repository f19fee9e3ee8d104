"""Shared plumbing of the peer benchmarks: arguments, synthetic inputs, per-phase child
processes (so each phase's peak RSS is its own, like `trainer bench`), median timing."""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np


def parse_args(phases):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", required=True, help="the trainer's weight file (EfficientNet-Lite0 .pth, "
                    "or a transformer's published-layout .safetensors)")
    ap.add_argument("--backbone", default="efficientnet-lite0",
                    choices=["efficientnet-lite0", "dinov2-vits14", "dinov2-vitb14", "clip-vitb16"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=5, help="timed runs after one warm-up (median reported)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--phase", choices=phases, help="internal: run one phase in this process")
    return ap.parse_args()


def input_batch(batch, size):
    """Deterministic normalised images in [-1, 1], like the trainer's bench."""
    rng = np.random.default_rng(7)
    return rng.uniform(-1.0, 1.0, size=(batch, 3, size, size)).astype(np.float32)


def time_median(iters, fn):
    fn()
    times = []
    for _ in range(max(iters, 1)):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mib():
    # ru_maxrss is in KiB on Linux: the same figure as VmHWM.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def print_phase(phase, seconds, batch):
    print(json.dumps({"phase": phase, "seconds": seconds, "batch": batch, "rss_mib": peak_rss_mib()}), flush=True)


def run_phases(script, args, phases, engine):
    """Runs each phase of `script` in a child process and prints the engine's JSON line."""
    fig = {"engine": engine, "threads": args.threads}
    for phase in phases:
        cmd = [sys.executable, script, "--weights", args.weights, "--backbone", args.backbone,
               "--threads", str(args.threads),
               "--batch", str(args.batch), "--iters", str(args.iters), "--size", str(args.size), "--phase", phase]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        print(f"{engine} {phase}: {r['seconds'] * 1e3:.1f} ms per batch of {r['batch']}, "
              f"peak RSS {r['rss_mib']:.0f} MiB", file=sys.stderr)
        if phase == "embed1":
            fig["latency_ms"], fig["embed1_rss_mib"] = r["seconds"] * 1e3, r["rss_mib"]
        elif phase == "embed":
            fig["embed_img_s"], fig["embed_rss_mib"] = r["batch"] / r["seconds"], r["rss_mib"]
        else:
            fig["train_img_s"], fig["train_rss_mib"] = r["batch"] / r["seconds"], r["rss_mib"]
    print(json.dumps(fig), flush=True)
