"""Run a table's rows: skip the finished ones, resume the interrupted ones, replace the ones made differently.

A row is finished when its folder's ``done`` mark holds the record of the row's spec
(:meth:`~train.spec.RunSpec.record`), and resumable when its ``args.json`` says its spec started it (``asked``).
Runs made before specs recorded their command's options instead: those are read with the command's parser, so a
table finished then still counts as finished.
"""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import Any, Callable, Sequence

from models.errors import DataError, ReduceNetError

from .. import pyramid, stage1, stage2, trim
from ..data import data_root
from ..data.loader import BatchSizeError
from ..engine import auto_device
from ..pipeline import Chain, run, run_chain
from ..rundir import finished_summary, in_use, mark_done, same_record
from ..spec import as_record
from .report import epochs, median_epoch_seconds
from .specs import Row


#: The command-line module of each kind of row, whose parser reads the commands of runs made before specs.
_PARSERS = {"fresh": stage1, "inherit": stage2, "distil": stage2, "trim": trim, "chain": pyramid}


def _as_asked(record: Any, row: Row) -> Any:
    """A run's record of how it was asked for, as a spec record: runs made before specs recorded their command's
    options (a list), read here with the parser of ``row``'s kind; None where that command is not one of it."""
    if not isinstance(record, list):
        return as_record(record)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # a command of another kind is simply not this row's
            spec, _ = _PARSERS[row.kind].parse([*map(str, record), "--out", str(row.run)])
    except (ReduceNetError, SystemExit, OSError, ValueError):
        return None
    return spec.record()


def _asked(run: Path, row: Row) -> Any:
    """How the run in ``run`` was asked for (``args.json``: its spec's record, or its options), or None."""
    try:
        saved = json.loads((run / "args.json").read_text())
        return _as_asked(saved["asked"] if "asked" in saved else saved["argv"], row)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _on_this_machine(record: Any) -> Any:
    """A spec record with what this machine makes of its defaults: ``--device auto`` as the device it picks, no
    ``--data-dir`` as the folder it reads (``$REDUCENET_DATA``, else ``./data``). A table's rows asked for with
    ``--device cpu`` or ``auto``, ``--data-dir D`` or ``REDUCENET_DATA=D``, are the same runs here."""
    if isinstance(record, list):
        return [_on_this_machine(r) for r in record]
    if not isinstance(record, dict):
        return record
    out = {k: _on_this_machine(v) for k, v in record.items()}
    if isinstance(out.get("runtime"), dict) and out["runtime"].get("device") == "auto":
        out["runtime"] = {**out["runtime"], "device": auto_device()}
    if isinstance(out.get("data"), dict) and "data_dir" in out["data"] and out["data"]["data_dir"] is None:
        out["data"] = {**out["data"], "data_dir": str(data_root(None).absolute())}
    return out


def _same(asked: Any, record: Any) -> bool:
    """Whether a run asked for as ``asked`` is the run ``record`` asks for, on this machine."""
    return same_record(_on_this_machine(asked), _on_this_machine(record))


def _finished_summary(row: Row) -> dict[str, Any] | None:
    """The summary of the run in ``row.run`` if it finished asked for by ``row.spec``, else None."""
    try:
        done = json.loads((row.run / "done").read_text())
    except (OSError, ValueError):
        return None
    return finished_summary(row.run, done) if _same(_as_asked(done, row), row.spec.record()) else None


def _levels(row: Row) -> list[tuple[Path, dict[str, Any]]]:
    """The run directories of ``row`` (a chain's levels) and the record each must have been asked for by."""
    specs = row.spec.levels if isinstance(row.spec, Chain) else [row.spec]
    return [(Path(s.out), s.record()) for s in specs]


def finished(row: Row) -> bool:
    """Whether ``row.run`` holds a finished run asked for by exactly ``row.spec``."""
    return _finished_summary(row) is not None


def finished_otherwise(row: Row) -> bool:
    """Whether ``row.run`` holds a run that finished, asked for by another spec (another budget, subset, ...):
    training the row replaces it, which ``--replace`` must say."""
    return (row.run / "done").is_file() and not finished(row)


def resumable(row: Row) -> bool:
    """Whether ``row`` holds an interrupted run (a level of a chain) that ``row.spec`` started."""
    if isinstance(row.spec, Chain):
        return any((run / "train_state.pt").is_file() and _same(_asked(run, _level_row(row, run)), record)
                   for run, record in _levels(row))
    return (row.run / "train_state.pt").is_file() and _same(_asked(row.run, row), row.spec.record())


def _level_row(row: Row, run: Path) -> Row:
    spec = next(s for s in row.spec.levels if Path(s.out) == run)
    return Row(row.name, row.group, spec, row.seed)


def _started_by(row: Row) -> bool:
    """Whether the run in ``row.run`` (a chain's first level) was started by ``row.spec``."""
    run, record = _levels(row)[0]
    probe = row if not isinstance(row.spec, Chain) else _level_row(row, run)
    return _same(_asked(run, probe), record)


def train_row(row: Row, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or skip, or resume) one row; returns its summary.

    A finished run asked for by another spec (another budget, subset or seed) is replaced, not reported under
    this row's label; an interrupted run started by the same spec is resumed.
    """
    summary = _finished_summary(row)
    if summary is not None:
        log(f"[skip] {row.name}: finished in {row.run}")
        return summary
    resume = resumable(row)
    replaces = not resume and (row.run / "args.json").is_file()
    log(f"[{'resume' if resume else 'run'}] {row.name}: {describe(row)} -> {row.run}"
        + (" (replaces the run made by another spec there)" if replaces else ""))
    try:
        if isinstance(row.spec, Chain):
            summary = run_chain(row.spec, overwrite=not resume)
        else:
            summary = run(row.spec, resume=resume, overwrite=not resume)
    except BatchSizeError as e:  # the table's recipe fixes the batch: reproduce has no --batch-size to offer
        raise DataError(f"{row.name} trains at batch {e.batch_size}, but the data gives {e.samples} training "
                        f"images per process: train.reproduce keeps the recipe's batch, so give it at least "
                        f"{e.batch_size} (a larger --subset, or more images)") from None
    mark_done(row.run, row.spec.record())
    return summary


def describe(row: Row) -> str:
    """The row's run in a few words: ``inherit reduce20 (runs/t), 30 epochs, seed 0, kd``."""
    spec = row.spec.levels[0] if isinstance(row.spec, Chain) else row.spec
    d = spec.derive
    what = {"chain": lambda: f"Pyramid chain {' -> '.join(s.derive.level for s in row.spec.levels)} ({d.loss})",
            "fresh": lambda: f"fresh {d.model}" + ("" if d.expansion is None else f" e{d.expansion}")
            + ("" if d.width is None else f" w{d.width:g}"),
            "inherit": lambda: f"student of {d.teacher}" + (f", LoRA r{d.lora_rank}" if d.lora_rank else ""),
            "distil": lambda: f"{d.model} taught by {d.teacher}",
            "trim": lambda: f"{d.teacher} trimmed {d.reduce:g}x by {d.by}"}[row.kind]()
    loss = f", {spec.loss.kd}" if row.kind in ("inherit", "distil", "trim") else ""
    return f"{what}, {row.epochs} epochs{loss}, seed {spec.optim.seed}, recipe {spec.recipe}"


def duration(seconds: float) -> str:
    """``1.6 h``, ``25 min`` (from half a minute: at least 1 min), or ``12 s`` (at least 1 s)."""
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{max(1, round(seconds / 60))} min" if seconds >= 30 else f"{max(1, round(seconds))} s"


def epoch_time(seconds: float) -> str:
    """An epoch's time: ``220 s``, ``2.5 s`` or ``0.43 s``, so that a fast epoch does not read as 0 s."""
    return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.2g} s"


def _pace(row: Row, rows: Sequence[Row], own: list[dict[str, str]]) -> tuple[float, Row] | None:
    """The median epoch time of ``row``'s run so far (its epochs: ``own``), else of a run of the same row for
    another seed (the same group and label, started by its own command), with the row it was measured on; None
    where no run has one."""
    siblings = [s for s in rows if s is not row and s.group == row.group and s.name == row.name]
    for r in [row, *siblings]:
        if _started_by(r):
            per_epoch = median_epoch_seconds(own if r is row else epochs(r.run))
            if per_epoch is not None:
                return per_epoch, r
    return None


def _left(row: Row, rows: Sequence[Row], own: list[dict[str, str]]) -> tuple[float, float, Row] | None:
    """Seconds the rest of an unfinished ``row`` (its epochs so far: ``own``) would train, the epoch time used and
    the row it was measured on."""
    total, pace = row.epochs, _pace(row, rows, own)
    if pace is None:
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
        _, epoch_s, measured_on = left
        return (f"not started (about {duration(seconds)} at {epoch_time(epoch_s)} an epoch, "
                f"the pace of {measured_on.run.name})"), seconds
    if not _started_by(row):
        if finished_otherwise(row):
            return "finished with other options: --replace retrains it", seconds
        return "made by another spec: will be replaced", seconds
    return ("resumes" + _progress(row, len(own), left) if resumable(row) else "will restart"), seconds


def row_state(row: Row, rows: Sequence[Row] = ()) -> str:
    """What :func:`train_row` would do with ``row`` now, in a few words (see :func:`plan_row`)."""
    return plan_row(row, rows)[0]


def _progress(row: Row, done: int, left: tuple[float, float, Row] | None) -> str:
    """`` (k/N epochs)`` (``done`` = k), with the time the rest would take (``left``, from :func:`_left`): at the
    run's median epoch time so far, or, before its first epoch, at its other seed's."""
    total = row.epochs
    if left is None or done >= total:
        return f" ({done}/{total} epochs)"
    seconds, epoch_s, measured_on = left
    whose = "" if measured_on is row else f", the pace of {measured_on.run.name}"
    return f" ({done}/{total} epochs, about {duration(seconds)} left at {epoch_time(epoch_s)} an epoch{whose})"
