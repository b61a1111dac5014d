"""Paths, assertions and helpers shared by the test modules (import as ``from _shared import ...``); the shared
fixtures are in ``conftest.py``."""
from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
#: The data folder beside the checkout (``../shared/data``), or ``$REDUCENET_SHARED_DATA``.
SHARED = Path(os.environ.get("REDUCENET_SHARED_DATA") or ROOT.parent / "shared" / "data")
CIFAR10 = SHARED / "cifar-10-subset"
CIFAR100 = SHARED / "cifar-100-subset"
#: Skips a test that reads the exact CIFAR-10 subset where it is absent, saying so.
needs_data = pytest.mark.skipif(not (CIFAR10 / "cifar-10-batches-py").is_dir(), reason=f"{CIFAR10} is absent")


def one_line(excinfo) -> str:
    """The message of a raised exception, asserted to be a single non-empty line."""
    msg = str(excinfo.value)
    assert msg.strip() and "\n" not in msg, f"expected a one-line message, got {msg!r}"
    return msg


def run_main(main: Callable[[list[str]], object], argv: Sequence[str]) -> subprocess.CompletedProcess:
    """A CLI's ``main(argv)`` run in this process, as ``subprocess.run(..., capture_output=True, text=True)`` would
    report it: its exit code (``SystemExit``'s, 0 when it returns), stdout and stderr. An unexpected exception is
    raised, failing the test, where a subprocess would print a traceback. A fresh interpreter costs about 4 s of
    imports on 2 cores: each CLI keeps one test through ``python -m``, the others call its ``main`` here."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


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


def images(n: int = 2, dtype: torch.dtype = torch.float32, seed: int = 1, size: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


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


def free_port() -> int:
    """A TCP port free on this machine now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(threads: int) -> dict[str, str]:
    """The environment of a CLI run as a subprocess: ``threads`` threads, unbuffered, no REDUCENET_DATA."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("REDUCENET_DATA", None)
    return env
