"""Grow any classifier into a ReduceNet teacher, and shrink it back into itself.

ReduceNet's idea is not tied to its CIFAR ResNets: give a conv a removable non-linear branch (b) beside it,
``Conv(k×k, in→E·out, same stride/padding/dilation) → BN → ReLU → Conv1x1(→out) → BN``, summed with the conv's
output **before** the conv's BatchNorm (the published block); train that larger teacher; then drop the
branches, and the student is exactly the original network with every remaining weight inherited.

:func:`grow` finds the convs that feed a BatchNorm on the model's ``torch.fx`` graph (:func:`conv_bn_pairs`, as BN
folding does), never by editing a ``forward``, and wraps each chosen one in a :class:`GrownConv2d`. By default it
grows every such conv with a kernel larger than 1x1 and groups 1; ``targets`` (globs over module paths) choose
others; a ReduceNet-family student grows its blocks' first convs, so that ``grow(student, E)`` is the zoo's teacher
of ``expansion=E`` (the same function on the same weights). The model's card records ``{"expansion", "modules"}``,
so a grown checkpoint rebuilds without pickle. :func:`ungrow` removes every branch: the state_dict is then exactly
the original architecture's.
"""
from __future__ import annotations

import copy
from dataclasses import replace
from fnmatch import fnmatch
from typing import Sequence

import torch.nn as nn
from torch import Tensor

from .errors import ConfigError, ReparamError
from .graph import conv_bn_pairs
from .identity import card_of, set_card

#: The most channels of a branch relative to its conv's output (a record asking for more is refused).
MAX_EXPANSION = 64
#: Families whose student grows into their zoo teacher: where the zoo puts branch (b). A family whose branch spans
#: several convs (reduce_mobilenetv2: expand and depthwise) cannot be grown conv by conv: its zoo builds it.
FAMILY_TARGETS = {"ReduceNet": ("layer*.conv1.conv",)}
SPANNING_FAMILIES = {"ReduceMobileNetV2": "its branch (b) spans the expand and depthwise convs"}


class GrownConv2d(nn.Module):
    """A conv with ReduceNet's branch (b) beside it: ``conv(x) + branch_b(x)``, before the conv's BatchNorm."""

    def __init__(self, conv: nn.Conv2d, expansion: int) -> None:
        super().__init__()
        mid = expansion * conv.out_channels
        self.conv = conv
        self.branch_b = nn.Sequential(
            nn.Conv2d(conv.in_channels, mid, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                      bias=False),
            nn.BatchNorm2d(mid), nn.ReLU(inplace=False), nn.Conv2d(mid, conv.out_channels, 1, bias=False),
            nn.BatchNorm2d(conv.out_channels))
        for m in self.branch_b:
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.branch_b.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.branch_b(x)

    def reparameterize(self) -> None:
        raise ReparamError("it is a grown teacher's non-linear branch (b), which no conv can replace; take the "
                           "student with models.ungrow(teacher) (train.stage2 --inherit) and fuse that")

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """Refused as :meth:`reparameterize` is (a zoo ConvBN asks its conv for one kernel): branch (b) is not
        linear."""
        self.reparameterize()
        raise AssertionError("unreachable")


def _names(globs: str | Sequence[str] | None) -> list[str] | None:
    """Targets or module paths as a list: one string is one glob (not a sequence of one-letter globs)."""
    return None if globs is None else [globs] if isinstance(globs, str) else list(globs)


def default_targets(model: nn.Module) -> tuple[str, ...] | None:
    """The globs a family grows by default (its zoo teacher's branch points), or None: every eligible conv."""
    return FAMILY_TARGETS.get(type(model).__name__)


def eligible(model: nn.Module, targets: str | Sequence[str] | None = None) -> list[str]:
    """The convs :func:`grow` gives a branch: of the convs that feed a BatchNorm, those matching ``targets`` (else the
    family's, else those with a kernel larger than 1x1 and groups 1). A glob picks dense convs only; a grouped or
    depthwise conv is grown (with a dense branch) only when a target names it exactly.

    Raises:
        ConfigError: the model has no such conv, or one of ``targets`` matches none.
    """
    name = type(model).__name__
    if name in SPANNING_FAMILIES:
        raise ConfigError(f"{name} cannot be grown conv by conv: {SPANNING_FAMILIES[name]}; build its teacher with "
                          "--expansion E")
    modules = dict(model.named_modules())
    if any(isinstance(m, GrownConv2d) for m in modules.values()):
        raise ConfigError(f"{name} is grown already; grow its student (models.ungrow) instead")
    convs = [c for c, _ in conv_bn_pairs(model)]
    targets = _names(targets)
    globs = list(targets) if targets else list(default_targets(model) or ())
    such = f"such convs are {', '.join(convs[:6])}{', ...' if len(convs) > 6 else ''}"
    unmatched = [g for g in targets or () if not any(fnmatch(c, g) for c in convs)]
    if unmatched:
        raise ConfigError(f"--grow-targets {unmatched[0]} matches no conv that feeds a BatchNorm in {name}; {such}")
    if globs:
        chosen = [c for c in convs if c in globs or modules[c].groups == 1 and any(fnmatch(c, g) for g in globs)]
        if not chosen:
            raise ConfigError(f"--grow-targets {' '.join(globs)} matches only grouped/depthwise convs in {name}: name "
                              f"each one to grow it with a dense branch, or pick dense convs; {such}")
        return chosen
    chosen = [c for c in convs if modules[c].kernel_size != (1, 1) and modules[c].groups == 1]
    if not chosen:
        grouped = [c for c in convs if modules[c].groups > 1]
        hint = (f"its convs before a BatchNorm are 1x1 or grouped/depthwise ({', '.join(grouped[:3])}...); name "
                "the ones to grow with --grow-targets" if convs else "no conv of it feeds a BatchNorm")
        raise ConfigError(f"{name} has no conv to grow: {hint}")
    return chosen


def grow(model: nn.Module, expansion: int, targets: str | Sequence[str] | None = None,
         modules: Sequence[str] | None = None) -> nn.Module:
    """Give the chosen convs of ``model`` (see :func:`eligible`; or exactly ``modules``, from a record) branch (b)
    of width ``expansion`` times their output, in place; returns ``model``, its card recording the growth.

    Raises:
        ConfigError: ``expansion`` is not a whole number in [1, MAX_EXPANSION], or no conv can be grown.
    """
    if isinstance(expansion, bool) or not isinstance(expansion, int) or not 1 <= expansion <= MAX_EXPANSION:
        raise ConfigError(f"--grow {expansion!r} is not valid: pass a branch width factor in [1, {MAX_EXPANSION}]")
    paths = _names(modules) if modules is not None else eligible(model, targets)
    return _wrap_convs(model, paths, lambda conv: GrownConv2d(conv, expansion), "grow",
                       grow={"expansion": expansion, "modules": paths})


def _wrap_convs(model: nn.Module, paths: Sequence[str], wrap, what: str, **record: dict) -> nn.Module:
    """Replace each conv at ``paths`` by ``wrap(conv)``, in place, and write ``record`` (one card field: ``grow``
    or ``lora``) into the model's card; returns ``model``. One line for a path that is not a conv, or a conv
    ``wrap`` refuses (naming it); the model is changed only once every conv is wrapped."""
    wrapped = []
    for path in paths:
        parent, _, name = path.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            conv = getattr(owner, name)
        except AttributeError:
            raise ConfigError(f"{what}: {type(model).__name__} has no module {path}") from None
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"{what}: {path} is a {type(conv).__name__}, not a Conv2d")
        try:
            wrapped.append((owner, name, wrap(conv)))
        except ConfigError as e:
            raise ConfigError(f"{what} on {path}: {e}") from None
    for owner, name, module in wrapped:
        setattr(owner, name, module)
    card = card_of(model)
    if card is not None:
        set_card(model, replace(card, **record))
    return model


def add_lora_to_convs(model: nn.Module, rank: int, targets: str | Sequence[str] | None = None,
                      modules: Sequence[str] | None = None) -> nn.Module:
    """LoRA branches (:class:`~models.layers.LoRAConv2d`, rank ``rank``, LambdaReLU inside) on the convs of any
    classifier that feed a BatchNorm (kxk, groups 1; or those ``targets`` name; or exactly ``modules``, from a
    record), in place; the card records them, so the student saves, reloads and fuses (the branch folds into its
    conv, the BN into that). The zoo's own ``add_lora`` serves its ConvBN layers.

    Raises:
        ConfigError: ``rank`` is not a whole number >= 1 or more than any chosen conv can use
            (:func:`~models.layers.lora_rank_limit`), or no conv qualifies.
    """
    from .layers import LoRAConv2d, check_lora_rank  # noqa: PLC0415 (layers imports the zoo's helpers)

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"--lora-rank {rank!r} is not valid: pass a rank >= 1")
    paths = _names(modules) if modules is not None else _plain_convs(model, _names(targets))
    named = dict(model.named_modules())  # a path that is no conv is refused by _wrap_convs, after this check
    check_lora_rank(rank, {p: named[p] for p in paths if isinstance(named.get(p), nn.Conv2d)}, "--lora-rank")
    return _wrap_convs(model, paths, lambda conv: LoRAConv2d(conv, rank), "LoRA",
                       lora={"rank": rank, "modules": paths})


def _plain_convs(model: nn.Module, targets: Sequence[str] | None) -> list[str]:
    modules = dict(model.named_modules())
    convs = [c for c, _ in conv_bn_pairs(model)]
    chosen = ([c for c in convs if any(fnmatch(c, g) for g in targets)] if targets else
              [c for c in convs if modules[c].kernel_size != (1, 1) and modules[c].groups == 1])
    if not chosen:
        raise ConfigError(f"no conv of {type(model).__name__} can take a LoRA branch"
                          + (f" among --lora-targets {' '.join(targets)}" if targets else ""))
    return chosen


def is_grown(model: nn.Module) -> bool:
    return any(isinstance(m, GrownConv2d) for m in model.modules())


def ungrow(model: nn.Module) -> nn.Module:
    """A copy of a grown ``model`` without its branches: the original architecture, every other tensor inherited
    bit for bit, in the model's train/eval mode."""
    student = copy.deepcopy(model)
    for path, m in list(student.named_modules()):
        if isinstance(m, GrownConv2d):
            parent, _, name = path.rpartition(".")
            setattr(student.get_submodule(parent) if parent else student, name, m.conv)
    card = card_of(model)
    if card is not None:
        set_card(student, replace(card, grow=None))
    return student
