"""Gradient checkpointing per stage (the E2E memory baseline): same gradients, same BN statistics,
less kept alive."""
from __future__ import annotations

import pytest
import torch

from invariants import rule_kw
from manlearn import LocalLearner
from manlearn.memory import SavedTensorTracker
from manlearn.recompute import frozen_norm_stats, stage_segments


def _step(method: str, K: int, ckpt: bool, **kw):
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method=method, **rule_kw(method, "dgl"), K=K, num_classes=4, grad_checkpoint=ckpt, **kw)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 4, (6,), generator=g)
    with SavedTensorTracker([*learner.parameters(), *learner.buffers()]) as tr:
        out = learner.train_step(x, y)
    return learner, out, tr.peak


@pytest.mark.parametrize("method,K,granularity", [("e2e", 1, True), ("dgl", 3, True), ("manpp", 4, True),
                                                  ("e2e", 1, "unit"), ("e2e", 1, "sqrt"), ("dgl", 3, "unit")])
def test_checkpointing_gives_the_same_gradients_and_statistics(method, K, granularity):
    plain, out0, peak0 = _step(method, K, False)
    ckpt, out1, peak1 = _step(method, K, granularity)
    assert out0.losses == out1.losses
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=n)
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, c), f"{n}: recomputation must not update BN statistics a second time"
    if method == "e2e":
        assert peak1 < 0.8 * peak0  # only stage inputs + one recomputed stage are alive


def test_granularities_trade_memory_in_order():
    """On resnet32 (3 stages of 5 units) per unit keeps the least alive, sqrt(15) ~ 4 units per segment
    less than a whole stage per segment, and all three less than no checkpointing."""
    def peak(granularity):
        torch.manual_seed(0)
        learner = LocalLearner("resnet32", method="e2e", num_classes=4, grad_checkpoint=granularity)
        x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
        with SavedTensorTracker([*learner.parameters(), *learner.buffers()]) as tr:
            learner.train_step(x, y)
        return tr.peak, [len(s.modules) for s in learner._segments[0]] if learner._segments else None

    (plain, _), (stage, seg_stage), (sqrt, seg_sqrt), (unit, seg_unit) = map(peak, (False, "stage", "sqrt", "unit"))
    assert unit < sqrt < stage < plain
    assert seg_stage == [6, 5, 5]  # the stem joins the first stage
    assert seg_sqrt == [5, 4, 4, 3]  # round(sqrt(15)) = 4 units, stem with the first
    assert seg_unit == [2] + [1] * 14


@pytest.mark.parametrize("bad", ["layer", 2, "sqrtn"])
def test_unknown_granularity_is_refused(bad):
    from manlearn.errors import ConfigError

    with pytest.raises(ConfigError, match="grad_checkpoint must be"):
        LocalLearner("resnet20", method="e2e", grad_checkpoint=bad)


def test_frozen_norm_stats_restores_momentum_and_counter():
    bn = torch.nn.BatchNorm2d(3)
    before = (bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked))
    with frozen_norm_stats([bn]):
        out = bn(torch.randn(4, 3, 5, 5) * 3 + 1)
    assert bn.momentum == 0.1
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    assert out.std() > 0.5  # still normalised with the batch statistics


def test_stage_segments_group_by_stage_and_stem_joins_first():
    mods = [torch.nn.Identity() for _ in range(6)]
    segs = stage_segments(mods, [None, 1, 1, 2, 2, 3])
    assert [len(s.modules) for s in segs] == [3, 2, 1]


def test_checkpointed_learner_inference_matches():
    torch.manual_seed(0)
    a = LocalLearner("resnet20", method="e2e", num_classes=4).eval()
    b = LocalLearner("resnet20", method="e2e", num_classes=4, grad_checkpoint=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a(x), b(x))


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_ema_recompute_same_gradients_less_memory(base):
    def run(recompute):
        torch.manual_seed(0)
        learner = LocalLearner("resnet20", method="manpp", base=base, K=4, num_classes=4, ema_recompute=recompute)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 4, (6,), generator=g)
        with SavedTensorTracker([*learner.parameters(), *learner.buffers()]) as tr:
            learner.train_step(x, y)
            learner.train_step(x, y)
        return learner, tr.peak

    plain, peak0 = run(False)
    rec, peak1 = run(True)
    for (n, p), q in zip(plain.named_parameters(), rec.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=n)
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=n)  # EMA weights included
    for (n, b), c in zip(plain.named_buffers(), rec.buffers()):
        assert torch.equal(b, c), n  # the ema units' BN statistics are updated once per step
    assert peak1 < peak0


from test_contract import trainable_specs  # noqa: E402


@pytest.mark.parametrize("method,base", trainable_specs(), ids=lambda v: str(v))
def test_checkpointing_reaches_every_rules_auxiliary_networks_exactly(method, base):
    """grad_checkpoint='unit' recomputes the auxiliary networks' parts too: the same gradients and the same
    statistics (float64), and every part of every auxiliary network is under checkpointing."""
    from manlearn.planning import aux_parts

    def step(granularity):
        torch.manual_seed(0)
        learner = LocalLearner("resnet20", method=method, base=base, K=3, num_classes=4, image_size=16,
                               grad_checkpoint=granularity).double()
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 4, (6,), generator=g)
        learner.train_step(x, y)
        learner.train_step(x, y)  # the second step: MAN's EMA has moved, BN statistics twice updated
        return learner

    plain = step(False)
    ckpt = step("unit")
    if ckpt.K > 1:
        parts = [p for aux in ckpt.auxes for _, p in aux_parts(aux)]
        assert parts and all(getattr(type(p), "_manlearn_checkpointed", False) for p in parts)
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        assert (p.grad is None) == (q.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-9, atol=1e-12, msg=n)
        torch.testing.assert_close(q, p, rtol=1e-9, atol=1e-12, msg=n)
    for (n, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=1e-9, atol=1e-12, msg=f"{n}: statistics updated once per step")
    assert plain.state_dict().keys() == ckpt.state_dict().keys()  # checkpoints stay interchangeable


def test_checkpointed_auxiliary_networks_keep_less():
    def peak(granularity):
        torch.manual_seed(0)
        # split="memory" (ends 2, 4, 15): the cut that keeps least; auto's one-stage-per-block cut keeps more
        learner = LocalLearner("resnet32", method="manpp", base="infopro", K=4, num_classes=4,
                               grad_checkpoint=granularity, split="memory")
        x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,))
        with SavedTensorTracker([*learner.parameters(), *learner.buffers()]) as tr:
            learner.train_step(x, y)
        return tr.peak

    e2e_unit = LocalLearner("resnet32", method="e2e", num_classes=4, grad_checkpoint="unit")
    with SavedTensorTracker([*e2e_unit.parameters(), *e2e_unit.buffers()]) as tr:
        e2e_unit.train_step(torch.randn(6, 3, 32, 32), torch.randint(0, 4, (6,)))
    assert peak("unit") < 0.6 * peak(False)
    assert peak("unit") <= tr.peak  # local learning + checkpointing: the least memory of all
