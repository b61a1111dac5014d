"""Trimming torchvision/timm families beyond plain convs and linears (models/trim.py, models/structure.py): a
ConvNeXt's pruned layer scale is recorded, a 1x1-conv classifier is kept whole, and what Torch-Pruning cannot prune
is named. Random weights, 32 px inputs (64 for the ViT): all of them take about 3 s on 2 CPU cores."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import models
import models.structure
from _shared import one_line
from models.errors import CheckpointError
from models.structure import apply_structure
from models.trim import TrimError, trim_at

pytestmark = pytest.mark.usefixtures("single_thread")  # small models: a second thread only waits on a shared machine


def _trimmed(name: str, ratio: float = 0.5, side: int = 32, **kwargs) -> tuple[nn.Module, nn.Module]:
    """``name`` (its own random initialisation, layer scales drawn at random too) and its copy trimmed at channel
    ``ratio`` (Torch-Pruning's warnings silenced)."""
    model = models.create_model(name, num_classes=10, **kwargs).eval()
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(".gamma"):  # 1e-6 everywhere as built: which channels survive would not show
                param.normal_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Unwrapped parameters detected": the layer scales, pruned as they must be
        return model, trim_at(model, ratio, (1, 3, side, side))


def _same_after_reload(trimmed: nn.Module, folder) -> None:
    """``trimmed`` saves, reloads from its structure patch alone and computes the same function."""
    loaded = models.load_checkpoint(models.save_checkpoint(trimmed, folder / "trimmed")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), trimmed(x))


def test_a_convnext_whose_layer_scales_were_pruned_saves_reloads_and_fuses(tmp_path):
    """timm's ConvNeXt block holds its layer scale ``gamma`` itself: pruning cuts it with the channels, and the
    structure patch records its new shape, so the trimmed model saves, reloads and fuses to the same function."""
    from reparam import fuse_model

    model, trimmed = _trimmed("timm:convnext_atto")
    gamma = trimmed.stages[0].blocks[0].gamma
    assert gamma.shape[0] < model.stages[0].blocks[0].gamma.shape[0]
    assert trimmed.config["structure"]["stages.0.blocks.0"] == {"type": "Resized", "gamma": list(gamma.shape)}
    _same_after_reload(trimmed, tmp_path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (fuse_model(trimmed)(x) - trimmed(x)).abs().max().item() < 1e-4


def test_a_resized_parameter_the_patch_cannot_record_is_refused_when_trimming(monkeypatch):
    """Were a pruned tensor beyond what a structure patch records, the trim itself says so, naming the tensor
    (before any fine-tuning), instead of the first save after an epoch of training."""
    monkeypatch.setattr(models.structure, "resized_spec", lambda path, module, base: None)
    with pytest.raises(TrimError) as e:
        _trimmed("timm:convnext_atto", depths=(1, 1, 1, 1))
    assert "pruning resized stages.0.blocks.0.gamma of timm:convnext_atto" in one_line(e)


def test_a_resized_patch_that_does_not_fit_is_one_line():
    model = models.create_model("timm:convnext_atto", num_classes=10)
    for spec, words in (({"type": "Resized", "beta": [4]}, "resizes stages.0.blocks.0.beta, which this model"),
                        ({"type": "Resized", "gamma": ["4"]}, "gives stages.0.blocks.0.gamma the shape ['4']")):
        with pytest.raises(CheckpointError) as e:
            apply_structure(model, {"stages.0.blocks.0": spec})
        assert words in one_line(e)


@pytest.mark.parametrize("name, head", [("torchvision:squeezenet1_0", "classifier.1"), ("timm:dla46_c", "fc")])
def test_a_1x1_conv_classifier_is_kept_whole(name, head, tmp_path):
    """SqueezeNet's and DLA's classifier is a 1x1 conv: its 10 outputs stay, its inputs are trimmed."""
    model, trimmed = _trimmed(name)
    before, after = model.get_submodule(head), trimmed.get_submodule(head)
    assert isinstance(after, nn.Conv2d) and after.out_channels == 10 and torch.equal(after.bias, before.bias)
    assert after.in_channels < before.in_channels
    _same_after_reload(trimmed, tmp_path)


@pytest.mark.parametrize("name, kwargs, side, words", [
    ("timm:vit_tiny_patch16_224", {"img_size": 64, "depth": 1}, 64,
     ["blocks.0.attn (Attention: it reshapes its channels into groups",
      "or the model itself (VisionTransformer: its own parameters cls_token, pos_embed)"]),
    ("torchvision:shufflenet_v2_x0_5", {}, 32,
     ["ZeroDivisionError", "probably stage2.0 (InvertedResidual: it reshapes its channels into groups"]),
    ("timm:dpn68", {"k_sec": (1, 1, 1, 1)}, 32, ["probably features.conv2_1 (DualPathBlock: it slices its channels"]),
])
def test_what_torch_pruning_cannot_prune_is_named(name, kwargs, side, words):
    """A channel shuffle, attention heads and DPN's fixed slices split the channels by sizes Torch-Pruning keeps:
    the module doing it is named (and a model's own parameters as "the model itself"), and what to do instead."""
    with pytest.raises(TrimError) as e:
        _trimmed(name, side=side, **kwargs)
    msg = one_line(e)
    assert all(w in msg for w in words) and "probably  (" not in msg, msg
    assert msg.endswith("trim another model, or distil this one into a smaller one (train.stage2 --teacher RUN -m "
                        "MODEL)"), msg
