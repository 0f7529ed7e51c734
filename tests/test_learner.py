"""Invariants of LocalLearner, parametrised over registered models x rules (timm style)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manlearn
from invariants import rule_kw
from manlearn import ConfigError, LocalLearner
from manlearn.rules import LocalBatch

from invariants import (assert_block_grads_are_their_local_loss_grads, assert_ema_is_m_old_plus_one_minus_m_source,
                        assert_no_gradient_crosses_a_block_boundary, perturb_ema_and_snapshot)

# (method, base) pairs covering every rule and both MAN bases.
METHODS = [("greedy", None), ("dgl", None), ("infopro", None), ("infopro-contrast", None),
           ("man", "dgl"), ("man", "infopro"), ("manpp", "dgl"), ("manpp", "infopro")]
IDS = [m if b is None else f"{b}+{m}" for m, b in METHODS]


def make(method="manpp", base="infopro", model="resnet20", K=4, seed=0, **kw) -> LocalLearner:
    torch.manual_seed(seed)
    kw.setdefault("image_size", 16)
    return LocalLearner(model=model, method=method, K=K, num_classes=3, **rule_kw(method, base or "infopro"), **kw)


def grads_of(module: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}


@pytest.mark.parametrize("method,base", METHODS, ids=IDS)
def test_every_trainable_param_gets_a_gradient_and_ema_none(method, base, batch):
    learner = make(method, base)
    learner.train_step(*batch)
    for name, p in learner.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} received no gradient"
            assert torch.isfinite(p.grad).all(), name
        else:
            assert ".ema." in name and p.grad is None, f"frozen {name} must be an ema parameter without grad"


@pytest.mark.parametrize("method,base", METHODS, ids=IDS)
@pytest.mark.parametrize("stem_module", [True, False])
def test_no_gradient_crosses_a_block_boundary(method, base, stem_module, batch):
    """Block k's gradients do not change when any later block / aux / head changes."""
    assert_no_gradient_crosses_a_block_boundary(make(method, base, K=4, stem_module=stem_module), *batch)


@pytest.mark.parametrize("method,base", METHODS, ids=IDS)
def test_block_gradients_equal_those_of_its_own_local_loss(method, base, batch):
    assert_block_grads_are_their_local_loss_grads(make(method, base, K=4), *batch)


def test_infopro_loss_is_lambda_weighted_bce_plus_ce(batch):
    """The InfoPro local loss is exactly λ1·BCE(decoder, image in [0,1]) + λ2·CE(classifier, y)."""
    x, y = batch
    learner = make("infopro", K=4, normalization=((0.4, 0.5, 0.6), (0.2, 0.25, 0.3)))
    aux = learner.auxes[0]
    h = learner.blocks[0](x)
    img = (x * learner.norm_std + learner.norm_mean).clamp(0, 1)
    bce = F.binary_cross_entropy(torch.sigmoid(aux.decoder(h)), img)
    ce = F.cross_entropy(aux.classifier(h), y)
    want = aux.lambda_x * bce + aux.lambda_y * ce
    got = aux(h, LocalBatch(x, y, learner.norm_mean, learner.norm_std))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method,base", [("manpp", "infopro"), ("man", "dgl")])
@pytest.mark.parametrize("m", [0.9, 0.995])
def test_ema_update_is_exactly_m_ema_plus_one_minus_m_source(method, base, m, batch):
    learner = make(method, base, K=4, momentum=m)
    before = perturb_ema_and_snapshot(learner)
    learner.train_step(*batch)
    assert_ema_is_m_old_plus_one_minus_m_source(learner, before, m)
    for aux, (old, _) in zip(learner.auxes, before):
        assert all(not torch.equal(p, o) for p, o in zip(aux.ema.parameters(), old))
        # BN running statistics of ema come from its own forwards, not from the source
        ema_bn = [b for n, b in aux.ema.named_buffers() if "running_mean" in n]
        src_bn = [b for n, b in aux.source.named_buffers() if "running_mean" in n]
        assert all(not torch.equal(e, s) for e, s in zip(ema_bn, src_bn))


def test_ema_momentum_bounds(batch):
    frozen = make("manpp", K=3, momentum=1.0)
    before = [p.clone() for p in frozen.auxes[0].ema.parameters()]
    frozen.train_step(*batch)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.auxes[0].ema.parameters()))
    copying = make("manpp", K=3, momentum=0.0)
    with torch.no_grad():
        for p in copying.auxes[0].ema.parameters():
            p.add_(1.0)
    copying.train_step(*batch)
    assert all(torch.equal(a, b) for a, b in zip(copying.auxes[0].ema.parameters(),
                                                   copying.auxes[0].source.parameters()))
    for bad in (1.5, -0.1, "0.9", True):
        with pytest.raises(ConfigError, match="momentum"):
            make("manpp", K=3, momentum=bad)
    with pytest.raises(ConfigError, match="momentum"):
        frozen.momentum = 2.0


@pytest.mark.parametrize("model", ["resnet20", "resnet32"])
@pytest.mark.parametrize("method", ["e2e", "dgl", "manpp"])
def test_single_block_is_plain_backprop(model, method, batch):
    """e2e (any K) and K=1 (any method) give exactly the gradients of plain backprop."""
    x, y = batch
    learner = make(method, "infopro", model=model, K=1 if method != "e2e" else 16)
    assert learner.K == 1 and len(learner.auxes) == 0
    torch.manual_seed(0)
    net = manlearn.create_model(model, num_classes=3, in_channels=3)
    for (n1, p1), (n2, p2) in zip(learner.state_dict().items(), net.state_dict().items()):
        assert torch.equal(p1, p2), (n1, n2)
    out = learner.train_step(x, y)
    F.cross_entropy(net(x), y).backward()
    lp = [p for b in learner.blocks for p in b.parameters()] + list(learner.head.parameters())
    npar = list(net.stem.parameters()) + list(net.units.parameters()) + list(net.head.parameters())
    assert len(lp) == len(npar)
    for a, b in zip(lp, npar):
        assert torch.equal(a.grad, b.grad)
    assert out.losses == [pytest.approx(F.cross_entropy(out.logits, y).item(), rel=1e-6)]


def test_manpp_fusion_and_scale(batch):
    x, y = batch
    learner = make("manpp", "dgl", K=3)
    aux = learner.auxes[0]
    assert isinstance(aux.scale, nn.Parameter) and aux.scale.dim() == 0 and aux.scale.item() == 1.0
    h = learner.blocks[0](x).detach()
    learner.eval()
    with torch.no_grad():
        aux.scale.fill_(0.3)
        got = aux.fuse(h)
        want = 0.3 * aux.lb(h) + (2 - 0.3) * aux.ema(h)
    torch.testing.assert_close(got, want)
    learner.train()
    with torch.no_grad():
        aux.scale.fill_(1.0)
    learner.train_step(x, y)
    # with init="copy", lb and ema are identical at first, so d loss / d s = <g, lb(h) - ema(h)> = 0
    assert aux.scale.grad is not None and aux.scale.grad.item() == 0.0
    with torch.no_grad():  # once lb has moved (as after an optimiser step), s receives a real gradient
        for p in aux.lb.parameters():
            p.add_(0.01 * torch.randn_like(p))
    learner.train_step(x, y)
    assert aux.scale.grad is not None and aux.scale.grad.abs().item() > 0
    assert any(p is aux.scale for p in learner.parameters())


def test_man_is_unscaled_sum(batch):
    x, _ = batch
    learner = make("man", "infopro", K=3).eval()
    aux = learner.auxes[0]
    assert aux.scale is None
    assert not any("scale" in n for n, _ in learner.named_parameters())
    h = learner.blocks[0](x).detach()
    with torch.no_grad():
        torch.testing.assert_close(aux.fuse(h), aux.lb(h) + aux.ema(h))


def test_ema_tracks_first_unit_of_next_block():
    learner = make("manpp", "infopro", K=4, stem_module=True)
    for i, aux in enumerate(learner.auxes):
        first_next = learner.blocks[i + 1][0]
        assert aux.source is first_next
        assert not any(aux.source is m for m in aux.modules())  # not owned twice
    # state_dict has no duplicated backbone weights under auxes
    assert not any(k.startswith("auxes.") and ".source" in k for k in learner.state_dict())


def test_init_copy_and_random():
    copied = make("manpp", K=3, init="copy")
    aux = copied.auxes[0]
    for e, l, s in zip(aux.ema.parameters(), aux.lb.parameters(), aux.source.parameters()):
        assert torch.equal(e, s) and torch.equal(l, s) and l is not s
    rand = make("manpp", K=3, init="random")
    aux = rand.auxes[0]
    convs = [(e, s) for (n, e), s in zip(aux.ema.named_parameters(), aux.source.parameters()) if "conv" in n]
    assert convs and all(not torch.equal(e, s) for e, s in convs)
    with pytest.raises(ConfigError, match="init"):
        make("manpp", K=3, init="zeros")


def test_inference_uses_backbone_and_head_only(batch):
    x, _ = batch
    learner = make("manpp", K=4).eval()
    with torch.no_grad():
        h = x
        for b in learner.blocks:
            h = b(h)
        want = learner.head(h)
        with torch.no_grad():
            for aux in learner.auxes:  # auxes must not matter at inference
                for p in aux.parameters():
                    p.add_(1.0)
        got = learner(x)
    torch.testing.assert_close(got, want)


def test_losses_one_float_per_block(batch):
    learner = make("infopro", K=5)
    out = learner.train_step(*batch)
    assert len(out.losses) == learner.K == 5 and all(isinstance(v, float) for v in out.losses)
    assert out.logits.shape == (6, 3) and not out.logits.requires_grad


def test_train_step_does_not_step_and_zeroes_grads(batch):
    learner = make("dgl", K=3)
    before = {k: v.clone() for k, v in learner.state_dict().items() if "running" not in k and "num_batches" not in k}
    learner.train_step(*batch)
    g1 = next(learner.blocks[0].parameters()).grad.clone()
    learner.train_step(*batch)
    for k, v in learner.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k]), f"{k} changed: train_step must not step an optimiser"
    g2 = next(learner.blocks[0].parameters()).grad
    assert not torch.allclose(g2, 2 * g1)  # not accumulated (BN running stats differ, batch the same)
    torch.testing.assert_close(g2, g1, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method,base", [("manpp", "infopro"), ("dgl", None)])
def test_channels_last_matches(method, base, batch):
    a = make(method, base, K=4)
    b = make(method, base, K=4, channels_last=True)
    oa, ob = a.train_step(*batch), b.train_step(*batch)
    torch.testing.assert_close(oa.logits, ob.logits, rtol=1e-4, atol=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-4)


# The small-input models; the ImageNet ResNets and ViTs get the same checks at reduced width in
# tests/test_imagenet_models.py and tests/test_vit.py (full-width ones would make this sweep slow).
@pytest.mark.parametrize("model", manlearn.list_models(tag="cifar"))
def test_every_model_trains_with_manpp_and_blocks_stay_isolated(model):
    torch.manual_seed(0)
    learner = LocalLearner(model=model, method="manpp", base="dgl", K=3, num_classes=4, in_channels=1,
                           image_size=8)
    other = copy.deepcopy(learner)
    with torch.no_grad():  # change everything after block 0
        for mod in [*other.blocks[1:], *other.auxes[1:], other.head]:
            for p in mod.parameters():
                p.mul_(-1.5)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    out = learner.train_step(x, y)
    other.train_step(x, y)
    assert out.logits.shape == (4, 4) and len(out.losses) == 3
    assert all(torch.isfinite(torch.tensor(out.losses)))
    for a, b in zip([*learner.blocks[0].parameters(), *learner.auxes[0].parameters()],
                    [*other.blocks[0].parameters(), *other.auxes[0].parameters()]):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


def test_unknown_names_are_refused():
    with pytest.raises(ConfigError, match="available models: .*resnet32"):
        LocalLearner(model="resnet33")
    with pytest.raises(ConfigError, match="available methods: .*manpp"):
        LocalLearner(method="man+++")
    with pytest.raises(ConfigError, match="base"):
        LocalLearner(method="manpp", base="e2e")
    with pytest.raises(ConfigError, match="lambda_schedule"):
        LocalLearner(method="infopro", lambda_schedule="epoch")
    with pytest.raises(ConfigError, match="num_classes"):
        LocalLearner(num_classes=0)


class TinyNet(nn.Module):
    """A user's own backbone following the stem/units/head protocol."""

    def __init__(self, with_pool_unit: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        units = [nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()) for _ in range(3)]
        if with_pool_unit:
            units.insert(1, nn.MaxPool2d(2))
        self.units = nn.ModuleList(units)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def test_custom_backbone(batch):
    net = TinyNet()
    learner = LocalLearner(model=net, method="manpp", base="dgl", K=3, num_classes=3, image_size=16)
    assert learner.blocks[1][0] is net.units[0]
    out = learner.train_step(*batch)
    assert len(out.losses) == 3
    with pytest.raises(ConfigError, match="stem"):
        LocalLearner(model=nn.Linear(3, 3), method="dgl", K=2)


def test_man_refuses_a_boundary_before_a_parameterless_unit():
    net = TinyNet(with_pool_unit=True)  # units: conv, pool, conv, conv
    with pytest.raises(ConfigError, match="no parameters"):
        LocalLearner(model=net, method="man", base="dgl", K=2, stem_module=False, split=[1, 4],
                     num_classes=3, image_size=16)
    LocalLearner(model=net, method="dgl", K=2, stem_module=False, split=[1, 4], num_classes=3, image_size=16)


def test_the_documented_public_api():
    """The contract of issue #2, verbatim."""
    learner = manlearn.LocalLearner(model="resnet32", method="manpp", base="infopro", K=16,
                                    num_classes=10, in_channels=3, image_size=32)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([3, 7])
    out = learner.train_step(x, y)
    assert out.logits.shape == (2, 10) and len(out.losses) == 16
    assert isinstance(learner.blocks, nn.ModuleList) and len(learner.blocks) == 16
    assert isinstance(learner.auxes, nn.ModuleList) and len(learner.auxes) == 15
    assert learner.momentum == 0.995
    for i, aux in enumerate(learner.auxes):
        assert aux.source is learner.blocks[i + 1][0]
        assert isinstance(aux.ema, nn.Module) and isinstance(aux.lb, nn.Module)
        assert isinstance(aux.scale, nn.Parameter) and aux.scale.dim() == 0
    learner.eval()
    with torch.no_grad():
        assert learner(x).shape == (2, 10)


def test_compile_parts_keeps_state_dict_and_results(batch):
    """torch.compile'd parts (dynamo capture + AOT autograd of every block, auxiliary network and the
    head) give the eager results, gradients and checkpoint keys. The ``aot_eager`` backend checks what
    compile_parts owns — that every part is captured in place, with the recompile limit raised to fit
    them all (the blocks share one code object) — without Inductor's C++ code generation, which is
    torch's to test and took ~3 minutes here."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = make("manpp", base="dgl", K=3, model="resnet20")
    compiled = copy.deepcopy(eager).compile_parts(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    a, b = eager.train_step(*batch), compiled.train_step(*batch)
    torch.testing.assert_close(a.logits, b.logits)
    assert a.losses == pytest.approx(b.losses, rel=1e-6)
    for (name, pa), pb in zip(eager.named_parameters(), compiled.parameters()):
        assert (pa.grad is None) == (pb.grad is None), name
        if pa.grad is not None:
            torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-6, msg=name)
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert frames >= len(compiled.blocks) + len(compiled.auxes) + 1  # every part was captured


def test_train_step_refuses_inputs_of_another_shape():
    learner = make("infopro", K=3)  # built for 3 channels (any spatial size the backbone accepts)
    with pytest.raises(ConfigError, match=r"images must be \[B, 3, H, W\]"):
        learner.train_step(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    with pytest.raises(ConfigError, match="labels"):
        learner.train_step(torch.randn(2, 3, 16, 16), torch.tensor([0, 1, 2]))
    with pytest.raises(ConfigError, match=r"images must be a torch.Tensor, got numpy.ndarray \(torch.as_tensor"):
        learner.train_step(torch.randn(2, 3, 16, 16).numpy(), torch.tensor([0, 1]))


def test_a_batch_of_one_image_is_one_line_where_batchnorm_needs_two():
    """DGL's BatchNorm1d heads (and any BatchNorm on a 1x1 map) raised torch's ValueError from inside the step."""
    y = torch.tensor([1])
    for method in ("dgl", "manpp"):
        learner = make(method, base="dgl", K=3)
        before = {k: v.clone() for k, v in learner.state_dict().items()}
        with pytest.raises(ConfigError, match=r"^a batch of 1 image .* BatchNorm1d .* drop_last=True"):
            learner.train_step(torch.randn(1, 3, 16, 16), y)
        assert all(torch.equal(v, learner.state_dict()[k]) for k, v in before.items())  # refused before any work
        learner.eval()
        assert learner(torch.randn(1, 3, 16, 16)).shape == (1, 3)  # inference takes one image
    make("infopro", K=3).train_step(torch.randn(1, 3, 16, 16), y)  # no BatchNorm1d: trains
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Sequential(nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1),
                                                          nn.BatchNorm2d(8)), nn.Flatten(), nn.Linear(8, 10))
    with pytest.raises(ConfigError, match=r"BatchNorm layer on a 1x1 map .* \(this step stopped part-way\)$"):
        manlearn.LocalLearner(net, method="greedy", K=2).train_step(torch.randn(1, 3, 16, 16), y)


def test_amp_dtype_takes_the_config_names_and_refuses_others_at_build():
    """'bf16' (the config's spelling) was kept as a string and failed inside autocast at the first step."""
    for name, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                        ("off", None), (torch.bfloat16, torch.bfloat16), (None, None)):
        assert make("dgl", K=2, amp_dtype=name).amp_dtype is dtype
    out = make("dgl", K=2, amp_dtype="bf16").train_step(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    assert len(out.losses) == 2
    for bad in ("bf61", torch.float32, 16):
        with pytest.raises(ConfigError, match=r"^amp_dtype must be torch.bfloat16, torch.float16 or None"):
            make("dgl", K=2, amp_dtype=bad)


@pytest.mark.parametrize("name", manlearn.list_models())
def test_a_misspelt_model_option_is_one_line_with_the_nearest(name):
    """create_model("resnet20", widthz=...) was a TypeError from the builder inside, without the options."""
    with pytest.raises(ConfigError, match=rf"^model '{name}' takes no option 'num_clases' \(did you mean "
                                          r"'num_classes'\?\); its options: .*in_channels"):
        manlearn.create_model(name, num_clases=3)
    if name == "resnet20":
        with pytest.raises(ConfigError, match=r"'widthz' \(did you mean 'widths'\?\)"):
            LocalLearner("resnet20", method="dgl", K=2, model_kwargs=dict(widthz=(8, 8, 16, 32)))
        assert manlearn.create_model(name, widths=(8, 8, 16, 32)).head[-1].in_features == 32


def test_a_class_count_that_contradicts_the_task_and_a_non_bool_stem_module_are_refused():
    """num_classes=100 with a 10-class task built 10 classes silently; stem_module="no" counted as True."""
    from manlearn.tasks import ClassificationTask

    with pytest.raises(ConfigError, match=r"^num_classes=100 but the task has 10 classes"):
        LocalLearner("resnet20", method="dgl", K=2, num_classes=100, task=ClassificationTask(10))
    assert LocalLearner("resnet20", method="dgl", K=2, num_classes=10, task=ClassificationTask(10)).num_classes == 10
    assert LocalLearner("resnet20", method="dgl", K=2, task=ClassificationTask(7)).num_classes == 7
    with pytest.raises(ConfigError, match=r"^stem_module must be True, False or None .* got 'no'"):
        LocalLearner("resnet20", method="dgl", K=2, stem_module="no")
    assert LocalLearner("resnet20", method="dgl", K=2, stem_module=False).split.stem_module is False
