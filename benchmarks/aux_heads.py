"""Cost of the auxiliary-network pieces, forward + backward, batch 128 (where InfoPro+MAN++ time goes).

Times InfoPro's decoder and 2c2f classifier against one residual unit at the three CIFAR stage
shapes, in NCHW and channels_last, and one rejected exact rewrite of the decoder (the 3x3 conv split
into nine 1x1 taps applied before the upsample), so the choice in the code can be re-checked.

    OMP_NUM_THREADS=1 python benchmarks/aux_heads.py
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from manlearn.models.resnet_cifar import BasicBlock
from manlearn.rules.heads import InfoProClassifier, InfoProDecoder


def bench(fn, n: int = 7) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


def decoder_conv_factorised(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor, size: int) -> torch.Tensor:
    """conv3x3(upsample(h)) computed as sum over taps of shift(upsample(W_tap · h)) (exact in real math)."""
    n, c = h.shape[:2]
    o = w.shape[0]
    taps = w.permute(2, 3, 0, 1).reshape(9 * o, c, 1, 1)
    up = F.interpolate(F.conv2d(h, taps), size=(size, size), mode="bilinear", align_corners=True)
    up = F.pad(up, (1, 1, 1, 1)).view(n, 9, o, size + 2, size + 2)
    z = up[:, 0, :, :size, :size] + b.view(1, o, 1, 1)
    for t in range(1, 9):
        ky, kx = divmod(t, 3)
        z = z + up[:, t, :, ky:ky + size, kx:kx + size]
    return z


def main() -> None:
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, batch 128, seconds fwd+bwd (median)")
    print("| C, HxW | layout | InfoPro decoder | 2c2f classifier | residual unit |")
    print("|---|---|---|---|---|")
    for c, hw in [(16, 32), (32, 16), (64, 8)]:
        for cl in (False, True):
            fmt = torch.channels_last if cl else torch.contiguous_format
            dec = InfoProDecoder(c, 32).to(memory_format=fmt)
            cls = InfoProClassifier(c, 10).to(memory_format=fmt)
            unit = BasicBlock(c, c).to(memory_format=fmt)
            h = torch.randn(128, c, hw, hw).contiguous(memory_format=fmt).requires_grad_()
            row = [bench(lambda m=m: m(h).square().mean().backward()) for m in (dec, cls, unit)]
            print(f"| {c}, {hw}x{hw} | {'channels_last' if cl else 'NCHW'} | " + " | ".join(f"{t:.3f}" for t in row) + " |")
    h = torch.randn(128, 64, 8, 8, requires_grad=True)
    w = torch.randn(12, 64, 3, 3, requires_grad=True)
    b = torch.randn(12, requires_grad=True)
    direct = lambda: F.conv2d(F.interpolate(h, size=(32, 32), mode="bilinear", align_corners=True), w, b, padding=1)
    err = (direct() - decoder_conv_factorised(h, w, b, 32)).abs().max().item()
    t_direct = bench(lambda: direct().square().mean().backward())
    t_fact = bench(lambda: decoder_conv_factorised(h, w, b, 32).square().mean().backward())
    print(f"\ndecoder upsample+conv (C=64, 8x8 -> 32x32, NCHW): direct {t_direct:.3f} s, "
          f"nine-tap factorisation {t_fact:.3f} s (max abs difference {err:.1e})")


if __name__ == "__main__":
    main()
