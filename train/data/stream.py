"""A streaming loader for image folders that do not fit in memory (ImageNet at 224 px is about 193 GB decoded).

Images are read from the folder or zip and decoded in ``DataLoader`` workers. Training batches get torchvision's
``RandomResizedCrop(image_size, scale=(0.08, 1))`` and a horizontal flip; test batches the in-memory path's
resize and centre crop (:func:`~train.data.folders.center_fit`: 224/256 of the image from 64 px up, all of it
below), so a checkpoint scores the same with either loader. It is a :class:`~train.data.loader.BatchLoader`
like the in-memory :class:`train.data.Loader`: each epoch's order is :class:`~train.data.loader.EpochOrder`'s (the
same rule and code, so the same images per rank), every sample's augmentation is drawn from ``(seed, epoch,
index)``, so a resumed run sees exactly the batches an uninterrupted one would, whatever the number of workers;
ranks take every ``world_size``-th sample.
"""
from __future__ import annotations

import io
import math
from typing import Iterator, Sequence

import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from models.errors import DataError

from . import base
from .base import DatasetInfo
from .folders import (ImageTree, ZipHandle, center_fit, default_image_size, eval_crop, scan_image_tree, subset_tree,
                      to_rgb)
from .loader import Data, EpochOrder
from .sources import resolve_source

def random_resized_crop_params(width: int, height: int, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of torchvision's ``RandomResizedCrop``, drawn from generator ``g``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(3, generator=g).tolist()
        target = area * (scale[0] + u[0] * (scale[1] - scale[0]))
        aspect = math.exp(log_ratio[0] + u[1] * (log_ratio[1] - log_ratio[0]))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop of the allowed aspect ratios
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a fixed function of (seed, epoch, index), the same in every process."""
    return ((seed * 1000003 + epoch) * 2654435761 + index) % (1 << 63)


class ImageFiles(Dataset):
    """``(uint8 [3, S, S], label)`` for ``(index, epoch)`` keys; augmentation drawn from ``(seed, epoch, index)``."""

    def __init__(self, tree: ImageTree, items: Sequence[tuple[str, int]], image_size: int, train: bool,
                 seed: int) -> None:
        self.tree, self.items, self.size, self.train, self.seed = tree, list(items), image_size, train, seed
        self._zip: ZipHandle | None = None  # opened in each worker

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_zip": None}  # a worker opens its own

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def _read(self, name: str) -> bytes:
        if self.tree.is_zip and self._zip is None:
            self._zip = ZipHandle(self.tree.source)
        return self.tree.read(name, self._zip)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key
        name, label = self.items[index]
        data = self._read(name)  # its own one-line errors: a damaged or unreadable zip is not a bad image
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = to_rgb(img)
                if self.train:
                    g = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
                    top, left, h, w = random_resized_crop_params(*img.size, g)
                    img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
                    if torch.rand(1, generator=g).item() < 0.5:
                        img = TF.hflip(img)
                else:
                    img = center_fit(img, self.size, eval_crop(self.size))
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {name} ({type(e).__name__}); remove or replace the file") from None
        return TF.pil_to_tensor(img), label


class EpochSampler(Sampler):
    """``(index, epoch)`` keys in :class:`~train.data.loader.EpochOrder`'s order, this rank's share."""

    def __init__(self, order: EpochOrder) -> None:
        self.order, self.epoch = order, 0

    def __len__(self) -> int:
        return self.order.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = self.order.generator(self.epoch) if self.order.train else None
        return iter([(i, self.epoch) for i in self.order.indices(g).tolist()])


class StreamLoader:
    """Batches of an image folder decoded on the fly: a :class:`~train.data.loader.BatchLoader`.

    Args:
        tree: the folder or zip.
        items: ``(path, label)`` of this split.
        info: the dataset's info (normalisation).
        batch_size: samples per batch on this rank.
        train: shuffle, augment and drop the last partial batch.
        device: where batches go.
        seed: seed of the order and the augmentation.
        rank: this process's rank.
        world_size: number of processes.
        workers: decoding processes.
        channels_last: return ``x`` in channels-last memory format.
    """

    #: How it loads (the start line names it).
    kind = "streaming"

    def __init__(self, tree: ImageTree, items: Sequence[tuple[str, int]], info: DatasetInfo, batch_size: int, *,
                 train: bool, device: torch.device | str = "cpu", seed: int = 0, rank: int = 0, world_size: int = 1,
                 workers: int = 4, channels_last: bool = False) -> None:
        order = EpochOrder(len(items), batch_size, train, seed, rank, world_size)
        self.device, self.batch_size, self.train, self.channels_last = torch.device(device), batch_size, train, \
            channels_last
        self.labels = torch.tensor([y for _, y in items], dtype=torch.int64)
        self.num_samples = order.num_samples
        self.image_size = info.image_size
        self.sampler = EpochSampler(order)
        self.loader = DataLoader(ImageFiles(tree, items, info.image_size, train, seed), batch_size=batch_size,
                                 sampler=self.sampler, num_workers=workers, drop_last=train,
                                 pin_memory=self.device.type == "cuda", persistent_workers=workers > 0)
        self.set_normalization(info.mean, info.std)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.epoch = epoch

    def set_normalization(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255

    def __len__(self) -> int:
        return math.ceil(self.num_samples / self.batch_size) if not self.train else self.num_samples // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for x, y in self.loader:
                x = x.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, y.to(self.device, non_blocking=True)
        except DataError as e:  # a worker's error arrives with its traceback in the message: keep our one line
            raise DataError(str(e).rstrip().splitlines()[-1].split("DataError: ", 1)[-1]) from None


def fits_in_memory(num_images: int, image_size: int, share: float = 0.25) -> bool:
    """Whether ``num_images`` decoded uint8 images of ``image_size`` take at most ``share`` of the free memory."""
    return num_images * 3 * image_size * image_size <= share * base.available_memory()


def _stats(tree: ImageTree, items: Sequence[tuple[str, int]], count: int = 1000) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] of up to ``count`` training images (a fixed, evenly spread sample)."""
    step = max(1, len(items) // count)
    files = ImageFiles(tree, items[::step][:count], 64, train=False, seed=0)
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    try:
        for i in range(len(files)):
            x = files[(i, 0)][0].double().div_(255)
            s += x.mean((1, 2))
            s2 += x.square().mean((1, 2))
    finally:
        files.close()
    mean = s / len(files)
    std = (s2 / len(files) - mean.square()).clamp_min(1e-6).sqrt()
    return mean.tolist(), std.tolist()


def build_stream_data(data_dir: str, batch_size: int, *, subset: int | None = None, seed: int = 0,
                      device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                      image_size: int | None = None, channels_last: bool = False, workers: int = 4,
                      eval_batch_size: int | None = None, tree: ImageTree | None = None) -> Data:
    """:class:`train.data.Data` of an image folder (or zip) with :class:`StreamLoader` s.

    ``--subset`` draws the same balanced subsets, and the default image size is the same, as the in-memory path's.
    The normalisation is the mean and std of up to 1,000 training images. ``tree``: the folder's listing, when
    the caller has already scanned it.
    """
    _, path = resolve_source("imagefolder", data_dir)
    tree = tree or scan_image_tree(path)
    size = image_size or default_image_size(tree)
    if subset is not None:
        tree = subset_tree(tree, subset, seed, path.name)
    train, test = tree.train, tree.test
    mean, std = _stats(tree, train)
    info = DatasetInfo("imagefolder", len(tree.classes), list(tree.classes), tuple(mean), tuple(std), size, str(path),
                       f"{path.stem} (image folder, {size} px, streamed)")
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, workers=workers,
                  channels_last=channels_last)
    return Data(StreamLoader(tree, train, info, batch_size, train=True, **common),
                StreamLoader(tree, test, info, eval_batch_size or 2 * batch_size, train=False, **common), info)
