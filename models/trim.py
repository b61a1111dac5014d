"""Trimming: structural pruning of any classifier to a cost budget, keeping the surviving weights.

Breed-Net's promise, done with Torch-Pruning's dependency graph (Fang et al., CVPR 2023): the channels of every
layer are pruned by the same ratio, groups of coupled layers (residual additions, BatchNorms, depthwise convs)
together, the least important channels first (``l2``/``l1`` magnitude, ``lamp``, ``bn`` scale, ``random``), the
classifier kept whole. :func:`trim` finds the ratio whose measured cost (MACs, parameters or a latency the caller
measures) is ``1 / reduce`` of the original's, within a tolerance. The trimmed model keeps its weights, and its
config gains a ``structure`` patch (:mod:`models.structure`), so it saves, reloads without pickle, fuses and can
be trimmed again.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from .complexity import count_macs, count_params
from .errors import ConfigError, ReduceNetError, brief
from .identity import card_of, set_card
from .registry import classifier_of, model_from_config
from .structure import structure_diff

IMPORTANCES = ("l2", "l1", "lamp", "bn", "random")
COSTS = ("macs", "params", "latency")
#: The largest pruning ratio tried: above it Torch-Pruning leaves groups that would lose every channel unpruned,
#: so the cost stops falling (a ResNet-20 keeps 1/132 of its MACs at 0.9, 1/1.5 at 0.97).
MAX_RATIO = 0.9
#: Layer types Torch-Pruning knows how to prune; a module holding parameters of another kind is named on failure.
_KNOWN = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d, nn.LayerNorm, nn.GroupNorm, nn.PReLU, nn.Embedding)


class TrimError(ReduceNetError, ValueError):
    """The model cannot be trimmed as asked (a layer Torch-Pruning cannot handle, an unreachable budget)."""


@dataclass
class TrimResult:
    """A trimmed model and what trimming it measured."""

    model: nn.Module
    ratio: float  # the channel pruning ratio used
    cost_before: float
    cost_after: float
    by: str

    @property
    def reduction(self) -> float:
        return self.cost_before / self.cost_after


def _torch_pruning():
    """Torch-Pruning, imported where a trim needs it: the rest of the project (training, fusing, the tables without
    trims) runs where it is not installed."""
    try:
        import torch_pruning
    except ImportError:
        raise TrimError("trimming needs Torch-Pruning, which is not installed: pip install torch-pruning") from None
    return torch_pruning


def _importance(name: str):
    imp = _torch_pruning().pruner.importance
    return {"l2": lambda: imp.MagnitudeImportance(p=2), "l1": lambda: imp.MagnitudeImportance(p=1),
            "lamp": lambda: imp.LAMPImportance(p=2), "bn": lambda: imp.BNScaleImportance(),
            "random": lambda: imp.RandomImportance()}[name]()


def prune(model: nn.Module, ratio: float, input_size: tuple[int, ...], importance: str = "l2",
          round_to: int | None = None) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of the channels of every prunable group removed (the classifier kept)."""
    pruned = copy.deepcopy(model).eval()
    param = next(pruned.parameters())
    example = torch.zeros(input_size, device=param.device, dtype=param.dtype)
    tp = _torch_pruning()
    try:
        pruner = tp.pruner.BasePruner(pruned, example, importance=_importance(importance), pruning_ratio=ratio,
                                      ignored_layers=[classifier_of(pruned)], round_to=round_to)
        pruner.step()
        with torch.no_grad():
            pruned(example)  # the pruned graph must still compute
    except ReduceNetError:
        raise
    except Exception as e:  # Torch-Pruning and the forward raise many kinds; all mean "cannot prune this"
        odd = next((f"{n} ({type(m).__name__})" for n, m in model.named_modules()
                    if not isinstance(m, _KNOWN) and any(True for _ in m.parameters(recurse=False))), None)
        where = f"; the layer it cannot handle is probably {odd}" if odd else ""
        raise TrimError(f"Torch-Pruning cannot prune {model.config.get('model', type(model).__name__)} "
                        f"({brief(e)}){where}") from None
    return pruned


def trim(model: nn.Module, reduce: float, by: str = "macs", input_size: tuple[int, ...] = (1, 3, 32, 32),
         importance: str = "l2", round_to: int | None = None, tolerance: float = 0.03,
         latency: Callable[[nn.Module], float] | None = None,
         log: Callable[[str], None] | None = None) -> TrimResult:
    """Prune ``model`` until its cost is ``1 / reduce`` of the original's, within ``tolerance`` (relative).

    Args:
        model: any classifier built by :func:`models.create_model` (zoo, torchvision, timm, or already trimmed).
        reduce: the cost reduction factor, > 1 (2 halves the MACs, say).
        by: ``macs``, ``params`` or ``latency`` (then ``latency(model) -> seconds`` is measured by the caller).
        input_size: the input the costs are measured at, batch included.
        importance: how channels are ranked, one of :data:`IMPORTANCES`.
        round_to: keep channel counts multiples of this (hardware-friendly widths); None for any count.
        tolerance: the largest relative distance of the reached cost from the target.
        log: called with a line per ratio tried (the search prunes the model up to 17 times).

    Returns:
        The trimmed copy (with ``config["structure"]`` and the original's preprocessing) and its costs.

    Raises:
        ConfigError: a bad argument. TrimError: Torch-Pruning cannot prune the model, or no ratio meets the
            target within the tolerance (e.g. because of ``round_to``); the message says what was reached.
    """
    if not (math.isfinite(reduce) and reduce > 1.0):
        raise ConfigError(f"reduce must be a finite number > 1 (2 halves the cost), got {reduce}")
    if by not in COSTS:
        raise ConfigError(f"cost {by!r} is not one of {', '.join(COSTS)}")
    if importance not in IMPORTANCES:
        raise ConfigError(f"importance {importance!r} is not one of {', '.join(IMPORTANCES)}")
    if round_to is not None and round_to < 1:
        raise ConfigError(f"round_to must be a whole number >= 1, got {round_to}")
    if by == "latency" and latency is None:
        raise ConfigError("trimming by latency needs a latency(model) function that measures it")
    config = getattr(model, "config", None)
    if not isinstance(config, dict) or "model" not in config:
        raise ConfigError("trim needs a model built by models.create_model or loaded from a checkpoint")
    widest = max((m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)), default=0)
    if round_to is not None and round_to > widest:
        raise ConfigError(f"round_to {round_to} exceeds the widest conv's {widest} channels; pass a multiple such as 8")
    say = log or (lambda line: None)

    def cost(m: nn.Module) -> float:
        if by == "macs":
            return float(count_macs(m, input_size))
        return float(count_params(m)) if by == "params" else latency(m)

    before = cost(model)
    target = before / reduce
    lo, hi, best = 0.0, MAX_RATIO, None
    least = cost(prune(model, hi, input_size, importance, round_to))  # the most that pruning can remove
    if least > target * (1 + tolerance):
        raise TrimError(f"pruning removes at most 1/{before / least:.3g} of the {by} of this model (ratio {hi}); "
                        f"pass --reduce {before / least * 0.9:.3g} or less")
    for i in range(16):  # bisection on the ratio; cost falls as the ratio grows (in steps with round_to)
        mid = (lo + hi) / 2
        candidate = prune(model, mid, input_size, importance, round_to)
        c = cost(candidate)
        say(f"trim: ratio {mid:.3f} leaves 1/{before / c:.3g} of the {by} (target 1/{reduce:g}, try {i + 1})")
        if best is None or abs(c - target) < abs(best[2] - target):
            best = (mid, candidate, c)
        if abs(c - target) <= tolerance * target:
            break
        lo, hi = (mid, hi) if c > target else (lo, mid)
    ratio, trimmed, after = best
    if abs(after - target) > tolerance * target:
        raise TrimError(f"no pruning ratio reaches 1/{reduce:g} of the {by} within {tolerance:.0%}: the closest is "
                        f"1/{before / after:.3g} (ratio {ratio:.3f}); change --reduce or --round-to")
    return TrimResult(_with_structure(trimmed, model), ratio, before, after, by)


def trim_at(model: nn.Module, ratio: float, input_size: tuple[int, ...] = (1, 3, 32, 32), importance: str = "l2",
            round_to: int | None = None) -> nn.Module:
    """``model`` pruned at channel ``ratio`` (a ratio :func:`trim` chose): the same trimmed network, with the same
    surviving weights, for a deterministic ``importance``; its config carries the structure patch."""
    return _with_structure(prune(model, ratio, input_size, importance, round_to), model)


def _with_structure(trimmed: nn.Module, model: nn.Module) -> nn.Module:
    config = model.config
    base = model_from_config({k: v for k, v in config.items() if k != "structure"})
    return set_card(trimmed, replace(card_of(model), structure=structure_diff(trimmed, base) or None))


def trim_record(result: TrimResult) -> dict[str, Any]:
    """What a trimmed checkpoint's metadata records about the trim."""
    return {"by": result.by, "reduce_reached": result.reduction, "pruning_ratio": result.ratio,
            "cost_before": result.cost_before, "cost_after": result.cost_after}
