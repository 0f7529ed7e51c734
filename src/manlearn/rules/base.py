"""The one interface every local-learning rule implements.

A rule is a factory of auxiliary networks. Each auxiliary network is an ``nn.Module`` whose forward
takes the block output ``h`` and the :class:`LocalBatch` and returns the block's scalar local loss,
so the learner never needs to know which rule it runs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


@dataclass
class LocalBatch:
    """What every auxiliary network may look at: the (normalised) input, the targets, and the
    de-normalised image in [0, 1] (computed once per step, only if a rule asks for it)."""

    x: torch.Tensor
    y: torch.Tensor
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    _image01: torch.Tensor | None = field(default=None, repr=False)

    @property
    def image01(self) -> torch.Tensor:
        if self._image01 is None:
            img = self.x.float()
            if self.mean is not None and self.std is not None:
                img = img * self.std.to(img.device) + self.mean.to(img.device)
            self._image01 = img.clamp(0.0, 1.0)  # never in place: img may be the input itself
        return self._image01


def register_norm_buffers(module: nn.Module, in_channels: int, mean=None, std=None) -> None:
    """Register the input normalisation as ``norm_mean``/``norm_std`` (``1 x C x 1 x 1``, default
    0.5/0.5, not saved in state_dict) for :class:`LocalBatch`'s de-normalised image; refuses a count
    that does not match the channels."""
    c = in_channels
    m = torch.tensor(list(mean) if mean is not None else [0.5] * c, dtype=torch.float32)
    s = torch.tensor(list(std) if std is not None else [0.5] * c, dtype=torch.float32)
    if m.numel() != c or s.numel() != c:
        raise ConfigError(f"norm_mean/norm_std need {c} values (one per input channel)")
    module.register_buffer("norm_mean", m.view(1, c, 1, 1), persistent=False)
    module.register_buffer("norm_std", s.view(1, c, 1, 1), persistent=False)


@dataclass
class AuxContext:
    """Everything a rule needs to build the auxiliary network of local block ``index``."""

    index: int                      # local module i = 0 .. K-2
    K: int                          # real number of gradient-isolated pieces
    h_shape: tuple[int, ...]        # (C, H, W) of the block's output; (N, D) for ViT tokens
    next_unit: nn.Module            # first unit of block index+1 (what MAN's ema tracks)
    next_unit_index: int            # its index in the backbone's units
    next_shape: tuple[int, ...]     # (C, H, W) of next_unit's output
    next_stage: int | None          # stage of next_unit (authors' lambda schedule), None if unknown
    num_classes: int
    in_channels: int
    image_size: int
    reinit: Callable[[nn.Module], None] | None = None  # the backbone family's weight init
    # the unit after next_unit (MAN++'s ViT auxiliary network copies it as lb1), None at the network's end
    following_unit: nn.Module | None = None


class Rule:
    """Base class: ``build_aux(ctx, h_shape)`` returns an aux module ``aux(h, batch) -> loss``.

    ``h_shape`` is the shape of the tensor the heads see (the block output, or for MAN the output of
    the ema/lb units), which is why it is passed apart from ``ctx``.
    """

    name: str = "base"

    def build_aux(self, ctx: AuxContext, h_shape: tuple[int, ...] | None = None) -> nn.Module:
        raise NotImplementedError


_RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule]) -> type[Rule]:
    """Decorator: make a rule creatable by its ``name``."""
    _RULES[cls.name] = cls
    return cls


def list_rules() -> list[str]:
    """Method names accepted by :func:`create_rule` and ``LocalLearner(method=...)``."""
    return sorted(_RULES)


def get_rule_class(name: str) -> type[Rule]:
    if name not in _RULES:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(list_rules())}")
    return _RULES[name]
