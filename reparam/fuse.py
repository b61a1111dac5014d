"""``python -m reparam.fuse CHECKPOINT --out DIR``: fuse a trained student and export it for deployment.

Writes ``model.safetensors`` + ``model.json`` (the plain deploy form, loadable with
``models.load_checkpoint``), ``model.ts`` (TorchScript) and ``model.onnx``; each is checked against the
unfused checkpoint on random input before anything is written.
"""
from __future__ import annotations

import argparse

from models.checkpoint import load_checkpoint
from models.errors import cli_errors

from .export import export_deploy


@cli_errors
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m reparam.fuse", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a student .safetensors checkpoint or a run directory (uses last)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--image-size", type=int, default=32, help="input height/width of the check (default 32)")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX file")
    p.add_argument("--no-torchscript", action="store_true", help="skip the TorchScript file")
    args = p.parse_args(argv)
    model = load_checkpoint(args.checkpoint)
    report = export_deploy(model, args.out, (3, args.image_size, args.image_size), onnx=not args.no_onnx,
                           torchscript=not args.no_torchscript,
                           metadata={"fused_from": str(args.checkpoint), **model.checkpoint_metadata})
    print(report)


if __name__ == "__main__":
    main()
