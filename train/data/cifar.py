"""CIFAR's python pickle layout (torchvision's ``cifar-10-batches-py`` / ``cifar-100-python``), read safely.

The files are unpickled without running any code from them (only numpy arrays, dtypes and plain Python values
are admitted) and every field is checked, so a damaged or hostile file is one line of error.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torchvision.transforms.functional as TF

from models.errors import DataError

from .base import _INTACT, ArrayData, _one_line

_PICKLE_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_PICKLE_FILES = {  # (train files, test files, meta file, label key, class names key)
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": (["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
_FULL_SIZES = (50000, 10000)
# Every global a CIFAR pickle may name: numpy arrays, dtypes and scalars (under numpy 1 and numpy 2 names), and
# the codec numpy's protocol-2 pickles use for their bytes. Builtins (dict, list, str, int, ...) need no global.
_PICKLE_GLOBALS = frozenset(
    [(f"{core}.{module}", name) for core in ("numpy.core", "numpy._core")
     for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))]
    + [("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")]
)


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
