"""The one interface every local-learning rule implements.

A rule is a factory of auxiliary networks. Each auxiliary network is an ``nn.Module`` whose forward
takes the block output ``h`` and the :class:`LocalBatch` and returns the block's scalar local loss,
so the learner never needs to know which rule it runs. A rule owns its options (the arguments of its
constructor) and its handling of feature maps vs tokens; a *modifier* (MAN, MAN++) wraps any other
registered rule given as ``base``. A rule written in user code and registered with
:func:`register_rule` works as ``method=`` and as ``base=`` exactly like the shipped ones.
"""
from __future__ import annotations

import difflib
import inspect
import threading
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import ConfigError, refuse_clash
from ..runtime import loss_precision  # noqa: F401  (re-exported)


@dataclass
class LocalBatch:
    """What every auxiliary network may look at: the (normalised) input, the targets, and the
    de-normalised image in [0, 1] (computed once per step, only if a rule asks for it)."""

    x: torch.Tensor
    y: Any
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None
    _image01: torch.Tensor | None = field(default=None, repr=False)
    #: detached outputs of the backbone's feature taps produced by the blocks run so far (for tasks whose
    #: final head reads several stages)
    taps: list[torch.Tensor] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    #: detached input of block k, kept by the learner only for rules whose loss reaches earlier blocks
    #: (``Rule.reaches_back`` > 0: HPFF re-runs block k-1 on its own input), and only as far back as needed
    block_inputs: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def image_hw(self) -> tuple[int, int]:
        return int(self.x.shape[-2]), int(self.x.shape[-1])

    @property
    def image01(self) -> torch.Tensor:
        with self._lock:  # auxiliary networks of several blocks may ask at once (manlearn.concurrency)
            return self._image01_locked()

    def _image01_locked(self) -> torch.Tensor:
        if self._image01 is None:
            img = self.x if self.x.dtype == torch.float64 else self.x.float()  # never downcast float64
            if self.mean is not None and self.std is not None:
                img = img * self.std.to(img.device, img.dtype) + self.mean.to(img.device, img.dtype)
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
    task: Any = None                # the learner's task (local head, loss, whether targets are class labels)
    # every unit after the block (next_unit first) and each one's output shape: rules whose auxiliary
    # network follows the rest of the backbone's architecture (AugLocal) read them; never trained through
    later_units: list[nn.Module] = field(default_factory=list)
    later_shapes: list[tuple[int, ...]] = field(default_factory=list)
    # the learner's blocks up to and including this one (blocks[index] is the block this aux trains): a rule
    # whose loss reaches earlier blocks (Rule.reaches_back) re-runs them; hold them as references, not submodules
    blocks: list[nn.Module] = field(default_factory=list)

    def stride(self, shape: tuple[int, ...]) -> int:
        """Input pixels per feature-map pixel for a ``(C, H, W)`` shape (what a task's local head needs)."""
        return max(1, self.image_size // int(shape[-1]))

    def require_feature_maps(self, rule: str, shape: tuple[int, ...], what: str) -> None:
        """Refuse a rule whose auxiliary network needs ``(C, H, W)`` feature maps on tokens (a ViT block)."""
        if len(shape) != 3:
            raise ConfigError(f"{rule} {what} (C, H, W); local block {self.index} outputs {shape} (tokens?)")

    def require_labels(self, rule: str) -> None:
        """Refuse a rule whose heads classify whole images when the task's targets are not class labels."""
        if self.task is not None and not getattr(self.task, "per_image_labels", False):
            raise ConfigError(f"rule {rule!r} trains a classifier of whole images, but task "
                              f"{type(self.task).__name__} has no per-image class labels; use 'greedy' (the task's "
                              "own local head) or man/manpp with base='greedy'")


class Rule:
    """Base class: ``build_aux(ctx, h_shape)`` returns an aux module ``aux(h, batch) -> loss``.

    ``h_shape`` is the shape of the tensor the heads see (the block output, or for MAN the output of
    the ema/lb units), which is why it is passed apart from ``ctx``. The rule's options are its
    constructor's keyword arguments. An auxiliary network may define ``after_backward()``,
    which the learner calls once that block's backward is done (MAN/MAN++ update their EMA there).

    Class attributes: ``name`` (the method name), ``modifier`` (wraps a ``base`` rule, like MAN),
    ``single_block`` (no local blocks at all: K is 1, like ``e2e``), ``summary`` (one line for
    ``manlearn list``), ``reaches_back`` (how many blocks before its own a block's local loss sends
    gradient to: 0 for gradient-isolated blocks; 1 for HPFF's two-block window. The learner then keeps
    those blocks' detached inputs in ``LocalBatch.block_inputs`` and reports a block's gradients as final
    to ``after_block`` only once no later loss can reach it), ``fixed_input_size`` (the auxiliary networks
    are sized for the learner's ``image_size``, like PredSim's pooled linear heads: other sizes are refused).
    """

    name: str = "base"
    modifier: bool = False
    single_block: bool = False
    summary: str = ""
    reaches_back: int = 0
    fixed_input_size: bool = False

    def needs_fixed_input_size(self) -> bool:
        """Whether this rule, or the base rule a modifier wraps, only trains at the learner's ``image_size``."""
        base = getattr(self, "base", None)
        return self.fixed_input_size or (isinstance(base, Rule) and base.needs_fixed_input_size())

    def build_aux(self, ctx: AuxContext, h_shape: tuple[int, ...] | None = None) -> nn.Module:
        raise NotImplementedError

    def bind(self, task: Any) -> None:
        """Called once with the learner's task before any auxiliary network is built."""

    def after_build(self, learner: nn.Module) -> None:
        """Called once the learner is built, before it is moved or used (a preset may re-initialise it)."""

    @classmethod
    def option_names(cls) -> set[str]:
        """Keyword options this rule accepts (its constructor's keyword parameters)."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name for p in params if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}

    def accepted_options(self) -> set[str]:
        """Options this rule instance consumed (a modifier adds its base's)."""
        return type(self).option_names()

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> "Rule":
        """Build the rule from those of ``options`` it accepts (the rest belong to other rules)."""
        own = cls.option_names()
        mine = {k: v for k, v in options.items() if k in own}
        check_option_types(cls, mine)
        return cls(**mine)


def _matches(value: Any, tp: Any) -> bool:
    """Whether ``value`` fits the annotation ``tp`` (simple types, Optional/Union, sequences; anything else
    is not judged)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list) or tp in (tuple, list):
        return isinstance(value, (tuple, list))
    return True


def check_option_types(cls: type, options: Mapping[str, Any]) -> None:
    """Refuse an option whose value does not fit the annotation of the rule's constructor, before the rule is
    built (a wrong type would otherwise surface as a raw error at the first step)."""
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations this check cannot resolve (a user's rule): not judged
        return
    for key, value in options.items():
        tp = hints.get(key)
        if tp is not None and not _matches(value, tp):
            shown = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise ConfigError(f"rule {getattr(cls, 'name', cls.__name__)!r}: option {key}={value!r} must be "
                              f"{shown}, got {type(value).__name__}")


_RULES: dict[str, type[Rule]] = {}


def register_rule(cls: type[Rule] | None = None, *, override: bool = False) -> Any:
    """Decorator: make a rule creatable by its ``name`` (``LocalLearner(method=name)``, ``base=name``); bare
    (``@register_rule``) or ``@register_rule(override=True)`` to replace a built-in of the same name."""
    if cls is None:
        return lambda c: register_rule(c, override=override)
    if not (isinstance(cls, type) and issubclass(cls, Rule)):
        raise ConfigError(f"register_rule expects a subclass of manlearn.Rule, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or name == Rule.name:
        raise ConfigError(f"rule class {cls.__name__} needs a class attribute `name` (the method name)")
    if cls.build_aux is Rule.build_aux and not cls.single_block:
        raise ConfigError(f"rule class {cls.__name__} must implement build_aux(ctx, h_shape=None)")
    refuse_clash("rule", name, _RULES.get(name), cls, override)
    _RULES[name] = cls
    return cls


def list_rules() -> list[str]:
    """Method names accepted by :func:`create_rule` and ``LocalLearner(method=...)``."""
    return sorted(_RULES)


def list_base_rules() -> list[str]:
    """Rules a modifier (``man``, ``manpp``) can wrap: every registered rule with local blocks that is
    not itself a modifier."""
    return sorted(n for n, c in _RULES.items() if not c.modifier and not c.single_block)


def get_rule_class(name: str) -> type[Rule]:
    if name not in _RULES:
        raise ConfigError(f"unknown method {name!r}; available methods: {', '.join(list_rules())}")
    return _RULES[name]


def modifier_base(method: str, base: str | None) -> str | None:
    """The base rule ``method`` wraps, for naming a run or recipe: ``base`` when ``method`` is a registered
    modifier, else None (a rule of a file not imported here counts as no modifier)."""
    return base or None if method in _RULES and _RULES[method].modifier else None


def create_rule(name: str, options: Mapping[str, Any] | None = None, *,
                strict: Mapping[str, Any] | None = None, task: Any = None, also_known: Iterable[str] = ()) -> Rule:
    """The rule ``name`` built from ``options`` (keys other rules take are ignored) and ``strict``
    (keys no rule in the chain takes are refused: what a user asked for explicitly), bound to ``task``
    when one is given. ``also_known``: other names a misspelt key may have meant (the learner's own)."""
    cls = get_rule_class(name)
    opts = {**dict(options or {}), **dict(strict or {})}
    rule = cls.from_options(opts)
    if task is not None:
        rule.bind(task)
    accepted = rule.accepted_options()
    unknown = sorted(set(strict or {}) - accepted)
    if unknown:
        candidates = sorted(accepted | set(also_known))
        hints = [f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, candidates, n=1))
                 else repr(k) for k in unknown]
        raise ConfigError(f"rule {name!r} takes no option {', '.join(hints)}; its options: "
                          f"{', '.join(sorted(accepted)) or '(none)'}")
    return rule

