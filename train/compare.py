"""``python -m train.compare FILE FILE ... [--batch-size 64]``: models side by side, before and after.

Each FILE is a checkpoint (``.safetensors`` or a run directory) or a deploy file (``model.pt2``, ``model.ts``,
``model.onnx``, read with its ``model.json``), each given once. Prints, per file: its form, parameters and MACs (of
the model its record describes), the size of the file holding its weights (a record's ``.safetensors``), and the
median latency at batch 1 and at ``--batch-size``, all timed side by side in interleaved rounds
(:func:`train.timing.measure`) at the input size each record gives, with each latency's ratio to the first file's.
``--json`` prints the rows for scripts, one JSON object a line (what it times goes to stderr).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TextIO

import torch

from models import complexity, load_any, model_from_config
from models.checkpoint import resolve, user_path
from models.deployed import form_of
from models.errors import ConfigError, cli_errors
from models.identity import card_of

from .cli import DescribedHelpFormatter
from .timing import measure


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__,
                                formatter_class=DescribedHelpFormatter)
    p.add_argument("files", nargs="+",
                   help="checkpoints, run directories or deploy files (.pt2 and .ts are programs: only ones you trust)")
    p.add_argument("--batch-size", type=int, default=64, help="the second batch timed (the first is 1)")
    p.add_argument("--repeats", type=int, default=30, help="timed rounds (their median)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of PyTorch and onnxruntime (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object per file")
    return p


def weights_file(name: str) -> Path:
    """The file that holds ``name``'s weights: a checkpoint's ``.safetensors`` (of a run directory, its
    ``last.safetensors``; of a ``.json`` record, its twin), or the deploy file itself."""
    return resolve(name) if form_of(user_path(name)) == "checkpoint" else user_path(name)


def compare(files: list[str], batch_size: int = 64, repeats: int = 30, log: TextIO | None = None) -> list[dict]:
    """The rows :func:`main` prints (see the module docstring); once every file is loaded, says on ``log`` what it
    times.

    Raises:
        ConfigError: a file given twice, by the same path or another (a run directory and its
            ``last.safetensors``, a ``.json`` record and its ``.safetensors``, a link).
    """
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be 1 or more")
    models, stats, seen = {}, {}, {}
    for name in files:
        model, where = load_any(name), weights_file(name)
        stat = where.stat()
        first = seen.get((stat.st_dev, stat.st_ino))
        if first is not None:
            same = f"{name} is given twice" if first == name else f"{first} and {name} are the same file"
            raise ConfigError(f"{same} ({where}); pass each file once")
        seen[stat.st_dev, stat.st_ino], models[name], stats[name] = name, model, stat
    names = list(models)
    if log is not None:
        print(f"timing {len(names)} file(s) side by side on {torch.get_num_threads()} CPU thread(s), "
              f"{repeats} rounds at batch 1 ...", file=log, flush=True)
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
                     "bytes": stats[name].st_size, "image_size": size})
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
    rows = compare(args.files, args.batch_size, args.repeats, log=sys.stderr if args.json else sys.stdout)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return rows
    n = args.batch_size
    print(f"{'file':<48} {'form':<12} {'params':>11} {'MACs (M)':>9} {'MB':>7} {'ms b1':>8} {'x first':>7} "
          f"{f'ms b{n}':>9} {'x first':>7} {'img/s':>8}")
    for r in rows:
        print(f"{_fit(r['file'], 48):<48} {r['form']:<12} {r['params']:>11,} {r['macs'] / 1e6:>9.2f} "
              f"{r['bytes'] / 2**20:>7.2f} {r['ms_b1']:>8.3f} {r['ratio_b1']:>7.2f} {r['ms_bn']:>9.2f} "
              f"{r['ratio_bn']:>7.2f} {r['images_per_s']:>8.0f}")
    return rows


def _fit(path: str, width: int) -> str:
    """``path`` shortened to ``width`` characters from the left, marked with an ellipsis where it was cut."""
    return path if len(path) <= width else "…" + path[-(width - 1):]


if __name__ == "__main__":
    main()
