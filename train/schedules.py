"""Schedules that plug into the training loop from outside, as callbacks (:class:`train.callbacks.Callback`).

A schedule's ``on_step(epoch, step, steps)`` runs before every optimizer step; what it returns is logged (the
value after the epoch's last step). Its value is a function of the step, so a resumed run continues it exactly.
"""
from __future__ import annotations

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
