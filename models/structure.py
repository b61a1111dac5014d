"""Structure patches: how a model differs from what its config builds, as JSON, so it rebuilds without pickle.

Pruning changes channel counts and BatchNorm folding turns BNs into ``Identity`` and gives convs a bias, in
place. A checkpoint records such changes as ``config["structure"]``: ``{module path: spec}`` where a spec names a
layer type and its constructor arguments, for the layers whose shape can change::

    {"layer1.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 12, "kernel_size": [3, 3], ...},
     "layer1.0.bn1": {"type": "Identity"}}

:func:`structure_diff` finds them by comparing a model with a fresh build of its config;
:func:`apply_structure` replaces those modules in a fresh build, which then loads the weights strictly.
"""
from __future__ import annotations

from typing import Any, Callable

import torch.nn as nn

from .errors import CheckpointError

_SPECS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.GroupNorm: ("num_groups", "num_channels", "eps", "affine"),
    nn.LayerNorm: ("normalized_shape", "eps", "elementwise_affine"),
    nn.Identity: (),
}
_TYPES: dict[str, type] = {t.__name__: t for t in _SPECS}
_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "Conv2d": lambda bias, **kw: nn.Conv2d(bias=bias, **kw),
    "Linear": lambda bias, **kw: nn.Linear(bias=bias, **kw),
}


def _json(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """The spec of a layer whose shape a patch can change, or None for any other module."""
    kind = type(module)
    if kind not in _SPECS:
        return None
    spec: dict[str, Any] = {"type": kind.__name__, **{k: _json(getattr(module, k)) for k in _SPECS[kind]}}
    if kind in (nn.Conv2d, nn.Linear):
        spec["bias"] = module.bias is not None
    return spec


def build_module(spec: dict[str, Any]) -> nn.Module:
    """A fresh layer from its spec (weights uninitialised in meaning: they are loaded afterwards)."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "type"}
    kind = spec.get("type")
    if kind not in _TYPES:
        raise CheckpointError(f"structure patch names layer type {kind!r}; known: {', '.join(_TYPES)}")
    if kind in _BUILDERS:
        return _BUILDERS[kind](**kw)
    return _TYPES[kind](**kw)


def structure_diff(model: nn.Module, base: nn.Module) -> dict[str, dict[str, Any]]:
    """``{path: spec}`` of every layer of ``model`` that differs from (or is missing in) ``base``.

    Raises:
        CheckpointError: a module of another kind changed, which no patch can express.
    """
    base_modules = dict(base.named_modules())
    patch = {}
    for path, module in model.named_modules():
        if not path:
            continue
        spec, other = module_spec(module), base_modules.get(path)
        if spec is None:
            if other is None or type(other) is not type(module):
                raise CheckpointError(f"{path} ({type(module).__name__}) differs from the model its config builds, "
                                      "and only Conv2d, Linear, BatchNorm, GroupNorm, LayerNorm and Identity layers "
                                      "can be recorded; save its state_dict with safetensors instead")
            continue
        if other is None or module_spec(other) != spec:
            patch[path] = spec
    return patch


def apply_structure(model: nn.Module, patch: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the layers named in ``patch`` by fresh ones of their recorded shapes, in place."""
    for path, spec in patch.items():
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise CheckpointError(f"structure patch names {path}, which this model does not have") from None
        if not isinstance(spec, dict):
            raise CheckpointError(f"structure patch of {path} is not a layer spec")
        try:
            setattr(parent, name, build_module(spec))
        except (TypeError, ValueError) as e:  # ValueError: groups that do not divide the channels, ...
            raise CheckpointError(f"structure patch of {path} cannot be built ({e})") from None
    return model
