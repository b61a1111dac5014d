"""One registry: ``create_model`` / ``list_models`` here, and every entry also in timm's registry.

Each zoo factory is decorated with :func:`register_model`, which records it here and with timm's
``@register_model``, so after ``import models`` both ``models.create_model('reduce56')`` and
``timm.create_model('reduce56')`` work. Any classifier of torchvision or timm is a model too, by a prefixed
name: ``torchvision:resnet18`` (``torchvision.models.get_model``) and ``timm:resnet18``
(``timm.create_model``), always built without downloading weights (``--weights FILE`` loads a user's).

Every model gets ``model.config``: the name plus the keyword arguments, which is all a checkpoint needs to
rebuild it, and ``model.num_classes``. A config may also carry ``structure``, the layers that pruning or
BatchNorm folding changed (:mod:`models.structure`).
"""
from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
from dataclasses import replace
from typing import Any, Callable

import torch.nn as nn
from timm.models import register_model as timm_register_model

from .errors import ConfigError, UnknownModelError
from .identity import ModelCard, card_of, set_card
from .structure import apply_structure

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_REDUCIBLE: set[str] = set()
EXTERNAL = ("torchvision", "timm")
# Keyword arguments timm.create_model passes to every entrypoint; ours take no pretrained weights.
_TIMM_KWARGS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")
# torchvision classifiers built with other defaults: without the auxiliary classifiers, whose extra outputs in train
# mode no loss here takes, and with torchvision's own initialisation said explicitly (it warns when left unsaid).
_TORCHVISION_DEFAULTS = {"googlenet": {"aux_logits": False, "init_weights": True},
                         "inception_v3": {"aux_logits": False, "init_weights": True}}
# The torchvision.models subpackages whose models are not image classifiers, and what they are.
_TORCHVISION_OTHER = {"detection": "an object-detection model", "segmentation": "a semantic-segmentation model",
                      "video": "a video (clip) model", "optical_flow": "an optical-flow model",
                      "quantization": "a quantized (int8 inference) model"}


def register_model(fn: Callable[..., nn.Module] | None = None, *, reducible: bool = False):
    """Register a factory under its function name, here and in timm.

    Use as ``@register_model`` or ``@register_model(reducible=True)``; a *reducible* family has a teacher form
    (``expansion >= 1``) and a student form (``expansion=0``, with optional LoRA), as ReduceNet does.
    """
    if fn is None:
        return functools.partial(register_model, reducible=reducible)
    name = fn.__name__

    @functools.wraps(fn)
    def factory(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        for key in _TIMM_KWARGS:
            kwargs.pop(key, None)
        if pretrained:
            raise ConfigError(f"no pretrained weights are published for {name}; train one with "
                              f"`python -m train.stage1 -m {name}` or load a checkpoint")
        model = fn(**kwargs)  # the class declares its arguments as its config; the registry names them
        return set_card(model, ModelCard(name, dict(model.config)))

    _MODELS[name] = factory
    if reducible:
        _REDUCIBLE.add(name)
    timm_register_model(factory)
    return factory


def list_models(pattern: str = "*", reducible: bool | None = None) -> list[str]:
    """Names of the registered zoo models matching a glob ``pattern``, in registration order; ``reducible=True``
    keeps the families with a teacher and a student form (ReduceNet's), ``False`` the others."""
    return [n for n in _MODELS
            if fnmatch.fnmatchcase(n, pattern) and (reducible is None or (n in _REDUCIBLE) == reducible)]


def accepts(name: str, argument: str) -> bool:
    """Whether the zoo model ``name`` takes ``argument`` (e.g. ``image_size``); False for other models."""
    return name in _MODELS and argument in inspect.signature(_MODELS[name]).parameters


def is_reducible(config_or_name: dict[str, Any] | str) -> bool:
    """Whether a model is of a zoo family with teacher (``expansion >= 1``) and student forms."""
    name = config_or_name["model"] if isinstance(config_or_name, dict) else config_or_name
    return name in _REDUCIBLE


def is_zoo(config_or_name: dict[str, Any] | str) -> bool:
    """Whether a model (by config or name) is one of the zoo's families, rather than torchvision's or timm's."""
    name = config_or_name["model"] if isinstance(config_or_name, dict) else config_or_name
    return name in _MODELS


def unknown_model(name: str, known: list[str], hint: str, prefix: str = "") -> UnknownModelError:
    """The one-line error of a model name not among ``known``: the close matches, else ``hint``."""
    close = [prefix + c for c in difflib.get_close_matches(name, known, n=3, cutoff=0.5)]
    return UnknownModelError(f"unknown model {prefix + name!r}: " + (f"did you mean {', '.join(close)}?" if close
                                                                      else hint))


def _check_torchvision_classifier(arch: str) -> None:
    """Refuse, in one line, an ``arch`` that is not one of torchvision's image classifiers (``torchvision.models``'
    own builders, not those of its detection, segmentation, video, optical-flow or quantization subpackages).

    Raises:
        ConfigError: ``arch`` is a torchvision model of another kind (its builder would download backbone weights).
        UnknownModelError: ``arch`` is no torchvision model; the message lists the close matches among classifiers.
    """
    import torchvision

    known = torchvision.models.list_models(module=torchvision.models)
    if arch in known:
        return
    for module, what in _TORCHVISION_OTHER.items():
        sub = getattr(torchvision.models, module, None)
        if sub is not None and arch in torchvision.models.list_models(module=sub):
            plain = arch.removeprefix("quantized_")
            hint = (f"use torchvision:{plain}, the float classifier it quantizes" if plain != arch and plain in known
                    else "choose an image classifier of torchvision.models.list_models(module=torchvision.models)")
            raise ConfigError(f"torchvision:{arch} is {what} (torchvision.models.{module}), and this toolkit trains "
                              f"image classifiers; {hint}")
    raise unknown_model(arch, known, "see torchvision.models.list_models(module=torchvision.models)", "torchvision:")


def check_model_name(name: str) -> None:
    """Refuse, in one line and without building anything, a name :func:`create_model` cannot build: not of the
    zoo, not one of torchvision's image classifiers, not a timm model.

    Raises:
        UnknownModelError: an unknown name; the message lists the close matches.
        ConfigError: a torchvision model of another kind than an image classifier.
    """
    source, colon, arch = name.partition(":")
    if colon and source == "torchvision":
        _check_torchvision_classifier(arch)
    elif colon and source == "timm":
        import timm

        if arch not in timm.list_models():
            raise unknown_model(arch, timm.list_models(), "see timm.list_models()", "timm:")
    elif name not in _MODELS:
        raise unknown_model(name, list(_MODELS), f"choose one of {', '.join(_MODELS)}, or torchvision:NAME / "
                                                 "timm:NAME (`python -m models` lists the zoo)")


def _external(name: str, num_classes: int | None, kwargs: dict[str, Any]) -> nn.Module:
    """A torchvision or timm classifier, built without any download."""
    source, _, arch = name.partition(":")
    if "pretrained" in kwargs or "weights" in kwargs:
        raise ConfigError(f"{name} is built without downloaded weights (these machines reach no model hub); "
                          "load your own with --weights FILE (or models.load_pretrained)")
    if kwargs.get("aux_logits"):
        raise ConfigError(f"{name} is built without auxiliary classifiers here: training takes one logits tensor, not "
                          "the (logits, aux) outputs aux_logits=True gives in train mode; drop aux_logits")
    check_model_name(name)
    extra = {} if num_classes is None else {"num_classes": num_classes}
    if source == "torchvision":
        import torchvision

        defaults = _TORCHVISION_DEFAULTS.get(arch, {})
        build = lambda: torchvision.models.get_model(  # noqa: E731
            arch, weights=None, **extra, **{**defaults, **kwargs})
    else:
        import timm

        build = lambda: timm.create_model(arch, pretrained=False, **extra, **kwargs)  # noqa: E731
    try:
        return build()
    except TypeError as e:
        raise ConfigError(f"{name} does not take these arguments ({e})") from None
    except ValueError as e:
        raise ConfigError(f"{name} cannot be built with {kwargs or extra} ({e})") from None


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a model of the zoo, or of torchvision / timm by a prefixed name.

    Args:
        name: a name from :func:`list_models` (e.g. ``"reduce56"``), ``"torchvision:NAME"`` or ``"timm:NAME"``.
        **kwargs: the family's arguments (``num_classes``, ``width``, ``expansion``, ``lora_rank``, ...); for
            torchvision/timm, ``num_classes`` and any argument their builders take.

    Raises:
        UnknownModelError: the name is not known; the message lists the close matches.
        ConfigError: an argument is not valid, or a torchvision model is not an image classifier.
    """
    if not isinstance(name, str):
        raise ConfigError(f"a model name is a string such as 'reduce20' or 'torchvision:resnet18', got {name!r}")
    if name.partition(":")[0] in EXTERNAL and ":" in name:
        num_classes = kwargs.pop("num_classes", None)
        model = _external(name, num_classes, kwargs)
        classes = num_classes if num_classes is not None else num_classes_of(model)
        return set_card(model, ModelCard(name, {"num_classes": classes, **kwargs}))
    check_model_name(name)
    try:
        return _MODELS[name](**kwargs)
    except TypeError as e:
        if "got an unexpected keyword" not in str(e) and "got multiple values" not in str(e):
            raise
        detail = str(e).split("() ", 1)[-1]  # "got an unexpected keyword argument 'x'" / "got multiple values..."
        raise ConfigError(f"{name} {detail}; see its docstring for the arguments it takes") from None


def classifier_of(model: nn.Module) -> nn.Linear | nn.Conv2d:
    """The classifier: the model's last ``nn.Linear`` (``fc``, ``classifier[-1]``, ``head``, ...), else its
    classifier as a 1x1 conv (timm's DLA and DPN, torchvision's SqueezeNet): timm's ``get_classifier()``, or the last
    1x1 conv with one output per class (the model's ``num_classes``).

    Raises:
        ConfigError: the model has neither.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1]
    head = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if isinstance(head, nn.Conv2d) and head.kernel_size == (1, 1):
        return head
    card = card_of(model)
    classes = card.args.get("num_classes") if card is not None else getattr(model, "num_classes", None)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
             and m.out_channels == classes]
    if convs:
        return convs[-1]
    name = card.name if card is not None else type(model).__name__
    raise ConfigError(f"{name} has no nn.Linear classifier nor a 1x1 conv with one output per class "
                      f"({classes} classes)")


def num_classes_of(model: nn.Module) -> int:
    """The number of classes the model's classifier (:func:`classifier_of`) outputs."""
    head = classifier_of(model)
    return head.out_features if isinstance(head, nn.Linear) else head.out_channels


def model_from_config(config: dict[str, Any], **overrides: Any) -> nn.Module:
    """Rebuild a model from its ``config`` (as stored in checkpoints), with optional overrides.

    A ``structure`` entry (pruned or folded layers) is applied after the build, then a ``grow`` entry (a grown
    teacher's branches, :mod:`models.grow`); both are kept in the new config.
    """
    cfg = {**config, **overrides}
    structure, grown, lora = cfg.pop("structure", None), cfg.pop("grow", None), cfg.pop("lora", None)
    model = create_model(cfg.pop("model"), **cfg)
    if structure:
        apply_structure(model, structure)
        set_card(model, replace(card_of(model), structure=structure))
    if grown:
        from .grow import grow  # noqa: PLC0415 (grow builds on the registry's models)

        if not isinstance(grown, dict):
            raise ConfigError("a config's grow record is {'expansion': E, 'modules': [conv paths]}")
        grow(model, grown.get("expansion"), modules=grown.get("modules"))
    if lora:
        from .grow import add_lora_to_convs  # noqa: PLC0415

        if not isinstance(lora, dict):
            raise ConfigError("a config's lora record is {'rank': r, 'modules': [conv paths]}")
        add_lora_to_convs(model, lora.get("rank"), modules=lora.get("modules"))
    return model
