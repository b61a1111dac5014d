"""Run a table's rows: skip the finished ones, resume the interrupted ones, replace the ones made differently.

A row is finished when its folder's ``done`` mark holds the record of the row's spec
(:meth:`~train.spec.RunSpec.record`), its ``summary.json`` reads and its checkpoint (``last.safetensors``) is there,
and resumable when its ``args.json`` says its spec started it (``asked``). Two records are the same run when they
differ only in what ``--resume`` honours (:func:`~train.spec.resumable_fields`: the device, precision and speed
options, ``--lr``, the run's folder, and another ``--data-dir`` holding the same images, told by the data identity
in ``args.json``), and in paths that name the row's own table folder, moved or copied elsewhere (a table split
across machines). Runs made before specs recorded their command's options instead: those are read with the
command's parser, so a table finished then still counts as finished.
"""
from __future__ import annotations

import contextlib
import functools
import io
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from models.errors import DataError, ReduceNetError

from .. import pyramid, stage1, stage2, trim
from ..assemble import data_identity, load_data
from ..data import data_root
from ..data.loader import BatchSizeError
from ..engine import Dist, auto_device
from ..pipeline import Chain, run, run_chain
from ..rundir import in_use, mark_done, same_record
from ..spec import DataSpec, RunSpec, as_record, resumable_fields
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
    """Whether a run asked for as ``asked`` is the run ``record`` asks for, on this machine, field for field."""
    return same_record(_on_this_machine(asked), _on_this_machine(record))


def _without(record: dict[str, Any], paths: set[str]) -> dict[str, Any]:
    """``record`` without the fields that ``paths`` name (dotted: ``runtime.device``; ``out`` for a top field)."""
    out = dict(record)
    for path in paths:
        part, _, name = path.rpartition(".")
        if not part:
            out.pop(name, None)
        elif isinstance(out.get(part), dict):
            out[part] = {k: v for k, v in out[part].items() if k != name}
    return out


def _moved(recorded: dict[str, Any], spec: RunSpec, table: Path) -> dict[str, Any]:
    """``recorded`` (a run's record, made where its ``out`` says) with the paths of its derivation that lie in its
    table folder (the teacher row, the level above) moved to ``table``, the table folder of ``spec.out`` now: a
    table's runs folder copied or moved elsewhere (``cp -a R R2``, another machine) holds the same rows."""
    old = recorded.get("out")
    if not (isinstance(old, str) and isinstance(spec.out, str) and isinstance(recorded.get("derive"), dict)):
        return recorded
    try:
        depth = len(Path(spec.out).relative_to(table).parts)  # a row's folder: 1; a chain's level: 2
    except ValueError:
        return recorded
    old_parts, new_parts = Path(os.path.normpath(old)).parts, Path(os.path.normpath(spec.out)).parts
    if depth < 1 or len(old_parts) <= depth or old_parts[-depth - 1:] != new_parts[-depth - 1:]:
        return recorded  # another table folder or row: nothing to move
    old_table, new_table = str(Path(*old_parts[:-depth])), str(Path(*new_parts[:-depth]))
    if old_table == new_table:
        return recorded

    def move(value: Any) -> Any:
        if isinstance(value, str):
            path = os.path.normpath(value)
            if path == old_table or path.startswith(old_table.rstrip(os.sep) + os.sep):
                return new_table + path[len(old_table):]
        return value

    return {**recorded, "derive": {k: move(v) for k, v in recorded["derive"].items()}}


@functools.lru_cache(maxsize=16)
def _data_identity(data: DataSpec, seed: int) -> dict[str, Any] | None:
    """What a run on ``data`` with ``seed`` records as its data under ``inputs`` in ``args.json`` (its classes, image
    counts and a digest of its labels), or None where the data cannot be read; read once per data and seed."""
    try:
        loaded, _ = load_data(data, seed, False, Dist(), torch.device("cpu"))
        return data_identity(loaded)
    except (ReduceNetError, OSError, ValueError, RuntimeError):
        return None


def _same_data(spec: RunSpec, run: Path) -> bool:
    """Whether ``spec``'s data (at another ``--data-dir`` than the run's) is the data the run in ``run`` trained on,
    as ``--resume`` tells: by the data identity its ``args.json`` records (``inputs``). A run that recorded none, or
    data that cannot be read, is not taken for the same."""
    try:
        recorded = json.loads((run / "args.json").read_text())["inputs"]["data"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if spec.data.dataset is None:  # the teacher's data: which one, only the run tells
        return False
    return _data_identity(replace(spec.data, workers=0), spec.optim.seed) == recorded


def _same_spec(recorded: Any, spec: RunSpec, table: Path) -> bool:
    """Whether the run recorded as ``recorded`` (how it was asked for: a ``done`` mark, ``asked`` in ``args.json``)
    is ``spec``'s run on this machine: the same record but for the fields that ``--resume`` honours
    (:func:`~train.spec.resumable_fields`: device, precision and speed options, ``--lr``, the run's folder), another
    ``--data-dir`` only where it holds the same images (:func:`_same_data`), and the paths into the row's table
    folder ``table`` where that folder has moved (:func:`_moved`)."""
    old, new = _on_this_machine(as_record(recorded)), _on_this_machine(spec.record())
    if not (isinstance(old, dict) and isinstance(old.get("data"), dict)):
        return False
    old = _moved(old, spec, table)
    honoured = resumable_fields(spec)  # data.data_dir among them: compared by its images below
    if not same_record(_without(old, honoured), _without(new, honoured)):
        return False
    return same_record(old["data"].get("data_dir"), new["data"].get("data_dir")) or _same_data(spec, Path(spec.out))


def _is_row_run(recorded: Any, row: Row) -> bool:
    """Whether the run recorded as ``recorded`` is ``row``'s run (a chain: each of its levels, in order); see
    :func:`_same_spec`."""
    table = row.run.parent
    if isinstance(row.spec, Chain):
        levels = recorded.get("chain") if isinstance(recorded, dict) else None
        return (isinstance(levels, list) and len(levels) == len(row.spec.levels)
                and all(_same_spec(r, s, table) for r, s in zip(levels, row.spec.levels)))
    return _same_spec(recorded, row.spec, table)


def done_as_asked(row: Row) -> bool:
    """Whether ``row``'s folder holds a ``done`` mark of the row's run (:func:`_is_row_run`): it finished as the row
    asks, whether or not the files it wrote are all still there."""
    try:
        done = json.loads((row.run / "done").read_text())
    except (OSError, ValueError):
        return False
    return _is_row_run(_as_asked(done, row), row)


def _runs(row: Row) -> list[tuple[Path, RunSpec]]:
    """The run directories of ``row`` (a chain's levels) with their specs."""
    specs = row.spec.levels if isinstance(row.spec, Chain) else [row.spec]
    return [(Path(s.out), s) for s in specs]


def _lost_checkpoint(run: Path, spec: RunSpec) -> bool:
    """Whether the run in ``run`` trained all its epochs (its ``done`` mark, or ``metrics.csv`` with
    ``train_state.pt``) but its ``last.safetensors`` is gone: resuming it would not write it again (the trainer
    writes it when an epoch ends, and no epoch is left), so it trains anew."""
    if (run / "last.safetensors").is_file():
        return False
    total = spec.optim.epochs + getattr(spec.derive, "hint_epochs", 0)
    return (run / "done").is_file() or ((run / "train_state.pt").is_file() and len(epochs(run)) >= total)


def _lost(row: Row) -> list[Path]:
    """The run directories of ``row`` (a chain's levels) that lost their checkpoint (:func:`_lost_checkpoint`)."""
    return [run for run, spec in _runs(row) if _lost_checkpoint(run, spec)]


class SummaryError(ReduceNetError, KeyError):
    """A finished row's ``summary.json`` lacks a value the table reports (edited by hand, or damaged)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class Summary(dict):
    """A run's ``summary.json`` as read: a value it lacks is one line naming the file and what to do (not a
    ``KeyError`` in the code that writes the table)."""

    def __init__(self, values: dict[str, Any], path: Path) -> None:
        super().__init__({k: Summary(v, path) if isinstance(v, dict) else v for k, v in values.items()})
        self.path = path

    def __missing__(self, key: str) -> Any:
        raise SummaryError(f"{self.path} has no {key!r} (edited by hand, or damaged?): restore the file, or delete it "
                           "and run the same command again, which resumes the row to write it anew")


def read_summary(run: Path) -> Summary | None:
    """The run's ``summary.json`` (:class:`Summary`), or None where it is missing or damaged."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return Summary(summary, run / "summary.json") if isinstance(summary, dict) else None


def _finished_summary(row: Row) -> dict[str, Any] | None:
    """The summary of the run in ``row.run`` if it finished asked for by ``row.spec`` (:func:`finished`), else None.
    A chain's levels must have theirs too (the table reads them)."""
    if not done_as_asked(row) or _lost(row):
        return None
    if isinstance(row.spec, Chain) and any(read_summary(run) is None for run, _ in _runs(row)):
        return None
    return read_summary(row.run)


def finished(row: Row) -> bool:
    """Whether ``row.run`` holds a finished run asked for by ``row.spec`` (:func:`_is_row_run`), with its
    ``summary.json`` and its checkpoint (a chain: each level's)."""
    return _finished_summary(row) is not None


def finished_otherwise(row: Row) -> bool:
    """Whether ``row.run`` holds a run that finished, asked for by another spec (another budget, subset, ...):
    training the row replaces it, which ``--replace`` must say. Its ``done`` mark tells, whatever became of the
    other files (a finished run of this spec whose summary or checkpoint is gone is not another spec's)."""
    return (row.run / "done").is_file() and not done_as_asked(row)


def resumable(row: Row) -> bool:
    """Whether ``row`` holds an interrupted run (a level of a chain) that ``row.spec`` started and that resuming
    can finish (not one that lost its checkpoint after its last epoch: :func:`_lost_checkpoint`)."""
    table = row.run.parent
    return any((run / "train_state.pt").is_file() and not _lost_checkpoint(run, spec)
               and _same_spec(_asked(run, _level_row(row, run)), spec, table) for run, spec in _runs(row))


def _level_row(row: Row, run: Path) -> Row:
    """``row`` itself, or for a chain the row of its level in ``run``."""
    if not isinstance(row.spec, Chain):
        return row
    spec = next(s for s in row.spec.levels if Path(s.out) == run)
    return Row(row.name, row.group, spec, row.seed)


def _started_by(row: Row) -> bool:
    """Whether the run in ``row.run`` (a chain's first level) was started by ``row.spec``."""
    run, spec = _runs(row)[0]
    return _same_spec(_asked(run, _level_row(row, run)), spec, row.run.parent)


def _next(row: Row) -> tuple[str, str]:
    """What :func:`train_row` does with ``row``, not finished and not running: ``resume``, ``replace`` (a run of
    another spec), ``retrain`` (its checkpoint is lost), ``restart`` (its spec's run has nothing to resume from) or
    ``new``; and why, in a few words (for ``resume``: what it mends, if anything)."""
    if finished_otherwise(row) or ((row.run / "args.json").is_file() and not _started_by(row)):
        return "replace", "the run made by another spec there"
    lost = _lost(row)  # (a chain's other levels are restarted too: they learn from the one trained anew)
    if lost:
        whose = "its" if not isinstance(row.spec, Chain) else f"the {' and '.join(run.name for run in lost)} level's"
        return "retrain", f"{whose} last.safetensors is gone, and resuming would not write it again"
    if resumable(row):
        mends = " to write its missing or damaged summary.json" if done_as_asked(row) else ""  # (or a level's)
        return "resume", mends
    if (row.run / "args.json").is_file() or (row.run / "done").is_file():
        return "restart", "the run this spec started there has no train_state.pt to resume from"
    return "new", ""


def train_row(row: Row, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or skip, or resume) one row; returns its summary.

    A finished run asked for by another spec (another budget, subset or seed) is replaced, not reported under
    this row's label; an interrupted run started by the same spec is resumed (also one that finished but lost
    its ``summary.json``, which resuming writes again); one that lost its checkpoint after its last epoch is
    trained anew (resuming would not write it again).
    """
    summary = _finished_summary(row)
    if summary is not None:
        log(f"[skip] {row.name}: finished in {row.run}")
        return summary
    action, why = _next(row)
    resume = action == "resume"
    note = {"replace": f" (replaces {why})", "retrain": f" (trains it anew: {why})",
            "restart": f" (restarts: {why})"}.get(action, "")
    log(f"[{'resume' if resume else 'run'}] {row.name}: {describe(row)} -> {row.run}" + note)
    try:
        if isinstance(row.spec, Chain):
            for level in _lost(row):  # a level marked done is skipped by the chain: trained anew here
                (level / "done").unlink(missing_ok=True)
            summary = run_chain(row.spec, overwrite=not resume)
        else:
            summary = run(row.spec, resume=resume, overwrite=not resume)
    except BatchSizeError as e:  # the table's recipe fixes the batch: reproduce has no --batch-size to offer
        raise DataError(f"{row.name} trains at batch {e.batch_size}, but the data gives {e.samples} training "
                        f"images per process: train.reproduce keeps the recipe's batch, so give it at least "
                        f"{e.batch_size} (a larger --subset, or more images)") from None
    mark_done(row.run, row.spec.record())
    return Summary(summary, row.run / "summary.json")


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
    if finished_otherwise(row):
        return "finished with other options: --replace retrains it", seconds
    action, why = _next(row)
    if action == "new":
        if left is None:
            return "not started", None
        _, epoch_s, measured_on = left
        return (f"not started (about {duration(seconds)} at {epoch_time(epoch_s)} an epoch, "
                f"the pace of {measured_on.run.name})"), seconds
    if action == "replace":
        return "made by another spec: will be replaced", seconds
    if action == "resume":
        return "resumes" + _progress(row, len(own), left) + why, seconds
    if action == "retrain":
        return f"will train anew: {why}", seconds
    return "will restart", seconds


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
