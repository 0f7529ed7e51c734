"""Anchor boxes for RetinaNet-style dense detectors.

Every feature-map level ``l`` with stride ``s_l`` gets, at each location ``(i, j)``, the same set of
"cell anchors" centred at ``(j * s_l + offset * s_l, i * s_l + offset * s_l)`` in image pixels. With the
padding of the ResNet stem and stride-2 convs, feature ``(i, j)`` at stride ``s`` is centred on pixel
``(s*i, s*j)``, hence the default ``offset = 0`` (also torchvision's and Detectron2's default).

Anchors are ordered location-major, then cell anchor: index ``(i * W + j) * A + a`` within a level,
levels concatenated in the order given. Heads must lay out their outputs the same way (see
:func:`manlearn.detection.retinanet.flatten_head_output`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..errors import ConfigError

__all__ = ["AnchorGenerator", "retinanet_anchor_sizes", "cell_anchors"]


def retinanet_anchor_sizes(levels: Sequence[int] = (3, 4, 5, 6, 7), scales_per_octave: int = 3,
                           octaves: int = 1) -> tuple[tuple[float, ...], ...]:
    """RetinaNet's anchor sizes: ``2^(l+2) * 2^(k/scales_per_octave)`` for ``k < octaves *
    scales_per_octave``, i.e. 32..512 for P3..P7 with scales {2^0, 2^(1/3), 2^(2/3)}."""
    return tuple(tuple(float(2 ** (lvl + 2) * 2 ** (k / scales_per_octave))
                       for k in range(octaves * scales_per_octave)) for lvl in levels)


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> torch.Tensor:
    """The ``len(sizes) * len(aspect_ratios)`` anchors centred on the origin, ``[A, 4]`` xyxy.

    An anchor of size ``s`` and aspect ratio ``r = h / w`` has area ``s^2``: ``w = s / sqrt(r)``,
    ``h = s * sqrt(r)``. Order: aspect ratio major, size minor (torchvision's order)."""
    out = []
    for r in aspect_ratios:
        if r <= 0:
            raise ConfigError(f"anchor aspect ratios must be positive, got {r}")
        for s in sizes:
            if s <= 0:
                raise ConfigError(f"anchor sizes must be positive, got {s}")
            w, h = s / r ** 0.5, s * r ** 0.5
            out.append((-w / 2, -h / 2, w / 2, h / 2))
    return torch.tensor(out, dtype=torch.float64)


class AnchorGenerator:
    """Anchors in xyxy image pixels for a list of feature maps.

    Args:
        sizes: per level, the anchor sizes (square-root of the area) in pixels; default RetinaNet's
            P3..P7 sizes (:func:`retinanet_anchor_sizes`).
        aspect_ratios: per level (or one tuple for all levels) the ratios ``h / w``; default (0.5, 1, 2).
        strides: per level stride in pixels; default ``2^l`` for P3..P7. A call may pass others.
        offset: anchor centre offset within a cell, in units of the stride (0 = top-left pixel).

    Results are cached by (feature sizes, strides, device, dtype): a detector sees the same padded
    image size batch after batch, and rebuilding 100k anchors each step would cost more than the head.
    """

    def __init__(self, sizes: Sequence[Sequence[float]] | None = None,
                 aspect_ratios: Sequence[float] | Sequence[Sequence[float]] = (0.5, 1.0, 2.0),
                 strides: Sequence[int] | None = None, offset: float = 0.0) -> None:
        sizes = retinanet_anchor_sizes() if sizes is None else sizes
        self.sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        if not self.sizes or any(len(level) == 0 for level in self.sizes):
            raise ConfigError("AnchorGenerator needs at least one level with at least one size")
        ratios = tuple(aspect_ratios)
        if ratios and all(isinstance(r, (int, float)) for r in ratios):
            per_level = (tuple(float(r) for r in ratios),) * len(self.sizes)
        else:
            per_level = tuple(tuple(float(r) for r in level) for level in ratios)  # type: ignore[union-attr]
        if len(per_level) != len(self.sizes):
            raise ConfigError(f"{len(self.sizes)} anchor size levels but {len(per_level)} aspect ratio levels")
        self.aspect_ratios = per_level
        if strides is None:
            strides = tuple(2 ** (3 + i) for i in range(len(self.sizes)))
        self.strides = tuple(int(s) for s in strides)
        if len(self.strides) != len(self.sizes):
            raise ConfigError(f"{len(self.sizes)} anchor size levels but {len(self.strides)} strides")
        self.offset = float(offset)
        self._cells = [cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]
        self._cache: dict[tuple, list[torch.Tensor]] = {}
        self._cat_cache: dict[tuple, tuple[list[torch.Tensor], torch.Tensor]] = {}

    @classmethod
    def single_level(cls, stride: int, base_size: float | None = None, scales_per_octave: int = 3,
                     octaves: int = 1, aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)) -> "AnchorGenerator":
        """One level at ``stride`` with sizes ``base_size * 2^(k/scales_per_octave)``; the default base
        size ``4 * stride`` is RetinaNet's rule (P3, stride 8, base 32), so a stride-8/16/32 level gets
        the same anchors as the FPN level of that stride."""
        base = 4.0 * stride if base_size is None else float(base_size)
        sizes = (tuple(base * 2 ** (k / scales_per_octave) for k in range(octaves * scales_per_octave)),)
        return cls(sizes, aspect_ratios, (stride,))

    @property
    def num_levels(self) -> int:
        return len(self.sizes)

    def num_anchors_per_location(self) -> list[int]:
        """Cell anchors per location, per level."""
        return [c.shape[0] for c in self._cells]

    def _key(self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int] | None,
             device: torch.device | str | None, dtype: torch.dtype) -> tuple:
        strides = self.strides if strides is None else tuple(int(s) for s in strides)
        sizes = tuple((int(h), int(w)) for h, w in feature_sizes)
        if len(sizes) != self.num_levels or len(strides) != self.num_levels:
            raise ConfigError(f"this AnchorGenerator has {self.num_levels} levels; got {len(sizes)} feature "
                              f"maps and {len(strides)} strides")
        return sizes, strides, torch.device("cpu") if device is None else torch.device(device), dtype

    def grid_anchors(self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int] | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
        """Per level, anchors ``[H_l * W_l * A_l, 4]`` for feature maps of the given ``(H, W)``."""
        key = self._key(feature_sizes, strides, device, dtype)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        sizes, strides, device, dtype = key
        out = []
        for (h, w), s, cell in zip(sizes, strides, self._cells):
            ys = (torch.arange(h, dtype=torch.float64) + self.offset) * s
            xs = (torch.arange(w, dtype=torch.float64) + self.offset) * s
            cy, cx = torch.meshgrid(ys, xs, indexing="ij")
            shifts = torch.stack((cx, cy, cx, cy), dim=-1).reshape(-1, 1, 4)
            out.append((shifts + cell[None]).reshape(-1, 4).to(device=device, dtype=dtype))
        if len(self._cache) > 16:  # a few image sizes (multi-scale training) at most; never unbounded
            self._cache.clear()
        self._cache[key] = out
        return out

    def __call__(self, feature_sizes: Sequence[tuple[int, int]], strides: Sequence[int] | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All levels' anchors concatenated, ``[sum_l H_l W_l A_l, 4]`` (cached like the levels)."""
        key = self._key(feature_sizes, strides, device, dtype)
        hit = self._cat_cache.get(key)
        if hit is None:
            levels = self.grid_anchors(feature_sizes, strides, device, dtype)
            hit = levels[0] if len(levels) == 1 else torch.cat(levels)
            if len(self._cat_cache) > 16:
                self._cat_cache.clear()
            self._cat_cache[key] = hit
        return hit
