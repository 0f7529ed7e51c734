"""Activation-memory accounting: what local learning is for."""
from __future__ import annotations

import torch

from manlearn import LocalLearner
from manlearn.memory import PeakMemory, SavedTensorTracker


def test_tracker_counts_saved_activations_and_their_release():
    w = torch.randn(64, 64, requires_grad=True)
    x = torch.randn(128, 64)
    with SavedTensorTracker([w]) as tr:
        h = torch.relu(x @ w)  # saves x (32 KiB) and relu's output (32 KiB); w is excluded
        loss = (h @ w).sum()   # saves h (already counted: same storage as relu's output) and w
        assert tr.live == 2 * 128 * 64 * 4
        loss.backward()
    assert tr.peak == 2 * 128 * 64 * 4 and tr.live == 0


def _peak(method: str, K: int) -> int:
    torch.manual_seed(0)
    learner = LocalLearner(model="resnet20", method=method, base="dgl", K=K, num_classes=3, image_size=32)
    with PeakMemory("cpu", exclude=learner.parameters()) as pm:
        learner.train_step(torch.randn(8, 3, 32, 32), torch.arange(8) % 3)
    assert pm.tracker.live == 0  # every graph was freed by its backward
    return pm.peak_bytes


def test_local_learning_keeps_less_alive_than_e2e():
    e2e = _peak("e2e", 1)
    dgl = _peak("dgl", 10)
    manpp = _peak("manpp", 10)
    assert dgl < 0.5 * e2e
    assert dgl < manpp < e2e  # MAN++'s extra ema/lb units cost memory, still far below e2e
    assert _peak("dgl", 4) > dgl  # fewer, larger blocks keep more alive
