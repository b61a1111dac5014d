"""Timing models side by side: the one latency measurement of the benchmarks, the tables and ``trim --by latency``.

On Linux, glibc's ``malloc`` hands every block above its mmap threshold back to the kernel when it is freed, so
each forward pass at a large batch page-faults its activations in again; how much depends on the order in which
a model frees its tensors, not on its arithmetic. Measured on 2 EPYC threads (reduce20, batch 128): forms with
the same ops were 1.16x (the fused module tree) and 1.28x (its torch.fx flattening) the time of a hand-written
net, and all three ran 1.3-1.6x faster, within 2% of one another, once freed memory was kept.
:func:`measure` therefore keeps it (:func:`keep_freed_memory`), as jemalloc or tcmalloc do; deploy processes get
the same with ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in their environment.
"""
from __future__ import annotations

import ctypes
import functools
import statistics
import time
from typing import Any, Callable

import torch
import torch.nn as nn


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` keep freed blocks of up to 32 MiB for reuse instead of returning them to the kernel
    (``mallopt``: mmap threshold 32 MiB, its largest; trim threshold 2 GiB), for this process; returns whether it
    applied (False off glibc). Peak memory is unchanged; what was freed stays mapped for the next forward pass."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


@torch.inference_mode()
def time_rounds(models: dict[str, Callable[[torch.Tensor], Any]], batch: int, device: torch.device, repeats: int,
                warmup: int = 10, image_size: int | dict[str, int] = 32) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` forward passes at ``batch`` for each model (any callable), round by round.

    The models are timed side by side: each round runs every model once, so that drift in the machine's speed
    (other processes, clock changes) affects them alike, and each round starts one model further on, so that
    none always runs right after the same other one. ``warmup`` rounds are not timed. Freed memory is kept
    (:func:`keep_freed_memory`), so that no form pays for page faults that another escapes. ``image_size``: one
    for all, or each model's (by name). Entry ``i`` of every list comes from round ``i``: see :func:`paired_ratio`.
    """
    keep_freed_memory()
    models = {k: m.to(device).eval() if isinstance(m, nn.Module) else m for k, m in models.items()}
    sizes = image_size if isinstance(image_size, dict) else {k: image_size for k in models}
    inputs = {k: torch.randn(batch, 3, sizes[k], sizes[k], device=device) for k in models}
    names = list(models)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + repeats):
        for k in names[i % len(names):] + names[:i % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            models[k](inputs[k])
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return times


def measure(models: dict[str, Callable[[torch.Tensor], Any]], batch: int, device: torch.device, repeats: int,
            warmup: int = 10, image_size: int | dict[str, int] = 32) -> dict[str, float]:
    """Median seconds of one forward pass at ``batch`` for each model, timed side by side (:func:`time_rounds`)."""
    return {k: statistics.median(v) for k, v in time_rounds(models, batch, device, repeats, warmup, image_size).items()}


def paired_ratio(a: list[float], b: list[float]) -> float:
    """The median over rounds of ``a[i] / b[i]``: a ratio of two models timed in the same rounds of
    :func:`time_rounds`, each round's pair seeing the same machine state (steadier than a ratio of medians when
    the machine's speed drifts during the measurement)."""
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def latency(model: nn.Module, input_size: tuple[int, ...], device: torch.device | str = "cpu",
            repeats: int = 30) -> float:
    """Median seconds of one forward pass of ``model`` at ``input_size`` (batch included) on ``device``."""
    return measure({"m": model}, input_size[0], torch.device(device), repeats, image_size=input_size[-1])["m"]
