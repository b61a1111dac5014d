"""Behaviour tests for train/distill.py (float64 references written from the papers' formulas)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.errors import ConfigError
from train.distill import (
    KD_DEFAULTS,
    KD_LOSSES,
    DistillLoss,
    FeatureDistill,
    SemCKD,
    build_distill_loss,
    dkd_div,
    feature_extractor,
    kd_div,
)


def _logits(n: int = 8, c: int = 10, seed: int = 0, scale: float = 3.0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, c, generator=g) * scale
    t = torch.randn(n, c, generator=g) * scale
    y = torch.randint(0, c, (n,), generator=g)
    return s, t, y


def _kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p || q) with 0 * log 0 = 0."""
    return torch.where(p > 0, p * (p.log() - q.log()), torch.zeros_like(p)).sum(1)


def _kd_reference(s: torch.Tensor, t: torch.Tensor, T: float) -> torch.Tensor:
    p_s, p_t = (s.double() / T).softmax(1), (t.double() / T).softmax(1)
    return _kl(p_t, p_s).mean() * T**2


def _dkd_reference(s, t, y, alpha, beta, T) -> torch.Tensor:
    p_s, p_t = (s.double() / T).softmax(1), (t.double() / T).softmax(1)
    gt = F.one_hot(y, s.shape[1]).bool()
    b_s = torch.stack([p_s[gt], 1 - p_s[gt]], 1)
    b_t = torch.stack([p_t[gt], 1 - p_t[gt]], 1)
    n = s.shape[0]
    q_s = p_s[~gt].view(n, -1)
    q_t = p_t[~gt].view(n, -1)
    q_s, q_t = q_s / q_s.sum(1, keepdim=True), q_t / q_t.sum(1, keepdim=True)
    return (alpha * _kl(b_t, b_s).mean() + beta * _kl(q_t, q_s).mean()) * T**2


# ----------------------------------------------------------------------------------------------- kd_div


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_div_matches_reference(T):
    s, t, _ = _logits()
    torch.testing.assert_close(kd_div(s, t, T).double(), _kd_reference(s, t, T), rtol=1e-5, atol=1e-6)


def test_kd_div_zero_for_equal_logits():
    s, _, _ = _logits()
    assert kd_div(s, s.clone(), 4.0).abs().item() < 1e-6


@pytest.mark.filterwarnings("ignore:reduction. 'mean'")
def test_kd_div_is_batchmean_times_T2():
    s, t, _ = _logits(c=100)
    T = 4.0
    loss = kd_div(s, t, T)
    torch.testing.assert_close(kd_div(torch.cat([s, s]), torch.cat([t, t]), T), loss)
    wrong = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="mean") * T * T
    torch.testing.assert_close(wrong * s.shape[1], loss)  # "mean" also divides by the classes
    assert not torch.allclose(wrong, loss)
    unscaled = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="batchmean")
    torch.testing.assert_close(unscaled * T * T, loss)


# ---------------------------------------------------------------------------------------------- dkd_div


@pytest.mark.parametrize("alpha,beta,T", [(1.0, 8.0, 4.0), (2.0, 0.5, 1.0), (0.0, 1.0, 2.0), (1.0, 0.0, 2.0)])
def test_dkd_div_matches_reference(alpha, beta, T):
    s, t, y = _logits(n=16, c=7, seed=1)
    got = dkd_div(s, t, y, alpha, beta, T)
    torch.testing.assert_close(got.double(), _dkd_reference(s, t, y, alpha, beta, T), rtol=1e-5, atol=1e-6)


def test_dkd_div_zero_for_equal_logits():
    s, _, y = _logits()
    assert dkd_div(s, s.clone(), y, 1.0, 8.0, 4.0).abs().item() < 1e-5


def test_dkd_div_finite_for_huge_logits():
    s, t, y = _logits(scale=1e4)
    s.requires_grad_(True)
    loss = dkd_div(s, t, y, 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0
    assert torch.isfinite(s.grad).all()
    # Saturated teacher (one-hot after softmax) against a student that puts ~0 on the target class.
    y = torch.zeros(4, dtype=torch.long)
    t = torch.full((4, 5), -1e4)
    t[:, 0] = 1e4
    s = (-t).requires_grad_(True)
    loss = dkd_div(s, t, y, 1.0, 8.0, 4.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------ DistillLoss


def test_defaults_are_documented_values():
    assert KD_LOSSES == ("kd", "dkd", "mse", "none")
    assert KD_DEFAULTS["kd"] == {"alpha": 0.7, "T": 5.0}
    loss = DistillLoss("dkd")
    assert (loss.alpha, loss.beta, loss.T, loss.warmup_epochs) == (1.0, 8.0, 4.0, 20)
    assert "T=5.0" in repr(build_distill_loss("kd")) and "alpha=0.7" in repr(build_distill_loss("kd"))


def test_kd_alpha_endpoints():
    s, t, y = _logits()
    torch.testing.assert_close(DistillLoss("kd", alpha=0.0)(s, y, t), F.cross_entropy(s, y))
    torch.testing.assert_close(DistillLoss("kd", alpha=1.0, T=3.0)(s, y, t), kd_div(s, t, 3.0))
    mixed = build_distill_loss("kd", alpha=0.25, T=2.0)(s, y, t)
    torch.testing.assert_close(mixed, 0.75 * F.cross_entropy(s, y) + 0.25 * kd_div(s, t, 2.0))


def test_mse_and_label_smoothing():
    s, t, y = _logits()
    got = DistillLoss("mse", alpha=0.5, label_smoothing=0.1)(s, y, t)
    want = 0.5 * F.cross_entropy(s, y, label_smoothing=0.1) + 0.5 * ((s - t) ** 2).mean()
    torch.testing.assert_close(got, want)


def test_none_ignores_teacher():
    s, t, y = _logits()
    loss = DistillLoss("none")
    assert not loss.needs_teacher and DistillLoss("kd").needs_teacher
    torch.testing.assert_close(loss(s, y), F.cross_entropy(s, y))
    torch.testing.assert_close(loss(s, y, t), F.cross_entropy(s, y))


def test_dkd_warmup():
    s, t, y = _logits()
    loss = DistillLoss("dkd", warmup_epochs=10)
    ce, dkd = F.cross_entropy(s, y), dkd_div(s, t, y, 1.0, 8.0, 4.0)
    assert dkd.item() > 0
    # epochs count from 1 as in mdistiller: the first (0-based 0) already has weight 1/10
    torch.testing.assert_close(loss(s, y, t), ce + 0.1 * dkd)  # epoch 0 by default
    loss.set_epoch(4)
    torch.testing.assert_close(loss(s, y, t), ce + 0.5 * dkd)
    for epoch in (9, 10, 37.5):
        loss.set_epoch(epoch)
        torch.testing.assert_close(loss(s, y, t), ce + dkd)
    torch.testing.assert_close(DistillLoss("dkd", warmup_epochs=0)(s, y, t), ce + dkd)


def test_kd_mean_reduction_is_the_original_reducenet_kldivloss():
    """The original ReduceNet's loss: alpha*T^2*nn.KLDivLoss()(log_softmax(s/T), softmax(t/T)) + (1-alpha)*CE."""
    s, t, y = _logits()
    alpha, T = 0.7, 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KLDivLoss's default 'mean' warns that it is not the KL's definition
        original = (alpha * T * T) * torch.nn.KLDivLoss()(F.log_softmax(s / T, dim=1), F.softmax(t / T, dim=1)) \
            + (1.0 - alpha) * F.cross_entropy(s, y)
    loss = DistillLoss("kd", alpha=alpha, T=T, reduction="mean")
    torch.testing.assert_close(loss(s, y, t), original)
    assert not torch.allclose(DistillLoss("kd", alpha=alpha, T=T)(s, y, t), original)
    with pytest.raises(ConfigError):
        DistillLoss("kd", reduction="sum")


@pytest.mark.parametrize("kind", ["kd", "dkd", "mse"])
def test_gradient_reaches_student_only(kind):
    s, t, y = _logits()
    s.requires_grad_(True)
    t.requires_grad_(True)
    loss = DistillLoss(kind)
    loss.set_epoch(100)
    loss(s, y, t).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_missing_teacher_logits_raises():
    s, _, y = _logits()
    with pytest.raises(ValueError, match="teacher"):
        DistillLoss("kd")(s, y)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "fitnet"}, "kd, dkd, mse, none"),
        ({"kind": "kd", "alpha": 1.5}, r"\[0, 1\]"),
        ({"kind": "mse", "alpha": -0.1}, r"\[0, 1\]"),
        ({"kind": "kd", "T": 0}, r"\(0, 100\]"),
        ({"kind": "dkd", "T": -1.0}, r"\(0, 100\]"),
        ({"kind": "kd", "T": 1e30}, r"\(0, 100\]"),
        ({"kind": "kd", "T": float("nan")}, r"\(0, 100\]"),
        ({"kind": "dkd", "beta": -1.0}, ">= 0"),
        ({"kind": "kd", "label_smoothing": 1.0}, r"\[0, 1\)"),
    ],
)
def test_bad_config_raises_one_line_config_error(kwargs, match):
    kind = kwargs.pop("kind")
    with pytest.raises(ConfigError, match=match) as info:
        build_distill_loss(kind, **kwargs)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------- FeatureDistill


def _feats(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for shape in shapes]


def test_fitnet_shapes_and_gradient():
    fd = FeatureDistill([4, 8], [16, 32], mode="fitnet", weight=1.0)
    fs = [f.requires_grad_(True) for f in _feats([(2, 4, 8, 8), (2, 8, 4, 4)])]
    ft = [f.requires_grad_(True) for f in _feats([(2, 16, 4, 4), (2, 32, 4, 4)], seed=1)]  # first pair is pooled
    loss = fd(fs, ft)
    assert loss.shape == () and loss.item() > 0
    loss.backward()
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in fs)
    assert all(f.grad is None for f in ft)
    assert fd.proj[0][0].weight.grad is not None
    assert FeatureDistill([4], [16]).weight == 100.0


def test_fitnet_manual_value():
    fd = FeatureDistill([3], [5], mode="fitnet", weight=2.0).eval()
    fs, ft = _feats([(2, 3, 4, 4), (2, 5, 2, 2)])
    want = 2.0 * F.mse_loss(fd.proj[0](F.adaptive_avg_pool2d(fs, 2)), ft)
    torch.testing.assert_close(fd([fs], [ft]), want)


def test_at_zero_for_identical_and_gradient():
    fd = FeatureDistill([4, 8], [4, 8], mode="at")
    assert fd.weight == 1000.0 and len(list(fd.parameters())) == 0
    fs = _feats([(2, 4, 8, 8), (2, 8, 4, 4)])
    assert fd(fs, [f.clone() for f in fs]).item() == pytest.approx(0.0, abs=1e-7)
    # Different channel counts are fine for AT; spatial sizes are pooled to the smaller one.
    fd = FeatureDistill([4], [16], mode="at", weight=1.0)
    s = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.randn(2, 16, 4, 4)
    loss = fd([s], [t])
    loss.backward()
    assert loss.item() > 0 and s.grad.abs().sum() > 0
    a = lambda f: F.normalize(f.pow(2).mean(1).flatten(1), dim=1)  # noqa: E731
    torch.testing.assert_close(loss, (a(F.adaptive_avg_pool2d(s, 4)) - a(t)).pow(2).mean())


def test_feature_distill_bad_config():
    with pytest.raises(ConfigError, match="fitnet or at"):
        FeatureDistill([4], [4], mode="crd")
    with pytest.raises(ConfigError, match="one teacher channel count"):
        FeatureDistill([4, 8], [4])


def test_feature_extractor_on_tiny_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1))
    fx = feature_extractor(model, ["1", "2"])
    out = fx(torch.randn(2, 3, 8, 8))
    assert list(out) == ["1", "2"]
    assert out["1"].shape == (2, 4, 8, 8) and out["2"].shape == (2, 8, 4, 4)
    fd = FeatureDistill([4, 8], [4, 8], mode="at")
    assert fd(out, {k: v + 1 for k, v in out.items()}).item() > 0  # dicts are taken in order
    with pytest.raises(ConfigError, match="get_graph_node_names") as info:
        feature_extractor(model, ["nope"])
    assert "\n" not in str(info.value)


def test_semckd_matches_the_formula_on_small_tensors():
    """SemCKD written out with functional ops from the paper's definition, against the module."""
    torch.manual_seed(0)
    b, factor = 8, 4
    sem = SemCKD([3, 5], [4, 6, 2], batch_size=b, weight=2.0, factor=factor).double().train()
    fs = [torch.randn(b, 3, 8, 8, dtype=torch.float64), torch.randn(b, 5, 4, 4, dtype=torch.float64)]
    ft = [torch.randn(b, 4, 8, 8, dtype=torch.float64), torch.randn(b, 6, 4, 4, dtype=torch.float64),
          torch.randn(b, 2, 2, 2, dtype=torch.float64)]

    def embed(m, x):  # Linear -> ReLU -> Linear -> L2 normalise
        h = F.relu(x @ m.linear1.weight.t() + m.linear1.bias) @ m.linear2.weight.t() + m.linear2.bias
        return h / h.norm(dim=1, keepdim=True)

    def project(seq, x):  # Conv1x1-BN-ReLU-Conv3x3-BN-ReLU-Conv1x1, BN in training mode (batch statistics)
        def bn(m, y):
            mu, var = y.mean((0, 2, 3), keepdim=True), y.var((0, 2, 3), unbiased=False, keepdim=True)
            return (y - mu) / torch.sqrt(var + m.eps) * m.weight.view(1, -1, 1, 1) + m.bias.view(1, -1, 1, 1)
        y = F.relu(bn(seq[1], F.conv2d(x, seq[0].weight)))
        y = F.relu(bn(seq[4], F.conv2d(y, seq[3].weight, padding=1)))
        return F.conv2d(y, seq[6].weight)

    q = torch.stack([embed(sem.query[i], f.flatten(1) @ f.flatten(1).t()) for i, f in enumerate(fs)], 1)
    k = torch.stack([embed(sem.key[j], f.flatten(1) @ f.flatten(1).t()) for j, f in enumerate(ft)], 1)
    att = torch.softmax(torch.einsum("bsd,btd->bst", q, k), dim=-1)
    total = torch.zeros((), dtype=torch.float64)
    for i, s in enumerate(fs):
        for j, t in enumerate(ft):
            size = min(s.shape[-1], t.shape[-1])
            s_ij, t_ij = F.adaptive_avg_pool2d(s, size), F.adaptive_avg_pool2d(t, size)
            err = (project(sem.proj[i][j], s_ij) - t_ij).pow(2).flatten(1).mean(1)
            total = total + (att[:, i, j] * err).sum()
    expected = 2.0 * total / (b * len(fs))
    torch.testing.assert_close(sem(fs, ft), expected)
    # the attention is a distribution over teacher layers for every sample and student layer
    torch.testing.assert_close(sem.attention(fs, ft).sum(-1), torch.ones(b, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batches of 8"):
        sem([f[:4] for f in fs], [f[:4] for f in ft])


def test_semckd_trains_its_embeddings_and_projections():
    sem = SemCKD([3], [4], batch_size=4)
    loss = sem([torch.randn(4, 3, 4, 4, requires_grad=True)], [torch.randn(4, 4, 4, 4)])
    loss.backward()
    assert all(p.grad is not None for p in sem.parameters())
    assert sem.weight == 400.0


def test_at_matches_the_formula():
    fs, ft = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 5, 4, 4, dtype=torch.float64)
    am = lambda f: F.normalize(f.pow(2).mean(1).view(2, -1), dim=1)  # noqa: E731  (RepDistiller's at())
    expected = 1000.0 * (am(fs) - am(ft)).pow(2).mean()
    torch.testing.assert_close(FeatureDistill([3], [5], mode="at")([fs], [ft]), expected)


def test_kd_with_explicit_ce_weight_is_repdistillers_loss():
    s, t, y = _logits()
    loss = DistillLoss("kd", alpha=1.0, T=4.0, ce_weight=1.0)
    expected = F.cross_entropy(s, y) + F.kl_div(F.log_softmax(s / 4, 1), F.softmax(t / 4, 1),
                                                reduction="sum") * 16 / s.shape[0]
    torch.testing.assert_close(loss(s, y, t), expected)
    with pytest.raises(ConfigError):
        DistillLoss("kd", ce_weight=-1.0)


def test_a_registered_logit_loss_is_a_choice_of_kd(monkeypatch):
    """Adding a loss is one decorated function: DistillLoss and the CLIs' --kd take it from the registry."""
    from train import distill, stage2

    monkeypatch.setattr(distill, "LOGIT_LOSSES", dict(distill.LOGIT_LOSSES))
    monkeypatch.setattr("train.cli.LOGIT_LOSSES", distill.LOGIT_LOSSES)

    @distill.register_logit_loss("l1", defaults={"alpha": 0.5}, help="CE + alpha * L1 of the logits")
    def l1(loss, s, t, y, ce):
        return ce + loss.alpha * (s - t).abs().mean()

    s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    got = DistillLoss("l1")(s, y, t)
    torch.testing.assert_close(got, F.cross_entropy(s, y) + 0.5 * (s - t).abs().mean())
    parser = stage2.build_parser()
    assert parser.parse_args(["--inherit", "x", "--kd", "l1"]).kd == "l1"
    assert "l1: CE + alpha * L1" in parser.format_help().replace("\n", " ").replace("  ", " ")
