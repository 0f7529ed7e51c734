"""Your network, as it is: torchvision-layout ResNets, timm-layout ViTs and nn.Sequential are cut in place
(the learner trains the user's own parameters), compute what the user's forward computes, and stay
gradient-isolated; ``cut_model`` names the cut points of anything else."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import manlearn
from foreign_nets import TimmViT, randomize, tv_resnet18, tv_resnet50
from manlearn import ConfigError, LocalLearner, adapt_model, cut_model
from manlearn.models import Backbone, follows_protocol
from invariants import assert_blocks_learn_only_their_own_loss, own_loss_grads


def _x(size=32, n=2, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _same_forward(net, adapted, x):
    net.eval(), adapted.eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), net(x))


def _param_ids(m):
    return {id(p) for p in m.parameters()}


# --------------------------------------------------------------------------- torchvision ResNet
@pytest.mark.parametrize("factory", [tv_resnet18, tv_resnet50])
def test_torchvision_resnet_is_cut_in_place_and_computes_the_same(factory):
    torch.manual_seed(0)
    net = randomize(factory(num_classes=7))
    bb = adapt_model(net)
    assert follows_protocol(bb)
    assert bb.stem[0] is net.conv1 and bb.stem[1] is net.bn1 and bb.stem[3] is net.maxpool
    assert list(bb.units) == [b for s in (1, 2, 3, 4) for b in getattr(net, f"layer{s}")]
    n = [len(getattr(net, f"layer{s}")) for s in (1, 2, 3, 4)]
    assert bb.unit_ids == [(s, i) for s, k in zip((1, 2, 3, 4), n) for i in range(k)]
    assert bb.head[0] is net.avgpool and bb.head[2] is net.fc
    assert _param_ids(bb) == _param_ids(net)
    assert [t["unit"] for t in bb.feature_info] == [sum(n[:s]) - 1 for s in (1, 2, 3, 4)]
    _same_forward(net, bb, _x())


def test_protocol_module_is_returned_as_is():
    bb = manlearn.create_model("resnet20", num_classes=3)
    assert adapt_model(bb) is bb


def test_learner_on_torchvision_resnet_trains_the_users_parameters_in_place():
    torch.manual_seed(0)
    net = tv_resnet50(num_classes=3)
    learner = LocalLearner(model=net, method="manpp", base="dgl", K=4, num_classes=3, image_size=32)
    # every parameter of the user's network is a parameter of the learner's blocks or head
    backbone_params = _param_ids(learner.blocks) | _param_ids(learner.head)
    assert _param_ids(net) == backbone_params
    assert learner.blocks[0][0][0] is net.conv1 and learner.head[2] is net.fc
    # auxes own copies (ema/lb), never the user's objects
    assert not (_param_ids(learner.auxes) & _param_ids(net))
    learner.eval(), net.eval()
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(learner(x), net(x))
    learner.train()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD([p for p in learner.parameters() if p.requires_grad], lr=0.1)
    learner.train_step(_x(n=4), torch.tensor([0, 1, 2, 0]))
    for block in learner.blocks:  # every block learns (DGL heads: no zero local loss)
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, net.parameters())]
    assert sum(changed) > len(changed) // 2, "the optimiser over the learner updates the user's network"


@pytest.mark.parametrize("base", ["infopro", "dgl"])
def test_adapted_torchvision_resnet_blocks_are_gradient_isolated_under_manpp(base):
    torch.manual_seed(0)
    net = tv_resnet50(num_classes=3)
    learner = LocalLearner(model=net, method="manpp", base=base, K=4, num_classes=3, image_size=32).double()
    x = _x().double()
    y = torch.tensor([0, 2])
    expected = own_loss_grads(learner, x, y)
    torch.manual_seed(7)
    learner.train_step(x, y)
    n_checked = 0
    for k, block in enumerate(learner.blocks):
        # DGL: every block has a non-zero local loss to check against (InfoPro's schedule zeroes one at K=4)
        assert base != "dgl" or any(g.abs().sum() > 0 for g in expected[k])
        for p, g in zip(block.parameters(), expected[k]):
            assert g is not None
            torch.testing.assert_close(p.grad, g, rtol=1e-7, atol=1e-10)
            n_checked += 1
    assert n_checked == len(list(learner.blocks.parameters()))


def test_torchvision_layout_with_a_changed_forward_is_refused():
    class Features(type(tv_resnet18())):
        def forward(self, x):  # no classifier: not what the layout's head computes
            return super().forward(x) * 2

    net = Features(tv_resnet18().layer1[0].__class__, (2, 2, 2, 2), widths=(8, 16, 32, 64), stem_width=8)
    with pytest.raises(ConfigError, match="cut_model"):
        adapt_model(net)
    assert follows_protocol(adapt_model(net, check=False))


# --------------------------------------------------------------------------- timm ViT
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_timm_vit_is_cut_in_place_and_computes_the_same(pool):
    torch.manual_seed(0)
    net = randomize(TimmViT(global_pool=pool, depth=3))
    bb = adapt_model(net)
    assert bb.stem.patch_embed is net.patch_embed
    assert bb.stem.cls_token is net.cls_token and bb.stem.pos_embed is net.pos_embed
    assert list(bb.units) == list(net.blocks) and bb.unit_ids == [(1, 0), (1, 1), (1, 2)]
    assert bb.head.head is net.head and bb.head.norm is net.norm and bb.head.fc_norm is net.fc_norm
    assert _param_ids(bb) == _param_ids(net)
    _same_forward(net, bb, _x())


def test_learner_on_timm_vit_is_isolated_and_shares_parameters():
    torch.manual_seed(0)
    net = TimmViT(depth=4, num_classes=3)
    learner = LocalLearner(model=net, method="manpp", base="dgl", K=3, num_classes=3, image_size=32).double()
    assert _param_ids(net) == _param_ids(learner.blocks) | _param_ids(learner.head)
    x, y = _x().double(), torch.tensor([0, 2])
    assert_blocks_learn_only_their_own_loss(learner, x, y)


@pytest.mark.parametrize("change,match", [
    (lambda m: setattr(m, "reg_token", nn.Parameter(torch.zeros(1, 4, 16))), "register tokens"),
    (lambda m: setattr(m, "no_embed_class", True), "no_embed_class"),
    (lambda m: setattr(m, "global_pool", "map"), "global_pool"),
    (lambda m: setattr(m, "dynamic_img_size", True), "dynamic_img_size"),
    (lambda m: setattr(m, "cls_token", None), "class token"),
])
def test_non_standard_timm_vit_is_refused_clearly(change, match):
    net = TimmViT()
    change(net)
    with pytest.raises(ConfigError, match=match) as e:
        adapt_model(net)
    assert "cut_model" in str(e.value)


# --------------------------------------------------------------------------- nn.Sequential
def test_sequential_rule_stem_units_head():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(16, 3))
    bb = adapt_model(net)
    # stem = first child + the parameter-free ReLU; parameter-free children join the unit before
    assert list(bb.stem) == [net[0], net[1]]
    assert [list(u) if isinstance(u, nn.Sequential) else [u] for u in bb.units] == \
        [[net[2]], [net[3], net[4], net[5]], [net[6]]]
    # the parameter-free children before the classifier (ReLU, pool, flatten) join it
    assert list(bb.head) == [net[7], net[8], net[9], net[10]]
    assert _param_ids(bb) == _param_ids(net)
    _same_forward(net, bb, _x(16))
    learner = LocalLearner(model=net, method="dgl", K=2, num_classes=3, image_size=16)
    assert _param_ids(net) == _param_ids(learner.blocks) | _param_ids(learner.head)
    learner.train_step(_x(16, 4), torch.tensor([0, 1, 2, 0]))


@pytest.mark.parametrize("children", [
    [nn.Conv2d(3, 4, 3), nn.Linear(4, 2)],
    [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(1), nn.Linear(4, 2)],
])
def test_sequential_too_short_to_cut_is_refused(children):
    with pytest.raises(ConfigError, match="cannot be cut.*cut_model"):
        adapt_model(nn.Sequential(*children))


def test_unrecognised_network_is_refused_pointing_at_cut_model():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features, self.classifier = nn.Conv2d(3, 4, 3), nn.Linear(4, 2)

    with pytest.raises(ConfigError, match=r"(?s)features, classifier.*torchvision.*timm.*cut_model"):
        adapt_model(Net())
    with pytest.raises(ConfigError, match="cut_model"):
        LocalLearner(model=Net(), method="dgl", K=2, num_classes=2, image_size=16)


# --------------------------------------------------------------------------- cut_model
def test_cut_model_by_paths_and_glob():
    torch.manual_seed(0)
    net = randomize(tv_resnet18(num_classes=4))
    bb = cut_model(net, stem=["conv1", "bn1", "relu", "maxpool"], units=["layer*.*"],
                   head=["avgpool", nn.Flatten(1), "fc"])
    assert isinstance(bb, Backbone)
    assert list(bb.units) == [b for s in (1, 2, 3, 4) for b in getattr(net, f"layer{s}")]
    assert bb.unit_ids == [(s, i) for s in (1, 2, 3, 4) for i in range(2)]  # one stage per parent
    assert _param_ids(bb) == _param_ids(net)
    _same_forward(net, bb, _x())
    # explicit unit_ids; a single-module stem is the module itself; example_input is checked
    bb2 = cut_model(net, stem=["conv1"], units=["bn1", "layer1.0", "layer1.1"], head=[],
                    unit_ids=[(1, 0), (2, 0), (2, 1)])
    assert bb2.stem is net.conv1 and bb2.unit_ids == [(1, 0), (2, 0), (2, 1)]
    cut_model(net, stem=["conv1", "bn1", "relu", "maxpool"], units=["layer*.*"],
              head=["avgpool", nn.Flatten(1), "fc"], example_input=_x())
    with pytest.raises(ConfigError, match="does not compute"):
        cut_model(net, stem=["conv1", "bn1", "relu", "maxpool"], units=["layer*.*"],
                  head=["avgpool", nn.Flatten(1)], example_input=_x())


def test_cut_model_errors_name_the_path():
    net = tv_resnet18()
    with pytest.raises(ConfigError, match=r"stem: .*no module at path 'conv9'.*did you mean 'conv1'"):
        cut_model(net, stem=["conv9"], units=["layer*.*"], head=["fc"])
    with pytest.raises(ConfigError, match=r"units: .*'layer1.7'"):
        cut_model(net, stem=["conv1"], units=["layer1.0", "layer1.7"], head=["fc"])
    with pytest.raises(ConfigError, match=r"pattern 'stage\*\.\*' matches no module"):
        cut_model(net, stem=["conv1"], units=["stage*.*"], head=["fc"])
    with pytest.raises(ConfigError, match="inside 'layer1'"):
        cut_model(net, stem=["conv1"], units=["layer1", "layer1.0"], head=["fc"])
    with pytest.raises(ConfigError, match="named twice"):
        cut_model(net, stem=["fc"], units=["layer1"], head=["fc"])
    with pytest.raises(ConfigError, match="2 unit_ids for 8 units"):
        cut_model(net, stem=["conv1"], units=["layer*.*"], head=["fc"], unit_ids=[(1, 0), (1, 1)])
    with pytest.raises(ConfigError, match="list of module paths"):
        cut_model(net, stem="conv1", units=["layer*.*"], head=["fc"])


def test_glob_stays_within_one_path_component():
    net = tv_resnet18()
    bb = cut_model(net, stem=["conv1"], units=["layer1.*"], head=[])
    assert list(bb.units) == list(net.layer1)   # not layer1.0.conv1, layer1.0.bn1, ...


def test_readme_cut_model_example_runs():
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    m = re.search(r"<!-- tests/test_adapters.py runs this block -->\n```python\n(.*?)```", text, re.S)
    assert m, "README lost its cut_model example"
    ns = {"manlearn": manlearn, "torch": torch, "net": tv_resnet18(num_classes=100)}
    exec(compile(m.group(1), "README.md", "exec"), ns)
    assert ns["learner"].K == 4 and ns["learner"].blocks[0][0][0] is ns["net"].conv1
