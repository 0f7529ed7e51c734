"""DeepLabV3 / DeepLabV3+ as a *task object* for the dense local-learning engine.

The engine (:class:`manlearn.LocalLearner`) owns the backbone, the split into blocks and the training step; it asks a
task for three things only, so that detection and segmentation share one engine:

* ``final_head(channels, strides)`` -> a module whose ``forward(features)`` takes **all** backbone stage
  outputs in order (C2..C5 for an ImageNet ResNet: channels e.g. [256, 512, 1024, 2048], strides
  [4, 8, 16, 32]) and returns logits ``[B, num_classes, h, w]`` at its ``output_stride``.  Under local
  learning the engine detaches the earlier features, so the decoder's gradient stays in the last block.
* ``local_head(channels, stride)`` -> the classifier part of a block's auxiliary network:
  ``forward(y) -> [B, num_classes, h, w]`` at the stride of ``y``.
* ``loss(outputs, targets, image_hw)`` / ``predict(outputs, image_hw)``: logits at any stride are
  bilinearly upsampled to full resolution first, so heads at different strides are trained against the
  same full-resolution masks (the DeepLab recipe).

Atrous rates.  DeepLabV3 uses rates (6, 12, 18) at output stride 16 on 513-px crops (a 33x33 map); the
rates are meant to cover roughly 1/5, 2/5 and 1/2 of the map.  manlearn's ResNets are not dilated, so
C5 is at stride 32: a 128x128 mosaic canvas gives a 4x4 map, on which rate 6 or more only ever samples
zero padding and degenerates into a 1x1 conv.  The default here is therefore (1, 2, 3) — 3x3, 5x5 and
7x7 receptive windows on the 4x4 map, i.e. local, half-map and whole-map context.  For larger inputs at
stride 32 scale the published rates by map size, e.g. (3, 6, 9) for 512x1024 Cityscapes crops
(16x32 map), and pass them as ``atrous_rates``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from manlearn.errors import ConfigError

__all__ = ["DeepLabV3Task", "ASPP", "DeepLabV3Head", "LocalSegHead", "DEFAULT_ATROUS_RATES"]

#: Rates for a non-dilated backbone (output stride 32) on ~128-px inputs; see the module docstring.
DEFAULT_ATROUS_RATES = (1, 2, 3)


def _conv_bn_relu(c_in: int, c_out: int, k: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _init(module: nn.Module) -> None:
    """Kaiming-normal convs and (1, 0) BN, as the backbone (imagenet_init) so heads start on its scale."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class _ImagePool(nn.Module):
    """ASPP image-level branch: global average -> 1x1 conv -> ReLU -> broadcast back to the map size.

    No BatchNorm here: on a [B, C, 1, 1] tensor it fails for batch 1 in training and is noisy for small
    batches, which local-learning detection/segmentation runs use.
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(F.adaptive_avg_pool2d(x, 1)))
        return y.expand(-1, -1, x.shape[-2], x.shape[-1])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: 1x1, one 3x3 per rate, image pooling; concat; 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, rates: Sequence[int], dropout: float = 0.1) -> None:
        super().__init__()
        branches: list[nn.Module] = [_conv_bn_relu(c_in, c_out, 1)]
        branches += [_conv_bn_relu(c_in, c_out, 3, dilation=int(r)) for r in rates]
        branches.append(_ImagePool(c_in, c_out))
        self.branches = nn.ModuleList(branches)
        self.project = nn.Sequential(_conv_bn_relu(len(branches) * c_out, c_out, 1), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Head(nn.Module):
    """ASPP on the last feature, then either DeepLabV3's 3x3 conv + classifier (output at the last stride)
    or DeepLabV3+'s decoder: the low-level feature through a 1x1 reduction to 48 channels, concatenated with
    the upsampled ASPP output, two 3x3 convs, classifier (output at the low-level stride).

    ``forward(features)`` takes the backbone stage outputs in the order given at construction.
    """

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, aspp_channels: int,
                 rates: Sequence[int], low_index: int | None, low_channels: int = 48) -> None:
        super().__init__()
        self.num_features = len(channels)
        self.low_index = low_index
        self.aspp = ASPP(channels[-1], aspp_channels, rates)
        if low_index is None:
            self.low_reduce = None
            self.fuse = _conv_bn_relu(aspp_channels, aspp_channels, 3)
            self.output_stride = int(strides[-1])
        else:
            self.low_reduce = _conv_bn_relu(channels[low_index], low_channels, 1)
            self.fuse = nn.Sequential(_conv_bn_relu(aspp_channels + low_channels, aspp_channels, 3),
                                      _conv_bn_relu(aspp_channels, aspp_channels, 3))
            self.output_stride = int(strides[low_index])
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        _init(self)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != self.num_features:
            raise ValueError(f"DeepLabV3Head expects {self.num_features} backbone features (the stage outputs "
                             f"it was built for, in order), got {len(features)}")
        x = self.aspp(features[-1])
        if self.low_reduce is not None:
            low = self.low_reduce(features[self.low_index])
            x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low], dim=1)
        return self.classifier(self.fuse(x))


class LocalSegHead(nn.Module):
    """Auxiliary segmentation head of a local block: 3x3 conv-BN-ReLU, then a 1x1 classifier."""

    def __init__(self, c_in: int, hidden: int, num_classes: int, stride: int) -> None:
        super().__init__()
        self.body = _conv_bn_relu(c_in, hidden, 3)
        self.classifier = nn.Conv2d(hidden, num_classes, 1)
        self.output_stride = int(stride)
        _init(self)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(y))


def _upsample(outputs: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    hw = (int(hw[0]), int(hw[1]))
    if tuple(outputs.shape[-2:]) == hw:
        return outputs
    return F.interpolate(outputs, size=hw, mode="bilinear", align_corners=False)


class DeepLabV3Task:
    """Semantic segmentation with DeepLabV3(+) heads; the task protocol of the dense engine.

    Args:
        num_classes: number of classes, background included (11 for the mosaic, 19 for Cityscapes).
        ignore_index: target value excluded from the loss (255: Cityscapes' void, crop padding).
        aspp_channels: width of ASPP and the decoder (256 in the papers; small values for tests).
        atrous_rates: ASPP dilation rates, default :data:`DEFAULT_ATROUS_RATES` (see module docstring).
        decoder: DeepLabV3+ decoder on the stride-4 feature (the smallest stride when there is no stride-4
            feature), output at that stride; False: plain DeepLabV3, output at the last feature's stride.
        local_channels: hidden width of the local heads; default ``min(channels, 2 * aspp_channels, 256)``.
    """

    reads = "stages"  # the final head reads every stage (manlearn.tasks.Task)
    per_image_labels = False
    fixed_input_size = False


    name = "deeplabv3"

    def __init__(self, num_classes: int, ignore_index: int = 255, aspp_channels: int = 256,
                 atrous_rates: Sequence[int] | None = None, decoder: bool = True,
                 local_channels: int | None = None) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"DeepLabV3Task: num_classes must be an integer >= 2, got {num_classes!r}")
        if aspp_channels < 1:
            raise ConfigError(f"DeepLabV3Task: aspp_channels must be positive, got {aspp_channels}")
        rates = tuple(DEFAULT_ATROUS_RATES if atrous_rates is None else atrous_rates)
        if not rates or any(int(r) < 1 for r in rates):
            raise ConfigError(f"DeepLabV3Task: atrous_rates must be positive integers, got {rates}")
        if local_channels is not None and local_channels < 1:
            raise ConfigError(f"DeepLabV3Task: local_channels must be positive, got {local_channels}")
        if 0 <= ignore_index < num_classes:
            raise ConfigError(f"DeepLabV3Task: ignore_index {ignore_index} is a valid class id (< {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.aspp_channels = aspp_channels
        self.atrous_rates = tuple(int(r) for r in rates)
        self.decoder = decoder
        self.local_channels = local_channels

    def final_head(self, channels: Sequence[int], strides: Sequence[int]) -> DeepLabV3Head:
        """The network's head: ``forward(features: list[Tensor]) -> logits`` over all stage outputs."""
        channels, strides = [int(c) for c in channels], [int(s) for s in strides]
        if not channels or len(channels) != len(strides):
            raise ConfigError(f"DeepLabV3Task.final_head: need one stride per feature, got channels {channels} "
                              f"and strides {strides}")
        if any(b <= a for a, b in zip(strides, strides[1:])):
            raise ConfigError(f"DeepLabV3Task.final_head: strides must increase (features in backbone order), "
                              f"got {strides}")
        low_index = None
        if self.decoder:
            if len(channels) < 2:
                raise ConfigError("DeepLabV3Task.final_head: the DeepLabV3+ decoder needs a low-level feature "
                                  "besides the last one; pass decoder=False for a single-feature backbone")
            low_index = strides.index(4) if 4 in strides[:-1] else 0
        return DeepLabV3Head(channels, strides, self.num_classes, self.aspp_channels, self.atrous_rates,
                             low_index)

    def local_head(self, channels: int, stride: int) -> LocalSegHead:
        """Classifier of a local block's auxiliary network: ``forward(y) -> logits`` at ``y``'s stride."""
        hidden = self.local_channels or max(1, min(int(channels), 2 * self.aspp_channels, 256))
        return LocalSegHead(int(channels), hidden, self.num_classes, stride)

    def check_targets(self, x: torch.Tensor, targets: Any) -> None:
        """``[B, H, W]`` integer class maps, before any work; their ids (0..C-1 or ignore_index) where they are
        on the CPU (on an accelerator the check would make every step wait for the device)."""
        b, c = x.shape[0], self.num_classes
        if not (isinstance(targets, torch.Tensor) and targets.dim() == 3 and targets.shape[0] == b
                and not targets.is_floating_point() and targets.dtype != torch.bool):
            got = f"{targets.dtype} {list(targets.shape)}" if isinstance(targets, torch.Tensor) else type(targets).__name__
            raise ConfigError(f"segmentation targets must be [B, H, W] integer class maps for a batch of {b}, got {got}")
        if targets.device.type == "cpu" and targets.numel():
            bad = (targets != self.ignore_index) & ((targets < 0) | (targets >= c))
            if bool(bad.any()):
                raise ConfigError(f"segmentation targets must hold class ids 0..{c - 1} or {self.ignore_index} "
                                  f"(ignore_index), got {int(targets[bad][0])}")

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
        """Cross-entropy of logits upsampled (bilinear) to the mask size; ``ignore_index`` pixels excluded.

        A batch whose pixels are all ignored gives a zero loss that still carries a graph (not NaN).
        """
        if targets.dim() != 3:
            raise ConfigError(f"segmentation targets must be [B, H, W] class ids, got {tuple(targets.shape)}")
        logits = _upsample(outputs, targets.shape[-2:])
        targets = targets.long()
        # sum / count instead of mean: the same value, no host sync, and 0 (not NaN) when all are ignored.
        count = (targets != self.ignore_index).sum().clamp_min(1)
        total = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="sum")
        return total / count

    @torch.no_grad()
    def predict(self, outputs: torch.Tensor, image_hw: Sequence[int]) -> torch.Tensor:
        """Class map ``[B, H, W]`` (int64) at the image size: argmax of the upsampled logits."""
        return _upsample(outputs, image_hw).argmax(dim=1)
