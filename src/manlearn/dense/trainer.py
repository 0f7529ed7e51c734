"""Training loop of dense runs (RetinaNet detection, DeepLabV3+ segmentation) on a stage-cut backbone.

The :class:`~manlearn.dense.DenseLocalLearner` owns the modules and the local-learning step; this module
owns everything around it, with the same promises as the classification :class:`~manlearn.train.Trainer`:

- **exact resume**: the lr is a pure function of the step (:func:`lr_at`), the training batch of step
  ``s`` is a pure function of ``(seed, s)`` (a per-epoch permutation seeded by ``(seed, epoch)``) and so
  is its augmentation (a generator seeded by ``(seed, s)``), and ``last.pt`` carries parameters, buffers
  (EMA units, BN statistics), the optimiser state and the RNG states.  N steps + resume + M steps gives
  bit-identical parameters (CPU) to N + M steps;
- checkpoints are atomic (:func:`manlearn.train.save_checkpoint`) and marked ``kind: dense``; resuming
  with a different model / optimisation config is refused (:data:`DENSE_RESUME_FREE_KEYS` may differ);
- a run never silently overwrites another run's ``last.pt``.

Data are held as uint8 (the mosaic, small COCO-format sets: decoded once; full COCO: decoded by
``data_workers`` processes) and turned into float on the device.  Normalisation: ImageNet mean/std by
default (``normalize=imagenet``, what ResNet backbones are usually trained with, so ImageNet weights
would drop in), or 0.5/0.5 (``normalize=half``).
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from manlearn.errors import CheckpointError, ConfigError, DatasetError
from manlearn.memory import peak_rss_bytes
from manlearn.runtime import amp_dtype, resolve_device
from manlearn.train.checkpoint import (checkpoint_config, config_differences, eval_config, load_checkpoint,
                                       load_model_state)
from manlearn.train.run import CKPT_NAME, METRICS_NAME, TrainerBase

from .config import DENSE_RESUME_FREE_KEYS, DenseConfig, validate_dense

__all__ = ["DenseTrainer", "DenseData", "lr_at", "load_dense_data", "build_dense_learner", "evaluate_dense",
           "evaluate_checkpoint", "epoch_order", "CKPT_KIND", "CKPT_NAME", "METRICS_NAME", "HEADLINE"]

CKPT_KIND = "dense"
#: The metric each task reports first (COCO box AP@[.5:.95]; mean IoU).
HEADLINE = {"detection": "AP", "segmentation": "miou"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255

#: Called after every optimiser step (after any periodic checkpoint) with the trainer.
DenseStepHook = Callable[["DenseTrainer"], None]


# -------------------------------------------------------------------------------------------- schedule


def lr_at(cfg: DenseConfig, step: int) -> float:
    """Learning rate of optimiser step ``step`` (0-based): ``lr · γ^(#lr_steps ≤ step)``, times a linear
    warm-up factor ``f + (1 − f)·step/W`` for ``step < W = warmup_iters`` (Detectron's WarmupMultiStepLR)."""
    lr = cfg.lr * cfg.lr_gamma ** sum(1 for s in cfg.lr_steps if step >= s)
    if step < cfg.warmup_iters:
        alpha = step / cfg.warmup_iters
        lr *= cfg.warmup_factor * (1.0 - alpha) + alpha
    return lr


def _seed_of(*parts: int) -> int:
    """A 63-bit seed derived from integers (SeedSequence mixing: nearby inputs give unrelated seeds)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of the ``n`` training images in ``epoch``: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(seed, epoch, 0)))


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The augmentation RNG of training step ``step`` (pure function of (seed, step): exact resume)."""
    return torch.Generator().manual_seed(_seed_of(seed, step, 1))


# -------------------------------------------------------------------------------------------- data


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


def _how_to_get(cfg: DenseConfig) -> str:
    fmt = cfg.resolved_data_format
    if fmt == "cityscapes":
        return ("Cityscapes: unpack leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (from "
                f"https://www.cityscapes-dataset.com) into {cfg.data_dir}")
    mosaic = f"make the Fashion-MNIST mosaic with `manlearn data make-mosaic --out {cfg.data_dir}`"
    if fmt == "coco":
        return (f"{mosaic} (then train_split=train val_split=val), or point data_dir to a COCO root with "
                "train2017/ val2017/ annotations/instances_{train,val}2017.json (COCO cannot be downloaded here)")
    return f"{mosaic} (mask folders images/<split>/ + masks/<split>/; train_split=train val_split=val)"


def _coco_split(cfg: DenseConfig, split: str, **kw: Any) -> Any:
    from manlearn.detection import CocoDetection

    ann = Path(cfg.data_dir) / "annotations" / f"instances_{split}.json"
    if not ann.is_file():
        have = sorted(p.name[len("instances_"):-len(".json")]
                      for p in (Path(cfg.data_dir) / "annotations").glob("instances_*.json"))
        found = (f"; {cfg.data_dir}/annotations has the splits {', '.join(have)} (set train_split / val_split)"
                 if have else "")
        raise DatasetError(f"{ann} not found{found}\n  how to get the data: {_how_to_get(cfg)}")
    return CocoDetection.from_root(cfg.data_dir, split, min_size=cfg.min_size, max_size=cfg.max_size,
                                   cache_images="auto", **kw)


def load_dense_data(cfg: DenseConfig, *, train: bool = True) -> DenseData:
    """Read the splits of ``cfg`` (``train=False``: the validation split only, for ``manlearn eval``).

    A missing dataset raises :class:`~manlearn.errors.DatasetError` saying how to get it.
    """
    if not Path(cfg.data_dir).is_dir():
        raise DatasetError(f"dataset folder {cfg.data_dir} not found (data_dir={cfg.data_dir}); "
                           f"{_how_to_get(cfg)}")
    fmt = cfg.resolved_data_format
    if cfg.task == "detection":
        tr = _coco_split(cfg, cfg.train_split) if train else None
        va = _coco_split(cfg, cfg.val_split)
        ref = tr if tr is not None else va
        nc = ref.num_classes
        if cfg.num_classes is not None:
            if cfg.num_classes < nc:
                raise ConfigError(f"num_classes={cfg.num_classes} but {cfg.data_dir} has {nc} categories")
            nc = cfg.num_classes
        if tr is not None and va.label_to_category != tr.label_to_category:
            raise DatasetError(f"the {cfg.train_split} and {cfg.val_split} annotation files of {cfg.data_dir} "
                               "have different categories")
        n_tr = len(tr) if tr is not None else 0
        if tr is not None and cfg.train_limit is not None:
            n_tr = min(n_tr, cfg.train_limit)
        n_va = len(va) if cfg.eval_limit is None else min(len(va), cfg.eval_limit)
        return DenseData("detection", tr, va, n_tr, n_va, nc, list(ref.class_names))

    from manlearn.segmentation import load_cityscapes, load_mask_folder

    size = list(cfg.seg_size) if cfg.seg_size is not None else None

    def read(split: str, limit: int | None) -> Any:
        if fmt == "cityscapes":
            return load_cityscapes(cfg.data_dir, split, size=size, limit=limit, ignore_index=IGNORE_INDEX)
        return load_mask_folder(cfg.data_dir, split, num_classes=cfg.num_classes, ignore_index=IGNORE_INDEX,
                                size=size, limit=limit)

    try:
        tr = read(cfg.train_split, cfg.train_limit) if train else None
        va = read(cfg.val_split, cfg.eval_limit)
    except DatasetError as e:
        raise DatasetError(f"{e}\n  how to get the data: {_how_to_get(cfg)}") from None
    ref = tr if tr is not None else va
    nc = max(ref.num_classes, va.num_classes)
    if cfg.num_classes is not None:
        nc = cfg.num_classes
    return DenseData("segmentation", tr, va, len(tr) if tr is not None else 0, len(va), nc, ref.classes)


def _iter_detection(ds: Any, index_batches: list[list[int]], workers: int) -> Iterator[Any]:
    """Collated :class:`~manlearn.detection.DetectionBatch` es of ``ds`` for the given index lists; decoded
    by ``workers`` processes when the set is not held in memory."""
    from manlearn.detection import collate

    if ds.cached or workers == 0:
        for idx in index_batches:
            yield ds.get_batch(idx)
        return
    loader = torch.utils.data.DataLoader(ds, batch_sampler=index_batches, collate_fn=collate,
                                         num_workers=workers, persistent_workers=False)
    yield from loader


# -------------------------------------------------------------------------------------------- model


def build_task(cfg: DenseConfig, num_classes: int) -> Any:
    """The task object (heads, loss, post-processing) described by ``cfg``."""
    if cfg.task == "detection":
        from manlearn.detection import RetinaNetTask

        return RetinaNetTask(num_classes, fpn_channels=cfg.fpn_channels, head_convs=cfg.head_convs,
                             box_loss=cfg.box_loss, local_channels=cfg.local_channels, norm=cfg.head_norm)
    from manlearn.segmentation import DeepLabV3Task

    return DeepLabV3Task(num_classes, ignore_index=IGNORE_INDEX, aspp_channels=cfg.aspp_channels,
                         decoder=cfg.decoder, local_channels=cfg.local_channels)


def _norm(cfg: DenseConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    return (IMAGENET_MEAN, IMAGENET_STD) if cfg.normalize == "imagenet" else ((0.5,) * 3, (0.5,) * 3)


def build_dense_learner(cfg: DenseConfig, num_classes: int, device: torch.device | str = "cpu") -> Any:
    """The :class:`~manlearn.dense.DenseLocalLearner` of ``cfg`` (shared by training and ``manlearn eval``)."""
    from .learner import DenseLocalLearner

    dev = torch.device(device)
    kwargs: dict[str, Any] = {}
    if cfg.model_widths is not None:
        kwargs["widths"] = tuple(cfg.model_widths)
    if cfg.stem_width is not None:
        kwargs["stem_width"] = cfg.stem_width
    mean, std = _norm(cfg)
    learner = DenseLocalLearner(
        build_task(cfg, num_classes), model=cfg.model, method=cfg.method, K=1 if cfg.method == "e2e" else cfg.K,
        stage_cuts=list(cfg.stage_cuts) if cfg.stage_cuts is not None and cfg.method != "e2e" else None,
        momentum=cfg.momentum, init=cfg.init, norm_mean=mean, norm_std=std,
        channels_last=cfg.channels_last, amp_dtype=amp_dtype(cfg.amp, dev), model_kwargs=kwargs)
    return learner.to(dev)


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


# -------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_dense(learner: Any, cfg: DenseConfig, data: DenseData, device: torch.device,
                   workers: int = 0) -> dict[str, Any]:
    """Detection: COCO box metrics (AP, AP50, AP75, ...) on the first ``data.n_val`` validation images;
    segmentation: mIoU, pixel and mean class accuracy.  Only the backbone and the final head are used."""
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in _norm(cfg))
    was = learner.training
    learner.eval()
    bs = cfg.eval_batch_size
    batches = [list(range(i, min(i + bs, data.n_val))) for i in range(0, data.n_val, bs)]
    try:
        if data.task == "detection":
            from manlearn.detection import coco_map

            preds: dict[int, dict[str, torch.Tensor]] = {}
            for b in _iter_detection(data.val, batches, workers):
                x = _to_float(b.images, mean, std, device, b.image_sizes)
                outs = learner(x)
                dets = learner.task.predict(outs, tuple(x.shape[-2:]), image_sizes=b.image_sizes)
                for iid, d in zip(b.image_ids, dets):
                    preds[int(iid)] = {k: v.detach().cpu() for k, v in d.items()}
            ids = data.val.image_ids[:data.n_val]
            return coco_map(data.val, preds, image_ids=ids)
        from manlearn.segmentation import ConfusionMatrix

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


def evaluate_checkpoint(path: str | Path, *, device: str = "auto", data_dir: str | None = None,
                        limit: int | None = None, batch_size: int | None = None) -> dict[str, Any]:
    """``manlearn eval`` of a dense checkpoint: rebuild the model from its config, evaluate on its val split.

    Returns ``{"task", "metrics", "cfg", "step", "n_val"}``.
    """
    ckpt = load_checkpoint(path)
    if ckpt.get("kind") != CKPT_KIND:
        raise CheckpointError(f"{path} is not a dense (detection/segmentation) checkpoint")
    cfg = checkpoint_config(ckpt, path, cls=DenseConfig)
    cfg = validate_dense(eval_config(cfg, device=device, data_dir=data_dir, limit_key="eval_limit", limit=limit,
                                     batch_size=batch_size))
    dev = resolve_device(cfg.device)
    data = load_dense_data(cfg, train=False)
    nc = int(ckpt.get("num_classes", data.num_classes))
    data.num_classes = nc
    learner = build_dense_learner(cfg, nc, dev)
    load_model_state(learner, ckpt, path)
    metrics = evaluate_dense(learner, cfg, data, dev, workers=cfg.data_workers)
    return {"task": cfg.task, "metrics": metrics, "cfg": cfg, "step": int(ckpt["step"]), "n_val": data.n_val}


# -------------------------------------------------------------------------------------------- trainer


class DenseTrainer(TrainerBase):
    """Train a :class:`~manlearn.dense.DenseLocalLearner` as described by a :class:`DenseConfig`.

    The arguments (``cfg``, ``resume``, ``overwrite``, ``hooks``, ``out``) are those of every manlearn
    trainer, described on :class:`~manlearn.train.run.TrainerBase`.  Checkpoints are marked ``kind: dense``.
    """

    def __init__(self, cfg: DenseConfig, *, resume: bool = False, overwrite: bool = False,
                 hooks: Iterable[DenseStepHook] = (), out: Any = None) -> None:
        self.cfg = cfg = validate_dense(cfg)
        self._out = out if out is not None else sys.stdout
        self.hooks = list(hooks)
        self.device = resolve_device(cfg.device)
        amp_dtype(cfg.amp, self.device)  # refuse amp on a CPU before loading anything
        ckpt = self._open_run(cfg.out_dir, resume=resume, overwrite=overwrite)

        self.data = load_dense_data(cfg)
        self.steps_per_epoch = self.data.n_train // cfg.batch_size
        if self.steps_per_epoch == 0:
            raise ConfigError(f"batch_size={cfg.batch_size} is larger than the {self.data.n_train} training "
                              "images (the last partial batch of an epoch is dropped): nothing to train")
        self._workers = cfg.data_workers

        self._seed(cfg.seed)
        self.learner = build_dense_learner(cfg, self.data.num_classes, self.device)
        params = [p for p in self.learner.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.sgd_momentum,
                                         weight_decay=cfg.weight_decay, foreach=True)
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None
        mean, std = _norm(cfg)
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self._augment: Any = None
        if cfg.task == "segmentation":
            from manlearn.segmentation import SegmentationAugment

            self._augment = SegmentationAugment(
                flip=cfg.hflip, scale=cfg.seg_scale, crop=cfg.seg_crop, ignore_index=IGNORE_INDEX)

        self._reset_counters()
        self.last_metrics: dict[str, Any] | None = None
        self._order: tuple[int, torch.Tensor] | None = None
        self._stop_at = cfg.iterations
        self._start_from(ckpt)

    # ------------------------------------------------------------------ output
    def _peak(self) -> int:
        """CUDA: the allocator's peak; CPU: the process's peak resident memory (data and weights included)."""
        cur = (int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda"
               else peak_rss_bytes())
        return max(cur, self.peak_mem_saved or 0)

    @property
    def peak_mem_kind(self) -> str:
        return "CUDA allocator peak" if self.device.type == "cuda" else "process peak RSS"

    # ------------------------------------------------------------------ checkpoints
    def _check_resumable(self, ckpt: dict[str, Any]) -> None:
        if ckpt.get("kind") != CKPT_KIND:
            raise CheckpointError(f"{self.ckpt_path} is a classification checkpoint, not a dense one; use another "
                                  "out_dir (or --overwrite to replace it)")
        diffs = config_differences(ckpt["config"], self.cfg, ignore=DENSE_RESUME_FREE_KEYS)
        if diffs:
            items = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
            raise CheckpointError(
                f"checkpoint {self.ckpt_path} belongs to another configuration; differing keys: {items}. "
                "Use another out_dir, or the checkpoint's settings, to resume (keys free to change: "
                f"{', '.join(sorted(DENSE_RESUME_FREE_KEYS))}).")

    def _extra_state(self) -> dict[str, Any]:
        """The kind mark, the position (derived from the step), the classes and the last evaluation."""
        spe = self.steps_per_epoch
        return {
            "kind": CKPT_KIND,
            "epoch": self.step // spe, "batch": self.step % spe,
            "num_classes": self.data.num_classes,
            "class_names": list(self.data.class_names) if self.data.class_names else None,
            "last_metrics": self.last_metrics,
        }

    def _restore_own(self, ckpt: dict[str, Any]) -> None:
        if int(ckpt.get("steps_per_epoch", self.steps_per_epoch)) != self.steps_per_epoch:
            raise self._spe_mismatch(ckpt.get("steps_per_epoch"))
        self.step = int(ckpt["step"])
        self.last_metrics = ckpt.get("last_metrics")

    # ------------------------------------------------------------------ batches
    def batch_indices(self, step: int) -> list[int]:
        """Training images of step ``step``: slice ``step % spe`` of the permutation of epoch ``step // spe``."""
        spe, bs = self.steps_per_epoch, self.cfg.batch_size
        epoch, b = divmod(step, spe)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.cfg.seed, epoch, self.data.n_train))
        return self._order[1][b * bs:(b + 1) * bs].tolist()

    def _batches(self, start: int, stop: int) -> Iterator[tuple[torch.Tensor, Any, int]]:
        """``(images float on device, targets, n)`` for steps ``start..stop-1``, augmented."""
        cfg = self.cfg
        if self.data.task == "detection":
            from manlearn.detection import hflip_batch

            index_batches = [self.batch_indices(s) for s in range(start, stop)]
            for step, b in zip(range(start, stop), _iter_detection(self.data.train, index_batches, self._workers)):
                if cfg.hflip:
                    b = hflip_batch(b, generator=_step_generator(cfg.seed, step))
                x = _to_float(b.images, self._mean, self._std, self.device, b.image_sizes)
                targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in b.targets]
                yield x, targets, len(targets)
            return
        for step in range(start, stop):
            sel = torch.tensor(self.batch_indices(step))
            images = self.data.train.images[sel].to(self.device, non_blocking=True)
            masks = self.data.train.masks[sel].to(self.device, non_blocking=True)
            images, masks = self._augment(images, masks, generator=_step_generator(cfg.seed, step))
            yield _to_float(images, self._mean, self._std, self.device), masks, int(masks.shape[0])

    # ------------------------------------------------------------------ the loop
    def evaluate(self) -> dict[str, Any]:
        """Validation metrics now (see :func:`evaluate_dense`); recorded in metrics.jsonl."""
        t = time.perf_counter()
        m = evaluate_dense(self.learner, self.cfg, self.data, self.device, workers=self._workers)
        self.last_metrics = m
        self.last_eval_step = self.step
        rec = {"type": "eval", "step": self.step, "metrics": m, "n_val": self.data.n_val,
               "eval_s": time.perf_counter() - t, "elapsed_s": self._elapsed()}
        self._record(rec)
        self._say(f"eval at step {self.step} ({self.data.n_val} val images, {rec['eval_s']:.1f} s): "
                  f"{format_metrics(self.cfg.task, m)}")
        return m

    def _train_one(self, x: torch.Tensor, targets: Any, n: int) -> None:
        cfg = self.cfg
        lr = lr_at(cfg, self.step)
        scale = self._set_lr(lr)
        t = time.perf_counter()
        out = self.learner.train_step(x, targets, grad_scale=scale)
        losses = [float(v) for v in out.losses]  # already on the host: the step has synchronised
        if not all(math.isfinite(v) for v in losses) and self.scaler is None:
            raise ConfigError(f"the training loss is not finite at step {self.step} (block losses {losses}, lr "
                              f"{lr:.4g}): lower lr or lengthen warmup_iters; {self.ckpt_path} keeps the last "
                              "good state")
        self._optimizer_step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        dt = time.perf_counter() - t
        self.step += 1
        self.meters.update(**{f"loss{k}": v for k, v in enumerate(losses)})
        self.meters.update(time=dt)
        self._step_done(dt, n, losses[-1], lr, img_s_fmt=".1f")

    def _position(self) -> dict[str, Any]:
        return {"epoch": self.step // self.steps_per_epoch}

    def _window_stats(self) -> dict[str, Any]:
        return {"images_per_s": self._take_window_rate(), "seconds_per_iter": self.meters["time"].avg}

    def _step_line(self, rec: dict[str, Any], lr: float, eta_s: float) -> str:
        losses = " ".join(f"{v:.4f}" for v in rec["losses"])
        return (f"step {self.step}/{self._stop_at}  losses [{losses}]  lr {lr:.4g}  "
                f"{(rec['images_per_s'] or 0):.1f} img/s  {rec['seconds_per_iter']:.3f} s/it  "
                f"ETA {eta_s / 60:.1f} min  peak mem {rec['peak_mem_bytes'] / 2**20:.0f} MiB")

    def _header(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.learner.parameters() if p.requires_grad)
        widths = f" widths {cfg.model_widths}" if cfg.model_widths else ""
        self._say(f"manlearn dense: {cfg.task} ({type(self.learner.task).__name__}) | {cfg.model}{widths} "
                  f"{cfg.method} K={self.learner.K} cuts {self.learner.stage_cuts} | {cfg.data_dir}: "
                  f"{self.data.n_train} train / {self.data.n_val} val images, {self.data.num_classes} classes | "
                  f"{cfg.iterations} iterations x batch {cfg.batch_size} ({self.steps_per_epoch} steps/epoch) | "
                  f"device {self.device} | {n_params:,} trainable parameters | out_dir {self.out_dir}")
        if self.resumed:
            self._say(f"resuming from {self.ckpt_path} at step {self.step}")

    def fit(self) -> dict[str, Any]:
        """Train until ``iterations`` (or ``max_steps``) steps are done, evaluate, checkpoint; return a summary.

        Summary keys: ``task``, ``metrics`` (last evaluation), ``headline`` (AP or mIoU), ``steps``,
        ``seconds_per_iter`` (training steps only), ``images_per_s``, ``peak_mem_bytes`` with
        ``peak_mem_kind``, ``elapsed_s``, ``stopped_early``, ``out_dir``, ``checkpoint``.
        """
        cfg = self.cfg
        stop_at = min(cfg.iterations, cfg.max_steps) if cfg.max_steps else cfg.iterations
        self._begin_fit(stop_at, cfg.task)
        try:
            # In chunks that end at checkpoint / evaluation steps, so a data-loader pass never outlives them.
            while self.step < stop_at:
                nxt = stop_at
                for every in (cfg.ckpt_every, cfg.eval_every):
                    if every:
                        nxt = min(nxt, (self.step // every + 1) * every)
                for x, targets, n in self._batches(self.step, nxt):
                    self._train_one(x, targets, n)
                    for hook in self.hooks:
                        hook(self)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < stop_at:
                    self.evaluate()
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0 and self.step < stop_at:
                    self.save()
        finally:
            self._close_bar()
        self.peak_mem_saved = self._peak()
        if self.last_eval_step != self.step:
            self.evaluate()
        self.save()
        head = HEADLINE[cfg.task]
        return {
            "task": cfg.task,
            "metrics": self.last_metrics,
            "headline": (head, (self.last_metrics or {}).get(head)),
            "steps": self.step,
            **self._speed_summary(),
            "peak_mem_kind": self.peak_mem_kind,
            **self._end_summary(self.step < cfg.iterations),
        }
