"""What every part of the data package shares: dataset facts, in-memory splits, the memory budget."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from models.errors import DataError

DATASETS = ("cifar10", "cifar100", "imagefolder")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_NICE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_JPEG_LABEL = "CIFAR-10 (JPEG q75 copy)"
_WHERE = "pass --data-dir DIR (or set REDUCENET_DATA)"
_INTACT = "replace it with an intact copy"


def _one_line(text: str) -> str:
    """``text`` with every run of whitespace, newlines included, made one space."""
    return " ".join(text.split())


@dataclass
class DatasetInfo:
    """What a model and a results table need to know about a dataset.

    Attributes:
        name: One of :data:`DATASETS`.
        num_classes: Number of classes.
        classes: Class names, in label order.
        mean: Per-channel mean of the training images, in [0, 1].
        std: Per-channel standard deviation of the training images, in [0, 1].
        image_size: Height and width of every image.
        source: The path actually read.
        label: How to name the dataset in results, e.g. ``"CIFAR-10 (JPEG q75 copy)"``.
    """

    name: str
    num_classes: int
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    image_size: int
    source: str
    label: str


@dataclass
class ArrayData:
    """A whole split in memory.

    Attributes:
        images: uint8 tensor of shape ``[N, 3, H, W]``.
        labels: int64 tensor of shape ``[N]``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor) -> ArrayData:
        """Returns the samples at ``indices``."""
        return ArrayData(self.images[indices], self.labels[indices])


def available_memory() -> int:
    """Bytes of memory available for new arrays: ``MemAvailable`` of /proc/meminfo, else the free physical pages."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no such figure here: do not refuse
        return sys.maxsize


def _check_memory(n: int, size: int) -> None:
    """Refuses to allocate ``n`` uint8 RGB images of ``size`` x ``size`` if they need over half the available memory."""
    need, available = n * 3 * size * size, available_memory()
    if need > available // 2:
        raise DataError(
            f"{n} images at {size}x{size} px need {need / 2**30:.1f} GiB, more than half of the "
            f"{available / 2**30:.1f} GiB of memory available; pass a smaller --image-size or --subset"
        )
