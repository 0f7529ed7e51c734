"""Reading finished (or running) run folders: ``manlearn runs DIR`` (one table comparing the runs in a folder)
and ``manlearn plot RUN [RUN ...]`` (their curves: every block's loss, accuracy, MAN++'s s per block)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from manlearn.errors import ConfigError, optional_import
from manlearn.files import save_figure
from manlearn.rules import modifier_base

from .metrics import read_jsonl
from .task_runs import HEADLINE

__all__ = ["run_rows", "runs_table", "plot_runs"]


def _load(run: Path) -> dict[str, Any]:
    """What a run folder says about itself: its records, its summary (when finished) and its config."""
    if not (run / "metrics.jsonl").is_file():
        raise ConfigError(f"{run} is not a run folder (no metrics.jsonl)")
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else None
    config: dict[str, Any] = {}
    if (run / "config.yaml").is_file():
        import yaml

        config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    return {"name": run.name, "records": read_jsonl(run / "metrics.jsonl"), "summary": summary, "config": config}


def run_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per run folder under ``folder`` (or ``folder`` itself when it is a run)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder")
    runs = [folder] if (folder / "metrics.jsonl").is_file() else sorted(
        p for p in folder.iterdir() if (p / "metrics.jsonl").is_file())
    if not runs:
        raise ConfigError(f"{folder} holds no run folders (folders with a metrics.jsonl)")
    rows = []
    for run in runs:
        r = _load(run)
        recs, s, cfg = r["records"], r["summary"] or {}, r["config"]
        task = _task(r)
        head = _headline(r)
        scored = [x for x in recs if x["type"] in ("epoch", "eval") and _score(x, head) is not None]
        train = [x for x in recs if x["type"] == "train"]
        peak = (s.get("peak_mem_bytes") or 0) / 2**20
        rows.append({"run": r["name"], "task": task, "method": s.get("rule") or _rule(cfg),
                     "K": 1 if cfg.get("method") == "e2e" else cfg.get("K", "?"),  # e2e ignores K
                     "steps": s.get("steps", recs[-1]["step"] if recs else 0), "metric": head,
                     "last": (s.get("headline") or [None, None])[1] if s else (_score(scored[-1], head) if scored else None),
                     "best": s.get("best", max((_score(x, head) for x in scored), default=None)),
                     "s_per_it": s.get("seconds_per_iter", train[-1].get("seconds_per_iter") if train else None),
                     "peak_MiB": f"{peak:.1f} {PEAK_KINDS.get(s.get('peak_mem_kind'), 'act.')}" if peak else None,
                     "finished": bool(r["summary"])})
    return rows


#: what the peak memory of a run counts (summary.json's peak_mem_kind), as the table labels it
PEAK_KINDS = {"CUDA allocator peak": "CUDA", "process peak RSS": "RSS"}


def _task(run: dict[str, Any]) -> str:
    task = run["config"].get("task")
    return str(task.get("name", "classification")) if isinstance(task, dict) else "classification"


def _headline(run: dict[str, Any]) -> str:
    """The task's figure (acc, AP, miou): the summary's, else the built-in task's, else acc."""
    head = (run["summary"] or {}).get("headline")
    return str(head[0]) if head and head[0] else HEADLINE.get(_task(run), "acc")


def _score(rec: dict[str, Any], head: str) -> float | None:
    """A record's value of the headline: classification records hold test_acc, the others their metrics."""
    if rec.get("test_acc") is not None:
        return rec["test_acc"]
    value = (rec.get("metrics") or {}).get(head)
    return value if isinstance(value, (int, float)) else None


def _rule(cfg: dict[str, Any]) -> str:
    """method+base from the config (a run without summary.json yet): a modifier names the base it wraps."""
    method = str(cfg.get("method", "?"))
    base = modifier_base(method, cfg.get("base"))
    return f"{method}+{base}" if base else method


def runs_table(folder: str | Path) -> str:
    """The rows of :func:`run_rows` as an aligned text table."""
    rows = run_rows(folder)
    cols = ["run", "task", "method", "K", "steps", "metric", "last", "best", "s_per_it", "peak_MiB", "finished"]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 10 else f"{v:.1f}"
        return "-" if v is None else str(v)

    table = [[c for c in cols]] + [[cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(row, widths)))
                     for row in table)


def plot_runs(runs: list[str | Path], out: str | Path) -> Path:
    """One figure of the runs' curves: block losses (every block of one run; the last block of several),
    test accuracy (or the task's headline) and MAN++'s s per block, against the step."""
    optional_import("matplotlib", "plots", "manlearn plot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loaded = [_load(Path(r)) for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    heads: set[str] = set()
    for r in loaded:
        train = [x for x in r["records"] if x["type"] == "train"]
        steps = [x["step"] for x in train]
        if len(loaded) == 1:
            for k in range(len(train[0]["losses"]) if train else 0):
                axes[0].plot(steps, [x["losses"][k] for x in train], label=f"block {k}")
        else:
            axes[0].plot(steps, [x["losses"][-1] for x in train], label=r["name"])
        head = _headline(r)
        heads.add("test accuracy" if head == "acc" else head)
        ev = [x for x in r["records"] if x["type"] in ("eval", "epoch") and _score(x, head) is not None]
        axes[1].plot([x["step"] for x in ev], [_score(x, head) for x in ev], marker="o",
                     label=r["name"] if head == "acc" else f"{r['name']} ({head})")
        s_keys = sorted({k for x in train for k in (x.get("aux") or {}) if k.startswith("s/")},
                        key=lambda k: int(k.split("/")[1]))
        for key in s_keys:
            axes[2].plot(steps, [(x.get("aux") or {}).get(key) for x in train],
                         label=(key if len(loaded) == 1 else f"{r['name']} {key}"))
    for ax, title in zip(axes, ("loss per block" if len(loaded) == 1 else "final-block loss",
                                " / ".join(sorted(heads)), "MAN++ s per block")):
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    try:
        return save_figure(fig, out, dpi=100)
    finally:
        plt.close(fig)
