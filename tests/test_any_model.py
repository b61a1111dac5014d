"""Any classifier in, any classifier out: torchvision/timm models through stage 1, stage 2, checkpoints and fusion;
feature-distillation adapters trained, saved and resumed exactly."""
from __future__ import annotations

import contextlib
import io
import json
import warnings

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import models
from _shared import CIFAR10, needs_data, one_line, randomize_model, training_stopped_at
from models.errors import CheckpointError, ConfigError, UnknownModelError
from models.layers import LoRAConv2d
from models.structure import apply_structure, structure_diff
from models.weights import load_pretrained
from reparam import fuse_model
from train import stage1, stage2
from train.distill import FeatureDistill
from train.tasks import layer_channels, stage_outputs

pytestmark = pytest.mark.usefixtures("isolated_cache")

ARGS = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--epochs", "1", "--device", "cpu"]


def run(main, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


# ----------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("name", ["torchvision:resnet18", "timm:resnet10t", "torchvision:mobilenet_v2"])
def test_external_models_build_save_and_reload_without_pickle(name, tmp_path, single_thread):
    model = randomize_model(models.create_model(name, num_classes=7)).eval()
    assert model.config == {"model": name, "num_classes": 7} and model.num_classes == 7
    path = models.save_checkpoint(model, tmp_path / "m")
    assert json.loads(path.with_suffix(".json").read_text())["config"]["model"] == name
    loaded = models.load_checkpoint(path).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_unknown_or_downloading_models_are_refused():
    with pytest.raises(UnknownModelError) as e:
        models.create_model("torchvision:resnet19")
    assert "torchvision:resnet18" in one_line(e)
    with pytest.raises(ConfigError) as e:
        models.create_model("timm:resnet18", pretrained=True)
    assert "--weights" in one_line(e)


@pytest.mark.parametrize("name, kind", [("fasterrcnn_resnet50_fpn", "object-detection"),
                                        ("fcn_resnet50", "semantic-segmentation"),
                                        ("deeplabv3_mobilenet_v3_large", "semantic-segmentation"),
                                        ("r3d_18", "video"), ("raft_small", "optical-flow"),
                                        ("quantized_resnet18", "quantized")])
def test_torchvision_models_that_are_not_image_classifiers_are_refused_before_any_download(name, kind):
    """Their builders download backbone weights even with weights=None; a classifier's typo still gets suggestions."""
    with pytest.raises(ConfigError) as e:
        models.create_model(f"torchvision:{name}", num_classes=10)
    msg = one_line(e)
    assert f"torchvision:{name} is a" in msg and kind in msg and "trains image classifiers" in msg
    if name == "quantized_resnet18":
        assert "use torchvision:resnet18" in msg
    with pytest.raises(UnknownModelError) as e:
        models.create_model("torchvision:googlnet")
    assert "did you mean torchvision:googlenet" in one_line(e)


def test_auxiliary_classifiers_are_left_out_so_training_gets_one_logits_tensor(single_thread):
    """torchvision's googlenet and inception_v3 are built without aux heads (whose train-mode outputs no loss here
    takes) and without torchvision's init warning; aux_logits=True is refused; timm's inceptions have no aux head."""
    for name, size in (("torchvision:googlenet", 64), ("torchvision:inception_v3", 75), ("timm:inception_v3", 75)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model = models.create_model(name, num_classes=10).train()
        assert model.config == {"model": name, "num_classes": 10}
        assert not any("aux" in n.lower() for n, _ in model.named_modules()), name
        with torch.no_grad():
            out = model(torch.zeros(2, 3, size, size))
        assert type(out) is torch.Tensor and out.shape == (2, 10), name
    for name in ("torchvision:googlenet", "timm:inception_v3"):
        with pytest.raises(ConfigError) as e:
            models.create_model(name, aux_logits=True)
        assert "drop aux_logits" in one_line(e)


def test_a_lora_rank_no_conv_of_a_classifier_can_use_is_refused_before_any_branch_is_built(monkeypatch):
    """Any classifier's LoRA (stage2 on a grown teacher or a torchvision/timm student): resnet18's 3x3 convs use at
    most rank 512 (layer4's, 512 out); 513 is refused in one line naming 512, before a branch is allocated."""
    from models.grow import add_lora_to_convs  # noqa: PLC0415

    grown = models.grow(models.create_model("torchvision:resnet18", num_classes=10), 1)

    def allocate(*args, **kwargs):
        raise AssertionError("a LoRA branch was built before the rank was checked")

    monkeypatch.setattr(models.layers.LoRAConv2d, "__init__", allocate)
    with pytest.raises(ConfigError) as e:
        models.student_from_teacher(grown, lora_rank=513)
    assert "--lora-rank 513 is larger than" in one_line(e) and "the largest useful rank is 512" in one_line(e)
    with pytest.raises(ConfigError) as e:
        add_lora_to_convs(models.create_model("torchvision:resnet18"), 65, targets=["conv1", "layer1.*"])
    assert "the largest useful rank is 64" in one_line(e)
    monkeypatch.undo()
    student = add_lora_to_convs(models.create_model("torchvision:resnet18"), 64, targets=["conv1", "layer1.*"])
    assert student.config["lora"]["rank"] == 64


def test_weights_load_and_the_head_is_replaced(tmp_path, capsys):
    from train.pipeline import _load_weights

    source = models.create_model("torchvision:resnet18", num_classes=1000)
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pth")
    model = models.create_model("torchvision:resnet18", num_classes=10)
    assert load_pretrained(model, tmp_path / "w.pth") == ["fc.weight", "fc.bias"]
    _load_weights(model, str(tmp_path / "w.pth"))  # --weights says when the head starts new
    assert capsys.readouterr().out == (f"weights: {tmp_path / 'w.pth'} loaded, but for the head (fc.weight, fc.bias), "
                                       "whose shape differs: it starts new, for 10 classes\n")
    _load_weights(source, str(tmp_path / "w.pth"))
    assert capsys.readouterr().out == ""
    assert torch.equal(model.layer3[1].conv2.weight, source.layer3[1].conv2.weight)
    assert model.fc.out_features == 10
    other = models.create_model("torchvision:resnet34", num_classes=10)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(other, tmp_path / "w.pth")
    assert "does not fit" in one_line(e)


@pytest.mark.parametrize("name, head", [("torchvision:squeezenet1_1", "classifier.1"), ("timm:dla34", "fc")])
def test_a_1x1_conv_classifier_gives_the_class_count_and_is_the_head_weights_replace(tmp_path, name, head):
    """SqueezeNet's and DLA's classifier is a 1x1 conv: the class count is read from it, and --weights trained for
    1000 classes load into a 10-class model but for that conv."""
    assert models.create_model(name).config["num_classes"] == 1000
    source = models.create_model(name, num_classes=1000)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = models.create_model(name, num_classes=10)
    assert load_pretrained(model, tmp_path / "w.pth") == [f"{head}.weight", f"{head}.bias"]
    assert model.get_submodule(head).out_channels == 10
    kept = next(k for k in source.state_dict() if k.endswith("weight") and not k.startswith(head))
    assert torch.equal(model.state_dict()[kept], source.state_dict()[kept])


def test_structure_patch_rebuilds_a_changed_model(single_thread):
    model = models.create_model("torchvision:resnet18", num_classes=10)
    model.layer1[0].conv1 = nn.Conv2d(64, 40, 3, 1, 1, bias=False)  # what pruning does
    model.layer1[0].bn1 = nn.BatchNorm2d(40)
    model.layer1[0].conv2 = nn.Conv2d(40, 64, 3, 1, 1, bias=False)
    patch = structure_diff(model, models.create_model("torchvision:resnet18", num_classes=10))
    assert set(patch) == {"layer1.0.conv1", "layer1.0.bn1", "layer1.0.conv2"}
    rebuilt = apply_structure(models.create_model("torchvision:resnet18", num_classes=10), patch)
    rebuilt.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v2", "timm:resnet10t",
                                  "timm:mobilenetv3_small_050", "timm:repvgg_a0", "timm:mobileone_s0"])
def test_fusion_folds_batchnorms_of_external_models(name, tmp_path, single_thread):
    """timm's mobilenetv3 has BatchNormAct2d (a BatchNorm with its activation); RepVGG and MobileOne fuse their
    branches with their own reparameterize(), which deletes modules: the checkpoint records that too."""
    model = randomize_model(models.create_model(name, num_classes=10).double()).eval()
    fused = fuse_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        assert ((fused(x) - want).norm() / want.norm()).item() < 1e-10
    reloaded = models.load_checkpoint(models.save_checkpoint(fused, tmp_path / "fused")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), fused(x))


def test_stage_outputs():
    assert stage_outputs(models.create_model("reduce20", expansion=0), [3, 32, 32]) == ["layer1", "layer2", "layer3"]
    assert stage_outputs(models.create_model("torchvision:resnet18"), [3, 224, 224]) == ["layer2", "layer3", "layer4"]


def test_layer_channels_probe_on_the_models_dtype_and_keep_its_mode():
    model = models.create_model("reduce20", expansion=0).double().train()  # a float32 probe would fail here
    assert layer_channels(model, stage_outputs(model, [3, 32, 32]), [3, 32, 32]) == [16, 32, 64]
    assert model.training and not any(m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------------------------- training
@needs_data
@pytest.mark.e2e
def test_stage1_and_stage2_on_external_models(tmp_path):
    tv = tmp_path / "tv"
    summary = run(stage1.main, ["-m", "torchvision:resnet18", *ARGS, "--out", str(tv)])
    assert summary["model"]["model"] == "torchvision:resnet18" and summary["last_epoch"] == 1
    timm_run = tmp_path / "timm"
    assert run(stage1.main, ["-m", "timm:resnet10t", *ARGS, "--out", str(timm_run)])["last_epoch"] == 1
    # a torchvision teacher into a zoo student and into a fresh torchvision student with LoRA, fused and exported
    for student, extra in (("reduce20", []), ("torchvision:mobilenet_v3_small", ["--lora-rank", "2"])):
        out = tmp_path / student.replace(":", "-")
        s = run(stage2.main, ["--teacher", str(tv), "-m", student, *extra, *ARGS, "--out", str(out)])
        assert s["model"]["model"] == student and s["fused_check"]["max_abs_diff"] < 1e-3
        deploy = models.load_checkpoint(out / "deploy" / "model.safetensors")
        assert not any(isinstance(m, (nn.BatchNorm2d, LoRAConv2d)) for m in deploy.modules())
    assert s["model"]["lora"] == {"rank": 2, "modules": ["features.0.0"]}  # its one 3x3 conv of groups 1
    assert isinstance(models.load_checkpoint(out / "last.safetensors").features[0][0], LoRAConv2d)
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        stage1.main(["-m", "torchvision:resnet18", "--expansion", "1", *ARGS, "--out", str(tmp_path / "x")])
    assert "--expansion" in err.getvalue() and not (tmp_path / "x").exists()


@needs_data
@pytest.mark.e2e
def test_a_student_that_cannot_be_fused_is_refused_before_it_trains(tmp_path, capsys):
    """timm's EfficientViT is not fx-traceable: it trained a whole run and then failed at the fusion that ends it."""
    teacher = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "t")
    with pytest.raises(SystemExit) as e:
        stage2.main(["--teacher", str(teacher), "-m", "timm:efficientvit_b0", *ARGS, "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: the student (timm:efficientvit_b0) cannot be fused, which ends the run, so it is "
                          "refused before training: cannot trace EfficientVit with torch.fx") and "distil into" in err
    assert not (tmp_path / "s").exists()


@needs_data
@pytest.mark.e2e
def test_feature_adapters_train_save_and_resume_exactly(tmp_path):
    """FitNets regressors are part of the task: trained, in train_state.pt, and restored by --resume."""
    teacher = tmp_path / "teacher"
    run(stage1.main, ["-m", "reduce20", *ARGS, "--out", str(teacher)])
    argv = ["--inherit", str(teacher), "--feature-kd", "fitnet", *ARGS, "--epochs", "2", "--no-export"]
    whole = run(stage2.main, [*argv, "--out", str(tmp_path / "whole")])
    state = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)["task"]
    adapters = {k: v for k, v in state.items() if k.startswith("feature_loss.")}
    assert adapters and not any(k.startswith("teacher") for k in state)
    # the projections' BN affine parameters start at exactly 1 and 0: only the optimizer moves them
    fresh = FeatureDistill([16, 32, 64], [16, 32, 64], "fitnet").state_dict()
    affine = [k for k in fresh if k.endswith((".1.weight", ".1.bias"))]
    assert len(affine) == 6 and all(not torch.equal(adapters[f"feature_loss.{k}"], fresh[k]) for k in affine)
    assert whole["feature_kd"].startswith("FeatureDistill")

    with training_stopped_at(call=2), pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run(stage2.main, [*argv, "--out", str(tmp_path / "split")])
    run(stage2.main, [*argv, "--out", str(tmp_path / "split"), "--resume"])
    a = torch.load(tmp_path / "whole" / "train_state.pt", weights_only=True)["task"]
    b = torch.load(tmp_path / "split" / "train_state.pt", weights_only=True)["task"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resume is not exact"
    assert load_file(str(tmp_path / "split" / "last.safetensors")).keys() == \
        load_file(str(tmp_path / "whole" / "last.safetensors")).keys()  # the student alone, no adapters


@needs_data
@pytest.mark.e2e
def test_stage2_with_semckd_and_at(tmp_path):
    teacher = tmp_path / "teacher"
    run(stage1.main, ["-m", "reduce20", *ARGS, "--out", str(teacher)])
    for mode in ("semckd", "at"):
        s = run(stage2.main, ["--teacher", str(teacher), "-m", "reduce20", "--feature-kd", mode, *ARGS,
                              "--no-export", "--out", str(tmp_path / mode)])
        rows = (tmp_path / mode / "metrics.csv").read_text().splitlines()
        assert "loss_features" in rows[0] and s["feature_kd"].startswith("SemCKD" if mode == "semckd" else "Feat")


@pytest.mark.parametrize("main, extra", [(stage1.main, ["-m", "torchvision:vit_b_16"]),
                                         (stage1.main, ["-m", "torchvision:inception_v3"])])
def test_a_model_that_cannot_take_the_data_s_size_is_refused_before_training(tmp_path, capsys, main, extra):
    with pytest.raises(SystemExit) as e:
        main([*extra, "--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--epochs", "1",
              "--device", "cpu", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "cannot take 32 px inputs" in err and "--image-size" in err
    assert not (tmp_path / "run").exists()


def test_weights_of_a_run_directory_are_its_last_checkpoint(tmp_path):
    """--weights RUN_DIR takes the run's last checkpoint, as -m, --teacher and evaluate take a run directory; a
    folder of something else says what to pass."""
    from models.checkpoint import save_checkpoint
    from train.pipeline import _load_weights

    source = models.create_model("reduce20", expansion=0)
    (tmp_path / "run").mkdir()
    save_checkpoint(source, tmp_path / "run" / "last.safetensors")
    model = models.create_model("reduce20", expansion=0)
    _load_weights(model, str(tmp_path / "run"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    (tmp_path / "other").mkdir()
    with pytest.raises(CheckpointError) as e:
        _load_weights(model, str(tmp_path / "other"))
    assert "holds no last.safetensors" in one_line(e) and "run directory" in one_line(e)


def test_weights_that_are_a_device_or_a_folder_say_so(tmp_path):
    model = models.create_model("reduce20", expansion=0)
    for path, words in (("/dev/null", "not a regular file"), (str(tmp_path), "is a folder"),
                        (str(tmp_path / "gone.pth"), "does not exist")):
        with pytest.raises(CheckpointError) as e:
            load_pretrained(model, path)
        assert words in one_line(e)
