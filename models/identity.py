"""A model's identity as one typed record, :class:`ModelCard`, like timm's ``pretrained_cfg``.

A card says what a model is: the registry name it is built from (``reduce20``, ``torchvision:resnet18``), the
builder's arguments, the structure patch of a trimmed or fused network (:mod:`models.structure`), the
preprocessing its weights expect (``mean``/``std`` in [0, 1] units, or none) and, for a model loaded from a
checkpoint, that checkpoint's metadata. :func:`set_card` is the only writer: it stores the card as
``model.card`` together with the plain views the rest of the code and checkpoints read (``config``, the card's
JSON form; ``preprocess``; ``num_classes``; ``checkpoint_metadata``). Code that derives one model from another
(inheritance, trimming, fusion, flattening) changes a card with :func:`dataclasses.replace` and sets it on the
new model; nothing copies attributes by name.

Example::

    card = card_of(model)                 # None for a model not built by models.create_model
    set_card(student, replace(card, preprocess={"mean": [0.5] * 3, "std": [0.25] * 3}))
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from .errors import ConfigError

#: The attributes :func:`set_card` writes: the card and its views.
VIEWS = ("card", "config", "preprocess", "num_classes", "checkpoint_metadata")


@dataclass(frozen=True)
class ModelCard:
    """What a model is.

    Attributes:
        name: the registry name it is built from (``None``: a model not built by :func:`models.create_model`, of
            which only the preprocessing is known).
        args: the builder's arguments (``num_classes``, ``width``, ``expansion``, ...), JSON values.
        structure: the patch that turns the built model into this one (pruned or folded layers), or None.
        preprocess: the normalisation its weights expect: ``{"mean": [3], "std": [3]}`` in [0, 1] units, or None
            (not known yet: the training run sets it from the data).
        metadata: the metadata of the checkpoint it was loaded from (dataset, stage, teacher, ...).
        grow: for a grown teacher (:mod:`models.grow`), ``{"expansion": E, "modules": [conv paths]}``; else None.
        lora: for a torchvision/timm student with LoRA branches (:func:`models.grow.add_lora_to_convs`),
            ``{"rank": r, "modules": [conv paths]}``; else None (the zoo records LoRA in its arguments).
    """

    name: str | None
    args: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] | None = None
    preprocess: dict[str, Any] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    grow: dict[str, Any] | None = None
    lora: dict[str, Any] | None = None

    @property
    def config(self) -> dict[str, Any]:
        """The JSON form checkpoints store: ``{"model": name, **args}``, with ``structure`` and ``grow`` when there
        are."""
        out = {"model": self.name, **copy.deepcopy(self.args)}
        if self.structure:
            out["structure"] = copy.deepcopy(self.structure)
        if self.grow:
            out["grow"] = copy.deepcopy(self.grow)
        if self.lora:
            out["lora"] = copy.deepcopy(self.lora)
        return out

    @property
    def num_classes(self) -> int | None:
        return self.args.get("num_classes")

    @classmethod
    def from_config(cls, config: dict[str, Any], preprocess: dict[str, Any] | None = None,
                    metadata: dict[str, Any] | None = None) -> ModelCard:
        """The card of a checkpoint's ``config`` (and its ``preprocess`` and ``metadata``)."""
        args = {k: v for k, v in config.items() if k not in ("model", "structure", "grow", "lora")}
        return cls(config.get("model"), args, config.get("structure") or None, preprocess, dict(metadata or {}),
                   config.get("grow") or None, config.get("lora") or None)

    def with_args(self, **changes: Any) -> ModelCard:
        """The card with some builder arguments changed (e.g. ``lora_rank=8``)."""
        return replace(self, args={**self.args, **changes})


def card_of(model: nn.Module) -> ModelCard | None:
    """The card of ``model``, seen through DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers; None
    for a model that has none."""
    for _ in range(4):
        card = model.__dict__.get("card")
        if card is not None:
            return card
        inner = model.__dict__.get("_modules", {}).get("module") or model.__dict__.get("_modules", {}).get("_orig_mod")
        if inner is None:
            return None
        model = inner
    return None


def set_card(model: nn.Module, card: ModelCard) -> nn.Module:
    """Give ``model`` its identity: ``card`` and its views (:data:`VIEWS`). Returns ``model``.

    Raises:
        ConfigError: the card's preprocessing is not three finite means and three positive, finite stds.
    """
    check_preprocess(card.preprocess)
    model.card = card
    if card.name is not None:
        model.config = card.config
        if card.num_classes is not None:
            model.num_classes = card.num_classes
    model.preprocess = copy.deepcopy(card.preprocess)
    model.checkpoint_metadata = card.metadata
    return model


def set_preprocess(model: nn.Module, preprocess: dict[str, Any] | None) -> nn.Module:
    """``model``'s card with another preprocessing (a model without a card gets one that knows only that)."""
    return set_card(model, replace(card_of(model) or ModelCard(None), preprocess=preprocess))


def keep_card(source: nn.Module, target: nn.Module) -> nn.Module:
    """``target`` with ``source``'s card, where it has one (a traced or wrapped copy of the same model)."""
    card = card_of(source)
    return set_card(target, card) if card is not None else target


def input_size(model: nn.Module) -> tuple[int, ...]:
    """``(C, H, W)`` of ``model``'s inputs: its recorded preprocessing's, else the size its config builds it for
    (``image_size``), else CIFAR's ``(3, 32, 32)``."""
    recorded = (getattr(model, "preprocess", None) or {}).get("input_size")
    built = (getattr(model, "config", None) or {}).get("image_size")
    return tuple(recorded) if recorded else (3, built, built) if isinstance(built, int) else (3, 32, 32)


def check_preprocess(preprocess: Any) -> None:
    """One line for a preprocessing record that would make every input NaN or infinite (std 0, non-numbers)."""
    if preprocess is None:
        return
    if not isinstance(preprocess, dict):
        raise ConfigError(f"a model's preprocess is a {{'mean', 'std'}} record or null, "
                          f"got {type(preprocess).__name__}")
    bad = None
    for key in ("mean", "std"):
        values = preprocess.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
            bad = f"{key} {values!r} is not three finite numbers"
            break
        if key == "std" and min(values) <= 0:
            bad = f"std {list(values)} has a value <= 0 (every input would become infinite)"
    if bad:
        raise ConfigError(f"the model's preprocess {bad}; write three per-channel values in [0, 1] units, std > 0")
