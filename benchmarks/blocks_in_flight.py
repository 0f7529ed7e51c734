"""Blocks in flight (issue #17): s/iter and peak activation memory of the sequential step vs the overlapped
step (manlearn.concurrency) with 2 and 3 blocks in flight, stepped interleaved in one run.

    .venv/bin/python benchmarks/blocks_in_flight.py [--methods dgl+manpp infopro+manpp] [--K 16]
        [--batch 128] [--iters 8] [--warmup 2]

One iteration = train_step + SGD step (Nesterov, multi-tensor), ResNet-32, channels-last, random data;
all learners are built first and stepped round-robin, so machine-speed drift hits them alike; median of
the timed rounds. Memory: the activations kept for backward at the step's peak (the tracker of
manlearn.memory), measured in one extra step per learner. Rows: benchmarks/results/blocks_in_flight.jsonl.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from manlearn import LocalLearner  # noqa: E402
from manlearn.bench.common import append_rows, environment, parse_method  # noqa: E402
from manlearn.memory import PeakMemory  # noqa: E402


def build(spec: str, K: int, n: int):
    torch.manual_seed(0)
    learner = LocalLearner("resnet32", K=K, channels_last=True, blocks_in_flight=n, **parse_method(spec))
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          nesterov=True, weight_decay=1e-4, foreach=True)
    return learner, opt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["dgl+manpp", "infopro+manpp"])
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--in-flight", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "blocks_in_flight.jsonl")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.batch,), generator=g)
    built = {(m, n): build(m, args.K, n) for m in args.methods for n in args.in_flight}
    times = {key: [] for key in built}
    for i in range(args.warmup + args.iters):
        for key, (learner, opt) in built.items():
            t0 = time.perf_counter()
            learner.train_step(x, y)
            opt.step()
            if i >= args.warmup:
                times[key].append(time.perf_counter() - t0)
    env = environment("cpu")
    rows = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, K={args.K}")
    for (m, n), (learner, opt) in built.items():
        with PeakMemory("cpu", exclude=[*learner.parameters(), *learner.buffers()]) as pm:
            learner.train_step(x, y)
        med = statistics.median(times[(m, n)])
        seq = statistics.median(times[(m, 1)]) if (m, 1) in times else med
        row = dict(model="resnet32", method=m, K=learner.K, batch=args.batch, blocks_in_flight=n,
                   median_s_per_it=med, min_s=min(times[(m, n)]), speedup_vs_sequential=seq / med,
                   activation_peak_MiB=pm.peak_activation_bytes / 2**20, iters=args.iters, warmup=args.warmup, **env)
        rows.append(row)
        print(f"{m:>14} in flight {n}: {med:.3f} s/it  x{row['speedup_vs_sequential']:.2f} vs sequential  "
              f"activations {row['activation_peak_MiB']:.1f} MiB", flush=True)
    append_rows(args.results, rows)


if __name__ == "__main__":
    main()
