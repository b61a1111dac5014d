"""Shared helpers for the model / reparam / checkpoint tests (no data fixtures), and where the tests' files go."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

import pytest
import torch
import torch.nn as nn

#: Free space /dev/shm needs before the tests' files go there: the largest test (the Pyramid table) holds 2.4 GB.
SHM_FREE_BYTES = 6 * 2**30
_SHM_DIRS: dict[pytest.Config, str] = {}  # the folder made for each session's temporary files


def pytest_configure(config: pytest.Config) -> None:
    """The tests' temporary folders in memory (/dev/shm) where it has room, unless ``--basetemp`` says otherwise:
    the runs the tests train write and fsync a checkpoint every epoch, and on a disk the suite waits for it (the
    whole suite on 2 CPU cores, one run each way: 464 s in memory, 527 s on the disk). The folders of passed tests
    are removed as they pass (``tmp_path_retention_policy``), so memory holds little more than one test's files at
    a time, and a failed test's stay."""
    shm = "/dev/shm"
    if config.option.basetemp or not os.access(shm, os.W_OK) or shutil.disk_usage(shm).free < SHM_FREE_BYTES:
        return
    config.option.basetemp = _SHM_DIRS[config] = tempfile.mkdtemp(prefix="reducenet-tests-", dir=shm)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the in-memory folder of :func:`pytest_configure` when every test passed (what pytest does with the
    folders it picks itself): the session fixtures' runs go too; after a failure it stays for a look."""
    folder = _SHM_DIRS.pop(session.config, None)
    if folder is not None and exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)


@torch.no_grad()
def randomize_model(model: nn.Module, seed: int = 0, calibrate: bool = True) -> nn.Module:
    """Give ``model`` non-trivial BN affine params, BN running stats, LoRA ``up`` weights and step counts.

    BN running statistics are first calibrated on random input (so activations stay O(1) through deep
    residual stacks and a float32 comparison is meaningful), then perturbed at random so that they are
    not the statistics of any batch. Keeps the model's train/eval mode and dtype.
    """
    from models.layers import LoRABranch

    g = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    dtype = param.dtype

    def rand(shape, lo=0.0, hi=1.0):
        return (torch.rand(shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype)

    def randn(shape, std=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * std).to(dtype)

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.weight.copy_(rand(bn.weight.shape, 0.5, 1.5))
        bn.bias.copy_(randn(bn.bias.shape, 0.2))
    for m in model.modules():
        if isinstance(m, LoRABranch):
            m.up.weight.copy_(randn(m.up.weight.shape, 0.5 / m.up.weight.shape[1] ** 0.5))
    if calibrate and bns:
        was_training = model.training
        momenta = [bn.momentum for bn in bns]
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average
        model.train()
        model(randn((4, 3, 32, 32)))
        for bn, mom in zip(bns, momenta):
            bn.momentum = mom
        model.train(was_training)
    for bn in bns:
        std = bn.running_var.sqrt()
        bn.running_mean.add_(randn(bn.running_mean.shape, 0.1) * std)
        bn.running_var.mul_(rand(bn.running_var.shape, 0.7, 1.4))
        bn.num_batches_tracked.fill_(int(torch.randint(1, 10_000, (1,), generator=g)))
    return model


@pytest.fixture
def randomize():
    """The :func:`randomize_model` helper, as a fixture."""
    return randomize_model


def images(n: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


@pytest.fixture
def make_images():
    """``make_images(n=2, dtype=float32, seed=1)`` -> a deterministic ``[n, 3, 32, 32]`` batch."""
    return images


@pytest.fixture(scope="module")
def single_thread():
    """Run torch on one thread: these tiny workloads gain nothing from two, and on a shared 2-core machine
    OpenMP's spin-waiting under oversubscription makes them 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Decode caches under a temporary folder, and no $REDUCENET_DATA from the caller's shell."""
    monkeypatch.setenv("REDUCENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REDUCENET_DATA", raising=False)


@contextlib.contextmanager
def training_stopped_at(call: int):
    """Within the block, the ``call``-th :meth:`Trainer.train_epoch` (1-based, counting every run) raises
    ``KeyboardInterrupt``, as a user's Ctrl-C in that epoch would: the CLIs then exit with code 130."""
    from train.engine import Trainer

    epoch_fn = Trainer.train_epoch
    calls = {"n": 0}

    def train_epoch(self, epoch):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return epoch_fn(self, epoch)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "train_epoch", train_epoch)
        yield
