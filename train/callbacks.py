"""What plugs into the training loop: callbacks that own their state, as Lightning's do.

The :class:`~train.engine.Trainer` trains and evaluates; everything else happens in callbacks, called in their
order at each hook. A callback's :meth:`Callback.state_dict` goes into ``train_state.pt`` and comes back through
:meth:`Callback.load_state_dict` on ``--resume``, so a resumed run continues exactly.

The run directory's writers (:func:`run_dir_callbacks`) are callbacks too:

* :class:`Checkpointing`: ``last`` and ``best`` checkpoints (safetensors + JSON) and ``train_state.pt``;
* :class:`MetricsLog`: ``metrics.csv`` (one row per epoch) and TensorBoard events in ``tb/``;
* :class:`ConsoleLog`: one line per epoch;
* :class:`SummaryFile`: ``summary.json`` with the provenance (the commit of every call that trained the run).

Schedules (the LambdaReLU anneal, the DKD warm-up) live in :mod:`train.schedules`.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch

from models import complexity, save_checkpoint
from models.checkpoint import atomic_write, atomic_write_text, copy_checkpoint

from .provenance import git_commit
from .rundir import RunDir

#: What the hooks receive: the :class:`train.engine.Trainer` (not imported: the engine imports this module).
Trainer = Any

#: Columns of metrics.csv; what tasks and schedules log (lambda, loss terms) follows them.
METRIC_FIELDS = ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s", "epoch_s")


class Callback:
    """Base class: every hook does nothing; override the ones you need.

    Hooks, in the order the trainer calls them: :meth:`on_fit_start`, then per epoch :meth:`on_epoch_start`,
    :meth:`on_step` before every optimizer step, :meth:`on_epoch_end` with the epoch's metrics row; at last
    :meth:`on_fit_end` with the summary, which a callback may add to.
    """

    @property
    def state_key(self) -> str:
        """The name of this callback's state in ``train_state.pt``."""
        return type(self).__name__

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the (0-based) ``epoch``'s first step."""

    def on_step(self, epoch: int, step: int, steps: int) -> dict[str, float] | None:
        """Before every optimizer step (0-based ``epoch`` and ``step``, ``steps`` per epoch); what it returns is
        logged (the value after the epoch's last step)."""
        return None

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        """After the epoch's evaluation; ``row`` is its metrics row (``trainer.history[-1]``)."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the last epoch; ``summary`` may be added to (a later callback writes it)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Checkpointing(Callback):
    """``last.safetensors`` after every epoch, ``best.safetensors`` when the test accuracy is the best so far, and
    ``train_state.pt`` (everything ``--resume`` needs); rank 0 only. The run directory is committed (the replaced
    run's files removed, ``args.json`` written) just before the first write.

    Args:
        run: the run directory.
        metadata: stored in every checkpoint (dataset, stage, ...), with the epoch and its test accuracy.
    """

    def __init__(self, run: RunDir, metadata: dict[str, Any] | None = None) -> None:
        self.run, self.metadata = run, dict(metadata or {})

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if not trainer.dist.is_main:
            return
        self.run.commit()
        epoch, acc = int(row["epoch"]), row["test_acc"]
        meta = {**self.metadata, "epoch": epoch, "test_acc": acc}
        last = save_checkpoint(trainer.model, self.run.path / "last.safetensors", meta)
        if all(acc > r["test_acc"] for r in trainer.history[:-1]):
            copy_checkpoint(last, self.run.path / "best.safetensors")  # the same files: linked, not written again
        buf = io.BytesIO()
        torch.save(trainer.state_dict(), buf)
        atomic_write(self.run.path / "train_state.pt", lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


class MetricsLog(Callback):
    """``metrics.csv`` (rewritten atomically after every epoch) and TensorBoard scalars in ``tb/``; rank 0 only.
    ``tb/`` is created at the first epoch's end, so a run that fails earlier leaves none behind."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.writer = None

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if not trainer.dist.is_main:
            return
        out = io.StringIO()
        extra = sorted({k for r in trainer.history for k in r} - set(METRIC_FIELDS))
        writer = csv.DictWriter(out, fieldnames=[*METRIC_FIELDS, *extra])
        writer.writeheader()
        writer.writerows(trainer.history)
        atomic_write_text(self.folder / "metrics.csv", out.getvalue())
        epoch = int(row["epoch"])
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.folder / "tb"), purge_step=epoch)
        for k, v in row.items():
            if k != "epoch" and math.isfinite(v):
                self.writer.add_scalar(k, v, epoch)
        self.writer.flush()

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.writer is None and trainer.history:  # resumed with no epoch left: a kill may have come between
            self.on_epoch_end(trainer, trainer.history[-1])  # train_state.pt and these files at the last epoch
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ConsoleLog(Callback):
    """What a run is, before its first step (:func:`start_lines`), then one line per epoch (loss, accuracies, lr,
    what schedules log such as lambda, images/s); rank 0 only."""

    def __init__(self, log: Callable[[str], None] = print, metadata: dict[str, Any] | None = None) -> None:
        self.log, self.metadata = log, metadata or {}

    def on_fit_start(self, trainer: Trainer) -> None:
        if trainer.dist.is_main:
            for line in start_lines(trainer, self.metadata):
                self.log(line)

    def on_epoch_end(self, trainer: Trainer, row: dict[str, float]) -> None:
        if not trainer.dist.is_main or "train_loss" not in row or not math.isfinite(row["train_loss"]):
            return
        lam = f" lambda {row['lambda']:.2f}" if "lambda" in row else ""
        self.log(f"epoch {int(row['epoch']):3d}/{trainer.cfg.epochs} loss {row['train_loss']:.4f} "
                 f"train {row['train_acc']:5.2f}% test {row['test_acc']:5.2f}% "
                 f"lr {row['lr']:.4f}{lam} {row['images_per_s']:.0f} img/s")
        hint = chance_hint(row, trainer.data.info.num_classes, len(trainer.data.train))
        if hint:
            self.log(hint)


class SummaryFile(Callback):
    """Writes the summary to ``summary.json`` at the end (rank 0), with the commit of every call that trained the
    run (its state: a resumed run keeps the commits of the calls before). Put it after the callbacks that add to
    the summary."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.commits: list[str] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.commits = [*self.commits, git_commit()]

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        summary["commits"] = list(dict.fromkeys(self.commits or [git_commit()]))
        if trainer.dist.is_main:
            atomic_write_text(self.folder / "summary.json", json.dumps(summary, indent=2) + "\n")

    def state_dict(self) -> dict[str, Any]:
        return {"commits": list(self.commits)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.commits = list(state.get("commits", []))


def run_dir_callbacks(run: RunDir, metadata: dict[str, Any] | None = None,
                      log: Callable[[str], None] = print) -> list[Callback]:
    """The writers of a run directory, in order: checkpoints, metrics, the console line, and (last) the summary;
    callbacks that add to the summary go before the last one."""
    return [Checkpointing(run, metadata), MetricsLog(run.path), ConsoleLog(log, metadata), SummaryFile(run.path)]


def chance_hint(row: dict[str, float], num_classes: int, steps: int) -> str | None:
    """What to try when the first epoch ends at chance with a test loss far above the train loss (a model the
    recipe does not suit: BatchNorm statistics from too few steps, or a learning rate too high); None otherwise."""
    chance = 100.0 / num_classes
    if int(row["epoch"]) != 1 or row["test_acc"] > 1.5 * chance or not row["test_loss"] > 3 * row["train_loss"]:
        return None
    return (f"hint: epoch 1 ended at chance ({row['test_acc']:.1f}%, chance {chance:.1f}%) with a test loss of "
            f"{row['test_loss']:.4g} against {row['train_loss']:.4g} in training: after {steps} steps the BatchNorm "
            "statistics do not fit yet, or the learning rate is too high for this model; if it stays so, try a "
            "lower --lr, a longer --warmup-epochs, or more images per epoch")


def start_lines(trainer: Trainer, metadata: dict[str, Any]) -> list[str]:
    """Three lines that say what a run is before it starts: the model and its size, the data (classes, images,
    size, loader, what an epoch leaves out), and the device, precision, budget and where it writes."""
    model, data, cfg, world = trainer.model, trainer.data, trainer.cfg, trainer.dist.world_size
    config = getattr(model, "config", None) or {}
    size = data.info.image_size
    cost = complexity(model, (1, 3, size, size))
    grown = config.get("grow")  # a grown zoo student's expansion is 0: its branch (b) is the grown one
    family = [*([f"grown e{grown['expansion']}"] if isinstance(grown, dict) else []),
              *(f"{k} {config[k]:g}" for k in ("expansion", "width", "lora_rank")
                if isinstance(config.get(k), (int, float)) and not (k == "lora_rank" and not config[k])
                and not (k == "expansion" and grown))]
    role = metadata.get("role")
    about = ", ".join([*([str(role)] if role else []), *family])
    total, per_epoch = len(data.train.labels), data.train.num_samples * world
    left_out = (f"; {per_epoch:,} of {total:,} training images per epoch (last partial batch dropped)"
                if per_epoch < total else "")
    steps = len(data.train)
    precision = ("bf16 autocast" if cfg.amp else "float32") + (
        f", torch.compile ({cfg.compile_mode})" if cfg.compile else "") + (
        ", the step as one CUDA graph" if cfg.cuda_graph and trainer.device.type == "cuda" else "")
    processes = f" x {world} processes" if world > 1 else ""
    resumes = f", resumed after epoch {trainer.epoch}" if trainer.epoch else ""
    where = f"; writes {trainer.run_dir}/ (checkpoints, metrics.csv, tb/, summary.json)" if trainer.run_dir else ""
    length = (f"{cfg.epochs} epoch{'s' * (cfg.epochs != 1)} of {steps:,} step{'s' * (steps != 1)}" if cfg.epochs
              else "no training (0 epochs)")
    return [
        f"model: {config.get('model', type(model).__name__)}{f' ({about})' if about else ''}: "
        f"{cost['params']:,} params, {cost['macs'] / 1e6:,.2f} M MACs at {size} px",
        f"data: {data.info.label}: {data.info.num_classes} classes, {total:,} train / {len(data.test.labels):,} test "
        f"images at {size} px, {getattr(data.train, 'kind', 'custom')} loader{left_out}",
        f"run: {trainer.device}, {precision}, {length} (batch {data.train.batch_size}{processes}){resumes}{where}",
    ]
