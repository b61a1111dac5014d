"""The model's graph, as ``torch.fx`` traces it: where convs feed BatchNorms (BN folding and growing both read it)."""
from __future__ import annotations

import torch.fx
import torch.nn as nn

from .errors import ConfigError


class _BatchNormLeaves(torch.fx.Tracer):
    """fx's tracer, with every BatchNorm a leaf: timm's ``BatchNormAct2d`` (a BatchNorm with its activation, outside
    ``torch.nn``) is traced into by default, and no conv would then be seen to feed it."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or super().is_leaf_module(m, module_qualified_name)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv path, BatchNorm path)`` of every ``nn.Conv2d`` whose output feeds only a BatchNorm (timm's
    ``BatchNormAct2d`` too), in graph order, found on the model's ``torch.fx`` graph (a model's ``forward`` is never
    read or edited).

    Raises:
        ConfigError: the model cannot be traced by ``torch.fx``; the message names it.
    """
    try:
        graph = _BatchNormLeaves().trace(model)
    except Exception as e:  # fx raises many kinds on data-dependent control flow
        raise ConfigError(f"cannot trace {type(model).__name__} with torch.fx to find its conv-BatchNorm pairs "
                          f"({type(e).__name__})") from None
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, torch.fx.Node) and src.op == "call_module" else None
        if isinstance(conv, nn.Conv2d) and len(src.users) == 1:
            pairs.append((src.target, node.target))
    return pairs
