"""Box ops of manlearn.detection against brute-force Python references."""
from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from manlearn.detection import (BoxCoder, batched_nms, box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                clip_boxes, generalized_box_iou, nms, paired_box_iou, paired_generalized_box_iou,
                                remove_small_boxes)
from manlearn.detection.boxes import _batched_nms_offsets, _batched_nms_per_label, _greedy_matrix
from manlearn.errors import ConfigError


# ------------------------------------------------------------------ references

def ref_iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def ref_giou(a, b):
    iou = ref_iou(a, b)
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    hull = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
    return iou - (hull - union) / hull


def ref_nms(boxes, scores, thr, labels=None):
    order = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    kept = []
    for i in order:
        if all(ref_iou(boxes[i], boxes[j]) <= thr for j in kept
               if labels is None or labels[i] == labels[j]):
            kept.append(i)
    return kept


def random_boxes(n, rng, span=100.0, max_wh=40.0):
    out = []
    for _ in range(n):
        x, y = rng.uniform(0, span), rng.uniform(0, span)
        out.append([x, y, x + rng.uniform(0.5, max_wh), y + rng.uniform(0.5, max_wh)])
    return out


# ------------------------------------------------------------------ conversions / IoU

def test_cxcywh_round_trip_and_values():
    b = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    c = box_xyxy_to_cxcywh(b)
    assert c.tolist() == [[20.0, 40.0, 20.0, 40.0]]
    assert torch.allclose(box_cxcywh_to_xyxy(c), b)
    assert box_area(b).tolist() == [800.0]


def test_box_iou_and_giou_match_brute_force():
    rng = random.Random(0)
    a, b = random_boxes(13, rng), random_boxes(9, rng)
    a.append(list(b[0]))  # an identical pair: IoU 1
    a.append([500.0, 500.0, 510.0, 510.0])  # disjoint from everything: IoU 0, GIoU < 0
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    iou, giou = box_iou(ta, tb), generalized_box_iou(ta, tb)
    assert iou.shape == giou.shape == (15, 9)
    for i in range(len(a)):
        for j in range(len(b)):
            assert iou[i, j].item() == pytest.approx(ref_iou(a[i], b[j]), abs=1e-12)
            assert giou[i, j].item() == pytest.approx(ref_giou(a[i], b[j]), abs=1e-12)
    assert iou[13, 0].item() == pytest.approx(1.0)
    assert (giou[14] < 0).all() and (iou[14] == 0).all()
    # paired versions are the diagonals
    n = 9
    assert torch.allclose(paired_box_iou(ta[:n], tb), torch.diagonal(box_iou(ta[:n], tb)))
    assert torch.allclose(paired_generalized_box_iou(ta[:n], tb), torch.diagonal(generalized_box_iou(ta[:n], tb)))


def test_iou_of_zero_area_boxes_is_zero_not_nan():
    z = torch.tensor([[5.0, 5.0, 5.0, 5.0]])
    assert box_iou(z, z).item() == 0.0
    assert not torch.isnan(generalized_box_iou(z, z)).any()


def test_box_ops_refuse_wrong_shapes():
    with pytest.raises(ConfigError, match=r"\[N, 4\]"):
        box_iou(torch.zeros(3, 5), torch.zeros(2, 4))
    with pytest.raises(ConfigError):
        paired_box_iou(torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ConfigError):
        nms(torch.zeros(3, 4), torch.zeros(2), 0.5)
    with pytest.raises(ConfigError):
        BoxCoder(weights=(1.0, 1.0, 1.0))


# ------------------------------------------------------------------ box coder

_coord = st.floats(-200, 200, allow_nan=False, allow_infinity=False)
_size = st.floats(4, 200, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_coord, _coord, _size, _size, _coord, _coord, _size, _size), min_size=1, max_size=8),
       st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)]))
def test_box_coder_round_trip(rows, weights):
    gt = torch.tensor([[x, y, x + w, y + h] for x, y, w, h, *_ in rows], dtype=torch.float64)
    anchors = torch.tensor([[x, y, x + w, y + h] for *_, x, y, w, h in rows], dtype=torch.float64)
    coder = BoxCoder(weights)
    deltas = coder.encode(gt, anchors)
    assert deltas.shape == gt.shape
    assert torch.allclose(coder.decode(deltas, anchors), gt, atol=1e-8, rtol=1e-10)


def test_box_coder_identity_and_clamp():
    coder = BoxCoder()
    a = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    assert torch.equal(coder.encode(a, a), torch.zeros(1, 4))
    # a huge dw/dh is clamped at log(1000/16): the decoded box is at most 1000/16 times the anchor
    d = coder.decode(torch.tensor([[0.0, 0.0, 50.0, 50.0]]), a)
    assert torch.isfinite(d).all()
    assert (d[0, 2] - d[0, 0]).item() == pytest.approx(1000.0, rel=1e-5)
    # decode broadcasts over a batch dimension
    assert coder.decode(torch.zeros(3, 5, 4), torch.rand(5, 4) + torch.tensor([0, 0, 1, 1.0])).shape == (3, 5, 4)


# ------------------------------------------------------------------ NMS

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.7])
def test_nms_matches_greedy_reference(seed, thr):
    rng = random.Random(seed)
    n = rng.randint(1, 60)
    boxes = random_boxes(n, rng, span=60)
    # scores from a small set: many exact ties, broken by index
    scores = [float(rng.randint(0, 4)) for _ in range(n)]
    tb, ts = torch.tensor(boxes, dtype=torch.float64), torch.tensor(scores)
    want = ref_nms(boxes, scores, thr)
    assert nms(tb, ts, thr).tolist() == want
    # the accelerator path's greedy pass over the boolean matrix agrees
    order = torch.sort(ts, descending=True, stable=True).indices
    over = (box_iou(tb[order], tb[order]) > thr).numpy()
    assert order[_greedy_matrix(over)].tolist() == want


@pytest.mark.parametrize("seed", range(5))
def test_batched_nms_matches_per_label_reference(seed):
    rng = random.Random(100 + seed)
    n = rng.randint(1, 80)
    boxes = random_boxes(n, rng, span=50)
    scores = [float(rng.randint(0, 5)) for _ in range(n)]
    labels = [rng.randint(0, 3) for _ in range(n)]
    want = sorted(ref_nms(boxes, scores, 0.5, labels), key=lambda i: (-scores[i], i))
    args = (torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels), 0.5)
    assert batched_nms(*args).tolist() == want
    assert _batched_nms_per_label(*args).tolist() == want
    assert _batched_nms_offsets(*args).tolist() == want


def test_nms_suppresses_overlap_keeps_disjoint_and_handles_empty():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30]], dtype=torch.float32)
    scores = torch.tensor([0.9, 0.95, 0.1])
    assert nms(boxes, scores, 0.5).tolist() == [1, 2]
    assert batched_nms(boxes, scores, torch.tensor([0, 1, 0]), 0.5).tolist() == [1, 0, 2]
    empty = torch.zeros(0, 4)
    assert nms(empty, torch.zeros(0), 0.5).tolist() == []
    assert batched_nms(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).tolist() == []


def test_clip_and_remove_small():
    b = torch.tensor([[-5.0, -5.0, 50.0, 20.0], [10.0, 10.0, 11.0, 30.0]])
    assert clip_boxes(b, (16, 32)).tolist() == [[0.0, 0.0, 32.0, 16.0], [10.0, 10.0, 11.0, 16.0]]
    assert remove_small_boxes(b, 2.0).tolist() == [0]
    assert math.isclose(box_area(clip_boxes(b, (16, 32)))[0].item(), 512.0)
