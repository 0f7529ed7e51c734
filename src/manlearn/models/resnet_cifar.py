"""CIFAR ResNets (He et al. 2016, option-B shortcuts as in the InfoPro/MAN code): 3x3 stem, three
stages of BasicBlocks with widths 16/32/64, GAP + linear head."""
from __future__ import annotations

import math

import torch
from torch import nn

from .base import Backbone
from .layers import GlobalAvgPool
from .registry import options_of, register_model


def conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 conv + BN shortcut when shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ClassifierHead(nn.Sequential):
    """Global average pool + linear classifier."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(GlobalAvgPool(), nn.Flatten(1), nn.Linear(channels, num_classes))


def init_weights(module: nn.Module) -> None:
    """The CIFAR-ResNet init of the authors' code: conv N(0, sqrt(2/(k*k*C_out))), BN (1, 0)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3,
                 widths: tuple[int, int, int, int] = (16, 16, 32, 64)) -> Backbone:
    """CIFAR ResNet of the given depth (6n+2)."""
    if (depth - 2) % 6 != 0:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
    units: list[nn.Module] = []
    ids: list[tuple[int, int]] = []
    c_in = widths[0]
    for stage, c_out in enumerate(widths[1:], start=1):
        for i in range(n):
            stride = 2 if (stage > 1 and i == 0) else 1
            units.append(BasicBlock(c_in, c_out, stride))
            ids.append((stage, i))
            c_in = c_out
    model = Backbone(stem, units, ClassifierHead(c_in, num_classes), ids)
    init_weights(model)
    return model


@register_model(tags=("cifar", "resnet"))
@options_of(resnet_cifar, "depth")
def resnet20(**kw) -> Backbone:
    return resnet_cifar(20, **kw)


@register_model(tags=("cifar", "resnet"))
@options_of(resnet_cifar, "depth")
def resnet32(**kw) -> Backbone:
    return resnet_cifar(32, **kw)


@register_model(tags=("cifar", "resnet"))
@options_of(resnet_cifar, "depth")
def resnet44(**kw) -> Backbone:
    return resnet_cifar(44, **kw)


@register_model(tags=("cifar", "resnet"))
@options_of(resnet_cifar, "depth")
def resnet56(**kw) -> Backbone:
    return resnet_cifar(56, **kw)


@register_model(tags=("cifar", "resnet"))
@options_of(resnet_cifar, "depth")
def resnet110(**kw) -> Backbone:
    return resnet_cifar(110, **kw)
