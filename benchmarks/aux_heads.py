"""Cost of the auxiliary-network pieces, forward + backward, batch 128 (where the aux time goes).

Times InfoPro's decoder (upsample-then-conv as the authors do it, and the factorised form of
``manlearn.rules.heads.upsample_conv3x3`` that the decoder uses at >= 4x upsampling), the 2c2f
classifier and the DGL head against one residual unit at the three CIFAR stage shapes, in NCHW and
channels_last. Also prints the largest difference between the two decoder forms.

    OMP_NUM_THREADS=1 python benchmarks/aux_heads.py
"""
from __future__ import annotations

import statistics
import time

import torch

from manlearn.models.resnet_cifar import BasicBlock
from manlearn.rules.heads import DGLHead, InfoProClassifier, InfoProDecoder


def bench(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def main() -> None:
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch 128, seconds fwd+bwd (median of 6)")
    print("| C, HxW | layout | decoder, upsample then conv | decoder, factorised | 2c2f classifier | DGL head | residual unit |")
    print("|---|---|---|---|---|---|---|")
    worst = 0.0
    for c, hw in [(16, 32), (32, 16), (64, 8)]:
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            direct = InfoProDecoder(c, 32, factorized=False).to(memory_format=fmt)
            fact = InfoProDecoder(c, 32, factorized=True).to(memory_format=fmt)
            fact.load_state_dict(direct.state_dict())
            cls = InfoProClassifier(c, 10).to(memory_format=fmt)
            dgl = DGLHead(c, 10).to(memory_format=fmt)
            unit = BasicBlock(c, c).to(memory_format=fmt)
            h = torch.randn(128, c, hw, hw).contiguous(memory_format=fmt).requires_grad_()
            if hw != 32:
                with torch.no_grad():
                    worst = max(worst, (direct(h) - fact(h)).abs().max().item())
            row = [bench(lambda m=m: m(h).square().mean().backward()) for m in (direct, fact, cls, dgl, unit)]
            if hw == 32:
                row[1] = float("nan")  # no upsampling at the image size: both forms are the same conv
            print(f"| {c}, {hw}x{hw} | {'channels_last' if cl else 'NCHW'} | "
                  + " | ".join("–" if t != t else f"{t:.3f}" for t in row) + " |")
    print(f"\nlargest |direct - factorised| decoder output over these inputs: {worst:.1e}")


if __name__ == "__main__":
    main()
