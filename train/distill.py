"""Knowledge-distillation losses: logit-level (KD, DKD, MSE) and feature-level (FitNets, attention transfer, SemCKD).

References:
    * Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", NeurIPS-W 2015 (KD).
    * Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022 (DKD).
    * Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015 (hint loss).
    * Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017 (attention transfer).
    * Chen, Mei, Zhang, Wang, Wang & Feng, "Cross-Layer Distillation with Semantic Calibration", AAAI 2021 (SemCKD).

The teacher is assumed frozen: every loss here detaches the teacher's logits / features, so gradients reach
the student (and the FitNets projection) only.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.errors import ConfigError

__all__ = [
    "KD_LOSSES",
    "KD_DEFAULTS",
    "LOGIT_LOSSES",
    "FEATURE_LOSSES",
    "register_logit_loss",
    "KD_REDUCTIONS",
    "FEATURE_MODES",
    "FEATURE_DEFAULTS",
    "kd_div",
    "dkd_div",
    "DistillLoss",
    "build_distill_loss",
    "FeatureDistill",
    "SemCKD",
    "hint_mse",
    "fsp_matrix",
    "gram_loss",
    "feature_extractor",
]

MAX_T = 100.0  # beyond it T**2 scaling and softmax(t / T) only lose precision (the papers use 1 to 20)


@dataclass(frozen=True)
class LogitTerm:
    """A registered logit-level loss (torchdistill's pattern): ``fn(loss, student_logits, teacher_logits, targets,
    ce) -> Tensor``, where ``loss`` is the :class:`DistillLoss` holding the hyper-parameters and ``ce`` the
    cross-entropy term; its ``defaults`` (hyper-parameters left ``None`` take them) and a ``help`` line, which
    ``--kd``'s help shows."""

    name: str
    fn: Callable[..., Tensor]
    defaults: dict[str, Any]
    help: str
    needs_teacher: bool = True


#: Every logit-level loss, by name: ``--kd``'s choices (:func:`register_logit_loss` adds one).
LOGIT_LOSSES: dict[str, LogitTerm] = {}


def register_logit_loss(name: str, *, defaults: dict[str, Any], help: str, needs_teacher: bool = True):
    """Decorator: register ``fn(loss, student_logits, teacher_logits, targets, ce) -> Tensor`` as ``--kd name``."""
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        LOGIT_LOSSES[name] = LogitTerm(name, fn, dict(defaults), help, needs_teacher)
        return fn
    return register


@dataclass(frozen=True)
class FeatureTerm:
    """A registered feature-level loss: its default weight (RepDistiller/mdistiller's CIFAR-100 settings, FitNet
    100 and AT 1000; SemCKD's 400) and a ``help`` line, which ``--feature-kd``'s help shows."""

    name: str
    weight: float
    help: str


#: Every feature-level loss, by name: ``--feature-kd``'s choices.
FEATURE_LOSSES: dict[str, FeatureTerm] = {
    "fitnet": FeatureTerm("fitnet", 100.0, "FitNets: MSE after a trained 1x1 conv + BN per layer pair"),
    "at": FeatureTerm("at", 1000.0, "attention transfer: MSE of the normalised spatial attention maps"),
    "semckd": FeatureTerm("semckd", 400.0, "SemCKD: every student layer learns from every teacher layer, weighted "
                                           "by attention"),
}
FEATURE_MODES = tuple(FEATURE_LOSSES)
#: Default weight of each feature loss.
FEATURE_DEFAULTS: dict[str, float] = {k: t.weight for k, t in FEATURE_LOSSES.items()}


KD_REDUCTIONS = ("batchmean", "mean")


def kd_div(student_logits: Tensor, teacher_logits: Tensor, T: float, reduction: str = "batchmean") -> Tensor:
    """Temperature-scaled KD term of Hinton et al. (2015).

    ``KL(softmax(t / T) || softmax(s / T))`` summed over classes, averaged over the batch ("batchmean") and
    multiplied by ``T**2`` so that gradient magnitudes do not shrink with the temperature. With
    ``reduction="mean"`` it is averaged over the ``N * C`` elements instead, i.e. divided by the class count C:
    what ``nn.KLDivLoss()`` with its default reduction gives, as the original ReduceNet used it.

    Args:
        student_logits: ``(N, C)`` student logits.
        teacher_logits: ``(N, C)`` teacher logits (not detached here).
        T: Softmax temperature, > 0.
        reduction: ``"batchmean"`` (Hinton) or ``"mean"`` (the original ReduceNet's, 1/C of it).

    Returns:
        Scalar loss.
    """
    log_p_s = F.log_softmax(student_logits / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits / T, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (T * T)
    return kl / student_logits.shape[1] if reduction == "mean" else kl


def _binary_and_nontarget_log_probs(logits: Tensor, targets: Tensor, gt_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities of DKD's two decoupled distributions, computed with log-sum-exp only (no ``log(0)``).

    Returns:
        ``(N, 2)`` log ``[p_gt, 1 - p_gt]`` and ``(N, C)`` log of the non-target distribution renormalised over
        the ``C - 1`` other classes, with 0 at the ground-truth position (it carries no mass and must not
        contribute to the KL sum).
    """
    others = logits.masked_fill(gt_mask, float("-inf"))
    lse_all = logits.logsumexp(dim=1, keepdim=True)
    lse_others = others.logsumexp(dim=1, keepdim=True)
    log_gt = logits.gather(1, targets.unsqueeze(1)) - lse_all
    log_binary = torch.cat([log_gt, lse_others - lse_all], dim=1)
    log_nontarget = (others - lse_others).masked_fill(gt_mask, 0.0)
    return log_binary, log_nontarget


def dkd_div(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, alpha: float, beta: float, T: float
) -> Tensor:
    """Decoupled KD of Zhao et al. (CVPR 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary distributions ``[p_gt, 1 - p_gt]`` of teacher and student; NCKD is the
    KL between their distributions over the non-target classes, renormalised to sum to one. Both are
    "batchmean" and multiplied by ``T**2``, as in mdistiller. Unlike mdistiller (``log(softmax)`` and a
    ``-1000`` logit mask), every log-probability is a difference of log-sum-exps and the target class is
    masked with ``-inf``, so the loss and its gradient stay finite for arbitrarily large logits.

    Args:
        student_logits: ``(N, C)`` student logits, ``C >= 2``.
        teacher_logits: ``(N, C)`` teacher logits (not detached here).
        targets: ``(N,)`` integer class labels.
        alpha: TCKD weight.
        beta: NCKD weight.
        T: Softmax temperature, > 0.

    Returns:
        Scalar loss.
    """
    if student_logits.shape[1] < 2:
        raise ValueError(f"dkd needs at least 2 classes, got logits of shape {tuple(student_logits.shape)}")
    targets = targets.reshape(-1)
    gt_mask = F.one_hot(targets, student_logits.shape[1]).bool()
    bin_s, other_s = _binary_and_nontarget_log_probs(student_logits / T, targets, gt_mask)
    bin_t, other_t = _binary_and_nontarget_log_probs(teacher_logits / T, targets, gt_mask)
    tckd = F.kl_div(bin_s, bin_t, reduction="batchmean", log_target=True)
    nckd = F.kl_div(other_s, other_t, reduction="batchmean", log_target=True)
    return (alpha * tckd + beta * nckd) * (T * T)


@register_logit_loss("kd", defaults={"alpha": 0.7, "T": 5.0},
                     help="Hinton's KD, ce_weight * CE + alpha * T^2 KL (alpha 0.7, T 5: ReduceNet's)")
def _kd(loss: DistillLoss, s: Tensor, t: Tensor, y: Tensor, ce: Tensor) -> Tensor:
    return loss.ce_weight * ce + loss.alpha * kd_div(s, t, loss.T, loss.reduction)


@register_logit_loss("dkd", defaults={"alpha": 1.0, "beta": 8.0, "T": 4.0, "warmup_epochs": 20},
                     help="decoupled KD, CE + warm-up * (alpha TCKD + beta NCKD) (mdistiller's CIFAR recipe)")
def _dkd(loss: DistillLoss, s: Tensor, t: Tensor, y: Tensor, ce: Tensor) -> Tensor:
    return ce + loss.dkd_weight() * dkd_div(s, t, y, loss.alpha, loss.beta, loss.T)


@register_logit_loss("mse", defaults={"alpha": 0.7}, help="logit matching, ce_weight * CE + alpha * MSE")
def _mse(loss: DistillLoss, s: Tensor, t: Tensor, y: Tensor, ce: Tensor) -> Tensor:
    return loss.ce_weight * ce + loss.alpha * F.mse_loss(s, t)


@register_logit_loss("none", defaults={}, help="cross-entropy only, no teacher", needs_teacher=False)
def _ce(loss: DistillLoss, s: Tensor, t: Tensor | None, y: Tensor, ce: Tensor) -> Tensor:
    return ce


#: The logit losses' names, in registration order, and their defaults. ``kd``: ReduceNet / Hinton setting; ``dkd``:
#: mdistiller's CIFAR-100 recipe. Read-only by convention: :class:`DistillLoss` copies what it uses.
KD_LOSSES = tuple(LOGIT_LOSSES)
KD_DEFAULTS: dict[str, dict] = {k: dict(t.defaults) for k, t in LOGIT_LOSSES.items()}


class DistillLoss(nn.Module):
    """Total training loss of a student distilled from a frozen teacher.

    * ``kd``:   ``ce_weight * CE(s, y) + alpha * kd_div(s, t, T, reduction)`` with ``ce_weight = 1 - alpha`` unless
      given (Hinton et al. 2015; alpha=0.7, T=5; ``reduction="mean"`` reproduces the original ReduceNet's
      ``nn.KLDivLoss()``, 1/C of Hinton's term; RepDistiller/SemCKD use ``ce_weight=1, alpha=1, T=4``).
    * ``mse``:  ``ce_weight * CE(s, y) + alpha * MSE(s, t)`` (logit matching; alpha=0.7).
    * ``dkd``:  ``CE(s, y) + min((epoch + 1) / warmup_epochs, 1) * dkd_div(s, t, y, alpha, beta, T)``
      (Zhao et al. 2022, mdistiller's CIFAR recipe: alpha=1, beta=8, T=4, warm-up 20 epochs; the epoch is
      0-based here and mdistiller counts from 1, so the first epoch has weight ``1 / warmup_epochs``).
    * ``none``: ``CE(s, y)``; the teacher is not needed (:attr:`needs_teacher` is False).

    Hyper-parameters left as ``None`` take their :data:`KD_DEFAULTS` value; those that do not apply to
    ``kind`` (e.g. ``T`` for ``mse``) are ignored, so generic callers can always pass them. Teacher logits
    are detached in :meth:`forward`.

    Args:
        kind: One of :data:`KD_LOSSES`.
        alpha: Distillation weight in ``[0, 1]`` for kd/mse; TCKD weight ``>= 0`` for dkd.
        T: Temperature ``> 0`` (kd, dkd).
        beta: NCKD weight ``>= 0`` (dkd).
        warmup_epochs: Epochs of linear warm-up of the DKD term, ``>= 0`` (0: none).
        label_smoothing: Label smoothing of the cross-entropy term, in ``[0, 1)``.
        reduction: KD term's reduction (kd only), one of :data:`KD_REDUCTIONS`.
        ce_weight: Weight of the cross-entropy term for kd/mse, ``>= 0``; ``None`` means ``1 - alpha``.

    Raises:
        ConfigError: On an unknown ``kind`` or an out-of-range hyper-parameter.
    """

    def __init__(
        self,
        kind: str = "kd",
        *,
        alpha: float | None = None,
        T: float | None = None,
        beta: float | None = None,
        warmup_epochs: int | None = None,
        label_smoothing: float = 0.0,
        reduction: str = "batchmean",
        ce_weight: float | None = None,
    ) -> None:
        super().__init__()
        if ce_weight is not None and not 0.0 <= ce_weight < math.inf:
            raise ConfigError(f"ce_weight must be a finite number >= 0, got {ce_weight}")
        if reduction not in KD_REDUCTIONS:
            raise ConfigError(f"unknown KD reduction {reduction!r}; choose one of: {', '.join(KD_REDUCTIONS)}")
        if kind not in LOGIT_LOSSES:
            raise ConfigError(f"unknown distillation loss {kind!r}; choose one of: {', '.join(LOGIT_LOSSES)}")
        given = {"alpha": alpha, "T": T, "beta": beta, "warmup_epochs": warmup_epochs}
        hp = {k: default if given[k] is None else given[k] for k, default in LOGIT_LOSSES[kind].defaults.items()}
        if kind in ("kd", "mse") and not (0.0 <= hp["alpha"] <= 1.0
                                          or (ce_weight is not None and 0 <= hp["alpha"] < math.inf)):
            raise ConfigError(f"{kind} alpha must be in [0, 1] (any weight >= 0 with ce_weight), got {hp['alpha']}")
        if kind == "dkd":
            for k in ("alpha", "beta", "warmup_epochs"):
                if not 0.0 <= hp[k] < math.inf:
                    raise ConfigError(f"dkd {k} must be a finite number >= 0, got {hp[k]}")
        if "T" in hp and not 0.0 < hp["T"] <= MAX_T:
            raise ConfigError(f"{kind} temperature T must be in (0, {MAX_T:g}], got {hp['T']}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.kind = kind
        self._term = LOGIT_LOSSES[kind]
        self.alpha: float | None = hp.get("alpha")
        self.T: float | None = hp.get("T")
        self.beta: float | None = hp.get("beta")
        self.warmup_epochs: int | None = hp.get("warmup_epochs")
        self.label_smoothing = float(label_smoothing)
        self.reduction = reduction
        self.ce_weight = (1.0 - self.alpha if kind in ("kd", "mse") else 1.0) if ce_weight is None else float(ce_weight)
        self.needs_teacher = self._term.needs_teacher
        self.epoch = 0.0

    def set_epoch(self, epoch: float) -> None:
        """Set the current 0-based epoch, which drives the DKD warm-up; no-op for other kinds."""
        self.epoch = float(epoch)

    def dkd_weight(self) -> float:
        """Current DKD warm-up factor ``min((epoch + 1) / warmup_epochs, 1)`` (1 when there is no warm-up)."""
        if not self.warmup_epochs:
            return 1.0
        return min((max(self.epoch, 0.0) + 1.0) / self.warmup_epochs, 1.0)

    def forward(self, student_logits: Tensor, targets: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
        """Compute the loss.

        Args:
            student_logits: ``(N, C)`` student logits.
            targets: ``(N,)`` integer labels.
            teacher_logits: ``(N, C)`` teacher logits; required unless ``kind == "none"``, ignored otherwise.

        Returns:
            Scalar loss.
        """
        ce = F.cross_entropy(student_logits, targets, label_smoothing=self.label_smoothing)
        if not self.needs_teacher:
            return ce
        if teacher_logits is None:
            raise ValueError(f"distillation loss {self.kind!r} needs teacher_logits")
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher logits {tuple(teacher_logits.shape)} do not match student {tuple(student_logits.shape)}"
            )
        return self._term.fn(self, student_logits, teacher_logits.detach(), targets, ce)

    def extra_repr(self) -> str:
        names = ("alpha", "beta", "T", "warmup_epochs")
        parts = [f"kind={self.kind!r}"] + [f"{n}={getattr(self, n)}" for n in names if getattr(self, n) is not None]
        if self.label_smoothing:
            parts.append(f"label_smoothing={self.label_smoothing}")
        if self.kind in ("kd", "mse") and self.ce_weight != 1.0 - self.alpha:
            parts.append(f"ce_weight={self.ce_weight}")
        if self.reduction != "batchmean":
            parts.append(f"reduction={self.reduction!r}")
        return ", ".join(parts)


def build_distill_loss(kind: str, alpha: float | None = None, T: float | None = None, **kw) -> DistillLoss:
    """Build a :class:`DistillLoss`; ``None`` hyper-parameters take their :data:`KD_DEFAULTS` value.

    Args:
        kind: One of :data:`KD_LOSSES`.
        alpha: See :class:`DistillLoss`.
        T: See :class:`DistillLoss`.
        **kw: ``beta``, ``warmup_epochs``, ``label_smoothing``.
    """
    return DistillLoss(kind, alpha=alpha, T=T, **kw)


def _pool_to_common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool whichever feature map is spatially larger down to the smaller one's size."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if a.shape[-2:] != size:
        a = F.adaptive_avg_pool2d(a, size)
    if b.shape[-2:] != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b


def _attention_map(f: Tensor) -> Tensor:
    """Zagoruyko & Komodakis (2017) attention map: L2-normalised channel mean of ``f**2``, flattened, in float32
    (or float64) whatever ``f``'s dtype (a bf16 map under autocast)."""
    return F.normalize(_float(f).pow(2).mean(dim=1).flatten(1), dim=1)


def _float(t: Tensor) -> Tensor:
    """``t`` in float32 where it is in a lower precision (bf16/fp16 under autocast); float64 is kept."""
    return t if t.dtype == torch.float64 else t.float()


class FeatureDistill(nn.Module):
    """Feature-level distillation summed over pairs of (student, teacher) intermediate feature maps.

    * ``fitnet``: FitNets (Romero et al. 2015) -- MSE between a learned 1x1-conv + BN projection of each student
      map (to the teacher's channel count) and the teacher map. The projection is trainable: give this
      module's parameters to the optimizer.
    * ``at``: attention transfer (Zagoruyko & Komodakis 2017) -- mean squared difference of the L2-normalised
      spatial attention maps ``mean_c(f**2)``; parameter-free.

    Maps of different spatial size are adaptive-average-pooled to the smaller size. Teacher features are
    detached. The losses are computed in float32 from maps of any precision (bf16 under autocast).

    Args:
        student_channels: Channels of each student map.
        teacher_channels: Channels of each teacher map (same length).
        mode: One of :data:`FEATURE_MODES`.
        weight: Loss multiplier; ``None`` takes :data:`FEATURE_DEFAULTS` (fitnet 100, at 1000).

    Raises:
        ConfigError: On an unknown mode, mismatched channel lists, or a negative weight.
    """

    def __init__(
        self,
        student_channels: Sequence[int],
        teacher_channels: Sequence[int],
        mode: str = "fitnet",
        weight: float | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("fitnet", "at"):
            raise ConfigError(f"unknown feature distillation mode {mode!r} for FeatureDistill; choose fitnet or at "
                              "(SemCKD is the SemCKD class)")
        student_channels, teacher_channels = list(student_channels), list(teacher_channels)
        if not student_channels or len(student_channels) != len(teacher_channels):
            raise ConfigError(
                f"need one teacher channel count per student feature, got {student_channels} vs {teacher_channels}"
            )
        if min(student_channels + teacher_channels) <= 0:
            raise ConfigError(f"channel counts must be > 0, got {student_channels} and {teacher_channels}")
        weight = FEATURE_DEFAULTS[mode] if weight is None else float(weight)
        if not 0 <= weight < math.inf:  # NaN too
            raise ConfigError(f"feature distillation weight must be a finite number >= 0, got {weight}")
        self.mode = mode
        self.weight = weight
        self.student_channels, self.teacher_channels = student_channels, teacher_channels
        self._pair = FeatureDistill._fitnet if mode == "fitnet" else FeatureDistill._at  # chosen once
        self.proj = nn.ModuleList()
        if mode == "fitnet":
            for cs, ct in zip(student_channels, teacher_channels):
                self.proj.append(nn.Sequential(nn.Conv2d(cs, ct, 1, bias=False), nn.BatchNorm2d(ct)))

    def forward(
        self,
        student_feats: Sequence[Tensor] | Mapping[str, Tensor],
        teacher_feats: Sequence[Tensor] | Mapping[str, Tensor],
    ) -> Tensor:
        """Weighted sum of the per-pair losses.

        Args:
            student_feats: ``(N, C_s, H, W)`` maps, in the order of ``student_channels`` (a dict, e.g. from
                :func:`feature_extractor`, is taken in insertion order).
            teacher_feats: ``(N, C_t, H', W')`` maps, same count.

        Returns:
            Scalar loss.
        """
        s_list = list(student_feats.values()) if isinstance(student_feats, Mapping) else list(student_feats)
        t_list = list(teacher_feats.values()) if isinstance(teacher_feats, Mapping) else list(teacher_feats)
        if len(s_list) != len(self.student_channels) or len(t_list) != len(self.teacher_channels):
            raise ValueError(
                f"expected {len(self.student_channels)} feature pairs, "
                f"got {len(s_list)} student and {len(t_list)} teacher"
            )
        total = s_list[0].new_zeros(())
        for i, (fs, ft) in enumerate(zip(s_list, t_list)):
            fs, ft = _pool_to_common_size(fs, ft.detach())
            total = total + self._pair(self, i, fs, ft)
        return self.weight * total

    def _fitnet(self, i: int, fs: Tensor, ft: Tensor) -> Tensor:
        return F.mse_loss(_float(self.proj[i](fs)), _float(ft))

    def _at(self, i: int, fs: Tensor, ft: Tensor) -> Tensor:
        return (_attention_map(fs) - _attention_map(ft)).pow(2).mean()

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, weight={self.weight}"


class _MLPEmbed(nn.Module):
    """SemCKD's embedding: ``Linear(d, 2k) -> ReLU -> Linear(2k, k) -> L2 normalise``."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim_in, 2 * dim_out)
        self.linear2 = nn.Linear(2 * dim_out, dim_out)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.linear2(F.relu(self.linear1(x.flatten(1)))), dim=1)


def _aa_embed(c_in: int, c_out: int) -> nn.Sequential:
    """SemCKD's projection of a student map to a teacher's channels: Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1."""
    mid = 2 * c_out
    return nn.Sequential(nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, mid, 3, padding=1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
                         nn.Conv2d(mid, c_out, 1, bias=False))


class SemCKD(nn.Module):
    """Cross-layer distillation with semantic calibration (Chen et al., AAAI 2021), as in DefangChen/SemCKD.

    Every student map ``i`` may learn from every teacher map ``j``. Each map of a batch gives a ``B x B`` similarity
    matrix of its flattened samples; a query embedding of student ``i``'s matrix and a key embedding of teacher
    ``j``'s give, per sample, attention weights ``softmax_j(q_i . k_j)``. Student map ``i`` is projected to teacher
    ``j``'s channels (Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1, after pooling the larger map to the smaller size),
    and the loss is ``sum_ij att_bij * mean((proj_ij(s_i) - t_j)^2)_b / (B * n_student)``, times ``weight``.

    The attention weights and the loss are computed in float32 (the embeddings and projections run in the autocast
    dtype, as any layer). The embeddings take the ``B x B`` matrices, so the batch size is fixed (the training loader
    drops the last partial batch, as SemCKD's does). All embeddings and projections train with the student.

    Args:
        student_channels: channels of each student map.
        teacher_channels: channels of each teacher map.
        batch_size: the training batch size per process.
        weight: the loss weight (400, SemCKD's CIFAR-100 setting, when None).
        factor: embedding width ``batch_size // factor`` (4 in SemCKD).
    """

    def __init__(self, student_channels: Sequence[int], teacher_channels: Sequence[int], batch_size: int,
                 weight: float | None = None, factor: int = 4) -> None:
        super().__init__()
        if not student_channels or not teacher_channels or min([*student_channels, *teacher_channels]) <= 0:
            raise ConfigError(f"SemCKD needs student and teacher maps with channels > 0, got {list(student_channels)} "
                              f"and {list(teacher_channels)}")
        if batch_size < factor:
            raise ConfigError(f"SemCKD embeds the batch's B x B similarity matrices: the batch size must be at least "
                              f"{factor}, got {batch_size}")
        weight = FEATURE_DEFAULTS["semckd"] if weight is None else float(weight)
        if not 0 <= weight < math.inf:  # NaN too
            raise ConfigError(f"feature distillation weight must be a finite number >= 0, got {weight}")
        self.weight, self.batch_size = weight, batch_size
        self.student_channels, self.teacher_channels = list(student_channels), list(teacher_channels)
        self.query = nn.ModuleList(_MLPEmbed(batch_size, batch_size // factor) for _ in student_channels)
        self.key = nn.ModuleList(_MLPEmbed(batch_size, batch_size // factor) for _ in teacher_channels)
        self.proj = nn.ModuleList(nn.ModuleList(_aa_embed(cs, ct) for ct in teacher_channels)
                                  for cs in student_channels)

    def attention(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        """``[B, n_student, n_teacher]`` attention weights of every student map over the teacher maps."""
        def similarity(f: Tensor) -> Tensor:
            flat = f.flatten(1)
            return flat @ flat.t()

        query = torch.stack([q(similarity(f)) for q, f in zip(self.query, student_feats)], 1)  # [B, S, k]
        key = torch.stack([k(similarity(f)) for k, f in zip(self.key, teacher_feats)], 2)  # [B, k, T]
        return F.softmax(_float(torch.bmm(query, key)), dim=-1)

    def forward(self, student_feats: Sequence[Tensor], teacher_feats: Sequence[Tensor]) -> Tensor:
        student_feats, teacher_feats = list(student_feats), [t.detach() for t in teacher_feats]
        b = student_feats[0].shape[0]
        if b != self.batch_size:
            raise ValueError(f"SemCKD was built for batches of {self.batch_size}, got {b}")
        att = self.attention(student_feats, teacher_feats)
        per_pair = torch.zeros_like(att)
        for i, fs in enumerate(student_feats):
            for j, ft in enumerate(teacher_feats):
                fs_ij, ft_ij = _pool_to_common_size(fs, ft)
                per_pair[:, i, j] = (_float(self.proj[i][j](fs_ij)) - _float(ft_ij)).pow(2).flatten(1).mean(1)
        return self.weight * (att * per_pair).sum() / (b * len(student_feats))

    def extra_repr(self) -> str:
        return f"weight={self.weight}, batch_size={self.batch_size}"


def hint_mse(student: Tensor, teacher: Tensor) -> Tensor:
    """The Pyramid's stage-1 hint: squared error summed over every element, divided by the batch size.

    The original used ``nn.MSELoss(size_average=False)`` (a sum over the batch too); dividing by the batch keeps
    the loss of a sample independent of the batch size. The teacher is detached.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"hint shapes differ: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}")
    return (student - teacher.detach()).pow(2).sum() / student.shape[0]


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """The Gram / FSP matrix of two feature maps of one network (Yim et al., CVPR 2017): ``[B, C1, C2]`` with
    ``G[b, i, j] = sum_hw first[b, i, h, w] * second[b, j, h, w] / (h * w)``. A larger ``second`` is average-pooled
    to ``first``'s size; a smaller one is upsampled (nearest), as the Pyramid did for block 2. A vector ``[B, C]``
    (a classifier head's output) counts as a 1x1 map, so a head's Gram matrix pairs each input channel with each
    logit."""
    first, second = (t[:, :, None, None] if t.dim() == 2 else t for t in (first, second))
    if second.shape[-2:] != first.shape[-2:]:
        if second.shape[-1] > first.shape[-1]:
            second = F.adaptive_avg_pool2d(second, first.shape[-2:])
        else:
            second = F.interpolate(second, size=first.shape[-2:], mode="nearest")
    h, w = first.shape[-2:]
    return torch.einsum("bihw,bjhw->bij", first, second) / (h * w)


def gram_loss(student_in: Tensor, student_out: Tensor, teacher_in: Tensor, teacher_out: Tensor) -> Tensor:
    """MSE between the student's and the teacher's FSP matrices of a block's input and output (the Pyramid's
    Gram stage 1). The teacher's are detached."""
    return F.mse_loss(fsp_matrix(student_in, student_out), fsp_matrix(teacher_in, teacher_out).detach())


def feature_extractor(model: nn.Module, nodes: list[str]) -> nn.Module:
    """Wrap ``model`` so that it returns ``{node: output}`` for the given graph nodes (torch.fx tracing).

    Node names are those of ``torchvision.models.feature_extraction.get_graph_node_names(model)``, e.g.
    ``"layer2"`` or ``"layer3.1.relu"``.

    Raises:
        ConfigError: If a node is not in the traced graph.
    """
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        return create_feature_extractor(model, return_nodes={n: n for n in nodes})
    except ValueError as e:
        first_line = str(e).split(". Hint")[0]
        raise ConfigError(f"{first_line}; list valid names with get_graph_node_names(model)") from None
