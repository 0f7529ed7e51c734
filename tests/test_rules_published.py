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
    for size in (24, 8):  # its pred heads are sized for 16x16 maps: another size was a matmul error inside
        with pytest.raises(ConfigError, match=r"built for inputs \[B, 3, 16, 16\] \(the rule's auxiliary heads"):
            learner.train_step(torch.randn(4, 3, size, size), torch.tensor([0, 1, 2, 3]))
    man = LocalLearner("resnet20", method="man", base="predsim", K=3, image_size=16, num_classes=4)
    with pytest.raises(ConfigError, match=r"built for inputs \[B, 3, 16, 16\]"):  # a modifier's base heads too
        man.train_step(torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 2, 3]))
    assert LocalLearner("resnet20", method="dgl", K=3, image_size=16).train_step(  # other rules: any size
        torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 2, 3])).logits.shape == (4, 10)
    with pytest.raises(ConfigError, match="per-block"):
        LocalLearner("resnet20", method="predsim", K=3, image_size=16, **{"optimizer": "adam"})
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
    d1 = LocalLearner("resnet20", method="auglocal", K=3, image_size=16, **{"depth": 1})
    assert all(isinstance(a.norm, nn.BatchNorm1d) and len(a.units) == 1 for a in d1.auxes)


def test_auglocal_pyramid_depth_falls_to_about_half():
    from manlearn.rules.auglocal import pyramid_depth

    assert [pyramid_depth(4, p, 16) for p in (0, 7, 14)] == [4, 3, 2]  # 4 -> (4+1)/2 = 2.5 -> 2
    learner = LocalLearner("resnet20", method="auglocal", K=10, image_size=8,
                           **{"depth": 4, "pyramid": True})
    depths = [len(a.units) for a in learner.auxes]
    assert depths[0] == 4 and depths == sorted(depths, reverse=True) and depths[-1] <= 2
    with pytest.raises(ConfigError, match="depth"):
        LocalLearner("resnet20", method="auglocal", K=3, image_size=8, **{"depth": 0})


# ----------------------------------------------------------------------------------------- HPFF
def _hpff(base: str = "dgl", K: int = 4, **kwargs) -> LocalLearner:
    torch.manual_seed(0)
    return LocalLearner("resnet20", method="hpff", base=base, K=K, image_size=16, num_classes=3, **kwargs).double()


@pytest.mark.parametrize("base", ["dgl", "infopro"])
def test_hpff_block_loss_reaches_the_block_before_and_never_further(base):
    """The invariant of HPFF's window, exactly: local block i's loss sends gradient to block i and block
    i-1, to no block before i-1; the final block's loss only to itself. (Non-zero final InfoPro weights,
    so that the last local block's window loss is not zero by its λ.)"""
    learner = _hpff(base, K=5, **({"lambdas": (5.0, 0.5, 1.0, 0.1)} if base == "infopro" else {}))
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 0])
    batch, inp = LocalBatch(x, y, learner.norm_mean, learner.norm_std), x
    for k in range(learner.K):
        batch.block_inputs[k] = inp.detach()
        h = learner.blocks[k](inp.detach())
        loss = learner.auxes[k](h, batch) if k < learner.K - 1 else learner.task.loss(learner.head(h), y, (16, 16))
        for j in range(k + 1):
            grads = torch.autograd.grad(loss, list(learner.blocks[j].parameters()), retain_graph=True,
                                        allow_unused=True)
            reached = any(g is not None and g.abs().sum() > 0 for g in grads)
            assert reached == (j == k or (j == k - 1 and k < learner.K - 1)), (k, j)
        inp = h


def test_hpff_loss_is_0001_own_ce_plus_0999_base_on_the_window():
    learner = _hpff("dgl", K=4)
    learner.eval()  # BN on running statistics: re-running a block gives the same output
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    batch = LocalBatch(x, y)
    x0 = x
    h0 = learner.blocks[0](x0)
    h1 = learner.blocks[1](h0)
    batch.block_inputs.update({0: x0, 1: h0})
    aux = learner.auxes[1]
    window = learner.blocks[1](learner.blocks[0](x0))
    want = 0.001 * F.cross_entropy(aux.base.head(h1), y) + 0.999 * F.cross_entropy(aux.base.head(window), y)
    torch.testing.assert_close(aux(h1, batch), want, rtol=1e-12, atol=1e-12)
    assert aux.window_output(h1, batch) is not h1 and torch.allclose(aux.window_output(h1, batch), h1)
    with pytest.raises(ConfigError, match="block_inputs"):
        aux(h1, LocalBatch(x, y))
    assert isinstance(learner.auxes[0].base, nn.Module) and learner.reaches_back == 1
    assert sum(p.numel() for p in learner.parameters()) == sum(p.numel() for p in _hpff("dgl", K=4).parameters())


def test_hpff_patch_fusion_decoder_sums_four_quadrant_bces():
    from manlearn.rules.hpff import PatchFusionDecoder

    torch.manual_seed(0)
    dec = PatchFusionDecoder(8, 3).double()
    h = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    x = torch.rand(2, 3, 16, 16, dtype=torch.float64)
    batch = LocalBatch(x, torch.tensor([0, 1]), torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    want = 0.0
    for q, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        feat = h[:, :, 2 * r:2 * r + 2, 2 * c:2 * c + 2]
        up = F.interpolate(feat, size=(8, 8), mode="bilinear", align_corners=True)  # half the image
        target = x[:, :, 8 * r:8 * r + 8, 8 * c:8 * c + 8]
        want = want + F.binary_cross_entropy(torch.sigmoid(dec.patches[q](up)), target)
    torch.testing.assert_close(dec.reconstruction_loss(h, batch), want, rtol=1e-10, atol=1e-10)
    learner = _hpff("infopro", K=4)
    assert all(isinstance(a.base.decoder, PatchFusionDecoder) for a in learner.auxes)
    # λ over the module index; the last local block keeps its own-output CE term
    assert [round(a.base.lambda_x, 6) for a in learner.auxes] == [5.0, 2.5, 0.0]


def test_hpff_reports_a_block_done_only_when_no_later_loss_reaches_it():
    learner = _hpff("dgl", K=4)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    seen: dict[int, list[torch.Tensor]] = {}

    def done(k: int) -> None:
        seen[k] = [p.grad.clone() for p in learner.blocks[k].parameters()]

    learner.train_step(x, torch.tensor([0, 1, 2, 0]), after_block=done)
    assert sorted(seen) == [0, 1, 2, 3]
    for k, grads in seen.items():
        for p, g in zip(learner.blocks[k].parameters(), grads):
            torch.testing.assert_close(p.grad, g)
    with pytest.raises(ConfigError, match="greedy"):
        LocalLearner("resnet20", method="hpff", base="greedy", K=3, image_size=16)


def _per_block(**options) -> LocalLearner:
    torch.manual_seed(0)
    return LocalLearner("resnet20", method="predsim", K=3, image_size=16, num_classes=3,
                        optimizer="per-block", **options).double()


def test_predsim_per_block_adam_steps_inside_the_step_and_leaves_the_rest_to_the_run():
    """The original variant: each local block and its heads take one Adam step of their own loss inside
    train_step (their gradients are then cleared); the last piece keeps its gradient for the run's
    optimiser."""
    import copy

    learner = _per_block(block_lr=1e-2)
    ref = copy.deepcopy(learner)
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    learner.train_step(x, y)
    batch, inp = LocalBatch(x, y), x
    for k in range(ref.K - 1):
        h = ref.blocks[k](inp)
        params = ref.auxes[k].trained_parameters()
        opt = torch.optim.Adam(params, lr=1e-2)
        opt.zero_grad()
        ref.auxes[k](h, batch).backward()
        opt.step()
        inp = h.detach()
        for mine, want in zip(learner.auxes[k].trained_parameters(), params):
            torch.testing.assert_close(mine, want, rtol=1e-12, atol=1e-12)
            assert mine.grad is None
    assert all(p.grad is not None for p in learner.blocks[-1].parameters())
    assert learner.auxes[0].steps == 1


def test_predsim_per_block_state_resumes_exactly_and_decays_at_milestones():
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    one = _per_block(block_lr_milestones=(2,), block_lr_decay=0.5)
    for _ in range(2):
        one.train_step(x, y)
    assert one.auxes[0].block_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    two = _per_block(block_lr_milestones=(2,), block_lr_decay=0.5)
    two.load_state_dict(one.state_dict())
    assert two.auxes[0].steps == 2 and two.auxes[0].block_optimizer.param_groups[0]["lr"] == pytest.approx(2.5e-4)
    one.train_step(x, y)
    two.train_step(x, y)
    for a, b in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_predsim_vgg_backbones_follow_the_original_configs():
    for name, widths in [("vgg8b", [128, 256, 256, 512, 512, 512]),
                         ("vgg11b", [128, 128, 128, 256, 256, 512, 512, 512, 512])]:
        model = manlearn.create_model(name, num_classes=10)
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == widths and all(c.kernel_size == (3, 3) for c in convs)
        assert sum(isinstance(m, nn.MaxPool2d) for m in model.modules()) == 4
        linears = [m for m in model.head.modules() if isinstance(m, nn.Linear)]
        assert [(l.in_features, l.out_features) for l in linears] == [(512 * 2 * 2, 1024), (1024, 10)]
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    learner = LocalLearner("vgg8b", method="predsim", K=6, num_classes=10, image_size=32,
                           **{"feature_budget": 2048})
    assert learner.auxes[0].pred.in_features <= 2048
    with pytest.raises(ConfigError, match="image_size"):
        manlearn.create_model("vgg8b", image_size=8)
