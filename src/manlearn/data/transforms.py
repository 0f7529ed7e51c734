"""Batched, device-side image transforms: uint8 batch in, normalised float32 batch out.

Why batched: per-sample Python transforms (the torchvision way) dominate the step time of the small
networks trained here, and torchvision is unavailable anyway.  The whole pipeline for a batch is one
index computation, one ``gather`` on the uint8 tensor and one fused multiply-add, wherever the batch lives.

Padding is *virtual*: instead of materialising ``F.pad(x)`` and then cutting a window out of it, each output
pixel's source coordinate in the unpadded image is computed (zero padding -> coordinate marked invalid
and filled with 0; reflect padding -> coordinate mirrored), and the crop (and flip) are folded into those
coordinates.  The result is identical to pad-then-crop-then-flip, without the padded copy, and works for
uint8 on every device (reflect-padding uint8 is not supported everywhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from manlearn.errors import DatasetError

from .info import DatasetInfo

__all__ = ["Augment", "AUGMENTATIONS", "augmentation_for", "BatchTransform"]


@dataclass(frozen=True)
class Augment:
    """Training augmentation: random crop of the model size from a ``pad``-pixel border, optional h-flip.

    ``mode`` is ``"zero"`` (pixel value 0 before normalisation) or ``"reflect"`` (mirror, not repeating the
    edge pixel, as ``F.pad(mode="reflect")``).
    """

    pad: int = 0
    mode: str = "zero"
    flip: bool = False

    def __post_init__(self) -> None:
        if self.pad < 0:
            raise ValueError(f"Augment.pad must be >= 0, got {self.pad}")
        if self.mode not in ("zero", "reflect"):
            raise ValueError(f"Augment.mode must be 'zero' or 'reflect', got {self.mode!r}")


#: Training augmentation per dataset (SPEC sections 5 and 8).
AUGMENTATIONS: dict[str, Augment] = {
    "fashion-mnist": Augment(2, "zero", True),  # FM-R32: crop 32 from a further 2-pixel zero pad + flip
    "mnist": Augment(2, "zero", True),
    "cifar10": Augment(4, "reflect", True),
    "cifar100": Augment(4, "reflect", True),
    "svhn": Augment(2, "zero", False),  # digits are not mirror-symmetric
    "stl10": Augment(4, "zero", True),
    "digits": Augment(1, "zero", False),
    "imagefolder": Augment(4, "zero", True),
}


def augmentation_for(name: str) -> Augment:
    """The training augmentation of dataset ``name``; none at all for names manlearn does not know."""
    return AUGMENTATIONS.get(name, Augment())


class BatchTransform:
    """uint8 ``[B, C_stored, H, W]`` (any device) -> float32 ``[B, info.in_channels, S, S]`` normalised.

    ``S = info.image_size``.  A stored image smaller than ``S`` is zero-padded, centred (Fashion-MNIST
    28 -> 32); grey (``C_stored == 1``) is replicated to ``info.in_channels``.  With ``train=True`` each
    sample gets a random crop offset (and flip, if the dataset's :class:`Augment` says so) drawn from
    ``generator``; with ``train=False`` the transform is deterministic.  ``augment`` overrides the
    dataset's default training augmentation.
    """

    def __init__(self, info: DatasetInfo, train: bool, *, augment: Augment | None = None) -> None:
        self.info = info
        self.train = bool(train)
        self.augment = augment if augment is not None else augmentation_for(info.name)
        self.size = int(info.image_size)
        if self.augment.mode == "reflect" and self.augment.pad >= self.size:
            raise ValueError(f"reflect padding of {self.augment.pad} needs images larger than {self.size}")
        std = torch.tensor(info.std, dtype=torch.float32)
        mean = torch.tensor(info.mean, dtype=torch.float32)
        # (x/255 - mean)/std == x * scale + bias, done as one addcmul.
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self._bias = (-mean / std).view(1, -1, 1, 1)
        self._consts: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return f"BatchTransform({self.info.name!r}, train={self.train}, augment={self.augment})"

    def _constants(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        c = self._consts.get(device)
        if c is None:  # copied to the device once, not every batch
            c = (self._scale.to(device), self._bias.to(device))
            self._consts[device] = c
        return c

    def _source(
        self, coord: torch.Tensor, pad: int, base: int, stored: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map coordinates in the augmentation-padded frame to (index into the stored image, valid mask)."""
        s = self.size
        c = coord - pad  # frame of the S-sized (base-padded) image
        if self.augment.mode == "reflect" and pad > 0:
            c = torch.where(c < 0, -c, c)
            c = torch.where(c > s - 1, 2 * (s - 1) - c, c)
        src = c - base  # frame of the stored image
        valid = (src >= 0) & (src < stored)
        return src.clamp_(0, stored - 1), valid

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Transform one batch; random draws (train only) come from ``generator`` in a fixed order."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DatasetError(
                f"{self.info.name}: BatchTransform expects uint8 [B, C, H, W], got "
                f"{images.dtype} {tuple(images.shape)}"
            )
        b, c, h, w = images.shape
        s, cin = self.size, self.info.in_channels
        if c not in (1, cin):
            raise DatasetError(f"{self.info.name}: images have {c} channels, model expects {cin} (or 1 for grey)")
        if h > s or w > s:
            raise DatasetError(f"{self.info.name}: stored images are {h}x{w}, larger than the model size {s}")
        base_h, base_w = (s - h) // 2, (s - w) // 2
        pad = self.augment.pad if self.train else 0
        flip = self.train and self.augment.flip
        dev = images.device

        if pad == 0 and not flip and h == s and w == s:
            x = images  # nothing to move: straight to normalisation
        else:
            ar = torch.arange(s, device=dev)
            if pad > 0 or flip:
                gdev = generator.device if generator is not None else torch.device("cpu")
                # Fixed draw order (row offsets, column offsets, flips) keeps results reproducible.
                oy = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
                ox = torch.randint(0, 2 * pad + 1, (b,), generator=generator, device=gdev)
                fl = (
                    torch.randint(0, 2, (b,), generator=generator, device=gdev)
                    if flip
                    else torch.zeros(b, dtype=torch.long, device=gdev)
                )
                p = torch.stack((oy, ox, fl)).to(dev, non_blocking=True)  # one small transfer
                rows = p[0, :, None] + ar
                # Flip folded into the column indices: per-sample torch.where on the mask.
                cols = torch.where(p[2, :, None].bool(), p[1, :, None] + (s - 1) - ar, p[1, :, None] + ar)
            else:
                rows = (ar + pad)[None]
                cols = rows
            rsrc, rvalid = self._source(rows, pad, base_h, h)
            csrc, cvalid = self._source(cols, pad, base_w, w)
            lin = (rsrc[:, :, None] * w + csrc[:, None, :]).reshape(-1, 1, s * s)
            x = images.reshape(b, c, h * w).gather(2, lin.expand(b, c, s * s)).view(b, c, s, s)
            zero_pad = h < s or w < s or (pad > 0 and self.augment.mode == "zero")
            if zero_pad:
                valid = (rvalid[:, :, None] & cvalid[:, None, :])[:, None]
                x = x.masked_fill_(~valid, 0)
        scale, bias = self._constants(dev)
        # Broadcasting [B,1,S,S] against [1,Cin,1,1] replicates grey to Cin channels for free.
        return torch.addcmul(bias, x.float(), scale)


def mix_batch(x: torch.Tensor, y: torch.Tensor, num_classes: int, mixup_alpha: float, cutmix_alpha: float,
              seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a normalised batch with its reversed self (timm's pairing); returns the mixed
    images and soft targets ``[B, num_classes]`` (per-class probabilities).

    One mixing coefficient λ ~ Beta(α, α) per batch; with both alphas set, CutMix or Mixup with
    probability 1/2. CutMix pastes a box of area (1−λ) (clipped to the image; λ is then recomputed from the
    pasted area). Everything is drawn from ``seed`` (the trainer passes a pure function of (seed, step), so
    a resumed run mixes exactly as an uninterrupted one).
    """
    rng = np.random.default_rng(seed)
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    lam = float(rng.beta(alpha, alpha))
    onehot = torch.nn.functional.one_hot(y, num_classes).to(x.dtype)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[..., y0:y1, x0:x1] = x.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    else:
        x = x * lam + x.flip(0) * (1.0 - lam)
    return x, onehot * lam + onehot.flip(0) * (1.0 - lam)
