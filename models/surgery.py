"""Model surgery: derive the student from a trained teacher."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .errors import ConfigError
from .grow import add_lora_to_convs, is_grown, ungrow
from .identity import card_of, set_card, set_preprocess
from .layers import add_lora
from .registry import is_reducible, model_from_config


def inherit(child: nn.Module, parent: nn.Module, keys: Iterable[str]) -> nn.Module:
    """Make ``child`` a sub-network of ``parent``: copy the parent's tensors at ``keys`` into it, bit for bit.

    Every other tensor of ``child`` keeps its own initialisation. The child moves to the parent's device and
    dtype and takes its train/eval mode and ``preprocess`` (the inputs the inherited weights expect).

    Args:
        child: the smaller model; each key must name a tensor of the same shape in both.
        parent: the trained model.
        keys: the state_dict keys to copy.

    Returns:
        ``child``.
    """
    param = next(parent.parameters())
    child.to(device=param.device, dtype=param.dtype)
    parent_state, child_state = parent.state_dict(), child.state_dict()
    with torch.no_grad():
        child.load_state_dict({**child_state, **{k: parent_state[k] for k in keys}}, strict=True)
    set_preprocess(child, getattr(parent, "preprocess", None))
    child.train(parent.training)
    return child


def student_from_teacher(
    teacher: nn.Module, lora_rank: int = 0, lora_targets: Sequence[str] | None = None
) -> nn.Module:
    """Build the student of a ReduceNet-style teacher, inheriting every shared tensor.

    The student is the teacher's config with ``expansion=0``: branch (b) of every block is dropped and
    everything else (stem, branch (a), final convs, BatchNorms with running statistics, shortcuts,
    classifier) is copied. LoRA branches, if any, are added afterwards and start at zero, so the student
    computes exactly the teacher-without-branch-(b) function.

    Args:
        teacher: a registered model built with ``expansion >= 1``.
        lora_rank: rank of the LoRA branches to add; 0 for none.
        lora_targets: globs over conv names; the family's default when None.

    Returns:
        The student, on the teacher's device and dtype, in the teacher's train/eval mode.
    """
    config = getattr(teacher, "config", None)
    if not config or "model" not in config:
        raise ConfigError("student_from_teacher needs a model built by models.create_model (it has no .config)")
    if is_grown(teacher):  # any classifier grown by models.grow: the original network, every tensor inherited
        student = ungrow(teacher)
        if lora_rank and is_reducible(config):
            _add_lora(student, teacher, lora_rank, lora_targets or config["lora_targets"])
        elif lora_rank:  # any other classifier: a branch beside every kxk conv that feeds a BatchNorm
            add_lora_to_convs(student, lora_rank, lora_targets)
            student.train(teacher.training)
        return student
    if not is_reducible(config):
        raise ConfigError(f"{config['model']} has no teacher branch to remove: student_from_teacher takes ReduceNet's "
                          "families (python -m models lists them); distil it with train.stage2 --teacher instead")
    if not config["expansion"]:
        raise ConfigError(f"this {config['model']} is already a student (expansion=0): "
                          "pass a teacher trained with expansion >= 1")
    student = model_from_config(config, expansion=0, lora_rank=0)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    missing = [k for k in student_state if k not in teacher_state or teacher_state[k].shape != student_state[k].shape]
    if missing:  # cannot happen for the registered families; guards new ones
        raise ConfigError(f"the teacher lacks the student's tensors {missing[:3]}...; is its family registered?")
    inherit(student, teacher, student_state)
    if lora_rank:
        _add_lora(student, teacher, lora_rank, lora_targets or config["lora_targets"])
    return student


def add_zoo_lora(student: nn.Module, rank: int, targets: Sequence[str] | None = None) -> nn.Module:
    """LoRA branches of rank ``rank`` on a zoo student's convs (``targets``, else its family's), in place, recorded
    in its card: what ``create_model(..., lora_rank=rank)`` builds, added after its weights were loaded."""
    config = getattr(student, "config", None) or {}
    if not is_reducible(config) or config.get("expansion"):
        raise ConfigError(f"add_zoo_lora takes a student of ReduceNet's families, got {config.get('model')}")
    _add_lora(student, student, rank, targets or config["lora_targets"])
    return student


def _add_lora(student: nn.Module, teacher: nn.Module, rank: int, targets: str | Sequence[str]) -> None:
    targets = [targets] if isinstance(targets, str) else list(targets)
    add_lora(student, rank, targets)
    set_card(student, card_of(student).with_args(lora_rank=rank, lora_targets=targets))
    student.train(teacher.training)  # the new branches too
