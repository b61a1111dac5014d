"""One pipeline: :func:`run` trains what a :class:`~train.spec.RunSpec` describes, from Python or from a CLI;
:func:`run_chain` trains a Pyramid :class:`Chain` (one run per level).

``python -m train.stage1`` and ``python -m train.stage2`` only parse their options into a spec and call
:func:`run`. The steps, for every kind of run: validate the spec; load the teacher (a taught student); fill the
recipe's defaults and the teacher's data; set up the device; load the data; build the model (fresh, or the
teacher's student, or a fresh student); build the task (cross-entropy, or distillation with its logit and
feature losses); open the run directory (only now, so that a bad option, teacher or data leaves it untouched);
train; for a student, fuse, check and export. The resolved spec is recorded in ``RUN/spec.json``.

Example (a teacher, then its student; both are run directories)::

    from train.pipeline import run
    from train.spec import DataSpec, Fresh, Inherit, OptimSpec, RunSpec

    data = DataSpec(data_dir="../shared/data/cifar-10-subset", subset=256, batch_size=32)
    run(RunSpec(Fresh("reduce20"), data, optim=OptimSpec(epochs=2), out="runs/t"))
    run(RunSpec(Inherit("runs/t", lora_rank=4), data, optim=OptimSpec(epochs=1), out="runs/s"))
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from models import complexity, create_model, read_record, student_from_teacher
from models.checkpoint import (atomic_write_text, file_sha256, load_checkpoint as load_checkpoint_model, resolve,
                               user_path)
from models.grow import add_lora_to_convs, grow, is_grown, ungrow
from models.surgery import add_zoo_lora
from models.errors import CheckpointError, ConfigError, ReparamError, brief
from models.identity import set_preprocess
from models.registry import accepts, is_reducible, model_from_config
from models.trim import TrimResult, trim, trim_at, trim_record
from models.vgg import LEVELS, SCHEMES, hint_points, level_name, level_of, svgg_from
from models.weights import load_pretrained
from reparam import check_fusable

from .assemble import (check_teacher, data_identity, data_metadata, feature_loss, finish, load_data,
                       load_teacher_checkpoint, logit_loss, make_run_dir, setup, size_line, teachers_data)
from .deploy import FuseCheckExport
from .engine import Trainer, evaluate, is_main_process
from .preprocess import Renormalize, normalization
from .rundir import command_line, finished_summary, mark_done, options_of_run
from .schedules import LambdaSchedule
from .spec import Distil, Fresh, Inherit, OptimSpec, Pyramid, RunSpec, Trim, as_record, differences, options_of
from .tasks import TAUGHT_BY_TOP, Classify, Distill, PyramidLevel, teacher_paths
from .timing import latency

#: The module whose command line repeats a run of each kind (``--config RUN/spec.json``).
MODULES = {"fresh": "train.stage1", "inherit": "train.stage2", "distil": "train.stage2", "trim": "train.trim",
           "pyramid": "train.pyramid"}


def run(spec: RunSpec, *, resume: bool = False, overwrite: bool = False, cli: dict[str, Any] | None = None) -> dict:
    """Train what ``spec`` describes; returns the run's summary (also in ``RUN/summary.json``).

    Args:
        spec: the run; fields left ``None`` take the recipe's (or the teacher's) values.
        resume: continue the run in ``spec.out`` from its last epoch (refused if the spec differs in anything
            but the fields marked resumable).
        overwrite: replace a run in ``spec.out`` once this one writes its first checkpoint.
        cli: from a command line: ``{"argv", "module"}``, recorded in ``args.json``.

    Raises:
        ReduceNetError: a bad field, teacher, data or run directory (one line; nothing is written then).
    """
    spec.validate()
    # how the run was asked for, before the recipe and the teacher fill it in: what a table's row compares
    cli = {**(cli if cli is not None else {"module": None}), "asked": spec.record()}
    if isinstance(spec.derive, Fresh):
        return _train_fresh(spec, resume, overwrite, cli)
    if isinstance(spec.derive, Trim):
        return _train_trimmed(spec, resume, overwrite, cli)
    if isinstance(spec.derive, Pyramid):
        return _train_level(spec, resume, overwrite, cli)
    return _train_student(spec, resume, overwrite, cli)


# ----------------------------------------------------------------------------------------------- fresh models
def torch_default_init(model: nn.Module) -> nn.Module:
    """Re-initialise every conv with PyTorch's default (``reset_parameters``), as the original ReduceNet left them."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
    return model


def check_input_size(model: nn.Module, name: str, image_size: int) -> None:
    """Refuse, in one line, a model that cannot take inputs of ``image_size`` (a ViT built for 224 px given CIFAR's
    32 px, an Inception given less than 75 px): one forward pass of one image, before anything is trained."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, image_size, image_size))
    except Exception as e:  # the architectures raise AssertionError, ValueError or RuntimeError
        raise ConfigError(f"{name} cannot take {image_size} px inputs ({brief(e, 120)}); pass "
                          "--image-size with the size it needs (image folders), or choose a model made for small "
                          "images (python -m models lists the zoo)") from None
    finally:
        model.train(was_training)


def is_checkpoint_path(model: str) -> bool:
    """Whether ``-m`` names a checkpoint or run directory rather than a model name: a path to an existing file or
    folder that says it is one (a ``.safetensors``/``.json`` file, a folder with ``last.safetensors``)."""
    p = Path(model)
    return (p.is_file() and p.suffix in (".safetensors", ".json")) or (p / "last.safetensors").is_file()


def _load_weights(model: nn.Module, path: str) -> None:
    """``--weights``: load them (a run directory or deploy folder: its checkpoint, as everywhere), and say so when
    the head starts new (weights of another class count)."""
    new = load_pretrained(model, resolve(path) if Path(path).is_dir() else path)
    if new and is_main_process():
        print(f"weights: {path} loaded, but for the head ({', '.join(new)}), whose shape differs: it starts new, for "
              f"{model.num_classes} classes", flush=True)


def build_model(derive: Fresh, num_classes: int, image_size: int) -> tuple[nn.Module, str, Fresh]:
    """The model of ``derive``, its role (teacher, scratch student or model) and ``derive`` resolved (a ReduceNet's
    expansion and width); grown into a teacher with ``derive.grow`` (:mod:`models.grow`)."""
    if is_checkpoint_path(derive.model):  # a checkpoint or run: its architecture (a trimmed one, say) and weights
        given = [o for o, v in (("--expansion", derive.expansion), ("--width", derive.width),
                                ("--weights", derive.weights)) if v is not None]
        if given:
            raise ConfigError(f"-m {derive.model} is a checkpoint, which fixes its architecture and weights: "
                              f"drop {given[0]}")
        model, role = load_checkpoint_model(derive.model), "model"
        if model.num_classes != num_classes:
            raise ConfigError(f"-m {derive.model} has {model.num_classes} classes but the data has {num_classes}")
    elif is_reducible(derive.model):
        if derive.grow and derive.expansion:
            raise ConfigError("--grow grows a student into a teacher: leave --expansion out (or pass 0)")
        derive = replace(derive, expansion=(0 if derive.grow else 1) if derive.expansion is None else derive.expansion,
                         width=1 if derive.width is None else derive.width)
        model = create_model(derive.model, num_classes=num_classes, width=derive.width, expansion=derive.expansion)
        role = "teacher" if derive.expansion else "scratch"
    else:
        given = [o for o, v in (("--expansion", derive.expansion), ("--width", derive.width)) if v is not None]
        if given:
            raise ConfigError(f"{given[0]} belongs to ReduceNet's families; {derive.model} takes neither")
        sized = {"image_size": image_size} if accepts(derive.model, "image_size") else {}
        model, role = create_model(derive.model, num_classes=num_classes, **sized), "model"
    check_input_size(model, derive.model, image_size)
    if derive.init == "torch":
        torch_default_init(model)
    if derive.weights:
        _load_weights(model, derive.weights)
    if derive.grow:
        grow(model, derive.grow, derive.grow_targets)
        role = "teacher"
    return model, role, derive


def _train_fresh(spec: RunSpec, resume: bool, overwrite: bool, cli: dict[str, Any]) -> dict:
    spec = spec.with_recipe()
    spec = replace(spec, data=replace(spec.data, dataset=spec.data.dataset or "cifar10"))
    spec, info, device, data = _device_and_data(spec)
    model, role, derive = build_model(spec.derive, data.info.num_classes, data.info.image_size)
    spec = replace(spec, derive=derive)
    set_preprocess(model, normalization(spec.data.normalize, data.info))
    data.normalize(model.preprocess)
    reducible = is_reducible(derive.model)
    tag = Path(derive.model).name.replace(":", "-") + (
        f"-{role}-e{derive.expansion}-w{derive.width:g}" if reducible else "") + (
        f"-grown-e{derive.grow}" if derive.grow else "")
    spec = _with_out(spec, f"{tag}-s{spec.optim.seed}")
    with _run_dir(spec, info, resume, overwrite, cli, data) as run_dir:
        metadata = {"stage": 1, "role": role, **data_metadata(data, spec.data.data_dir)}
        if derive.weights:
            metadata["weights"] = str(derive.weights)
        summary = _fit(Trainer(Classify(model), data, spec.train_config(stage=1, recipe=spec.recipe), run_dir,
                               dist_info=info, device=device, metadata=metadata), resume)
        if info.is_main:
            kind = f" (grown e{derive.grow})" if derive.grow else f" (e{derive.expansion})" if reducible else ""
            print(size_line(f"{role} {derive.model}{kind}", {"params": summary["params"], "macs": summary["macs"]},
                            summary["last_test_acc"]))
            print(f"data: {data.info.label}; best {summary['best_test_acc']:.2f}% at epoch {summary['best_epoch']}; "
                  f"run: {run_dir}")
    finish(info)
    return summary


# ----------------------------------------------------------------------------------------------- students
def load_teacher(path: str, expected_model: str | None, inherit: bool = True):
    """The teacher checkpoint and its metadata; for inheritance, refuses students and other architectures."""
    p = resolve(path)
    record = read_record(p)
    config = record["config"]
    if inherit and not (is_reducible(config) and config.get("expansion")) and not config.get("grow"):
        what = "a student (expansion=0)" if config.get("expansion") == 0 else "not a ReduceNet teacher"
        raise CheckpointError(f"{p} is {what} ({config.get('model')}); --inherit needs a teacher trained by "
                              "train.stage1 with --expansion >= 1 or --grow E (use --teacher CKPT -m MODEL for plain "
                              "distillation)")
    if inherit and expected_model and expected_model != config.get("model"):
        raise CheckpointError(f"{p} holds a {config.get('model')} teacher, not {expected_model}; "
                              "pass the matching -m or another --inherit")
    return load_teacher_checkpoint(p)


def build_student(derive: Inherit | Distil, teacher: nn.Module, num_classes: int, image_size: int) -> nn.Module:
    """The teacher's student (:class:`Inherit`) or a fresh student (:class:`Distil`), with its LoRA branches; the
    model API's refusals of ``lora_rank``/``lora_targets`` name the options ``--lora-rank``/``--lora-targets``."""
    try:
        return _build_student(derive, teacher, num_classes, image_size)
    except ConfigError as e:
        raise ConfigError(re.sub(r"\blora_(rank|targets)\b", r"--lora-\1", str(e))) from None


def _build_student(derive: Inherit | Distil, teacher: nn.Module, num_classes: int, image_size: int) -> nn.Module:
    if isinstance(derive, Inherit):
        return student_from_teacher(teacher, lora_rank=derive.lora_rank, lora_targets=derive.lora_targets)
    if is_reducible(derive.model):  # with --weights, the LoRA branches come after them (the weights name no branch)
        rank = 0 if derive.weights else derive.lora_rank
        student = create_model(derive.model, num_classes=num_classes, expansion=0, lora_rank=rank,
                               lora_targets=derive.lora_targets if rank else None)
    else:
        sized = {"image_size": image_size} if accepts(derive.model, "image_size") else {}
        student = create_model(derive.model, num_classes=num_classes, **sized)
        check_input_size(student, derive.model, image_size)
    if derive.weights:
        _load_weights(student, derive.weights)
    if derive.lora_rank and not is_reducible(derive.model):  # after the weights, which name the convs unwrapped
        add_lora_to_convs(student, derive.lora_rank, derive.lora_targets)
    elif derive.lora_rank and derive.weights:
        add_zoo_lora(student, derive.lora_rank, derive.lora_targets)
    return student


def _check_fusable(model: nn.Module, role: str) -> None:
    """Refuse, before anything trains, a model that the run's end could not fuse (:func:`reparam.check_fusable`)."""
    try:
        check_fusable(model)
    except ReparamError as e:
        raise ConfigError(f"{role} ({model.config['model']}) cannot be fused, which ends the run, so it is refused "
                          f"before training: {e}; or distil into another model") from None


def _student_run_name(teacher_model: str, spec: RunSpec) -> str:
    """The default run directory's name (under ``runs/``) of the stage-2 ``spec`` (resolved) of a teacher of
    ``teacher_model``: named after the student's model."""
    derive: Inherit | Distil = spec.derive
    name = (teacher_model if isinstance(derive, Inherit) else derive.model).replace(":", "-")
    return f"{name}-student-r{derive.lora_rank}-{spec.loss.kd}-s{spec.optim.seed}"


def _train_student(spec: RunSpec, resume: bool, overwrite: bool, cli: dict[str, Any]) -> dict:
    derive = spec.derive
    inherit = isinstance(derive, Inherit)
    if inherit and spec.data.normalize is not None and is_main_process():
        print(f"note: --normalize {spec.data.normalize} is not used: an inherited student keeps its teacher's input "
              "normalization", flush=True)
    spec = spec.with_recipe()
    loss_fn = logit_loss(spec.loss)
    teacher, teacher_meta, teacher_path = load_teacher(derive.teacher, derive.model, inherit=inherit)
    if inherit and derive.lora_rank:  # needs nothing from the data: a rank the convs cannot take is refused at once
        with torch.random.fork_rng(devices=[]):  # the student is built for real once seeded, as before
            build_student(derive, teacher, 0, 0)
    spec = replace(spec, data=teachers_data(spec.data, teacher_meta))
    spec, info, device, data = _device_and_data(spec)
    check_teacher(teacher, data, "--inherit" if inherit else "--teacher")
    student = build_student(derive, teacher, data.info.num_classes, data.info.image_size)
    _check_fusable(student, "the student")
    if not inherit:
        set_preprocess(student, normalization(spec.data.normalize, data.info))
    data.normalize(student.preprocess)
    input_size = [3, data.info.image_size, data.info.image_size]
    features, s_layers, t_layers = feature_loss(spec.loss, spec.data.batch_size, student, teacher, input_size)
    task = Distill(student, teacher, loss_fn, features, s_layers, t_layers,
                   teacher_input=Renormalize(student.preprocess, teacher.preprocess), input_size=input_size)
    spec = _with_out(spec, _student_run_name(teacher.config["model"], spec))
    # only now, so that bad options, data or a mismatched teacher leave the run directory untouched
    with _run_dir(spec, info, resume, overwrite, cli, data, {"teacher": teacher_path}) as run_dir:
        metadata = {"stage": 2, "role": "student", **data_metadata(data, spec.data.data_dir),
                    "teacher": str(teacher_path), "kd": spec.loss.kd}
        cfg = spec.train_config(stage=2, recipe=spec.recipe, teacher=str(teacher_path), kd=repr(loss_fn),
                                feature_kd=repr(features) if features else None, feature_layers=[s_layers, t_layers],
                                lora_rank=derive.lora_rank, lambda_epochs=derive.lambda_epochs)
        callbacks = [LambdaSchedule(student, derive.lambda_epochs)] if derive.lambda_epochs else []
        lora = f"LoRA r{derive.lora_rank}, " if derive.lora_rank else ""
        callbacks.append(FuseCheckExport(teacher, nn.Sequential(task.teacher_input, task.teacher), spec.export,
                                         metadata, f"student ({lora}{spec.loss.label})"))
        summary = _fit(Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                               callbacks=callbacks), resume)
    finish(info)
    return summary


# ----------------------------------------------------------------------------------------------- trimmed networks
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


def _search_trim(source: nn.Module, derive: Trim, size: tuple[int, ...], device: torch.device, info,
                 say: Callable[[str], None]) -> tuple[nn.Module, dict[str, Any]]:
    """``source`` trimmed as ``derive`` asks, and its trim record. Under torchrun rank 0 searches alone and the
    others prune at the ratio it chose: measured latencies differ between processes, and every rank must train the
    same network."""
    def search() -> TrimResult:
        return trim(source, derive.reduce, derive.by, size, derive.importance, derive.round_to,
                    latency=lambda m: latency(m, size, device), log=say)

    if info.world_size == 1:
        result = search()
        return result.model, trim_record(result)
    chosen: list[Any] = [None]
    try:
        if info.is_main:
            result = search()
            chosen = [trim_record(result)]
    finally:  # rank 0's failure (None) reaches the others too, which would otherwise wait for its ratio
        dist.broadcast_object_list(chosen, src=0)
    if chosen[0] is None:
        raise ConfigError("rank 0 found no trimmed network to train (its error says why)")
    if info.is_main:
        return result.model, chosen[0]
    return trim_at(source, chosen[0]["pruning_ratio"], size, derive.importance, derive.round_to), chosen[0]


def _trim_run_name(model: str, spec: RunSpec) -> str:
    """The default run directory's name (under ``runs/``) of the trim ``spec`` (resolved) of a ``model``."""
    derive: Trim = spec.derive
    return f"{model.replace(':', '-')}-trim{derive.reduce:g}-{derive.by}-{spec.loss.kd}-s{spec.optim.seed}"


def taught_out(spec: RunSpec) -> Path:
    """The run directory of a stage-2 or trim ``spec``, before it runs: its ``--out``, else ``runs/<name>``, the
    name the run gives itself (its teacher's record is read)."""
    spec = spec.with_recipe()
    if spec.out:
        return Path(_with_out(spec, "").out)
    name_of = _trim_run_name if isinstance(spec.derive, Trim) else _student_run_name
    return Path(_with_out(spec, name_of(read_record(resolve(spec.derive.teacher))["config"]["model"], spec)).out)


def _train_trimmed(spec: RunSpec, resume: bool, overwrite: bool, cli: dict[str, Any]) -> dict:
    derive: Trim = spec.derive
    spec = spec.with_recipe()
    loss_fn = logit_loss(spec.loss)
    teacher, teacher_meta, teacher_path = load_teacher_checkpoint(derive.teacher)
    spec = replace(spec, data=teachers_data(spec.data, teacher_meta))
    spec, info, device, data = _device_and_data(spec)
    check_teacher(teacher, data)
    spec = _with_out(spec, _trim_run_name(teacher.config["model"], spec))
    size = (1, 3, data.info.image_size, data.info.image_size)
    say = print if info.is_main else (lambda line: None)
    source = teacher
    if is_grown(teacher):
        source = ungrow(teacher)
        say(f"trim: {teacher_path} is a grown teacher; its original network (every branch (b) removed) is trimmed "
            "and distilled from the whole teacher")
    elif is_reducible(teacher.config) and teacher.config.get("expansion"):
        # branch (b) is non-linear: no fusion could remove it after trimming, so the student form is trimmed
        source = student_from_teacher(teacher)
        say(f"trim: {teacher_path} is a ReduceNet teacher; its student (branch (b) removed, every other weight "
            "inherited) is trimmed and distilled from the whole teacher")
    recorded = Path(spec.out) / "last.safetensors"
    resumed = resume and recorded.is_file()
    if resumed:  # the structure the run chose, not a new search (latency is noisy); the weights come from its state
        record = read_record(recorded)
        student = model_from_config(record["config"])
        set_preprocess(student, source.preprocess)
        trimmed = record["metadata"].get("trim", {})
        say(f"trim: resuming with the structure recorded in {recorded} "
            f"(reduced {trimmed.get('reduce_reached', 0):.2f}x by {derive.by})")
    elif derive.structure_from:  # the same trimmed network as that run's: pruned at the ratio it chose
        other = resolve(derive.structure_from)
        record = read_record(other)
        ratio = record.get("metadata", {}).get("trim", {}).get("pruning_ratio")
        if ratio is None:
            raise ConfigError(f"--structure-from {derive.structure_from}: {other} is not a trimmed checkpoint")
        student = trim_at(source, ratio, size, derive.importance, derive.round_to)
        if student.config != record["config"]:
            raise ConfigError(f"--structure-from {derive.structure_from}: pruning {source.config['model']} at its "
                              f"ratio {ratio:.3f} gives another network (another teacher, --importance or "
                              "--round-to); pass the options that run used")
        cost = [complexity(m, size)[derive.by] if derive.by != "latency" else latency(m, size, device)
                for m in (source, student)]
        trimmed = trim_record(TrimResult(student, ratio, cost[0], cost[1], derive.by))
        say(f"trim: the structure of {other}: pruned at its ratio {ratio:.3f}")
    else:
        before = complexity(source, size)
        say(f"trim: {source.config['model']} ({before['params']:,} params, {before['macs'] / 1e6:,.1f} M MACs at "
            f"{size[-1]} px) to 1/{derive.reduce:g} of its {derive.by}, {derive.importance} importance")
        student, trimmed = _search_trim(source, derive, size, device, info, say)
    _check_fusable(student, "the trimmed network")
    data.normalize(student.preprocess)
    student.to(device)
    if derive.calibrate_batches and not resumed:  # a resumed run's statistics come from its train_state
        recalibrate_batchnorms(student, data.train, derive.calibrate_batches)
    features, s_layers, t_layers = feature_loss(spec.loss, spec.data.batch_size, student, teacher, list(size[1:]))
    task = Distill(student, teacher, loss_fn, features, s_layers, t_layers,
                   teacher_input=Renormalize(student.preprocess, teacher.preprocess), input_size=list(size[1:]))
    with _run_dir(spec, info, resume, overwrite, cli, data, {"teacher": teacher_path}) as run_dir:
        if "pruning_ratio" in trimmed and "test_acc_before_finetune" not in trimmed:  # a new trim: measured once
            trimmed.update(_trim_report(teacher, student, size, device, data, info, derive, say))
        metadata = {"stage": "trim", "role": "trimmed", **data_metadata(data, spec.data.data_dir),
                    "teacher": str(teacher_path), "trim": trimmed}
        cfg = spec.train_config(stage="trim", recipe=spec.recipe, teacher=str(teacher_path), trim=trimmed,
                                kd=repr(loss_fn), feature_kd=repr(features) if features else None)
        before = ({"label": "trimmed, before fine-tuning", "acc": trimmed["test_acc_before_finetune"],
                   "params": trimmed["params_after"], "macs": trimmed["macs_after"]}
                  if "test_acc_before_finetune" in trimmed else None)
        export = FuseCheckExport(teacher, nn.Sequential(task.teacher_input, task.teacher), spec.export, metadata,
                                 f"trimmed {trimmed.get('reduce_reached', 0):.2f}x by {derive.by}, {spec.loss.label}",
                                 before=before)
        # 0 epochs: the trimmed network as it is, recorded as epoch 0
        summary = _fit(Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                               callbacks=[export]), resume)
        if info.is_main and "test_acc_before_finetune" in trimmed:
            say(f"trim: test accuracy {trimmed['test_acc_before_finetune']:.2f}% after pruning"
                f"{' and BatchNorm recalibration' if derive.calibrate_batches else ''}, "
                f"{summary['last_test_acc']:.2f}% after {spec.optim.epochs} "
                f"epoch{'s' * (spec.optim.epochs != 1)} of fine-tuning "
                f"(untrimmed: {trimmed['teacher_test_acc']:.2f}%)")
    finish(info)
    return summary


def _trim_report(teacher: nn.Module, student: nn.Module, size: tuple[int, ...], device, data, info, derive: Trim,
                 say) -> dict[str, Any]:
    """What a trim reached, printed and recorded: params, MACs and batch-1 latency before and after (measured
    side by side here), and the test accuracy of the untrimmed teacher and of the trimmed network before
    fine-tuning."""
    cost = [complexity(m, size) for m in (teacher, student)]
    times = [latency(m, size, device) for m in (teacher, student)] if info.is_main else [1.0, 1.0]
    accs = [evaluate(m, data.test, data.info.num_classes, dist_info=info, device=device)["test_acc"]
            for m in (nn.Sequential(Renormalize(student.preprocess, teacher.preprocess), teacher), student)]
    say(f"trim: from the untrimmed teacher: params {cost[0]['params']:,} -> {cost[1]['params']:,} "
        f"({cost[0]['params'] / cost[1]['params']:.2f}x), "
        f"MACs {cost[0]['macs'] / 1e6:,.1f} M -> {cost[1]['macs'] / 1e6:,.1f} M "
        f"({cost[0]['macs'] / cost[1]['macs']:.2f}x), latency at batch 1 {times[0] * 1e3:.2f} -> "
        f"{times[1] * 1e3:.2f} ms ({times[0] / times[1]:.2f}x, {device.type})")
    say(f"trim: test accuracy {accs[0]:.2f}% untrimmed, {accs[1]:.2f}% trimmed before fine-tuning")
    return {"params_before": cost[0]["params"], "params_after": cost[1]["params"], "macs_before": cost[0]["macs"],
            "macs_after": cost[1]["macs"], "latency_ratio_b1": times[0] / times[1],
            "teacher_test_acc": accs[0], "test_acc_before_finetune": accs[1]}


# ----------------------------------------------------------------------------------------------- the Pyramid
def _train_level(spec: RunSpec, resume: bool, overwrite: bool, cli: dict[str, Any]) -> dict:
    derive: Pyramid = spec.derive
    spec = spec.with_recipe()
    kd = logit_loss(spec.loss) if derive.loss == "kd" else None
    top, top_meta, top_path = load_teacher_checkpoint(derive.top)
    reads = {"teacher": top_path}
    if derive.parent is None:
        if level_of(top)[0] != LEVELS[derive.level].parent:
            raise ConfigError(f"{derive.level}'s parent is {LEVELS[derive.level].parent}, not {level_of(top)[0]} "
                              f"({derive.top}); pass the parent level's run")
        parent = top
    else:
        parent, _, reads["parent"] = load_teacher_checkpoint(derive.parent)
        set_preprocess(parent, parent.preprocess or top.preprocess)
        if level_of(parent)[1] != level_of(top)[1]:  # one chain has BatchNorm throughout, or nowhere
            kinds = {True: "with BatchNorm", False: "without BatchNorm"}
            raise ConfigError(f"{derive.parent} is a level {kinds[level_of(parent)[1]]}, but --teacher {derive.top} "
                              f"is a VGG19 {kinds[level_of(top)[1]]}: pass the VGG19 that chain started from, or "
                              "another --out")
    spec = replace(spec, data=teachers_data(spec.data, top_meta))
    spec, info, device, data = _device_and_data(spec)
    check_teacher(top, data)
    student = svgg_from(parent, derive.level)
    by_top = derive.loss in TAUGHT_BY_TOP
    teacher = top if by_top else parent
    points = hint_points(derive.level)
    task = PyramidLevel(student, teacher, derive.loss, derive.hint_epochs,
                        {"output": points.student_output, "input": points.student_input,
                         "prepool": points.student_prepool}, teacher_paths(derive.level, by_top), kd,
                        Renormalize(student.preprocess, teacher.preprocess))
    data.normalize(student.preprocess)
    spec = _with_out(spec, f"pyramid-{derive.level}-{derive.loss}-s{spec.optim.seed}")
    with _run_dir(spec, info, resume, overwrite, cli, data, reads) as run_dir:
        metadata = {"stage": "pyramid", "role": derive.level, **data_metadata(data, spec.data.data_dir),
                    "loss": derive.loss, "scheme": LEVELS[derive.level].scheme,
                    "teacher": "VGG19 (--teacher)" if by_top else parent.config["model"]}  # a _bn top is named
        cfg = spec.train_config(stage="pyramid", recipe=spec.recipe, level=derive.level, loss=derive.loss,
                                hint_epochs=derive.hint_epochs)
        export = FuseCheckExport(teacher, nn.Sequential(task.teacher_input, teacher), spec.export, metadata,
                                 f"{derive.level} ({derive.loss})")
        summary = _fit(Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                               callbacks=[export]), resume)
    finish(info)
    return summary


# ----------------------------------------------------------------------------------------------- Pyramid chains
@dataclass(frozen=True)
class Chain:
    """A Pyramid chain: one :class:`~train.spec.Pyramid` run per level, in chain order, each in ``OUT/<level>``
    (its ``spec.out``) and taught by the level above; ``out`` holds the chain's ``summary.json``."""

    out: str
    levels: tuple[RunSpec, ...]

    def record(self) -> dict[str, Any]:
        """What makes two chains the same chain: each level's :meth:`~train.spec.RunSpec.record`."""
        return {"chain": [s.record() for s in self.levels]}


def chain_levels(scheme: str, levels: list[str] | None = None) -> list[str]:
    """The levels of ``scheme`` to run: all of them, or ``levels`` (short names allowed), which must follow the
    chain without gaps."""
    chain = [f"svgg{depth}_{scheme}" for depth, _ in SCHEMES[scheme]]
    if not levels:
        return chain
    names = [name if name.endswith(f"_{scheme}") else f"{name}_{scheme}" for name in levels]
    unknown = [n for n in names if n not in chain]
    if unknown:
        raise ConfigError(f"--levels {unknown[0]} is not a level of the {scheme} scheme; choose from "
                          f"{', '.join(n.split('_')[0] for n in chain)}")
    if names != chain[chain.index(names[0]):chain.index(names[0]) + len(names)]:
        raise ConfigError(f"--levels must follow the chain without gaps ({' -> '.join(chain)}); got "
                          f"{' -> '.join(names)}")
    return names


def chain_of(top: str, top_model: str | None, scheme: str, out: str | Path, loss: str = "two-stage",
             hint_epochs: int | None = None, levels: list[str] | None = None, **options: Any) -> Chain:
    """The chain below ``top`` (a run or checkpoint of the model ``top_model``) in ``out``; ``options`` are the
    levels' spec options (:meth:`train.spec.RunSpec.of`: ``epochs``, ``seed``, ``dataset``, ...). ``hint_epochs``
    None: a third of the epochs, at least 1 (0 for ``scratch``).

    A level whose parent is ``top``'s level (:func:`models.vgg.level_name`: ``pyramid_vgg19`` for a
    ``pyramid_vgg19_bn`` too) is taught by ``top`` itself; any other by the run of its parent in ``OUT/<parent>``.
    The levels below a ``pyramid_vgg19_bn`` have the same names and run directories, with BatchNorm."""
    out = user_path(out)
    if hint_epochs is None:
        hint_epochs = 0 if loss == "scratch" else max(1, options.get("epochs", OptimSpec.epochs) // 3)
    top_level = level_name(top_model)
    specs = []
    for level in chain_levels(scheme, levels):
        parent = None if LEVELS[level].parent == top_level else str(Path(out) / LEVELS[level].parent)
        specs.append(RunSpec.of(Pyramid(top, level, parent, loss, hint_epochs),
                                **{**options, "out": str(Path(out) / level)}).validate())
    return Chain(str(out), tuple(specs))


def run_chain(chain: Chain, *, overwrite: bool = False, cli: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the chain's levels in order: a finished level (made by its spec) is skipped, an interrupted one
    resumed (``overwrite``: restarted); returns the chain's per-level results, which ``OUT/summary.json`` adds
    to the other levels finished in ``OUT`` (:func:`_levels_in`)."""
    first = chain.levels[0].derive
    if first.parent is not None and not (Path(first.parent) / "last.safetensors").is_file():
        raise ConfigError(f"--levels starts at {first.level}, whose parent {LEVELS[first.level].parent} has no run "
                          f"in {first.parent}; start the chain higher or pass its --out")
    out = Path(chain.out)
    result = {"scheme": LEVELS[first.level].scheme, "loss": first.loss, "teacher": str(resolve(first.top)),
              "levels": {}}
    for spec in chain.levels:  # each level a run of the pipeline in OUT/<level>, taught by the one above
        level, run_path, asked = spec.derive.level, Path(spec.out), spec.record()
        summary = finished_summary(run_path, asked, as_record)
        if summary is None:
            resume = (run_path / "train_state.pt").is_file() and not overwrite
            summary = run(spec, resume=resume, overwrite=overwrite, cli=cli)
            mark_done(run_path, asked)
        else:
            print(f"[skip] {level}: finished in {run_path}")
        result["levels"][level] = {k: summary.get(k) for k in (
            "last_test_acc", "best_test_acc", "params", "macs", "fused_test_acc", "epochs")}
    atomic_write_text(out / "summary.json", json.dumps(_levels_in(out, result), indent=2) + "\n")
    return result


def _levels_in(out: Path, result: dict[str, Any]) -> dict[str, Any]:
    """What ``OUT/summary.json`` holds: every level finished in ``out``, each with its scheme, loss and teacher,
    in chain order (forward, then backward): ``result``'s levels, and those an earlier call recorded (another
    scheme, or levels above these) whose run is still there."""
    levels: dict[str, Any] = {}
    try:
        before = json.loads((out / "summary.json").read_text())
        for level, values in before["levels"].items():  # a summary written before levels carried these
            levels[level] = {"scheme": before.get("scheme"), "loss": before.get("loss"),
                             "teacher": before.get("teacher"), **values}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    levels = {level: values for level, values in levels.items()
              if level in LEVELS and (out / level / "summary.json").is_file()}
    for level, values in result["levels"].items():
        levels[level] = {"scheme": result["scheme"], "loss": result["loss"], "teacher": result["teacher"], **values}
    order = [level for scheme in SCHEMES for level in chain_levels(scheme)]
    return {"levels": {level: levels[level] for level in order if level in levels}}


# ----------------------------------------------------------------------------------------------- shared steps
def _device_and_data(spec: RunSpec) -> tuple[RunSpec, Any, Any, Any]:
    """Set up the device (torchrun's rank, seed) and load the data: ``spec`` with its runtime and loader resolved,
    the rank, the device and the loaders."""
    info, device, runtime = setup(spec.runtime, spec.optim.seed)
    data, data_spec = load_data(spec.data, spec.optim.seed, runtime.channels_last, info, device)
    return replace(spec, data=data_spec, runtime=runtime), info, device, data


def _fit(trainer: Trainer, resume: bool) -> dict:
    """Train, from the run's last epoch with ``resume``; the summary."""
    if resume:
        trainer.resume()
    return trainer.fit()


# ----------------------------------------------------------------------------------------------- run directory
def _with_out(spec: RunSpec, default_name: str) -> RunSpec:
    """``spec`` with its run directory: ``--out`` (``~`` expanded), else ``runs/<default_name>``."""
    if spec.out is not None and not str(spec.out).strip():
        raise ConfigError("--out is empty; pass a folder for the run, or leave --out out for runs/<its name>")
    return replace(spec, out=str(user_path(spec.out) if spec.out else Path("runs") / default_name))


#: The derivations' fields that name a file or run directory (``Fresh.model`` may too: :func:`is_checkpoint_path`).
PATH_FIELDS = ("teacher", "top", "parent", "structure_from", "weights")


def with_absolute_paths(derive: Any) -> Any:
    """``derive`` with each existing file or folder it names made absolute, as ``spec.json`` records it: a
    ``--config RUN`` rerun from another folder reads the same teacher (``~`` is expanded; other values stay)."""
    names = [f for f in PATH_FIELDS if isinstance(getattr(derive, f, None), str)]
    if isinstance(derive, Fresh) and is_checkpoint_path(derive.model):
        names.append("model")
    changes = {}
    for name in names:
        with contextlib.suppress(ConfigError, OSError):
            path = user_path(getattr(derive, name))
            if path.exists():
                changes[name] = os.path.abspath(path)
    return replace(derive, **changes)


def _run_dir(spec: RunSpec, info, resume: bool, overwrite: bool, cli: dict[str, Any], data,
             reads: dict[str, Path] | None = None):
    """The run directory of the resolved ``spec``, recording it (``spec.json``), how it was asked for (``cli``:
    the command, or ``module`` None from Python, and ``asked``, the spec's record before it was resolved) and what
    it reads while it trains (``inputs``: the data's identity, the SHA-256 of each checkpoint of ``reads``, such as
    the teacher), which a ``--resume`` must find unchanged. An ``--out`` that holds one of ``reads`` is refused."""
    reads = reads or {}
    spec = replace(spec, derive=with_absolute_paths(spec.derive))
    out = Path(spec.out).resolve()
    for role, path in reads.items():
        if out in Path(path).resolve().parents:
            raise ConfigError(f"--out {spec.out} holds the {role} this run learns from ({path}); pass another --out "
                              "(--overwrite there would replace it)")
    inputs = {"data": data_identity(data), **{role: {"path": str(path), "sha256": file_sha256(path)}
                                              for role, path in reads.items()}}
    module = MODULES[spec.kind]
    if cli["module"] is None:  # from Python: the command that repeats it reads the spec it writes
        cli = {**cli, "module": module, "argv": ["--config", str(Path(spec.out) / "spec.json")]}
    argv = sys.argv[1:] if cli["argv"] is None else list(cli["argv"])
    record = {"command": command_line(cli["module"], argv), "argv": options_of_run(argv),
              "args": options_of(spec), "spec": spec.to_dict(), "asked": cli["asked"], "world_size": info.world_size,
              "inputs": inputs}

    def spec_differences(recorded: dict[str, Any], unchanged: set[str]) -> list[str]:
        # a checkpoint it reads, moved with the same bytes: the same run
        moved = {name for name, value in vars(spec.derive).items() if isinstance(value, str)
                 and any(_names(value, reads[role]) for role in unchanged & set(reads))}
        return differences(recorded, spec, frozenset(moved))

    return make_run_dir(spec.out, info, record, resume=resume, overwrite=overwrite, spec_differences=spec_differences)


def _names(value: str, checkpoint: Path) -> bool:
    """Whether the option's ``value`` names ``checkpoint`` (its file, or the run directory holding it)."""
    try:
        return resolve(value) == checkpoint
    except (CheckpointError, ConfigError):
        return False
