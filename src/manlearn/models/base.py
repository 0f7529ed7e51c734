"""The backbone protocol every model follows: ``stem`` -> ``units`` -> ``head``.

Local learning only needs to know where a network may be cut. Expressing every backbone as a stem,
an ordered list of units (residual blocks, transformer blocks, ...) and a head makes a split nothing
more than a list of unit boundaries, so adding a model family never touches the engine.
"""
from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    """A network cut-able between units.

    Attributes:
        stem: first layers, applied to the image.
        units: ordered ``nn.ModuleList`` of units; a split boundary may fall after any unit.
        head: final classifier applied to the last unit's output.
        unit_ids: ``(stage, index_in_stage)`` for every unit (stage 1-based, index 0-based), the
            naming of the authors' split tables. Optional for user backbones.
    """

    def __init__(self, stem: nn.Module, units: list[nn.Module], head: nn.Module,
                 unit_ids: list[tuple[int, int]] | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.units = nn.ModuleList(units)
        self.head = head
        if unit_ids is not None and len(unit_ids) != len(self.units):
            raise ValueError("unit_ids must name every unit")
        self.unit_ids = list(unit_ids) if unit_ids is not None else None

    @property
    def feature_info(self) -> list[dict]:
        """The backbone's feature taps (timm's ``feature_info``): for each stage, the index of its last
        unit (``unit``) and its ``stage`` number. Heads that read several stages (FPN, DeepLabV3+) read
        these; channels and strides are measured by the learner on a probe input."""
        return feature_info(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for unit in self.units:
            x = unit(x)
        return self.head(x)


def follows_protocol(module: nn.Module) -> bool:
    """True when ``module`` exposes ``stem``, a sequence of ``units`` and a ``head``."""
    units = getattr(module, "units", None)
    return (isinstance(getattr(module, "stem", None), nn.Module)
            and isinstance(units, (nn.ModuleList, nn.Sequential, list, tuple)) and len(units) > 0
            and isinstance(getattr(module, "head", None), nn.Module))


def feature_info(module: nn.Module) -> list[dict]:
    """Feature taps of any backbone following the protocol: one per stage end (from ``unit_ids``),
    or the last unit alone when the units carry no stage ids."""
    units = list(module.units)
    ids = getattr(module, "unit_ids", None)
    if not ids:
        return [{"unit": len(units) - 1, "stage": 1}]
    taps = []
    for j, (stage, _) in enumerate(ids):
        if j + 1 == len(ids) or ids[j + 1][0] != stage:
            taps.append({"unit": j, "stage": int(stage)})
    return taps
