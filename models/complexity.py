"""Size and cost of any model: parameters and multiply-accumulates (MACs).

MACs are counted with PyTorch's own ``torch.utils.flop_counter.FlopCounterMode`` (conv, linear and matmul
FLOPs / 2), a maintained counter. The design card named torchsummaryX, but its last release (1.3.0)
crashes with pandas >= 2 (``df.sum()`` on object columns), so it is not used.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics are not counted)."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """Multiply-accumulates of one forward pass at ``input_size`` (batch included), in eval mode."""
    param = next(model.parameters())
    x = torch.zeros(input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2


def complexity(model: nn.Module, input_size: tuple[int, ...] | None = None) -> dict[str, int]:
    """``{"params": ..., "macs": ...}`` of ``model`` for one input of ``input_size`` (default: the input size its
    preprocessing records, else ``(1, 3, 32, 32)``)."""
    if input_size is None:
        recorded = (getattr(model, "preprocess", None) or {}).get("input_size")
        input_size = (1, *recorded) if recorded else (1, 3, 32, 32)
    return {"params": count_params(model), "macs": count_macs(model, input_size)}
