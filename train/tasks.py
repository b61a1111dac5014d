"""What the engine trains: a *task*, an ``nn.Module`` whose ``forward(x, y)`` returns the loss and what to log.

A task holds everything the optimiser, DDP, checkpoints and resume must hold: the student and any trainable
adapters of its losses (FitNet regressors, SemCKD embeddings), as registered submodules. A frozen teacher is
held outside the module tree (:class:`Taught`), so it is neither optimised nor saved with the task.

Intermediate features come from the models by module path, with forward hooks (:class:`FeatureHooks`): a
model's ``forward`` is never edited. :func:`stage_outputs` finds a model's stage outputs, the default
feature-distillation points; :func:`feature_maps` probes named layers (their channels, whether they are
channels-last, whether a later in-place op changes them), from the model alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from models.errors import ConfigError
from models.identity import input_size as model_input_size
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

    What is kept is what each module returned: a layer flagged in ``clone`` is copied in its hook (a later in-place
    op, e.g. a ``ReLU(inplace=True)`` after a BatchNorm, would change it), and :meth:`take` refuses, in eager mode,
    a kept output that something changed in place since (an in-place op the probe did not see: one that runs in
    train mode only). A layer flagged in ``channels_last`` outputs (N, H, W, C) and is given as (N, C, H, W).
    :meth:`probed` sets both flags from the model (:func:`feature_maps`).

    Args:
        model: any model.
        paths: module paths, as in ``model.named_modules()`` (e.g. ``"layer2"``, ``"features.6"``).
        channels_last: per path, whether its output is channels-last (default: none is).
        clone: per path, whether its output is copied when kept (default: none is).

    Raises:
        ConfigError: a path names no module; the message lists the model's top-level modules.
    """

    def __init__(self, model: nn.Module, paths: Sequence[str], channels_last: Sequence[bool] = (),
                 clone: Sequence[bool] = ()) -> None:
        modules = _modules(model, paths)
        self.paths = list(paths)
        self.name = type(model).__name__
        self.channels_last = [bool(c) for c in channels_last] or [False] * len(self.paths)
        clone = [bool(c) for c in clone] or [False] * len(self.paths)
        if len(self.channels_last) != len(self.paths) or len(clone) != len(self.paths):
            raise ValueError(f"need one channels_last and one clone flag per path, got {len(self.channels_last)} and "
                             f"{len(clone)} for {len(self.paths)} paths")
        self.clone = clone
        self.outputs: dict[str, Tensor] = {}
        self._versions: dict[str, int] = {}
        self._handles = [modules[p].register_forward_hook(self._keep(p, c)) for p, c in zip(self.paths, clone)]

    @classmethod
    def probed(cls, model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> FeatureHooks:
        """Hooks on ``paths`` whose channels-last and clone flags come from probing ``model`` at ``input_size``
        (:func:`feature_maps`), so that they are the same for a fresh and a resumed run.

        Raises:
            ConfigError: a path is not a module, or its output is not one feature map (see :func:`feature_maps`).
        """
        maps = feature_maps(model, paths, input_size)
        return cls(model, paths, [m.channels_last for m in maps], [m.changed_in_place for m in maps])

    def _keep(self, path: str, clone: bool):
        def hook(module: nn.Module, inputs: object, output: Tensor) -> None:
            if clone:
                self.outputs[path] = output.clone()
                return
            self.outputs[path] = output
            # not while compiling (reading _version breaks the graph), nor for inference tensors (which have none:
            # a model timed or evaluated under torch.inference_mode with the hooks on)
            if isinstance(output, Tensor) and not torch.compiler.is_compiling() and not output.is_inference():
                self._versions[path] = output._version
        return hook

    def take(self) -> list[Tensor]:
        """The kept outputs in ``paths`` order, channels-last ones permuted to (N, C, H, W); the store is emptied.

        Raises:
            ConfigError: (eager mode) an output was changed in place after its module returned it.
        """
        out = []
        for path, channels_last in zip(self.paths, self.channels_last):
            t = self.outputs[path]
            if path in self._versions and t._version != self._versions[path]:
                self.outputs, self._versions = {}, {}
                raise ConfigError(f"feature layer {path!r} of {self.name} is changed in place after it returns (by a "
                                  "later in-place op of the forward pass, e.g. an inplace ReLU or dropout), so the kept"
                                  " map is not its output: pick another layer")
            out.append(t.permute(0, 3, 1, 2) if channels_last else t)
        self.outputs, self._versions = {}, {}
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


def _modules(model: nn.Module, paths: Sequence[str]) -> dict[str, nn.Module]:
    """``{path: module}`` of ``paths`` in ``model``.

    Raises:
        ConfigError: a path names no module; the message lists the model's top-level modules.
    """
    modules = dict(model.named_modules())
    missing = [p for p in paths if p not in modules or not p]
    if missing:
        top = ", ".join(n for n, _ in model.named_children())
        raise ConfigError(f"feature layer {missing[0]!r} is not a module of {type(model).__name__}; "
                          f"use module paths such as {top}")
    return {p: modules[p] for p in paths}


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


def _calls(model: nn.Module, modules: dict[str, nn.Module], input_size: Sequence[int]
           ) -> list[tuple[str, object, bool]]:
    """Every call of ``modules`` in one probe (:func:`_probe`) at ``input_size``, in order: its path, its output and
    whether that output was changed in place later in the forward pass (its ``_version`` moved)."""
    calls: list[tuple[str, object, int | None]] = []

    def keep(path: str):
        def hook(module: nn.Module, inputs: object, output: object) -> None:
            tracked = isinstance(output, Tensor) and not output.is_inference()
            calls.append((path, output, output._version if tracked else None))
        return hook

    handles = [m.register_forward_hook(keep(p)) for p, m in modules.items()]
    try:
        _probe(model, input_size)
    finally:
        for h in handles:
            h.remove()
    return [(p, out, version is not None and out._version != version) for p, out, version in calls]


def _wider_calls(model: nn.Module, modules: dict[str, nn.Module], input_size: Sequence[int]
                 ) -> dict[str, list[object]] | None:
    """The outputs of each of ``modules`` at ``input_size`` twice as wide, or None where the model refuses that
    input (a model built for one size)."""
    try:
        calls = _calls(model, modules, [*input_size[:-1], 2 * input_size[-1]])
    except Exception:  # whatever a fixed-size model raises (assert, ValueError, RuntimeError)
        return None
    outputs: dict[str, list[object]] = {p: [] for p in modules}
    for path, out, _ in calls:
        outputs[path].append(out)
    return outputs


def _channels_last(shape: Sequence[int], wider: object) -> bool | None:
    """Whether a 4-D output of ``shape`` at a square input is (N, H, W, C) (True) or (N, C, H, W) (False), or None
    where it cannot be told. ``wider``: the same output at an input twice as wide (None if the model refused it):
    the one dim that changed is the width. Else (or if that is not clear) the shape's pattern: the two equal dims
    of a square map are its height and width."""
    if isinstance(wider, Tensor) and wider.dim() == 4:
        changed = [i for i in (1, 2, 3) if wider.shape[i] != shape[i]]
        if changed in ([2], [3]):
            return changed == [2]
    a, b, c = shape[1:]
    if b == c != a:
        return False
    if a == b != c:
        return True
    return None


@dataclass(frozen=True)
class FeatureMap:
    """What a probe shows of a module's output (:func:`feature_maps`).

    Attributes:
        channels: C.
        size: (H, W) at the probe's input size.
        channels_last: the module outputs (N, H, W, C) (torchvision's Swin, timm's MambaOut), not (N, C, H, W).
        changed_in_place: a later in-place op of the forward pass changes the output (it must be copied to be kept).
    """

    channels: int
    size: tuple[int, int]
    channels_last: bool
    changed_in_place: bool


def feature_maps(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> list[FeatureMap]:
    """What each named module outputs, from an eval-mode forward pass of a zero image at ``input_size`` (square),
    and one twice as wide where the model takes it (its spatial dims are those that change).

    Raises:
        ConfigError: a path is not a module, is not called or is called more than once in a forward pass, or its
            output is not a feature map (a tuple, not 4-D, or a 4-D shape whose channel dim cannot be told).
    """
    modules = _modules(model, paths)
    name = type(model).__name__
    outputs: dict[str, list[tuple[object, bool]]] = {p: [] for p in paths}
    for path, out, changed in _calls(model, modules, input_size):
        outputs[path].append((out, changed))
    for path in paths:
        calls = outputs[path]
        if not calls:
            raise ConfigError(f"feature layer {path!r} of {name} is not called in a forward pass: pick a module that "
                              "computes the features (the default layers are its stage outputs)")
        if len(calls) > 1:
            raise ConfigError(f"feature layer {path!r} of {name} is called {len(calls)} times in a forward pass, so "
                              "its output is ambiguous: pick another layer (e.g. the block that calls it)")
        t = calls[0][0]
        if not isinstance(t, Tensor):
            raise ConfigError(f"feature layer {path!r} of {name} outputs a {type(t).__name__}, not a feature map "
                              "(N, C, H, W): pick another layer (the default layers are its stage outputs)")
        if t.dim() != 4:
            raise ConfigError(f"feature layer {path!r} of {name} outputs shape {tuple(t.shape)}, not a feature map "
                              "(N, C, H, W): pick a conv stage (the default layers are its stage outputs)")
    wider = _wider_calls(model, modules, input_size) or {}
    maps = []
    for path in paths:
        (t, changed), = outputs[path]
        other = wider.get(path, [])
        channels_last = _channels_last(t.shape, other[0] if len(other) == 1 else None)
        if channels_last is None:
            why = "its shape does not follow the input's width" if other else "the model refuses a wider input"
            raise ConfigError(f"feature layer {path!r} of {name} outputs shape {tuple(t.shape)} at {list(input_size)}"
                              f", whose channel dim cannot be told from its height and width ({why}): pick another "
                              "layer")
        n, *dims = t.shape
        c, h, w = (dims[2], dims[0], dims[1]) if channels_last else dims
        maps.append(FeatureMap(c, (h, w), channels_last, changed))
    return maps


def layer_channels(model: nn.Module, paths: Sequence[str], input_size: Sequence[int]) -> list[int]:
    """The channels of each named module's output (its C, channels-last outputs included), from a probe.

    Raises:
        ConfigError: a module's output is not one feature map, which feature distillation needs (see
            :func:`feature_maps`).
    """
    return [m.channels for m in feature_maps(model, paths, input_size)]


@torch.no_grad()
def stage_outputs(model: nn.Module, input_size: Sequence[int], count: int = 3) -> list[str]:
    """The module paths of the model's last ``count`` stage outputs: at each spatial resolution of its forward
    pass, the last top-level module (or child of a top-level ``Sequential``/``ModuleList``) that outputs a feature
    map of that size, (N, C, H, W) or channels-last (N, H, W, C) (:func:`feature_maps` tells them apart); global
    pooling (width 1) does not count, nor does a module called more than once (its output is ambiguous).

    ReduceNet gives ``layer1, layer2, layer3``; torchvision's ResNet-18 at 224 px ``layer2, layer3, layer4``.

    Raises:
        ConfigError: the model shows no feature map at its top level.
    """
    candidates: dict[nn.Module, str] = {}
    for name, child in model.named_children():
        candidates[child] = name
        if isinstance(child, (nn.Sequential, nn.ModuleList)):
            for sub, grandchild in child.named_children():
                candidates[grandchild] = f"{name}.{sub}"
    modules = {name: module for module, name in candidates.items()}
    calls = _calls(model, modules, input_size)
    count_of: dict[str, int] = {}
    for path, _, _ in calls:
        count_of[path] = count_of.get(path, 0) + 1
    maps = [(path, out) for path, out, _ in calls
            if count_of[path] == 1 and isinstance(out, Tensor) and out.dim() == 4]
    wider = (_wider_calls(model, {p: modules[p] for p, _ in maps}, input_size) if maps else None) or {}
    order: list[tuple[str, tuple[int, int]]] = []
    for path, out in maps:
        other = wider.get(path, [])
        channels_last = _channels_last(out.shape, other[0] if len(other) == 1 else None)
        if channels_last is None:
            continue
        size = tuple(out.shape[1:3]) if channels_last else tuple(out.shape[2:])
        if size[1] > 1:
            order.append((path, size))
    last: dict[tuple[int, int], str] = {}
    for name, size in order:
        last.pop(size, None)  # re-insert: dict order is the order of the last use of each size
        last[size] = name
    stages = list(last.values())
    if not stages:
        raise ConfigError(f"{type(model).__name__} shows no feature maps at its top level; name its feature layers")
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

    The feature layers are probed (:meth:`FeatureHooks.probed`) at construction, from the models alone, so that a
    resumed run reads them as a fresh one: channels-last outputs reach ``feature_loss`` as (N, C, H, W), and an
    output that a later in-place op changes is copied when kept.

    Args:
        student: the model being trained.
        teacher: the frozen teacher (its inputs prepared by ``teacher_input``).
        loss: the logit-level loss (:class:`~train.distill.DistillLoss`; kind ``none`` is plain CE).
        feature_loss: a module ``(student_feats, teacher_feats) -> loss`` with its own trainable adapters, or None.
        student_layers: module paths of the student's features for ``feature_loss``.
        teacher_layers: the teacher's, one per student layer.
        teacher_input: maps the student's batch to the teacher's preprocessing (default: the same batch).
        input_size: ``(C, H, W)`` to probe the feature layers at, that of the training images (default: each
            model's recorded input size, :func:`models.identity.input_size`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: DistillLoss,
                 feature_loss: nn.Module | None = None, student_layers: Sequence[str] = (),
                 teacher_layers: Sequence[str] = (), teacher_input: nn.Module | None = None,
                 input_size: Sequence[int] | None = None) -> None:
        super().__init__(student, teacher, teacher_input)
        self.loss = loss
        self.feature_loss = feature_loss
        self._hooks: tuple[FeatureHooks, FeatureHooks] | None = None
        if feature_loss is not None:
            if not student_layers or not teacher_layers:
                raise ConfigError(f"feature distillation needs student and teacher layers, got {list(student_layers)}"
                                  f" and {list(teacher_layers)}")
            self._hooks = (FeatureHooks.probed(student, student_layers, input_size or model_input_size(student)),
                           FeatureHooks.probed(teacher, teacher_layers, input_size or model_input_size(teacher)))

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
