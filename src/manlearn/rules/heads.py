"""Auxiliary heads of the base rules (DGL, InfoPro, greedy) and the SupCon loss: pure modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


class GreedyHead(nn.Sequential):
    """Global average pool + one linear layer (the ``greedy`` rule)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(channels, num_classes))


class DGLHead(nn.Sequential):
    """DGL classifier used by MAN++ on CIFAR-sized inputs: pool to 8x8, three 1x1 conv-BN-ReLU to
    128 channels, GAP, three Linear-BN1d-ReLU to 512, Linear to classes."""

    def __init__(self, channels: int, num_classes: int, width: int = 128, hidden: int = 512,
                 pool_size: int = 8) -> None:
        layers: list[nn.Module] = [nn.AdaptiveAvgPool2d(pool_size)]
        c = channels
        for _ in range(3):
            layers += _conv_bn_relu(c, width, 1)
            c = width
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1)]
        f = width
        for _ in range(3):
            layers += [nn.Linear(f, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            f = hidden
        layers.append(nn.Linear(f, num_classes))
        super().__init__(*layers)


class InfoProDecoder(nn.Module):
    """Bilinear upsample to the input size, 3x3 conv to 12 (bias), BN, ReLU, 3x3 conv to the image's
    channels. Returns *logits*; the sigmoid is folded into the BCE (same loss, numerically stabler)."""

    def __init__(self, channels: int, image_size: int, out_channels: int = 3, width: int = 12) -> None:
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=True)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.shape[-1] != self.image_size or h.shape[-2] != self.image_size:
            h = F.interpolate(h, size=(self.image_size, self.image_size), mode="bilinear", align_corners=True)
        return self.conv2(F.relu(self.bn(self.conv1(h)), inplace=True))


INFOPRO_CLASSIFIERS = ("2c2f", "1c2f")


class InfoProClassifier(nn.Module):
    """InfoPro's ``2c2f`` / ``1c2f`` auxiliary classifier.

    Width and stride follow the authors' table: C=16 -> 32 stride 2, C=32 -> 64 stride 2, C=64 -> 64
    stride 1 (in general: C < 64 -> 2C with stride 2, otherwise C with stride 1). ``out_features`` is
    the number of classes, or the projection dimension for the contrastive variant.
    """

    def __init__(self, channels: int, out_features: int, config: str = "2c2f", hidden: int = 128) -> None:
        super().__init__()
        if config not in INFOPRO_CLASSIFIERS:
            raise ValueError(f"unknown InfoPro classifier {config!r}; choose from {INFOPRO_CLASSIFIERS}")
        width, stride = (2 * channels, 2) if channels < 64 else (channels, 1)
        layers = _conv_bn_relu(channels, width, 3, stride)
        if config == "2c2f":
            layers += _conv_bn_relu(width, width, 3)
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) for one view per sample, fully batched.

    ``features`` are L2-normalised. Anchors without any positive in the batch are left out.
    """
    n = features.shape[0]
    logits = features @ features.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=features.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = (labels[:, None] == labels[None, :]) & ~self_mask
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    pos_log_prob = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1)
    per_anchor = -pos_log_prob[has_pos] / n_pos[has_pos]
    if per_anchor.numel() == 0:
        return features.sum() * 0.0
    return per_anchor.mean()
