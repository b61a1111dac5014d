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
a teacher whose preprocessing differs gets its own inputs from the same batch.
"""
from __future__ import annotations

import torch.nn as nn

from models import create_model, read_record, student_from_teacher
from models.checkpoint import resolve
from models.errors import CheckpointError, ConfigError, cli_errors
from models.registry import accepts, is_reducible
from models.weights import load_pretrained

from .cli import (add_distillation_options, check_teacher, common_parser, data_metadata, feature_loss, finish,
                  load_data, load_teacher_checkpoint, logit_loss, make_run_dir, parse_args, setup, train_config,
                  use_teachers_data)
from .deploy import FuseCheckExport
from .engine import Trainer
from .preprocess import Renormalize, normalization
from .schedules import LambdaSchedule
from .tasks import Distill


def build_parser():
    p = common_parser("python -m train.stage2", __doc__, epochs=200, lr=0.05, warmup="5%% of --epochs, >= 1")
    s = p.add_argument_group("student and distillation")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--inherit", help="teacher run directory (uses last.safetensors) or checkpoint; "
                     "the student is its sub-network and inherits its weights")
    src.add_argument("--teacher", help="plain KD instead: distil this checkpoint or run (any trained classifier) "
                     "into a freshly initialised student -m MODEL, e.g. reduce56 -> reduce20")
    s.add_argument("-m", "--model", default=None,
                   help="with --inherit: expected architecture (refuses another); with --teacher: the student "
                        "(zoo model, torchvision:NAME or timm:NAME)")
    s.add_argument("--weights", default=None, help="with --teacher: start the student from these weights")
    s.add_argument("--lora-rank", type=int, default=0, help="rank of the linear LoRA branches; 0 for none")
    s.add_argument("--lora-targets", nargs="+", default=None,
                   help="globs over conv names that get LoRA (default: every 3x3 conv inside the blocks)")
    s.add_argument("--lambda-epochs", type=float, default=0.0,
                   help="anneal LambdaReLU in the LoRA branches from 0 to 1 over these first epochs")
    add_distillation_options(p)
    return p


def load_teacher(path: str, expected_model: str | None, inherit: bool = True):
    """The teacher checkpoint and its metadata; for inheritance, refuses students and other architectures."""
    p = resolve(path)
    record = read_record(p)
    config = record["config"]
    if inherit and not (is_reducible(config) and config.get("expansion")):
        what = "a student (expansion=0)" if config.get("expansion") == 0 else "not a ReduceNet teacher"
        raise CheckpointError(f"{p} is {what} ({config.get('model')}); --inherit needs a teacher trained by "
                              "train.stage1 with --expansion >= 1 (use --teacher CKPT -m MODEL for plain distillation)")
    if inherit and expected_model and expected_model != config.get("model"):
        raise CheckpointError(f"{p} holds a {config.get('model')} teacher, not {expected_model}; "
                              "pass the matching -m or another --inherit")
    return load_teacher_checkpoint(p)


def validate(args) -> None:
    if args.lora_rank < 0:
        raise ConfigError(f"--lora-rank {args.lora_rank} is not valid: pass 0 (no LoRA) or a rank >= 1")
    if args.teacher and not args.model:
        raise ConfigError("--teacher distils into a fresh student: name it with -m MODEL (e.g. -m reduce20)")
    if args.weights and not args.teacher:
        raise ConfigError("--weights starts a fresh student (--teacher); with --inherit the student inherits")
    if args.lambda_epochs and not args.lora_rank:
        raise ConfigError("--lambda-epochs anneals the LoRA branches' LambdaReLU: pass --lora-rank R as well")
    if not 0 <= args.lambda_epochs <= args.epochs:
        raise ConfigError(f"--lambda-epochs {args.lambda_epochs:g} must lie in [0, --epochs {args.epochs}] "
                          "so that lambda reaches 1 before fusion")


def build_student(args, teacher: nn.Module, num_classes: int, image_size: int) -> nn.Module:
    if args.inherit:
        return student_from_teacher(teacher, lora_rank=args.lora_rank, lora_targets=args.lora_targets)
    if is_reducible(args.model):
        student = create_model(args.model, num_classes=num_classes, expansion=0, lora_rank=args.lora_rank,
                               lora_targets=args.lora_targets)
    elif args.lora_rank:
        raise ConfigError(f"--lora-rank adds branches to ReduceNet's ConvBN layers; {args.model} has none")
    else:
        sized = {"image_size": image_size} if accepts(args.model, "image_size") else {}
        student = create_model(args.model, num_classes=num_classes, **sized)
    if args.weights:
        load_pretrained(student, args.weights)
    return student


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), "stage2", argv)
    validate(args)
    loss_fn = logit_loss(args)
    teacher, teacher_meta, teacher_path = load_teacher(args.inherit or args.teacher, args.model,
                                                       inherit=bool(args.inherit))
    use_teachers_data(args, teacher_meta)
    info, device = setup(args)
    name = (teacher.config["model"] if args.inherit else args.model).replace(":", "-")
    data = load_data(args, info, device)
    check_teacher(teacher, data)
    student = build_student(args, teacher, data.info.num_classes, data.info.image_size)
    if not args.inherit:
        student.preprocess = normalization(args.normalize, data.info)
    data.normalize(student.preprocess)
    input_size = [3, data.info.image_size, data.info.image_size]
    features, s_layers, t_layers = feature_loss(args, student, teacher, input_size)
    task = Distill(student, teacher, loss_fn, features, s_layers, t_layers,
                   teacher_input=Renormalize(student.preprocess, teacher.preprocess))
    # only now, so that bad options, data or a mismatched teacher leave --out untouched
    with make_run_dir(args, info, f"{name}-student-r{args.lora_rank}-{args.kd}-s{args.seed}",
                      "train.stage2", argv) as run_dir:
        metadata = {"stage": 2, "role": "student", **data_metadata(data, args.data_dir), "teacher": str(teacher_path),
                    "kd": args.kd}
        warmup = max(1.0, 0.05 * args.epochs) if args.epochs > 1 else 0.0
        cfg = train_config(args, warmup, stage=2, recipe=args.recipe, teacher=str(teacher_path), kd=repr(loss_fn),
                           feature_kd=repr(features) if features else None, feature_layers=[s_layers, t_layers],
                           lora_rank=args.lora_rank, lambda_epochs=args.lambda_epochs)
        callbacks = [LambdaSchedule(student, args.lambda_epochs)] if args.lambda_epochs else []
        callbacks.append(FuseCheckExport(teacher, nn.Sequential(task.teacher_input, task.teacher),
                                         not args.no_export, metadata, f"student (LoRA r{args.lora_rank}, {args.kd})"))
        trainer = Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                          callbacks=callbacks)
        if args.resume:
            trainer.resume()
        summary = trainer.fit()
    finish(info)
    return summary


if __name__ == "__main__":
    main()
