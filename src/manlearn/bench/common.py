"""What every benchmark needs: method specs, the machine it ran on, and append-only result files.

Results are JSON lines, one per measurement, each carrying the machine, versions, date and commit
that produced it, so that every figure in BENCHMARKS.md can be traced to a row and rerun.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import ConfigError

# The methods of the benchmark issue, in the order tables list them.
ALL_METHODS = ("e2e", "greedy", "dgl", "infopro", "dgl+man", "infopro+man", "dgl+manpp", "infopro+manpp")


def parse_method(spec: str) -> dict[str, Any]:
    """``"dgl+manpp"`` -> ``{"method": "manpp", "base": "dgl"}``; ``"dgl"`` -> ``{"method": "dgl"}``;
    a trailing ``+recompute`` on MAN/MAN++ adds ``ema_recompute=True``."""
    from ..rules import get_rule_class, list_base_rules, list_rules

    parts = spec.split("+")
    extra: dict[str, Any] = {}
    if len(parts) == 3 and parts[2] == "recompute":
        parts, extra = parts[:2], {"ema_recompute": True}
    if len(parts) == 2:
        base, method = parts
        modifiers = [r for r in list_rules() if get_rule_class(r).modifier]
        if method not in modifiers or base not in list_base_rules():
            raise ConfigError(f"bad method spec {spec!r}: write <base>+<modifier> (optionally +recompute) with "
                              f"modifier in {', '.join(modifiers)} and base in {', '.join(list_base_rules())}")
        return {"method": method, "base": base, **extra}
    if len(parts) != 1 or spec not in list_rules():
        raise ConfigError(f"unknown method {spec!r}; choose from {', '.join(ALL_METHODS)} "
                          f"(or any of {', '.join(list_rules())})")
    return {"method": spec}


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


def median_ms(fn, n: int = 20, warmup: int = 5) -> float:
    """Median wall time of ``fn()`` in milliseconds over ``n`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def append_rows(path: str | Path, rows: Iterable[dict[str, Any]]) -> None:
    """Append JSON lines (creating the folder); each write is one flushed line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=False) + "\n")
            f.flush()


def run_key(row: dict[str, Any]) -> tuple:
    """What identifies one accuracy run in a results file: (method, K, epochs, seed, train_limit)."""
    return (row["method"], int(row["K"]), int(row["epochs"]), int(row["seed"]), row.get("train_limit"))


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
