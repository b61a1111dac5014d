"""Trimming (models/trim.py, python -m train.trim): weights kept, cost met, checkpoints rebuilt, chains of trims."""
from __future__ import annotations

import ast
import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import models
from _shared import (CIFAR10, ROOT, SHARED, free_port, needs_data, one_line, randomize_model, subprocess_env,
                     training_stopped_at)
from models.convert import from_reducenet_original
from models.weights import read_state_dict
from models.errors import ConfigError
from models.trim import TrimError, trim
from reparam import fuse_model
from train import trim as trim_cli


pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_cache")]  # every test trains or runs a CLI

ORIGINAL = SHARED / "reducenet-original" / "reduce20_cifar10_e1_w1_student.pth"


@pytest.mark.parametrize("name, kwargs", [
    ("reduce56", {"expansion": 0}), ("reduce20", {"expansion": 1}), ("reduce_mobilenetv2", {"expansion": 0}),
    ("torchvision:resnet18", {}), ("torchvision:mobilenet_v2", {}), ("timm:resnet10t", {}),
    ("timm:mobilenetv3_small_050", {}),  # timm's BatchNormAct2d: a BatchNorm of timm's class, resized and folded
])
def test_trim_meets_the_cost_and_rebuilds(name, kwargs, tmp_path, single_thread):
    model = randomize_model(models.create_model(name, num_classes=10, **kwargs)).eval()
    result = trim(model, 2.0, "macs")
    assert abs(result.cost_after - result.cost_before / 2) <= 0.03 * result.cost_before / 2
    assert models.count_macs(result.model) == result.cost_after
    # the structure patch rebuilds it from JSON, and the fused form computes the same function
    loaded = models.load_checkpoint(models.save_checkpoint(result.model, tmp_path / "t")).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), result.model(x))
        if name != "reduce20":  # a teacher's branch (b) does not fuse
            assert (fuse_model(loaded)(x) - loaded(x)).abs().max().item() < 1e-3
    # and it can be trimmed again
    again = trim(loaded, 1.5, "params")
    assert abs(again.cost_after - again.cost_before / 1.5) <= 0.03 * again.cost_before / 1.5


def test_trimming_keeps_the_surviving_weights():
    """The stem's kept filters (its 3 input channels are never pruned) and the classifier's kept columns are the
    original's, bit for bit: trimming selects, it does not re-initialise."""
    model = randomize_model(models.create_model("torchvision:resnet18", num_classes=10)).eval()
    small = trim(model, 1.5, "params").model
    kept, full = small.conv1.weight, model.conv1.weight
    assert kept.shape[0] < full.shape[0]
    assert all(any(torch.equal(k, f) for f in full) for k in kept)
    cols, all_cols = small.fc.weight.t(), model.fc.weight.t()
    assert len(cols) < len(all_cols) and all(any(torch.equal(c, a) for a in all_cols) for c in cols)
    assert torch.equal(small.fc.bias, model.fc.bias)


@pytest.mark.skipif(not ORIGINAL.is_file(), reason=f"needs {ORIGINAL}")
@needs_data
def test_a_mild_trim_keeps_the_accuracy_and_reinitialising_loses_it(tmp_path):
    """The original's trained student (93.61%): a 1.1x trim without fine-tuning stays close; re-initialised, chance."""
    ckpt = models.save_checkpoint(from_reducenet_original(read_state_dict(ORIGINAL)), tmp_path / "student",
                                  {"dataset": "cifar10"})
    argv = ["--teacher", str(ckpt), "--reduce", "1.1", "--epochs", "0", "--data-dir", str(CIFAR10), "--device",
            "cpu", "--no-export"]
    with contextlib.redirect_stdout(io.StringIO()):
        summary = trim_cli.main([*argv, "--out", str(tmp_path / "trim")])
    assert summary["teacher_test_acc"] == pytest.approx(93.61, abs=0.01)
    assert summary["trim"]["reduce_reached"] == pytest.approx(1.1, rel=0.03)
    assert summary["last_test_acc"] > 93.61 - 8, summary["last_test_acc"]
    run = tmp_path / "trim"  # saved as a finished run of 0 epochs, like any other
    assert {"last.safetensors", "best.safetensors", "metrics.csv", "train_state.pt", "summary.json"} <= {
        p.name for p in run.iterdir()}
    assert json.loads((run / "summary.json").read_text())["last_epoch"] == 0
    assert json.loads((run / "best.json").read_text())["metadata"]["epoch"] == 0
    trimmed = models.load_checkpoint(tmp_path / "trim")
    for m in trimmed.modules():  # the same architecture, re-initialised
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    models.save_checkpoint(trimmed, tmp_path / "reinit", {"dataset": "cifar10"})
    from train import evaluate
    report = evaluate.run(evaluate.build_parser().parse_args([str(tmp_path / "reinit.safetensors"), "--data-dir",
                                                              str(CIFAR10)]))
    assert report["test_acc"] < 20


@needs_data
def test_trim_cli_fine_tunes_fuses_exports_and_chains(tmp_path):
    teacher = tmp_path / "teacher"
    args = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu"]
    from train import stage1
    with contextlib.redirect_stdout(io.StringIO()):
        stage1.main(["-m", "reduce20", "--expansion", "0", "--epochs", "1", *args, "--out", str(teacher)])
        first = trim_cli.main(["--teacher", str(teacher), "--reduce", "2", "--epochs", "1", "--feature-kd", "at",
                               *args, "--out", str(tmp_path / "t1")])
        second = trim_cli.main(["--teacher", str(tmp_path / "t1"), "--reduce", "1.5", "--by", "params",
                                "--kd", "none", "--epochs", "1", *args, "--out", str(tmp_path / "t2")])
    assert first["trim"]["reduce_reached"] == pytest.approx(2, rel=0.03) and first["last_epoch"] == 1
    assert first["fused_check"]["max_abs_diff"] < 1e-3
    deploy = models.load_checkpoint(tmp_path / "t1" / "deploy" / "model.safetensors")
    assert deploy.config["structure"] and not any(isinstance(m, nn.BatchNorm2d) for m in deploy.modules())
    assert second["trim"]["by"] == "params" and second["params"] < first["params"]
    record = json.loads((tmp_path / "t2" / "last.json").read_text())
    assert record["metadata"]["teacher"].endswith("last.safetensors") and record["config"]["structure"]


def test_bad_input_is_one_line():
    model = models.create_model("reduce20", expansion=0)
    for kwargs, words in (({"reduce": 1.0}, "reduce must be a finite number > 1"),
                          ({"reduce": 2, "by": "flops"}, "flops"),
                          ({"reduce": 2, "importance": "taylor"}, "taylor"),
                          ({"reduce": 2, "by": "latency"}, "latency(model)")):
        with pytest.raises(ConfigError) as e:
            trim(model, **kwargs)
        assert words in one_line(e)
    with pytest.raises(TrimError) as e:  # refused after one pruning, not a search
        trim(model, 1000.0)
    assert "pruning removes at most 1/" in one_line(e) and "pass --reduce" in one_line(e)
    with pytest.raises(ConfigError) as e:
        trim(model, 2.0, round_to=1000)
    assert "exceeds the widest conv's 64 channels" in one_line(e)


@pytest.mark.parametrize("extra, words", [(["--reduce", "inf"], "--reduce inf"), (["--reduce", "5000"], "(1, 1000]"),
                                          (["--reduce", "2", "--round-to", "1000"], "--round-to 1000")])
def test_trim_options_are_refused_before_any_work(tmp_path, capsys, extra, words):
    with pytest.raises(SystemExit) as e:
        trim_cli.main(["--teacher", str(tmp_path / "absent"), *extra, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and words in err and not (tmp_path / "o").exists()


@needs_data
def test_a_teacher_is_trimmed_in_its_student_form_and_a_resumed_latency_trim_keeps_its_structure(tmp_path,
                                                                                                 monkeypatch):
    """Branch (b) goes before any pruning (it could never be fused after); a `--by latency` run stopped after an
    epoch resumes with the structure it chose, even when latency now measures otherwise."""
    from train import pipeline, stage1

    args = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stage1.main(["-m", "reduce20", "--expansion", "1", "--epochs", "1", *args, "--out", str(tmp_path / "t")])
    monkeypatch.setattr(pipeline, "latency", lambda m, size, device: models.count_params(m) * 1e-9)
    trim_args = ["--teacher", str(tmp_path / "t"), "--reduce", "2", "--by", "latency", "--epochs", "2",
                 "--calibrate-batches", "1", *args, "--out", str(tmp_path / "trim")]
    with contextlib.redirect_stdout(out), training_stopped_at(2), pytest.raises(SystemExit):
        trim_cli.main(trim_args)
    said = out.getvalue()
    assert "is a ReduceNet teacher; its student (branch (b) removed" in said
    assert "trim: test accuracy" in said and "trimmed before fine-tuning" in said
    first = json.loads((tmp_path / "trim" / "last.json").read_text())
    assert first["config"]["expansion"] == 0 and first["config"]["structure"]
    monkeypatch.setattr(pipeline, "latency", lambda m, size, device: float(torch.rand(1)))  # a new search fails
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = trim_cli.main([*trim_args, "--resume"])
    assert "resuming with the structure recorded" in out.getvalue() and summary["last_epoch"] == 2
    assert json.loads((tmp_path / "trim" / "last.json").read_text())["config"] == first["config"]
    assert summary["fused_check"]["max_abs_diff"] < 1e-3


def test_a_layer_torch_pruning_cannot_handle_is_named(monkeypatch):
    """When Torch-Pruning fails, the message names the layer of a kind it does not know."""
    import torch_pruning as tp

    class Scale(nn.Module):  # a parameter of its own, tied to the channels
        def __init__(self, c: int) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(c, 1, 1))

        def forward(self, x):
            return x * self.gamma

    model = models.create_model("reduce20", expansion=0)
    model.layer1[0].conv2.bn = nn.Sequential(model.layer1[0].conv2.bn, Scale(16))

    def fail(self, interactive=False):
        raise RuntimeError("unsupported operation\nwith a long trace")

    monkeypatch.setattr(tp.pruner.BasePruner, "step", fail)
    with pytest.raises(TrimError) as e:
        trim(model, 2.0)
    msg = one_line(e)
    assert "layer1.0.conv2.bn.1 (Scale)" in msg and "unsupported operation" in msg


def test_without_torch_pruning_only_a_trim_fails_and_says_what_to_install(monkeypatch):
    """Torch-Pruning is imported where a trim needs it: no module imports it when it is imported (the GPU machines
    lack it), and a trim without it is one line naming the package."""
    class Imports(ast.NodeVisitor):  # what a module imports when it is imported: not inside functions
        def __init__(self) -> None:
            self.names: set[str] = set()

        def visit_Import(self, node: ast.Import) -> None:
            self.names.update(a.name for a in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            self.names.add(node.module or "")

        def visit_FunctionDef(self, node) -> None:
            pass

        visit_AsyncFunctionDef = visit_FunctionDef

    eager = []
    for path in sorted(p for pkg in ("models", "reparam", "train") for p in (ROOT / pkg).rglob("*.py")):
        visitor = Imports()
        visitor.visit(ast.parse(path.read_text()))
        eager += [str(path.relative_to(ROOT)) for name in visitor.names if name.split(".")[0] == "torch_pruning"]
    assert eager == []
    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # what `import torch_pruning` meets where it is absent
    with pytest.raises(TrimError) as e:
        trim(models.create_model("reduce20", expansion=0), 2.0)
    assert one_line(e) == "trimming needs Torch-Pruning, which is not installed: pip install torch-pruning"


@needs_data
def test_baseline_fine_tunes_the_same_trimmed_network_with_cross_entropy_only(tmp_path):
    from train import stage1

    args = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stage1.main(["-m", "reduce20", "--expansion", "0", "--epochs", "1", *args, "--out", str(tmp_path / "t")])
        summary = trim_cli.main(["--teacher", str(tmp_path / "t"), "--reduce", "2", "--epochs", "1", "--baseline",
                                 "--calibrate-batches", "1", *args, "--out", str(tmp_path / "trim")])
    said = out.getvalue()
    base = summary["baseline"]
    main_record = json.loads((tmp_path / "trim" / "last.json").read_text())
    base_record = json.loads((tmp_path / "trim-baseline" / "last.json").read_text())
    assert base_record["config"] == main_record["config"]  # the same network ...
    trims = [r["metadata"]["trim"] for r in (main_record, base_record)]
    assert trims[0]["test_acc_before_finetune"] == trims[1]["test_acc_before_finetune"]  # ... with the same weights
    assert base["model"]["structure"] and json.loads((tmp_path / "trim-baseline" / "args.json").read_text())[
        "spec"]["loss"]["kd"] == "none"
    assert "trimmed, before fine-tuning" in said and "with cross-entropy only, after 1 epoch each" in said
    assert (tmp_path / "trim" / "baseline.png").read_bytes()[:4] == b"\x89PNG"  # both curves, in the trim's folder


def test_baseline_whose_folder_holds_another_run_is_refused_before_the_trim_trains(tmp_path, capsys):
    teacher = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "t")
    (tmp_path / "trim-baseline").mkdir()
    (tmp_path / "trim-baseline" / "args.json").write_text("{}")
    (tmp_path / "trim-baseline" / "last.safetensors").write_bytes(b"")
    for extra, words in (([], "trim-baseline"), (["--kd", "none"], "cross-entropy only")):
        with pytest.raises(SystemExit):
            trim_cli.main(["--teacher", str(teacher), "--reduce", "2", "--baseline", "--data-dir", str(CIFAR10),
                           "--subset", "64", "--batch-size", "32", "--epochs", "1", "--calibrate-batches", "1",
                           "--no-export", *extra, "--out", str(tmp_path / "trim")])
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "trim").exists()
    assert sorted(f.name for f in (tmp_path / "trim-baseline").iterdir()) == ["args.json", "last.safetensors"]


SEARCH_UNDER_TORCHRUN = '''
import json, sys
import torch.distributed
import train.pipeline as pipeline
from models import complexity, create_model
from models.errors import ReduceNetError
from train.engine import init_distributed
from train.spec import Trim

info, device = init_distributed("cpu")
reach = sys.argv[1] == "reach"
def measured(model, size, device):  # each process its own "latency", as two processes measure differently
    if not reach:
        return 1.0  # no ratio changes it: the search fails on rank 0
    macs = complexity(model, size)["macs"]
    return macs if info.rank == 0 else macs ** 0.5
pipeline.latency = measured
source = create_model("reduce20", expansion=0)
try:
    student, record = pipeline._search_trim(source, Trim("t", 2.0, by="latency"), (1, 3, 32, 32), device, info,
                                            print if info.is_main else (lambda line: None))
    print("config", json.dumps({"rank": info.rank, "config": student.config, "record": record}), flush=True)
except ReduceNetError as e:
    print(f"error: rank {info.rank}: {e}", flush=True)
torch.distributed.destroy_process_group()  # as train.assemble's finish() and cli_errors do
'''


@pytest.mark.parametrize("reach", ["reach", "fail"])
def test_under_torchrun_rank_0_searches_the_trim_and_every_rank_trains_its_network(reach, tmp_path):
    """Latency differs between processes: were each to search, they would train different networks (DDP then
    fails or mixes them). Rank 0 searches and the others prune at its ratio; its failure stops them all, no hang."""
    script = tmp_path / "search.py"
    script.write_text(SEARCH_UNDER_TORCHRUN)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(script), reach]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if reach == "fail":  # (the two processes' lines may interleave)
        assert "error: rank 0: pruning removes at most" in proc.stdout, proc.stdout
        assert "error: rank 1: rank 0 found no trimmed network" in proc.stdout, proc.stdout
        return
    lines = [line for line in proc.stdout.splitlines() if line.startswith("config ")]
    assert len(lines) == 2, proc.stdout
    got = sorted((json.loads(line[len("config "):]) for line in lines), key=lambda r: r["rank"])
    assert got[0]["config"] == got[1]["config"] and got[0]["record"] == got[1]["record"], got
    assert got[0]["config"].get("structure"), got[0]  # trimmed
