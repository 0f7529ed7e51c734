"""Vision Transformers (Dosovitskiy et al. 2021, DeiT sizes) as ``Backbone(stem, units, head)``.

stem = patch embedding (conv p x p, stride p) + CLS token + learned position embedding;
units = pre-norm transformer blocks (tokens ``B x N x D`` in and out, N = 1 + patches);
head = LayerNorm + linear classifier on the CLS token.

The position embedding fixes the input size, so every factory takes ``image_size``; ``LocalLearner``
passes its own ``image_size`` to factories that accept one. Sizes:

| name | image | patch | dim | depth | heads |
|---|---|---|---|---|---|
| vit_tiny  | 224 | 16 | 192 | 12 | 3 |
| vit_small | 224 | 16 | 384 | 12 | 6 |
| vit_base  | 224 | 16 | 768 | 12 | 12 |
| vit_cifar | 32  | 4  | 192 | 12 | 3 |  (ViT-Tiny shape for 32x32 inputs, 64 patches)

Every size can be overridden (``dim``, ``depth``, ``heads``, ``patch_size``, ``mlp_ratio``) for tests.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Backbone
from .registry import options_of, register_model


class PatchEmbed(nn.Module):
    """Image ``B x C x S x S`` -> tokens ``B x (1 + (S/p)^2) x D`` (CLS first, position embedding added)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int) -> None:
        super().__init__()
        if image_size % patch_size != 0:
            raise ConfigError(f"a ViT needs image_size divisible by the patch size: {image_size} % {patch_size} != 0")
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.num_patches, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[2] != self.image_size \
                or x.shape[3] != self.image_size:
            raise ConfigError(f"this ViT was built for {self.in_channels}x{self.image_size}x{self.image_size} "
                              f"inputs (its position embedding has {self.num_patches} patches of "
                              f"{self.patch_size}x{self.patch_size}); got {list(x.shape[1:])}. Build it with "
                              "the image_size of your data")
        t = self.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(t.shape[0], -1, -1)
        return torch.cat([cls, t], dim=1) + self.pos_embed


class Attention(nn.Module):
    """Multi-head self-attention (fused QKV, ``scaled_dot_product_attention``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ConfigError(f"ViT dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClsHead(nn.Module):
    """LayerNorm over tokens, then a linear classifier on the CLS token."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x)[:, 0])


def vit_init(module: nn.Module) -> None:
    """timm/DeiT init: linear weights truncated-normal std 0.02 and zero bias, LayerNorm (1, 0),
    CLS token and position embedding truncated-normal std 0.02; the patch conv like a linear layer."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.trunc_normal_(m.pos_embed, std=0.02)
            nn.init.trunc_normal_(m.cls_token, std=0.02)
            w = m.proj.weight
            nn.init.trunc_normal_(w.view(w.shape[0], -1), std=0.02)
            nn.init.zeros_(m.proj.bias)


def vision_transformer(num_classes: int = 1000, in_channels: int = 3, image_size: int = 224, *,
                       patch_size: int = 16, dim: int = 192, depth: int = 12, heads: int = 3,
                       mlp_ratio: float = 4.0) -> Backbone:
    """A ViT for ``image_size`` inputs; units are its ``depth`` transformer blocks, ids ``(1, i)``."""
    if depth < 1:
        raise ConfigError(f"ViT depth must be >= 1, got {depth}")
    stem = PatchEmbed(image_size, patch_size, in_channels, dim)
    units = [TransformerBlock(dim, heads, mlp_ratio) for _ in range(depth)]
    model = Backbone(stem, units, ClsHead(dim, num_classes), [(1, i) for i in range(depth)])
    vit_init(model)
    model.init_weights = vit_init
    return model


_TAGS = ("imagenet", "vit")


@register_model(tags=_TAGS)
@options_of(vision_transformer)
def vit_tiny(image_size: int = 224, **kw) -> Backbone:
    kw = {"patch_size": 16, "dim": 192, "depth": 12, "heads": 3, **kw}
    return vision_transformer(image_size=image_size, **kw)


@register_model(tags=_TAGS)
@options_of(vision_transformer)
def vit_small(image_size: int = 224, **kw) -> Backbone:
    kw = {"patch_size": 16, "dim": 384, "depth": 12, "heads": 6, **kw}
    return vision_transformer(image_size=image_size, **kw)


@register_model(tags=_TAGS)
@options_of(vision_transformer)
def vit_base(image_size: int = 224, **kw) -> Backbone:
    kw = {"patch_size": 16, "dim": 768, "depth": 12, "heads": 12, **kw}
    return vision_transformer(image_size=image_size, **kw)


@register_model(tags=("cifar", "vit"))
@options_of(vision_transformer)
def vit_cifar(image_size: int = 32, **kw) -> Backbone:
    kw = {"patch_size": 4, "dim": 192, "depth": 12, "heads": 3, **kw}
    return vision_transformer(image_size=image_size, **kw)
