"""The run directory: owned by one process at a time, replaced only when the new run has something to write.

Guarantees (rank 0 of a job does all of this; the other ranks write nothing):

* **One owner.** ``open()`` takes an exclusive ``flock`` on ``RUN/run.lock`` for the life of the process. A second
  run into the same folder stops at once with one line; a killed run's lock is released by the kernel, so it
  never goes stale.
* **Nothing lost on a typo.** A new run (with or without ``--overwrite``) deletes nothing and writes nothing
  until :meth:`RunDir.commit`, which the trainer calls just before it writes its first checkpoint: every option,
  the model, the loss and the data have been validated by then. Only then are the previous run's files
  removed (``--overwrite``) and ``args.json`` written. A run that fails earlier leaves the folder as it was: the
  lock file and the folders it made are taken back when it closes.
* **Resume honours or refuses.** ``--resume`` compares the options that shape the run with ``args.json``: a
  different ``--lr`` is honoured (the schedule continues from the new peak; recorded under ``resumed`` in
  ``args.json``, e.g. a lower lr after a NaN), as are the device, precision and speed options; any other
  difference (model, data, epochs, batch size, seed, schedule, process count, ...) is refused with one line
  naming each. What the run reads while it trains is compared too (``inputs`` in ``args.json``): the data's
  classes, image counts and labels (the same images at another ``--data-dir`` resume; other ones do not), and the
  SHA-256 of each checkpoint it learns from (a teacher retrained in place is refused; the same bytes moved to
  another path resume, the move recorded under ``resumed``).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import shutil
from pathlib import Path
from typing import Any, Callable

from models.checkpoint import atomic_write_text
from models.errors import ReduceNetError

#: Files and folders a run writes; ``--overwrite`` removes these and nothing else.
RUN_FILES = ("args.json", "spec.json", "last.safetensors", "last.json", "best.safetensors", "best.json",
             "train_state.pt", "metrics.csv", "summary.json", "tb", "deploy", "done", "baseline.png")
#: Options that may differ on ``--resume``: where and how fast it runs, not what it computes.
RESUMABLE_CHANGES = ("out", "resume", "overwrite", "device", "amp", "compile", "compile_mode", "channels_last",
                     "no_export", "data_dir", "workers", "lr")
LOCK = "run.lock"


def _stale(p: Path) -> bool:
    """A temporary file of an atomic write (``.NAME.XXXX.tmp``), or the staging folder of an export
    (``.deploy.export-XXXX``), left behind when its process was killed."""
    return p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith(".deploy.export-"))


class RunDirError(ReduceNetError):
    """The run directory cannot be used as asked (occupied, locked, not a folder, options differ on resume)."""


def options_of_run(argv: list[str]) -> list[str]:
    """``argv`` without the options that say where and whether to write (``--out X``, ``--resume``, ``--overwrite``):
    what makes two runs the same run."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif a not in ("--resume", "--overwrite") and not a.startswith("--out="):
            out.append(a)
    return out


def command_line(module: str, argv: list[str]) -> str:
    """A command that repeats this run, e.g. ``python -m train.stage1 -m reduce20 --epochs 3``."""
    return shlex.join(["python", "-m", module, *argv])


def same_record(a: Any, b: Any) -> bool:
    """Whether two records of how a run was made (option lists, dicts of them) say the same.

    They do when they are equal, except that two different strings naming the same existing file count as equal:
    ``runs/x`` written from the project folder and ``/home/me/project/runs/x`` are one teacher.
    """
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_record(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same_record(x, y) for x, y in zip(a, b))
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        try:
            return os.path.samefile(a, b)
        except (OSError, ValueError):
            return False
    return False


def _unchanged_reads(old: dict[str, Any], new: dict[str, Any]) -> set[str]:
    """The roles (``teacher``, ...) of the checkpoints a run reads whose bytes (SHA-256) are the same in the recorded
    ``inputs`` ``old`` and today's ``new``, wherever they are now."""
    return {role for role in set(old) & set(new) - {"data"} if old[role].get("sha256") == new[role].get("sha256")}


def finished_summary(run: str | Path, record: Any,
                     normalize: Callable[[Any], Any] = lambda r: r) -> dict[str, Any] | None:
    """The summary of the run in ``run`` if it finished (:func:`mark_done`) made as ``record`` says
    (:func:`same_record`, after ``normalize`` of the recorded mark), else None."""
    run = Path(run)
    try:
        if same_record(normalize(json.loads((run / "done").read_text())), record):
            return json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    return None


def mark_done(run: str | Path, record: Any) -> None:
    """Mark the run in ``run`` finished, made as ``record`` says (the options that made it)."""
    atomic_write_text(Path(run) / "done", json.dumps(record) + "\n")


def in_use(run: str | Path) -> bool:
    """Whether a running process holds the lock of the run directory ``run`` (tested without waiting or writing)."""
    try:
        fd = os.open(Path(run) / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)  # closing releases a lock taken here


def unfinished_run(checkpoint: str | Path) -> tuple[str, Path, Any] | None:
    """Whether the run directory holding ``checkpoint`` is unfinished: ``("training", run, epoch)`` while a running
    job holds it (its checkpoints change every epoch), ``("stopped", run, epoch)`` for a run that stopped before it
    finished (no ``summary.json``), with the epoch the checkpoint holds ("?" where its record lacks it); None for a
    finished run or a checkpoint outside a run directory (a deploy folder, a copied file)."""
    run = Path(checkpoint).parent
    if not (run / "args.json").is_file():
        return None
    training = in_use(run)
    if not training and (run / "summary.json").is_file():
        return None
    try:
        epoch = json.loads(Path(checkpoint).with_suffix(".json").read_text())["metadata"]["epoch"]
    except (OSError, ValueError, KeyError, TypeError):
        epoch = "?"
    return ("training" if training else "stopped"), run, epoch


class RunDir:
    """A run directory.

    Args:
        path: the folder (created when needed).
        resume: continue the run in it.
        overwrite: replace the run in it once the new run writes its first checkpoint.
        record: what ``args.json`` holds: ``{"command", "argv", "args", "world_size"}``, and ``"spec"`` (the
            resolved :class:`~train.spec.RunSpec`, also written to ``spec.json``) for runs made from a spec.
        spec_differences: for a spec's run, ``(recorded spec, roles of the checkpoints it reads whose bytes are
            unchanged) -> ["--option new (run: old)", ...]``, the differences ``--resume`` refuses; runs recorded
            before specs are compared by their ``args``.
    """

    def __init__(self, path: str | Path, resume: bool = False, overwrite: bool = False,
                 record: dict[str, Any] | None = None,
                 spec_differences: Callable[[dict[str, Any], set[str]], list[str]] | None = None) -> None:
        self.path = Path(path)
        self.resume, self.overwrite = resume, overwrite
        self.record = record or {}
        self.spec_differences = spec_differences
        self._lock_fd: int | None = None
        self._committed = resume
        self._made: list[Path] = []

    def holds_run(self) -> bool:
        """Whether the folder holds anything but a lock and the temporary files of a killed run's writes."""
        return self.path.is_dir() and any(p.name != LOCK and not _stale(p) for p in self.path.iterdir())

    def _in_use(self) -> RunDirError:
        owner = (self.path / LOCK).read_text().strip() or "another process"
        return RunDirError(f"{self.path} is in use by a running job ({owner}); wait for it to finish or choose another "
                           "--out")

    def open(self) -> RunDir:
        """Check the folder, take its lock and, with ``--resume``, check the options; writes nothing else."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file; pass a folder for the run")
        if self.path.is_symlink() and not self.path.exists():
            raise RunDirError(f"--out {self.path} is a link to {os.readlink(self.path)}, which does not exist; make "
                              "that folder, or pass another --out")
        if in_use(self.path):  # first: what the folder holds is changing, and no option would make it usable now
            raise self._in_use()
        resumable = (self.path / "train_state.pt").is_file()
        started = (self.path / "args.json").is_file()  # a run began here (killed before its first epoch ended?)
        if self.resume and not resumable:
            if started:
                raise RunDirError(f"--resume: {self.path} has no train_state.pt (its run stopped before its first "
                                  "epoch ended, so there is nothing to resume); start the run anew with --overwrite "
                                  "instead of --resume")
            what, fix = (("holds no run", "start the run without --resume") if not self.holds_run() else
                         ("holds files, but not a run", "choose another --out"))
            raise RunDirError(f"--resume: {self.path} {what} to resume; {fix}")
        if not self.resume and self.holds_run() and not self.overwrite:
            if resumable:
                raise RunDirError(f"run directory {self.path} already holds a run; pass --resume to continue it, "
                                  "--overwrite to replace it, or choose another --out")
            if started:
                raise RunDirError(f"run directory {self.path} holds a run that stopped before its first epoch ended "
                                  "(nothing to resume); pass --overwrite to start it anew, or choose another --out")
            raise RunDirError(f"--out {self.path} is not empty; choose another --out, or pass --overwrite (it removes "
                              "only the files a run writes)")
        lock, path = self.path / LOCK, self.path.absolute()
        # what close() takes back if the run ends before its first checkpoint: the lock file, the folders it makes
        self._made = ([lock] if not lock.exists() else []) + [p for p in (path, *path.parents) if not p.exists()]
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunDirError(f"cannot write to {self.path} ({e.strerror}); choose a writable --out") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise self._in_use() from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        self._lock_fd = fd
        try:
            for tmp in filter(_stale, self.path.glob(".*")):  # left by a killed run's writes; we own the folder now
                if tmp.is_dir() and not tmp.is_symlink():
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    tmp.unlink(missing_ok=True)
            if self.resume:
                self._check_resume()
        except BaseException:
            self.close()
            raise
        return self

    def _check_resume(self) -> None:
        try:
            saved = json.loads((self.path / "args.json").read_text())
            old, new = saved["args"], self.record.get("args", {})
        except (OSError, ValueError, KeyError, TypeError):
            raise RunDirError(f"--resume: {self.path / 'args.json'} is missing or damaged, so the run's options "
                              "are unknown; start a new run with --overwrite") from None
        inputs = saved.get("inputs") or {}, self.record.get("inputs") or {}
        # an option the run's version did not have yet is taken as today's (it is recorded under "resumed")
        if "spec" in saved and self.spec_differences is not None:
            differ = self.spec_differences(saved["spec"], _unchanged_reads(*inputs))
        else:
            differ = [f"--{k.replace('_', '-')} {new.get(k)} (run: {old.get(k)})" for k in sorted(old)
                      if k not in RESUMABLE_CHANGES and not same_record(old.get(k), new.get(k))]
        added = sorted(set(new) - set(old))
        if saved.get("world_size", 1) != self.record.get("world_size", 1):
            differ.append(f"{self.record.get('world_size', 1)} processes (run: {saved.get('world_size', 1)})")
        if differ:
            shown = ", ".join(differ)
            raise RunDirError(f"the run in {self.path} was started with other options ({shown}), so it cannot "
                              f"continue with these: repeat its options to continue it (see "
                              f"{self.path / 'args.json'}), or pass --overwrite or another --out to start anew")
        moved = self._check_inputs(*inputs)
        changed = {k: [old.get(k), new.get(k)] for k in RESUMABLE_CHANGES
                   if k in ("lr", "amp", "device") and old.get(k) != new.get(k)}
        changed.update(moved)
        changed.update({k: [None, new[k]] for k in added})
        if changed:
            saved.setdefault("resumed", []).append({"command": self.record.get("command"), "changed": changed})
            atomic_write_text(self.path / "args.json", json.dumps(saved, indent=2, default=str) + "\n")

    def _check_inputs(self, old: dict[str, Any], new: dict[str, Any]) -> dict[str, list[str]]:
        """Refuse to resume on other data, or with a checkpoint it learns from (the teacher) that has changed since
        the run started: its epochs would mix two. A run recorded before ``inputs`` existed is not checked. Returns
        ``{role: [old path, new path]}`` for each such checkpoint found, with the same bytes, at another path."""
        start = " or pass --overwrite or another --out to start anew"
        if "data" in old and "data" in new and old["data"] != new["data"]:
            o, n = old["data"], new["data"]
            same_size = (o.get("train"), o.get("test")) == (n["train"], n["test"])
            raise RunDirError(f"--resume: the run in {self.path} trained on {o.get('label')} ({o.get('train')} train "
                              f"/ {o.get('test')} test images), but this --data-dir gives {n['label']} ({n['train']} / "
                              f"{n['test']}{', other labels' if same_size else ''}): pass the run's data (see "
                              f"{self.path / 'args.json'}),{start}")
        unchanged = _unchanged_reads(old, new)
        changed = sorted(set(old) & set(new) - {"data"} - unchanged)
        if changed:
            role = changed[0]
            raise RunDirError(f"--resume: the {role} {new[role]['path']} has changed since the run in {self.path} "
                              f"started (another SHA-256), so its epochs would learn from two {role}s: pass the "
                              f"{role} it started with,{start}")
        return {role: [old[role].get("path"), new[role]["path"]] for role in sorted(unchanged)
                if old[role].get("path") != new[role]["path"]}

    def commit(self) -> None:
        """Called before the first write of a new run: remove the replaced run's files, write ``args.json``."""
        if self._committed:
            return
        self._committed = True
        self.path.mkdir(parents=True, exist_ok=True)
        if self.overwrite:  # only the files a run writes; anything else the user put there stays
            for name in RUN_FILES:
                target = self.path / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        if self.record:
            atomic_write_text(self.path / "args.json", json.dumps(self.record, indent=2, default=str) + "\n")
        if "spec" in self.record:
            atomic_write_text(self.path / "spec.json", json.dumps(self.record["spec"], indent=2) + "\n")

    def close(self) -> None:
        """Release the lock (the process's exit does it too). A run that ends before its first checkpoint (an
        error, Ctrl-C) takes back the lock file and the folders it made, so the folder is left as it was."""
        if self._lock_fd is None:
            return
        if not self._committed:
            for made in self._made:  # the lock file, then the folders, innermost first; a folder in use stays
                with contextlib.suppress(OSError):
                    made.unlink() if made == self.path / LOCK else made.rmdir()
        os.close(self._lock_fd)
        self._lock_fd = None

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)
