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
from .errors import CheckpointError, ConfigError, ReduceNetError, brief
from .identity import card_of, set_card
from .registry import classifier_of, model_from_config
from .structure import apply_structure, structure_diff

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
                                      ignored_layers=[classifier(pruned)], round_to=round_to)
        pruner.step()
        with torch.no_grad():
            pruned(example)  # the pruned graph must still compute
    except ReduceNetError:
        raise
    except Exception as e:  # Torch-Pruning and the forward raise many kinds; all mean "cannot prune this"
        raise TrimError(f"Torch-Pruning cannot prune {model.config.get('model', type(model).__name__)} "
                        f"({brief(e)}){_culprit(model, example)}") from None
    return pruned


def classifier(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The layer a trim keeps whole: the model's classifier (:func:`models.registry.classifier_of`), an
    ``nn.Linear`` or a 1x1 conv.

    Raises:
        TrimError: the model has neither.
    """
    try:
        return classifier_of(model)
    except ConfigError as e:
        raise TrimError(f"{e}; trim keeps the classifier whole and needs one of them") from None


def _culprit(model: nn.Module, example: torch.Tensor) -> str:
    """The clause of a failed prune's message naming what Torch-Pruning probably cannot handle: a module that
    splits its channels by fixed sizes (a channel shuffle, attention heads, DPN's slices), or one holding parameters
    of its own outside the layers Torch-Pruning knows, then what to do instead."""
    guesses = [g for g in (_channel_reshaper(model, example), _odd_parameters(model)) if g]
    where = f"; the layer it cannot handle is probably {' or '.join(guesses)}" if guesses else ""
    return f"{where}; trim another model, or distil this one into a smaller one (train.stage2 --teacher RUN -m MODEL)"


def _odd_parameters(model: nn.Module) -> str | None:
    """The first module holding parameters of its own that is not a layer Torch-Pruning knows, named (the model
    itself, as a ViT's class token and position embedding, by its class and those parameters), or None."""
    for path, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)]
        if own and not isinstance(module, _KNOWN):
            if path:
                return f"{path} ({type(module).__name__})"
            return f"the model itself ({type(module).__name__}: its own parameters {', '.join(own)})"
    return None


def _channel_reshaper(model: nn.Module, example: torch.Tensor) -> str | None:
    """The innermost module whose forward first splits its channels by fixed sizes, named with how; None when none
    does. Torch-Pruning's graph cannot follow either way, as it prunes the channels and keeps the sizes: a reshape
    into groups (``x.view(n, g, c // g, h, w)`` in a channel shuffle, ``qkv.reshape(n, t, 3, heads, d)`` in
    attention) or a slice at a fixed channel (``x[:, :k]`` in DPN's dual paths)."""
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415 (needed only to explain a failure)

    probe = copy.deepcopy(model).eval()
    names = {m: n for n, m in probe.named_modules()}
    running: list[nn.Module] = []
    found: list[str] = []

    class Splits(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            how = _channel_split(func, args, out) if running and not found else None
            if how:
                module = running[-1]
                found.append(f"{names[module] or 'the model itself'} ({type(module).__name__}: it {how}, which "
                             "Torch-Pruning cannot follow)")
            return out

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # a hook returning a value would replace the output
        running.pop()

    hooks = [h for m in probe.modules()
             for h in (m.register_forward_pre_hook(lambda m, a: running.append(m)), m.register_forward_hook(leave))]
    try:
        with torch.no_grad(), Splits():
            probe(example)
    except Exception:  # noqa: BLE001 (a best guess for a message: a model that does not run has no answer)
        return None
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


_RESHAPES = (torch.Tensor.view, torch.Tensor.reshape, torch.reshape, torch.Tensor.unflatten, torch.unflatten)


def _channel_split(func: Callable, args: tuple, out: Any) -> str | None:
    """How the call ``func(*args)``, which returned ``out``, splits the channels by fixed sizes, or None."""
    if not (args and isinstance(args[0], torch.Tensor) and isinstance(out, torch.Tensor)):
        return None
    if func in _RESHAPES and _splits_channels(tuple(args[0].shape), tuple(out.shape)):
        return "reshapes its channels into groups"
    index = args[1] if func is torch.Tensor.__getitem__ and len(args) > 1 else None
    if (args[0].dim() == 4 and isinstance(index, tuple) and len(index) > 1 and isinstance(index[0], slice)
            and index[0] == slice(None) and isinstance(index[1], slice) and out.shape[1] < args[0].shape[1]):
        return "slices its channels at a fixed channel"
    return None


def _splits_channels(before: tuple[int, ...], after: tuple[int, ...]) -> bool:
    """Whether a reshape from ``before`` to ``after`` splits the channels into several dimensions: those of an
    ``(n, c, h, w)`` feature map, or the last of ``(n, tokens, c)``, the others kept."""
    if len(after) <= len(before) or len(before) not in (3, 4):
        return False
    if len(before) == 4:
        return after[:1] == before[:1] and after[-2:] == before[-2:]
    return after[:2] == before[:2]


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
    """``trimmed`` with the card of ``model`` and the structure patch that rebuilds it from ``model``'s config.

    Raises:
        TrimError: the patch would not rebuild it (pruning resized a tensor no patch records), so it could not be
            saved: refused now, before any fine-tuning.
    """
    config = model.config
    base = model_from_config({k: v for k, v in config.items() if k != "structure"})
    try:
        patch = structure_diff(trimmed, base)
    except CheckpointError as e:
        raise TrimError(f"the trimmed {config['model']} could not be saved: {e}") from None
    _check_rebuilds(trimmed, apply_structure(base, patch), config["model"])
    return set_card(trimmed, replace(card_of(model), structure=patch or None))


def _check_rebuilds(trimmed: nn.Module, rebuilt: nn.Module, name: str) -> None:
    """Refuse, naming the first tensor, a trimmed model whose structure patch rebuilds tensors of other shapes."""
    shapes = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    state = trimmed.state_dict()
    for key, tensor in state.items():
        if shapes.get(key) != tuple(tensor.shape):
            raise TrimError(f"pruning resized {key} of {name} to {tuple(tensor.shape)}, which its structure patch "
                            f"cannot record (it rebuilds {shapes.get(key, 'no such tensor')}), so the trimmed model "
                            "could not be saved; trim another model")
    extra = next((k for k in shapes if k not in state), None)
    if extra is not None:
        raise TrimError(f"the structure patch of the trimmed {name} rebuilds {extra}, which pruning removed, so the "
                        "trimmed model could not be saved; trim another model")


def trim_record(result: TrimResult) -> dict[str, Any]:
    """What a trimmed checkpoint's metadata records about the trim."""
    return {"by": result.by, "reduce_reached": result.reduction, "pruning_ratio": result.ratio,
            "cost_before": result.cost_before, "cost_after": result.cost_after}
