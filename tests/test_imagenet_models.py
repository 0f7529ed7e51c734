"""ImageNet ResNets / ResNeXts x rules: construction, published splits, ImageNet InfoPro heads and the
isolation / EMA / MAN++ invariants of the core (tests/test_learner.py), on tiny inputs."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import manlearn
from invariants import rule_kw
from manlearn import ConfigError, LocalLearner
from manlearn.models.resnet import BasicBlock, Bottleneck
from manlearn.rules import MomentumAux
from manlearn.rules.heads_imagenet import ImageNetInfoProClassifier, ImageNetInfoProDecoder
from manlearn.rules.infopro import resolve_heads

from invariants import (assert_block_grads_are_their_local_loss_grads, assert_ema_is_m_old_plus_one_minus_m_source,
                        perturb_ema_and_snapshot)

RESNETS = manlearn.list_models(tag="imagenet")
RESNETS = [m for m in RESNETS if "resnet" in manlearn.models.model_tags(m)]
# Same topology (unit counts, block types, strides, groups) at a fraction of the width.
NARROW = dict(widths=(8, 16, 32, 64))
NARROW_X = dict(widths=(8, 16, 32, 64), groups=4, width_per_group=16)
METHODS = [("greedy", None), ("dgl", None), ("infopro", None), ("infopro-contrast", None),
           ("man", "dgl"), ("manpp", "dgl"), ("manpp", "infopro")]
IDS = [m if b is None else f"{b}+{m}" for m, b in METHODS]
S = 64  # 64x64 inputs: 16x16 after the stem, 2x2 in stage 4


def narrow(model: str) -> dict:
    return dict(NARROW_X if model.startswith("resnext") else NARROW)


def make(model="resnet50", method="manpp", base="infopro", K=4, seed=0, full=False, **kw) -> LocalLearner:
    torch.manual_seed(seed)
    kw.setdefault("image_size", S)
    kw.setdefault("stem_module", False)
    heads = kw.pop("infopro_heads", "imagenet")
    return LocalLearner(model=model, method=method, **rule_kw(method, base or "infopro", heads=heads), K=K, num_classes=5,
                        model_kwargs=None if full else narrow(model), **kw)


@pytest.fixture
def big_batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, S, S, generator=g), torch.tensor([1, 3])


def test_registry_has_the_imagenet_family():
    assert set(RESNETS) == {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
                            "resnext101_32x8d"}
    assert not set(RESNETS) & set(manlearn.list_models(tag="cifar"))


@pytest.mark.parametrize("model,block,layers,params_m", [
    ("resnet18", BasicBlock, (2, 2, 2, 2), 11.69), ("resnet34", BasicBlock, (3, 4, 6, 3), 21.80),
    ("resnet50", Bottleneck, (3, 4, 6, 3), 25.56), ("resnet101", Bottleneck, (3, 4, 23, 3), 44.55),
    ("resnet152", Bottleneck, (3, 8, 36, 3), 60.19), ("resnext50_32x4d", Bottleneck, (3, 4, 6, 3), 25.03),
    ("resnext101_32x8d", Bottleneck, (3, 4, 23, 3), 88.79)])
def test_architecture_matches_the_reference_networks(model, block, layers, params_m):
    """Unit counts, unit ids (stage 1..4), block type, and the parameter count of the 1000-class network
    (the published torchvision figures), from a meta-device build (no memory, no init cost)."""
    with torch.device("meta"):
        net = manlearn.create_model(model, num_classes=1000)
    assert all(isinstance(u, block) for u in net.units)
    want_ids = [(s + 1, i) for s, n in enumerate(layers) for i in range(n)]
    assert net.unit_ids == want_ids
    n = sum(p.numel() for p in net.parameters())
    assert abs(n / 1e6 - params_m) < 0.01, n
    if model.startswith("resnext"):
        assert net.units[0].conv2.groups == 32


def test_imagenet_stem_is_7x7_stride_2_and_maxpool():
    net = manlearn.create_model("resnet50", **NARROW)
    conv, pool = net.stem[0], net.stem[3]
    assert conv.kernel_size == (7, 7) and conv.stride == (2, 2) and isinstance(pool, nn.MaxPool2d)
    net.eval()
    with torch.no_grad():
        h = net.stem(torch.zeros(1, 3, 224, 224))
        assert h.shape == (1, 8, 56, 56)
        for u in net.units:
            h = u(h)
    assert h.shape == (1, 64 * 4, 7, 7)


@pytest.mark.parametrize("model", RESNETS)
@pytest.mark.parametrize("method,base", METHODS, ids=IDS)
def test_every_model_and_rule_steps_with_isolated_blocks(model, method, base, big_batch):
    a = make(model, method, base, K=3)
    b = copy.deepcopy(a)
    with torch.no_grad():  # change everything after block 0
        for mod in [*b.blocks[1:], *b.auxes[1:], b.head]:
            for p in mod.parameters():
                p.mul_(-1.5)
    out = a.train_step(*big_batch)
    b.train_step(*big_batch)
    assert out.logits.shape == (2, 5) and len(out.losses) == 3
    assert all(torch.isfinite(torch.tensor(out.losses)))
    for name, p in a.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
        else:
            assert ".ema." in name and p.grad is None, name
    for mod_a, mod_b in ((a.blocks[0], b.blocks[0]), (a.auxes[0], b.auxes[0])):
        for (name, pa), pb in zip(mod_a.named_parameters(), mod_b.parameters()):
            if pa.requires_grad:
                assert torch.equal(pa.grad, pb.grad), f"block 0 {name} depends on later blocks"


def test_full_width_resnet101_k4_paper_split_manpp(big_batch):
    """Full-width ResNet-101, published K=4 split, InfoPro+MAN++ with the ImageNet heads: the ema/lb units
    and heads sit where SPEC 2.2/3.1 put them, and each block's gradients are those of its own loss."""
    x, y = big_batch
    learner = make("resnet101", "manpp", "infopro", K=4, full=True, split="paper")
    ids = manlearn.create_model("resnet101", widths=(8, 16, 32, 64)).unit_ids
    assert [ids[e - 1] for e in learner.split.ends] == [(2, 2), (3, 8), (3, 16), (4, 2)]
    assert learner.split.source == "paper table"
    # the heads see the next unit's output: 512 channels after (2,2), 1024 after (3,8) and (3,16)
    chans = [aux.heads.decoder.reduce[0].in_channels for aux in learner.auxes]
    assert chans == [512, 1024, 1024]
    assert [aux.heads.decoder.reduce[0].out_channels for aux in learner.auxes] == [128, 192, 192]
    for i, aux in enumerate(learner.auxes):
        assert isinstance(aux, MomentumAux) and aux.source is learner.blocks[i + 1][0]
        assert isinstance(aux.heads.decoder, ImageNetInfoProDecoder)
        assert isinstance(aux.heads.classifier, ImageNetInfoProClassifier)
        assert (aux.heads.lambda_x, aux.heads.lambda_y) == (5.0, 0.75)  # constant, SPEC 2.2
    assert_block_grads_are_their_local_loss_grads(learner, x, y, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("model", ["resnet50", "resnext50_32x4d"])
@pytest.mark.parametrize("m", [0.9, 0.995])
def test_ema_update_is_exactly_m_ema_plus_one_minus_m_source(model, m, big_batch):
    learner = make(model, "manpp", "dgl", K=4, momentum=m)
    before = perturb_ema_and_snapshot(learner)
    learner.train_step(*big_batch)
    assert_ema_is_m_old_plus_one_minus_m_source(learner, before, m)


def test_manpp_fuses_s_lb_plus_two_minus_s_ema(big_batch):
    x, _ = big_batch
    learner = make("resnet34", "manpp", "infopro", K=4).eval()
    aux = learner.auxes[0]
    with torch.no_grad():
        h = learner.blocks[0](x)
        for p in aux.lb.parameters():
            p.add_(0.05 * torch.randn_like(p))
        aux.scale.fill_(0.4)
        torch.testing.assert_close(aux.fuse(h), 0.4 * aux.lb(h) + 1.6 * aux.ema(h))


def test_published_tables_and_refusals():
    r152 = make("resnet152", "dgl", K=4, split="paper")
    ids = r152.blocks[0][1:]  # stem, then units
    assert len(ids) == 3 + 7  # layer1 (3) + (2,0)..(2,6)
    assert [len(b) for b in make("resnet152", "dgl", K=2, split="paper").blocks] == [1 + 3 + 6, 2 + 36 + 3]
    assert [len(b) for b in make("resnet101", "dgl", K=2, split="paper").blocks] == [1 + 3 + 1, 3 + 23 + 3]
    with pytest.raises(ConfigError, match="no published 'paper' split"):
        make("resnet101", "dgl", K=4, split="paper", stem_module=True)  # the tables count the stem in block 1
    with pytest.raises(ConfigError, match="no published 'paper' split"):
        make("resnet50", "dgl", K=4, split="paper")
    assert make("resnet50", "dgl", K=5, split="uniform").K == 5
    bal = make("resnet50", "dgl", K=3, split="balanced")
    assert bal.split.source == "balanced" and bal.K == 3
    with pytest.raises(ConfigError, match="impossible"):
        make("resnet18", "dgl", K=10)


def test_infopro_heads_choice_and_lambdas():
    assert resolve_heads("auto", 224) == "imagenet" and resolve_heads("auto", 32) == "cifar"
    assert resolve_heads("auto", 96) == "cifar"
    cifar = make("resnet18", "infopro", K=3, infopro_heads="cifar", lambda_schedule="linear")
    assert type(cifar.auxes[0].decoder).__name__ == "InfoProDecoder"
    assert (cifar.auxes[0].lambda_x, cifar.auxes[0].lambda_y) == (5.0, 0.5)
    custom = make("resnet18", "infopro", K=3, lambdas=(1.0, 2.0, 1.0, 2.0))
    assert (custom.auxes[1].lambda_x, custom.auxes[1].lambda_y) == (1.0, 2.0)
    with pytest.raises(ConfigError, match="infopro_heads"):
        make("resnet18", "infopro", K=3, infopro_heads="big")


@pytest.mark.parametrize("channels,size,ladder", [(512, 28, [32, 12]), (1024, 14, [64, 32, 12]),
                                                  (2048, 7, [128, 64, 32, 12])])
def test_imagenet_decoder_upsamples_in_octaves_to_the_image(channels, size, ladder):
    dec = ImageNetInfoProDecoder(channels, size, 224)
    assert [st[0].out_channels for st in dec.stages] == ladder
    assert dec.sizes[-1] == 224 and len(dec.sizes) == len(ladder) + 1
    assert dec.stages[-1][0].kernel_size == (3, 3)
    with torch.no_grad():
        out = dec.eval()(torch.zeros(1, channels, size, size))
    assert out.shape == (1, 3, 224, 224)
    cls = ImageNetInfoProClassifier(channels, 1000).eval()
    with torch.no_grad():
        assert cls(torch.zeros(1, channels, size, size)).shape == (1, 1000)
    assert cls.features[0][0].out_channels == channels // 4 and cls.fc.in_features == 2048


def test_e2e_is_plain_backprop(big_batch):
    x, y = big_batch
    learner = make("resnet18", "e2e", K=4)
    torch.manual_seed(0)
    net = manlearn.create_model("resnet18", num_classes=5, **NARROW)
    learner.train_step(x, y)
    F.cross_entropy(net(x), y).backward()
    lp = [p for b in learner.blocks for p in b.parameters()] + list(learner.head.parameters())
    for a, b in zip(lp, net.parameters()):
        assert torch.equal(a.grad, b.grad)


def test_init_random_uses_the_imagenet_init():
    learner = make("resnet50", "manpp", "dgl", K=3, init="random")
    aux = learner.auxes[0]
    convs = [(e, s) for (n, e), s in zip(aux.ema.named_parameters(), aux.source.parameters()) if "conv" in n]
    assert convs and all(not torch.equal(e, s) for e, s in convs)


IMAGENET_RECIPES = {
    "imagenet-resnet101-e2e": ("resnet101", 1, None), "imagenet-resnet101-k2-infopro-manpp": ("resnet101", 2, [5, 29]),
    "imagenet-resnet101-k4-infopro-manpp": ("resnet101", 4, [7, 10, 8, 9]),
    "imagenet-resnet152-e2e": ("resnet152", 1, None), "imagenet-resnet152-k2-infopro-manpp": ("resnet152", 2, [10, 41]),
    "imagenet-resnet152-k4-infopro-manpp": ("resnet152", 4, [11, 15, 12, 13]),
    "imagenet-resnext101-e2e": ("resnext101_32x8d", 1, None),
    "imagenet-resnext101-k2-infopro-manpp": ("resnext101_32x8d", 2, [5, 29]),
    "imagenet-resnext101-k4-infopro-manpp": ("resnext101_32x8d", 4, [7, 10, 8, 9]),
    "imagenet-vit-tiny-e2e": ("vit_tiny", 1, None), "imagenet-vit-tiny-k4-manpp": ("vit_tiny", 4, [4, 3, 3, 3]),
    "imagenet-vit-small-e2e": ("vit_small", 1, None), "imagenet-vit-small-k4-manpp": ("vit_small", 4, [4, 3, 3, 3]),
    "imagenet-vit-base-e2e": ("vit_base", 1, None), "imagenet-vit-base-k4-manpp": ("vit_base", 4, [4, 3, 3, 3]),
}


@pytest.mark.parametrize("name", sorted(IMAGENET_RECIPES))
def test_imagenet_and_vit_recipes_build_their_learner(name):
    """Each recipe validates and builds the learner it claims (on the meta device: no memory, no init
    cost): the published split, the SPEC section 5 optimiser, the streamed imagenet data."""
    from manlearn.config import load_config
    from manlearn.data import get_dataset_info
    from manlearn.recipes import packaged_recipes_dir
    from manlearn.train import build_learner

    cfg = load_config(packaged_recipes_dir() / f"{name}.yaml")
    model, K, sizes = IMAGENET_RECIPES[name]
    assert (cfg.model, cfg.dataset, cfg.image_size, cfg.epochs, cfg.batch_size) == (model, "imagenet", 224, 90, 1024)
    if model.startswith("vit"):
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay) == ("adamw", 1e-3, 0.05)
    else:
        assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.nesterov, cfg.warmup_epochs) == ("sgd", 0.4, 1e-4, True, 0)
    with torch.device("meta"):
        learner = build_learner(cfg, get_dataset_info("imagenet"), "meta")
    assert learner.K == K
    if sizes is not None:
        assert learner.split.source == "paper table" and [len(b) for b in learner.blocks] == sizes
        if not model.startswith("vit"):
            assert all(isinstance(a.heads.decoder, ImageNetInfoProDecoder) for a in learner.auxes)
