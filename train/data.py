"""Datasets as uint8 tensors, and a vectorized loader that augments whole batches on the device.

Sources (``load_dataset``):

* ``cifar10`` / ``cifar100``: the root is ``data_dir``, else ``$REDUCENET_DATA``, else ``./data``. CIFAR-10 is
  looked for as ``<root>/cifar-10-batches-py`` (torchvision's pickles), then ``<root>/cifar10-jpeg.zip`` or an
  extracted ``<root>/cifar10-jpeg/`` (class folders of JPEGs), then ``<root>`` itself as a pickle folder;
  CIFAR-100 as ``<root>/cifar-100-python`` or ``<root>`` itself. The pickles are read directly, without
  torchvision's md5 check, so exact subsets load too; they are unpickled without running any code from them
  (only numpy arrays, dtypes and plain Python values are admitted) and their fields are checked. If nothing
  is found, torchvision's download is tried.
* ``imagefolder``: ``data_dir`` is a folder, or a ``.zip`` of one, holding ``train/`` and ``test/`` (or
  ``val/``) folders of class folders, optionally inside one top-level folder. Images are decoded with PIL
  once (in a process pool), converted to 8-bit RGB, resized and center-cropped to ``image_size``, and cached
  as uint8 tensors under ``$REDUCENET_CACHE`` (default ``~/.cache/reducenet``), keyed by a hash of the image
  bytes (of the zip, for a zip), the image size and the crop.

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

import hashlib
import io
import math
import multiprocessing
import os
import pickle
import sys
import tempfile
import warnings
import zipfile
import zlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS
from tqdm import tqdm

from models.errors import DataError

__all__ = [
    "DATASETS",
    "CIFAR10_CLASSES",
    "DatasetInfo",
    "ArrayData",
    "ImageTree",
    "Loader",
    "Data",
    "resolve_source",
    "scan_image_tree",
    "to_rgb",
    "load_dataset",
    "balanced_subset",
    "build_data",
]

DATASETS = ("cifar10", "cifar100", "imagefolder")
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_FULL_SIZES = (50000, 10000)
_PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PICKLE_FILES = {  # (train files, test files, meta file, label key, class names key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
_NICE = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}
_JPEG_LABEL = "CIFAR-10 (JPEG q75 copy)"
_CACHE_VERSION = 2  # 2: keyed on content, 16-bit images scaled
_WHERE = "pass --data-dir DIR (or set REDUCENET_DATA)"
_INTACT = "replace it with an intact copy"
_SPLITS = ("train", "test", "val")
# Every global a CIFAR pickle may name: numpy arrays, dtypes and scalars (under numpy 1 and numpy 2 names), and
# the codec numpy's protocol-2 pickles use for their bytes. Builtins (dict, list, str, int, ...) need no global.
_PICKLE_GLOBALS = frozenset(
    [(f"{core}.{module}", name) for core in ("numpy.core", "numpy._core")
     for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


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


@dataclass
class ImageTree:
    """The image files of a ``train/`` + ``test/`` (or ``val/``) tree of class folders.

    Attributes:
        source: The folder or ``.zip`` file.
        classes: Sorted class folder names of ``train/``.
        train: ``(path inside source, label)`` for every training image, sorted by class then path.
        test: The same for the test (or validation) images.
    """

    source: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()

    def read(self, name: str, archive: zipfile.ZipFile | None = None) -> bytes:
        """Returns the bytes of the file ``name``, from ``archive`` when the source is a zip.

        Raises:
            DataError: The file cannot be read, or the zip member is damaged (bad CRC, truncated).
        """
        try:
            return archive.read(name) if archive is not None else (self.source / name).read_bytes()
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            where = f"{name} in {self.source}" if archive is not None else str(self.source / name)
            fix = "replace the zip with an intact copy" if archive is not None else "remove or replace the file"
            raise DataError(f"cannot read {where} ({_one_line(str(e))}); {fix}") from None


# ----------------------------------------------------------------------------------------------- sources


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The data root meant by ``data_dir``: itself, else ``$REDUCENET_DATA``, else ``./data``; absolute."""
    root = data_dir if data_dir is not None else os.environ.get("REDUCENET_DATA") or "data"
    return Path(root).expanduser().absolute()


def _is_pickle_dir(path: Path, name: str) -> bool:
    train, test, meta, *_ = _PICKLE_FILES[name]
    return all((path / f).is_file() for f in (*train, *test, meta))


def _find(name: str, root: Path) -> tuple[str, Path] | None:
    candidates = [("pickle", root / _PICKLE_DIRS[name])]
    if name == "cifar10":
        candidates += [("zip", root / "cifar10-jpeg.zip"), ("folder", root / "cifar10-jpeg")]
    candidates.append(("pickle", root))
    for kind, path in candidates:
        if kind == "pickle" and _is_pickle_dir(path, name):
            return kind, path
        if (kind == "zip" and path.is_file()) or (kind == "folder" and path.is_dir()):
            return kind, path
    return None


def resolve_source(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, Path]:
    """Finds the files a dataset would be read from, without reading or downloading them.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: The data root; ``None`` means ``$REDUCENET_DATA``, else ``./data``.

    Returns:
        ``(kind, path)`` where kind is ``"pickle"`` (a torchvision CIFAR folder), ``"zip"`` (a zipped image
        tree) or ``"folder"`` (an image tree).

    Raises:
        DataError: The name is unknown or nothing usable is there.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    root = data_root(data_dir)
    if name == "imagefolder":
        if root.is_file():
            return "zip", root
        if root.is_dir():
            return "folder", root
        raise DataError(
            f"image folder {root} does not exist; pass --data-dir DIR holding train/ and test/ (or val/) "
            "class folders, or a .zip of such a tree"
        )
    found = _find(name, root)
    if found is None:
        wanted = f"{_PICKLE_DIRS[name]}/" + (" or cifar10-jpeg.zip" if name == "cifar10" else "")
        raise DataError(f"no {_NICE[name]} found: looked for {wanted} in {root}; {_WHERE} to a folder with {wanted}")
    return found


def _download(name: str, root: Path) -> str | None:
    """Tries torchvision's download into ``root``; returns why it failed, or None."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        cls(str(root), train=True, download=True)
        return None
    except Exception as e:  # offline machines, proxies, disk full: all mean "not downloaded"
        return _one_line(f"{type(e).__name__}: {e}")


# ----------------------------------------------------------------------------------------------- pickles


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python layout, admitting only the globals of :data:`_PICKLE_GLOBALS`, so no code runs."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_GLOBALS:
            raise DataError(
                f"refusing to load {self.path}: it would run {_one_line(f'{module}.{name}')[:100]}; CIFAR batches "
                f"hold only arrays, lists and strings: {_INTACT}"
            )
        return super().find_class(module, name)


def _unpickle(path: Path) -> Any:
    """Reads one pickle of the CIFAR python layout without running code from it.

    Raises:
        DataError: The file is unreadable or damaged, or names a global that the layout does not hold.
    """
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, path).load()
    except DataError:
        raise
    except Exception as e:  # whatever a truncated or damaged pickle raises
        raise DataError(f"cannot read {path} ({type(e).__name__}); {_INTACT}") from None


def _batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``data`` rows (uint8 ``[N, 3072]``) and int64 labels of one CIFAR batch file, checked.

    Raises:
        DataError: A key is missing, ``data`` is not uint8 rows of 3072 values, the label count differs from
            the image count, or a label is not a class number in ``[0, num_classes)``.
    """
    b = _unpickle(path)
    if not isinstance(b, dict) or "data" not in b or label_key not in b:
        found = f"keys {', '.join(map(repr, b))}"[:100] if isinstance(b, dict) else f"a {type(b).__name__}"
        raise DataError(f"{path} is not a CIFAR batch: it needs 'data' and {label_key!r} (found {found}); {_INTACT}")
    x, y = b["data"], b[label_key]
    if not (isinstance(x, np.ndarray) and x.dtype == np.uint8 and x.ndim == 2 and x.shape[1] == 3072):
        found = f"{x.dtype} of shape {list(x.shape)}" if isinstance(x, np.ndarray) else f"a {type(x).__name__}"
        raise DataError(f"{path}: 'data' is {found}, not uint8 rows of 3072 values (32x32 RGB); {_INTACT}")
    if not (isinstance(y, list) or (isinstance(y, np.ndarray) and y.ndim == 1)):
        raise DataError(f"{path}: {label_key!r} is a {type(y).__name__}, not a list of class numbers; {_INTACT}")
    if len(y) != len(x):
        raise DataError(f"{path} has {len(x)} images but {len(y)} labels; {_INTACT}")
    bad = [v for v in y if not (isinstance(v, (int, np.integer)) and 0 <= v < num_classes)]
    if bad:
        raise DataError(
            f"{path} has label {_one_line(repr(bad[0]))[:40]}, not a class number in [0, {num_classes}) "
            f"(the meta file names {num_classes} classes); {_INTACT}"
        )
    return x, np.asarray(y, dtype=np.int64)


def _load_pickles(name: str, path: Path) -> tuple[ArrayData, ArrayData, list[str]]:
    """Reads and checks a CIFAR pickle folder: the 32x32 train and test splits, and the class names."""
    train_files, test_files, meta, label_key, names_key = _PICKLE_FILES[name]
    m = _unpickle(path / meta)
    classes = m.get(names_key) if isinstance(m, dict) else None
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        raise DataError(f"{path / meta} has no list of class names under {names_key!r}; {_INTACT}")

    def split(files: list[str]) -> ArrayData:
        batches = [_batch(path / f, label_key, len(classes)) for f in files]
        images = torch.from_numpy(np.concatenate([x for x, _ in batches])).view(-1, 3, 32, 32)
        return ArrayData(images, torch.from_numpy(np.concatenate([y for _, y in batches])))

    return split(train_files), split(test_files), classes


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resizes uint8 ``[N, 3, h, w]`` images to ``size`` x ``size`` (antialiased), a few at a time into one array."""
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8)
    step = max(1, min(1024, 2**25 // (3 * size * size)))  # bounds the float intermediates to ~0.5 GB
    for i in range(0, len(images), step):
        out[i : i + step] = TF.resize(images[i : i + step], [size, size], antialias=True)
    return out


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


# ----------------------------------------------------------------------------------------------- image trees


def _place(folder: str) -> tuple[str, str | None] | None:
    """The ``(split folder, class)`` that a folder of a tree lies in, or None outside every split folder.

    ``top/train/cat/sub`` gives ``("top/train", "cat")``, ``train`` gives ``("train", None)``.
    """
    parts = folder.split("/")
    for depth in (0, 1):  # train/<class>/... or <top>/train/<class>/...
        if len(parts) > depth and parts[depth] in _SPLITS:
            return "/".join(parts[: depth + 1]), parts[depth + 1] if len(parts) > depth + 1 else None
    return None


def _walk(folder: Path) -> list[str]:
    """The files below ``folder`` (``/``-separated paths inside it, sorted), following links safely.

    Links to files and folders are followed, but every real folder is listed and every real file counted once,
    so a link loop or a second link to the same folder adds nothing. A link that leads elsewhere inside
    ``folder`` must stay inside its own split and class folder (or be a loop to a folder it lies in). Hidden
    entries and ``__MACOSX`` are skipped.

    Raises:
        DataError: A folder cannot be listed, or a link leads into another split or class folder (the splits
            would overlap, or images would get a second label).
    """
    root = os.path.realpath(folder)
    seen = {root}
    files: list[str] = []

    def visit(path: str, rel: str, real_dir: str) -> None:
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError as e:
            raise DataError(f"cannot list {path} ({e.strerror}); make it readable or remove it") from None
        for e in entries:
            if e.name.startswith(".") or e.name == "__MACOSX":
                continue
            name, is_dir, link = rel + e.name, e.is_dir(), e.is_symlink()
            real = os.path.realpath(e.path) if link else os.path.join(real_dir, e.name)
            if link and real.startswith(root + os.sep):  # a link to elsewhere in the tree
                target = os.path.relpath(real, root).replace(os.sep, "/")
                here = _place(name if is_dir else rel[:-1])
                there = _place(target if is_dir else os.path.dirname(target))
                if there is not None and here != there and not name.startswith(target + "/"):  # not a loop
                    cross = here is None or here[0] != there[0]
                    why = "the splits would overlap" if cross else "its images would get two labels"
                    into = "/".join(filter(None, there))
                    raise DataError(f"{folder}: {name} is a link into {into}/: {why}; remove the link")
            if real in seen:
                continue
            seen.add(real)
            if is_dir:
                visit(e.path, name + "/", real)
            else:
                files.append(name)

    visit(str(folder), "", root)
    return files


def _list_files(source: Path) -> list[str]:
    if source.is_file():
        try:
            with zipfile.ZipFile(source) as z:
                return list(dict.fromkeys(n for n in z.namelist() if not n.endswith("/")))
        except (zipfile.BadZipFile, OSError) as e:
            raise DataError(
                f"{source} is not a readable zip file ({e}); pass a .zip or folder of train/ and test/ class folders"
            ) from None
    return _walk(source)


def scan_image_tree(source: str | os.PathLike) -> ImageTree:
    """Lists the images of a ``train/`` + ``test/`` (or ``val/``) tree of class folders, in a folder or a zip.

    The tree may sit inside one top-level folder (as in ``cifar10-jpeg.zip``). Files whose extension is not
    an image extension, and hidden or ``__MACOSX`` entries, are ignored. Nothing is decoded.

    In a folder, links are followed, but each real folder is listed and each real file counted once (a link
    loop adds nothing), and a link into another split or class folder of the tree is refused (a ``train/``
    link into ``test/`` would train on test images). A class of ``train/`` without test images gives a
    ``UserWarning``.

    Args:
        source: A folder or a ``.zip`` file.

    Returns:
        The classes and the per-split ``(path, label)`` lists.

    Raises:
        DataError: The source is missing, not a zip, or not such a tree, or a link crosses its splits.
    """
    source = Path(source).expanduser().absolute()
    if not source.exists():
        raise DataError(f"{source} does not exist; pass --data-dir DIR with train/ and test/ (or val/) class folders")
    splits: dict[str, dict[str, list[str]]] = {}  # "prefix/split" -> class -> files
    for n in _list_files(source):
        parts = n.split("/")
        place = _place("/".join(parts[:-1]))
        if (n.lower().endswith(IMG_EXTENSIONS) and place and place[1] is not None
                and not any(p.startswith(".") or p == "__MACOSX" for p in parts)):
            splits.setdefault(place[0], {}).setdefault(place[1], []).append(n)
    prefixes = sorted({k.rpartition("/")[0] for k in splits if k.endswith("train")})
    if len(prefixes) != 1:
        found = "several train/ folders" if prefixes else "no train/<class>/<image> files"
        raise DataError(
            f"{source} is not an image tree ({found}); it must hold train/ and test/ (or val/) folders of class "
            "folders of images"
        )
    top = prefixes[0] + "/" if prefixes[0] else ""
    test_key = next((top + s for s in ("test", "val") if top + s in splits), None)
    if test_key is None:
        raise DataError(f"{source} has {top}train/ but no {top}test/ or {top}val/ class folders; add the test split")
    classes = sorted(splits[top + "train"])
    unknown = sorted(set(splits[test_key]) - set(classes))
    if unknown:
        raise DataError(
            f"{source}: {test_key}/ has classes missing from {top}train/ ({', '.join(unknown[:5])}); "
            "make the class folders match"
        )
    untested = [c for c in classes if c not in splits[test_key]]
    if untested:
        more = f" and {len(untested) - 10} more" if len(untested) > 10 else ""
        warnings.warn(
            f"{test_key}/ has no images of classes {', '.join(untested[:10])}{more}: their test accuracy cannot be "
            "measured", stacklevel=2
        )

    def items(key: str) -> list[tuple[str, int]]:
        return [(n, y) for y, c in enumerate(classes) for n in sorted(splits[key].get(c, []))]

    return ImageTree(source, classes, items(top + "train"), items(test_key))


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts a decoded image to 8-bit RGB as PIL does, except where PIL would lose it.

    16-bit (and 32-bit integer) greyscale, which PIL would clip to white, is scaled to 8 bits by ``>> 8``, as
    PIL itself reads 16-bit RGB(A); a palette image with transparency goes through RGBA (alpha dropped) without
    PIL's warning. Palette, LA, CMYK and the other modes convert as ``img.convert("RGB")`` does.
    """
    if img.mode.startswith("I"):  # I;16, I;16B, I;16L, I
        img = Image.fromarray((np.asarray(img).clip(0, 65535) >> 8).astype(np.uint8))
    elif img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


def _decode(data: bytes, size: int, crop: float) -> np.ndarray:
    """Decodes one image to RGB, resizes its shorter side to ``round(size / crop)``, center-crops ``size``."""
    with Image.open(io.BytesIO(data)) as img:
        img = to_rgb(img)
    if img.size != (size, size):
        img = TF.center_crop(TF.resize(img, round(size / crop)), size)
    return np.asarray(img).transpose(2, 0, 1)


def _decode_chunk(args: tuple[list[tuple[str, bytes]], int, float]) -> np.ndarray:
    chunk, size, crop = args
    out = np.empty((len(chunk), 3, size, size), np.uint8)
    for i, (name, data) in enumerate(chunk):
        try:
            out[i] = _decode(data, size, crop)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {name} ({type(e).__name__}); remove or replace the file") from None
    return out


def _decode_images(tree: ImageTree, names: Sequence[str], size: int, crop: float, desc: str) -> torch.Tensor:
    """Decodes ``names`` from ``tree`` into a uint8 ``[N, 3, size, size]`` tensor, in a process pool."""
    out = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
    chunk = 256
    with (zipfile.ZipFile(tree.source) if tree.is_zip else nullcontext()) as archive:

        def tasks() -> Iterator[tuple[list[tuple[str, bytes]], int, float]]:
            for i in range(0, len(names), chunk):
                yield [(n, tree.read(n, archive)) for n in names[i : i + chunk]], size, crop

        workers = min(len(os.sched_getaffinity(0)), 8) if len(names) > 4 * chunk else 1
        pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
        try:
            results = pool.imap(_decode_chunk, tasks()) if pool else map(_decode_chunk, tasks())
            with tqdm(total=len(names), desc=desc, unit="img", disable=not sys.stderr.isatty()) as bar:
                for i, array in enumerate(results):
                    out[i * chunk : i * chunk + len(array)] = torch.from_numpy(array)
                    bar.update(len(array))
        finally:
            if pool:
                pool.terminate()
    return out


def _cache_dir() -> Path:
    return Path(os.environ.get("REDUCENET_CACHE") or Path.home() / ".cache" / "reducenet").expanduser()


def _fingerprint(tree: ImageTree) -> str:
    """Identifies the images by content: every listed name and label, and the bytes of the zip or of every image."""
    h = hashlib.sha256("".join(f"{name}\t{y}\n" for name, y in tree.train + tree.test).encode())
    if tree.is_zip:
        with open(tree.source, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    else:
        for name, _ in tree.train + tree.test:
            h.update(hashlib.sha256(tree.read(name)).digest())
    return h.hexdigest()


def _save_atomic(obj: object, path: Path) -> None:
    """Writes ``obj`` with ``torch.save`` to a temporary file next to ``path``, then renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std, in [0, 1], of a uint8 ``[N, 3, H, W]`` tensor (computed in chunks)."""
    s = torch.zeros(3, dtype=torch.float64)
    s2 = torch.zeros(3, dtype=torch.float64)
    for c in images.split(4096):
        c = c.double().div_(255)
        s += c.sum((0, 2, 3))
        s2 += c.square().sum((0, 2, 3))
    n = images.numel() // 3
    mean = s / n
    std = (s2 / n - mean.square()).clamp_min(0).sqrt().clamp_min(1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())


def _load_tree(tree: ImageTree, image_size: int, crop: float) -> tuple[ArrayData, ArrayData, dict]:
    """Decodes a tree once and caches it; later calls with the same image bytes, size and crop read the cache.

    Raises:
        DataError: The decoded images would need more than half the available memory, or a file is unreadable.
    """
    _check_memory(len(tree.train) + len(tree.test), image_size)
    key = hashlib.sha1(f"{_fingerprint(tree)} {image_size} {crop} {_CACHE_VERSION}".encode()).hexdigest()
    path = _cache_dir() / f"{tree.source.stem}-{image_size}px-{key[:16]}.pt"
    if path.is_file():
        try:
            c = torch.load(path, weights_only=True)
            return ArrayData(c["train_images"], c["train_labels"]), ArrayData(c["test_images"], c["test_labels"]), c
        except Exception as e:  # a damaged cache file is rebuilt
            warnings.warn(f"ignoring unreadable cache {path} ({type(e).__name__}); decoding again", stacklevel=3)
    splits = []
    for split, items in (("train", tree.train), ("test", tree.test)):
        images = _decode_images(tree, [n for n, _ in items], image_size, crop, f"decoding {tree.source.name} {split}")
        splits.append(ArrayData(images, torch.tensor([y for _, y in items], dtype=torch.int64)))
    mean, std = _channel_stats(splits[0].images)
    c = {
        "train_images": splits[0].images, "train_labels": splits[0].labels,
        "test_images": splits[1].images, "test_labels": splits[1].labels,
        "classes": tree.classes, "mean": list(mean), "std": list(std),
    }
    try:
        _save_atomic(c, path)
    except OSError as e:
        warnings.warn(f"cannot write cache {path} ({e}); set REDUCENET_CACHE to a writable folder", stacklevel=3)
    return splits[0], splits[1], c


def _default_image_size(tree: ImageTree) -> int:
    """The first training image's size if it is square and at most 64 pixels, else 224."""
    with (zipfile.ZipFile(tree.source) if tree.is_zip else nullcontext()) as archive:
        name = tree.train[0][0]
        data = tree.read(name, archive)
        try:
            with Image.open(io.BytesIO(data)) as img:
                w, h = img.size
        except (OSError, ValueError) as e:
            raise DataError(f"cannot decode image {name} ({type(e).__name__}); remove or replace the file") from None
    return w if w == h and w <= 64 else 224


# ----------------------------------------------------------------------------------------------- loading


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
        download: For CIFAR, try torchvision's download when no copy is found.
        subset: Keep this many balanced training samples (see :func:`balanced_subset`) and a balanced test
            subset of the same share, at least one sample per class. The subsets are drawn from the labels
            before any image is resized or decoded, so only the kept images are; an image folder's mean and
            std are then those of the kept training images.
        seed: Seed of the subsets.

    Returns:
        ``(train, test, info)``.

    Raises:
        DataError: Nothing usable was found, the files are malformed, the subset size is out of range, or the
            images would need more than half of the available memory.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if image_size is not None and image_size < 1:
        raise DataError(f"image size {image_size} is not positive; pass --image-size 1 or more")
    root = data_root(data_dir)
    if (data_dir is not None or os.environ.get("REDUCENET_DATA")) and not root.exists():
        raise DataError(f"data directory {root} does not exist; {_WHERE} to an existing folder "
                        "(an empty one is fine when torchvision can download into it)")
    if name != "imagefolder" and _find(name, root) is None and download:
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
        size = image_size or (32 if name == "cifar10" else _default_image_size(tree))
        crop = 224 / 256 if name == "imagefolder" and size >= 64 else 1.0
        label = _JPEG_LABEL if name == "cifar10" else f"{path.stem} (image folder)"
        if subset is not None:
            labels = [torch.tensor([y for _, y in items], dtype=torch.int64) for items in (tree.train, tree.test)]
            picked = _subset_indices(*labels, subset, seed, len(tree.classes), label)
            kept = [[items[i] for i in p.tolist()] for items, p in zip((tree.train, tree.test), picked)]
            tree = ImageTree(tree.source, tree.classes, *kept)
        train, test, cached = _load_tree(tree, size, crop)
        classes = tree.classes
        mean, std = _STATS[name] if name == "cifar10" else (tuple(cached["mean"]), tuple(cached["std"]))
    info = DatasetInfo(name, len(classes), list(classes), tuple(mean), tuple(std), size, str(path), label)
    return train, test, info


def _subset_indices(
    train: torch.Tensor, test: torch.Tensor, n: int, seed: int, num_classes: int, label: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced indices of ``n`` of the ``train`` labels and of the same share of ``test`` (at least one per class)."""
    if not num_classes <= n <= len(train):
        raise DataError(
            f"--subset {n} is outside [{num_classes}, {len(train)}] for {label}; "
            "pass at least one image per class and at most the training set"
        )
    n_test = min(max(round(n * len(test) / len(train)), num_classes), len(test))
    return balanced_subset(train, n, seed), balanced_subset(test, n_test, seed)


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Picks ``n`` samples with the classes as equally represented as possible.

    Every class gets ``n // C`` samples and the remainder goes to classes in a seeded random order; a class
    with too few samples gives all it has and the rest is spread over the others. Within a class the
    samples are drawn at random, so the result does not follow the file order.

    Args:
        labels: int64 labels of shape ``[N]``.
        n: Number of samples to pick, ``1 <= n <= N``.
        seed: Seed; the same ``(labels, n, seed)`` always gives the same subset.

    Returns:
        Sorted int64 indices into ``labels``.
    """
    labels = labels.cpu()
    if not 1 <= n <= len(labels):
        raise DataError(f"cannot pick {n} of {len(labels)} samples; pass a subset size between 1 and {len(labels)}")
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    take = [0] * len(classes)
    order = torch.randperm(len(classes), generator=g).tolist()
    left = n
    while left:
        open_ = [c for c in order if take[c] < len(members[c])]
        share, extra = divmod(left, len(open_))
        for i, c in enumerate(open_):
            k = min(share + (i < extra), len(members[c]) - take[c])
            take[c] += k
            left -= k
    picked = [m[torch.randperm(len(m), generator=g)[:k]] for m, k in zip(members, take)]
    return torch.cat(picked).sort().values


# ----------------------------------------------------------------------------------------------- loader


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
        if batch_size < 1:
            raise DataError(f"batch size {batch_size} must be positive; pass --batch-size 1 or more")
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}; check the launcher's environment")
        self.device = torch.device(device)
        self.images = data.images.to(self.device)
        self.labels = data.labels.to(self.device)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.rank, self.world_size, self.channels_last = rank, world_size, channels_last
        self.pad = self.images.shape[-1] // 8
        self.mean = torch.tensor(info.mean, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(info.std, device=self.device).view(1, 3, 1, 1) * 255
        self.epoch = 0
        n = len(self.labels)
        if train:
            self.num_samples = n // world_size // batch_size * batch_size
            if self.num_samples == 0:
                raise DataError(
                    f"batch size {batch_size} exceeds the {n // world_size} training samples per rank; "
                    "pass a smaller --batch-size or a larger --subset"
                )
        else:
            self.num_samples = len(range(rank, n, world_size))

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
        n = len(self.labels)
        if not self.train:
            indices = torch.arange(self.rank, n, self.world_size, device=self.device)
            for idx in indices.split(self.batch_size):
                yield self._finish(self.images[idx]), self.labels[idx]
            return
        g = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(n, generator=g)
        shifts = torch.randint(0, 2 * self.pad + 1, (n, 2), generator=g)  # drawn per position in perm
        flips = torch.rand(n, generator=g) < 0.5
        mine = slice(self.rank, self.rank + self.world_size * self.num_samples, self.world_size)
        perm, shifts, flips = (t[mine].to(self.device) for t in (perm, shifts, flips))
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


# ----------------------------------------------------------------------------------------------- entry point


@dataclass
class Data:
    """The loaders of a run and the dataset's info."""

    train: Loader
    test: Loader
    info: DatasetInfo

    def normalize(self, preprocess: dict) -> None:
        """Normalizes both splits as a model's ``preprocess`` record says (``mean``, ``std`` in [0, 1] units)."""
        for loader in (self.train, self.test):
            loader.set_normalization(preprocess["mean"], preprocess["std"])


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
        eval_batch_size: Test batch size per rank; defaults to twice ``batch_size``.
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
    return Data(
        Loader(train, info, batch_size, train=True, **common),
        Loader(test, info, eval_batch_size or 2 * batch_size, train=False, **common),
        info,
    )
