"""Run a table's rows: skip the finished ones, resume the interrupted ones, replace the ones made differently."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Sequence

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


def duration(seconds: float) -> str:
    """``1.6 h`` or ``25 min`` (at least 1 min)."""
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{max(1, round(seconds / 60))} min"


def _total_epochs(row: Row) -> int | None:
    return int(row.argv[row.argv.index("--epochs") + 1]) if "--epochs" in row.argv else None


def _pace(row: Row, rows: Sequence[Row], own: list[dict[str, str]]) -> tuple[float, Row] | None:
    """The median epoch time of ``row``'s run so far (its epochs: ``own``), else of a run of the same row for
    another seed (the same group and label, started by its own command), with the row it was measured on; None
    where no run has one."""
    siblings = [s for s in rows if s is not row and s.group == row.group and s.name == row.name]
    for r in [row, *siblings]:
        if same_record(_run_argv(r.run), r.argv):
            per_epoch = median_epoch_seconds(own if r is row else epochs(r.run))
            if per_epoch is not None:
                return per_epoch, r
    return None


def _left(row: Row, rows: Sequence[Row], own: list[dict[str, str]]) -> tuple[float, float, Row] | None:
    """Seconds the rest of an unfinished ``row`` (its epochs so far: ``own``) would train, the epoch time used and
    the row it was measured on."""
    total, pace = _total_epochs(row), _pace(row, rows, own)
    if total is None or pace is None:
        return None
    done = len(own) if resumable(row) or in_use(row.run) else 0
    return max(0, total - done) * pace[0], *pace


def plan_row(row: Row, rows: Sequence[Row] = ()) -> tuple[str, float | None]:
    """What :func:`train_row` would do with ``row`` now, in a few words (finished, resumes at epoch k, ...), and
    how long the rest of it would train: its epochs left times its median epoch time, or, for a row not started
    yet, the median epoch time of the same row's run for another seed in ``rows`` (see :func:`_pace`); 0 for a
    finished row, None where nothing tells. The run's metrics.csv is read once for both."""
    if finished(row):
        return "finished", 0.0
    own = epochs(row.run)
    left = _left(row, rows, own)
    seconds = None if left is None else left[0]
    if in_use(row.run):
        return "running" + _progress(row, len(own), left), seconds
    if not (row.run / "args.json").is_file():
        if left is None:
            return "not started", None
        _, per_epoch, measured_on = left
        return (f"not started (about {duration(seconds)} at {per_epoch:.0f} s an epoch, "
                f"the pace of {measured_on.run.name})"), seconds
    if not same_record(_run_argv(row.run), row.argv):
        return "made by another command: will be replaced", seconds
    return ("resumes" + _progress(row, len(own), left) if resumable(row) else "will restart"), seconds


def row_state(row: Row, rows: Sequence[Row] = ()) -> str:
    """What :func:`train_row` would do with ``row`` now, in a few words (see :func:`plan_row`)."""
    return plan_row(row, rows)[0]


def _progress(row: Row, done: int, left: tuple[float, float, Row] | None) -> str:
    """`` (k/N epochs)`` (``done`` = k), with the time the rest would take (``left``, from :func:`_left`): at the
    run's median epoch time so far, or, before its first epoch, at its other seed's."""
    total = _total_epochs(row)
    if total is None:
        return ""
    if left is None or done >= total:
        return f" ({done}/{total} epochs)"
    seconds, per_epoch, measured_on = left
    whose = "" if measured_on is row else f", the pace of {measured_on.run.name}"
    return f" ({done}/{total} epochs, about {duration(seconds)} left at {per_epoch:.0f} s an epoch{whose})"
