"""Memory plans (manlearn.planning): counted like PeakMemory, per block, beside E2E and checkpointing;
the build-time MemoryWarning; memory-balanced splits for any model; `manlearn plan`."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

import manlearn
from manlearn import ConfigError, LocalLearner, MemoryWarning, memory_plan
from manlearn.cli import main
from manlearn.memory import PeakMemory
from manlearn.planning import WARN_RATIO, memory_check, no_build_check, plan_learner

from test_contract import trainable_specs


def measured(learner: LocalLearner, batch: int) -> int:
    """The activation peak PeakMemory measures on a copy's second step (as `manlearn bench memory`)."""
    work = copy.deepcopy(learner)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, learner.in_channels, learner.image_size, learner.image_size, generator=g)
    y = torch.randint(0, learner.num_classes, (batch,), generator=g)
    work.train_step(x, y)
    with PeakMemory("cpu", exclude=[*work.parameters(), *work.buffers()]) as pm:
        work.train_step(x, y)
    return pm.peak_activation_bytes


def quiet(*args, **kwargs) -> LocalLearner:
    with no_build_check():
        torch.manual_seed(0)
        return LocalLearner(*args, **kwargs)


def close(a: int, b: int, rel: float = 0.05) -> bool:
    return abs(a - b) <= rel * b


@pytest.mark.parametrize("method,base", trainable_specs(), ids=lambda v: str(v))
def test_the_plan_is_what_the_step_keeps_for_every_rule(method, base):
    learner = quiet("resnet20", method=method, base=base, K=3, image_size=16, num_classes=4)
    plan = learner.memory_plan(batch_size=8)
    real = measured(learner, 8)
    assert close(plan.peak_activation_bytes, real), (plan.peak_activation_bytes, real)
    assert plan.peak_activation_bytes == max(b.peak_bytes for b in plan.blocks) or learner.blocks_in_flight > 1
    assert len(plan.blocks) == learner.K and plan.total_bytes == plan.peak_activation_bytes + plan.static_bytes


@pytest.mark.parametrize("model,size", [("resnet32", 32), ("vgg8b", 32), ("vit_cifar", 32), ("resnet18", 64),
                                        ("resnet50", 64), ("vit_tiny", 64)])
@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_the_plan_is_what_the_step_keeps_on_registered_models(model, size, base):
    try:
        learner = quiet(model, method="manpp", base=base, K=4, image_size=size)
    except ConfigError as e:  # InfoPro on ViT tokens is refused, with a reason, and nothing else
        assert model.startswith("vit") and base == "infopro" and ("token" in str(e) or "feature map" in str(e))
        return
    plan = learner.memory_plan(batch_size=8)
    assert close(plan.peak_activation_bytes, measured(learner, 8))


@pytest.mark.parametrize("method,base", [("manpp", "infopro"), ("manpp", "dgl"), ("auglocal", None)])
def test_the_plan_is_what_the_step_keeps_under_checkpointing(method, base):
    # the memory-balanced cut (auto cuts ResNet-32 K=4 at its stage boundaries, whose stage-1 block keeps more
    # than E2E under per-unit checkpointing)
    learner = quiet("resnet32", method=method, base=base, K=4, num_classes=4, grad_checkpoint="unit",
                    split="memory")
    plan = learner.memory_plan(batch_size=8)
    assert close(plan.peak_activation_bytes, measured(learner, 8))
    assert plan.peak_activation_bytes <= plan.baselines["e2e+ckpt:unit"].peak_activation_bytes


@pytest.mark.parametrize("granularity", [None, "stage", "unit", "sqrt"])
def test_the_baselines_are_what_e2e_keeps(granularity):
    local = quiet("resnet20", method="manpp", base="dgl", K=3, image_size=16)
    plan = local.memory_plan(batch_size=8)
    e2e = quiet("resnet20", method="e2e", image_size=16, grad_checkpoint=granularity or False)
    name = f"e2e+ckpt:{granularity}" if granularity else "e2e"
    assert close(plan.baselines[name].peak_activation_bytes, measured(e2e, 8))
    params = sum(p.numel() * 4 for p in e2e.parameters())
    assert plan.baselines[name].static_bytes == 3 * params + sum(b.numel() * b.element_size() for b in e2e.buffers())


def test_a_plan_changes_nothing_of_the_learner_and_takes_no_random_numbers():
    learner = quiet("resnet20", method="manpp", base="infopro", K=3, image_size=16)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    torch.manual_seed(5)
    learner.memory_plan(batch_size=4)
    after_rng = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_rng, torch.rand(3))
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())
    assert all(p.grad is None for p in learner.parameters())


def test_the_plan_reports_blocks_parts_and_serialises():
    learner = quiet("resnet20", method="manpp", base="infopro", K=3, image_size=16)
    plan = learner.memory_plan(batch_size=16)
    assert plan.blocks[0].units == ["stem"] and plan.blocks[1].units[0] == "units.0"
    assert {"ema", "lb", "decoder", "classifier"} <= set(plan.blocks[0].aux_bytes)
    assert set(plan.blocks[-1].aux_bytes) == {"final head"}
    d = json.loads(plan.to_json())
    assert d["peak_activation_bytes"] == plan.peak_activation_bytes and set(d["baselines"]) == set(plan.baselines)
    text = plan.table()
    assert str(plan) == text
    peak = plan.peak_activation_bytes / 2**20
    assert "e2e+ckpt:unit" in text and "ema" in text and (f"{peak:.1f} MiB" in text or f"{peak:.2f} MiB" in text)


def test_the_plan_scales_with_the_batch():
    learner = quiet("resnet20", method="dgl", K=3, image_size=16)
    small, big = learner.memory_plan(batch_size=4), learner.memory_plan(batch_size=32)
    assert close(big.peak_activation_bytes, measured(learner, 32))
    assert 7 < big.peak_activation_bytes / small.peak_activation_bytes <= 8.01
    assert big.static_bytes == small.static_bytes


def test_memory_plan_of_a_users_network_leaves_it_alone():
    from foreign_nets import tv_resnet18

    net = tv_resnet18(num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    plan = memory_plan(net, input_size=(3, 32, 32), batch_size=4, K=3, method="manpp", base="dgl")
    assert plan.input_size == (3, 32, 32) and plan.K == 3
    assert any(u.startswith("layer") for b in plan.blocks for u in b.units)  # the user's module paths
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not hasattr(net, "units") or not isinstance(getattr(net, "units"), nn.ModuleList)


@pytest.mark.parametrize("call,needle", [
    (lambda: memory_plan("vit_cifar", input_size=30, batch_size=2, K=2, method="dgl"), "patch size"),
    (lambda: memory_plan("vgg8b", input_size=4, batch_size=2, K=2, method="dgl"), "needs image_size >= 16"),
    (lambda: memory_plan(nn.Linear(3, 3), input_size=8, batch_size=2, K=2, method="dgl"), None),
    (lambda: memory_plan("resnet20", input_size=16, batch_size=2, K=40, method="dgl"), "K=40 is impossible"),
    (lambda: memory_plan("resnet20", input_size=(16, 20), batch_size=2, K=2, method="dgl"), "square"),
    (lambda: memory_plan("resnet20", input_size=16, batch_size=0, K=2, method="dgl"), "batch_size"),
    (lambda: memory_plan("resnet20", input_size=16, batch_size=2, K=2, method="dgl", optimizer="lbfgs"), "optimizer"),
])
def test_bad_plans_are_one_clear_line(call, needle):
    with pytest.raises(ConfigError) as e:
        call()
    msg = str(e.value)
    if needle is None:  # the same words as the learner's refusal
        with pytest.raises(ConfigError) as direct:
            LocalLearner(nn.Linear(3, 3), method="dgl", K=2, image_size=8)
        needle = str(direct.value)
    assert needle in msg and "\n" not in msg


def test_a_plan_of_a_dense_task_is_refused():
    from manlearn.tasks import DeepLabV3Task

    learner = quiet("resnet50", method="greedy", K=2, image_size=64, task=DeepLabV3Task(3, aspp_channels=8),
                    model_kwargs=dict(widths=[8, 16, 32, 64], stem_width=8))
    with pytest.raises(ConfigError, match="classification"):
        learner.memory_plan(batch_size=2)


# ------------------------------------------------------------------ the build-time warning
def test_a_configuration_that_saves_nothing_warns_once_and_can_be_silenced():
    with pytest.warns(MemoryWarning) as got:
        LocalLearner("resnet20", method="manpp", base="infopro", K=3, split="uniform")
    assert len([w for w in got if issubclass(w.category, MemoryWarning)]) == 1
    msg = str(got[0].message)
    assert "the activations of end-to-end backprop" in msg and "split='memory'" in msg and "\n" not in msg
    assert issubclass(MemoryWarning, UserWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.simplefilter("ignore", MemoryWarning)
        LocalLearner("resnet20", method="manpp", base="infopro", K=3, split="uniform")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MemoryWarning)
        LocalLearner("resnet32", method="manpp", base="infopro", K=16)  # the recipe saves half: no warning


@pytest.mark.parametrize("model", ["resnet20", "resnet32", "vgg8b", "vit_cifar"])
@pytest.mark.parametrize("K", [2, 4, 8])
@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_no_silent_case(model, K, base):
    """Every configuration keeps at most 0.9x E2E's activations (by the exact plan), or warns."""
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        try:
            torch.manual_seed(0)
            learner = LocalLearner(model, method="manpp", base=base, K=K)
        except ConfigError as e:  # refused, with a reason: InfoPro on ViT tokens or a K beyond the units, only
            assert (model.startswith("vit") and base == "infopro" and "token" in str(e)) or (
                f"K={K} is impossible" in str(e) and model == "vgg8b"), str(e)
            return
    warned = any(issubclass(w.category, MemoryWarning) for w in got)
    plan = plan_learner(learner, 2, baselines=("e2e",), breakdown=False, sample_batches=(2,))
    assert warned == (plan.ratio("e2e") > WARN_RATIO), plan.ratio("e2e")


def test_the_check_leaves_the_learner_and_random_streams_alone():
    learner = quiet("resnet20", method="auglocal", K=3, image_size=16)
    before = {k: v.clone() for k, v in learner.state_dict().items()}
    torch.manual_seed(3)
    memory_check(learner)
    drawn = torch.rand(2)
    torch.manual_seed(3)
    assert torch.equal(drawn, torch.rand(2))
    assert all(torch.equal(before[k], v) for k, v in learner.state_dict().items())


# ------------------------------------------------------------------ memory-balanced splits
@pytest.mark.parametrize("model,method,base,K,size", [("resnet20", "greedy", None, 3, 32),
                                                       ("resnet32", "manpp", "dgl", 4, 32),
                                                       ("resnet18", "manpp", "infopro", 4, 64),
                                                       ("vit_tiny", "manpp", "dgl", 4, 64)])
def test_a_memory_split_keeps_no_more_than_a_uniform_one(model, method, base, K, size):
    uniform = quiet(model, method=method, base=base, K=K, split="uniform", image_size=size)
    balanced = quiet(model, method=method, base=base, K=K, split="memory", image_size=size)
    assert balanced.split.source == "memory" and balanced.K == K
    assert (balanced.memory_plan(batch_size=4).peak_activation_bytes
            <= uniform.memory_plan(batch_size=4).peak_activation_bytes)


def test_auto_takes_a_published_table_else_the_stage_boundary_that_keeps_least_else_the_memory_split():
    assert quiet("resnet32", method="manpp", base="infopro", K=16).split.source == "paper table"
    learner = quiet("resnet20", method="greedy", K=3)  # stem + 2 groups: one of the 2 stage boundaries
    assert learner.split.source == "stage boundaries"
    peaks = [quiet("resnet20", method="greedy", K=3, split=f"stages:{cut}").memory_plan(batch_size=4)
             .peak_activation_bytes for cut in (1, 2)]
    assert learner.memory_plan(batch_size=4).peak_activation_bytes == min(peaks)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, padding=1, stride=2),
                        nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(16, 4))  # one stage: no boundaries to follow
    learner = quiet(net, method="greedy", K=3)
    assert learner.split.source == "memory"
    assert learner.split.ends == quiet(net, method="greedy", K=3, split="memory").split.ends


def test_a_memory_split_takes_no_random_numbers():
    torch.manual_seed(0)
    a = LocalLearner("resnet20", method="manpp", base="infopro", K=3, split="uniform", image_size=16)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = LocalLearner("resnet20", method="manpp", base="infopro", K=3, split="memory", image_size=16)
    # same random draws: the backbones start identical whatever the split
    assert all(torch.equal(p, q) for p, q in zip(a.blocks.parameters(), b.blocks.parameters()))


# ------------------------------------------------------------------ the command line
def test_manlearn_plan_prints_a_table_and_json(capsys):
    assert main(["plan", "model=resnet20", "K=3", "base=dgl", "--batch", "8", "--image-size", "16"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: dgl+manpp, K=3" in out and "e2e+ckpt:sqrt" in out
    assert main(["plan", "model=resnet20", "K=3", "base=dgl", "--batch", "8", "--image-size", "16", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["batch_size"] == 8 and d["input_size"] == [3, 16, 16] and len(d["blocks"]) == 3


def test_manlearn_plan_refuses_bad_requests_in_one_line(capsys):
    assert main(["plan", "model=resnet20", "K=99"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: K=99 is impossible") and err.count("\n") == 1
    assert main(["plan", "model=resnet20", "--batch", "0"]) == 2
    assert "--batch must be >= 1" in capsys.readouterr().err


def test_building_and_planning_leave_nothing_behind():
    """The build-time check, the memory split's cut costs and the plan run forward passes with no backward;
    an op that saves its own output would keep their graphs alive (a cycle the garbage collector cannot
    see) unless the tracker lets go of them, and a test session building hundreds of learners ran out of
    memory. Every tensor of a dropped learner must be freed."""
    import gc
    import weakref

    def build_and_drop(**kw) -> list[weakref.ref]:
        learner = LocalLearner("resnet20", method="manpp", base="infopro", K=4, image_size=16, num_classes=4,
                               **kw)
        learner.memory_plan(batch_size=4)
        refs = [weakref.ref(p) for p in learner.parameters()]
        del learner
        return refs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryWarning)
        refs = build_and_drop(split="memory") + build_and_drop(split="balanced")
    gc.collect()
    assert refs and all(r() is None for r in refs), f"{sum(r() is not None for r in refs)} tensors still alive"


def test_the_warning_names_the_block_that_holds_the_peak_and_only_choices_that_move_it():
    """A larger K cannot shrink a block of one piece (ResNet-18 at 64 px: the stem alone, with InfoPro+MAN++'s
    auxiliary network, keeps more than E2E at any K), so the line offers it only when the peak block can be
    cut further; recomputing the ema unit is offered where there is one to recompute."""
    def warning(**kw) -> str:
        with pytest.warns(MemoryWarning) as got:
            torch.manual_seed(0)
            LocalLearner(method="manpp", base="infopro", num_classes=10, **kw)
        return str(next(w.message for w in got if issubclass(w.category, MemoryWarning)))

    stem = warning(model="resnet18", K=8, image_size=64)
    assert "block 0 (its one piece and its auxiliary network) holds the peak" in stem
    assert "a larger K" not in stem and "ema_recompute=True" in stem
    tail = warning(model="resnet20", K=2, image_size=32)
    assert "block 1 (9 pieces) holds the peak" in tail and "a larger K than 2" in tail


def test_the_readme_memory_example_runs():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- tests/test_planning.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its memory-plan example"
    ns: dict = {}
    exec(compile(m.group(1), "README.md", "exec"), ns)
    plan, same = ns["plan"], ns["same"]
    assert plan.peak_activation_bytes == same.peak_activation_bytes
    assert round(plan.peak_activation_bytes / 2**20, 1) == 143.1  # the figure the README shows
    assert "stem" in ns["first"].units and "ema" in ns["first"].aux_bytes


def test_the_plan_counts_predsims_per_block_adam_state_exactly():
    """The per-block variant steps each block with its own Adam (two moments), which the run's optimiser then
    skips: the plan counted SGD momentum for every parameter instead (1.15 MiB planned, 1.51 MiB real)."""
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)

    learner = quiet("resnet20", method="predsim", K=4, optimizer="per-block", image_size=16)
    planned = learner.memory_plan(batch_size=4).static_parts["optimizer"]
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    learner.train_step(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))
    opt.step()
    own = sum(state_bytes(aux.block_optimizer) for aux in learner.auxes)
    assert own > 0 and planned == state_bytes(opt) + own
