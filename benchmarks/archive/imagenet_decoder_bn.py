"""Issue #17, item 2: the ImageNet InfoPro decoder with its 12-channel batch norm in NCHW on the CPU.

``ImageNetInfoProDecoder`` ends its ladder at 12 channels, the width where torch's channels-last CPU
batch norm is slow (``benchmarks/bn_channels_last.py``). Its 12-channel BN is a
``CpuNchwBatchNorm2d``; this times the decoder's forward + backward (channels-last input, training
mode) with that switched on and off, interleaved round by round in one process (median of the rounds
after a warm-up), at 1 and 2 intra-op threads.

    .venv/bin/python benchmarks/imagenet_decoder_bn.py [--rounds 7]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from manlearn.models.layers import CpuNchwBatchNorm2d
from manlearn.rules.heads_imagenet import ImageNetInfoProDecoder

# (channels, feature side, image side, batch): ResNet-50's layer2 output at 224 px, and at 64 px
CASES = [(512, 28, 224, 16), (512, 8, 64, 128)]


def step(dec: torch.nn.Module, h: torch.Tensor, grad: torch.Tensor) -> float:
    t0 = time.perf_counter()
    dec(h.requires_grad_(True)).backward(grad)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"# torch {torch.__version__}; decoder forward + backward, ms, median of {args.rounds} interleaved rounds")
    print("| features -> image, batch | threads | BN(12) channels-last | BN(12) NCHW | NCHW / CL |")
    print("|---|---|---|---|---|")
    for c, side, image, batch in CASES:
        torch.manual_seed(0)
        on = ImageNetInfoProDecoder(c, feature_size=side, image_size=image).to(memory_format=torch.channels_last)
        off = copy.deepcopy(on)
        for m in off.modules():
            if isinstance(m, CpuNchwBatchNorm2d):
                m.nchw_on_cpu = False
        h = torch.randn(batch, c, side, side).contiguous(memory_format=torch.channels_last)
        grad = torch.randn(batch, 3, image, image).contiguous(memory_format=torch.channels_last)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            times: dict[str, list[float]] = {"off": [], "on": []}
            for r in range(args.rounds + 1):
                for name, dec in (("off", off), ("on", on)) if r % 2 else (("on", on), ("off", off)):
                    t = step(dec, h.detach(), grad)
                    if r:  # round 0 warms both up
                        times[name].append(t)
            a, b = (statistics.median(times[k]) * 1e3 for k in ("off", "on"))
            print(f"| {c}x{side}x{side} -> {image}x{image}, {batch} | {threads} | {a:.1f} | {b:.1f} | {b / a:.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
