"""The core invariants of local learning as reusable checks, shared by the tests of every model family."""
from __future__ import annotations

import copy

import torch

from manlearn.rules import LocalBatch, MomentumAux, create_rule


def rule_kw(method: str, base: str | None = None, **options) -> dict:
    """The options among ``base`` and ``options`` that ``method`` (with that base) takes: test helpers build
    every method from one list of defaults, as the CLI's recipes do."""
    chain = {"base": base} if base else {}
    accepted = create_rule(method, chain).accepted_options()
    return {k: v for k, v in {**chain, **options}.items() if k in accepted}


def assert_block_grads_are_their_local_loss_grads(learner, x, y, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    """After ``train_step``, block k's gradients equal those of block k's own local loss on the
    detached output of block k-1 (nothing arrives from later blocks)."""
    ref = copy.deepcopy(learner)
    learner.train_step(x, y)
    mb, inp = LocalBatch(x, y, ref.norm_mean, ref.norm_std), x
    for k in range(ref.K - 1):
        h = ref.blocks[k](inp)
        expected = torch.autograd.grad(ref.auxes[k](h, mb), list(ref.blocks[k].parameters()))
        for p, g in zip(learner.blocks[k].parameters(), expected):
            torch.testing.assert_close(p.grad, g, rtol=rtol, atol=atol)
        inp = h.detach()
        if isinstance(ref.auxes[k], MomentumAux):
            ref.auxes[k].update_ema(ref.momentum)


def assert_no_gradient_crosses_a_block_boundary(learner, x, y, k: int = 1) -> None:
    """Blocks 0..k's and auxiliary networks 0..k's gradients do not change when every later block, auxiliary
    network and the head change (and the later blocks' gradients do, so the comparison can detect it)."""
    other = copy.deepcopy(learner)
    with torch.no_grad():
        for mod in [*other.blocks[k + 1:], *other.auxes[k + 1:], other.head]:
            for p in mod.parameters():
                p.add_(torch.randn_like(p))
    learner.train_step(x, y)
    other.train_step(x, y)
    for j in range(k + 1):
        for (name, pa), (_, pb) in zip(learner.blocks[j].named_parameters(), other.blocks[j].named_parameters()):
            assert torch.equal(pa.grad, pb.grad), f"block {j} {name} depends on later blocks"
        for (name, pa), (_, pb) in zip(learner.auxes[j].named_parameters(), other.auxes[j].named_parameters()):
            if pa.requires_grad:
                assert torch.equal(pa.grad, pb.grad), f"aux {j} {name} depends on later blocks"
    assert not torch.equal(next(learner.blocks[-1].parameters()).grad, next(other.blocks[-1].parameters()).grad)


def perturb_ema_and_snapshot(learner) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Make every ema differ from its source (as after a few steps); return (ema, source) copies."""
    with torch.no_grad():
        for aux in learner.auxes:
            for p in aux.ema.parameters():
                p.add_(torch.randn_like(p))
    return [([p.clone() for p in aux.ema.parameters()], [p.clone() for p in aux.source.parameters()])
            for aux in learner.auxes]


def assert_ema_is_m_old_plus_one_minus_m_source(learner, before, m: float) -> None:
    """θ_ema = m·θ_ema_old + (1 − m)·θ_source (computed in float64), for every ema parameter."""
    for aux, (old, src) in zip(learner.auxes, before):
        for p, o, s in zip(aux.ema.parameters(), old, src):
            torch.testing.assert_close(p, (m * o.double() + (1 - m) * s.double()).float(), rtol=1e-6, atol=1e-7)


def _add(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return b if a is None else a if b is None else a + b


def own_loss_grads(learner, x: torch.Tensor, y) -> list[list[torch.Tensor | None]]:
    """For every block, the gradient it receives: its own loss, computed on the detached output of the
    block before (and, for the last block, on detached earlier feature taps), plus — for a rule whose loss
    reaches back (``Rule.reaches_back``, HPFF's window: 1) — the losses of the next ``reaches_back``
    blocks, and nothing else."""
    ref = copy.deepcopy(learner)
    back = ref.reaches_back
    torch.manual_seed(7)  # dropout (DeepLab's ASPP) draws the same masks as the step compared against
    batch = LocalBatch(x, y, ref.norm_mean, ref.norm_std)
    inp, taps = x, []
    out: list[list[torch.Tensor | None]] = [[None] * len(list(b.parameters())) for b in ref.blocks]
    for k in range(ref.K):
        batch.block_inputs[k] = inp.detach()
        h, own = ref.run_block_taps(k, inp.detach())
        if k == ref.K - 1:
            loss = ref.task.loss(ref.head_forward(h, [t.detach() for t in taps] + own), y, batch.image_hw)
        else:
            loss = ref.auxes[k](h, batch)
        reached = range(max(0, k - back), k + 1) if k < ref.K - 1 else range(k, k + 1)
        params = [list(ref.blocks[j].parameters()) for j in reached]
        grads = iter(torch.autograd.grad(loss, [p for ps in params for p in ps], allow_unused=True))
        for j, ps in zip(reached, params):
            out[j] = [_add(a, next(grads)) for a in out[j]]
        taps += own
        inp = h
    return out


def assert_blocks_learn_only_their_own_loss(learner, x: torch.Tensor, y, rtol: float = 1e-7, atol: float = 1e-10) -> None:
    """After ``train_step``, every block's gradients are exactly those of its own loss (float64 learners)."""
    expected = own_loss_grads(learner, x, y)
    torch.manual_seed(7)
    learner.train_step(x, y)
    for k, block in enumerate(learner.blocks):
        for p, g in zip(block.parameters(), expected[k]):
            torch.testing.assert_close(p.grad, g, rtol=rtol, atol=atol)
