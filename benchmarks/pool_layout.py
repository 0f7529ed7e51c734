"""Why the heads pool with ``GlobalAvgPool``: the cost of a mixed-layout backward on the CPU.

1. ReLU + global average pool + backward on a channels-last 128x128x8x8 activation, three ways.
2. The same learners (ResNet-32, K=16, batch 128, channels-last) with ``GlobalAvgPool`` and with
   ``nn.AdaptiveAvgPool2d(1)`` swapped back in, stepped interleaved; median s/it.

    .venv/bin/python benchmarks/pool_layout.py [--rounds 8]
"""
from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

import manlearn
from manlearn.bench.common import interleaved, median_ms
from manlearn.models.layers import GlobalAvgPool


def _swap_back(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, GlobalAvgPool):
            setattr(module, name, torch.nn.AdaptiveAvgPool2d(1))
        else:
            _swap_back(child)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    a0 = torch.randn(128, 128, 8, 8).contiguous(memory_format=torch.channels_last)

    def step(pool):
        a = a0.clone().requires_grad_()
        pool(torch.relu(a)).sum().backward()

    for name, pool in (("adaptive_avg_pool2d", lambda r: F.adaptive_avg_pool2d(r, 1)),
                       ("mean", lambda r: r.mean((2, 3))), ("GlobalAvgPool", GlobalAvgPool())):
        print(f"ReLU + {name} + backward, 128x128x8x8 channels-last: {median_ms(lambda: step(pool)):.2f} ms")

    torch.manual_seed(0)
    learners = {}
    for method, base in (("e2e", None), ("manpp", "dgl"), ("manpp", "infopro")):
        for old in (False, True):
            learner = manlearn.LocalLearner("resnet32", method=method, base=base, K=16, channels_last=True)
            if old:
                _swap_back(learner)
            learners[(method if method == "e2e" else f"{base}+{method}", old)] = learner
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    steps = {key: (lambda learner=learner: learner.train_step(x, y)) for key, learner in learners.items()}
    for (name, old), times in interleaved(steps, args.rounds, warmup=2).items():
        pool = "AdaptiveAvgPool2d(1)" if old else "GlobalAvgPool"
        print(f"{name:15s} {pool:21s} {statistics.median(times):.3f} s/it (train_step, median of {args.rounds})")


if __name__ == "__main__":
    main()
