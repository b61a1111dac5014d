"""Datasets as uint8 tensors, and a vectorized loader that augments whole batches on the device.

Sources (``load_dataset``):

* ``cifar10`` / ``cifar100``: the root is ``data_dir``, else ``$REDUCENET_DATA``, else ``./data``. CIFAR-10 is
  looked for as ``<root>/cifar-10-batches-py`` (torchvision's pickles), then ``<root>/cifar10-jpeg.zip`` or an
  extracted ``<root>/cifar10-jpeg/`` (class folders of JPEGs), then ``<root>`` itself as a pickle folder;
  CIFAR-100 as ``<root>/cifar-100-python`` or ``<root>`` itself. The pickles are read directly, without
  torchvision's md5 check, so exact subsets load too; they are unpickled without running any code from them
  (only numpy arrays, dtypes and plain Python values are admitted) and their fields are checked. If nothing
  is found, torchvision's download is tried, only into an empty folder or one holding CIFAR files alone (a user's
  image folder given without ``--dataset imagefolder`` is refused with that advice, not filled with CIFAR).
* ``imagefolder``: ``data_dir`` is a folder, or a ``.zip`` of one, holding ``train/`` and ``test/`` (or
  ``val/``) folders of class folders, optionally inside one top-level folder. Images are decoded with PIL
  once (in a process pool), converted to 8-bit RGB, resized and center-cropped to ``image_size``, and cached
  as uint8 tensors under ``$REDUCENET_CACHE`` (default ``~/.cache/reducenet``), keyed by a hash of the image
  bytes (of the zip, for a zip), the image size and the crop.

The package: ``sources`` (where a dataset is read from), ``cifar`` (the pickle layout, read safely),
``folders`` (image trees: scanning, decoding, the cache), ``subsets``, ``loader`` (the in-memory loader) and
``stream`` (the streaming loader for image folders too big for memory); this module loads and wraps them.

With a subset (``build_data(subset=...)``), the subset is drawn first and only its images are resized or
decoded; an array that would take more than half of the available memory is refused.

``DatasetInfo.label`` says how to name results: the JPEG copy of CIFAR-10 is "CIFAR-10 (JPEG q75 copy)" and
a partial pickle copy is "CIFAR-10 (exact subset, N train / M test)".

``Loader`` keeps the uint8 images on its device (the GPU fast path of airbench / hlb-CIFAR10) and yields
normalized float32 batches. Training batches get a random crop with zero padding of ``image_size // 8``
and a random horizontal flip; the order and the augmentation of an epoch are a pure function of
``(seed, epoch)``, so a resumed run sees exactly the batches it would have seen. With ``world_size > 1``
every rank draws the same permutation and takes every ``world_size``-th sample.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from models.errors import DataError

from .base import (_JPEG_LABEL, _NICE, _STATS, _WHERE, CIFAR10_CLASSES, DATASETS, ArrayData, DatasetInfo,
                   _check_memory, available_memory)
from .cifar import _FULL_SIZES, _PICKLE_DIRS, _load_pickles, _resize
from .folders import (ImageTree, _load_tree, default_image_size, eval_crop, extract_images, looks_like_image_tree,
                      scan_image_tree, subset_tree, to_rgb)
from .loader import BatchLoader, Data, EpochOrder, Loader
from .sources import _download, _find, data_root, resolve_source
from .subsets import _subset_indices, balanced_subset

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "DatasetInfo",
    "ArrayData",
    "ImageTree",
    "Loader",
    "BatchLoader",
    "EpochOrder",
    "Data",
    "data_root",
    "default_eval_batch_size",
    "resolve_source",
    "scan_image_tree",
    "extract_images",
    "to_rgb",
    "available_memory",
    "load_dataset",
    "balanced_subset",
    "build_data",
]


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    image_size: int | None = None,
    download: bool = True,
    subset: int | None = None,
    seed: int = 0,
) -> tuple[ArrayData, ArrayData, DatasetInfo]:
    """Loads the train and test splits of a dataset, or balanced subsets of them, as uint8 tensors on the CPU.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: The data root (see the module docstring); ``None`` means ``$REDUCENET_DATA``, else ``./data``.
        image_size: Output height and width. Defaults to 32 for CIFAR; for an image folder, the first image's
            size if it is square and at most 64 pixels, else 224. CIFAR images are resized to it directly;
            image-folder images have their shorter side resized to ``round(image_size * 256 / 224)`` (when
            ``image_size >= 64``, else ``image_size``) and are center-cropped.
        download: For CIFAR, try torchvision's download when no copy is found and the root is an empty folder
            (or holds CIFAR files alone: the other dataset, a download cut short).
        subset: Keep this many balanced training samples (see :func:`balanced_subset`) and a balanced test
            subset of the same share, at least one sample per class. The subsets are drawn from the labels
            before any image is resized or decoded, so only the kept images are; an image folder's mean and
            std are then those of the kept training images.
        seed: Seed of the subsets.

    Returns:
        ``(train, test, info)``.

    Raises:
        DataError: Nothing usable was found (nor downloaded: the root holds other files), the files are
            malformed, the subset size is out of range, or the images would need more than half of the available
            memory.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image size {image_size} is not positive; pass --image-size 1 or more")
    root = data_root(data_dir)
    if (data_dir is not None or os.environ.get("REDUCENET_DATA")) and not root.exists():
        raise DataError(f"data directory {root} does not exist; {_WHERE} to an existing folder "
                        "(an empty one is fine when torchvision can download into it)")
    if name != "imagefolder" and root.is_file() and _find(name, root) is None:
        hint = _image_tree_hint(root)
        raise DataError(f"{root} is a file, not a {_NICE[name]} folder; " + (hint or (
            f"{_WHERE} to the folder holding {_PICKLE_DIRS[name]}"
            + (" (or to cifar10-jpeg.zip itself)" if name == "cifar10" else ""))))
    if name != "imagefolder" and _find(name, root) is None and download:
        _check_download_folder(name, root)
        reason = _download(name, root)
        if reason is not None and _find(name, root) is None:
            wanted = _PICKLE_DIRS[name] + (" or cifar10-jpeg.zip" if name == "cifar10" else "")
            raise DataError(
                f"no {_NICE[name]} in {root} and the download failed ({reason[:200]}); "
                f"{_WHERE} to a folder containing {wanted}"
            )
    kind, path = resolve_source(name, root)

    if kind == "pickle":
        size = image_size or 32
        train, test, classes = _load_pickles(name, path)
        full = (len(train), len(test)) == _FULL_SIZES
        label = _NICE[name] if full else f"{_NICE[name]} (exact subset, {len(train)} train / {len(test)} test)"
        mean, std = _STATS[name]
        if subset is not None:
            picked = _subset_indices(train.labels, test.labels, subset, seed, len(classes), label)
            train, test = train.subset(picked[0]), test.subset(picked[1])
        if size != 32:
            _check_memory(len(train) + len(test), size)
            train, test = (ArrayData(_resize(d.images, size), d.labels) for d in (train, test))
    else:
        tree = scan_image_tree(path)
        if name == "cifar10" and tree.classes != CIFAR10_CLASSES:
            raise DataError(
                f"{path} does not hold the CIFAR-10 classes (found {', '.join(tree.classes[:5])}, ...); "
                "use --dataset imagefolder for other images"
            )
        size = image_size or (32 if name == "cifar10" else default_image_size(tree))
        crop = eval_crop(size) if name == "imagefolder" else 1.0
        label = _JPEG_LABEL if name == "cifar10" else f"{path.stem} (image folder)"
        if subset is not None:
            tree = subset_tree(tree, subset, seed, label)
        train, test, cached = _load_tree(tree, size, crop)
        classes = tree.classes
        mean, std = _STATS[name] if name == "cifar10" else (tuple(cached["mean"]), tuple(cached["std"]))
    info = DatasetInfo(name, len(classes), list(classes), tuple(mean), tuple(std), size, str(path), label)
    return train, test, info


#: The CIFAR files of a data root (torchvision's archives and folders of either dataset, the JPEG copy): a folder
#: holding only these (the other dataset, a download cut short) is a data root that a download may add to.
_CIFAR_FILES = frozenset({"cifar-10-python.tar.gz", "cifar-10-batches-py", "cifar-100-python.tar.gz",
                          "cifar-100-python", "cifar10-jpeg.zip", "cifar10-jpeg"})


def _image_tree_hint(root: Path) -> str | None:
    """The advice for ``root`` (a folder or a zip) given as CIFAR when it looks like an image tree or holds a zip of
    one (:func:`looks_like_image_tree`), else None."""
    if looks_like_image_tree(root):
        what = "is a zip of" if root.is_file() else "holds"
        return f"{root.name} {what} train/ and test/ (or val/) class folders: pass --dataset imagefolder"
    for z in sorted(root.glob("*.zip")) if root.is_dir() else ():
        if looks_like_image_tree(z):
            return (f"{z.name} in it is a zip of train/ and test/ (or val/) class folders: pass --dataset imagefolder "
                    f"--data-dir {z}")
    return None


def _check_download_folder(name: str, root: Path) -> None:
    """Refuses to download ``name`` into ``root`` when it holds anything but CIFAR files (:data:`_CIFAR_FILES`):
    torchvision downloads into an existing, empty folder (or a CIFAR data root), never into a user's image folder
    given without ``--dataset imagefolder``.

    Raises:
        DataError: ``root`` is not empty; the message says ``--dataset imagefolder`` where it looks like an image
            tree.
    """
    if not root.is_dir():
        return
    try:
        others = [e.name for e in os.scandir(root) if e.name not in _CIFAR_FILES]
    except OSError as e:
        raise DataError(f"cannot list {root} ({e.strerror}); make it readable") from None
    if others:
        wanted = f"{_PICKLE_DIRS[name]}/" + (" or cifar10-jpeg.zip" if name == "cifar10" else "")
        advice = _image_tree_hint(root) or f"{_WHERE} to a folder with {wanted}, or to an empty folder to download into"
        raise DataError(f"{root} holds no {_NICE[name]} files ({wanted}) and is not empty, so nothing is downloaded "
                        f"into it; {advice}")


def build_data(
    name: str,
    data_dir: str | os.PathLike | None,
    batch_size: int,
    *,
    subset: int | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
    eval_batch_size: int | None = None,
    image_size: int | None = None,
    channels_last: bool = False,
    download: bool = True,
) -> Data:
    """Loads a dataset and wraps it in train and test loaders.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: The data root (see :func:`load_dataset`).
        batch_size: Training batch size per rank.
        subset: Train on this many balanced training samples (see :func:`balanced_subset`) and test on a
            balanced test subset of the same share, at least one sample per class; only they are resized or
            decoded (see :func:`load_dataset`).
        seed: Seed of the subsets, the shuffling and the augmentation.
        device: Where the data lives and the batches are made.
        rank: This process's rank.
        world_size: Number of processes.
        eval_batch_size: Test batch size per rank; default :func:`default_eval_batch_size` (twice ``batch_size``; on a
            GPU, at least 1,024 images of 32 px).
        image_size: See :func:`load_dataset`.
        channels_last: Return batches in channels-last memory format.
        download: See :func:`load_dataset`.

    Returns:
        The loaders and the dataset info.
    """
    train, test, info = load_dataset(
        name, data_dir, image_size=image_size, download=download, subset=subset, seed=seed
    )
    common = dict(device=device, seed=seed, rank=rank, world_size=world_size, channels_last=channels_last)
    test_batch = eval_batch_size or default_eval_batch_size(batch_size, info.image_size, device)
    return Data(
        Loader(train, info, batch_size, train=True, **common),
        Loader(test, info, test_batch, train=False, **common),
        info,
    )


#: On a GPU, an in-memory test batch holds at least this many pixels (1,024 images of 32 px).
GPU_EVAL_PIXELS = 1024 * 32 * 32


def default_eval_batch_size(batch_size: int, image_size: int, device: torch.device | str) -> int:
    """The test batch of the in-memory loader: twice the training batch; on a GPU at least :data:`GPU_EVAL_PIXELS`
    pixels, since a small batch's time there is its kernels' launches, not their work (evaluation runs in eval
    mode, so the batch changes no statistic; the accuracy is the same up to the kernels' rounding)."""
    if torch.device(device).type != "cuda":
        return 2 * batch_size
    return max(2 * batch_size, GPU_EVAL_PIXELS // (image_size * image_size))
