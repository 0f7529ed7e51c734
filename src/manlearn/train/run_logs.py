"""Run outputs that tools read, written through the Trainer's callbacks: ``metrics.csv`` (the step, epoch and
evaluation records of ``metrics.jsonl`` as one table), ``summary.json`` (the run's end: metrics, timing,
memory, config, versions, data), and TensorBoard event files in ``tb/`` (per-block losses, accuracy, lr,
s/it, memory, MAN++'s s per block; needs ``pip install 'manlearn[tensorboard]'``).

``Trainer.from_config`` (``manlearn train``) writes all three (TensorBoard when it is installed); a
Trainer of your objects takes them as callbacks: ``Trainer(..., callbacks=[CsvLog(), SummaryJson(),
TensorBoardLog()])``.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import torch

from manlearn.errors import optional_import
from manlearn.files import write_text_atomic

from .callbacks import Callback

__all__ = ["CsvLog", "SummaryJson", "TensorBoardLog", "flat_record"]

CSV_NAME, SUMMARY_NAME, TB_DIR = "metrics.csv", "summary.json", "tb"


def flat_record(rec: dict[str, Any]) -> dict[str, Any]:
    """One record as flat columns: ``losses`` -> ``loss0..`` (block order), ``aux`` -> ``s/3``, ``metrics``
    (dense tasks) -> their names."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if k == "losses" and isinstance(v, list):
            out.update({f"loss{i}": x for i, x in enumerate(v)})
        elif isinstance(v, dict):
            out.update({str(kk): vv for kk, vv in v.items() if not isinstance(vv, (dict, list))})
        elif not isinstance(v, list):
            out[k] = v
    return out


class CsvLog(Callback):
    """``metrics.csv`` beside ``metrics.jsonl``, rewritten (atomically) at every checkpoint, so that it always
    matches the checkpoint's records."""

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        rows = [flat_record(r) for r in trainer.records]
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(trainer.out_dir / CSV_NAME, buf.getvalue())


class SummaryJson(Callback):
    """``summary.json`` at the end of a run: what ``fit()`` returns, with the config, the versions and the
    data it read."""

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        import manlearn
        from manlearn.config import config_to_dict

        doc = {**summary, "origin": trainer.origin, "manlearn_version": manlearn.__version__,
               "torch_version": torch.__version__, "device": str(trainer.device),
               "config": config_to_dict(trainer.cfg) if trainer.origin == "config" else None,
               "data": trainer.run.describe()}
        write_text_atomic(trainer.out_dir / SUMMARY_NAME, json.dumps(doc, indent=2, default=str) + "\n")


class TensorBoardLog(Callback):
    """TensorBoard event files in ``<out_dir>/tb``: every step record's per-block losses, lr, s/it, images/s,
    memory and auxiliary diagnostics (MAN++'s ``s`` of each block), and every evaluation's metrics. A resumed
    run drops the events written after its checkpoint (``purge_step``), so curves never double back."""

    def __init__(self) -> None:
        optional_import("tensorboard", "tensorboard", "TensorBoard event files")
        self._writer: Any = None
        self._last_step = -1

    def on_fit_start(self, trainer: Any) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(trainer.out_dir / TB_DIR), purge_step=trainer.step + 1 if trainer.step else None)
        self._last_step = trainer.step

    def on_step_end(self, trainer: Any) -> None:
        rec = trainer.records[-1] if trainer.records else None
        if self._writer is None or rec is None or rec.get("type") != "train" or rec["step"] <= self._last_step:
            return
        self._last_step = step = rec["step"]
        w = self._writer
        for i, v in enumerate(rec.get("losses") or []):
            w.add_scalar(f"loss/block{i}", v, step)
        for key in ("lr", "seconds_per_iter", "images_per_s", "train_acc"):
            if rec.get(key) is not None:
                w.add_scalar(f"train/{key}", rec[key], step)
        if rec.get("peak_mem_bytes"):
            w.add_scalar("memory/peak_MiB", rec["peak_mem_bytes"] / 2**20, step)
        for name, v in (rec.get("aux") or {}).items():  # "s/3" -> aux/s/block3
            kind, _, block = name.partition("/")
            w.add_scalar(f"aux/{kind}/block{block}" if block else f"aux/{kind}", v, step)

    def on_eval_end(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if self._writer is None:
            return
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and k not in ("correct", "total"):
                self._writer.add_scalar(f"eval/{k}", v, trainer.step)

    def on_fit_end(self, trainer: Any, summary: dict[str, Any]) -> None:
        self._close()

    def on_exception(self, trainer: Any, error: BaseException) -> None:
        self._close()  # before a failed start's files are removed: no writer thread left writing into them

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
