"""Split tables, uniform / balanced / explicit splits, and the errors for impossible requests."""
from __future__ import annotations

import pytest
import torch

import manlearn
from manlearn import ConfigError, LocalLearner
from manlearn.memory import unit_activation_bytes
from manlearn.split import PUBLISHED_SPLITS, balanced_ends, resolve_split, uniform_ends


# unit_ids do not depend on width: build the ImageNet models narrow so the table tests stay fast
_NARROW = {"resnet": dict(widths=(4, 8, 16, 32), groups=1, width_per_group=64),
           "vit": dict(dim=12, heads=2, image_size=32)}


def unit_ids(model: str):
    tags = manlearn.models.model_tags(model)
    kw = {} if "cifar" in tags else next((v for k, v in _NARROW.items() if k in tags), {})
    return manlearn.create_model(model, **kw).unit_ids


# (model, table kind, published label K, stem_module that gives label K pieces)
TABLE_CASES = [("resnet32", "paper", 8, False), ("resnet32", "paper", 16, True),
               ("resnet110", "paper", 16, False), ("resnet110", "paper", 32, False),
               ("resnet110", "paper", 55, True), ("resnet110", "memory", 2, False),
               ("resnet110", "memory", 3, False), ("resnet110", "memory", 4, False),
               ("resnet101", "paper", 2, False), ("resnet101", "paper", 4, False),
               ("resnext101_32x8d", "paper", 2, False), ("resnext101_32x8d", "paper", 4, False),
               ("resnet152", "paper", 2, False), ("resnet152", "paper", 4, False),
               ("vit_tiny", "paper", 4, False), ("vit_small", "paper", 4, False), ("vit_base", "paper", 4, False)]


def test_table_cases_cover_every_published_table():
    published = {(m, kind, k) for m, kinds in PUBLISHED_SPLITS.items() for kind, t in kinds.items() for k in t}
    assert published == {(m, kind, k) for m, kind, k, _ in TABLE_CASES}


@pytest.mark.parametrize("model,kind,label,stem", TABLE_CASES)
def test_published_tables_give_documented_number_of_pieces(model, kind, label, stem):
    ids = unit_ids(model)
    split = resolve_split(len(ids), label, kind, stem, model, ids)
    assert split.K == label and split.source == f"{kind} table"
    assert split.ends[-1] == len(ids)
    pieces = split.pieces()
    assert len(pieces) == label
    covered = [j for _, r in pieces for j in r]
    assert covered == list(range(len(ids)))  # every unit exactly once, in order
    assert sum(has_stem for has_stem, _ in pieces) == 1


def test_table_boundaries_match_the_authors_configs():
    ids = unit_ids("resnet32")
    k8 = resolve_split(15, 8, "paper", False, "resnet32", ids)
    assert [ids[e - 1] for e in k8.ends] == [(1, 0), (1, 2), (1, 4), (2, 1), (2, 3), (3, 0), (3, 2), (3, 4)]
    ids110 = unit_ids("resnet110")
    k3 = resolve_split(54, 3, "memory", False, "resnet110", ids110)
    assert [ids110[e - 1] for e in k3.ends] == [(1, 9), (2, 2), (3, 17)]
    k55 = resolve_split(54, 55, "paper", True, "resnet110", ids110)
    assert k55.ends == tuple(range(1, 55))


def test_learner_uses_the_table_by_default():
    learner = LocalLearner(model="resnet32", method="dgl", K=16, image_size=8)
    assert learner.K == 16 and learner.split.source == "paper table"
    assert len(learner.blocks[0]) == 1 and all(len(b) == 1 for b in learner.blocks)
    man = LocalLearner(model="resnet32", method="dgl", K=8, stem_module=False, image_size=8)
    assert man.split.source == "paper table" and [len(b) for b in man.blocks] == [2] * 8  # stem+unit, then pairs


def test_uniform_any_k():
    assert uniform_ends(15, 4) == (4, 8, 12, 15)
    for K in range(1, 17):
        learner_split = resolve_split(15, K, "uniform", True)
        assert learner_split.K == K
    s = resolve_split(15, 7, "auto", True, "resnet32", unit_ids("resnet32"))
    assert s.source == "uniform" and s.K == 7


def test_balanced_minimises_the_largest_group():
    costs = [8, 8, 8, 4, 4, 4, 2, 2, 2]
    ends = balanced_ends(costs, 3)
    sums = [sum(costs[a:b]) for a, b in zip((0,) + ends[:-1], ends)]
    assert max(sums) == 16 and ends[-1] == 9
    uni = uniform_ends(9, 3)
    assert max(sum(costs[a:b]) for a, b in zip((0,) + uni[:-1], uni)) == 24


def test_balanced_split_from_measured_memory():
    net = manlearn.create_model("resnet110")
    stem, costs = unit_activation_bytes(net.stem, net.units, 3, 32)
    # stage 1 units keep 4x the activations of stage 3 units (2x channels, 1/4 the pixels)
    assert costs[0] > 1.5 * costs[-1] and stem > 0
    learner = LocalLearner(model="resnet110", method="dgl", K=4, split="balanced", stem_module=False)
    ends = learner.split.ends
    sums = [sum(costs[a:b]) + (stem if a == 0 else 0) for a, b in zip((0,) + ends[:-1], ends)]
    uni = uniform_ends(54, 4)
    uni_sums = [sum(costs[a:b]) + (stem if a == 0 else 0) for a, b in zip((0,) + uni[:-1], uni)]
    assert max(sums) < max(uni_sums)
    assert learner.split.source == "balanced" and learner.K == 4


def test_measuring_does_not_change_the_network():
    net = manlearn.create_model("resnet20")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    unit_activation_bytes(net.stem, net.units, 3, 32)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_explicit_splits():
    ids = unit_ids("resnet32")
    s = resolve_split(15, 3, [5, 10, 15], stem_module=False)
    assert s.ends == (5, 10, 15)
    s = resolve_split(15, 4, [(1, 4), (2, 4), (3, 4)], stem_module=True, unit_ids=ids)
    assert s.ends == (5, 10, 15) and s.K == 4
    with pytest.raises(ConfigError, match="end of the network"):
        resolve_split(15, 2, [5, 10], stem_module=False)
    with pytest.raises(ConfigError, match="increasing"):
        resolve_split(15, 3, [10, 5, 15], stem_module=False)
    with pytest.raises(ConfigError, match="names no unit"):
        resolve_split(15, 2, [(4, 0), (3, 4)], stem_module=False, unit_ids=ids)
    with pytest.raises(ConfigError, match="K=3 was requested"):
        resolve_split(15, 3, [5, 15], stem_module=False)


@pytest.mark.parametrize("K,stem,msg", [(17, True, "at most K=16"), (16, False, "at most K=15"),
                                        (0, True, "positive integer"), (2.5, True, "positive integer")])
def test_impossible_k_is_refused_with_what_is_possible(K, stem, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        LocalLearner(model="resnet32", method="dgl", K=K, stem_module=stem)
    if "at most" in msg:
        assert "K=16 with stem_module=True" in str(e.value) and "uniform" in str(e.value)


def test_missing_table_is_refused_with_the_available_ones():
    with pytest.raises(ConfigError, match="no published 'paper' split") as e:
        LocalLearner(model="resnet32", method="dgl", K=10, split="paper")
    assert "K=9 with stem_module=True or K=8 with stem_module=False" in str(e.value)
    with pytest.raises(ConfigError, match="unknown split"):
        LocalLearner(model="resnet32", method="dgl", K=4, split="even")


def test_e2e_ignores_k():
    assert LocalLearner(model="resnet20", method="e2e", K=7, image_size=8).K == 1
