"""Tests of the training stages (train/stage1.py, train/stage2.py over train/engine.py) on real CIFAR images.

Everything trains reduce20 for a few epochs on a few hundred images of the exact CIFAR-10 subset in the shared
data folder, so the whole file runs in a few minutes on two CPU cores. The runs go through the CLIs' ``main``
in-process (it returns the summary; a user error exits with code 2 and one ``error: ...`` line on stderr),
except where a separate process is the point: SIGKILL and resume, and torchrun.
"""
from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import math
import os
import pickle
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import models.checkpoint
import train.data
from models import load_checkpoint
from models.layers import LambdaReLU, LoRABranch
from train import stage1, stage2
from train.data import build_data
from train.distill import DistillLoss
from train.engine import init_distributed
from models.errors import ReduceNetError
from _shared import CIFAR10, CIFAR100, ROOT, free_port, subprocess_env, training_stopped_at
from train.tasks import Classify


pytestmark = pytest.mark.e2e  # every test here trains or runs a CLI on data
if not (CIFAR10 / "cifar-10-batches-py").is_dir():
    pytest.skip(f"{CIFAR10} is absent (set REDUCENET_SHARED_DATA to the shared data folder)", allow_module_level=True)

LABEL = "CIFAR-10 (exact subset, 5438 train / 1017 test)"
METRIC_COLUMNS = ["epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc", "images_per_s",
                  "epoch_s"]
SUBSET, BATCH = 320, 32  # 10 steps per epoch; 60 test images
# The teacher: 3 epochs at lr 0.05. Its training loss fell in every epoch for seeds 0, 1 and 2
# (2.43 -> 2.11, 2.41 -> 2.13, 2.43 -> 2.20), so "last epoch < first epoch" is a robust criterion.
TEACHER_ARGS = ["-m", "reduce20", "--data-dir", str(CIFAR10), "--subset", str(SUBSET), "--batch-size", str(BATCH),
                "--epochs", "3", "--lr", "0.05", "--seed", "0", "--device", "cpu"]
# Tiny runs for the failure tests: 2 steps per epoch.
TINY_ARGS = ["-m", "reduce20", "--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--epochs", "2",
             "--device", "cpu"]


# ----------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module", autouse=True)
def _isolated(tmp_path_factory):
    """Caches under a temporary folder, and no $REDUCENET_DATA from the caller's shell."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("REDUCENET_CACHE", str(tmp_path_factory.mktemp("cache")))
        mp.delenv("REDUCENET_DATA", raising=False)
        yield


@pytest.fixture
def offline(monkeypatch):
    """torchvision's download fails at once, as it does on a machine without internet."""
    monkeypatch.setattr(train.data, "_download", lambda name, root: "URLError: offline (test)")


def run_main(main, argv: list[str]) -> tuple[dict, str]:
    """Runs a CLI ``main`` in-process; returns its summary and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        summary = main(argv)
    return summary, out.getvalue()


def expect_error(capsys, main, argv: list[str], code: int = 2) -> str:
    """Runs ``main`` expecting a user error: exit ``code``, exactly one ``error: ...`` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    err = capsys.readouterr().err
    assert excinfo.value.code == code, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not one line: {err!r}"
    if code == 2:
        assert err.startswith("error: "), err
    return err.strip()


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden_files(folder: Path) -> list[str]:
    """Temporary files of the atomic writes start with a dot."""
    return [p.relative_to(folder).as_posix() for p in folder.rglob(".*")]


def metrics(run: Path, extra: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """metrics.csv's rows; its columns are the engine's, then what the task and schedules log (``extra``)."""
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == [*METRIC_COLUMNS, *extra]
        return list(reader)


def tensors_equal(a: Path, b: Path) -> None:
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    different = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def lambdas(state: dict[str, torch.Tensor]) -> list[float]:
    return [float(v) for k, v in state.items() if k.endswith(".lam")]


# ----------------------------------------------------------------------------------------------- shared runs


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """One small stage-1 teacher run; also the uninterrupted reference of the SIGKILL test."""
    out = tmp_path_factory.mktemp("teacher") / "run"
    threads = torch.get_num_threads()
    summary, stdout = run_main(stage1.main, [*TEACHER_ARGS, "--out", str(out)])
    return {"dir": out, "summary": summary, "stdout": stdout, "threads": threads}


def student_args(teacher_dir: Path, out: Path) -> list[str]:
    # No --data-dir: stage2 takes the teacher's. --lambda-epochs 2 of 2: lambda is 0.5 after epoch 1, 1 at the end.
    return ["--inherit", str(teacher_dir), "--lora-rank", "4", "--lambda-epochs", "2", "--subset", str(SUBSET),
            "--batch-size", str(BATCH), "--epochs", "2", "--seed", "0", "--device", "cpu", "--out", str(out)]


@pytest.fixture(scope="module")
def student(teacher, tmp_path_factory):
    """Stage 2 from the teacher with LoRA and the lambda anneal, fused and exported."""
    out = tmp_path_factory.mktemp("student") / "run"
    summary, stdout = run_main(stage2.main, student_args(teacher["dir"], out))
    return {"dir": out, "summary": summary, "stdout": stdout}


# ----------------------------------------------------------------------------------------------- 1. end to end


def check_run_files(run: Path, epochs: int, summary: dict, extra: tuple[str, ...] = ()) -> list[dict[str, str]]:
    for name in ("args.json", "last.safetensors", "last.json", "best.safetensors", "best.json", "train_state.pt",
                 "metrics.csv", "summary.json"):
        assert (run / name).is_file(), f"{name} missing in {run}"
    assert list((run / "tb").glob("events.out.tfevents.*")), "no TensorBoard events file"
    assert not hidden_files(run)
    rows = metrics(run, extra)
    assert [int(r["epoch"]) for r in rows] == list(range(1, epochs + 1))
    written = json.loads((run / "summary.json").read_text())
    for key in ("best_test_acc", "best_epoch", "last_test_acc", "last_epoch", "params", "macs", "images_per_s",
                "wall_s_this_call", "train_s_total", "data", "train_images", "test_images", "world_size"):
        assert key in written, key
    assert written["last_test_acc"] == pytest.approx(float(rows[-1]["test_acc"]))
    assert written["best_test_acc"] == pytest.approx(max(float(r["test_acc"]) for r in rows))
    assert written["last_epoch"] == epochs and 1 <= written["best_epoch"] <= epochs
    assert written["params"] > 0 and written["macs"] > written["params"]
    assert written["images_per_s"] > 0 and written["wall_s_this_call"] > 0 and written["train_s_total"] > 0
    assert written["data"] == LABEL
    for key in ("best_test_acc", "last_test_acc", "params", "macs", "train_images"):
        assert written[key] == summary[key], key
    state = torch.load(run / "train_state.pt", weights_only=True)
    assert state["epoch"] == epochs and len(state["history"]) == epochs
    return rows


def test_end_to_end_stage1_stage2_fuse(teacher, student):
    # Stage 1: the loss falls, every file is there, the checkpoints load.
    rows = check_run_files(teacher["dir"], 3, teacher["summary"])
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], f"training loss did not fall: {losses}"
    assert all(math.isfinite(x) for x in losses)
    t = load_checkpoint(teacher["dir"])
    assert t.config["model"] == "reduce20" and t.config["expansion"] == 1 and t.num_classes == 10
    assert t.checkpoint_metadata["data"] == LABEL

    # Stage 2: LoRA + lambda anneal, then fusion and export.
    run, summary = student["dir"], student["summary"]
    srows = check_run_files(run, 2, summary, extra=("lambda",))
    assert [float(r["lambda"]) for r in srows] == [0.5, 1.0]
    assert summary["model"]["expansion"] == 0 and summary["model"]["lora_rank"] == 4
    check = summary["fused_check"]
    assert check["count"] == 60 and check["max_abs_diff"] < 1e-3
    assert abs(summary["fused_test_acc"] - summary["unfused_test_acc"]) <= 100 * check["flips"] / check["count"]
    assert summary["teacher_test_acc"] == pytest.approx(teacher["summary"]["last_test_acc"])
    for name in ("model.safetensors", "model.json", "model.ts", "model.onnx", "model.pt2"):
        assert (run / "deploy" / name).is_file(), name
    assert not hidden_files(run / "deploy")
    assert json.loads((run / "summary.json").read_text())["fused_test_acc"] == summary["fused_test_acc"]

    # Every LambdaReLU reached exactly 1 (the LoRA branches are linear, so fusable).
    state = load_file(str(run / "last.safetensors"))
    lams = lambdas(state)
    assert lams and all(lam == 1.0 for lam in lams), lams
    assert any(k.endswith("down.weight") for k in state), "no LoRA branch in the student"

    # The deploy model: inference form, and it scores what the summary says on the same test images.
    deploy = load_checkpoint(run / "deploy" / "model.safetensors").eval()
    assert deploy.config.get("inference_mode") is True
    kinds = (nn.modules.batchnorm._BatchNorm, LoRABranch, LambdaReLU)
    assert not [n for n, m in deploy.named_modules() if isinstance(m, kinds)]
    assert sum(p.numel() for p in deploy.parameters()) == summary["sizes"]["fused"]["params"]
    data = build_data("cifar10", CIFAR10, BATCH, subset=SUBSET, seed=0)
    correct, seen, batches = 0, 0, []
    with torch.no_grad():
        for x, y in data.test:
            correct += (deploy(x).argmax(1) == y).sum().item()
            seen += len(y)
            batches.append(x)
    assert seen == summary["test_images"] == 60
    assert 100.0 * correct / seen == pytest.approx(summary["fused_test_acc"], abs=0.01)

    # TorchScript and ONNX give the deploy model's logits on real images.
    x = batches[0]
    with torch.no_grad():
        ref = deploy(x)
        ts = torch.jit.load(str(run / "deploy" / "model.ts"))(x)
    assert (ts - ref).abs().max().item() < 1e-4
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(str(run / "deploy" / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_out = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
    assert (onnx_out - ref).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------------------------- 2. SIGKILL and resume


def test_resume_after_sigkill_matches_uninterrupted_run(teacher, tmp_path):
    """Kill stage 1 in epoch 2 of 3, resume it: same metrics and weights as the uninterrupted teacher run.

    Equality is exact (the same thread count is used): each epoch's order and augmentation depend on
    (seed, epoch) only and the model, optimizer, scheduler and RNG states are restored from train_state.pt.
    """
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "train.stage1", *TEACHER_ARGS, "--out", str(run)]
    env = subprocess_env(teacher["threads"])
    with open(tmp_path / "log1.txt", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            rows: list[dict[str, str]] = []
            while proc.poll() is None and time.monotonic() < deadline:
                if (run / "metrics.csv").is_file():
                    rows = metrics(run)
                    if rows:
                        break
                time.sleep(0.02)
            # Epoch 1 is saved: wait a quarter of an epoch (at most 0.5 s, about a fifth of an epoch on two
            # idle cores), so that the kill lands inside epoch 2.
            finished = proc.poll()
            assert rows or finished is not None, "stage1 saved no epoch within 240 s"
            time.sleep(min(0.5, 0.25 * float(rows[0]["epoch_s"])) if rows else 0)
            finished = proc.poll()
            assert finished is None, (f"stage1 exited ({finished}) before it could be killed mid-run: "
                                      + (tmp_path / "log1.txt").read_text()[-2000:])
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    saved = len(metrics(run))
    assert saved in (1, 2), f"expected a kill in epoch 2 (or 3 on a very fast machine), but {saved} epochs were saved"
    assert not (run / "summary.json").exists()
    assert not hidden_files(run)
    assert torch.load(run / "train_state.pt", weights_only=True)["epoch"] == saved

    resumed = subprocess.run([*cmd, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"epoch   {saved + 1}/3" in resumed.stdout and "epoch   1/3" not in resumed.stdout  # no restart

    ref = teacher["dir"]
    got, want = metrics(run), metrics(ref)
    assert len(got) == 3
    for g, w in zip(got, want):
        for key in ("epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert g[key] == w[key], (g["epoch"], key, g[key], w[key])  # exact: the same decimal repr
    tensors_equal(run / "last.safetensors", ref / "last.safetensors")
    tensors_equal(run / "best.safetensors", ref / "best.safetensors")
    s_got, s_want = json.loads((run / "summary.json").read_text()), teacher["summary"]
    for key in ("best_test_acc", "best_epoch", "last_test_acc", "train_images", "test_images", "params", "macs"):
        assert s_got[key] == s_want[key], key


def test_a_kill_between_the_state_and_the_metrics_of_the_last_epoch_resumes_to_every_row(teacher, tmp_path):
    """train_state.pt is written before metrics.csv: killed between the two at the last epoch, the run has no epoch
    left; its resume still writes the last row (and its TensorBoard scalars)."""
    run = tmp_path / "run"
    shutil.copytree(teacher["dir"], run)
    (run / "summary.json").unlink()
    rows = (run / "metrics.csv").read_text().splitlines(keepends=True)
    (run / "metrics.csv").write_text("".join(rows[:-1]))
    run_main(stage1.main, [*TEACHER_ARGS, "--out", str(run), "--resume"])
    assert metrics(run) == metrics(teacher["dir"]) and len(metrics(run)) == 3


# ----------------------------------------------------------------------------------------------- 3. stage-2 resume


def test_stage2_resume_restores_lambda_and_optimizer(teacher, student, tmp_path, monkeypatch, capsys):
    """Interrupt stage 2 at the first step of epoch 2, resume: the same run as the uninterrupted student."""
    out = tmp_path / "s2"
    args = student_args(teacher["dir"], out)
    original = DistillLoss.forward
    calls = {"n": 0}

    def interrupted(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == SUBSET // BATCH + 1:
            raise KeyboardInterrupt
        return original(self, *a, **kw)

    monkeypatch.setattr(DistillLoss, "forward", interrupted)
    assert expect_error(capsys, stage2.main, args, code=130) == "interrupted"
    monkeypatch.setattr(DistillLoss, "forward", original)

    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1
    lams = lambdas(state["task"])
    assert lams and all(lam == 0.5 for lam in lams), lams  # mid-anneal lambda is part of the state
    momenta = [s["momentum_buffer"] for s in state["optimizer"]["state"].values()]
    assert momenta and any(m.abs().sum() > 0 for m in momenta)
    assert not (out / "deploy").exists()

    summary, _ = run_main(stage2.main, [*args, "--resume"])
    got, want = metrics(out, ("lambda",)), metrics(student["dir"], ("lambda",))
    for g, w in zip(got, want, strict=True):
        for key in ("epoch", "lr", "lambda", "train_loss", "train_acc", "test_loss", "test_acc"):
            assert g[key] == w[key], (g["epoch"], key, g[key], w[key])
    # Without the restored momentum (or lambda, or schedule) the weights would differ.
    tensors_equal(out / "last.safetensors", student["dir"] / "last.safetensors")
    assert summary["fused_test_acc"] == student["summary"]["fused_test_acc"]
    assert (out / "deploy" / "model.onnx").is_file()


# ----------------------------------------------------------------------------------------------- 4. DDP


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    subset = 128  # 64 per rank: 2 steps of 32
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "train.stage1", "-m", "reduce20", "--data-dir", str(CIFAR10),
           "--subset", str(subset), "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=subprocess_env(1), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("epoch   1/1") == 1, proc.stdout  # only rank 0 logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["train_images"] == subset  # both ranks' shards together
    assert len(metrics(out)) == 1
    model = load_checkpoint(out)
    assert model.config["model"] == "reduce20"
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    assert not hidden_files(out)
    # one process cannot resume a two-process run: its batches and schedule would differ
    single = [a for a in cmd[cmd.index("train.stage1") + 1:]]
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
        stage1.main([*single, "--resume"])
    assert "1 processes (run: 2)" in err.getvalue(), err.getvalue()


def test_sync_bn_on_cpu_is_refused_with_the_reason(tmp_path, capsys):
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--sync-bn", "--out", str(tmp_path / "run")])
    assert "GPU" in line and "own batch" in line
    assert not (tmp_path / "run").exists()


def test_a_float16_teacher_checkpoint_trains_in_float32(teacher, tmp_path):
    half = load_checkpoint(teacher["dir"]).half()
    models.checkpoint.save_checkpoint(half, tmp_path / "half", half.checkpoint_metadata)
    summary, _ = run_main(stage2.main, ["--inherit", str(tmp_path / "half.safetensors"), "--subset", "64",
                                        "--batch-size", "32", "--epochs", "1", "--device", "cpu", "--no-export",
                                        "--out", str(tmp_path / "s")])
    assert summary["last_epoch"] == 1 and math.isfinite(summary["last_test_acc"])
    assert load_file(str(tmp_path / "s" / "last.safetensors"))["fc.weight"].dtype == torch.float32


def test_a_teacher_shown_images_of_another_size_is_said_to_be(teacher, tmp_path, capsys):
    """The 32 px teacher distils at --image-size 40: allowed, and said once, as its accuracy is then at 40 px."""
    argv = ["--inherit", str(teacher["dir"]), "--subset", "64", "--batch-size", "32", "--epochs", "1", "--device",
            "cpu", "--no-export"]
    capsys.readouterr()
    run_main(stage2.main, [*argv, "--image-size", "40", "--out", str(tmp_path / "s40")])
    err = capsys.readouterr().err
    assert err.count("warning: the teacher was trained at 32 px and sees 40 px images here") == 1, err
    run_main(stage2.main, [*argv, "--out", str(tmp_path / "s32")])
    assert "warning" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------- 5. bad input


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("case, dataset", [
    ("missing", "cifar10"), ("missing", "imagefolder"), ("empty", "cifar10"), ("empty", "imagefolder"),
    ("zip-without-tree", "imagefolder"), ("not-a-zip", "imagefolder"),
])
def test_stage1_bad_data_dir(case, dataset, tmp_path, capsys, offline):
    """Bad data fails before anything is written: no run directory, and the data folder is left as it was."""
    data = tmp_path / "data"
    if case == "empty":
        data.mkdir()
    elif case == "zip-without-tree":
        data = make_zip(tmp_path / "data.zip", {"readme.txt": b"hello", "images/a.png": b"x"})
    elif case == "not-a-zip":
        data = tmp_path / "data.zip"
        data.write_bytes(b"this is not a zip file")
    before = snapshot(tmp_path)
    out = tmp_path / "out"
    line = expect_error(capsys, stage1.main, ["-m", "reduce20", "--dataset", dataset, "--data-dir", str(data),
                                              "--epochs", "1", "--device", "cpu", "--out", str(out)])
    assert str(data) in line or data.name in line, line
    assert not out.exists(), "a failed run left a run directory behind (a rerun would then be refused)"
    assert snapshot(tmp_path) == before


def test_stage1_bad_data_then_rerun_succeeds(tmp_path, capsys, offline):
    """After a data error, the same command with the right --data-dir runs (no leftover blocks --out)."""
    out = tmp_path / "out"
    args = [*TINY_ARGS[:2], *TINY_ARGS[4:], "--epochs", "1", "--out", str(out)]
    expect_error(capsys, stage1.main, [*args, "--data-dir", str(tmp_path / "nowhere")])
    summary, _ = run_main(stage1.main, [*args, "--data-dir", str(CIFAR10)])
    assert summary["last_epoch"] == 1


def test_stage2_class_count_mismatch(teacher, tmp_path, capsys):
    if not (CIFAR100 / "cifar-100-python").is_dir():
        pytest.skip(f"{CIFAR100} is absent")
    out = tmp_path / "out"
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "--dataset", "cifar100",
                                              "--data-dir", str(CIFAR100), "--epochs", "1", "--device", "cpu",
                                              "--out", str(out)])
    assert "10 classes" in line and "100" in line, line
    assert not out.exists()


def test_stage2_refuses_bad_inherit(teacher, student, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--epochs", "1", "--subset", "64", "--batch-size", "32", "--device", "cpu", "--out", str(out)]
    line = expect_error(capsys, stage2.main, ["--inherit", str(tmp_path / "missing.safetensors"), *common])
    assert "missing.safetensors" in line
    line = expect_error(capsys, stage2.main, ["--inherit", str(tmp_path), *common])  # a folder with no run
    assert "no checkpoint" in line
    line = expect_error(capsys, stage2.main, ["--inherit", str(student["dir"]), *common])  # a student
    assert "student" in line and "expansion=0" in line, line
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "-m", "reduce56", *common])
    assert "reduce20" in line and "reduce56" in line, line
    assert not out.exists()


def test_stage2_refuses_a_scratch_student_from_stage1(tmp_path, capsys):
    scratch = tmp_path / "scratch"
    summary, _ = run_main(stage1.main, [*TINY_ARGS, "--epochs", "1", "--expansion", "0", "--out", str(scratch)])
    assert summary["model"]["expansion"] == 0
    line = expect_error(capsys, stage2.main, ["--inherit", str(scratch / "last.json"), "--epochs", "1",
                                              "--out", str(tmp_path / "out")])
    assert "student" in line
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_and_left_unchanged(teacher, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(teacher["dir"], old)
    before = snapshot(old)
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(old)])
    assert "--resume" in line and "--overwrite" in line
    assert snapshot(old) == before
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "--subset", "64", "--batch-size",
                                              "32", "--epochs", "1", "--device", "cpu", "--out", str(old)])
    assert "already holds a run" in line
    assert snapshot(old) == before
    # A folder with any file in it counts too.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(other)])
    assert snapshot(other) == {"notes.txt": b"mine"}
    # --resume of a folder without train_state.pt is refused as well.
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(other), "--resume"])
    assert "not a run to resume" in line
    assert snapshot(other) == {"notes.txt": b"mine"}


@pytest.mark.parametrize("extra, words", [
    (["--lambda-epochs", "1"], "--lora-rank"),
    (["--lora-rank", "2", "--lambda-epochs", "3"], "--epochs 2"),
    (["--lora-rank", "2", "--lambda-epochs", "-1"], "--lambda-epochs"),
    (["--lora-targets", "layer1*"], "--lora-targets chooses the convs that get LoRA branches: pass --lora-rank"),
    (["--lora-rank", "2", "--lora-targets", "nothing*"], "--lora-targets ['nothing*'] match no conv of this model"),
    (["--kd", "kd", "--kd-beta", "3"], "--kd-beta weighs DKD's non-target term: it applies to --kd dkd, not --kd kd"),
    (["--kd", "dkd", "--ce-weight", "0.3"], "--ce-weight weighs the cross-entropy beside --kd kd or mse, not --kd dkd"),
    (["--kd", "kd", "--kd-warmup", "5"], "--kd-warmup ramps DKD's loss in: it applies to --kd dkd, not --kd kd"),
    (["--kd", "dkd", "--kd-warmup", "-1"], "--kd-warmup -1"),
    (["--feature-kd", "at", "--feature-weight", "nan"], "--feature-weight nan is not valid: pass a finite number"),
    (["--kd-alpha", "inf", "--ce-weight", "1"], "--kd-alpha inf is not valid: pass a finite number"),
    (["--resume", "--overwrite"], "--resume continues the run in --out and --overwrite replaces it: pass one"),
    (["--feature-kd", "at", "--feature-layers", "fc", "--teacher-layers", "fc"],
     "--feature-layers (the student's layers): feature layer 'fc' of ReduceNet outputs shape (1, 10)"),
    (["--feature-kd", "at", "--teacher-layers", "layer1", "layer2", "layer9"],
     "--teacher-layers (the teacher's layers): feature layer 'layer9' is not a module of ReduceNet"),
])
def test_stage2_option_validation(teacher, extra, words, tmp_path, capsys):
    """Options that do nothing for the others given (they were dropped without a word) or that are not finite
    numbers (they failed at the first step, blaming other options) are refused before anything is read."""
    out = tmp_path / "out"
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "--epochs", "2", *extra,
                                              "--out", str(out)])
    assert words in line, line
    assert not out.exists()


def test_stage2_refuses_a_lora_rank_too_large_before_reading_data(teacher, tmp_path, capsys):
    """The inherited student is built from the teacher alone, so a rank its convs cannot take is refused before the
    data is looked at (a --data-dir that does not exist would otherwise be the first error)."""
    out = tmp_path / "out"
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "--lora-rank", "100000",
                                              "--data-dir", str(tmp_path / "nowhere"), "--out", str(out)])
    assert "100000 is larger than any targeted conv" in line, line
    assert not out.exists()


def test_nan_loss_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A NaN loss in epoch 2 stops the run with one line; epoch 1's files are kept byte for byte."""
    out = tmp_path / "run"
    original = Classify.forward
    calls, kept = {"n": 0}, {}

    def nan_at_epoch2_step2(self, x, y):
        calls["n"] += 1
        result = original(self, x, y)
        if calls["n"] == 4:  # 2 steps per epoch: epoch 2, step 2
            kept.update(snapshot(out))
            return {**result, "loss": result["loss"] * float("nan")}
        return result

    monkeypatch.setattr(Classify, "forward", nan_at_epoch2_step2)
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out)])
    assert "nan" in line and "epoch 2, step 2" in line and "(epoch 1)" in line, line
    assert kept, "the NaN was never returned"
    after = snapshot(out)
    for name in ("last.safetensors", "last.json", "best.safetensors", "train_state.pt", "metrics.csv"):
        assert after[name] == kept[name], name
    assert not hidden_files(out)
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and len(metrics(out)) == 1
    load_checkpoint(out)

    # ... and the run resumes from there.
    monkeypatch.setattr(Classify, "forward", original)
    summary, _ = run_main(stage1.main, [*TINY_ARGS, "--out", str(out), "--resume"])
    assert summary["last_epoch"] == 2 and len(metrics(out)) == 2


#: What makes the host wait for the device (a value read back, a copy to the host, a synchronize).
HOST_SYNCS = [(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")]


@contextlib.contextmanager
def syncs_per_step(monkeypatch):
    """Within the block, every training step's host-device synchronisations are counted: yields a list of
    ``(epoch, step, steps, calls)``, one per step, where ``calls`` names what was called between the start of that
    step and the start of the next (the last step of an epoch also holds the epoch's end)."""
    from train.callbacks import Callback
    from train.engine import Trainer

    windows: list[list] = []

    class Marker(Callback):
        def on_step(self, epoch, step, steps):
            windows.append([epoch, step, steps, []])

    def counted(owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if windows:
                windows[-1][3].append(name)
            return original(*args, **kwargs)
        return wrapper

    for owner, name in HOST_SYNCS:
        monkeypatch.setattr(owner, name, counted(owner, name))
    monkeypatch.setattr(torch.cuda, "synchronize", counted(torch.cuda, "synchronize"))
    init = Trainer.__init__

    def with_marker(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.callbacks.append(Marker())  # last: the schedules' own work of a step falls in that step

    monkeypatch.setattr(Trainer, "__init__", with_marker)
    yield windows


@pytest.mark.parametrize("stage, extra", [
    ("stage1", []),
    ("stage2", ["--feature-kd", "fitnet", "--lora-rank", "2", "--lambda-epochs", "1"]),
    ("stage2", ["--kd", "dkd", "--feature-kd", "semckd", "--feature-weight", "1", "--lora-rank", "2",
                "--lambda-epochs", "2", "--cuda-graph"]),
])
def test_no_host_device_sync_in_a_steady_state_step(teacher, stage, extra, tmp_path, monkeypatch):
    """Between the read-backs (every Trainer.sync_every steps and at the end of an epoch), a training step queues
    work and never waits for the device: no .item(), no bool(tensor), no copy to the host, no synchronize; also
    with the step captured whole (--cuda-graph: its eager steps, captures and replays, run eagerly on the CPU)."""
    from train.engine import Trainer

    from train.progress import Progress

    monkeypatch.setattr(Trainer, "sync_every", 4)
    # a plain progress line, due every few seconds, reads back too: on a loaded machine a step can take that long
    monkeypatch.setattr(Progress, "due", lambda self: False)
    args = (["-m", "reduce20", "--data-dir", str(CIFAR10)] if stage == "stage1" else
            ["--inherit", str(teacher["dir"])])
    args += ["--subset", "320", "--batch-size", "32", "--epochs", "2", "--device", "cpu", "--out", str(tmp_path / "r"),
             *extra]
    with syncs_per_step(monkeypatch) as windows:
        run_main(stage1.main if stage == "stage1" else stage2.main, args)
    assert [(e, s) for e, s, _, _ in windows] == [(e, s) for e in range(2) for s in range(10)]
    for epoch, step, steps, calls in windows:
        read_back = (step + 1) % Trainer.sync_every == 0 or step + 1 == steps
        if not read_back:
            assert calls == [], f"epoch {epoch + 1}, step {step + 1} waited for the device: {calls}"
    # the read-backs themselves are one transfer each
    assert [calls for _, step, _, calls in windows if (step + 1) % 4 == 0][0] == ["tolist"]


def test_nan_loss_from_a_huge_lr(tmp_path, capsys):
    """--lr 1e30 really diverges within the first epoch; nothing is written, and the corrected command just runs."""
    out = tmp_path / "run"
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--lr", "1e30", "--out", str(out)])
    assert "epoch 1, step" in line and ("nan" in line or "inf" in line), line
    assert "nothing was written" in line and "lower --lr" in line, line
    assert not (out / "last.safetensors").exists() and not (out / "train_state.pt").exists()
    assert not (out / "args.json").exists() and not (out / "tb").exists()
    assert not hidden_files(out)
    summary, _ = run_main(stage1.main, [*TINY_ARGS, "--lr", "0.05", "--out", str(out)])  # no --overwrite needed
    assert summary["last_epoch"] == 2


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch, capsys):
    """A write that fails half-way (disk full) in epoch 2 leaves epoch 1's checkpoint intact and no temp file."""
    out = tmp_path / "run"
    original = models.checkpoint.save_file
    calls, kept = {"n": 0}, {}

    def disk_full(state, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1 wrote last (best is linked to it); this is epoch 2's last.safetensors
            kept.update(snapshot(out))
            with open(path, "wb") as f:
                f.write(b"\x00" * 1000)  # a partial file
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(state, path, metadata=metadata)

    monkeypatch.setattr(models.checkpoint, "save_file", disk_full)
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out)])
    assert "last.safetensors" in line and "No space left" in line, line
    assert kept, "the failing write was never reached"
    assert snapshot(out).get("last.safetensors") == kept["last.safetensors"]
    assert snapshot(out).get("best.safetensors") == kept["best.safetensors"]
    assert snapshot(out).get("train_state.pt") == kept["train_state.pt"]
    assert not hidden_files(out)
    assert torch.load(out / "train_state.pt", weights_only=True)["epoch"] == 1
    load_checkpoint(out)

    monkeypatch.setattr(models.checkpoint, "save_file", original)
    summary, _ = run_main(stage1.main, [*TINY_ARGS, "--out", str(out), "--resume"])
    assert summary["last_epoch"] == 2


# ----------------------------------------------------------------------------------------------- 5b. run directory


@pytest.mark.parametrize("main, bad", [
    ("stage1", ["--width", "3"]), ("stage1", ["-m", "reduce999"]), ("stage1", ["--lr", "-0.1"]),
    ("stage1", ["--epochs", "0"]), ("stage1", ["--device", "tpu9"]), ("stage1", ["--seed", str(2**40)]),
    ("stage1", ["--warmup-epochs", "nan"]), ("stage1", ["--wd", "-1"]),
    ("stage2", ["--kd-T", "0"]), ("stage2", ["--kd-T", "1e30"]), ("stage2", ["--lora-rank", "-1"]),
    ("stage2", ["--epochs", "-1"]), ("stage2", ["-m", "reduce32"]),
])
def test_a_typo_with_overwrite_loses_nothing(main, bad, teacher, tmp_path, capsys):
    """Every option is validated before the old run is touched; the folder stays exactly as it was."""
    old = tmp_path / "old"
    shutil.copytree(teacher["dir"], old)
    before = snapshot(old)
    argv = ([*TINY_ARGS] if main == "stage1" else
            ["--inherit", str(teacher["dir"]), "--subset", "64", "--batch-size", "32", "--epochs", "1"])
    line = expect_error(capsys, getattr(sys.modules[f"train.{main}"], "main"), [*argv, *bad, "--out", str(old),
                                                                                  "--overwrite"])
    assert bad[0] in line or "reduce999" in line or "reduce32" in line or "width" in line, line
    assert snapshot(old) == before


def test_one_run_directory_one_process(tmp_path, capsys):
    """A second run into a folder in use stops at once; once the first ends (or is killed) the folder is free."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "train.stage1", *TINY_ARGS, "--epochs", "3", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(1), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline and not (out / "train_state.pt").is_file():
            time.sleep(0.01)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGSTOP)  # a stopped job still runs (and holds its folder) until it is killed
        record = (out / "args.json").read_text()
        line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out), "--overwrite"])
        assert "in use by a running job" in line and f"pid {proc.pid}" in line, line
        line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--epochs", "3", "--out", str(out), "--resume"])
        assert "in use" in line
        line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--epochs", "3", "--out", str(out)])
        assert "in use" in line and "--resume" not in line, line  # was: "pass --resume", which then said "in use"
        assert (out / "args.json").read_text() == record  # the intruder replaced nothing
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the killed run's lock is gone with it
    (out / ".last.safetensors.stale.tmp").write_bytes(b"")  # what a kill inside a write leaves
    (out / ".deploy.export-abc123").mkdir()  # and a kill inside an export
    (out / ".deploy.export-abc123" / "model.onnx").write_bytes(b"partial")
    summary, _ = run_main(stage1.main, [*TINY_ARGS, "--epochs", "3", "--out", str(out), "--resume",
                                        "--device", "cpu"])
    assert summary["last_epoch"] == 3 and not hidden_files(out)


def test_resume_refuses_other_options_and_honours_a_new_lr(teacher, tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*TINY_ARGS, "--epochs", "3", "--lr", "0.05", "--out", str(out)]
    run_main(stage1.main, argv)
    record = json.loads((out / "args.json").read_text())
    assert shlex.split(record["command"]) == ["python", "-m", "train.stage1", *argv]  # runnable as written
    before = snapshot(out)
    for extra, named in ((["--epochs", "5"], "--epochs 5 (run: 3)"), (["--batch-size", "16"], "--batch-size 16"),
                         (["-m", "reduce32"], "--model reduce32 (run: reduce20)"), (["--seed", "1"], "--seed 1"),
                         (["--subset", "96"], "--subset 96")):
        line = expect_error(capsys, stage1.main, [*argv, *extra, "--resume"])
        assert named in line and "args.json" in line, line
        assert snapshot(out) == before
    line = expect_error(capsys, stage2.main, ["--inherit", str(teacher["dir"]), "--subset", "64", "--batch-size", "32",
                                              "--out", str(out), "--resume"])
    assert "(it is a run of python -m train.stage1: resume it with that command)" in line, line  # not 15 options
    assert snapshot(out) == before
    # a lower peak lr is honoured on resume and recorded: interrupt a fresh run after its first epoch
    with training_stopped_at(call=2):
        expect_error(capsys, stage1.main, [*argv, "--overwrite"], code=130)
    assert len(metrics(out)) == 1
    run_main(stage1.main, [*argv[:-4], "--lr", "0.01", "--out", str(out), "--resume"])
    rows = metrics(out)
    # 2 steps per epoch, 6 in all, cosine per step: after step 4 the factor is 0.25, now of the new peak
    assert len(rows) == 3 and float(rows[1]["lr"]) == pytest.approx(0.01 * 0.25)
    resumed = json.loads((out / "args.json").read_text())["resumed"]
    assert resumed[0]["changed"]["lr"] == [0.05, 0.01]
    # a run made by an older version, without an option this version has, resumes with today's value
    record = json.loads((out / "args.json").read_text())
    del record["args"]["loader"]
    (out / "args.json").write_text(json.dumps(record))
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["epoch"], state["history"] = 2, state["history"][:2]
    torch.save(state, out / "train_state.pt")
    run_main(stage1.main, [*argv[:-4], "--lr", "0.01", "--out", str(out), "--resume"])
    assert json.loads((out / "args.json").read_text())["resumed"][-1]["changed"]["loader"] == [None, "memory"]


def test_resume_refuses_other_data_and_a_retrained_teacher(teacher, tmp_path, capsys):
    """What a run reads while it trains must be the same when it resumes, or its epochs would mix two: other data
    at another --data-dir (here this CIFAR copy with every test label moved by one) and a teacher retrained in
    place are refused. An --out that holds the teacher is refused too, --overwrite or not."""
    from train.data.cifar import _batch

    run = tmp_path / "run"
    run_main(stage1.main, [*TINY_ARGS, "--epochs", "1", "--out", str(run)])
    other = tmp_path / "other" / "cifar-10-batches-py"
    other.mkdir(parents=True)
    for f in (CIFAR10 / "cifar-10-batches-py").iterdir():
        if f.name != "test_batch":
            (other / f.name).symlink_to(f)
    x, y = _batch(CIFAR10 / "cifar-10-batches-py" / "test_batch", "labels", 10)
    with open(other / "test_batch", "wb") as f:
        pickle.dump({"data": x, "labels": [int(v + 1) % 10 for v in y]}, f)
    before = snapshot(run)
    argv = [*TINY_ARGS, "--epochs", "1", "--out", str(run), "--resume"]
    line = expect_error(capsys, stage1.main, [*argv[:argv.index("--data-dir")], "--data-dir", str(other.parent),
                                              *argv[argv.index("--data-dir") + 2:]])
    assert "--data-dir" in line and "args.json" in line and snapshot(run) == before, line
    run_main(stage1.main, argv)  # its own data: accepted (the run is finished, nothing to train)

    teacher_dir = tmp_path / "teacher"
    shutil.copytree(teacher["dir"], teacher_dir)
    student = tmp_path / "student"

    def student_argv(out: Path, *extra: str) -> list[str]:
        return [*student_args(teacher_dir, out), "--epochs", "1", "--lambda-epochs", "1", "--no-export", *extra]

    run_main(stage2.main, student_argv(student))
    weights = teacher_dir / "last.safetensors"
    with safe_open(str(weights), "pt") as f:  # the teacher retrained: other weights, the same architecture
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, str(weights), metadata)
    before = snapshot(student)
    line = expect_error(capsys, stage2.main, student_argv(student, "--resume"))
    assert "the teacher" in line and "changed" in line and snapshot(student) == before, line
    retrained = tmp_path / "retrained"  # the retrained teacher at another path
    shutil.copytree(teacher_dir, retrained)
    line = expect_error(capsys, stage2.main, [*student_argv(student, "--resume"), "--inherit", str(retrained)])
    assert f"--inherit {retrained}" in line, line  # the option as the user wrote it (not the spec's field name)
    moved = tmp_path / "moved"  # the teacher the run started with, moved: the same run, and the move is recorded
    shutil.copytree(teacher["dir"], moved)
    run_main(stage2.main, [*student_argv(student, "--resume"), "--inherit", str(moved)])
    changed = json.loads((student / "args.json").read_text())["resumed"][-1]["changed"]
    assert changed["teacher"] == [str(weights), str(moved / "last.safetensors")], changed
    before = snapshot(teacher_dir)
    for extra in ([], ["--overwrite"]):
        line = expect_error(capsys, stage2.main, student_argv(teacher_dir, *extra))
        assert "holds the teacher" in line and snapshot(teacher_dir) == before, line


def test_a_relative_teacher_is_recorded_absolute_so_config_reruns_from_anywhere(teacher, tmp_path, monkeypatch):
    shutil.copytree(teacher["dir"], tmp_path / "teacher")
    monkeypatch.chdir(tmp_path)
    argv = [*student_args(Path("teacher"), Path("student")), "--epochs", "1", "--lambda-epochs", "1", "--no-export"]
    first, _ = run_main(stage2.main, argv)
    assert json.loads(Path("student/spec.json").read_text())["derive"]["teacher"] == str(tmp_path / "teacher")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    again, _ = run_main(stage2.main, ["--config", str(tmp_path / "student"), "--out", "again"])
    assert again["last_test_acc"] == first["last_test_acc"]


def test_a_relative_data_dir_is_recorded_absolute_so_config_reruns_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(CIFAR10.parent)
    argv = [*TINY_ARGS, "--epochs", "1", "--out", str(tmp_path / "run")]
    argv[argv.index("--data-dir") + 1] = CIFAR10.name
    first, _ = run_main(stage1.main, argv)
    assert json.loads((tmp_path / "run" / "spec.json").read_text())["data"]["data_dir"] == str(CIFAR10)
    monkeypatch.chdir(tmp_path)
    again, _ = run_main(stage1.main, ["--config", "run", "--out", "again"])
    assert again["last_test_acc"] == first["last_test_acc"]


def test_a_run_stopped_before_its_first_checkpoint_leaves_no_folder_or_lock(tmp_path, capsys):
    """Ctrl-C in the first epoch: the folders the run made and its lock file go (an --out the user made stays, as it
    was); after the first checkpoint, the run is kept for --resume."""
    out = tmp_path / "new" / "run"
    with training_stopped_at(call=1):
        expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out)], code=130)
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    with training_stopped_at(call=1):
        expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(mine)], code=130)
    assert mine.is_dir() and not any(mine.iterdir())
    with training_stopped_at(call=2):
        expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out)], code=130)
    assert (out / "train_state.pt").is_file() and (out / "run.lock").is_file()


def test_resume_without_a_run_says_what_to_do_instead(tmp_path):
    """--resume into a folder of no run: without --resume when it is empty (a lock file left by a run killed at
    once counts as nothing), --overwrite when a run began there, another --out when it holds the user's files."""
    from train.rundir import LOCK, RunDir, RunDirError

    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("")
    for made, fix in ((None, "start the run without --resume"), ("args.json", "--overwrite instead of --resume"),
                      ("notes.txt", "choose another --out")):
        if made:
            for p in run.iterdir():
                p.unlink()
            (run / made).write_text("{}")
        with pytest.raises(RunDirError) as e:
            RunDir(run, resume=True).open()
        assert fix in str(e.value) and "\n" not in str(e.value)


def test_resume_takes_a_teacher_spelled_another_way_as_the_same(tmp_path, monkeypatch):
    from train.rundir import RunDir, RunDirError

    monkeypatch.chdir(tmp_path)
    for name in ("teacher.safetensors", "other.safetensors"):
        (tmp_path / name).write_bytes(b"")
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(json.dumps({"args": {"teacher": "teacher.safetensors"}, "world_size": 1}))
    RunDir(run, resume=True, record={"args": {"teacher": str(tmp_path / "teacher.safetensors")}})._check_resume()
    with pytest.raises(RunDirError, match="--teacher"):
        RunDir(run, resume=True, record={"args": {"teacher": "other.safetensors"}})._check_resume()


# ----------------------------------------------------------------------------------------------- 6. subsets


def test_subset_is_class_balanced_and_labelled(teacher):
    summary = teacher["summary"]
    assert summary["train_images"] == SUBSET
    assert summary["test_images"] == round(SUBSET * 1017 / 5438) == 60
    assert summary["data"] == LABEL
    assert f"data: {LABEL}" in teacher["stdout"]
    data = build_data("cifar10", CIFAR10, BATCH, subset=SUBSET, seed=0)
    assert torch.bincount(data.train.labels, minlength=10).tolist() == [SUBSET // 10] * 10
    assert torch.bincount(data.test.labels, minlength=10).tolist() == [6] * 10
    # The loader really yields that subset: one epoch covers every image once.
    seen = torch.cat([y for _, y in data.train])
    assert torch.bincount(seen, minlength=10).tolist() == [SUBSET // 10] * 10


@pytest.mark.parametrize("n, seed", [(325, 0), (97, 3)])
def test_subset_with_a_remainder_is_as_balanced_as_possible(n, seed):
    data = build_data("cifar10", CIFAR10, 1, subset=n, seed=seed)
    counts = torch.bincount(data.train.labels, minlength=10)
    assert counts.sum().item() == n and counts.max() - counts.min() <= 1
    other = build_data("cifar10", CIFAR10, 1, subset=n, seed=seed)
    assert torch.equal(data.train.images, other.train.images)  # the draw is fixed by the seed


def test_out_that_is_a_file_and_a_damaged_train_state_are_one_line(tmp_path, capsys):
    target = tmp_path / "a-file"
    target.write_text("mine")
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(target)])
    assert "is a file" in line and target.read_text() == "mine"
    assert "--out is empty" in expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", ""])
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")  # it read as "cannot write to ... (File exists)"
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(tmp_path / "dangling")])
    assert f"is a link to {tmp_path / 'gone'}, which does not exist" in line, line
    with pytest.MonkeyPatch.context() as mp:  # --out=~/run: no shell expands a ~ after "="; the program does
        mp.setenv("HOME", str(tmp_path))
        run_main(stage1.main, [*TINY_ARGS, "--out=~/run"])
    run = tmp_path / "run"
    assert (run / "last.safetensors").is_file()
    (run / "train_state.pt").write_bytes(b"\x00not a torch file")
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(run), "--resume"])
    assert "train_state.pt is damaged" in line and "--overwrite" in line


def test_a_nan_teacher_is_named_as_the_cause(teacher, tmp_path, capsys):
    broken = load_checkpoint(teacher["dir"])
    with torch.no_grad():
        broken.fc.weight.fill_(float("nan"))
    models.checkpoint.save_checkpoint(broken, tmp_path / "nan-teacher", broken.checkpoint_metadata)
    line = expect_error(capsys, stage2.main, ["--teacher", str(tmp_path / "nan-teacher.safetensors"), "-m", "reduce20",
                                              *TINY_ARGS[2:], "--out", str(tmp_path / "s")])
    # named before any training, from its logits on the first test images
    assert "the teacher's logits reach nan" in line and "--lr" not in line, line
    assert not (tmp_path / "s").exists()


def test_a_moved_teacher_data_folder_is_refused_not_replaced(tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(CIFAR10, data)
    run_main(stage1.main, [*TINY_ARGS[:2], "--data-dir", str(data), *TINY_ARGS[4:], "--out", str(tmp_path / "t")])
    shutil.rmtree(data)
    line = expect_error(capsys, stage2.main, ["--inherit", str(tmp_path / "t"), "--epochs", "1",
                                              "--out", str(tmp_path / "s")])
    assert "no longer exists" in line and "--data-dir" in line


def test_the_recorded_commit_is_dirty_only_when_the_code_changed(tmp_path):
    from train.provenance import describe_checkout

    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    for path in ("train/x.py", "results/table.md", "README.md"):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text("1\n")
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "c"], check=True)
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    (tmp_path / "results" / "table.md").write_text("rewritten by a table\n")
    (tmp_path / "README.md").write_text("2\n")
    assert describe_checkout(tmp_path / "train") == commit  # a table or the README changes no run
    (tmp_path / "train" / "x.py").write_text("2\n")
    assert describe_checkout(tmp_path / "results") == commit + "+dirty"


def test_device_cuda_without_index_is_the_current_gpu(monkeypatch):
    """``--device cuda`` (and ``auto`` on a GPU machine) trains on the current GPU: ``torch.cuda.set_device`` gets
    an indexed device (torch 2.11 refuses a bare "cuda"; found on the first GPU run), and an index past the
    visible GPUs is one line naming the ones there are. The CUDA calls are stood in for, so this runs on CPU."""
    chosen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)

    def set_device(dev):
        assert isinstance(dev, torch.device) and dev.index is not None, dev
        chosen.append(dev)

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    for asked, expected in (("cuda", "cuda:1"), ("auto", "cuda:1"), ("cuda:0", "cuda:0")):
        _, dev = init_distributed(asked)
        assert dev == torch.device(expected) and chosen[-1] == dev
    with pytest.raises(ReduceNetError, match=r"only 2 GPU\(s\) are visible; use cuda:0 to cuda:1"):
        init_distributed("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ReduceNetError, match=r"^--device cuda:1 was asked for but no GPU is visible; use --device cpu"):
        init_distributed("cuda:1")


def test_sigterm_stops_a_run_as_ctrl_c_does(tmp_path, capsys, monkeypatch):
    """A scheduler's SIGTERM in the first epoch: 'terminated', exit 143, and the folders the run made are gone (it
    died at once, leaving them and their lock)."""
    from train.engine import Trainer

    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: os.kill(os.getpid(), signal.SIGTERM))
    out = tmp_path / "new" / "run"
    assert expect_error(capsys, stage1.main, [*TINY_ARGS, "--out", str(out)], code=143) == "terminated"
    assert not (tmp_path / "new").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI's handler lived only while it ran


def test_compile_without_a_compiler_is_one_line(tmp_path, capsys, monkeypatch):
    """torch.compile compiles at the first step: a machine without a C++ compiler failed there with inductor's
    traceback. Now one line says what to install or drop, and the new folders go."""
    import torch._inductor.exc
    from train.engine import Trainer

    def no_compiler(self, epoch):
        raise torch._inductor.exc.InvalidCxxCompiler()

    monkeypatch.setattr(Trainer, "train_epoch", no_compiler)
    out = tmp_path / "new" / "run"
    line = expect_error(capsys, stage1.main, [*TINY_ARGS, "--compile", "--out", str(out)])
    assert line.startswith("error: --compile failed to compile the step (InvalidCxxCompiler: No working C++ compiler")
    assert "drop --compile" in line and not (tmp_path / "new").exists()


def test_the_dkd_warm_up_is_an_option_that_reaches_the_loss():
    """DKD's warm-up was fixed at mdistiller's 20 epochs (made for 240): on a 10-epoch budget half the run trained
    at reduced weight. --kd-warmup sets it, 0 for none, and the spec records it."""
    from train.assemble import logit_loss

    spec, _ = stage2.parse(["--inherit", "t", "--kd", "dkd", "--kd-warmup", "3", "--out", "o"])
    assert spec.loss.kd_warmup == 3 and logit_loss(spec.with_recipe().loss).warmup_epochs == 3
    none, _ = stage2.parse(["--inherit", "t", "--kd", "dkd", "--kd-warmup", "0", "--out", "o"])
    assert logit_loss(none.with_recipe().loss).dkd_weight() == 1.0
    default, _ = stage2.parse(["--inherit", "t", "--kd", "dkd", "--out", "o"])
    assert logit_loss(default.with_recipe().loss).warmup_epochs == 20 and default.record()["loss"]["kd_warmup"] is None


def test_normalize_with_inherit_says_it_is_not_used(teacher, tmp_path, capsys):
    """An inherited student keeps its teacher's preprocessing: --normalize was dropped without a word."""
    capsys.readouterr()
    with pytest.raises(SystemExit):
        stage2.main(["--inherit", str(teacher["dir"]), "--normalize", "imagenet", "--data-dir", str(tmp_path / "no"),
                     "--out", str(tmp_path / "out")])
    assert ("note: --normalize imagenet is not used: an inherited student keeps its teacher's input normalization"
            in capsys.readouterr().out)
