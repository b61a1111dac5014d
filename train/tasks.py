"""What the engine trains: a *task*, an ``nn.Module`` whose ``forward(x, y)`` returns the loss and what to log.

A task holds everything the optimiser, DDP, checkpoints and resume must hold: the student and any trainable
adapters of its losses (FitNet regressors, SemCKD embeddings), as registered submodules. A frozen teacher is
held outside the module tree (:class:`Taught`), so it is neither optimised nor saved with the task.

Intermediate features come from the models by module path, with forward hooks (:class:`FeatureHooks`): a
model's ``forward`` is never edited. :func:`stage_outputs` finds a model's stage outputs, the default
feature-distillation points.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.errors import ConfigError
from models.vgg import hint_points

from .callbacks import Callback
from .distill import DistillLoss, gram_loss, hint_mse
from .schedules import DKDWarmup, PyramidPhases


#: The keys of a task's output that are not logged terms.
TASK_OUTPUTS = ("loss", "logits", "teacher_logits")


class Task(nn.Module):
    """Base class: ``forward(x, y) -> dict``, as timm's tasks: ``loss`` (what is optimised), ``logits`` (the
    student's), ``teacher_logits`` where a teacher ran (for the diagnosis of a non-finite loss), and any other
    0-dim tensors, which are logged as named terms (``metrics.csv`` columns). ``student`` is the model being
    trained."""

    student: nn.Module

    def callbacks(self) -> list[Callback]:
        """The schedules this task's losses follow (a warm-up, phases), as callbacks the trainer runs first."""
        return []

    def to_device(self, device: torch.device, memory_format: torch.memory_format) -> Task:
        return self.to(device, memory_format=memory_format)


class Classify(Task):
    """Cross-entropy training of one model (stage 1, a scratch student)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.student = model

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self.student(x)
        return {"loss": F.cross_entropy(logits, y), "logits": logits}


class FeatureHooks:
    """Keep the outputs of named submodules of ``model`` from its last forward pass, via forward hooks.

    Args:
        model: any model.
        paths: module paths, as in ``model.named_modules()`` (e.g. ``"layer2"``, ``"features.6"``).

    Raises:
        ConfigError: a path names no module; the message lists the model's top-level modules.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str]) -> None:
        modules = dict(model.named_modules())
        missing = [p for p in paths if p not in modules or not p]
        if missing:
            top = ", ".join(n for n, _ in model.named_children())
            raise ConfigError(f"feature layer {missing[0]!r} is not a module of {type(model).__name__}; "
                              f"use module paths such as {top}")
        self.paths = list(paths)
        self.outputs: dict[str, Tensor] = {}
        self._handles = [modules[p].register_forward_hook(self._keep(p)) for p in self.paths]

    def _keep(self, path: str):
        def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
            self.outputs[path] = output
        return hook

    def take(self) -> list[Tensor]:
        """The kept outputs in ``paths`` order; the store is emptied."""
        out = [self.outputs[p] for p in self.paths]
        self.outputs = {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def _probe(model: nn.Module, input_size: Sequence[int]) -> None:
    """One eval-mode forward pass of a zero image on the model's device and dtype; the model's mode is kept."""
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)


def layer_channels(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> list[int]:
    """The channels of each named module's output, from one forward pass.

    Raises:
        ConfigError: a module's output is not a feature map (N, C, H, W), which feature distillation needs.
    """
    hooks = FeatureHooks(model, paths)
    try:
        _probe(model, input_size)
        outputs = hooks.take()
    finally:
        hooks.remove()
    for path, t in zip(paths, outputs):
        if t.dim() != 4:
            raise ConfigError(f"feature layer {path!r} of {type(model).__name__} outputs shape {tuple(t.shape)}, not a "
                              "feature map (N, C, H, W): pick a conv stage (the default layers are its stage outputs)")
    return [t.shape[1] for t in outputs]


@torch.no_grad()
def stage_outputs(model: nn.Module, input_size: Sequence[int], count: int = 3) -> list[str]:
    """The module paths of the model's last ``count`` stage outputs: at each spatial resolution of its forward
    pass, the last top-level module (or child of a top-level ``Sequential``/``ModuleList``) that outputs a feature
    map of that size; global pooling (1x1) does not count.

    ReduceNet gives ``layer1, layer2, layer3``; torchvision's ResNet-18 at 224 px ``layer2, layer3, layer4``.
    """
    candidates: dict[nn.Module, str] = {}
    for name, child in model.named_children():
        candidates[child] = name
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for sub, grandchild in child.named_children():
                candidates[grandchild] = f"{name}.{sub}"
    order: list[tuple[str, tuple[int, int]]] = []

    def hook(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, Tensor) and output.dim() == 4 and output.shape[-1] > 1:
            order.append((candidates[module], tuple(output.shape[-2:])))

    handles = [m.register_forward_hook(hook) for m in candidates]
    try:
        _probe(model, input_size)
    finally:
        for h in handles:
            h.remove()
    last: dict[tuple[int, int], str] = {}
    for name, size in order:
        last.pop(size, None)  # re-insert: dict order is the order of the last use of each size
        last[size] = name
    stages = list(last.values())
    if not stages:
        raise ConfigError(f"{type(model).__name__} shows no feature maps at its top level; pass --feature-layers")
    return stages[-count:]


class Taught(Task):
    """Base class of a student learning from a frozen teacher, which is held outside the module tree: neither
    optimised nor saved with the task, always run in eval mode without gradients.

    Args:
        student: the model being trained.
        teacher: the frozen teacher (its inputs prepared by ``teacher_input``).
        teacher_input: maps the student's batch to the teacher's preprocessing (default: the same batch).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, teacher_input: nn.Module | None = None) -> None:
        super().__init__()
        self.student = student
        self.teacher_input = teacher_input or nn.Identity()
        object.__setattr__(self, "teacher", teacher.eval().requires_grad_(False))  # not a submodule

    def to_device(self, device: torch.device, memory_format: torch.memory_format) -> Taught:
        object.__setattr__(self, "teacher", self.teacher.to(device, memory_format=memory_format))
        return self.to(device, memory_format=memory_format)

    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher's logits of the student's batch ``x`` (eval mode, no gradients)."""
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(self.teacher_input(x))


class Distill(Taught):
    """A student learning from a frozen teacher: a logit loss, plus an optional feature loss.

    Args:
        student: the model being trained.
        teacher: the frozen teacher (its inputs prepared by ``teacher_input``).
        loss: the logit-level loss (:class:`~train.distill.DistillLoss`; kind ``none`` is plain CE).
        feature_loss: a module ``(student_feats, teacher_feats) -> loss`` with its own trainable adapters, or None.
        student_layers: module paths of the student's features for ``feature_loss``.
        teacher_layers: the teacher's, one per student layer.
        teacher_input: maps the student's batch to the teacher's preprocessing (default: the same batch).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DistillLoss,
                 feature_loss: nn.Module | None = None, student_layers: Sequence[str] = (),
                 teacher_layers: Sequence[str] = (), teacher_input: nn.Module | None = None) -> None:
        super().__init__(student, teacher, teacher_input)
        self.loss = loss
        self.feature_loss = feature_loss
        self._hooks: tuple[FeatureHooks, FeatureHooks] | None = None
        if feature_loss is not None:
            if not student_layers or not teacher_layers:
                raise ConfigError(f"feature distillation needs student and teacher layers, got {list(student_layers)}"
                                  f" and {list(teacher_layers)}")
            self._hooks = (FeatureHooks(student, student_layers), FeatureHooks(teacher, teacher_layers))

    def callbacks(self) -> list[Callback]:
        return [DKDWarmup(self.loss)] if self.loss.warmup_epochs else []

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self.student(x)
        out = {"logits": logits}
        if self.loss.needs_teacher or self._hooks:
            out["teacher_logits"] = self.teacher_logits(x)
        loss = self.loss(logits, y, out.get("teacher_logits"))
        if self._hooks is not None:
            student_feats, teacher_feats = self._hooks[0].take(), self._hooks[1].take()
            feat = self.feature_loss(student_feats, teacher_feats)
            out.update(loss_logits=loss.detach(), loss_features=feat.detach())
            loss = loss + feat
        return {"loss": loss, **out}


# ----------------------------------------------------------------------------------------------- the Pyramid
LOSSES = ("two-stage", "gram", "hinton", "fitnet", "gram-direct", "kd", "scratch")
TAUGHT_BY_TOP = ("fitnet", "gram-direct")


def _hint_logits(logits: Tensor, t_logits: Tensor, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    return hint_mse(logits, t_logits)


def _hint_gram(logits: Tensor, t_logits: Tensor, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    return gram_loss(s_feats[0], s_feats[1], t_feats[0], t_feats[1])


def _hint_output(logits: Tensor, t_logits: Tensor, s_feats: list[Tensor], t_feats: list[Tensor]) -> Tensor:
    return hint_mse(s_feats[0], t_feats[0])


#: Each loss's stage 1 (``(logits, teacher logits, student features, teacher features) -> loss``) and the
#: activations it reads (:class:`~models.vgg.HintPoints` keys); ``scratch`` has none.
HINT_LOSSES = {"two-stage": (_hint_output, ("output",)), "fitnet": (_hint_output, ("output",)),
               "kd": (_hint_output, ("output",)), "gram": (_hint_gram, ("input", "prepool")),
               "gram-direct": (_hint_gram, ("input", "prepool")), "hinton": (_hint_logits, ())}


class PyramidLevel(Taught):
    """One level's training: a stage-1 loss for ``hint_epochs`` epochs, then cross-entropy (or KD for ``kd``);
    the stage is set before each epoch by :class:`~train.schedules.PyramidPhases` (:meth:`callbacks`).

    Args:
        student: the level, built from its parent by :func:`models.vgg.svgg_from`.
        teacher: the frozen teacher (the level above, or VGG19).
        loss: one of :data:`LOSSES`.
        hint_epochs: epochs of stage 1 (0: none).
        student_paths: ``{"output", "input", "prepool"}`` module paths of the student (:class:`HintPoints`).
        teacher_paths: the same for the teacher.
        kd: the stage-2 loss of ``kd``.
        teacher_input: maps the student's batch to the teacher's preprocessing.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str, hint_epochs: int,
                 student_paths: dict[str, str], teacher_paths: dict[str, str], kd: DistillLoss | None = None,
                 teacher_input: nn.Module | None = None) -> None:
        super().__init__(student, teacher, teacher_input)
        if loss not in LOSSES:
            raise ConfigError(f"--loss {loss} is not a Pyramid loss; choose from {', '.join(LOSSES)}")
        if (loss == "kd") != (kd is not None):
            raise ConfigError("the Pyramid's kd loss needs its stage-2 distillation loss, and only it takes one")
        self.kind, self.hint_epochs, self.kd = loss, hint_epochs, kd
        self.hint_loss, keys = HINT_LOSSES.get(loss, (None, ()))
        if hint_epochs and self.hint_loss is None:
            raise ConfigError(f"--loss {loss} has no stage 1: pass --hint-epochs 0")
        self._hooks = None
        if keys:
            self._hooks = (FeatureHooks(student, [student_paths[k] for k in keys]),
                           FeatureHooks(teacher, [teacher_paths[k] for k in keys]))
        self.stage = 1 if hint_epochs else 2

    def callbacks(self) -> list[Callback]:
        warmup = [DKDWarmup(self.kd, offset=self.hint_epochs)] if self.kd is not None and self.kd.warmup_epochs else []
        return [PyramidPhases(self), *warmup]

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self.student(x)
        hint = self.stage == 1
        t_logits = self.teacher_logits(x) if hint or self.kd is not None else None
        out = {"logits": logits, "stage": logits.new_tensor(float(self.stage))}
        if t_logits is not None:
            out["teacher_logits"] = t_logits
        s_feats = self._hooks[0].take() if self._hooks else []
        t_feats = self._hooks[1].take() if self._hooks and t_logits is not None else []
        if hint:
            loss = self.hint_loss(logits, t_logits, s_feats, t_feats)
        elif self.kd is not None:
            loss = self.kd(logits, y, t_logits)
        else:
            loss = F.cross_entropy(logits, y)
        return {"loss": loss, **out}


def teacher_paths(level: str, taught_by_top: bool) -> dict[str, str]:
    """The module paths of the teacher's activations for ``level``'s stage 1: in its parent, or in VGG19."""
    points = hint_points(level)
    paths = {"output": points.teacher_output, "input": points.teacher_input, "prepool": points.teacher_prepool}
    if taught_by_top and points.replaced != "head":  # VGG19 still has every block the level above replaced
        k = int(points.teacher_output.removeprefix("features.block"))
        paths["input"] = "features.block1.conv1" if k == 2 else f"features.block{k - 1}"
    return paths
