"""Runtime policy shared by every layer: which device, how to seed (and mix seeds), which autocast dtype.

A leaf module (it imports only torch, numpy and the errors), so that the trainer, the data-parallel
and pipeline loops and the benchmarks all take these decisions the same way without importing each
other.
"""
from __future__ import annotations

import random
import warnings

import numpy as np
import torch

from manlearn.errors import ConfigError

__all__ = ["resolve_device", "seed_everything", "amp_dtype", "cpu_has_native_bf16", "loss_precision", "derive_seed", "epoch_order", "step_generator"]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an unavailable explicit device is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} requested but CUDA is not available here; use device=cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s) present")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps requested but MPS is not available here")
    return dev


def seed_everything(seed: int) -> None:
    """Seed every RNG a run may use; the learner is built right after, so its init is repeatable."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matmuls natively (AVX512-BF16 / AMX, as oneDNN
    reports it). Without it, bf16 autocast on the CPU is emulated and usually slower than fp32."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the ``amp`` mode of a config (``off`` | ``bf16`` | ``fp16``) on ``device``
    (shared by classification and dense runs). On CUDA both; on a CPU ``bf16`` only: CPU autocast runs
    convolutions and matmuls in bf16 (1.7x faster per step on an AMX Xeon, BENCHMARKS.md), and fp16
    would need a gradient scaler for no speed. A CPU without native bf16 gets a warning, not a refusal."""
    if amp == "off":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu" and amp == "bf16":
        if not cpu_has_native_bf16():
            warnings.warn("amp=bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), so autocast emulates it "
                          "and is usually slower than amp=off", RuntimeWarning)  # one location: shown once per run
        return torch.bfloat16
    raise ConfigError(f"amp={amp} needs a CUDA device (device resolves to {device}); "
                      + ("on a CPU use amp=bf16 or amp=off" if device.type == "cpu" else "use amp=off"))


_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (stable across runs and platforms, unlike ``hash``).

    The one seed mixer of manlearn (data loaders, dense batches and augmentation): nearby inputs
    (batch 3 vs 4, epoch 0 vs 1) give unrelated generator streams.
    """
    h = 0x1234567
    for p in parts:
        h = _splitmix64(h ^ (int(p) & _MASK64))
    return h & ((1 << 63) - 1)


#: Stream tags, so that the permutation, augmentation and mixup/cutmix streams of one (seed, ...) never coincide.
TAG_PERM, TAG_AUG, TAG_MIX = 1, 2, 3


def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order of ``n`` training samples in ``epoch``: a pure function of (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(TAG_PERM, seed, epoch)))


def step_generator(seed: int, step: int) -> torch.Generator:
    """The augmentation RNG of training step ``step`` (a pure function of (seed, step): exact resume)."""
    return torch.Generator().manual_seed(derive_seed(TAG_AUG, seed, step))


def loss_precision(t: torch.Tensor) -> torch.Tensor:
    """``t`` in the precision a loss is computed in: float64 and float32 stay as they are, lower precision
    (bf16/fp16 under autocast) is upcast to float32 — never a downcast of float64, so a float64 run can be
    compared to 1e-12. The one place rules and tasks take this decision."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()
