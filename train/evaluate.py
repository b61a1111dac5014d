"""``python -m train.evaluate FILE --dataset D --data-dir DIR``: test accuracy of a checkpoint or a deploy file.

FILE is a ``.safetensors`` checkpoint (or a run directory), or a deploy file: ``model.pt2`` (torch.export),
``model.ts`` (TorchScript) or ``model.onnx`` (onnxruntime), read with the ``model.json`` beside it.

Prints top-1 and top-5 accuracy, mean cross-entropy, per-class accuracy, the number of test images and the
dataset's label (e.g. "CIFAR-10 (JPEG q75 copy)"). The inputs are prepared as the checkpoint says (its
``preprocess`` record: mean, std, input size); a checkpoint without one (saved before 0.2) gets the dataset's
mean and std, which is what it was trained with. ``--json`` prints one JSON object instead, for scripts.

Without ``--data-dir`` the data is the folder the checkpoint records; a recorded folder that no longer exists is
refused (as stage 2 and trim refuse a teacher's), not replaced by ``$REDUCENET_DATA`` or ``./data``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from contextlib import nullcontext

import torch

from models import load_any
from models.checkpoint import resolve
from models.deployed import form_of
from models.errors import ConfigError, cli_errors

from .assemble import check_classes, load_data, recorded_data_dir
from .cli import DescribedHelpFormatter
from .data import DATASETS
from .engine import Dist, check_finite, evaluate, init_distributed
from .provenance import hardware, native_bf16
from .rundir import unfinished_run
from .preprocess import normalization
from .spec import DataSpec


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__,
                                formatter_class=DescribedHelpFormatter)
    p.add_argument("checkpoint", help=".safetensors checkpoint, its .json, a run directory (uses last), or a deploy "
                                      "file: model.pt2, model.ts (programs: only ones you trust), model.onnx")
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the checkpoint's, else cifar10")
    p.add_argument("--data-dir", default=None,
                   help="data root; default: the checkpoint's (refused if it no longer exists), else $REDUCENET_DATA")
    p.add_argument("--subset", type=int, default=None,
                   help="test on the test images a run with this --subset (and --seed) was measured on")
    p.add_argument("--seed", type=int, default=0, help="the --subset draw's seed")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--loader", choices=("auto", "memory", "stream"), default="auto",
                   help="memory: decode the test set once; stream: decode image folders in worker processes; auto: "
                        "stream image folders too big for memory, as training does")
    p.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="decoding processes of the streaming loader")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="bf16 autocast (off by default: evaluation reports the float32 model)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(args: argparse.Namespace) -> dict:
    """Evaluate ``args.checkpoint``; returns the report printed by :func:`main`."""
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size} must be at least 1")
    _, device = init_distributed(args.device)
    if args.amp and not native_bf16(device):
        raise ConfigError(f"--amp: {device} has no native bf16; drop --amp")
    model = load_any(args.checkpoint, map_location=device)
    unfinished = unfinished_run(resolve(args.checkpoint)) if form_of(args.checkpoint) == "checkpoint" else None
    if unfinished:  # evaluated all the same: watching a run's checkpoints is what evaluate is for, too
        state, run_dir, epoch = unfinished
        print(f"note: the run {run_dir} {'is still training' if state == 'training' else 'did not finish'}: this is "
              f"its checkpoint of epoch {epoch}", file=sys.stderr, flush=True)
    meta = model.checkpoint_metadata
    dataset = args.dataset or meta.get("dataset", "cifar10")
    data_dir = recorded_data_dir(args.data_dir, meta, str(args.checkpoint))
    # the size the model takes, whatever the dataset (a model trained on 40 px images, evaluated on CIFAR-10)
    size = (model.preprocess or {}).get("input_size", [3, None, None])[-1]
    spec = DataSpec(dataset=dataset, data_dir=data_dir, image_size=size,
                    loader=args.loader, workers=args.workers, batch_size=1,  # no training batch is drawn
                    subset=args.subset)
    spec.validate()
    data, _ = load_data(spec, args.seed, False, Dist(), device, eval_batch_size=args.batch_size)
    info = data.info
    check_classes(model, info, "the checkpoint", "pass the dataset it was trained on with --dataset/--data-dir")
    preprocess = model.preprocess or normalization("dataset", info)
    data.normalize(preprocess)
    print(f"evaluating {args.checkpoint} ({form_of(args.checkpoint)}, {model.config.get('model')}) on {info.label}: "
          f"{len(data.test.labels):,} test images at {info.image_size} px, {data.test.kind} loader, {device}",
          file=sys.stderr if getattr(args, "json", False) else sys.stdout, flush=True)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp else nullcontext
    metrics = check_finite(evaluate(model, data.test, info.num_classes, autocast, device=device),
                           str(args.checkpoint))
    return {"checkpoint": str(args.checkpoint), "form": form_of(args.checkpoint), "model": model.config,
            "data": info.label, "dataset": info.name, "data_source": info.source, "preprocess": preprocess,
            "classes": info.classes,
            "hardware": hardware(device), **metrics}


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    report = run(args)
    if args.json:  # a class without test images has accuracy NaN, which JSON writes as null
        per_class = [None if math.isnan(a) else a for a in report["per_class_acc"]]
        print(json.dumps({**report, "per_class_acc": per_class}))
        return report
    cfg = report["model"]
    kind = f" (expansion {cfg['expansion']})" if "expansion" in cfg else ""
    print(f"{report['checkpoint']}: {cfg['model']}{kind}, {report['form']}")
    print(f"data: {report['data']}, {report['count']} test images")
    print(f"top-1 {report['test_acc']:.2f}%  top-5 {report['top5_acc']:.2f}%  loss {report['test_loss']:.4f}")
    print("per class: " + ", ".join(f"{c} {'no test images' if math.isnan(a) else f'{a:.1f}%'}"
                                    for c, a in zip(report["classes"], report["per_class_acc"])))
    return report


if __name__ == "__main__":
    main()
