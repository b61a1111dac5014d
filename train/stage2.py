"""``python -m train.stage2 --inherit RUN_DIR_OR_CHECKPOINT``: derive the student and distil it from the teacher.

The student is the teacher without its non-linear branch (b), inheriting every other tensor. ``--teacher CKPT
-m MODEL`` instead distils any trained classifier (zoo, torchvision:NAME, timm:NAME, trimmed) into a fresh
student of any of these kinds. ``--feature-kd fitnet|at|semckd`` adds a feature loss on the stage outputs
(FitNets with trained 1x1 regressors, attention transfer, or SemCKD's cross-layer attention). Optional LoRA
branches (``--lora-rank``) add linear capacity while it trains; with ``--lambda-epochs K`` their LambdaReLU
is annealed from ReLU (lam 0) to identity (lam 1) over the first K epochs. At the end the student is fused,
checked to give the same test accuracy (within 0.01 points), and exported to ``RUN_DIR/deploy``.

Learning-rate schedule of ``--recipe ours`` for fine-tuning an inherited network (reasoned, not tuned):
linear warm-up over the first 5% of the epochs (at least one) to a peak of 0.05, half the teacher's, then
cosine to 0 — the warm-up lets the new LoRA branches and the BN statistics, which change when branch (b) is
removed, settle before large steps move the inherited weights. ``--recipe reducenet-paper`` is the original's:
lr 0.1, cosine per epoch, no warm-up, KD with ``nn.KLDivLoss()``'s mean reduction (train/recipes.py).

The student's inputs are prepared as its teacher's were (``--inherit``) or by ``--normalize`` (``--teacher``);
a teacher whose preprocessing differs gets its own inputs from the same batch. ``--baseline`` also trains the same
student with cross-entropy only, in ``OUT-baseline``, and draws both runs' curves (:mod:`train.baseline`).
"""
from __future__ import annotations

import argparse

from models.errors import ConfigError, cli_errors

from .cli import add_distillation_options, common_parser, parse_options
from .baseline import run_with_baseline
from .pipeline import run
from .spec import Distil, Inherit, RunSpec, from_options


def build_parser():
    p = common_parser("python -m train.stage2", __doc__, stage="stage2", epochs=200)
    s = p.add_argument_group("student and distillation")
    src = s.add_mutually_exclusive_group()
    src.add_argument("--inherit", help="teacher run directory (uses last.safetensors) or checkpoint; "
                     "the student is its sub-network and inherits its weights")
    src.add_argument("--teacher", help="plain KD instead: distil this checkpoint or run (any trained classifier) "
                     "into a freshly initialised student -m MODEL, e.g. reduce56 -> reduce20")
    s.add_argument("-m", "--model", default=None,
                   help="with --inherit: expected architecture (refuses another); with --teacher: the student "
                        "(zoo model, torchvision:NAME or timm:NAME)")
    s.add_argument("--weights", default=None,
                   help="with --teacher: start the student from these weights (a file or run directory)")
    s.add_argument("--lora-rank", type=int, default=0, help="rank of the linear LoRA branches; 0 for none")
    s.add_argument("--lora-targets", nargs="+", default=None,
                   help="globs over conv names that get LoRA (default: every 3x3 conv inside the blocks)")
    s.add_argument("--lambda-epochs", type=float, default=0.0,
                   help="anneal LambdaReLU in the LoRA branches from 0 to 1 over these first epochs")
    s.add_argument("--baseline", action="store_true",
                   help="also train the same student with cross-entropy only (--kd none) for the same epochs, in "
                        "OUT-baseline; print both accuracies and draw both curves in OUT/baseline.png")
    add_distillation_options(p)
    return p


def parse(argv: list[str] | None) -> tuple[RunSpec, argparse.Namespace]:
    """The spec that ``argv`` asks for, and the parsed options (``--resume``, ``--overwrite``)."""
    args = parse_options(build_parser(), argv, kinds=("inherit", "distil"))
    if bool(args.inherit) == bool(args.teacher):
        raise ConfigError("pass one of --inherit RUN (the teacher's student) or --teacher CKPT -m MODEL")
    if args.teacher and not args.model:
        raise ConfigError("--teacher distils into a fresh student: name it with -m MODEL (e.g. -m reduce20)")
    if args.weights and not args.teacher:
        raise ConfigError("--weights starts a fresh student (--teacher); with --inherit the student inherits")
    lora = dict(lora_rank=args.lora_rank, lora_targets=args.lora_targets and tuple(args.lora_targets),
                lambda_epochs=args.lambda_epochs)
    derive = (Inherit(args.inherit, args.model, **lora) if args.inherit
              else Distil(args.teacher, args.model, args.weights, **lora))
    return from_options(vars(args), derive), args


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    spec, args = parse(argv)
    cli = {"module": "train.stage2", "argv": argv}
    if not args.baseline:
        return run(spec, resume=args.resume, overwrite=args.overwrite, cli=cli)
    return run_with_baseline(spec, resume=args.resume, overwrite=args.overwrite, cli=cli)


if __name__ == "__main__":
    main()
