"""Split tables, uniform / balanced / explicit splits, and the errors for impossible requests."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import manlearn
from manlearn import ConfigError, LocalLearner
from manlearn.memory import unit_activation_bytes
from manlearn.split import PUBLISHED_SPLITS, balanced_ends, resolve_split, stage_ends, uniform_ends

sys.path.insert(0, str(Path(__file__).parent))
from foreign_nets import TimmViT, tv_resnet18, tv_resnet50  # noqa: E402


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
    # `auto` with nothing measured and no stages: uniform
    s = resolve_split(15, 7, "auto", True)
    assert s.source == "uniform" and s.K == 7 and s.ends == uniform_ends(15, 6)


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


# ------------------------------------------------------------------ auto follows the stages and the recipes
def quiet_learner(model, **kw) -> LocalLearner:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MemoryWarning where a split saves little: not what is tested here
        return LocalLearner(model, **kw)


def cuts_of(learner: LocalLearner) -> set[int]:
    return set(learner.split.ends[:-1])


@pytest.mark.parametrize("K,stem", [(3, True), (4, True), (5, True), (2, False), (3, False), (4, False)])
def test_auto_cuts_a_torchvision_resnet18_only_at_stage_boundaries(K, stem):
    learner = quiet_learner(tv_resnet18(num_classes=5), method="dgl", K=K, stem_module=stem, image_size=32)
    stage_boundaries = set(stage_ends(learner.unit_ids)[:-1])
    assert learner.K == K and learner.split.source == "stage boundaries"
    assert cuts_of(learner) <= stage_boundaries, learner.split.ends


def test_auto_at_k4_without_stem_module_is_the_detection_table():
    """Four groups on four stages: stem+layer1 | layer2 | layer3 | layer4 (SPEC 3.4), for every ResNet."""
    for net in (tv_resnet18(num_classes=5), tv_resnet50(num_classes=5)):
        learner = quiet_learner(net, method="dgl", K=4, stem_module=False, image_size=32)
        assert learner.split.ends == tuple(stage_ends(learner.unit_ids))


@pytest.mark.parametrize("net,K", [(tv_resnet18, 6), (tv_resnet50, 6), (tv_resnet50, 9)])
def test_more_pieces_than_stages_still_cut_at_every_stage_boundary(net, K):
    learner = quiet_learner(net(num_classes=5), method="dgl", K=K, image_size=32)
    assert learner.K == K and learner.split.source == "stage boundaries + memory"
    assert set(stage_ends(learner.unit_ids)[:-1]) <= cuts_of(learner), learner.split.ends


def test_cuts_inside_stages_follow_the_memory():
    """The extra cuts go where the activations are largest (stage 1 of a ResNet-50), by the memory rule."""
    learner = quiet_learner(tv_resnet50(num_classes=5), method="dgl", K=6, image_size=32)
    inside = cuts_of(learner) - set(stage_ends(learner.unit_ids)[:-1])
    assert [learner.unit_ids[e - 1] for e in sorted(inside)] == [(1, 0)]


def test_auto_without_measurements_balances_unit_counts_within_stages():
    ids = unit_ids("resnet32")  # 3 stages of 5 units
    s = resolve_split(15, 7, "auto", True, "resnet32", ids)  # 6 groups: 2 per stage
    sizes = [b - a for a, b in zip((0,) + s.ends[:-1], s.ends)]
    assert s.source == "stage boundaries + uniform" and {5, 10} <= set(s.ends) and sorted(sizes) == [2, 2, 2, 3, 3, 3]
    s = resolve_split(15, 3, "auto", True, "resnet32", ids)  # 2 groups: one stage boundary
    assert s.source == "stage boundaries" and s.ends in ((5, 15), (10, 15))


def test_auto_gives_a_timm_vit_groups_of_three_with_the_patch_embedding_first():
    learner = quiet_learner(TimmViT(depth=12, num_classes=5), method="manpp", base="dgl", K=4, image_size=32)
    assert learner.split.source == "equal groups" and learner.split.stem_module is False
    assert [len(b) for b in learner.blocks] == [1 + 3, 3, 3, 3]  # patch embedding + 3 blocks, then 3s
    assert learner.split.pieces()[0][0]  # the first piece holds the stem
    five = quiet_learner(TimmViT(depth=12, num_classes=5), method="dgl", K=5, image_size=32)
    assert [len(b) for b in five.blocks] == [1 + 3, 3, 2, 2, 2]  # earlier groups take the remainder


def test_auto_gives_a_registered_vit_the_published_table_without_being_told_stem_module():
    learner = quiet_learner("vit_tiny", method="manpp", base="dgl", K=4, num_classes=4, image_size=32,
                            model_kwargs=dict(dim=12, heads=2))
    assert learner.split.source == "paper table" and [len(b) for b in learner.blocks] == [1 + 3, 3, 3, 3]


def test_explicit_split_and_stem_module_still_win():
    vit = quiet_learner(TimmViT(depth=12, num_classes=5), method="dgl", K=4, stem_module=True, image_size=32)
    assert vit.split.stem_module is True and [len(b) for b in vit.blocks] == [1, 4, 4, 4]
    uniform = quiet_learner(tv_resnet18(num_classes=5), method="dgl", K=4, split="uniform", image_size=32)
    assert uniform.split.source == "uniform" and uniform.split.ends == (3, 6, 8)  # inside stage 2: as asked
    listed = quiet_learner(tv_resnet18(num_classes=5), method="dgl", K=3, stem_module=False, split=[1, 5, 8],
                           image_size=32)
    assert listed.split.source == "explicit" and listed.split.ends == (1, 5, 8)
    # the FM-R32 protocol's K=16 stays the paper table (stem + every unit)
    r32 = quiet_learner("resnet32", method="dgl", K=16, image_size=8)
    assert r32.split.source == "paper table" and r32.split.ends == tuple(range(1, 16))


def test_a_network_without_stages_or_tokens_keeps_the_memory_split():
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    learner = quiet_learner(net, method="dgl", K=3, image_size=16)
    assert learner.split.source == "memory" and learner.split.stem_module is True
