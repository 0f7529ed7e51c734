"""Checkpoints: atomic writes, validated reads, config compatibility, RNG state.

A checkpoint is a plain dict of tensors and Python primitives so that it loads with
``torch.load(weights_only=True)`` — reading a checkpoint never executes pickled code.
It is written atomically (temp file in the same directory, flush + fsync, ``os.replace``) so that
a run killed at any instant leaves either the previous complete ``last.pt`` or the new one,
never a truncated file.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from manlearn.config import (TrainConfig, config_from_dict, config_keys, config_to_dict, flat_config_dict,
                             task_keys)
from manlearn.errors import CheckpointError, ConfigError
from manlearn.files import no_space, torch_load_problem
from manlearn.plugins import import_user_code

__all__ = [
    "CKPT_FORMAT",
    "CKPT_VERSION",
    "RESUME_FREE_KEYS",
    "save_checkpoint",
    "load_checkpoint",
    "config_differences",
    "check_resume_compatible",
    "capture_rng_state",
    "restore_rng_state",
    "checkpoint_config",
    "eval_config",
    "load_model_state",
]

CKPT_FORMAT = "manlearn-checkpoint"
CKPT_VERSION = 1
REQUIRED_KEYS = ("format", "version", "model", "optimizer", "step", "epoch", "batch", "config")

#: Config keys that may differ between a checkpoint and the run that resumes it: where files go,
#: how the run is shown, how long it goes on, where and how fast it executes.  Every other key
#: changes the model or the optimisation, and resuming across such a change is refused.
RESUME_FREE_KEYS = frozenset({
    "out_dir", "progress", "log_every", "max_steps", "epochs", "iterations", "device", "data_dir",
    "data_workers", "eval_batch_size", "eval_every_epochs", "eval_every_steps", "ckpt_every_steps",
    "eval_limit", "compile", "channels_last", "nonfinite", "dist_backend", "dist_timeout_s", "pipeline_timeout_s",
    "blocks_in_flight", "pipeline_queue_depth",  # schedules of the same computation: a resumed run may change them
    "import_digests",  # a changed file is said when it is imported again (manlearn.plugins)
})

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _payload_bytes(v: Any) -> int:
    if isinstance(v, torch.Tensor):
        return v.numel() * v.element_size()
    if isinstance(v, Mapping):
        return sum(_payload_bytes(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return sum(_payload_bytes(x) for x in v)
    return 0


def _write_error(e: Exception, payload: Mapping[str, Any], folder: Path) -> OSError:
    """The OSError a failed ``torch.save`` stands for: ENOSPC with the space needed when the disk is full."""
    needed, free = _payload_bytes(payload), shutil.disk_usage(folder).free
    if free < needed + (1 << 20) or getattr(e, "errno", None) == errno.ENOSPC:
        return no_space(needed, folder)
    return OSError(errno.EIO, f"torch.save failed: {(str(e).strip().splitlines() or ['?'])[0][:200]}")


def save_checkpoint(path: str | Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``path`` atomically; on any failure the old file is left untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(dict(payload), f)
                f.flush()
                os.fsync(f.fileno())
        except (RuntimeError, OSError) as e:  # torch's writer reports a full disk as a RuntimeError
            if isinstance(e, OSError) and e.errno != errno.ENOSPC:
                raise
            raise _write_error(e, payload, path.parent) from None
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable (best effort: not every platform can fsync a directory).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and sanity-check a checkpoint; any problem becomes a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, foreign file...
        raise CheckpointError(f"cannot read checkpoint {path}: {torch_load_problem(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"{path} is not a manlearn checkpoint")
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")
    if not isinstance(ckpt["version"], int) or ckpt["version"] > CKPT_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {ckpt['version']!r}; this manlearn reads "
            f"versions up to {CKPT_VERSION}")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"checkpoint {path} has no readable config")
    return ckpt


def _norm(v: Any) -> Any:
    """Compare lists and tuples alike (YAML gives lists, code may give tuples)."""
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    return v


def config_differences(saved: Mapping[str, Any], cfg: TrainConfig,
                       ignore: frozenset[str] = RESUME_FREE_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{key: (saved value, current value)}`` for every key that differs and is not ignored; task keys
    are compared one by one as ``task.<key>``; ``saved`` may be a config of an earlier version."""
    current = flat_config_dict(config_to_dict(cfg))
    upgraded = dict(saved)
    try:  # keys a checkpoint of an earlier version lacks had today's defaults (they did not exist yet)
        upgraded = config_to_dict(config_from_dict(upgraded, check=False))
    except ConfigError:  # keys unknown to this version: compare as stored (check_resume_compatible names them)
        pass
    saved = flat_config_dict(upgraded)
    diffs: dict[str, tuple[Any, Any]] = {}
    for key in sorted(set(saved) | set(current)):
        if key in ignore:
            continue
        a, b = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if _norm(a) != _norm(b):
            diffs[key] = (a, b)
    return diffs


def check_resume_compatible(ckpt: Mapping[str, Any], cfg: TrainConfig, path: str | Path = "") -> None:
    """Refuse to resume from a checkpoint trained with a different model/optimisation config."""
    diffs = config_differences(ckpt["config"], cfg)
    if diffs:
        items = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diffs.items())
        known = set(config_keys()) | set(task_keys())
        unknown = sorted(set(flat_config_dict(ckpt["config"])) - known)
        extra = f" (keys unknown to this version: {', '.join(unknown)})" if unknown else ""
        raise CheckpointError(
            f"checkpoint {path} belongs to another configuration; differing keys: {items}{extra}. "
            "Use another out_dir, or the checkpoint's settings, to resume (keys free to change: "
            f"{', '.join(sorted(RESUME_FREE_KEYS))}).")


def capture_rng_state() -> dict[str, Any]:
    """Every RNG the training loop may draw from, as tensors / primitives (weights_only-safe)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA state restored only where CUDA is in use)."""
    if "torch" in state:
        torch.set_rng_state(state["torch"].cpu())
    if "python" in state:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"],
                             n["has_gauss"], n["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = list(state["cuda"])
        if len(saved) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved)


# ``manlearn eval`` of a checkpoint (classification and dense): its config, adjusted, and its weights.

def checkpoint_config(ckpt: Mapping[str, Any], path: str | Path, cls: type | None = None) -> TrainConfig:
    """The config stored in ``ckpt`` (validated); a config this version cannot use (keys of an earlier
    version: 0.x keeps no upgraders) is a CheckpointError. The code the run imported is imported first, so
    that a file that changed or vanished since is said as such."""
    recorded = ckpt["config"] if isinstance(ckpt.get("config"), Mapping) else {}
    import_user_code(list(recorded.get("imports") or []), dict(recorded.get("import_digests") or {}))
    try:
        return config_from_dict(ckpt["config"], where=f"checkpoint {path}")
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {path} holds a config this manlearn cannot use (written by an "
                              f"earlier version? retrain, or use that version): {e}") from None


def eval_config(cfg: Any, *, device: str, data_dir: str | None, limit_key: str, limit: int | None,
                batch_size: int | None) -> Any:
    """``cfg`` with what an evaluation may change: the device, and where given the data folder, the number
    of images (``limit_key``) and the evaluation batch size (not validated: the caller does)."""
    changes: dict[str, Any] = {"device": device}
    if data_dir is not None:
        changes["data_dir"] = data_dir
    if limit is not None:
        changes[limit_key] = limit
    if batch_size is not None:
        changes["eval_batch_size"] = batch_size
    return cfg.model_copy(update=changes)


def load_model_state(model: torch.nn.Module, ckpt: Mapping[str, Any], path: str | Path) -> None:
    """Load the checkpoint's weights into the model rebuilt from its config (CheckpointError if they do not fit)."""
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model of its config: {e}") from None
