#!/usr/bin/env python3
"""hnswlib peer for the Deep Metric indexer.

Runs hnswlib on vectors exported by `indexer export-vectors` (.npy or .fvecs) with the same
M / ef_construction / ef sweep as `indexer bench`, and prints, per ef, recall of the exact
top-10 (the query itself excluded, as in `indexer bench`) and single-thread QPS, then the
QPS at equal recall@10 for each target recall.

    pip install hnswlib numpy
    indexer export-vectors --index IDX --out vectors.npy
    python bench/peers/hnsw_peer.py vectors.npy --m 16 --ef-construction 200 \
        --ef-search 16,32,64,128,256 [--queries 1000] [--json out.json]

With --queries-file Q.npy (held-out queries, as `indexer bench-synthetic --dir D` writes to
D/queries.npy) the queries are those rows and recall is of the exact top-10 over all vectors,
as `indexer bench-synthetic` measures it.

Queries run as one knn_query call on one thread (num_threads=1), so the QPS is hnswlib's C++
search loop without a Python call per query: the strictest figure to compare against.

Vectors are L2-normalised, so hnswlib's 'l2' space ranks exactly as the indexer does.
"""
import argparse
import json
import sys
import time

import numpy as np


def read_vectors(path):
    if path.endswith(".npy"):
        return np.load(path).astype(np.float32, copy=False)
    if path.endswith(".fvecs"):
        raw = np.fromfile(path, dtype=np.int32)
        if raw.size == 0:
            sys.exit(f"{path}: empty file")
        dim = int(raw[0])
        if raw.size % (dim + 1):
            sys.exit(f"{path}: size is not a multiple of {dim + 1} words; truncated .fvecs?")
        return raw.reshape(-1, dim + 1)[:, 1:].copy().view(np.float32)
    sys.exit(f"{path}: expected a .npy or .fvecs file")


def exact_top10(data, queries_idx):
    """Exact top-10 of each query row among all rows, the query itself excluded."""
    out = []
    for start in range(0, len(queries_idx), 256):
        idx = queries_idx[start:start + 256]
        sims = data[idx] @ data.T
        sims[np.arange(len(idx)), idx] = -np.inf
        top = np.argpartition(-sims, 10, axis=1)[:, :10]
        out.extend(set(row) for row in top)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vectors")
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--ef-construction", type=int, default=200)
    ap.add_argument("--ef-search", default="16,32,64,128,256")
    ap.add_argument("--queries", type=int, default=1000, help="rows used as queries (all if fewer)")
    ap.add_argument("--threads", type=int, default=0, help="build threads (0 = all cores)")
    ap.add_argument("--targets", default="0.9,0.95,0.99", help="recall@10 levels to compare QPS at")
    ap.add_argument("--queries-file", help="held-out queries (.npy/.fvecs) instead of rows of the data")
    ap.add_argument("--json")
    ap.add_argument("--save-index", help="write the built index here (hnswlib's own format)")
    ap.add_argument("--load-index", help="search an index --save-index wrote instead of building one "
                    "(query-only sweeps, to interleave with the indexer's --reuse runs)")
    args = ap.parse_args()
    try:
        import hnswlib
    except ImportError:
        sys.exit("hnswlib is not installed: pip install hnswlib numpy")

    data = read_vectors(args.vectors)
    n, dim = data.shape
    norms = np.linalg.norm(data, axis=1, keepdims=True)
    data = data / np.maximum(norms, 1e-12)
    if args.queries_file:
        queries = read_vectors(args.queries_file)
        queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
        k, self_ids = 10, None
    else:
        rng = np.random.default_rng(0)
        q_idx = np.sort(rng.choice(n, size=min(args.queries, n), replace=False))
        queries = data[q_idx]
        k, self_ids = 11, q_idx

    index = hnswlib.Index(space="l2", dim=dim)
    if args.load_index:
        index.load_index(args.load_index, max_elements=n)
        build_s = None
    else:
        t = time.perf_counter()
        index.init_index(max_elements=n, M=args.m, ef_construction=args.ef_construction, random_seed=100)
        index.add_items(data, np.arange(n), num_threads=args.threads or -1)
        build_s = time.perf_counter() - t
        if args.save_index:
            index.save_index(args.save_index)
    index.set_num_threads(1)

    # The timed sweeps first and the exact truth afterwards (as `indexer bench-synthetic`
    # does), so two searchers started together sweep in the same minutes of the machine.
    swept = []
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    for ef in [int(x) for x in args.ef_search.split(",")]:
        index.set_ef(max(ef, k))
        t = time.perf_counter()
        labels, _ = index.knn_query(queries, k=k, num_threads=1)
        swept.append((ef, labels, time.perf_counter() - t))
    if self_ids is None:
        # In blocks of queries: one 1,000 × n similarity matrix would be 8 GB at 2M rows.
        truth = []
        for at in range(0, len(queries), 64):
            sims = queries[at : at + 64] @ data.T
            truth.extend(set(row) for row in np.argpartition(-sims, 10, axis=1)[:, :10])
    else:
        truth = exact_top10(data, self_ids)
    rows = []
    for ef, labels, secs in swept:
        found = 0
        for i, tr in enumerate(truth):
            got = [int(j) for j in labels[i] if self_ids is None or j != self_ids[i]][:10]
            found += len(tr.intersection(got))
        rows.append({"ef": ef, "recall@10": found / (10 * len(truth)), "qps": len(truth) / secs})

    print(f"## hnswlib {getattr(hnswlib, '__version__', '')}: {n} x {dim}, M = {args.m}, ef_construction = {args.ef_construction}\n")
    if build_s is None:
        print(f"build: loaded {args.load_index}\n")
    else:
        print(f"build: {build_s:.2f} s ({n / build_s:.0f} vectors/s)\n")
    print("| ef | recall@10 | QPS (1 thread) |\n|---:|---:|---:|")
    for r in rows:
        print(f"| {r['ef']} | {r['recall@10']:.4f} | {r['qps']:.0f} |")
    print("\n| recall@10 target | QPS (smallest ef reaching it) |\n|---:|---:|")
    result = {"n": n, "dim": dim, "m": args.m, "ef_construction": args.ef_construction, "build_seconds": build_s}
    for target in [float(x) for x in args.targets.split(",")]:
        hit = next((r for r in rows if r["recall@10"] >= target), None)
        print(f"| {target} | {hit['qps']:.0f} (ef {hit['ef']}) |" if hit else f"| {target} | not reached |")
        if hit:
            result[f"qps_at_recall_{target}"] = hit["qps"]
    # Peak resident set of this process (Linux reports KiB): the data, ground truth and index.
    import resource
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"\npeak RSS: {result['peak_rss_bytes'] / 2**20:.0f} MiB")
    for r in rows:
        result[f"sweep.ef{r['ef']}.recall@10"] = r["recall@10"]
        result[f"sweep.ef{r['ef']}.qps"] = r["qps"]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
