"""The engine's contract, parametrised over the registries (timm style): every registered rule (and
every modifier over every base), on every shipped task, and every registered model.

A rule registered tomorrow is covered the day it is registered: it must either train with blocks that
stay gradient-isolated, or refuse the task with a ConfigError that says why.
"""
from __future__ import annotations


import pytest
import torch

import manlearn
from manlearn import ConfigError, LocalLearner
from manlearn.rules import get_rule_class, list_base_rules
from manlearn.tasks import ClassificationTask, DeepLabV3Task, RetinaNetTask

from invariants import assert_blocks_learn_only_their_own_loss, own_loss_grads

NARROW = dict(widths=[8, 16, 32, 64], stem_width=8)

#: task name -> (task factory, model, model kwargs, image size)
TASKS = {
    "classification": (lambda: ClassificationTask(3), "resnet20", {}, 16),
    "detection": (lambda: RetinaNetTask(4, fpn_channels=8, head_convs=1, local_channels=8), "resnet50", NARROW, 64),
    "segmentation": (lambda: DeepLabV3Task(5, aspp_channels=8), "resnet50", NARROW, 64),
}


def rule_specs() -> list[tuple[str, str | None]]:
    """Every registered rule; every modifier once per base it can wrap."""
    specs: list[tuple[str, str | None]] = []
    for name in manlearn.list_rules():
        if get_rule_class(name).modifier:
            specs += [(name, base) for base in list_base_rules()]
        else:
            specs.append((name, None))
    return specs


def trainable_specs() -> list[tuple[str, str | None]]:
    """:func:`rule_specs` less the modifier/base pairs a modifier refuses by its ``bases`` (HPFF: dgl, infopro)."""
    return [(m, b) for m, b in rule_specs() if b is None or b in getattr(get_rule_class(m), "bases", (b,))]


def _targets(task: str, x: torch.Tensor):
    b = x.shape[0]
    if task == "classification":
        return torch.arange(b) % 3
    if task == "detection":
        return [dict(boxes=torch.tensor([[4.0, 6.0, 30.0, 40.0]]), labels=torch.tensor([i % 4])) for i in range(b)]
    return torch.randint(0, 5, (b, x.shape[-2], x.shape[-1]), generator=torch.Generator().manual_seed(0))


def build(task: str, method: str, base: str | None, K: int = 3) -> LocalLearner:
    factory, model, kwargs, size = TASKS[task]
    torch.manual_seed(0)
    return LocalLearner(model, method=method, base=base, K=K, image_size=size, task=factory(),
                        model_kwargs=dict(kwargs)).double()


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("method,base", rule_specs(), ids=lambda v: str(v))
def test_every_rule_on_every_task_is_isolated_or_refused(task, method, base):
    try:
        learner = build(task, method, base)
    except ConfigError as e:
        # a clear refusal names the rule or the reason (labels, tokens, feature maps)
        assert method in str(e) or (base or "") in str(e) or "labels" in str(e), str(e)
        assert get_rule_class(method).modifier or not get_rule_class(method).single_block
        return
    x = torch.randn(2, 3, TASKS[task][3], TASKS[task][3], generator=torch.Generator().manual_seed(1)).double()
    y = _targets(task, x)
    expected = own_loss_grads(learner, x, y)
    torch.manual_seed(7)
    out = learner.train_step(x, y)
    assert len(out.losses) == learner.K and all(torch.isfinite(torch.tensor(out.losses)))
    for k, block in enumerate(learner.blocks):
        for p, g in zip(block.parameters(), expected[k]):
            if g is None:
                assert p.grad is None or not p.grad.any()
            else:
                torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-10)
    for aux in learner.auxes:  # frozen parts (MAN's ema) get no gradient, everything else does
        for name, p in aux.named_parameters():
            assert (p.grad is None) == (not p.requires_grad), name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_greedy_and_every_modifier_over_greedy_run_on_every_task(task):
    """The task's local head makes these work everywhere (what 'dense local' used to be)."""
    build(task, "greedy", None)
    for name in manlearn.list_rules():
        cls = get_rule_class(name)
        if cls.modifier and "greedy" in getattr(cls, "bases", ("greedy",)):
            assert build(task, name, "greedy").base == "greedy"


def _model_kwargs(name: str) -> tuple[dict, int]:
    tags = manlearn.models.model_tags(name)
    if "vit" in tags:
        return dict(dim=16, depth=4, heads=2), (32 if "cifar" in tags else 64)
    if "vgg" in tags:
        return {}, 16  # four 2x2 max-pools
    if "cifar" in tags:
        return {}, 8
    if name.startswith("resnext"):
        return dict(NARROW, groups=2, width_per_group=16), 64
    return dict(NARROW), 64


@pytest.mark.parametrize("model", manlearn.list_models())
def test_every_registered_model_trains_isolated_blocks(model):
    kwargs, size = _model_kwargs(model)
    torch.manual_seed(0)
    learner = LocalLearner(model, method="manpp", base="dgl", K=3, num_classes=3, image_size=size,
                           model_kwargs=kwargs).double()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).double()
    y = torch.tensor([0, 2])
    assert_blocks_learn_only_their_own_loss(learner, x, y)
    learner.eval()
    with torch.no_grad():
        assert learner(x).shape == (2, 3)
