"""Typed configuration of a dense run (detection, segmentation): one flat dataclass, like TrainConfig.

Why a second dataclass instead of more keys on :class:`~manlearn.config.TrainConfig`: a dense run is
counted in iterations with a step-decay schedule (the Detectron protocol: linear warm-up, ×0.1 at fixed
iterations), reads COCO / mask folders instead of a classification set, and has task-head knobs (FPN,
ASPP) that mean nothing to a classifier.  Mixing both would make half of every config meaningless.
The YAML / ``key=value`` parsing, type checks and did-you-mean errors are those of
:mod:`manlearn.config` (its functions take the dataclass as ``cls``); only :func:`validate_dense` is
specific.  A recipe is a dense one when it has a ``task:`` key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, List, Optional

from manlearn.config import (_at_least, _finish, _non_negative, _one_of, _positive, _unit_interval, apply_overrides,
                             config_from_dict, config_keys, load_config)

__all__ = ["DenseConfig", "validate_dense", "load_dense_config", "dense_config_from_dict",
           "apply_dense_overrides", "dense_config_keys", "dense_model_names",
           "TASKS", "DATA_FORMATS", "NORMALIZATIONS", "DENSE_RESUME_FREE_KEYS"]

TASKS = ("detection", "segmentation")
DATA_FORMATS = ("auto", "coco", "mask-folder", "cityscapes")
NORMALIZATIONS = ("imagenet", "half")
_DENSE_METHODS = ("e2e", "local", "man", "manpp")  # = manlearn.dense.learner.DENSE_METHODS (no torch import here)
_INITS = ("copy", "random")
_BOX_LOSSES = ("smooth_l1", "l1", "giou")
_AMP_MODES = ("off", "bf16", "fp16")

#: Keys that may change between a checkpoint and the run resuming it: where files go, how the run is
#: shown, when it stops / evaluates / checkpoints, where it executes.  ``iterations`` is free too: the lr
#: schedule depends only on the step, ``warmup_*`` and ``lr_steps``, so a run can be extended.
DENSE_RESUME_FREE_KEYS = frozenset({
    "out_dir", "progress", "log_every", "max_steps", "iterations", "device", "data_dir", "data_workers",
    "eval_every", "eval_limit", "eval_batch_size", "ckpt_every", "channels_last",
})


@dataclass
class DenseConfig:
    """Everything that defines a dense (detection / segmentation) training run.

    The defaults are the MAN++ COCO RetinaNet setting of SPEC 3.4 (ResNet-50, K=4 at stage boundaries,
    batch 16, lr 0.01, 90k iterations, ×0.1 at 60k and 80k, shorter side 600 / longer at most 1000).
    """

    # --- task / data ------------------------------------------------------------------------
    task: str = "detection"  # detection | segmentation
    # auto = coco for detection, mask-folder for segmentation; cityscapes (segmentation) reads
    # leftImg8bit/ + gtFine/.  COCO roots: <root>/annotations/instances_<split>.json with images in
    # <root>/images/<split> (the mosaic) or <root>/<split> (COCO's train2017/val2017).
    data_format: str = "auto"
    data_dir: str = "data/coco"
    train_split: str = "train2017"
    val_split: str = "val2017"
    train_limit: Optional[int] = None  # use only the first N training images
    eval_limit: Optional[int] = None  # evaluate on the first N validation images
    num_classes: Optional[int] = None  # none = from the data (foreground classes / classes incl. background)
    min_size: int = 600  # detection: shorter side resized to this ...
    max_size: int = 1000  # ... unless the longer side would exceed this
    seg_size: Optional[List[int]] = None  # segmentation: resize every image to [H, W] at load time
    seg_crop: Optional[List[int]] = None  # segmentation training: random crop [H, W] (after seg_scale)
    seg_scale: Optional[List[float]] = None  # segmentation training: random rescale [low, high]
    hflip: bool = True  # random horizontal flip of training batches
    normalize: str = "imagenet"  # imagenet (mean/std of ImageNet, for ResNet backbones) | half (0.5/0.5)
    data_workers: int = 4  # decode processes for sets too large to hold in memory (full COCO)

    # --- model / local-learning method --------------------------------------------------------
    model: str = "resnet50"
    model_widths: Optional[List[int]] = None  # planes per stage (4 values): narrow backbones for tests/CPU
    stem_width: Optional[int] = None  # stem channels (default: the first width)
    method: str = "manpp"  # e2e | local | man | manpp
    K: int = 4  # gradient-isolated pieces, cut at stage boundaries (ignored by e2e)
    stage_cuts: Optional[List[int]] = None  # stages after which to cut (default K=4: [1, 2, 3])
    momentum: float = 0.995  # EMA momentum of the momentum auxiliary network
    init: str = "copy"  # ema/lb start as copies of the next stage's first unit | random
    # detection heads (RetinaNet)
    fpn_channels: int = 256
    head_convs: int = 4
    local_channels: Optional[int] = None  # width of the local heads (default: fpn_channels)
    box_loss: str = "smooth_l1"  # smooth_l1 | l1 | giou
    head_norm: bool = False  # GroupNorm in the RetinaNet head towers (off in the paper; steadier from scratch)
    # segmentation heads (DeepLabV3+)
    aspp_channels: int = 256
    decoder: bool = True  # DeepLabV3+ decoder on the stride-4 feature

    # --- optimisation -------------------------------------------------------------------------
    batch_size: int = 16
    eval_batch_size: int = 8
    iterations: int = 90000
    max_steps: int = 0  # stop after this many steps in total (0 = no cap); does not change the schedule
    lr: float = 0.01
    lr_steps: List[int] = field(default_factory=lambda: [60000, 80000])
    lr_gamma: float = 0.1
    warmup_iters: int = 500
    warmup_factor: float = 0.001  # linear warm-up from lr * warmup_factor to lr
    weight_decay: float = 1e-4
    sgd_momentum: float = 0.9

    # --- execution ----------------------------------------------------------------------------
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "off"  # off | bf16 | fp16 (CUDA only)
    channels_last: bool = False

    # --- output -------------------------------------------------------------------------------
    out_dir: str = "runs/dense"
    eval_every: int = 0  # evaluate every N steps (0 = only at the end)
    log_every: int = 20  # metrics.jsonl record (and a progress line without a terminal) every N steps
    ckpt_every: int = 1000  # write last.pt every N steps (0 = only at the end)
    progress: bool = True

    def validate(self) -> "DenseConfig":
        """See :func:`validate_dense`."""
        return validate_dense(self)

    @property
    def resolved_data_format(self) -> str:
        """``data_format`` with ``auto`` replaced by the task's usual format."""
        if self.data_format != "auto":
            return self.data_format
        return "coco" if self.task == "detection" else "mask-folder"


def dense_model_names() -> list[str]:
    """Registered backbones a dense task can cut at stage boundaries (the ImageNet ResNets/ResNeXts)."""
    from manlearn.models.registry import list_models, model_tags

    return [m for m in list_models("imagenet") if "resnet" in model_tags(m)]


def _positive_pair(p: list[str], key: str, v: Optional[list], kind: type) -> None:
    if v is None:
        return
    if len(v) != 2 or any(not (x > 0) for x in v):
        p.append(f"{key} must be two positive {kind.__name__}s [{'H, W' if kind is int else 'low, high'}] "
                 f"or none, got {v}")


def validate_dense(cfg: DenseConfig, *, registries: bool = True) -> DenseConfig:
    """Check values, ranges and names; raise one ConfigError listing every problem."""
    p: list[str] = []
    _one_of(p, "task", cfg.task, TASKS)
    _one_of(p, "data_format", cfg.data_format, DATA_FORMATS)
    fmt = cfg.resolved_data_format
    if cfg.task == "detection" and fmt in ("mask-folder", "cityscapes"):
        p.append(f"data_format={fmt} holds segmentation masks; detection reads data_format=coco")
    if cfg.task == "segmentation" and fmt == "coco":
        p.append("data_format=coco is read by the detection task; segmentation reads mask-folder or cityscapes")
    _one_of(p, "normalize", cfg.normalize, NORMALIZATIONS)
    for key in ("train_split", "val_split", "data_dir"):
        if not getattr(cfg, key).strip():
            p.append(f"{key} must not be empty")
    _at_least(p, cfg, ("train_limit", "eval_limit", "num_classes", "stem_width", "local_channels"), 1, or_none=True)
    if cfg.task == "segmentation" and cfg.num_classes is not None and cfg.num_classes < 2:
        p.append(f"segmentation needs num_classes >= 2 (background included), got {cfg.num_classes}")
    if cfg.min_size < 1 or cfg.max_size < cfg.min_size:
        p.append(f"need 1 <= min_size <= max_size, got min_size={cfg.min_size}, max_size={cfg.max_size}")
    _positive_pair(p, "seg_size", cfg.seg_size, int)
    _positive_pair(p, "seg_crop", cfg.seg_crop, int)
    _positive_pair(p, "seg_scale", cfg.seg_scale, float)
    if cfg.seg_scale is not None and len(cfg.seg_scale) == 2 and cfg.seg_scale[0] > cfg.seg_scale[1]:
        p.append(f"seg_scale must be [low, high] with low <= high, got {cfg.seg_scale}")
    _at_least(p, cfg, ("data_workers",), 0)

    if registries:
        try:
            _one_of(p, "model", cfg.model, dense_model_names())
        except ImportError:  # pragma: no cover - the models package is part of manlearn
            pass
    if cfg.model_widths is not None and (len(cfg.model_widths) != 4 or min(cfg.model_widths) < 1):
        p.append(f"model_widths must be 4 positive channel counts (one per stage) or none, got {cfg.model_widths}")
    _one_of(p, "method", cfg.method, _DENSE_METHODS)
    _one_of(p, "init", cfg.init, _INITS)
    if not 1 <= cfg.K <= 4:
        p.append(f"K must be in 1..4 (cuts fall between the 4 stages), got {cfg.K}")
    elif cfg.method in ("local", "man", "manpp") and cfg.K == 1:
        p.append(f"method={cfg.method} with K=1 is plain backprop; use method=e2e or K >= 2")
    if cfg.stage_cuts is not None and cfg.method != "e2e":
        cuts = list(cfg.stage_cuts)
        if len(cuts) != cfg.K - 1 or cuts != sorted(set(cuts)) or any(not 1 <= c <= 3 for c in cuts):
            p.append(f"stage_cuts must be K-1={cfg.K - 1} increasing stage numbers in 1..3, got {cuts}")
    _unit_interval(p, "momentum (EMA)", cfg.momentum)
    _at_least(p, cfg, ("fpn_channels", "aspp_channels"), 1)
    _at_least(p, cfg, ("head_convs",), 0)
    _one_of(p, "box_loss", cfg.box_loss, _BOX_LOSSES)

    _at_least(p, cfg, ("batch_size", "eval_batch_size", "iterations"), 1)
    _at_least(p, cfg, ("max_steps", "warmup_iters", "seed", "eval_every", "log_every", "ckpt_every"), 0)
    _positive(p, "lr", cfg.lr)
    steps = list(cfg.lr_steps)
    if any(s < 1 for s in steps) or any(b <= a for a, b in zip(steps, steps[1:])):
        p.append(f"lr_steps must be strictly increasing positive iterations, got {steps}")
    if not (0 < cfg.lr_gamma <= 1):
        p.append(f"lr_gamma must be in (0, 1], got {cfg.lr_gamma}")
    if not (0 < cfg.warmup_factor <= 1):
        p.append(f"warmup_factor must be in (0, 1], got {cfg.warmup_factor}")
    _non_negative(p, "weight_decay", cfg.weight_decay)
    _unit_interval(p, "sgd_momentum", cfg.sgd_momentum, include_one=False)

    _one_of(p, "amp", cfg.amp, _AMP_MODES)
    return _finish(p, cfg, devices=r"auto|cpu|cuda(:\d+)?", device_names="auto, cpu, cuda or cuda:N",
                   what="dense config")


# Thin wrappers: the generic machinery of manlearn.config with cls=DenseConfig.

def dense_config_keys() -> list[str]:
    """The valid keys of a dense config, in declaration order."""
    return config_keys(DenseConfig)


def dense_config_from_dict(data: dict[str, Any], *, where: str = "", check: bool = True) -> DenseConfig:
    """A :class:`DenseConfig` from a mapping (type-checked; unknown keys refused with a did-you-mean)."""
    return config_from_dict(data, where=where, check=check, cls=DenseConfig)


def load_dense_config(path: str | Path, *, check: bool = True) -> DenseConfig:
    """Read a YAML dense recipe on top of the :class:`DenseConfig` defaults."""
    return load_config(path, check=check, cls=DenseConfig)


def apply_dense_overrides(cfg: DenseConfig, overrides: Iterable[str], *, check: bool = True) -> DenseConfig:
    """``key=value`` overrides on a :class:`DenseConfig` (same syntax as :func:`manlearn.config.apply_overrides`)."""
    return apply_overrides(cfg, overrides, check=check)
