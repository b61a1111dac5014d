"""Deployment export: fused safetensors + config, TorchScript and ONNX, each verified before it is written.

Every artefact is first written into a temporary folder beside ``out_dir`` and checked against the unfused
model on random input; only when all checks pass is ``out_dir`` created (if needed) and the files moved into
it. A failed check leaves ``out_dir`` as it was, or absent.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from models.checkpoint import load_checkpoint, save_checkpoint
from models.errors import CheckpointError, ReparamError, brief
from models.identity import input_size as model_input_size, set_preprocess

from .fusion import flatten, fuse_model, max_abs_diff

#: The files an export writes into its folder: one model's set, replaced together.
DEPLOY_FILES = ("model.safetensors", "model.json", "model.ts", "model.pt2", "model.onnx")


@dataclass
class ExportReport:
    """Files written and the max |deploy - unfused| logit difference of each on the same random input."""

    out_dir: Path
    files: dict[str, Path] = field(default_factory=dict)
    max_diff: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"wrote {self.out_dir}"]
        for k, p in self.files.items():
            d = self.max_diff.get(k)
            lines.append(f"  {k:12s} {p.name:28s}" + (f" max|diff| {d:.2e}" if d is not None else ""))
        return "\n".join(lines)


def _check(kind: str, diff: float, atol: float) -> float:
    if not diff <= atol:  # also catches NaN
        raise ReparamError(f"{kind} export differs from the unfused model by {diff:.3g} > {atol:g}; "
                           "nothing was written")
    return diff


def export_deploy(
    model: nn.Module,
    out_dir: str | Path,
    input_size: tuple[int, int, int] | None = None,
    onnx: bool = True,
    torchscript: bool = True,
    atol: float = 1e-4,
    metadata: dict | None = None,
    pt2: bool = True,
) -> ExportReport:
    """Fuse ``model`` and write ``model.safetensors``/``model.json``, ``model.pt2`` (``torch.export``),
    ``model.ts`` (TorchScript, deprecated upstream) and ``model.onnx``, each checked against the unfused model.

    Args:
        model: the trained (unfused) student; any model :func:`fuse_model` accepts.
        out_dir: destination folder (created). Its deploy files (:data:`DEPLOY_FILES`) are replaced as one set: a
            file of an earlier export that this one does not write (``onnx=False``, say) is removed, so that the
            folder never holds two models; other files stay.
        input_size: ``(C, H, W)`` of the random check input (default: the model's recorded ``input_size``, else
            its config's ``image_size``, else ``(3, 32, 32)``).
        onnx: also write ONNX (checked with onnxruntime when it is installed).
        torchscript: also write a traced TorchScript file.
        atol: the largest logit difference accepted, in float32, relative to the largest logit magnitude of the
            check (at least 1): random input can give an untrained or trimmed model huge logits.
        metadata: stored in the checkpoint's JSON (JSON data only).
        pt2: also write a ``torch.export`` program with a dynamic batch (``torch.export.load(path).module()``).

    ``model.ts`` and ``model.pt2`` are made from the fused model's flat graph (:func:`flat_or_tree`), as fast at
    batch 1 as the same network written by hand (``results/deploy-speed.md``).
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"export_deploy needs a torch.nn.Module, got {type(model).__name__}")
    if input_size is None:  # the recorded preprocessing's, else the size the model was built for, else CIFAR's
        input_size = model_input_size(model)
    if len(input_size) != 3 or not all(isinstance(n, int) and n > 0 for n in input_size):
        raise ReparamError(f"input_size must be (channels, height, width), positive whole numbers; got {input_size!r}")
    try:
        json.dumps(metadata)
    except (TypeError, ValueError) as e:
        raise ReparamError(f"export metadata must be JSON data (numbers, strings, lists, dicts): {e}") from None
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.absolute().parents) if p.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out_dir else f"lies inside the file {existing}"
        raise ReparamError(f"{out_dir} {where}; pass a folder for the deploy files")
    try:
        return _export(model, out_dir, tuple(input_size), onnx, torchscript, pt2, atol, metadata)
    except OSError as e:  # a read-only or full disk: the staged files are gone, the folder as it was
        reason = " ".join((e.strerror or str(e)).split())
        raise ReparamError(f"cannot write the deploy files to {out_dir} ({reason}); choose a writable folder with "
                           "free space") from None


def _export(model: nn.Module, out_dir: Path, input_size: tuple[int, int, int], onnx: bool, torchscript: bool,
            pt2: bool, atol: float, metadata: dict | None) -> ExportReport:
    model = copy.deepcopy(model).float().cpu().eval()
    fused = fuse_model(model)
    recorded = getattr(fused, "preprocess", None)
    if recorded and recorded.get("input_size") and list(recorded["input_size"]) != list(input_size):
        # the programs take this size only: the record says so, and evaluate and compare feed them that size
        set_preprocess(fused, {**recorded, "input_size": list(input_size)})
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        try:
            reference = model(x)
        except RuntimeError as e:
            raise ReparamError(f"the model does not take input of size {tuple(input_size)} "
                               f"({brief(e, typed=False)}); pass the input size it was trained at") from None
    report = ExportReport(out_dir)
    staging_parent = out_dir.absolute().parent
    staging_parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.export-", dir=staging_parent) as tmp_dir:
        tmp = Path(tmp_dir)
        atol = atol * max(1.0, reference.abs().max().item())
        report.max_diff["fused"] = _check("fused", max_abs_diff(model, fused, x), atol)
        try:  # what a user loads back: the config must rebuild the model, its weights load strictly
            staged = {"safetensors": save_checkpoint(fused, tmp / "model.safetensors", metadata)}
            staged["config"] = tmp / "model.json"
            reloaded = load_checkpoint(staged["safetensors"]).float().eval()
        except CheckpointError as e:
            raise ReparamError(f"the fused model's checkpoint does not load back ({e}); nothing was written") from None
        with torch.no_grad():
            report.max_diff["safetensors"] = _check("safetensors", (reloaded(x) - reference).abs().max().item(), atol)
        if torchscript:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # TorchScript's deprecation notice
                traced = trace(fused, x)
                torch.jit.save(traced, str(tmp / "model.ts"))
                loaded = torch.jit.load(str(tmp / "model.ts"))
                report.max_diff["torchscript"] = _check("TorchScript", (loaded(x) - reference).abs().max().item(), atol)
            staged["torchscript"] = tmp / "model.ts"
        program = None
        if pt2:
            try:
                program = export_program(fused, x)
            except Exception as e:  # an architecture torch.export cannot capture: the other forms still serve
                warnings.warn(f"model.pt2 not written: torch.export cannot capture {type(fused).__name__} ({brief(e)})",
                              stacklevel=3)
        if program is not None:
            torch.export.save(program, str(tmp / "model.pt2"))
            loaded = torch.export.load(str(tmp / "model.pt2")).module()
            with torch.no_grad():
                report.max_diff["pt2"] = _check("torch.export", (loaded(x) - reference).abs().max().item(), atol)
            staged["pt2"] = tmp / "model.pt2"
        if onnx:
            staged["onnx"] = tmp / "model.onnx"
            diff = _export_onnx(fused, x, reference, staged["onnx"])
            if diff is not None:
                report.max_diff["onnx"] = _check("ONNX", diff, atol)
        out_dir.mkdir(parents=True, exist_ok=True)
        for kind, path in staged.items():
            os.replace(path, out_dir / path.name)
            report.files[kind] = out_dir / path.name
        for name in set(DEPLOY_FILES) - {path.name for path in staged.values()}:
            (out_dir / name).unlink(missing_ok=True)  # an earlier export's: it would not match this model
    return report


def flat_or_tree(model: nn.Module) -> nn.Module:
    """The form the deploy programs (``model.ts``, ``model.pt2``) are made from: :func:`~reparam.fusion.flatten` of
    ``model`` (one call and one attribute lookup per conv: no wrapper or container calls, which TorchScript keeps
    and ``torch.export``'s program looks up level by level, at a cost that shows at batch 1), or ``model`` itself
    when ``torch.fx`` cannot trace it. The programs' parameter names are then the flat graph's (``layer1_0_conv1_conv
    .weight`` for the checkpoint's ``layer1.0.conv1.conv.weight``)."""
    try:
        return flatten(model)
    except ReparamError:
        return model


def trace(model: nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``model`` traced to TorchScript as export writes ``model.ts`` (from :func:`flat_or_tree`)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice
        return torch.jit.trace(flat_or_tree(model), example)


def export_program(model: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """``model`` captured by ``torch.export`` (from :func:`flat_or_tree`) with a dynamic batch, as export writes
    ``model.pt2``."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    return torch.export.export(flat_or_tree(model), (example,), dynamic_shapes=({0: batch},))


def _export_onnx(fused: nn.Module, x: torch.Tensor, reference: torch.Tensor, path: Path) -> float | None:
    """Write ONNX with a dynamic batch axis; return the onnxruntime difference, or None without onnxruntime."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ReparamError("ONNX export needs the onnx package: pip install onnx onnxruntime, "
                           "or pass --no-onnx") from None
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(fused, (x,), str(path), input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": x.numpy()})[0]
    return float((torch.from_numpy(out) - reference).abs().max())
