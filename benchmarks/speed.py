"""Seconds per training iteration of LocalLearner on this machine (issue #2 protocol).

ResNet-32, K=16 (MAN++ stem module), batch 128, 3x32x32 random data; each step = train_step +
SGD step. Reports the median over `--iters` iterations after `--warmup` warm-up iterations, all
methods measured in one process, one after another.

    python benchmarks/speed.py [--iters 10] [--warmup 3] [--channels-last] [--compile] [--methods e2e dgl+manpp infopro+manpp]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import manlearn


def parse_method(spec: str) -> dict:
    if "+" in spec:
        base, method = spec.split("+")
        return dict(method=method, base=base)
    return dict(method=spec)


def time_method(spec: str, args) -> dict:
    torch.manual_seed(0)
    learner = manlearn.LocalLearner(model=args.model, K=args.K, num_classes=10, in_channels=3, image_size=32,
                                    channels_last=args.channels_last, **parse_method(spec))
    if args.compile:
        learner.compile_parts()
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1, momentum=0.9,
                          nesterov=True, weight_decay=1e-4, foreach=True)
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 10, (args.batch,))
    times, first = [], None
    for i in range(args.warmup + args.iters):
        t0 = time.perf_counter()
        learner.train_step(x, y)
        opt.step()
        dt = time.perf_counter() - t0
        first = dt if first is None else first
        if i >= args.warmup:
            times.append(dt)
    return dict(method=spec, K=learner.K, median_s_per_it=statistics.median(times), min_s=min(times),
                max_s=max(times), iters=args.iters, first_step_s=first)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet32")
    ap.add_argument("--K", type=int, default=16)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile blocks, auxes and head (warm-up includes compilation)")
    ap.add_argument("--methods", nargs="+", default=["e2e", "dgl+manpp", "infopro+manpp"])
    ap.add_argument("--json", action="store_true", help="print one JSON line per method")
    args = ap.parse_args()
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {platform.processor() or platform.machine()}, "
          f"channels_last={args.channels_last}, compile={args.compile}, batch {args.batch}, {args.model} K={args.K}")
    for spec in args.methods:
        r = time_method(spec, args)
        print(json.dumps(r) if args.json else
              f"{r['method']:>16}  K={r['K']:<3} median {r['median_s_per_it']:.3f} s/it  "
              f"(min {r['min_s']:.3f}, max {r['max_s']:.3f}, n={r['iters']}; first step {r['first_step_s']:.1f} s)",
              flush=True)


if __name__ == "__main__":
    main()
