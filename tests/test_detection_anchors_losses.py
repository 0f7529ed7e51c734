"""Anchors, focal loss, matcher and the RetinaNet loss of manlearn.detection."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from manlearn.detection import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, AnchorGenerator, BoxCoder, Matcher,
                                retinanet_anchor_sizes, retinanet_loss, sigmoid_focal_loss)
from manlearn.errors import ConfigError


# ------------------------------------------------------------------ anchors

def test_retinanet_anchor_sizes():
    sizes = retinanet_anchor_sizes()
    assert len(sizes) == 5 and all(len(s) == 3 for s in sizes)
    for lvl, s in zip(range(3, 8), sizes):
        base = 2.0 ** (lvl + 2)
        assert s == pytest.approx((base, base * 2 ** (1 / 3), base * 2 ** (2 / 3)))
    assert sizes[0][0] == 32 and sizes[-1][0] == 512


def test_anchor_counts_centres_sizes_and_ratios():
    gen = AnchorGenerator()
    fs = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]  # a 64x64 image, P3..P7
    levels = gen.grid_anchors(fs)
    assert [lv.shape[0] for lv in levels] == [9 * h * w for h, w in fs]
    assert gen(fs).shape == (9 * 86, 4)
    p3 = levels[0].reshape(8, 8, 9, 4)
    cx, cy = (p3[..., 0] + p3[..., 2]) / 2, (p3[..., 1] + p3[..., 3]) / 2
    ii, jj = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    assert torch.allclose(cx, (jj * 8)[..., None].expand_as(cx), atol=1e-4)
    assert torch.allclose(cy, (ii * 8)[..., None].expand_as(cy), atol=1e-4)
    w, h = p3[0, 0, :, 2] - p3[0, 0, :, 0], p3[0, 0, :, 3] - p3[0, 0, :, 1]
    assert torch.allclose(torch.sqrt(w * h), torch.tensor([32, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)] * 3), rtol=1e-5)
    assert torch.allclose(h / w, torch.tensor([0.5] * 3 + [1.0] * 3 + [2.0] * 3), rtol=1e-5)
    # P7: stride 128, largest size 512 * 2^(2/3)
    p7 = levels[4]
    assert torch.allclose((p7[:, 2] - p7[:, 0]) * (p7[:, 3] - p7[:, 1]),
                          torch.tensor([512.0, 512 * 2 ** (1 / 3), 512 * 2 ** (2 / 3)] * 3) ** 2, rtol=1e-5)


def test_anchor_cache_and_single_level():
    gen = AnchorGenerator.single_level(16)
    assert gen.num_anchors_per_location() == [9]
    a = gen([(3, 5)])
    assert a.shape == (3 * 5 * 9, 4)
    assert gen([(3, 5)]) is a  # cached
    assert gen([(3, 5)], dtype=torch.float64).dtype == torch.float64
    sizes = torch.sqrt((a[:9, 2] - a[:9, 0]) * (a[:9, 3] - a[:9, 1]))
    assert torch.allclose(sizes[:3], torch.tensor([64, 64 * 2 ** (1 / 3), 64 * 2 ** (2 / 3)]), rtol=1e-5)
    # last location: row 2, column 4 -> centre (64, 32)
    last = a[-9:]
    assert torch.allclose((last[:, 0] + last[:, 2]) / 2, torch.full((9,), 64.0))
    assert torch.allclose((last[:, 1] + last[:, 3]) / 2, torch.full((9,), 32.0))
    with pytest.raises(ConfigError, match="1 levels"):
        gen([(3, 5), (2, 2)])
    with pytest.raises(ConfigError):
        AnchorGenerator(sizes=((32.0,),), aspect_ratios=((1.0,), (2.0,)))


# ------------------------------------------------------------------ focal loss

def test_focal_loss_hand_computed():
    logits = torch.tensor([0.0, 2.0, -1.0])
    targets = torch.tensor([1.0, 0.0, 1.0])
    sig = lambda x: 1 / (1 + math.exp(-x))
    want = [0.25 * 0.5 ** 2 * math.log(2),
            0.75 * sig(2) ** 2 * -math.log(1 - sig(2)),
            0.25 * (1 - sig(-1)) ** 2 * -math.log(sig(-1))]
    got = sigmoid_focal_loss(logits, targets)
    assert got.tolist() == pytest.approx(want, rel=1e-6)
    assert want == pytest.approx([0.0433217, 1.2375586, 0.1754671], rel=1e-6)
    assert sigmoid_focal_loss(logits, targets, reduction="sum").item() == pytest.approx(sum(want), rel=1e-6)
    assert sigmoid_focal_loss(logits, targets, reduction="mean").item() == pytest.approx(sum(want) / 3, rel=1e-6)


def test_focal_loss_reduces_to_bce_and_down_weights_easy_examples():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g) * 3
    targets = (torch.rand(50, 4, generator=g) > 0.7).float()
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0), bce, atol=1e-6)
    assert torch.allclose(sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0),
                          bce * (0.25 * targets + 0.75 * (1 - targets)), atol=1e-6)
    # gamma > 0 never increases the loss, and shrinks well-classified examples the most
    focal = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=2)
    assert (focal <= bce + 1e-7).all()
    easy = sigmoid_focal_loss(torch.tensor([6.0]), torch.tensor([1.0]), alpha=-1) / \
        F.binary_cross_entropy_with_logits(torch.tensor([6.0]), torch.tensor([1.0]))
    hard = sigmoid_focal_loss(torch.tensor([-2.0]), torch.tensor([1.0]), alpha=-1) / \
        F.binary_cross_entropy_with_logits(torch.tensor([-2.0]), torch.tensor([1.0]))
    assert easy.item() < 1e-4 and hard.item() > 0.5
    with pytest.raises(ConfigError):
        sigmoid_focal_loss(logits, targets, reduction="avg")
    with pytest.raises(ConfigError):
        sigmoid_focal_loss(logits, targets[:10])


# ------------------------------------------------------------------ matcher

def test_matcher_thresholds():
    iou = torch.tensor([[0.6, 0.45, 0.30, 0.10, 0.5],
                        [0.2, 0.42, 0.39, 0.00, 0.1]])
    m = Matcher(0.5, 0.4, allow_low_quality_matches=False)(iou)
    assert m.tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, 0]
    # low-quality matches: gt 1's best anchor (IoU 0.42) becomes positive, gt 0's best is already positive
    m = Matcher(0.5, 0.4, allow_low_quality_matches=True)(iou)
    assert m.tolist() == [0, 0, BELOW_LOW_THRESHOLD, BELOW_LOW_THRESHOLD, 0]


def test_matcher_low_quality_matches_ties_and_own_best_gt():
    # gt 1 peaks at 0.3 on anchors 1 and 2 (a tie): both claimed
    iou = torch.tensor([[0.7, 0.1, 0.0], [0.05, 0.3, 0.3]])
    assert Matcher()(iou).tolist() == [0, 1, 1]
    assert Matcher(allow_low_quality_matches=False)(iou).tolist() == [0, -1, -1]
    # gt 0's best anchor is anchor 0, whose own best box is gt 1: it is matched to gt 1 (reference rule)
    iou = torch.tensor([[0.35, 0.0], [0.38, 0.0]])
    assert Matcher()(iou).tolist() == [1, -1]
    # a box that overlaps no anchor claims nothing
    assert Matcher()(torch.zeros(1, 3)).tolist() == [-1, -1, -1]
    assert Matcher()(torch.zeros(0, 4)).tolist() == [-1] * 4
    with pytest.raises(ConfigError):
        Matcher(0.4, 0.5)


def test_matcher_on_boxes():
    anchors = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 22], [100, 100, 110, 110]])
    gt = torch.tensor([[0.0, 0, 10, 10]])
    # IoUs 1.0, 100/220 = 0.45 (ignored), 0 (background)
    assert Matcher().match(anchors, gt).tolist() == [0, BETWEEN_THRESHOLDS, BELOW_LOW_THRESHOLD]


# ------------------------------------------------------------------ RetinaNet loss

ANCHORS = torch.tensor([[0.0, 0, 10, 10], [100, 100, 110, 110], [0, 0, 10, 22]])


def _t(boxes, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.long)}


def test_retinanet_loss_counts_positive_negative_and_ignored_anchors():
    g = torch.Generator().manual_seed(1)
    cls = torch.randn(1, 3, 2, generator=g)
    box = torch.randn(1, 3, 4, generator=g)
    out = retinanet_loss(cls, box, ANCHORS, [_t([[0, 0, 10, 10]], [1])])
    # anchor 0 positive (class 1), anchor 1 negative, anchor 2 ignored; one positive -> divide by 1
    want_cls = sigmoid_focal_loss(cls[0, :2], torch.tensor([[0.0, 1.0], [0.0, 0.0]]), reduction="sum")
    assert out["cls"].item() == pytest.approx(want_cls.item(), rel=1e-6)
    want_box = F.smooth_l1_loss(box[0, 0], torch.zeros(4), reduction="sum", beta=1 / 9)
    assert out["box"].item() == pytest.approx(want_box.item(), rel=1e-6)
    # l1 and GIoU variants
    assert retinanet_loss(cls, box, ANCHORS, [_t([[0, 0, 10, 10]], [1])], "l1")["box"].item() == \
        pytest.approx(box[0, 0].abs().sum().item(), rel=1e-6)
    zero = torch.zeros(1, 3, 4)
    assert retinanet_loss(cls, zero, ANCHORS, [_t([[0, 0, 10, 10]], [1])], "giou")["box"].item() == \
        pytest.approx(0.0, abs=1e-6)
    shifted = retinanet_loss(cls, zero, ANCHORS, [_t([[1, 0, 11, 10]], [1])], "giou")["box"].item()
    assert shifted == pytest.approx(1 - 90 / 110, rel=1e-5)  # IoU 90/110, hull = union


def test_retinanet_loss_normalises_by_positives_over_the_batch():
    cls = torch.zeros(2, 3, 2)
    box = torch.ones(2, 3, 4)
    targets = [_t([[0, 0, 10, 10]], [0]), _t([[0, 0, 10, 10], [100, 100, 110, 110]], [1, 0])]
    out = retinanet_loss(cls, box, ANCHORS, targets)
    per_anchor_box = F.smooth_l1_loss(torch.ones(4), torch.zeros(4), reduction="sum", beta=1 / 9).item()
    assert out["box"].item() == pytest.approx(per_anchor_box, rel=1e-6)  # 3 positives, sum / 3
    # image 0: anchor 0 positive, 1 negative, 2 ignored; image 1: anchors 0, 1 positive, 2 ignored
    cls_sum = (sigmoid_focal_loss(torch.zeros(2, 2), torch.tensor([[1.0, 0], [0, 0]]), reduction="sum")
               + sigmoid_focal_loss(torch.zeros(2, 2), torch.tensor([[0.0, 1], [1, 0]]), reduction="sum"))
    assert out["cls"].item() == pytest.approx(cls_sum.item() / 3, rel=1e-6)


def test_retinanet_loss_images_without_boxes():
    cls = torch.zeros(2, 3, 2, requires_grad=True)
    box = torch.randn(2, 3, 4, requires_grad=True)
    empty = _t([], [])
    out = retinanet_loss(cls, box, ANCHORS, [empty, empty])
    assert out["box"].item() == 0.0
    # every anchor is background; normaliser max(1, 0) = 1
    want = sigmoid_focal_loss(torch.zeros(6, 2), torch.zeros(6, 2), reduction="sum")
    assert out["cls"].item() == pytest.approx(want.item(), rel=1e-6)
    (out["cls"] + out["box"]).backward()
    assert cls.grad is not None and box.grad is not None and torch.isfinite(box.grad).all()
    # a degenerate (zero-width) box is ignored rather than producing log(0)
    out = retinanet_loss(cls, box, ANCHORS, [_t([[5, 5, 5, 9]], [0]), empty])
    assert torch.isfinite(out["box"]) and out["box"].item() == 0.0


def test_retinanet_loss_refuses_bad_input():
    cls, box = torch.zeros(1, 3, 2), torch.zeros(1, 3, 4)
    t = [_t([[0, 0, 10, 10]], [1])]
    with pytest.raises(ConfigError, match="box_loss"):
        retinanet_loss(cls, box, ANCHORS, t, box_loss="iou")
    with pytest.raises(ConfigError, match=r"box_deltas"):
        retinanet_loss(cls, torch.zeros(1, 2, 4), ANCHORS, t)
    with pytest.raises(ConfigError, match="anchors"):
        retinanet_loss(cls, box, ANCHORS[:2], t)
    with pytest.raises(ConfigError, match="one target dict per image"):
        retinanet_loss(cls, box, ANCHORS, t + t)
    with pytest.raises(ConfigError, match=r"0\.\.1"):
        retinanet_loss(cls, box, ANCHORS, [_t([[0, 0, 10, 10]], [2])])
    with pytest.raises(ConfigError, match="'boxes'"):
        retinanet_loss(cls, box, ANCHORS, [{"bbox": torch.zeros(0, 4)}])


def test_retinanet_loss_box_targets_use_the_box_coder():
    coder = BoxCoder()
    gt = torch.tensor([[1.0, 2.0, 12.0, 11.0]])  # IoU with anchor 0 = 72/119 > 0.5
    deltas = torch.zeros(1, 3, 4)
    deltas[0, 0] = coder.encode(gt, ANCHORS[:1])[0]
    out = retinanet_loss(torch.zeros(1, 3, 2), deltas, ANCHORS, [_t(gt.tolist(), [0])])
    assert out["box"].item() == pytest.approx(0.0, abs=1e-6)
