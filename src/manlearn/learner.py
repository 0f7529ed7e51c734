"""LocalLearner: a backbone cut into K gradient-isolated blocks, each with its auxiliary network.

One engine for every task: built from a backbone, a task (classification by default; detection and
segmentation read several stages), a rule and a split. It owns modules and the training step of
SPEC §1 and nothing else: no data, files, optimiser or device policy beyond the tensors it is given.
No rule, task or model is named here: everything comes through their interfaces.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from .concurrency import overlapped_step
from .errors import ConfigError
from .memory import unit_activation_bytes
from .planning import MemoryPlan, MemoryWarning, aux_parts, cut_costs, memory_check, no_build_check, plan_learner
from .models import adapt_model, create_model, follows_protocol, init_weights, model_accepts
from .models.base import feature_info
from .rules import AuxContext, LocalBatch, check_momentum, create_rule
from .rules.base import register_norm_buffers
from .recompute import Segment, checkpoint_granularity, checkpoint_module, granularity_groups, run_checkpointed, stage_segments
from .split import Split, is_vit_like, resolve_split, stage_ends
from .tasks import ClassificationTask, check_task
from .tasks.base import check_head_fits

_ONE_IMAGE = ("a batch of 1 image cannot train this learner: {} needs more than one value per channel in training; "
              "train on batches of 2 or more (a DataLoader's drop_last=True drops a last batch of one)")
_AMP_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
              "off": None}


def _autocast_dtype(value: Any) -> torch.dtype | None:
    """``amp_dtype`` as a dtype: the config's names ('bf16', 'fp16', 'off') are taken too."""
    dtype = _AMP_NAMES.get(value, value) if isinstance(value, str) else value
    if dtype not in (None, torch.bfloat16, torch.float16):
        raise ConfigError(f"amp_dtype must be torch.bfloat16, torch.float16 or None ('bf16', 'fp16', 'off'), got "
                          f"{value!r}")
    return dtype


class StepOutput:
    """Result of :meth:`LocalLearner.train_step`.

    ``loss_values`` is a 1-D tensor on the learner's device (one loss per block, detached): the step
    does not wait for the device. ``losses`` turns it into Python floats on first access (one host
    sync), for logging.
    """

    def __init__(self, logits: Any, loss_values: torch.Tensor) -> None:
        self.logits = logits              # final head's outputs, detached (logits for classification)
        self.loss_values = loss_values
        self._losses: list[float] | None = None

    @property
    def losses(self) -> list[float]:
        """One local loss per block as floats; the last is the task loss."""
        if self._losses is None:
            self._losses = self.loss_values.tolist()
        return self._losses

    @property
    def loss(self) -> float:
        return self.losses[-1]


def _refuse_unsynced() -> None:
    """Refuse a plain train_step on one rank of several: its gradients would never be averaged (wrapping
    the learner in DistributedDataParallel does not help — train_step runs K backward passes of its own)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            f"train_step on rank {dist.get_rank()} of {dist.get_world_size()} would leave the gradients unsynced "
            "(DistributedDataParallel does not see the learner's K backward passes). Average them per block with "
            "manlearn.distributed.GradReducer: r = GradReducer(learner, world_size); "
            "learner.train_step(x, y, after_block=r.block_done); r.finish(); opt.step() "
            "(README: data parallelism in your own loop), or pass local_only=True to train each rank alone")


def _detach(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, dict):
        return {k: _detach(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_detach(v) for v in out)
    return out


class LocalLearner(nn.Module):
    """Supervised local learning of a backbone (SPEC.md §1-4), for any task.

    Args:
        model: a registered model name (see ``manlearn.list_models()``) or an ``nn.Module`` with
            ``stem``, ``units`` and ``head`` (optionally ``unit_ids`` for the published split tables).
            Units may output feature maps ``B x C x H x W`` or tokens ``B x N x D`` (ViT); a registered
            factory that takes ``image_size`` (ViT) is built for this learner's ``image_size``.
        method: a registered rule (``manlearn.list_rules()``): ``e2e``, ``greedy``, ``dgl``, ``infopro``,
            ``infopro-contrast``, ``man``, ``manpp`` or one of your own (``manlearn.register_rule``).
        K: real number of gradient-isolated pieces (ignored by ``e2e``; K=1 is plain backprop).
        num_classes, in_channels, image_size: the classification task's classes (default: those of your
            network's last Linear layer, 10 for a registered model), and the input the shapes are probed with
            (dense tasks accept any size at training time).
        task: ``manlearn.tasks.ClassificationTask(num_classes)`` by default; ``RetinaNetTask``,
            ``DeepLabV3Task`` or any object following :class:`manlearn.tasks.Task`.
        split: ``auto`` | ``paper`` | ``memory`` | ``uniform`` | ``balanced`` | ``stages`` |
            ``stages:1,2,3`` (cuts after those stages, 1-based) | list of boundaries. ``auto``: a published
            table that gives K pieces, else equal groups of transformer blocks (ViT), else cuts on stage
            boundaries (every stage boundary and memory-balanced cuts inside stages when K exceeds the
            stages), else the ``memory`` cut; tasks that read every stage get ``stages``.
        stem_module: the stem is its own piece (MAN++ code); default True, False for ViTs (the patch
            embedding joins the first group, as in the MAN++ ViT recipe) and stage-reading tasks.
        normalization: the input's (mean, std) per channel, used to de-normalise InfoPro's target image.
        amp_dtype: run forwards under ``torch.autocast`` with this dtype (``torch.bfloat16`` or ``'bf16'``, fp16 on CUDA).
        channels_last: keep weights and activations in channels-last memory format.
        grad_checkpoint: run every block under gradient checkpointing (recompute in backward), in segments
            of one stage (``True`` or ``"stage"``), one unit (``"unit"``) or about sqrt(n) units (``"sqrt"``),
            and each part of every auxiliary network (ema, lb, decoder, classifier, ...) likewise: the same
            gradients and statistics, less memory, more time. With ``method="e2e"`` this is the memory
            baseline of the benchmarks.
        blocks_in_flight: 1 (default) runs a step's blocks in sequence; N > 1 overlaps each block's local
            loss and backward with the next blocks' in N threads on the CPU (each takes the next block), on N CUDA streams
            on a GPU (same results).
        model_kwargs: passed to the model factory when ``model`` is a registered name.
        **rule_options: the options of ``method`` and of its base (each rule's constructor keywords), e.g.
            ``base="infopro"``, ``momentum=0.99``, ``fidelity="authors"`` (MAN/MAN++), ``lambda_schedule=``
            (InfoPro), ``head=`` (DGL), ``depth=`` (AugLocal). A key that no rule in use takes is refused,
            with the nearest option or learner keyword named.
    """

    def __init__(self, model: str | nn.Module = "resnet32", method: str = "manpp", K: int = 16,
                 num_classes: int | None = None, in_channels: int = 3, image_size: int = 32, *, task: Any = None,
                 split: str | Sequence = "auto", stem_module: bool | None = None,
                 normalization: tuple[Sequence[float], Sequence[float]] | None = None,
                 amp_dtype: torch.dtype | str | None = None, channels_last: bool = False,
                 grad_checkpoint: bool | str = False, blocks_in_flight: int = 1,
                 model_kwargs: dict | None = None, **rule_options: Any) -> None:
        super().__init__()
        given_classes = num_classes
        if num_classes is None:  # your network's own classifier says how many; a registered model: 10
            num_classes = _classes_of(model) if isinstance(model, nn.Module) and task is None else 10
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
        self.task = check_task(task if task is not None else ClassificationTask(num_classes))
        num_classes = int(getattr(self.task, "num_classes", num_classes))
        if given_classes is not None and task is not None and given_classes != num_classes:
            raise ConfigError(f"num_classes={given_classes} but the task has {num_classes} classes: give one of them "
                              "(the task's count is the one used)")
        if stem_module is not None and not isinstance(stem_module, bool):
            raise ConfigError(f"stem_module must be True, False or None (the default for the network), got "
                              f"{stem_module!r}")
        if rule_options.get("base", "") is None:
            del rule_options["base"]  # the modifier's default base for this task
        rule = create_rule(method, strict=rule_options, task=self.task, also_known=_ENGINE_OPTIONS)
        self.rule, self.method = rule, method
        # blocks before its own that a block's loss reaches (0: gradient-isolated; HPFF's window: 1)
        self.reaches_back = int(getattr(rule, "reaches_back", 0))
        self.base = getattr(rule, "base_name", None)
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.amp_dtype = _autocast_dtype(amp_dtype)
        self.channels_last = channels_last
        self.blocks_in_flight = blocks_in_flight  # validated by the property setter

        backbone = self._build_backbone(model, num_classes, in_channels, image_size, dict(model_kwargs or {}))
        units = list(backbone.units)
        unit_ids = getattr(backbone, "unit_ids", None)
        self.unit_ids = list(unit_ids) if unit_ids else None
        names = {id(m): n for n, m in (model if isinstance(model, nn.Module) else backbone).named_modules() if n}
        #: each unit's module path in the network given (``units.<j>`` for a registered backbone)
        self.unit_paths = [names.get(id(u), f"units.{j}") for j, u in enumerate(units)]
        shapes = self._probe_shapes(backbone, in_channels, image_size, names)  # shapes[j] = output of unit j-1
        self.split: Split = self._resolve_split(backbone, units, unit_ids, model, 1 if rule.single_block else K,
                                                split, stem_module, shapes)
        self.K = self.split.K

        self._build_blocks(backbone, units, unit_ids, shapes, grad_checkpoint)
        check_head_fits(self.task, self.head, shapes[-1])  # a custom head that cannot read the last unit
        self._build_auxes(backbone, units, unit_ids, shapes)
        mean, std = normalization if normalization is not None else (None, None)
        register_norm_buffers(self, in_channels, mean, std)
        if self._blocks_in_flight > max(self.K, 1):
            raise ConfigError(f"blocks_in_flight={self._blocks_in_flight} exceeds K={self.K}: at most K blocks can "
                              "be in flight (each keeps its activations alive)")
        rule.after_build(self)  # e.g. the authors' preset re-initialises every layer
        if channels_last:
            self.to(memory_format=torch.channels_last)
        self._warn_memory()

    def _warn_memory(self) -> None:
        """One MemoryWarning when this configuration saves less than a tenth of E2E's activations."""
        try:
            line = memory_check(self)
        except (ConfigError, RuntimeError, ValueError, TypeError):
            return  # a network the counting step cannot run (on this device, say) is not refused here
        if line:
            warnings.warn(line, MemoryWarning, stacklevel=3)

    def memory_plan(self, input_size: int | Sequence[int] | None = None, batch_size: int = 1, *,
                    optimizer: str = "sgd") -> MemoryPlan:
        """What one training step keeps at ``batch_size``, per block and part, beside E2E and E2E with
        gradient checkpointing (:mod:`manlearn.planning`). ``input_size`` must be the learner's own."""
        if input_size is not None:
            size = _square_size(input_size, self.in_channels)
            if size != self.image_size:
                raise ConfigError(f"this learner was built for {self.in_channels}x{self.image_size}x{self.image_size} "
                                  f"inputs; plan another size with manlearn.memory_plan(model, input_size=...)")
        return plan_learner(self, batch_size, optimizer=optimizer)

    # ----------------------------------------------------------------- construction helpers
    @staticmethod
    def _build_backbone(model, num_classes: int, in_channels: int, image_size: int, model_kwargs: dict) -> nn.Module:
        if isinstance(model, str):
            if model_accepts(model, "image_size"):
                model_kwargs.setdefault("image_size", image_size)
            return create_model(model, num_classes=num_classes, in_channels=in_channels, **model_kwargs)
        if isinstance(model, nn.Module):
            # a network of another layout (torchvision ResNet, timm ViT, nn.Sequential) is cut in place
            return model if follows_protocol(model) else adapt_model(model)
        raise ConfigError(f"model must be a registered name or an nn.Module, got {type(model).__name__}")

    def _resolve_split(self, backbone, units, unit_ids, model, K, split, stem_module, shapes) -> Split:
        stages_task = self.task.reads == "stages"
        vit_like = is_vit_like(shapes, unit_ids)
        if stem_module is None:  # the published recipes: ViTs and stage-reading tasks keep the stem in block 1
            stem_module = not (stages_task or vit_like)
        if stages_task and split == "auto":
            split = "stages"
        return resolve_split(
            len(units), K, split, bool(stem_module), model if isinstance(model, str) else None, unit_ids,
            vit_like=vit_like,
            unit_costs=lambda: unit_activation_bytes(backbone.stem, units, self.in_channels, self.image_size),
            end_costs=lambda: self._end_costs(backbone, units, shapes, unit_ids, K))

    def _end_costs(self, backbone, units, shapes, unit_ids, K) -> Any:
        """The 'memory' split's measured cost of each cut: the rule's auxiliary network there on class labels."""
        if not getattr(self.task, "per_image_labels", False):
            raise ConfigError(f"the 'memory' split measures each cut with its auxiliary network on per-image class "
                              f"labels, which {type(self.task).__name__} does not have: cut its network with "
                              "split='stages' (or 'stages:1,3'), 'uniform' or 'balanced'")
        return cut_costs(self.rule, self.task, backbone.stem, units, shapes, unit_ids, K=K,
                         num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size,
                         reinit=getattr(backbone, "init_weights", None) or init_weights)

    def _build_blocks(self, backbone, units, unit_ids, shapes, grad_checkpoint: bool | str) -> None:
        """Blocks (nn.Sequential of [stem] + units), the final head, and where the feature taps sit."""
        pieces = self.split.pieces()
        self.blocks = nn.ModuleList(
            nn.Sequential(*([backbone.stem] if has_stem else []), *[units[j] for j in rng]) for has_stem, rng in pieces)
        self.block_ends = [rng.stop if len(rng) else 0 for _, rng in pieces]
        self._stage_ends = stage_ends(unit_ids) if unit_ids else None
        info = getattr(backbone, "feature_info", None)
        taps = [int(t["unit"]) for t in (info if isinstance(info, list) else feature_info(backbone))]
        if self.task.reads == "last":
            taps = [len(units) - 1]
        # positions inside each block's Sequential whose output is a feature tap
        self._tap_positions = [[j - rng.start + int(has_stem) for j in taps if j in rng] for has_stem, rng in pieces]
        self.tap_channels = [int(shapes[j + 1][0]) for j in taps]
        self.tap_strides = [max(1, self.image_size // int(shapes[j + 1][-1])) for j in taps] \
            if all(len(shapes[j + 1]) == 3 for j in taps) else [1] * len(taps)
        if self.task.reads == "last":
            self.head = backbone.head
        else:
            self.head = self.task.final_head(self.tap_channels, self.tap_strides)
        granularity = checkpoint_granularity(grad_checkpoint)
        self.grad_checkpoint = granularity or False  # the granularity in use (truthy), or False
        self._segments: list[list[Segment]] | None = None
        if granularity:
            if self.task.reads != "last":
                raise ConfigError("grad_checkpoint runs whole blocks; it is not available for tasks whose head "
                                  "reads every stage")
            self._segments = [self._block_segments(k, has_stem, rng, unit_ids) for k, (has_stem, rng) in enumerate(pieces)]

    def _build_auxes(self, backbone, units, unit_ids, shapes) -> None:
        reinit = getattr(backbone, "init_weights", None) or init_weights
        auxes = []
        for i in range(self.K - 1):
            nxt = self.block_ends[i]  # index of the first unit of block i+1
            ctx = AuxContext(index=i, K=self.K, h_shape=shapes[nxt], next_unit=units[nxt], next_unit_index=nxt,
                             next_shape=shapes[nxt + 1], next_stage=unit_ids[nxt][0] if unit_ids else None,
                             num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size,
                             reinit=reinit, following_unit=units[nxt + 1] if nxt + 1 < len(units) else None,
                             task=self.task, later_units=units[nxt:], later_shapes=shapes[nxt + 1:],
                             blocks=list(self.blocks[:i + 1]))
            auxes.append(self.rule.build_aux(ctx))
        self.auxes = nn.ModuleList(auxes)
        if self.grad_checkpoint:  # the auxiliary networks' parts are recomputed in backward too
            shared = {id(m) for m in backbone.modules()}
            for aux in auxes:
                for name, part in aux_parts(aux):
                    if id(part) not in shared and not (name == "ema" and getattr(aux, "recompute_ema", False)):
                        checkpoint_module(part)

    def _block_segments(self, k: int, has_stem: bool, unit_range: range, unit_ids) -> list[Segment]:
        """Checkpoint segments of block k at the learner's granularity (the stem joins the first)."""
        mods = list(self.blocks[k])
        stage_of = [unit_ids[j][0] for j in unit_range] if unit_ids else None
        groups = granularity_groups(len(unit_range), self.grad_checkpoint, stage_of)
        return stage_segments(mods, ([None] if has_stem else []) + groups)

    @staticmethod
    @torch.no_grad()
    def _probe_shapes(backbone: nn.Module, in_channels: int, image_size: int,
                      names: dict[int, str] | None = None) -> list[tuple[int, ...]]:
        """Output shape (C, H, W) of the stem (index 0) and of every unit (index j+1); ``names`` (module id ->
        path in the network given) names a layer in a refusal as the user knows it."""
        mods = [backbone.stem, *backbone.units]
        modes = [m.training for m in mods]
        params = [p for p in backbone.parameters()]
        device = params[0].device if params else torch.device("cpu")
        x = torch.zeros(1, in_channels, image_size, image_size, device=device)
        shapes = []
        try:
            with _StridedOnNothing(mods, names) as watch:
                for m in mods:
                    m.eval()
                    try:
                        x = m(x)
                    except RuntimeError as e:
                        raise ConfigError(f"the backbone cannot run on {in_channels}x{image_size}x{image_size} "
                                          f"inputs: {(str(e).strip().splitlines() or [''])[0]}") from None
                    shapes.append(tuple(x.shape[1:]))
            if watch.first is not None:
                name, h, w, stride = watch.first
                raise ConfigError(
                    f"a {image_size}x{image_size} input is too small for this network: {name} (stride {stride}) "
                    f"receives a {h}x{w} map, so it and the layers after it have nothing left to downsample; give "
                    f"inputs of at least {LocalLearner._smallest_size(mods, in_channels, image_size, device)} "
                    "pixels a side (image_size=..., or larger images)")
        finally:
            for m, mode in zip(mods, modes):
                m.train(mode)
        return shapes

    @staticmethod
    @torch.no_grad()
    def _smallest_size(mods: list[nn.Module], in_channels: int, image_size: int, device: torch.device) -> int:
        """The smallest power-of-two multiple of ``image_size`` on which no strided layer gets a 1x1 map."""
        size = image_size
        while size < 4096:
            size *= 2
            x = torch.zeros(1, in_channels, size, size, device=device)
            with _StridedOnNothing(mods) as watch:
                for m in mods:
                    x = m(x)
            if watch.first is None:
                return size
        return size

    # ----------------------------------------------------------------- properties
    @property
    def momentum(self) -> float | None:
        """The EMA momentum of a rule that has one (MAN/MAN++), else None; settable during training."""
        return getattr(self.rule, "momentum", None)

    @momentum.setter
    def momentum(self, m: float) -> None:
        if not hasattr(self.rule, "momentum"):
            raise ConfigError(f"method {self.method!r} has no EMA momentum")
        self.rule.momentum = check_momentum(m)
        for aux in self.auxes:
            if hasattr(aux, "momentum"):
                aux.momentum = self.rule.momentum

    @property
    def blocks_in_flight(self) -> int:
        """How many blocks may have a live graph at once in ``train_step``: 1 runs the blocks strictly in
        sequence; N > 1 overlaps block k's local loss, backward and EMA update (N threads on the CPU) with the
        next blocks' forwards (:mod:`manlearn.concurrency`; same gradients, more activation memory)."""
        return self._blocks_in_flight

    @blocks_in_flight.setter
    def blocks_in_flight(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"blocks_in_flight must be a positive integer (1 = sequential), got {n!r}")
        self._blocks_in_flight = n

    @property
    def stage_cuts(self) -> tuple[int, ...] | None:
        """Stages after which the blocks are cut, when every cut falls at a stage boundary (else None)."""
        ends = self._stage_ends
        cuts = list(self.split.ends[:-1])
        if ends is None or any(e not in ends for e in cuts):
            return None
        return tuple(ends.index(e) + 1 for e in cuts)

    @property
    def stage_channels(self) -> list[int]:
        return self.tap_channels

    @property
    def stage_strides(self) -> list[int]:
        return self.tap_strides

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

    def run_block(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Forward of block k alone (under gradient checkpointing when the learner uses it)."""
        if self._segments is not None:
            return run_checkpointed(self._segments[k], x)
        return self.blocks[k](x)

    def run_block_taps(self, k: int, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward of block k, also returning the outputs of the feature taps inside it."""
        positions = self._tap_positions[k]
        if not positions or self.task.reads == "last":
            h = self.run_block(k, x)
            return h, ([h] if positions else [])
        taps = []
        for i, m in enumerate(self.blocks[k]):
            x = m(x)
            if i in positions:
                taps.append(x)
        return x, taps

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every feature tap's output (one per stage for stage-reading tasks), no detaching."""
        feats: list[torch.Tensor] = []
        for k in range(self.K):
            x, taps = self.run_block_taps(k, x)
            feats += taps
        return feats

    def head_forward(self, h: torch.Tensor, taps: list[torch.Tensor]) -> Any:
        """The final head on what it reads: the last output, or every feature tap."""
        return self.head(h) if self.task.reads == "last" else self.head(taps)

    def forward(self, x: torch.Tensor) -> Any:
        """Inference: backbone + final head only; the auxiliary networks are not used."""
        x = self.prepare_input(x)
        with self.autocast(x):
            if self.task.reads == "last":
                for block in self.blocks:
                    x = block(x)
                return self.head(x)
            return self.head(self.features(x))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> Any:
        """The task's post-processed predictions of the final head (class indices, boxes, label maps)."""
        return self.task.predict(self(x), (int(x.shape[-2]), int(x.shape[-1])))

    def _keep_block_input(self, k: int, inp: torch.Tensor, batch: LocalBatch) -> None:
        if self.reaches_back:  # a later block's loss re-runs this block on its own (detached) input
            batch.block_inputs[k] = inp.detach()
            for old in [j for j in batch.block_inputs if j < k - self.reaches_back]:
                del batch.block_inputs[old]

    def forward_block(self, k: int, inp: torch.Tensor, batch: LocalBatch) -> torch.Tensor:
        """Block k's forward (with autograd) on ``inp``; its feature taps are appended, detached, to
        ``batch.taps``. The first half of :meth:`local_step`, for schedulers that overlap blocks."""
        self._keep_block_input(k, inp, batch)
        with self.autocast(inp):
            h, taps = self.run_block_taps(k, inp)
        if self.task.reads != "last":
            batch.taps.extend(t.detach() for t in taps)
        return h

    def local_loss(self, k: int, h: torch.Tensor, batch: LocalBatch,
                   grad_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Block k's local loss on its output ``h`` (from :meth:`forward_block`), its backward through the
        auxiliary network and block k, then the auxiliary network's ``after_backward`` (MAN's EMA update).
        The second half of :meth:`local_step` (k < K-1); returns the detached loss."""
        with self.autocast(h):
            loss = self.auxes[k](h, batch)
        (loss * grad_scale if grad_scale is not None else loss).backward()
        hook = getattr(self.auxes[k], "after_backward", None)
        if hook is not None:
            hook()
        return loss.detach()

    def local_step(self, k: int, inp: torch.Tensor, batch: LocalBatch,
                   grad_scale: torch.Tensor | None = None) -> tuple[Any, torch.Tensor]:
        """One block's whole work, as one schedulable unit: forward, local loss, backward, and the auxiliary
        network's ``after_backward`` (MAN's EMA update).

        Returns (detached block output, detached loss); for the last block the output is the final
        head's. Feature taps of the block are appended, detached, to ``batch.taps``.
        """
        if k < self.K - 1:
            h = self.forward_block(k, inp, batch)
            return h.detach(), self.local_loss(k, h, batch, grad_scale)
        self._keep_block_input(k, inp, batch)
        with self.autocast(inp):
            h, taps = self.run_block_taps(k, inp)
            out = self.head_forward(h, batch.taps + taps)
            loss = self.task.loss(out, batch.y, batch.image_hw)
        (loss * grad_scale if grad_scale is not None else loss).backward()
        return _detach(out), loss.detach()

    def check_batch(self, x: torch.Tensor, targets: Any) -> None:
        """Refuse inputs this learner cannot train on, before any work (shape, channels, targets)."""
        if not isinstance(x, torch.Tensor):
            raise ConfigError(f"images must be a torch.Tensor, got {type(x).__module__}.{type(x).__name__} "
                              "(torch.as_tensor(x) converts a NumPy array)")
        if self.task.fixed_input_size or self.rule.needs_fixed_input_size():
            expected = (self.in_channels, self.image_size, self.image_size)
            if x.dim() != 4 or tuple(x.shape[1:]) != expected:
                why = "" if self.task.fixed_input_size else " (the rule's auxiliary heads are sized for it)"
                raise ConfigError(f"this learner was built for inputs [B, {expected[0]}, {expected[1]}, {expected[2]}]"
                                  f"{why}; got x {list(x.shape)} (build it with the in_channels and image_size of "
                                  "your data)")
        elif x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"images must be [B, {self.in_channels}, H, W] float tensors, got {list(x.shape)}")
        if not x.is_floating_point():
            raise ConfigError(f"images must be float tensors, got {x.dtype} (convert them, e.g. x.float() / 255)")
        if x.shape[0] == 0:
            raise ConfigError("an empty batch (0 images): nothing to train on")
        if x.shape[0] == 1 and self.training and any(isinstance(m, nn.BatchNorm1d) for m in self.modules()):
            raise ConfigError(_ONE_IMAGE.format("a BatchNorm1d layer (DGL's auxiliary heads have them)"))
        weight = next((p for p in self.blocks[0].parameters() if p.is_floating_point()), None)
        if weight is not None and x.dtype != weight.dtype and self.amp_dtype is None:
            raise ConfigError(f"images are {x.dtype} but the learner's weights are {weight.dtype}: convert one of "
                              f"them (x.to({weight.dtype}) or learner.to({x.dtype}))")
        if weight is not None and x.device != weight.device:
            raise ConfigError(f"images are on {x.device} but the learner is on {weight.device}: move one of them")
        if self.amp_dtype == torch.float16 and x.device.type == "cpu":
            raise ConfigError("amp_dtype=torch.float16 does not run on a CPU (autocast on CPU is bfloat16): "
                              "use torch.bfloat16 there, float16 on CUDA")
        # values only where they cost no device sync (on CUDA a NaN input shows as a non-finite loss)
        if x.device.type == "cpu" and not bool(torch.isfinite(x).all()):
            raise ConfigError("the input images hold NaN or infinite values")
        check = getattr(self.task, "check_targets", None)
        if check is not None:
            check(x, targets)

    def train_step(self, x: torch.Tensor, y: Any, *, zero_grad: bool = True,
                   scaler: Any = None, after_block: Callable[[int], None] | None = None,
                   local_only: bool = False) -> StepOutput:
        """Forward of every block, every local backward, the EMA updates (SPEC §1).

        ``y`` are the task's targets (class indices or per-class probabilities for classification;
        per-image box dicts for detection; label maps for segmentation). Leaves ``.grad`` on every
        trainable parameter and does not step an optimiser.

        ``scaler``: a ``torch.amp.GradScaler``; every loss is backpropagated as ``scaler.scale(loss)``, so
        the usual ``scaler.step(opt); scaler.update()`` follows. ``after_block(k)`` is called once block k's gradients (block, auxiliary network) are
        final — data parallelism (:class:`manlearn.distributed.GradReducer`) starts block k's gradient
        all-reduce there. Under an initialised process group of several ranks the step refuses to run
        without it, since nothing else would average the gradients (``local_only=True`` trains each rank
        on its own on purpose).
        """
        self.check_batch(x, y)
        if after_block is None and not local_only:
            _refuse_unsynced()
        grad_scale = scaler.scale(torch.ones((), device=x.device)) if scaler is not None else None
        if zero_grad:
            self.zero_grad(set_to_none=True)
        x = self.prepare_input(x.detach())  # an input that requires grad gets none: the first block is local too
        batch = LocalBatch(x, y, self.norm_mean, self.norm_std)
        # a rule whose loss reaches earlier blocks (HPFF) writes their gradients from two losses: in sequence
        try:
            if self._blocks_in_flight > 1 and self.K > 2 and not self.reaches_back:
                h, losses = overlapped_step(self, x, batch, grad_scale, after_block, self._blocks_in_flight)
            else:
                h, losses = self._sequential_step(x, batch, grad_scale, after_block)
        except ValueError as e:  # torch's, from a BatchNorm that sees one value per channel (a 1x1 map of one image)
            if not str(e).startswith("Expected more than 1 value per channel"):
                raise
            raise ConfigError(_ONE_IMAGE.format("a BatchNorm layer on a 1x1 map") + " (this step stopped part-way)") from None
        wide = torch.float64 if any(v.dtype == torch.float64 for v in losses) else torch.float32
        return StepOutput(h, torch.stack([v.to(wide) for v in losses]))

    def train_blocks(self, blocks: range, h: torch.Tensor, batch: LocalBatch,
                     grad_scale: torch.Tensor | None = None) -> tuple[Any, list[torch.Tensor]]:
        """Blocks ``blocks`` (a consecutive range) on ``h``, the input of the first: each block's local step,
        overlapped as ``blocks_in_flight`` allows (a pipeline worker's share of :meth:`train_step`). Returns
        (the last block's detached output — the final head's when the range ends with block K-1 —, the
        detached loss of every block in the range)."""
        if self._blocks_in_flight > 1 and self.reaches_back == 0 and len(blocks) > 1:
            return overlapped_step(self, h, batch, grad_scale, None, self._blocks_in_flight, blocks)
        losses = []
        for k in blocks:
            h, loss = self.local_step(k, h, batch, grad_scale)
            losses.append(loss)
        return h, losses

    def _sequential_step(self, x: torch.Tensor, batch: LocalBatch, grad_scale: torch.Tensor | None,
                         after_block: Callable[[int], None] | None) -> tuple[Any, list[torch.Tensor]]:
        h, losses = x, []
        back = self.reaches_back  # block k's gradients are final once block k + back's loss is done
        for k in range(self.K):
            h, loss = self.local_step(k, h, batch, grad_scale)
            losses.append(loss)
            if after_block is not None and k >= back:
                after_block(k - back)
        if after_block is not None:
            for k in range(max(0, self.K - back), self.K):
                after_block(k)
        return h, losses

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
        return (f"task={type(self.task).__name__}, method={self.method}, base={self.base}, K={self.K}, "
                f"split={self.split.source}, stem_module={self.split.stem_module}"
                + (f", momentum={self.momentum}" if self.momentum is not None else ""))

    def diagnostics(self) -> dict[str, float]:
        """Scalars the rule's auxiliary networks report about themselves, as ``name/block`` (MAN++:
        ``s/3``, ``lb_vs_ema/3``, ``ema_vs_next/3``); empty for rules that report nothing."""
        out: dict[str, float] = {}
        for i, aux in enumerate(self.auxes):
            report = getattr(aux, "diagnostics", None)
            if callable(report):
                out.update({f"{k}/{i}": float(v) for k, v in report().items()})
        return out

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


class _StridedOnNothing:
    """Watches the strided convolutions and poolings of ``mods`` during a probe: ``first`` is the first one
    that received a 1x1 map (name, H, W, stride), the sign of an input too small for the network."""

    def __init__(self, mods: Sequence[nn.Module], names: dict[int, str] | None = None) -> None:
        self.mods, self.names = mods, names or {}
        self.first: tuple[str, int, int, int] | None = None
        self._hooks: list[Any] = []

    def __enter__(self) -> "_StridedOnNothing":
        kinds = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
        for i, mod in enumerate(self.mods):
            for name, sub in mod.named_modules():
                stride = getattr(sub, "stride", 1)
                s = max(stride) if isinstance(stride, (tuple, list)) else int(stride or 1)
                if isinstance(sub, kinds) and s > 1:
                    where = self.names.get(id(sub)) or (("stem" if i == 0 else f"units.{i - 1}")
                                                        + (f".{name}" if name else ""))
                    self._hooks.append(sub.register_forward_pre_hook(self._check(where, s)))
        return self

    def _check(self, where: str, stride: int) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            h, w = args[0].shape[-2:]
            if self.first is None and h == 1 and w == 1:
                self.first = (where, int(h), int(w), stride)
        return hook

    def __exit__(self, *exc: Any) -> None:
        for hk in self._hooks:
            hk.remove()


def _classes_of(model: nn.Module) -> int:
    """The output width of the network's last Linear layer (its classifier), or 10 when it has none."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else 10


#: the learner's own keywords: a misspelt one is named in the refusal of an unknown rule option
_ENGINE_OPTIONS = tuple(n for n in inspect.signature(LocalLearner.__init__).parameters if n not in ("self", "rule_options"))


def _square_size(input_size: int | Sequence[int], in_channels: int | None = None) -> int:
    """The side of a square input given as S, (S, S) or (C, S, S)."""
    if isinstance(input_size, bool):
        raise ConfigError(f"input_size must be S, (H, W) or (C, H, W), got {input_size!r}")
    if isinstance(input_size, int):
        dims = [input_size]
    else:
        try:
            dims = [int(d) for d in input_size]
        except (TypeError, ValueError):
            raise ConfigError(f"input_size must be S, (H, W) or (C, H, W), got {input_size!r}") from None
        if len(dims) == 3:
            if in_channels is not None and dims[0] != in_channels:
                raise ConfigError(f"input_size {tuple(dims)} has {dims[0]} channels; the network takes {in_channels}")
            dims = dims[1:]
    if not 1 <= len(dims) <= 2 or any(d < 1 for d in dims) or len(set(dims)) != 1:
        raise ConfigError(f"input_size must be a positive square size S, (S, S) or (C, S, S), got {input_size!r}")
    return dims[0]


def memory_plan(model: str | nn.Module, *, input_size: int | Sequence[int], batch_size: int, K: int,
                method: str = "manpp", base: str | None = None, split: str | Sequence = "auto",
                optimizer: str = "sgd", **learner_options: Any) -> MemoryPlan:
    """The memory plan of training ``model`` with ``method`` at K pieces, on ``batch_size`` inputs of
    ``input_size`` (S, (S, S) or (C, S, S)), beside E2E and E2E with checkpointing, without training it.

    ``model`` is what :class:`LocalLearner` accepts (a registered name or your network; a network is not
    changed: the plan works on a copy). ``learner_options`` are further :class:`LocalLearner` keywords."""
    import copy

    in_channels = learner_options.pop("in_channels", None)
    if not isinstance(input_size, int) and not isinstance(input_size, bool):
        try:
            if len(input_size) == 3:  # type: ignore[arg-type]
                in_channels = int(input_size[0])  # type: ignore[index]
        except TypeError:
            pass
    size = _square_size(input_size, in_channels)
    if isinstance(model, nn.Module):
        model = copy.deepcopy(model)
    with no_build_check():
        learner = LocalLearner(model, method=method, base=base, K=K, split=split, image_size=size,
                               in_channels=in_channels or 3, **learner_options)
    return learner.memory_plan(batch_size=batch_size, optimizer=optimizer)
