"""The task interface: what the engine asks of classification, detection, segmentation or a user's task.

A task owns everything that depends on what the network is trained *for*: the final head (and which
backbone features it reads), the loss, ``predict``, and the small local head that a rule may ask for
(the ``greedy`` rule trains each block through it; MAN/MAN++ put it after their ema/lb fusion). The
engine and the rules only talk to a task through this interface, so a user's task plugs in without
touching manlearn.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..errors import ConfigError
from ..runtime import loss_precision  # noqa: F401  (re-exported)

#: ``last``: the final head reads the last unit's output; ``stages``: every stage's output (FPN, DeepLabV3+).
READS = ("last", "stages")
REQUIRED = ("final_head", "local_head", "loss", "predict")


class Task:
    """Base class of tasks (subclassing is optional: any object with these members is a task).

    Attributes:
        reads: which backbone features the final head reads (``last`` or ``stages``).
        per_image_labels: targets hold one class index (or class distribution) per image, so rules
            with classifier heads (DGL, InfoPro) can train on them.
        fixed_input_size: inputs must have the size the learner was built for.
    """

    name: str = "task"
    reads: str = "stages"
    per_image_labels: bool = False
    fixed_input_size: bool = False

    def final_head(self, channels: Sequence[int], strides: Sequence[int]) -> nn.Module:
        """The head over the features it reads (``channels``/``strides`` of each, in order)."""
        raise NotImplementedError

    def local_head(self, channels: int, stride: int) -> nn.Module:
        """A cheap head mapping one local block's feature map to outputs :meth:`loss` accepts."""
        raise NotImplementedError

    def loss(self, outputs: Any, targets: Any, image_hw: tuple[int, int]) -> torch.Tensor:
        """Scalar loss of the outputs of either head."""
        raise NotImplementedError

    def predict(self, outputs: Any, image_hw: tuple[int, int]) -> Any:
        """Post-processed predictions of the final head."""
        raise NotImplementedError

    def check_targets(self, x: torch.Tensor, targets: Any) -> None:
        """Refuse targets that cannot belong to the batch ``x`` (default: accept)."""


def check_task(task: Any) -> Any:
    """Refuse an object that is not a task, naming what it lacks."""
    missing = [n for n in REQUIRED if not callable(getattr(task, n, None))]
    if missing:
        raise ConfigError(f"task {type(task).__name__} lacks {', '.join(m + '()' for m in missing)}; a task needs "
                          f"{', '.join(REQUIRED)} (see manlearn.tasks.Task)")
    if getattr(task, "reads", None) not in READS:
        raise ConfigError(f"task {type(task).__name__}.reads must be one of {READS}, got "
                          f"{getattr(task, 'reads', None)!r}")
    return task


@torch.no_grad()
def check_head_fits(task: Any, head: nn.Module, last_shape: Sequence[int]) -> None:
    """Run a head that reads the last unit (``task.reads == "last"``) once on that unit's probed output shape
    (in eval mode, nothing changes); refuse a head that cannot take it, or a per-image classifier whose
    output is not ``[B, num_classes]``, with a ConfigError naming the shapes."""
    if getattr(task, "reads", None) != "last":
        return
    params = [p for p in head.parameters() if p.is_floating_point()]
    x = torch.zeros(2, *last_shape, device=params[0].device if params else None,
                    dtype=params[0].dtype if params else None)
    shape = f"[B, {', '.join(str(int(d)) for d in last_shape)}]"
    was = head.training
    head.eval()
    try:
        out = head(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(f"the head ({type(head).__name__}) does not fit the last unit, whose output is {shape}: "
                          f"{type(e).__name__}: {first}") from None
    finally:
        head.train(was)
    c = getattr(task, "num_classes", None)
    if getattr(task, "per_image_labels", False) and isinstance(c, int) and isinstance(out, torch.Tensor) \
            and tuple(out.shape) != (2, c):
        got = f"[B, {', '.join(str(int(d)) for d in out.shape[1:])}]"
        fix = (f": pass num_classes={int(out.shape[1])} if your data has {int(out.shape[1])} classes, or give the "
               f"network a head of {c}") if out.dim() == 2 else ""
        raise ConfigError(f"the head ({type(head).__name__}) maps the last unit's output {shape} to {got}; a "
                          f"classifier of num_classes={c} must give [B, {c}]{fix}")

