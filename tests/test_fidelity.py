"""The authors' MAN++ computation (SPEC 2.3) as one switch and as separate options, and losses in the
input's precision."""
from __future__ import annotations

import math

import pytest
import torch
from invariants import assert_block_grads_are_their_local_loss_grads
from torch import nn

from manlearn import ConfigError, LocalLearner
from manlearn.rules import LocalBatch
from manlearn.rules.heads import InfoProClassifier, supcon_loss


def test_supcon_over_all_anchors_differs_by_the_share_of_anchors_with_a_positive():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(7, 5, dtype=torch.float64), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # 5 of 7 anchors have a positive
    positive = supcon_loss(z, y, 0.07)
    torch.testing.assert_close(supcon_loss(z, y, 0.07, anchors="all"), positive * 5 / 7, rtol=1e-12, atol=1e-12)


def test_fidelity_authors_sets_each_item():
    torch.manual_seed(0)
    ours = LocalLearner("resnet32", method="manpp", base="infopro", K=16, image_size=16)
    theirs = LocalLearner("resnet32", method="manpp", base="infopro", K=16, image_size=16, fidelity="authors")
    stem, other = theirs.auxes[0].heads, theirs.auxes[1].heads
    # the stem's classifier: 1c2f, 128-d, SupCon over all anchors; every other block: 2c2f + CE
    assert stem.contrast and stem.supcon_anchors == "all" and isinstance(stem.classifier, InfoProClassifier)
    assert sum(isinstance(m, nn.Conv2d) for m in stem.classifier.modules()) == 1
    assert stem.classifier.fc[-1].out_features == 128
    assert not other.contrast and sum(isinstance(m, nn.Conv2d) for m in other.classifier.modules()) == 2
    assert not ours.auxes[0].heads.contrast
    # stem λ = (5, 0.5) under the stage schedule, in both
    assert (stem.lambda_x, stem.lambda_y) == (5.0, 0.5) == (ours.auxes[0].heads.lambda_x, ours.auxes[0].heads.lambda_y)
    # every conv re-initialised N(0, sqrt(2/(k k C_out))), every BN 1/0: ema/lb are no longer copies
    for aux in theirs.auxes:
        assert any(not torch.equal(a, b) for a, b in zip(aux.ema.parameters(), aux.source.parameters()))
        assert any(not torch.equal(a, b) for a, b in zip(aux.ema.parameters(), aux.lb.parameters()))
    for name, m in theirs.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            assert bool((m.weight == 1).all() and (m.bias == 0).all()), name
        if isinstance(m, nn.Conv2d) and m.weight.numel() >= 2000:
            want = math.sqrt(2.0 / (m.kernel_size[0] * m.kernel_size[1] * m.out_channels))
            assert abs(m.weight.std().item() / want - 1) < 0.15, name
    # decoders too (their default init is kaiming-uniform: a different scale)
    dec = theirs.auxes[5].heads.decoder.conv1
    assert abs(dec.weight.std().item() / math.sqrt(2.0 / (9 * 12)) - 1) < 0.15


def test_each_authors_item_is_its_own_option():
    alone = LocalLearner("resnet20", method="manpp", base="infopro", K=10, image_size=16, authors_init=True)
    assert not alone.auxes[0].heads.contrast
    head = LocalLearner("resnet20", method="manpp", base="infopro", K=10, image_size=16,
                        **{"authors_stem_head": True})
    assert head.auxes[0].heads.contrast and not head.auxes[1].heads.contrast
    assert head.auxes[0].heads.supcon_anchors == "positive"
    anchors = LocalLearner("resnet20", method="infopro-contrast", K=10, image_size=16,
                           **{"supcon_anchors": "all"})
    assert all(a.supcon_anchors == "all" for a in anchors.auxes)
    with pytest.raises(ConfigError, match="fidelity"):
        LocalLearner("resnet20", method="manpp", K=10, image_size=16, fidelity="exact")
    with pytest.raises(ConfigError, match="supcon_anchors"):
        LocalLearner("resnet20", method="infopro-contrast", K=10, image_size=16, **{"supcon_anchors": "x"})


@pytest.mark.parametrize("method,base", [("infopro", None), ("infopro-contrast", None), ("dgl", None),
                                         ("greedy", None), ("predsim", None), ("auglocal", None),
                                         ("hpff", "infopro"), ("manpp", "infopro"), ("manpp", "dgl")])
def test_losses_are_float64_when_the_input_is(method, base):
    """No downcast anywhere: a float64 learner computes every local loss in float64 (so a one-step
    comparison can hold to 1e-12)."""
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method=method, base=base, K=4, image_size=16, num_classes=3).double()
    x = torch.rand(4, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    out = learner.train_step(x, y)
    assert out.loss_values.dtype == torch.float64
    batch, inp = LocalBatch(x, y, learner.norm_mean, learner.norm_std), x
    assert batch.image01.dtype == torch.float64
    for k in range(learner.K - 1):
        batch.block_inputs[k] = inp
        with torch.no_grad():
            inp = learner.blocks[k](inp)
            assert learner.auxes[k](inp, batch).dtype == torch.float64


@pytest.mark.parametrize("method", ["infopro", "infopro-contrast"])
def test_infopro_loss_in_float64_matches_the_definition_to_1e12(method):
    import torch.nn.functional as F

    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method=method, K=4, image_size=16, num_classes=3).double()
    x = torch.rand(6, 3, 16, 16, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    aux = learner.auxes[1]
    with torch.no_grad():
        h = learner.blocks[1](learner.blocks[0](x))
        image = (x * 0.5 + 0.5).clamp(0, 1)
        loss_x = F.binary_cross_entropy_with_logits(aux.decoder(h, (16, 16)), image)
        out = aux.classifier(h)
        loss_y = supcon_loss(F.normalize(out, dim=1), y, 0.07) if aux.contrast else F.cross_entropy(out, y)
        want = aux.lambda_x * loss_x + aux.lambda_y * loss_y
        got = aux(h, LocalBatch(x, y, learner.norm_mean, learner.norm_std))
    assert got.dtype == torch.float64
    assert abs(got.item() - want.item()) < 1e-12


@pytest.mark.parametrize("base", ["infopro", "dgl"])
def test_fidelity_authors_trains_in_float64_with_isolated_blocks(base):
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="manpp", base=base, K=10, image_size=16, num_classes=3,
                           fidelity="authors").double()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    assert_block_grads_are_their_local_loss_grads(learner, x, y, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match=r"λ = \(0, 0\)"):  # the authors' stage schedule at K < 6 is refused
        LocalLearner("resnet20", method="manpp", base="infopro", K=4, image_size=16, fidelity="authors")
