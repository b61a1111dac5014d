"""Checkpoints: safetensors weights plus a JSON config that rebuilds the model; atomic writes.

A checkpoint ``NAME.safetensors`` holds the state_dict and, in its metadata, the model config and any
user metadata as JSON. ``NAME.json`` beside it is a human-readable copy. Files are written to a temporary
file in the same folder and moved into place with ``os.replace``, so a crash never leaves a torn file.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ReduceNetError
from .registry import model_from_config

FORMAT = "reducenet-1"


class WriteError(ReduceNetError, OSError):
    """A file could not be written (disk full, read-only folder, ...); the previous file is unchanged."""


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result onto ``path`` atomically; removes the temp file on error.

    An ``OSError`` is raised again as :class:`WriteError` (still an ``OSError``), which the CLIs print as one line.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, ReduceNetError):
            reason = " ".join((e.strerror or str(e)).split())
            raise WriteError(f"cannot write {path} ({reason}); the previous {path.name}, if any, is unchanged: "
                             "free some disk space or choose a writable folder") from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def resolve(path: str | Path, default_name: str = "last") -> Path:
    """The ``.safetensors`` file meant by ``path``: the file, its ``.json`` twin, or a run directory."""
    p = Path(path)
    if p.is_dir():
        p = p / f"{default_name}.safetensors"
    elif p.suffix == ".json":
        p = p.with_suffix(".safetensors")
    if not p.is_file():
        raise CheckpointError(f"no checkpoint at {p}: pass a .safetensors file or a run directory "
                              f"written by train.stage1/stage2")
    return p


def save_checkpoint(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (which needs ``.config``) as ``path`` (.safetensors) plus its ``.json`` config."""
    config = getattr(model, "config", None)
    if not config:
        raise CheckpointError("this model has no .config; build it with models.create_model to save it")
    path = Path(path).with_suffix(".safetensors")
    record = {"format": FORMAT, "config": config, "metadata": metadata or {}}
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata={"reducenet": json.dumps(record)}))
    atomic_write_text(path.with_suffix(".json"), json.dumps(record, indent=2) + "\n")
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    """The ``{"format", "config", "metadata"}`` record of a checkpoint, without loading its tensors."""
    p = resolve(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                              "it may be truncated: use another checkpoint or retrain") from None
    if "reducenet" not in meta:
        raise CheckpointError(f"{p} has no reducenet config in its metadata; save it with "
                              "models.save_checkpoint or load its tensors with safetensors directly")
    try:
        record = json.loads(meta["reducenet"])
    except json.JSONDecodeError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict) or "model" not in record["config"]:
        raise CheckpointError(f"{p} has a malformed reducenet config in its metadata; re-save it with "
                              "models.save_checkpoint")
    return record


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", **overrides: Any) -> nn.Module:
    """Rebuild the model from a checkpoint's config and load its weights strictly."""
    p = resolve(path)
    record = read_record(p)
    try:
        model = model_from_config(record["config"], **overrides)
    except ReduceNetError as e:
        raise CheckpointError(f"{p}: its config cannot be built ({e})") from None
    load_weights(model, p)
    model.checkpoint_metadata = record.get("metadata", {})
    return model.to(map_location)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a checkpoint's weights into an existing ``model``, refusing another architecture."""
    p = resolve(path)
    record = read_record(p)
    mine, theirs = getattr(model, "config", {}), record["config"]
    keys = ("model", "width", "expansion", "num_classes")
    if mine and any(mine.get(k) != theirs.get(k) for k in keys):
        have = ", ".join(f"{k}={theirs.get(k)}" for k in keys)
        want = ", ".join(f"{k}={mine.get(k)}" for k in keys)
        raise CheckpointError(f"{p} holds another architecture ({have}) than this model ({want})")
    try:
        state = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{p} is not a readable safetensors file ({e}); it may be truncated") from None
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # keep the stored precision (e.g. a float64 checkpoint stays float64)
        model.to(dtypes.pop())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{p} does not fit this model ({detail})") from None
    return model
