"""One registry: ``create_model`` / ``list_models`` here, and every entry also in timm's registry.

Each factory is decorated with :func:`register_model`, which records it here and with timm's
``@register_model``, so after ``import models`` both ``models.create_model('reduce56')`` and
``timm.create_model('reduce56')`` work. The factory stores ``model.config``: the registry name plus the
keyword arguments, which is all a checkpoint needs to rebuild the model.
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
from typing import Any, Callable

import torch.nn as nn
from timm.models import register_model as timm_register_model

from .errors import ConfigError, UnknownModelError

_MODELS: dict[str, Callable[..., nn.Module]] = {}
# Keyword arguments timm.create_model passes to every entrypoint; ours take no pretrained weights.
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a factory under its function name, here and in timm."""
    name = fn.__name__

    @functools.wraps(fn)
    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            raise ConfigError(f"no pretrained weights are published for {name}; train one with "
                              f"`python -m train.stage1 -m {name}` or load a checkpoint")
        model = fn(**kwargs)
        model.config = {"model": name, **model.config}
        return model

    _MODELS[name] = factory
    timm_register_model(factory)
    return factory


def list_models(pattern: str = "*") -> list[str]:
    """Names of the registered models matching a glob ``pattern``, in registration order."""
    return [n for n in _MODELS if fnmatch.fnmatchcase(n, pattern)]


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model.

    Args:
        name: a name from :func:`list_models`, e.g. ``"reduce56"``.
        **kwargs: the family's arguments (``num_classes``, ``width``, ``expansion``, ``lora_rank``, ...).

    Raises:
        UnknownModelError: ``name`` is not registered; the message lists the close matches.
        ConfigError: an argument is not valid.
    """
    if name not in _MODELS:
        close = difflib.get_close_matches(name, _MODELS, n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"choose one of {', '.join(_MODELS)}"
        raise UnknownModelError(f"unknown model {name!r}: {hint} (`python -m models` lists the zoo)")
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        if "got an unexpected keyword" not in str(e) and "got multiple values" not in str(e):
            raise
        detail = str(e).split("() ", 1)[-1]  # "got an unexpected keyword argument 'x'" / "got multiple values..."
        raise ConfigError(f"{name} {detail}; see its docstring for the arguments it takes") from None


def model_from_config(config: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild a model from its ``config`` (as stored in checkpoints), with optional overrides."""
    cfg = {**config, **overrides}
    return create_model(cfg.pop("model"), **cfg)
