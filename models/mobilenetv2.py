"""ReduceMobileNetV2: CIFAR MobileNetV2 whose teacher blocks carry an extra, expandable non-linear branch.

The inverted residual's usual path is expand 1x1 → depthwise 3x3 → BN → ReLU6 → project 1x1 → BN. The
teacher adds branch (b) beside expand → depthwise, by ReduceNet's rule: the branches are summed **before**
the shared BN (here the depthwise conv's), so removing (b) leaves the student's own block::

    x ─┬─ (a) Conv1x1(in→h) → BN → ReLU6 → DW3x3(h, stride) ─────────┐
       ├─ (b) Conv3x3(in→e·in, stride) → BN → ReLU6 → Conv1x1(→h) → BN ┴─ + → BN → ReLU6 → Conv1x1(h→out) → BN ─ + →
       └─ identity, when stride = 1 and in = out ─────────────────────────────────────────────────────────────┘

with ``h = t · in`` (t the block's expand ratio; for t = 1 the expand conv is absent). The student
(``expansion = 0``) is the plain inverted residual. LoRA branches go on the dense convs (expand and
project) by default; a depthwise conv cannot carry a low-rank dense branch.

Stages follow the CIFAR variant of pytorch-cifar (stride 1 stem and second stage), channel counts scaled by
``width`` and rounded to multiples of 8. Shapes: ``[N, 3, 32, 32] -> [N, 1280, 4, 4] -> [N, num_classes]``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
from timm.layers import make_divisible
from torch import Tensor

from .errors import ConfigError
from .layers import ConvBN, ConvBNAct, NonLinearBranch, add_lora, check_family_args
from .registry import register_model

# (expand ratio t, out channels, blocks, first stride)
STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))
WIDTHS = (0.5, 0.75, 1.0)
DEFAULT_LORA_TARGETS = ("blocks.*.expand", "blocks.*.project")


class InvertedResidual(nn.Module):
    """Student block without its skip: ``project(dw(expand(x)))``; :class:`Residual` adds the skip.

    Shapes: ``[N, in_chs, H, W] -> [N, out_chs, H / stride, W / stride]``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int,
                 inference_mode: bool = False) -> None:
        super().__init__()
        hidden = in_chs * expand_ratio
        self.expand: nn.Module = (ConvBNAct(in_chs, hidden, 1, act_layer=nn.ReLU6, inference_mode=inference_mode)
                                  if expand_ratio != 1 else nn.Identity())
        self.dw = ConvBNAct(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.ReLU6,
                            inference_mode=inference_mode)
        self.project = ConvBN(hidden, out_chs, 1, inference_mode=inference_mode)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.dw(self.expand(x)))


class ReduceInvertedResidual(InvertedResidual):
    """Teacher block: :class:`InvertedResidual` with branch (b), of width ``expansion * in_chs``, summed into the
    depthwise conv's output before its BN."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, expansion: int) -> None:
        super().__init__(in_chs, out_chs, stride, expand_ratio)
        self.branch_b = NonLinearBranch(in_chs, expansion * in_chs, in_chs * expand_ratio, stride, nn.ReLU6)

    def forward(self, x: Tensor) -> Tensor:
        h = self.dw.norm_act(self.dw.conv(self.expand(x)) + self.branch_b(x))
        return self.project(h)


class Residual(nn.Module):
    """``x + body(x)``."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ReduceMobileNetV2(nn.Module):
    """CIFAR MobileNetV2 teacher / student / deploy form.

    Args:
        num_classes: classifier outputs.
        width: channel multiplier, one of 0.5, 0.75, 1.0.
        expansion: width factor of branch (b) relative to the block input; 0 builds the student.
        lora_rank: rank of the linear LoRA branches (student only); 0 for none.
        lora_targets: globs over conv names that get LoRA; default every expand and project conv.
        inference_mode: build the fused deploy form.
    """

    def __init__(
        self,
        num_classes: int = 10,
        width: float = 1.0,
        expansion: int = 1,
        lora_rank: int = 0,
        lora_targets: Sequence[str] | None = None,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if width not in WIDTHS or isinstance(width, bool):
            raise ConfigError(f"width must be one of {WIDTHS}, got {width!r}")
        lora_targets = check_family_args(num_classes, expansion, lora_rank, lora_targets, inference_mode,
                                         DEFAULT_LORA_TARGETS)
        self.config = dict(num_classes=num_classes, width=float(width), expansion=expansion, lora_rank=lora_rank,
                           lora_targets=lora_targets, inference_mode=inference_mode)
        self.num_classes = num_classes
        self.num_features = 1280

        in_chs = make_divisible(32 * width, 8)
        self.stem = ConvBNAct(3, in_chs, 3, act_layer=nn.ReLU6, inference_mode=inference_mode)
        blocks: list[nn.Module] = []
        for t, c, n, s in STAGES:
            out_chs = make_divisible(c * width, 8)
            for i in range(n):
                stride = s if i == 0 else 1
                body = (ReduceInvertedResidual(in_chs, out_chs, stride, t, expansion) if expansion
                        else InvertedResidual(in_chs, out_chs, stride, t, inference_mode))
                blocks.append(Residual(body) if stride == 1 and in_chs == out_chs else body)
                in_chs = out_chs
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBNAct(in_chs, self.num_features, 1, act_layer=nn.ReLU6, inference_mode=inference_mode)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if lora_rank:
            add_lora(self, lora_rank, lora_targets)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, 1280, H/8, W/8]``."""
        return self.head(self.blocks(self.stem(x)))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


@register_model(reducible=True)
def reduce_mobilenetv2(**kwargs) -> ReduceMobileNetV2:
    """ReduceMobileNetV2 for CIFAR; the student is MobileNetV2 (2.24M params at width 1, 10 classes)."""
    return ReduceMobileNetV2(**kwargs)
