"""What a run is assembled from, built from its typed spec (:mod:`train.spec`): the process and device, the data,
the run directory, the teacher and its checks, the distillation losses. Shared by the pipeline, evaluate and
deploy; nothing here reads argv (the CLIs parse in :mod:`train.cli`)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from models import load_checkpoint
from models.checkpoint import resolve
from models.errors import CheckpointError, ConfigError, DataError, ReduceNetError, brief
from models.identity import set_preprocess

from .data import Data, ImageTree, build_data, data_root, resolve_source, scan_image_tree
from .data.folders import default_image_size, warn_once
from .data.stream import build_stream_data, fits_in_memory
from .distill import DistillLoss, FeatureDistill, SemCKD
from .engine import Dist, init_distributed, is_main_process
from .preprocess import normalization
from .provenance import native_bf16
from .rundir import RunDir, RunDirError, unfinished_run
from .spec import DataSpec, LossSpec, RuntimeSpec
from .tasks import layer_channels, stage_outputs


def setup(runtime: RuntimeSpec, seed: int) -> tuple[Dist, torch.device, RuntimeSpec]:
    """Join torchrun if launched by it, pick the device and seed the weights; ``runtime`` with ``amp`` resolved
    (bf16 where the device computes it natively)."""
    info, device = init_distributed(runtime.device)
    if runtime.sync_bn and device.type != "cuda":
        raise ConfigError("--sync-bn needs GPUs: torch's SyncBatchNorm has no CPU kernel; drop it (each process then "
                          "normalises with its own batch's statistics)")
    if runtime.amp is None:
        runtime = replace(runtime, amp=native_bf16(device))
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return info, device, runtime


def wait_for_peers(info: Dist) -> None:
    """Wait until every process of the torchrun job is here (a barrier), before the run starts.

    Raises:
        ReduceNetError: another process stopped first (the barrier's connection closed): one line, in place of
            gloo's or NCCL's traceback; that process's own error says why.
    """
    try:
        dist.barrier()
    except RuntimeError as e:  # gloo/NCCL: the peer's connection closed
        raise ReduceNetError(f"rank {info.rank}: another process of this torchrun job stopped before the run "
                             f"started (its error says why): {brief(e)}") from None


def rank0_first(info: Dist, fn, *a, **kw):
    """Run ``fn`` on rank 0 first (it may write caches or folders), then on the other ranks."""
    if info.world_size > 1 and not info.is_main:
        wait_for_peers(info)
    result = fn(*a, **kw)
    if info.world_size > 1 and info.is_main:
        wait_for_peers(info)
    return result


def use_stream(data: DataSpec) -> ImageTree | None:
    """The image folder's listing when ``--loader`` (or its ``auto`` rule: image folders too big for memory, at
    the size they would load at) picks the streaming loader, else None."""
    if data.loader == "stream" and data.dataset != "imagefolder":
        raise ConfigError(f"--loader stream reads image folders; {data.dataset} is loaded in memory")
    if data.loader == "memory" or data.dataset != "imagefolder":
        return None
    _, path = resolve_source("imagefolder", data.data_dir)
    tree = scan_image_tree(path)
    count = min(data.subset or len(tree.train), len(tree.train)) + len(tree.test)
    if data.loader == "auto" and fits_in_memory(count, data.image_size or default_image_size(tree)):
        return None
    return tree


def load_data(data: DataSpec, seed: int, channels_last: bool, info: Dist, device: torch.device,
              eval_batch_size: int | None = None) -> tuple[Data, DataSpec]:
    """The loaders of ``data`` (the one entry point of training and evaluation: image folders too big for memory
    stream), and ``data`` with its loader resolved (``memory`` or ``stream``: recorded so, since ``--resume``
    compares it) and its ``data_dir`` absolute. ``eval_batch_size``: the test loader's batch (default twice
    ``data.batch_size``)."""
    common = dict(subset=data.subset, seed=seed, device=device, rank=info.rank, world_size=info.world_size,
                  image_size=data.image_size, channels_last=channels_last, eval_batch_size=eval_batch_size)
    tree = use_stream(data)
    # recorded as resolved: the loader, and the data folder made absolute (a --config rerun from another folder)
    data = replace(data, loader="memory" if tree is None else "stream", data_dir=str(data_root(data.data_dir)))
    if tree is not None:
        return build_stream_data(data.data_dir, data.batch_size, workers=data.workers, tree=tree, **common), data
    return rank0_first(info, build_data, data.dataset, data.data_dir, data.batch_size, **common), data


def data_metadata(data: Data, data_dir: str | None) -> dict[str, Any]:
    """What checkpoints record about the data, so that stage 2 finds the teacher's data by itself."""
    return {"dataset": data.info.name, "data": data.info.label, "data_dir": str(data_root(data_dir)),
            "data_source": str(data.info.source), "image_size": data.info.image_size,
            "classes": list(data.info.classes)}


def data_identity(data: Data) -> dict[str, Any]:
    """What a resumed run must read again, recorded in its ``args.json`` (``inputs``): the dataset, its classes, the
    number of training and test images and a digest of their labels in order. Another dataset or subset is told
    apart; the same images moved to another ``--data-dir`` are not (the images themselves are not read again)."""
    h = hashlib.sha256()
    for loader in (data.train, data.test):
        h.update(loader.labels.cpu().numpy().tobytes())
    return {"dataset": data.info.name, "label": data.info.label, "classes": list(data.info.classes),
            "train": len(data.train.labels), "test": len(data.test.labels), "labels": h.hexdigest()[:16]}


def make_run_dir(out: str | Path, info: Dist, record: dict[str, Any], resume: bool = False, overwrite: bool = False,
                 spec_differences: Callable[[dict[str, Any], set[str]], list[str]] | None = None) -> RunDir:
    """The run directory ``out``, locked by rank 0 and checked (with ``resume``: the run's recorded options or spec
    against these).

    Call it after everything else is validated; nothing is deleted or written until the trainer's first
    checkpoint (see :mod:`train.rundir`).
    """
    run = RunDir(out, resume=resume, overwrite=overwrite, record=json.loads(json.dumps(record, default=str)),
                 spec_differences=spec_differences)
    if info.is_main:
        run.open()
    if info.world_size > 1:
        try:
            wait_for_peers(info)
        except BaseException:  # another rank failed: the lock file and the folders made are taken back
            run.close()
            raise
    return run


def size_line(label: str, size: dict[str, int], acc: float | None) -> str:
    acc_text = "" if acc is None else f"  test acc {acc:6.2f}%"
    return f"{label:34s} params {size['params']:>10,}  MACs {size['macs'] / 1e6:8.2f}M{acc_text}"


def finish(info: Dist) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def logit_loss(loss: LossSpec) -> DistillLoss:
    """The logit loss of ``loss``, validated with the options' names."""
    loss.validate()
    try:
        return DistillLoss(loss.kd, alpha=loss.kd_alpha, T=loss.kd_T, beta=loss.kd_beta, reduction=loss.kd_reduction,
                           ce_weight=loss.ce_weight, warmup_epochs=loss.kd_warmup)
    except ConfigError as e:
        raise ConfigError(f"--kd {loss.kd} options (--kd-alpha, --kd-T, --kd-beta, --kd-warmup, --ce-weight): {e}") \
            from None


def feature_loss(loss: LossSpec, batch_size: int, student: nn.Module, teacher: nn.Module,
                 input_size: list[int]) -> tuple[nn.Module | None, list[str], list[str]]:
    """The feature loss of ``loss`` and its student and teacher layers, or ``(None, [], [])``.

    Layers not given are the models' stage outputs (:func:`~train.tasks.stage_outputs`), the teacher's as many as
    the student's; messages name the side and the option to pass.
    """
    if loss.feature_kd == "none":
        return None, [], []

    def default_layers(model: nn.Module, role: str, option: str, count: int) -> list[str]:
        try:
            return stage_outputs(model, input_size, count)
        except ConfigError:
            raise ConfigError(f"the {role} ({type(model).__name__}) shows no feature maps at its top level to take "
                              f"default feature layers from: pass {option}") from None

    s_layers = list(loss.feature_layers or default_layers(student, "student", "--feature-layers", 3))
    t_layers = list(loss.teacher_layers or default_layers(teacher, "teacher", "--teacher-layers", len(s_layers)))
    if len(s_layers) != len(t_layers) and loss.feature_kd != "semckd":  # SemCKD pairs every layer with every layer
        students = (f"--feature-layers names {len(s_layers)} student layers" if loss.feature_layers else
                    f"the student has {len(s_layers)} default layers ({', '.join(s_layers)})")
        teachers = (f"--teacher-layers names {len(t_layers)}" if loss.teacher_layers else
                    f"the teacher shows only {len(t_layers)} stage output{'s' * (len(t_layers) > 1)} "
                    f"({', '.join(t_layers)})")
        fix = ("pass one teacher layer per student layer" if loss.teacher_layers else
               "pass --teacher-layers, one per student layer")
        more = "" if loss.feature_layers else ", or --feature-layers with as many"
        raise ConfigError(f"{students} but {teachers}: {fix}{more}")
    channels = []
    for model, layers, option in ((student, s_layers, "--feature-layers"), (teacher, t_layers, "--teacher-layers")):
        try:
            channels.append(layer_channels(model, layers, input_size))
        except ConfigError as e:  # say whose layer it is: student and teacher may share class and module names
            role = "student" if model is student else "teacher"
            raise ConfigError(f"{option} (the {role}'s layers): {e}") from None
    try:
        if loss.feature_kd == "semckd":
            module: nn.Module = SemCKD(channels[0], channels[1], batch_size, loss.feature_weight)
        else:
            module = FeatureDistill(channels[0], channels[1], loss.feature_kd, loss.feature_weight)
    except ConfigError as e:
        raise ConfigError(f"--feature-kd {loss.feature_kd}: {e}") from None
    return module, s_layers, t_layers


def load_teacher_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any], Path]:
    """A trained model to learn from, in float32 (a float16/float64 checkpoint trains in float32), its
    checkpoint metadata and path."""
    p = resolve(path)
    unfinished = unfinished_run(p)
    if unfinished and unfinished[0] == "training":  # its checkpoint changes every epoch, and a resume would refuse
        raise RunDirError(f"{path}: the run {unfinished[1]} is still training; wait for it to finish, or copy its "
                          f"{p.name} and {p.with_suffix('.json').name} elsewhere to learn from them as they are now")
    if unfinished and is_main_process():
        warn_once(f"{path}: the run {unfinished[1]} did not finish; this is its checkpoint of epoch {unfinished[2]} "
                  "(--resume that run to finish it first)")
    teacher = load_checkpoint(p).float()
    return teacher, teacher.checkpoint_metadata, p


def check_classes(model: nn.Module, info, what: str, fix: str) -> None:
    """Refuse data whose classes are not the model's: by count, and by name where the checkpoint recorded them
    (two 10-class folders in another order would otherwise report a meaningless accuracy)."""
    if model.num_classes != info.num_classes:
        raise DataError(f"{what} has {model.num_classes} classes but {info.label} has {info.num_classes}; {fix}")
    names = (getattr(model, "checkpoint_metadata", None) or {}).get("classes")
    if names and list(names) != list(info.classes):
        differ = next(i for i, (a, b) in enumerate(zip(names, info.classes)) if a != b)
        raise DataError(f"{what} was trained on other classes than {info.label}: class {differ} is "
                        f"{names[differ]!r} there, {info.classes[differ]!r} here; {fix}")


#: The largest teacher logit accepted (:func:`check_teacher`); trained classifiers stay below about 100.
MAX_TEACHER_LOGIT = 1e4


def check_teacher(teacher: nn.Module, data: Data, option: str = "--teacher") -> None:
    """Refuse a teacher of another class count than the data, or whose logits on the first test images are not
    finite or absurdly large (above :data:`MAX_TEACHER_LOGIT`); give a checkpoint written before models recorded
    their preprocessing the dataset's mean and std, which is what it was trained with. ``option``: the command's
    option that named the teacher."""
    check_classes(teacher, data.info, "the teacher", "pass the teacher's --dataset/--data-dir")
    trained_at = ((teacher.preprocess or {}).get("input_size") or [None])[-1]
    if trained_at and trained_at != data.info.image_size and is_main_process():
        warn_once(f"the teacher was trained at {trained_at} px and sees {data.info.image_size} px images here "
                  f"(--image-size): its accuracy printed below is at {data.info.image_size} px")
    set_preprocess(teacher, teacher.preprocess or normalization("dataset", data.info))
    data.normalize(teacher.preprocess)  # the student's own normalisation replaces it later
    x, _ = next(iter(data.test))
    teacher.to(x.device).eval()
    with torch.no_grad():
        peak = teacher(x[:64]).float().abs().max().item()
    if not peak < MAX_TEACHER_LOGIT:  # NaN too
        raise CheckpointError(f"the teacher's logits reach {peak:.3g} on the first test images (a trained classifier's "
                              f"stay below about 100): its checkpoint is damaged or was not trained on these inputs, "
                              f"and a student distilled from it would diverge; check {option} and --data-dir")


def recorded_data_dir(data_dir: str | None, meta: dict[str, Any], whose: str) -> str | None:
    """``data_dir`` (``--data-dir``) if given, else the data root (or image-folder zip) that a checkpoint's
    metadata ``meta`` records, else None (the default data folder). ``whose``: the checkpoint, as the message names
    it.

    Raises:
        DataError: No ``--data-dir`` was given and the recorded data folder no longer exists (the default folder
            would be other data).
    """
    recorded = meta.get("data_dir")
    if data_dir is not None or not recorded:
        return data_dir
    if not Path(recorded).exists():
        raise DataError(f"{whose} was trained on data in {recorded}, which no longer exists; "
                        "pass --data-dir with the same data")
    return recorded


def teachers_data(data: DataSpec, teacher_meta: dict[str, Any]) -> DataSpec:
    """``data`` with ``dataset``, ``data_dir`` and ``image_size`` left unset taken from the teacher's, refusing a
    moved data folder."""
    changes: dict[str, Any] = {"dataset": data.dataset or teacher_meta.get("dataset", "cifar10"),
                               "data_dir": recorded_data_dir(data.data_dir, teacher_meta, "the teacher")}
    if data.image_size is None and changes["dataset"] == "imagefolder":
        changes["image_size"] = teacher_meta.get("image_size")
    return replace(data, **changes)
