"""Image folders: a ``train/`` + ``test/`` (or ``val/``) tree of class folders, in a folder or a zip.

Scanning follows links safely (each real folder and file once, no link across splits or classes), decoding
gives 8-bit RGB whatever the file's mode, and a decoded tree is cached as uint8 tensors under
``$REDUCENET_CACHE`` (default ``~/.cache/reducenet``), keyed by a hash of the image bytes, the size and the crop.
"""
from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import signal
import struct
import sys
import zipfile
import zlib
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.datasets.folder import IMG_EXTENSIONS

from models.checkpoint import atomic_write, user_path
from models.errors import DataError, brief

from ..progress import Progress
from .base import ArrayData, _check_memory, _one_line
from .subsets import _subset_indices

_CACHE_VERSION = 3  # 2: keyed on content, 16-bit images scaled; 3: images of the size already cropped too
_SPLITS = ("train", "test", "val")
_WARNED: set[str] = set()  # the warnings this process printed (:func:`warn_once`)


def warn_once(message: str) -> None:
    """Prints ``warning: message`` on stderr as one line, once per process: a command that scans its data twice
    (to choose the loader, then to load it) says it once."""
    message = _one_line(message)
    if message not in _WARNED:
        _WARNED.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)


#: Where a zip member's bytes lie, from the zip's central directory (read once, by the scan): the offset of its
#: local header, its stored size, its size once decompressed, its compression (``zipfile.ZIP_STORED``, ...) and
#: its CRC-32. A plain tuple: a ``DataLoader`` worker started by spawn or forkserver unpickles the listing of
#: every image 8x faster than as named tuples.
ZipMember = tuple[int, int, int, int, int]


_LOCAL_HEADER = b"PK\x03\x04"


def read_member(f: BinaryIO, m: ZipMember) -> bytes | None:
    """The bytes of the zip member ``m`` read from the open zip ``f`` at its offset, CRC checked.

    Reading at the offsets the scan found spares every reader (each ``DataLoader`` worker) ``zipfile``'s parse of
    the whole central directory: seconds and tens of MB per worker for CIFAR's 60,000 entries, minutes and
    hundreds of MB for an ImageNet-sized zip. Returns None for a compression other than stored or deflated
    (bzip2, LZMA: left to ``zipfile``). A deflated member is inflated to at most its declared size plus one byte.

    Raises:
        zipfile.BadZipFile: The local header, the size or the CRC does not match the central directory.
        EOFError: The zip ends inside the member.
    """
    offset, compressed, size, method, crc = m
    if method not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return None
    f.seek(offset)
    head = f.read(30)
    if len(head) < 30 or head[:4] != _LOCAL_HEADER:
        raise zipfile.BadZipFile("no local file header at the member's offset")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    f.seek(offset + 30 + name_len + extra_len)
    raw = f.read(compressed)
    if len(raw) < compressed:
        raise EOFError("the zip ends inside the member")
    data = raw if method == zipfile.ZIP_STORED else zlib.decompressobj(-15).decompress(raw, size + 1)
    if len(data) != size or zlib.crc32(data) != crc:
        raise zipfile.BadZipFile("bad CRC or size")
    return data


class ZipHandle:
    """An open zip, for :meth:`ImageTree.read`: its file, read at the offsets the scan found, and ``zipfile``'s
    reader for members of another compression (bzip2, LZMA), made at its first use and kept, so that the central
    directory is parsed once per handle rather than once per member.

    Raises:
        DataError: The zip cannot be opened.
    """

    def __init__(self, source: Path) -> None:
        try:
            self.file: BinaryIO = open(source, "rb")
        except OSError as e:
            raise DataError(f"cannot open {source} ({e.strerror}); make it readable") from None
        self._zip: zipfile.ZipFile | None = None

    def zip(self) -> zipfile.ZipFile:
        """``zipfile``'s reader of this zip (it reads through :attr:`file`, seeking before every read)."""
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.file)
        return self._zip

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()  # leaves a file it was given open
        self.file.close()

    def __enter__(self) -> ZipHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class ImageTree:
    """The image files of a ``train/`` + ``test/`` (or ``val/``) tree of class folders.

    Attributes:
        source: The folder or ``.zip`` file.
        classes: Sorted class folder names of ``train/``.
        train: ``(path inside source, label)`` for every training image, sorted by class then path.
        test: The same for the test (or validation) images.
        members: In a zip, where each image's bytes lie (from the scan); empty for a folder.
    """

    source: Path
    classes: list[str]
    train: list[tuple[str, int]]
    test: list[tuple[str, int]]
    members: dict[str, ZipMember] = field(default_factory=dict, repr=False)

    @property
    def is_zip(self) -> bool:
        return self.source.is_file()

    def opened(self) -> AbstractContextManager[ZipHandle | None]:
        """A handle for :meth:`read`: the zip, open for reading (a :class:`ZipHandle`), or None for a folder."""
        return ZipHandle(self.source) if self.is_zip else nullcontext()

    def read(self, name: str, handle: ZipHandle | None = None) -> bytes:
        """Returns the bytes of the file ``name``; for a zip, read through ``handle`` (see :meth:`opened`) or a
        handle opened for this one call.

        Raises:
            DataError: The file cannot be read, or the zip member is damaged (bad CRC, truncated).
        """
        zipped = self.is_zip
        if zipped and handle is None:
            with self.opened() as handle:
                return self.read(name, handle)
        try:
            if not zipped:
                return (self.source / name).read_bytes()
            member = self.members.get(name)
            data = read_member(handle.file, member) if member is not None else None
            if data is None:  # another compression, or a tree not made by the scan: zipfile reads it
                data = handle.zip().read(name)
            return data
        except (OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError, NotImplementedError) as e:
            where = f"{name} in {self.source}" if zipped else str(self.source / name)
            fix = "replace the zip with an intact copy" if zipped else "remove or replace the file"
            raise DataError(f"cannot read {where} ({_one_line(str(e))}); {fix}") from None


def _place(folder: str, depths: tuple[int, ...] = (0, 1)) -> tuple[str, str | None] | None:
    """The ``(split folder, class)`` that a folder of a tree lies in, or None outside every split folder; the split
    folder is looked for at each of ``depths`` in turn.

    ``top/train/cat/sub`` gives ``("top/train", "cat")``, ``train`` gives ``("train", None)``; with ``depths``
    ``(1,)``, ``test/train/cat`` gives ``("test/train", "cat")`` (a tree inside a top folder named ``test``).
    """
    parts = folder.split("/")
    for depth in depths:  # train/<class>/... or <top>/train/<class>/...
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
            try:
                name, is_dir, link = rel + e.name, e.is_dir(), e.is_symlink()
            except OSError as err:  # a link that points to itself (ELOOP), or an entry gone while listing
                raise DataError(f"{folder}: cannot follow {rel + e.name} ({err.strerror}); remove or fix the link") \
                    from None
            if link and not os.path.exists(e.path):  # a dangling link, or a loop of links: no file behind it
                raise DataError(f"{folder}: {name} is a link to nothing readable "
                                f"({os.readlink(e.path)}); remove or fix the link")
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


def _list_files(source: Path) -> tuple[list[str], dict[str, ZipMember]]:
    """The files of a folder, or the members of a zip and where each lies; a zip's directory entries (``train/dog/``,
    ending in ``/``) are members too, so that an empty class folder in a zip is seen as in a folder."""
    if not source.is_file():
        return _walk(source), {}
    try:
        with zipfile.ZipFile(source) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(
            f"{source} is not a readable zip file ({e}); pass a .zip or folder of train/ and test/ class folders"
        ) from None
    members: dict[str, ZipMember] = {}
    for i in infos:  # a repeated name keeps its first place and its last entry, as zipfile reads it
        if i.flag_bits & 0x1:
            raise DataError(f"{source}: {i.filename} is encrypted; pass an unencrypted zip or a folder")
        members[i.filename] = (i.header_offset, i.compress_size, i.file_size, i.compress_type, i.CRC)
    return list(members), members


def _members_of(members: dict[str, ZipMember], *splits: Sequence[tuple[str, int]]) -> dict[str, ZipMember]:
    """The zip members of the images listed in ``splits`` (none for a folder): a tree carries only its own."""
    return {n: members[n] for items in splits for n, _ in items} if members else {}


def _sort_files(names: Sequence[str], depths: tuple[int, ...]) -> tuple[dict[str, dict[str, list[str]]],
                                                                        dict[str, set[str]]]:
    """The image files of each split folder by class (``"prefix/split" -> class -> files``), and the class folders
    of each split folder that hold any entry, a zip's directory entry included; split folders are looked for at
    ``depths`` (see :func:`_place`), hidden and ``__MACOSX`` entries skipped."""
    splits: dict[str, dict[str, list[str]]] = {}
    folders: dict[str, set[str]] = {}
    for n in names:
        parts = n.split("/")  # a directory entry "train/dog/" ends in "": it lies in train/dog
        place = _place("/".join(parts[:-1]), depths)
        if place and place[1] is not None and not any(p.startswith(".") or p == "__MACOSX" for p in parts):
            folders.setdefault(place[0], set()).add(place[1])
            if n.lower().endswith(IMG_EXTENSIONS):
                splits.setdefault(place[0], {}).setdefault(place[1], []).append(n)
    return splits, folders


def _top(splits: dict[str, dict[str, list[str]]]) -> str | None:
    """The folder (``""`` or ``"prefix/"``) of the one ``train/`` of ``splits`` when a ``test/`` or ``val/`` lies
    beside it, else None."""
    prefixes = {k.rpartition("/")[0] for k in splits if k.endswith("train")}
    if len(prefixes) != 1:
        return None
    prefix = prefixes.pop()
    top = prefix + "/" if prefix else ""
    return top if any(top + s in splits for s in ("test", "val")) else None


def _holds_splits(folder: Path) -> bool:
    """Whether ``folder`` holds a ``train/`` folder of class folders and a ``test/`` or ``val/`` folder."""
    train = folder / "train"
    try:
        return train.is_dir() and any(e.is_dir() for e in os.scandir(train)) and \
            any((folder / s).is_dir() for s in ("test", "val"))
    except OSError:  # unreadable: not judged a tree
        return False


def looks_like_image_tree(source: Path) -> bool:
    """Whether ``source``, a folder or a zip, seems to hold a ``train/`` + ``test/`` (or ``val/``) tree of class
    folders, at its top or in one top-level folder; a folder is judged by its first two levels of folders alone, a
    zip by its listing. Nothing is decoded: for advice on a wrong ``--dataset``, not a check of the tree."""
    if source.is_file():
        try:
            names, _ = _list_files(source)
        except DataError:  # not a zip
            return False
        return any(_top(_sort_files(names, depths)[0]) is not None for depths in ((0, 1), (1,)))
    try:
        tops = [source, *(Path(e.path) for e in os.scandir(source) if e.is_dir())]
    except OSError:
        return False
    return any(_holds_splits(t) for t in tops)


def scan_image_tree(source: str | os.PathLike) -> ImageTree:
    """Lists the images of a ``train/`` + ``test/`` (or ``val/``) tree of class folders, in a folder or a zip.

    The tree may sit inside one top-level folder (as in ``cifar10-jpeg.zip``). Files whose extension is not
    an image extension, and hidden or ``__MACOSX`` entries, are ignored. Nothing is decoded.

    In a folder, links are followed, but each real folder is listed and each real file counted once (a link
    loop adds nothing), and a link into another split or class folder of the tree is refused (a ``train/``
    link into ``test/`` would train on test images). A class folder of ``train/`` without images is refused (as
    torchvision's ``ImageFolder`` does); a class of ``train/`` without test images gives a warning on stderr (once,
    :func:`warn_once`). The tree's split folders are looked for at the top, then in one top-level folder; a top
    folder itself named ``test``, ``val`` or ``train`` holds the tree when the top level gives none.

    Args:
        source: A folder or a ``.zip`` file.

    Returns:
        The classes and the per-split ``(path, label)`` lists.

    Raises:
        DataError: The source is missing, not a zip, or not such a tree, a class folder of ``train/`` holds no
            image, or a link crosses its splits.
    """
    source = user_path(source).absolute()
    if not source.exists():
        raise DataError(f"{source} does not exist; pass --data-dir DIR with train/ and test/ (or val/) class folders")
    names, members = _list_files(source)
    splits, folders = _sort_files(names, (0, 1))
    if _top(splits) is None:  # a tree in a top folder named test/, val/ or train/: its splits lie one level down
        deeper = _sort_files(names, (1,))
        if _top(deeper[0]) is not None:
            splits, folders = deeper
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
    if test_key == top + "test" and top + "val" in splits:  # ImageNet-style train/val/test: which one scores
        warn_once(f"{source} has both {top}test/ and {top}val/: {top}test/ is the test split and {top}val/ is not "
                  "used; move it aside to test on it")
    classes = sorted(splits[top + "train"])
    class_dirs, train_dir = folders[top + "train"], source / f"{top}train"
    if train_dir.is_dir():  # an empty class folder lists no file
        class_dirs |= {e.name for e in os.scandir(train_dir)
                       if e.is_dir() and not e.name.startswith(".") and e.name != "__MACOSX"}
    imageless = sorted(class_dirs - set(classes))
    if imageless:  # as torchvision's ImageFolder: a class dropped without a word would shift every label
        raise DataError(f"{source}: {top}train/ has class folders without images ({', '.join(imageless[:5])}); "
                        f"add images ({', '.join(IMG_EXTENSIONS)}) or remove those folders")
    if len(classes) < 2:  # every prediction would be right: a 100% that means nothing
        raise DataError(f"{source} has one class folder ({top}train/{classes[0]}/); a classifier needs two or more "
                        "class folders under train/ and test/")
    unknown = sorted(set(splits[test_key]) - set(classes))
    if unknown:
        raise DataError(
            f"{source}: {test_key}/ has classes missing from {top}train/ ({', '.join(unknown[:5])}); "
            "make the class folders match"
        )
    untested = [c for c in classes if c not in splits[test_key]]
    if untested:
        more = f" and {len(untested) - 10} more" if len(untested) > 10 else ""
        warn_once(f"{source}: {test_key}/ has no images of classes {', '.join(untested[:10])}{more}: their test "
                  "accuracy cannot be measured")

    def items(key: str) -> list[tuple[str, int]]:
        return [(n, y) for y, c in enumerate(classes) for n in sorted(splits[key].get(c, []))]

    train, test = items(top + "train"), items(test_key)
    return ImageTree(source, classes, train, test, _members_of(members, train, test))


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


def eval_crop(size: int) -> float:
    """The share of an image's shorter side that a test image of an image folder keeps at ``size`` px: 224/256
    (torchvision's and timm's resize-256-crop-224) from 64 px up, the whole image below (CIFAR-sized images)."""
    return 224 / 256 if size >= 64 else 1.0


def center_fit(img: Image.Image, size: int, crop: float) -> Image.Image:
    """``img`` with its shorter side resized to ``round(size / crop)``, center-cropped to ``size`` x ``size``: the
    test transform of both loaders (an image of that size already is kept as it is when ``crop`` is 1)."""
    return TF.center_crop(TF.resize(img, round(size / crop), antialias=True), size)


def _decode(data: bytes, size: int, crop: float) -> np.ndarray:
    """Decodes one image to RGB and fits it to ``size`` (:func:`center_fit`)."""
    with Image.open(io.BytesIO(data)) as img:
        img = to_rgb(img)
    return np.asarray(center_fit(img, size, crop)).transpose(2, 0, 1)


def _decode_chunk(args: tuple[list[tuple[str, bytes]], int, float]) -> np.ndarray:
    chunk, size, crop = args
    out = np.empty((len(chunk), 3, size, size), np.uint8)
    for i, (name, data) in enumerate(chunk):
        try:
            out[i] = _decode(data, size, crop)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise DataError(f"cannot decode image {name} ({type(e).__name__}); remove or replace the file") from None
    return out


def _quiet_worker() -> None:
    """A decode worker leaves Ctrl-C to the main process, which stops the pool; and dies at once on the SIGTERM that
    stops it (the parent's handler, inherited through fork, would raise in it). A worker interrupted while it sends a
    result can leave the pool's ``terminate()`` waiting forever, and each one printed its traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _decode_images(tree: ImageTree, names: Sequence[str], size: int, crop: float, desc: str) -> torch.Tensor:
    """Decodes ``names`` from ``tree`` into a uint8 ``[N, 3, size, size]`` tensor, in a process pool."""
    out = torch.empty((len(names), 3, size, size), dtype=torch.uint8)
    chunk = 256
    with tree.opened() as handle:

        def tasks() -> Iterator[tuple[list[tuple[str, bytes]], int, float]]:
            for i in range(0, len(names), chunk):
                yield [(n, tree.read(n, handle)) for n in names[i : i + chunk]], size, crop

        workers = min(len(os.sched_getaffinity(0)), 8) if len(names) > 4 * chunk else 1
        pool = multiprocessing.get_context().Pool(workers, initializer=_quiet_worker) if workers > 1 else None
        try:
            results = pool.imap(_decode_chunk, tasks()) if pool else map(_decode_chunk, tasks())
            with Progress(len(names), desc, unit="img") as bar:
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
            warn_once(f"ignoring unreadable cache {path} ({type(e).__name__}); decoding again")
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
        atomic_write(path, lambda tmp: torch.save(c, tmp))  # a killed writer's temp file goes next time
    except OSError as e:
        warn_once(f"cannot write cache {path} ({getattr(e, 'reason', '') or brief(e)}); set REDUCENET_CACHE to a "
                  "writable folder")
    return splits[0], splits[1], c


def subset_tree(tree: ImageTree, n: int, seed: int, label: str) -> ImageTree:
    """The tree cut to ``n`` class-balanced training images and the same share of its test images (``--subset``)."""
    labels = [torch.tensor([y for _, y in items], dtype=torch.int64) for items in (tree.train, tree.test)]
    picked = _subset_indices(*labels, n, seed, len(tree.classes), label)
    kept = [[items[i] for i in p.tolist()] for items, p in zip((tree.train, tree.test), picked)]
    return ImageTree(tree.source, tree.classes, *kept, _members_of(tree.members, *kept))


def extract_images(tree: ImageTree, splits: dict[str, Sequence[tuple[str, int]]], dest: str | os.PathLike) -> Path:
    """Writes chosen images of ``tree`` as a folder tree ``dest/<split>/<class>/<file name>``, e.g. a small
    ``train/`` + ``test/`` copy of a large zip to benchmark or test with.

    Args:
        tree: the folder or zip to read.
        splits: split folder name -> the ``(path, label)`` items to write there.
        dest: the folder to write into (created if absent).

    Returns:
        ``dest`` as a path.
    """
    dest = Path(dest)
    with tree.opened() as handle:
        for split, items in splits.items():
            for name, label in items:
                path = dest / split / tree.classes[label] / Path(name).name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(tree.read(name, handle))
    return dest


def default_image_size(tree: ImageTree) -> int:
    """The first training image's size if it is square and at most 64 pixels, else 224."""
    name = tree.train[0][0]
    data = tree.read(name)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except (OSError, ValueError) as e:
        raise DataError(f"cannot decode image {name} ({type(e).__name__}); remove or replace the file") from None
    return w if w == h and w <= 64 else 224
