"""LocalLearner: a backbone cut into K gradient-isolated blocks, each with its auxiliary network.

It owns modules and the training step of SPEC §1 and nothing else: no data, files, optimiser or
device policy beyond the tensors it is given.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .memory import unit_activation_bytes
from .models import create_model, follows_protocol, init_weights, model_accepts
from .rules import AuxContext, LocalBatch, MomentumAux, check_momentum, get_rule_class, list_rules
from .rules.base import register_norm_buffers
from .rules.momentum import INITS, MAN_BASES
from .rules.vit_aux import build_token_aux, is_token_shape
from .recompute import Segment, run_checkpointed, stage_segments
from .split import Split, resolve_split

MOMENTUM_METHODS = ("man", "manpp")


@dataclass
class StepOutput:
    """Result of :meth:`LocalLearner.train_step`."""

    logits: torch.Tensor      # final head's logits (detached)
    losses: list[float]       # one local loss per block; the last is the task loss

    @property
    def loss(self) -> float:
        return self.losses[-1]


class LocalLearner(nn.Module):
    """Supervised local learning of a backbone (SPEC.md §1-4).

    Args:
        model: a registered model name (see ``manlearn.list_models()``) or an ``nn.Module`` with
            ``stem``, ``units`` and ``head`` (optionally ``unit_ids`` for the published split tables).
            Units may output feature maps ``B x C x H x W`` or tokens ``B x N x D`` (ViT); a registered
            factory that takes ``image_size`` (ViT) is built for this learner's ``image_size``.
        method: ``e2e``, ``greedy``, ``dgl``, ``infopro``, ``infopro-contrast``, ``man`` or ``manpp``.
        base: the base rule of ``man``/``manpp``: ``dgl`` or ``infopro`` (default).
        K: real number of gradient-isolated pieces (ignored by ``e2e``; K=1 is plain backprop).
        split: ``auto`` | ``paper`` | ``memory`` | ``uniform`` | ``balanced`` | list of boundaries.
        stem_module: the stem is its own piece (MAN++ code) when True.
        momentum: EMA momentum of MAN/MAN++ in [0, 1].
        init: ``copy`` (ema/lb start as copies of the tracked unit) or ``random`` (authors' code).
        lambda_schedule: InfoPro weight schedule, ``stage`` (MAN code) or ``module`` (InfoPro).
        lambdas: InfoPro (λ1_first, λ2_first, λ1_last, λ2_last); None = the heads' default (5/0.5 -> 0/0
            for ``cifar`` heads, constant 5/0.75 for ``imagenet`` heads).
        infopro_heads: ``auto`` (``imagenet`` for inputs >= 128 px, else ``cifar``), ``cifar`` or
            ``imagenet`` (SPEC 2.2's deeper decoder/classifier).
        norm_mean, norm_std: the input normalisation, used to de-normalise InfoPro's target image.
        amp_dtype: run forwards under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        channels_last: keep weights and activations in channels-last memory format.
        grad_checkpoint: run every block stage by stage under gradient checkpointing (recompute in
            backward); with ``method="e2e"`` this is the memory baseline of the benchmarks.
        ema_recompute: MAN/MAN++ recompute the frozen ema unit in backward instead of keeping its
            activations (same gradients, one more ema forward per step, less memory).
    """

    def __init__(self, model: str | nn.Module = "resnet32", method: str = "manpp", base: str = "infopro",
                 K: int = 16, num_classes: int = 10, in_channels: int = 3, image_size: int = 32, *,
                 split: str | Sequence = "auto", stem_module: bool = True, momentum: float = 0.995,
                 init: str = "copy", lambda_schedule: str = "stage", infopro_classifier: str = "2c2f",
                 lambdas: tuple[float, float, float, float] | None = None, infopro_heads: str = "auto",
                 norm_mean: Sequence[float] | None = None, norm_std: Sequence[float] | None = None,
                 amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 grad_checkpoint: bool = False, ema_recompute: bool = False,
                 model_kwargs: dict | None = None) -> None:
        super().__init__()
        if method not in list_rules():
            raise ConfigError(f"unknown method {method!r}; available methods: {', '.join(list_rules())}")
        if method in MOMENTUM_METHODS and base not in MAN_BASES:
            raise ConfigError(f"unknown base {base!r} for {method}; choose from {', '.join(MAN_BASES)}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self.method, self.base = method, (base if method in MOMENTUM_METHODS else None)
        self.momentum = momentum  # validated by the property setter
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.amp_dtype = amp_dtype
        self.channels_last = channels_last

        model_kwargs = dict(model_kwargs or {})
        if isinstance(model, str) and model_accepts(model, "image_size"):
            model_kwargs.setdefault("image_size", image_size)
        backbone = self._build_backbone(model, num_classes, in_channels, model_kwargs)
        model_name = model if isinstance(model, str) else None
        units = list(backbone.units)
        unit_ids = getattr(backbone, "unit_ids", None)
        if method == "e2e":
            K = 1
        self.split: Split = resolve_split(
            len(units), K, split, stem_module, model_name, unit_ids,
            unit_costs=lambda: unit_activation_bytes(backbone.stem, units, in_channels, image_size))
        self.K = self.split.K

        shapes = self._probe_shapes(backbone, in_channels, image_size)  # shapes[j] = output of unit j-1
        blocks, block_ends = [], []
        for has_stem, unit_range in self.split.pieces():
            mods = ([backbone.stem] if has_stem else []) + [units[j] for j in unit_range]
            blocks.append(nn.Sequential(*mods))
            block_ends.append(unit_range.stop if len(unit_range) else 0)
        self.blocks = nn.ModuleList(blocks)
        self.head = backbone.head
        self.grad_checkpoint = bool(grad_checkpoint)
        self._segments: list[list[Segment]] | None = None
        if grad_checkpoint:
            self._segments = [self._block_segments(k, has_stem, unit_range, unit_ids)
                              for k, (has_stem, unit_range) in enumerate(self.split.pieces())]

        rule_cls = get_rule_class(method)
        rule_kwargs: dict = {}
        if method in ("infopro", "infopro-contrast") or (method in MOMENTUM_METHODS and base.startswith("infopro")):
            rule_kwargs = dict(lambda_schedule=lambda_schedule, classifier=infopro_classifier, lambdas=lambdas,
                               heads=infopro_heads)
        if method in MOMENTUM_METHODS:
            rule = rule_cls(base=base, init=init, **rule_kwargs)
        else:
            rule = rule_cls(**rule_kwargs)
        reinit = getattr(backbone, "init_weights", None) or init_weights
        auxes = []
        for i in range(self.K - 1):
            nxt = block_ends[i]  # index of the first unit of block i+1
            ctx = AuxContext(index=i, K=self.K, h_shape=shapes[nxt], next_unit=units[nxt], next_unit_index=nxt,
                             next_shape=shapes[nxt + 1], next_stage=unit_ids[nxt][0] if unit_ids else None,
                             num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                             reinit=reinit, following_unit=units[nxt + 1] if nxt + 1 < len(units) else None)
            auxes.append(build_token_aux(rule, ctx) if is_token_shape(ctx.h_shape) else rule.build_aux(ctx))
        self.auxes = nn.ModuleList(auxes)
        for aux in self.auxes:
            if isinstance(aux, MomentumAux):
                aux.recompute_ema = bool(ema_recompute)

        register_norm_buffers(self, in_channels, norm_mean, norm_std)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _build_backbone(model, num_classes, in_channels, model_kwargs) -> nn.Module:
        if isinstance(model, str):
            return create_model(model, num_classes=num_classes, in_channels=in_channels, **model_kwargs)
        if isinstance(model, nn.Module):
            if not follows_protocol(model):
                raise ConfigError("a custom backbone must expose `stem` (nn.Module), `units` (a non-empty "
                                  "nn.ModuleList) and `head` (nn.Module); see manlearn.models.Backbone")
            return model
        raise ConfigError(f"model must be a registered name or an nn.Module, got {type(model).__name__}")

    def _block_segments(self, k: int, has_stem: bool, unit_range: range, unit_ids) -> list[Segment]:
        """Checkpoint segments of block k: one per stage (the stem joins the first); without stage
        ids, about sqrt(n) units per segment."""
        mods = list(self.blocks[k])
        chunk = max(1, round(math.sqrt(len(unit_range)))) if len(unit_range) else 1
        stages = ([None] if has_stem else []) + [
            unit_ids[j][0] if unit_ids else (j - unit_range.start) // chunk for j in unit_range]
        return stage_segments(mods, stages)

    def run_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Forward of block k alone (under gradient checkpointing when the learner uses it)."""
        if self._segments is None:
            return self.blocks[k](x)
        return run_checkpointed(self._segments[k], x)

    @staticmethod
    @torch.no_grad()
    def _probe_shapes(backbone: nn.Module, in_channels: int, image_size: int) -> list[tuple[int, ...]]:
        """Output shape (C, H, W) of the stem (index 0) and of every unit (index j+1)."""
        mods = [backbone.stem, *backbone.units]
        modes = [m.training for m in mods]
        params = [p for p in backbone.parameters()]
        device = params[0].device if params else torch.device("cpu")
        x = torch.zeros(1, in_channels, image_size, image_size, device=device)
        shapes = []
        try:
            for m in mods:
                m.eval()
                try:
                    x = m(x)
                except RuntimeError as e:
                    raise ConfigError(f"the backbone cannot run on {in_channels}x{image_size}x{image_size} "
                                      f"inputs: {e}") from None
                shapes.append(tuple(x.shape[1:]))
        finally:
            for m, mode in zip(mods, modes):
                m.train(mode)
        return shapes

    # ----------------------------------------------------------------- properties
    @property
    def momentum(self) -> float:
        return self._momentum

    @momentum.setter
    def momentum(self, m: float) -> None:
        self._momentum = check_momentum(m)

    # ----------------------------------------------------------------- compute
    def autocast(self, x: torch.Tensor):
        """The autocast context of this learner's ``amp_dtype`` on ``x``'s device (a no-op without AMP).
        Public so that schedulers running blocks themselves (pipeline, benchmarks) compute the same."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the blocks expect it (channels-last when the learner is)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Inference: backbone + head only; the auxiliary networks are not used."""
        x = self.prepare_input(x)
        with self.autocast(x):
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    def local_step(self, k: int, inp: torch.Tensor, batch: LocalBatch,
                   grad_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One block's whole work, as one schedulable unit: forward, local loss, backward, EMA.

        Returns (detached block output, detached loss); for the last block the output is the logits.
        """
        last = k == self.K - 1
        with self.autocast(inp):
            h = self.run_block(k, inp)
            if last:
                out = self.head(h)
                loss = F.cross_entropy(out.float(), batch.y)
            else:
                out = h
                loss = self.auxes[k](h, batch)
        (loss * grad_scale if grad_scale is not None else loss).backward()
        if not last:
            aux = self.auxes[k]
            if isinstance(aux, MomentumAux):
                aux.update_ema(self._momentum)
        return out.detach(), loss.detach()

    def train_step(self, x: torch.Tensor, y: torch.Tensor, *, zero_grad: bool = True,
                   grad_scale: torch.Tensor | None = None,
                   after_block: Callable[[int], None] | None = None) -> StepOutput:
        """Forward of every block, every local backward, the EMA updates (SPEC §1).

        Leaves ``.grad`` on every trainable parameter and does not step an optimiser. ``grad_scale``
        multiplies every loss before its backward (for a fp16 GradScaler). ``after_block(k)`` is
        called once block k's gradients (block, auxiliary network) are final — data parallelism
        starts block k's gradient all-reduce there, overlapping it with the later blocks.
        """
        expected = (self.in_channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected or y.shape != x.shape[:1]:
            raise ConfigError(f"this learner was built for inputs [B, {expected[0]}, {expected[1]}, {expected[2]}] "
                              f"with labels [B]; got x {list(x.shape)} and y {list(y.shape)} (build it with "
                              "the in_channels and image_size of your data)")
        if zero_grad:
            self.zero_grad(set_to_none=True)
        x = self.prepare_input(x)
        batch = LocalBatch(x, y, self.norm_mean, self.norm_std)
        h = x
        losses = []
        for k in range(self.K):
            h, loss = self.local_step(k, h, batch, grad_scale)
            losses.append(loss.float())
            if after_block is not None:
                after_block(k)
        return StepOutput(h, torch.stack(losses).tolist())

    def compile_parts(self, **compile_kwargs) -> "LocalLearner":
        """``torch.compile`` every block, auxiliary network and the head in place (state_dict keys
        unchanged). Blocks share ``nn.Sequential.forward``, and dynamo keeps one cache entry per
        shape per code object, so the recompile limit is raised to fit them all.

        Measured on the 2-core CPU (BENCHMARKS.md) this is slower than eager; it is meant for GPUs.
        """
        import torch._dynamo

        need = 8 * (len(self.blocks) + len(self.auxes) + 1)
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), need))
        for part in [*self.blocks, *self.auxes, self.head]:
            part.compile(**compile_kwargs)
        return self

    def extra_repr(self) -> str:
        return (f"method={self.method}, base={self.base}, K={self.K}, split={self.split.source}, "
                f"stem_module={self.split.stem_module}, momentum={self._momentum}")

    def keep_parts(self, blocks: Iterable[int], auxes: Iterable[int], head: bool) -> None:
        """Free, in place, every part that this process will not run (a pipeline worker keeps its blocks).

        Blocks not in ``blocks`` become empty ``nn.Sequential``, auxiliary networks not in ``auxes``
        ``nn.Identity``, and the head ``nn.Identity`` unless ``head``.  Indices and the kept parts'
        state-dict keys are unchanged; only ``local_step``/``run_block`` of kept parts stay meaningful.
        """
        keep_blocks, keep_auxes = set(blocks), set(auxes)
        for k in range(len(self.blocks)):
            if k not in keep_blocks:
                self.blocks[k] = nn.Sequential()
                if self._segments is not None:
                    self._segments[k] = []
        for k in range(len(self.auxes)):
            if k not in keep_auxes:
                self.auxes[k] = nn.Identity()
        if not head:
            self.head = nn.Identity()
