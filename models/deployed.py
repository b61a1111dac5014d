"""Any file a run writes, loaded as a model that evaluates and times alike: checkpoints and deploy files.

:func:`load_any` takes a ``.safetensors`` checkpoint (or its ``.json``, or a run directory) and the deploy forms
``model.pt2`` (``torch.export``), ``model.ts`` (TorchScript) and ``model.onnx`` (run with onnxruntime). A deploy
file is read with the record written beside it (``model.json``: the model's config, preprocessing, class names
and training metadata), so it is evaluated on the inputs it was trained on and compared with the checkpoint it
came from. ``.pt2`` and ``.ts`` files are programs: load only files you or your runs wrote. A ``.pt2`` that holds
pickled objects (which ``torch.export.load`` would unpickle, running any code they name) is refused; none of this
project's exports holds one.
"""
from __future__ import annotations

import io
import json
import logging
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import load_checkpoint, user_path
from .errors import CheckpointError, brief
from .identity import ModelCard, input_size, set_card

#: The file forms :func:`load_any` reads, by suffix.
FORMS = {".safetensors": "checkpoint", ".json": "checkpoint", ".pt2": "torch.export", ".ts": "TorchScript",
         ".onnx": "ONNX"}


class Deployed(nn.Module):
    """A deploy file's program as a module (``forward(x) -> logits``), with the card of its record."""

    def __init__(self, inner: nn.Module | None, path: Path, form: str, session=None) -> None:
        super().__init__()
        self.inner, self.path, self.form, self.session = inner, path, form, session

    def train(self, mode: bool = True) -> Deployed:
        """A deploy program is always in inference form (torch.export's module refuses ``train()``)."""
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.session is None:
            return self.inner(x)
        name = self.session.get_inputs()[0].name
        out = self.session.run(None, {name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out).to(x.device)


def session_options(threads: int | None = None):
    """onnxruntime ``SessionOptions`` for a session timed in turn with PyTorch in one process (as benchmarks do).

    ``threads`` intra-op threads (default: torch's thread count, so ``torch.set_num_threads`` limits both), and
    no spin-waiting: by default onnxruntime's idle threads spin after each run and take the cores from PyTorch's
    next turn, slowing the PyTorch models timed beside it.
    """
    import onnxruntime as ort  # noqa: PLC0415 (optional)

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def form_of(path: str | Path) -> str:
    """``checkpoint``, ``torch.export``, ``TorchScript`` or ``ONNX`` (a run directory is a checkpoint)."""
    p = Path(path)
    return "checkpoint" if p.is_dir() else FORMS.get(p.suffix, "unknown")


def record_beside(path: Path) -> dict:
    """The record written beside a deploy file (``model.json`` for ``model.onnx``); a one-line error without."""
    twin = path.with_suffix(".json")
    try:
        record = json.loads(twin.read_text())
    except OSError:
        raise CheckpointError(f"{path} has no {twin.name} beside it, so its preprocessing and classes are unknown; "
                              "keep the deploy folder's files together") from None
    except (ValueError, RecursionError):
        raise CheckpointError(f"{twin} is not a JSON record; export the model again") from None
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise CheckpointError(f"{twin} is not a model record (no config); export the model again")
    return record


def _check_pt2_payloads(path: Path) -> None:
    """Refuse a ``.pt2`` that ``torch.export.load`` would unpickle with code execution allowed: weights or constants
    marked ``use_pickle``, custom or opaque objects, or a ``.pt`` blob (sample inputs, a legacy format) that
    ``torch.load(weights_only=True)`` refuses, which torch.export then loads unrestricted. The exports of this
    project hold none of them. A damaged archive is left to ``torch.export.load`` to report."""
    def refuse(member: str, what: str) -> CheckpointError:
        return CheckpointError(f"{path} holds {what} ({member}), which torch.export.load would run as code: refused; "
                               "re-export the model with python -m reparam.fuse, or load it with torch.export.load "
                               "yourself if you trust its author")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        return
    with archive:
        names = archive.namelist()
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:  # zipfile reads a repeated name's last entry, torch's reader its first
            raise refuse(twice, "a file name twice, so what is checked need not be what loads")
        for name in names:
            where = "/" + name
            if "/data/aotinductor/" in where:
                raise refuse(name, "compiled native code (AOTInductor)")
            if ("/data/weights/" in where or "/data/constants/" in where) and name.endswith("_config.json"):
                try:
                    config = json.loads(archive.read(name))["config"]
                    entries = list(config.items())
                except Exception:  # noqa: BLE001 (a config torch would read otherwise: not checked, so refused)
                    raise refuse(name, "a payload list that does not parse") from None
                for fqn, meta in entries:
                    meta = meta if isinstance(meta, dict) else {}
                    if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(("custom_obj_",
                                                                                            "opaque_obj_")):
                        raise refuse(f"{fqn} in {name}", "a pickled object")
            elif name.endswith(".pt"):
                try:
                    torch.load(io.BytesIO(archive.read(name)), weights_only=True)
                except Exception:  # any refusal: torch.export would retry with weights_only=False
                    raise refuse(name, "a pickle that is not plain tensors") from None


def load_any(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The model in ``path``, any form a run writes (see the module docstring), in eval mode, with its card.

    Raises:
        CheckpointError: an unknown suffix, a missing record, or a file its reader cannot read.
    """
    p = user_path(path) if isinstance(path, (str, Path)) else path
    form = form_of(p) if isinstance(p, Path) else "unknown"
    if form == "checkpoint" or not isinstance(p, Path) or p.suffix in (".pth", ".pt"):  # a .pth: resolve's advice
        return load_checkpoint(path, map_location=map_location).eval()
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a checkpoint, a run directory or a deploy file "
                              f"({', '.join(FORMS)})")
    if form == "unknown":
        raise CheckpointError(f"{p}: not a form this reads ({', '.join(FORMS)}, or a run directory)")
    if not p.is_file():
        raise CheckpointError(f"no {form} file at {p}")
    record = record_beside(p)
    try:
        if form == "ONNX":
            import onnxruntime as ort  # noqa: PLC0415 (optional)

            session = ort.InferenceSession(str(p), session_options(), providers=["CPUExecutionProvider"])
            model = Deployed(None, p, form, session)
        elif form == "TorchScript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation notice: it still loads
                model = Deployed(torch.jit.load(str(p), map_location=map_location), p, form)
        else:
            export_log = logging.getLogger("torch.export")  # logs a traceback for a damaged file, then raises
            level = export_log.level
            export_log.setLevel(logging.CRITICAL)
            try:
                _check_pt2_payloads(p)
                model = Deployed(torch.export.load(str(p)).module(), p, form)
            finally:
                export_log.setLevel(level)
    except ImportError:
        raise CheckpointError(f"{p}: reading ONNX needs onnxruntime (pip install onnxruntime)") from None
    except CheckpointError:
        raise
    except Exception as e:  # each reader raises its own kinds for a damaged file
        raise CheckpointError(f"{p} is not a readable {form} file ({brief(e)})") from None
    card = ModelCard.from_config(record["config"], record.get("preprocess"), record.get("metadata"))
    model = set_card(model, card).eval()
    _check_fits_record(model, p)
    return model


def _check_fits_record(model: nn.Module, path: Path) -> None:
    """One forward pass of a blank image at the record's input size: a program that does not take it, or that
    gives another number of classes than the record says, is of another export than the ``model.json`` beside it
    (evaluate failed with the reader's traceback, compare reported the record's model)."""
    size = input_size(model)
    device = next(model.parameters(), torch.empty(0)).device
    redo = "they are of different exports: export the model again with python -m reparam.fuse"
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, *size, device=device))
    except Exception as e:  # each reader raises its own kinds
        raise CheckpointError(f"{path} does not take the {size[-2]}x{size[-1]} px input its record "
                              f"({path.with_suffix('.json').name}) says ({brief(e, 120)}); {redo}") from None
    classes = model.config.get("num_classes")
    if isinstance(classes, int) and out.shape[-1] != classes:
        raise CheckpointError(f"{path} gives {out.shape[-1]} outputs but its record "
                              f"({path.with_suffix('.json').name}) says {classes} classes; {redo}")
