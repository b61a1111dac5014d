"""Run a table's rows: skip the finished ones, resume the interrupted ones, replace the ones made differently."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from ..rundir import finished_summary, in_use, mark_done, same_record
from .report import epochs, median_epoch_seconds
from .specs import Row


def _run_argv(run: Path) -> list[str] | None:
    """The options the run in ``run`` was started with (``argv`` of its ``args.json``), or None."""
    try:
        return json.loads((run / "args.json").read_text())["argv"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def finished(row: Row) -> bool:
    """Whether ``row.run`` holds a finished run made by exactly ``row.argv``."""
    return finished_summary(row.run, row.argv) is not None


def resumable(row: Row) -> bool:
    """Whether ``row.run`` holds an interrupted run (its ``train_state.pt``) that ``row.argv`` started."""
    return (row.run / "train_state.pt").is_file() and same_record(_run_argv(row.run), row.argv)


def train_row(row: Row, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or skip, or resume) one row; returns its summary.

    A finished run made by another command (another budget, subset or seed) is replaced, not reported under
    this row's label; an interrupted run made by the same command is resumed.
    """
    summary = finished_summary(row.run, row.argv)
    if summary is not None:
        log(f"[skip] {row.name}: finished in {row.run}")
        return summary
    resume = resumable(row)
    argv = [*row.argv, "--out", str(row.run)] + (["--resume"] if resume else ["--overwrite"])
    log(f"[{'resume' if resume else 'run'}] {row.name}: python -m train.{row.main.__module__.split('.')[-1]} "
        + " ".join(argv))
    summary = row.main(argv)
    mark_done(row.run, row.argv)
    return summary


def _progress(run: Path, total: int) -> str:
    """`` (k/N epochs)``, with the time the rest would take at the run's median epoch time so far."""
    done = epochs(run)
    per_epoch = median_epoch_seconds(done)
    if per_epoch is None or len(done) >= total:
        return f" ({len(done)}/{total} epochs)"
    left = (total - len(done)) * per_epoch
    left_text = f"{left / 3600:.1f} h" if left >= 3600 else f"{max(1, round(left / 60))} min"
    return f" ({len(done)}/{total} epochs, about {left_text} left at {per_epoch:.0f} s an epoch)"


def row_state(row: Row) -> str:
    """What :func:`train_row` would do with ``row`` now, in a few words: finished, resumes at epoch k, ..."""
    if finished(row):
        return "finished"
    progress = _progress(row.run, int(row.argv[row.argv.index("--epochs") + 1])) if "--epochs" in row.argv else ""
    if in_use(row.run):
        return "running" + progress
    if not (row.run / "args.json").is_file():
        return "not started"
    if not same_record(_run_argv(row.run), row.argv):
        return "made by another command: will be replaced"
    return "resumes" + progress if resumable(row) else "will restart"
