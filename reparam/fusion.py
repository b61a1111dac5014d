"""Whole-model fusion: every linear branch and BatchNorm folded into plain convs, with an equivalence check."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from models.errors import ReparamError
from models.layers import LambdaReLU, LoRABranch
from models.registry import model_from_config


def _reparameterize(module: nn.Module, prefix: str = "") -> None:
    """timm's ``reparameterize_model`` walk, naming the module that refuses."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if hasattr(child, "reparameterize"):
            try:
                child.reparameterize()
            except ReparamError as e:
                raise ReparamError(f"cannot fuse {path}: {e}") from None
        _reparameterize(child, path + ".")


def fuse_model(model: nn.Module) -> nn.Module:
    """Return a deep-copied, eval-mode model with every LoRA branch and BatchNorm fused into its convs.

    For a registered model the result is the plain deploy form, built directly from the model's config with
    ``inference_mode=True``, into which the fused weights are loaded strictly. Other models that follow
    timm's ``reparameterize()`` protocol come back as their fused copy.

    Raises:
        ReparamError: a module cannot be fused (a teacher's non-linear branch, a LambdaReLU with lam < 1);
            the message names it.
    """
    if not isinstance(model, nn.Module):
        raise ReparamError(f"fuse_model needs a torch.nn.Module, got {type(model).__name__}")
    fused = copy.deepcopy(model).eval()
    _reparameterize(fused)
    for name, m in fused.named_modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, LoRABranch, LambdaReLU)):
            raise ReparamError(f"{name} ({type(m).__name__}) survived fusion: it sits outside a ConvBN; "
                               "give its block a reparameterize() method")
    config = getattr(model, "config", None)
    if not config:
        return fused
    param = next(model.parameters())
    deploy = model_from_config(config, expansion=0, lora_rank=0, inference_mode=True)
    deploy.to(device=param.device, dtype=param.dtype).load_state_dict(fused.state_dict(), strict=True)
    deploy.preprocess = getattr(model, "preprocess", None)
    return deploy.eval()


@torch.no_grad()
def max_abs_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """``max |a(x) - b(x)|`` with both models in eval mode (their modes are restored)."""
    modes = a.training, b.training
    a.eval(), b.eval()
    try:
        return (a(x) - b(x)).abs().max().item()
    finally:
        a.train(modes[0]), b.train(modes[1])
