"""Memory plans: what a training step keeps, per block and part, beside E2E and E2E with checkpointing.

Counted as :class:`~manlearn.memory.PeakMemory` counts on a CPU: the tensors autograd keeps for backward
(deduplicated by storage, parameters and buffers excluded), plus the static state (parameters, buffers,
gradients, optimiser state). The plan runs real training steps on a copy of the learner at two small
batches and extends each figure linearly to the batch asked for: every saved tensor of these networks is
either proportional to the batch or independent of it (per-channel statistics), so two points fix it.
Nothing of the learner (weights, statistics, random streams) changes.

The engine (``LocalLearner``) calls :func:`plan_learner`; this module only uses the learner's public
pieces (blocks, auxiliary networks, head, task), so it sits below it.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError
from .memory import SavedTensorTracker
from .recompute import granularity_groups, run_checkpointed, stage_segments
from .rules import LocalBatch

#: The baselines every plan shows: E2E, and E2E under gradient checkpointing of each granularity.
BASELINES = ("e2e", "e2e+ckpt:stage", "e2e+ckpt:unit", "e2e+ckpt:sqrt")
#: Optimiser state per trainable parameter, in parameter copies.
OPTIMIZER_STATES = {"sgd": 1, "sgd-nomomentum": 0, "adam": 2, "adamw": 2, "none": 0}
#: A configuration keeping more than this share of E2E's activations gets a :class:`MemoryWarning`.
WARN_RATIO = 0.9
SAMPLE_BATCHES = (2, 4)
MiB = 2 ** 20


class MemoryWarning(UserWarning):
    """Local learning as configured saves (almost) no activation memory over end-to-end backprop."""


@dataclass(frozen=True)
class Footprint:
    """One way of training the network: its activation peak and static bytes."""

    peak_activation_bytes: int
    static_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.peak_activation_bytes + self.static_bytes


@dataclass(frozen=True)
class BlockPlan:
    """One gradient-isolated block of the step."""

    index: int
    units: list[str]  # module paths of the block's pieces (the stem included)
    activation_bytes: int  # saved by the block's own forward
    aux_bytes: dict[str, int]  # saved by its auxiliary network, by part (last block: "final head")
    kept_bytes: int  # live while the block trains, from earlier blocks (the input it was handed, ...)
    output_bytes: int  # the detached output handed to the next block
    peak_bytes: int  # the step's activation peak while this block trains

    @property
    def aux_total_bytes(self) -> int:
        return sum(self.aux_bytes.values())


@dataclass(frozen=True)
class MemoryPlan:
    """What one training step keeps (see the module docstring for how it is counted)."""

    method: str
    K: int
    split: str
    input_size: tuple[int, ...]
    batch_size: int
    optimizer: str
    peak_activation_bytes: int
    static_bytes: int
    blocks: list[BlockPlan]
    baselines: dict[str, Footprint]
    static_parts: dict[str, int] = field(default_factory=dict)  # params, buffers, grads, optimizer
    sample_batches: tuple[int, ...] = SAMPLE_BATCHES

    @property
    def total_bytes(self) -> int:
        return self.peak_activation_bytes + self.static_bytes

    def ratio(self, baseline: str = "e2e", total: bool = False) -> float:
        """This configuration's activations (or total) over a baseline's."""
        b = self.baselines[baseline]
        num, den = (self.total_bytes, b.total_bytes) if total else (self.peak_activation_bytes,
                                                                    b.peak_activation_bytes)
        return num / den if den else math.inf

    def peak_block(self) -> BlockPlan:
        return max(self.blocks, key=lambda b: b.peak_bytes)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["total_bytes"] = self.total_bytes
        for name, b in self.baselines.items():
            d["baselines"][name]["total_bytes"] = b.total_bytes
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    def comparison_line(self) -> str:
        """One line: this configuration, E2E and E2E with per-unit checkpointing (activations / total)."""
        line = (f"memory (counted, batch {self.batch_size}, {'x'.join(map(str, self.input_size))}): {self.method} "
                f"K={self.K} keeps {_mib(self.peak_activation_bytes)} of activations, {_mib(self.total_bytes)} in all")
        for name in ("e2e", "e2e+ckpt:unit"):
            if name in self.baselines:
                b = self.baselines[name]
                line += (f" | {name} {b.peak_activation_bytes / MiB:.1f} / {_mib(b.total_bytes)} (this: "
                         f"{self.ratio(name):.2f}x / {self.ratio(name, total=True):.2f}x)")
        return line

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        """A readable table: the blocks, the step's peak, the static state and the baselines."""
        peak_k = self.peak_block().index
        parts = sorted({p for b in self.blocks for p in b.aux_bytes})
        head = ["block", "units", "activations", *[f"aux {p}" for p in parts], "kept", "peak"]
        rows = []
        for b in self.blocks:
            units = _short_units(b.units)
            rows.append([f"{b.index}{' *' if b.index == peak_k else ''}", units, _mib(b.activation_bytes),
                         *[_mib(b.aux_bytes[p]) if p in b.aux_bytes else "" for p in parts],
                         _mib(b.kept_bytes), _mib(b.peak_bytes)])
        widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
        fmt = lambda r: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        lines = [f"memory plan: {self.method}, K={self.K} (split {self.split}), input {'x'.join(map(str, self.input_size))}, "
                 f"batch {self.batch_size}, optimizer {self.optimizer}", "", fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
        static = ", ".join(f"{k} {_mib(v)}" for k, v in self.static_parts.items())
        lines += ["", f"step peak (* block): activations {_mib(self.peak_activation_bytes)}; static {_mib(self.static_bytes)} "
                      f"({static}); total {_mib(self.total_bytes)}", ""]
        lines.append(f"{'':18}{'activations':>14}{'total':>14}{'act. vs this':>14}{'total vs this':>15}")
        lines.append(f"{'this configuration':18}{_mib(self.peak_activation_bytes):>14}{_mib(self.total_bytes):>14}")
        for name, b in self.baselines.items():
            lines.append(f"{name:18}{_mib(b.peak_activation_bytes):>14}{_mib(b.total_bytes):>14}"
                         f"{_times(b.peak_activation_bytes, self.peak_activation_bytes):>14}"
                         f"{_times(b.total_bytes, self.total_bytes):>15}")
        lines += ["", f"counted as PeakMemory counts (saved tensors; static = parameters, buffers, gradients, "
                      f"optimizer state), from real steps at batches {', '.join(map(str, self.sample_batches))} "
                      "extended linearly"]
        return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB" if n >= 10 * MiB else f"{n / MiB:.2f} MiB"


def _times(a: int, b: int) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _short_units(units: list[str]) -> str:
    if len(units) <= 3:
        return ", ".join(units)
    return f"{units[0]} .. {units[-1]} ({len(units)})"


# --------------------------------------------------------------------------- counting
def _bytes(t: Any) -> int:
    if torch.is_tensor(t):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_bytes(v) for v in t)
    if isinstance(t, dict):
        return sum(_bytes(v) for v in t.values())
    return 0


def aux_parts(aux: nn.Module) -> list[tuple[str, nn.Module]]:
    """The parts of an auxiliary network (what the plan reports and ``grad_checkpoint`` recomputes): its
    children, with the base rule's heads of a momentum network (``heads``) and of a wrapper (``base``)
    opened one level."""
    out = []
    for name, child in aux.named_children():
        if name in ("heads", "base") and any(True for _ in child.children()):
            out += [(sub, m) for sub, m in child.named_children()]
        else:
            out.append((name, child))
    return out


class _PartCounter:
    """Forward hooks that record how much each part's forward adds to the live saved bytes."""

    def __init__(self, tracker: SavedTensorTracker, parts: Iterable[tuple[str, nn.Module]]) -> None:
        self.tracker, self.added, self._start, self._handles = tracker, {}, {}, []
        for name, m in parts:
            self._handles.append(m.register_forward_pre_hook(lambda _m, _i, n=name: self._pre(n)))
            self._handles.append(m.register_forward_hook(lambda _m, _i, _o, n=name: self._post(n)))

    def _pre(self, name: str) -> None:
        self._start[name] = self.tracker.live

    def _post(self, name: str) -> None:
        self.added[name] = self.added.get(name, 0) + self.tracker.live - self._start.pop(name)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _sample(learner, b: int, hw: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(learner.parameters()).device
    g = torch.Generator().manual_seed(0)
    h, w = hw or (learner.image_size, learner.image_size)
    x = torch.randn(b, learner.in_channels, h, w, generator=g).to(device)
    y = torch.randint(0, learner.num_classes, (b,), generator=g).to(device)
    return x, y


def _excluded(learner) -> list[torch.Tensor]:
    return [*learner.parameters(), *learner.buffers()]


def _breakdown(work, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """One sequential step, block by block, recording what each block and part keeps."""
    rows: list[dict[str, Any]] = []
    with SavedTensorTracker(_excluded(work), forward_only=True) as tr:
        x = work.prepare_input(x)
        batch = LocalBatch(x, y, work.norm_mean, work.norm_std)
        h: Any = x
        for k in range(work.K):
            last = k == work.K - 1
            kept = tr.live + _bytes(h) + _bytes(batch.taps) + _bytes(batch.block_inputs)
            tr.reset_peak()
            start = tr.live
            parts = aux_parts(work.auxes[k]) if not last else [("final head", work.head)]
            counter = _PartCounter(tr, parts)
            try:
                if not last:
                    out = work.forward_block(k, h, batch)
                    block = tr.live - start
                    # the whole auxiliary forward: hooks on the auxiliary network itself
                    whole = _PartCounter(tr, [("all", work.auxes[k])])
                    try:
                        work.local_loss(k, out, batch)
                    finally:
                        whole.remove()
                    aux = dict(counter.added)
                    other = whole.added.get("all", 0) - sum(aux.values())
                    if other > 0:
                        aux["loss/other"] = other
                    h = out.detach()
                    output = _bytes(h)
                else:
                    head_start: list[int] = []
                    pre = work.head.register_forward_pre_hook(lambda *_: head_start.append(tr.live))
                    try:
                        out, _ = work.local_step(k, h, batch)
                    finally:
                        pre.remove()
                    block = (head_start[0] if head_start else tr.live) - start
                    aux = dict(counter.added)
                    output = 0
            finally:
                counter.remove()
            rows.append(dict(activation=block, aux=aux, kept=kept, output=output, peak=tr.peak))
    return rows


def _step_peak(work, x: torch.Tensor, y: torch.Tensor) -> int:
    """The activation peak of the learner's own ``train_step`` (its scheduler, blocks in flight included)."""
    work.zero_grad(set_to_none=True)
    with SavedTensorTracker(_excluded(work)) as tr:
        type(work).train_step(work, x, y, local_only=True)  # the class's step, not a wrapper set on the instance
    return tr.peak


def _backbone_modules(learner) -> list[nn.Module]:
    """The stem and units in order, recovered from the blocks."""
    return [m for block in learner.blocks for m in block]


def _e2e_peak(work, x: torch.Tensor, y: torch.Tensor, granularity: str | None) -> int:
    """The activation peak of one end-to-end step (``granularity``: gradient checkpointing as
    ``LocalLearner(method="e2e", grad_checkpoint=granularity)`` runs it)."""
    mods = _backbone_modules(work)
    work.zero_grad(set_to_none=True)
    with SavedTensorTracker(_excluded(work)) as tr:
        x = work.prepare_input(x)
        with work.autocast(x):
            if granularity:
                ids = work.unit_ids
                stage_of = [s for s, _ in ids] if ids else None
                groups = granularity_groups(len(mods) - 1, granularity, stage_of)
                h = run_checkpointed(stage_segments(mods, [None] + groups), x)
            else:
                h = x
                for m in mods:
                    h = m(h)
            out = work.head(h)
            loss = work.task.loss(out, y, (int(x.shape[-2]), int(x.shape[-1])))
        loss.backward()
    return tr.peak


def _static(params: Iterable[nn.Parameter], buffers: Iterable[torch.Tensor], optimizer: str,
            own_adam: Iterable[nn.Parameter] = ()) -> dict[str, int]:
    """Bytes that do not grow with the batch. ``own_adam``: parameters an auxiliary network steps with its own
    Adam (PredSim's per-block optimiser): two moments each, and no state in the run's optimiser."""
    params = list({id(p): p for p in params}.values())
    buffers = list({id(b): b for b in buffers}.values())
    own = {id(p): p for p in own_adam}
    trainable = [p for p in params if p.requires_grad]
    grads = sum(_bytes(p) for p in trainable)
    shared = sum(_bytes(p) for p in trainable if id(p) not in own)
    return dict(parameters=sum(_bytes(p) for p in params), buffers=sum(_bytes(b) for b in buffers),
                gradients=grads, optimizer=shared * OPTIMIZER_STATES[optimizer]
                + OPTIMIZER_STATES["adam"] * sum(_bytes(p) for p in own.values()))


def _linear(values: Sequence[int], batches: Sequence[int], batch: int) -> int:
    """The value at ``batch`` of the line through the sampled (batch, value) points (the nearest two)."""
    if len(values) == 1 or batch in batches:
        return int(values[list(batches).index(batch)] if batch in batches else values[0] * batch / batches[0])
    (b1, v1), (b2, v2) = (batches[0], values[0]), (batches[-1], values[-1])
    return max(0, int(round(v1 + (v2 - v1) * (batch - b1) / (b2 - b1))))


def check_plannable(learner) -> None:
    """Refuse, in one line, a learner whose step the plan cannot run (tasks without class targets)."""
    if getattr(learner.task, "reads", None) != "last" or not isinstance(getattr(learner.task, "num_classes", None), int):
        raise ConfigError(f"memory plans cover classification learners; {type(learner.task).__name__} is not "
                          "one (measure its step with manlearn.memory.PeakMemory)")


def plan_learner(learner, batch_size: int, *, optimizer: str = "sgd", baselines: Sequence[str] = BASELINES,
                 sample_batches: Sequence[int] = SAMPLE_BATCHES, breakdown: bool = True,
                 step: bool = True, input_hw: tuple[int, int] | None = None) -> MemoryPlan:
    """The memory plan of ``learner``'s training step at ``batch_size`` (see the module docstring), on inputs
    of ``input_hw`` (height, width; default the learner's ``image_size``) where the network takes them."""
    check_plannable(learner)
    hw = (learner.image_size, learner.image_size) if input_hw is None else (int(input_hw[0]), int(input_hw[1]))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZER_STATES)}, got {optimizer!r}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ConfigError(f"unknown baseline {unknown[0]!r}; choose from {', '.join(BASELINES)}")
    batches = tuple(sample_batches) if batch_size > max(sample_batches) else (batch_size,)
    samples: dict[int, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        work = copy.deepcopy(learner).train()
        for b in batches:
            x, y = _sample(work, b, hw)
            s: dict[str, Any] = {}
            if breakdown:
                s["blocks"] = _breakdown(work, x, y)  # also the warm-up of the step below
            s["step"] = _step_peak(work, x, y) if step else 0
            for name in baselines:
                s[name] = _e2e_peak(work, x, y, name.partition(":")[2] or None)
            samples[b] = s
    at = lambda get: _linear([get(samples[b]) for b in batches], batches, batch_size)  # noqa: E731
    blocks: list[BlockPlan] = []
    paths = list(getattr(learner, "unit_paths", None) or [])
    pieces = learner.split.pieces()
    for k in range(learner.K if breakdown else 0):
        has_stem, rng = pieces[k]
        names = (["stem"] if has_stem else []) + [paths[j] if paths else f"units.{j}" for j in rng]
        first = samples[batches[0]]["blocks"][k]
        blocks.append(BlockPlan(
            index=k, units=names, activation_bytes=at(lambda s: s["blocks"][k]["activation"]),
            aux_bytes={p: at(lambda s, p=p: s["blocks"][k]["aux"].get(p, 0)) for p in first["aux"]},
            kept_bytes=at(lambda s: s["blocks"][k]["kept"]), output_bytes=at(lambda s: s["blocks"][k]["output"]),
            peak_bytes=at(lambda s: s["blocks"][k]["peak"])))
    own_adam = [p for aux in learner.auxes for p in getattr(aux, "trained_parameters", list)()]
    static = _static(learner.parameters(), learner.buffers(), optimizer, own_adam)
    aux_ids = {id(t) for t in [*learner.auxes.parameters(), *learner.auxes.buffers()]}
    e2e_static = _static([p for p in learner.parameters() if id(p) not in aux_ids],
                         [b for b in learner.buffers() if id(b) not in aux_ids], optimizer)
    return MemoryPlan(
        method=_method_name(learner), K=learner.K, split=learner.split.source,
        input_size=(learner.in_channels, *hw), batch_size=batch_size,
        optimizer=optimizer, peak_activation_bytes=at(lambda s: s["step"]), static_bytes=sum(static.values()),
        blocks=blocks, baselines={n: Footprint(at(lambda s, n=n: s[n]), sum(e2e_static.values())) for n in baselines},
        static_parts=static, sample_batches=batches)


def _method_name(learner) -> str:
    return f"{learner.base}+{learner.method}" if learner.base else learner.method


def cut_costs(rule, task, stem: nn.Module, units: Sequence[nn.Module], shapes: Sequence[tuple[int, ...]],
              unit_ids: Sequence[tuple[int, int]] | None, *, K: int, num_classes: int, in_channels: int,
              image_size: int, reinit=None, b: int = 2) -> list[float]:
    """Bytes kept at each cut position 0..n of the units (the ``end_costs`` of a ``memory`` split): what the
    auxiliary network placed after unit j-1 saves for backward on a batch of ``b`` (the final head's end,
    n, costs 0). Each auxiliary network is built as the learner would build it, on a fork of the random
    streams, and run once; the backbone's buffers are put back."""
    from .rules import AuxContext

    n = len(units)
    out = [0.0] * (n + 1)
    if getattr(rule, "reaches_back", 0) or getattr(rule, "single_block", False):
        return out
    modules = [stem, *units]
    buffers = [t.clone() for m in modules for t in m.buffers()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(b, in_channels, image_size, image_size, generator=g)
    y = torch.randint(0, num_classes, (b,), generator=g)
    batch = LocalBatch(x, y)
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for j in range(1, n):
                ctx = AuxContext(index=min(j - 1, K - 2), K=K, h_shape=tuple(shapes[j]), next_unit=units[j], next_unit_index=j,
                                 next_shape=tuple(shapes[j + 1]), next_stage=unit_ids[j][0] if unit_ids else None,
                                 num_classes=num_classes, in_channels=in_channels, image_size=image_size,
                                 reinit=reinit, following_unit=units[j + 1] if j + 1 < n else None, task=task,
                                 later_units=list(units[j:]), later_shapes=list(shapes[j + 1:]),
                                 # a stand-in for the learner's blocks so far (rules that hold their block, as
                                 # PredSim's per-block optimiser, only keep a reference)
                                 blocks=[nn.Sequential(units[j - 1])] * (min(j - 1, K - 2) + 1))
                aux = rule.build_aux(ctx).train()
                h = torch.randn(b, *shapes[j], generator=g).requires_grad_(True)
                with SavedTensorTracker([*aux.parameters(), *aux.buffers()], forward_only=True) as tr:
                    loss = aux(h, batch)
                    out[j] = float(tr.peak)
                    del loss
    finally:
        with torch.no_grad():
            for t, saved in zip((t for m in modules for t in m.buffers()), buffers):
                t.copy_(saved)
    return out


_CHECK_ON_BUILD: contextvars.ContextVar[bool] = contextvars.ContextVar("manlearn_memory_check", default=True)


@contextlib.contextmanager
def no_build_check() -> Iterator[None]:
    """Learners built inside skip the build-time check (a plan that builds its own learner reports it)."""
    token = _CHECK_ON_BUILD.set(False)
    try:
        yield
    finally:
        _CHECK_ON_BUILD.reset(token)


def _forward_estimate(learner, b: int = 2) -> tuple[int, int, int]:
    """(local peak, E2E peak, the block holding the local peak) of saved activations from forward passes only, on the learner itself: a
    cheap estimate for the build-time check (no copy, no backward; buffers and random streams are put
    back). Each block's peak is its forward plus its auxiliary network's; E2E keeps every block's."""
    x, y = _sample(learner, b)
    excluded = _excluded(learner)
    buffers = [t.clone() for t in learner.buffers()]
    was_training = learner.training
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learner.train()
            x = learner.prepare_input(x)
            batch = LocalBatch(x, y, learner.norm_mean, learner.norm_std)
            hw = (int(x.shape[-2]), int(x.shape[-1]))
            local, peak_block = 0, 0
            with learner.autocast(x):
                h = x
                for k in range(learner.K):
                    with SavedTensorTracker(excluded, forward_only=True) as tr:
                        out = learner.blocks[k](h)
                        loss = learner.auxes[k](out, batch) if k < learner.K - 1 else \
                            learner.task.loss(learner.head(out), y, hw)
                        if tr.peak > local:
                            local, peak_block = tr.peak, k
                        del loss
                    h = out.detach()
                    del out
                with SavedTensorTracker(excluded, forward_only=True) as tr:
                    h = x
                    for block in learner.blocks:
                        h = block(h)
                    loss = learner.task.loss(learner.head(h), y, hw)
                    e2e = tr.peak
                    del loss, h
    finally:
        with torch.no_grad():
            for t, saved in zip(learner.buffers(), buffers):
                t.copy_(saved)
        learner.train(was_training)
    return local, e2e, peak_block


def memory_check(learner) -> str | None:
    """At build time: the warning line when the configured local learning keeps more than
    :data:`WARN_RATIO` of E2E's activations (estimated from forward passes at a batch of 2: activations
    scale with the batch), None when it saves more, cannot be estimated (tasks without class targets,
    gradient checkpointing, blocks in flight) or is built under :func:`no_build_check`."""
    if (not _CHECK_ON_BUILD.get() or learner.K < 2 or learner.method == "e2e" or learner.grad_checkpoint
            or learner.blocks_in_flight > 1):
        return None
    try:
        check_plannable(learner)
    except ConfigError:
        return None
    local, e2e, peak_block = _forward_estimate(learner)
    ratio = local / e2e if e2e else 0.0
    if ratio <= WARN_RATIO:
        return None
    better = ["split='memory'"] if learner.split.source not in ("balanced", "memory", "explicit") else []
    # a larger K shrinks the peak only if the block holding it can be cut further
    single = len(learner.blocks[peak_block]) == 1
    if learner.K < len(learner.unit_paths) and not single:
        better.append(f"a larger K than {learner.K}")
    aux = learner.auxes[peak_block] if peak_block < learner.K - 1 else None
    if aux is not None and hasattr(aux, "ema") and not getattr(aux, "recompute_ema", False):
        better.append("ema_recompute=True")
    better.append("gradient checkpointing (grad_checkpoint='unit', here or with E2E)")
    where = (f"block {peak_block} ({'its one piece' if single else f'{len(learner.blocks[peak_block])} pieces'}"
             f"{' and its auxiliary network' if aux is not None else ''}) holds the peak")
    return (f"{_method_name(learner)} at K={learner.K} (split {learner.split.source}) keeps about {ratio:.2f}x "
            f"the activations of end-to-end backprop ({_mib(local)} vs {_mib(e2e)} at batch 2; {where}): it saves "
            f"less than a tenth. Consider {', or '.join(better)}; LocalLearner.memory_plan() shows where the "
            "memory goes")
