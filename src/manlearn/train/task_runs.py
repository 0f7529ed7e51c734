"""What a training run does differently per task, behind one small interface.

The :class:`~manlearn.train.Trainer` is task-agnostic (optimiser, schedule, evaluation periods,
checkpoints, metrics, progress).  A *task run* supplies the rest:

- the data: ``info`` (what :func:`~manlearn.train.build_learner` needs), ``n_train`` / ``n_eval``,
  ``steps_per_epoch`` and ``batches(epoch, start, stop)``: ``(inputs, targets, n)`` for the batches
  ``start..stop-1`` of ``epoch`` on the device, each a pure function of ``(seed, epoch, batch)`` (exact
  resume);
- ``step_counts(out, targets, n)``: numbers of a step summed over data-parallel ranks (classification:
  correct predictions and images) and ``step_stats(counts)``: the meters they feed;
- ``evaluate(learner)``: a metrics dict whose ``headline`` key is the task's figure (``acc``, ``AP``,
  ``miou``); ``metrics_text(metrics)``: them on one line; ``record_fields(metrics, best)``: the fields
  they add to metrics.jsonl;
- ``describe()``, ``window_fields(meters)``, ``step_text(rec)``: the header and progress lines;
- ``checkpoint_fields()``: what a checkpoint keeps about the data (dense: the classes).

:class:`TaskRun` is that interface; :func:`make_task_run` asks the task registry
(:mod:`manlearn.train.registry`) for the run of ``cfg.task.name``.
"""

from __future__ import annotations

import itertools
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import torch

from manlearn.config import TrainConfig
from manlearn.detection import CocoDetection, coco_map, collate, hflip_batch
from manlearn.errors import ConfigError, DatasetError
from manlearn.data.transforms import mix_batch
from manlearn.runtime import TAG_MIX, derive_seed, epoch_order, step_generator
from manlearn.segmentation import (ConfusionMatrix, SegmentationAugment, load_cityscapes,
                                   load_mask_folder)

from manlearn.tasks import ClassificationTask, DeepLabV3Task, RetinaNetTask

from .build import DENSE_PROBE_SIZE, IGNORE_INDEX, load_split, make_loader, normalization
from .registry import get_task, register_task

__all__ = ["TaskRun", "ClassificationRun", "DenseRun", "DetectionRun", "SegmentationRun", "DenseData",
           "make_task_run", "classification_learner_options", "evaluate", "evaluate_dense", "format_metrics", "load_dense_data", "HEADLINE"]

#: The metric each task reports first (top-1 accuracy; COCO box AP@[.5:.95]; mean IoU).
HEADLINE = {"classification": "acc", "detection": "AP", "segmentation": "miou"}


def losses_text(rec: dict[str, Any]) -> str:
    """Every block's loss, first to last (the progress line of every task)."""
    return "losses [" + " ".join(f"{v:.4f}" for v in rec["losses"]) + "]"


class TaskRun(Protocol):
    """What the Trainer asks of a task's run (see the module docstring)."""

    info: Any
    headline: str
    track_activations: bool

    @property
    def n_train(self) -> int: ...
    @property
    def n_eval(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...
    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[Any, Any, int]]: ...
    def step_counts(self, out: Any, targets: Any, n: int) -> list[Any]: ...
    def step_stats(self, counts: Sequence[float]) -> dict[str, float]: ...
    def evaluate(self, learner: torch.nn.Module) -> dict[str, Any]: ...
    def metrics_text(self, m: dict[str, Any] | None) -> str: ...
    def record_fields(self, m: dict[str, Any] | None, best: float | None) -> dict[str, Any]: ...
    def window_fields(self, meters: Any) -> dict[str, Any]: ...
    def step_text(self, rec: dict[str, Any]) -> str: ...
    def eval_text(self, m: dict[str, Any] | None) -> str: ...
    def eval_summary(self, m: dict[str, Any], step: int) -> str: ...
    def describe(self) -> str: ...
    def checkpoint_fields(self) -> dict[str, Any]: ...
    def adopt_checkpoint(self, ckpt: dict[str, Any]) -> None: ...


def make_task_run(cfg: TrainConfig, device: torch.device, *, train: bool = True) -> TaskRun:
    """The task run of ``cfg.task.name`` (``train=False``: only what evaluation needs)."""
    return get_task(cfg.task.name).run(cfg, device, train=train)


# -------------------------------------------------------------------------------------------- classification


@torch.no_grad()
def evaluate(learner: torch.nn.Module, loader: Any) -> tuple[float, int, int]:
    """Top-1 accuracy of ``learner`` (backbone + head only) over one pass of ``loader``.

    Returns ``(accuracy, correct, total)``.  The learner is put in eval mode and restored to its
    previous mode afterwards; nothing in it changes (no BN statistics, no RNG draws).
    """
    was_training = learner.training
    learner.eval()
    correct: torch.Tensor | int = 0
    total = 0
    try:
        for x, y in loader.epoch(0):
            logits = learner(x)
            correct = correct + (logits.argmax(dim=1) == y).sum()
            total += int(y.numel())
    finally:
        learner.train(was_training)
    n = int(correct) if isinstance(correct, int) else int(correct.item())
    return (n / total if total else float("nan")), n, total


def describe_data(dataset: str, train_data: Any, test_data: Any) -> str:
    """``fashion-mnist: 60000 train / 10000 test from /usr/share/...``: the folder of every split read."""
    where = {getattr(d, "source", "") for d in (train_data, test_data) if d is not None} - {""}
    if len(where) == 1:
        place = f" from {where.pop()}"
    elif where:
        place = f" (train from {train_data.source}, test from {test_data.source})"
    else:
        place = ""
    n_train = len(train_data) if train_data is not None else 0
    return f"{dataset}: {n_train} train / {len(test_data)} test{place}"


class ClassificationRun:
    """A registered image-classification dataset (``dataset``) through the resumable batch loaders."""

    name = "classification"
    headline = "acc"
    #: CPU memory measure: the activations kept for backward (the tracker of :mod:`manlearn.memory`).
    track_activations = True

    def __init__(self, cfg: TrainConfig, device: torch.device, *, train: bool = True) -> None:
        self.cfg = cfg
        self.train_data = load_split(cfg, "train", cfg.train_limit) if train else None
        self.test_data = load_split(cfg, "test", cfg.eval_limit)
        self.info = (self.train_data if train else self.test_data).info
        self.train_loader = make_loader(cfg, self.train_data, train=True, device=device) if train else None
        self.test_loader = make_loader(cfg, self.test_data, train=False, device=device)

    @property
    def n_train(self) -> int:
        return len(self.train_data) if self.train_data is not None else 0

    @property
    def n_eval(self) -> int:
        return len(self.test_data)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """Training batches ``start..stop-1`` of ``epoch``; with mixup/cutmix the targets are soft
        (``[B, classes]``), mixed by a pure function of (seed, step)."""
        t = self.cfg.task  # a section without the mixing keys (a task of your own built on this run) mixes nothing
        alpha_mix, alpha_cut = getattr(t, "mixup_alpha", 0.0), getattr(t, "cutmix_alpha", 0.0)
        mix = alpha_mix > 0 or alpha_cut > 0
        spe = len(self.train_loader)
        batches = itertools.islice(self.train_loader.epoch(epoch, start_batch=start), stop - start)
        for b, (x, y) in enumerate(batches, start=start):
            n = int(y.shape[0])
            if mix:
                x, y = mix_batch(x, y, self.info.num_classes, alpha_mix, alpha_cut,
                                 derive_seed(TAG_MIX, self.cfg.seed, epoch * spe + b))
            yield x, y, n

    def step_counts(self, out: Any, y: torch.Tensor, n: int) -> list[Any]:
        """[correct, n]: summed over the ranks under data parallelism (a tensor stays on the device).
        With soft targets (mixup, cutmix) the class of largest weight counts as the label."""
        labels = y.argmax(dim=1) if y.is_floating_point() else y
        return [(out.logits.argmax(dim=1) == labels).sum(), n]

    def step_stats(self, counts: Sequence[float]) -> dict[str, float]:
        correct, n = counts
        return {"acc": correct / n}

    def evaluate(self, learner: torch.nn.Module) -> dict[str, Any]:
        acc, correct, total = evaluate(learner, self.test_loader)
        return {"acc": acc, "correct": correct, "total": total}

    def metrics_text(self, m: dict[str, Any] | None) -> str:
        return f"test accuracy: {m['acc']:.4f}" if m else "test accuracy: n/a"

    def record_fields(self, m: dict[str, Any] | None, best: float | None) -> dict[str, Any]:
        return {"test_acc": m["acc"] if m else None, "best_acc": best}

    def window_fields(self, meters: Any) -> dict[str, Any]:
        return {"train_acc": meters["acc"].global_avg if "acc" in meters.meters else None}

    def step_text(self, rec: dict[str, Any]) -> str:
        return losses_text(rec)

    def eval_text(self, m: dict[str, Any] | None) -> str:
        return f"test_acc {m['acc']:.4f}" if m else "test_acc -"

    def eval_summary(self, m: dict[str, Any], step: int) -> str:
        """The line of ``manlearn eval``."""
        c = self.cfg
        return (f"test accuracy: {m['acc']:.4f} ({m['correct']}/{m['total']} {c.dataset} test images; "
                f"{c.model} {c.method}, step {step})")

    def describe(self) -> str:
        return describe_data(self.cfg.dataset, self.train_data, self.test_data)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {}

    def adopt_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """Take what the checkpoint knows about the data (nothing for classification: ``info`` is the dataset's)."""


# -------------------------------------------------------------------------------------------- dense data


@dataclass
class DenseData:
    """The training and validation sets of a dense run.

    Detection: ``train``/``val`` are :class:`~manlearn.detection.CocoDetection`; segmentation:
    :class:`~manlearn.segmentation.SegmentationData`.  ``n_train``/``n_val`` are the images used
    (after ``train_limit``/``eval_limit``); ``num_classes`` is the task's (detection: foreground classes).
    """

    task: str
    train: Any
    val: Any
    n_train: int
    n_val: int
    num_classes: int
    class_names: Sequence[str] | None


def _how_to_get(cfg: TrainConfig) -> str:
    fmt = cfg.task.data_format
    if fmt == "cityscapes":
        return ("Cityscapes: unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (from "
                f"https://www.cityscapes-dataset.com) into {cfg.data_dir}")
    mosaic = f"make the Fashion-MNIST mosaic with `manlearn data make-mosaic --out {cfg.data_dir}`"
    if fmt == "coco":
        return (f"{mosaic} (then task.train_split=train task.val_split=val), or point data_dir to a COCO root "
                "with train2017/ val2017/ annotations/instances_{train,val}2017.json (COCO cannot be downloaded "
                "here)")
    return f"{mosaic} (mask folders images/<split>/ + masks/<split>/; task.train_split=train task.val_split=val)"


def _coco_split(cfg: TrainConfig, split: str, **kw: Any) -> Any:
    ann = Path(cfg.data_dir) / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        have = sorted(p.name[len("instances_"):-len(".json")]
                      for p in (Path(cfg.data_dir) / "annotations").glob("instances_*.json"))
        found = (f"; {cfg.data_dir}/annotations has the splits {', '.join(have)} (set task.train_split / "
                 "task.val_split)" if have else "")
        raise DatasetError(f"{ann} not found{found}\n  how to get the data: {_how_to_get(cfg)}")
    return CocoDetection.from_root(cfg.data_dir, split, min_size=cfg.task.min_size, max_size=cfg.task.max_size,
                                   cache_images="auto", **kw)


def load_dense_data(cfg: TrainConfig, *, train: bool = True) -> DenseData:
    """Read the splits of a dense ``cfg`` (``train=False``: the validation split only, for ``manlearn eval``).

    A missing dataset raises :class:`~manlearn.errors.DatasetError` saying how to get it.
    """
    t = cfg.task
    if not Path(cfg.data_dir).is_dir():
        raise DatasetError(f"dataset folder {cfg.data_dir} not found (data_dir={cfg.data_dir}); "
                           f"{_how_to_get(cfg)}")
    if t.name == "detection":
        tr = _coco_split(cfg, t.train_split) if train else None
        va = _coco_split(cfg, t.val_split)
        ref = tr if tr is not None else va
        nc = ref.num_classes
        if t.num_classes is not None:
            if t.num_classes < nc:
                raise ConfigError(f"task.num_classes={t.num_classes} but {cfg.data_dir} has {nc} categories")
            nc = t.num_classes
        if tr is not None and va.label_to_category != tr.label_to_category:
            raise DatasetError(f"the {t.train_split} and {t.val_split} annotation files of {cfg.data_dir} "
                               "have different categories")
        n_tr = len(tr) if tr is not None else 0
        if tr is not None and cfg.train_limit is not None:
            n_tr = min(n_tr, cfg.train_limit)
        n_va = len(va) if cfg.eval_limit is None else min(len(va), cfg.eval_limit)
        return DenseData("detection", tr, va, n_tr, n_va, nc, list(ref.class_names))

    size = list(t.seg_size) if t.seg_size is not None else None

    def read(split: str, limit: int | None) -> Any:
        if t.data_format == "cityscapes":
            return load_cityscapes(cfg.data_dir, split, size=size, limit=limit, ignore_index=IGNORE_INDEX)
        return load_mask_folder(cfg.data_dir, split, num_classes=t.num_classes, ignore_index=IGNORE_INDEX,
                                size=size, limit=limit)

    try:
        tr = read(t.train_split, cfg.train_limit) if train else None
        va = read(t.val_split, cfg.eval_limit)
    except DatasetError as e:
        raise DatasetError(f"{e}\n  how to get the data: {_how_to_get(cfg)}") from None
    ref = tr if tr is not None else va
    nc = max(ref.num_classes, va.num_classes)
    if t.num_classes is not None:
        nc = t.num_classes
    return DenseData("segmentation", tr, va, len(tr) if tr is not None else 0, len(va), nc, ref.classes)


def _iter_detection(ds: Any, index_batches: list[list[int]], workers: int) -> Iterator[Any]:
    """Collated :class:`~manlearn.detection.DetectionBatch` es of ``ds`` for the given index lists; decoded
    by ``workers`` processes when the set is not held in memory."""
    if ds.cached or workers == 0:
        for idx in index_batches:
            yield ds.get_batch(idx)
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=index_batches, collate_fn=collate,
                                         num_workers=workers, persistent_workers=False)
    yield from loader


def _to_float(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
              sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
    """uint8 batch -> normalised float on ``device``; detection padding (bottom/right) stays 0 after it."""
    x = images.to(device, non_blocking=True).float().div_(255.0).sub_(mean).div_(std)
    if sizes is not None:
        h, w = x.shape[-2:]
        for k, (hk, wk) in enumerate(sizes):
            if hk < h:
                x[k, :, hk:] = 0
            if wk < w:
                x[k, :, :, wk:] = 0
    return x


@torch.no_grad()
def evaluate_dense(learner: Any, cfg: TrainConfig, data: DenseData, device: torch.device,
                   workers: int = 0) -> dict[str, Any]:
    """Detection: COCO box metrics (AP, AP50, AP75, ...) on the first ``data.n_val`` validation images;
    segmentation: mIoU, pixel and mean class accuracy.  Only the backbone and the final head are used."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in normalization(cfg))
    was = learner.training
    learner.eval()
    bs = cfg.eval_batch_size
    batches = [list(range(i, min(i + bs, data.n_val))) for i in range(0, data.n_val, bs)]
    try:
        if data.task == "detection":
            preds: dict[int, dict[str, torch.Tensor]] = {}
            for b in _iter_detection(data.val, batches, workers):
                x = _to_float(b.images, mean, std, device, b.image_sizes)
                outs = learner(x)
                dets = learner.task.predict(outs, tuple(x.shape[-2:]), image_sizes=b.image_sizes)
                for iid, d in zip(b.image_ids, dets):
                    preds[int(iid)] = {k: v.detach().cpu() for k, v in d.items()}
            ids = data.val.image_ids[:data.n_val]
            return coco_map(data.val, preds, image_ids=ids)
        cm = ConfusionMatrix(data.num_classes, IGNORE_INDEX)
        for idx in batches:
            sel = torch.tensor(idx)
            x = _to_float(data.val.images[sel], mean, std, device)
            masks = data.val.masks[sel].to(device)
            pred = learner.task.predict(learner(x), tuple(masks.shape[-2:]))
            cm.update(pred, masks)
        r = cm.compute()
        return {"miou": r["miou"], "pixel_acc": r["pixel_acc"], "mean_acc": r["mean_acc"], "iou": r["iou"]}
    finally:
        learner.train(was)


def format_metrics(task: str, metrics: dict[str, Any] | None) -> str:
    """One line: ``AP 0.123  AP50 ...`` or ``mIoU 0.456  pixel acc ...``."""
    if not metrics:
        return "n/a"
    if task == "detection":
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in ("AP", "AP50", "AP75") if k in metrics)
    return f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['pixel_acc']:.4f}  mean acc {metrics['mean_acc']:.4f}"


class DenseRun:
    """Detection (COCO-format boxes) or segmentation (masks) data for a stage-cut dense learner.

    Data are held as uint8 (the mosaic, small COCO-format sets: decoded once; full COCO: decoded by
    ``data_workers`` processes) and turned into float on the device.  The images of training step ``s``
    are slice ``s % spe`` of the permutation of epoch ``s // spe`` (:func:`~manlearn.runtime.epoch_order`)
    and their augmentation draws from :func:`~manlearn.runtime.step_generator` ``(seed, s)``.
    """

    #: CPU memory measure: the process's peak RSS (the activation tracker would slow the big heads down).
    track_activations = False

    def __init__(self, cfg: TrainConfig, device: torch.device, *, train: bool = True) -> None:
        self.cfg = cfg
        self.name = cfg.task.name
        self.headline = HEADLINE[self.name]
        self.device = device
        self.data = load_dense_data(cfg, train=train)
        self.info = types.SimpleNamespace(num_classes=self.data.num_classes, class_names=self.data.class_names)
        mean, std = normalization(cfg)
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1)
        self._order: tuple[int, torch.Tensor] | None = None

    @property
    def n_train(self) -> int:
        return self.data.n_train

    @property
    def n_eval(self) -> int:
        return self.data.n_val

    @property
    def steps_per_epoch(self) -> int:
        return self.data.n_train // self.cfg.batch_size

    def batch_indices(self, epoch: int, b: int) -> list[int]:
        """Training images of batch ``b`` of ``epoch``: a slice of the epoch's permutation."""
        bs = self.cfg.batch_size
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.data.n_train))
        return self._order[1][b * bs:(b + 1) * bs].tolist()

    def step_counts(self, out: Any, targets: Any, n: int) -> list[Any]:
        return [n]

    def step_stats(self, counts: Sequence[float]) -> dict[str, float]:
        return {}

    def evaluate(self, learner: Any) -> dict[str, Any]:
        return evaluate_dense(learner, self.cfg, self.data, self.device, workers=self.cfg.data_workers)

    def metrics_text(self, m: dict[str, Any] | None) -> str:
        return f"{self.name} ({self.data.n_val} val images): {format_metrics(self.name, m)}"

    def record_fields(self, m: dict[str, Any] | None, best: float | None) -> dict[str, Any]:
        return {"metrics": m, "n_val": self.data.n_val}

    def window_fields(self, meters: Any) -> dict[str, Any]:
        return {}

    def step_text(self, rec: dict[str, Any]) -> str:
        return losses_text(rec)

    def eval_text(self, m: dict[str, Any] | None) -> str:
        return format_metrics(self.name, m) if m else "-"

    def eval_summary(self, m: dict[str, Any], step: int) -> str:
        c = self.cfg
        return (f"{self.name}: {format_metrics(self.name, m)} ({self.data.n_val} {c.task.val_split} images of "
                f"{c.data_dir}; {c.model} {c.method}, step {step})")

    def describe(self) -> str:
        return (f"{Path(self.cfg.data_dir).resolve()}: {self.data.n_train} train / {self.data.n_val} val images, "
                f"{self.data.num_classes} classes")

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"kind": "dense", "num_classes": self.data.num_classes,
                "class_names": list(self.data.class_names) if self.data.class_names else None}

    def adopt_checkpoint(self, ckpt: dict[str, Any]) -> None:
        """The number of classes the checkpoint's heads were built for (``manlearn eval``)."""
        if "num_classes" in ckpt:
            self.data.num_classes = self.info.num_classes = int(ckpt["num_classes"])


class DetectionRun(DenseRun):
    """Detection: COCO-format boxes, RetinaNet's heads; box AP."""

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[torch.Tensor, Any, int]]:
        """``(images float on device, per-image box targets, n)`` of batches ``start..stop-1``, flipped."""
        cfg, dev, spe = self.cfg, self.device, self.steps_per_epoch
        index_batches = [self.batch_indices(epoch, b) for b in range(start, stop)]
        for b, batch in zip(range(start, stop), _iter_detection(self.data.train, index_batches, cfg.data_workers)):
            if cfg.task.hflip:
                batch = hflip_batch(batch, generator=step_generator(cfg.seed, epoch * spe + b))
            x = _to_float(batch.images, self._mean, self._std, dev, batch.image_sizes)
            targets = [{k: v.to(dev, non_blocking=True) for k, v in t.items()} for t in batch.targets]
            yield x, targets, len(targets)


class SegmentationRun(DenseRun):
    """Segmentation: label maps, DeepLabV3+; mean IoU."""

    def __init__(self, cfg: TrainConfig, device: torch.device, *, train: bool = True) -> None:
        super().__init__(cfg, device, train=train)
        t = cfg.task
        self._augment = SegmentationAugment(flip=t.hflip, scale=t.seg_scale, crop=t.seg_crop,
                                            ignore_index=IGNORE_INDEX)

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[torch.Tensor, Any, int]]:
        """``(images float on device, label maps, n)`` of batches ``start..stop-1``, augmented."""
        cfg, dev, spe = self.cfg, self.device, self.steps_per_epoch
        for b in range(start, stop):
            sel = torch.tensor(self.batch_indices(epoch, b))
            images = self.data.train.images[sel].to(dev, non_blocking=True)
            masks = self.data.train.masks[sel].to(dev, non_blocking=True)
            images, masks = self._augment(images, masks, generator=step_generator(cfg.seed, epoch * spe + b))
            yield _to_float(images, self._mean, self._std, dev), masks, int(masks.shape[0])


# -------------------------------------------------------------------------------------------- the built-in tasks


def classification_learner_options(cfg: TrainConfig, info: Any) -> dict[str, Any]:
    """The data side of a classifier's learner: the dataset's shapes and normalisation, the config's split."""
    split: Any = cfg.split
    if not isinstance(split, str):
        split = [tuple(b) if isinstance(b, (list, tuple)) else b for b in split]
    return dict(in_channels=info.in_channels, image_size=info.image_size,
                normalization=(tuple(info.mean), tuple(info.std)), split=split, stem_module=cfg.stem_module,
                grad_checkpoint=cfg.grad_checkpoint)


def _dense_options(cfg: TrainConfig, info: Any) -> dict[str, Any]:
    """Stage-reading tasks: a stage-cut backbone probed at 64 px (any size trains); never a loaded classifier."""
    t = cfg.task
    model_kwargs: dict[str, Any] = {"pretrained_head": False} if cfg.pretrained else {}
    if t.model_widths is not None:
        model_kwargs["widths"] = tuple(t.model_widths)
    if t.stem_width is not None:
        model_kwargs["stem_width"] = t.stem_width
    split = "stages:" + ",".join(map(str, t.stage_cuts)) if t.stage_cuts is not None else "auto"
    return dict(in_channels=3, image_size=DENSE_PROBE_SIZE, normalization=normalization(cfg), split=split,
                model_kwargs=model_kwargs)


def _register_builtins() -> None:
    from manlearn.config import ClassificationTask as ClassificationSection
    from manlearn.config import DetectionTask as DetectionSection
    from manlearn.config import SegmentationTask as SegmentationSection

    register_task("classification", section=ClassificationSection,
                  build=lambda cfg, n: ClassificationTask(n, label_smoothing=cfg.task.label_smoothing),
                  learner_options=classification_learner_options, run=ClassificationRun, data_parallel=True,
                  plannable=True)
    register_task("detection", section=DetectionSection,
                  build=lambda cfg, n: RetinaNetTask(n, fpn_channels=cfg.task.fpn_channels,
                                                     head_convs=cfg.task.head_convs, box_loss=cfg.task.box_loss,
                                                     local_channels=cfg.task.local_channels, norm=cfg.task.head_norm),
                  learner_options=_dense_options, run=DetectionRun)
    register_task("segmentation", section=SegmentationSection,
                  build=lambda cfg, n: DeepLabV3Task(n, ignore_index=IGNORE_INDEX, aspp_channels=cfg.task.aspp_channels,
                                                     decoder=cfg.task.decoder, local_channels=cfg.task.local_channels),
                  learner_options=_dense_options, run=SegmentationRun)


_register_builtins()
