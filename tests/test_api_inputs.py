"""The Python API refuses bad inputs in one manlearn line, before any state changes (#28 item 9)."""
from __future__ import annotations

import pytest
import torch

import manlearn
from manlearn.errors import ConfigError


def _learner(**kw) -> manlearn.LocalLearner:
    torch.manual_seed(0)
    kw.setdefault("method", "dgl")
    return manlearn.LocalLearner("resnet20", K=3, num_classes=4, image_size=16, **kw)


def _state(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.state_dict().items()}


X, Y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])


@pytest.mark.parametrize("x, y, match", [
    (X.double(), Y, "images are torch.float64 but the learner's weights are torch.float32"),
    (X[:0], Y[:0], "an empty batch"),
    (X, torch.tensor([[0.5, 0.6, 0, 0]] * 4), "sum to 1 per image"),
    (X, torch.tensor([[1.5, -0.5, 0, 0]] * 4), ">= 0 and sum to 1"),
])
def test_bad_batches_are_refused_before_any_change(x, y, match):
    learner = _learner()
    before = _state(learner)
    with pytest.raises(ConfigError, match=match):
        learner.train_step(x, y)
    after = learner.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in learner.parameters())


def test_an_input_that_requires_grad_trains_like_one_that_does_not():
    a, b = _learner(), _learner()
    out_a = a.train_step(X.clone().requires_grad_(True), Y)
    out_b = b.train_step(X, Y)
    assert torch.equal(out_a.loss_values, out_b.loss_values)


@pytest.mark.parametrize("options, match", [
    (dict(method="auglocal", depth="2"), "option depth='2' must be int"),
    (dict(method="manpp", base="dgl", momentum="0.9"), "option momentum='0.9' must be float"),
    (dict(method="dgl", head=3), "option head=3 must be str"),
    (dict(method="manpp", base="infopro", lambda_schedule=1), "lambda_schedule=1 must be str"),
])
def test_a_rule_option_of_the_wrong_type_is_refused_at_construction(options, match):
    with pytest.raises(ConfigError, match=match):
        _learner(**options)


def test_float16_autocast_on_a_cpu_and_too_many_blocks_in_flight_are_refused():
    learner = _learner(amp_dtype=torch.float16)
    with pytest.raises(ConfigError, match="float16 does not run on a CPU"):
        learner.train_step(X, Y)
    with pytest.raises(ConfigError, match="blocks_in_flight=999 exceeds K=3"):
        _learner(blocks_in_flight=999)


def test_a_misspelt_keyword_gets_did_you_mean():
    with pytest.raises(ConfigError, match="did you mean 'num_classes'"):
        manlearn.LocalLearner("resnet20", method="dgl", K=3, num_class=4)
    with pytest.raises(ConfigError, match="did you mean 'momentum'"):
        manlearn.LocalLearner("resnet20", method="manpp", K=3, momentun=0.9)
