"""Options and set-up shared by ``train.stage1`` and ``train.stage2``."""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import torch.nn as nn

from models import load_checkpoint
from models.checkpoint import resolve
from models.errors import ConfigError, DataError

from .data import DATASETS, Data, ImageTree, build_data, data_root, resolve_source, scan_image_tree
from .data.folders import default_image_size
from .distill import FEATURE_DEFAULTS, FEATURE_MODES, KD_LOSSES, KD_REDUCTIONS, DistillLoss, FeatureDistill, SemCKD
from .engine import COMPILE_MODES, Dist, TrainConfig, init_distributed
from .provenance import native_bf16
from .preprocess import NORMALIZATIONS, normalization
from .recipes import RECIPES
from .rundir import RunDir, command_line, options_of_run
from .data.stream import build_stream_data, fits_in_memory
from .tasks import layer_channels, stage_outputs


def common_parser(prog: str, description: str, *, epochs: int, lr: float, warmup: str) -> argparse.ArgumentParser:
    """The options both stages take; each stage adds its own and documents its defaults."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=tuple(RECIPES), default="ours",
                   help="named defaults (train/recipes.py): ours, or the original ReduceNet's main.py; "
                        "options given here override them")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=None, help="default: cifar10 (stage2: the teacher's)")
    d.add_argument("--data-dir", default=None,
                   help="data root; default $REDUCENET_DATA, else ./data (stage2: the teacher's)")
    d.add_argument("--subset", type=int, default=None,
                   help="train on N class-balanced images (fixed seed) and test on the same share of the test set")
    d.add_argument("--image-size", type=int, default=None, help="imagefolder: resize/crop to this size")
    d.add_argument("--loader", choices=("auto", "memory", "stream"), default="auto",
                   help="memory: decode once, keep uint8 images on the device (CIFAR-size data); stream: decode "
                        "image folders in DataLoader workers each epoch; auto: stream when the decoded images "
                        "would take more than a quarter of the free memory")
    d.add_argument("--workers", type=int, default=min(8, len(os.sched_getaffinity(0))),
                   help="decoding processes of the streaming loader")
    d.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                   help="input normalisation stored with the model: the dataset's mean/std, none ([0, 1] pixels) "
                        "or ImageNet's (default: the recipe's; stage2 --inherit: the teacher's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", choices=("sgd", "adam"), default=None,
                   help="SGD with momentum 0.9 (--nesterov), or Adam (default: the recipe's)")
    o.add_argument("--epochs", type=int, default=epochs)
    o.add_argument("--batch-size", type=int, default=128, help="per process")
    o.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default: the recipe's; ours {lr:g})")
    o.add_argument("--wd", type=float, default=None, help="weight decay (default: the recipe's; ours 1e-4)")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True, help="Nesterov momentum")
    o.add_argument("--schedule", choices=("cosine", "cosine-epoch", "step"), default=None,
                   help="cosine to 0 per step, per epoch (torch's CosineAnnealingLR), or x--gamma at each of "
                        "--milestones (default: the recipe's)")
    o.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75],
                   help="step schedule: fractions of training where the lr drops")
    o.add_argument("--gamma", type=float, default=0.1, help="step schedule: lr factor at each milestone")
    o.add_argument("--warmup-epochs", type=float, default=None, help=f"linear warm-up; default {warmup}")
    o.add_argument("--seed", type=int, default=0, help="weights, data order, augmentation and --subset draw")
    r = p.add_argument_group("run")
    r.add_argument("--out", default=None, help="run directory (default runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the device computes bf16 natively: recent GPUs, "
                        "CPUs with AVX-512 BF16 or AMX)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    r.add_argument("--sync-bn", action="store_true",
                   help="torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm); without it "
                        "each process normalises with its own batch's statistics")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format")
    return p


def parse_args(parser: argparse.ArgumentParser, stage: str, argv: list[str] | None,
               min_epochs: int = 1) -> argparse.Namespace:
    """Parse ``argv``, fill every option left unset from ``--recipe``'s table for ``stage``, and validate."""
    args = parser.parse_args(argv)
    for key, value in RECIPES[args.recipe][stage].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    validate_common(args, min_epochs)
    return args


MAX_SEED = 2**32 - 1


def validate_common(args: argparse.Namespace, min_epochs: int = 1) -> None:
    """One-line :class:`ConfigError` for an option no run can use; called before anything is read or written."""
    def bad(option: str, value: Any, want: str) -> ConfigError:
        return ConfigError(f"{option} {value} is not valid: pass {want}")

    if args.epochs < min_epochs:
        raise bad("--epochs", args.epochs, f"{min_epochs} or more")
    if args.batch_size < 1:
        raise bad("--batch-size", args.batch_size, "1 or more")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise bad("--lr", args.lr, "a positive number such as 0.1")
    if not (math.isfinite(args.wd) and args.wd >= 0):
        raise bad("--wd", args.wd, "0 or a small positive number such as 1e-4")
    if args.warmup_epochs is not None and not (math.isfinite(args.warmup_epochs)
                                               and 0 <= args.warmup_epochs <= args.epochs):
        raise bad("--warmup-epochs", args.warmup_epochs, f"a number of epochs in [0, --epochs {args.epochs}]")
    if not 0 <= args.seed <= MAX_SEED:
        raise bad("--seed", args.seed, f"a whole number in [0, {MAX_SEED}]")
    if not (math.isfinite(args.gamma) and args.gamma > 0):
        raise bad("--gamma", args.gamma, "a positive factor such as 0.1")
    if not all(0 < m < 1 for m in args.milestones):
        raise bad("--milestones", " ".join(map(str, args.milestones)), "fractions of training in (0, 1)")
    if args.subset is not None and args.subset < 1:
        raise bad("--subset", args.subset, "a number of images, 1 or more")
    if args.image_size is not None and not 8 <= args.image_size <= 1024:
        raise bad("--image-size", args.image_size, "a size in pixels in [8, 1024]")


def setup(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    """Join torchrun if launched by it, pick the device and seed the weights."""
    info, device = init_distributed(args.device)
    if args.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; drop it (each process then "
                          "normalises with its own batch's statistics)")
    if args.amp is None:
        args.amp = native_bf16(device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return info, device


def rank0_first(info: Dist, fn, *a, **kw):
    """Run ``fn`` on rank 0 first (it may write caches or folders), then on the other ranks."""
    if info.world_size > 1 and not info.is_main:
        dist.barrier()
    result = fn(*a, **kw)
    if info.world_size > 1 and info.is_main:
        dist.barrier()
    return result


def use_stream(args: argparse.Namespace) -> ImageTree | None:
    """The image folder's listing when ``--loader`` (or its ``auto`` rule: image folders too big for memory, at
    the size they would load at) picks the streaming loader, else None."""
    if args.loader == "stream" and args.dataset != "imagefolder":
        raise ConfigError(f"--loader stream reads image folders; {args.dataset} is loaded in memory")
    if args.loader == "memory" or args.dataset != "imagefolder":
        return None
    _, path = resolve_source("imagefolder", args.data_dir)
    tree = scan_image_tree(path)
    count = min(args.subset or len(tree.train), len(tree.train)) + len(tree.test)
    if args.loader == "auto" and fits_in_memory(count, args.image_size or default_image_size(tree)):
        return None
    return tree


def load_data(args: argparse.Namespace, info: Dist, device: torch.device) -> Data:
    if args.workers < 0:
        raise ConfigError(f"--workers {args.workers} is not valid: pass 0 or more")
    common = dict(subset=args.subset, seed=args.seed, device=device, rank=info.rank, world_size=info.world_size,
                  image_size=args.image_size, channels_last=args.channels_last)
    tree = use_stream(args)
    args.loader = "memory" if tree is None else "stream"  # recorded resolved: --resume compares it
    if tree is not None:
        return build_stream_data(args.data_dir, args.batch_size, workers=args.workers, tree=tree, **common)
    return rank0_first(info, build_data, args.dataset, args.data_dir, args.batch_size, **common)


def data_metadata(data: Data, data_dir: str | None) -> dict[str, Any]:
    """What checkpoints record about the data, so that stage 2 finds the teacher's data by itself."""
    return {"dataset": data.info.name, "data": data.info.label, "data_dir": str(data_root(data_dir)),
            "data_source": str(data.info.source), "image_size": data.info.image_size}


def make_run_dir(args: argparse.Namespace, info: Dist, default_name: str, module: str,
                 argv: list[str] | None) -> RunDir:
    """The run directory, locked by rank 0 and checked (options against ``args.json`` with --resume).

    Call it after everything else is validated; nothing is deleted or written until the trainer's first
    checkpoint (see :mod:`train.rundir`).
    """
    out = Path(args.out or Path("runs") / default_name)
    args.out = str(out)
    argv = sys.argv[1:] if argv is None else list(argv)
    record = {"command": command_line(module, argv), "argv": options_of_run(argv), "args": vars(args),
              "world_size": info.world_size}
    run = RunDir(out, resume=args.resume, overwrite=args.overwrite, record=json.loads(json.dumps(record, default=str)))
    if info.is_main:
        run.open()
    if info.world_size > 1:
        dist.barrier()
    return run


def train_config(args: argparse.Namespace, warmup_default: float, **extra: Any) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, lr=args.lr, wd=args.wd, optimizer=args.optimizer, nesterov=args.nesterov,
        schedule=args.schedule, seed=args.seed,
        milestones=tuple(args.milestones), gamma=args.gamma,
        warmup_epochs=warmup_default if args.warmup_epochs is None else args.warmup_epochs,
        amp=args.amp, compile=args.compile, compile_mode=args.compile_mode,
        channels_last=args.channels_last, sync_bn=args.sync_bn, extra=extra,
    )


def size_line(label: str, size: dict[str, int], acc: float | None) -> str:
    acc_text = "" if acc is None else f"  test acc {acc:6.2f}%"
    return f"{label:34s} params {size['params']:>10,}  MACs {size['macs'] / 1e6:8.2f}M{acc_text}"


def finish(info: Dist) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- distillation
def add_distillation_options(p: argparse.ArgumentParser) -> None:
    """The loss options of every distilling command (stage 2, trim)."""
    s = p.add_argument_group("distillation")
    s.add_argument("--kd", choices=KD_LOSSES, default="kd", help="logit distillation loss (none: cross-entropy only)")
    s.add_argument("--kd-alpha", type=float, default=None, help="KD weight (kd/mse: 0.7, ReduceNet; dkd: 1)")
    s.add_argument("--kd-T", type=float, default=None, help="temperature (kd: 5, ReduceNet; dkd: 4)")
    s.add_argument("--kd-beta", type=float, default=None, help="dkd: NCKD weight (8, mdistiller's default)")
    s.add_argument("--ce-weight", type=float, default=None,
                   help="kd/mse: weight of the cross-entropy term (default 1 - --kd-alpha; RepDistiller and "
                        "SemCKD use 1 with --kd-alpha 1)")
    s.add_argument("--kd-reduction", choices=KD_REDUCTIONS, default=None,
                   help="kd: batchmean (Hinton) or mean over N*C elements (the original ReduceNet's nn.KLDivLoss(), "
                        "1/C of it); default: the recipe's")
    f = p.add_argument_group("feature distillation")
    f.add_argument("--feature-kd", choices=("none", *FEATURE_MODES), default="none",
                   help="fitnet: FitNets (MSE after a trained 1x1 conv + BN per layer pair); at: attention transfer; "
                        "semckd: every student layer learns from every teacher layer, weighted by attention")
    f.add_argument("--feature-weight", type=float, default=None,
                   help=f"weight of the feature loss (CIFAR settings of RepDistiller and SemCKD: "
                        f"{', '.join(f'{k} {v:g}' for k, v in FEATURE_DEFAULTS.items())})")
    f.add_argument("--feature-layers", nargs="+", default=None,
                   help="student module paths (default: its last 3 stage outputs)")
    f.add_argument("--teacher-layers", nargs="+", default=None,
                   help="teacher module paths, one per student layer (default: its last stage outputs)")
    p.add_argument("--no-export", action="store_true", help="fuse and check, but write no deploy files")


def logit_loss(args: argparse.Namespace) -> DistillLoss:
    """The logit loss of the options, validated with the options' names."""
    if args.feature_kd == "none" and (args.feature_layers or args.teacher_layers or args.feature_weight is not None):
        raise ConfigError("--feature-layers/--teacher-layers/--feature-weight need --feature-kd fitnet, at or semckd")
    try:
        return DistillLoss(args.kd, alpha=args.kd_alpha, T=args.kd_T, beta=args.kd_beta, reduction=args.kd_reduction,
                           ce_weight=args.ce_weight)
    except ConfigError as e:
        raise ConfigError(f"--kd {args.kd} options (--kd-alpha, --kd-T, --kd-beta, --ce-weight): {e}") from None


def feature_loss(args: argparse.Namespace, student: nn.Module, teacher: nn.Module,
                 input_size: list[int]) -> tuple[nn.Module | None, list[str], list[str]]:
    """The feature loss of the options and its student and teacher layers, or ``(None, [], [])``."""
    if args.feature_kd == "none":
        return None, [], []
    s_layers = args.feature_layers or stage_outputs(student, input_size)
    t_layers = args.teacher_layers or stage_outputs(teacher, input_size, count=len(s_layers))
    if len(s_layers) != len(t_layers) and args.feature_kd != "semckd":  # SemCKD pairs every layer with every layer
        raise ConfigError(f"--feature-layers names {len(s_layers)} student layers but the teacher has "
                          f"{len(t_layers)}: pass --teacher-layers, one per student layer")
    channels = [layer_channels(m, layers, input_size) for m, layers in ((student, s_layers), (teacher, t_layers))]
    try:
        if args.feature_kd == "semckd":
            loss: nn.Module = SemCKD(channels[0], channels[1], args.batch_size, args.feature_weight)
        else:
            loss = FeatureDistill(channels[0], channels[1], args.feature_kd, args.feature_weight)
    except ConfigError as e:
        raise ConfigError(f"--feature-kd {args.feature_kd}: {e}") from None
    return loss, s_layers, t_layers


def load_teacher_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any], Path]:
    """A trained model to learn from, in float32 (a float16/float64 checkpoint trains in float32), its
    checkpoint metadata and path."""
    p = resolve(path)
    teacher = load_checkpoint(p).float()
    return teacher, teacher.checkpoint_metadata, p


def check_teacher(teacher: nn.Module, data: Data) -> None:
    """Refuse a teacher of another class count than the data; give a checkpoint written before models recorded
    their preprocessing the dataset's mean and std, which is what it was trained with."""
    if teacher.num_classes != data.info.num_classes:
        raise DataError(f"the teacher has {teacher.num_classes} classes but {data.info.label} has "
                        f"{data.info.num_classes}; pass the teacher's --dataset/--data-dir")
    teacher.preprocess = teacher.preprocess or normalization("dataset", data.info)


def use_teachers_data(args: argparse.Namespace, teacher_meta: dict[str, Any]) -> None:
    """Default ``--dataset``, ``--data-dir`` and ``--image-size`` to the teacher's, refusing a moved data folder."""
    args.dataset = args.dataset or teacher_meta.get("dataset", "cifar10")
    teacher_data = teacher_meta.get("data_dir")
    if args.data_dir is None and teacher_data:
        if not Path(teacher_data).exists():
            raise DataError(f"the teacher was trained on data in {teacher_data}, which no longer exists; "
                            "pass --data-dir with the same data")
        args.data_dir = teacher_data  # the teacher's data root (or image-folder zip)
    if args.image_size is None and args.dataset == "imagefolder":
        args.image_size = teacher_meta.get("image_size")
