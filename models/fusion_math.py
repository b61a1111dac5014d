"""Fusion maths: pure functions on tensors, one transform each (used by every layer's ``reparameterize()``).

In the style of DiverseBranchBlock's ``dbb_transforms.py``: every function takes and returns plain tensors
(``kernel`` is a conv weight ``[out, in/groups, kh, kw]``, ``bias`` a ``[out]`` vector) and knows nothing about
modules. Blocks compose them in their ``reparameterize()``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import einsum
from torch import Tensor


def fold_bn(
    kernel: Tensor, bias: Tensor | None, mean: Tensor, var: Tensor, gamma: Tensor, beta: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """Fold an eval-mode BatchNorm into the conv before it.

    ``BN(conv(x) + b) = gamma * (conv(x) + b - mean) / sqrt(var + eps) + beta``, so the fused conv has
    ``kernel * s`` and bias ``(b - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel.

    Returns:
        ``(kernel [out, in/g, k, k], bias [out])``.
    """
    scale = gamma / torch.sqrt(var + eps)
    bias = torch.zeros_like(mean) if bias is None else bias
    return kernel * scale.reshape(-1, 1, 1, 1), (bias - mean) * scale + beta


def merge_kxk_1x1(
    kernel_kxk: Tensor, bias_kxk: Tensor | None, kernel_1x1: Tensor, bias_1x1: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Merge a dense kxk conv followed by a dense 1x1 conv (no non-linearity between) into one kxk conv.

    Args:
        kernel_kxk: ``[mid, in, k, k]``; its stride and padding carry over to the result.
        bias_kxk: ``[mid]`` or None.
        kernel_1x1: ``[out, mid, 1, 1]``.
        bias_1x1: ``[out]`` or None.

    Returns:
        ``(kernel [out, in, k, k], bias [out])``.
    """
    w2 = kernel_1x1[:, :, 0, 0]
    kernel = einsum(w2, kernel_kxk, "o m, m i h w -> o i h w")
    bias = torch.zeros(w2.shape[0], dtype=kernel.dtype, device=kernel.device)
    if bias_kxk is not None:
        bias = bias + w2 @ bias_kxk
    if bias_1x1 is not None:
        bias = bias + bias_1x1
    return kernel, bias


def pad_kernel(kernel: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Zero-pad a ``[out, in, kh, kw]`` kernel symmetrically to ``size`` (``size x size``, or ``(h, w)``), e.g. 1x1
    to 3x3 or 1x7 to 7x7: the padded kernel, applied with ``(size - k) / 2`` more padding per side, computes the
    same."""
    want = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    have = tuple(kernel.shape[-2:])
    if any((w - k) % 2 or w < k for k, w in zip(have, want)):
        raise ValueError(f"cannot centre a {have[0]}x{have[1]} kernel in {want[0]}x{want[1]}")
    ph, pw = ((w - k) // 2 for k, w in zip(have, want))
    return F.pad(kernel, [pw, pw, ph, ph])


def sum_kernels(*pairs: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor]:
    """Sum parallel branches ``(kernel, bias)`` that see the same input with the same stride.

    Kernels may differ in height and width (a 1x7 beside a 7x7, a 1x1 beside a 3x3); each is centred in the
    largest height and width, which is exact when every branch pads by ``k // 2`` in each dimension.
    """
    size = (max(k.shape[-2] for k, _ in pairs), max(k.shape[-1] for k, _ in pairs))
    kernel = sum(pad_kernel(k, size) for k, _ in pairs)
    bias = sum(torch.zeros(k.shape[0], dtype=k.dtype, device=k.device) if b is None else b for k, b in pairs)
    return kernel, bias


def identity_kernel(
    channels: int, size: int = 1, groups: int = 1, dtype: torch.dtype | None = None, device=None
) -> Tensor:
    """The kernel ``[channels, channels/groups, size, size]`` of a conv that returns its input unchanged."""
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, size, size, dtype=dtype, device=device)
    idx = torch.arange(channels, device=device)
    kernel[idx, idx % per_group, size // 2, size // 2] = 1
    return kernel
