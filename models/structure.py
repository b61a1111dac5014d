"""Structure patches: how a model differs from what its config builds, as JSON, so it rebuilds without pickle.

Pruning changes channel counts and BatchNorm folding turns BNs into ``Identity`` and gives convs a bias, in
place. A checkpoint records such changes as ``config["structure"]``: ``{module path: spec}`` where a spec names a
layer type and its constructor arguments, for the layers whose shape can change::

    {"layer1.0.conv1": {"type": "Conv2d", "in_channels": 16, "out_channels": 12, "kernel_size": [3, 3], ...},
     "layer1.0.bn1": {"type": "Identity"}}

Three kinds take what they need from the layer the config builds at that path: ``{"type": "Removed"}`` (a
branch a ``reparameterize()`` deleted, as timm's RepVGG blocks do), ``{"type": "FoldedNormAct"}`` (timm's
``BatchNormAct2d`` with its BatchNorm folded: its dropout and activation are kept) and a subclass of a torch layer,
resized by pruning (``{"type": "BatchNorm2d", "num_features": 12, ..., "class": "timm.layers...BatchNormAct2d"}``).
A fourth kind keeps the module the config builds and only resizes parameters it holds itself, which pruning cuts
with the channels they scale (ConvNeXt's layer scale): ``{"type": "Resized", "gamma": [40]}`` (name: shape).

:func:`structure_diff` finds them by comparing a model with a fresh build of its config;
:func:`apply_structure` replaces those modules in a fresh build, which then loads the weights strictly.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError
from .layers import FoldedNormAct

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


REMOVED = {"type": "Removed"}
RESIZED = "Resized"
#: The most dimensions a resized parameter's recorded shape may have (a checkpoint's record allows lists of 8).
_MAX_DIMS = 8


def _class_name(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def module_spec(module: nn.Module) -> dict[str, Any] | None:
    """The spec of a layer whose shape a patch can change, or None for any other module. A subclass of such a
    layer (timm's ``BatchNormAct2d``, ``Linear``) is recorded as its torch layer with its ``class`` named."""
    if type(module) is FoldedNormAct:
        return {"type": "FoldedNormAct"}
    kind = next((k for k in type(module).__mro__ if k in _SPECS), None)
    if kind is None:
        return None
    spec: dict[str, Any] = {"type": kind.__name__, **{k: _json(getattr(module, k)) for k in _SPECS[kind]}}
    if kind in (nn.Conv2d, nn.Linear):
        spec["bias"] = module.bias is not None
    if type(module) is not kind:
        spec["class"] = _class_name(type(module))
    return spec


def build_module(spec: dict[str, Any], built: nn.Module | None = None) -> nn.Module:
    """A fresh layer from its spec (weights uninitialised in meaning: they are loaded afterwards); ``built``: the
    layer the config builds at that path, which the kinds that keep part of it need."""
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k not in ("type", "class")}
    kind = spec.get("type")
    if kind == "FoldedNormAct":
        try:
            return FoldedNormAct.of(built)
        except ConfigError as e:
            raise CheckpointError(f"a FoldedNormAct patch needs a norm-activation layer there: {e}") from None
    if kind not in _TYPES:
        raise CheckpointError(f"structure patch names layer type {kind!r}; known: {', '.join(_TYPES)}")
    fresh = _BUILDERS[kind](**kw) if kind in _BUILDERS else _TYPES[kind](**kw)
    if "class" not in spec:
        return fresh
    if built is None or _class_name(type(built)) != spec["class"]:
        raise CheckpointError(f"structure patch records a {spec['class']}, but the model builds a "
                              f"{_class_name(type(built)) if built is not None else 'nothing'} there")
    return _in_class_of(built, fresh)


def _in_class_of(built: nn.Module, fresh: nn.Module) -> nn.Module:
    """A copy of ``built`` (a subclass of ``fresh``'s torch layer: timm's ``BatchNormAct2d`` keeps its activation)
    with ``fresh``'s shape: its arguments, weights and statistics."""
    layer = copy.deepcopy(built)
    for k in _SPECS[type(fresh)]:
        setattr(layer, k, getattr(fresh, k))
    for name, value in [*fresh.named_parameters(recurse=False), *fresh.named_buffers(recurse=False)]:
        setattr(layer, name, value)
    if isinstance(fresh, (nn.Conv2d, nn.Linear)) and fresh.bias is None:
        layer.bias = None
    return layer


def structure_diff(model: nn.Module, base: nn.Module) -> dict[str, dict[str, Any]]:
    """``{path: spec}`` of every layer of ``model`` that differs from (or is missing in) ``base``, and of every other
    module (the model itself included) whose own parameters were resized (:func:`resized_spec`).

    Raises:
        CheckpointError: a module of another kind changed, which no patch can express.
    """
    base_modules = dict(base.named_modules())
    patch = {}
    for path, module in model.named_modules():
        spec, other = module_spec(module), base_modules.get(path)
        if spec is None or not path:  # the model itself is never replaced, only its own parameters resized
            if other is None or type(other) is not type(module):
                raise CheckpointError(f"{path} ({type(module).__name__}) differs from the model its config builds, "
                                      "and only Conv2d, Linear, BatchNorm, GroupNorm, LayerNorm and Identity layers "
                                      "can be recorded; save its state_dict with safetensors instead")
            resized = resized_spec(path, module, other)
            if resized:
                patch[path] = resized
            continue
        if other is None or module_spec(other) != spec:
            patch[path] = spec
    paths = dict(model.named_modules())
    for path in base_modules:  # a branch its reparameterize() deleted: its topmost module, in a layer not replaced
        parent = path.rpartition(".")[0]
        if path and path not in paths and parent in paths and not _inside(parent, patch):
            patch[path] = dict(REMOVED)
    return patch


def resized_spec(path: str, module: nn.Module, base: nn.Module) -> dict[str, Any] | None:
    """The ``Resized`` spec of the parameters that ``module`` holds itself (not its layers') whose shapes differ
    from those of ``base`` (the same kind of module, as its config builds it): ``{"type": "Resized", name: shape}``,
    or None when none differs. A parameter only one of them holds is left to the strict load that follows.

    Raises:
        CheckpointError: a resized parameter that a patch cannot name or record.
    """
    built = dict(base.named_parameters(recurse=False))
    changed = {}
    for name, param in module.named_parameters(recurse=False):
        if name not in built or param.shape == built[name].shape:
            continue
        if name == "type" or param.dim() > _MAX_DIMS:
            raise CheckpointError(f"{path + '.' if path else ''}{name} was resized, and a structure patch cannot "
                                  f"record a parameter named 'type' or of more than {_MAX_DIMS} dimensions; save "
                                  "its state_dict with safetensors instead")
        changed[name] = list(param.shape)
    return {"type": RESIZED, **changed} if changed else None


def _inside(path: str, patch: dict[str, Any]) -> bool:
    """Whether ``path`` is, or lies inside, a layer that ``patch`` replaces (a ``Resized`` one is kept)."""
    return any((path == p or path.startswith(p + ".")) and spec.get("type") != RESIZED for p, spec in patch.items())


def apply_structure(model: nn.Module, patch: dict[str, dict[str, Any]]) -> nn.Module:
    """Replace the layers named in ``patch`` by fresh ones of their recorded shapes, in place."""
    for path, spec in patch.items():
        if isinstance(spec, dict) and spec.get("type") == RESIZED:
            resize_parameters(model, path, spec)
            continue
        parent_path, _, name = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise CheckpointError(f"structure patch names {path}, which this model does not have") from None
        if not isinstance(spec, dict):
            raise CheckpointError(f"structure patch of {path} is not a layer spec")
        built = parent._modules.get(name)
        if spec == REMOVED:
            if built is None:
                raise CheckpointError(f"structure patch removes {path}, which this model does not have")
            delattr(parent, name)
            continue
        try:
            setattr(parent, name, build_module(spec, built))
        except (TypeError, ValueError) as e:  # ValueError: groups that do not divide the channels, ...
            raise CheckpointError(f"structure patch of {path} cannot be built ({e})") from None
    return model


def resize_parameters(model: nn.Module, path: str, spec: dict[str, Any]) -> None:
    """Give the parameters that the module at ``path`` holds itself the shapes ``spec`` (a ``Resized`` spec)
    records, in place, on their device and dtype; their values are loaded afterwards."""
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise CheckpointError(f"structure patch names {path}, which this model does not have") from None
    for name, shape in spec.items():
        if name == "type":
            continue
        where = f"{path}.{name}" if path else name
        old = module._parameters.get(name)
        if old is None:
            raise CheckpointError(f"structure patch resizes {where}, which this model does not have")
        if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS
                and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise CheckpointError(f"structure patch gives {where} the shape {shape!r}; a shape is a list of sizes")
        fresh = torch.empty(shape, dtype=old.dtype, device=old.device)
        setattr(module, name, nn.Parameter(fresh, requires_grad=old.requires_grad))
