"""``python -m train.bench``: training images/s of the project's data path against a plain DataLoader loop.

For each model (reduce20 and reduce56, teacher and student by default), in one run on the current device:

(a) the pytorch-cifar loop: a torchvision-style dataset of PIL images, ``transforms.RandomCrop(32, 4)``,
    ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, a ``DataLoader`` with workers, fp32;
(b) the project's path: :class:`train.engine.Trainer` on :class:`train.data.Loader` (uint8 data on the
    device, augmented there in batches), with bf16 autocast, channels-last and torch.compile on CUDA;

and prints the ratio (b)/(a). Each path runs one warm-up pass, then ``--steps`` timed optimizer steps.
This is a benchmark, not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch
import torch.nn as nn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from models import create_model
from models.errors import ConfigError, cli_errors

from .data import ArrayData, DatasetInfo, build_data
from .engine import TrainConfig, Trainer, hardware, init_distributed
from .tasks import Classify


class PILDataset(Dataset):
    """What ``torchvision.datasets.CIFAR10`` does per item: uint8 array -> PIL image -> transforms."""

    def __init__(self, data: ArrayData, transform) -> None:
        self.images = data.images.permute(0, 2, 3, 1).numpy()
        self.labels = data.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def plain_loop(model: nn.Module, data: ArrayData, info: DatasetInfo, device: torch.device, batch_size: int,
               steps: int, workers: int) -> float:
    """Images/s of the pytorch-cifar training loop (fp32, DataLoader with workers)."""
    tf = transforms.Compose([transforms.RandomCrop(info.image_size, padding=info.image_size // 8),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(info.mean, info.std)])
    loader = DataLoader(PILDataset(data, tf), batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()
    timed = 0.0
    for epoch in range(2):  # epoch 0 warms up (workers, allocator, cudnn autotune)
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed = time.perf_counter() - start
    return steps * batch_size / timed


def project_path(model: nn.Module, args, device: torch.device) -> float:
    """Images/s of :meth:`Trainer.train_epoch` on the project's loader, after one warm-up epoch."""
    cuda = device.type == "cuda"
    data = build_data(args.dataset, args.data_dir, args.batch_size, subset=args.steps * args.batch_size,
                      device=device, channels_last=cuda)
    cfg = TrainConfig(epochs=2, amp=cuda, compile=cuda and not args.no_compile, channels_last=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(Classify(model), data, cfg, tmp, device=device)
        trainer.train_epoch(0)
        return trainer.train_epoch(1)["images_per_s"]


@cli_errors
def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["reduce20", "reduce56"])
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per path")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in the project path")
    args = p.parse_args(argv)
    for option, value, least in (("--steps", args.steps, 1), ("--workers", args.workers, 0),
                                 ("--batch-size", args.batch_size, 1)):
        if value < least:
            raise ConfigError(f"{option} {value} is not valid: pass {least} or more")
    _, device = init_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    sample = build_data(args.dataset, args.data_dir, args.batch_size, subset=args.steps * args.batch_size)
    train = ArrayData(sample.train.images, sample.train.labels)
    print(f"{hardware(device)}; {sample.info.label}; batch {args.batch_size}, {args.steps} timed steps per path")
    print("| model | role | (a) DataLoader fp32 img/s | (b) project img/s | (b)/(a) |")
    print("|---|---|---:|---:|---:|")
    rows = []
    for name in args.models:
        for role, expansion in (("teacher", 1), ("student", 0)):
            torch.manual_seed(0)
            a = plain_loop(create_model(name, num_classes=sample.info.num_classes, expansion=expansion), train,
                           sample.info, device, args.batch_size, args.steps, args.workers)
            torch.manual_seed(0)
            b = project_path(create_model(name, num_classes=sample.info.num_classes, expansion=expansion), args,
                             device)
            rows.append({"model": name, "role": role, "plain": a, "project": b, "ratio": b / a})
            print(f"| {name} | {role} | {a:,.0f} | {b:,.0f} | {b / a:.2f} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
