"""Every loss under one recipe, ours beside PyTorch: the table of bench/RESULTS-learning.md.

Runs `trainer` once per loss with the same recipe (the arguments after `--`, e.g. a
`--time-budget` or a fixed schedule), then, with `--peer`, re-runs each run's recorded recipe
in PyTorch (`bench/peers/learn_peer.py`, same data, weights, schedule and loss). Each finished
row is appended to OUT/table.jsonl (so an interrupted table resumes where it stopped) and the
table is printed as Markdown.

    export DEEP_METRIC_WEIGHTS=../shared/models/efficientnet-lite0/efficientnet-lite0-57934424.pth
    python3 bench/learning_table.py --dataset folder --data ../shared/data/omniglot \\
        --out runs/table-omniglot-5m --peer -- --time-budget 5m
"""
import argparse
import json
import os
import subprocess
import sys
import time

LOSSES = ["multi-similarity", "fuzzy", "contrastive", "lifted", "batch-all", "batch-hard",
          "proxy-anchor", "norm-softmax"]
HERE = os.path.dirname(os.path.abspath(__file__))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_ours(a, loss, recipe):
    out = os.path.join(a.out, loss)
    if os.path.exists(os.path.join(out, "config.json")):
        sys.exit(f"{out} already holds a run; remove it or choose another --out")
    cmd = [a.trainer, "train", "--dataset", a.dataset, "--data", a.data, "--out", out,
           "--loss", loss, *recipe]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    print("+", " ".join(cmd), file=sys.stderr)
    t = time.time()
    with open(out + ".log", "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    wall = time.time() - t
    if rc != 0:
        return {"loss": loss, "error": f"trainer exited {rc}; see {out}.log"}
    lines = read_jsonl(os.path.join(out, "metrics.jsonl"))
    last = [l for l in lines if l.get("model") != "pretrained"][-1]
    base = lines[0]
    return {"loss": loss, "epochs": last["epoch"], "r1": last["recall@1"], "r8": last["recall@8"],
            "map_r": last["map@r"], "nmi": last["nmi"], "pretrained_r1": base["recall@1"],
            "wall_s": wall}


def run_peer(a, loss):
    out = os.path.join(a.out, loss)
    cmd = [sys.executable, os.path.join(HERE, "peers", "learn_peer.py"), "--run", out,
           "--data", a.data, "--dataset", a.dataset]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    if a.peer_cache:
        cmd += ["--cache-dir", a.peer_cache]
    print("+", " ".join(cmd), file=sys.stderr)
    with open(out + ".peer.log", "w") as log:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    if p.returncode != 0:
        return {"peer_error": f"learn_peer.py exited {p.returncode}; see {out}.peer.log"}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"peer_r1": r["recall@1"], "peer_r8": r["recall@8"], "peer_wall_s": r["total_seconds"]}


def write_rows(table, rows):
    """Rewrites table.jsonl atomically (a row gained its peer's figures)."""
    tmp = table + ".tmp"
    with open(tmp, "w") as f:
        for r in rows.values():
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, table)


def fmt(row):
    def pct(k):
        return f"{100 * row[k]:.2f}" if k in row else "–"

    def secs(k):
        return f"{row[k]:.0f} s" if k in row else "–"

    if "error" in row:
        return f"| {row['loss']} | {row['error']} |||||||||"
    return (f"| {row['loss']} | {row['epochs']} | {pct('r1')} | {pct('r8')} | {pct('map_r')} | "
            f"{pct('nmi')} | {secs('wall_s')} | {pct('peer_r1')} | {pct('peer_r8')} | {secs('peer_wall_s')} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["folder", "cub"], required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True, help="a directory for the runs and table.jsonl")
    ap.add_argument("--losses", default=",".join(LOSSES), help="comma-separated (default: all eight)")
    ap.add_argument("--trainer", default=os.path.join(HERE, "..", "target", "debug", "trainer"))
    ap.add_argument("--peer", action="store_true", help="also run the PyTorch peer of each run")
    ap.add_argument("--threads", type=int, default=0, help="threads for both (default: all cores)")
    ap.add_argument("--peer-cache", help="the peer's --cache-dir: its frozen activations, reused across losses")
    ap.add_argument("recipe", nargs=argparse.REMAINDER, help="-- then the trainer's recipe flags")
    a = ap.parse_args()
    recipe = a.recipe[1:] if a.recipe[:1] == ["--"] else a.recipe
    os.makedirs(a.out, exist_ok=True)
    table = os.path.join(a.out, "table.jsonl")
    done = {r["loss"]: r for r in read_jsonl(table)} if os.path.exists(table) else {}
    for loss in a.losses.split(","):
        if loss in done:
            row = done[loss]
            if a.peer and "error" not in row and "peer_r1" not in row and "peer_error" not in row:
                # A row finished without its peer (an earlier table ran without --peer).
                row.update(run_peer(a, loss))
                write_rows(table, done)
                print(fmt(row), file=sys.stderr)
            continue
        row = run_ours(a, loss, recipe)
        if a.peer and "error" not in row:
            row.update(run_peer(a, loss))
        row["recipe"] = " ".join(recipe)
        with open(table, "a") as f:
            f.write(json.dumps(row) + "\n")
        done[loss] = row
        print(fmt(row), file=sys.stderr)
    print("| loss | epochs | R@1 | R@8 | MAP@R | NMI | wall | PyTorch R@1 | PyTorch R@8 | PyTorch wall |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = next((r["pretrained_r1"] for r in done.values() if "pretrained_r1" in r), None)
    for loss in a.losses.split(","):
        print(fmt(done[loss]))
    if base is not None:
        print(f"\npretrained R@1 (same input size and pooling): {100 * base:.2f}")


if __name__ == "__main__":
    main()
