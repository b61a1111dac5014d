"""Small reusable layers shared by every family: ConvBN, the LoRA side branch and LambdaReLU.

A ``ConvBN`` is the unit of fusion. In training form it is ``BN(conv(x))``, where ``conv`` is a plain
``nn.Conv2d`` or a :class:`LoRAConv2d` (a conv plus a linear low-rank side branch). ``reparameterize()``
turns it, in place, into its inference form: one ``nn.Conv2d`` with bias and ``bn = nn.Identity()``. The
inference form can also be built directly with ``inference_mode=True``, so fused weights load strictly.
``forward`` is the same in both forms and compares no flags.
"""
from __future__ import annotations

import fnmatch
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import fusion_math as T
from .errors import ConfigError, ReparamError
from .identity import card_of, set_card


class LambdaReLU(nn.Module):
    """VanillaNet's annealed activation ``y = (1 - lam) * ReLU(x) + lam * x``.

    ``lam`` is a buffer, so it is saved with the weights and copied into EMA models. It starts at 1, where
    the layer is exactly the identity; a training schedule may set it lower and anneal it back to 1.
    """

    lam: Tensor

    def __init__(self, lam: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("lam", torch.tensor(float(lam)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.lerp(F.relu(x), x, self.lam.to(x.dtype))

    def extra_repr(self) -> str:
        return f"lam={self.lam.item():.4g}"


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` of a conv argument given as one int or a pair."""
    return (value, value) if isinstance(value, int) else (value[0], value[1])


class LoRABranch(nn.Module):
    """Linear low-rank side branch: ``Conv kxk(in -> r, stride) -> LambdaReLU -> Conv1x1(r -> out)``.

    ``down`` takes the geometry of the conv it sits beside (kernel size, stride, padding, dilation, padding mode),
    so that its output aligns with that conv's and its composed kernel has that conv's shape; the default padding
    is ``k // 2`` in each dimension. ``up`` starts at zero, so adding the branch leaves the network's function
    unchanged.
    """

    def __init__(self, in_chs: int, out_chs: int, rank: int, kernel_size: int | tuple[int, int] = 3,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] | str | None = None,
                 dilation: int | tuple[int, int] = 1, padding_mode: str = "zeros") -> None:
        super().__init__()
        if padding is None:
            padding = tuple(k // 2 for k in _pair(kernel_size))
        self.down = nn.Conv2d(in_chs, rank, kernel_size, stride, padding, dilation, bias=False,
                              padding_mode=padding_mode)
        self.act = LambdaReLU()
        self.up = nn.Conv2d(rank, out_chs, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.act(self.down(x)))

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """The equivalent single conv ``(kernel [out, in, kh, kw], bias [out])``; needs ``lam == 1``."""
        lam = self.act.lam.item()
        if lam != 1.0:
            raise ReparamError(f"LambdaReLU has lam={lam!r}, not exactly 1, so it is not linear; finish the lambda "
                               "schedule (models.set_lambda(model, 1.0)) before fusing")
        return T.merge_kxk_1x1(self.down.weight, None, self.up.weight, None)


class LoRAConv2d(nn.Module):
    """A conv plus a :class:`LoRABranch` on the same input: ``conv(x) + lora(x)``.

    The branch copies the conv's kernel size, stride, padding, dilation and padding mode, so ``conv(x) + lora(x)`` is
    one conv of the conv's geometry (:meth:`fused_kernel`). Refused (:class:`ConfigError`): a grouped conv, and
    a subclass of ``nn.Conv2d`` (timm's ``Conv2dSame``, ``StdConv2d``), whose forward pads by the input's size or
    changes its weight, which a branch beside it and a fused conv cannot follow.
    """

    def __init__(self, conv: nn.Conv2d, rank: int) -> None:
        super().__init__()
        if conv.groups != 1:
            raise ConfigError(f"LoRA needs a dense conv, got groups={conv.groups}; leave grouped (depthwise) convs out "
                              "of the targets")
        if type(conv) is not nn.Conv2d:
            raise ConfigError(f"LoRA needs a plain torch.nn.Conv2d, got {type(conv).__name__}, whose forward does more "
                              "than conv2d(x, weight) (padding by the input's size, a standardised weight), which no "
                              "fused conv reproduces; leave it out of lora_targets")
        self.conv = conv
        self.lora = LoRABranch(conv.in_channels, conv.out_channels, rank, conv.kernel_size, conv.stride,
                               conv.padding, conv.dilation, conv.padding_mode)
        self.lora.to(device=conv.weight.device, dtype=conv.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x) + self.lora(x)

    def fused_kernel(self) -> tuple[Tensor, Tensor]:
        """``(kernel, bias)`` of the one conv (the wrapped conv's geometry) that computes ``conv(x) + lora(x)``."""
        return T.sum_kernels((self.conv.weight, self.conv.bias), self.lora.fused_kernel())


def conv_kernel(conv: nn.Module) -> tuple[Tensor, Tensor]:
    """``(kernel, bias)`` of a linear conv module: a plain ``nn.Conv2d`` or anything with ``fused_kernel()``."""
    if isinstance(conv, nn.Conv2d):
        bias = conv.bias if conv.bias is not None else torch.zeros_like(conv.weight[:, 0, 0, 0])
        return conv.weight, bias
    return conv.fused_kernel()


class ConvBN(nn.Module):
    """``Conv2d(k, stride, padding=k//2, no bias) -> BatchNorm2d``; one biased conv in inference form.

    Shapes: ``[N, in_chs, H, W] -> [N, out_chs, H / stride, W / stride]``.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        inference_mode: bool = False,
    ) -> None:
        super().__init__()
        self.conv: nn.Module = nn.Conv2d(
            in_chs, out_chs, kernel_size, stride, kernel_size // 2, groups=groups, bias=inference_mode
        )
        self.bn: nn.Module = nn.Identity() if inference_mode else nn.BatchNorm2d(out_chs)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm_act(self.conv(x))

    def norm_act(self, y: Tensor) -> Tensor:
        """What follows the conv: ``BN(y)``. A ReduceNet teacher feeds it ``conv(x) + branch_b(x)``."""
        return self.bn(y)

    @property
    def base_conv(self) -> nn.Conv2d:
        """The main conv, also when a LoRA branch wraps it."""
        return self.conv.conv if isinstance(self.conv, LoRAConv2d) else self.conv  # type: ignore[return-value]

    def add_lora(self, rank: int) -> None:
        """Wrap the conv with a zero-initialised LoRA branch of ``rank`` (training form only)."""
        if not isinstance(self.bn, nn.BatchNorm2d) or isinstance(self.conv, LoRAConv2d):
            raise ConfigError("LoRA can only be added once, to a ConvBN in training form")
        self.conv = LoRAConv2d(self.conv, rank)  # type: ignore[arg-type]

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse LoRA branch and BatchNorm into one biased conv, in place (timm's protocol)."""
        if isinstance(self.bn, nn.Identity) and isinstance(self.conv, nn.Conv2d):
            return  # already in inference form
        kernel, bias = conv_kernel(self.conv)
        bn = self.bn
        if isinstance(bn, nn.BatchNorm2d):
            kernel, bias = T.fold_bn(kernel, bias, bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        base = self.base_conv
        fused = nn.Conv2d(base.in_channels, base.out_channels, base.kernel_size, base.stride, base.padding,
                          groups=base.groups, bias=True).to(device=kernel.device, dtype=kernel.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        self.conv, self.bn = fused, nn.Identity()


class ConvBNAct(ConvBN):
    """:class:`ConvBN` followed by an activation, which fusion keeps: ``act(BN(conv(x)))``."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3, stride: int = 1, groups: int = 1,
                 act_layer: type[nn.Module] = nn.ReLU, inference_mode: bool = False) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride, groups, inference_mode)
        self.act = act_layer()

    def norm_act(self, y: Tensor) -> Tensor:
        return self.act(self.bn(y))


class FoldedNormAct(nn.Module):
    """What is left of a norm-activation layer (timm's ``BatchNormAct2d``: BatchNorm, dropout, activation) once its
    BatchNorm is folded into the conv before it: the dropout and the activation, under the same names, so the
    state_dict keys of an activation with weights (PReLU) stay those of the layer it replaces."""

    def __init__(self, drop: nn.Module, act: nn.Module) -> None:
        super().__init__()
        self.drop, self.act = drop, act

    @classmethod
    def of(cls, norm_act: nn.Module) -> FoldedNormAct:
        """The layer that ``norm_act`` becomes; refuses a module without ``drop`` and ``act`` submodules."""
        drop, act = getattr(norm_act, "drop", None), getattr(norm_act, "act", None)
        if not (isinstance(drop, nn.Module) and isinstance(act, nn.Module)):
            raise ConfigError(f"{type(norm_act).__name__} is not a norm-activation layer (it has no drop and act "
                              "modules)")
        return cls(drop, act)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(x))


class NonLinearBranch(nn.Module):
    """A teacher's removable branch (b): ``Conv3x3(in→mid, stride) → BN → act → Conv1x1(mid→out) → BN``.

    Its output is summed into the student's conv output before their shared BN; no conv can replace it, so
    fusion refuses it and the student is built without it (``models.student_from_teacher``).
    """

    def __init__(self, in_chs: int, mid_chs: int, out_chs: int, stride: int = 1,
                 act_layer: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(in_chs, mid_chs, 3, stride, act_layer=act_layer)
        self.conv2 = ConvBN(mid_chs, out_chs, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv2(self.conv1(x))

    def reparameterize(self) -> None:
        raise ReparamError("it is a teacher's non-linear branch (b), which no conv can replace; "
                           "build the student with models.student_from_teacher(teacher) and fuse that")


def check_int(name: str, value: object, minimum: int, hint: str) -> int:
    """``value`` if it is a whole number >= ``minimum``, else a one-line :class:`ConfigError`."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be a whole number >= {minimum}, got {value!r}; {hint}")
    return value


def check_family_args(num_classes: int, expansion: int, lora_rank: int, lora_targets: str | Sequence[str] | None,
                      inference_mode: bool, default_targets: Sequence[str]) -> list[str]:
    """Validate the arguments every teacher/student family shares; returns ``lora_targets`` as a list."""
    check_int("num_classes", num_classes, 1, "pass the dataset's class count")
    check_int("expansion", expansion, 0, "use 0 for the student, >= 1 for a teacher")
    check_int("lora_rank", lora_rank, 0, "use 0 for no LoRA branch")
    if not isinstance(inference_mode, bool):  # "no" would build the fused form
        raise ConfigError(f"inference_mode must be True or False, got {inference_mode!r}")
    if expansion and lora_rank:
        raise ConfigError("LoRA branches belong to the student: pass expansion=0 with lora_rank, "
                          "or use models.student_from_teacher(teacher, lora_rank=...)")
    if inference_mode and (expansion or lora_rank):
        raise ConfigError("inference_mode builds the fused student: pass expansion=0 and lora_rank=0")
    if isinstance(lora_targets, str):
        return [lora_targets]
    if lora_targets is not None and not list(lora_targets):
        raise ConfigError("lora_targets is empty; pass None for the family's default convs or at least one glob")
    return list(lora_targets) if lora_targets is not None else list(default_targets)


def lora_rank_limit(conv: nn.Conv2d) -> int:
    """The largest rank a :class:`LoRABranch` on ``conv`` can use: its ``down`` (kxk, in -> r) and ``up`` (1x1, r ->
    out) convs fuse into a kernel of rank at most ``min(out, in * kh * kw)``, so more channels add parameters only."""
    kh, kw = conv.kernel_size
    return min(conv.out_channels, conv.in_channels * kh * kw)


def check_lora_rank(rank: int, convs: dict[str, nn.Conv2d], option: str = "lora_rank") -> None:
    """Refuse, in one line and before any branch is allocated, a ``rank`` larger than any of ``convs`` (the targeted
    convs, by name) can use (:func:`lora_rank_limit`); a rank that at least one of them uses in full is accepted."""
    if not convs:
        return
    name, conv = max(convs.items(), key=lambda item: lora_rank_limit(item[1]))
    limit = lora_rank_limit(conv)
    if rank > limit:
        kh, kw = conv.kernel_size
        raise ConfigError(f"{option} {rank} is larger than any targeted conv can use: the largest useful rank is "
                          f"{limit} (min(out channels, in channels x k x k) = min({conv.out_channels}, "
                          f"{conv.in_channels} x {kh} x {kw}) for {name}); pass {option} {limit} or less")


def add_lora(model: nn.Module, rank: int, targets: Sequence[str]) -> list[str]:
    """Give every :class:`ConvBN` whose name matches a glob in ``targets`` a LoRA branch of ``rank``.

    Args:
        model: any model built from :class:`ConvBN` layers, in training form.
        rank: LoRA rank r >= 1, at most the largest :func:`lora_rank_limit` of the targeted convs.
        targets: ``fnmatch`` patterns over module names (``*`` also matches dots), e.g. ``"layer*.conv1"``.

    Returns:
        The names of the convs that got a branch. A model with a card (built by ``create_model``) records them in
        it (``lora_rank``, ``lora_targets``), so that it saves and reloads with its branches.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ConfigError(f"lora_rank must be a whole number >= 1 (0 for none), got {rank!r}")
    card = card_of(model)
    config = card.config if card is not None else {}
    recorded = config.get("lora_rank") or 0
    if card is not None:  # a built model: its card must be able to say what is added (checked before any branch)
        if "lora_rank" not in config:  # the family's config has no place for them
            raise ConfigError(f"{config['model']} records no LoRA branches in its config; use "
                              "models.grow.add_lora_to_convs, which records them for any classifier")
        if config.get("expansion"):
            raise ConfigError("LoRA branches belong to the student: add them to models.student_from_teacher(teacher, "
                              "lora_rank=...)")
        if recorded and recorded != rank:
            raise ConfigError(f"this model has LoRA branches of rank {recorded} already; add more of that rank")
    names = [n for n, m in model.named_modules()
             if isinstance(m, ConvBN) and any(fnmatch.fnmatchcase(n, t) for t in targets)]
    if not names:
        raise ConfigError(f"lora_targets {list(targets)} match no conv of this model; "
                          "use glob patterns over module names such as 'layer*.conv1'")
    modules = dict(model.named_modules())
    convs = {n: modules[n].base_conv for n in names}
    grouped = next((n for n, conv in convs.items() if conv.groups != 1), None)
    if grouped is not None:
        raise ConfigError(f"lora_targets matches the grouped (depthwise) conv {grouped!r}; LoRA needs dense convs")
    check_lora_rank(rank, convs)
    for n in names:
        modules[n].add_lora(rank)
    if card is not None:  # a built model: its card says so, so that it saves and rebuilds with the branches
        known = list(config.get("lora_targets") or []) if recorded else []
        set_card(model, card.with_args(lora_rank=rank, lora_targets=known + [t for t in targets if t not in known]))
    return names


def set_lambda(model: nn.Module, lam: float) -> int:
    """Set ``lam`` of every :class:`LambdaReLU` in ``model``; returns how many were set."""
    acts = [m for m in model.modules() if isinstance(m, LambdaReLU)]
    for m in acts:
        m.lam.fill_(lam)
    return len(acts)
