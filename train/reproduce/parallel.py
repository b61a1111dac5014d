"""``--jobs N``: a table's rows in N processes at once, each row once the rows it inherits from have finished.

Each job is the same ``python -m train.reproduce`` command restricted to one row (``--rows NAME --jobs 1``), so a
row trains, resumes and is skipped exactly as it would in one process, and the parent writes the table when all
have finished. On a CPU every job gets its own share of the cores (affinity and ``OMP_NUM_THREADS``); with GPUs,
job slot k runs on visible GPU ``k mod count`` (several jobs may share one: small CIFAR models leave most of a
large GPU idle). Each job's output goes to ``RUNS/TABLE/logs/ROW.log``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Protocol

import torch

from models.errors import ReduceNetError, Terminated

from ..rundir import in_use
from .runner import finished, resumable
from .specs import Row, inherits_from

#: Where the ``train`` package lives, so that a job runs the parent's code even without an installed package.
_ROOT = str(Path(__file__).resolve().parents[2])


class RowsFailed(ReduceNetError):
    """One or more rows of a parallel run failed; the finished ones are kept."""


class Job(Protocol):
    def poll(self) -> int | None: ...
    def terminate(self) -> None: ...
    def wait(self) -> int: ...


def slot_env(slot: int, jobs: int, device: str) -> tuple[dict[str, str], set[int] | None]:
    """Environment and CPU affinity of job slot ``slot``: GPU ``slot mod count`` where CUDA is used, else its cores."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p),
           "PYTHONUNBUFFERED": "1"}  # the log shows each epoch when it ends, not when a buffer fills
    if device in ("auto", "cuda") and torch.cuda.is_available():  # an explicit cuda:N is kept for every job
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {**env, "CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}, None
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if not cores:
        return env, None
    per = max(1, len(cores) // jobs)
    mine = {cores[(slot * per + i) % len(cores)] for i in range(per)}
    return {**env, "OMP_NUM_THREADS": str(per), "MKL_NUM_THREADS": str(per)}, mine


def log_path(row: Row) -> Path:
    """Where the job of ``row`` writes its output (appended to on every try)."""
    return row.run.parent / "logs" / f"{row.run.name}.log"


def _launch(argv: list[str], row: Row, slot: int, jobs: int, device: str) -> subprocess.Popen:
    env, cores = slot_env(slot, jobs, device)
    log = log_path(row)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child keeps its own descriptor
        return subprocess.Popen([sys.executable, "-m", "train.reproduce", *argv, "--rows", row.run.name,
                                 "--jobs", "1"], stdout=out, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)


def _interrupt(signum: int, frame: object) -> None:
    raise Terminated()  # as the CLIs stop on SIGTERM: "terminated", exit 143


def train_parallel(rows: list[Row], argv: list[str], jobs: int, device: str, log: Callable[[str], None],
                   launch: Callable[[list[str], Row, int, int, str], Job] = _launch, poll_s: float = 2.0) -> None:
    """Train ``rows`` (those not finished yet) in up to ``jobs`` processes running ``argv`` one row each.

    Rows that resume an interrupted run start first, then the others in table order, each as soon as a job is
    free and the rows it inherits from have finished.

    Raises:
        RowsFailed: a job exited with an error (its log is named); rows that inherit from it were not started.
            Every row that finished stays finished, so the same command continues from there.
        KeyboardInterrupt: on Ctrl-C, or :class:`~models.errors.Terminated` on SIGTERM, after stopping the running
            jobs (their rows resume next time).
    """
    # rows that resume first (a stopped --jobs run continues its rows before it starts others), then table order
    pending = sorted((r for r in rows if not finished(r)), key=lambda r: not resumable(r))
    running: dict[int, tuple[Row, Job, float]] = {}  # slot -> row, job, start time
    failed: list[Row] = []
    elsewhere: list[Row] = []  # rows another process is training
    waiting: list[Row] = []  # rows that inherit from those
    # a `kill` stops the jobs as Ctrl-C does, instead of leaving them training without a parent
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        while pending or running:
            for slot, (row, job, start) in list(running.items()):
                code = job.poll()
                if code is None:
                    continue
                del running[slot]
                if code == 0 and finished(row):
                    log(f"[done] {row.run.name} in {(time.monotonic() - start) / 60:.1f} min")
                else:
                    failed.append(row)
                    log(f"[failed] {row.run.name} (exit {code}): see {log_path(row)}")
            for row in list(pending):
                needs = inherits_from(row, rows)
                busy = [r for r, _, _ in running.values()]
                if in_use(row.run):  # another process (another reproduce, a user's command) trains it now
                    pending.remove(row)
                    elsewhere.append(row)
                    log(f"[busy] {row.run.name}: another process is training it; not started here")
                elif any(d in elsewhere or d in waiting for d in needs):
                    pending.remove(row)
                    waiting.append(row)
                    why = ("is being trained by another process" if any(d in elsewhere for d in needs) else
                           "waits for a row that another process trains")
                    log(f"[not started] {row.run.name}: the row it inherits from {why}")
                elif any(d in failed for d in needs):
                    pending.remove(row)
                    failed.append(row)
                    log(f"[not started] {row.run.name}: a row it inherits from failed")
                elif len(running) < jobs and all(finished(d) and d not in busy for d in needs):
                    slot = min(set(range(jobs)) - set(running))
                    pending.remove(row)
                    running[slot] = (row, launch(argv, row, slot, jobs, device), time.monotonic())
                    log(f"[start] {row.run.name} (job {slot + 1} of {jobs})")
            if running and not any(job.poll() is not None for _, job, _ in running.values()):
                time.sleep(poll_s)
    except BaseException:
        for _, job, _ in running.values():  # a stopped job resumes from its last epoch next time
            job.terminate()
        for _, job, _ in running.values():
            job.wait()
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
    if elsewhere and not failed:
        wait = f", and {len(waiting)} inherit from them" if waiting else ""
        raise RowsFailed(f"{len(elsewhere)} of {len(rows)} rows are being trained by another process "
                         f"({', '.join(r.run.name for r in elsewhere)}){wait}; run the same command again when it has "
                         "finished: the rows finished here are kept")
    if failed:
        raise RowsFailed(f"{len(failed)} of {len(rows)} rows did not finish ({', '.join(r.run.name for r in failed)}); "
                         f"logs in {log_path(failed[0]).parent}; run the same command again after fixing the cause: "
                         "finished rows are kept")
