"""Options and set-up shared by ``train.stage1`` and ``train.stage2``."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from models.checkpoint import atomic_write_text

from .data import DATASETS, Data, build_data, data_root
from .engine import Dist, TrainConfig, init_distributed, prepare_run_dir


def common_parser(prog: str, description: str, *, epochs: int, lr: float, warmup: str) -> argparse.ArgumentParser:
    """The options both stages take; each stage adds its own and documents its defaults."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=None, help="default: cifar10 (stage2: the teacher's)")
    d.add_argument("--data-dir", default=None,
                   help="data root; default $REDUCENET_DATA, else ./data (stage2: the teacher's)")
    d.add_argument("--subset", type=int, default=None,
                   help="train on N class-balanced images (fixed seed) and test on the same share of the test set")
    d.add_argument("--image-size", type=int, default=None, help="imagefolder: resize/crop to this size")
    o = p.add_argument_group("optimisation (SGD, momentum 0.9, Nesterov)")
    o.add_argument("--epochs", type=int, default=epochs)
    o.add_argument("--batch-size", type=int, default=128, help="per process")
    o.add_argument("--lr", type=float, default=lr, help="peak learning rate")
    o.add_argument("--wd", type=float, default=1e-4, help="weight decay")
    o.add_argument("--schedule", choices=("cosine", "step"), default="cosine",
                   help="per-step cosine to 0, or x--gamma at each of --milestones")
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
    r.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels-last memory format (default: on for CUDA)")
    return p


def setup(args: argparse.Namespace) -> tuple[Dist, torch.device]:
    """Join torchrun if launched by it, pick the device and seed the weights."""
    info, device = init_distributed(args.device)
    if args.channels_last is None:
        args.channels_last = device.type == "cuda"
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


def load_data(args: argparse.Namespace, info: Dist, device: torch.device) -> Data:
    return rank0_first(info, build_data, args.dataset, args.data_dir, args.batch_size, subset=args.subset,
                       seed=args.seed, device=device, rank=info.rank, world_size=info.world_size,
                       image_size=args.image_size, channels_last=args.channels_last)


def data_metadata(data: Data, data_dir: str | None) -> dict[str, Any]:
    """What checkpoints record about the data, so that stage 2 finds the teacher's data by itself."""
    return {"dataset": data.info.name, "data": data.info.label, "data_dir": str(data_root(data_dir)),
            "data_source": str(data.info.source), "image_size": data.info.image_size}


def make_run_dir(args: argparse.Namespace, info: Dist, default_name: str) -> Path:
    """Create (or check, with --resume) the run directory and record the options in ``args.json``."""
    out = Path(args.out or Path("runs") / default_name)
    args.out = str(out)
    if info.is_main:
        prepare_run_dir(out, args.resume, args.overwrite)
        if not args.resume:
            record = {"command": " ".join([Path(sys.executable).name, "-m", *sys.argv]), "args": vars(args)}
            atomic_write_text(out / "args.json", json.dumps(record, indent=2, default=str) + "\n")
    if info.world_size > 1:
        dist.barrier()
    return out


def train_config(args: argparse.Namespace, warmup_default: float, **extra: Any) -> TrainConfig:
    return TrainConfig(
        epochs=args.epochs, lr=args.lr, wd=args.wd, schedule=args.schedule, seed=args.seed,
        milestones=tuple(args.milestones), gamma=args.gamma,
        warmup_epochs=warmup_default if args.warmup_epochs is None else args.warmup_epochs,
        lambda_epochs=getattr(args, "lambda_epochs", 0.0), amp=args.amp, compile=args.compile,
        channels_last=args.channels_last, extra=extra,
    )


def size_line(label: str, size: dict[str, int], acc: float | None) -> str:
    acc_text = "" if acc is None else f"  test acc {acc:6.2f}%"
    return f"{label:34s} params {size['params']:>10,}  MACs {size['macs'] / 1e6:8.2f}M{acc_text}"


def finish(info: Dist) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()
