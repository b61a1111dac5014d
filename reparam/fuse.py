"""``python -m reparam.fuse CHECKPOINT --out DIR``: fuse a trained student and export it for deployment.

Writes ``model.safetensors`` + ``model.json`` (the plain deploy form, loadable with
``models.load_checkpoint``), ``model.pt2`` (torch.export), ``model.ts`` (TorchScript) and ``model.onnx``; each is
checked against the unfused checkpoint on random input before anything is written. A folder that already holds
files is replaced only with ``--overwrite`` (its deploy files, as one set; other files stay).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from models.checkpoint import load_checkpoint, user_path
from models.errors import ReparamError, cli_errors

from .export import DEPLOY_FILES, export_deploy


@cli_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reparam.fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a student .safetensors checkpoint or a run directory (uses last)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the deploy files of an --out that already holds files")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX file")
    p.add_argument("--no-torchscript", action="store_true", help="skip the TorchScript file")
    p.add_argument("--no-pt2", action="store_true", help="skip the torch.export file (model.pt2)")
    p.add_argument("--image-size", type=int, default=None,
                   help="input height/width the programs (.pt2, .ts, .onnx) take, and model.json records "
                        "(default: the checkpoint's input size, else 32)")
    args = p.parse_args(argv)
    if args.image_size is not None and args.image_size < 1:
        raise ReparamError(f"--image-size {args.image_size} is not valid: pass the model's input size in pixels")
    out = user_path(args.out)
    check_out(out, args.overwrite)
    model = load_checkpoint(args.checkpoint)
    size = (3, args.image_size, args.image_size) if args.image_size else None  # None: the model's own (H, W)
    report = export_deploy(model, out, size, onnx=not args.no_onnx,
                           torchscript=not args.no_torchscript, pt2=not args.no_pt2,
                           metadata={"fused_from": str(args.checkpoint), **model.checkpoint_metadata})
    print(report)


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a file or a training run, or that holds files when ``overwrite`` is not set."""
    if out.exists() and not out.is_dir():
        raise ReparamError(f"--out {out} is a file; pass a folder for the deploy files")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if "args.json" in held:
        raise ReparamError(f"--out {out} is a training run; pass a folder of its own for the deploy files "
                           f"(a student's run keeps them in {out / 'deploy'})")
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ReparamError(f"--out {out} already holds files ({shown}); pass --overwrite to replace its deploy files "
                           f"({', '.join(DEPLOY_FILES)}; other files stay), or another --out")


if __name__ == "__main__":
    main()
