"""``python -m train.stage1 -m reduce56``: train a ReduceNet teacher, a scratch student, or any classifier.

Defaults (``--recipe ours``): SGD, momentum 0.9, Nesterov, lr 0.1, weight decay 1e-4, batch 128, cosine
schedule per step over 200 epochs, inputs normalised by the dataset's mean and std, Kaiming init.
``--recipe reducenet-paper`` is the original ReduceNet's main.py (no input normalisation, PyTorch's default
init, cosine per epoch; see train/recipes.py). ``--expansion 0`` trains the zoo student from scratch: the honest
baseline for stage 2, to be trained for stage1 + stage2 epochs. ``-m torchvision:NAME`` or ``-m timm:NAME``
trains that classifier (built without downloading anything; ``--weights FILE`` starts from your weights, with
the classifier replaced when its class count differs).
"""
from __future__ import annotations

import torch.nn as nn

from models import create_model
from models.errors import ConfigError, cli_errors
from models.registry import accepts, is_reducible
from models.weights import load_pretrained

from .cli import (common_parser, data_metadata, finish, load_data, make_run_dir, parse_args, setup, size_line,
                  train_config)
from .engine import Trainer
from .preprocess import normalization
from .tasks import Classify


def build_parser():
    p = common_parser("python -m train.stage1", __doc__, epochs=200, lr=0.1, warmup="0")
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", default="reduce56",
                   help="zoo model (python -m models lists them), torchvision:NAME or timm:NAME")
    m.add_argument("--expansion", type=int, default=None,
                   help="zoo: branch (b) width factor, 0 trains the student (default 1: the teacher)")
    m.add_argument("--width", type=float, default=None, help="zoo: channel multiplier (ReduceNet 1, 2, 4; default 1)")
    m.add_argument("--weights", default=None,
                   help="start from these weights (.safetensors, or a .pth state_dict read with weights_only=True)")
    m.add_argument("--init", choices=("kaiming", "torch"), default=None,
                   help="zoo conv init: the model's own (Kaiming normal, fan-out) or PyTorch's default "
                        "(default: the recipe's)")
    return p


def torch_default_init(model: nn.Module) -> nn.Module:
    """Re-initialise every conv with PyTorch's default (``reset_parameters``), as the original ReduceNet left them."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model


def build_model(args, num_classes: int, image_size: int) -> tuple[nn.Module, str]:
    """The model of ``-m`` and its role (teacher, scratch student or model)."""
    if is_reducible(args.model):
        args.expansion = 1 if args.expansion is None else args.expansion
        args.width = 1 if args.width is None else args.width
        model = create_model(args.model, num_classes=num_classes, width=args.width, expansion=args.expansion)
        role = "teacher" if args.expansion else "scratch"
    else:
        given = [o for o, v in (("--expansion", args.expansion), ("--width", args.width)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} belongs to ReduceNet's families; {args.model} takes neither")
        sized = {"image_size": image_size} if accepts(args.model, "image_size") else {}
        model, role = create_model(args.model, num_classes=num_classes, **sized), "model"
    if args.init == "torch":
        torch_default_init(model)
    if args.weights:
        load_pretrained(model, args.weights)
    return model, role


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), "stage1", argv)
    args.dataset = args.dataset or "cifar10"
    info, device = setup(args)
    data = load_data(args, info, device)  # before the run directory: bad data must leave --out untouched
    model, role = build_model(args, data.info.num_classes, data.info.image_size)
    model.preprocess = normalization(args.normalize, data.info)
    data.normalize(model.preprocess)
    tag = args.model.replace(":", "-") + (f"-{role}-e{args.expansion}-w{args.width:g}" if is_reducible(args.model)
                                          else "")
    with make_run_dir(args, info, f"{tag}-s{args.seed}", "train.stage1", argv) as run_dir:
        metadata = {"stage": 1, "role": role, **data_metadata(data, args.data_dir)}
        if args.weights:
            metadata["weights"] = str(args.weights)
        cfg = train_config(args, 0.0, stage=1, recipe=args.recipe)
        trainer = Trainer(Classify(model), data, cfg, run_dir, dist_info=info, device=device, metadata=metadata)
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
        if info.is_main:
            kind = f" (e{args.expansion})" if is_reducible(args.model) else ""
            print(size_line(f"{role} {args.model}{kind}", {"params": summary["params"], "macs": summary["macs"]},
                            summary["last_test_acc"]))
            print(f"data: {data.info.label}; best {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                  f"run: {run_dir}")
    finish(info)
    return summary


if __name__ == "__main__":
    main()
