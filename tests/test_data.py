"""Tests of train/data.py: sources, decoding and caching, subsets, and the batch loader."""
from __future__ import annotations

import os
import pickle
import shlex
import shutil
import struct
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

import train.data as data
from models.errors import DataError
from train.data import (
    CIFAR10_CLASSES,
    ArrayData,
    DatasetInfo,
    Loader,
    balanced_subset,
    build_data,
    load_dataset,
    resolve_source,
    scan_image_tree,
)

from _shared import CIFAR10, ROOT, SHARED, one_line

pytestmark = pytest.mark.usefixtures("isolated_cache")


def shared(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (set REDUCENET_SHARED_DATA to the shared data folder)")
    return path


def pixels(label: int, k: int, size: tuple[int, int]) -> np.ndarray:
    """A distinct deterministic RGB image for image ``k`` of class ``label``."""
    rng = np.random.default_rng(1000 * label + k)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


def make_tree(
    root: Path,
    classes=("cat", "ant", "bee"),
    per_class=(4, 2),
    test_name="test",
    size=(8, 8),
    ext="png",
) -> Path:
    """Writes ``root/train/<class>/<k>.<ext>`` and ``root/<test_name>/<class>/<k>.<ext>`` (PNG: lossless)."""
    for split, n in (("train", per_class[0]), (test_name, per_class[1])):
        for label, c in enumerate(sorted(classes)):
            (root / split / c).mkdir(parents=True)
            for k in range(n):
                Image.fromarray(pixels(label, k, size)).save(root / split / c / f"{k:03d}.{ext}")
    return root


def zip_tree(folder: Path, dest: Path, top: str | None = None, compression: int = zipfile.ZIP_STORED) -> Path:
    """Zips ``folder``'s contents, optionally under one top-level folder, listing files only (like cifar10-jpeg.zip)."""
    with zipfile.ZipFile(dest, "w", compression) as z:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                z.write(p, f"{top}/{rel}" if top else rel)
    return dest


# ----------------------------------------------------------------------------------------------- CIFAR pickles


def raw_pickle(path: Path) -> dict:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def test_cifar10_exact_subset_matches_pickles():
    root = shared("cifar-10-subset")
    train, test, info = load_dataset("cifar10", root, download=False)
    assert train.images.shape == (5438, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (1017, 3, 32, 32) and test.labels.dtype == torch.int64
    assert info.label == "CIFAR-10 (exact subset, 5438 train / 1017 test)"
    assert info.classes == CIFAR10_CLASSES and info.num_classes == 10 and info.image_size == 32
    assert info.source == str(root / "cifar-10-batches-py")
    assert info.mean == (0.4914, 0.4822, 0.4465)
    assert 0 <= int(train.labels.min()) and int(train.labels.max()) == 9
    b1, b2, tb = (raw_pickle(root / "cifar-10-batches-py" / f) for f in ("data_batch_1", "data_batch_2", "test_batch"))
    assert torch.equal(train.images[0].flatten(), torch.from_numpy(b1["data"][0]))
    assert torch.equal(train.images[1102].flatten(), torch.from_numpy(b2["data"][0]))  # batches are concatenated
    assert torch.equal(test.images[-1].flatten(), torch.from_numpy(tb["data"][-1]))
    assert train.labels[:10].tolist() == b1["labels"][:10] and test.labels.tolist() == tb["labels"]


def test_cifar10_root_may_be_the_pickle_folder_itself():
    kind, path = resolve_source("cifar10", shared("cifar-10-subset", "cifar-10-batches-py"))
    assert (kind, path.name) == ("pickle", "cifar-10-batches-py")


def test_cifar100_exact_subset():
    root = shared("cifar-100-subset")
    train, test, info = load_dataset("cifar100", root, download=False)
    assert (len(train), len(test), info.num_classes) == (1117, 916, 100)
    assert info.label == "CIFAR-100 (exact subset, 1117 train / 916 test)"
    assert info.classes[:3] == ["apple", "aquarium_fish", "baby"] and info.std == (0.2673, 0.2564, 0.2762)
    raw = raw_pickle(root / "cifar-100-python" / "train")
    assert train.labels.tolist() == raw["fine_labels"] and train.labels.unique().numel() == 100
    assert torch.equal(train.images[5].flatten(), torch.from_numpy(raw["data"][5]))


def test_cifar_pickles_resize_to_image_size():
    train, _, info = load_dataset("cifar10", shared("cifar-10-subset"), image_size=40, download=False)
    assert train.images.shape[1:] == (3, 40, 40) and info.image_size == 40


def cifar_batch(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    return {"batch_label": "b", "data": data, "labels": [k % 10 for k in range(n)]}


def dump(obj: object, path: Path, protocol: int = pickle.DEFAULT_PROTOCOL) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


def make_cifar(root: Path, per_batch: int = 10, n_test: int = 20, classes=CIFAR10_CLASSES) -> Path:
    """A valid tiny ``root/cifar-10-batches-py``: 5 batches of ``per_batch`` images and a test batch."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(cifar_batch(per_batch, seed=i), folder / f"data_batch_{i}")
    dump(cifar_batch(n_test, seed=0), folder / "test_batch")
    dump({"label_names": list(classes), "num_cases_per_batch": per_batch, "num_vis": 3072}, folder / "batches.meta")
    return folder


def test_cifar_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Touch:
        def __reduce__(self):
            return os.system, (f"touch {shlex.quote(str(marker))}",)

    pickle.loads(pickle.dumps(Touch()))  # control: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    folder = make_cifar(tmp_path / "c")
    dump({**cifar_batch(10), "batch_label": Touch()}, folder / "data_batch_1")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "c", download=False)
    msg = one_line(e)
    assert "refusing to load" in msg and "data_batch_1" in msg and "system" in msg and "intact copy" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5, "numpy1"])
def test_cifar_pickles_of_every_numpy_and_protocol_load(tmp_path, protocol):
    folder = make_cifar(tmp_path)
    batch = {**cifar_batch(10), "labels": np.arange(10) % 10, "scalar": np.int64(7)}  # arrays and numpy scalars
    if protocol == "numpy1":  # the name the original (numpy 1, Python 2) files use
        raw = pickle.dumps(batch, protocol=2)
        assert b"numpy._core.multiarray\n" in raw
        (folder / "data_batch_1").write_bytes(raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    else:
        dump(batch, folder / "data_batch_1", protocol=protocol)
    train, test, info = load_dataset("cifar10", tmp_path, download=False)
    assert torch.equal(train.images[:10].flatten(1), torch.from_numpy(batch["data"]))
    assert train.labels[:10].tolist() == list(range(10)) and len(train) == 50 and len(test) == 20


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda b: b.pop("data"), "needs 'data' and 'labels'"),
        (lambda b: b.pop("labels"), "needs 'data' and 'labels'"),
        (lambda b: b.update(data=b["data"][:, :3000]), "3072"),
        (lambda b: b.update(data=b["data"].astype(np.int64)), "int64"),
        (lambda b: b.update(data=b["data"].reshape(10, 3, 32, 32)), "3072"),
        (lambda b: b.update(labels=b["labels"][:-1]), "10 images but 9 labels"),
        (lambda b: b.update(labels=[10] + b["labels"][1:]), "label 10, not a class number in [0, 10)"),
        (lambda b: b.update(labels=[-1] + b["labels"][1:]), "label -1"),
        (lambda b: b.update(labels=["cat"] + b["labels"][1:]), "label 'cat'"),
        (lambda b: b.update(labels="0123456789"), "not a list"),
    ],
    ids=["no-data", "no-labels", "narrow", "int64", "4d", "count", "label-10", "label-minus-1", "label-str", "str"],
)
def test_malformed_cifar_batches_raise_one_line(tmp_path, change, expected):
    folder = make_cifar(tmp_path)
    batch = cifar_batch(10)
    change(batch)
    dump(batch, folder / "data_batch_3")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = one_line(e)
    assert expected in msg and "data_batch_3" in msg and "intact copy" in msg


def test_malformed_cifar_files_that_are_not_batches_raise_one_line(tmp_path):
    folder = make_cifar(tmp_path)
    dump({"num_vis": 3072}, folder / "batches.meta")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    assert "batches.meta" in one_line(e) and "'label_names'" in str(e.value)
    dump([1, 2, 3], folder / "test_batch")
    make_cifar(tmp_path / "b")
    dump([1, 2, 3], tmp_path / "b" / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "b", download=False)
    assert "test_batch is not a CIFAR batch" in one_line(e)
    (tmp_path / "b" / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps(cifar_batch(10))[:500])
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path / "b", download=False)
    assert "cannot read" in one_line(e)


def test_cifar_class_count_comes_from_the_meta_file(tmp_path):
    folder = make_cifar(tmp_path, classes=[*CIFAR10_CLASSES, "unicorn"])
    dump({**cifar_batch(10), "labels": [10] * 10}, folder / "data_batch_2")
    train, _, info = load_dataset("cifar10", tmp_path, download=False)
    assert info.num_classes == 11 and info.classes[-1] == "unicorn" and train.labels[10:20].tolist() == [10] * 10


# ----------------------------------------------------------------------------------------------- CIFAR-10 JPEG zip


def test_shared_dir_resolves_to_jpeg_zip_with_cifar10_classes():
    root = shared()
    shared("cifar10-jpeg.zip")
    assert resolve_source("cifar10", root) == ("zip", root / "cifar10-jpeg.zip")
    tree = scan_image_tree(root / "cifar10-jpeg.zip")  # lists the zip, decodes nothing
    assert tree.classes == CIFAR10_CLASSES
    assert (len(tree.train), len(tree.test)) == (50000, 10000)
    assert tree.train[0] == ("cifar10-jpeg/train/airplane/0000.jpg", 0) and tree.test[-1][1] == 9


def test_jpeg_zip_copy_gets_cifar10_label_and_constants(tmp_path):
    tree = make_tree(tmp_path / "t", classes=CIFAR10_CLASSES, per_class=(2, 1), size=(32, 32), ext="jpg")
    zip_tree(tree, tmp_path / "cifar10-jpeg.zip", top="cifar10-jpeg")
    train, test, info = load_dataset("cifar10", tmp_path, download=False)
    assert info.label == "CIFAR-10 (JPEG q75 copy)" and info.mean == (0.4914, 0.4822, 0.4465)
    assert info.source == str(tmp_path / "cifar10-jpeg.zip") and info.classes == CIFAR10_CLASSES
    assert train.images.shape == (20, 3, 32, 32) and train.labels.tolist() == [y for y in range(10) for _ in range(2)]


def test_cifar10_zip_with_other_classes_is_rejected(tmp_path):
    zip_tree(make_tree(tmp_path / "t"), tmp_path / "cifar10-jpeg.zip")
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    assert "imagefolder" in one_line(e)


# ----------------------------------------------------------------------------------------------- image folders


def test_imagefolder_folder_decodes_exact_pixels_and_stats(tmp_path):
    root = make_tree(tmp_path / "tree")
    train, test, info = load_dataset("imagefolder", root)
    assert info.classes == ["ant", "bee", "cat"] and info.image_size == 8  # default: the images' own size
    assert train.images.shape == (12, 3, 8, 8) and test.images.shape == (6, 3, 8, 8)
    assert train.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert np.array_equal(train.images[5].permute(1, 2, 0).numpy(), pixels(1, 1, (8, 8)))
    x = train.images.double() / 255
    assert torch.allclose(torch.tensor(info.mean), x.mean((0, 2, 3)).float(), atol=1e-6)
    assert torch.allclose(torch.tensor(info.std), x.std((0, 2, 3), unbiased=False).float(), atol=1e-6)


def test_imagefolder_zip_with_top_folder_and_val_split_equals_folder(tmp_path):
    root = make_tree(tmp_path / "tree", test_name="val")
    a_train, a_test, a_info = load_dataset("imagefolder", root)
    b_train, b_test, b_info = load_dataset("imagefolder", zip_tree(root, tmp_path / "tree.zip", top="mydata"))
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.labels, b_test.labels)
    assert a_info.classes == b_info.classes and b_info.source == str(tmp_path / "tree.zip")


def test_a_tree_with_test_and_val_tests_on_test_and_says_so(tmp_path, capsys):
    root = make_tree(tmp_path / "tree")
    shutil.copytree(root / "test", root / "val")
    tree = scan_image_tree(root)
    assert {n.split("/")[0] for n, _ in tree.test} == {"test"}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "test/ is the test split and val/ is not used" in err
    scan_image_tree(root)
    assert capsys.readouterr().err == ""  # once per process


@pytest.mark.parametrize("top, test_name", [("test", "test"), ("test", "val"), ("val", "test"), ("train", "test")])
@pytest.mark.parametrize("form", ["zip", "folder"])
def test_a_tree_in_a_top_folder_named_like_a_split_is_found_one_level_down(tmp_path, top, test_name, form):
    """``test/train/cat/0.png`` + ``test/test/cat/0.png``: the top folder is not the tree's test split."""
    root = make_tree(tmp_path / "tree", test_name=test_name)
    if form == "zip":
        source = zip_tree(root, tmp_path / "tree.zip", top=top)
    else:
        source = tmp_path / "outer"
        shutil.copytree(root, source / top)
    plain, tree = scan_image_tree(root), scan_image_tree(source)
    assert tree.classes == plain.classes == ["ant", "bee", "cat"]
    assert tree.train == [(f"{top}/{n}", y) for n, y in plain.train]
    assert tree.test == [(f"{top}/{n}", y) for n, y in plain.test] and tree.test[0][0].startswith(f"{top}/{test_name}/")
    if form == "zip":
        assert torch.equal(load_dataset("imagefolder", source)[1].images, load_dataset("imagefolder", root)[1].images)


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2])
def test_zip_members_are_read_at_the_scans_offsets_without_parsing_the_zip_again(tmp_path, monkeypatch, compression):
    root = make_tree(tmp_path / "tree")
    zipped = zip_tree(root, tmp_path / "tree.zip", top="top", compression=compression)
    with zipfile.ZipFile(zipped, "a", compression) as z, warnings.catch_warnings():  # a name twice: the last counts
        warnings.simplefilter("ignore")  # "Duplicate name"
        z.writestr("top/train/ant/000.png", (root / "train" / "bee" / "001.png").read_bytes())
    tree = scan_image_tree(zipped)
    names = [n for n, _ in tree.train + tree.test]
    assert names.count("top/train/ant/000.png") == 1 and set(tree.members) == set(names)
    with zipfile.ZipFile(zipped) as z:
        expected = {n: z.read(n) for n in names}
    parsed = []  # each time zipfile parses the zip's central directory
    if compression != zipfile.ZIP_BZIP2:  # bzip2 and LZMA members are left to zipfile
        monkeypatch.setattr(zipfile, "ZipFile", None)  # opening the zip with zipfile again would fail
    else:
        monkeypatch.setattr(zipfile, "ZipFile", lambda *a, _zf=zipfile.ZipFile: parsed.append(1) or _zf(*a))
    with tree.opened() as handle:
        assert {n: tree.read(n, handle) for n in names} == expected
    assert len(parsed) == (compression == zipfile.ZIP_BZIP2)  # once per handle, not once per member
    assert tree.read(names[0]) == expected[names[0]]


def test_a_bzip2_zip_streams_the_batches_of_its_folder_in_worker_processes(tmp_path):
    from train.data.stream import build_stream_data

    root = make_tree(tmp_path / "tree")
    zipped = zip_tree(root, tmp_path / "tree.zip", compression=zipfile.ZIP_BZIP2)
    folder, zip_data = (build_stream_data(str(p), 4, workers=w) for p, w in ((root, 0), (zipped, 2)))
    for loader in (folder.train, zip_data.train, folder.test, zip_data.test):
        loader.set_epoch(1)
    for a, b in ((folder.train, zip_data.train), (folder.test, zip_data.test)):
        pairs = list(zip(a, b))
        assert pairs and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in pairs)


def test_a_zip_that_cannot_be_opened_is_one_line_wherever_it_is_read(tmp_path, monkeypatch):
    from train.data import folders
    from train.data.stream import ImageFiles

    tree = scan_image_tree(zip_tree(make_tree(tmp_path / "tree"), tmp_path / "tree.zip"))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(folders, "open", denied, raising=False)  # as for a user without read access
    for read in (lambda: tree.read(tree.train[0][0]), lambda: ImageFiles(tree, tree.train, 8, False, 0)[0, 0]):
        with pytest.raises(DataError) as e:
            read()
        assert one_line(e) == f"cannot open {tmp_path / 'tree.zip'} (Permission denied); make it readable"


def test_a_damaged_deflated_member_and_an_encrypted_zip_are_one_line(tmp_path):
    root = make_tree(tmp_path / "tree")
    zipped = zip_tree(root, tmp_path / "tree.zip", compression=zipfile.ZIP_DEFLATED)
    tree = scan_image_tree(zipped)
    name = "train/bee/003.png"
    offset, compressed, *_ = tree.members[name]
    raw = bytearray(zipped.read_bytes())
    raw[offset + 30 + len(name) + compressed // 2] ^= 0xFF  # inside the deflated data, after the local header
    zipped.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        tree.read("train/bee/003.png")
    assert "train/bee/003.png" in one_line(e) and "intact copy" in one_line(e)
    from train.data.stream import ImageFiles  # the streaming loader says the same, not "cannot decode image"
    with pytest.raises(DataError) as streamed:
        ImageFiles(tree, tree.train, 8, False, 0)[[n for n, _ in tree.train].index(name), 0]
    assert one_line(streamed) == one_line(e)
    raw = bytearray(zip_tree(root, tmp_path / "plain.zip").read_bytes())
    at = raw.find(b"PK\x01\x02")  # the first central directory entry: set its "encrypted" flag
    raw[at + 8] |= 0x1
    (tmp_path / "locked.zip").write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        scan_image_tree(tmp_path / "locked.zip")
    assert "encrypted" in one_line(e)


def test_imagefolder_resizes_and_center_crops(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=(1, 1), size=(12, 9))
    train, _, info = load_dataset("imagefolder", root, image_size=6)
    assert train.images.shape == (3, 3, 6, 6) and info.image_size == 6
    resized = np.asarray(Image.fromarray(pixels(0, 0, (12, 9))).resize((8, 6), Image.BILINEAR))
    assert np.array_equal(train.images[0].permute(1, 2, 0).numpy(), resized[:, 1:7])  # shorter side 6, center
    big = make_tree(tmp_path / "big", per_class=(1, 1), size=(100, 80))
    train, _, info = load_dataset("imagefolder", big)  # not small and square: ImageNet-style 224
    assert train.images.shape == (3, 3, 224, 224) and info.image_size == 224


def test_decoded_tree_is_cached_atomically(tmp_path, monkeypatch):
    root = zip_tree(make_tree(tmp_path / "tree"), tmp_path / "tree.zip")
    first = load_dataset("imagefolder", root)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and cached[0].suffix == ".pt"  # no temporary file left behind

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(data.folders, "_decode_images", no_decoding)
    second = load_dataset("imagefolder", root)
    assert torch.equal(first[0].images, second[0].images) and first[2] == second[2]
    os.utime(root, (1, 1))  # the same bytes with another mtime: still the cache
    assert torch.equal(load_dataset("imagefolder", root)[0].images, first[0].images)


def replace_keeping_size_and_mtime(path: Path, data: bytes) -> None:
    st = path.stat()
    assert len(data) == st.st_size
    path.write_bytes(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_cache_sees_new_pixels_with_the_same_size_and_mtime(tmp_path):
    root = make_tree(tmp_path / "tree", per_class=(2, 1), ext="bmp")  # BMPs of one size: same byte count
    first, _, _ = load_dataset("imagefolder", root)
    assert np.array_equal(first.images[0].permute(1, 2, 0).numpy(), pixels(0, 0, (8, 8)))
    bee = (root / "train" / "bee" / "000.bmp").read_bytes()
    replace_keeping_size_and_mtime(root / "train" / "ant" / "000.bmp", bee)
    second, _, _ = load_dataset("imagefolder", root)
    assert np.array_equal(second.images[0].permute(1, 2, 0).numpy(), pixels(1, 0, (8, 8)))
    assert torch.equal(second.images[1:], first.images[1:])

    zipped = zip_tree(make_tree(tmp_path / "z", per_class=(2, 1), ext="bmp"), tmp_path / "z.zip")  # stored
    first, _, _ = load_dataset("imagefolder", zipped)
    (tmp_path / "z" / "train" / "ant" / "000.bmp").write_bytes(bee)
    zip_tree(tmp_path / "z", tmp_path / "z2.zip")
    replace_keeping_size_and_mtime(zipped, (tmp_path / "z2.zip").read_bytes())
    second, _, _ = load_dataset("imagefolder", zipped)
    assert np.array_equal(second.images[0].permute(1, 2, 0).numpy(), pixels(1, 0, (8, 8)))


def test_link_from_train_into_test_is_refused(tmp_path):
    for name, make_link in [
        ("folder", lambda r: (r / "train" / "cat" / "more").symlink_to(r / "test" / "cat")),
        ("file", lambda r: (r / "train" / "cat" / "999.png").symlink_to(r / "test" / "bee" / "000.png")),
        ("split", lambda r: (r / "train" / "ant" / "000.png").unlink() or (r / "train" / "ant" / "000.png").symlink_to(
            r / "val" / "ant" / "001.png")),
    ]:
        root = make_tree(tmp_path / name, test_name="val" if name == "split" else "test")
        make_link(root)
        with pytest.raises(DataError) as e:
            load_dataset("imagefolder", root)
        msg = one_line(e)
        assert "the splits would overlap" in msg and "remove the link" in msg and "train/" in msg
    assert not (tmp_path / "cache").exists()


def test_link_into_another_class_is_refused(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "train" / "ant" / "more").symlink_to(root / "train" / "cat")
    with pytest.raises(DataError) as e:
        scan_image_tree(root)
    assert "train/ant/more is a link into train/cat/" in one_line(e) and "two labels" in str(e.value)


def test_link_loops_and_duplicate_links_count_each_file_once(tmp_path):
    root = make_tree(tmp_path / "tree")
    outside = tmp_path / "outside"
    outside.mkdir()
    for k in range(2):
        Image.fromarray(pixels(9, k, (8, 8))).save(outside / f"x{k}.png")
    (outside / "loop").symlink_to(outside)
    cat = root / "train" / "cat"
    (cat / "ext").symlink_to(outside)  # followed: its two images are cat images
    (cat / "ext2").symlink_to(outside)  # the same real folder again: adds nothing
    (cat / "again").symlink_to(cat)  # loops, into the class itself and up to the split and the tree
    (cat / "up").symlink_to(root / "train")
    (cat / "top").symlink_to(root)
    (cat / "dup.png").symlink_to(cat / "000.png")
    train, test, _ = load_dataset("imagefolder", root)
    assert train.labels.bincount().tolist() == [4, 4, 6] and len(test) == 6
    extra = [a.permute(1, 2, 0).numpy() for a in train.images[-2:]]  # sorted: cat/000..003, then cat/ext/x0, x1
    assert np.array_equal(extra[0], pixels(9, 0, (8, 8))) and np.array_equal(extra[1], pixels(9, 1, (8, 8)))
    assert [n for n, _ in scan_image_tree(root).train][-2:] == ["train/cat/ext/x0.png", "train/cat/ext/x1.png"]


def test_a_tree_of_one_class_is_refused(tmp_path):
    root = make_tree(tmp_path / "tree", classes=("cat",))
    with pytest.raises(DataError) as e:
        scan_image_tree(root)
    assert "one class folder" in one_line(e)


@pytest.mark.parametrize("form", ["empty folder", "no image file", "zip", "empty folder in a zip"])
def test_a_train_class_folder_without_images_is_refused_not_dropped(tmp_path, form):
    """Dropping it would shift the labels of the classes after it and train a classifier of fewer classes without a
    word (torchvision's ImageFolder refuses it too); hidden folders (.ipynb_checkpoints) are not classes. In a zip,
    an empty class folder is a directory entry (``train/dog/``), as ``zip -r`` writes one."""
    root = make_tree(tmp_path / "tree")
    (root / "train" / "dog").mkdir()
    (root / "train" / ".ipynb_checkpoints").mkdir()
    if form in ("no image file", "zip"):
        (root / "train" / "dog" / "d.gif").write_bytes(b"GIF89a")
    source = zip_tree(root, tmp_path / "tree.zip") if "zip" in form else root
    if form == "empty folder in a zip":
        with zipfile.ZipFile(source, "a") as z:
            for folder in ("train/", "train/dog/", "train/.ipynb_checkpoints/"):
                z.writestr(zipfile.ZipInfo(folder), b"")
    with pytest.raises(DataError) as e:
        scan_image_tree(source)
    assert "train/ has class folders without images (dog)" in one_line(e) and ".png" in one_line(e)
    (root / "train" / "dog").rename(tmp_path / "dog")  # without it, the tree (and its hidden folder) is fine
    assert scan_image_tree(root).classes == ["ant", "bee", "cat"]


@pytest.mark.parametrize("link", ["self", "dangling"])
def test_a_link_to_itself_or_to_nothing_is_one_line(tmp_path, link):
    root = make_tree(tmp_path / "tree")
    bad = root / "train" / "cat" / "bad.png"
    bad.symlink_to(bad if link == "self" else tmp_path / "gone.png")
    with pytest.raises(DataError) as e:
        scan_image_tree(root)
    assert "train/cat/bad.png" in one_line(e) and "link" in str(e.value)


def png16(path: Path, a: np.ndarray) -> None:
    """Writes a 16-bit PNG (grey, grey+alpha, RGB or RGBA by the last axis) of uint16 ``a`` (PIL cannot)."""
    h, w, c = a.shape
    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    chunks = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunks)


def test_16_bit_and_other_modes_decode_to_8_bit_rgb(tmp_path):
    rng = np.random.default_rng(0)
    a16 = rng.integers(0, 65536, (4, 4, 4), dtype=np.uint16)
    folder = tmp_path / "tree" / "train" / "x"
    folder.mkdir(parents=True)
    Image.fromarray(a16[..., 0]).save(folder / "a.png")  # mode I;16: PIL's convert("RGB") makes it all white
    png16(folder / "b.png", a16[..., :3])
    png16(folder / "c.png", a16)
    png16(folder / "d.png", a16[..., :2])
    a8 = pixels(0, 0, (4, 4))
    palette = Image.fromarray(a8).quantize(4)
    palette.save(folder / "e.png", transparency=bytes([0, 255, 128, 255]))
    la = Image.fromarray(np.stack([a8[..., 0], a8[..., 1]], -1), "LA")
    la.save(folder / "f.png")
    cmyk = Image.fromarray(a8).convert("CMYK")
    cmyk.save(folder / "g.tiff")
    for split, c in (("test", "x"), ("train", "y"), ("test", "y")):  # a second class: one class is refused
        (tmp_path / "tree" / split / c).mkdir(parents=True)
        Image.fromarray(a8).save(tmp_path / "tree" / split / c / "0.png")
    assert Image.open(folder / "a.png").mode == "I;16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning from PIL either
        train, _, _ = load_dataset("imagefolder", tmp_path / "tree")
    got = train.images.permute(0, 2, 3, 1).numpy()
    grey = (a16[..., :1] >> 8).astype(np.uint8)
    assert np.array_equal(got[0], grey.repeat(3, -1))
    assert np.array_equal(got[1], (a16[..., :3] >> 8).astype(np.uint8))
    assert np.array_equal(got[2], (a16[..., :3] >> 8).astype(np.uint8))
    assert np.array_equal(got[3], grey.repeat(3, -1))
    assert np.array_equal(got[4], np.asarray(palette.convert("RGBA").convert("RGB")))
    assert np.array_equal(got[5], np.asarray(la.convert("RGB")))
    assert np.array_equal(got[6], np.asarray(cmyk.convert("RGB")))


def test_test_split_missing_classes_warns(tmp_path, capsys, monkeypatch):
    """A plain ``warning: ...`` line on stderr, not a Python warning with its source line."""
    monkeypatch.setattr(data.folders, "_WARNED", set())  # what earlier tests printed (a tmp_path's name recurs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scan_image_tree(make_tree(tmp_path / "complete"))  # control: no warning
        assert capsys.readouterr().err == ""
        root = make_tree(tmp_path / "tree", classes=("ant", "bee", "cat", "dog"))
        shutil.rmtree(root / "test" / "bee")
        shutil.rmtree(root / "test" / "dog")
        train, test, info = load_dataset("imagefolder", root)
    assert info.num_classes == 4 and test.labels.unique().tolist() == [0, 2]
    assert capsys.readouterr().err == (f"warning: {root}: test/ has no images of classes bee, dog: their test "
                                       "accuracy cannot be measured\n")


@pytest.mark.parametrize("loader", ["auto", "stream"])
def test_a_class_without_test_images_is_warned_once_by_the_training_data_path(tmp_path, capsys, monkeypatch, loader):
    """``train.assemble.load_data`` scans the tree to pick the loader, then loads it (scanning again in memory): one
    warning line all the same."""
    monkeypatch.setattr(data.folders, "_WARNED", set())  # what earlier tests printed (a tmp_path's name recurs)
    from train.assemble import load_data
    from train.engine import Dist
    from train.spec import DataSpec

    root = make_tree(tmp_path / "tree", classes=("ant", "bee", "cat"))
    shutil.rmtree(root / "test" / "bee")
    spec = DataSpec(dataset="imagefolder", data_dir=str(root), loader=loader, workers=0, batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded, resolved = load_data(spec, 0, False, Dist(), torch.device("cpu"))
    assert resolved.loader == {"auto": "memory", "stream": "stream"}[loader] and loaded.info.classes[1] == "bee"
    err = capsys.readouterr().err
    assert err == f"warning: {root}: test/ has no images of classes bee: their test accuracy cannot be measured\n"


def test_large_tree_decodes_in_a_process_pool(tmp_path):
    root = make_tree(tmp_path / "tree", classes=("a", "b"), per_class=(520, 1), size=(4, 4))
    train, _, _ = load_dataset("imagefolder", root, image_size=8)  # > 1024 images: the pool path
    assert train.images.shape == (1040, 3, 8, 8) and train.labels.bincount().tolist() == [520, 520]


# ----------------------------------------------------------------------------------------------- errors


def test_missing_and_empty_dirs_raise_one_line(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", tmp_path / "nope")
    assert "--data-dir" in one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", tmp_path / "empty")
    assert "train/" in one_line(e)
    assert not (tmp_path / "cache").exists()


def test_bad_zips_raise_one_line_and_write_nothing(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", junk)
    one_line(e)
    with zipfile.ZipFile(tmp_path / "text.zip", "w") as z:
        z.writestr("train/readme.txt", "hello\n")
        z.writestr("notes/a/b.png", b"")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", tmp_path / "text.zip")
    assert "not an image tree" in one_line(e)
    no_test = make_tree(tmp_path / "t", test_name="holdout")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", no_test)
    assert "val/" in one_line(e)
    assert not (tmp_path / "cache").exists()


def test_corrupt_image_raises_one_line(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "train" / "bee" / "001.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root)
    assert "001.png" in one_line(e)


def test_corrupt_zip_member_raises_one_line(tmp_path):
    root = make_tree(tmp_path / "tree")
    zipped = zip_tree(root, tmp_path / "tree.zip")  # stored: the member's bytes lie in the zip as they are
    member = (root / "train" / "bee" / "003.png").read_bytes()  # no twin in test/
    raw = bytearray(zipped.read_bytes())
    at = raw.find(member) + len(member) // 2
    raw[at] ^= 0xFF
    zipped.write_bytes(bytes(raw))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", zipped)
    msg = one_line(e)
    assert "train/bee/003.png" in msg and str(zipped) in msg and "intact copy" in msg
    assert not (tmp_path / "cache").exists()


def test_cifar_not_found_without_download(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = one_line(e)
    assert "cifar-10-batches-py" in msg and "cifar10-jpeg.zip" in msg and "--data-dir" in msg and str(tmp_path) in msg


def test_failed_download_raises_one_line(tmp_path, monkeypatch):
    calls = []

    class Offline:
        def __init__(self, root, train, download):
            calls.append(root)
            raise RuntimeError("no route to host\n(offline)")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", tmp_path)
    assert calls == [str(tmp_path)] and "download failed" in one_line(e)


@pytest.mark.parametrize("form", ["tree", "val tree", "tree in a top folder", "zip of a tree", "other files"])
def test_cifar_is_never_downloaded_into_a_folder_with_other_files(tmp_path, monkeypatch, form):
    """Forgetting --dataset imagefolder: torchvision would write CIFAR into the user's image folder. It downloads
    into an empty folder only, and an image tree (or a zip of one) is named with the option to pass."""
    calls = []
    monkeypatch.setattr(data, "_download", lambda name, root: calls.append(root) or "URLError: offline (test)")
    root = tmp_path / "my_images"
    if form == "zip of a tree":
        root.mkdir()
        zip_tree(make_tree(tmp_path / "tree"), root / "pets.zip", top="pets")
    elif form == "other files":
        root.mkdir()
        (root / "notes.txt").write_text("hello\n")
    else:
        test_name = "val" if form == "val tree" else "test"
        make_tree(root / "mine" if form == "tree in a top folder" else root, test_name=test_name)
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    for name, nice in (("cifar10", "CIFAR-10"), ("cifar100", "CIFAR-100")):
        with pytest.raises(DataError) as e:
            load_dataset(name, root)
        msg = one_line(e)
        assert f"{root} holds no {nice} files" in msg and "not empty" in msg, msg
        if form == "other files":
            assert "imagefolder" not in msg and "--data-dir" in msg, msg
        elif form == "zip of a tree":
            assert f"pass --dataset imagefolder --data-dir {root / 'pets.zip'}" in msg, msg
        else:
            assert msg.endswith("class folders: pass --dataset imagefolder"), msg
    assert calls == [] and sorted(p.relative_to(root) for p in root.rglob("*")) == before
    zipped = zip_tree(make_tree(tmp_path / "tree2"), tmp_path / "tree2.zip")
    with pytest.raises(DataError, match="is a zip of train/ and test/ .* class folders: pass --dataset imagefolder"):
        load_dataset("cifar100", zipped)


def test_cifar_is_downloaded_into_an_empty_folder_or_one_of_cifar_files_alone(tmp_path, monkeypatch):
    """An empty folder, an archive an earlier download left, or a data root holding the other CIFAR."""
    calls = []
    monkeypatch.setattr(data, "_download", lambda name, root: calls.append(root) or "URLError: offline (test)")
    folders = ("empty", "cut short", "other cifar")
    for folder in folders:
        (tmp_path / folder).mkdir()
    (tmp_path / "cut short" / "cifar-10-python.tar.gz").write_bytes(b"cut short")
    (tmp_path / "other cifar" / "cifar-100-python").mkdir()
    for folder in folders:
        with pytest.raises(DataError, match="download failed"):
            load_dataset("cifar10", tmp_path / folder)
    assert calls == [tmp_path / f for f in folders]


def test_stage1_without_dataset_imagefolder_on_an_image_folder_is_one_line_and_downloads_nothing(tmp_path,
                                                                                                 monkeypatch):
    from _shared import run_main
    from train import stage1

    monkeypatch.setattr(data, "_download", lambda name, root: pytest.fail(f"download into {root}"))
    root = make_tree(tmp_path / "my_images")
    before = sorted(root.rglob("*"))
    proc = run_main(stage1.main, ["-m", "reduce20", "--data-dir", str(root), "--epochs", "1", "--device", "cpu",
                                  "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "holds no CIFAR-10 files" in proc.stderr and "pass --dataset imagefolder" in proc.stderr
    assert sorted(root.rglob("*")) == before and not (tmp_path / "out").exists()


def test_unknown_dataset(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path)
    assert "cifar10" in one_line(e)


# ----------------------------------------------------------------------------------------------- subsets


def test_balanced_subset_is_balanced_sorted_and_seeded():
    labels = torch.arange(10).repeat_interleave(100)  # class by class, like an image folder
    idx = balanced_subset(labels, 55, seed=3)
    assert idx.dtype == torch.int64 and len(idx) == 55 and torch.equal(idx, idx.sort().values)
    assert idx.unique().numel() == 55
    counts = labels[idx].bincount(minlength=10)
    assert counts.max() - counts.min() == 1 and (counts == 6).sum() == 5
    assert torch.equal(idx, balanced_subset(labels, 55, seed=3))
    assert not torch.equal(idx, balanced_subset(labels, 55, seed=4))
    assert not torch.equal(idx[:5], torch.arange(5))  # not the first files of each class


def test_balanced_subset_spreads_over_small_classes():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    counts = labels[balanced_subset(labels, 30, seed=0)].bincount().tolist()
    assert counts[2] == 5 and sorted(counts[:2]) == [12, 13]
    assert len(balanced_subset(labels, 85, seed=0)) == 85
    with pytest.raises(DataError):
        balanced_subset(labels, 86, seed=0)


def test_build_data_subset_shares_train_and_test(tmp_path):
    root = make_tree(tmp_path / "tree", classes=("a", "b", "c", "d"), per_class=(10, 5))
    d = build_data("imagefolder", root, batch_size=4, subset=12, eval_batch_size=100)
    assert d.train.num_samples == 12 and len(d.train) == 3
    assert d.test.num_samples == 6 and len(d.test) == 1  # round(12 * 20 / 40)
    y = torch.cat([y for _, y in d.train])
    assert y.bincount().tolist() == [3, 3, 3, 3]
    for bad in (3, 41):
        with pytest.raises(DataError) as e:
            build_data("imagefolder", root, batch_size=4, subset=bad)
        assert "--subset" in one_line(e)


def test_subset_is_drawn_before_resizing(tmp_path, monkeypatch):
    folder = make_cifar(tmp_path)  # 50 train, 20 test: 70 x 3 x 256 x 256 = 13.8 MB at 256 px
    monkeypatch.setattr(data.base, "available_memory", lambda: 16 * 2**20)  # half: 8 MB
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", tmp_path, image_size=256, download=False)
    msg = one_line(e)
    assert "70 images at 256x256 px" in msg and "--image-size" in msg and "--subset" in msg
    d = build_data("cifar10", tmp_path, batch_size=5, subset=10, image_size=256, download=False)  # 20 x 0.2 MB
    raw = torch.from_numpy(np.concatenate([raw_pickle(folder / f"data_batch_{i}")["data"] for i in range(1, 6)]))
    labels = torch.arange(50) % 10
    idx = balanced_subset(labels, 10, seed=0)
    assert d.train.images.shape == (10, 3, 256, 256) and d.test.images.shape == (10, 3, 256, 256)
    assert torch.equal(d.train.images, TF.resize(raw[idx].view(-1, 3, 32, 32), [256, 256], antialias=True))
    assert torch.equal(d.train.labels, labels[idx]) and sorted(d.train.labels.tolist()) == list(range(10))
    assert d.info.image_size == 256


def test_image_folder_too_big_for_memory_is_refused_before_decoding(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "tree")  # 18 images; at 64 px 18 x 12 KB = 221 KB
    monkeypatch.setattr(data.base, "available_memory", lambda: 300 * 2**10)
    monkeypatch.setattr(data.folders, "_decode_images", lambda *a, **k: pytest.fail("decoded before the memory check"))
    with pytest.raises(DataError) as e:
        load_dataset("imagefolder", root, image_size=64)
    assert "18 images at 64x64 px" in one_line(e) and "--subset" in str(e.value)
    monkeypatch.undo()
    monkeypatch.setenv("REDUCENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data.base, "available_memory", lambda: 300 * 2**10)
    d = build_data("imagefolder", root, batch_size=3, subset=3, image_size=64)  # 3 + 3 images: 74 KB
    assert d.train.images.shape == (3, 3, 64, 64) and d.test.images.shape == (3, 3, 64, 64)


def testavailable_memory_is_read():
    assert 2**20 < data.available_memory() < 2**50


# ----------------------------------------------------------------------------------------------- loader


def toy(n: int = 40, size: int = 8) -> tuple[ArrayData, DatasetInfo]:
    """Random images whose label is their own index, so each batch says which images it holds."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=g)
    classes = [str(i) for i in range(n)]
    info = DatasetInfo("imagefolder", n, classes, (0.4, 0.5, 0.6), (0.2, 0.25, 0.3), size, "toy", "toy")
    return ArrayData(images, torch.arange(n)), info


def to_uint8(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().to(torch.uint8)


def variants(image: torch.Tensor, pad: int) -> list[torch.Tensor]:
    """Every crop with zero padding, mirrored or not."""
    h, w = image.shape[1:]
    padded = torch.nn.functional.pad(image, (pad,) * 4)
    crops = [padded[:, i : i + h, j : j + w] for i in range(2 * pad + 1) for j in range(2 * pad + 1)]
    return crops + [c.flip(2) for c in crops]


def test_train_batches_are_padded_crops_and_flips():
    arrays, info = toy(n=64)
    loader = Loader(arrays, info, 16, train=True, seed=1)
    moved = 0
    for x, y in loader:
        assert x.shape == (16, 3, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
        for image, i in zip(to_uint8(x, info), y.tolist()):
            assert any(torch.equal(image, v) for v in variants(arrays.images[i], pad=1))
            moved += not torch.equal(image, arrays.images[i])
    assert moved > 32  # an image comes out unchanged with probability 1/18


def test_train_order_and_augmentation_depend_only_on_seed_and_epoch():
    arrays, info = toy()

    def epoch(loader: Loader, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        loader.set_epoch(e)
        xs, ys = zip(*loader)
        return torch.cat(xs), torch.cat(ys)

    a, b = Loader(arrays, info, 8, train=True, seed=5), Loader(arrays, info, 8, train=True, seed=5)
    x1, y1 = epoch(a, 1)
    x2, y2 = epoch(b, 1)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    epoch(b, 7)
    assert torch.equal(epoch(b, 1)[0], x1)  # resuming at epoch 1 replays it exactly
    x3, y3 = epoch(a, 2)
    assert not torch.equal(y1, y3) and not torch.equal(x1[y1.argsort()], x3[y3.argsort()])
    assert not torch.equal(epoch(Loader(arrays, info, 8, train=True, seed=6), 1)[1], y1)


def test_train_drops_last_partial_batch():
    arrays, info = toy(n=40)
    loader = Loader(arrays, info, 16, train=True)
    assert len(loader) == 2 and loader.num_samples == 32 and sum(len(y) for _, y in loader) == 32
    with pytest.raises(DataError) as e:
        Loader(arrays, info, 64, train=True)
    assert "--batch-size" in one_line(e)


def test_test_loader_returns_every_sample_in_order_unaugmented():
    arrays, info = toy(n=37)
    loader = Loader(arrays, info, 16, train=False, channels_last=True)
    batches = list(loader)
    assert len(loader) == len(batches) == 3 and [len(y) for _, y in batches] == [16, 16, 5]
    assert all(x.is_contiguous(memory_format=torch.channels_last) for x, _ in batches)
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), arrays.labels)
    assert torch.equal(to_uint8(x, info), arrays.images)
    assert torch.allclose(x[:, 0].mean(), (arrays.images[:, 0].float() / 255 - 0.4).mean() / 0.2, atol=1e-5)


def test_sharding_partitions_samples_across_ranks():
    arrays, info = toy(n=41)
    ranks = [Loader(arrays, info, 4, train=True, seed=2, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.set_epoch(3)
    seen = [torch.cat([y for _, y in r]) for r in ranks]
    assert len(ranks[0]) == len(ranks[1]) == 5 and [len(s) for s in seen] == [20, 20]
    assert torch.cat(seen).unique().numel() == 40  # disjoint
    tests = [Loader(arrays, info, 8, train=False, rank=r, world_size=2) for r in range(2)]
    parts = [torch.cat([y for _, y in t]) for t in tests]
    assert [t.num_samples for t in tests] == [21, 20]
    assert torch.equal(torch.cat(parts).sort().values, arrays.labels)
    assert parts[1].tolist() == list(range(1, 41, 2))


def test_data_dir_may_be_the_jpeg_zip_itself_and_another_file_is_one_line(tmp_path):
    z = tmp_path / "cifar10-jpeg.zip"
    zipfile.ZipFile(z, "w").close()
    assert data.resolve_source("cifar10", z) == ("zip", z)
    other = tmp_path / "cifar-10-python.tar.gz"
    other.write_bytes(b"not a folder")
    with pytest.raises(DataError, match="is a file, not a CIFAR-10 folder"):
        data.build_data("cifar10", str(other), 32)
    with pytest.raises(DataError, match="is a file, not a CIFAR-100 folder"):
        data.build_data("cifar100", str(z), 32)


def test_a_gpu_tests_in_large_batches_a_cpu_in_twice_the_training_batch():
    """On a GPU a small test batch costs its launches: at least 1,024 CIFAR-sized images a batch, fewer as the
    images grow (never less than twice the training batch); on a CPU, twice the training batch as ever."""
    from train.data import default_eval_batch_size

    assert default_eval_batch_size(128, 32, "cpu") == 256
    assert default_eval_batch_size(128, 32, "cuda") == 1024 and default_eval_batch_size(128, 64, "cuda:1") == 256
    assert default_eval_batch_size(32, 224, "cuda") == 64 and default_eval_batch_size(1024, 32, "cuda") == 2048
    loaders = build_data("cifar10", CIFAR10, 16, subset=100, download=False)
    assert loaders.test.batch_size == 32


def test_a_cache_that_cannot_be_written_is_one_warning_line(tmp_path, monkeypatch, capsys):
    """$REDUCENET_CACHE naming a file: the images still load, and stderr says so in one line (a raw UserWarning
    printed its source line)."""
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("REDUCENET_CACHE", str(tmp_path / "a-file"))
    monkeypatch.setattr("train.data.folders._WARNED", set())
    train, _, info = load_dataset("imagefolder", make_tree(tmp_path / "tree"), image_size=8)
    assert len(train.labels) == 12 and info.num_classes == 3
    err = capsys.readouterr().err
    assert err.startswith("warning: cannot write cache ") and err.count("\n") == 1, err
    assert "set REDUCENET_CACHE to a writable folder" in err


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.zip").is_file(), reason="needs cifar10-jpeg.zip")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the decode pool needs 2 CPUs")
def test_ctrl_c_while_a_folder_decodes_prints_one_line(tmp_path):
    """Ctrl-C reaches the whole process group, the decode pool's workers too: they leave it to the main process
    (each printed a traceback, and one interrupted while sending a result could hang the pool's terminate())."""
    import signal
    import subprocess
    import sys
    import time

    import models

    ckpt = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "m", {"dataset": "cifar10"})
    env = {**os.environ, "REDUCENET_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "train.evaluate", str(ckpt), "--device", "cpu", "--dataset",
                             "imagefolder", "--data-dir", str(SHARED / "cifar10-jpeg.zip")], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    deadline = time.monotonic() + 120
    while proc.poll() is None and len(children.read_text().split()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # until the pool's workers run
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and err.strip().splitlines()[-1] == "interrupted", err[-2000:]
    assert "Traceback" not in err, err[-2000:]
