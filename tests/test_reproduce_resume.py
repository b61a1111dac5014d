"""What `python -m train.reproduce` makes of a table's run folders: finished, resumable, another spec's, damaged.

The run folders are faked (the files the runner reads: ``done``, ``args.json``, ``summary.json``, checkpoints,
``metrics.csv``), and the pipeline's ``run`` is replaced by a recorder, so these tests train nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from _shared import CIFAR10
from train import reproduce
from train.assemble import data_identity, load_data
from train.engine import Dist
from train.reproduce import runner
from train.rundir import mark_done
from train.spec import DataSpec, Fresh, Inherit, RunSpec

pytestmark = pytest.mark.usefixtures("isolated_cache")

if not (CIFAR10 / "cifar-10-batches-py").is_dir():
    pytest.skip(f"{CIFAR10} is absent (set REDUCENET_SHARED_DATA to the shared data folder)", allow_module_level=True)

SUMMARY = {"epochs": 2, "params": 1000, "macs": 2e6, "last_test_acc": 50.0, "best_test_acc": 55.0, "best_epoch": 1,
           "train_s_total": 2.0, "precision": "float32", "data": "d", "train_images": 200, "test_images": 37,
           "hardware": "h", "commits": ["c"]}


def row_of(run: Path, data_dir: Path | str = CIFAR10, teacher: str | None = None, **options) -> reproduce.Row:
    """A row of a table: a fresh reduce20 of 2 epochs on 200 images, or the student of ``teacher``."""
    derive = Inherit(teacher) if teacher else Fresh("reduce20")
    spec = RunSpec.of(derive, **{"epochs": 2, "dataset": "cifar10", "subset": 200, "device": "cpu",
                                 "data_dir": str(data_dir), "out": str(run), **options})
    return reproduce.Row(run.name, "g", spec)


def identity(data_dir: Path | str) -> dict:
    """The data identity a run on ``data_dir`` records (``inputs`` in args.json)."""
    data, _ = load_data(DataSpec(dataset="cifar10", data_dir=str(data_dir), subset=200, workers=0), 0, False,
                        Dist(), torch.device("cpu"))
    return data_identity(data)


def fake_run(row: reproduce.Row, epochs: int = 2, finished: bool = True, data: dict | None = None) -> Path:
    """A run of ``row`` that trained ``epochs`` epochs (``finished``: and was marked done), as the trainer leaves it."""
    run = row.run
    run.mkdir(parents=True, exist_ok=True)
    (run / "args.json").write_text(json.dumps({"asked": row.spec.record(),
                                               "inputs": {"data": data or identity(row.spec.data.data_dir)}}))
    (run / "spec.json").write_text("{}")
    for name in ("train_state.pt", "last.safetensors"):
        (run / name).write_bytes(b"")
    lines = "".join(f"{e},50,3\n" for e in range(1, epochs + 1))
    (run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n" + lines)
    if finished:
        (run / "summary.json").write_text(json.dumps(SUMMARY))
        mark_done(run, row.spec.record())
    return run


@pytest.fixture
def calls(monkeypatch):
    """The pipeline runs ``train_row`` starts (spec, resume, overwrite); each writes a finished run's files."""
    made = []

    def fake_run(spec, resume, overwrite):
        made.append((spec, resume, overwrite))
        for name in ("last.safetensors", "train_state.pt"):
            (Path(spec.out) / name).write_bytes(b"")
        (Path(spec.out) / "summary.json").write_text(json.dumps(SUMMARY))
        return dict(SUMMARY)

    monkeypatch.setattr(runner, "run", fake_run)
    return made


def table_args(**extra) -> argparse.Namespace:
    return argparse.Namespace(rows=None, plan=False, replace=False, jobs=1, argv=[], device="cpu", **extra)


def test_a_row_that_differs_only_in_what_resume_honours_resumes_or_stays_finished(tmp_path, calls):
    """Another --data-dir holding the same images, --compile, another device: `--resume` takes them, so the row
    resumes (or, finished, is finished); it was "made by another spec", and its epochs were thrown away."""
    copy = shutil.copytree(CIFAR10, tmp_path / "copy-of-the-data")
    asked = row_of(tmp_path / "runs" / "t" / "r")
    fake_run(asked, epochs=1, finished=False)
    for other in (row_of(asked.run, data_dir=copy), row_of(asked.run, compile=True),
                  row_of(asked.run, data_dir=copy, device="auto", channels_last=False, workers=0)):
        assert reproduce.row_state(other).startswith("resumes (1/2 epochs"), other.spec
        assert not runner.finished_otherwise(other)
    log: list[str] = []
    reproduce.train_row(row_of(asked.run, data_dir=copy), log.append)
    assert calls[-1][1:] == (True, False) and log[0].startswith("[resume] ")  # resumed, nothing overwritten
    # finished: the same row, whatever the device, speed options or the folder of the same images
    mark_done(asked.run, asked.spec.record())
    for other in (row_of(asked.run, data_dir=copy), row_of(asked.run, compile=True, compile_mode="max-autotune")):
        assert reproduce.finished(other) and reproduce.row_state(other) == "finished"
    # other images (another identity in args.json), or another option, are another spec's run
    fake_run(asked, data={**identity(CIFAR10), "labels": "another"})
    assert not reproduce.finished(row_of(asked.run, data_dir=copy)) and reproduce.finished(asked)
    assert runner.finished_otherwise(row_of(asked.run, data_dir=copy))
    assert runner.finished_otherwise(row_of(asked.run, epochs=3))
    (asked.run / "done").unlink()
    assert reproduce.row_state(row_of(asked.run, data_dir=copy)) == "made by another spec: will be replaced"


@pytest.mark.parametrize("damage", ["missing", "damaged"])
def test_a_finished_row_whose_summary_is_gone_resumes_to_write_it_in_the_plan_and_the_run(tmp_path, calls, damage):
    """The plan said "resumes", the run refused it as "finished with other options", and --replace resumed it."""
    row = row_of(tmp_path / "runs" / "t" / "r")
    fake_run(row)
    if damage == "missing":
        (row.run / "summary.json").unlink()
    else:
        (row.run / "summary.json").write_text('{"last_test_acc": ')
    assert not reproduce.finished(row) and not runner.finished_otherwise(row)
    assert reproduce.row_state(row) == "resumes (2/2 epochs) to write its missing or damaged summary.json"
    log: list[str] = []
    assert reproduce.tables._train_rows([row], table_args(), log.append) is True  # no refusal, no --replace
    assert calls == [(row.spec, True, False)] and log[0].startswith("[resume] ")
    assert reproduce.finished(row)


def test_a_summary_that_lacks_a_value_the_table_reports_is_one_line(tmp_path, capsys):
    """A hand-edited summary.json without `last_test_acc` stopped the table with a KeyError traceback."""
    argv = ["cifar10-reducenet", "--budget", "smoke", "--models", "reduce20", "--recipes", "ours", "--no-lora-rows",
            "--subset", "200", "--data-dir", str(CIFAR10), "--device", "cpu", "--runs", str(tmp_path / "runs"),
            "--results", str(tmp_path / "results")]
    rows = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))
    for row in rows:
        fake_run(row)
    edited = rows[0].run / "summary.json"
    edited.write_text(json.dumps({k: v for k, v in SUMMARY.items() if k != "last_test_acc"}))
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    assert f"{edited} has no 'last_test_acc'" in err and "restore the file, or delete it" in err


@pytest.mark.parametrize("relative", [False, True])
def test_a_table_moved_to_another_runs_folder_keeps_its_rows(tmp_path, calls, monkeypatch, relative):
    """`cp -a R R2; --runs /abs/R2`: every row was "finished with other options" (the done mark holds the absolute
    paths of the row and of its teacher row); splitting a table across machines moves it so."""
    monkeypatch.chdir(tmp_path)
    before, after = (Path("R"), Path("R2")) if relative else (tmp_path / "R", tmp_path / "R2")

    def rows(runs: Path) -> list[reproduce.Row]:
        teacher = row_of(runs / "table" / "teacher")
        return [teacher, row_of(runs / "table" / "kd", teacher=str(teacher.run))]

    teacher, kd = rows(before)
    fake_run(teacher)
    fake_run(kd, epochs=1, finished=False)  # an interrupted stage 2
    shutil.copytree(before, after)
    moved_teacher, moved_kd = rows(after)
    assert reproduce.finished(moved_teacher) and reproduce.row_state(moved_kd).startswith("resumes (1/2 epochs")
    mark_done(kd.run, kd.spec.record())
    shutil.copytree(kd.run, moved_kd.run, dirs_exist_ok=True)
    (moved_kd.run / "summary.json").write_text(json.dumps(SUMMARY))
    assert reproduce.finished(moved_kd) and not runner.finished_otherwise(moved_kd)
    # a teacher outside the table folder is still another teacher
    elsewhere = row_of(after / "table" / "kd", teacher=str(tmp_path / "elsewhere"))
    assert runner.finished_otherwise(elsewhere)


def test_a_finished_row_without_its_checkpoint_is_not_finished_and_trains_anew(tmp_path, calls):
    """A row whose last.safetensors was deleted counted as finished (its students then failed), and once its done
    mark was deleted it "resumed after epoch 2", which wrote no checkpoint, and was marked done again."""
    teacher = row_of(tmp_path / "runs" / "t" / "teacher")
    fake_run(teacher)
    (teacher.run / "last.safetensors").unlink()
    for done in (True, False):
        if not done:
            (teacher.run / "done").unlink()
        assert not reproduce.finished(teacher) and not runner.finished_otherwise(teacher)
        assert not runner.resumable(teacher)
        assert reproduce.row_state(teacher) == ("will train anew: its last.safetensors is gone, and resuming would "
                                                "not write it again")
    log: list[str] = []
    reproduce.train_row(teacher, log.append)
    assert calls == [(teacher.spec, False, True)]  # trained anew (the trainer writes it only when an epoch ends)
    assert "(trains it anew: its last.safetensors is gone" in log[0]
    assert reproduce.finished(teacher)


def test_a_run_stopped_before_its_first_epoch_restarts_and_the_log_says_so(tmp_path, calls):
    """Ctrl-C between the commit and the first checkpoint: the rerun said "replaces the run made by another spec"."""
    row = row_of(tmp_path / "runs" / "t" / "r")
    row.run.mkdir(parents=True)
    (row.run / "args.json").write_text(json.dumps({"asked": row.spec.record()}))
    (row.run / "spec.json").write_text("{}")
    assert reproduce.row_state(row) == "will restart"
    log: list[str] = []
    reproduce.train_row(row, log.append)
    assert calls == [(row.spec, False, True)]
    assert "another spec" not in log[0] and "(restarts: the run this spec started there has no train_state.pt" in log[0]


def test_a_rows_pattern_that_matches_nothing_is_refused_beside_one_that_matches(tmp_path, capsys, monkeypatch):
    argv = ["cifar10-reducenet", "--budget", "smoke", "--models", "reduce20", "--recipes", "ours", "--subset", "200",
            "--data-dir", str(CIFAR10), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    monkeypatch.setattr(reproduce.tables, "train_row", lambda *a: pytest.fail("a row trained before the error"))
    for plan in ([], ["--plan"]):
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
            reproduce.main([*argv, "--rows", "*-scratch", "*-scrach", *plan])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "--rows *-scrach matches no row" in err, err
    assert not (tmp_path / "runs").exists()


def test_a_subset_below_the_batch_is_refused_before_training_and_the_plan_warns(tmp_path, capsys, monkeypatch):
    """--subset 100 with the recipes' batch of 128: every row failed, one after another; the plan said nothing."""
    argv = ["cifar10-reducenet", "--budget", "smoke", "--models", "reduce20", "--recipes", "ours", "--subset", "100",
            "--data-dir", str(CIFAR10), "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    monkeypatch.setattr(reproduce.tables, "train_row", lambda *a: pytest.fail("a row trained before the error"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reproduce.main([*argv, "--plan"])
    warning = out.getvalue().splitlines()[-1]
    assert warning.startswith("warning: the rows not finished would stop at their first batch: ")
    assert "trains at batch 128, but the data gives 100 training images per process" in warning
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "give it at least 128 (a larger --subset)" in err, err
    assert not (tmp_path / "runs").exists()
