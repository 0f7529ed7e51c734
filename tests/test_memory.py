"""Activation-memory accounting: what local learning is for."""
from __future__ import annotations

import torch

from invariants import rule_kw
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
    learner = LocalLearner(model="resnet20", method=method, **rule_kw(method, "dgl"), K=K, num_classes=3, image_size=32)
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


def test_tracker_counts_one_storage_once_and_peak_is_the_worst_moment():
    x = torch.randn(256, 32, requires_grad=True)
    with SavedTensorTracker() as tr:
        (x * x).sum().backward()   # mul saves x twice: one storage, counted once
        assert tr.peak == 256 * 32 * 4 and tr.live == 0
        tr.reset_peak()
        a = torch.randn(100, 10, requires_grad=True)
        (a.exp()).sum().backward()  # exp saves its 4,000-byte output, freed by backward
        b = torch.randn(50, 10, requires_grad=True)
        (b.exp()).sum().backward()  # a second, smaller graph after the first was freed
    assert tr.peak == 100 * 10 * 4  # the worst moment, not the sum of both graphs
    assert tr.total == 256 * 32 * 4 + 100 * 10 * 4 + 50 * 10 * 4


def test_tracker_on_conv_bn_relu_matches_hand_count():
    """conv saves its input, BN (train) its input + batch mean/inverse std, ReLU its output;
    parameters and buffers (BN running stats) are state, not activations."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                              torch.nn.ReLU())
    x = torch.randn(4, 3, 16, 16)
    with SavedTensorTracker([*net.parameters(), *net.buffers()]) as tr:
        net(x).sum().backward()
    act = 4 * 8 * 16 * 16 * 4
    stats = 2 * 8 * 4  # BN's saved mean and inverse std
    assert tr.peak == x.numel() * 4 + act + stats + act
