"""ImageNet ResNets and ResNeXts (He et al. 2016; Xie et al. 2017) as ``Backbone(stem, units, head)``.

Stem: 7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max-pool. Four stages of BasicBlocks (ResNet-18/34)
or Bottlenecks (ResNet-50/101/152, ResNeXt) with 64/128/256/512 planes, stride on the 3x3 conv
("v1.5", as torchvision and the InfoPro/MAN ImageNet code), 1x1 conv + BN projection shortcuts.
Units are named ``(stage, index)`` with stage 1..4, the naming of the published ImageNet split tables.

Every factory accepts ``widths`` (planes per stage), ``stem_width``, ``groups`` and ``width_per_group``
so that tests can build the exact topology at a fraction of the width.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import ConfigError
from .base import Backbone
from .layers import GlobalAvgPool
from .registry import options_of, register_model
from .resnet_cifar import BasicBlock as CifarBasicBlock


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, groups=groups, bias=False)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    if stride == 1 and c_in == c_out:
        return None
    return nn.Sequential(_conv1x1(c_in, c_out, stride), nn.BatchNorm2d(c_out))


class BasicBlock(CifarBasicBlock):
    """3x3 - 3x3 residual unit (ResNet-18/34): the CIFAR unit's layers and forward (1x1 conv + BN
    projection shortcut), with the ImageNet factories' signature."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1, width_per_group: int = 64) -> None:
        if groups != 1 or width_per_group != 64:
            raise ConfigError("BasicBlock ResNets (18/34) take groups=1 and width_per_group=64 only")
        super().__init__(c_in, planes, stride)


class Bottleneck(nn.Module):
    """1x1 - 3x3 (grouped for ResNeXt, carries the stride) - 1x1 residual unit, expansion 4."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1, width_per_group: int = 64) -> None:
        super().__init__()
        width = int(planes * (width_per_group / 64.0)) * groups
        if width < 1:
            raise ConfigError(f"bottleneck width is {width} for planes={planes}, groups={groups}, "
                              f"width_per_group={width_per_group}; use wider planes or fewer groups")
        c_out = planes * self.expansion
        self.conv1 = _conv1x1(c_in, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = _conv1x1(width, c_out)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def imagenet_init(module: nn.Module) -> None:
    """torchvision's ResNet init (also the InfoPro/MAN ImageNet code): conv Kaiming-normal fan_out,
    BN (1, 0), linear layers PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d, nn.GroupNorm, nn.LayerNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def resnet_imagenet(block: type[nn.Module], layers: Sequence[int], num_classes: int = 1000, in_channels: int = 3,
                    *, widths: Sequence[int] = (64, 128, 256, 512), stem_width: int | None = None,
                    groups: int = 1, width_per_group: int = 64) -> Backbone:
    """An ImageNet-style ResNet/ResNeXt with ``layers[s]`` units in stage s+1."""
    if len(layers) != 4 or len(widths) != 4:
        raise ConfigError("an ImageNet ResNet has four stages: give four layer counts and four widths")
    stem_width = widths[0] if stem_width is None else stem_width
    stem = nn.Sequential(nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                         nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    units: list[nn.Module] = []
    ids: list[tuple[int, int]] = []
    c_in = stem_width
    for s, (n, planes) in enumerate(zip(layers, widths), start=1):
        for i in range(n):
            stride = 2 if (s > 1 and i == 0) else 1
            units.append(block(c_in, planes, stride, groups, width_per_group))
            ids.append((s, i))
            c_in = planes * block.expansion  # type: ignore[attr-defined]
    head = nn.Sequential(GlobalAvgPool(), nn.Flatten(1), nn.Linear(c_in, num_classes))
    model = Backbone(stem, units, head, ids)
    imagenet_init(model)
    model.init_weights = imagenet_init  # the family's init, used by init="random" of MAN
    return model


_TAGS = ("imagenet", "resnet")


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnet18(**kw) -> Backbone:
    return resnet_imagenet(BasicBlock, (2, 2, 2, 2), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnet34(**kw) -> Backbone:
    return resnet_imagenet(BasicBlock, (3, 4, 6, 3), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnet50(**kw) -> Backbone:
    return resnet_imagenet(Bottleneck, (3, 4, 6, 3), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnet101(**kw) -> Backbone:
    return resnet_imagenet(Bottleneck, (3, 4, 23, 3), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnet152(**kw) -> Backbone:
    return resnet_imagenet(Bottleneck, (3, 8, 36, 3), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnext50_32x4d(**kw) -> Backbone:
    kw.setdefault("groups", 32)
    kw.setdefault("width_per_group", 4)
    return resnet_imagenet(Bottleneck, (3, 4, 6, 3), **kw)


@register_model(tags=_TAGS)
@options_of(resnet_imagenet, "block", "layers")
def resnext101_32x8d(**kw) -> Backbone:
    kw.setdefault("groups", 32)
    kw.setdefault("width_per_group", 8)
    return resnet_imagenet(Bottleneck, (3, 4, 23, 3), **kw)
