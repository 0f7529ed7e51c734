"""Local learning for dense tasks (detection, segmentation): a backbone cut at *stage* boundaries.

SPEC 3.4: RetinaNet on ResNet-50/101/152 with K=4 (stem+layer1 | layer2 | layer3 | layer4); blocks 1-3
get local task heads on ``y = s·lb(h) + (2−s)·ema(h)``, where ema/lb are copies of the next stage's
first unit; the final block (the last stage) trains the task head, which reads every stage's output —
the ones produced by earlier blocks detached. The task itself (heads, loss, post-processing) is an
object following :class:`DenseTask`; :class:`~manlearn.detection.RetinaNetTask` and
:class:`~manlearn.segmentation.DeepLabV3Task` are the two shipped.

Why a separate learner from :class:`~manlearn.learner.LocalLearner`: a dense head reads several stages
(FPN, DeepLabV3+ decoder), not only the last unit's output, so the final piece is "last block + a head
over all stage outputs", and cuts may only fall between stages.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..models import create_model, follows_protocol, model_accepts
from ..rules import LocalBatch, MomentumAux, check_momentum
from ..rules.base import register_norm_buffers
from ..rules.momentum import INITS

DENSE_METHODS = ("e2e", "local", "man", "manpp")

#: Stages after which a K-block cut falls (4-stage backbones). K=4 is SPEC 3.4's table.
DEFAULT_STAGE_CUTS = {1: (), 2: (2,), 3: (1, 2), 4: (1, 2, 3)}


class DenseTask(Protocol):
    """What the engine asks of a dense task (detection, segmentation, ...)."""

    def final_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """Module mapping *all* stage outputs (in stage order) to the task's raw outputs."""

    def local_head(self, channels: int, stride: int) -> nn.Module:
        """Module mapping one local block's auxiliary feature map to raw outputs of the same format."""

    def loss(self, outputs: Any, targets: Any, image_hw: tuple[int, int]) -> torch.Tensor:
        """Scalar loss of either head's outputs."""

    def predict(self, outputs: Any, image_hw: tuple[int, int]) -> Any:
        """Post-processed predictions (boxes per image, or a label map)."""


class LocalTaskLoss(nn.Module):
    """A task's local head followed by the task's loss: the ``heads(y, batch) -> loss`` of an
    auxiliary network (what :class:`~manlearn.rules.MomentumAux` puts after its ema/lb fusion)."""

    def __init__(self, head: nn.Module, task: DenseTask) -> None:
        super().__init__()
        self.head = head
        self._task = (task,)  # not a module: holds no parameters

    def forward(self, y: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        hw = (int(batch.x.shape[-2]), int(batch.x.shape[-1]))
        return self._task[0].loss(self.head(y), batch.y, hw)


@dataclass
class DenseStepOutput:
    """Result of :meth:`DenseLocalLearner.train_step`: one loss per block (the last is the task loss)."""

    losses: list[float]

    @property
    def loss(self) -> float:
        return self.losses[-1]


class DenseLocalLearner(nn.Module):
    """A stage-structured backbone + a dense task head, trained end to end or by local learning.

    Args:
        task: a :class:`DenseTask` (e.g. ``RetinaNetTask(num_classes=10)``).
        model: a registered backbone whose units carry ``(stage, index)`` ids (the ImageNet ResNets and
            ResNeXts), or such an ``nn.Module``.
        method: ``e2e`` (plain backprop, K=1), ``local`` (local task heads on the block output, no
            momentum network), ``man`` or ``manpp`` (SPEC 3.4).
        K: number of gradient-isolated pieces (1..number of stages); cuts at ``stage_cuts``.
        stage_cuts: stages after which to cut (default: K=4 -> (1, 2, 3), K=2 -> (2,), K=3 -> (1, 2)).
        momentum, init: MAN/MAN++ EMA momentum and ema/lb initialisation (``copy`` or ``random``).
        norm_mean, norm_std: the input normalisation (kept for de-normalising, like the classifier learner).
        channels_last, amp_dtype: as in :class:`~manlearn.learner.LocalLearner`.
        model_kwargs: passed to the model factory (e.g. ``widths``/``stem_width`` for small test models).
        probe_size: input side used once to find each stage's channels and stride.
    """

    def __init__(self, task: DenseTask, model: str | nn.Module = "resnet50", method: str = "manpp", K: int = 4, *,
                 stage_cuts: Sequence[int] | None = None, in_channels: int = 3, momentum: float = 0.995,
                 init: str = "copy", norm_mean: Sequence[float] | None = None,
                 norm_std: Sequence[float] | None = None, channels_last: bool = False,
                 amp_dtype: torch.dtype | None = None, model_kwargs: dict | None = None,
                 probe_size: int = 64) -> None:
        super().__init__()
        if method not in DENSE_METHODS:
            raise ConfigError(f"unknown dense method {method!r}; choose from {', '.join(DENSE_METHODS)}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {INITS}, got {init!r}")
        for name in ("final_head", "local_head", "loss", "predict"):
            if not callable(getattr(task, name, None)):
                raise ConfigError(f"task {type(task).__name__} lacks {name}(); a dense task needs final_head, "
                                  "local_head, loss and predict (see manlearn.dense.DenseTask)")
        self.task = task
        self.method = method
        self.momentum = check_momentum(momentum)
        self.channels_last, self.amp_dtype = channels_last, amp_dtype
        self.in_channels = in_channels

        backbone = self._build_backbone(model, in_channels, dict(model_kwargs or {}))
        unit_ids = getattr(backbone, "unit_ids", None)
        if not unit_ids:
            raise ConfigError("a dense task needs a backbone whose units carry (stage, index) ids, e.g. "
                              "resnet50 / resnet101 / resnet152 / resnext50_32x4d")
        stage_of = [s for s, _ in unit_ids]
        stage_numbers = sorted(set(stage_of))
        stages = [nn.Sequential(*[u for u, s in zip(backbone.units, stage_of) if s == n]) for n in stage_numbers]
        channels, strides = self._probe(backbone.stem, stages, in_channels, probe_size)
        self.stage_channels, self.stage_strides = channels, strides

        n_stages = len(stages)
        if method == "e2e":
            K = 1
        if isinstance(K, bool) or not isinstance(K, int) or not 1 <= K <= n_stages:
            raise ConfigError(f"K={K!r} is impossible for a dense task on {n_stages} stages: cuts fall between "
                              f"stages, so K must be 1..{n_stages}")
        if method != "e2e" and K == 1:
            raise ConfigError(f"method {method!r} with K=1 is plain backprop; use method=e2e")
        cuts = tuple(stage_cuts) if stage_cuts is not None else None
        if cuts is None:
            if n_stages == 4 and K in DEFAULT_STAGE_CUTS:
                cuts = DEFAULT_STAGE_CUTS[K]
            else:  # even split of the stages
                cuts = tuple(round(n_stages * (i + 1) / K) for i in range(K - 1))
        cuts = tuple(int(c) for c in cuts)
        if len(cuts) != K - 1 or list(cuts) != sorted(set(cuts)) or any(not 1 <= c < n_stages for c in cuts):
            raise ConfigError(f"stage_cuts {cuts} is not a valid cut into K={K} pieces of {n_stages} stages: give "
                              f"{K - 1} increasing stage numbers in 1..{n_stages - 1}")
        self.K, self.stage_cuts = K, cuts

        # block k = [stem if k == 0] + its stages; _block_stages[k] = indices of its stages (0-based)
        bounds = [0, *cuts, n_stages]
        self._block_stages = [list(range(bounds[k], bounds[k + 1])) for k in range(K)]
        self.blocks = nn.ModuleList(
            nn.Sequential(*([backbone.stem] if k == 0 else []), *[stages[i] for i in idx])
            for k, idx in enumerate(self._block_stages))
        self.final = task.final_head(channels, strides)

        auxes = []
        for k in range(K - 1):
            last = self._block_stages[k][-1]
            nxt = stages[last + 1][0]  # first unit of the next block
            if method == "local":
                auxes.append(LocalTaskLoss(task.local_head(channels[last], strides[last]), task))
                continue
            if not any(True for _ in nxt.parameters()):
                raise ConfigError(f"MAN's ema/lb unit cannot be built after block {k}: the next stage's first "
                                  "unit has no parameters")
            head = LocalTaskLoss(task.local_head(channels[last + 1], strides[last + 1]), task)
            reinit = getattr(backbone, "init_weights", None)
            auxes.append(MomentumAux(nxt, head, scaled=(method == "manpp"), init=init, reinit=reinit))
        self.auxes = nn.ModuleList(auxes)

        register_norm_buffers(self, in_channels, norm_mean, norm_std)
        if channels_last:
            self.to(memory_format=torch.channels_last)

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _build_backbone(model, in_channels: int, model_kwargs: dict) -> nn.Module:
        if isinstance(model, str):
            if model_accepts(model, "image_size"):
                raise ConfigError(f"model {model!r} is a token model; dense tasks need a ResNet-style backbone")
            return create_model(model, num_classes=1, in_channels=in_channels, **model_kwargs)
        if isinstance(model, nn.Module) and follows_protocol(model):
            return model
        raise ConfigError("model must be a registered backbone name or an nn.Module with stem, units and head")

    @staticmethod
    @torch.no_grad()
    def _probe(stem: nn.Module, stages: list[nn.Module], in_channels: int, size: int):
        mods = [stem, *stages]
        modes = [m.training for m in mods]
        x = torch.zeros(1, in_channels, size, size, device=next(stem.parameters()).device)
        channels, strides = [], []
        try:
            for m in mods:
                m.eval()
            x = stem(x)
            for st in stages:
                x = st(x)
                if x.dim() != 4:
                    raise ConfigError("dense tasks need stage outputs B x C x H x W")
                channels.append(int(x.shape[1]))
                strides.append(max(1, size // int(x.shape[-1])))
        finally:
            for m, mode in zip(mods, modes):
                m.train(mode)
        return channels, strides

    # ----------------------------------------------------------------- compute
    def autocast(self, x: torch.Tensor):
        """The autocast context of this learner's ``amp_dtype`` on ``x``'s device (a no-op without AMP).
        Public so that schedulers running blocks themselves (pipeline, benchmarks) compute the same."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=x.device.type, dtype=self.amp_dtype)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the blocks expect it (channels-last when the learner is)."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"images must be [B, {self.in_channels}, H, W] float tensors, got {list(x.shape)}")
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def run_block(self, k: int, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every stage of block k (the stem, if any, is not a stage)."""
        outs = []
        for i, m in enumerate(self.blocks[k]):
            x = m(x)
            if i > 0 or k > 0:
                outs.append(x)
        return outs

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every stage's output (C2..C5 for a ResNet), no detaching."""
        feats: list[torch.Tensor] = []
        h = x
        for k in range(self.K):
            outs = self.run_block(k, h)
            feats += outs
            h = outs[-1]
        return feats

    def forward(self, x: torch.Tensor) -> Any:
        """Inference: backbone + final task head (raw outputs; see :meth:`predict`)."""
        x = self.prepare_input(x)
        with self.autocast(x):
            return self.final(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Any:
        """Post-processed predictions of the final head (the auxiliary networks are not used)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        return self.task.predict(self(x), hw)

    def local_step(self, k: int, inp: torch.Tensor, feats: list[torch.Tensor], batch: LocalBatch,
                   grad_scale: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Block k's whole work as one schedulable unit: forward, local (or, for the last block, task)
        loss, backward, EMA. ``feats`` are the detached stage outputs of the blocks before; returns them
        extended by this block's (detached) stage outputs, and the detached loss."""
        last = k == self.K - 1
        with self.autocast(inp):
            outs = self.run_block(k, inp)
            if last:
                hw = (int(batch.x.shape[-2]), int(batch.x.shape[-1]))
                loss = self.task.loss(self.final(feats + outs), batch.y, hw)
            else:
                loss = self.auxes[k](outs[-1], batch)
        (loss * grad_scale if grad_scale is not None else loss).backward()
        if not last:
            aux = self.auxes[k]
            if isinstance(aux, MomentumAux):
                aux.update_ema(self.momentum)
        return feats + [o.detach() for o in outs], loss.detach()

    def train_step(self, x: torch.Tensor, targets: Any, *, zero_grad: bool = True,
                   grad_scale: torch.Tensor | None = None) -> DenseStepOutput:
        """Every block's forward, local loss and backward, the EMA updates, then the final head's task
        loss on all stage outputs (earlier blocks' outputs detached). Leaves ``.grad``; no optimiser step."""
        if zero_grad:
            self.zero_grad(set_to_none=True)
        x = self.prepare_input(x)
        batch = LocalBatch(x, targets, self.norm_mean, self.norm_std)
        feats: list[torch.Tensor] = []
        losses: list[torch.Tensor] = []
        h = x
        for k in range(self.K):
            feats, loss = self.local_step(k, h, feats, batch, grad_scale)
            h = feats[-1]
            losses.append(loss.float())
        return DenseStepOutput(torch.stack(losses).tolist())

    def extra_repr(self) -> str:
        return (f"task={type(self.task).__name__}, method={self.method}, K={self.K}, stage_cuts={self.stage_cuts}, "
                f"stage_strides={self.stage_strides}, momentum={self.momentum}")
