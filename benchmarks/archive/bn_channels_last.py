"""Issue #17, item 2: torch's CPU batch norm at the heads' shapes, channels-last vs NCHW, 1 vs 2 threads.

The heads' profile (``benchmarks/heads_profile.py``) puts 30 % of InfoPro+MAN++'s head time in one
op: the decoder's ``BatchNorm2d(12)`` at 32x32, channels-last. This times ``nn.BatchNorm2d`` in
training mode, forward and backward separately (median of 10 after 2), at the heads' and the
backbone's shapes, in both layouts and at 1 and 2 intra-op threads, to show where torch's kernel
is slow.

    .venv/bin/python benchmarks/bn_channels_last.py [--shapes 12x112 12x56 ...]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = [(12, 32), (16, 32), (32, 16), (64, 8), (128, 8)]  # (channels, H = W) at batch 128


def time_bn(c: int, hw: int, fmt: torch.memory_format, threads: int, reps: int = 12) -> tuple[float, float]:
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, c, hw, hw, generator=g).to(memory_format=fmt).requires_grad_(True)
    grad = torch.randn(128, c, hw, hw, generator=g).to(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(c)
    fwd, bwd = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        y = bn(x)
        t1 = time.perf_counter()
        y.backward(grad)
        t2 = time.perf_counter()
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
    return statistics.median(fwd[2:]) * 1e3, statistics.median(bwd[2:]) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", metavar="CxHW",
                    help="channels x side, e.g. 12x112 (default: the CIFAR heads' and backbone's shapes)")
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else SHAPES
    print(f"# torch {torch.__version__}, batch 128, nn.BatchNorm2d training, ms (median of 10 after 2)")
    print("| channels, HxW | layout | 1 thread: fwd | bwd | 2 threads: fwd | bwd |")
    print("|---|---|---|---|---|---|")
    for c, hw in shapes:
        for name, fmt in (("channels_last", torch.channels_last), ("NCHW", torch.contiguous_format)):
            cells = []
            for threads in (1, 2):
                f, b = time_bn(c, hw, fmt, threads)
                cells += [f"{f:.2f}", f"{b:.2f}"]
            print(f"| {c}, {hw}x{hw} | {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
