"""A model's input preprocessing: the ``preprocess`` record its checkpoint carries, and conversions between two.

A record is ``{"mean": [r, g, b], "std": [r, g, b], "input_size": [3, H, W]}`` with mean and std in [0, 1]
pixel units, as timm's ``pretrained_cfg`` holds them. The loaders normalise batches by the trained model's
record; a teacher whose record differs gets its own normalisation of the same pixels through
:class:`Renormalize`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .data import DatasetInfo

NORMALIZATIONS = ("dataset", "none", "imagenet")
_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalization(name: str, info: DatasetInfo) -> dict[str, Any]:
    """The record of ``--normalize NAME`` on a dataset: its own mean/std, none ([0, 1] pixels) or ImageNet's."""
    mean, std = {"dataset": (info.mean, info.std), "none": ((0.0,) * 3, (1.0,) * 3), "imagenet": _IMAGENET}[name]
    return {"mean": [float(v) for v in mean], "std": [float(v) for v in std],
            "input_size": [3, info.image_size, info.image_size]}


def same_normalization(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return list(a["mean"]) == list(b["mean"]) and list(a["std"]) == list(b["std"])


class Renormalize(nn.Module):
    """Turns inputs normalised by record ``src`` into inputs normalised by record ``dst``: a per-channel affine map.

    ``x_dst = (x_src * std_src + mean_src - mean_dst) / std_dst``; the identity when the two agree.
    """

    scale: Tensor
    shift: Tensor

    def __init__(self, src: dict[str, Any], dst: dict[str, Any]) -> None:
        super().__init__()
        self.identity = same_normalization(src, dst)

        def t(v: Sequence[float]) -> Tensor:
            return torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)

        scale = t(src["std"]) / t(dst["std"])
        self.register_buffer("scale", scale.float(), persistent=False)
        self.register_buffer("shift", ((t(src["mean"]) - t(dst["mean"])) / t(dst["std"])).float(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x if self.identity else x * self.scale.to(x.dtype) + self.shift.to(x.dtype)
