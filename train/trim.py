"""``python -m train.trim --teacher RUN_OR_CKPT --reduce R``: trim a trained classifier, distil it back, fuse, export.

Breed-Net's promise: a trained classifier and a reduction factor in, a faster, lighter network of comparable
accuracy out, as a complete architecture. The teacher (zoo, torchvision:NAME, timm:NAME, or already trimmed) is
pruned structurally with Torch-Pruning's dependency graph until its MACs, parameters or measured latency
(``--by``) are ``1 / R`` of the original's, within 3%, keeping the surviving weights (``--importance`` ranks the
channels; ``--round-to`` keeps widths hardware-friendly; the classifier is kept), and its BatchNorm statistics
are re-estimated on training batches (``--calibrate-batches``). The trimmed network is then
fine-tuned for ``--epochs`` with distillation from the untrimmed one (``--kd``, ``--feature-kd``; ``--kd none``
is cross-entropy only; ``--epochs 0`` only trims), fused and exported like a stage-2 student. The run directory
is a normal one: the trimmed checkpoint rebuilds without pickle and can be trimmed again.

Defaults (``--recipe ours``): lr 0.01, cosine, no warm-up, KD α 0.7 T 5, 100 epochs (Torch-Pruning's CIFAR
fine-tune uses lr 0.01 for 100 epochs with step decay).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from models.errors import ConfigError, cli_errors
from models.trim import COSTS, IMPORTANCES, trim, trim_record

from .cli import (add_distillation_options, check_teacher, cli_record, common_parser, data_metadata, feature_loss,
                  finish, load_teacher_checkpoint, logit_loss, make_run_dir, parse_args, resolve_data, train_config)
from .deploy import FuseCheckExport
from .engine import Trainer
from .preprocess import Renormalize
from .spec import spec_parts
from .tasks import Distill
from .timing import latency


def build_parser():
    p = common_parser("python -m train.trim", __doc__, epochs=100, lr=0.01, warmup="0")
    t = p.add_argument_group("trimming")
    t.add_argument("--teacher", required=True, help="the trained classifier: a run directory or checkpoint")
    t.add_argument("--reduce", type=float, required=True, help="cost reduction factor R > 1 (2 halves the cost)")
    t.add_argument("--by", choices=COSTS, default="macs",
                   help="the cost to divide by R: MACs, parameters, or batch-1 latency measured on --device")
    t.add_argument("--importance", choices=IMPORTANCES, default="l2",
                   help="channel ranking: L2/L1 magnitude, LAMP, BatchNorm scale, or random")
    t.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of this (e.g. 8)")
    t.add_argument("--calibrate-batches", type=int, default=50,
                   help="after pruning, re-estimate the BatchNorm statistics on this many training batches "
                        "(no weight changes; 0 skips it)")
    add_distillation_options(p)
    return p


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), "trim", argv, min_epochs=0)
    if args.calibrate_batches < 0:
        raise ConfigError(f"--calibrate-batches {args.calibrate_batches} is not valid: pass 0 (none) or more")
    loss_fn = logit_loss(spec_parts(vars(args))["loss"])
    teacher, teacher_meta, teacher_path = load_teacher_checkpoint(args.teacher)
    info, device, data = resolve_data(args, teacher_meta)
    check_teacher(teacher, data)
    size = (1, 3, data.info.image_size, data.info.image_size)
    result = trim(teacher, args.reduce, args.by, size, args.importance, args.round_to,
                  latency=lambda m: latency(m, size, device))
    student = result.model
    data.normalize(student.preprocess)
    if args.calibrate_batches:
        recalibrate_batchnorms(student.to(device), data.train, args.calibrate_batches)
    features, s_layers, t_layers = feature_loss(spec_parts(vars(args))["loss"], args.batch_size, student, teacher,
                                                list(size[1:]))
    task = Distill(student, teacher, loss_fn, features, s_layers, t_layers,
                   teacher_input=Renormalize(student.preprocess, teacher.preprocess))
    name = teacher.config["model"].replace(":", "-")
    args.out = args.out or str(Path("runs") / f"{name}-trim{args.reduce:g}-{args.by}-{args.kd}-s{args.seed}")
    with make_run_dir(args.out, info, cli_record(args, info, "train.trim", argv), args.resume,
                      args.overwrite) as run_dir:
        record = trim_record(result)
        if args.by != "latency" and info.is_main:
            record["latency_ratio_b1"] = latency(teacher, size, device) / latency(student, size, device)
        metadata = {"stage": "trim", "role": "trimmed", **data_metadata(data, args.data_dir),
                    "teacher": str(teacher_path), "trim": record}
        cfg = train_config(args, 0.0, stage="trim", recipe=args.recipe, teacher=str(teacher_path), trim=record,
                           kd=repr(loss_fn), feature_kd=repr(features) if features else None)
        export = FuseCheckExport(teacher, nn.Sequential(task.teacher_input, task.teacher), not args.no_export,
                                 metadata, f"trimmed {result.reduction:.2f}x by {args.by}, {args.kd}")
        trainer = Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                          callbacks=[export])
        if args.resume:
            trainer.resume()
        summary = trainer.fit()  # --epochs 0: the trimmed network as it is, recorded as epoch 0
    finish(info)
    return summary


@torch.no_grad()
def recalibrate_batchnorms(model: nn.Module, loader, batches: int) -> int:
    """Re-estimate every BatchNorm's running statistics on ``batches`` training batches, weights untouched.

    Removing channels shifts what the next layers see, so the statistics the untrimmed network kept no longer
    fit; averaging them afresh over training batches (augmented as in training, epoch 0) restores much of the
    accuracy before any fine-tuning. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches
    was_training = model.training
    model.train()
    loader.set_epoch(0)
    used = 0
    try:
        for used, (x, _) in enumerate(loader, 1):
            model(x)
            if used == batches:
                break
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
    return used


if __name__ == "__main__":
    main()
