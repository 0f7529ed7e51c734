"""The published rules beyond the base ones (SPEC 2.4): PredSim, AugLocal, HPFF; each pinned on a tiny
example computed here from the definition."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manlearn
from manlearn import ConfigError, LocalLearner
from manlearn.rules import LocalBatch


# ----------------------------------------------------------------------------------------- PredSim
def test_predsim_similarity_loss_on_four_samples_by_hand():
    """Per-channel std rows x0=(2,0,0,0), x1=(0,2,0,0), x2=(2,0,0,0), x3=(0,0,0,2): centred by their mean
    0.5 each has norm sqrt(3), so S(h) has 1 where rows are equal and (-0.75-0.75+0.25+0.25)/3 = -1/3
    elsewhere. Labels (0, 0, 1, 1) as one-hot rows centre to ±(1/2, -1/2): S(y) is +1 within a class
    and -1 across. The squared differences sum to 56/9 + 24/9 + 56/9 + 24/9 = 160/9 over 16 entries:
    MSE = 10/9."""
    from manlearn.rules.predsim import similarity_loss

    rows = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 2.0]], dtype=torch.float64)
    h = torch.zeros(4, 4, 2, 1, dtype=torch.float64)
    h[:, :, 1, 0] = rows * math.sqrt(2.0)  # two positions (0, r*sqrt 2): unbiased std = r
    y = torch.tensor([0, 0, 1, 1])
    loss = similarity_loss(h, y, 2)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - 10 / 9) < 1e-7


def test_predsim_loss_is_099_sim_plus_001_pred_and_pools_to_the_budget():
    from manlearn.rules.predsim import PredSimAux, similarity_loss

    torch.manual_seed(0)
    aux = PredSimAux((16, 32, 32), 10, 512, 0.99).double()
    assert aux.pred.in_features <= 512 and aux.pred.in_features == 16 * 4 * 8  # kernel 8x4 alternately
    assert aux.sim_conv.bias is None and aux.sim_conv.kernel_size == (3, 3)
    h = torch.randn(6, 16, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    batch = LocalBatch(h[:, :3], y)
    want = 0.99 * similarity_loss(aux.sim_conv(h), y, 10) + 0.01 * F.cross_entropy(
        aux.pred(F.avg_pool2d(h, (8, 4)).flatten(1)), y)
    torch.testing.assert_close(aux(h, batch), want, rtol=1e-12, atol=1e-12)
    small = PredSimAux((64, 8, 8), 10, 512, 0.99)
    assert small.pred.in_features == 512


def test_predsim_trains_and_refuses_what_it_cannot_do():
    learner = LocalLearner("resnet20", method="predsim", K=3, image_size=16, num_classes=4)
    out = learner.train_step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]))
    assert len(out.losses) == 3
    with pytest.raises(ConfigError, match="per-block"):
        LocalLearner("resnet20", method="predsim", K=3, image_size=16, rule_options={"optimizer": "per-block"})
    from manlearn.listing import methods_table

    assert "PredSim" in methods_table()


# ----------------------------------------------------------------------------------------- AugLocal
def test_auglocal_unit_indices_follow_the_definition_with_python_rounding():
    from manlearn.rules.auglocal import later_unit_indices

    # ResNet-32: n = 16 units (stem = 0); round(l + (n-l-1)/d*j), banker's rounding at .5
    assert later_unit_indices(0, 16, 2) == [8, 15]      # round(7.5) = 8
    assert later_unit_indices(2, 16, 2) == [8, 15]      # round(8.5) = 8
    assert later_unit_indices(5, 16, 2) == [10, 15]
    assert later_unit_indices(4, 16, 3) == [8, 11, 15]  # 4 + 11/3 = 7.67 -> 8, 11.33 -> 11
    assert later_unit_indices(12, 16, 3) == [13, 14, 15]  # d >= n-1-l: every later unit
    assert later_unit_indices(14, 16, 3) == [15]


def test_auglocal_k_of_the_authors_and_their_layout():
    from manlearn.rules.auglocal import auglocal_split, authors_k

    split = auglocal_split(15, 2)  # ResNet-32: 15 residual units
    learner = LocalLearner("resnet32", method="auglocal", K=14, split=split, image_size=8, num_classes=4)
    assert learner.K == 14 and authors_k(learner.K, 2) == 16 and learner.rule.authors_k(14) == 16
    assert len(learner.blocks[-1]) == 3  # the last d+1 = 3 units in the final piece


def test_auglocal_aux_is_fresh_units_following_the_later_widths():
    from manlearn.rules.auglocal import auglocal_split

    torch.manual_seed(0)
    learner = LocalLearner("resnet32", method="auglocal", K=14, split=auglocal_split(15, 2), image_size=16,
                           num_classes=4)
    units = list(learner.blocks[0]) + [u for b in learner.blocks[1:] for u in b]  # stem, then units 1..15
    stem_aux = learner.auxes[0]  # stem = unit 0 -> follows units 8 (32 channels) and 15 (64 channels)
    assert len(stem_aux.units) == 2 and isinstance(stem_aux.norm, nn.Identity)  # BN1d only when d <= 1
    x = torch.randn(2, 16, 16, 16)
    with torch.no_grad():
        mid = stem_aux.units[0].eval()(x)
        assert mid.shape == (2, 32, 8, 8)  # stride 2 where the width doubles
        assert stem_aux.units[1].eval()(mid).shape == (2, 64, 4, 4)
    assert stem_aux.fc.in_features == 64 and stem_aux.fc.out_features == 4
    backbone = {id(p) for u in units for p in u.parameters()}
    values = [p for u in units for p in u.parameters() if p.dim() == 4]
    for p in stem_aux.parameters():
        assert id(p) not in backbone and p.requires_grad
        if p.dim() == 4:  # freshly initialised, not a copy of any backbone conv
            assert not any(p.shape == v.shape and torch.equal(p, v) for v in values)
    last_local = learner.auxes[-1]  # unit 12: every later unit (13, 14, 15) since d=2 < 3 -> round
    assert len(last_local.units) == 2
    d1 = LocalLearner("resnet20", method="auglocal", K=3, image_size=16, rule_options={"depth": 1})
    assert all(isinstance(a.norm, nn.BatchNorm1d) and len(a.units) == 1 for a in d1.auxes)


def test_auglocal_pyramid_depth_falls_to_about_half():
    from manlearn.rules.auglocal import pyramid_depth

    assert [pyramid_depth(4, p, 16) for p in (0, 7, 14)] == [4, 3, 2]  # 4 -> (4+1)/2 = 2.5 -> 2
    learner = LocalLearner("resnet20", method="auglocal", K=10, image_size=8,
                           rule_options={"depth": 4, "pyramid": True})
    depths = [len(a.units) for a in learner.auxes]
    assert depths[0] == 4 and depths == sorted(depths, reverse=True) and depths[-1] <= 2
    with pytest.raises(ConfigError, match="depth"):
        LocalLearner("resnet20", method="auglocal", K=3, image_size=8, rule_options={"depth": 0})
