"""Feature distillation's layers: channels-last stage outputs, outputs that are not one feature map, modules called
twice or changed in place after they return, the messages of ``feature_loss``, and float32 losses under bf16
autocast (train/tasks.py, train/distill.py, train/assemble.py::feature_loss)."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
from torch import Tensor

import models
from _shared import one_line
from models.errors import ConfigError
from train.assemble import feature_loss
from train.distill import DistillLoss, FeatureDistill, SemCKD
from train.spec import LossSpec
from train.tasks import Distill, FeatureHooks, layer_channels, stage_outputs

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")


class _Stage(nn.Module):
    """Halves a channels-last map (N, H, W, C) with a strided conv, then a channel MLP, as Swin/MambaOut stages."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.down = nn.Conv2d(c_in, c_out, 2, stride=2)
        self.mlp = nn.Linear(c_out, c_out)

    def forward(self, x: Tensor) -> Tensor:
        x = self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.mlp(x)


class _ChannelsLast(nn.Module):
    """A conv stem (N, C, H, W), then channels-last stages (N, H, W, C); ``fixed``: the one input size it takes."""

    def __init__(self, widths: tuple[int, int, int] = (5, 6, 7), fixed: int | None = None) -> None:
        super().__init__()
        self.fixed = fixed
        self.stem = nn.Conv2d(3, widths[0], 3, stride=2, padding=1)
        self.stages = nn.Sequential(_Stage(widths[0], widths[1]), _Stage(widths[1], widths[2]))
        self.head = nn.Linear(widths[2], 10)

    def forward(self, x: Tensor) -> Tensor:
        if self.fixed is not None and tuple(x.shape[-2:]) != (self.fixed, self.fixed):
            raise ValueError(f"built for {self.fixed} px")
        x = self.stages(self.stem(x).permute(0, 2, 3, 1))
        return self.head(x.mean((1, 2)))


class _Record(nn.Module):
    """A feature loss that keeps the maps it is given and returns 0."""

    def forward(self, student_feats: list[Tensor], teacher_feats: list[Tensor]) -> Tensor:
        self.seen = (student_feats, teacher_feats)
        return student_feats[0].new_zeros(())


def _tokens() -> nn.Module:
    """A model with no feature map at its top level (a ViT's tokens, here a flattened image)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 10))


# ----------------------------------------------------------------------------------------------- 1. channels-last
def test_channels_last_stage_outputs_have_their_channels():
    model = _ChannelsLast()
    layers = stage_outputs(model, [3, 16, 16])
    assert layers == ["stem", "stages.0", "stages"]
    assert layer_channels(model, layers, [3, 16, 16]) == [5, 6, 7]  # not the height and width: [5, 4, 2]


def test_a_fixed_size_model_falls_back_to_the_square_pattern_and_refuses_what_it_cannot_tell():
    assert layer_channels(_ChannelsLast(fixed=16), ["stages.0", "stages"], [3, 16, 16]) == [6, 7]
    # (1, 4, 4, 4): height, width and channels alike; a model that takes a wider input tells them apart
    assert layer_channels(_ChannelsLast((5, 4, 7)), ["stages.0"], [3, 16, 16]) == [4]
    with pytest.raises(ConfigError) as e:
        layer_channels(_ChannelsLast((5, 4, 7), fixed=16), ["stages.0"], [3, 16, 16])
    assert "'stages.0'" in one_line(e) and "(1, 4, 4, 4)" in one_line(e)


def test_torchvision_swin_default_layers_and_channels():
    model = models.create_model("torchvision:swin_t", num_classes=10)
    layers = stage_outputs(model, [3, 64, 64])
    assert layers == ["features.3", "features.5", "permute"]
    assert layer_channels(model, layers, [3, 64, 64]) == [192, 384, 768]


@pytest.mark.parametrize("name, layers, channels", [
    ("torchvision:mobilenet_v3_small", ["features.3", "features.8", "features"], [24, 48, 576]),
    ("timm:convnext_atto", ["stages.1", "stages.2", "norm_pre"], [80, 160, 320]),
    ("torchvision:efficientnet_b0", ["features.3", "features.5", "features"], [40, 112, 1280]),
    ("torchvision:regnet_x_400mf", ["trunk_output.block2", "trunk_output.block3", "trunk_output"], [64, 160, 400]),
])
def test_cnn_default_layers_and_channels_are_unchanged(name, layers, channels):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = models.create_model(name, num_classes=10)
    assert stage_outputs(model, [3, 64, 64]) == layers
    assert layer_channels(model, layers, [3, 64, 64]) == channels


def test_distill_gives_the_losses_channels_last_maps_as_nchw():
    student, teacher = _ChannelsLast(), _ChannelsLast((6, 8, 10))
    task = Distill(student, teacher, DistillLoss("kd"), _Record(), ["stem", "stages.0"], ["stages.0", "stages"])
    maps: dict[str, Tensor] = {}
    student.stages[0].register_forward_hook(lambda m, i, o: maps.setdefault("s", o))
    teacher.stages.register_forward_hook(lambda m, i, o: maps.setdefault("t", o))
    task(torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    (s_stem, s0), (t0, t1) = task.feature_loss.seen
    assert s_stem.shape == (2, 5, 8, 8) and s0.shape == (2, 6, 4, 4) and t0.shape == (2, 8, 4, 4)
    assert t1.shape == (2, 10, 2, 2)
    assert torch.equal(s0, maps["s"].permute(0, 3, 1, 2)) and torch.equal(t1, maps["t"].permute(0, 3, 1, 2))
    # a resumed run builds its task from the models again: the same layouts, from nothing saved
    again = Distill(student, teacher, DistillLoss("kd"), _Record(), ["stem", "stages.0"], ["stages.0", "stages"],
                    input_size=[3, 16, 16])
    assert again._hooks[0].channels_last == task._hooks[0].channels_last == [False, True]


# ----------------------------------------------------------------------------------------------- 2. tuple outputs
def test_a_layer_that_outputs_a_tuple_is_refused_in_one_line():
    from torchvision.models import VisionTransformer

    vit = VisionTransformer(image_size=32, patch_size=16, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                            num_classes=10)
    layer = "encoder.layers.encoder_layer_0.self_attention"  # nn.MultiheadAttention: (output, weights)
    with pytest.raises(ConfigError) as e:
        layer_channels(vit, [layer], [3, 32, 32])
    assert f"{layer!r} of VisionTransformer outputs a tuple" in one_line(e) and "pick another layer" in one_line(e)
    assert stage_outputs(vit, [3, 32, 32]) == ["conv_proj"]  # a fixed-size model: its conv map is still found


# ----------------------------------------------------------------------------------------------- 3. messages
def test_a_teacher_without_feature_maps_is_named_with_its_option():
    loss = LossSpec(feature_kd="at")
    with pytest.raises(ConfigError) as e:
        feature_loss(loss, 8, _ChannelsLast(), _tokens(), [3, 16, 16])
    assert "teacher" in one_line(e) and "--teacher-layers" in one_line(e) and "--feature-layers" not in one_line(e)
    with pytest.raises(ConfigError) as e:
        feature_loss(loss, 8, _tokens(), _ChannelsLast(), [3, 16, 16])
    assert "student" in one_line(e) and "--feature-layers" in one_line(e) and "--teacher-layers" not in one_line(e)


def test_a_layer_count_mismatch_names_what_was_given():
    student, teacher = (models.create_model("reduce20", expansion=0) for _ in range(2))
    with pytest.raises(ConfigError) as e:
        feature_loss(LossSpec(feature_kd="at", teacher_layers=("layer2", "layer3")), 8, student, teacher, [3, 32, 32])
    msg = one_line(e)
    assert "the student has 3 default layers (layer1, layer2, layer3)" in msg and "--teacher-layers names 2" in msg
    assert "--feature-layers names" not in msg and "--feature-layers with as many" in msg
    with pytest.raises(ConfigError) as e:
        feature_loss(LossSpec(feature_kd="fitnet", feature_layers=("layer1", "layer2", "layer3"),
                              teacher_layers=("layer3",)), 8, student, teacher, [3, 32, 32])
    assert "--feature-layers names 3 student layers but --teacher-layers names 1" in one_line(e)


# ----------------------------------------------------------------------------------------------- 4. what hooks keep
def test_a_module_called_twice_is_refused_when_probed():
    model = models.create_model("torchvision:resnet18", num_classes=10)
    with pytest.raises(ConfigError) as e:
        layer_channels(model, ["layer1.0.relu"], [3, 32, 32])  # BasicBlock calls its ReLU twice
    assert "'layer1.0.relu' of ResNet is called 2 times" in one_line(e) and "pick another layer" in one_line(e)


def test_distill_keeps_what_a_module_returned_before_an_inplace_op():
    student = models.create_model("torchvision:resnet18", num_classes=10).eval()
    teacher = models.create_model("torchvision:resnet18", num_classes=10)
    task = Distill(student, teacher, DistillLoss("kd"), _Record(), ["layer1.0.bn1", "layer1.0"],
                   ["layer1.0.bn1", "layer1.0"])
    x = torch.randn(2, 3, 32, 32)
    task(x, torch.tensor([0, 1]))
    kept = task.feature_loss.seen[0][0]
    with torch.no_grad():
        block = student.layer1[0]
        want = block.bn1(block.conv1(student.maxpool(student.relu(student.bn1(student.conv1(x))))))
    assert (want < 0).any() and torch.equal(kept, want)  # not the in-place ReLU's output
    assert task._hooks[0].clone == [True, False]  # only the layer an in-place op changes is copied
    hooks = FeatureHooks.probed(student, stage_outputs(student, [3, 32, 32]), [3, 32, 32])
    assert hooks.clone == [False, False, False]  # the default stage outputs cost no copy
    hooks.remove()


def test_plain_hooks_refuse_an_output_changed_in_place():
    model = models.create_model("torchvision:resnet18", num_classes=10)
    hooks = FeatureHooks(model, ["layer1.0.bn1"])
    model(torch.randn(2, 3, 32, 32))
    with pytest.raises(ConfigError) as e:
        hooks.take()
    assert "'layer1.0.bn1' of ResNet is changed in place" in one_line(e)
    hooks.remove()


# ----------------------------------------------------------------------------------------------- 5. float32 losses
def test_feature_losses_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    fs, ft = torch.randn(4, 3, 8, 8, generator=g).bfloat16(), torch.randn(4, 5, 8, 8, generator=g).bfloat16()
    at = FeatureDistill([3], [5], "at", weight=1.0)
    want = at([fs.double()], [ft.double()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = at([fs], [ft])
        others = [FeatureDistill([3], [5], "fitnet", weight=1.0)([fs], [ft]),
                  SemCKD([3], [5], 4, weight=1.0)([fs], [ft])]
    assert got.dtype == torch.float32 and abs(got.item() - want.item()) < 1e-6 * want.item()  # bf16: 0.7% off
    assert [t.dtype for t in others] == [torch.float32, torch.float32]


def test_hooks_on_a_model_run_under_inference_mode_keep_its_outputs():
    """A trim times its student under torch.inference_mode with the feature hooks on: its tensors have no version
    counter, and reading it raised."""
    model = models.create_model("reduce20", expansion=0).eval()
    hooks = FeatureHooks.probed(model, ["layer1", "layer2"], [3, 32, 32])
    with torch.inference_mode():
        model(torch.randn(2, 3, 32, 32))
    assert [tuple(t.shape) for t in hooks.take()] == [(2, 16, 32, 32), (2, 32, 16, 16)]
