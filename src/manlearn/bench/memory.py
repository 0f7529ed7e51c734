"""Memory part of the benchmark: what a training step of every rule needs, two ways.

(a) **Counted** (deterministic, device-independent): the peak of the bytes autograd keeps alive for
    backward during one ``train_step`` (:class:`~manlearn.memory.SavedTensorTracker`: saved tensors,
    deduplicated by storage, parameters and buffers excluded), plus the static state: parameters and buffers
    (frozen EMA units included), gradients of the trainable parameters and the optimiser state
    (SGD momentum: one buffer per trainable parameter). ``total = static + activation peak``.
(b) **Measured**: on CUDA the allocator peak (``torch.cuda.max_memory_allocated``) of a step; on
    the CPU the peak resident memory of a fresh process that builds the learner and runs a few
    steps (kernel high-water mark reset before the first step), next to its RSS before that step.
    The child runs with a fixed glibc mmap threshold (:data:`FIXED_MALLOC`) so that RSS follows
    live memory; ``--rss-default-malloc`` measures with the default allocator behaviour.

E2E is measured with and without gradient checkpointing per stage (``e2e+ckpt``); other granularities are
method specs too (``e2e:grad_checkpoint=unit``, ``e2e:grad_checkpoint=sqrt``).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path
import gc
import os
import sys
from typing import Any, Sequence

import torch

from ..learner import LocalLearner
from ..planning import check_plannable, no_build_check, plan_learner
from ..memory import PeakMemory, current_rss_bytes, peak_rss_bytes, peak_rss_since_reset_bytes, reset_peak_rss
from ..errors import ManlearnError
from .common import append_rows, environment, parse_method

CHECKPOINTED = "e2e+ckpt"


def _learner(model: str, spec: str, K: int, split: str, device: str, stem_module: bool = True,
             image_size: int | None = None, num_classes: int | None = None):
    kw = {"split": split, "stem_module": stem_module, **parse_method(spec)}  # the spec's own split wins
    if image_size is not None:
        kw["image_size"] = image_size
    if num_classes is not None:
        kw["num_classes"] = num_classes
    torch.manual_seed(0)
    with no_build_check():  # the row itself says what is kept
        return LocalLearner(model=model, K=K, **kw).to(device)


def _step(learner, opt, x, y) -> None:
    learner.train_step(x, y)
    opt.step()


def _optimizer(learner):
    return torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                           weight_decay=1e-4, foreach=True)


def counted(model: str, spec: str, K: int, batch: int, split: str = "auto", device: str = "cpu",
            stem_module: bool = True, image_size: int | None = None, num_classes: int | None = None,
            plan: bool = False) -> dict[str, Any]:
    """(a): counted activation peak and static bytes of one training step; CUDA peak on a GPU. ``plan``:
    also the memory plan's figures for the same step (:mod:`manlearn.planning`), to compare."""
    learner = _learner(model, spec, K, split, device, stem_module, image_size, num_classes)
    planned = None
    if plan:
        try:
            check_plannable(learner)
            planned = plan_learner(learner, batch, baselines=(), breakdown=False)
        except ManlearnError:
            planned = None
    opt = _optimizer(learner)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, learner.in_channels, learner.image_size, learner.image_size, generator=g).to(device)
    y = torch.randint(0, learner.num_classes, (batch,), generator=g).to(device)
    _step(learner, opt, x, y)  # warm-up: optimiser state exists, allocator caches filled
    with PeakMemory(device, exclude=[*learner.parameters(), *learner.buffers()]) as pm:
        _step(learner, opt, x, y)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    param_bytes = sum(p.numel() * p.element_size() for p in learner.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in learner.buffers())
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    opt_bytes = sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
                    if torch.is_tensor(t))
    act = pm.peak_activation_bytes
    return dict(model=model, method=spec, K=getattr(learner, "K", 1), batch=batch, split=learner.split.source,
                split_ends=list(learner.split.ends), stem_module=learner.split.stem_module,
                image_size=learner.image_size, num_classes=learner.num_classes,
                **({} if planned is None else dict(plan_activation_MiB=planned.peak_activation_bytes / 2**20,
                                                   plan_total_MiB=planned.total_bytes / 2**20)),
                activation_peak_MiB=act / 2**20, params_MiB=(param_bytes + buffer_bytes) / 2**20,
                grads_MiB=grad_bytes / 2**20, optimizer_MiB=opt_bytes / 2**20,
                total_counted_MiB=(act + param_bytes + buffer_bytes + grad_bytes + opt_bytes) / 2**20,
                cuda_peak_MiB=(pm.cuda_peak / 2**20) if pm.cuda_peak is not None else None)


def rss_child(model: str, spec: str, K: int, batch: int, split: str, steps: int = 2,
              stem_module: bool = True, image_size: int | None = None, num_classes: int | None = None,
              imports: Sequence[str] = ()) -> dict[str, Any]:
    """Runs inside the fresh process of (b): RSS just before the first step, and the peak RSS
    reached during ``steps`` steps (the kernel's high-water mark is reset first, so the peak of
    importing libraries and building the model does not mask it)."""
    from ..plugins import import_user_code

    import_user_code(list(imports))  # the parent's --import: user models and rules exist here too
    learner = _learner(model, spec, K, split, "cpu", stem_module, image_size, num_classes)
    opt = _optimizer(learner)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, learner.in_channels, learner.image_size, learner.image_size, generator=g)
    y = torch.randint(0, learner.num_classes, (batch,), generator=g)
    gc.collect()
    before = current_rss_bytes()
    resettable = reset_peak_rss()
    for _ in range(steps):
        _step(learner, opt, x, y)
    peak = peak_rss_since_reset_bytes() if resettable else peak_rss_bytes()
    return dict(rss_before_steps_MiB=(before or 0) / 2**20, peak_rss_MiB=(peak or 0) / 2**20,
                rss_step_increase_MiB=((peak or 0) - (before or 0)) / 2**20, rss_steps=steps,
                rss_peak_kind="since the first step" if resettable else "whole process")


# glibc's malloc raises its mmap threshold dynamically once large blocks are freed, after which
# freed activations stay in the heap and RSS stops following live memory (measured here: E2E and
# InfoPro+MAN++ at batch 128 both peak ~+480 MiB that way). A fixed threshold makes every large
# tensor its own mapping, returned to the OS when freed, so the peak RSS measures what was alive.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def measured_rss(model: str, spec: str, K: int, batch: int, split: str = "auto", steps: int = 2,
                 fixed_malloc: bool = True, stem_module: bool = True, image_size: int | None = None,
                 num_classes: int | None = None, imports: Sequence[str] = ()) -> dict[str, Any]:
    """(b) on the CPU: peak RSS of a fresh process doing ``steps`` training steps."""
    args = json.dumps(dict(model=model, spec=spec, K=K, batch=batch, split=split, steps=steps,
                           stem_module=stem_module, image_size=image_size, num_classes=num_classes,
                           imports=[str(Path(i).resolve()) if i.endswith(".py") else i for i in imports]))
    code = ("import json, sys; from manlearn.bench.memory import rss_child; "
            "a = json.loads(sys.argv[1]); print(json.dumps(rss_child(**a)))")
    env = {**os.environ, **(FIXED_MALLOC if fixed_malloc else {})}
    proc = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"RSS measurement of {spec} failed:\n{proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["rss_malloc"] = " ".join(f"{k}={v}" for k, v in FIXED_MALLOC.items()) if fixed_malloc else "default"
    return out


def run_memory(model: str, methods: Sequence[str], Ks: Sequence[int], batches: Sequence[int], results,
               device: str = "cpu", rss: bool = True, checkpointing: bool = True, split: str = "auto",
               fixed_malloc: bool = True, stem_module: bool = True, image_size: int | None = None,
               num_classes: int | None = None, imports: Sequence[str] = (), plan: bool = False,
               say=print) -> list[dict[str, Any]]:
    """Every (batch, K, method) once; E2E (and E2E + checkpointing) once per batch."""
    for spec in methods:
        parse_method(spec)
    specs = list(methods) + ([CHECKPOINTED] if checkpointing and CHECKPOINTED not in methods else [])
    env = environment(device)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for spec in specs:
            for K in ([Ks[0]] if parse_method(spec)["method"] == "e2e" else Ks):  # E2E ignores K
                row = counted(model, spec, K, batch, split, device, stem_module, image_size, num_classes, plan)
                if rss and torch.device(device).type == "cpu":
                    row.update(measured_rss(model, spec, K, batch, split, fixed_malloc=fixed_malloc,
                                            stem_module=stem_module, image_size=image_size,
                                            num_classes=num_classes, imports=imports))
                row.update(env)
                append_rows(results, [row])
                rows.append(row)
                say(f"{model} {row['image_size']}px {spec:>14} K={row['K']:<3} batch {batch:<5} activations "
                    f"{row['activation_peak_MiB']:8.1f} MiB  total counted {row['total_counted_MiB']:8.1f} MiB"
                    + (f"  (plan {row['plan_activation_MiB']:.1f} / {row['plan_total_MiB']:.1f})"
                       if "plan_activation_MiB" in row else "")
                    + (f"  peak RSS {row['peak_rss_MiB']:.0f} MiB (+{row['rss_step_increase_MiB']:.0f} over the "
                       f"{row['rss_before_steps_MiB']:.0f} before the steps)"
                       if "peak_rss_MiB" in row else "")
                    + (f"  CUDA peak {row['cuda_peak_MiB']:.0f} MiB" if row["cuda_peak_MiB"] is not None else ""),
                    flush=True)
    return rows
