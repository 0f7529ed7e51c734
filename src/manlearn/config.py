"""Typed training configuration: one dataclass with a task section, YAML files, ``key=value`` overrides.

Why one dataclass (nanoGPT style): every knob of a run is visible in one place, is stored verbatim in
each checkpoint, and can be changed from the command line with the same ``key=value`` syntax that a
YAML recipe uses.  Values are checked against the type of the field's default *before* anything is
built, so a typo fails in milliseconds with a message that names the key, not twenty minutes later
with a traceback from deep inside the trainer.

Every key means one thing whatever the task.  What only one task reads lives in the **task section**
``task:`` (YAML) / ``task.<key>=...`` (command line): a :class:`ClassificationTask` (the default; a
recipe without ``task:`` is a classification one), a :class:`DetectionTask` (RetinaNet) or a
:class:`SegmentationTask` (DeepLabV3+), selected by ``task.name``::

    task: {name: detection, fpn_channels: 64, head_convs: 2, min_size: 128, max_size: 128}

Length: ``iterations`` (optimiser steps) wins when it is > 0, else ``epochs`` passes over the training
set.  Evaluation: every ``eval_every_epochs`` epochs and every ``eval_every_steps`` steps (0 = off) and
always at the end; checkpoints: at every epoch end, every ``ckpt_every_steps`` steps and at the end.

This module is a leaf: it imports neither torch, the models nor the data package at import time.  The
registries (models, rules, bases, datasets, dense methods) are consulted lazily inside :func:`validate`
so that names are checked against what is really installed.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import yaml

from manlearn.errors import ConfigError
from manlearn.recompute import checkpoint_granularity

__all__ = [
    "TrainConfig",
    "ClassificationTask",
    "DetectionTask",
    "SegmentationTask",
    "TASKS",
    "register_task_section",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "config_to_yaml",
    "flat_config_dict",
    "validate",
    "config_keys",
    "task_keys",
    "read_config_file",
    "validate_any",
    "OPTIMIZERS",
    "SCHEDULES",
    "AMP_MODES",
]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine-warmup", "cosine-iter", "constant", "step-warmup")
AMP_MODES = ("off", "bf16", "fp16")
NONFINITE_MODES = ("stop", "skip")
DIST_BACKENDS = ("auto", "gloo", "nccl")
DETECTION_FORMATS = ("coco",)
SEGMENTATION_FORMATS = ("mask-folder", "cityscapes")
NORMALIZATIONS = ("imagenet", "half")

_TRUE = {"true", "1", "yes", "y", "on"}
_FALSE = {"false", "0", "no", "n", "off"}
_NONE = {"none", "null", "~"}


# -------------------------------------------------------------------------------------------
# the task section
# -------------------------------------------------------------------------------------------


@dataclass
class ClassificationTask:
    """``task.name=classification`` (the default): one label per image, top-1 accuracy.

    The data are the registered ``dataset`` (a shared key: ``manlearn list`` shows the names); the
    classification knobs of the learner (``base``, ``split``, ``stem_module``, InfoPro heads) are shared
    keys too, since they describe the local-learning method.
    """

    name: str = "classification"
    label_smoothing: float = 0.0  # of the final head's cross-entropy
    mixup_alpha: float = 0.0  # > 0: Mixup of training batches with lambda ~ Beta(alpha, alpha)
    cutmix_alpha: float = 0.0  # > 0: CutMix (with mixup_alpha too: one or the other, half the batches each)


@dataclass
class DetectionTask:
    """``task.name=detection``: RetinaNet (FPN P3-P7, focal + box loss) on a stage-cut ResNet, COCO box AP.

    The defaults are the COCO setting of SPEC 3.4 (shorter side 600, longer at most 1000, 256-channel FPN,
    4-conv heads).  Data: a COCO root ``data_dir`` with ``annotations/instances_<split>.json`` and images
    in ``images/<split>`` (the mosaic) or ``<split>`` (COCO's train2017/val2017).
    """

    name: str = "detection"
    data_format: str = "coco"  # coco
    train_split: str = "train2017"
    val_split: str = "val2017"
    num_classes: Optional[int] = None  # none = the foreground classes of the data
    min_size: int = 600  # shorter side resized to this ...
    max_size: int = 1000  # ... unless the longer side would exceed this
    hflip: bool = True  # random horizontal flip of training batches
    normalize: str = "imagenet"  # imagenet (ImageNet mean/std, for ResNet backbones) | half (0.5/0.5)
    model_widths: Optional[List[int]] = None  # planes per stage (4 values): narrow backbones for tests/CPU
    stem_width: Optional[int] = None  # stem channels (default: the first width)
    stage_cuts: Optional[List[int]] = None  # stages after which to cut (default K=4: [1, 2, 3])
    fpn_channels: int = 256
    head_convs: int = 4
    local_channels: Optional[int] = None  # width of the local heads (default: fpn_channels)
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 | giou
    head_norm: bool = False  # GroupNorm in the head towers (off in the paper; steadier from scratch)


@dataclass
class SegmentationTask:
    """``task.name=segmentation``: DeepLabV3+ (ASPP, decoder on the stride-4 feature) on a stage-cut ResNet, mIoU.

    Data: mask folders (``images/<split>/`` + ``masks/<split>/``, what ``manlearn data make-mosaic`` writes)
    or Cityscapes (``leftImg8bit/`` + ``gtFine/``).
    """

    name: str = "segmentation"
    data_format: str = "mask-folder"  # mask-folder | cityscapes
    train_split: str = "train"
    val_split: str = "val"
    num_classes: Optional[int] = None  # none = from the data (background included)
    seg_size: Optional[List[int]] = None  # resize every image to [H, W] at load time
    seg_crop: Optional[List[int]] = None  # training: random crop [H, W] (after seg_scale)
    seg_scale: Optional[List[float]] = None  # training: random rescale [low, high]
    hflip: bool = True
    normalize: str = "imagenet"  # imagenet | half
    model_widths: Optional[List[int]] = None
    stem_width: Optional[int] = None
    stage_cuts: Optional[List[int]] = None
    aspp_channels: int = 256
    decoder: bool = True  # DeepLabV3+ decoder on the stride-4 feature
    local_channels: Optional[int] = None  # width of the local heads (default: aspp_channels)


#: ``task.name`` -> the dataclass of its section.
TASKS: dict[str, type] = {"classification": ClassificationTask, "detection": DetectionTask,
                          "segmentation": SegmentationTask}
TaskConfig = Union[ClassificationTask, DetectionTask, SegmentationTask]


@dataclass
class TrainConfig:
    """Everything that defines a training run (classification, detection or segmentation).

    The defaults are the project's main job: MAN++ on top of InfoPro, ResNet-32 with K=16
    gradient-isolated pieces (the stem is its own piece), trained on Fashion-MNIST with the
    shared FM-R32 protocol of SPEC §8 (SGD 0.9 Nesterov, wd 1e-4, lr 0.1, per-iteration cosine to
    0, batch 128).  ``epochs`` is modest (10) so the default run finishes; override it freely.
    Dense runs set ``task:`` and usually ``iterations`` with ``schedule: step-warmup`` (the recipes
    ``mosaic-*`` / ``coco-*``).
    """

    # --- task: what is learnt, and the knobs only that task reads (see the module docstring) ---
    task: TaskConfig = field(default_factory=ClassificationTask)

    # --- model / local-learning method -------------------------------------------------------
    model: str = "resnet32"
    method: str = "manpp"
    # base rule of man/manpp: any of manlearn.list_base_rules(); the default infopro needs class labels, so
    # detection / segmentation take their task's default (greedy: the task's local head) unless set
    base: str = "infopro"
    # further options of the rule in use, e.g. {depth: 2} for auglocal, {head: mlp-sr} for dgl (command line:
    # rule_options="{depth: 2}"); a key no rule in use takes is refused when the learner is built
    rule_options: Dict[str, Any] = field(default_factory=dict)
    # your own code to import first (module names or .py paths): rules, tasks, models registered there
    # become valid names here (``imports=[my_rules.py]``, or ``manlearn --import my_rules.py``)
    imports: List[str] = field(default_factory=list)
    # a torchvision ResNet/ResNeXt or timm ViT checkpoint file to start the backbone from (keys mapped;
    # detection / segmentation never load the classifier); pretrained_head=false skips it for classification
    pretrained: Optional[str] = None
    pretrained_head: bool = True
    K: int = 16  # number of gradient-isolated pieces (ignored by e2e)
    # a name (auto | paper | memory | uniform | balanced) or explicit boundaries: unit counts
    # [3, 8, 15] or (stage, unit) pairs [[1, 0], [2, 3], [3, 4]], the last one the network's end
    split: Union[str, List[Union[int, Tuple[int, int]]]] = "auto"
    stem_module: bool = True  # MAN++: the stem is its own local piece
    momentum: float = 0.995  # EMA momentum of the momentum auxiliary network
    init: str = "copy"  # ema/lb start as copies of the next unit ("random" = authors' code)
    # InfoPro λ interpolation: auto (stage from K=6, linear below: no block left with a zero loss) | stage
    # (MAN code) | module (InfoPro code) | linear; a schedule that zeroes a block's loss is refused
    lambda_schedule: str = "auto"
    # InfoPro heads: auto (imagenet for inputs >= 128 px) | cifar (λ 5/0.5 -> 0/0) | imagenet (deeper
    # decoder/classifier, constant λ 5/0.75; SPEC 2.2)
    infopro_heads: str = "auto"

    # --- data ---------------------------------------------------------------------------------
    dataset: str = "fashion-mnist"  # classification: a registered dataset (dense tasks read task.data_format)
    data_dir: Optional[str] = None  # none = the dataset's default location (dense tasks need it)
    train_limit: Optional[int] = None  # use only the first N training images
    eval_limit: Optional[int] = None  # evaluate on the first N test / validation images
    image_size: Optional[int] = None  # classification: None = the dataset's native size
    data_workers: int = 8  # decode processes for sets too large to hold in memory (imagenet, full COCO)

    # --- length: iterations wins when > 0 -------------------------------------------------------
    epochs: int = 10
    iterations: int = 0  # optimiser steps of the run (0 = epochs x steps per epoch)
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = no cap); the schedule is unchanged

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = 128
    eval_batch_size: int = 1000
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.1
    sgd_momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    schedule: str = "cosine-iter"  # cosine-warmup | cosine-iter | constant | step-warmup
    warmup_epochs: int = 0  # cosine-warmup: linear warm-up epochs ...
    warmup_lr: float = 0.01  # ... starting from this lr
    lr_steps: List[int] = field(default_factory=list)  # step-warmup: lr x lr_gamma at each of these steps
    lr_gamma: float = 0.1
    warmup_iters: int = 0  # step-warmup: linear warm-up from lr x warmup_factor over these steps
    warmup_factor: float = 0.001

    # --- execution ----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16 (fp16 on CUDA only; bf16 on CUDA or a CPU)
    channels_last: bool = True  # faster on CPU (BENCHMARKS.md, `manlearn bench speed --no-channels-last`)
    compile: bool = False
    # Memory for compute (same gradients): MAN/MAN++ recompute the frozen ema unit in backward;
    # grad_checkpoint recomputes every block in segments: true/stage | unit | sqrt (E2E's memory baseline).
    ema_recompute: bool = False
    # > 1: overlap each block's local loss/backward with the next blocks' work (N threads on the CPU); same
    # results, up to this many blocks' activations alive at once (manlearn.concurrency)
    blocks_in_flight: int = 1
    # default (what the methods intend) | authors: the authors' MAN++ CIFAR computation exactly (SPEC 2.3)
    fidelity: str = "default"
    authors_init: bool = False  # the authors' conv/BN initialisation of the whole learner (one item of fidelity)
    grad_checkpoint: Union[bool, str] = False

    # --- scaling out (issue #4; docs/scaling.md; classification) ------------------------------
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
    eval_every_epochs: int = 1  # evaluate at every N-th epoch end (0 = not at epoch ends)
    eval_every_steps: int = 0  # evaluate every N steps (0 = off); a run always ends with an evaluation
    ckpt_every_steps: int = 0  # also write last.pt every N steps (always: at epoch ends and the end)
    log_every: int = 50  # write a step record to metrics.jsonl every N steps (0 = never)
    progress: bool = True  # tqdm progress bar (only shown on a terminal)
    nonfinite: str = "stop"  # a non-finite loss or gradient: stop (DivergenceError) | skip (drop that step's update)

    def __post_init__(self) -> None:
        # Convenience for Python callers: TrainConfig(task="detection") or task={"name": ..., ...}.
        if isinstance(self.task, (str, Mapping)):
            self.task = _task_section(ClassificationTask(), self.task)

    @property
    def is_dense(self) -> bool:
        """A detection or segmentation run (a stage-cut backbone with dense heads)."""
        return self.task.name != "classification"


# -------------------------------------------------------------------------------------------
# types
# -------------------------------------------------------------------------------------------


# The functions below take a config dataclass as ``cls`` (default :class:`TrainConfig`); the task
# sections use the same typed machinery with their own dataclass and the ``task.`` prefix.


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
    if origin in (dict, Dict):
        return "mapping of key: value"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(Exception):
    """Internal: the value does not fit the type."""


def _coerce_union(value: Any, tp: Any) -> Any:
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


def _from_text(value: Any) -> Any:
    """A command-line string holding a list or mapping, read as YAML; anything else as it is."""
    if isinstance(value, str):
        try:
            return yaml.safe_load(value)
        except yaml.YAMLError:
            raise _Mismatch from None
    return value


def _coerce_sequence(value: Any, tp: Any) -> Any:
    value = _from_text(value)
    if not isinstance(value, (list, tuple)):
        raise _Mismatch
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (list, List):
        item = args[0] if args else Any
        return [_coerce(v, item) for v in value]
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(_coerce(v, args[0]) for v in value)
    if args and len(args) != len(value):
        raise _Mismatch
    return tuple(_coerce(v, a) for v, a in zip(value, args)) if args else tuple(value)


def _coerce_mapping(value: Any, tp: Any) -> dict:
    """A mapping: from YAML (``{depth: 2}`` on the command line) or already a dict; keys are strings."""
    value = _from_text(value)
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise _Mismatch
    args = typing.get_args(tp)
    item = args[1] if len(args) == 2 else Any
    return {k: _coerce(v, item) for k, v in value.items()}


def _coerce_bool(value: Any) -> bool:
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


def _coerce_int(value: Any) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        s = value.strip().replace("_", "")
        if re.fullmatch(r"[+-]?\d+", s):
            return int(s)
    raise _Mismatch


def _coerce_float(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _coerce_str(value: Any) -> str:
    if isinstance(value, str):
        return value
    raise _Mismatch


_SCALARS = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str}


def _coerce(value: Any, tp: Any) -> Any:
    """Return ``value`` converted to ``tp`` or raise :class:`_Mismatch`.

    Strings are parsed (they come from the command line, or from YAML scalars such as ``1e-4``
    that YAML 1.1 reads as strings); other values must already have the right shape.
    """
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp)
    if origin in (list, List, tuple, Tuple):
        return _coerce_sequence(value, tp)
    if origin in (dict, Dict):
        return _coerce_mapping(value, tp)
    if tp in _SCALARS:
        return _SCALARS[tp](value)
    raise _Mismatch  # pragma: no cover - a field type this module does not know


def task_keys(name: str | None = None) -> list[str]:
    """The keys of the task section of ``name`` (every task when None), as ``task.<key>``, in order."""
    out: list[str] = []
    for n, cls in TASKS.items():
        if name is None or n == name:
            out += [f"task.{k}" for k in config_keys(cls) if f"task.{k}" not in out]
    return out


def _unknown_key_error(key: str, where: str = "", cls: type = TrainConfig, prefix: str = "") -> ConfigError:
    keys = [prefix + k for k in config_keys(cls)]
    src = f" in {where}" if where else ""
    # a task-only key written at the top level: point to task.<key>
    candidates = keys + (task_keys() if cls is TrainConfig else [])
    close = difflib.get_close_matches(prefix + key, candidates, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    what = f"task {cls.__name__}" if prefix else "config"
    return ConfigError(f"unknown config key '{prefix}{key}'{src}{hint}; valid keys of the {what}: "
                       f"{', '.join(keys)}")


def _set(values: dict[str, Any], key: str, raw: Any, where: str = "", cls: type = TrainConfig,
         prefix: str = "") -> None:
    types_ = _field_types(cls)
    if key not in types_:
        raise _unknown_key_error(key, where, cls, prefix)
    tp = types_[key]
    try:
        values[key] = _coerce(raw, tp)
    except _Mismatch:
        src = f" ({where})" if where else ""
        raise ConfigError(
            f"config key '{prefix}{key}'{src} expects {_type_name(tp)}, got {raw!r}"
        ) from None


def register_task_section(name: str, section: type) -> None:
    """Make ``task.name=<name>`` select ``section`` (a dataclass whose ``name`` defaults to ``name``);
    :func:`manlearn.register_task` calls it."""
    if not dataclasses.is_dataclass(section) or section().name != name:
        raise ConfigError(f"the config section of task {name!r} must be a dataclass whose field `name` "
                          f"defaults to {name!r}")
    TASKS[name] = section


def _task_class(name: Any, where: str = "") -> type:
    if isinstance(name, str) and name.strip() in TASKS:
        return TASKS[name.strip()]
    close = difflib.get_close_matches(str(name), list(TASKS), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    src = f" ({where})" if where else ""
    raise ConfigError(f"task.name='{name}'{src} is not one of: {', '.join(TASKS)}{hint} (a task of your own: "
                      "--import the file that registers it)")


def _task_section(current: Any, data: Any, where: str = "") -> Any:
    """The task section ``current`` updated with ``data`` (a mapping of task keys, or a task name).

    ``name`` is applied first: a new name starts from the defaults of that task's section, then the
    other keys are set (typed, unknown ones refused with a did-you-mean).
    """
    if isinstance(data, str):
        data = {"name": data}
    if not isinstance(data, Mapping):
        raise ConfigError(f"the task section{' in ' + where if where else ''} must be a mapping such as "
                          f"{{name: detection, fpn_channels: 256}}, got {type(data).__name__}")
    name = data.get("name", current.name)
    cls = _task_class(name, where)
    values = dataclasses.asdict(current) if type(current) is cls else {}
    for key, raw in data.items():
        if str(key) != "name":
            _set(values, str(key), raw, where, cls, prefix="task.")
    values["name"] = cls().name
    return cls(**values)


# -------------------------------------------------------------------------------------------
# construction
# -------------------------------------------------------------------------------------------


def validate_any(cfg: Any) -> Any:
    """Deprecated name of :func:`validate` (there is one config class now)."""
    return validate(cfg)


def config_from_dict(data: Mapping[str, Any], *, base: Any = None,
                     where: str = "", check: bool = True, cls: type | None = None) -> TrainConfig:
    """Build a config from a mapping, type-checking every key; unknown keys are refused.

    ``task`` may be a mapping (the task section) or a task name.  ``cls`` is accepted for compatibility
    and must be :class:`TrainConfig`.
    """
    if cls is not None and cls is not TrainConfig:
        raise TypeError(f"config_from_dict builds a TrainConfig, not {cls.__name__}")
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config{' in ' + where if where else ''} must be a mapping of key: value, "
                          f"got {type(data).__name__}")
    base = base if base is not None else TrainConfig()
    values = dataclasses.asdict(base)
    task = base.task
    for key, raw in data.items():
        key = str(key)
        if key == "task":
            task = _task_section(task, raw, where)
        else:
            _set(values, key, raw, where)
    values["task"] = task
    cfg = TrainConfig(**values)
    if check:
        validate(cfg)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain ``dict`` of a config (tuples kept; the task section a nested dict), the form stored in checkpoints."""
    return dataclasses.asdict(cfg)


def flat_config_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict with the task section spread out as ``task.<key>`` entries (for comparisons)."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k == "task" and isinstance(v, Mapping):
            out.update({f"task.{tk}": tv for tk, tv in v.items()})
        else:
            out[k] = v
    return out


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
    """The raw mapping of a YAML recipe (not yet typed)."""
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


def load_config(path: str | Path, *, check: bool = True, cls: type | None = None) -> TrainConfig:
    """Read a YAML recipe (config keys, optionally a ``task:`` section) on top of the defaults."""
    return config_from_dict(read_config_file(path), where=str(path), check=check, cls=cls)


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str], *, check: bool = True) -> TrainConfig:
    """Return a copy of ``cfg`` with ``key=value`` strings applied.

    Values are parsed for the type of the field: bools accept true/false/1/0/yes/no, optional
    fields accept ``none``, lists/tuples use YAML syntax (``split=[[1,0],[2,3]]``).  Task keys are
    written ``task.<key>=value``; ``task.name=detection`` (or ``task=detection``) switches the task
    section to that task's defaults and is applied before the other ``task.`` keys.
    """
    values = dataclasses.asdict(cfg)
    task = cfg.task
    flat: list[tuple[str, str]] = []
    section: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        if key == "task":
            key = "task.name"
        if key.startswith("task."):
            section[key[5:].replace("-", "_")] = raw
            continue
        if key not in values and key.replace("-", "_") in values:
            key = key.replace("-", "_")
        flat.append((key, raw))
    if section:
        name = section.pop("name", task.name)
        task = _task_section(task, {"name": name.strip() if isinstance(name, str) else name, **section},
                             "command line")
    for key, raw in flat:
        if key == "task":  # pragma: no cover - mapped to task.name above
            continue
        _set(values, key, raw, "command line")
    values["task"] = task
    out = TrainConfig(**values)
    if check:
        validate(out)
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


def _man_bases() -> list[str] | None:
    """The base rules that modifiers (man/manpp) accept (the rule registry), or None if it cannot be imported."""
    try:
        from manlearn.rules import list_base_rules
    except ImportError:  # pragma: no cover
        return None
    return list_base_rules()


def dense_model_names() -> list[str]:
    """Registered backbones a dense task can cut at stage boundaries (the ImageNet ResNets/ResNeXts)."""
    from manlearn.models.registry import list_models, model_tags

    return [m for m in list_models("imagenet") if "resnet" in model_tags(m)]


def _dense_methods() -> list[str] | None:
    """Rules a dense run may name: every registered rule (those that cannot train the task refuse when the
    learner is built); None if they cannot be imported."""
    try:
        from manlearn.rules import list_rules
    except ImportError:  # pragma: no cover
        return None
    return sorted(list_rules())


def _one_of(problems: list[str], key: str, value: Any, allowed: Iterable[str]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        problems.append(f"{key}='{value}' is not one of: {', '.join(allowed)}{hint}")


# Checks used by validate(): each appends its problem (if any) to ``problems`` so that one ConfigError
# can list them all.

def _at_least(problems: list[str], cfg: Any, keys: Iterable[str], low: int, *, or_none: bool = False,
              prefix: str = "") -> None:
    """``key must be >= low`` for every key of ``cfg`` below ``low`` (``or_none``: None is allowed too)."""
    for key in keys:
        v = getattr(cfg, key)
        if or_none and v is None:
            continue
        if v < low:
            problems.append(f"{prefix}{key} must be >= {low}{' or none' if or_none else ''}, got {v}")


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


def _positive_pair(p: list[str], key: str, v: Optional[list], kind: type) -> None:
    if v is None:
        return
    if len(v) != 2 or any(not (x > 0) for x in v):
        p.append(f"{key} must be two positive {kind.__name__}s [{'H, W' if kind is int else 'low, high'}] "
                 f"or none, got {v}")


def _validate_dense(p: list[str], cfg: TrainConfig, registries: bool) -> None:
    """The checks of a detection / segmentation run (its task section and the shared keys it constrains)."""
    t = cfg.task
    det = t.name == "detection"
    _one_of(p, "task.data_format", t.data_format, DETECTION_FORMATS if det else SEGMENTATION_FORMATS)
    _one_of(p, "task.normalize", t.normalize, NORMALIZATIONS)
    for key in ("train_split", "val_split"):
        if not getattr(t, key).strip():
            p.append(f"task.{key} must not be empty")
    if cfg.data_dir is None or not cfg.data_dir.strip():
        p.append(f"a {t.name} run needs data_dir (e.g. data_dir=data/mosaic, made by `manlearn data make-mosaic`)")
    _at_least(p, t, ("num_classes", "stem_width", "local_channels"), 1, or_none=True, prefix="task.")
    if det:
        if t.min_size < 1 or t.max_size < t.min_size:
            p.append(f"need 1 <= task.min_size <= task.max_size, got min_size={t.min_size}, max_size={t.max_size}")
        _at_least(p, t, ("fpn_channels",), 1, prefix="task.")
        _at_least(p, t, ("head_convs",), 0, prefix="task.")
        from .detection.losses import BOX_LOSSES  # the choice list lives beside the loss

        _one_of(p, "task.box_loss", t.box_loss, BOX_LOSSES)
    else:
        if t.num_classes is not None and t.num_classes < 2:
            p.append(f"segmentation needs task.num_classes >= 2 (background included), got {t.num_classes}")
        _positive_pair(p, "task.seg_size", t.seg_size, int)
        _positive_pair(p, "task.seg_crop", t.seg_crop, int)
        _positive_pair(p, "task.seg_scale", t.seg_scale, float)
        if t.seg_scale is not None and len(t.seg_scale) == 2 and t.seg_scale[0] > t.seg_scale[1]:
            p.append(f"task.seg_scale must be [low, high] with low <= high, got {t.seg_scale}")
        _at_least(p, t, ("aspp_channels",), 1, prefix="task.")
    if t.model_widths is not None and (len(t.model_widths) != 4 or min(t.model_widths) < 1):
        p.append(f"task.model_widths must be 4 positive channel counts (one per stage) or none, got {t.model_widths}")
    if registries:
        try:
            _one_of(p, "model", cfg.model, dense_model_names())
        except ImportError:  # pragma: no cover - the models package is part of manlearn
            pass
        methods = _dense_methods()
        if methods is not None:
            _one_of(p, "method", cfg.method, methods)
    if not 1 <= cfg.K <= 4:
        p.append(f"K must be in 1..4 for a {t.name} run (cuts fall between the 4 stages), got {cfg.K}")
    elif cfg.method != "e2e" and cfg.K == 1:
        p.append(f"method={cfg.method} with K=1 is plain backprop; use method=e2e or K >= 2")
    if t.stage_cuts is not None and cfg.method != "e2e":
        cuts = list(t.stage_cuts)
        if len(cuts) != cfg.K - 1 or cuts != sorted(set(cuts)) or any(not 1 <= c <= 3 for c in cuts):
            p.append(f"task.stage_cuts must be K-1={cfg.K - 1} increasing stage numbers in 1..3, got {cuts}")
    for key in ("compile", "ema_recompute", "grad_checkpoint", "sync_bn"):
        if _switched_on(cfg, key):
            p.append(f"{key}=true is for classification runs; a {t.name} run does not support it")
    if cfg.pipeline_workers:
        p.append(f"pipeline_workers is for classification runs; a {t.name} run does not support it")


def _switched_on(cfg: TrainConfig, key: str) -> bool:
    """Whether a switch key is on; ``grad_checkpoint`` is on at any granularity (a bad value counts as on:
    _validate_choices reports it)."""
    if key != "grad_checkpoint":
        return bool(getattr(cfg, key))
    try:
        return checkpoint_granularity(cfg.grad_checkpoint) is not None
    except ConfigError:
        return True


def _validate_classification(p: list[str], cfg: TrainConfig, registries: bool) -> None:
    if registries:
        models, rules, datasets = _registries()
        if models is not None:
            _one_of(p, "model", cfg.model, models)
        if rules is not None:
            _one_of(p, "method", cfg.method, rules)
        if datasets is not None:
            _one_of(p, "dataset", cfg.dataset, datasets)
    if cfg.K < 1:
        p.append(f"K must be >= 1, got {cfg.K}")
    t = cfg.task
    if not 0.0 <= t.label_smoothing < 1.0:
        p.append(f"task.label_smoothing must lie in [0, 1), got {t.label_smoothing}")
    for key in ("mixup_alpha", "cutmix_alpha"):
        if not getattr(t, key) >= 0.0:
            p.append(f"task.{key} must be >= 0 (0 = off), got {getattr(t, key)}")


def _validate_choices(p: list[str], cfg: TrainConfig) -> None:
    """Names chosen from fixed lists or the registries; a rule's own choices are asked of the rule."""
    from .rules.momentum import FIDELITIES
    from .rules.infopro import INFOPRO_HEADS, LAMBDA_SCHEDULES
    from .rules.momentum import INITS

    bases = _man_bases()
    if bases is not None:
        _one_of(p, "base", cfg.base, bases)
    _one_of(p, "init", cfg.init, INITS)
    _one_of(p, "lambda_schedule", cfg.lambda_schedule, LAMBDA_SCHEDULES)
    _one_of(p, "fidelity", cfg.fidelity, FIDELITIES)
    try:
        checkpoint_granularity(cfg.grad_checkpoint)
    except ConfigError as e:
        p.append(str(e))
    _one_of(p, "infopro_heads", cfg.infopro_heads, INFOPRO_HEADS)
    _one_of(p, "optimizer", cfg.optimizer, OPTIMIZERS)
    _one_of(p, "schedule", cfg.schedule, SCHEDULES)
    _one_of(p, "amp", cfg.amp, AMP_MODES)
    _one_of(p, "nonfinite", cfg.nonfinite, NONFINITE_MODES)
    _one_of(p, "dist_backend", cfg.dist_backend, DIST_BACKENDS)
    if isinstance(cfg.split, str) and not cfg.split.strip():
        p.append("split must be a name (e.g. 'auto') or a list of [stage, unit] boundaries")
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        p.append(f"device must be auto, cpu, cuda, cuda:N or mps, got '{cfg.device}'")
    if not cfg.out_dir.strip():
        p.append("out_dir must not be empty")


def _validate_optimisation(p: list[str], cfg: TrainConfig) -> None:
    """Lengths, periods, learning-rate schedule and optimiser numbers."""
    _unit_interval(p, "momentum (EMA)", cfg.momentum)
    _at_least(p, cfg, ("train_limit", "eval_limit", "image_size"), 1, or_none=True)
    _at_least(p, cfg, ("epochs", "batch_size", "eval_batch_size", "blocks_in_flight"), 1)
    _at_least(p, cfg, ("data_workers", "iterations", "max_steps", "warmup_epochs", "warmup_iters", "seed",
                       "ckpt_every_steps", "eval_every_epochs", "eval_every_steps", "log_every"), 0)
    _positive(p, "lr", cfg.lr)
    _unit_interval(p, "sgd_momentum", cfg.sgd_momentum, include_one=False)
    if cfg.optimizer == "sgd" and cfg.nesterov and cfg.sgd_momentum == 0:
        p.append("nesterov=true needs sgd_momentum > 0")
    _non_negative(p, "weight_decay", cfg.weight_decay)
    _non_negative(p, "warmup_lr", cfg.warmup_lr)
    if (cfg.schedule == "cosine-warmup" and cfg.iterations == 0 and cfg.warmup_epochs >= cfg.epochs
            and cfg.epochs >= 1):
        p.append(f"warmup_epochs ({cfg.warmup_epochs}) must be < epochs ({cfg.epochs})")
    steps = list(cfg.lr_steps)
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        p.append(f"lr_steps must be strictly increasing positive steps, got {steps}")
    if not (0 < cfg.lr_gamma <= 1):
        p.append(f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    if not (0 < cfg.warmup_factor <= 1):
        p.append(f"warmup_factor must be in (0, 1], got {cfg.warmup_factor}")


def _validate_scaling(p: list[str], cfg: TrainConfig) -> None:
    for key in ("dist_timeout_s", "pipeline_timeout_s"):
        v = getattr(cfg, key)
        if not (v > 0) or not math.isfinite(v):
            p.append(f"{key} must be a positive number of seconds, got {v}")
    if cfg.pipeline_workers < 0 or cfg.pipeline_workers == 1:
        p.append(f"pipeline_workers must be 0 (off) or >= 2, got {cfg.pipeline_workers}")
    _at_least(p, cfg, ("pipeline_queue_depth", "pipeline_param_sync_every", "pipeline_param_delay"), 1)


def validate(cfg: TrainConfig, *, registries: bool = True) -> TrainConfig:
    """Check the values (ranges, choices, registered names); raise one ConfigError listing all."""
    p: list[str] = []
    if not isinstance(cfg.task, tuple(TASKS.values())) or TASKS.get(cfg.task.name) is not type(cfg.task):
        raise ConfigError(f"invalid config: task must be a task section ({', '.join(c.__name__ for c in TASKS.values())}) "
                          f"with its own name, got {cfg.task!r}")
    if registries and cfg.imports:
        from manlearn.plugins import import_user_code

        import_user_code(cfg.imports)  # the user's rules/models are registered before names are checked
    if isinstance(cfg.task, (DetectionTask, SegmentationTask)):
        _validate_dense(p, cfg, registries)
    elif isinstance(cfg.task, ClassificationTask):
        _validate_classification(p, cfg, registries)
    else:  # a registered task of the user's: its section may check itself (a list of problems)
        check = getattr(cfg.task, "problems", None)
        p.extend(check() if callable(check) else [])
    _validate_choices(p, cfg)
    _validate_optimisation(p, cfg)
    _validate_scaling(p, cfg)
    if p:
        raise ConfigError("invalid config: " + "; ".join(p))
    return cfg
