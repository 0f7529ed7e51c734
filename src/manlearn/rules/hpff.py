"""``hpff``: HPFF (Su et al., ECCV 2024), SPEC 2.4 — a modifier of ``dgl`` or ``infopro``.

Local block i's loss is ``0.001·CE(base classifier on h_i) + 0.999·base_loss(window_i)`` where the
window re-runs block i−1 on its own detached input and then block i, with gradient through both: block
i's loss reaches block i−1 and never further (``reaches_back = 1``; the learner keeps block i−1's
detached input in ``LocalBatch.block_inputs``). Every block therefore runs forward twice per step
(its BatchNorm running statistics are updated by both passes, as in a plain re-run); inference uses the
plain path. With ``base='infopro'`` the decoder is HPFF's *patch feature fusion* decoder and λ follows
the module index (r = i/(K−2)): the last local block's base loss is then zero, but its 0.001·CE term
keeps it learning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import check_option_types, AuxContext, LocalBatch, Rule, create_rule, loss_precision, register_rule
from .infopro import InfoProAux

HPFF_BASES = ("dgl", "infopro")
HPFF_DECODERS = ("patch", "plain")


class PatchFusionDecoder(nn.Module):
    """HPFF's decoder: the feature map is cut into its 4 spatial quadrants; each is upsampled (bilinear,
    align_corners=True) to the size of the matching image quadrant (half the image) and decoded by its
    own conv3x3(C→12)-BN-ReLU-conv3x3(12→image channels); the loss is the *sum* of the 4 BCEs against the
    image quadrants (sigmoid folded into the BCE)."""

    def __init__(self, channels: int, out_channels: int = 3, width: int = 12) -> None:
        super().__init__()
        self.patches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                          nn.Conv2d(width, out_channels, 3, padding=1)) for _ in range(4))

    @staticmethod
    def quadrants(t: torch.Tensor) -> list[torch.Tensor]:
        return [q for half in torch.tensor_split(t, 2, dim=-2) for q in torch.tensor_split(half, 2, dim=-1)]

    def reconstruction_loss(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        image = batch.image01
        wide = torch.float64 if h.dtype == torch.float64 else torch.float32
        total = None
        for decode, feat, target in zip(self.patches, self.quadrants(h), self.quadrants(image)):
            up = F.interpolate(feat, size=tuple(target.shape[-2:]), mode="bilinear", align_corners=True)
            loss = F.binary_cross_entropy_with_logits(decode(up).to(wide), target.to(wide))
            total = loss if total is None else total + loss
        return total


class HPFFAux(nn.Module):
    """0.001·CE(classify(h)) + 0.999·base(block_i(block_{i−1}(x_{i−1})))."""

    def __init__(self, base: nn.Module, index: int, blocks: list[nn.Module], own_weight: float = 0.001) -> None:
        super().__init__()
        if not callable(getattr(base, "classify", None)):
            raise ConfigError(f"hpff needs a base whose auxiliary network has a classifier (classify(h)); "
                              f"{type(base).__name__} has none")
        self.base = base
        self.index = index
        self.own_weight = float(own_weight)
        # not submodules: the window's blocks belong to the backbone
        self._window = (blocks[index - 1], blocks[index]) if index > 0 else None

    def window_output(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        if self._window is None:  # the first block has no block before it: its window is itself
            return h
        inp = batch.block_inputs.get(self.index - 1)
        if inp is None:
            raise ConfigError("hpff's window needs the input of the block before (LocalBatch.block_inputs); run it "
                              "through LocalLearner.train_step / local_step, which keep it for rules that "
                              "reach back")
        previous, block = self._window
        return block(previous(inp))

    def forward(self, h: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        logits = self.base.classify(h)
        logits = loss_precision(logits)
        y = batch.y.to(logits.dtype) if batch.y.is_floating_point() else batch.y
        own = F.cross_entropy(logits, y)
        return self.own_weight * own + (1.0 - self.own_weight) * self.base(self.window_output(h, batch), batch)


@register_rule
class HPFFRule(Rule):
    """``hpff``: a two-block cascade window over a ``dgl`` or ``infopro`` base (plus HPFF's decoder)."""

    name = "hpff"
    modifier = True
    reaches_back = 1
    bases = HPFF_BASES
    summary = ("HPFF: 0.001*own CE + 0.999*base loss on a two-block window (reaches block i-1); "
               "patch-feature-fusion InfoPro decoder")

    def __init__(self, base: str | None = None, decoder: str = "patch", **base_options) -> None:
        base = base or "infopro"
        if base not in HPFF_BASES:
            raise ConfigError(f"unknown base {base!r} for hpff; choose from {', '.join(HPFF_BASES)}")
        if decoder not in HPFF_DECODERS:
            raise ConfigError(f"unknown hpff decoder {decoder!r}; choose from {HPFF_DECODERS}")
        self.base_name, self.decoder = base, decoder
        opts = {k: v for k, v in base_options.items() if v is not None}
        if base == "infopro" and opts.get("lambda_schedule", "auto") == "auto":
            opts["lambda_schedule"] = "module"  # HPFF: λ over the module index
        self.base_options = opts
        self.base: Rule = create_rule(base, opts)
        self.base.zero_lambda_ok = True  # the own-output CE term keeps a block with λ = (0, 0) learning

    @classmethod
    def from_options(cls, options):
        own = cls.option_names() - {"base_options"}
        mine = {k: v for k, v in options.items() if k in own}
        check_option_types(cls, mine)
        return cls(**mine, **{k: v for k, v in options.items() if k not in own})

    def accepted_options(self) -> set[str]:
        return (type(self).option_names() - {"base_options"}) | self.base.accepted_options()

    def bind(self, task) -> None:
        self.base.bind(task)

    def build_aux(self, ctx: AuxContext, h_shape=None) -> nn.Module:
        ctx.require_labels(self.name)
        if len(ctx.blocks) != ctx.index + 1:
            raise ConfigError("hpff needs the learner's blocks in its AuxContext (ctx.blocks)")
        base_aux = self.base.build_aux(ctx, h_shape)
        if isinstance(base_aux, InfoProAux) and self.decoder == "patch":
            base_aux.decoder = PatchFusionDecoder(int((h_shape or ctx.h_shape)[0]), ctx.in_channels)
        return HPFFAux(base_aux, ctx.index, ctx.blocks)
