"""Typed training configuration: one flat dataclass, YAML files, ``key=value`` overrides.

Why a single flat dataclass (nanoGPT style): every knob of a run is visible in one place, is
stored verbatim in each checkpoint, and can be changed from the command line with the same
``key=value`` syntax that a YAML recipe uses.  Values are checked against the type of the field's
default *before* anything is built, so a typo fails in milliseconds with a message that names
the key, not twenty minutes later with a traceback from deep inside the trainer.

This module is a leaf: it imports neither the models nor the data package at import time.  The
registries (models, rules, datasets) are consulted lazily inside :func:`validate` so that names
are checked against what is really installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, List, Mapping, Optional, Tuple, Union

import yaml

from manlearn.errors import ConfigError

__all__ = [
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "validate",
    "config_keys",
    "read_config_file",
    "validate_any",
    "OPTIMIZERS",
    "SCHEDULES",
    "AMP_MODES",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine-warmup", "cosine-iter", "constant")
AMP_MODES = ("off", "bf16", "fp16")
BASES = ("dgl", "infopro")
INITS = ("copy", "random")
LAMBDA_SCHEDULES = ("stage", "module")
INFOPRO_HEADS = ("auto", "cifar", "imagenet")
DIST_BACKENDS = ("auto", "gloo", "nccl")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", "~"}


@dataclass
class TrainConfig:
    """Everything that defines a training run.

    The defaults are the project's main job: MAN++ on top of InfoPro, ResNet-32 with K=16
    gradient-isolated pieces (the stem is its own piece), trained on Fashion-MNIST with the
    shared FM-R32 protocol of SPEC §8 (SGD 0.9 Nesterov, wd 1e-4, lr 0.1, per-iteration cosine to
    0, batch 128).  ``epochs`` is modest (10) so the default run finishes; override it freely.
    """

    # --- model / local-learning method -------------------------------------------------------
    model: str = "resnet32"
    method: str = "manpp"
    base: str = "infopro"  # base rule of man/manpp: dgl | infopro
    K: int = 16  # number of gradient-isolated pieces (ignored by e2e)
    # a name (auto | paper | memory | uniform | balanced) or explicit boundaries: unit counts
    # [3, 8, 15] or (stage, unit) pairs [[1, 0], [2, 3], [3, 4]], the last one the network's end
    split: Union[str, List[Union[int, Tuple[int, int]]]] = "auto"
    stem_module: bool = True  # MAN++: the stem is its own local piece
    momentum: float = 0.995  # EMA momentum of the momentum auxiliary network
    init: str = "copy"  # ema/lb start as copies of the next unit ("random" = authors' code)
    lambda_schedule: str = "stage"  # InfoPro λ interpolation: stage | module
    # InfoPro heads: auto (imagenet for inputs >= 128 px) | cifar (λ 5/0.5 -> 0/0) | imagenet (deeper
    # decoder/classifier, constant λ 5/0.75; SPEC 2.2)
    infopro_heads: str = "auto"

    # --- data ---------------------------------------------------------------------------------
    dataset: str = "fashion-mnist"
    data_dir: Optional[str] = None
    train_limit: Optional[int] = None  # use only the first N training images
    test_limit: Optional[int] = None  # evaluate on the first N test images
    image_size: Optional[int] = None  # None = the dataset's native size
    data_workers: int = 8  # streamed datasets (imagenet): DataLoader decode processes

    # --- length -------------------------------------------------------------------------------
    epochs: int = 10
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = no cap)

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine-iter"  # cosine-warmup | cosine-iter | constant
    warmup_epochs: int = 0
    warmup_lr: float = 0.01

    # --- execution ----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    channels_last: bool = True  # faster on CPU (BENCHMARKS.md, `manlearn bench speed --no-channels-last`)
    compile: bool = False
    # Memory for compute (same gradients): MAN/MAN++ recompute the frozen ema unit in backward;
    # grad_checkpoint recomputes every block stage by stage (the E2E baseline of the benchmarks).
    ema_recompute: bool = False
    grad_checkpoint: bool = False

    # --- scaling out (issue #4; docs/scaling.md) ----------------------------------------------
    # Data parallelism is switched on by launching with torchrun; batch_size stays the global batch.
    dist_backend: str = "auto"  # auto (nccl on CUDA, gloo on CPU) | gloo | nccl
    dist_timeout_s: float = 1800.0  # collective timeout of the data-parallel process group
    sync_bn: bool = False  # data parallel: SyncBatchNorm over the ranks (CUDA only)
    pipeline_workers: int = 0  # >= 2: spread the K blocks over that many worker processes
    pipeline_queue_depth: int = 2  # micro-batches in flight per pipeline link (bounds memory)
    pipeline_param_sync_every: int = 1  # MAN: next worker sends its first unit every n steps
    pipeline_param_delay: int = 2  # MAN: step t uses that unit as of step <= t - delay (>= 1)
    pipeline_timeout_s: float = 120.0  # a pipeline worker silent this long stops the run

    # --- output -------------------------------------------------------------------------------
    out_dir: str = "runs/default"
    ckpt_every_steps: int = 0  # 0 = checkpoint only at epoch ends (and at the end of the run)
    eval_every: int = 1  # evaluate every N epochs (0 = only after the last epoch)
    log_every: int = 50  # write a step record to metrics.jsonl every N steps (0 = never)
    progress: bool = True  # tqdm progress bar (only shown on a terminal)


# -------------------------------------------------------------------------------------------
# types
# -------------------------------------------------------------------------------------------


# Every function below takes the config dataclass as ``cls`` (default :class:`TrainConfig`), so that other
# flat configs (``manlearn.dense.DenseConfig``) get the same typed YAML / ``key=value`` machinery.


def _field_types(cls: type = TrainConfig) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def config_keys(cls: type = TrainConfig) -> list[str]:
    """The valid configuration keys of ``cls`` (a config dataclass), in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        name = " or ".join(names)
        return f"{name} or none" if type(None) in args else name
    if origin in (list, List):
        (arg,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(arg)}"
    if origin in (tuple, Tuple):
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {_type_name(args[0])}"
        return "(" + ", ".join(_type_name(a) for a in args) + ")"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: the value does not fit the type."""


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise :class:`_Mismatch`.

    Strings are parsed (they come from the command line, or from YAML scalars such as ``1e-4``
    that YAML 1.1 reads as strings); other values must already have the right shape.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE)):
            return None
        # Try str last, so that "[[1, 2]]" for Union[str, list] becomes a list.
        ordered = sorted((a for a in args if a is not type(None)), key=lambda a: a is str)
        looks_like_list = isinstance(value, str) and value.strip().startswith(("[", "("))
        if looks_like_list and any(typing.get_origin(a) in (list, List, tuple, Tuple) for a in ordered):
            ordered = [a for a in ordered if a is not str]  # a malformed list is an error, not a name
        for arg in ordered:
            try:
                return _coerce(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin in (list, List, tuple, Tuple):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                raise _Mismatch from None
        if not isinstance(value, (list, tuple)):
            raise _Mismatch
        args = typing.get_args(tp)
        if origin in (list, List):
            item = args[0] if args else Any
            return [_coerce(v, item) for v in value]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0]) for v in value)
        if args and len(args) != len(value):
            raise _Mismatch
        return tuple(_coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str):
            s = value.strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
        raise _Mismatch
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            s = value.strip().replace("_", "")
            if re.fullmatch(r"[+-]?\d+", s):
                return int(s)
        raise _Mismatch
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch from None
            return out
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise _Mismatch  # pragma: no cover - a field type this module does not know


def _unknown_key_error(key: str, where: str = "", cls: type = TrainConfig) -> ConfigError:
    keys = config_keys(cls)
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    src = f" in {where}" if where else ""
    return ConfigError(f"unknown config key '{key}'{src}{hint}; valid keys: {', '.join(keys)}")


def _set(values: dict[str, Any], key: str, raw: Any, where: str = "", cls: type = TrainConfig) -> None:
    types_ = _field_types(cls)
    if key not in types_:
        raise _unknown_key_error(key, where, cls)
    tp = types_[key]
    try:
        values[key] = _coerce(raw, tp)
    except _Mismatch:
        src = f" ({where})" if where else ""
        raise ConfigError(
            f"config key '{key}'{src} expects {_type_name(tp)}, got {raw!r}"
        ) from None


# -------------------------------------------------------------------------------------------
# construction
# -------------------------------------------------------------------------------------------


def validate_any(cfg: Any) -> Any:
    """Validate a config of any class: :func:`validate` for a :class:`TrainConfig`, else the class's own
    ``validate()`` method (one ConfigError listing every problem)."""
    if isinstance(cfg, TrainConfig):
        return validate(cfg)
    check = getattr(cfg, "validate", None)
    if callable(check):
        check()
    return cfg


def config_from_dict(data: Mapping[str, Any], *, base: Any = None,
                     where: str = "", check: bool = True, cls: type | None = None) -> Any:
    """Build a config from a mapping, type-checking every key; unknown keys are refused.

    ``cls`` is the config dataclass (default: ``type(base)``, else :class:`TrainConfig`).
    """
    cls = cls if cls is not None else (type(base) if base is not None else TrainConfig)
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config{' in ' + where if where else ''} must be a mapping of key: value, "
                          f"got {type(data).__name__}")
    values = dataclasses.asdict(base) if base is not None else {}
    for key, raw in data.items():
        _set(values, str(key), raw, where, cls)
    cfg = cls(**values)
    if check:
        validate_any(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain ``dict`` of a config (tuples kept), the form stored in checkpoints."""
    return dataclasses.asdict(cfg)


def _lists(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_lists(x) for x in v]
    if isinstance(v, dict):
        return {k: _lists(x) for k, x in v.items()}
    return v


def config_to_yaml(cfg: Any) -> str:
    """The config as the YAML a run writes to ``out_dir/config.yaml`` (tuples as lists), loadable
    again with :func:`load_config`."""
    return yaml.safe_dump(_lists(config_to_dict(cfg)), sort_keys=False)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe (not yet typed); lets a caller pick the config class, e.g. by
    the recipe's ``task:`` key, before building it."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config in {p} must be a mapping of key: value, got {type(data).__name__}")
    return dict(data)


def load_config(path: str | Path, *, check: bool = True, cls: type = TrainConfig) -> Any:
    """Read a YAML recipe (a flat mapping of config keys) on top of the defaults of ``cls``."""
    return config_from_dict(read_config_file(path), where=str(path), check=check, cls=cls)


def apply_overrides(cfg: Any, overrides: Iterable[str], *, check: bool = True) -> Any:
    """Return a copy of ``cfg`` with ``key=value`` strings applied.

    Values are parsed for the type of the field: bools accept true/false/1/0/yes/no, optional
    fields accept ``none``, lists/tuples use YAML syntax (``split=[[1,0],[2,3]]``).
    """
    values = dataclasses.asdict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        if key not in values and key.replace("-", "_") in values:
            key = key.replace("-", "_")
        _set(values, key, raw, "command line", type(cfg))
    out = type(cfg)(**values)
    if check:
        validate_any(out)
    return out


# -------------------------------------------------------------------------------------------
# validation
# -------------------------------------------------------------------------------------------


def _registries() -> tuple[list[str] | None, list[str] | None, list[str] | None]:
    """Names of models, rules and datasets, or None for a registry that cannot be imported."""
    models = rules = datasets = None
    try:
        import manlearn

        models = list(manlearn.list_models())
        rules = list(manlearn.list_rules())
    except (ImportError, AttributeError):  # the core is being written; names checked later
        pass
    try:
        from manlearn.data import list_datasets

        datasets = list(list_datasets())
    except (ImportError, AttributeError):
        pass
    return models, rules, datasets


def _one_of(problems: list[str], key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{key}='{value}' is not one of: {', '.join(allowed)}{hint}")


# Checks shared by validate() and manlearn.dense.config.validate_dense(): each appends its problem (if any)
# to ``problems`` so that one ConfigError can list them all.

def _at_least(problems: list[str], cfg: Any, keys: Iterable[str], low: int, *, or_none: bool = False) -> None:
    """``key must be >= low`` for every key of ``cfg`` below ``low`` (``or_none``: None is allowed too)."""
    for key in keys:
        v = getattr(cfg, key)
        if or_none and v is None:
            continue
        if v < low:
            problems.append(f"{key} must be >= {low}{' or none' if or_none else ''}, got {v}")


def _positive(problems: list[str], key: str, value: float) -> None:
    if not (value > 0) or not math.isfinite(value):
        problems.append(f"{key} must be > 0, got {value}")


def _non_negative(problems: list[str], key: str, value: float) -> None:
    if not (value >= 0) or not math.isfinite(value):
        problems.append(f"{key} must be >= 0, got {value}")


def _unit_interval(problems: list[str], label: str, value: float, *, include_one: bool = True) -> None:
    """``value`` in [0, 1] (``include_one=False``: [0, 1))."""
    ok = (0.0 <= value <= 1.0) if include_one else (0.0 <= value < 1.0)
    if not ok or math.isnan(value):
        problems.append(f"{label} must be in [0, {'1]' if include_one else '1)'}, got {value}")


def _finish(problems: list[str], cfg: Any, *, devices: str, device_names: str, what: str) -> Any:
    """The checks every config ends with (``device`` matches the regex ``devices``, a non-empty
    ``out_dir``); raise one ConfigError listing all the problems, or return ``cfg``."""
    if not re.fullmatch(devices, cfg.device):
        problems.append(f"device must be {device_names}, got '{cfg.device}'")
    if not cfg.out_dir.strip():
        problems.append("out_dir must not be empty")
    if problems:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems))
    return cfg


def validate(cfg: TrainConfig, *, registries: bool = True) -> TrainConfig:
    """Check the values (ranges, choices, registered names); raise one ConfigError listing all."""
    p: list[str] = []
    if registries:
        models, rules, datasets = _registries()
        if models is not None:
            _one_of(p, "model", cfg.model, models)
        if rules is not None:
            _one_of(p, "method", cfg.method, rules)
        if datasets is not None:
            _one_of(p, "dataset", cfg.dataset, datasets)
    _one_of(p, "base", cfg.base, BASES)
    _one_of(p, "init", cfg.init, INITS)
    _one_of(p, "lambda_schedule", cfg.lambda_schedule, LAMBDA_SCHEDULES)
    _one_of(p, "infopro_heads", cfg.infopro_heads, INFOPRO_HEADS)
    _at_least(p, cfg, ("data_workers",), 0)
    _one_of(p, "optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of(p, "schedule", cfg.schedule, SCHEDULES)
    _one_of(p, "amp", cfg.amp, AMP_MODES)

    if cfg.K < 1:
        p.append(f"K must be >= 1, got {cfg.K}")
    if isinstance(cfg.split, str) and not cfg.split.strip():
        p.append("split must be a name (e.g. 'auto') or a list of [stage, unit] boundaries")
    _unit_interval(p, "momentum (EMA)", cfg.momentum)
    _at_least(p, cfg, ("train_limit", "test_limit", "image_size"), 1, or_none=True)
    _at_least(p, cfg, ("epochs", "batch_size", "eval_batch_size"), 1)
    _at_least(p, cfg, ("max_steps", "warmup_epochs", "seed", "ckpt_every_steps", "eval_every", "log_every"), 0)
    _positive(p, "lr", cfg.lr)
    _unit_interval(p, "sgd_momentum", cfg.sgd_momentum, include_one=False)
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.sgd_momentum == 0:
        p.append("nesterov=true needs sgd_momentum > 0")
    _non_negative(p, "weight_decay", cfg.weight_decay)
    _non_negative(p, "warmup_lr", cfg.warmup_lr)
    if cfg.schedule == "cosine-warmup" and cfg.warmup_epochs >= cfg.epochs and cfg.epochs >= 1:
        p.append(f"warmup_epochs ({cfg.warmup_epochs}) must be < epochs ({cfg.epochs})")
    _one_of(p, "dist_backend", cfg.dist_backend, DIST_BACKENDS)
    for key in ("dist_timeout_s", "pipeline_timeout_s"):
        v = getattr(cfg, key)
        if not (v > 0) or not math.isfinite(v):
            p.append(f"{key} must be a positive number of seconds, got {v}")
    if cfg.pipeline_workers < 0 or cfg.pipeline_workers == 1:
        p.append(f"pipeline_workers must be 0 (off) or >= 2, got {cfg.pipeline_workers}")
    _at_least(p, cfg, ("pipeline_queue_depth", "pipeline_param_sync_every", "pipeline_param_delay"), 1)
    return _finish(p, cfg, devices=r"auto|cpu|mps|cuda(:\d+)?", device_names="auto, cpu, cuda, cuda:N or mps",
                   what="config")
