"""The streaming image-folder loader: its order and augmentation are functions of (seed, epoch, index) only."""
from __future__ import annotations

import contextlib
import io
import warnings

import pytest
import torch

from _shared import SHARED, training_stopped_at
from train import stage1
from train.data import DatasetInfo, scan_image_tree
from train.data.stream import StreamLoader, build_stream_data, random_resized_crop_params

ZIP = SHARED / "cifar10-jpeg.zip"
pytestmark = pytest.mark.skipif(not ZIP.is_file(), reason=f"{ZIP} is absent")


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_order_and_augmentation_repeat_whatever_the_workers():
    data0 = build_stream_data(str(ZIP), 16, subset=40, image_size=48, workers=0)
    data2 = build_stream_data(str(ZIP), 16, subset=40, image_size=48, workers=2)
    a, b = batches(data0.train, 3), batches(data2.train, 3)
    assert len(a) == 2 and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    other = batches(data0.train, 4)
    assert not torch.equal(other[0][0], a[0][0])  # another epoch: another order and crops
    assert torch.equal(batches(data0.train, 3)[1][0], a[1][0])  # and epoch 3 again is epoch 3
    test = batches(data0.test, 0)
    assert sum(len(y) for _, y in test) == len(data0.test.labels) and test[0][0].shape[-1] == 48


def test_stream_draws_the_in_memory_paths_subset_and_default_size():
    from train.data import build_data

    streamed = build_stream_data(str(ZIP), 16, subset=40, seed=3, workers=0)
    in_memory = build_data("imagefolder", str(ZIP), 16, subset=40, seed=3)
    assert streamed.info.image_size == in_memory.info.image_size == 32  # CIFAR's 32 px JPEGs, not 224
    assert torch.equal(torch.as_tensor(streamed.train.labels), in_memory.train.labels.cpu())
    assert torch.equal(torch.as_tensor(streamed.test.labels), in_memory.test.labels.cpu())


def test_ranks_share_the_epoch_without_overlap():
    tree = scan_image_tree(ZIP)
    items = tree.train[:: len(tree.train) // 64][:64]
    info = DatasetInfo("imagefolder", 10, tree.classes, (0.5,) * 3, (0.25,) * 3, 32, str(ZIP), "t")
    seen = []
    for rank in (0, 1):
        loader = StreamLoader(tree, items, info, 8, train=True, rank=rank, world_size=2, workers=0)
        loader.set_epoch(1)
        seen.append(list(loader.sampler))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) == len(seen[1]) == 32


def test_both_loaders_are_batch_loaders_and_see_the_same_samples_in_the_same_order():
    """One rule of order and sharding (EpochOrder): the streamed and in-memory loaders of one folder yield the same
    labels in the same order, epoch by epoch and rank by rank."""
    from train.data import BatchLoader, build_data

    for rank in (0, 1):
        common = dict(subset=60, seed=5, rank=rank, world_size=2)
        streamed = build_stream_data(str(ZIP), 8, workers=0, **common)
        in_memory = build_data("imagefolder", str(ZIP), 8, **common)
        for loader in (streamed.train, streamed.test, in_memory.train, in_memory.test):
            assert isinstance(loader, BatchLoader)
        for epoch in (0, 3):
            got = [[y.tolist() for _, y in batches(data.train, epoch)] for data in (streamed, in_memory)]
            assert got[0] == got[1] and sum(map(len, got[0])) == streamed.train.num_samples == 24
        assert [y.tolist() for _, y in batches(streamed.test, 0)] == [y.tolist() for _, y in batches(in_memory.test, 0)]


@pytest.mark.parametrize("source, size", [("zip", 48), ("folder", 64)])
def test_both_loaders_give_a_test_image_the_same_pixels(source, size, tmp_path):
    """A checkpoint scores the same whichever loader --loader auto picks: CIFAR's 32 px images at 48 px are resized
    whole (the streamed path cropped 7/8 of them), 64 px images at 64 px keep 224/256 in both (the in-memory path
    kept them whole)."""
    from PIL import Image

    from train.data import build_data

    root = ZIP
    if source == "folder":
        g = torch.Generator().manual_seed(0)
        for split in ("train", "test"):
            for c in ("a", "b"):
                (tmp_path / split / c).mkdir(parents=True)
                for i in range(2):
                    pixels = torch.randint(0, 256, (64, 64, 3), generator=g, dtype=torch.uint8).numpy()
                    Image.fromarray(pixels).save(tmp_path / split / c / f"{i}.png")
        root = tmp_path
    common = dict(subset=20 if source == "zip" else None, seed=0, image_size=size)
    streamed = build_stream_data(str(root), 2, workers=0, **common)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a small subset's cache notices
        in_memory = build_data("imagefolder", str(root), 2, **common)
    for data in (streamed, in_memory):
        data.normalize({"mean": [0.0] * 3, "std": [1.0] * 3})
    got = [torch.cat([x.float() for x, _ in batches(data.test, 0)]) for data in (streamed, in_memory)]
    assert got[0].shape == got[1].shape == (len(in_memory.test.labels), 3, size, size)
    assert torch.equal(got[0], got[1])


def test_random_resized_crop_stays_inside_the_image():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_params(40, 30, g)
        assert 0 <= top and 0 <= left and top + h <= 30 and left + w <= 40 and h > 0 and w > 0


@pytest.mark.e2e
def test_a_streamed_run_resumes_exactly(tmp_path):
    argv = ["-m", "reduce20", "--expansion", "0", "--dataset", "imagefolder", "--data-dir", str(ZIP), "--loader",
            "stream", "--workers", "0", "--image-size", "32", "--subset", "64", "--batch-size", "32", "--epochs", "2",
            "--device", "cpu"]
    with contextlib.redirect_stdout(io.StringIO()):
        whole = stage1.main([*argv, "--out", str(tmp_path / "whole")])
        with training_stopped_at(call=2), pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            stage1.main([*argv, "--out", str(tmp_path / "split")])
        split = stage1.main([*argv, "--out", str(tmp_path / "split"), "--resume"])
    assert "streamed" in whole["data"]
    assert split["last_test_acc"] == whole["last_test_acc"]
    a = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)["task"]
    b = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["task"]
    assert all(torch.equal(a[k], b[k]) for k in a)
