"""Where a result comes from: the code's commit, the hardware, and whether it computes bf16 natively.

Nothing here runs at import: the commit is read on first use (:func:`git_commit`, once per process), which the
training loop does before its first step.
"""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

import torch

#: The project's code, whose uncommitted changes make :func:`git_commit` say ``+dirty``.
CODE_PACKAGES = ("models", "reparam", "train")


def describe_checkout(folder: Path) -> str:
    """The short commit of the git checkout holding ``folder``, with ``+dirty`` when its code has uncommitted
    changes; ``unknown`` outside a checkout. Only :data:`CODE_PACKAGES` and ``pyproject.toml`` count: a results
    table or README rewritten since the last commit changes no run."""
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, check=True, cwd=folder, timeout=10)
        commit = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        code = [f":(top){p}" for p in (*CODE_PACKAGES, "pyproject.toml")]
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no", "--", *code]).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """:func:`describe_checkout` of the code that runs. Read once per process: later edits of the checkout do not
    change the code already loaded."""
    return describe_checkout(Path(__file__).resolve().parent)


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively: a GPU that supports it, or a CPU with AVX-512 BF16 or AMX.

    Without native support, bf16 autocast is emulated and slower than float32, so it is not a default there.
    """
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def hardware(device: torch.device) -> str:
    """A short description of what ran the job, e.g. 'NVIDIA H100 80GB HBM3' or 'CPU x86_64, 2 threads'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    threads = torch.get_num_threads()
    return f"CPU {name}, {threads} thread{'s' if threads != 1 else ''}"
