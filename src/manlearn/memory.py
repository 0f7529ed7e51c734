"""Training-memory accounting that works the same on CPU and GPU.

The quantity local learning saves is *activation memory*: the tensors autograd keeps alive for the
backward pass. :class:`SavedTensorTracker` counts exactly those (deduplicated by storage, parameters
excluded) and records the peak of the live total, so it is comparable across devices and methods.
On CUDA, :class:`PeakMemory` also reports the allocator's peak (``torch.cuda.max_memory_allocated``).
"""
from __future__ import annotations

import resource
import sys
import weakref
from typing import Iterable

import torch
from torch import nn


class _Held:
    """What autograd stores instead of the tensor while the tracker is active.

    It has no ``__del__``: a Python ``__del__`` runs in the hot path (whenever autograd frees a saved
    tensor), and a KeyboardInterrupt that lands in it is printed and swallowed by Python. Instead a weak
    reference whose callback is a builtin (``list.append``, no Python frame, nothing to interrupt) queues
    the release, which the tracker settles on its next pack or read."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor


class SavedTensorTracker:
    """Context manager: live and peak bytes of tensors saved for backward.

    ``forward_only=True`` is for passes that never run backward: on exit it lets go of the saved tensors
    it holds. An op that saves its own output (ReLU, sigmoid, ...) hands the hook a tensor whose
    ``grad_fn`` holds the saved value, a cycle through C++ that the garbage collector cannot see; only
    backward (which frees the saved values) or this release breaks it. The graph cannot run backward
    afterwards."""

    def __init__(self, exclude: Iterable[torch.Tensor] = (), forward_only: bool = False) -> None:
        self.exclude = {p.data_ptr() for p in exclude}
        self.forward_only = forward_only
        self._live = 0
        self.peak = 0
        self.total = 0
        self._refs: dict[tuple, list[int]] = {}
        self._dead: list[weakref.ref] = []  # weak references of released _Held objects (appended by C code)
        self._keys: dict[int, tuple[weakref.ref, tuple]] = {}  # id(weak reference) -> (it, storage key)
        self._hooks = None

    @property
    def live(self) -> int:
        self._drain()
        return self._live

    def _drain(self) -> None:
        dead, keys = self._dead, self._keys
        while dead:
            self._release(keys.pop(id(dead.pop()))[1])

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.data_ptr() in self.exclude or t.device.type == "meta":
            return _Held(t)
        self._drain()  # releases first: the live total at this instant, as a __del__ would have kept it
        storage = t.untyped_storage()
        key = (t.device.type, t.device.index, storage.data_ptr())
        ref = self._refs.get(key)
        if ref is None:
            size = storage.nbytes()
            self._refs[key] = [1, size]
            self._live += size
            self.total += size
            self.peak = max(self.peak, self._live)
        else:
            ref[0] += 1
        held = _Held(t)
        wr = weakref.ref(held, self._dead.append)
        self._keys[id(wr)] = (wr, key)
        return held

    @staticmethod
    def _unpack(held: _Held) -> torch.Tensor:
        return held.tensor

    def _release(self, key) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            self._live -= ref[1]
            del self._refs[key]

    def reset_peak(self) -> None:
        self.peak = self.live  # (settles the queued releases)

    def __enter__(self) -> "SavedTensorTracker":
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        if self.forward_only:
            for wr, _key in list(self._keys.values()):
                held = wr()
                if held is not None:
                    held.tensor = None


def peak_rss_bytes() -> int:
    """Peak resident memory of this process (includes data, weights, allocator caches)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


def _proc_status_bytes(field: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def current_rss_bytes() -> int | None:
    """Resident memory of this process now (Linux ``VmRSS``; None elsewhere)."""
    return _proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-memory high-water mark (Linux: ``clear_refs`` 5), so that
    :func:`peak_rss_since_reset_bytes` measures only what follows. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_bytes() -> int | None:
    """High-water mark of resident memory since :func:`reset_peak_rss` (Linux ``VmHWM``)."""
    return _proc_status_bytes("VmHWM")


class PeakMemory:
    """Peak training memory over a region of code.

    ``peak_bytes`` is the CUDA allocator's peak on a GPU, and the peak of live saved activations
    elsewhere; ``peak_activation_bytes`` (saved tensors) and ``peak_rss_bytes`` are always available.
    """

    def __init__(self, device: str | torch.device = "cpu", exclude: Iterable[torch.Tensor] = (),
                 track_activations: bool = True) -> None:
        self.device = torch.device(device)
        self.tracker = SavedTensorTracker(exclude) if track_activations else None
        self.cuda_peak: int | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.tracker is not None:
            self.tracker.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.tracker is not None:
            self.tracker.__exit__(*exc)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.cuda_peak = int(torch.cuda.max_memory_allocated(self.device))

    @property
    def peak_activation_bytes(self) -> int:
        return self.tracker.peak if self.tracker is not None else 0

    @property
    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes()

    @property
    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            if self.cuda_peak is None:  # still inside the context
                return int(torch.cuda.max_memory_allocated(self.device))
            return self.cuda_peak
        return self.peak_activation_bytes


def unit_activation_bytes(stem: nn.Module, units: Iterable[nn.Module], in_channels: int,
                          image_size: int, batch: int = 2) -> tuple[float, list[float]]:
    """Bytes each unit saves for backward on a (batch, C, S, S) input, in training mode.

    Used by the ``balanced`` split. Modules are put back in their original mode; BN running stats are
    restored so that measuring does not change the network.
    """
    units = list(units)
    modules = [stem, *units]
    modes = [m.training for m in modules]
    states = [{k: v.clone() for k, v in m.state_dict().items()} for m in modules]
    params = [p for m in modules for p in m.parameters()]
    costs: list[float] = []
    try:
        device = params[0].device if params else torch.device("cpu")
        x = torch.zeros(batch, in_channels, image_size, image_size, device=device)
        for m in modules:
            m.train()
            x = x.detach().requires_grad_(True)
            with SavedTensorTracker(params, forward_only=True) as tr:
                x = m(x)
            costs.append(float(tr.total))
            del tr
    finally:
        for m, mode, st in zip(modules, modes, states):
            m.load_state_dict(st)
            m.train(mode)
    return costs[0], costs[1:]
