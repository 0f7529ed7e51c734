"""Would one concatenated / grouped convolution serve MAN++'s ``lb`` and ``ema`` units faster?

Both units read the same input ``h``. This times forward + backward of ``s·lb(h) + (2−s)·ema(h)`` for
a CIFAR BasicBlock pair three ways, at the three ResNet-32 stage shapes (batch 128, channels-last):
``separate`` (what manlearn runs), ``fused_g2`` (conv1 of both as one conv with concatenated weights,
BN over the concatenated channels, conv2 as one grouped conv) and ``fused_split2`` (conv1 fused, conv2
separate). Fusing computes a weight gradient for the frozen ema copy too and adds concatenation copies.

    .venv/bin/python benchmarks/fused_units.py
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from manlearn.bench.common import median_ms
from manlearn.models.resnet_cifar import BasicBlock


def _bn(x, a, b):
    return F.batch_norm(x, None, None, torch.cat([a.weight, b.weight]), torch.cat([a.bias, b.bias]), True)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; ms per forward+backward (median)")
    for c, hw in ((16, 32), (32, 16), (64, 8)):
        torch.manual_seed(0)
        unit = BasicBlock(c, c).to(memory_format=torch.channels_last)
        lb, ema = copy.deepcopy(unit), copy.deepcopy(unit)
        for p in ema.parameters():
            p.requires_grad_(False)
        h0 = torch.randn(128, c, hw, hw).contiguous(memory_format=torch.channels_last)
        s = torch.tensor(1.0, requires_grad=True)

        def separate():
            h = h0.clone().requires_grad_()
            (s * lb(h) + (2 - s) * ema(h)).sum().backward()

        def fused(grouped: bool):
            h = h0.clone().requires_grad_()
            a = F.relu(_bn(F.conv2d(h, torch.cat([lb.conv1.weight, ema.conv1.weight]), padding=1), lb.bn1, ema.bn1))
            if grouped:
                b = F.conv2d(a, torch.cat([lb.conv2.weight, ema.conv2.weight]), padding=1, groups=2)
            else:
                b = torch.cat([F.conv2d(a[:, :c], lb.conv2.weight, padding=1),
                               F.conv2d(a[:, c:], ema.conv2.weight, padding=1)], 1)
            o = F.relu(_bn(b, lb.bn2, ema.bn2) + torch.cat([h, h], 1))
            (s * o[:, :c] + (2 - s) * o[:, c:]).sum().backward()

        r = {"separate": median_ms(separate), "fused_g2": median_ms(lambda: fused(True)),
             "fused_split2": median_ms(lambda: fused(False))}
        print(f"C={c:2d} {hw:2d}x{hw:<2d} " + "  ".join(f"{k} {v:6.1f}" for k, v in r.items()))


if __name__ == "__main__":
    main()
