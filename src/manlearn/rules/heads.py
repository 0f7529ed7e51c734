"""Auxiliary heads of the base rules (DGL, InfoPro, greedy) and the SupCon loss: pure modules."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import CpuNchwBatchNorm2d, GlobalAvgPool


def _conv_bn_relu(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True)]


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
        layers += [GlobalAvgPool(), nn.Flatten(1)]
        f = width
        for _ in range(3):
            layers += [nn.Linear(f, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            f = hidden
        layers.append(nn.Linear(f, num_classes))
        super().__init__(*layers)


class DGLMLPSRHead(nn.Module):
    """DGL's own auxiliary classifier, "MLP-SR" (Belilovsky et al. 2020, their code's
    ``auxillary_classifier2`` with 3 conv and 3 MLP layers): adaptive-avg-pool to ceil(H/4), three
    [1x1 conv C->C without bias, BN, ReLU], adaptive-avg-pool 2x2, flatten, three [Linear, BN1d, ReLU]
    of width 4C, Linear to classes. MAN++'s CIFAR head (:class:`DGLHead`) is a different network,
    which is why every DGL result must name its head."""

    def __init__(self, channels: int, num_classes: int, convs: int = 3, mlp_layers: int = 3) -> None:
        super().__init__()
        self.convs = nn.Sequential(*[m for _ in range(convs) for m in _conv_bn_relu(channels, channels, 1)])
        width = 4 * channels  # C x 2 x 2 after the last pool
        layers: list[nn.Module] = []
        for _ in range(mlp_layers):
            layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(width, num_classes))
        self.mlp = nn.Sequential(*layers)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        side = -(-int(h.shape[-1]) // 4), -(-int(h.shape[-2]) // 4)
        out = F.adaptive_avg_pool2d(h, (side[1], side[0]))
        out = F.adaptive_avg_pool2d(self.convs(out), 2)
        return self.mlp(out.flatten(1))


DGL_HEADS = ("manpp", "mlp-sr")


def bilinear_matrix(n_out: int, n_in: int, device=None, dtype=None) -> torch.Tensor:
    """(n_out, n_in) matrix of 1-D bilinear interpolation with ``align_corners=True``."""
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        src = i * scale
        p0 = min(int(src), n_in - 1)
        lam = src - p0
        p1 = min(p0 + 1, n_in - 1)
        m[i, p0] += 1.0 - lam
        m[i, p1] += lam
    return m.to(device=device, dtype=dtype)


_TAP_MATRICES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _tap_matrix(n_out: int, n_in: int, device, dtype) -> torch.Tensor:
    """(n_out, 3·n_in): the bilinear matrix zero-padded by one row on each side, at the three offsets of a
    3x3 kernel, side by side: ``[i, (a, p)] = U_pad[i + a, p]``."""
    u = bilinear_matrix(n_out, n_in, dtype=torch.float64)
    pad = torch.zeros(n_out + 2, n_in, dtype=torch.float64)
    pad[1:-1] = u
    return torch.cat([pad[a:a + n_out] for a in range(3)], dim=1).to(device=device, dtype=dtype)


def upsample_conv3x3(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     size: tuple[int, int]) -> torch.Tensor:
    """``conv3x3(bilinear_upsample(h, size, align_corners=True), weight, bias, padding=1)``, computed
    without building the upsampled tensor. The result is channels-last.

    A 3x3 convolution is the sum over its 9 taps (a, b) of a 1x1 convolution W_ab of the shifted,
    zero-padded image; bilinear upsampling is separable, ``U_H · h · U_Wᵀ`` per channel; and a 1x1
    convolution (mixing channels at each pixel) commutes with it (mixing pixels within a channel).
    So: one 1x1 convolution to the 9·C_out tap planes Z_ab at the input's resolution, then two matrix
    products, each contracting one spatial axis together with its three tap offsets:
    ``rows[B, i, (q, b, o)] = Σ_(a,p) U_H[i, (a, p)] · Z[B, (a, p), (q, b, o)]`` and
    ``out[B, i, j, o] = Σ_(b,q) U_W[j, (b, q)] · rows[B, i, (b, q), o]``. The second product writes
    (B, H, W, C_out), i.e. the output already in channels-last order, so no layout conversion and no
    sum of partial planes is needed (an earlier form with six products, partial sums and an NCHW
    result spent most of its time on those). Same function up to float rounding; for the InfoPro
    decoder on an 8x8, 64-channel input ~8x fewer multiply-adds than upsample-then-conv, and the
    upsampled C_in-channel tensor is never stored for backward.
    """
    B, c_in, h_in, w_in = h.shape
    c_out = weight.shape[0]
    H, W = size
    key = (H, h_in, W, w_in, h.device, h.dtype)
    mats = _TAP_MATRICES.get(key)
    if mats is None:
        mats = _TAP_MATRICES.setdefault(key, (_tap_matrix(H, h_in, h.device, h.dtype),
                                              _tap_matrix(W, w_in, h.device, h.dtype)))
    u_rows, u_cols = mats  # (H, 3·h_in), (W, 3·w_in)
    taps = weight.permute(2, 3, 0, 1).reshape(9 * c_out, c_in, 1, 1)  # output channels ordered (a, b, o)
    z = F.conv2d(h, taps.to(h.dtype))  # the reshapes below copy it to (a, p) order in either layout
    z = z.permute(0, 2, 3, 1).reshape(B, h_in, w_in, 3, 3, c_out)  # (B, p, q, a, b, o): a view
    z = z.permute(0, 3, 1, 2, 4, 5).reshape(B, 3 * h_in, w_in * 3 * c_out)  # (B, (a, p), (q, b, o))
    rows = torch.matmul(u_rows, z).view(B, H, w_in, 3, c_out)
    rows = rows.permute(0, 1, 3, 2, 4).reshape(B, H, 3 * w_in, c_out)  # (B, i, (b, q), o)
    out = torch.matmul(u_cols, rows)  # (B, H, W, C_out)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.permute(0, 3, 1, 2)  # B x C_out x H x W, channels-last in memory


class InfoProDecoder(nn.Module):
    """Bilinear upsample to the input size, 3x3 conv to 12 (bias), BN, ReLU, 3x3 conv to the image's
    channels. Returns *logits*; the sigmoid is folded into the BCE (same loss, numerically stabler).

    When the input is smaller than the image, the upsample + first conv can run as
    :func:`upsample_conv3x3`: ``factorized="auto"`` (default) does so when upsampling by 4x or more
    per side, where it wins clearly on this CPU (8x8 -> 32x32: ~2x faster; at 2x per side the direct
    channels-last convolution was as fast or faster); ``True``/``False`` force it either way (False is
    the authors' order). Parameters and state_dict are the same either way.

    ``cpu_bn_nchw`` (default True): on the CPU, a channels-last input's batch norm runs in NCHW (the
    convolutions stay channels-last): see :class:`~manlearn.models.layers.CpuNchwBatchNorm2d`.
    """

    def __init__(self, channels: int, image_size: int, out_channels: int = 3, width: int = 12,
                 factorized: bool | str = "auto", cpu_bn_nchw: bool = True) -> None:
        super().__init__()
        self.image_size = image_size
        self.factorized = factorized
        self.conv1 = nn.Conv2d(channels, width, 3, padding=1, bias=True)
        self.bn = CpuNchwBatchNorm2d(width, nchw_on_cpu=cpu_bn_nchw)
        self.conv2 = nn.Conv2d(width, out_channels, 3, padding=1, bias=True)

    def forward(self, h: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Reconstruct at ``size`` (the batch's image size; default the size the decoder was built for)."""
        size = tuple(size) if size is not None else (self.image_size, self.image_size)
        if tuple(h.shape[-2:]) == size:
            x = self.conv1(h)
        elif self.factorized is True or (self.factorized == "auto" and h.shape[-1] * 4 <= size[1]
                                         and h.shape[-2] * 4 <= size[0]):
            x = upsample_conv3x3(h, self.conv1.weight, self.conv1.bias, size)
            if not h.is_contiguous(memory_format=torch.channels_last):
                # back to the caller's layout: BN/ReLU/conv2 on a mixed pair of layouts (channels-last
                # activation, NCHW gradient from conv2) take ~10x slower CPU paths
                x = x.contiguous()
        else:
            x = self.conv1(F.interpolate(h, size=size, mode="bilinear", align_corners=True))
        # the BN returns the caller's layout: the ReLU's output is then the one tensor that both it
        # and conv2 keep for backward, whichever layout the BN ran in
        return self.conv2(F.relu(self.bn(x), inplace=True))

    @property
    def cpu_bn_nchw(self) -> bool:
        return self.bn.nchw_on_cpu

    @cpu_bn_nchw.setter
    def cpu_bn_nchw(self, value: bool) -> None:
        self.bn.nchw_on_cpu = value


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
        self.features = nn.Sequential(*layers, GlobalAvgPool(), nn.Flatten(1))
        self.fc = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_features))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(h))


SUPCON_ANCHORS = ("positive", "all")


def supcon_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                anchors: str = "positive") -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al.) for one view per sample, fully batched.

    ``features`` are L2-normalised. ``anchors="positive"`` averages over the anchors that have a positive
    in the batch (the others are left out); ``"all"`` averages over every anchor, one without a positive
    contributing 0 (the authors' MAN++ code): the two differ by the factor (anchors with a positive)/B.
    """
    if anchors not in SUPCON_ANCHORS:
        raise ValueError(f"unknown SupCon anchors {anchors!r}; choose from {SUPCON_ANCHORS}")
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
    if anchors == "all":
        return per_anchor.sum() / n
    return per_anchor.mean()
