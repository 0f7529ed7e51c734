"""Typed training configuration: one pydantic model with a task section, YAML files, ``key=value`` overrides.

One model (nanoGPT style): every knob of a run in one place, stored in each checkpoint, set from the command line
as in a YAML recipe; what only one task reads is in the task section (``task.name`` picks it from :data:`TASKS`).
Building checks keys and types; :func:`validate` checks values and names against the registries (asked lazily: this
leaf imports no torch), all problems in one ConfigError line."""

from __future__ import annotations

import difflib
import importlib
import math
import re
import types
import typing
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, Union

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, ValidationInfo,
                      field_validator)
from pydantic_core import PydanticCustomError

from manlearn.errors import ConfigError

__all__ = ["TrainConfig", "TaskSection", "ClassificationTask", "DetectionTask", "SegmentationTask", "TASKS",
           "register_task_section", "load_config", "apply_overrides", "config_from_dict", "config_to_dict",
           "config_to_yaml", "flat_config_dict", "validate", "config_keys", "task_keys", "read_config_file",
           "OPTIMIZERS", "SCHEDULES", "AMP_MODES"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine-warmup", "cosine-iter", "constant", "step-warmup")
AMP_MODES = ("off", "bf16", "fp16")
_GRANULARITY = "manlearn.recompute:checkpoint_granularity"  # grad_checkpoint: None (off) or a granularity

# Set while a config is built: nested models leave errors to its one report; value checks run in validate() only.
_BUILD: ContextVar[dict[str, bool] | None] = ContextVar("manlearn_config_build", default=None)


def _checking(registry: bool = False) -> bool:
    build = _BUILD.get()
    return bool(build and build["checks"] and (build["registries"] or not registry))


def _check(test: Callable[[Any, Mapping[str, Any]], Any], says: str) -> AfterValidator:
    """A value check: ``<key> <says>, got <value>`` unless ``test(value, the valid keys before this one)``."""
    def run(value: Any, info: ValidationInfo) -> Any:
        if _checking() and not test(value, info.data):
            raise ValueError(f"{says}, got {value!r}")
        return value
    return AfterValidator(run)


def _not_one_of(value: Any, names: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(value), names := list(names), n=1)
    return f"='{value}' is not one of: {', '.join(names)}" + (f" (did you mean '{close[0]}'?)" if close else "")


def _choice(allowed: tuple[str, ...] | str, *, registry: bool = False) -> AfterValidator:
    """One of ``allowed``: a tuple, or ``module:name`` (a list, or a function listing a registry) written once
    beside its owner, imported only now; ``registry``: not asked by ``validate(registries=False)``."""
    def run(value: Any) -> Any:
        if _checking(registry):
            names = _asked(allowed) if isinstance(allowed, str) else allowed
            if value not in (names := names() if callable(names) else names):
                raise ValueError(_not_one_of(value, names) + (" (your own: --import the file that registers it)"
                                                              if registry else ""))
        return value
    return AfterValidator(run)


def _asked(spec: str) -> Any:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


Pos = Annotated[int, _check(lambda v, _: v >= 1, "must be >= 1")]
NonNeg = Annotated[int, _check(lambda v, _: v >= 0, "must be >= 0")]
PosFloat = Annotated[float, _check(lambda v, _: v > 0 and math.isfinite(v), "must be > 0")]
NonNegFloat = Annotated[float, _check(lambda v, _: v >= 0 and math.isfinite(v), "must be >= 0")]
Fraction = Annotated[float, _check(lambda v, _: 0 < v <= 1, "must be in (0, 1]")]
NonEmpty = Annotated[str, _check(lambda v, _: bool(v.strip()), "must not be empty")]
Pair = Annotated[list[Pos], _check(lambda v, _: len(v) == 2, "must be two values [H, W] or none")]


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        name = " or ".join(_type_name(a) for a in args if a is not type(None))
        return f"{name} or none" if type(None) in args else name
    if origin in (Annotated, list):
        return _type_name(args[0]) if origin is Annotated else f"list of {_type_name(args[0])}"
    return "mapping of key: value" if origin is dict else getattr(tp, "__name__", str(tp))


class _Model(BaseModel):
    """Unknown keys refused; text (the command line, YAML 1.1 scalars such as 1e-4) read for the key's type."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    def __init__(self, **data: Any) -> None:
        if _BUILD.get() is not None:  # a section inside a build: its errors join the build's report
            super().__init__(**data)
        else:  # from Python: the same one-line ConfigError as from the command line
            _build(lambda: BaseModel.__init__(self, **data), data, root=type(self))

    @field_validator("*", mode="before")
    @classmethod
    def _from_text(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _type_name(cls.model_fields[info.field_name].annotation)  # what the text may stand for
        if isinstance(value, bool) and "bool" not in kind:  # YAML's `epochs: yes` is no number
            raise PydanticCustomError("wrong_type", "wrong type")
        text = value.strip() if isinstance(value, str) else ""
        if kind.endswith(" or none") and text.lower() in ("none", "null", "~"):
            return None
        if text and ("list" in kind or "mapping" in kind) and (not kind.startswith("str") or text[0] in "[{"):
            try:
                return yaml.safe_load(text)
            except yaml.YAMLError:
                raise PydanticCustomError("wrong_type", "not YAML") from None
        return value


class TaskSection(_Model):
    """A task's own keys (``task.<key>``), selected by ``name`` (:func:`register_task_section`)."""

    name: str

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        """This section against the config's other keys (those valid on their own), when validated."""
        return []


class ClassificationTask(TaskSection):
    """``task.name=classification`` (the default): one label per image, top-1 accuracy, on ``dataset``."""

    name: Literal["classification"] = "classification"
    label_smoothing: Annotated[float, _check(lambda v, _: 0 <= v < 1, "must lie in [0, 1)")] = 0.0  # final head
    mixup_alpha: NonNegFloat = 0.0  # > 0: Mixup of training batches with lambda ~ Beta(alpha, alpha)
    cutmix_alpha: NonNegFloat = 0.0  # > 0: CutMix (with mixup too: one or the other, half the batches each)


class _DenseTask(TaskSection):
    """Keys of both dense tasks: a stage-cut ImageNet ResNet with dense heads, data under ``data_dir``."""

    train_split: NonEmpty
    val_split: NonEmpty
    num_classes: Pos | None = None  # none = from the data
    hflip: bool = True  # random horizontal flip of training batches
    normalize: Annotated[str, _choice(("imagenet", "half"))] = "imagenet"  # ImageNet mean/std | 0.5/0.5
    model_widths: Annotated[list[Pos], _check(lambda v, _: len(v) == 4, "must be 4 widths, one a stage")] | None = None
    stem_width: Pos | None = None  # stem channels (default: the first width)
    stage_cuts: list[int] | None = None  # stages after which to cut (default K=4: [1, 2, 3])
    local_channels: Pos | None = None  # width of the local heads (default: fpn_channels / aspp_channels)

    def problems(self, config: Mapping[str, Any]) -> list[str]:
        p = [] if (config.get("data_dir") or "").strip() else [
            f"a {self.name} run needs data_dir (e.g. data_dir=data/mosaic, made by `manlearn data make-mosaic`)"]
        k, method, cuts = config.get("K"), config.get("method"), self.stage_cuts
        listed = _asked("manlearn.models:list_models")  # the backbones cut at stage boundaries: ImageNet ResNets
        resnets = [m for m in listed("imagenet") if m in listed("resnet")]
        if _checking(registry=True) and "model" in config and config["model"] not in resnets:
            p.append("model" + _not_one_of(config["model"], resnets))
        if k is not None and not 1 <= k <= 4:
            p.append(f"K must be in 1..4 for a {self.name} run (cuts fall between the 4 stages), got {k}")
        elif k == 1 and method not in (None, "e2e"):
            p.append(f"method={method} with K=1 is plain backprop; use method=e2e or K >= 2")
        elif k is not None and cuts is not None and method != "e2e" and (
                len(cuts) != k - 1 or cuts != sorted(set(cuts)) or any(not 1 <= c <= 3 for c in cuts)):
            p.append(f"task.stage_cuts must be K-1={k - 1} increasing stage numbers in 1..3, got {cuts}")
        given = {key: config.get(key) for key in ("split", "stem_module", "image_size")}
        if given["split"] not in (None, "auto"):
            p.append(f"split={given['split']} does not apply to a {self.name} run: its blocks are cut between stages; "
                     "choose the stages with task.stage_cuts (e.g. task.stage_cuts=[1,3] for K=3)")
        if given["stem_module"] is not None:
            p.append(f"stem_module does not apply to a {self.name} run: the stem stays in the first block")
        if given["image_size"] is not None:
            p.append(f"image_size does not apply to a {self.name} run: "
                     + ("task.min_size / task.max_size resize its images" if hasattr(self, "min_size") else
                        "task.seg_size resizes its images (task.seg_crop crops them)"))
        on = {key: config.get(key) for key in ("compile", "ema_recompute", "sync_bn", "pipeline_workers")}
        on["grad_checkpoint"] = _asked(_GRANULARITY)(config.get("grad_checkpoint"))
        if getattr(self, "min_size", 0) > getattr(self, "max_size", math.inf):  # detection
            p.append(f"need 1 <= task.min_size <= task.max_size, got min_size={getattr(self, 'min_size')}, "
                     f"max_size={getattr(self, 'max_size')}")
        return p + [f"{key}{'' if key == 'pipeline_workers' else '=true'} is for classification runs; a "
                    f"{self.name} run does not support it" for key, v in on.items() if v]


class DetectionTask(_DenseTask):
    """``task.name=detection``: RetinaNet (FPN P3-P7, focal + box loss), COCO box AP; defaults: SPEC 3.4."""

    name: Literal["detection"] = "detection"
    data_format: Annotated[str, _choice(("coco",))] = "coco"
    train_split: NonEmpty = "train2017"
    val_split: NonEmpty = "val2017"
    min_size: Pos = 600  # shorter side resized to this ...
    max_size: int = 1000  # ... unless the longer side would exceed this
    fpn_channels: Pos = 256
    head_convs: NonNeg = 4
    box_loss: Annotated[str, _choice("manlearn.detection.losses:BOX_LOSSES")] = "smooth_l1"
    head_norm: bool = False  # GroupNorm in the head towers (off in the paper; steadier from scratch)


class SegmentationTask(_DenseTask):
    """``task.name=segmentation``: DeepLabV3+ (ASPP, decoder on the stride-4 feature), mIoU."""

    name: Literal["segmentation"] = "segmentation"
    data_format: Annotated[str, _choice(("mask-folder", "cityscapes"))] = "mask-folder"
    train_split: NonEmpty = "train"
    val_split: NonEmpty = "val"
    num_classes: Annotated[int, _check(lambda v, _: v >= 2, "must be >= 2 (background included)")] | None = None
    seg_size: Pair | None = None  # resize every image to [H, W] at load time
    seg_crop: Pair | None = None  # training: random crop [H, W] (after seg_scale)
    seg_scale: Annotated[list[PosFloat], _check(lambda v, _: len(v) == 2 and v[0] <= v[1], "must be [low, high] "
                                                "with low <= high")] | None = None  # training: random rescale
    aspp_channels: Pos = 256
    decoder: bool = True  # DeepLabV3+ decoder on the stride-4 feature


#: ``task.name`` -> the model of its section (:func:`register_task_section` adds one).
TASKS: dict[str, type[TaskSection]] = {s.model_fields["name"].default: s for s in (ClassificationTask, DetectionTask,
                                                                                   SegmentationTask)}


def register_task_section(name: str, model: type[TaskSection]) -> type[TaskSection]:
    """Let ``task.name=<name>`` select ``model``, a :class:`TaskSection` whose ``name`` defaults to ``name``."""
    if not issubclass(model, TaskSection) or model.model_fields["name"].default != name:
        raise ConfigError(f"a task section for '{name}' must be a TaskSection whose name defaults to '{name}'")
    TASKS[name] = model
    return model


class TrainConfig(_Model):
    """Everything that defines a training run.  The defaults are the project's main job: MAN++ on InfoPro,
    ResNet-32, K=16 (the stem its own piece), Fashion-MNIST with the FM-R32 protocol of SPEC §8 (SGD 0.9
    Nesterov, wd 1e-4, lr 0.1, per-iteration cosine, batch 128), 10 epochs so that the default run finishes."""

    task: SerializeAsAny[TaskSection] = Field(default_factory=ClassificationTask)
    model: Annotated[str, _choice("manlearn.models:list_models", registry=True)] = "resnet32"
    method: Annotated[str, _choice("manlearn.rules:list_rules", registry=True)] = "manpp"
    base: Annotated[str, _choice("manlearn.rules:list_base_rules", registry=True)] = "infopro"  # man(pp)
    rule_options: dict[str, Any] = Field(default_factory=dict)  # of the rule in use, e.g. {depth: 2} for auglocal
    imports: list[str] = Field(default_factory=list)  # your modules / .py files: their rules, models, tasks
    import_digests: dict[str, str] = Field(default_factory=dict)  # each imported file's content, as recorded
    pretrained: str | None = None  # a torchvision ResNet/ResNeXt or timm ViT checkpoint the backbone starts from
    pretrained_head: bool = True  # classification: load its classifier too (dense runs never do)
    K: Pos = 16  # number of gradient-isolated pieces (ignored by e2e)
    # auto | paper | memory | uniform | balanced, or boundaries: unit counts [3, 8] or (stage, unit) pairs [[1, 0]]
    split: Annotated[str | list[int | tuple[int, int]], _check(lambda v, _: not isinstance(v, str) or v.strip() != "",
                                                               "must be a name (e.g. 'auto') or boundaries")] = "auto"
    stem_module: bool | None = None  # the stem is its own piece; none: the learner decides (False for ViTs)
    momentum: Annotated[float, _check(lambda v, _: 0 <= v <= 1, "(EMA) must be in [0, 1]")] = 0.995
    init: Annotated[str, _choice("manlearn.rules.momentum:INITS")] = "copy"  # ema/lb: copies
    lambda_schedule: Annotated[str, _choice("manlearn.rules.infopro:LAMBDA_SCHEDULES")] = "auto"
    infopro_heads: Annotated[str, _choice("manlearn.rules.infopro:INFOPRO_HEADS")] = "auto"  # SPEC 2.2
    dataset: Annotated[str, _choice("manlearn.data:list_datasets", registry=True)] = "fashion-mnist"
    data_dir: str | None = None  # none = the dataset's default location (dense tasks need it)
    train_limit: Pos | None = None  # use only the first N training images (an image folder: N spread over its classes)
    eval_limit: Pos | None = None  # evaluate on the first N test / validation images (likewise)
    image_size: Pos | None = None  # classification: None = the dataset's native size
    data_workers: NonNeg = 8  # decode processes for sets too large to hold in memory (imagenet, full COCO)
    epochs: Pos = 10
    iterations: NonNeg = 0
    max_steps: NonNeg = 0  # stop after this many optimiser steps (0 = no cap); the schedule is unchanged
    batch_size: Pos = 128
    eval_batch_size: Pos = 1000
    optimizer: Annotated[str, _choice(OPTIMIZERS)] = "sgd"
    lr: PosFloat = 0.1
    sgd_momentum: Annotated[float, _check(lambda v, _: 0 <= v < 1, "must be in [0, 1)")] = 0.9
    nesterov: Annotated[bool, _check(lambda v, d: not v or d.get("optimizer") != "sgd" or d.get("sgd_momentum") != 0,
                                     "=true needs sgd_momentum > 0")] = True
    weight_decay: NonNegFloat = 1e-4
    schedule: Annotated[str, _choice(SCHEDULES)] = "cosine-iter"
    warmup_epochs: Annotated[int, _check(lambda v, d: v >= 0 and (d.get("schedule") != "cosine-warmup" or d.get(
        "iterations") != 0 or v < d.get("epochs", math.inf)), "must be >= 0, < epochs for cosine-warmup")] = 0
    warmup_lr: NonNegFloat = 0.01  # cosine-warmup: the warm-up (warmup_epochs) starts from this lr
    lr_steps: Annotated[list[int], _check(lambda v, _: all(a < b for a, b in zip([0, *v], v)),
                                          "must be strictly increasing positive steps")] = Field(default_factory=list)
    lr_gamma: Fraction = 0.1  # step-warmup: lr x lr_gamma at each of lr_steps ...
    warmup_iters: NonNeg = 0  # ... after a linear warm-up from lr x warmup_factor over these steps
    warmup_factor: Fraction = 0.001
    seed: NonNeg = 0
    device: Annotated[str, _check(lambda v, _: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None,
                                  "must be auto, cpu, cuda, cuda:N or mps")] = "auto"
    amp: Annotated[str, _choice(AMP_MODES)] = "off"  # fp16 on CUDA only; bf16 on CUDA or a CPU
    channels_last: bool = True  # faster on CPU (BENCHMARKS.md)
    compile: bool = False
    ema_recompute: bool = False  # MAN/MAN++ recompute the frozen ema unit in backward (memory for compute)
    blocks_in_flight: Pos = 1  # > 1: overlap a block's local loss/backward with the next blocks' work
    fidelity: Annotated[str, _choice("manlearn.rules.momentum:FIDELITIES")] = "default"  # SPEC 2.3
    authors_init: bool = False  # the authors' conv/BN initialisation of the whole learner
    grad_checkpoint: Annotated[Union[bool, str], Field(union_mode="left_to_right"),  # true/stage | unit | sqrt
                               _check(lambda v, _: _asked(_GRANULARITY)(v) or 1, "")] = False
    dist_backend: Annotated[str, _choice(("auto", "gloo", "nccl"))] = "auto"  # auto: nccl on CUDA, else gloo
    dist_timeout_s: PosFloat = 1800.0  # collective timeout of the data-parallel process group
    sync_bn: bool = False  # data parallel: SyncBatchNorm over the ranks (CUDA only)
    pipeline_workers: Annotated[int, _check(lambda v, _: v == 0 or v >= 2, "must be 0 (off) or >= 2")] = 0
    pipeline_queue_depth: Pos = 2  # micro-batches in flight per pipeline link (bounds memory)
    pipeline_param_sync_every: Pos = 1  # MAN: next worker sends its first unit every n steps
    pipeline_param_delay: Pos = 2  # MAN: step t uses that unit as of step <= t - delay
    pipeline_timeout_s: PosFloat = 120.0  # a pipeline worker silent this long stops the run
    out_dir: NonEmpty = "runs/default"
    eval_every_epochs: NonNeg = 1  # evaluate at every N-th epoch end (0 = not at epoch ends)
    eval_every_steps: NonNeg = 0  # evaluate every N steps (0 = off); a run always ends with an evaluation
    ckpt_every_steps: NonNeg = 0  # also write last.pt every N steps (always: at epoch ends and the end)
    log_every: NonNeg = 50  # a step record in metrics.jsonl every N steps (0 = never)
    nonfinite: Annotated[str, _choice(("stop", "skip"))] = "stop"  # stop (DivergenceError) | skip that update
    progress: bool = True  # tqdm progress bar (only shown on a terminal); the last key, see _section_problems

    @field_validator("task", mode="wrap")
    @classmethod
    def _section(cls, value: Any, handler: Callable[[Any], Any]) -> Any:
        if isinstance(value, TaskSection):
            return handler(value)
        if not isinstance(value, (str, Mapping)):
            raise ConfigError("the task section must be a mapping such as {name: detection, fpn_channels: 256}, "
                              f"got {type(value).__name__}")
        name = str(value.get("name", "classification") if isinstance(value, Mapping) else value).strip()
        if name not in TASKS:
            raise ConfigError("task.name" + _not_one_of(name, TASKS) + " (a task of your own: --import the file "
                              "that registers it)")
        return TASKS[name].model_validate({**value, "name": name} if isinstance(value, Mapping) else {"name": name})

    @field_validator("progress")  # the last key, and one validate() cannot refuse: info.data holds every valid key
    @classmethod
    def _section_problems(cls, value: bool, info: ValidationInfo) -> bool:
        if _checking() and "task" in info.data and (problems := info.data["task"].problems(info.data)):
            raise ConfigError("; ".join(problems))  # the task section against the other keys
        return value


def config_keys(cls: type[BaseModel] = TrainConfig) -> list[str]:
    """The keys of ``cls`` (the config, or a task section), in declaration order."""
    return list(cls.model_fields)


def task_keys(name: str | None = None) -> list[str]:
    """The keys of the task section of ``name`` (every task when None), as ``task.<key>``, in order."""
    return list(dict.fromkeys(f"task.{k}" for n, c in TASKS.items() if name in (None, n) for k in c.model_fields))


def _build(make: Callable[[], Any], data: Any, where: str = "", root: type[BaseModel] = TrainConfig, *,
           checks: bool = False, registries: bool = True) -> Any:
    """``make()`` (``checks``: values too), pydantic's errors in manlearn's words in one ConfigError line."""
    token = _BUILD.set({"checks": checks, "registries": registries})
    try:
        return make()
    except ValidationError as e:
        errors = e.errors(include_url=False)
    finally:
        _BUILD.reset(token)
    lines: list[str] = []
    for err in errors:
        model, prefix, loc, given = root, "task." if issubclass(root, TaskSection) else "", err["loc"], data
        if root is TrainConfig and loc[:1] == ("task",) and len(loc) > 1 and isinstance(data["task"], Mapping):
            given = data["task"]  # a section's own key: named and typed by that section
            model, prefix, loc = TASKS[str(given.get("name", "classification")).strip()], "task.", loc[1:]
        field, kind = str(loc[0]) if loc else "", err["type"]
        key, raw = prefix + field, given.get(field, err["input"]) if isinstance(given, Mapping) else err["input"]
        if kind == "extra_forbidden":
            keys = [prefix + k for k in model.model_fields]
            close = difflib.get_close_matches(key, keys + (task_keys() if model is TrainConfig else []), n=1)
            lines.append(f"unknown config key '{key}'{f' in {where}' if where else ''}"
                         f"{f' (did you mean {close[0]!r}?)' if close else ''}; valid keys of the "
                         f"{f'task {model.__name__}' if prefix else 'config'}: {', '.join(keys)}")
        elif kind == "value_error":  # a ConfigError says it all; a value check says what follows the key
            text = str(err["ctx"]["error"])
            lines.append(text if isinstance(err["ctx"]["error"], ConfigError) else
                         f"{key}{'' if text.startswith('=') else ' '}{text}")
        else:
            lines.append(f"config key '{key}'{f' ({where})' if where else ''} expects "
                         f"{_type_name(model.model_fields[field].annotation)}, got {raw!r}")
    raise ConfigError("invalid config: " + "; ".join(dict.fromkeys(lines)))


def validate(cfg: TrainConfig, *, registries: bool = True) -> TrainConfig:
    """``cfg`` with its values checked, and (``registries``) its names after importing ``cfg.imports``."""
    if registries and cfg.imports:
        from manlearn.plugins import import_user_code

        import_user_code(cfg.imports)  # the user's rules/models are registered before names are checked
    data = config_to_dict(cfg)
    return _build(lambda: TrainConfig.model_validate(data), data, checks=True, registries=registries)


def config_from_dict(data: Mapping[str, Any], *, base: TrainConfig | None = None, where: str = "",
                     check: bool = True) -> TrainConfig:
    """A config from a mapping over ``base`` (default: the defaults).  ``task`` is a mapping of task keys or a
    task name: over ``base``'s section, or from the defaults of another task's section."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a config{' in ' + where if where else ''} must be a mapping of key: value, "
                          f"got {type(data).__name__}")
    base = base if base is not None else TrainConfig()
    task = {"name": t} if isinstance(t := data.get("task", {}), str) else t
    if isinstance(task, Mapping):  # anything else is refused by validation, with its type
        name = str(task.get("name", base.task.name)).strip()
        task = {**(base.task.model_dump() if name == base.task.name else {}), **task, "name": name}
    merged = {**config_to_dict(base), **{str(k): v for k, v in data.items()}, "task": task}
    cfg = _build(lambda: TrainConfig.model_validate(merged), merged, where)
    return validate(cfg) if check else cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain ``dict`` of a config (tuples kept; the task section a nested dict), the form stored in checkpoints."""
    return cfg.model_dump()


def flat_config_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config dict with the task section spread out as ``task.<key>`` entries (for comparisons)."""
    task = data["task"] if isinstance(data.get("task"), Mapping) else None
    return {**{k: v for k, v in data.items() if task is None or k != "task"},
            **{f"task.{k}": v for k, v in (task or {}).items()}}


def config_to_yaml(cfg: TrainConfig) -> str:
    """The YAML a run writes to ``out_dir/config.yaml`` (tuples as lists), loadable with :func:`load_config`."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe (not yet typed)."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"config file not found: {p}" if isinstance(e, FileNotFoundError) else
                          f"cannot read config file {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
    if not isinstance(data, (Mapping, type(None))):
        raise ConfigError(f"a config in {p} must be a mapping of key: value, got {type(data).__name__}")
    return dict(data or {})


def load_config(path: str | Path, *, check: bool = True) -> TrainConfig:
    """Read a YAML recipe (config keys, optionally a ``task:`` section) on top of the defaults."""
    return config_from_dict(read_config_file(path), where=str(path), check=check)


def apply_overrides(cfg: TrainConfig, overrides: Iterable[str], *, check: bool = True) -> TrainConfig:
    """A copy of ``cfg`` with ``key=value`` strings applied, each read for its key's type (true/false/none, numbers,
    YAML: ``split=[[1,0],[2,3]]``, ``rule_options={depth: 3}``).  ``task.name=detection`` (or ``task=...``) switches
    the section to that task's defaults, before the other ``task.<key>=value`` are applied."""
    top: dict[str, Any] = {"task": {}}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        key = "task.name" if key.strip().removeprefix("--") == "task" else key.strip().removeprefix("--")
        if key.startswith("task."):
            top["task"][key[5:].replace("-", "_")] = raw
        else:
            top[key.replace("-", "_") if key.replace("-", "_") in TrainConfig.model_fields else key] = raw
    return config_from_dict(top, base=cfg, where="command line", check=check)
