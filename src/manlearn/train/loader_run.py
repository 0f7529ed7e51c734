"""The task run of a Trainer built from your own objects: any iterables of ``(x, y)`` batches.

Exact resume holds for your data too: a batch is fixed by (epoch, index) when the data are a list of
batches, manlearn's own loaders, or a ``torch.utils.data.DataLoader`` — a shuffling DataLoader's order
(and its workers' seeds) is drawn each epoch from a generator seeded by (seed, epoch), and a resumed
epoch skips its finished batches with the global random state set aside, so the batches and random
draws after the checkpoint are those the uninterrupted run saw.
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from manlearn.data import BatchLoader, StreamingLoader
from manlearn.errors import ConfigError
from manlearn.runtime import TAG_PERM, derive_seed

from .task_runs import ClassificationRun

__all__ = ["LoaderRun"]


def to_device(v: Any, device: torch.device) -> Any:
    """Tensors (also inside dicts, lists and tuples: detection targets) moved to ``device``."""
    if isinstance(v, torch.Tensor):
        return v.to(device, non_blocking=True)
    if isinstance(v, dict):
        return {k: to_device(u, device) for k, u in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(to_device(u, device) for u in v)
    return v


def _batch_pair(item: Any, what: str) -> tuple[Any, Any]:
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise ConfigError(f"{what} must yield (inputs, targets) pairs, got {type(item).__name__}"
                      + (f" of {len(item)} items" if isinstance(item, (tuple, list)) else ""))


class LoaderRun(ClassificationRun):
    """Training batches from ``train_data``; evaluation (top-1 accuracy) on ``eval_data`` when given."""

    def __init__(self, learner: torch.nn.Module, train_data: Iterable, eval_data: Iterable | None,
                 device: torch.device, seed: int) -> None:
        try:
            n = len(train_data)  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(f"train_data must have a length (batches per epoch), as a DataLoader or a list of "
                              f"batches has; got {type(train_data).__name__}") from None
        if eval_data is not None and not getattr(learner.task, "per_image_labels", False):
            raise ConfigError(f"eval_data: the Trainer evaluates top-1 accuracy, which task "
                              f"{type(learner.task).__name__} does not have; evaluate it in a callback "
                              "(on_checkpoint) instead")
        self.train_data, self.eval_data = train_data, eval_data
        self.device, self.seed, self._n = device, seed, int(n)
        self.info = None
        batch_size = getattr(train_data, "batch_size", None)  # a DataLoader's: the memory line's batch
        self.batch_size = batch_size if isinstance(batch_size, int) and batch_size > 0 else None
        self.test_data = self.train_loader = self.test_loader = None
        self._n_eval: int | None = None
        self._live: tuple[int, int, Iterator] | None = None  # (epoch, next batch, iterator) of the open epoch

    @property
    def evaluates(self) -> bool:
        """Whether there is anything to evaluate (eval_data was given)."""
        return self.eval_data is not None

    @property
    def n_train(self) -> int:
        dataset = getattr(self.train_data, "dataset", None)
        return len(dataset) if hasattr(dataset, "__len__") else self._n

    @property
    def n_eval(self) -> int | str:
        return self._n_eval if self._n_eval is not None else "?"

    @property
    def steps_per_epoch(self) -> int:
        return self._n

    def _open_epoch(self, epoch: int, start: int) -> Iterator:
        data = self.train_data
        if isinstance(data, (BatchLoader, StreamingLoader)):
            return iter(data.epoch(epoch, start_batch=start))
        if isinstance(data, torch.utils.data.DataLoader):
            gen = torch.Generator().manual_seed(derive_seed(TAG_PERM, self.seed, epoch))
            data.generator = gen  # the workers' base seed
            if hasattr(data.sampler, "generator"):
                data.sampler.generator = gen  # a shuffling sampler's order
            if hasattr(data.sampler, "set_epoch"):
                data.sampler.set_epoch(epoch)
        with torch.random.fork_rng(devices=[]):  # opening and skipping draw nothing from the run's RNG
            it = iter(data)
            for _ in itertools.islice(it, start):
                pass
        return it

    def batches(self, epoch: int, start: int, stop: int) -> Iterator[tuple[Any, Any, int]]:
        live = self._live
        it = live[2] if live is not None and live[:2] == (epoch, start) else self._open_epoch(epoch, start)
        for b in range(start, stop):
            try:
                item = next(it)
            except StopIteration:
                raise ConfigError(f"train_data gave {b} batches in epoch {epoch}, but its len() is {self._n}") from None
            self._live = (epoch, b + 1, it)
            x, y = _batch_pair(item, "train_data")
            x = to_device(x, self.device)
            yield x, to_device(y, self.device), int(x.shape[0])

    def step_counts(self, out: Any, y: Any, n: int) -> list[Any]:
        if isinstance(y, torch.Tensor) and getattr(out, "logits", None) is not None and y.dim() >= 1 \
                and isinstance(out.logits, torch.Tensor) and out.logits.dim() == 2:
            return super().step_counts(out, y, n)
        return [float("nan"), n]  # no per-image class labels: no training accuracy

    def _eval_batch(self, learner: torch.nn.Module, item: Any) -> tuple[Any, Any]:
        """One evaluation batch on the device, refused in one line where training would refuse it."""
        x, y = _batch_pair(item, "eval_data")
        x, y = to_device(x, self.device), to_device(y, self.device)
        try:
            learner.check_batch(x, y)
        except ConfigError as e:
            raise ConfigError(f"eval_data: {e}") from None
        return x, y

    def input_hw(self) -> tuple[int, int] | None:
        """Height and width of the first training batch's images (None when they are not [B, C, H, W]); the
        draw leaves the run's random state and the epochs' batches as they were."""
        with torch.random.fork_rng(devices=[]):
            first = next(self._open_epoch(0, 0), None)
        x = first[0] if isinstance(first, (tuple, list)) and len(first) == 2 else None
        return (int(x.shape[-2]), int(x.shape[-1])) if isinstance(x, torch.Tensor) and x.dim() == 4 else None

    def check_eval_data(self, learner: torch.nn.Module) -> None:
        """Check the first evaluation batch before any training: a bad one would stop the run only at its
        first evaluation, an epoch later (drawing it leaves the run's random state as it was)."""
        if self.eval_data is None:
            return
        with torch.random.fork_rng(devices=[]):
            first = next(iter(self.eval_data), None)
        if first is None:
            raise ConfigError("eval_data holds no batch: nothing to evaluate (pass eval_data=None to train without)")
        self._eval_batch(learner, first)

    @torch.no_grad()
    def evaluate(self, learner: torch.nn.Module) -> dict[str, Any]:
        if self.eval_data is None:
            return {}
        was = learner.training
        learner.eval()
        correct, total = 0, 0
        try:
            for item in self.eval_data:
                x, y = self._eval_batch(learner, item)
                labels = y.argmax(dim=1) if y.is_floating_point() else y
                correct += int((learner(x).argmax(dim=1) == labels).sum())
                total += int(labels.numel())
        finally:
            learner.train(was)
        self._n_eval = total
        return {"acc": correct / total if total else float("nan"), "correct": correct, "total": total}

    def describe(self) -> str:
        ev = f", eval {type(self.eval_data).__name__}" if self.eval_data is not None else ", no eval data"
        return f"your data: {type(self.train_data).__name__} of {self._n} batches{ev}"
