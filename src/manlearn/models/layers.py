"""Small layers shared by the backbones and the auxiliary heads."""
from __future__ import annotations

import torch
from torch import nn


class GlobalAvgPool(nn.Module):
    """Global average pooling to ``B x C x 1 x 1``, as a sum divided by the pixel count.

    Same function as ``nn.AdaptiveAvgPool2d(1)``, but its backward stays in the input's memory format:
    the pooling backward of ``adaptive_avg_pool2d``/``mean`` hands ReLU's backward a contiguous NCHW
    gradient, and on a channels-last activation that mixed-format ``threshold_backward`` runs ~10x
    slower on the CPU (measured: 8.4 vs 0.7 ms for ReLU + pool + backward at 128x128x8x8). The sum's
    backward is a stride-0 expand, which every layout handles at memory speed.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(2, 3), keepdim=True) / (x.shape[2] * x.shape[3])


class _Relayout(torch.autograd.Function):
    """``x`` in memory format ``fmt``, its gradient handed back in format ``back``. A plain
    ``.contiguous(memory_format=fmt)`` hands the gradient back in ``fmt``, and torch's CPU kernels
    take slow paths when an op's input and gradient differ in layout."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: torch.memory_format, back: torch.memory_format) -> torch.Tensor:
        ctx.back = back
        return x.contiguous(memory_format=fmt)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.back), None, None


class CpuNchwBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` that, on the CPU, runs a channels-last input in NCHW and returns channels-last.

    torch's channels-last CPU batch norm is slow at a few channels, and slower with 2 threads than with
    1 (``benchmarks/archive/bn_channels_last.py``; at 12 channels, 32x32, batch 128, 2 threads: 15.9 ms forward
    + backward against 2.4 in NCHW). The InfoPro decoders' 12-channel layers hit it. Output and
    gradient go back in the caller's layout, and the op sees input and gradient in one layout (a mixed
    pair is torch's slow path). Same function (statistics summed in another order), same parameters
    and state_dict as ``nn.BatchNorm2d``; ``nchw_on_cpu=False`` makes it exactly that.
    """

    def __init__(self, num_features: int, *args, nchw_on_cpu: bool = True, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        self.nchw_on_cpu = nchw_on_cpu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nchw_on_cpu and x.device.type == "cpu" and x.dim() == 4 and not x.is_contiguous() \
                and x.is_contiguous(memory_format=torch.channels_last):
            nchw, cl = torch.contiguous_format, torch.channels_last
            return _Relayout.apply(super().forward(_Relayout.apply(x, nchw, cl)), cl, nchw)
        return super().forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.nchw_on_cpu else ", nchw_on_cpu=False")
