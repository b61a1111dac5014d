"""Where a dataset is read from: the data root, the CIFAR pickle folders, the JPEG copy, an image folder."""
from __future__ import annotations

import os
from pathlib import Path

import torchvision

from models.checkpoint import user_path
from models.errors import DataError

from .base import _NICE, _WHERE, DATASETS, _one_line
from .cifar import _PICKLE_DIRS, _PICKLE_FILES


def data_root(data_dir: str | os.PathLike | None) -> Path:
    """The data root meant by ``data_dir``: itself, else ``$REDUCENET_DATA``, else ``./data``; absolute."""
    root = data_dir if data_dir is not None else os.environ.get("REDUCENET_DATA") or "data"
    return user_path(root).absolute()


def _is_pickle_dir(path: Path, name: str) -> bool:
    train, test, meta, *_ = _PICKLE_FILES[name]
    return all((path / f).is_file() for f in (*train, *test, meta))


def _find(name: str, root: Path) -> tuple[str, Path] | None:
    if root.is_file():  # the JPEG copy's zip itself
        return ("zip", root) if name == "cifar10" and root.suffix == ".zip" else None
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
