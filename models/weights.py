"""A user's weights for any model: ``load_pretrained(model, FILE)`` (``--weights FILE`` of the training CLIs).

``FILE`` is a safetensors file (a plain state_dict or one of our checkpoints) or a ``.pth``/``.pt`` state_dict read
with ``torch.load(weights_only=True)`` (so no code in it runs), possibly nested under ``state_dict`` or ``model``
and with DataParallel's ``module.`` prefixes. Every tensor must fit, except the classifier: when its class count
differs from the model's (ImageNet weights for a 10-class dataset), it keeps its fresh initialisation and the
rest loads strictly.
"""
from __future__ import annotations

import collections
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from .errors import CheckpointError, brief
from .registry import classifier_of


def with_versions(state: dict[str, Tensor], model: nn.Module, like: dict | None = None) -> dict[str, Tensor]:
    """``state`` with the module versions ``load_state_dict`` passes to each module's loader: those ``like`` (or
    ``state``) carries (a ``torch.save``d state_dict), else ``model``'s own (a safetensors file holds none, and
    torchvision's MNASNet, for one, refuses weights without its version)."""
    versions = getattr(like if like is not None else state, "_metadata", None)
    out = collections.OrderedDict(state)
    out._metadata = versions if versions is not None else model.state_dict()._metadata  # type: ignore[attr-defined]
    return out


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a safetensors or ``.pth`` file, on the CPU; one-line errors otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a .safetensors or .pth file of weights")
    if not path.is_file():
        kind = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise CheckpointError(f"{path} is {kind}; pass a .safetensors or .pth file of weights")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it may be truncated") from None
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols and weights_only: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's text is a paragraph, with terminal colour codes
        found = re.search(r"GLOBAL (\S+)", str(e))  # the class or function weights_only would not build
        if found is None:
            raise CheckpointError(f"{path} is not a readable PyTorch state_dict (not a pickle that "
                                  "torch.load(weights_only=True) reads); pass a file saved with "
                                  "torch.save(model.state_dict())") from None
        raise CheckpointError(f"{path} holds a pickled object ({found[1]}), not a state_dict of tensors: it is read "
                              "with weights_only=True, so no code in it runs; save the weights alone with "
                              "torch.save(model.state_dict(), PATH)") from None
    except Exception as e:  # truncated zips, non-torch files: all mean "not a state_dict"
        raise CheckpointError(f"{path} is not a readable PyTorch state_dict ({brief(e)}); "
                              "pass a file saved with torch.save(model.state_dict())") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if isinstance(state, dict) and not state:
        raise CheckpointError(f"{path} holds an empty dict, no tensors; pass a file saved with "
                              "torch.save(model.state_dict())")
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        other = next((k for k, v in state.items() if not isinstance(v, Tensor)), None) if isinstance(state, dict) \
            else None
        what = f"a dict whose {other!r} is a {type(state[other]).__name__}" if other is not None else \
            f"a {type(state).__name__}"
        raise CheckpointError(f"{path} holds {what}, not a state_dict of tensors; pass a file saved with "
                              "torch.save(model.state_dict())")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_pretrained(model: nn.Module, path: str | Path) -> list[str]:
    """Load the weights in ``path`` into ``model``; returns the keys left at their initialisation (the head's).

    Raises:
        CheckpointError: a tensor other than the classifier's is missing, unexpected or of another shape.
    """
    state = read_state_dict(path)
    own = model.state_dict()
    head = classifier_of(model)
    head_name = next(n for n, m in model.named_modules() if m is head)
    head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    kept = [k for k in wrong + missing if k in head_keys]
    bad = [k for k in wrong + missing + unexpected if k not in kept and not (k in unexpected and k in head_keys)]
    if bad:
        k = bad[0]
        what = ("missing" if k in missing else "unexpected" if k in unexpected
                else f"of shape {tuple(state[k].shape)}, not {tuple(own[k].shape)}")
        raise CheckpointError(f"{path} does not fit {model.config.get('model', type(model).__name__)}: {k} is {what}"
                              f" ({len(bad)} such tensors); pass weights of the same architecture")
    model.load_state_dict(with_versions({k: v.to(own[k].dtype) for k, v in state.items() if k in own and k not in kept},
                                        model, like=state), strict=False)
    return kept
