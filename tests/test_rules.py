"""Rule details: InfoPro lambda schedules, heads, SupCon loss, registry."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import manlearn
from manlearn import ConfigError, LocalLearner
from manlearn.rules.heads import DGLHead, InfoProClassifier, supcon_loss
from manlearn.rules.momentum import ema_update_


def test_registry_lists_every_rule():
    assert set(manlearn.list_rules()) >= {"e2e", "greedy", "dgl", "infopro", "infopro-contrast", "man", "manpp", "predsim"}


def lambdas(learner):
    return [(round(a.lambda_x, 6), round(a.lambda_y, 6)) for a in
            (aux.heads if hasattr(aux, "heads") else aux for aux in learner.auxes)]


def test_stage_schedule_uses_the_stage_of_the_next_unit():
    learner = LocalLearner(model="resnet32", method="manpp", base="infopro", K=16, image_size=8)
    got = lambdas(learner)
    # aux i is followed by unit i (stem module): stages 1 x5, 2 x5, 3 x5 -> r = stage / 14; the stem's aux
    # alone gets r = 0 (the authors' code hard-codes it): λ = (5, 0.5), not 13/14 of it
    want = [(5.0, 0.5)] + [(5 * (1 - s / 14), 0.5 * (1 - s / 14)) for s in [1] * 4 + [2] * 5 + [3] * 5]
    assert got == [(round(a, 6), round(b, 6)) for a, b in want]
    assert lambdas(LocalLearner(model="resnet32", method="manpp", base="infopro", K=16, image_size=8,
                                lambda_schedule="stage")) == got  # auto is stage at K >= 6


def test_module_schedule_is_refused_when_it_silences_the_last_local_block():
    """InfoPro's module schedule gives its last local block λ = (0, 0): refused unless the final weights
    are non-zero; with them, r = i/(K-2)."""
    with pytest.raises(manlearn.ConfigError, match="local block 6 of K=8"):
        LocalLearner(model="resnet32", method="infopro", K=8, stem_module=False, image_size=8,
                     lambda_schedule="module")
    learner = LocalLearner(model="resnet32", method="infopro", K=8, stem_module=False, image_size=8,
                           lambda_schedule="module", lambdas=(5.0, 0.5, 1.0, 0.1))
    assert [g[0] for g in lambdas(learner)] == [round(5 * (1 - i / 6) + 1.0 * i / 6, 6) for i in range(7)]


@pytest.mark.parametrize("K", [3, 4, 5])
def test_small_k_default_leaves_no_block_silent_and_explicit_stage_is_refused(K):
    """At K < 6 the authors' stage schedule reaches r = 1 before the last local block (at K=4 two of
    three local blocks never learn): the default is then 'linear' (r = i/(K-1)), and an explicit 'stage'
    that silences a block is refused."""
    learner = LocalLearner(model="resnet20", method="infopro", K=K, image_size=8)
    got = lambdas(learner)
    assert all(a > 0 and b > 0 for a, b in got)
    assert got == [(round(5 * (1 - i / (K - 1)), 6), round(0.5 * (1 - i / (K - 1)), 6)) for i in range(K - 1)]
    with pytest.raises(manlearn.ConfigError, match=r"λ = \(0, 0\)"):
        LocalLearner(model="resnet20", method="infopro", K=K, image_size=8, lambda_schedule="stage")
    two = LocalLearner(model="resnet20", method="infopro", K=2, image_size=8, lambda_schedule="stage")
    assert lambdas(two) == [(5.0, 0.5)]


def test_infopro_classifier_widths_follow_the_table():
    for c, width, stride in [(16, 32, 2), (32, 64, 2), (64, 64, 1)]:
        head = InfoProClassifier(c, 10, "2c2f")
        conv = head.features[0]
        assert conv.out_channels == width and conv.stride == (stride, stride)
        assert head(torch.randn(2, c, 8, 8)).shape == (2, 10)
    assert sum(isinstance(m, nn.Conv2d) for m in InfoProClassifier(16, 10, "1c2f").modules()) == 1


def test_dgl_head_structure():
    head = DGLHead(32, 10)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [c.kernel_size for c in convs] == [(1, 1)] * 3 and all(c.out_channels == 128 for c in convs)
    assert [(l.in_features, l.out_features) for l in linears] == [(128, 512), (512, 512), (512, 512), (512, 10)]
    assert head(torch.randn(3, 32, 16, 16)).shape == (3, 10)


def naive_supcon(z, y, t):
    n, total, count = len(y), 0.0, 0
    for i in range(n):
        pos = [j for j in range(n) if j != i and y[j] == y[i]]
        if not pos:
            continue
        denom = torch.logsumexp(torch.stack([z[i] @ z[k] / t for k in range(n) if k != i]), 0)
        total = total + sum(-(z[i] @ z[j] / t - denom) for j in pos) / len(pos)
        count += 1
    return total / count


def test_supcon_matches_the_definition():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(7, 5), dim=1)
    y = torch.tensor([0, 1, 0, 2, 1, 0, 3])  # class 2 and 3 have no positive
    torch.testing.assert_close(supcon_loss(z, y, 0.07), naive_supcon(z, y, 0.07), rtol=1e-5, atol=1e-5)


def test_ema_update_function_is_the_formula():
    torch.manual_seed(0)
    ema = [torch.randn(3, 3), torch.randn(4)]
    src = [torch.randn(3, 3), torch.randn(4)]
    want = [0.7 * e + 0.3 * s for e, s in zip(ema, src)]
    ema_update_(ema, src, 0.7)
    for a, b in zip(ema, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("c,s,image", [(32, 16, 32), (64, 8, 32), (8, 5, 17), (4, 7, 9)])
def test_factorized_decoder_is_upsample_then_conv(c, s, image):
    """InfoPro's decoder computes conv3x3(upsample(h)) without the upsampled tensor: same function
    and gradients (float64, to rounding), and it keeps less alive for backward."""
    from manlearn.memory import SavedTensorTracker
    from manlearn.rules.heads import InfoProDecoder

    torch.manual_seed(0)
    dec = InfoProDecoder(c, image).double()
    h = torch.randn(3, c, s, s, dtype=torch.float64, requires_grad=True)
    results, saved = [], []
    for factorized in (True, False):
        dec.factorized = factorized
        with SavedTensorTracker([*dec.parameters(), *dec.buffers(), h]) as tr:
            out = dec(h)
            saved.append(tr.live)
        results.append((out, *torch.autograd.grad(out.square().sum(), [h, *dec.parameters()])))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert saved[0] < saved[1]


def test_dgl_mlp_sr_head_is_dgls_own():
    """DGL's own head (Belilovsky et al., MLP-SR): pool to ceil(H/4), 3 x 1x1 conv C->C without bias,
    pool 2x2, 3 x Linear(4C, 4C)+BN1d, Linear to classes."""
    from manlearn.rules.heads import DGLMLPSRHead

    head = DGLMLPSRHead(16, 10)
    convs = [m for m in head.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.bias) for c in convs] == [(16, 16, (1, 1), None)] * 3
    assert [(l.in_features, l.out_features) for l in linears] == [(64, 64)] * 3 + [(64, 10)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.modules()) == 3
    assert head(torch.randn(3, 16, 32, 32)).shape == (3, 10)
    assert head(torch.randn(3, 16, 3, 3)).shape == (3, 10)  # ceil(3/4) = 1, then 2x2
    learner = LocalLearner("resnet20", method="dgl", K=3, image_size=16, **{"head": "mlp-sr"})
    assert isinstance(learner.auxes[0].head, DGLMLPSRHead)
    assert isinstance(LocalLearner("resnet20", method="dgl", K=3, image_size=16).auxes[0].head, DGLHead)
    with pytest.raises(manlearn.ConfigError, match="mlp-sr"):
        LocalLearner("resnet20", method="dgl", K=3, image_size=16, **{"head": "mlp"})


def test_dgl_summary_names_its_heads():
    from manlearn.listing import methods_table

    text = methods_table()
    assert "mlp-sr" in text and "manpp" in text


def test_manpp_diagnostics_follow_s_and_the_drift_of_lb_from_ema():
    """The step records carry each block's s and lb/ema distances: they start at s=1 and 0 (lb and ema
    are copies of the next block) and move once a step has been taken."""
    torch.manual_seed(0)
    learner = LocalLearner("resnet20", method="manpp", base="dgl", K=3, num_classes=4)
    d0 = learner.diagnostics()
    assert set(d0) == {f"{k}/{i}" for k in ("s", "lb_vs_ema", "ema_vs_next") for i in range(2)}
    assert d0["s/0"] == 1.0 and d0["lb_vs_ema/0"] == 0.0 and d0["ema_vs_next/1"] == 0.0
    opt = torch.optim.SGD(learner.parameters(), lr=0.1)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    for _ in range(2):
        learner.train_step(x, y)
        opt.step()
    d1 = learner.diagnostics()
    assert d1["s/0"] != 1.0 and d1["lb_vs_ema/0"] > 0 and d1["ema_vs_next/0"] > 0
    assert float(learner.auxes[0].scale.detach()) == d1["s/0"]
    assert LocalLearner("resnet20", method="dgl", K=3, num_classes=4).diagnostics() == {}


def test_heads_of_is_the_part_that_sees_fused_features():
    from manlearn import LocalLearner
    from manlearn.models import create_model
    from manlearn.rules import MomentumAux, heads_of

    for method, momentum in (("manpp", True), ("dgl", False)):
        learner = LocalLearner(create_model("resnet32", num_classes=10), method=method, K=4, num_classes=10,
                               image_size=32)
        aux = learner.auxes[0]
        assert isinstance(aux, MomentumAux) is momentum
        assert heads_of(aux) is (aux.heads if momentum else aux)


def test_infopro_weights_and_temperature_are_checked_at_build():
    """String weights were a ValueError from float(); negative ones trained by ascending their loss; a zero
    temperature was reported as a divergence ("lower lr")."""
    for bad in (("a", "b", "c", "d"), (-5, -0.5, 0, 0), (5, float("nan"), 0, 0), (5, 0.5, 0), (True, 0, 0, 0)):
        with pytest.raises(ConfigError, match=r"^lambdas must be 4 finite numbers >= 0"):
            LocalLearner("resnet20", method="infopro", K=3, lambdas=bad)
    for bad in (0, -1, float("inf")):  # ("0.1", a str, is refused by the option types)
        with pytest.raises(ConfigError, match=r"^temperature \(InfoPro's contrastive loss\) must be a finite number > 0"):
            LocalLearner("resnet20", method="infopro-contrast", K=3, temperature=bad)
    learner = LocalLearner("resnet20", method="infopro-contrast", K=3, lambdas=(5, 0, 0, 1), temperature=0.5)
    assert learner.rule.lambdas == (5.0, 0.0, 0.0, 1.0) and learner.rule.temperature == 0.5
