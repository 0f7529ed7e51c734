"""Pretrained weights: torchvision ResNet/ResNeXt and timm ViT state_dicts load into manlearn's own
backbones and give the same outputs; a checkpoint that does not fit is refused with the keys named."""
from __future__ import annotations

import pytest
import torch

from foreign_nets import TimmViT, TVBottleneck, TVResNet, randomize, tv_resnet18, tv_resnet50
from manlearn import ConfigError, LocalLearner, create_model
from manlearn.models import Backbone, load_pretrained

NARROW = dict(widths=(8, 16, 32, 64), stem_width=8)
VIT = dict(image_size=32, patch_size=8, dim=16, depth=2, heads=2)


def _x(size=32, seed=1):
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_same(theirs, ours, size=32):
    theirs.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(_x(size)), theirs(_x(size)), rtol=1e-4, atol=1e-5)


def _save(tmp_path, obj, name="w.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("name,theirs", [
    ("resnet50", lambda: tv_resnet50(num_classes=7)),
    ("resnet18", lambda: tv_resnet18(num_classes=7)),
    ("resnext50_32x4d", lambda: TVResNet(TVBottleneck, (3, 4, 6, 3), num_classes=7, groups=2, width_per_group=64,
                                         **NARROW)),
])
def test_torchvision_resnet_weights_give_the_same_network(tmp_path, name, theirs):
    torch.manual_seed(0)
    net = randomize(theirs())
    kw = dict(groups=2, width_per_group=64) if name.startswith("resnext") else {}
    ours = create_model(name, num_classes=7, pretrained=_save(tmp_path, net.state_dict()), **NARROW, **kw)
    _assert_same(net, ours)
    first_of_stage2 = ours.units[ours.unit_ids.index((2, 0))]
    torch.testing.assert_close(first_of_stage2.downsample[1].running_var, net.layer2[0].downsample[1].running_var)


def test_timm_vit_weights_give_the_same_network(tmp_path):
    torch.manual_seed(0)
    net = randomize(TimmViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5))
    ours = create_model("vit_tiny", num_classes=5, pretrained=_save(tmp_path, net.state_dict()), **VIT)
    _assert_same(net, ours)


@pytest.mark.parametrize("wrap", [lambda sd: {"state_dict": sd, "epoch": 3},
                                  lambda sd: {"model": sd, "optimizer": {}},
                                  lambda sd: {"module." + k: v for k, v in sd.items()}])
def test_wrapped_checkpoints_and_state_dict_objects(tmp_path, wrap):
    net = randomize(tv_resnet18(num_classes=4))
    ours = create_model("resnet18", num_classes=4, pretrained=_save(tmp_path, wrap(net.state_dict())), **NARROW)
    _assert_same(net, ours)
    ours2 = load_pretrained(create_model("resnet18", num_classes=4, **NARROW), wrap(net.state_dict()))
    _assert_same(net, ours2)


def test_manlearn_own_state_dict_loads_too(tmp_path):
    a = randomize(create_model("resnet18", num_classes=4, **NARROW))
    b = create_model("resnet18", num_classes=4, pretrained=_save(tmp_path, a.state_dict()), **NARROW)
    _assert_same(a, b)


def test_old_torchvision_files_without_num_batches_tracked_load(tmp_path):
    net = randomize(tv_resnet18(num_classes=4))
    sd = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    _assert_same(net, create_model("resnet18", num_classes=4, pretrained=_save(tmp_path, sd), **NARROW))


def test_other_class_count_is_refused_unless_the_head_is_skipped(tmp_path):
    net = randomize(tv_resnet50(num_classes=1000))
    path = _save(tmp_path, net.state_dict())
    with pytest.raises(ConfigError, match=r"(?s)shape mismatches: fc.weight \(1000, 256\) vs \(10, 256\).*"
                                          r"pretrained_head=False"):
        create_model("resnet50", num_classes=10, pretrained=path, **NARROW)
    ours = create_model("resnet50", num_classes=10, pretrained=path, pretrained_head=False, **NARROW)
    torch.testing.assert_close(ours.stem[0].weight, net.conv1.weight)
    torch.testing.assert_close(ours.units[15].conv3.weight, net.layer4[2].conv3.weight)
    assert ours.head[2].weight.shape == (10, 256)
    # everything before the classifier is the pretrained network
    net.fc = torch.nn.Identity()
    ours.head[2] = torch.nn.Identity()
    _assert_same(net, ours)


def test_missing_and_unexpected_keys_are_listed_with_counts(tmp_path):
    net = tv_resnet50(num_classes=7)          # 6 blocks in layer3
    path = _save(tmp_path, net.state_dict())
    with pytest.raises(ConfigError) as e:    # a model with 3 blocks in layer3: 3 blocks' keys left over
        load_pretrained(Backbone(*_short_resnet50()), path)
    msg = str(e.value)
    n = 3 * len(net.layer3[3].state_dict())
    # the count, then the first five in the checkpoint's naming, then how many more
    assert f"{n} checkpoint keys the model has no place for: layer3.3.conv1.weight, " in msg
    assert f"... ({n - 5} more)" in msg
    assert "keys the model needs" not in msg and "shape" not in msg
    # the other way round: the model needs keys the checkpoint lacks, named as the checkpoint names them
    sd = {k: v for k, v in net.state_dict().items() if not k.startswith("layer4.2.")}
    with pytest.raises(ConfigError, match=r"keys the model needs but the checkpoint lacks: layer4\.2\.conv1\.weight"):
        create_model("resnet50", num_classes=7, pretrained=sd_path(tmp_path, sd), **NARROW)


def _short_resnet50():
    m = create_model("resnet50", num_classes=7, **NARROW)
    keep = [j for j, (s, i) in enumerate(m.unit_ids) if not (s == 3 and i >= 3)]
    return m.stem, [m.units[j] for j in keep], m.head, [m.unit_ids[j] for j in keep]


def sd_path(tmp_path, sd):
    return _save(tmp_path, sd, "sd.pth")


def test_width_mismatch_is_a_shape_error(tmp_path):
    path = _save(tmp_path, tv_resnet18(num_classes=4).state_dict())
    with pytest.raises(ConfigError, match=r"shape mismatches: conv1.weight \(8, 3, 7, 7\) vs \(16, 3, 7, 7\) in "
                                          r"resnet18.*widths"):
        create_model("resnet18", num_classes=4, pretrained=path, widths=(16, 16, 32, 64))


def test_vit_errors(tmp_path):
    net = TimmViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    path = _save(tmp_path, net.state_dict())
    with pytest.raises(ConfigError, match=r"pos_embed \(1, 17, 16\) vs \(1, 5, 16\)"):
        create_model("vit_tiny", num_classes=5, pretrained=path, **{**VIT, "image_size": 16})
    with pytest.raises(ConfigError, match="blocks.2.norm1.weight"):
        create_model("vit_tiny", num_classes=5, pretrained=path, **{**VIT, "depth": 3})
    with pytest.raises(ConfigError, match="timm VisionTransformer checkpoint cannot load into resnet18"):
        create_model("resnet18", num_classes=5, pretrained=path, **NARROW)
    avg = TimmViT(img_size=32, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5, global_pool="avg")
    with pytest.raises(ConfigError, match=r"(?s)lacks: norm.weight.*no place for: fc_norm.weight"):
        create_model("vit_tiny", num_classes=5, pretrained=_save(tmp_path, avg.state_dict(), "avg.pth"), **VIT)


def test_unreadable_and_unrecognised_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("resnet18", pretrained=str(tmp_path / "nope.pth"), **NARROW)
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read pretrained weights"):
        create_model("resnet18", pretrained=str(bad), **NARROW)
    with pytest.raises(ConfigError, match="unrecognised checkpoint layout.*features.0.weight"):
        create_model("resnet18", pretrained=_save(tmp_path, {"features.0.weight": torch.zeros(1)}), **NARROW)
    with pytest.raises(ConfigError, match="state_dict"):
        create_model("resnet18", pretrained=_save(tmp_path, [1, 2], "list.pth"), **NARROW)


def test_learner_builds_a_pretrained_backbone_through_model_kwargs(tmp_path):
    net = randomize(tv_resnet18(num_classes=3))
    learner = LocalLearner("resnet18", method="dgl", K=2, num_classes=3, image_size=32,
                           model_kwargs=dict(pretrained=_save(tmp_path, net.state_dict()), **NARROW))
    _assert_same(net, learner)


def test_recipes_take_pretrained_for_dense_and_classification(tmp_path):
    """`pretrained=` in a config starts the backbone from a torchvision file; a dense run never loads the
    classifier (its head is the task's), and a resumed run does not read the file again."""
    from foreign_nets import randomize, tv_resnet50

    from manlearn.config import TrainConfig, apply_overrides
    from manlearn.train import build_learner

    net = randomize(tv_resnet50(num_classes=7))
    path = tmp_path / "r50.pth"
    torch.save(net.state_dict(), path)
    cfg = apply_overrides(TrainConfig(), ["task.name=detection", "model=resnet50", "K=4", "data_dir=x",
                                          "task.model_widths=[8,16,32,64]", "task.stem_width=8",
                                          "task.fpn_channels=8", f"pretrained={path}"])
    learner = build_learner(cfg, type("Info", (), {"num_classes": 3})())
    torch.testing.assert_close(learner.blocks[0][0][0].weight, net.conv1.weight)   # stem conv
    torch.testing.assert_close(learner.blocks[-1][-1].conv3.weight, net.layer4[-1].conv3.weight)
    path.unlink()
    build_learner(cfg, type("Info", (), {"num_classes": 3})(), load_pretrained=False)  # resume: file not needed
    with pytest.raises(ConfigError):
        build_learner(cfg, type("Info", (), {"num_classes": 3})())


@pytest.mark.parametrize("kind, reason", [
    ("text", "it is not a file written by torch.save"),
    ("truncated", "it is truncated or corrupt"),
    ("object", r"it holds a Python object \(fractions.Fraction\) besides tensors"),
])
def test_a_bad_weights_file_is_one_short_line(tmp_path, kind, reason):
    """torch's paragraph (re-run with weights_only=False, file an issue) is never shown (#28)."""
    import fractions

    from manlearn.train import load_checkpoint
    from manlearn.errors import CheckpointError

    path = tmp_path / "w.pth"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "object":
        torch.save({"a": fractions.Fraction(1, 3)}, path)
    else:
        torch.save({"a": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:2000])
    with pytest.raises(ConfigError, match=reason) as e:
        create_model("resnet18", pretrained=str(path), **NARROW)
    with pytest.raises(CheckpointError, match=reason) as e2:
        load_checkpoint(path)
    for msg in (str(e.value), str(e2.value)):
        assert "\n" not in msg and "weights_only" not in msg and "issue" not in msg, msg
