"""ReduceNet: CIFAR ResNets (depth 6n+2) whose teacher blocks carry an extra, removable non-linear branch.

Teacher block (``expansion >= 1``), exactly the block of the original ReduceNet (ohmydroid/reducenet)::

    x ─┬─ (a) Conv3x3(in→p, stride) ─────────────────────────────┐
       ├─ (b) Conv3x3(in→e·p, stride) → BN → ReLU → Conv1x1(→p) → BN ┴─ + → BN → ReLU → Conv3x3 → BN ─ + → ReLU
       └─ shortcut: identity, or Conv1x1(in→p, stride) → BN when the shape changes ──────────────────┘

The two branches are summed **before** the shared BN. Branch (a) and that BN are the student's first
ConvBN, so the student (``expansion = 0``) is the same block without branch (b): the CIFAR ResNet BasicBlock
with 1x1-conv projection shortcuts. In the original's key names, (a) is ``branch2``, (b) ``branch1`` and
``BN → ReLU → Conv3x3 → BN`` is ``fuse`` (``models.convert`` imports its checkpoints).
``student_from_teacher`` builds the student from a trained teacher, keeping every shared tensor. With
``lora_rank = r`` every 3x3 conv inside the blocks (by default) gets a linear branch
``Conv3x3(in→r) → LambdaReLU → Conv1x1(r→out)`` added before its BN, where branch (b) sat; fusion folds it away.

Shapes: ``[N, 3, 32, 32] -> stem [N, 16w, 32, 32] -> layer1 [N, 16w, 32, 32] -> layer2 [N, 32w, 16, 16]
-> layer3 [N, 64w, 8, 8] -> pool -> fc [N, num_classes]``.
"""
from __future__ import annotations

from typing import Sequence

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .errors import ConfigError
from .layers import ConvBN, ConvBNAct, NonLinearBranch, add_lora, check_family_args
from .registry import register_model

WIDTHS = (1, 2, 4)
DEPTHS = {"reduce20": 20, "reduce32": 32, "reduce44": 44, "reduce56": 56, "reduce110": 110}
DEFAULT_LORA_TARGETS = ("layer*.conv1", "layer*.conv2")


class BasicBlock(nn.Module):
    """Student block: ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``.

    Shapes: ``[N, in_chs, H, W] -> [N, planes, H / stride, W / stride]``.
    """

    def __init__(self, in_chs: int, planes: int, stride: int = 1, inference_mode: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_chs, planes, 3, stride, inference_mode=inference_mode)  # branch (a)
        self.conv2 = ConvBN(planes, planes, 3, inference_mode=inference_mode)
        self.shortcut: nn.Module = (
            ConvBN(in_chs, planes, 1, stride, inference_mode=inference_mode)
            if stride != 1 or in_chs != planes else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ReduceBlock(BasicBlock):
    """Teacher block: :class:`BasicBlock` with branch (b), of width ``expansion * planes``, summed into
    branch (a)'s conv output before the shared BN."""

    def __init__(self, in_chs: int, planes: int, stride: int = 1, expansion: int = 1) -> None:
        super().__init__(in_chs, planes, stride)
        self.branch_b = NonLinearBranch(in_chs, expansion * planes, planes, stride)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1.norm_act(self.conv1.conv(x) + self.branch_b(x))
        return F.relu(self.conv2(h) + self.shortcut(x))


class ReduceNet(nn.Module):
    """CIFAR ReduceNet / ResNet.

    Args:
        depth: 6n + 2 (20, 32, 44, 56, 110).
        num_classes: classifier outputs.
        width: channel multiplier of the 16/32/64 stages, one of 1, 2, 4.
        expansion: width factor of branch (b); 0 builds the student (a plain CIFAR ResNet).
        lora_rank: rank of the linear LoRA branches (student only); 0 for none.
        lora_targets: globs over conv names that get LoRA; default every 3x3 conv inside the blocks.
        inference_mode: build the fused deploy form (biased convs, no BatchNorm); loads fused weights strictly.
    """

    def __init__(
        self,
        depth: int,
        num_classes: int = 10,
        width: int = 1,
        expansion: int = 1,
        lora_rank: int = 0,
        lora_targets: Sequence[str] | None = None,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        if (depth - 2) % 6 or depth < 8:
            raise ConfigError(f"depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        if width not in WIDTHS or isinstance(width, bool):
            raise ConfigError(f"width must be one of {WIDTHS}, got {width!r}")
        width = int(width)
        lora_targets = check_family_args(num_classes, expansion, lora_rank, lora_targets, inference_mode,
                                         DEFAULT_LORA_TARGETS)
        self.config = dict(num_classes=num_classes, width=width, expansion=expansion, lora_rank=lora_rank,
                           lora_targets=lora_targets, inference_mode=inference_mode)
        self.num_classes = num_classes
        self.num_features = 64 * width
        n = (depth - 2) // 6

        def block(in_chs: int, planes: int, stride: int) -> nn.Module:
            if expansion:
                return ReduceBlock(in_chs, planes, stride, expansion)
            return BasicBlock(in_chs, planes, stride, inference_mode)

        chs = [16 * width, 32 * width, 64 * width]
        self.stem = ConvBNAct(3, chs[0], 3, inference_mode=inference_mode)
        in_chs = chs[0]
        for i, (planes, stride) in enumerate(zip(chs, (1, 2, 2)), 1):
            blocks = []
            for j in range(n):
                blocks.append(block(in_chs, planes, stride if j == 0 else 1))
                in_chs = planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if lora_rank:
            add_lora(self, lora_rank, lora_targets)

    def forward_features(self, x: Tensor) -> Tensor:
        """``[N, 3, H, W] -> [N, 64w, H/4, W/4]``."""
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_head(self, x: Tensor) -> Tensor:
        """``[N, 64w, h, w] -> [N, num_classes]``."""
        return self.fc(self.pool(x).flatten(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _reducenet(name: str, **kwargs) -> ReduceNet:
    return ReduceNet(DEPTHS[name], **kwargs)


@register_model(reducible=True)
def reduce20(**kwargs) -> ReduceNet:
    """ReduceNet-20 (3 blocks per stage); the student is ResNet-20 (272,474 params at 10 classes)."""
    return _reducenet("reduce20", **kwargs)


@register_model(reducible=True)
def reduce32(**kwargs) -> ReduceNet:
    """ReduceNet-32 (5 blocks per stage); the student is ResNet-32."""
    return _reducenet("reduce32", **kwargs)


@register_model(reducible=True)
def reduce44(**kwargs) -> ReduceNet:
    """ReduceNet-44 (7 blocks per stage); the student is ResNet-44."""
    return _reducenet("reduce44", **kwargs)


@register_model(reducible=True)
def reduce56(**kwargs) -> ReduceNet:
    """ReduceNet-56 (9 blocks per stage); the student is ResNet-56 (855,770 params at 10 classes)."""
    return _reducenet("reduce56", **kwargs)


@register_model(reducible=True)
def reduce110(**kwargs) -> ReduceNet:
    """ReduceNet-110 (18 blocks per stage); the student is ResNet-110."""
    return _reducenet("reduce110", **kwargs)
