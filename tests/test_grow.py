"""Growing any classifier into a ReduceNet teacher (models/grow.py, train.stage1 --grow) and shrinking it back."""
from __future__ import annotations

import contextlib
import io
import re

import pytest
import timm
import torch
import torch.nn as nn
import torchvision

import models
from _shared import CIFAR10, one_line, randomize_model, training_stopped_at
from models.errors import ConfigError, ReparamError
from models.grow import GrownConv2d, add_lora_to_convs, eligible, grow, ungrow
from reparam import fuse_model

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name, build", [
    ("torchvision:resnet18", lambda: torchvision.models.resnet18(num_classes=10)),
    ("timm:resnet10t", lambda: timm.create_model("resnet10t", num_classes=10)),
])
def test_a_grown_classifier_shrinks_back_into_exactly_the_original_architecture(name, build, tmp_path,
                                                                                single_thread):
    """Grow, save, reload (no pickle), ungrow: the state_dict loads strictly into a freshly built torchvision/timm
    model and gives the same logits; the teacher computes the original plus its branches before each BN."""
    torch.manual_seed(0)
    original = randomize_model(models.create_model(name, num_classes=10)).eval()
    teacher = grow(randomize_model(models.create_model(name, num_classes=10)), 2).eval()
    paths = teacher.config["grow"]["modules"]
    assert teacher.config["grow"]["expansion"] == 2 and paths == eligible(original)
    assert all(isinstance(teacher.get_submodule(p), GrownConv2d) for p in paths)
    reloaded = models.load_checkpoint(models.save_checkpoint(teacher, tmp_path / "t")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(X), teacher(X))
    student = ungrow(reloaded)
    plain = build().eval()
    plain.load_state_dict(student.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(X), student(X))
        for p in paths:  # zero the branches' last BN scale: the teacher is the original network
            reloaded.get_submodule(p).branch_b[4].weight.zero_()
            reloaded.get_submodule(p).branch_b[4].bias.zero_()
        assert torch.allclose(reloaded(X), student(X), atol=1e-5)
    assert "grow" not in student.config
    fused = fuse_model(student)  # the shrunk model fuses as any classifier
    with torch.no_grad():
        assert (fused(X) - student(X)).abs().max().item() < 1e-4
    with pytest.raises(ReparamError) as e:
        fuse_model(teacher)
    assert "branch (b)" in one_line(e)


def test_growing_a_zoo_student_gives_the_zoo_teacher(single_thread):
    """One mechanism: grow(reduce20 student, E) is the zoo's reduce20 with expansion=E, tensor for tensor."""
    for expansion in (1, 2):
        zoo = randomize_model(models.create_model("reduce20", expansion=expansion)).eval()
        grown = grow(models.create_model("reduce20", expansion=0), expansion).eval()
        assert sum(p.numel() for p in grown.parameters()) == sum(p.numel() for p in zoo.parameters())

        def zoo_key(key: str) -> str:  # where the zoo keeps the same tensor
            m = re.match(r"(layer\d\.\d+)\.conv1\.conv\.(conv|branch_b)\.(.*)", key)
            if m is None:
                return key
            block, part, rest = m.groups()
            if part == "conv":
                return f"{block}.conv1.conv.{rest}"
            index, _, leaf = rest.partition(".")
            return f"{block}.branch_b." + {"0": "conv1.conv", "1": "conv1.bn", "3": "conv2.conv",
                                           "4": "conv2.bn"}[index] + f".{leaf}"

        zoo_state = zoo.state_dict()
        grown.load_state_dict({k: zoo_state[zoo_key(k)] for k in grown.state_dict()}, strict=True)
        with torch.no_grad():
            assert torch.allclose(grown(X), zoo(X), atol=1e-5)
        assert ungrow(grown).config == models.student_from_teacher(zoo).config
        with pytest.raises(ReparamError) as e:  # as the zoo teacher: its student fuses, it does not
            fuse_model(grown)
        assert "cannot fuse layer1.0.conv1: it is a grown teacher's non-linear branch (b)" in one_line(e)


@pytest.mark.parametrize("build, kwargs, words", [
    (lambda: nn.Sequential(nn.Flatten(), nn.Linear(3072, 10)), {"expansion": 1}, "no conv to grow"),
    (lambda: models.create_model("torchvision:mobilenet_v2", num_classes=10), {"expansion": 0}, "[1, 64]"),
    (lambda: models.create_model("torchvision:resnet18", num_classes=10), {"expansion": 1, "targets": ["nope*"]},
     "matches no conv"),
    (lambda: models.create_model("reduce_mobilenetv2", expansion=0), {"expansion": 1}, "--expansion E"),
    (lambda: grow(models.create_model("reduce20", expansion=0), 1), {"expansion": 1}, "grown already"),
])
def test_refusals_are_one_line(build, kwargs, words):
    with pytest.raises(ConfigError) as e:
        grow(build(), **kwargs)
    assert words in one_line(e)


def test_depthwise_convs_grow_only_when_named():
    """A MobileNet's 1x1 and depthwise convs are not grown by default; --grow-targets names the ones to grow."""
    mobile = models.create_model("torchvision:mobilenet_v2", num_classes=10)
    assert all(mobile.get_submodule(p).groups == 1 and mobile.get_submodule(p).kernel_size != (1, 1)
               for p in eligible(mobile))
    depthwise = [p for p, m in mobile.named_modules() if isinstance(m, nn.Conv2d) and m.groups > 1][:2]
    everything = grow(models.create_model("torchvision:mobilenet_v2", num_classes=10), 1, targets=["*"])
    assert not set(depthwise) & set(everything.config["grow"]["modules"])  # a glob picks dense convs only
    grown = grow(mobile, 1, targets=depthwise)
    assert grown.config["grow"]["modules"] == depthwise
    with torch.no_grad():
        assert grown.eval()(X).shape == (2, 10)
    with pytest.raises(ConfigError) as e:  # a typo beside a target that matches is not passed over
        grow(models.create_model("torchvision:resnet18", num_classes=10), 1, targets=["layer1.0.conv1", "layr2*"])
    assert "--grow-targets layr2* matches no conv" in one_line(e)


@pytest.mark.e2e
@pytest.mark.skipif(not (CIFAR10 / "cifar-10-batches-py").is_dir(), reason=f"{CIFAR10} is absent")
def test_stage1_grows_resumes_and_stage2_gives_back_the_original_network(tmp_path):
    from train import stage1, stage2

    args = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu"]
    grow_args = ["-m", "torchvision:resnet18", "--grow", "1", "--grow-targets", "layer*.conv1", "--epochs", "2",
                 *args, "--out", str(tmp_path / "teacher")]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), training_stopped_at(2), pytest.raises(SystemExit):
        stage1.main(grow_args)
    with contextlib.redirect_stdout(out):
        teacher = stage1.main([*grow_args, "--resume"])  # a grown run resumes
        student = stage2.main(["--inherit", str(tmp_path / "teacher"), "--epochs", "1", *args,
                               "--out", str(tmp_path / "student")])
    assert teacher["last_epoch"] == 2 and teacher["model"]["grow"]["modules"] == [
        f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)]
    plain = torchvision.models.resnet18(num_classes=10)
    trained = models.load_checkpoint(tmp_path / "student")
    plain.load_state_dict(trained.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain.eval()(X), trained.eval()(X))
    assert student["fused_check"]["max_abs_diff"] < 1e-3 and (tmp_path / "student" / "deploy" / "model.onnx").is_file()
    with contextlib.redirect_stdout(out):  # with LoRA branches annealed to linear: they fuse away
        lora = stage2.main(["--inherit", str(tmp_path / "teacher"), "--epochs", "1", "--lora-rank", "2",
                            "--lambda-epochs", "1", *args, "--out", str(tmp_path / "lora")])
    assert lora["model"]["lora"]["rank"] == 2 and lora["fused_check"]["max_abs_diff"] < 1e-3
    deploy = models.load_checkpoint(tmp_path / "lora" / "deploy" / "model.safetensors")
    assert "lora" not in deploy.config and deploy.config["structure"]


def test_a_trimmed_network_grows_and_shrinks_back_into_its_trimmed_self(tmp_path, single_thread):
    from models.trim import trim
    from train.pipeline import is_checkpoint_path

    trimmed = trim(randomize_model(models.create_model("reduce20", expansion=0)).eval(), 2.0).model
    size = models.count_params(trimmed)
    path = models.save_checkpoint(grow(trimmed, 1), tmp_path / "grown")  # the structure patch, then the branches
    reloaded = models.load_checkpoint(path)
    assert reloaded.config["structure"] and reloaded.config["grow"]["expansion"] == 1
    back = ungrow(reloaded)
    assert back.config == {k: v for k, v in reloaded.config.items() if k != "grow"}
    assert models.count_params(back) == size
    assert is_checkpoint_path(str(path)) and is_checkpoint_path(str(tmp_path / "grown.json"))
    assert not is_checkpoint_path("reduce20") and not is_checkpoint_path(str(tmp_path))  # a name, a plain folder


def test_a_shrunk_torchvision_student_takes_lora_saves_and_fuses(tmp_path, single_thread):
    """Stage 2's LoRA with LambdaReLU on a shrunk torchvision student: the branches start at zero (the student is
    the original network), save and reload without pickle, and fuse into plain convs with the same function."""
    teacher = grow(randomize_model(models.create_model("torchvision:resnet18", num_classes=10)), 1).eval()
    student = models.student_from_teacher(teacher, lora_rank=2).eval()
    assert student.config["lora"]["rank"] == 2 and "grow" not in student.config
    with torch.no_grad():
        assert torch.equal(student(X), ungrow(teacher)(X))  # zero-initialised branches
        for m in student.modules():
            if hasattr(m, "up"):
                m.up.weight.normal_(0, 0.01)  # as after training
    models.set_lambda(student, 0.5)
    with pytest.raises(ReparamError):  # a LambdaReLU that is not linear yet does not fuse
        fuse_model(student)
    models.set_lambda(student, 1.0)
    reloaded = models.load_checkpoint(models.save_checkpoint(student, tmp_path / "s")).eval()
    fused = fuse_model(reloaded)
    with torch.no_grad():
        assert torch.equal(reloaded(X), student(X))
        assert (fused(X) - student(X)).abs().max().item() < 1e-4
    assert "lora" not in fused.config and not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())


def test_one_string_of_targets_is_one_glob(single_thread):
    """grow(..., targets="layer1.*") and LoRA's lora_targets="layer1.*" take the string as one glob: iterated letter
    by letter, its "*" matched every conv."""
    as_list = grow(models.create_model("torchvision:resnet18", num_classes=10), 1, targets=["layer1.*"])
    as_str = grow(models.create_model("torchvision:resnet18", num_classes=10), 1, targets="layer1.*")
    assert as_str.config["grow"]["modules"] == as_list.config["grow"]["modules"] == [
        "layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2"]
    student = models.student_from_teacher(as_str, lora_rank=2, lora_targets="layer1.0.*")
    assert student.config["lora"]["modules"] == ["layer1.0.conv1", "layer1.0.conv2"]


def test_a_depthwise_conv_named_for_lora_is_refused_by_name_and_nothing_changes(single_thread):
    """LoRA on a named depthwise conv: the refusal did not say which conv, and the convs before it had their branch."""
    model = models.create_model("torchvision:mobilenet_v2", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError) as e:
        add_lora_to_convs(model, 2, ["features.0.0", "features.2.conv.1.0"])
    assert one_line(e).startswith("LoRA on features.2.conv.1.0: LoRA needs a dense conv, got groups=96")
    assert model.state_dict().keys() == before.keys() and "lora" not in (model.config or {})
