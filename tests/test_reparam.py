"""Behaviour tests for reparam/: the fusion maths, whole-model fusion, export and the fuse CLI."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import models
from _shared import one_line, run_main
import reparam
from models import ReparamError
from models.layers import LambdaReLU, LoRABranch, LoRAConv2d
from models import fusion_math as T
from reparam.export import export_deploy

NAMES = models.list_models(reducible=True)  # the families with teacher and student forms
ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")



def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rn(*shape, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=g(seed), dtype=F64)


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes; directories as None."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in folder.rglob("*")}


def lora_student(name: str, randomize, dtype=torch.float32, rank: int = 4) -> nn.Module:
    m = models.create_model(name, expansion=0, lora_rank=rank).to(dtype)
    return randomize(m)


# ---------------------------------------------------------------------------------------------------- transforms
@pytest.mark.parametrize("with_bias, groups", [(True, 1), (False, 1), (True, 6)])
def test_fold_bn(with_bias, groups):
    w, b = rn(6, 6 // groups, 3, 3, seed=1), (rn(6, seed=2) if with_bias else None)
    mean, var = rn(6, seed=3), rn(6, seed=4).abs() + 0.1
    gamma, beta, eps = rn(6, seed=5), rn(6, seed=6), 1e-5
    x = rn(2, 6, 9, 9, seed=7)
    ref = F.batch_norm(F.conv2d(x, w, b, stride=2, padding=1, groups=groups), mean, var, gamma, beta,
                       training=False, eps=eps)
    k, kb = T.fold_bn(w, b, mean, var, gamma, beta, eps)
    assert k.shape == w.shape and kb.shape == (6,)
    torch.testing.assert_close(F.conv2d(x, k, kb, stride=2, padding=1, groups=groups), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("with_bias", [True, False])
def test_merge_kxk_1x1(with_bias):
    w1, w2 = rn(7, 4, 3, 3, seed=1), rn(5, 7, 1, 1, seed=2)
    b1, b2 = (rn(7, seed=3), rn(5, seed=4)) if with_bias else (None, None)
    x = rn(2, 4, 11, 11, seed=5)
    ref = F.conv2d(F.conv2d(x, w1, b1, stride=2, padding=1), w2, b2)
    k, kb = T.merge_kxk_1x1(w1, b1, w2, b2)
    assert k.shape == (5, 4, 3, 3) and kb.shape == (5,)
    torch.testing.assert_close(F.conv2d(x, k, kb, stride=2, padding=1), ref, atol=1e-12, rtol=0)


def test_pad_kernel():
    w = rn(5, 4, 1, 1, seed=1)
    x = rn(2, 4, 8, 8, seed=2)
    p = T.pad_kernel(w, 3)
    assert p.shape == (5, 4, 3, 3)
    torch.testing.assert_close(F.conv2d(x, p, padding=1), F.conv2d(x, w, padding=0), atol=1e-12, rtol=0)
    w3 = rn(5, 4, 3, 3, seed=3)
    torch.testing.assert_close(F.conv2d(x, T.pad_kernel(w3, 5), padding=2), F.conv2d(x, w3, padding=1),
                               atol=1e-12, rtol=0)
    assert torch.equal(T.pad_kernel(w3, 3), w3)


@pytest.mark.parametrize("size", [2, 4])
def test_pad_kernel_refuses_uneven_padding(size):
    with pytest.raises(ValueError):
        T.pad_kernel(rn(2, 2, 1, 1) if size == 2 else rn(2, 2, 3, 3), size)


def test_pad_kernel_refuses_shrinking():
    with pytest.raises(ValueError):
        T.pad_kernel(rn(2, 2, 3, 3), 1)


@pytest.mark.parametrize("stride", [1, 2])
def test_sum_kernels(stride):
    w3, b3, w1, b1 = rn(6, 4, 3, 3, seed=1), rn(6, seed=2), rn(6, 4, 1, 1, seed=3), rn(6, seed=4)
    x = rn(2, 4, 9, 9, seed=5)
    ref = F.conv2d(x, w3, b3, stride=stride, padding=1) + F.conv2d(x, w1, b1, stride=stride, padding=0)
    k, kb = T.sum_kernels((w3, b3), (w1, b1))
    torch.testing.assert_close(F.conv2d(x, k, kb, stride=stride, padding=1), ref, atol=1e-12, rtol=0)
    k, kb = T.sum_kernels((w3, None), (w1, b1))
    ref = F.conv2d(x, w3, None, stride=stride, padding=1) + F.conv2d(x, w1, b1, stride=stride)
    torch.testing.assert_close(F.conv2d(x, k, kb, stride=stride, padding=1), ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("size, groups", [(1, 1), (3, 1), (3, 6), (3, 2)])
def test_identity_kernel(size, groups):
    k = T.identity_kernel(6, size, groups, dtype=F64)
    assert k.shape == (6, 6 // groups, size, size) and k.dtype == F64
    x = rn(2, 6, 7, 7, seed=1)
    torch.testing.assert_close(F.conv2d(x, k, padding=size // 2, groups=groups), x, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------- fuse_model
def _has_unfused(m: nn.Module) -> bool:
    return any(isinstance(x, (nn.modules.batchnorm._BatchNorm, LoRABranch, LoRAConv2d, LambdaReLU))
               for x in m.modules())


@pytest.mark.parametrize("name", NAMES)
def test_fuse_model_float32(name, randomize, make_images):
    model = lora_student(name, randomize).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused = reparam.fuse_model(model)

    # the original is untouched: same tensors, still training, still BN and LoRA
    assert model.training
    assert _has_unfused(model) and any(isinstance(x, LoRABranch) for x in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    assert not fused.training and not _has_unfused(fused)
    deploy = models.create_model(name, expansion=0, inference_mode=True)
    assert models.count_params(fused) == models.count_params(deploy)
    deploy.load_state_dict(fused.state_dict(), strict=True)

    x = make_images(2)
    with torch.no_grad():
        ref = model.eval()(x)
        assert ref.abs().max() > 1e-2  # a meaningful comparison, not two zero vectors
        assert (fused(x) - ref).abs().max().item() <= 1e-4
        assert (deploy.eval()(x) - ref).abs().max().item() <= 1e-4
    assert reparam.max_abs_diff(model, fused, x) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_fuse_model_float64(name, randomize, make_images):
    model = lora_student(name, randomize, dtype=F64).eval()
    fused = reparam.fuse_model(model)
    assert next(fused.parameters()).dtype == F64
    x = make_images(2, dtype=F64)
    with torch.no_grad():
        assert (fused(x) - model(x)).abs().max().item() <= 1e-9


@pytest.mark.parametrize("name", NAMES)
def test_timm_reparameterize_model(name, randomize, make_images):
    from timm.utils import reparameterize_model

    for dtype, atol in ((torch.float32, 1e-4), (F64, 1e-9)):
        model = lora_student(name, randomize, dtype=dtype).eval()
        fused = reparameterize_model(model)
        assert fused is not model and not _has_unfused(fused) and _has_unfused(model)
        x = make_images(2, dtype=dtype)
        with torch.no_grad():
            assert (fused(x) - model(x)).abs().max().item() <= atol, dtype


@pytest.mark.parametrize("name", ["reduce20", "reduce_mobilenetv2"])
def test_fuse_model_refuses_teacher(name):
    teacher = models.create_model(name)
    with pytest.raises(ReparamError) as e:
        reparam.fuse_model(teacher)
    msg = one_line(e)
    assert "branch_b" in msg
    # the refusal happened on a copy: the teacher keeps its BatchNorms
    assert isinstance(teacher.stem.bn, nn.BatchNorm2d)


def test_fuse_model_refuses_lambda_below_one(randomize, make_images):
    model = lora_student("reduce20", randomize)
    assert models.set_lambda(model, 0.5) > 0
    with pytest.raises(ReparamError) as e:
        reparam.fuse_model(model)
    msg = one_line(e)
    assert "layer1.0.conv1" in msg and ("lam" in msg or "Lambda" in msg)
    models.set_lambda(model, 1.0)  # the schedule finished: fusion works again
    fused = reparam.fuse_model(model)
    assert reparam.max_abs_diff(model, fused, make_images(2)) <= 1e-4


# ---------------------------------------------------------------------------------------------------- export
def test_export_reloads_the_checkpoint_it_writes_and_writes_nothing_when_it_does_not_load(tmp_path, monkeypatch):
    """timm's ViT takes its size as img_size: its checkpoint loads back. A record the loader would refuse is found
    by the export itself, which then writes nothing."""
    vit = models.create_model("timm:vit_tiny_patch16_224", num_classes=10, img_size=32).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(models.load_checkpoint(models.save_checkpoint(vit, tmp_path / "vit")).eval()(x), vit(x))
    monkeypatch.setattr("models.checkpoint.EXTERNAL_ARGS", frozenset({"image_size"}))  # num_classes now refused
    out = tmp_path / "deploy"
    with pytest.raises(ReparamError) as e:
        export_deploy(models.create_model("timm:resnet10t", num_classes=10), out, onnx=False, torchscript=False,
                      pt2=False)
    assert "checkpoint does not load back" in one_line(e) and "'num_classes'" in one_line(e)
    assert not out.exists() and not list(tmp_path.glob(".deploy*"))


def test_export_checks_at_the_size_a_model_was_built_for_and_names_a_file_in_the_way(tmp_path):
    """A VGG built for 64 px is checked at 64 px (it was checked at 32 and refused); an --out inside a file is named
    as such (it read as a disk problem)."""
    vgg = models.create_model("pyramid_vgg19", image_size=64)
    assert export_deploy(vgg, tmp_path / "vgg", onnx=False, torchscript=False, pt2=False).max_diff["fused"] == 0.0
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ReparamError) as e:
        export_deploy(models.create_model("reduce20", expansion=0), tmp_path / "afile" / "sub", onnx=False)
    assert one_line(e) == (f"{tmp_path / 'afile' / 'sub'} lies inside the file {tmp_path / 'afile'}; pass a folder "
                           "for the deploy files")


def test_export_deploy_writes_verified_files(tmp_path, randomize, make_images):
    model = lora_student("reduce20", randomize, rank=2).eval()
    reference_model = copy.deepcopy(model)
    out = tmp_path / "out"
    report = export_deploy(model, out, metadata={"note": "test"})
    names = {"model.safetensors", "model.json", "model.ts", "model.onnx", "model.pt2"}
    assert set(p.name for p in out.iterdir()) == names  # no leftover temp folder
    assert {p.name for p in report.files.values()} == names and all(p.parent == out for p in report.files.values())
    assert {"fused", "safetensors", "torchscript", "onnx", "pt2"} <= set(report.max_diff)
    assert all(0 <= d <= 1e-4 for d in report.max_diff.values())

    x = make_images(3, seed=5)  # another batch size than the export check
    with torch.no_grad():
        ref = reference_model(x)
        ts = torch.jit.load(str(out / "model.ts"))
        assert (ts(x) - ref).abs().max().item() <= 1e-4
        program = torch.export.load(str(out / "model.pt2")).module()  # torch.export, with a dynamic batch
        assert (program(x) - ref).abs().max().item() <= 1e-4
        deploy = models.load_checkpoint(out / "model.safetensors").eval()
        assert deploy.config["inference_mode"] is True and deploy.config["expansion"] == 0
        assert not _has_unfused(deploy)
        assert (deploy(x) - ref).abs().max().item() <= 1e-4
    assert deploy.checkpoint_metadata.get("note") == "test"

    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert (onnx_out - ref).abs().max().item() <= 1e-4


def _prefill(out: Path) -> dict[str, bytes]:
    out.mkdir()
    (out / "model.onnx").write_bytes(b"old onnx")
    (out / "notes.txt").write_text("keep me")
    return tree(out)


def test_export_teacher_leaves_out_dir_untouched(tmp_path):
    out = tmp_path / "out"
    before = _prefill(out)
    with pytest.raises(ReparamError) as e:
        export_deploy(models.create_model("reduce20"), out)
    assert "branch_b" in one_line(e)
    assert tree(out) == before


def test_export_failed_check_leaves_out_dir_untouched(tmp_path, monkeypatch, randomize):
    """A check failing late (after safetensors and TorchScript are staged) writes nothing."""
    import reparam.export as export_mod

    monkeypatch.setattr(export_mod, "_export_onnx", lambda fused, x, reference, path: 1.0)
    out = tmp_path / "out"
    before = _prefill(out)
    with pytest.raises(ReparamError) as e:
        export_deploy(lora_student("reduce20", randomize, rank=2), out)
    assert "ONNX" in one_line(e)
    assert tree(out) == before


# ---------------------------------------------------------------------------------------------------- CLI
def run_fuse(*args: str, subprocess_: bool = False) -> subprocess.CompletedProcess:
    """``python -m reparam.fuse ARGS`` (with ``subprocess_``), or its ``main`` in this process (:func:`run_main`)."""
    if not subprocess_:
        from reparam.fuse import main
        return run_main(main, args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "reparam.fuse", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.e2e
def test_fuse_cli_success(tmp_path, randomize, make_images):
    model = lora_student("reduce20", randomize, rank=2).eval()
    models.save_checkpoint(model, tmp_path / "run" / "last")
    out = tmp_path / "deploy"
    p = run_fuse(str(tmp_path / "run"), "--out", str(out), subprocess_=True)  # a run directory: its last
    assert p.returncode == 0, p.stderr
    assert {"model.safetensors", "model.json", "model.ts", "model.onnx", "model.pt2"} == {f.name for f in out.iterdir()}
    assert models.read_record(out / "model.safetensors")["metadata"]["fused_from"] == str(tmp_path / "run")
    deploy = models.load_checkpoint(out / "model.safetensors").eval()
    x = make_images(2, seed=3)
    with torch.no_grad():
        assert (deploy(x) - model(x)).abs().max().item() <= 1e-4


def test_fuse_cli_exports_at_the_checkpoints_own_height_and_width(tmp_path):
    """A model trained on 24x40 images: its .pt2 took 40x40 only (the check used the last dimension twice)."""
    model = models.create_model("reduce20", expansion=0).eval()
    models.save_checkpoint(model, tmp_path / "m", preprocess={"mean": [0.5] * 3, "std": [0.25] * 3,
                                                              "input_size": [3, 24, 40]})
    p = run_fuse(str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "deploy"), "--no-onnx", "--no-torchscript")
    assert p.returncode == 0, p.stderr
    program = torch.export.load(str(tmp_path / "deploy" / "model.pt2")).module()
    x = torch.randn(2, 3, 24, 40)
    with torch.no_grad():
        assert (program(x) - model(x)).abs().max().item() <= 1e-4
    assert models.load_checkpoint(tmp_path / "deploy").preprocess["input_size"] == [3, 24, 40]


def test_fuse_cli_records_the_size_it_exports_at(tmp_path):
    """--image-size 32 for a model trained at 40 px: the programs take 32 px only, and model.json said 40, so
    evaluate fed them 40 px and failed with onnxruntime's traceback."""
    model = models.create_model("reduce20", expansion=0).eval()
    models.save_checkpoint(model, tmp_path / "m", preprocess={"mean": [0.5] * 3, "std": [0.25] * 3,
                                                              "input_size": [3, 40, 40]})
    p = run_fuse(str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "deploy"), "--no-onnx", "--no-torchscript",
                 "--image-size", "32")
    assert p.returncode == 0, p.stderr
    record = models.load_checkpoint(tmp_path / "deploy")
    assert record.preprocess == {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]}
    program = torch.export.load(str(tmp_path / "deploy" / "model.pt2")).module()
    with torch.no_grad():
        program(torch.randn(1, 3, 32, 32))


@pytest.mark.e2e
def test_fuse_cli_missing_checkpoint(tmp_path):
    out = tmp_path / "deploy"
    p = run_fuse(str(tmp_path / "nope.safetensors"), "--out", str(out))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), p.stderr
    assert "Traceback" not in p.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_fuse_cli_teacher(tmp_path):
    ckpt = models.save_checkpoint(models.create_model("reduce20"), tmp_path / "teacher")
    out = tmp_path / "deploy"
    before = _prefill(out)
    p = run_fuse(str(ckpt), "--out", str(out), "--overwrite")
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "branch_b" in lines[0], p.stderr
    assert "Traceback" not in p.stderr
    assert tree(out) == before


@pytest.mark.parametrize("args, words", [
    (["--image-size", "0"], "--image-size 0"),
    (["--out-is-a-file"], "is a file"),
])
@pytest.mark.e2e
def test_fuse_cli_bad_options(tmp_path, randomize, args, words):
    ckpt = models.save_checkpoint(lora_student("reduce20", randomize, rank=2), tmp_path / "student")
    out = tmp_path / "deploy"
    users_file = args == ["--out-is-a-file"]
    if users_file:
        out.write_text("mine")
        args = []
    p = run_fuse(str(ckpt), "--out", str(out), *args)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and words in lines[0], p.stderr
    if users_file:  # the user's file is left as it was
        assert out.is_file() and out.read_text() == "mine"
    else:  # nothing is written for a refused command
        assert not out.exists()


@pytest.mark.e2e
def test_fuse_cli_replaces_a_deploy_folder_only_when_asked_and_as_one_set(tmp_path, randomize):
    """An --out that holds files is refused without --overwrite; with it, a re-export without ONNX removes the
    earlier export's model.onnx (it belongs to another model) and keeps the user's other files; a run folder is
    refused either way."""
    first = models.save_checkpoint(lora_student("reduce20", randomize, rank=2), tmp_path / "first")
    out = tmp_path / "deploy"
    assert run_fuse(str(first), "--out", str(out), "--no-torchscript", "--no-pt2").returncode == 0
    (out / "notes.txt").write_text("keep me")
    before = tree(out)
    second = models.save_checkpoint(lora_student("reduce20", randomize, rank=4), tmp_path / "second")
    p = run_fuse(str(second), "--out", str(out), "--no-onnx", "--no-torchscript", "--no-pt2")
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0], p.stderr
    assert tree(out) == before
    p = run_fuse(str(second), "--out", str(out), "--no-onnx", "--no-torchscript", "--no-pt2", "--overwrite")
    assert p.returncode == 0, p.stderr
    assert {f.name for f in out.iterdir()} == {"model.safetensors", "model.json", "notes.txt"}
    assert (out / "notes.txt").read_text() == "keep me"
    assert models.read_record(out / "model.safetensors")["metadata"]["fused_from"] == str(second)
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text("{}")
    p = run_fuse(str(second), "--out", str(run), "--overwrite")
    assert p.returncode == 2 and "training run" in p.stderr and sorted(f.name for f in run.iterdir()) == ["args.json"]


def test_failed_export_creates_no_folder(tmp_path):
    """A refusal (here: a teacher) leaves no empty deploy folder behind."""
    out = tmp_path / "new" / "deploy"
    with pytest.raises(ReparamError):
        export_deploy(models.create_model("reduce20"), out)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("call, words", [
    (lambda: reparam.fuse_model(None), "NoneType"),
    (lambda: export_deploy(None, "x"), "NoneType"),
    (lambda: export_deploy(models.create_model("reduce20", expansion=0), "x", input_size=(3, 0, 32)), "input_size"),
])
def test_api_misuse_is_one_line(call, words):
    with pytest.raises(ReparamError) as e:
        call()
    assert words in one_line(e)


def test_lambda_just_above_one_is_named_exactly(randomize):
    model = lora_student("reduce20", randomize)
    models.set_lambda(model, 1.0000001)
    with pytest.raises(ReparamError) as e:
        reparam.fuse_model(model)
    msg = one_line(e)
    assert "lam=1.00000011920928" in msg and "< 1" not in msg  # the float32 value, not a rounded "1"


@pytest.mark.parametrize("name", NAMES)
def test_flatten_keeps_the_function_and_the_weights_and_drops_the_wrappers(name, randomize, make_images):
    fused = reparam.fuse_model(lora_student(name, randomize, rank=2))
    flat = reparam.flatten(fused)
    assert list(flat.state_dict()) == list(fused.state_dict()) and flat.config == fused.config
    assert not [n for n, m in flat.named_modules() if isinstance(m, (nn.Identity, nn.ReLU, nn.ReLU6))]
    calls = [n for n in flat.graph.nodes if n.op == "call_module"]
    convs = [m for m in fused.modules() if isinstance(m, nn.Conv2d)]
    assert len(calls) <= len(convs) + 2  # the convs, the pool and the classifier: nothing else is a module call
    assert "getattr(" not in flat.code  # every call one attribute lookup, not one per level of the tree
    x = make_images(2)
    with torch.no_grad():
        assert torch.equal(flat(x), fused(x))
    changed = {k: v * 0.9 if v.is_floating_point() else v for k, v in fused.state_dict().items()}
    flat.load_state_dict(changed, strict=True)  # the tree's names load into the flat graph ...
    fused.load_state_dict(changed, strict=True)
    with torch.no_grad():
        out = flat(x)
        assert torch.isfinite(out).all() and torch.equal(out, fused(x))  # ... into the tensors its calls use
    assert list(torch.nn.Sequential(flat).state_dict()) == ["0." + k for k in changed]  # also as a child


def test_export_refuses_metadata_that_is_not_json_and_a_read_only_folder_in_one_line(tmp_path, monkeypatch):
    import tempfile

    from models.errors import ReparamError

    model = models.create_model("reduce20", expansion=0).eval()
    with pytest.raises(ReparamError) as e:
        export_deploy(model, tmp_path / "a", metadata={"when": object()})
    assert "JSON" in one_line(e) and not (tmp_path / "a").exists()

    def read_only(*a, **k):  # what a folder without write permission does (root writes anywhere)
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryDirectory", read_only)
    with pytest.raises(ReparamError) as e:
        export_deploy(model, tmp_path / "deploy", onnx=False, torchscript=False, pt2=False)
    assert "cannot write the deploy files" in one_line(e) and "Permission denied" in str(e.value)


def test_export_and_complexity_default_to_the_recorded_input_size(tmp_path):
    from models.identity import set_preprocess

    model = models.create_model("reduce20", expansion=0).eval()
    set_preprocess(model, {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 64, 64]})
    assert models.complexity(model)["macs"] == models.count_macs(model, (1, 3, 64, 64))
    report = export_deploy(model, tmp_path / "d", onnx=False, torchscript=False)
    program = torch.export.load(str(report.files["pt2"])).module()
    assert program(torch.zeros(1, 3, 64, 64)).shape == (1, 10)


def test_deploy_programs_are_made_from_the_flat_graph_and_from_the_model_when_fx_cannot_trace_it(make_images):
    from reparam.export import export_program, flat_or_tree, trace

    class Branchy(nn.Module):  # control flow on a tensor's value: torch.fx refuses it
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else -self.conv(x)

    branchy = Branchy().eval()
    assert flat_or_tree(branchy) is branchy
    fused = reparam.fuse_model(models.create_model("reduce20", expansion=0))
    flat = flat_or_tree(fused)
    assert isinstance(flat, torch.fx.GraphModule) and "stem_conv" in dict(flat.named_children())
    x = make_images(2)
    program = export_program(fused, x)
    assert "stem_conv.weight" in program.state_dict  # one lookup per parameter in the program
    with torch.no_grad():
        assert torch.allclose(program.module()(x), fused(x), atol=1e-5)
        assert torch.allclose(trace(fused, x)(x), fused(x), atol=1e-5)


def test_folding_batchnorms_in_training_mode_is_refused_and_changes_nothing():
    """A BatchNorm in training mode normalises by each batch: folding it changed a train-mode resnet18's logits by
    about 1.8. fold_batchnorms refuses, naming it; in eval mode it folds and keeps the outputs."""
    torch.manual_seed(0)
    model = models.create_model("torchvision:resnet18", num_classes=10)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ReparamError) as e:
        reparam.fold_batchnorms(model)
    assert one_line(e).startswith("cannot fold bn1: it is in training mode") and "model.eval()" in one_line(e)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model.eval()(x)
        assert len(reparam.fold_batchnorms(model)) == 20
        assert torch.allclose(model(x), expected, atol=1e-4)


class _Branchy(nn.Module):
    """A conv-BN model whose forward branches on its input's values, which torch.fx cannot trace."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)) if x.sum() > 0 else x


def test_check_fusable_refuses_what_fuse_model_would_and_takes_lambda_as_its_schedule_ends():
    from models.grow import add_lora_to_convs
    with pytest.raises(ReparamError) as e:
        reparam.check_fusable(_Branchy())
    assert one_line(e).startswith("cannot trace _Branchy with torch.fx") and "deploy it unfused" in one_line(e)
    student = add_lora_to_convs(models.create_model("torchvision:resnet18", num_classes=10), 2)
    assert models.set_lambda(student, 0.0)  # where --lambda-epochs starts: not linear, so not fusable as it is
    reparam.check_fusable(student)  # the check takes them at 1, as the schedule ends, and leaves the model as it is
    assert all(float(m.lam) == 0.0 for m in student.modules() if isinstance(m, LambdaReLU))
    with pytest.raises(ReparamError):
        reparam.fuse_model(student)
