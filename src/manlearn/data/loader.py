"""A deterministic, resumable, device-resident mini-batch loader.

Why not ``torch.utils.data.DataLoader``: worker processes and per-sample transforms cost more than the
small models trained here, and its shuffling draws from the global RNG, which makes resuming mid-epoch
inexact.  Here the whole uint8 split sits on the device, every batch is an index_select plus one
:class:`BatchTransform`, and the permutation and augmentation of batch ``b`` of epoch ``e`` are a pure
function of ``(seed, e, b)``: resuming at any batch reproduces the original run bit for bit.
"""

from __future__ import annotations

from typing import Iterator

import torch

from manlearn.runtime import TAG_AUG as _TAG_AUG, TAG_PERM as _TAG_PERM, derive_seed  # the one seed mixer

from .info import ImageData
from .transforms import BatchTransform

__all__ = ["BatchLoader", "derive_seed"]


class EpochOrder:
    """What every loader shares: options, batches per epoch, and the sample order of an epoch as a
    pure function of (seed, epoch) — which is what makes resuming exact. Subclasses provide
    ``num_samples`` and may set ``perm_tag`` to keep their permutation stream apart."""

    perm_tag = _TAG_PERM
    num_samples: int

    def _setup(self, info, batch_size: int, train: bool, shuffle: bool | None, drop_last: bool | None,
               device: str | torch.device, seed: int, channels_last: bool) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.info = info
        self.batch_size = batch_size
        self.train = bool(train)
        self.shuffle = self.train if shuffle is None else bool(shuffle)
        self.drop_last = self.train if drop_last is None else bool(drop_last)
        self.device = torch.device(device)
        self.seed = int(seed)
        self.channels_last = bool(channels_last)

    def __len__(self) -> int:
        """Batches per epoch."""
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def order(self, epoch: int) -> torch.Tensor:
        """Sample order of ``epoch`` (CPU int64): a permutation seeded by (seed, epoch), or 0..N-1."""
        n = self.num_samples
        if not self.shuffle:
            return torch.arange(n)
        g = torch.Generator().manual_seed(derive_seed(self.perm_tag, self.seed, epoch))
        return torch.randperm(n, generator=g)


class BatchLoader(EpochOrder):
    """Iterate over ``data`` in mini-batches of normalised float32 images and int64 labels on ``device``.

    ``shuffle`` and ``drop_last`` default to ``train``.  The uint8 images are moved to ``device`` once, here.
    ``channels_last`` returns images in ``torch.channels_last`` memory format (same values).
    """

    def __init__(
        self,
        data: ImageData,
        batch_size: int,
        *,
        train: bool,
        shuffle: bool | None = None,
        drop_last: bool | None = None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        channels_last: bool = False,
    ) -> None:
        self._setup(data.info, batch_size, train, shuffle, drop_last, device, seed, channels_last)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.transform = BatchTransform(data.info, self.train)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` for batches ``start_batch, start_batch+1, ...`` of ``epoch``.

        Batch ``b`` is identical whether or not the iteration started at 0, which makes resuming exact.
        The global torch RNG is never used.
        """
        epoch, start_batch = int(epoch), int(start_batch)
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        nb = len(self)
        if not 0 <= start_batch <= nb:
            raise ValueError(f"start_batch must lie in 0..{nb}, got {start_batch}")
        return self._iterate(epoch, start_batch, nb)

    def _iterate(self, epoch: int, start_batch: int, nb: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs, n = self.batch_size, self.num_samples
        order = self.order(epoch).to(self.device) if self.shuffle else None
        for b in range(start_batch, nb):
            lo, hi = b * bs, min((b + 1) * bs, n)
            if order is None:
                xb, yb = self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                xb, yb = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            gen = None
            if self.train:
                gen = torch.Generator().manual_seed(derive_seed(_TAG_AUG, self.seed, epoch, b))
            x = self.transform(xb, generator=gen)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, yb
