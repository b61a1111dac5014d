"""Schedules that plug into the training loop from outside: each is called before every optimizer step.

A schedule has ``on_step(epoch, step, steps) -> dict`` (0-based epoch and step, ``steps`` per epoch); what it
returns is logged (the value after the epoch's last step).
"""
from __future__ import annotations

import torch.nn as nn

from models import set_lambda


class LambdaSchedule:
    """VanillaNet's anneal: every ``LambdaReLU`` of ``model`` goes linearly from 0 (ReLU) to 1 (identity) over the
    first ``epochs`` epochs, per step, and stays at 1, so the LoRA branches end linear and fusable."""

    def __init__(self, model: nn.Module, epochs: float) -> None:
        self.model, self.epochs = model, float(epochs)

    def on_step(self, epoch: int, step: int, steps: int) -> dict[str, float]:
        lam = min(1.0, (epoch + (step + 1) / steps) / self.epochs)
        set_lambda(self.model, lam)
        return {"lambda": lam}
