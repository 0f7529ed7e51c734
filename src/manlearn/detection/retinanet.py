"""RetinaNet (Lin et al. 2017) pieces, and :class:`RetinaNetTask`, the object the dense-task engine asks
for heads, losses and predictions.

The task protocol (used by :class:`manlearn.LocalLearner`):

* ``task.final_head(channels, strides)`` -> module whose ``forward(features)`` takes *all* backbone stage
  outputs (e.g. C2..C5 of a ResNet with strides 4/8/16/32), picks C3, C4, C5 (strides 8/16/32), runs an
  FPN (P3..P7) and the shared RetinaNet head;
* ``task.local_head(channels, stride)`` -> module whose ``forward(y)`` runs a small RetinaNet-style head
  on one feature map (a local block's auxiliary output, SPEC 3.4);
* both return ``{"cls_logits": [B, A, C], "box_deltas": [B, A, 4], "anchors": [A, 4],
  "image_hw": (H, W), "level_sizes": (A_1, ..., A_L)}`` (``level_sizes``: anchors per level, in order,
  so that post-processing can take its top-k per level);
* ``task.loss(outputs, targets, image_hw)`` -> scalar (focal + box loss);
* ``task.predict(outputs, image_hw)`` -> per image ``{"boxes", "scores", "labels"}``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .anchors import AnchorGenerator, retinanet_anchor_sizes
from .boxes import BoxCoder, batched_nms, clip_boxes
from .losses import BOX_LOSSES, Matcher, check_targets, retinanet_loss

__all__ = ["FPN", "RetinaNetHead", "RetinaNetFinalHead", "RetinaNetLocalHead", "RetinaNetTask",
           "flatten_head_output", "OUTPUT_KEYS"]

#: Keys every head output carries (``level_sizes`` as well, optional for :meth:`RetinaNetTask.predict`).
OUTPUT_KEYS = ("cls_logits", "box_deltas", "anchors", "image_hw")
_FPN_STRIDES = (8, 16, 32)


def flatten_head_output(x: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, A*K, H, W]`` -> ``[B, H*W*A, K]``: location-major, anchor-minor, the order of
    :class:`~manlearn.detection.anchors.AnchorGenerator`."""
    b, _, h, w = x.shape
    return x.view(b, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, k)


def _groups(channels: int, wanted: int = 32) -> int:
    return math.gcd(channels, wanted)


class FPN(nn.Module):
    """Feature pyramid on (C3, C4, C5): 1x1 lateral convs, nearest-neighbour top-down sum, 3x3 output
    convs, then P6 = 3x3 stride-2 conv of P5 (``extra_from="p5"``, torchvision's RetinaNet) or of C5
    (``"c5"``, the paper) and P7 = 3x3 stride-2 conv of ReLU(P6)."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256, extra_from: str = "p5") -> None:
        super().__init__()
        if len(in_channels) != 3:
            raise ConfigError(f"FPN takes three inputs (C3, C4, C5), got channels {tuple(in_channels)}")
        if extra_from not in ("p5", "c5"):
            raise ConfigError(f"FPN extra_from must be 'p5' or 'c5', got {extra_from!r}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.out_channels = int(out_channels)
        self.extra_from = extra_from
        self.lateral = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels)
        self.output = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in self.in_channels)
        p6_in = out_channels if extra_from == "p5" else self.in_channels[-1]
        self.p6 = nn.Conv2d(p6_in, out_channels, 3, stride=2, padding=1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if len(features) != 3:
            raise ConfigError(f"FPN.forward takes [C3, C4, C5], got {len(features)} tensors")
        last = self.lateral[-1](features[-1])
        outs = [self.output[-1](last)]
        for i in (1, 0):
            lat = self.lateral[i](features[i])
            last = lat + F.interpolate(last, size=lat.shape[-2:], mode="nearest")
            outs.insert(0, self.output[i](last))
        p6 = self.p6(outs[-1] if self.extra_from == "p5" else features[-1])
        p7 = self.p7(F.relu(p6))
        return outs + [p6, p7]


class RetinaNetHead(nn.Module):
    """The classification and box subnets, shared over levels: ``num_convs`` x (3x3 conv [+ GroupNorm]
    + ReLU) towers, then a 3x3 conv to ``A*C`` logits / ``A*4`` deltas. Weights N(0, 0.01), biases 0,
    except the class bias ``-log((1 - prior) / prior)`` so that training starts at foreground
    probability ``prior`` (0.01) and the background flood does not swamp the first steps."""

    def __init__(self, in_channels: int, num_anchors: int, num_classes: int, num_convs: int = 4,
                 norm: bool = False, prior: float = 0.01) -> None:
        super().__init__()
        if num_convs < 0 or num_classes < 1 or num_anchors < 1:
            raise ConfigError(f"RetinaNetHead needs num_convs >= 0, num_classes >= 1, num_anchors >= 1; got "
                              f"{num_convs}, {num_classes}, {num_anchors}")
        self.num_anchors, self.num_classes = int(num_anchors), int(num_classes)

        def tower() -> nn.Sequential:
            layers: list[nn.Module] = []
            for _ in range(num_convs):
                layers.append(nn.Conv2d(in_channels, in_channels, 3, padding=1))
                if norm:
                    layers.append(nn.GroupNorm(_groups(in_channels), in_channels))
                layers.append(nn.ReLU(inplace=True))
            return nn.Sequential(*layers)

        self.cls_tower, self.box_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, sum_l H_l W_l A, C]`` logits and ``[B, sum_l H_l W_l A, 4]`` deltas."""
        cls = [flatten_head_output(self.cls_logits(self.cls_tower(f)), self.num_classes) for f in features]
        box = [flatten_head_output(self.bbox_pred(self.box_tower(f)), 4) for f in features]
        return torch.cat(cls, dim=1), torch.cat(box, dim=1)


def _outputs(cls: torch.Tensor, box: torch.Tensor, gen: AnchorGenerator, maps: Sequence[torch.Tensor],
             image_hw: tuple[int, int]) -> dict[str, Any]:
    sizes = [tuple(m.shape[-2:]) for m in maps]
    anchors = gen(sizes, device=cls.device)
    per_loc = gen.num_anchors_per_location()
    level_sizes = tuple(h * w * a for (h, w), a in zip(sizes, per_loc))
    return {"cls_logits": cls, "box_deltas": box, "anchors": anchors, "image_hw": image_hw,
            "level_sizes": level_sizes}


class RetinaNetFinalHead(nn.Module):
    """FPN on the stride-8/16/32 stage outputs + shared RetinaNet head + P3..P7 anchors (sizes 32..512,
    3 scales x 3 aspect ratios). ``forward`` takes every stage output, in the order of ``channels``."""

    def __init__(self, channels: Sequence[int], strides: Sequence[int], num_classes: int, fpn_channels: int = 256,
                 head_convs: int = 4, norm: bool = False, extra_from: str = "p5") -> None:
        super().__init__()
        self.channels, self.strides = tuple(int(c) for c in channels), tuple(int(s) for s in strides)
        if len(self.channels) != len(self.strides):
            raise ConfigError(f"final_head: {len(self.channels)} channel counts but {len(self.strides)} strides")
        missing = [s for s in _FPN_STRIDES if s not in self.strides]
        if missing:
            raise ConfigError(f"RetinaNet's FPN needs stage outputs at strides 8, 16 and 32 (C3, C4, C5); the "
                              f"backbone stages have strides {self.strides}")
        self.in_indices = tuple(self.strides.index(s) for s in _FPN_STRIDES)
        self.fpn = FPN([self.channels[i] for i in self.in_indices], fpn_channels, extra_from)
        self.anchor_generator = AnchorGenerator(retinanet_anchor_sizes(), (0.5, 1.0, 2.0), (8, 16, 32, 64, 128))
        self.head = RetinaNetHead(fpn_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes,
                                  head_convs, norm)

    def forward(self, features: Sequence[torch.Tensor]) -> dict[str, Any]:
        if len(features) != len(self.channels):
            raise ConfigError(f"final head built for {len(self.channels)} stage outputs (channels "
                              f"{self.channels}), got {len(features)}")
        c = [features[i] for i in self.in_indices]
        for f, i in zip(c, self.in_indices):
            if f.dim() != 4 or f.shape[1] != self.channels[i]:
                raise ConfigError(f"stage output {i} must be [B, {self.channels[i]}, H, W], got {tuple(f.shape)}")
        p = self.fpn(c)
        cls, box = self.head(p)
        hw = (int(c[0].shape[-2]) * 8, int(c[0].shape[-1]) * 8)
        return _outputs(cls, box, self.anchor_generator, p, hw)


class RetinaNetLocalHead(nn.Module):
    """A local block's detection head: 1x1 conv to ``local_channels`` (the role of an FPN lateral conv),
    a :class:`RetinaNetHead` with ``num_convs`` (default 2) conv layers per tower, and a single anchor
    level at ``stride`` with base size ``4 * stride`` x ``2^(k/3)`` (k < 3 * octaves) x ratios
    (0.5, 1, 2). ``4 * stride`` is RetinaNet's own size rule, so at the strides the local blocks output
    (8, 16, 32: y is built from the next stage's first unit) the local anchors are exactly those of P3,
    P4, P5; larger objects still get their best anchors through the low-quality matches."""

    def __init__(self, channels: int, stride: int, num_classes: int, local_channels: int = 256, num_convs: int = 2,
                 norm: bool = False, octaves: int = 1) -> None:
        super().__init__()
        if stride < 1 or octaves < 1:
            raise ConfigError(f"local_head needs stride >= 1 and octaves >= 1, got stride={stride}, octaves={octaves}")
        self.channels, self.stride = int(channels), int(stride)
        self.proj = nn.Conv2d(channels, local_channels, 1)
        nn.init.kaiming_uniform_(self.proj.weight, a=1)
        nn.init.zeros_(self.proj.bias)
        self.anchor_generator = AnchorGenerator.single_level(stride, octaves=octaves)
        self.head = RetinaNetHead(local_channels, self.anchor_generator.num_anchors_per_location()[0], num_classes,
                                  num_convs, norm)

    def forward(self, y: torch.Tensor) -> dict[str, Any]:
        if y.dim() != 4 or y.shape[1] != self.channels:
            raise ConfigError(f"local head built for [B, {self.channels}, H, W] inputs, got {tuple(y.shape)}")
        f = self.proj(y)
        cls, box = self.head([f])
        hw = (int(y.shape[-2]) * self.stride, int(y.shape[-1]) * self.stride)
        return _outputs(cls, box, self.anchor_generator, [f], hw)


class RetinaNetTask:
    """RetinaNet as a dense task for the local-learning engine (see the module docstring for the protocol).

    Args:
        num_classes: foreground classes (labels 0..C-1; no background class, sigmoid outputs).
        fpn_channels: FPN / head width (256 in the paper; tests use 16).
        head_convs: conv layers per tower of the final head (4).
        box_loss: ``"smooth_l1"`` (beta 0.11), ``"l1"`` or ``"giou"``.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: post-processing (0.05, 0.5, 100,
            1000 per level, the paper's / torchvision's values).
        local_channels: width of the local heads (default ``fpn_channels``).
        local_convs: conv layers per tower of the local heads (2: cheaper than the final head's 4, as
            an auxiliary network should be).
        local_octaves: octaves of anchor sizes of a local head (1: 3 sizes from ``4 * stride``).
        norm: GroupNorm in the head towers (off, as in the paper).
        fpn_extra_from: P6 from ``"p5"`` (torchvision) or ``"c5"`` (paper).
    """

    reads = "stages"  # the final head reads every stage (manlearn.tasks.Task)
    per_image_labels = False
    fixed_input_size = False


    name = "retinanet"

    def __init__(self, num_classes: int, fpn_channels: int = 256, head_convs: int = 4, box_loss: str = "smooth_l1",
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 topk_candidates: int = 1000, local_channels: int | None = None, *, local_convs: int = 2,
                 local_octaves: int = 1, norm: bool = False, fpn_extra_from: str = "p5",
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, smooth_l1_beta: float = 1.0 / 9) -> None:
        if box_loss not in BOX_LOSSES:
            raise ConfigError(f"unknown box_loss {box_loss!r}; choose one of {BOX_LOSSES}")
        if num_classes < 1 or fpn_channels < 1:
            raise ConfigError(f"RetinaNetTask needs num_classes >= 1 and fpn_channels >= 1, got {num_classes}, "
                              f"{fpn_channels}")
        if detections_per_img < 1 or topk_candidates < 1:
            raise ConfigError("detections_per_img and topk_candidates must be at least 1")
        self.num_classes = int(num_classes)
        self.fpn_channels = int(fpn_channels)
        self.head_convs = int(head_convs)
        self.box_loss = box_loss
        self.score_thresh, self.nms_thresh = float(score_thresh), float(nms_thresh)
        self.detections_per_img, self.topk_candidates = int(detections_per_img), int(topk_candidates)
        self.local_channels = int(local_channels) if local_channels is not None else self.fpn_channels
        self.local_convs, self.local_octaves = int(local_convs), int(local_octaves)
        self.norm, self.fpn_extra_from = bool(norm), fpn_extra_from
        self.focal_alpha, self.focal_gamma, self.smooth_l1_beta = focal_alpha, focal_gamma, smooth_l1_beta
        self.matcher = Matcher(0.5, 0.4, allow_low_quality_matches=True)
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))

    def final_head(self, channels: Sequence[int], strides: Sequence[int]) -> RetinaNetFinalHead:
        """FPN + RetinaNet head over the backbone's stage outputs (``channels``/``strides`` in stage order)."""
        return RetinaNetFinalHead(channels, strides, self.num_classes, self.fpn_channels, self.head_convs,
                                  self.norm, self.fpn_extra_from)

    def local_head(self, channels: int, stride: int) -> RetinaNetLocalHead:
        """A single-level RetinaNet-style head for a local block's auxiliary output (see
        :class:`RetinaNetLocalHead` for the anchor choice)."""
        return RetinaNetLocalHead(channels, stride, self.num_classes, self.local_channels, self.local_convs,
                                  self.norm, self.local_octaves)

    def check_targets(self, x: torch.Tensor, targets: Any) -> None:
        """One ``{"boxes", "labels"}`` dict per image, before any work (label values where they are on the CPU)."""
        on_cpu = all(isinstance(t, Mapping) and isinstance(t.get("labels"), torch.Tensor)
                     and t["labels"].device.type == "cpu" for t in targets) if isinstance(targets, (list, tuple)) else False
        check_targets(targets, x.shape[0], self.num_classes if on_cpu else None)

    @staticmethod
    def _check_outputs(outputs: Mapping[str, Any]) -> None:
        missing = [k for k in ("cls_logits", "box_deltas", "anchors") if k not in outputs]
        if missing:
            raise ConfigError(f"head outputs lack {missing}; a RetinaNet head returns a dict with keys {OUTPUT_KEYS}")

    def loss_terms(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
                   image_hw: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """``{"cls": focal loss, "box": box loss}``, each normalised by the number of positive anchors."""
        self._check_outputs(outputs)
        return retinanet_loss(outputs["cls_logits"], outputs["box_deltas"], outputs["anchors"], targets,
                              self.box_loss, matcher=self.matcher, box_coder=self.box_coder,
                              focal_alpha=self.focal_alpha, focal_gamma=self.focal_gamma,
                              smooth_l1_beta=self.smooth_l1_beta)

    def loss(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, torch.Tensor]],
             image_hw: tuple[int, int] | None = None) -> torch.Tensor:
        """Scalar training loss (focal + box) for the outputs of either head. ``image_hw`` is accepted
        for the protocol; the anchors already live in image pixels, so the loss does not need it."""
        terms = self.loss_terms(outputs, targets, image_hw)
        return terms["cls"] + terms["box"]

    @torch.no_grad()
    def predict(self, outputs: Mapping[str, Any], image_hw: tuple[int, int] | None = None,
                image_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict[str, torch.Tensor]]:
        """Detections per image: per level, the top ``topk_candidates`` (anchor, class) scores above
        ``score_thresh``; their boxes decoded and clipped to the image; class-wise NMS at
        ``nms_thresh``; the best ``detections_per_img`` kept. Boxes are in the (resized, padded) input
        pixels; ``image_sizes`` (per image ``(h, w)`` before padding) clips tighter than ``image_hw``."""
        self._check_outputs(outputs)
        cls, deltas, anchors = outputs["cls_logits"], outputs["box_deltas"], outputs["anchors"]
        b, a, c = cls.shape
        if deltas.shape != (b, a, 4) or anchors.shape != (a, 4):
            raise ConfigError(f"inconsistent head outputs: cls_logits {tuple(cls.shape)}, box_deltas "
                              f"{tuple(deltas.shape)}, anchors {tuple(anchors.shape)}")
        hw = image_hw if image_hw is not None else outputs.get("image_hw")
        if image_sizes is not None and len(image_sizes) != b:
            raise ConfigError(f"image_sizes must give one (h, w) per image: {b} images, {len(image_sizes)} sizes")
        level_sizes = tuple(outputs.get("level_sizes") or (a,))
        if sum(level_sizes) != a:
            raise ConfigError(f"level_sizes {level_sizes} do not add up to the {a} anchors")
        results = []
        for i in range(b):
            boxes_all, scores_all, labels_all = [], [], []
            start = 0
            for n in level_sizes:
                logits = cls[i, start:start + n].float().flatten()
                scores = torch.sigmoid(logits)
                idx = torch.nonzero(scores > self.score_thresh).flatten()
                scores = scores[idx]
                k = min(self.topk_candidates, idx.numel())
                scores, order = scores.topk(k)
                idx = idx[order]
                anchor_idx = torch.div(idx, c, rounding_mode="floor") + start
                labels = idx % c
                boxes = self.box_coder.decode(deltas[i, anchor_idx].float(), anchors[anchor_idx].float())
                clip_hw = image_sizes[i] if image_sizes is not None else hw
                if clip_hw is not None:
                    boxes = clip_boxes(boxes, (int(clip_hw[0]), int(clip_hw[1])))
                boxes_all.append(boxes)
                scores_all.append(scores)
                labels_all.append(labels)
                start += n
            boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
