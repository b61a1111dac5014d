"""``python -m train.stage1 -m reduce56``: train a ReduceNet teacher (or, with --expansion 0, a scratch student).

Defaults (``--recipe ours``): SGD, momentum 0.9, Nesterov, lr 0.1, weight decay 1e-4, batch 128, cosine
schedule per step over 200 epochs, inputs normalised by the dataset's mean and std, Kaiming init.
``--recipe reducenet-paper`` is the original ReduceNet's main.py (no input normalisation, PyTorch's default
init, cosine per epoch; see train/recipes.py). ``--expansion 0`` trains the student from scratch: the honest
baseline for stage 2, to be trained for stage1 + stage2 epochs.
"""
from __future__ import annotations

import torch.nn as nn

from models import create_model
from models.errors import cli_errors

from .cli import (common_parser, data_metadata, finish, load_data, make_run_dir, parse_args, setup, size_line,
                  train_config)
from .distill import DistillLoss
from .engine import Trainer
from .preprocess import normalization


def build_parser():
    p = common_parser("python -m train.stage1", __doc__, epochs=200, lr=0.1, warmup="0")
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", default="reduce56", help="registered model (python -m models lists them)")
    m.add_argument("--expansion", type=int, default=1, help="branch (b) width factor; 0 trains the student")
    m.add_argument("--width", type=float, default=1, help="channel multiplier (ReduceNet: 1, 2, 4)")
    m.add_argument("--init", choices=("kaiming", "torch"), default=None,
                   help="conv init: the model's own (Kaiming normal, fan-out) or PyTorch's default "
                        "(default: the recipe's)")
    return p


def torch_default_init(model: nn.Module) -> nn.Module:
    """Re-initialise every conv with PyTorch's default (``reset_parameters``), as the original ReduceNet left them."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), "stage1", argv)
    args.dataset = args.dataset or "cifar10"
    info, device = setup(args)
    role = "teacher" if args.expansion else "scratch"
    data = load_data(args, info, device)  # before the run directory: bad data must leave --out untouched
    model = create_model(args.model, num_classes=data.info.num_classes, width=args.width, expansion=args.expansion)
    if args.init == "torch":
        torch_default_init(model)
    model.preprocess = normalization(args.normalize, data.info)
    data.normalize(model.preprocess)
    with make_run_dir(args, info, f"{args.model}-{role}-e{args.expansion}-w{args.width:g}-s{args.seed}",
                      "train.stage1", argv) as run_dir:
        metadata = {"stage": 1, "role": role, **data_metadata(data, args.data_dir)}
        cfg = train_config(args, 0.0, stage=1, recipe=args.recipe)
        trainer = Trainer(model, data, cfg, run_dir, DistillLoss("none"), dist_info=info, device=device,
                          metadata=metadata)
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
        if info.is_main:
            print(size_line(f"{role} {args.model} (e{args.expansion})",
                            {"params": summary["params"], "macs": summary["macs"]}, summary["last_test_acc"]))
            print(f"data: {data.info.label}; best {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                  f"run: {run_dir}")
    finish(info)
    return summary


if __name__ == "__main__":
    main()
