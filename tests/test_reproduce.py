"""The three `python -m train.reproduce` tables, each run on a tiny subset (smoke budget)."""
from __future__ import annotations

import contextlib
import csv
import io

import pytest

from _shared import CIFAR10, CIFAR100
from train import reproduce

if not (CIFAR10 / "cifar-10-batches-py").is_dir():
    pytest.skip(f"{CIFAR10} is absent (set REDUCENET_SHARED_DATA to the shared data folder)", allow_module_level=True)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("REDUCENET_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("REDUCENET_DATA", raising=False)


def run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reproduce.main(argv)
    return out.getvalue()


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cifar10_reducenet_table_and_resume(tmp_path):
    argv = ["cifar10-reducenet", "--budget", "smoke", "--models", "reduce20", "--subset", "200",
            "--data-dir", str(CIFAR10), "--device", "cpu", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    first = run(argv)
    results = tmp_path / "results"
    rows = read_csv(results / "cifar10-reducenet.csv")
    names = [r["row"] for r in rows]
    assert names[0] == "teacher (stage1)" and names[1].startswith("student from scratch (2 ep)")
    assert any("LambdaReLU" in n for n in names) and names[-1].startswith("fused deploy model")
    scratch = next(r for r in rows if r["row"].startswith("student from scratch"))
    teacher = rows[0]
    assert int(scratch["epochs"]) == 2 * int(teacher["epochs"])  # same total epochs as stage1 + stage2
    fused, last_student = rows[-1], rows[-2]
    assert int(fused["params"]) < int(last_student["params"])  # LoRA and BN folded away
    summary = (tmp_path / "runs" / "cifar10-reducenet" / "reduce20-w1-kd-lora-lambda" / "summary.json").read_text()
    assert f'"fused_test_acc": {float(fused["last_acc"])}' in summary
    md = (results / "cifar10-reducenet.md").read_text()
    for needle in ("python -m train.reproduce cifar10-reducenet --budget smoke", "CIFAR-10 (exact subset",
                   "Hardware: CPU", "seed 0", "last", "Published numbers", "91.97"):
        assert needle in md, needle
    assert (results / "cifar10-reducenet.png").stat().st_size > 10_000
    assert first.count("[run]") == 5

    # a second call skips every finished row and rewrites the same table
    teacher_ckpt = tmp_path / "runs" / "cifar10-reducenet" / "reduce20-w1-teacher" / "last.safetensors"
    before = teacher_ckpt.stat().st_mtime_ns
    second = run(argv)
    assert second.count("[skip]") == 5 and "[run]" not in second
    assert teacher_ckpt.stat().st_mtime_ns == before
    assert [r["last_acc"] for r in read_csv(results / "cifar10-reducenet.csv")] == [r["last_acc"] for r in rows]


def test_cifar10_reducenet_resumes_an_interrupted_row(tmp_path):
    argv = ["cifar10-reducenet", "--budget", "smoke", "--models", "reduce20", "--subset", "200",
            "--data-dir", str(CIFAR10), "--device", "cpu", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    rows = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))

    def interrupted(argv):  # the table is stopped at its first stage2 row
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        for r in rows:
            if r.main is reproduce.stage2.main:
                r.main = interrupted
            reproduce.train_row(r, lambda m: None)
    runs = tmp_path / "runs" / "cifar10-reducenet"
    assert (runs / "reduce20-w1-teacher" / "done").is_file()
    assert not (runs / "reduce20-w1-kd" / "done").exists()
    # a half-finished row (train_state.pt but no done marker) is resumed, not restarted
    (runs / "reduce20-w1-scratch" / "done").unlink()
    log: list[str] = []
    summary = reproduce.train_row(rows[1], log.append)
    assert log[0].startswith("[resume] ") and "--resume" in log[0]
    assert summary["last_epoch"] == 2


@pytest.mark.skipif(not (CIFAR100 / "cifar-100-python").is_dir(), reason=f"{CIFAR100} is absent")
def test_cifar100_kd_table_on_the_exact_subset(tmp_path):
    run(["cifar100-kd", "--budget", "smoke", "--models", "reduce20", "--subset", "200", "--data-dir", str(CIFAR100),
         "--device", "cpu", "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
    rows = read_csv(tmp_path / "results" / "cifar100-kd.csv")
    assert [r["row"] for r in rows] == ["teacher reduce56 (scratch)", "student reduce20 scratch",
                                        "student reduce20 KD", "student reduce20 DKD"]
    assert {r["model"] for r in rows} == {"reduce56->reduce20"}
    assert int(rows[0]["params"]) > int(rows[1]["params"]) == int(rows[2]["params"]) == int(rows[3]["params"])
    md = (tmp_path / "results" / "cifar100-kd.md").read_text()
    assert "CIFAR-100 (exact subset" in md and "72.34" in md and "71.97" in md


def test_deploy_speed_table(tmp_path):
    run(["deploy-speed", "--models", "reduce20", "--repeats", "3", "--results", str(tmp_path)])
    rows = read_csv(tmp_path / "deploy-speed.csv")
    assert [r["form"] for r in rows] == ["teacher", "student + LoRA r8 (unfused)", "fused student",
                                         "plain (built directly)"]
    fused, plain = rows[2], rows[3]
    assert fused["params"] == plain["params"] and fused["macs"] == plain["macs"]
    ratio = float(fused["cpu_fused_over_plain"])
    assert ratio == pytest.approx(float(fused["cpu_latency_ms_b1"]) / float(plain["cpu_latency_ms_b1"]))
    assert all(float(r["cpu_img_per_s_b128"]) > 0 for r in rows)
