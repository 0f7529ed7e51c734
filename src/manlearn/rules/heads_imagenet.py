"""InfoPro's auxiliary heads for ImageNet-sized inputs (SPEC.md 2.2): pure modules.

The InfoPro ImageNet code has a decoder and a classifier for 512-channel (28x28 at 224 px) and
1024-channel (14x14) features. Both follow one pattern, written here for any channel count and any
feature stride so that 2048-channel (7x7) features, BasicBlock ResNets and small test inputs work too:

- decoder: 1x1 conv C -> r (r = 128 / 192 / 256 for C = 512 / 1024 / 2048, else C/4), BN, ReLU; then per
  factor-2 bilinear upsample (align_corners=True) one conv-BN-ReLU down a channel ladder ending
  ``... 64, 32, 12`` (1x1 convs except the last two, which are 3x3), then 3x3 conv to the image's
  channels at full resolution. For C=512 at stride 8 this is exactly 128 ->(56) 32 ->(112) 12 ->(224) 3,
  for C=1024 at stride 16 exactly 192 ->(28) 64 (1x1) ->(56) 32 ->(112) 12 ->(224) 3.
- classifier: 1x1 conv C -> C/4 (128 for 512, 256 for 1024), BN, ReLU, 3x3 stride-2 conv to 256, BN,
  ReLU, 3x3 stride-2 conv to 512, BN, ReLU, 1x1 conv to 2048, BN, ReLU, GAP, Linear to classes.

Decoders return logits; the sigmoid is folded into the BCE (as :class:`~manlearn.rules.heads.InfoProDecoder`).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import CpuNchwBatchNorm2d, GlobalAvgPool

_DECODER_REDUCTION = {512: 128, 1024: 192, 2048: 256}
_LADDER = (256, 128, 64, 32, 12)


# Below this many channels the batch norm runs in NCHW on the CPU (CpuNchwBatchNorm2d). At 12 channels,
# 2 threads, batch 128, forward + backward: 230 -> 80 ms at 112x112 and 51 -> 7.6 ms at 56x56; at 32
# channels channels-last is as fast or faster (benchmarks/archive/bn_channels_last.py --shapes 12x112 12x56 32x56
# 32x112), so those stay plain.
_NCHW_BN_BELOW = 16


def _cbr(c_in: int, c_out: int, k: int, stride: int = 1) -> nn.Sequential:
    bn = CpuNchwBatchNorm2d(c_out) if c_out < _NCHW_BN_BELOW else nn.BatchNorm2d(c_out)
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False),
                         bn, nn.ReLU(inplace=True))


class ImageNetInfoProDecoder(nn.Module):
    """Staged decoder: 1x1 reduction, then (upsample x2, conv-BN-ReLU) per octave, then conv to the image."""

    def __init__(self, channels: int, feature_size: int, image_size: int, out_channels: int = 3) -> None:
        super().__init__()
        self.image_size = image_size
        ratio = max(image_size / max(feature_size, 1), 1.0)
        n_up = max(int(round(math.log2(ratio))), 0)
        # Resolutions after each upsample; the last one is always the image itself.
        self.sizes = [max(image_size // 2 ** (n_up - j), 1) for j in range(1, n_up + 1)]
        if self.sizes:
            self.sizes[-1] = image_size
        reduced = _DECODER_REDUCTION.get(channels, max(min(channels // 4, 256), 16))
        self.reduce = _cbr(channels, reduced, 1)
        widths = list(_LADDER[-(n_up - 1):]) if n_up > 1 else []
        stages = []
        c = reduced
        for i, w in enumerate(widths):
            k = 3 if i >= len(widths) - 2 else 1
            stages.append(_cbr(c, w, k))
            c = w
        self.stages = nn.ModuleList(stages)
        self.out = nn.Conv2d(c, out_channels, 3, padding=1, bias=True)

    def _up(self, h: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(h.shape[-2:]) == tuple(size):
            return h
        return F.interpolate(h, size=tuple(size), mode="bilinear", align_corners=True)

    def forward(self, h: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Reconstruct at ``size`` (the batch's image size; default the size the decoder was built for):
        the ladder's intermediate sizes keep their ratio to it."""
        H, W = size if size is not None else (self.image_size, self.image_size)
        h = self.reduce(h)
        sizes = self.sizes or [self.image_size]
        scaled = [(max(round(s * H / self.image_size), 1), max(round(s * W / self.image_size), 1)) for s in sizes]
        scaled[-1] = (H, W)
        # one upsample before each ladder stage, the last one before the output conv
        for stage, sz in zip(self.stages, scaled[:-1]):
            h = stage(self._up(h, sz))
        return self.out(self._up(h, scaled[-1]))


class ImageNetInfoProClassifier(nn.Module):
    """1x1 reduction, two stride-2 3x3 convs (256, 512), 1x1 expansion to 2048, GAP, Linear."""

    def __init__(self, channels: int, out_features: int, widths: tuple[int, int, int] = (256, 512, 2048)) -> None:
        super().__init__()
        w1 = max(channels // 4, 16)
        self.features = nn.Sequential(_cbr(channels, w1, 1), _cbr(w1, widths[0], 3, 2), _cbr(widths[0], widths[1], 3, 2),
                                      _cbr(widths[1], widths[2], 1), GlobalAvgPool(), nn.Flatten(1))
        self.fc = nn.Linear(widths[2], out_features)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))
