"""The one training loop: train, evaluate, resume, DDP; what it writes comes from callbacks (:mod:`train.callbacks`).

A run directory holds::

    args.json            the resolved options and command line
    last.safetensors     the model after the last finished epoch (+ last.json), models.checkpoint format
    best.safetensors     the epoch with the best test accuracy (+ best.json)
    train_state.pt       everything --resume needs (model, optimizer, scheduler, epoch, history, RNG,
                         the callbacks' states), one file
    metrics.csv          one row per epoch
    tb/                  TensorBoard events
    summary.json         best and last accuracy, params, MACs, images/s, wall time

Every file is written atomically, so a killed run resumes from its last finished epoch and ends with the same
metrics as an uninterrupted one: each epoch's data order and augmentation depend on (seed, epoch) only.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from models import complexity
from models.checkpoint import can_save, check_saves
from models.errors import ConfigError, ReduceNetError, brief

from .callbacks import Callback, run_dir_callbacks
from .data import Data
from .graphs import GraphedStep, python_state
from .progress import Progress
from .provenance import hardware
from .rundir import RUN_FILES, RunDir, RunDirError
from .tasks import TASK_OUTPUTS, Task

#: torch.compile's modes; ``reduce-overhead`` replays each compiled graph as a CUDA graph (no per-kernel launches).
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: The modes that make CUDA graphs of their own, which a step captured whole (``cuda_graph``) cannot hold.
GRAPH_COMPILE_MODES = ("reduce-overhead", "max-autotune")
#: :attr:`TrainConfig.optimizer`'s values.
OPTIMIZERS = ("sgd", "adam")
#: :attr:`TrainConfig.schedule`'s values (:func:`lr_factor`).
SCHEDULES = ("cosine", "cosine-epoch", "step")


def check_cuda_graph(cuda_graph: bool, compile_: bool, compile_mode: str, world_size: int = 1) -> None:
    """With ``cuda_graph`` (the whole step captured, ``--cuda-graph``), a one-line :class:`ConfigError` for what
    cannot share its graph: torchrun's DistributedDataParallel, or a compile mode that makes CUDA graphs of its own."""
    if not cuda_graph:
        return
    if world_size > 1:
        what = "torchrun (DistributedDataParallel)"
    elif compile_ and compile_mode in GRAPH_COMPILE_MODES:
        what = f"--compile-mode {compile_mode} (CUDA graphs of its own)"
    else:
        return
    raise ConfigError(f"--cuda-graph captures the whole step in one CUDA graph, which {what} cannot share: leave out "
                      "one of them (with --cuda-graph, --compile-mode default compiles inside the graph)")


#: The options that scale each logged loss term, named when that term is the one that overflowed
#: (:meth:`Trainer._check`); any other term, or a loss without terms, names :data:`LOSS_OPTIONS`.
TERM_OPTIONS = {"loss_features": ("--feature-weight", "--lr"), "loss_logits": ("--kd-T", "--kd-alpha")}
LOSS_OPTIONS = ("--kd-T", "--kd-alpha", "--lr")


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` is a collective's (DDP's gradient all-reduce, a barrier) that lost a process of the job:
    gloo's "Connection closed/reset by peer", NCCL's errors, torch's ``DistBackendError``."""
    backend_error = getattr(dist, "DistBackendError", None)
    return (backend_error is not None and isinstance(error, backend_error)) or (
        isinstance(error, RuntimeError) and any(w in str(error) for w in ("by peer", "gloo", "NCCL", "nccl")))


class TrainingDiverged(ReduceNetError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by both stages (defaults: the ReduceNet CIFAR recipe).

    ``optimizer`` is one of :data:`OPTIMIZERS` and ``schedule`` one of :data:`SCHEDULES`; any other value is refused
    (:class:`ConfigError`) when the config is made.

    ``seed`` is a record, not a setting: the trainer seeds nothing. A run's seed is set before its model and data are
    built (the pipeline calls ``torch.manual_seed(seed)`` in :func:`train.assemble.setup` and builds the loaders with
    the same seed, which fixes each epoch's order and augmentation); ``TrainConfig.seed`` is only written to the
    summary.
    A caller of :class:`Trainer` seeds its model and passes the seed to :func:`train.data.build_data` itself.
    """

    epochs: int = 200
    lr: float = 0.1
    wd: float = 1e-4
    optimizer: str = "sgd"  # sgd (momentum, Nesterov) | adam (L2 weight decay, as torch.optim.Adam)
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"  # cosine (per step) | cosine-epoch (per epoch, torch's CosineAnnealingLR) | step
    milestones: tuple[float, ...] = (0.5, 0.75)  # fractions of the epochs, for "step"
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    seed: int = 0
    amp: bool = False
    compile: bool = False
    compile_mode: str = "default"  # one of COMPILE_MODES
    cuda_graph: bool = False  # the whole step as one CUDA graph (train.graphs); not with CUDA-graph compile modes
    channels_last: bool = False
    sync_bn: bool = False  # torchrun on GPUs: SyncBatchNorm
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in summary.json

    def __post_init__(self) -> None:
        for name, valid in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            value = getattr(self, name)
            if value not in valid:
                raise ConfigError(f"TrainConfig {name}={value!r} is not one of {', '.join(valid)} (--{name})")


def lr_factor(step: int, total: int, warmup: int, schedule: str, milestones: tuple[int, ...], gamma: float,
              steps_per_epoch: int = 1) -> float:
    """Multiplier of the peak learning rate after ``step`` of ``total`` optimizer steps.

    ``cosine`` decays per step; ``cosine-epoch`` holds each epoch's value, as ``CosineAnnealingLR`` stepped
    once per epoch does (the original ReduceNet's schedule); ``step`` multiplies by ``gamma`` at each milestone.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine-epoch":
        step, warmup = step // steps_per_epoch * steps_per_epoch, warmup // steps_per_epoch * steps_per_epoch
    if schedule in ("cosine", "cosine-epoch"):
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= m for m in milestones)


class EpochSums:
    """What a training epoch adds up, kept on the device so that a step never waits for it.

    Per step (:meth:`add`): the loss and correct predictions weighted by the batch size, the task's logged terms,
    and the first step whose loss was not finite, with what the diagnosis of that step needs (its loss, and
    whether the model's and the teacher's outputs and each logged term were finite). Nothing is read back to the
    host until :meth:`read`, which the loop calls at a slow, fixed interval and at the end of the epoch.

    Every sum, the images seen among them, is updated in place (:meth:`add`) and :meth:`reset` zeroes them in
    place, so a step captured as a CUDA graph (:mod:`train.graphs`) adds to the same tensors at every replay.
    """

    def __init__(self, device: torch.device) -> None:
        zero = functools.partial(torch.zeros, (), device=device)
        self.loss, self.correct = zero(dtype=torch.float64), zero(dtype=torch.int64)
        self.steps, self.seen = zero(dtype=torch.int64), zero(dtype=torch.int64)
        self.terms: dict[str, torch.Tensor] = {}
        self.terms_finite: dict[str, torch.Tensor] = {}  # each term at the first non-finite step
        # the first non-finite step: its index (-1: none yet), loss, and whether logits / teacher logits were finite
        self.bad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.bad_loss = zero(dtype=torch.float32)
        self.bad_flags = torch.ones(2, dtype=torch.bool, device=device)

    def reset(self) -> None:
        """Zero every sum in place (a new epoch), keeping the tensors and the names of the terms."""
        for t in (self.loss, self.correct, self.steps, self.seen, self.bad_loss, *self.terms.values()):
            t.zero_()
        self.bad_step.fill_(-1)
        self.bad_flags.fill_(True)
        for t in self.terms_finite.values():
            t.fill_(True)

    @torch.no_grad()
    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor, terms: dict[str, torch.Tensor],
            teacher_logits: torch.Tensor | None = None) -> None:
        """Add one step, in place (asynchronous: no value leaves the device)."""
        n = y.numel()
        loss = loss.detach()
        self.loss.add_(loss.double() * n)
        self.correct.add_((logits.detach().argmax(1) == y).sum())
        first = ~torch.isfinite(loss) & (self.bad_step < 0)
        for k, v in terms.items():
            if k not in self.terms:  # a new term starts at 0 (in a captured step, it was seen in the eager one)
                self.terms[k] = torch.zeros((), dtype=torch.float64, device=self.loss.device)
                self.terms_finite[k] = torch.ones((), dtype=torch.bool, device=self.loss.device)
            v = v.detach().to(self.loss.device, torch.float64)
            self.terms[k].add_(v * n)
            self.terms_finite[k].copy_(torch.where(first, torch.isfinite(v), self.terms_finite[k]))
        self.bad_loss.copy_(torch.where(first, loss.float(), self.bad_loss))
        flags = torch.stack([torch.isfinite(logits.detach()).all(),
                             torch.isfinite(teacher_logits).all() if teacher_logits is not None
                             else torch.ones((), dtype=torch.bool, device=loss.device)])
        self.bad_flags.copy_(torch.where(first, flags, self.bad_flags))
        self.bad_step.copy_(torch.where(first, self.steps, self.bad_step))
        self.steps.add_(1)
        self.seen.add_(n)

    def read(self) -> dict[str, Any]:
        """The sums on the host, in one transfer: ``loss``, ``correct``, ``terms`` (sums weighted by batch size),
        ``seen``, and ``bad`` (None, or the first non-finite step's ``step``, ``loss``, ``logits_finite``,
        ``teacher_finite`` and ``terms_finite``, ``{term: bool}``)."""
        keys = sorted(self.terms)
        packed = torch.stack([self.loss, self.correct.double(), self.seen.double(), self.bad_step.double(),
                              self.bad_loss.double(), *self.bad_flags.double(), *(self.terms[k] for k in keys),
                              *(self.terms_finite[k].double() for k in keys)]).tolist()
        loss, correct, seen, bad_step, bad_loss, logits_ok, teacher_ok = packed[:7]
        sums, finite = packed[7:7 + len(keys)], packed[7 + len(keys):]
        bad = None if bad_step < 0 else {"step": int(bad_step), "loss": bad_loss, "logits_finite": bool(logits_ok),
                                         "teacher_finite": bool(teacher_ok),
                                         "terms_finite": {k: bool(f) for k, f in zip(keys, finite)}}
        return {"loss": loss, "correct": correct, "seen": int(seen), "bad": bad, "terms": dict(zip(keys, sums))}


@dataclass
class Dist:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum ``values`` over all ranks."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process alone: where code with no :class:`Dist` at hand prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def auto_device() -> str:
    """What ``--device auto`` means on this machine: ``cuda`` when a GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed(device: str) -> tuple[Dist, torch.device]:
    """Join the torchrun job if there is one (NCCL on GPUs, gloo on CPU) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device == "auto":
        device = auto_device()
    if device == "cuda" and world > 1:
        device = f"cuda:{info.local_rank}"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ReduceNetError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ReduceNetError(f"--device {device!r}: training runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ReduceNetError(f"--device {device} was asked for but no GPU is visible; use --device cpu")
        if dev.index is None:  # torch.cuda.set_device needs an index: plain "cuda" is the current GPU
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ReduceNetError(f"--device {device!r}: only {torch.cuda.device_count()} GPU(s) are visible; "
                                 f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return info, dev


def _compiler_failure(error: BaseException) -> bool:
    """Whether ``error`` is torch.compile's own (dynamo's or inductor's: no C++ compiler, a backend that failed),
    not the model's."""
    return any(type(e).__module__.startswith(("torch._dynamo", "torch._inductor"))
               for e in (error, error.__cause__) if e is not None)


class Trainer:
    """Trains a :class:`~train.tasks.Task` on ``data``: the one loop of every stage.

    The loop knows nothing of a model's family: the task computes the loss (and what to log) from a batch and
    holds everything that is optimised, saved and resumed (the student and any trainable adapters of its losses).
    Everything else is a :class:`~train.callbacks.Callback` with its own state: the run directory's writers
    (checkpoints, metrics, the console line, the summary; added when ``run_dir`` is given) and schedules such as
    the LambdaReLU anneal (:mod:`train.schedules`).

    Args:
        task: what to train; ``task.student`` is the model that is checkpointed and evaluated.
        data: train/test loaders from :func:`train.data.build_data`.
        cfg: optimisation settings.
        run_dir: where checkpoints and logs go (only rank 0 writes): a :class:`~train.rundir.RunDir`, whose
            ``commit()`` is called before the first write, or a plain folder; None writes nothing.
        dist_info: this process's rank, from :func:`init_distributed`.
        device: where to train.
        metadata: stored in every checkpoint (dataset, stage, ...).
        callbacks: called after the task's own schedules (:meth:`~train.tasks.Task.callbacks`: a loss's warm-up,
            the Pyramid's phases) and before the run directory's writers, in this order (one that adds to the
            summary comes before the writer of ``summary.json``).
        log: where the console lines go (each epoch's; when the output is not a terminal, a progress line at most
            every 30 s within an epoch).

    A training step never waits for the device: the loss, accuracy, logged terms and a non-finite-loss record
    are summed there (:class:`EpochSums`) and read back every :attr:`sync_every` steps (progress bar, divergence
    check) and at the end of the epoch. A non-finite loss therefore stops the run at the next read-back, with
    the step where it happened; the epoch is not saved, so the last good checkpoint stays.

    With ``run_dir``, the student must be one that :func:`models.save_checkpoint` can save (a ``.config`` dict naming
    its model, as :func:`models.create_model` sets); any other is refused before the first step. A plain folder
    that already holds a run's files is refused when :meth:`fit` starts, unless :meth:`resume` continued that run;
    an opened :class:`~train.rundir.RunDir` decides that for itself (``--resume``, ``--overwrite``).
    """

    #: Steps between read-backs of the running sums (progress bar, divergence check); each one makes the host
    #: wait for the device, so it is rare on a GPU and costs nothing on a CPU.
    sync_every = 50

    def __init__(self, task: Task, data: Data, cfg: TrainConfig, run_dir: RunDir | str | Path | None = None,
                 dist_info: Dist | None = None, device: torch.device | str = "cpu",
                 metadata: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (),
                 log: Callable[[str], None] = print) -> None:
        if run_dir is not None:
            check_checkpointable(task.student, run_dir)
            folder = run_dir.path if isinstance(run_dir, RunDir) else Path(run_dir)
            check_saves(task.student, folder / "last.safetensors", metadata)  # not after an epoch of training
        self.run = run_dir if isinstance(run_dir, RunDir) or run_dir is None else RunDir(run_dir)
        # a plain folder is checked for a run of its own when fit() starts, unless that run is resumed
        self._check_folder = run_dir is not None and not isinstance(run_dir, RunDir)
        self.cfg, self.data, self.log = cfg, data, log
        self.run_dir = self.run.path if self.run is not None else None
        self.dist = dist_info or Dist()
        self.device = torch.device(device)
        writers = run_dir_callbacks(self.run, metadata, log) if self.run is not None else []
        self.callbacks = [*task.callbacks(), *callbacks, *writers]
        keys = [cb.state_key for cb in self.callbacks]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two callbacks share a state key: {keys}; give one a state_key of its own")
        memory_format = torch.channels_last if cfg.channels_last else torch.preserve_format
        if self.dist.world_size > 1 and cfg.sync_bn:
            nn.SyncBatchNorm.convert_sync_batchnorm(task)  # in place below the root: same keys, same .config
        check_cuda_graph(cfg.cuda_graph, cfg.compile, cfg.compile_mode, self.dist.world_size)
        self.task = task.to_device(self.device, memory_format)
        self.model = task.student
        # one kernel for all parameters on a GPU (and in a captured step, which needs it for a tensor lr)
        fused = {"fused": True} if self.device.type == "cuda" or cfg.cuda_graph else {}
        if cfg.optimizer == "adam":
            capturable = {"capturable": True} if cfg.cuda_graph and self.device.type == "cuda" else {}
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(self.task.parameters(), lr=cfg.lr,
                                                                     weight_decay=cfg.wd, **fused, **capturable)
        else:
            self.optimizer = torch.optim.SGD(self.task.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                             nesterov=cfg.nesterov, weight_decay=cfg.wd, **fused)
        steps = len(data.train)  # >= 1: a Loader with fewer samples than one batch refuses to be built
        self.total_steps = steps * cfg.epochs
        milestones = tuple(int(m * self.total_steps) for m in cfg.milestones)
        warmup = int(cfg.warmup_epochs * steps)
        self.lr_factor = lambda s: lr_factor(s, self.total_steps, warmup, cfg.schedule, milestones, cfg.gamma, steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        # in a captured step the learning rate is a device tensor, which the graph reads at every replay; it goes
        # into the groups after the scheduler has taken its base rates as numbers (an older torch's scheduler
        # would take the tensor itself as the base and scale its own output)
        self.lr_tensor = torch.tensor(cfg.lr, device=self.device) if cfg.cuda_graph else None
        self._keep_lr_tensor()
        forward_task: nn.Module = self.task
        if self.dist.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            forward_task = nn.parallel.DistributedDataParallel(self.task, device_ids=ids)
        self.forward_task = torch.compile(forward_task, mode=cfg.compile_mode) if cfg.compile else forward_task
        self.sums = EpochSums(self.device)
        self.graphed = (GraphedStep(functools.partial(self._step, self.sums),
                                    functools.partial(self.optimizer.zero_grad, set_to_none=True), self.device,
                                    key=functools.partial(python_state, self.task))
                        if cfg.cuda_graph else None)
        if self.graphed is not None and not self.graphed.capture:
            log("--cuda-graph: no CUDA graphs on the CPU; each step runs eagerly through the graph's buffers")
        self.history: list[dict[str, float]] = []
        self.epoch = 0  # epochs finished

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything ``--resume`` needs: the task, optimizer, scheduler, epoch, history, RNG and the callbacks'
        states."""
        return {"task": self.task.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "epoch": self.epoch, "history": self.history,
                "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
                "torch_rng": torch.get_rng_state(), "config": asdict(self.cfg)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (also the format of runs written before callbacks had state).

        The peak learning rate is ``cfg.lr``, which may differ from the run's (after a NaN, say): the schedule
        continues from the same step with the new peak.
        """
        self._check_folder = False  # the run in the folder is continued, not replaced
        if "task" in state:
            self.task.load_state_dict(state["task"])
        else:  # written before tasks existed: the model alone
            self.model.load_state_dict(state["model"])
        fused = [group.get("fused") for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, mine in zip(self.optimizer.param_groups, fused):  # a run resumed on another device: its kernels
            group["fused"] = mine
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.history = state["epoch"], state["history"]
        states = state.get("callbacks", {"SummaryFile": {"commits": state.get("commits", [])}})
        for cb in self.callbacks:
            if cb.state_key in states:
                cb.load_state_dict(states[cb.state_key])
        torch.set_rng_state(state["torch_rng"].cpu())
        self.scheduler.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * self.lr_factor(self.scheduler.last_epoch)
        self._keep_lr_tensor()

    def _keep_lr_tensor(self) -> None:
        """With a captured step, every group's ``lr`` is :attr:`lr_tensor`, the tensor the graph reads, holding the
        scheduler's value: a loaded state dict (and a scheduler of an older torch) puts a new object there."""
        if self.lr_tensor is None:
            return
        for group in self.optimizer.param_groups:
            if group["lr"] is not self.lr_tensor:
                self.lr_tensor.fill_(float(group["lr"]))
                group["lr"] = self.lr_tensor

    def resume(self) -> None:
        """Load ``train_state.pt`` of the run directory: :meth:`load_state_dict`."""
        path = self.run_dir / "train_state.pt"
        try:
            self.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        except Exception as e:  # a torn, truncated or foreign file: all mean "cannot resume from it"
            raise ReduceNetError(f"--resume: {path} is damaged or from another model ({brief(e, 120)}); start the run "
                                 "again with --overwrite") from None

    # ----------------------------------------------------------------------------------------------- loops
    def _autocast(self):
        if self.cfg.amp:  # a captured step may not reuse casts cached outside it
            return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=not self.cfg.cuda_graph)
        return nullcontext()

    def _step(self, sums: EpochSums, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on ``(x, y)`` with its sums recorded on the device; the gradients are None before it
        (eagerly: set so by the loop; captured: made by the graph's backward)."""
        with self._autocast():
            out = self.forward_task(x, y)
        loss = out["loss"]
        loss.backward()
        self.optimizer.step()
        sums.add(loss, out["logits"], y, {k: v for k, v in out.items() if k not in TASK_OUTPUTS},
                 out.get("teacher_logits"))

    def current_lr(self) -> float:
        """The learning rate of the next step, computed on the host (reading the optimizer's tensor would wait)."""
        return self.cfg.lr * self.lr_factor(self.scheduler.last_epoch)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """Train the (0-based) ``epoch``; its metrics row: train loss and accuracy, images/s, lr, what the task
        and the callbacks log."""
        self.task.train()
        self.data.train.set_epoch(epoch)
        for callback in self.callbacks:
            callback.on_epoch_start(self, epoch)
        steps = len(self.data.train)
        progress = Progress(steps, f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step", log=self.log,
                            enabled=self.dist.is_main)
        sums = self.sums
        sums.reset()
        if self.graphed is not None:
            self.graphed.new_epoch()
        step_logs: dict[str, float] = {}
        start = time.perf_counter()
        for step, (x, y) in enumerate(self.data.train):
            for callback in self.callbacks:
                step_logs.update(callback.on_step(epoch, step, steps) or {})
            if self.graphed is not None:
                self.graphed(x, y)
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self._step(sums, x, y)
            self.scheduler.step()
            self._keep_lr_tensor()
            progress.tick()
            # a read-back makes the host wait for the device: every sync_every steps, or when a line is due
            if ((step + 1) % self.sync_every == 0 or progress.due()) and step + 1 < steps:
                done = self._check(sums.read(), epoch)
                progress.show(loss=f"{done['loss'] / done['seen']:.4f}",
                              img_s=f"{done['seen'] / (time.perf_counter() - start):.0f}",
                              lr=f"{self.current_lr():.4f}")
        progress.close(final=False)  # the epoch's own line follows
        done = self._check(sums.read(), epoch)  # waits for the device: the epoch's work is finished after it
        elapsed = time.perf_counter() - start
        keys = sorted(done["terms"])
        totals = self.dist.sum([done["loss"], done["correct"], done["seen"], *(done["terms"][k] for k in keys)],
                               self.device)
        total_loss, total_correct, total_seen = totals[:3]
        return {"train_loss": total_loss / total_seen, "train_acc": 100.0 * total_correct / total_seen,
                "images_per_s": total_seen / elapsed, "lr": self.current_lr(), **step_logs,
                **{k: v / total_seen for k, v in zip(keys, totals[3:])}}

    def _kept(self) -> str:
        """What a run that stops now leaves, as its error says it."""
        if self.epoch and self.run_dir:
            return f"the last good checkpoint (epoch {self.epoch}) in {self.run_dir} is kept"
        return "no epoch had finished, so nothing was written"

    def _check(self, done: dict[str, Any], epoch: int) -> dict[str, Any]:
        """``done`` (an :meth:`EpochSums.read`), or the one-line error for its first non-finite loss, naming the
        likely cause and what is kept."""
        bad = done["bad"]
        if bad is None:
            return done
        where = f"loss became {bad['loss']} at epoch {epoch + 1}, step {bad['step'] + 1}"
        kept = self._kept()
        if not bad["teacher_finite"]:
            raise TrainingDiverged(f"{where}: the teacher's outputs are not finite, so its checkpoint is damaged "
                                   f"or was not trained on these inputs; check the teacher you passed ({kept})")
        if bad["logits_finite"]:
            terms = [k for k, ok in bad["terms_finite"].items() if not ok]
            which = f"its {' and '.join(terms)} term{'s' * (len(terms) > 1)}" if terms else "the loss"
            options = ", ".join(dict.fromkeys(o for k in terms or ["loss"] for o in TERM_OPTIONS.get(k, LOSS_OPTIONS)))
            raise TrainingDiverged(f"{where} while the model's outputs are finite: {which} overflowed; choose "
                                   f"moderate values of {options} ({kept})")
        again = "--resume with a lower --lr (or --no-amp)" if self.epoch else "the command with a lower --lr"
        raise TrainingDiverged(f"{where}: the model diverged; {kept}: run {again}")

    def evaluate(self, model: nn.Module | None = None) -> dict[str, Any]:
        """Test metrics of ``model`` (default: the trained one) in float32, summed over all ranks; see
        :func:`evaluate`. Only training uses bf16: reported accuracies are those of the float32 model."""
        return evaluate(model or self.model, self.data.test, self.data.info.num_classes, nullcontext, self.dist,
                        self.device)

    def fit(self) -> dict[str, Any]:
        """Train from the epoch reached to ``cfg.epochs``, each epoch evaluated and handed to the callbacks;
        returns the summary (:meth:`summary`, which the callbacks may add to at the end).

        With ``cfg.epochs == 0`` the model is evaluated as it is and recorded as epoch 0 (a trimmed network that
        is not fine-tuned, say): its row has no training metrics (NaN).
        """
        if self._check_folder:
            check_fresh_folder(self.run_dir)
            self._check_folder = False  # what it holds now is this run's own
        wall = time.perf_counter()
        for callback in self.callbacks:
            callback.on_fit_start(self)
        if self.cfg.epochs == 0 and not self.history:
            nan = float("nan")
            self._finish_epoch({"lr": 0.0, "train_loss": nan, "train_acc": nan, "images_per_s": nan}, 0, wall)
        for epoch in range(self.epoch, self.cfg.epochs):
            t0 = time.perf_counter()
            try:
                row = self.train_epoch(epoch)
                self._finish_epoch(row, epoch + 1, t0)
            except Exception as e:
                if self.cfg.compile and _compiler_failure(e):  # torch.compile compiles at the first step
                    raise ConfigError(f"--compile failed to compile the step ({brief(e)}); install a C++ compiler "
                                      "(and Triton on a GPU) or drop --compile") from None
                if self.dist.world_size > 1 and peer_stopped(e):  # gloo/NCCL: a collective lost its peer
                    raise ReduceNetError(f"rank {self.dist.rank}: another process of this torchrun job stopped during "
                                         f"epoch {epoch + 1} ({brief(e)}); {self._kept()}: once its error is fixed, "
                                         "run the job again with --resume") from None
                raise
        summary = self.summary(time.perf_counter() - wall)
        for callback in self.callbacks:
            callback.on_fit_end(self, summary)
        return summary

    def _finish_epoch(self, row: dict[str, float], epoch: int, t0: float) -> None:
        """Evaluate, complete ``row`` as epoch ``epoch`` (1-based; 0 before any training) and hand it on."""
        metrics = check_finite(self.evaluate(), f"the model after epoch {epoch}"
                               + (f" (the last good checkpoint, epoch {self.epoch}, is kept)" if self.epoch else ""))
        row.update(test_loss=metrics["test_loss"], test_acc=metrics["test_acc"], epoch=epoch,
                   epoch_s=time.perf_counter() - t0)
        self.history.append(row)
        self.epoch = epoch
        for callback in self.callbacks:
            callback.on_epoch_end(self, row)

    def summary(self, wall_s: float) -> dict[str, Any]:
        """What the run reached: best and last test accuracy, size, speed, data, precision, hardware."""
        last = self.history[-1] if self.history else {}
        best = max(self.history, key=lambda r: r["test_acc"], default={})  # the first of equal bests
        size = complexity(self.model, (1, 3, self.data.info.image_size, self.data.info.image_size))
        return {
            "model": getattr(self.model, "config", None), "run_dir": str(self.run_dir) if self.run_dir else None,
            "data": self.data.info.label, "dataset": self.data.info.name,
            "train_images": self.data.train.num_samples * self.dist.world_size,
            "test_images": len(self.data.test.labels),
            "epochs": self.cfg.epochs, "seed": self.cfg.seed,
            "best_test_acc": best.get("test_acc", -1.0), "best_epoch": best.get("epoch", 0),
            "last_test_acc": last.get("test_acc"), "last_epoch": last.get("epoch"),
            "params": size["params"], "macs": size["macs"],
            "images_per_s": sum(r["images_per_s"] for r in self.history) / max(1, len(self.history)),
            "wall_s_this_call": wall_s, "train_s_total": sum(r["epoch_s"] for r in self.history),
            "hardware": hardware(self.device), "world_size": self.dist.world_size,
            "precision": "bf16 autocast" if self.cfg.amp else "float32", "channels_last": self.cfg.channels_last,
            "cuda_graph": self.cfg.cuda_graph,
            "torch": torch.__version__, "command": " ".join(sys.argv),
            **self.cfg.extra,
        }


def check_checkpointable(model: nn.Module, run_dir: RunDir | str | Path) -> None:
    """A one-line :class:`ConfigError` unless ``model`` has what :func:`models.save_checkpoint` needs to save it in
    ``run_dir`` after every epoch: a ``.config`` dict naming its model."""
    if can_save(model):
        return
    model = getattr(model, "_orig_mod", model)
    raise ConfigError(f"run_dir {run_dir} gets a checkpoint after every epoch, but the {type(model).__name__} being "
                      "trained has no .config naming its model, so it cannot be saved: build it with "
                      "models.create_model, set model.config = {'model': NAME, ...}, or pass no run_dir")


def check_fresh_folder(path: Path) -> None:
    """A one-line :class:`~train.rundir.RunDirError` when the plain folder ``path`` already holds a run's files (a
    new run would replace some and leave the others: a mixed folder)."""
    held = [name for name in RUN_FILES if (path / name).exists()]
    if held:
        raise RunDirError(f"run_dir {path} already holds a run ({', '.join(held)}): pass an empty folder, call "
                          f"Trainer.resume() to continue that run, or pass train.rundir.RunDir({str(path)!r}, "
                          "overwrite=True) to replace it")


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_classes: int,
             autocast: Callable[[], Any] = nullcontext, dist_info: Dist | None = None,
             device: torch.device | str = "cpu") -> dict[str, Any]:
    """Classification metrics of ``model`` over ``batches`` of ``(x, y)``, in eval mode (its mode is restored).

    The sums stay on the batches' device until the last batch, so no batch waits for the one before.

    Returns:
        ``test_loss`` (mean cross-entropy), ``test_acc`` and ``top5_acc`` (%), ``count``, ``nonfinite`` (images
        whose outputs are not all finite: their accuracy means nothing, see :func:`check_finite`), and
        ``per_class_acc`` (%, NaN for a class without test images), summed over all ranks of ``dist_info``.
    """
    dist_info = dist_info or Dist()
    was_training = model.training
    model.eval()
    sums: torch.Tensor | None = None  # [loss, top-1, top-5]
    hits = seen = None  # per class
    try:
        for x, y in batches:
            with autocast():
                logits = model(x).float()
            if sums is None:
                sums = torch.zeros(4, dtype=torch.float64, device=logits.device)
                hits = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
                seen = torch.zeros(num_classes, dtype=torch.float64, device=logits.device)
            top = logits.topk(min(5, logits.shape[1]), dim=1).indices
            right = top[:, 0] == y
            sums += torch.stack([nn.functional.cross_entropy(logits, y, reduction="sum").double(),
                                 right.sum().double(), (top == y[:, None]).any(1).sum().double(),
                                 (~torch.isfinite(logits).all(1)).sum().double()])
            seen.index_add_(0, y, torch.ones_like(y, dtype=torch.float64))  # no bincount: it syncs on a GPU
            hits.index_add_(0, y, right.double())
    finally:
        model.train(was_training)
    local = [0.0] * (4 + 2 * num_classes) if sums is None else torch.cat([sums, hits, seen]).tolist()
    totals = dist_info.sum(local, torch.device(device))
    loss_sum, correct, correct5, nonfinite = totals[:4]
    hits, seen = totals[4:4 + num_classes], totals[4 + num_classes:]
    count = int(sum(seen))
    return {"test_loss": loss_sum / max(count, 1), "test_acc": 100.0 * correct / max(count, 1),
            "top5_acc": 100.0 * correct5 / max(count, 1), "count": count, "nonfinite": int(nonfinite),
            "per_class_acc": [100.0 * h / n if n else float("nan") for h, n in zip(hits, seen)]}


def check_finite(metrics: dict[str, Any], what: str) -> dict[str, Any]:
    """``metrics`` (of :func:`evaluate`), or a one-line :class:`TrainingDiverged` when some outputs were not finite:
    an accuracy over NaN logits is chance, not a result."""
    if metrics.get("nonfinite"):
        raise TrainingDiverged(f"{what} gives outputs that are not finite (NaN or inf) for {metrics['nonfinite']:,} of "
                               f"{metrics['count']:,} test images, so its accuracy means nothing; its weights or "
                               "BatchNorm statistics overflowed (a teacher with huge logits, a too high --lr)")
    return metrics
