"""The loaders' contract (:class:`BatchLoader`), their one rule of order and sharding (:class:`EpochOrder`), and
the in-memory loader: uint8 images on the device, augmented there in whole batches."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from models.errors import DataError

from .base import ArrayData, DatasetInfo


@runtime_checkable
class BatchLoader(Protocol):
    """What the trainer, the evaluation and the calibration read: :class:`Loader` (in memory) and
    :class:`~train.data.stream.StreamLoader` (decoded on the fly) both are one.

    Iterating yields ``(x, y)``: ``x`` float32 ``[B, 3, H, W]`` normalised, on the loader's device, ``y`` int64
    ``[B]``. ``num_samples`` is what one epoch yields on this rank (a training loader drops the last partial
    batch), ``len()`` its batches; the order of an epoch is :class:`EpochOrder`'s.
    """

    num_samples: int
    batch_size: int
    train: bool
    labels: torch.Tensor  #: the split's labels, all ranks' (what an epoch leaves out is counted from them)

    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def set_epoch(self, epoch: int) -> None: ...
    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None: ...


class BatchSizeError(DataError):
    """A training batch larger than the training samples of a rank (``batch_size`` and ``samples`` are kept, so that
    a caller whose user cannot pass ``--batch-size`` can say what to do instead)."""

    def __init__(self, batch_size: int, samples: int) -> None:
        super().__init__(f"batch size {batch_size} exceeds the {samples} training samples per rank; "
                         "pass a smaller --batch-size or a larger --subset")
        self.batch_size, self.samples = batch_size, samples


class EpochOrder:
    """The one rule of which samples a rank sees, in which order, written once for both loaders.

    Training: the permutation of all ``n`` samples drawn from a generator seeded with ``seed * 1000003 + epoch``
    (the generator goes on to draw the epoch's augmentation), of which rank ``r`` takes ``perm[r::world_size]``,
    cut to the same whole number of batches on every rank. Test: file order, rank ``r`` takes ``r::world_size``,
    the last partial batch kept. So a resumed run sees exactly the batches it would have, whatever the loader.

    Raises:
        DataError: a non-positive batch, a rank outside the world, or fewer training samples than one batch.
    """

    def __init__(self, n: int, batch_size: int, train: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1) -> None:
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be positive; pass --batch-size 1 or more")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}; check the launcher's environment")
        self.n, self.batch_size, self.train = n, batch_size, train
        self.seed, self.rank, self.world_size = seed, rank, world_size
        if train:
            self.num_samples = n // world_size // batch_size * batch_size
            if self.num_samples == 0:
                raise BatchSizeError(batch_size, n // world_size)
        else:
            self.num_samples = len(range(rank, n, world_size))

    def generator(self, epoch: int) -> torch.Generator:
        """The epoch's generator: it draws the permutation first (:meth:`indices`), then any augmentation."""
        return torch.Generator().manual_seed(self.seed * 1000003 + epoch)

    def indices(self, g: torch.Generator | None = None) -> torch.Tensor:
        """This rank's samples for the epoch of ``g`` (train; drawn from it) or in file order (test)."""
        if not self.train:
            return torch.arange(self.rank, self.n, self.world_size)
        return self.mine(torch.randperm(self.n, generator=g))

    def mine(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's share of a per-position tensor of the whole epoch (the permutation, its augmentation)."""
        return t[self.rank:self.rank + self.world_size * self.num_samples:self.world_size]


class Loader:
    """Yields ``(x, y)`` batches from a uint8 dataset that lives on ``device``.

    ``x`` is float32 ``[B, 3, H, W]``, normalized by the dataset's mean and std; ``y`` is int64 ``[B]``.
    Training loaders shuffle, drop the last partial batch and augment (random crop with zero padding of
    ``image_size // 8``, random horizontal flip), all drawn from a generator seeded with
    ``seed * 1000003 + epoch``; call :meth:`set_epoch` before each epoch. Test loaders keep the order and
    the last partial batch. With ``world_size > 1``, a training rank takes ``perm[rank::world_size]`` cut
    to the same length on every rank, and a test rank takes ``indices[rank::world_size]``.

    Args:
        data: The split.
        info: Its dataset info (for mean and std).
        batch_size: Samples per batch on this rank.
        train: Shuffle, augment and drop the last partial batch.
        device: Where the images live and the batches are made.
        seed: Seed of the shuffling and augmentation.
        rank: This process's rank.
        world_size: Number of processes.
        channels_last: Return ``x`` in channels-last memory format.
    """

    #: How it loads (the start line names it).
    kind = "in-memory"

    def __init__(
        self,
        data: ArrayData,
        info: DatasetInfo,
        batch_size: int,
        *,
        train: bool,
        device: torch.device | str = "cpu",
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        channels_last: bool = False,
    ) -> None:
        self.order = EpochOrder(len(data.labels), batch_size, train, seed, rank, world_size)
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.pad = self.images.shape[-1] // 8
        self.set_normalization(info.mean, info.std)
        self.epoch = 0
        self.num_samples = self.order.num_samples

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch whose order and augmentation the next iteration uses."""
        self.epoch = epoch

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        """Normalizes batches by this per-channel ``mean`` and ``std`` (in [0, 1] units) instead of the dataset's."""
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not self.train:
            for idx in self.order.indices().to(self.device).split(self.batch_size):
                yield self._finish(self.images[idx]), self.labels[idx]
            return
        n, g = len(self.labels), self.order.generator(self.epoch)
        perm = self.order.indices(g)
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)  # drawn per position in the permutation
        flips = torch.rand(n, generator=g) < 0.5
        perm, shifts, flips = (t.to(self.device) for t in (perm, self.order.mine(shifts), self.order.mine(flips)))
        for start in range(0, self.num_samples, self.batch_size):
            b = slice(start, start + self.batch_size)
            x = _crop_flip(self.images[perm[b]], self.pad, shifts[b], flips[b])
            yield self._finish(x), self.labels[perm[b]]

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _crop_flip(x: torch.Tensor, pad: int, shifts: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Crops each image of ``x`` from its zero-padded copy at offsets ``shifts`` and mirrors it where ``flips``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = shifts[:, :1] + torch.arange(h, device=x.device)  # [B, H]
    cols = shifts[:, 1:] + torch.arange(w, device=x.device)  # [B, W]
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # cropping then mirroring reads columns backwards
    x = padded.gather(2, rows[:, None, :, None].expand(b, c, h, padded.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


@dataclass
class Data:
    """The loaders of a run and the dataset's info."""

    train: BatchLoader
    test: BatchLoader
    info: DatasetInfo

    def normalize(self, preprocess: dict) -> None:
        """Normalizes both splits as a model's ``preprocess`` record says (``mean``, ``std`` in [0, 1] units)."""
        for loader in (self.train, self.test):
            loader.set_normalization(preprocess["mean"], preprocess["std"])
