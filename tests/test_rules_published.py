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
