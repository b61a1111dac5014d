"""Behaviour tests for the model zoo: sizes, registry, argument checks, LambdaReLU, LoRA, surgery, complexity."""
from __future__ import annotations

import copy
import re

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from _shared import one_line
from models import ConfigError, ConvBN, LambdaReLU, LoRABranch, UnknownModelError
from models.layers import LoRAConv2d

NAMES = models.list_models(reducible=True)  # the families with teacher and student forms
RESNETS = [n for n in NAMES if re.fullmatch(r"reduce\d+", n)]

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")



def lora_convs(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, ConvBN) and isinstance(m.conv, LoRAConv2d)}


def blocks_per_stage(name: str) -> int:
    return (int(name[len("reduce"):]) - 2) // 6


# ---------------------------------------------------------------------------------------------------- sizes
def test_registry_lists_all_families():
    assert {"reduce20", "reduce32", "reduce44", "reduce56", "reduce110", "reduce_mobilenetv2"} <= set(NAMES)


@pytest.mark.parametrize("name, published", [("reduce20", 272_474), ("reduce56", 855_770)])
def test_student_param_count_matches_published_resnet(name, published):
    student = models.create_model(name, num_classes=10, expansion=0)
    assert sum(p.numel() for p in student.parameters()) == published


@pytest.mark.parametrize("width", [1, 2, 4])
def test_width_scales_channels(width, make_images):
    m = models.create_model("reduce20", expansion=0, width=width).eval()
    assert m.fc.in_features == 64 * width
    assert m.stem.conv.out_channels == 16 * width
    assert m.layer1[0].conv1.base_conv.out_channels == 16 * width
    assert m.layer2[0].conv1.base_conv.out_channels == 32 * width
    assert m.layer3[-1].conv2.base_conv.out_channels == 64 * width
    with torch.no_grad():
        assert m(make_images(2)).shape == (2, 10)
    if width > 1:  # conv params grow ~ width^2
        base = models.count_params(models.create_model("reduce20", expansion=0))
        assert models.count_params(m) > 0.9 * width**2 * base


def test_mobilenet_width_scales_channels():
    half = models.create_model("reduce_mobilenetv2", expansion=0, width=0.5)
    full = models.create_model("reduce_mobilenetv2", expansion=0, width=1.0)
    assert half.stem.conv.out_channels == 16 and full.stem.conv.out_channels == 32
    assert models.count_params(half) < models.count_params(full)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_classes", [10, 100])
def test_every_model_builds_teacher_and_student(name, num_classes, make_images):
    teacher = models.create_model(name, num_classes=num_classes).eval()
    student = models.create_model(name, num_classes=num_classes, expansion=0).eval()
    assert teacher.config["expansion"] == 1 and student.config["expansion"] == 0
    assert teacher.config["model"] == name and teacher.config["num_classes"] == num_classes
    assert models.count_params(teacher) > models.count_params(student)
    assert any("branch_b" in k for k in teacher.state_dict())
    assert not any("branch_b" in k for k in student.state_dict())
    x = make_images(2)
    with torch.no_grad():
        for m in (teacher, student):
            y = m(x)
            assert y.shape == (2, num_classes)
            assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------- registry
def test_unknown_model_lists_close_matches():
    with pytest.raises(UnknownModelError) as e:
        models.create_model("reduce21")
    assert "reduce20" in one_line(e)
    assert isinstance(e.value, models.ReduceNetError)


def test_brief_puts_a_library_error_on_one_short_line():
    from models.errors import brief

    e = RuntimeError("size mismatch for fc.weight:\n\tcopying a param with shape   [10, 64]" + " x" * 200)
    typed = brief(e)
    assert typed.startswith("RuntimeError: size mismatch for fc.weight: copying a param with shape [10, 64] x")
    assert "\n" not in typed and "\t" not in typed and "  " not in typed
    assert len(typed) == len("RuntimeError: ") + 160
    assert brief(e, 30, typed=False) == "size mismatch for fc.weight: c"
    assert brief(OSError(28, "No space left on device").strerror, typed=False) == "No space left on device"


def test_unknown_kwarg_is_config_error():
    with pytest.raises(ConfigError) as e:
        models.create_model("reduce20", not_an_argument=1)
    one_line(e)


def test_timm_create_model_uses_registry():
    m = timm.create_model("reduce56", num_classes=100, expansion=2)
    assert m.config["model"] == "reduce56"
    assert m.config["num_classes"] == 100 and m.config["expansion"] == 2
    assert m.fc.out_features == 100
    # expansion=2 makes branch (b) twice as wide as the block's planes
    assert m.layer1[0].branch_b.conv1.base_conv.out_channels == 2 * 16


def test_timm_pretrained_refused():
    with pytest.raises(ConfigError) as e:
        timm.create_model("reduce20", pretrained=True)
    one_line(e)


# ---------------------------------------------------------------------------------------------------- bad args
BAD_ARGS = [
    ("reduce20", dict(width=3)),
    ("reduce20", dict(width=True)),
    ("reduce20", dict(expansion=-1)),
    ("reduce20", dict(expansion=1.5)),
    ("reduce20", dict(expansion=0, lora_rank=-2)),
    ("reduce20", dict(expansion=0, lora_rank=True)),
    ("reduce20", dict(expansion=2, lora_rank=4)),
    ("reduce20", dict(lora_rank=4)),  # default expansion=1 is a teacher
    ("reduce20", dict(inference_mode=True)),
    ("reduce20", dict(expansion=2, inference_mode=True)),
    ("reduce20", dict(expansion=0, lora_rank=4, inference_mode=True)),
    ("reduce20", dict(expansion=0, inference_mode="no")),  # a string is no flag: "no" is truthy
    ("reduce20", dict(num_classes=0)),
    ("reduce20", dict(expansion=0, lora_rank=4, lora_targets=["nothing.*"])),
    ("reduce_mobilenetv2", dict(width=0.3)),
    ("reduce_mobilenetv2", dict(width=True)),
    ("reduce_mobilenetv2", dict(expansion=-1)),
    ("reduce_mobilenetv2", dict(inference_mode=True)),
    ("reduce_mobilenetv2", dict(expansion=0, lora_rank=4, lora_targets=["nothing.*"])),
    ("reduce_mobilenetv2", dict(expansion=0, lora_rank=4, lora_targets=["blocks.*.dw"])),
]


@pytest.mark.parametrize("name, kwargs", BAD_ARGS, ids=[f"{n}-{k}" for n, k in BAD_ARGS])
def test_invalid_args_raise_one_line_config_error(name, kwargs):
    with pytest.raises(ConfigError) as e:
        models.create_model(name, **kwargs)
    msg = one_line(e)
    if kwargs.get("lora_targets") == ["blocks.*.dw"]:
        assert "dw" in msg


def test_fixed_and_empty_arguments_are_config_errors():
    with pytest.raises(ConfigError) as e:
        models.create_model("reduce20", depth=32)  # the name fixes the depth
    assert "depth" in one_line(e)
    with pytest.raises(ConfigError) as e:
        models.create_model("reduce20", expansion=0, lora_rank=2, lora_targets=[])
    assert "empty" in one_line(e)


def test_depth_must_be_6n_plus_2():
    from models.reducenet import ReduceNet

    with pytest.raises(ConfigError) as e:
        ReduceNet(21)
    one_line(e)


# ---------------------------------------------------------------------------------------------------- LambdaReLU
def test_lambda_relu_buffer_and_values():
    act = LambdaReLU()
    assert "lam" in act.state_dict() and "lam" not in dict(act.named_parameters())
    assert act.lam.item() == 1.0
    x = torch.randn(4, 5, 6, 7) * 3
    assert (x < 0).any() and (x > 0).any()
    assert torch.equal(act(x), x)
    assert torch.equal(act(x.double()), x.double())
    act.lam.fill_(0.0)
    assert torch.equal(act(x), F.relu(x))
    act.lam.fill_(0.3)
    torch.testing.assert_close(act(x), 0.7 * F.relu(x) + 0.3 * x, atol=1e-6, rtol=0)
    assert not torch.equal(act(x), x) and not torch.equal(act(x), F.relu(x))


def test_lambda_relu_in_lora_student_state_dict():
    m = models.create_model("reduce20", expansion=0, lora_rank=2)
    lam_keys = [k for k in m.state_dict() if k.endswith(".act.lam")]
    assert len(lam_keys) == len(lora_convs(m)) == 18


def test_set_lambda_sets_all_and_returns_count():
    m = models.create_model("reduce20", expansion=0, lora_rank=2)
    acts = [a for a in m.modules() if isinstance(a, LambdaReLU)]
    assert models.set_lambda(m, 0.25) == len(acts) == 18
    assert all(a.lam.item() == 0.25 for a in acts)
    assert models.set_lambda(models.create_model("reduce20", expansion=0), 0.5) == 0


def test_lambda_copied_by_deepcopy():
    m = models.create_model("reduce20", expansion=0, lora_rank=2)
    models.set_lambda(m, 0.25)
    c = copy.deepcopy(m)
    models.set_lambda(m, 0.75)  # the copy has its own buffer
    lams = [a.lam.item() for a in c.modules() if isinstance(a, LambdaReLU)]
    assert lams and all(v == 0.25 for v in lams)


def test_lambda_tracked_by_timm_ema():
    from timm.utils import ModelEmaV3

    m = models.create_model("reduce20", expansion=0, lora_rank=2)
    models.set_lambda(m, 0.2)
    ema_copy = ModelEmaV3(m, decay=0.9, exclude_buffers=True)  # params averaged, buffers copied
    ema_avg = ModelEmaV3(m, decay=0.5)  # params and float buffers averaged
    for ema in (ema_copy, ema_avg):
        lams = [a.lam.item() for a in ema.module.modules() if isinstance(a, LambdaReLU)]
        assert len(lams) == 18 and all(v == pytest.approx(0.2) for v in lams)
    models.set_lambda(m, 0.6)
    ema_copy.update(m)
    ema_avg.update(m)
    src = [a.lam for a in m.modules() if isinstance(a, LambdaReLU)]
    copied = [a.lam for a in ema_copy.module.modules() if isinstance(a, LambdaReLU)]
    averaged = [a.lam for a in ema_avg.module.modules() if isinstance(a, LambdaReLU)]
    assert all(torch.equal(c, s) for c, s in zip(copied, src))
    assert all(a.item() == pytest.approx(0.4) for a in averaged)
    # the whole EMA state follows the source's keys, lam included
    assert set(ema_copy.module.state_dict()) == set(m.state_dict())


# ---------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("name", ["reduce20", "reduce_mobilenetv2"])
def test_adding_lora_leaves_function_unchanged(name, randomize, make_images):
    plain = randomize(models.create_model(name, expansion=0)).eval()
    lora = copy.deepcopy(plain)
    names = models.add_lora(lora, 4, plain.config["lora_targets"])
    assert names and lora_convs(lora) == set(names)
    x = make_images(2)
    with torch.no_grad():
        assert torch.equal(lora(x), plain(x))
    assert models.count_params(lora) > models.count_params(plain)


@pytest.mark.parametrize("name", ["reduce20", "reduce56"])
def test_default_lora_targets_resnet(name):
    m = models.create_model(name, expansion=0, lora_rank=4)
    n = blocks_per_stage(name)
    expected = {f"layer{i}.{j}.conv{k}" for i in (1, 2, 3) for j in range(n) for k in (1, 2)}
    assert lora_convs(m) == expected
    for path in expected:
        conv = m.get_submodule(path).base_conv
        assert conv.kernel_size == (3, 3)
    assert not any("stem" in p or "shortcut" in p for p in lora_convs(m))
    assert sum(isinstance(x, LoRABranch) for x in m.modules()) == len(expected)


def test_default_lora_targets_mobilenet():
    m = models.create_model("reduce_mobilenetv2", expansion=0, lora_rank=4)
    expected = {n for n, x in m.named_modules()
                if isinstance(x, ConvBN) and n.startswith("blocks.") and n.rsplit(".", 1)[-1] in ("expand", "project")}
    # 17 inverted residuals: all have a projection, all but the first (t=1) an expansion
    assert len(expected) == 33
    assert lora_convs(m) == expected
    for path in expected:
        conv = m.get_submodule(path).base_conv
        assert conv.kernel_size == (1, 1) and conv.groups == 1


def test_custom_lora_targets_only_touch_layer1():
    m = models.create_model("reduce20", expansion=0, lora_rank=4, lora_targets=["layer1.*"])
    got = lora_convs(m)
    layer1 = {n for n, x in m.named_modules() if isinstance(x, ConvBN) and n.startswith("layer1.")}
    assert got == layer1 and len(got) == 6
    assert m.config["lora_targets"] == ["layer1.*"]


def test_lora_targets_bare_string_is_one_pattern():
    """``lora_targets="layer1.*"`` is the pattern, not its characters (``"*"`` alone would match every conv)."""
    m = models.create_model("reduce20", expansion=0, lora_rank=2, lora_targets="layer1.*")
    assert m.config["lora_targets"] == ["layer1.*"]
    assert lora_convs(m) == {n for n, x in m.named_modules() if isinstance(x, ConvBN) and n.startswith("layer1.")}


def test_lora_params_get_gradients(randomize, make_images):
    m = models.create_model("reduce20", expansion=0, lora_rank=4).train()
    branches = [b for b in m.modules() if isinstance(b, LoRABranch)]
    m(make_images(2)).square().mean().backward()
    # up starts at zero, so only up receives a nonzero gradient on the first step
    assert all(b.up.weight.grad is not None and b.up.weight.grad.abs().sum() > 0 for b in branches)
    assert all(b.down.weight.grad is not None for b in branches)
    m.zero_grad()
    randomize(m, calibrate=False)
    m(make_images(2)).square().mean().backward()
    assert all(b.down.weight.grad.abs().sum() > 0 for b in branches)
    assert all(b.up.weight.grad.abs().sum() > 0 for b in branches)


def test_a_lora_rank_no_targeted_conv_can_use_is_refused_before_any_branch_is_built(monkeypatch, capsys):
    """A LoRA branch on a kxk conv (in -> r -> out) has rank at most min(out, in*k*k): reduce20's largest is 64
    (layer3's 3x3 convs, 64 out), reduce_mobilenetv2's 320 (the last 1x1 projection, 960 -> 320). A rank above the
    largest is refused in one line naming it, before a branch is allocated (10^5 once built 629 M parameters)."""
    assert models.layers.lora_rank_limit(nn.Conv2d(32, 64, 3)) == 64
    assert models.layers.lora_rank_limit(nn.Conv2d(3, 64, 3)) == 27
    assert len(lora_convs(models.create_model("reduce20", expansion=0, lora_rank=64))) == 18  # the largest: accepted

    def allocate(*args, **kwargs):
        raise AssertionError("a LoRA branch was built before the rank was checked")

    monkeypatch.setattr(models.layers.LoRAConv2d, "__init__", allocate)
    for name, limit in (("reduce20", 64), ("reduce_mobilenetv2", 320)):
        with pytest.raises(ConfigError) as e:
            models.create_model(name, expansion=0, lora_rank=limit + 1)
        assert f"the largest useful rank is {limit}" in one_line(e)
    with pytest.raises(ConfigError) as e:  # stage2 --inherit's path; layer1 only: 16 channels
        models.student_from_teacher(models.create_model("reduce20"), lora_rank=17, lora_targets=["layer1.*"])
    assert "largest useful rank is 16" in one_line(e)

    from models.__main__ import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as e:
        main(["--lora-rank", "100000"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: lora_rank 100000 is larger than") and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------------- surgery
class _Zeroed(nn.Module):
    """Keeps a branch's shape but contributes exact zeros."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, x):
        return self.branch(x) * 0


def without_branch_b(teacher: nn.Module) -> nn.Module:
    t = copy.deepcopy(teacher)
    for m in t.modules():
        if hasattr(m, "branch_b") and not isinstance(m.branch_b, _Zeroed):
            m.branch_b = _Zeroed(m.branch_b)
    return t


@pytest.mark.parametrize("name, expansion", [("reduce20", 2), ("reduce_mobilenetv2", 1)])
def test_student_from_teacher_inherits_every_tensor(name, expansion, randomize, make_images):
    teacher = randomize(models.create_model(name, expansion=expansion))
    with torch.no_grad():
        for p in teacher.parameters():  # make every parameter distinct from a fresh init
            p.add_(torch.randn_like(p) * 0.01)
    t_state = teacher.state_dict()
    student = models.student_from_teacher(teacher)
    s_state = student.state_dict()
    assert set(s_state) < set(t_state)
    assert not any("branch_b" in k for k in s_state)
    assert all("branch_b" in k for k in set(t_state) - set(s_state))
    assert any(k.endswith("running_mean") for k in s_state) and any(k.endswith("num_batches_tracked") for k in s_state)
    for k, v in s_state.items():
        assert v.dtype == t_state[k].dtype and torch.equal(v, t_state[k]), k
    assert student.config["expansion"] == 0 and teacher.config["expansion"] == expansion
    assert {k: v for k, v in student.config.items() if k != "expansion"} == \
           {k: v for k, v in teacher.config.items() if k != "expansion"}
    assert student.training == teacher.training

    teacher.eval()
    plain = models.student_from_teacher(teacher)
    lora = models.student_from_teacher(teacher, lora_rank=4)
    assert not plain.training and not lora.training
    assert lora.config["lora_rank"] == 4 and lora_convs(lora)
    x = make_images(2)
    with torch.no_grad():
        reference = without_branch_b(teacher)(x)
        assert not torch.allclose(reference, teacher(x))  # branch (b) matters in the teacher
        assert torch.equal(plain(x), reference)
        assert torch.equal(lora(x), plain(x))


def test_student_from_teacher_custom_targets():
    teacher = models.create_model("reduce20", expansion=1)
    s = models.student_from_teacher(teacher, lora_rank=2, lora_targets=["layer3.*.conv2"])
    assert lora_convs(s) == {"layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"}
    assert s.config["lora_targets"] == ["layer3.*.conv2"] and s.config["lora_rank"] == 2


def test_student_from_teacher_keeps_float64_exactly():
    teacher = models.create_model("reduce20", expansion=1).double()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # not representable in float32
    t_state = teacher.state_dict()
    student = models.student_from_teacher(teacher)
    for k, v in student.state_dict().items():
        assert torch.equal(v, t_state[k]), k


def test_student_from_teacher_refusals():
    student = models.create_model("reduce20", expansion=0)
    with pytest.raises(ConfigError) as e:
        models.student_from_teacher(student)
    one_line(e)
    with pytest.raises(ConfigError) as e:
        models.student_from_teacher(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    one_line(e)
    with pytest.raises(ConfigError) as e:
        models.student_from_teacher(models.create_model("reduce20"), lora_rank=-1)
    one_line(e)


# ---------------------------------------------------------------------------------------------------- complexity
def _hook_macs(model: nn.Module, x: torch.Tensor) -> int:
    """MACs of convs and linears counted from their output shapes, independently of FlopCounterMode."""
    total = 0

    def hook(mod, inp, out):
        nonlocal total
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            total += out.numel() * k
        else:
            total += out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(x)
    for h in handles:
        h.remove()
    return total


@pytest.mark.parametrize("name", ["reduce20", "reduce_mobilenetv2"])
def test_complexity_counts(name):
    student = models.create_model(name, expansion=0)
    teacher = models.create_model(name, expansion=1).train()
    cs, ct = models.complexity(student), models.complexity(teacher)
    assert cs["params"] == sum(p.numel() for p in student.parameters())
    assert ct["params"] == sum(p.numel() for p in teacher.parameters())
    assert ct["macs"] > cs["macs"] > 0
    assert teacher.training  # count_macs restores the mode
    assert cs["macs"] == _hook_macs(student, torch.zeros(1, 3, 32, 32))
    if name == "reduce20":
        assert cs["macs"] == pytest.approx(40.81e6, rel=0.01)  # ResNet-20 on CIFAR: ~41M MACs


def test_zoo_cli_prints_every_model(capsys):
    from models.__main__ import main

    main([])
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    assert [r.split("|")[1].strip() for r in rows] == NAMES + models.list_models(reducible=False)
    row20 = next(r for r in rows if r.startswith("| reduce20 |"))
    assert "272,474" in row20 and "40.8M" in row20


@pytest.mark.parametrize("value", ["-1", "0"])
def test_zoo_cli_prints_nothing_but_the_error_for_a_bad_value(value, capsys):
    """--expansion 0 would print a 'teacher' that is the student: refused like a negative width."""
    from models.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--expansion", value])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.count("\n") == 1, (out, err)
    assert err.startswith(f"error: --expansion {value} is the teacher's branch (b) width factor"), err


def test_a_models_card_is_its_identity_and_every_derived_model_keeps_it():
    """One typed record (models.identity.ModelCard): built by the registry, changed by inheritance, fusion and
    flattening through replace(), seen through wrappers; config/preprocess/num_classes are its views."""
    from dataclasses import replace

    from models.identity import ModelCard, card_of, set_preprocess
    from reparam import flatten, fuse_model

    teacher = models.create_model("reduce20", num_classes=10)
    card = card_of(teacher)
    assert isinstance(card, ModelCard) and card.name == "reduce20" and teacher.config == card.config
    assert teacher.num_classes == 10 and teacher.preprocess is None
    pre = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]}
    set_preprocess(teacher, pre)
    student = models.student_from_teacher(teacher, lora_rank=2)
    s = card_of(student)
    assert (s.args["expansion"], s.args["lora_rank"], s.preprocess) == (0, 2, pre)
    assert card_of(teacher) == replace(card, preprocess=pre)  # the teacher's card is untouched
    fused = fuse_model(student.eval())
    assert card_of(fused).preprocess == pre and fused.config["lora_rank"] == 0 and fused.config["inference_mode"]
    assert card_of(flatten(fused)) == card_of(fused)
    assert card_of(torch.compile(teacher)) is card_of(teacher)  # through a wrapper
    assert card_of(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("preprocess", [{"mean": [0.5] * 3, "std": [0.0, 0.2, 0.2]},
                                        {"mean": ["a", 0, 0], "std": [1, 1, 1]}, {"mean": [0] * 3}, [1, 2]])
def test_a_checkpoint_whose_preprocess_would_make_inputs_infinite_is_refused_at_load(tmp_path, preprocess):
    import json

    from safetensors.torch import load_file, save_file

    path = models.save_checkpoint(models.create_model("reduce20", num_classes=10), tmp_path / "m.safetensors")
    record = {**models.read_record(path), "preprocess": preprocess}  # the record inside the safetensors file
    save_file(load_file(path), path, metadata={"reducenet": json.dumps(record)})
    with pytest.raises(models.CheckpointError) as e:
        models.load_checkpoint(path)
    assert "preprocess" in one_line(e)
