"""``python -m train.bench``: training images/s of what users choose between, measured side by side in one run.

For each model (reduce20 and reduce56 by default) and job (stage-1 teacher, stage-1 student, stage-2 student
distilled from the teacher), on the current device:

(a) the pytorch-cifar loop: a dataset of PIL images, ``RandomCrop(32, 4)``, ``RandomHorizontalFlip``,
    ``ToTensor``, ``Normalize``, a ``DataLoader`` with ``--workers``, float32 (stage 2: the teacher's forward too);
(b) the project's path as shipped: :class:`train.engine.Trainer` on :class:`train.data.Loader` (uint8 data on the
    device, augmented there in batches) with the defaults (bf16 autocast where native, channels-last;
    torch.compile on CUDA);
(c) pure compute: the same trainer and settings on batches already in memory, no data pipeline: the ceiling;
(d) where (b) trains in bf16 autocast: (b) in float32, all else the same,

and prints (b)/(a), (b)/(c) and (b)/(d) (what bf16 autocast buys), and (b)'s wall time per step beside the GPU's
kernel time per step (from ``torch.profiler``, on CUDA only; ``--profile-dir`` keeps each path's top kernels
and the host's top ops and CUDA runtime calls per step: where the rest of the wall time goes).
``--pack 1 2 4 8`` also trains that many copies of (b) (the first model's teacher) at once, one process each
(``--pack-mode streams``: threads of this process, each on its own CUDA stream), and prints the images/s of all of
them together against one alone. With ``--folder`` (an image-folder zip or folder) it also times the data alone at
224 px: the project's streaming loader against torchvision's ``ImageFolder`` + ``DataLoader`` with the same
augmentation and workers. Each path runs one warm-up epoch, then ``--steps`` timed steps. A benchmark, not a test:
the numbers depend on the machine and on what else runs on it.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import datasets, transforms

from models import create_model, list_models, student_from_teacher
from models.checkpoint import user_path
from models.errors import ConfigError, ReduceNetError, brief, cli_errors

from .cli import DescribedHelpFormatter
from .data import ArrayData, DatasetInfo, build_data, extract_images, scan_image_tree
from .data.subsets import SubsetSizeError
from .distill import DistillLoss
from .engine import COMPILE_MODES, TrainConfig, Trainer, check_cuda_graph, init_distributed
from .provenance import hardware, native_bf16
from .data.stream import StreamLoader
from .tasks import Classify, Distill


#: How ``--pack``'s runs share the device, and what the table calls it.
PACK_MODES = {"processes": "processes", "streams": "threads, a CUDA stream each"}


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


def plain_loop(student: nn.Module, teacher: nn.Module | None, data: ArrayData, info: DatasetInfo,
               device: torch.device, batch_size: int, steps: int, workers: int) -> float:
    """Images/s of the pytorch-cifar training loop (float32, DataLoader with workers)."""
    tf = transforms.Compose([transforms.RandomCrop(info.image_size, padding=info.image_size // 8),
                             transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                             transforms.Normalize(info.mean, info.std)])
    loader = DataLoader(PILDataset(data, tf), batch_size=batch_size, shuffle=True, num_workers=workers,
                        drop_last=True, persistent_workers=workers > 0)
    student = student.to(device).train()
    if teacher is not None:
        teacher = teacher.to(device).eval()
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    timed = 0.0
    for _ in range(2):  # the first epoch warms up (workers, allocator, cudnn autotune)
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            logits = student(x)
            loss = F.cross_entropy(logits, y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x)
                loss = loss + F.kl_div(F.log_softmax(logits / 4, 1), F.log_softmax(t / 4, 1), log_target=True,
                                       reduction="batchmean")
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        timed = time.perf_counter() - start
    return steps * batch_size / timed


class FixedBatches:
    """A loader that yields the same batches, already made: what is left when there is no data pipeline."""

    def __init__(self, loader) -> None:
        loader.set_epoch(0)
        self.batches = [(x.clone(), y.clone()) for x, y in loader]
        self.num_samples = loader.num_samples

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches)


def trainer_speed(make_task, data, device: torch.device, compile_: bool, fixed: bool, amp: bool,
                  compile_mode: str = "default", profile: bool = False, cuda_graph: bool = False) -> dict[str, Any]:
    """Images/s of :meth:`Trainer.train_epoch` with the shipped defaults (``amp``: bf16 autocast; ``cuda_graph``: the
    step captured whole), after one warm-up epoch: ``{"img_s", "wall_ms"}`` (milliseconds per step), and with
    ``profile`` on a GPU ``"kernel_ms"`` (the GPU's kernel time per step, from one more epoch under
    ``torch.profiler``), ``"top_kernels"``, ``"host_ms"`` and ``"top_host_ops"`` (:func:`kernel_time`)."""
    cfg = TrainConfig(epochs=3, amp=amp, compile=compile_, compile_mode=compile_mode, channels_last=True,
                      cuda_graph=cuda_graph)
    if fixed:
        data = type(data)(FixedBatches(data.train), data.test, data.info)
    trainer = Trainer(make_task(), data, cfg, device=device, log=lambda line: None)  # the table alone on stdout
    trainer.train_epoch(0)
    img_s = trainer.train_epoch(1)["images_per_s"]
    out: dict[str, Any] = {"img_s": img_s, "wall_ms": 1e3 * data.train.num_samples / len(data.train) / img_s}
    if profile and device.type == "cuda":
        try:
            out.update(kernel_time(trainer, 2))
        except Exception as e:  # a profiler that cannot trace this path must not cost the measurements beside it
            out["profile_error"] = brief(e)
    return out


def kernel_time(trainer: Trainer, epoch: int) -> dict[str, Any]:
    """The GPU's kernel time per step over one epoch of ``trainer`` under ``torch.profiler``, and the kernels
    that take most of it (``[(name, ms per step)]``): what the chip computes, against the wall time per step; and
    the host's side of the same steps (:func:`host_ops`), where the rest of the wall time goes."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        trainer.train_epoch(epoch)
    steps = len(trainer.data.train)
    per_kernel: Counter[str] = Counter()
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            per_kernel[event.name] += event.time_range.elapsed_us() / 1e3 / steps
    if not per_kernel:  # a trace without the GPU's activity would read as a kernel time of 0
        raise RuntimeError("the profiler recorded no GPU kernels")
    return {"kernel_ms": sum(per_kernel.values()), "top_kernels": per_kernel.most_common(10),
            **host_ops(prof, steps)}


def host_ops(prof, steps: int) -> dict[str, Any]:
    """The host's time per step in ``prof`` (a finished ``torch.profiler.profile`` over ``steps`` steps):
    ``host_ms``, the self CPU time of every op and CUDA runtime call (launches, copies, waits), and
    ``top_host_ops``, the ten that take most of it (``[(name, ms per step, calls per step)]``). Beside the kernel
    time it says where a step's wall time goes when the GPU waits: launches, the data's ops, a wait on the device."""
    from torch.autograd import DeviceType

    ops = [(a.key, a.self_cpu_time_total / 1e3 / steps, a.count / steps) for a in prof.key_averages()
           if a.device_type == DeviceType.CPU and a.self_cpu_time_total > 0]
    ops.sort(key=lambda op: -op[1])
    return {"host_ms": sum(ms for _, ms, _ in ops), "top_host_ops": ops[:10]}


def _pack_trainer(job: dict[str, Any], device: torch.device) -> Trainer:
    """A trainer of ``job`` (path (b), its own data and model) for one of ``--pack N``'s runs."""
    data = build_data(job["dataset"], job["data_dir"], job["batch_size"], subset=job["steps"] * job["batch_size"],
                      device=device, channels_last=True)
    make_student, make_teacher = jobs(job["model"], data.info.num_classes)[job["job"]]
    task = Classify(make_student()) if make_teacher is None else Distill(make_student(), make_teacher(),
                                                                         DistillLoss("kd"))
    cfg = TrainConfig(epochs=2, amp=job["amp"], compile=job["compile"], compile_mode=job["compile_mode"],
                      channels_last=True, cuda_graph=job["cuda_graph"])
    return Trainer(task, data, cfg, device=device, log=lambda line: None)


def _pack_worker(index: int, barrier, results, job: dict[str, Any]) -> None:
    """One of ``--pack N`` processes: (b) of ``job``, timed over one epoch that starts when every process has
    warmed up; puts ``(index, images, start, end, error)`` on ``results``."""
    try:
        torch.set_num_threads(job["threads"])
        _, device = init_distributed(job["device"])
        trainer = _pack_trainer(job, device)
        trainer.train_epoch(0)
        barrier.wait()
        start = time.perf_counter()  # CLOCK_MONOTONIC: one clock for every process of this machine
        trainer.train_epoch(1)
        results.put((index, trainer.data.train.num_samples, start, time.perf_counter(), None))
    except Exception as e:  # reported by the parent, which names the process
        barrier.abort()
        results.put((index, 0, 0.0, 0.0, brief(e, 200)))


def _packed(n: int, done: list[tuple[int, int, float, float, str | None]], what: str) -> dict[str, Any]:
    """The packed rates of ``n`` runs' ``(index, images, start, end, error)``: all images over the time from the
    first start to the last end, and the median of each run's own rate."""
    errors = sorted(((err, i) for i, _, _, _, err in done if err),  # the cause first, then the others it stopped
                    key=lambda e: ("BrokenBarrierError" in e[0], e[1]))
    errors = [f"{what} {i}: {err}" for err, i in errors]
    if errors:
        raise ReduceNetError(f"--pack {n}: {errors[0]}")
    images = sum(d[1] for d in done)
    span = max(d[3] for d in done) - min(d[2] for d in done)
    return {"runs": n, "aggregate_img_s": images / span,
            "median_img_s": statistics.median(d[1] / (d[3] - d[2]) for d in done)}


def packed_speed(n: int, job: dict[str, Any]) -> dict[str, Any]:
    """Images/s of ``n`` copies of ``job`` trained at once, each in its own process (on one GPU without MPS, the
    processes take turns on the whole chip: their kernels do not run side by side)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(i, barrier, results, job), daemon=True) for i in range(n)]
    for proc in procs:
        proc.start()
    done = [results.get() for _ in procs]
    for proc in procs:
        proc.join()
    return _packed(n, done, "process")


def streams_speed(n: int, job: dict[str, Any]) -> dict[str, Any]:
    """Images/s of ``n`` copies of ``job`` trained at once in this process, each by its own thread on its own CUDA
    stream: one process's streams share the GPU, so the small kernels of one run can fill the SMs that another
    run's leave idle (with ``--cuda-graph`` a step is one graph launch, and the threads hardly contend for Python).
    The runs are built and warmed up (captured) one after another; then all train one timed epoch at once. On the
    CPU there are no streams: the threads share the CPU's cores."""
    _, device = init_distributed(job["device"])
    trainers = [_pack_trainer(job, device) for _ in range(n)]
    streams = [torch.cuda.Stream(device) if device.type == "cuda" else None for _ in range(n)]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the models and data were made on the default stream; the runs use others

    def on(stream):  # the current stream is per thread: each thread sets its own
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    for trainer, stream in zip(trainers, streams):
        with on(stream):
            trainer.train_epoch(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    barrier = threading.Barrier(n)
    done: list[tuple[int, int, float, float, str | None]] = []

    def run(i: int) -> None:
        try:
            with on(streams[i]):
                barrier.wait()
                start = time.perf_counter()
                trainers[i].train_epoch(1)  # ends with a read-back, which waits for this stream alone
                done.append((i, trainers[i].data.train.num_samples, start, time.perf_counter(), None))
        except Exception as e:  # a broken barrier included: the first error is reported, naming its thread
            barrier.abort()
            done.append((i, 0, 0.0, 0.0, brief(e, 200)))

    threads = [threading.Thread(target=run, args=(i,), name=f"pack-{i}") for i in range(n)]
    intra_op = torch.get_num_threads()
    torch.set_num_threads(job["threads"])  # on the CPU, the cores shared out as among --pack's processes
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        torch.set_num_threads(intra_op)
    return _packed(n, done, "thread")


def jobs(name: str, num_classes: int):
    """``{job: (make student, make teacher or None)}`` with fixed seeds, so every path trains the same nets."""
    def model(expansion: int) -> nn.Module:
        torch.manual_seed(0)
        return create_model(name, num_classes=num_classes, expansion=expansion)

    return {"teacher (stage 1)": (lambda: model(1), None), "student (stage 1)": (lambda: model(0), None),
            "student (stage 2, KD)": (lambda: student_from_teacher(model(1)), lambda: model(1))}


def folder_speed(source: Path, images: int, batch_size: int, workers: int, steps: int) -> tuple[float, float]:
    """Data-only images/s at 224 px from the same extracted files: torchvision's ImageFolder + DataLoader
    (RandomResizedCrop, flip, ToTensor, Normalize in the workers) against the project's streaming loader (the same
    augmentation in the workers, uint8 batches normalised by the main process)."""
    tree = scan_image_tree(source)
    items = tree.train[:: max(1, len(tree.train) // images)][:images]
    with tempfile.TemporaryDirectory() as tmp:
        one_per_class = list({label: (name, label) for name, label in items}.values())
        extract_images(tree, {"train": items, "test": one_per_class}, tmp)
        local = scan_image_tree(tmp)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        info = DatasetInfo("imagefolder", len(local.classes), local.classes, mean, std, 224, tmp, "bench")
        tf = transforms.Compose([transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(),
                                 transforms.ToTensor(), transforms.Normalize(mean, std)])
        tv = DataLoader(datasets.ImageFolder(str(Path(tmp) / "train"), tf), batch_size=batch_size, shuffle=True,
                        drop_last=True, num_workers=workers, persistent_workers=workers > 0)
        ours = StreamLoader(local, local.train, info, batch_size, train=True, workers=workers)

        def rate(loader) -> float:
            done, start = 0, 0.0
            for epoch in range(2):  # the first epoch starts the workers
                if hasattr(loader, "set_epoch"):
                    loader.set_epoch(epoch)
                start, done = time.perf_counter(), 0
                for i, (x, _) in enumerate(loader):
                    done += len(x)
                    if i + 1 == steps:
                        break
            return done / (time.perf_counter() - start)

        return rate(tv), rate(ours)


@cli_errors
def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                formatter_class=DescribedHelpFormatter)
    p.add_argument("--models", nargs="+", default=["reduce20", "reduce56"],
                   help="ReduceNet models to time, each as a teacher, a student and a distilled student "
                        "(default: reduce20 reduce56)")
    p.add_argument("--dataset", default="cifar10",
                   help="as the training CLIs' --dataset; its train split feeds every path")
    p.add_argument("--data-dir", default=None, help="the data folder or zip (default: $REDUCENET_DATA, else ./data)")
    p.add_argument("--batch-size", type=int, default=128, help="the recipes' batch")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps per path")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the plain loop and the folders")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile in the project path on CUDA")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode for the project path on CUDA (reduce-overhead: CUDA graphs)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="ours: the whole training step as one CUDA graph (with --compile-mode default or --no-compile)")
    p.add_argument("--pack", type=int, nargs="+", default=[], metavar="N",
                   help="also train N copies of (b) at once (the first model's teacher), as --pack-mode says "
                        "(default: none)")
    p.add_argument("--pack-mode", nargs="+", choices=PACK_MODES, default=None,
                   help="with --pack: how its runs share the device: processes (as train.reproduce --jobs runs "
                        "them), streams (threads of one process, a CUDA stream each), or both (default: processes)")
    p.add_argument("--profile-dir", default=None,
                   help="write each path's top GPU kernels and host ops here (CUDA only)")
    p.add_argument("--folder", default=None, help="also time the streaming loader on this image folder or zip")
    p.add_argument("--folder-images", type=int, default=1024, help="images of --folder to use")
    args = p.parse_args(argv)
    if args.pack_mode and not args.pack:
        raise ConfigError(f"--pack-mode {' '.join(args.pack_mode)} says how --pack's runs share the device: add --pack "
                          "N [N ...] (e.g. --pack 1 2 4 8), or leave --pack-mode out")
    args.pack_mode = args.pack_mode or ["processes"]
    for option, value, least in (("--steps", args.steps, 1), ("--workers", args.workers, 0),
                                 ("--batch-size", args.batch_size, 1), ("--folder-images", args.folder_images, 1),
                                 *(("--pack", n, 1) for n in args.pack)):
        if value < least:
            raise ConfigError(f"{option} {value} is not valid: pass {least} or more")
    reducible = list_models(reducible=True)  # the jobs build each model as a teacher (expansion 1) and a student
    unknown = next((n for n in args.models if n not in reducible), None)
    if unknown is not None:  # stops here, not after the models before it were timed
        raise ConfigError(f"--models {unknown}: bench times ReduceNet's teachers and students; pass some of "
                          f"{', '.join(reducible)}")
    if args.folder:  # a bad --folder stops here, not after the whole benchmark (nothing decoded)
        if not user_path(args.folder).exists():  # scan_image_tree's own message names --data-dir
            raise ConfigError(f"--folder {args.folder} does not exist; pass an image folder or zip with train/ and "
                              "test/ (or val/) class folders")
        scan_image_tree(args.folder)
    _, device = init_distributed(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        data = build_data(args.dataset, args.data_dir, args.batch_size, subset=args.steps * args.batch_size,
                          device=device, channels_last=True)
    except SubsetSizeError as e:  # the subset is ours: steps x batch size images, each drawn once
        few = e.n < e.least
        raise ConfigError(f"--steps {args.steps} x --batch-size {args.batch_size} = {e.n:,} images, but {e.label} "
                          + (f"has {e.least} classes; pass more --steps or a larger --batch-size" if few else
                             f"has {e.most:,} training images; pass fewer --steps or a smaller --batch-size")) from None
    train = ArrayData(data.train.images.cpu(), data.train.labels.cpu())  # the same images, for the DataLoader
    compile_ = device.type == "cuda" and not args.no_compile
    check_cuda_graph(args.cuda_graph, compile_, args.compile_mode)
    bf16 = native_bf16(device)
    mode = (f", torch.compile (mode {args.compile_mode})" if compile_ else "") + (
        (", the step as one CUDA graph" if device.type == "cuda" else
         ", the step captured whole (run eagerly: a CPU has no CUDA graphs)") if args.cuda_graph else "")
    print(f"{hardware(device)}; {data.info.label}; batch {args.batch_size}, {args.steps} timed steps per path; "
          f"ours: {'bf16 autocast' if bf16 else 'float32'}, channels-last{mode}")
    print("| model | job | (a) DataLoader fp32 img/s | (b) ours img/s | (c) pure compute img/s | (d) ours in fp32 "
          "img/s | (b)/(a) | (b)/(c) | (b)/(d) | (b) wall ms/step | (b) GPU kernel ms/step | kernel / wall |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        for job, (make_student, make_teacher) in jobs(name, data.info.num_classes).items():
            def make_task():
                if make_teacher is None:
                    return Classify(make_student())
                return Distill(make_student(), make_teacher(), DistillLoss("kd"))

            a = plain_loop(make_student(), make_teacher() if make_teacher else None, train, data.info, device,
                           args.batch_size, args.steps, args.workers)
            speed = functools.partial(trainer_speed, make_task, data, device, compile_,
                                      compile_mode=args.compile_mode, cuda_graph=args.cuda_graph)
            ours = speed(fixed=False, amp=bf16, profile=True)
            b = ours["img_s"]
            c = speed(fixed=True, amp=bf16)["img_s"]
            d = speed(fixed=False, amp=False)["img_s"] if bf16 else None
            kernel = ours.get("kernel_ms")
            rows.append({"model": name, "job": job, "dataloader": a, "ours": b, "compute": c, "ours_float32": d,
                         "ours_over_dataloader": b / a, "ours_over_compute": b / c,
                         "ours_over_float32": b / d if d else None, "wall_ms_per_step": ours["wall_ms"],
                         "kernel_ms_per_step": kernel, "top_kernels": ours.get("top_kernels"),
                         "host_ms_per_step": ours.get("host_ms"), "top_host_ops": ours.get("top_host_ops")})
            if args.profile_dir and kernel is not None:
                folder = Path(args.profile_dir)
                folder.mkdir(parents=True, exist_ok=True)
                lines = [f"{ms:9.4f} ms/step  {k}" for k, ms in ours["top_kernels"]]
                host = [f"{ms:9.4f} ms/step  {calls:7.1f} calls/step  {k}" for k, ms, calls in ours["top_host_ops"]]
                (folder / f"{name}-{re.sub(r'[^a-z0-9]+', '-', job).strip('-')}.txt").write_text(
                    f"{name}, {job}: wall {ours['wall_ms']:.3f} ms/step, kernels {kernel:.3f} ms/step, host ops "
                    f"{ours['host_ms']:.3f} ms/step\n\nGPU kernels, by time per step:\n" + "\n".join(lines)
                    + "\n\nhost ops and CUDA runtime calls, by self CPU time per step:\n" + "\n".join(host) + "\n")
            fp32, bf16_gain = (f"{d:,.0f}", f"{b / d:.2f}") if d else ("– (b is fp32)", "–")
            gpu = (f"{kernel:.3f} | {kernel / ours['wall_ms']:.2f}" if kernel is not None else
                   "profiler failed | –" if "profile_error" in ours else "– | –")
            print(f"| {name} | {job} | {a:,.0f} | {b:,.0f} | {c:,.0f} | {fp32} | {b / a:.2f} | {b / c:.2f} | "
                  f"{bf16_gain} | {ours['wall_ms']:.2f} | {gpu} |", flush=True)
            if "profile_error" in ours:
                rows[-1]["profile_error"] = ours["profile_error"]
                print(f"  ({name}, {job}: torch.profiler failed: {ours['profile_error']})", file=sys.stderr)
    if args.pack:
        job = {"model": args.models[0], "job": "teacher (stage 1)", "dataset": args.dataset, "data_dir": args.data_dir,
               "batch_size": args.batch_size, "steps": args.steps, "device": str(device), "amp": bf16,
               "compile": compile_, "compile_mode": args.compile_mode, "cuda_graph": args.cuda_graph,
               "threads": max(1, torch.get_num_threads() // max(args.pack)) if device.type == "cpu" else 1}
        print(f"\n{args.models[0]} teacher (stage 1), path (b), N runs at once ({args.steps} timed steps each, "
              "after a warm-up epoch)")
        print("| runs at once | as | img/s per run (median) | all runs together img/s | together / one run alone |")
        print("|---:|---|---:|---:|---:|")
        for how in dict.fromkeys(args.pack_mode):
            alone = None
            for n in args.pack:
                packed = (packed_speed if how == "processes" else streams_speed)(n, job)
                alone = alone or (packed["aggregate_img_s"] if n == 1 else None)
                ratio = f"{packed['aggregate_img_s'] / alone:.2f}" if alone else "–"
                rows.append({"pack": n, "pack_mode": how, **packed})
                label = PACK_MODES[how] if how == "processes" or device.type == "cuda" else "threads (no CUDA streams)"
                print(f"| {n} | {label} | {packed['median_img_s']:,.0f} | {packed['aggregate_img_s']:,.0f} "
                      f"| {ratio} |", flush=True)
    if args.folder:
        batch = min(64, args.folder_images)
        tv, ours = folder_speed(Path(args.folder), args.folder_images, batch, args.workers, args.steps)
        rows.append({"folder": args.folder, "torchvision_imagefolder": tv, "stream": ours, "ratio": ours / tv})
        print(f"\nimage folder at 224 px, data only, {args.workers} workers, batch {batch}: torchvision ImageFolder "
              f"{tv:,.0f} img/s, streaming loader {ours:,.0f} img/s, ratio {ours / tv:.2f}")
    return rows


if __name__ == "__main__":
    main()
