"""RetinaNetTask: head output shapes, the loss / predict protocol, and a few optimisation steps."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from manlearn.detection import FPN, BoxCoder, RetinaNetHead, RetinaNetTask, box_iou
from manlearn.errors import ConfigError
from manlearn.models.resnet import resnet18

CHANNELS, STRIDES = [256, 512, 1024, 2048], [4, 8, 16, 32]  # ResNet-50 C2..C5


def _features(b=2, size=64, channels=CHANNELS, strides=STRIDES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, size // s, size // s, generator=g) for c, s in zip(channels, strides)]


def _targets():
    return [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 36.0], [30.0, 30.0, 62.0, 60.0]]),
             "labels": torch.tensor([2, 0])},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]


def test_fpn_levels_and_head_init():
    fpn = FPN([8, 16, 32], 16)
    c = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4), torch.randn(1, 32, 2, 2)]
    p = fpn(c)
    assert [tuple(x.shape) for x in p] == [(1, 16, 8, 8), (1, 16, 4, 4), (1, 16, 2, 2), (1, 16, 1, 1), (1, 16, 1, 1)]
    assert FPN([8, 16, 32], 16, extra_from="c5").p6.in_channels == 32
    head = RetinaNetHead(16, 9, 3, num_convs=4)
    assert sum(isinstance(m, nn.Conv2d) for m in head.cls_tower) == 4
    assert torch.allclose(head.cls_logits.bias, torch.full((27,), -math.log(99.0)))
    assert any(isinstance(m, nn.GroupNorm) for m in RetinaNetHead(16, 9, 3, norm=True).modules())


def test_final_head_shapes():
    task = RetinaNetTask(num_classes=3, fpn_channels=16)
    head = task.final_head(CHANNELS, STRIDES)
    out = head(_features())
    a = 9 * (8 * 8 + 4 * 4 + 2 * 2 + 1 + 1)
    assert out["cls_logits"].shape == (2, a, 3)
    assert out["box_deltas"].shape == (2, a, 4)
    assert out["anchors"].shape == (a, 4)
    assert out["image_hw"] == (64, 64)
    assert out["level_sizes"] == (576, 144, 36, 9, 9)
    # the FPN reads the stride 8/16/32 outputs only, whatever their position
    assert head.in_indices == (1, 2, 3)
    # non-square input, sides multiples of 32
    out = head(_features(size=64)[:1] + [torch.randn(2, c, 96 // s, 64 // s) for c, s in zip(CHANNELS[1:], STRIDES[1:])])
    assert out["image_hw"] == (96, 64)
    assert out["cls_logits"].shape[1] == out["anchors"].shape[0] == sum(out["level_sizes"])


def test_local_head_shapes():
    task = RetinaNetTask(num_classes=3, fpn_channels=16)
    for c, s in zip(CHANNELS[1:], STRIDES[1:]):
        head = task.local_head(c, s)
        out = head(torch.randn(2, c, 64 // s, 64 // s))
        a = 9 * (64 // s) ** 2
        assert out["cls_logits"].shape == (2, a, 3) and out["box_deltas"].shape == (2, a, 4)
        assert out["anchors"].shape == (a, 4) and out["image_hw"] == (64, 64) and out["level_sizes"] == (a,)
        sizes = torch.sqrt((out["anchors"][:3, 2] - out["anchors"][:3, 0]) * (out["anchors"][:3, 3] - out["anchors"][:3, 1]))
        assert sizes[0].item() == pytest.approx(4 * s)
        assert torch.isfinite(task.loss(out, _targets(), out["image_hw"]))
    assert task.local_head(512, 8).head.num_anchors == 9
    assert sum(isinstance(m, nn.Conv2d) for m in task.local_head(512, 8).head.cls_tower) == 2
    assert RetinaNetTask(3, fpn_channels=16, local_channels=8).local_head(512, 8).proj.out_channels == 8


def test_task_refuses_bad_configuration():
    with pytest.raises(ConfigError, match="box_loss"):
        RetinaNetTask(3, box_loss="mse")
    task = RetinaNetTask(3, fpn_channels=16)
    with pytest.raises(ConfigError, match="strides 8, 16 and 32"):
        task.final_head([64, 128], [4, 8])
    head = task.final_head(CHANNELS, STRIDES)
    with pytest.raises(ConfigError, match="4 stage outputs"):
        head(_features()[1:])
    with pytest.raises(ConfigError, match="local head built for"):
        task.local_head(512, 8)(torch.randn(1, 256, 8, 8))
    with pytest.raises(ConfigError, match="lack"):
        task.loss({"cls_logits": torch.zeros(1, 2, 3)}, _targets()[:1], (64, 64))


def test_predict_decodes_thresholds_and_suppresses():
    task = RetinaNetTask(num_classes=3, fpn_channels=8, score_thresh=0.05, nms_thresh=0.5, detections_per_img=5)
    out = task.local_head(16, 16)(torch.zeros(1, 16, 4, 4))
    a = out["anchors"].shape[0]
    cls = torch.full((1, a, 3), -10.0)
    deltas = torch.zeros(1, a, 4)
    cls[0, 1 * 9 + 3, 1] = 3.0  # location (row 0, col 1) = (x 16, y 0); anchor 3: ratio 1, size 64
    cls[0, 1 * 9 + 4, 1] = 2.0  # same location, square of side 64 * 2^(1/3): IoU 0.63, suppressed
    cls[0, 1 * 9 + 4, 2] = 1.0  # same box, other class: kept (NMS is per class)
    cls[0, 15 * 9 + 4, 1] = 0.0  # far corner location (3, 3), score 0.5
    target = torch.tensor([5.0, 6.0, 30.0, 40.0])
    deltas[0, 15 * 9 + 4] = BoxCoder().encode(target[None], out["anchors"][15 * 9 + 4][None])[0]
    res = task.predict({**out, "cls_logits": cls, "box_deltas": deltas}, (64, 64))
    assert len(res) == 1
    r = res[0]
    assert r["labels"].tolist() == [1, 2, 1]
    assert r["scores"].tolist() == pytest.approx([torch.sigmoid(torch.tensor(v)).item() for v in (3.0, 1.0, 0.0)])
    # the first box is its anchor (centre (16, 0), side 64) clipped to the image; the last is decoded
    assert r["boxes"][0].tolist() == pytest.approx([0.0, 0.0, 48.0, 32.0])
    assert r["boxes"][2].tolist() == pytest.approx(target.tolist(), abs=1e-4)
    # clipping to each image's own (unpadded) size
    r2 = task.predict({**out, "cls_logits": cls, "box_deltas": deltas}, (64, 64), image_sizes=[(20, 20)])[0]
    assert r2["boxes"].max().item() <= 20.0
    # per-level top-k: with topk_candidates=1 only the best (anchor, class) survives
    one = RetinaNetTask(3, fpn_channels=8, topk_candidates=1)
    assert len(one.predict({**out, "cls_logits": cls, "box_deltas": deltas}, (64, 64))[0]["scores"]) == 1
    # nothing above the threshold: empty, well-typed results
    empty = task.predict({**out, "cls_logits": torch.full((2, a, 3), -10.0), "box_deltas": torch.zeros(2, a, 4)},
                         (64, 64))
    assert len(empty) == 2 and empty[1]["boxes"].shape == (0, 4) and empty[1]["labels"].dtype == torch.long


def _stage_outputs(backbone, x):
    """Outputs of the last unit of every stage (C2..C5)."""
    feats, x = [], backbone.stem(x)
    ids = backbone.unit_ids
    for k, unit in enumerate(backbone.units):
        x = unit(x)
        if k + 1 == len(ids) or ids[k + 1][0] != ids[k][0]:
            feats.append(x)
    return feats


def test_gradients_reach_the_stage_outputs_the_heads_read():
    task = RetinaNetTask(num_classes=3, fpn_channels=16)
    feats = [f.requires_grad_() for f in _features(size=64)]
    task.loss(task.final_head(CHANNELS, STRIDES)(feats), _targets(), (64, 64)).backward()
    assert feats[0].grad is None  # C2 (stride 4) is not an FPN input
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats[1:])


@pytest.mark.parametrize("box_loss", ["smooth_l1", "giou"])
def test_few_steps_on_a_fixed_batch_lower_the_loss(box_loss):
    torch.manual_seed(0)
    backbone = resnet18(widths=(8, 8, 16, 16))
    channels = [8, 8, 16, 16]
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():  # fixed backbone features: the test is about the heads and the loss
        feats = _stage_outputs(backbone, images)
    assert [f.shape[1] for f in feats] == channels
    task = RetinaNetTask(num_classes=3, fpn_channels=16, head_convs=2, box_loss=box_loss)
    final, local = task.final_head(channels, STRIDES), task.local_head(8, 8)
    opt = torch.optim.Adam(list(final.parameters()) + list(local.parameters()), lr=1e-3)
    targets = _targets()
    losses = []
    for _ in range(15):
        out_final, out_local = final(feats), local(feats[1])
        loss = task.loss(out_final, targets, out_final["image_hw"]) + task.loss(out_local, targets, (64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert min(losses[-3:]) < 0.7 * losses[0], losses
    # after fitting, the best detection of image 0 overlaps one of its boxes
    with torch.no_grad():
        pred = task.predict(final(feats), (64, 64))
    assert len(pred) == 2 and len(pred[0]["boxes"]) > 0
    assert box_iou(pred[0]["boxes"][:1], targets[0]["boxes"]).max() > 0.3
