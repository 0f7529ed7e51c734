"""DeepLabV3Task (the dense engine's segmentation task protocol) and the confusion-matrix metrics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from manlearn.errors import ConfigError
from manlearn.segmentation import ConfusionMatrix, DeepLabV3Task

CH = [16, 32, 48, 64]
ST = [4, 8, 16, 32]


def _features(b=2, hw=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, hw // s, hw // s, generator=g) for c, s in zip(CH, ST)]


# ------------------------------------------------------------------------------------------------- heads


def test_final_head_shapes_with_and_without_decoder():
    feats = _features()
    task = DeepLabV3Task(num_classes=5, aspp_channels=16)
    head = task.final_head(CH, ST)
    out = head(feats)
    assert tuple(out.shape) == (2, 5, 16, 16) and head.output_stride == 4
    plain = DeepLabV3Task(num_classes=5, aspp_channels=16, decoder=False).final_head(CH, ST)
    assert tuple(plain(feats).shape) == (2, 5, 2, 2) and plain.output_stride == 32
    # Without a stride-4 feature the decoder uses the finest one.
    h8 = task.final_head(CH[1:], ST[1:])
    assert tuple(h8(feats[1:]).shape) == (2, 5, 8, 8) and h8.output_stride == 8
    # Batch 1 in training mode works (no BatchNorm on the 1x1 image-pooling branch).
    head.train()
    assert tuple(head([f[:1] for f in feats]).shape) == (1, 5, 16, 16)


def test_final_head_uses_every_branch_and_the_low_level_feature():
    task = DeepLabV3Task(num_classes=3, aspp_channels=16, atrous_rates=(1, 2, 3))
    head = task.final_head(CH, ST)
    assert len(head.aspp.branches) == 5  # 1x1, three atrous 3x3, image pooling
    assert [b[0].dilation for b in head.aspp.branches[1:4]] == [(1, 1), (2, 2), (3, 3)]
    assert head.low_reduce[0].out_channels == 48 and head.low_reduce[0].in_channels == CH[0]
    feats = [f.requires_grad_() for f in _features()]
    head(feats).square().mean().backward()
    assert feats[0].grad.abs().sum() > 0 and feats[3].grad.abs().sum() > 0
    assert feats[1].grad is None and feats[2].grad is None  # C3, C4 are not used by DeepLabV3+


def test_local_head_shapes():
    task = DeepLabV3Task(num_classes=7, aspp_channels=16, local_channels=12)
    lh = task.local_head(32, 8)
    y = torch.randn(3, 32, 8, 8)
    assert tuple(lh(y).shape) == (3, 7, 8, 8) and lh.output_stride == 8
    assert lh.body[0].out_channels == 12


def test_head_argument_errors():
    task = DeepLabV3Task(num_classes=3, aspp_channels=8)
    with pytest.raises(ConfigError, match="one stride per feature"):
        task.final_head(CH, ST[:3])
    with pytest.raises(ConfigError, match="increase"):
        task.final_head([8, 8], [8, 4])
    with pytest.raises(ConfigError, match="decoder=False"):
        task.final_head([8], [32])
    assert DeepLabV3Task(3, aspp_channels=8, decoder=False).final_head([8], [32]).output_stride == 32
    with pytest.raises(ValueError, match="expects 4 backbone features"):
        task.final_head(CH, ST)(_features()[1:])
    with pytest.raises(ConfigError, match="ignore_index"):
        DeepLabV3Task(num_classes=3, ignore_index=2)
    with pytest.raises(ConfigError, match="num_classes"):
        DeepLabV3Task(num_classes=1)


# --------------------------------------------------------------------------------------- loss / predict


def test_loss_upsamples_and_ignores():
    task = DeepLabV3Task(num_classes=4, ignore_index=255)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 4, 4, generator=g, requires_grad=True)
    target = torch.randint(0, 4, (2, 16, 16), generator=g)
    target[:, :5] = 255
    loss = task.loss(logits, target, (16, 16))
    ref = F.cross_entropy(F.interpolate(logits, size=(16, 16), mode="bilinear", align_corners=False), target,
                          ignore_index=255)
    assert torch.allclose(loss, ref)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    all_ignored = task.loss(logits, torch.full((2, 16, 16), 255), (16, 16))
    assert all_ignored.item() == 0.0 and all_ignored.requires_grad


def test_predict_is_argmax_at_image_size():
    task = DeepLabV3Task(num_classes=3)
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 2, 0, 0] = 5.0  # top-left quadrant -> class 2
    logits[0, 1, 1, 1] = 5.0  # bottom-right -> class 1
    pred = task.predict(logits, (8, 8))
    assert pred.dtype == torch.int64 and tuple(pred.shape) == (1, 8, 8)
    assert pred[0, 0, 0] == 2 and pred[0, 7, 7] == 1 and pred[0, 0, 7] == 0


class _TinyBackbone(nn.Module):
    """Four strided conv stages giving C2..C5 at strides 4..32 with the widths CH."""

    def __init__(self) -> None:
        super().__init__()
        chans = [3] + CH
        self.stages = nn.ModuleList(
            nn.Sequential(nn.Conv2d(chans[i], chans[i + 1], 3, stride=4 if i == 0 else 2, padding=1),
                          nn.BatchNorm2d(chans[i + 1]), nn.ReLU())
            for i in range(4))

    def forward(self, x):
        out = []
        for s in self.stages:
            x = s(x)
            out.append(x)
        return out


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    # Fixed tiny batch: the class of a pixel is a function of the image colour there (learnable).
    masks = torch.randint(0, 3, (4, 4, 4), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    images = F.one_hot(masks, 3).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(4, 3, 64, 64, generator=g)
    masks[:, :2] = 255
    task = DeepLabV3Task(num_classes=3, aspp_channels=16)
    backbone = _TinyBackbone()
    head = task.final_head(CH, ST)
    local = task.local_head(CH[1], ST[1])
    params = [*backbone.parameters(), *head.parameters(), *local.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(25):
        feats = backbone(images)
        loss = task.loss(head(feats), masks, (64, 64)) + task.loss(local(feats[1]), masks, (64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses


# ---------------------------------------------------------------------------------------------- metrics


def test_confusion_matrix_hand_computed():
    # Counted (target, pred) pairs: (0,0) (0,1) (1,1) (1,1) (2,0); the 255 pixel is skipped.
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = ConfusionMatrix(num_classes=4, ignore_index=255)
    cm.update(pred, target)
    assert cm.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    r = cm.compute()
    iou = r["iou"]
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[2] == 0.0
    assert math.isnan(iou[3])  # absent from targets and predictions: not averaged
    assert r["miou"] == pytest.approx(1 / 3)
    assert r["pixel_acc"] == pytest.approx(3 / 5)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    # Two updates accumulate like one.
    cm2 = ConfusionMatrix(4)
    cm2.update(pred[:1], target[:1])
    cm2.update(pred[1:], target[1:])
    assert torch.equal(cm.matrix, cm2.matrix)
    cm2.reset()
    assert cm2.matrix.sum() == 0 and math.isnan(cm2.compute()["miou"])


def test_confusion_matrix_rejects_bad_ids():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="0..2"):
        cm.update(torch.tensor([0, 3]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="0..2"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="same shape"):
        cm.update(torch.tensor([0, 1]), torch.tensor([0]))
    cm.update(torch.tensor([2, 9]), torch.tensor([2, 255]))  # a prediction on an ignored pixel is fine
    assert cm.compute()["pixel_acc"] == 1.0
