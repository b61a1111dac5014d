"""The fixtures shared by the test modules, and where the tests' files go; plain helpers are in ``_shared.py``."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from _shared import images, randomize_model
from models.checkpoint import process_running

#: Free space /dev/shm needs before the tests' files go there: the largest test (the Pyramid table) holds 2.4 GB.
SHM_FREE_BYTES = 6 * 2**30
#: The folders of failed (or interrupted) sessions kept for a look, newest first; older ones go (pytest keeps 3).
KEEP_FAILED = 3
SHM_PREFIX = "reducenet-tests-"
_SHM_DIRS: dict[pytest.Config, str] = {}  # the folder made for each session's temporary files


def remove_old_sessions(shm: Path, keep: int = KEEP_FAILED) -> list[Path]:
    """Remove the in-memory folders that earlier sessions kept after a failure or an interruption, all but the
    ``keep`` newest: each one holds memory until the machine restarts (151 of them held 7 GB here). A folder whose
    session still runs (its pid is in its name) is left alone. Returns the folders removed."""
    ended = []
    for p in shm.glob(SHM_PREFIX + "*"):
        pid = p.name[len(SHM_PREFIX):].split("-", 1)[0]
        if not (pid.isdigit() and process_running(int(pid))):  # names without a pid: sessions before pids
            ended.append(p)
    ended.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    for p in ended[keep:]:
        shutil.rmtree(p, ignore_errors=True)
    return ended[keep:]


def pytest_configure(config: pytest.Config) -> None:
    """The tests' temporary folders in memory (/dev/shm) where it has room, unless ``--basetemp`` says otherwise:
    the runs the tests train write and fsync a checkpoint every epoch, and on a disk the suite waits for it (the
    whole suite on 2 CPU cores, one run each way: 464 s in memory, 527 s on the disk). The folders of passed tests
    are removed as they pass (``tmp_path_retention_policy``), so memory holds little more than one test's files at
    a time, and a failed test's stay; of the folders earlier sessions kept, the newest ``KEEP_FAILED`` stay."""
    shm = "/dev/shm"
    if config.option.basetemp or not os.access(shm, os.W_OK):
        return
    remove_old_sessions(Path(shm))
    if shutil.disk_usage(shm).free < SHM_FREE_BYTES:
        return
    config.option.basetemp = _SHM_DIRS[config] = tempfile.mkdtemp(prefix=f"{SHM_PREFIX}{os.getpid()}-", dir=shm)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the in-memory folder of :func:`pytest_configure` when every test passed (what pytest does with the
    folders it picks itself): the session fixtures' runs go too; after a failure it stays for a look."""
    folder = _SHM_DIRS.pop(session.config, None)
    if folder is not None and exitstatus == 0:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def randomize():
    """The :func:`randomize_model` helper, as a fixture."""
    return randomize_model


@pytest.fixture
def make_images():
    """``make_images(n=2, dtype=float32, seed=1)`` -> a deterministic ``[n, 3, 32, 32]`` batch."""
    return images


@pytest.fixture
def seeded():
    """``torch.manual_seed(0)`` before the test: modules whose tests draw from the global generator use it
    (``pytestmark = pytest.mark.usefixtures("seeded")``), so that each test's draws do not depend on the tests
    run before it."""
    torch.manual_seed(0)


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
