"""Schedules that plug into the training loop from outside, as callbacks (:class:`train.callbacks.Callback`).

A schedule's ``on_step(epoch, step, steps)`` runs before every optimizer step and its ``on_epoch_start`` before
every epoch; what ``on_step`` returns is logged (the value after the epoch's last step). Every value here is a
function of the epoch and step, so a resumed run continues it exactly with no state of its own. The LambdaReLU
anneal is added by the pipeline; the DKD warm-up and the Pyramid's phases by their tasks
(:meth:`train.tasks.Task.callbacks`).
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from models import set_lambda

from .callbacks import Callback


class LambdaSchedule(Callback):
    """VanillaNet's anneal: every ``LambdaReLU`` of ``model`` goes linearly from 0 (ReLU) to 1 (identity) over the
    first ``epochs`` epochs, per step, and stays at 1, so the LoRA branches end linear and fusable."""

    def __init__(self, model: nn.Module, epochs: float) -> None:
        self.model, self.epochs = model, float(epochs)

    def on_step(self, epoch: int, step: int, steps: int) -> dict[str, float]:
        lam = min(1.0, (epoch + (step + 1) / steps) / self.epochs)
        set_lambda(self.model, lam)
        return {"lambda": lam}


class DKDWarmup(Callback):
    """mdistiller's DKD warm-up: before each epoch, the loss learns its epoch, counted from ``offset`` (the epochs
    of an earlier phase), and weights its DKD term ``min((epoch + 1) / warmup_epochs, 1)``
    (:class:`train.distill.DistillLoss`)."""

    def __init__(self, loss: Any, offset: int = 0) -> None:
        self.loss, self.offset = loss, offset

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.loss.set_epoch(epoch - self.offset)


class PyramidPhases(Callback):
    """The Pyramid's two stages per level: the task's hint loss for its first ``hint_epochs`` epochs, then its
    final loss (cross-entropy or KD); the task logs its ``stage``."""

    def __init__(self, task: Any) -> None:
        self.task = task

    def on_epoch_start(self, trainer: Any, epoch: int) -> None:
        self.task.stage = 1 if epoch < self.task.hint_epochs else 2
