"""LoRA branches on any conv, fused exactly: inside timm blocks with their own reparameterize() (RepVGG, MobileOne,
FastViT), beside non-square, unpadded or strided convs (inception_v3), and third-party reparameterize() failures as
one line (reparam/fusion.py, models/layers.py, models/fusion_math.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from _shared import one_line, randomize_model
from models import fusion_math as T
from models.errors import ConfigError, ReparamError
from models.graph import conv_bn_pairs
from models.grow import add_lora_to_convs
from models.layers import LoRAConv2d
from reparam import fuse_model

pytestmark = pytest.mark.usefixtures("single_thread")


def rn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assert_fuses_exactly(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """``fuse_model(model)`` computes ``model`` (float64, eval mode) and keeps no LoRA branch; returns it."""
    fused = fuse_model(model)
    assert not any(isinstance(m, (LoRAConv2d, nn.BatchNorm2d)) for m in fused.modules())
    with torch.no_grad():
        want, got = model.eval()(x), fused(x)
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() < 1e-12
    return fused


@pytest.mark.parametrize("name", ["timm:repvgg_a0", "timm:mobileone_s0", "timm:fastvit_t8"])
def test_lora_inside_a_timm_block_with_its_own_reparameterize_fuses_exactly(name):
    """The block's reparameterize() reads its convs' kernel_size and weight: it crashed on a LoRAConv2d
    (AttributeError). Every dense conv before a BatchNorm gets a branch, the 1x1 ones inside the blocks too."""
    model = models.create_model(name, num_classes=10).double()
    modules = dict(model.named_modules())
    dense = [c for c, _ in conv_bn_pairs(model) if modules[c].groups == 1]
    add_lora_to_convs(model, 2, modules=dense)
    inside = [p for p in dense if any(hasattr(modules[p.rsplit(".", i)[0]], "reparameterize")
                                      for i in range(1, p.count(".") + 1))]
    assert len(inside) >= 2  # the test is about branches that a third-party block's reparameterize() sees
    randomize_model(model).eval()
    assert_fuses_exactly(model, rn(2, 3, 32, 32, seed=1))


class _ThirdPartyBlock(nn.Module):
    """A block from outside the project whose reparameterize() fails with a plain Python error."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def reparameterize(self) -> None:
        _ = self.conv.in_channels // 0


def test_a_third_party_reparameterize_failure_is_one_line_naming_the_block():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(_ThirdPartyBlock()))
    with pytest.raises(ReparamError) as e:
        fuse_model(model)
    msg = one_line(e)
    assert msg.startswith("cannot fuse 1.0 (_ThirdPartyBlock): its own reparameterize() failed (ZeroDivisionError: ")
    assert "untrimmed" in msg and "unfused" in msg


def test_a_trimmed_timm_mobileone_is_refused_in_one_line():
    """Torch-Pruning leaves MobileOneBlock's in_chs and groups stale: its reparameterize() divided by zero."""
    from models.trim import trim_at

    with pytest.raises(ReparamError) as e:
        fuse_model(trim_at(models.create_model("timm:mobileone_s0", num_classes=10), 0.309))
    assert "(MobileOneBlock): its own reparameterize() failed (ZeroDivisionError" in one_line(e)


@pytest.mark.parametrize("conv", [
    nn.Conv2d(4, 6, 3, stride=2, padding=0),              # inception_v3's Conv2d_1a_3x3: the branch padded by 1
    nn.Conv2d(4, 6, (1, 7), padding=(0, 3)),              # its 1x7: the branch was 1x1, sum_kernels square only
    nn.Conv2d(4, 6, (7, 1), stride=(2, 1), padding=(3, 0)),
    nn.Conv2d(4, 6, 2, stride=2),                         # a patch stem: even kernel, no padding
    nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(4, 6, 3, padding=1, bias=False),            # the square k // 2 case of before
], ids=["3x3-s2-p0", "1x7-p03", "7x1-s21-p30", "2x2-s2", "3x3-reflect", "3x3-p1"])
def test_lora_beside_any_dense_conv_aligns_and_fuses_exactly(conv):
    model = nn.Sequential(conv, nn.BatchNorm2d(6), nn.ReLU()).double()
    add_lora_to_convs(model, 2, modules=["0"])
    branch = model[0].lora.down
    assert branch.weight.shape[-2:] == conv.weight.shape[-2:]
    assert (branch.stride, branch.padding, branch.padding_mode) == (conv.stride, conv.padding, conv.padding_mode)
    randomize_model(model, calibrate=False).eval()
    fused = assert_fuses_exactly(model, rn(2, 4, 15, 14, seed=2))
    assert fused[0].weight.shape == conv.weight.shape and fused[0].padding_mode == conv.padding_mode


def test_the_square_case_keeps_the_parameter_names_and_shapes_of_saved_checkpoints():
    """A 3x3 conv with padding 1 and a 1x1 one: the branch has the names, shapes and geometry it always had."""
    for k in (3, 1):
        lora = LoRAConv2d(nn.Conv2d(8, 16, k, 2, k // 2, bias=False), 4)
        assert {n: tuple(p.shape) for n, p in lora.state_dict().items()} == {
            "conv.weight": (16, 8, k, k), "lora.down.weight": (4, 8, k, k), "lora.act.lam": (),
            "lora.up.weight": (16, 4, 1, 1)}
        assert (lora.lora.down.stride, lora.lora.down.padding) == ((2, 2), (k // 2, k // 2))
    student = models.create_model("reduce20", expansion=0, lora_rank=2)
    assert student.layer1[0].conv1.conv.lora.down.weight.shape == (2, 16, 3, 3)


def test_inception_v3_convs_take_lora_and_fuse_exactly():
    """Conv2d_1a_3x3 (3x3, stride 2, padding 0): the branch's output was one pixel larger; Mixed_6b's 1x7
    (padding (0, 3)): its 1x1 branch fused into a 7x7 shape (sum_kernels)."""
    model = models.create_model("torchvision:inception_v3", num_classes=10, aux_logits=False, init_weights=False)
    targets = ["Conv2d_1a_3x3.conv", "Mixed_6b.branch7x7_2.conv"]
    add_lora_to_convs(model.double(), 2, targets=targets)
    randomize_model(model, calibrate=False).eval()
    fused = assert_fuses_exactly(model, rn(1, 3, 75, 75, seed=3))
    assert [tuple(fused.get_submodule(t).weight.shape[-2:]) for t in targets] == [(3, 3), (1, 7)]


def test_dilated_convs_take_lora_and_fuse_exactly():
    """torchvision's ResNet-50 with dilation instead of stride in its last stages (replace_stride_with_dilation):
    the default targets include the dilated 3x3s, whose branches dilate as they do."""
    model = models.create_model("torchvision:resnet50", num_classes=10, replace_stride_with_dilation=[False, True, True])
    add_lora_to_convs(model.double(), 2)
    assert model.layer4[1].conv2.lora.down.dilation == (4, 4)
    randomize_model(model, calibrate=False).eval()
    fused = assert_fuses_exactly(model, rn(1, 3, 48, 48, seed=4))
    assert fused.layer4[1].conv2.dilation == (4, 4)


def test_a_grouped_conv_is_refused_by_name():
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=4), nn.BatchNorm2d(8))
    with pytest.raises(ConfigError) as e:
        add_lora_to_convs(model, 2, modules=["0"])
    assert one_line(e).startswith("LoRA on 0: LoRA needs a dense conv, got groups=4")
    assert isinstance(model[0], nn.Conv2d)


def test_a_conv2d_subclass_is_refused_by_name():
    """timm's Conv2dSame pads by the input's size in its forward: no fixed branch aligns with it, no fused
    nn.Conv2d computes it."""
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(4, 6, 3, stride=2), nn.BatchNorm2d(6))
    with pytest.raises(ConfigError) as e:
        add_lora_to_convs(model, 2, modules=["0"])
    assert one_line(e).startswith("LoRA on 0: LoRA needs a plain torch.nn.Conv2d, got Conv2dSame")


def test_fusion_maths_sum_non_square_kernels():
    x = rn(2, 4, 9, 11, seed=4)
    w17, w71, w1 = rn(5, 4, 1, 7, seed=5), rn(5, 4, 7, 1, seed=6), rn(5, 4, 1, 1, seed=7)
    kernel, bias = T.sum_kernels((w17, None), (w71, rn(5, seed=8)), (w1, None))
    assert kernel.shape == (5, 4, 7, 7)
    want = F.conv2d(x, w17, padding=(0, 3)) + F.conv2d(x, w71, rn(5, seed=8), padding=(3, 0)) + F.conv2d(x, w1)
    torch.testing.assert_close(F.conv2d(x, kernel, bias, padding=3), want, atol=1e-12, rtol=0)
    assert T.pad_kernel(w17, (3, 7)).shape == (5, 4, 3, 7)
    with pytest.raises(ValueError):
        T.pad_kernel(w17, (2, 7))


def test_a_grown_timm_repvgg_is_refused_by_its_branch_not_by_the_block():
    """RepVggBlock.reparameterize() read the GrownConv2d's kernel_size (AttributeError); the grown conv says why."""
    from models.grow import grow

    with pytest.raises(ReparamError) as e:
        fuse_model(grow(models.create_model("timm:repvgg_a0", num_classes=10), 1))
    assert one_line(e).startswith("cannot fuse stem.conv_kxk.conv: it is a grown teacher's non-linear branch (b)")
