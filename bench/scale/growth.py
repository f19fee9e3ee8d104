#!/usr/bin/env python3
"""Growth of the indexer with the catalogue size, beside hnswlib (issue 15).

Two steps, so the measured figures live in the repository and the picture can be redrawn
from them without rerunning anything:

    # after bench/scale/growth-run.sh DIR N:TAG ... has run (ours and hnswlib per size)
    python3 bench/scale/growth.py collect DIR --out bench/scale/growth-512d.json
    python3 bench/scale/growth.py plot bench/scale/growth-512d.json --out bench/scale/growth-512d.svg

`collect` reads, per size TAG, what growth-run.sh leaves in DIR:
  json/synthetic-TAG-512d-mmap.json        ours: build + commit + reopen + queries
  json/synthetic-TAG-512d-mmap-reuse.json  ours: a search process (reopen + queries only)
  json/synthetic-TAG-512d-hnswlib.json     hnswlib on the same vectors and queries
  {ours,reuse,hnswlib}-TAG.err             `/usr/bin/time -v` of each process (peak RSS)
and writes one row per size and engine: build seconds, peak RSS of the building and of the
searching process, bytes on disk, and the single-thread QPS at recall@10 0.95 and 0.99 (the
smallest swept ef reaching it, as both benchmarks report it).

`plot` needs matplotlib (pip install matplotlib).
"""

import argparse
import json
import re
import sys
from pathlib import Path

TARGETS = (0.95, 0.99)


def peak_rss(path: Path):
    """Maximum resident set size in bytes from a `/usr/bin/time -v` log, or None."""
    if not path.exists():
        return None
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text(errors="replace"))
    return int(m.group(1)) * 1024 if m else None


def sweep(result: dict):
    """[(ef, recall@10, qps)] of a benchmark JSON, ef ascending (ours' int8 walk or hnswlib)."""
    rows = []
    for key, value in result.items():
        m = re.fullmatch(r"sweep\.ef(\d+)\.recall@10", key)
        if m:
            ef = int(m.group(1))
            rows.append((ef, value, result[f"sweep.ef{ef}.qps"]))
    return sorted(rows)


def qps_at(rows, target):
    hit = next(((ef, r, q) for ef, r, q in rows if r >= target), None)
    return None if hit is None else {"ef": hit[0], "recall@10": hit[1], "qps": hit[2]}


def collect(args):
    d = Path(args.dir)
    out = []
    for path in sorted((d / "json").glob("synthetic-*-512d-mmap.json")):
        tag = path.name[len("synthetic-"): -len("-512d-mmap.json")]
        ours = json.loads(path.read_text())
        row = {
            "n": ours["n"],
            "engine": "deep-metric (int8 walk + f32 re-rank)",
            "build_seconds": ours["build_seconds"],
            "index_bytes": ours["index_bytes"],
            "peak_rss_build_bytes": peak_rss(d / f"ours-{tag}.err"),
            "peak_rss_search_bytes": peak_rss(d / f"reuse-{tag}.err"),
            "max_recall@10": max(r for _, r, _ in sweep(ours)),
        }
        for t in TARGETS:
            row[f"at_recall_{t}"] = qps_at(sweep(ours), t)
        out.append(row)
        peer = d / "json" / f"synthetic-{tag}-512d-hnswlib.json"
        if peer.exists():
            h = json.loads(peer.read_text())
            row = {
                "n": h["n"],
                "engine": "hnswlib",
                "build_seconds": h["build_seconds"],
                "index_bytes": None,
                # One Python process builds and searches, holding the data and the truth too.
                "peak_rss_build_bytes": peak_rss(d / f"hnswlib-{tag}.err"),
                "peak_rss_search_bytes": None,
                "max_recall@10": max(r for _, r, _ in sweep(h)),
            }
            for t in TARGETS:
                row[f"at_recall_{t}"] = qps_at(sweep(h), t)
            out.append(row)
    if not out:
        sys.exit(f"no json/synthetic-*-512d-mmap.json under {d}")
    out.sort(key=lambda r: (r["n"], r["engine"]))
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{len(out)} rows -> {args.out}")


def plot(args):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("plot needs matplotlib: pip install matplotlib")
    rows = json.loads(Path(args.growth).read_text())
    engines = sorted({r["engine"] for r in rows})
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = [
        ("build, 2 threads (s)", lambda r: r["build_seconds"]),
        ("QPS at recall@10 ≥ 0.95 / ≥ 0.99 (1 thread)", None),
        ("peak RSS (GiB)", None),
    ]
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xscale("log")
        ax.set_xlabel("vectors (512-d)")
        ax.grid(True, which="both", alpha=0.3)
    for engine in engines:
        rs = sorted((r for r in rows if r["engine"] == engine), key=lambda r: r["n"])
        n = [r["n"] for r in rs]
        axes[0].plot(n, [r["build_seconds"] for r in rs], "o-", label=engine)
        for t, style in zip(TARGETS, ("o-", "s--")):
            pts = [(r["n"], r[f"at_recall_{t}"]["qps"]) for r in rs if r[f"at_recall_{t}"]]
            if pts:
                axes[1].plot(*zip(*pts), style, label=f"{engine}, {t}")
        for key, style, what in (
            ("peak_rss_build_bytes", "o-", "build"),
            ("peak_rss_search_bytes", "s--", "search process"),
        ):
            pts = [(r["n"], r[key] / 2**30) for r in rs if r.get(key)]
            if pts:
                axes[2].plot(*zip(*pts), style, label=f"{engine}, {what}")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.suptitle("Deep Metric indexer vs hnswlib, synthetic 512-d (M 16, ef_construction 200)")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"-> {args.out}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect", help="gather a growth run's figures into one JSON")
    c.add_argument("dir")
    c.add_argument("--out", required=True)
    p = sub.add_parser("plot", help="draw the growth picture (SVG) from collect's JSON")
    p.add_argument("growth")
    p.add_argument("--out", required=True)
    args = ap.parse_args()
    {"collect": collect, "plot": plot}[args.cmd](args)


if __name__ == "__main__":
    main()
