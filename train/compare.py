"""``python -m train.compare FILE FILE ... [--batch-size 64]``: models side by side, before and after.

Each FILE is a checkpoint (``.safetensors`` or a run directory) or a deploy file (``model.pt2``, ``model.ts``,
``model.onnx``, read with its ``model.json``). Prints, per file: its form, parameters and MACs (of the model its
record describes), file size, and the median latency at batch 1 and at ``--batch-size``, all timed side by side in
interleaved rounds (:func:`train.timing.measure`) at the input size each record gives, with each latency's ratio
to the first file's. ``--json`` prints the rows for scripts.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from models import complexity, load_any, model_from_config
from models.deployed import form_of
from models.errors import ConfigError, cli_errors
from models.identity import card_of

from .timing import measure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", help="checkpoints, run directories or deploy files")
    p.add_argument("--batch-size", type=int, default=64, help="the second batch timed (the first is 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds (their median)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    return p


def _size(path: Path) -> int:
    files = [path / "last.safetensors"] if path.is_dir() else [path]
    return sum(os.path.getsize(f) for f in files if f.is_file())


def compare(files: list[str], batch_size: int = 64, repeats: int = 30) -> list[dict]:
    """The rows :func:`main` prints (see the module docstring)."""
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be 1 or more")
    names = list(dict.fromkeys(files))
    models = {name: load_any(name) for name in names}
    sizes = {}
    rows = []
    for name, model in models.items():
        card = card_of(model)
        size = int(((card.preprocess if card else None) or {}).get("input_size", [3, 32, 32])[-1])
        sizes[name] = size
        # params and MACs of the architecture the record describes (an ONNX session has no modules to count)
        plain = model if form_of(name) == "checkpoint" else model_from_config(card.config)
        cost = complexity(plain.eval(), (1, 3, size, size))
        rows.append({"file": name, "form": form_of(name), "params": cost["params"], "macs": cost["macs"],
                     "bytes": _size(Path(name)), "image_size": size})
    device = torch.device("cpu")
    b1 = measure(models, 1, device, repeats, image_size=sizes)
    bn = measure(models, batch_size, device, max(3, repeats // 3), warmup=3, image_size=sizes)
    first = names[0]
    for row in rows:
        f = row["file"]
        row.update(ms_b1=b1[f] * 1e3, ms_bn=bn[f] * 1e3, batch_size=batch_size, ratio_b1=b1[f] / b1[first],
                   ratio_bn=bn[f] / bn[first], images_per_s=batch_size / bn[f])
    return rows


@cli_errors
def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads} is not valid: pass 1 or more")
        torch.set_num_threads(args.threads)
    print(f"timing {len(args.files)} file(s) side by side on {torch.get_num_threads()} CPU thread(s), "
          f"{args.repeats} rounds at batch 1 ...", flush=True)
    rows = compare(args.files, args.batch_size, args.repeats)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return rows
    n = args.batch_size
    print(f"{'file':<48} {'form':<12} {'params':>11} {'MACs (M)':>9} {'MB':>7} {'ms b1':>8} {'x first':>7} "
          f"{f'ms b{n}':>9} {'x first':>7} {'img/s':>8}")
    for r in rows:
        print(f"{r['file'][-48:]:<48} {r['form']:<12} {r['params']:>11,} {r['macs'] / 1e6:>9.2f} "
              f"{r['bytes'] / 2**20:>7.2f} {r['ms_b1']:>8.3f} {r['ratio_b1']:>7.2f} {r['ms_bn']:>9.2f} "
              f"{r['ratio_bn']:>7.2f} {r['images_per_s']:>8.0f}")
    return rows


if __name__ == "__main__":
    main()
