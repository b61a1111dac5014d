"""Timing models side by side: the one latency measurement of the benchmarks, the tables and ``trim --by latency``."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn


@torch.inference_mode()
def measure(models: dict[str, Callable[[torch.Tensor], Any]], batch: int, device: torch.device, repeats: int,
            warmup: int = 10, image_size: int = 32) -> dict[str, float]:
    """Median seconds of one forward pass at ``batch`` for each model (any callable).

    The models are timed side by side: each round runs every model once, in turn, so that drift in the
    machine's speed (other processes, clock changes) affects them alike. ``warmup`` rounds are not timed.
    """
    models = {k: m.to(device).eval() if isinstance(m, nn.Module) else m for k, m in models.items()}
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + repeats):
        for k, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def latency(model: nn.Module, input_size: tuple[int, ...], device: torch.device | str = "cpu",
            repeats: int = 30) -> float:
    """Median seconds of one forward pass of ``model`` at ``input_size`` (batch included) on ``device``."""
    return measure({"m": model}, input_size[0], torch.device(device), repeats, image_size=input_size[-1])["m"]
