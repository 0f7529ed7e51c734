"""What every benchmark needs: method specs, the machine it ran on, and append-only result files.

Results are JSON lines, one per measurement, each carrying the machine, versions, date and commit
that produced it, so that every figure in BENCHMARKS.md can be traced to a row and rerun.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch

from ..errors import ConfigError
from ..files import append_text

# The methods of the benchmark issue, in the order tables list them.
ALL_METHODS = ("e2e", "greedy", "dgl", "infopro", "dgl+man", "infopro+man", "dgl+manpp", "infopro+manpp")


# Options of a method spec (``dgl+manpp:fidelity=authors``) that are TrainConfig keys of their own; every
# other option goes to the config's ``rule_options`` (``dgl:head=mlp-sr``). All are LocalLearner keywords,
# so a spec means the same in every benchmark.
CONFIG_KEYS = ("fidelity", "authors_init", "lambda_schedule", "ema_recompute", "grad_checkpoint",
               "blocks_in_flight", "split", "stem_module")
# Shorthand specs of the memory and speed tables.
ALIASES = {"e2e+ckpt": "e2e:grad_checkpoint=stage"}


def _option_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"dgl+manpp:fidelity=authors,head=mlp-sr"`` -> ``("dgl+manpp", {"fidelity": "authors", "head": "mlp-sr"})``."""
    spec = ALIASES.get(spec, spec)
    name, _, opts = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"bad method spec {spec!r}: options are written key=value, separated by commas "
                              f"(e.g. dgl+manpp:fidelity=authors or dgl:head=mlp-sr)")
        options[key.strip()] = _option_value(value.strip())
    return name, options


def parse_method(spec: str) -> dict[str, Any]:
    """LocalLearner keywords of a method spec: ``"dgl+manpp"`` -> ``{"method": "manpp", "base": "dgl"}``;
    ``"dgl"`` -> ``{"method": "dgl"}``; a trailing ``+recompute`` on MAN/MAN++ adds ``ema_recompute=True``;
    options after a colon are further keywords (``"dgl:head=mlp-sr"`` -> ``{"method": "dgl", "head": "mlp-sr"}``)."""
    from ..rules import get_rule_class, list_base_rules, list_rules

    name, options = split_spec(spec)
    parts = name.split("+")
    extra: dict[str, Any] = dict(options)
    if len(parts) == 3 and parts[2] == "recompute":
        parts, extra = parts[:2], {**extra, "ema_recompute": True}
    if len(parts) == 2:
        base, method = parts
        modifiers = [r for r in list_rules() if get_rule_class(r).modifier]
        if method not in modifiers or base not in list_base_rules():
            raise ConfigError(f"bad method spec {spec!r}: write <base>+<modifier> (optionally +recompute) with "
                              f"modifier in {', '.join(modifiers)} and base in {', '.join(list_base_rules())}")
        return {"method": method, "base": base, **extra}
    if len(parts) != 1 or name not in list_rules():
        raise ConfigError(f"unknown method {spec!r}; choose from {', '.join(ALL_METHODS)} "
                          f"(or any of {', '.join(list_rules())}), optionally with options after a colon "
                          f"(dgl:head=mlp-sr, dgl+manpp:fidelity=authors)")
    return {"method": name, **extra}


def spec_overrides(spec: str) -> list[str]:
    """The ``key=value`` config overrides of a method spec (for runs through TrainConfig)."""
    import yaml

    m = parse_method(spec)
    items = [f"method={m.pop('method')}"]
    if "base" in m:
        items.append(f"base={m.pop('base')}")
    rule_options = {k: m.pop(k) for k in list(m) if k not in CONFIG_KEYS}
    if rule_options:
        items.append("rule_options=" + yaml.safe_dump(rule_options, default_flow_style=True).strip())
    for key, value in m.items():
        items.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return items


def spec_slug(spec: str) -> str:
    """A file-name-safe form of a method spec (its run folder)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.replace("+", "-")).strip("-")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    root = Path(__file__).resolve().parents[3]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """Machine, versions and date of a measurement."""
    device = torch.device(device)
    env = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "commit": git_commit(),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


K = TypeVar("K")


def interleaved(steps: Mapping[K, Callable[[], Any]], rounds: int, warmup: int = 0,
                sync: Callable[[], Any] | None = None) -> dict[K, list[float]]:
    """Wall seconds of each step, timed in interleaved rounds: every round calls every step once, in order,
    so that a machine getting slower or faster mid-run shifts all of them alike (the only fair comparison
    on a shared machine). The first ``warmup`` rounds are not recorded; ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before and after each timed call."""
    times: dict[K, list[float]] = {k: [] for k in steps}
    for r in range(warmup + rounds):
        for k, step in steps.items():
            if sync is not None:
                sync()
            t0 = time.perf_counter()
            step()
            if sync is not None:
                sync()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return times


def median_ms(fn: Callable[[], Any], n: int = 20, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``n`` calls after ``warmup`` calls."""
    return 1000 * statistics.median(interleaved({0: fn}, n, warmup)[0])


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines (creating the folder) in one flushed write; a failed write (full disk) is one line
    and leaves the file as it was."""
    append_text(path, "".join(json.dumps(row, sort_keys=False) + "\n" for row in rows))


def sweep_overrides(overrides) -> tuple[str, ...]:
    """The config overrides of an accuracy sweep that make its runs other runs (``amp=bf16``, ``lr=0.05``),
    sorted; ``train_limit`` is left out: it has its own place in :func:`run_key`."""
    return tuple(sorted(o for o in overrides if not o.startswith("train_limit=")))


def run_key(row: dict[str, Any]) -> tuple:
    """What identifies one accuracy run in a results file: (method, K, epochs, seed, train_limit, the
    sweep's other overrides). A run with ``amp=bf16`` is not the float32 run of the same seed."""
    return (row["method"], int(row["K"]), int(row["epochs"]), int(row["seed"]), row.get("train_limit"),
            sweep_overrides(row.get("overrides", ())))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a results file; a torn last line (a killed run) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows
