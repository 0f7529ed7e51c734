"""Speed part of the benchmark: seconds per iteration of every rule next to E2E, and where it goes.

All methods are built first and then stepped **interleaved** (one step of each, round after round),
so a slow-down of the machine hits every method alike; the median over the timed rounds is
reported with images/s and the ratio to E2E's median from the same run. A step is
``train_step`` + the optimiser step (SGD, Nesterov, multi-tensor), as in training.

The breakdown re-runs a few steps with the same arithmetic cut into timed parts: backbone (block
forwards and backwards, final head), the auxiliary networks' ema/lb units (MAN/MAN++), the
auxiliary heads, the EMA update and the optimiser step. The block output is detached before the
auxiliary network and its gradient handed back afterwards, which gives the same gradients. One
more step counts the FLOPs of each part (convolutions and matmuls, forward and backward), so time
can be read against work.

``amps`` times each method once per autocast mode (``off``, ``bf16``), interleaved in the same rounds;
every part of the breakdown runs its forwards under the learner's autocast, as ``train_step`` does.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Callable, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..learner import LocalLearner
from ..rules import LocalBatch, MomentumAux
from ..runtime import amp_dtype
from .common import append_rows, environment, interleaved, parse_method


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(model: str, spec: str, K: int, device: str, channels_last: bool, compile: bool = False,
          amp: str = "off"):
    torch.manual_seed(0)
    learner = LocalLearner(model=model, K=K, channels_last=channels_last,
                           amp_dtype=amp_dtype(amp, torch.device(device)), **parse_method(spec)).to(device)
    if compile:
        learner.compile_parts()
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                          nesterov=True, weight_decay=1e-4, foreach=True)
    return learner, opt


PARTS = ("backbone", "aux_units", "aux_heads", "ema", "optimizer")


def _parts_step(learner, opt, x: torch.Tensor, y: torch.Tensor, part) -> None:
    """One training step with every piece of work inside ``part(name)`` (a context manager)."""
    learner.zero_grad(set_to_none=True)
    x = learner.prepare_input(x)
    batch = LocalBatch(x, y, learner.norm_mean, learner.norm_std)

    def amp():  # the learner's autocast (a no-op without AMP), a fresh context for each forward
        return learner.autocast(x)

    h_in = x
    for k in range(learner.K):
        with part("backbone"):
            with amp():
                h = learner.run_block(k, h_in)
                last_loss = learner.task.loss(learner.head(h), y, batch.image_hw) if k == learner.K - 1 else None
            if last_loss is not None:
                last_loss.backward()
                break
        h_aux = h.detach().requires_grad_(True)
        aux = learner.auxes[k]
        if isinstance(aux, MomentumAux):
            with part("aux_units"), amp():
                fused = aux.fuse(h_aux)
            fused_d = fused.detach().requires_grad_(True)
            with part("aux_heads"):
                with amp():
                    loss = aux.heads(fused_d, batch)
                loss.backward()
            with part("aux_units"):
                fused.backward(fused_d.grad)
        else:
            with part("aux_heads"):
                with amp():
                    loss = aux(h_aux, batch)
                loss.backward()
        with part("backbone"):
            h.backward(h_aux.grad)
        if isinstance(aux, MomentumAux):
            with part("ema"):
                aux.update_ema(learner.momentum)
        h_in = h.detach()
    with part("optimizer"):
        opt.step()


def breakdown_step(learner, opt, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Seconds of each part of one training step; same gradients as ``train_step``."""
    t = dict.fromkeys(PARTS, 0.0)
    dev = x.device

    @contextlib.contextmanager
    def part(name):
        _sync(dev)
        t0 = time.perf_counter()
        yield
        _sync(dev)
        t[name] += time.perf_counter() - t0

    _parts_step(learner, opt, x, y, part)
    return t


def flop_breakdown(learner, opt, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """FLOPs (torch's ``FlopCounterMode``: matmuls and convolutions, forward and backward) of each
    part of one training step — the work the time is spent on."""
    f = dict.fromkeys(PARTS, 0)

    @contextlib.contextmanager
    def part(name):
        with FlopCounterMode(display=False) as fc:
            yield
        f[name] += int(fc.get_total_flops())

    _parts_step(learner, opt, x, y, part)
    return f


def run_speed(model: str, methods: Sequence[str], K: int, batch: int, iters: int, warmup: int, results,
              device: str = "cpu", channels_last: bool = True, breakdown: bool = True,
              breakdown_iters: int = 3, compile: bool = False, amps: Sequence[str] = ("off",),
              say=print) -> list[dict[str, Any]]:
    """Interleaved timing of ``methods`` (E2E added if missing) under each autocast mode of ``amps``;
    one row per method and mode, its E2E ratio against E2E in the same mode."""
    names = list(methods) if "e2e" in methods else ["e2e", *methods]
    specs = [(s, a) for a in amps for s in names]
    dev = torch.device(device)
    built = {(s, a): build(model, s, K, device, channels_last, compile, a) for s, a in specs}
    g = torch.Generator().manual_seed(0)
    learner0 = built[specs[0]][0]
    x = torch.randn(batch, learner0.in_channels, learner0.image_size, learner0.image_size, generator=g).to(dev)
    y = torch.randint(0, learner0.num_classes, (batch,), generator=g).to(dev)

    def step(learner, opt) -> Callable[[], None]:
        return lambda: (learner.train_step(x, y), opt.step())

    times = interleaved({s: step(*built[s]) for s in specs}, iters, warmup, sync=lambda: _sync(dev))
    env = environment(device)
    rows = []
    for s in specs:
        learner, opt = built[s]
        med = statistics.median(times[s])
        e2e = statistics.median(times[("e2e", s[1])])
        row: dict[str, Any] = dict(model=model, method=s[0], K=learner.K, batch=batch, channels_last=channels_last,
                                   compile=compile, amp=s[1],
                                   median_s_per_it=med, min_s=min(times[s]), max_s=max(times[s]), iters=iters,
                                   warmup=warmup, images_per_s=batch / med, ratio_to_e2e=med / e2e)
        if breakdown and not compile:  # the breakdown runs the eager parts
            parts = [breakdown_step(learner, opt, x, y) for _ in range(breakdown_iters)]
            row["breakdown_s"] = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
            row["gflops"] = {k: v / 1e9 for k, v in flop_breakdown(learner, opt, x, y).items()}
        row.update(env)
        rows.append(row)
        br = row.get("breakdown_s")
        label = s[0] if list(amps) == ["off"] else f"{s[0]} {s[1]}"
        say(f"{label:>14} K={row['K']:<3} {med:.3f} s/it  {row['images_per_s']:.0f} img/s  {row['ratio_to_e2e']:.2f}x e2e"
            + ("   [" + ", ".join(f"{k} {v:.3f}" for k, v in br.items()) + "]" if br else ""), flush=True)
    append_rows(results, rows)
    return rows
