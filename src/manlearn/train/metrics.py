"""A small metric logger, kept apart from the training loop (torchvision-references style).

``SmoothedValue`` keeps a window and global totals of a scalar; ``MetricLogger`` holds named
meters and formats them; ``JsonlWriter`` appends one JSON object per line.  The trainer only
calls ``update`` and ``write``; the formatting and file handling live here.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Mapping

from manlearn.files import append_lines, replace_text

__all__ = ["SmoothedValue", "MetricLogger", "JsonlWriter", "read_jsonl"]


class SmoothedValue:
    """A running scalar: median/average over a recent window, and the global (weighted) mean."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(float(value))
        self.total += float(value) * n
        self.count += n

    @property
    def median(self) -> float:
        if not self.deque:
            return math.nan
        s = sorted(self.deque)
        return s[len(s) // 2]

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else math.nan

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else math.nan

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else math.nan

    def state_dict(self) -> dict[str, Any]:
        return {"window": list(self.deque), "maxlen": self.deque.maxlen, "total": self.total,
                "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.deque = deque((float(v) for v in state["window"]), maxlen=state["maxlen"])
        self.total = float(state["total"])
        self.count = int(state["count"])

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               value=self.value)


class MetricLogger:
    """Named :class:`SmoothedValue` meters; ``str(logger)`` gives ``name: value`` pairs."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter

    def update(self, n: int = 1, **kwargs: float) -> None:
        for k, v in kwargs.items():
            self.meters.setdefault(k, SmoothedValue()).update(v, n)

    def __getitem__(self, name: str) -> SmoothedValue:
        return self.meters[name]

    def reset(self) -> None:
        self.meters.clear()

    def global_avgs(self) -> dict[str, float]:
        return {k: m.global_avg for k, m in self.meters.items()}

    def state_dict(self) -> dict[str, Any]:
        return {k: m.state_dict() for k, m in self.meters.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.meters = {}
        for k, s in state.items():
            m = SmoothedValue()
            m.load_state_dict(s)
            self.meters[k] = m

    def __str__(self) -> str:
        return self.delimiter.join(f"{k}: {m}" for k, m in self.meters.items())


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    return v


class JsonlWriter:
    """Append-only JSON-lines file; each record is flushed so a killed run keeps what it wrote, and a failed
    write (full disk) leaves no torn line. Writes raise ``OSError``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the file by ``records`` (used on resume: drop lines written after the checkpoint)."""
        replace_text(self.path, "".join(json.dumps(_jsonable(dict(r))) + "\n" for r in records))

    def write(self, record: Mapping[str, Any]) -> None:
        append_lines(self.path, json.dumps(_jsonable(dict(record))) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
