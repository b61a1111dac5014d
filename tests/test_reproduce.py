"""The three `python -m train.reproduce` tables, each run on a tiny subset (smoke budget)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path, PurePosixPath

import pytest
import torch

import models
from models.errors import ConfigError, ReduceNetError
from _shared import CIFAR10, CIFAR100, SHARED, randomize_model
from train import reproduce
from train.data import extract_images, scan_image_tree
from train.rundir import RunDir
from train.spec import Fresh, Inherit, RunSpec


pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("isolated_cache")]  # every test trains or runs a CLI

ORIGINAL = SHARED / "reducenet-original"

if not (CIFAR10 / "cifar-10-batches-py").is_dir():
    pytest.skip(f"{CIFAR10} is absent (set REDUCENET_SHARED_DATA to the shared data folder)", allow_module_level=True)


def run(argv: list[str]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        reproduce.main(argv)
    return out.getvalue()


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def spec_row(name: str, run: Path, epochs: int = 1, teacher: str | None = None, seed: int = 0) -> reproduce.Row:
    """A row of one run: a fresh reduce20, or the student of ``teacher``."""
    derive = Inherit(teacher) if teacher else Fresh("reduce20")
    return reproduce.Row(name, "g", RunSpec.of(derive, epochs=epochs, seed=seed, out=str(run)), seed)


def smoke_argv(table: str, tmp_path, *extra: str, data=CIFAR10) -> list[str]:
    subset = [] if "--subset" in extra else ["--subset", "200"]
    return [table, "--budget", "smoke", *subset, "--data-dir", str(data), "--device", "cpu",
            "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"), *extra]


def test_cifar10_reducenet_table_and_resume(tmp_path):
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20")
    first = run(argv)
    results = tmp_path / "results"
    rows = read_csv(results / "cifar10-reducenet.csv")
    names = [r["row"] for r in rows]
    assert names[:3] == ["teacher (stage1) (paper recipe)", "student from scratch (2 ep) (paper recipe)",
                         "stage2: inherit + KD (paper recipe)"]
    assert names[3:6] == ["teacher (stage1) (ours recipe)", "student from scratch (2 ep) (ours recipe)",
                          "stage2: inherit + KD (ours recipe)"]
    assert any("LambdaReLU" in n for n in names) and names[-1].startswith("fused deploy model")
    scratch, teacher = rows[1], rows[0]
    assert int(scratch["epochs"]) == 2 * int(teacher["epochs"])  # same total epochs as stage1 + stage2
    fused, last_student = rows[-1], rows[-2]
    assert int(fused["params"]) < int(last_student["params"])  # LoRA and BN folded away
    runs = tmp_path / "runs" / "cifar10-reducenet"
    summary = json.loads((runs / "reduce20-w1-ours-s0-kd-lora-lambda" / "summary.json").read_text())
    assert summary["fused_test_acc"] == pytest.approx(float(fused["last_acc"]))
    # every stage-2 row shows its own fused deploy model's accuracy, not only the last one of its seed
    stage2_rows = [r for r in rows if r["row"].startswith("stage2")]
    assert len(stage2_rows) == 4
    for r in stage2_rows:
        s2 = json.loads((Path(r["run"]) / "summary.json").read_text())
        assert float(r["fused_acc"]) == pytest.approx(s2["fused_test_acc"]), r["row"]
    assert all(r["fused_acc"] == "" for r in rows if not r["row"].startswith("stage2"))
    # the paper recipe really ran without normalisation and with the original's KD reduction
    paper = json.loads((runs / "reduce20-w1-paper-s0-kd" / "args.json").read_text())["args"]
    assert paper["recipe"] == "reducenet-paper" and paper["kd_reduction"] == "mean" and paper["lr"] == 0.1
    assert models.load_checkpoint(runs / "reduce20-w1-paper-s0-teacher").preprocess["std"] == [1.0] * 3
    md = (results / "cifar10-reducenet.md").read_text()
    assert " --device cpu`" in md  # the command as given: without it, auto (a GPU elsewhere) asks for other runs
    for needle in ("python -m train.reproduce cifar10-reducenet --budget smoke", "CIFAR-10 (exact subset",
                   "Hardware: CPU", "seeds 0", "last", "Published numbers", "91.97", "published ReduceNet block",
                   "timed side by side", "`fused acc` is a stage-2 row", "| fused acc (%) | best acc (%) |"):
        assert needle in md, needle
    assert (results / "cifar10-reducenet.png").stat().st_size > 10_000
    assert first.count("[run]") == 8
    # every stage-2 row is set against the scratch student of its recipe and seed, run against run
    acc = {r["row"]: float(r["last_acc"]) for r in rows}
    gains = {cells[1]: cells for cells in (line.split(" | ") for line in md.splitlines()) if len(cells) == 6}
    for recipe in ("paper", "ours"):
        cells = gains[f"stage2: inherit + KD ({recipe} recipe)"]
        assert cells[2] == f"student from scratch (2 ep) ({recipe} recipe)"
        diff = acc[f"stage2: inherit + KD ({recipe} recipe)"] - acc[f"student from scratch (2 ep) ({recipe} recipe)"]
        assert cells[4] == f"{diff:+.2f}"
    assert "stage2 + LoRA r8 + LambdaReLU (ours recipe)" in gains and "teacher (stage1) (ours recipe)" not in gains

    # a second call skips every finished row and rewrites the same table
    teacher_ckpt = runs / "reduce20-w1-ours-s0-teacher" / "last.safetensors"
    before = teacher_ckpt.stat().st_mtime_ns
    second = run(argv)
    assert second.count("[skip]") == 8 and "[run]" not in second
    assert teacher_ckpt.stat().st_mtime_ns == before
    assert [r["last_acc"] for r in read_csv(results / "cifar10-reducenet.csv")] == [r["last_acc"] for r in rows]


def test_a_row_made_by_another_command_is_not_reported_as_this_one(tmp_path):
    """A finished smoke run is not shown under another subset's label: the row runs again."""
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")
    args = reproduce.build_parser().parse_args(argv)
    teacher = reproduce.cifar10_rows(args)[0]
    reproduce.train_row(teacher, lambda m: None)
    assert reproduce.finished(teacher)
    argv[argv.index("--subset") + 1] = "150"
    other = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))[0]
    assert other.run == teacher.run and not reproduce.finished(other)
    # the command refuses to delete the finished run (a forgotten --budget would cost hours); --plan says why
    before = (teacher.run / "last.safetensors").read_bytes()
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--rows", teacher.run.name])
    assert e.value.code == 2 and (teacher.run / "last.safetensors").read_bytes() == before
    assert "finished with other options: --replace retrains it" in run([*argv, "--rows", teacher.run.name, "--plan"])
    log: list[str] = []
    summary = reproduce.train_row(other, log.append)
    assert log[0].startswith("[run] ") and "replaces the run made by another spec" in log[0]  # not resumed
    assert summary["train_images"] == 128 and reproduce.finished(other)  # 150 images, one batch of 128


def test_no_lora_rows_leaves_out_only_the_lora_rows_and_says_so(tmp_path):
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--seeds", "0", "1")
    full = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))
    args = reproduce.build_parser().parse_args([*argv, "--no-lora-rows"])
    short = reproduce.cifar10_rows(args)
    assert len(full) == 16 and len(short) == 12
    assert [(r.run, r.spec) for r in short] == [(r.run, r.spec) for r in full if "LoRA" not in r.name]
    for r in short:
        r.result = {"data": "d", "train_images": 1, "test_images": 1, "hardware": "h", "commits": ["c"]}
    command = reproduce._header("cifar10-reducenet", args, short, "1 + 1 epochs")[0]
    assert "--recipes paper ours --no-lora-rows --data-dir" in command


def test_cifar10_reducenet_resumes_an_interrupted_row(tmp_path, monkeypatch):
    from train.reproduce import runner

    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "ours")
    rows = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))
    real_run = runner.run

    def interrupted(spec, **kw):  # the table is stopped at its first stage2 row
        if spec.kind == "inherit":
            raise KeyboardInterrupt
        return real_run(spec, **kw)

    monkeypatch.setattr(runner, "run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        for r in rows:
            reproduce.train_row(r, lambda m: None)
    monkeypatch.setattr(runner, "run", real_run)
    runs = tmp_path / "runs" / "cifar10-reducenet"
    assert (runs / "reduce20-w1-ours-s0-teacher" / "done").is_file()
    assert not (runs / "reduce20-w1-ours-s0-kd" / "done").exists()
    # a half-finished row (train_state.pt but no done marker) is resumed, not restarted
    (runs / "reduce20-w1-ours-s0-scratch" / "done").unlink()
    plan = run([*argv, "--plan"])  # says so before anything runs, and trains nothing
    states = dict(line.split(maxsplit=1) for line in plan.splitlines()[1:-1])
    assert plan.splitlines()[0] == "1 of 5 rows finished; nothing trained (--plan)"
    assert plan.splitlines()[-1] == "3 row(s) not timed: no run of theirs has timed an epoch yet"
    assert states == {"reduce20-w1-ours-s0-teacher": "finished", "reduce20-w1-ours-s0-scratch": "resumes (2/2 epochs)",
                      "reduce20-w1-ours-s0-kd": "not started", "reduce20-w1-ours-s0-kd-lora": "not started",
                      "reduce20-w1-ours-s0-kd-lora-lambda": "not started"}
    assert not (runs / "reduce20-w1-ours-s0-kd").exists() and not (tmp_path / "results").exists()
    with RunDir(runs / "reduce20-w1-ours-s0-scratch", overwrite=True).open():  # a running process holds it
        assert reproduce.row_state(rows[1]) == "running (2/2 epochs)"
    log: list[str] = []
    summary = reproduce.train_row(rows[1], log.append)
    assert log[0].startswith("[resume] ")
    assert summary["last_epoch"] == 2


def test_jobs_train_rows_at_once_each_after_the_row_it_inherits_from(tmp_path):
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")
    out = run([*argv, "--jobs", "2"])
    teacher, scratch, kd = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))
    assert reproduce.parallel.inherits_from(kd, [teacher, scratch, kd]) == [teacher]
    events = [line.split()[:2] for line in out.splitlines() if line.startswith(("[start]", "[done]"))]
    assert events[:2] == [["[start]", teacher.run.name], ["[start]", scratch.run.name]]  # two at once
    assert events.index(["[done]", teacher.run.name]) < events.index(["[start]", kd.run.name])
    assert sorted(events) == sorted([e, r.run.name] for e in ("[start]", "[done]") for r in (teacher, scratch, kd))
    logs = tmp_path / "runs" / "cifar10-reducenet" / "logs"
    assert sorted(p.stem for p in logs.iterdir()) == sorted(r.run.name for r in (teacher, scratch, kd))
    assert "trained 1 of 3 rows" in (logs / f"{kd.run.name}.log").read_text()
    assert [r["row"] for r in read_csv(tmp_path / "results" / "cifar10-reducenet.csv")][:3] == [
        teacher.name, scratch.name, kd.name]


def test_seeds_are_averaged_in_the_markdown_and_listed_in_the_csv(tmp_path):
    run(smoke_argv("cifar100-kd", tmp_path, "--models", "reduce20", "--seeds", "0", "1", data=CIFAR100)
        if (CIFAR100 / "cifar-100-python").is_dir() else
        smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper", "--seeds", "0", "1"))
    table = "cifar100-kd" if (CIFAR100 / "cifar-100-python").is_dir() else "cifar10-reducenet"
    lines = read_csv(tmp_path / "results" / f"{table}.csv")
    first = lines[0]["row"]
    accs = [float(r["last_acc"]) for r in lines if r["row"] == first]
    assert [r["seed"] for r in lines if r["row"] == first] == ["0", "1"]
    md = (tmp_path / "results" / f"{table}.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith(f"| {lines[0]['group']} | {first} |"))
    assert "| 0, 1 |" in row and f"{sum(accs) / 2:.2f} ± " in row


def test_jobs_stop_the_rows_whose_teacher_failed_and_keep_the_rest(tmp_path):
    from train.rundir import mark_done

    rows = reproduce.cifar10_rows(reproduce.build_parser().parse_args(
        smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")))
    teacher, scratch, kd = rows
    slots = []

    class Job:  # a process that ends at its second poll: the teacher with an error, the others finished
        def __init__(self, row, slot):
            self.row, self.polls = row, 0
            slots.append((row.run.name, slot))

        def poll(self):
            self.polls += 1
            if self.polls < 2:
                return None
            if self.row is teacher:
                return 1
            (self.row.run / "summary.json").write_text("{}")
            (self.row.run / "last.safetensors").write_bytes(b"")  # a finished run has its checkpoint
            mark_done(self.row.run, self.row.spec.record())
            return 0

        def terminate(self):
            raise AssertionError("nothing to stop")

    scratch.run.mkdir(parents=True)
    # an interrupted run of the same command: it resumes before new rows start
    (scratch.run / "args.json").write_text(json.dumps({"asked": scratch.spec.record()}))
    (scratch.run / "train_state.pt").write_bytes(b"")
    log: list[str] = []
    with pytest.raises(reproduce.RowsFailed, match="2 of 3 rows did not finish"):
        reproduce.train_parallel(rows, [], 2, "cpu", log.append, launch=lambda a, row, slot, j, d: Job(row, slot),
                                 poll_s=0)
    assert slots == [(scratch.run.name, 0), (teacher.run.name, 1)]  # kd never started: its teacher failed
    assert reproduce.finished(scratch) and not reproduce.finished(kd)
    assert any(line.startswith(f"[failed] {teacher.run.name}") for line in log)
    assert f"[not started] {kd.run.name}: a row it inherits from failed" in log


def test_a_killed_jobs_run_stops_its_jobs(tmp_path):
    import os
    import signal

    rows = reproduce.cifar10_rows(reproduce.build_parser().parse_args(
        smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")))
    jobs = []

    class Job:  # the parent gets SIGTERM (`kill`) while two jobs run
        def __init__(self):
            self.stopped = False
            jobs.append(self)

        def poll(self):
            if len(jobs) == 2:
                os.kill(os.getpid(), signal.SIGTERM)
            return None

        def terminate(self):
            self.stopped = True

        def wait(self):
            return -15

    from models.errors import Terminated

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):  # the CLI then says "terminated" and exits with 143, as one run does
        reproduce.train_parallel(rows, [], 2, "cpu", lambda m: None, launch=lambda *a: Job(), poll_s=0)
    assert len(jobs) == 2 and all(j.stopped for j in jobs)
    assert signal.getsignal(signal.SIGTERM) is before


def test_each_job_gets_its_own_cores(monkeypatch):
    from train.reproduce.parallel import slot_env

    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert [slot_env(k, 2, "cpu")[1] for k in (0, 1)] == [{0, 1}, {2, 3}]
    env, cores = slot_env(2, 3, "cpu")
    assert cores == {2} and env["OMP_NUM_THREADS"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert slot_env(0, 3, "auto")[1] is None and slot_env(0, 3, "cpu")[1] == {0}  # --device cpu stays on cores
    assert [slot_env(k, 3, "auto")[0]["CUDA_VISIBLE_DEVICES"] for k in (0, 1, 2)] == ["4", "6", "4"]


def test_rows_are_set_against_their_baselines_seed_by_seed():
    def line(row, seed, acc, exact):
        return {"group": "g", "row": row, "seed": seed, "run": f"{row}-s{seed}", "last_acc": acc, "exact_acc": exact}

    lines = [line("scratch", 0, 80.0, 90.0), line("kd", 0, 81.5, 89.0),
             line("scratch", 1, 82.0, 90.0), line("kd", 1, 82.5, 92.0), line("fused", 0, 81.5, None)]
    md = reproduce.against_baselines(lines, {"kd-s0": "scratch-s0", "kd-s1": "scratch-s1"}, 10_000)
    assert "| g | kd | scratch | 0, 1 | +1.00 ± 0.71 | +1.50, +0.50 | +0.50 ± 2.12 | -1.00, +2.00 |" in md
    assert "near 82% on 10,000 test images is 0.39 points" in " ".join(md)
    assert reproduce.against_baselines(lines, {"kd-s0": "missing"}, 10_000) == []  # no baseline, no section


@pytest.mark.skipif(not (CIFAR100 / "cifar-100-python").is_dir(), reason=f"{CIFAR100} is absent")
def test_the_fused_models_of_a_table_are_timed_side_by_side(tmp_path, monkeypatch):
    lines = [{"row": "teacher", "run": "t"}]
    for seed in (0, 1):
        run = tmp_path / f"s{seed}" / "deploy"
        models.save_checkpoint(models.create_model("reduce20"), run / "model")
        lines.append({"row": "fused", "run": str(run), "cpu_latency_ms_b1": None})
    calls = []

    def measure(nets, batch, device, repeats):
        calls.append((sorted(nets), batch, repeats))
        return {k: 0.001 * (i + 2) for i, k in enumerate(nets)}

    monkeypatch.setattr(reproduce.tables, "measure", measure)
    note = reproduce._time_fused(lines, 7)
    assert calls == [([lines[1]["run"], lines[2]["run"]], 1, 7)]  # one run: a round times each model once
    assert [line.get("cpu_latency_ms_b1") for line in lines] == [None, pytest.approx(2.0), pytest.approx(3.0)]
    assert "over 7 rounds" in note and "side by side" in note
    assert reproduce._time_fused(lines[:1], 7) is None and calls == calls[:1]  # nothing fused: nothing timed


def test_cifar100_kd_table_on_the_exact_subset(tmp_path):
    run(smoke_argv("cifar100-kd", tmp_path, "--models", "reduce20", data=CIFAR100))
    rows = read_csv(tmp_path / "results" / "cifar100-kd.csv")
    assert [r["row"] for r in rows] == ["teacher reduce56 (scratch)", "student reduce20 scratch",
                                        "student reduce20 KD", "student reduce20 DKD"]
    assert {r["group"] for r in rows} == {"reduce56->reduce20"}
    assert int(rows[0]["params"]) > int(rows[1]["params"]) == int(rows[2]["params"]) == int(rows[3]["params"])
    md = (tmp_path / "results" / "cifar100-kd.md").read_text()
    assert "CIFAR-100 (exact subset" in md and "72.34" in md and "71.97" in md
    dkd = json.loads((tmp_path / "runs" / "cifar100-kd" / "reduce20-dkd-from-reduce56-s0" / "args.json").read_text())
    # mdistiller's settings for this pair: beta 2, SGD without Nesterov, no warm-up
    assert dkd["args"]["kd_beta"] == 2.0 and dkd["args"]["nesterov"] is False and dkd["args"]["warmup_epochs"] == 0


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"{ORIGINAL} is absent")
def test_plan_writes_nothing_not_even_the_converted_teacher(tmp_path):
    out = run([*smoke_argv("original-stage2", tmp_path, "--original", str(ORIGINAL), "--exact-dir", str(CIFAR10)),
               "--plan"])
    assert out.splitlines()[0] == "0 of 5 rows finished; nothing trained (--plan)"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_plan_says_when_the_rows_would_not_find_their_data(tmp_path):
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", data=tmp_path / "nowhere")
    gone = run([*argv, "--plan"])
    assert gone.splitlines()[-1].startswith("warning: the rows not finished would stop at their data: no CIFAR-10")
    assert "warning" not in run([*smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20"), "--plan"])
    assert not (tmp_path / "runs").exists()


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"{ORIGINAL} is absent")
def test_original_stage2_table_trained_in_two_parts(tmp_path, capsys, monkeypatch):
    argv = smoke_argv("original-stage2", tmp_path, "--original", str(ORIGINAL), "--exact-dir", str(CIFAR10))
    # --rows trains a part of the table (to split it across cores) and writes no table from it; nor does it
    # score the original's checkpoints, which only the table shows
    with monkeypatch.context() as m:
        m.setattr(reproduce.tables, "_evaluate", lambda *a: pytest.fail("--rows scored a checkpoint for the table"))
        assert reproduce.main([*argv, "--rows", "*-scratch", "*-paper-kd"]) is None
    runs = tmp_path / "runs" / "original-stage2"
    assert sorted(p.name for p in runs.iterdir() if (p / "done").is_file()) == ["reduce20-s0-paper-kd",
                                                                              "reduce20-s0-scratch"]
    assert not (tmp_path / "results").exists()
    assert "run the same command without --rows" in capsys.readouterr().out
    # the same command without --rows skips the two finished rows, trains the rest and writes the whole table
    out = run(argv)
    assert out.count("[skip]") == 2 and out.count("[run]") == 3
    lines = read_csv(tmp_path / "results" / "original-stage2.csv")
    assert len(lines) == 2 + 5 + 1  # their two checkpoints, the five rows, the last row's fused model
    teacher, student = lines[0], lines[1]
    # the original's own checkpoints score what the original code gives on the exact test images
    assert float(teacher["exact_acc"]) == pytest.approx(93.41, abs=0.005)
    assert float(student["exact_acc"]) == pytest.approx(93.61, abs=0.005)
    names = [r["row"] for r in lines[2:]]
    assert names[0].startswith("student from scratch") and "paper recipe" in names[1]
    assert all(0 <= float(r["exact_acc"]) <= 100 for r in lines[2:] if r["exact_acc"])
    # stage 2 started from the original teacher: after one smoke epoch its student is far above chance
    kd = next(r for r in lines if r["row"] == "stage2: inherit + KD (paper recipe)")
    assert float(kd["exact_acc"]) > 50
    md = (tmp_path / "results" / "original-stage2.md").read_text()
    assert "exact-subset acc" in md
    # every row's `last acc` on the same test images: the original's checkpoints too, on the subset's (37 images)
    test_images = json.loads((runs / "reduce20-s0-scratch" / "summary.json").read_text())["test_images"]
    assert f"200 train / {test_images} test images; 128 of 200 training images per epoch" in md
    for ref in (teacher, student):
        correct = float(ref["last_acc"]) * test_images / 100
        assert correct == pytest.approx(round(correct)), ref["row"]
    # another --original into the same --runs: the rows trained from the first conversion are not reported as its
    other = tmp_path / "other-original"
    other.mkdir()
    for role, source in (("teacher", "student"), ("student", "student")):  # another teacher file
        (other / f"reduce20_cifar10_e1_w1_{role}.pth").write_bytes(
            (ORIGINAL / f"reduce20_cifar10_e1_w1_{source}.pth").read_bytes())
    argv[argv.index("--original") + 1] = str(other)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        reproduce.main([*argv, "--plan"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and f"not from {other}" in err and "another --runs" in err


def test_deploy_speed_table(tmp_path, single_thread):
    run(["deploy-speed", "--models", "reduce20", "--repeats", "3", "--results", str(tmp_path)])
    rows = read_csv(tmp_path / "deploy-speed.csv")
    assert [r["form"] for r in rows] == ["teacher", "student + LoRA r8 (unfused)", "fused student",
                                         "fused, flattened (torch.fx)", "hand-written plain net",
                                         "hand-written, TorchScript", "hand-written, torch.export",
                                         "fused, TorchScript", "fused, torch.export (.pt2)", "fused, onnxruntime"]
    form = {r["form"]: r for r in rows}
    fused, plain = form["fused, flattened (torch.fx)"], form["hand-written plain net"]
    assert fused["params"] == plain["params"] and fused["macs"] == plain["macs"]
    for mine in ("fused student", "fused, flattened (torch.fx)", "fused, TorchScript", "fused, torch.export (.pt2)"):
        assert float(form[mine]["cpu_fused_over_plain"]) > 0 and float(form[mine]["cpu_fused_over_plain_b128"]) > 0
    assert not form["teacher"]["cpu_fused_over_plain"] and not form["fused, onnxruntime"]["cpu_fused_over_plain"]
    # where the batch-1 time of the module tree goes: Python module calls; the flat graph makes the hand-written
    # net's (its convs and classifier), plus the pool module and itself
    calls = {k: int(form[k]["module_calls"]) for k in ("fused student", "fused, flattened (torch.fx)",
                                                        "hand-written plain net")}
    assert calls["fused, flattened (torch.fx)"] == calls["hand-written plain net"] + 1
    assert calls["fused student"] > 3 * calls["hand-written plain net"]
    assert float(rows[0]["macs_teacher_over_fused"]) == pytest.approx(int(rows[0]["macs"]) / int(fused["macs"]))
    assert float(rows[0]["cpu_teacher_over_fused_b1"]) > 1  # twice the layers' work at batch 1, whatever the noise
    assert all(float(r["cpu_img_per_s_b128"]) > 0 for r in rows)
    assert "us per call" in (tmp_path / "deploy-speed.md").read_text()


def test_models_are_timed_in_rotating_order_and_ratios_are_paired_by_round():
    from train.timing import paired_ratio, time_rounds

    order = []
    models = {k: (lambda x, k=k: order.append(k)) for k in "abc"}
    times = time_rounds(models, 1, torch.device("cpu"), repeats=4, warmup=2)
    assert {k: len(v) for k, v in times.items()} == {"a": 4, "b": 4, "c": 4}  # warm-up rounds are not kept
    rounds = ["".join(order[i:i + 3]) for i in range(0, len(order), 3)]
    assert rounds == ["abc", "bca", "cab", "abc", "bca", "cab"]  # no model always follows the same one
    # the median of each round's ratio (2, 0.2, 2), not the ratio of the medians (4 / 20)
    assert paired_ratio([2.0, 4.0, 60.0], [1.0, 20.0, 30.0]) == 2.0
    with pytest.raises(ValueError):
        paired_ratio([1.0, 2.0], [1.0])  # two lists from different measurements


def test_timing_keeps_freed_memory_where_glibc_allows():
    """mallopt refuses values out of its range (returns 0): the thresholds asked for must be accepted."""
    from train.timing import keep_freed_memory
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert keep_freed_memory() is True


def test_the_hand_written_net_computes_the_fused_students_function(single_thread):
    from train.reproduce.speed import HandWrittenResNet

    fused = reproduce.speed.fuse_model(randomize_model(models.create_model("reduce20", expansion=0, lora_rank=2)))
    plain = HandWrittenResNet(fused).eval()
    assert not any(type(m) not in (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ModuleList, torch.nn.Identity,
                                   HandWrittenResNet) for m in plain.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (plain(x) - fused(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("main, argv, words", [
    ("reproduce", ["deploy-speed", "--repeats", "0"], "--repeats 0"),
    ("reproduce", ["deploy-speed", "--plan"], "--plan"),
    ("reproduce", ["cifar10-reducenet", "--seeds", "-1"], "--seeds"),
    ("bench", ["--steps", "0"], "--steps 0"),
    ("bench", ["--workers", "-1"], "--workers -1"),
    ("bench", ["--device", "tpu9"], "tpu9"),
])
def test_bad_options_are_one_line(main, argv, words, tmp_path, capsys):
    from train import bench
    with pytest.raises(SystemExit) as e:
        (reproduce.main if main == "reproduce" else bench.main)([*argv, "--results", str(tmp_path)]
                                                                 if main == "reproduce" else argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert not any(tmp_path.iterdir())


def small_jpeg_tree(dest: Path, per_split: dict[str, int]) -> Path:
    """A ``train/`` + ``test/`` folder of the first ``per_split[split]`` images per class of the CIFAR-10 JPEG zip.

    Streaming the whole zip would list its 60,000 entries in every loader worker of every row; the zip itself is
    streamed in test_stream.py.
    """
    tree = scan_image_tree(SHARED / "cifar10-jpeg.zip")
    chosen = {split: [(name, y) for name, y in items if int(PurePosixPath(name).stem) < per_split[split]]
              for split, items in (("train", tree.train), ("test", tree.test)) if split in per_split}
    return extract_images(tree, chosen, dest)


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.zip").is_file(), reason="needs the CIFAR-10 JPEG zip")
def test_kd_imagefolder_table_plots_the_student_with_and_without_distillation(tmp_path):
    """The knowledge-distillation project's row on a small tree made from the CIFAR-10 JPEGs (upscaled)."""
    tree = small_jpeg_tree(tmp_path / "jpeg", {"train": 20, "test": 4})
    run(smoke_argv("kd-imagefolder", tmp_path, "--image-size", "64", data=tree))
    lines = read_csv(tmp_path / "results" / "kd-imagefolder.csv")
    assert [r["row"] for r in lines] == [
        "teacher torchvision:resnet18", "student torchvision:mobilenet_v3_small, no distillation",
        "student torchvision:mobilenet_v3_small, KD: MSE on logits",
        "student torchvision:mobilenet_v3_small, KD: KL (T 5)",
        "fused deploy model of: student torchvision:mobilenet_v3_small, KD: KL (T 5)"]
    assert int(lines[-1]["params"]) < int(lines[-2]["params"])  # BatchNorms folded into the convs
    assert int(lines[0]["params"]) > int(lines[1]["params"]) == int(lines[2]["params"])
    mse = json.loads((tmp_path / "runs" / "kd-imagefolder" / "student-mse-s0" / "summary.json").read_text())
    assert mse["kd"].startswith("DistillLoss(kind='mse'") and "image folder" in mse["data"]
    assert list((tmp_path / "runs" / "kd-imagefolder" / "student-mse-s0" / "tb").glob("events.*"))
    assert (tmp_path / "results" / "kd-imagefolder.png").stat().st_size > 10_000


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.zip").is_file(), reason="needs the CIFAR-10 JPEG zip")
def test_bench_prints_each_path_and_its_ratios(single_thread, capsys):
    from train import bench
    from train.provenance import native_bf16
    rows = bench.main(["--models", "reduce20", "--steps", "2", "--batch-size", "16", "--workers", "0",
                       "--data-dir", str(CIFAR10), "--device", "cpu", "--folder", str(SHARED / "cifar10-jpeg.zip"),
                       "--folder-images", "40", "--pack", "2", "--pack-mode", "processes", "streams",
                       "--cuda-graph"])
    out = capsys.readouterr().out
    assert "the step captured whole (run eagerly" in out.splitlines()[0]  # the header says how ours ran
    assert [r["job"] for r in rows[:3]] == ["teacher (stage 1)", "student (stage 1)", "student (stage 2, KD)"]
    for r in rows[:3]:
        assert r["ours_over_dataloader"] == pytest.approx(r["ours"] / r["dataloader"]) and r["compute"] > 0
        if native_bf16(torch.device("cpu")):  # (d): the same path in float32, beside it
            assert r["ours_float32"] > 0 and r["ours_over_float32"] == pytest.approx(r["ours"] / r["ours_float32"])
        else:
            assert r["ours_float32"] is None and r["ours_over_float32"] is None
        assert r["wall_ms_per_step"] == pytest.approx(1e3 * 16 / r["ours"])
        assert r["kernel_ms_per_step"] is None  # the GPU's kernel time: on CUDA only
    assert "(b)/(c)" in out and "(b)/(d)" in out and "kernel / wall" in out
    for packed, how in zip(rows[3:5], ("processes", "streams")):  # two teachers at once: two processes, two threads
        assert packed["pack"] == 2 and packed["pack_mode"] == how
        assert packed["aggregate_img_s"] > 0 and packed["median_img_s"] > 0
    assert "| 2 | processes |" in out and "| 2 | threads (no CUDA streams) |" in out and "all runs together" in out
    assert "streaming loader" in out and rows[5]["stream"] > 0


def test_bench_reports_a_gpu_profile_beside_the_rates(tmp_path, monkeypatch, capsys):
    """What bench prints and writes from a GPU's profile (faked here: a CPU has no kernels): the kernel time per step
    beside the wall time, and per path a file with the top kernels and the host's ops and runtime calls."""
    from train import bench

    def speed(make_task, data, device, compile_, fixed, amp, compile_mode="default", profile=False, cuda_graph=False):
        out = {"img_s": 1000.0, "wall_ms": 128.0}
        if profile:  # 100 of the 128 ms a step computing, the rest launching and waiting
            out.update(kernel_ms=100.0, top_kernels=[("sm90_conv", 60.0), ("bn_fwd", 40.0)], host_ms=30.0,
                       top_host_ops=[("cudaGraphLaunch", 20.0, 1.0), ("aten::index", 10.0, 2.0)])
        return out

    monkeypatch.setattr(bench, "trainer_speed", speed)
    monkeypatch.setattr(bench, "plain_loop", lambda *a, **k: 500.0)
    rows = bench.main(["--models", "reduce20", "--steps", "1", "--batch-size", "128", "--data-dir", str(CIFAR10),
                       "--device", "cpu", "--profile-dir", str(tmp_path / "profile")])
    out = capsys.readouterr().out
    assert "| reduce20 | teacher (stage 1) | 500 | 1,000 | 1,000 |" in out and "| 128.00 | 100.000 | 0.78 |" in out
    assert rows[0]["kernel_ms_per_step"] == 100.0 and rows[0]["host_ms_per_step"] == 30.0
    text = (tmp_path / "profile" / "reduce20-teacher-stage-1.txt").read_text()
    assert text.startswith("reduce20, teacher (stage 1): wall 128.000 ms/step, kernels 100.000 ms/step, host ops "
                           "30.000 ms/step")
    assert " 60.0000 ms/step  sm90_conv" in text and " 10.0000 ms/step      2.0 calls/step  aten::index" in text


def test_packed_runs_report_the_error_that_stopped_them_not_the_broken_barrier():
    from train.bench import _packed
    done = [(0, 0, 0.0, 0.0, "BrokenBarrierError: "), (2, 0, 0.0, 0.0, "BrokenBarrierError: "),
            (1, 0, 0.0, 0.0, "OutOfMemoryError: CUDA out of memory")]
    with pytest.raises(ReduceNetError, match=r"^--pack 3: thread 1: OutOfMemoryError: CUDA out of memory$"):
        _packed(3, done, "thread")
    rates = _packed(2, [(0, 100, 1.0, 2.0, None), (1, 300, 1.5, 3.0, None)], "process")
    assert rates == {"runs": 2, "aggregate_img_s": 200.0, "median_img_s": pytest.approx((100 + 200) / 2)}


def test_precision_table_runs_the_same_rows_in_float32_and_bf16(tmp_path):
    run(smoke_argv("precision", tmp_path, "--models", "reduce20"))
    lines = read_csv(tmp_path / "results" / "precision.csv")
    assert [r["row"] for r in lines[:4]] == ["teacher, float32", "stage2 + LoRA r8 + LambdaReLU, float32",
                                             "teacher, bf16 autocast", "stage2 + LoRA r8 + LambdaReLU, bf16 autocast"]
    assert [r["precision"] for r in lines[:4]] == ["float32", "float32", "bf16 autocast", "bf16 autocast"]
    acc = {r["row"]: float(r["last_acc"]) for r in lines}
    md = (tmp_path / "results" / "precision.md").read_text()
    for stage in ("teacher", "stage2 + LoRA r8 + LambdaReLU"):  # bf16 against float32, run against run
        diff = acc[f"{stage}, bf16 autocast"] - acc[f"{stage}, float32"]
        assert f"| reduce20 | {stage}, bf16 autocast | {stage}, float32 | 0 | {diff:+.2f} |" in md


def test_trim_table(tmp_path):
    run(smoke_argv("trim", tmp_path, "--models", "reduce20"))
    lines = read_csv(tmp_path / "results" / "trim.csv")
    names = [r["row"] for r in lines]
    assert names[0].startswith("untrimmed reduce20") and len(names) == 9
    assert names[1] == "2x MACs: trimmed, no fine-tuning" and names[-1] == "4x MACs: fine-tuned 1 ep, KD + SemCKD"
    for r in lines[1:]:
        want = 2 if r["row"].startswith("2x") else 4
        assert float(r["macs_reduction"]) == pytest.approx(want, rel=0.03)
    md = (tmp_path / "results" / "trim.md").read_text()
    assert "Torch-Pruning" in md and "93.46" in md and "not ours" in md
    # latency ratios timed side by side when the table is written: the four 2x rows share one architecture (each
    # run's own timing, taken while other jobs trained, put them at 1.24x to 3.70x)
    assert "in which every network of the table runs once, timed when the table was written" in md
    same = [float(r["latency_ratio"]) for r in lines[1:] if r["row"].startswith("2x")]
    assert len(same) == 4 and len({r["params"] for r in lines[1:] if r["row"].startswith("2x")}) == 1
    assert max(same) / min(same) < 1.5, same


def test_pyramid_table(tmp_path):
    argv = smoke_argv("pyramid", tmp_path, "--losses", "two-stage", "--subset", "130", "--repeats", "3")
    run(argv)
    again = run(argv)  # every finished chain is skipped as a whole
    assert again.count("[skip]") == 3 and "[run]" not in again
    lines = read_csv(tmp_path / "results" / "pyramid.csv")
    assert lines[0]["row"] == "VGG19 (the top)" and float(lines[0]["latency_ratio"]) == 1.0
    groups = [r["group"] for r in lines[1:]]
    assert groups[:5] == ["forward: svgg17", "forward: svgg14", "forward: svgg11", "forward: svgg8", "forward: svgg5"]
    assert len(lines) == 1 + 2 * 5 and {r["row"] for r in lines[1:]} == {"two-stage"}
    params = [int(r["params"]) for r in lines[1:6]]
    assert params == sorted(params, reverse=True)  # every level is smaller than the one above
    md = (tmp_path / "results" / "pyramid.md").read_text()
    assert "72.18" in md and "not ours" in md and (tmp_path / "results" / "pyramid.png").is_file()


@pytest.mark.parametrize("extra", [["original-stage2", "--rows", "nothing-*"], ["deploy-speed", "--rows", "*"]])
def test_rows_that_select_nothing_are_refused(tmp_path, capsys, extra):
    table, *rest = extra
    with pytest.raises(SystemExit) as e:
        reproduce.main([table, *rest, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results"),
                        "--data-dir", str(CIFAR10), "--original", str(ORIGINAL), "--exact-dir", str(CIFAR10)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--rows" in err[0]
    assert not (tmp_path / "results").exists()


def test_a_finished_row_is_found_whatever_the_spelling_of_its_paths(tmp_path, monkeypatch):
    """`--runs runs/reproduce` and `--runs /abs/runs/reproduce` name the same teacher: nothing is retrained."""
    from pathlib import Path

    from train.reproduce import Row, runner, train_row

    monkeypatch.chdir(tmp_path)
    (tmp_path / "teacher.safetensors").write_bytes(b"")
    calls = []

    def fake_run(spec, resume, overwrite):
        calls.append((spec, resume, overwrite))
        Path(spec.out).mkdir(parents=True, exist_ok=True)
        (Path(spec.out) / "summary.json").write_text("{}")
        (Path(spec.out) / "last.safetensors").write_bytes(b"")
        return {}

    monkeypatch.setattr(runner, "run", fake_run)
    out = str(tmp_path / "runs" / "row")
    for teacher in ("teacher.safetensors", str(tmp_path / "teacher.safetensors"), "./teacher.safetensors"):
        train_row(Row("r", "g", RunSpec.of(Inherit(teacher), epochs=1, out=out)), lambda m: None)
    assert len(calls) == 1
    train_row(Row("r", "g", RunSpec.of(Inherit("teacher.safetensors"), epochs=2, out=out)), lambda m: None)
    train_row(Row("r", "g", RunSpec.of(Inherit("other.safetensors"), epochs=2, out=out)), lambda m: None)
    assert len(calls) == 3 and calls[-1][2] is True  # another spec still replaces the row


def test_train_time_does_not_count_a_paused_epoch(tmp_path):
    from train.reproduce.report import train_seconds

    run = tmp_path / "run"
    run.mkdir()
    # the third epoch's process was stopped for 15 minutes (kill -STOP while the tests ran)
    (run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n1,50,100.0\n2,60,102.0\n3,65,1000.0\n4,70,98.0\n")
    assert train_seconds(run, {"train_s_total": 1300.0}) == pytest.approx(4 * 101.0)
    assert train_seconds(tmp_path / "no-metrics", {"train_s_total": 1300.0}) == 1300.0  # falls back to the sum
    # a row of 0 epochs (trimmed, not fine-tuned) evaluates once as epoch 0: it trained for no time
    (run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n0,50,0.12\n")
    assert train_seconds(run, {"train_s_total": 0.12}) == 0.0


def test_a_budget_says_what_its_two_numbers_train():
    from train.reproduce.tables import budget_words

    assert budget_words("cifar10-reducenet", 200, 200) == "200 + 200 epochs (stage 1 + stage 2)"
    assert budget_words("original-stage2", 0, 200) == "200 epochs"
    assert budget_words("cifar100-kd", 240, 240) == ("240 epochs for every row (teachers, and students from scratch "
                                                     "or distilled)")
    assert budget_words("trim", 200, 100) == ("the untrimmed network 200 epochs, the fine-tuning of each trimmed one "
                                              "100 epochs")


@pytest.mark.parametrize("macs, xlabel", [((40e6, 40e6), "training time (h)"), ((40e6, 80e6), "MACs (M)")])
def test_the_cost_panel_plots_against_training_time_when_macs_do_not_differ(tmp_path, macs, xlabel):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from train.reproduce.report import _plot_cost

    rows = [spec_row(f"row {i}", tmp_path / str(i)) for i in range(2)]
    for r, m, t in zip(rows, macs, (3600.0, 7200.0)):
        r.result = {"last_test_acc": 90.0, "macs": m, "train_s_total": t}
    fig, ax = plt.subplots()
    _plot_cost(ax, rows, {"row 0": "C0", "row 1": "C1"})
    xs = sorted(float(c.get_offsets()[0, 0]) for c in ax.collections)
    plt.close(fig)
    assert ax.get_xlabel() == xlabel
    assert xs == ([1.0, 2.0] if xlabel.startswith("training") else [40.0, 80.0])


def test_a_stage2_curve_continues_after_its_teachers_epochs(tmp_path):
    from train.reproduce.report import curve

    def row(name: str, accs: list[float], **kw) -> reproduce.Row:
        r = spec_row(name, tmp_path / name, **kw)
        r.run.mkdir()
        lines = [f"{e},{a},1.0" for e, a in enumerate(accs, 1)]
        (r.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n" + "\n".join(lines) + "\n")
        return r

    teacher = row("teacher", [50, 60, 70], epochs=3)
    scratch = row("scratch", [40, 50, 55, 60, 65], epochs=5)
    kd = row("kd", [72, 74], teacher=str(tmp_path / "teacher"), epochs=2)
    again = row("again", [75], teacher=str(tmp_path / "kd" / "model.safetensors"))  # a chain of stages
    rows = [teacher, scratch, kd, again]
    assert curve(scratch, rows) == ([1, 2, 3, 4, 5], [40, 50, 55, 60, 65])
    assert curve(kd, rows) == ([4, 5], [72.0, 74.0])  # on the scratch student's axis of total epochs
    assert curve(again, rows) == ([6], [75.0])
    (teacher.run / "metrics.csv").unlink()  # a teacher without its history: the stage's own epochs
    assert curve(kd, rows) == ([1, 2], [72.0, 74.0])


def test_plan_says_how_long_the_rest_of_a_row_takes_at_its_own_pace(tmp_path):
    from train.reproduce.runner import row_state

    row = spec_row("r", tmp_path / "r", epochs=30)
    row.run.mkdir()
    (row.run / "args.json").write_text(json.dumps({"asked": row.spec.record()}))
    (row.run / "train_state.pt").write_bytes(b"")
    (row.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n1,50,200\n2,60,2000\n3,65,220\n")  # one paused
    assert row_state(row) == "resumes (3/30 epochs, about 1.6 h left at 220 s an epoch)"
    (row.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n" + "".join(f"{e},60,20\n" for e in range(1, 29)))
    assert row_state(row) == "resumes (28/30 epochs, about 1 min left at 20 s an epoch)"


def test_plan_bounds_the_time_with_jobs_by_the_longest_chain_of_rows_that_wait_for_one_another(tmp_path):

    def row(name, teacher=None):
        return spec_row(name, tmp_path / name, teacher=teacher)

    teacher, other = row("teacher"), row("other")
    student = row("student", str(teacher.run / "model.safetensors"))
    rows = [teacher, student, other]
    hour = 3600.0
    # 3 h in all: shared evenly by 2 jobs 1.5 h, but the student cannot start before its teacher's 1 h is over
    assert reproduce._time_left(rows, [hour, hour, hour], 2) == (
        "about 3.0 h of training left, rows one after another; with --jobs 2, at least 2.0 h (its longest row, "
        "or chain of rows that wait for one another)")
    # a long row the others do not wait for: no job count finishes it sooner
    assert reproduce._time_left(rows, [0.5 * hour, 0.5 * hour, 3 * hour], 4).endswith(
        "at least 3.0 h (its longest row, or chain of rows that wait for one another)")
    # rows enough to keep both jobs busy longer than any chain: the even share bounds it
    assert reproduce._time_left([*rows, row("more")], [0.5 * hour, 0.5 * hour, hour, hour], 2).endswith(
        "with --jobs 2, at least 1.5 h (if the rows share the jobs evenly)")
    assert reproduce._time_left(rows, [0.0, 0.0, 0.0], 2) == "nothing left to train"


def test_plan_times_a_row_not_started_at_the_pace_of_its_other_seed(tmp_path):
    from train.reproduce.runner import row_state

    def row(name, seed, epochs=10):
        return spec_row(name, tmp_path / f"{name}-s{seed}", epochs=epochs, seed=seed)

    done, waiting, other_label = row("kd", 0), row("kd", 1), row("scratch", 1)
    done.run.mkdir()
    (done.run / "args.json").write_text(json.dumps({"asked": done.spec.record()}))
    (done.run / "train_state.pt").write_bytes(b"")
    (done.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n1,50,360\n2,60,360\n")
    rows = [done, waiting, other_label]
    assert row_state(waiting, rows) == "not started (about 1.0 h at 360 s an epoch, the pace of kd-s0)"
    assert row_state(other_label, rows) == "not started"  # another row's pace says nothing of this one's
    assert row_state(waiting) == "not started"
    assert reproduce._time_left(rows, [reproduce.plan_row(r, rows)[1] for r in rows], 2) == (
        "about 1.8 h of training left, rows one after another; with --jobs 2, at least 1.0 h (its longest row, or "
        "chain of rows that wait for one another); 1 row(s) not timed: no run of theirs has timed an epoch yet")
    assert reproduce._time_left(rows, [reproduce.plan_row(r, rows)[1] for r in rows], 3).endswith(
        "with --jobs 3, at least 1.0 h (its longest row, or chain of rows that wait for one another); 1 row(s) not "
        "timed: no run of theirs has timed an epoch yet")
    # a run of the other seed made by another command (another budget) does not set the pace
    (done.run / "args.json").write_text(json.dumps({"asked": row("kd", 0, epochs=99).spec.record()}))
    assert row_state(waiting, rows) == "not started"


def test_a_row_finished_before_specs_still_counts_as_finished(tmp_path):
    """Runs made before specs recorded their command's options: read with the command's parser, the same run is
    finished and resumable; another command's run is not."""
    from train.rundir import mark_done

    args = reproduce.build_parser().parse_args(
        smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper"))
    teacher, scratch, kd = reproduce.cifar10_rows(args)
    data = ["--data-dir", str(CIFAR10), "--subset", "200"]
    common = ["--dataset", "cifar10", "--recipe", "reducenet-paper", "--seed", "0", "--device", "cpu", *data]
    old = [(teacher, ["-m", "reduce20", "--width", "1", "--expansion", "1", "--epochs", "1", *common]),
           (kd, ["--inherit", str(teacher.run), "--epochs", "1", *common, "--kd", "kd"])]  # what the old rows ran
    for row, argv in old:
        row.run.mkdir(parents=True)
        (row.run / "summary.json").write_text("{}")
        (row.run / "last.safetensors").write_bytes(b"")
        mark_done(row.run, argv)
    assert reproduce.finished(teacher) and reproduce.finished(kd)
    scratch.run.mkdir(parents=True)
    (scratch.run / "args.json").write_text(json.dumps({"argv": ["-m", "reduce20", "--width", "1", "--expansion",
                                                                 "0", "--epochs", "2", *common]}))
    (scratch.run / "train_state.pt").write_bytes(b"")
    assert reproduce.runner.resumable(scratch)
    mark_done(kd.run, [*old[1][1][:-1], "dkd"])  # another loss: not this row's run
    assert not reproduce.finished(kd)
    mark_done(kd.run, ["--no-such-option"])  # a record no parser reads: not finished, and no message
    assert not reproduce.finished(kd)


def test_a_table_row_naming_an_option_no_spec_has_fails_at_import(monkeypatch):
    from models.errors import ConfigError
    from train.reproduce import specs

    assert specs.check_tables() > 600  # every table, budget and seed: built and validated when imported
    with pytest.raises(ConfigError, match="no option 'epoch'"):
        RunSpec.of(Fresh("reduce20"), epoch=3)
    monkeypatch.setitem(specs.ROW_BUILDERS, "bad", lambda args: [
        reproduce.Row("r", "g", RunSpec.of(Inherit("t", lambda_epochs=2.0), epochs=3))])
    with pytest.raises(ConfigError, match="--lora-rank"):  # a value no run takes (lambda without LoRA) fails too
        specs.check_tables()


def test_jobs_leave_a_row_that_another_process_trains_and_say_so(tmp_path):
    """A concurrent `train.reproduce` (or a user's command) holding a row's lock: that row is "[busy]", not
    "[failed]"; the rows that inherit from it wait; the others train; the message says to run it again later."""
    from train.rundir import mark_done

    teacher, scratch, kd = reproduce.cifar10_rows(reproduce.build_parser().parse_args(
        smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")))
    started = []

    class Job:
        def __init__(self, row):
            started.append(row.run.name)
            self.row = row

        def poll(self):
            self.row.run.mkdir(parents=True, exist_ok=True)
            (self.row.run / "summary.json").write_text("{}")
            (self.row.run / "last.safetensors").write_bytes(b"")
            mark_done(self.row.run, self.row.spec.record())
            return 0

    log: list[str] = []
    with RunDir(teacher.run, overwrite=True).open():  # another process trains the teacher row
        with pytest.raises(reproduce.RowsFailed, match=r"1 of 3 rows are being trained by another process \(\S+\), "
                           r"and 1 inherit from them"):
            reproduce.train_parallel([teacher, scratch, kd], [], 2, "cpu", log.append, poll_s=0,
                                     launch=lambda a, row, slot, j, d: Job(row))
    assert started == [scratch.run.name] and reproduce.finished(scratch)
    assert f"[busy] {teacher.run.name}: another process is training it; not started here" in log
    assert any(line.startswith(f"[not started] {kd.run.name}") for line in log)
    assert not any(line.startswith("[failed]") for line in log)


def refused(argv: list[str], capsys, monkeypatch) -> str:
    """The one line ``error: ...`` that ``argv`` stops with (exit code 2), before any row trains."""
    monkeypatch.setattr(reproduce.tables, "train_row", lambda *a: pytest.fail("a row trained before the error"))
    monkeypatch.setattr(reproduce.tables, "train_parallel", lambda *a: pytest.fail("rows trained before the error"))
    with pytest.raises(SystemExit) as e:
        reproduce.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("extra, words", [
    (["--seeds", "0", "0"], "--seeds 0 0 names seed 0 twice; pass each seed once"),
    (["--models", "reduce20", "reduce20"], "--models reduce20 reduce20 names model reduce20 twice"),
    (["--recipes", "ours", "paper", "ours"], "--recipes ours paper ours names recipe ours twice"),
    (["--widths", "1", "1"], "--widths 1 1 names width 1 twice"),
])
def test_a_value_given_twice_is_refused_not_counted_twice(tmp_path, capsys, monkeypatch, extra, words):
    models_ = [] if "--models" in extra else ["--models", "reduce20"]
    for plan in ([], ["--plan"]):  # the plan would list each of its rows twice
        err = refused(smoke_argv("cifar10-reducenet", tmp_path, *models_, *extra, *plan), capsys, monkeypatch)
        assert words in err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


@pytest.mark.parametrize("option, path, words", [
    ("--results", "afile", "--results {} is a file; pass a folder"),
    ("--results", "afile/sub", "--results {}/sub lies inside the file {}; pass a folder"),
    ("--runs", "afile", "--runs {} is a file; pass a folder"),
])
def test_a_results_or_runs_folder_that_cannot_be_made_is_refused_before_training(tmp_path, capsys, monkeypatch,
                                                                                  option, path, words):
    (tmp_path / "afile").write_text("mine")
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper")
    argv[argv.index(option) + 1] = str(tmp_path / path)
    err = refused(argv, capsys, monkeypatch)
    assert words.format(tmp_path / "afile", tmp_path / "afile") in err
    assert (tmp_path / "afile").read_text() == "mine" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("table, names, words", [
    ("cifar10-reducenet", ["reduce20", "reduce21"], "--models: unknown model 'reduce21': did you mean reduce32, "
                                                    "reduce20, reduce110?"),
    ("cifar10-reducenet", ["pyramid_vgg19"], "--models pyramid_vgg19: cifar10-reducenet cannot train it; it takes "
                                             "reduce_mobilenetv2, reduce20"),
    ("cifar100-kd", ["reduce44"], "cifar100-kd cannot train it; it takes reduce56, reduce20, reduce110, reduce32"),
    ("trim", ["reduce20", "reduce56"], "trim trims one model; pass one"),
    ("grow", ["torchvision:resnt18"], "unknown model 'torchvision:resnt18': did you mean torchvision:resnet18"),
    ("pyramid", ["reduce20"], "the models of pyramid are fixed; leave --models out"),
])
def test_models_a_table_cannot_train_are_refused_before_anything_trains(tmp_path, capsys, monkeypatch, table, names,
                                                                          words):
    for plan in ([], ["--plan"]):
        err = refused(smoke_argv(table, tmp_path, "--models", *names, *plan), capsys, monkeypatch)
        assert words in err
    assert not (tmp_path / "runs").exists()


def test_a_row_whose_teacher_row_has_not_finished_and_is_not_selected_is_refused(tmp_path, capsys, monkeypatch):
    from train.rundir import mark_done

    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper", "--rows", "*-kd")
    teacher, scratch, kd = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))
    for jobs in ("1", "2"):  # with --jobs the job would fail, and "run the same command again" fail the same way
        err = refused([*argv, "--jobs", jobs], capsys, monkeypatch)
        assert (f"--rows selects {kd.run.name}, which starts from the row {teacher.run.name}; that row has not "
                f"finished and --rows leaves it out: train it first (--rows '{teacher.run.name}', or the same "
                "command without --rows)") in err
    assert not (tmp_path / "runs").exists()
    assert "0 of 1 rows finished" in run([*argv, "--plan"])  # the plan says what there is, and trains nothing
    teacher.run.mkdir(parents=True)
    with RunDir(teacher.run, overwrite=True).open():  # another process trains the teacher row now
        assert "another process is training it now: run this when it has finished" in refused(argv, capsys,
                                                                                                monkeypatch)
    (teacher.run / "summary.json").write_text("{}")
    (teacher.run / "last.safetensors").write_bytes(b"")
    mark_done(teacher.run, teacher.spec.record())  # a finished teacher row: its student may train alone
    reproduce.tables._check_inherited([kd], [teacher, scratch, kd])


def test_plan_says_seconds_for_epochs_that_take_less_than_one(tmp_path):
    from train.reproduce.runner import row_state

    row = spec_row("r", tmp_path / "r", epochs=4)
    row.run.mkdir()
    (row.run / "args.json").write_text(json.dumps({"asked": row.spec.record()}))
    (row.run / "train_state.pt").write_bytes(b"")
    (row.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n1,50,0.31\n")
    assert row_state(row) == "resumes (1/4 epochs, about 1 s left at 0.31 s an epoch)"
    (row.run / "metrics.csv").write_text("epoch,test_acc,epoch_s\n1,50,4.2\n")
    assert row_state(row) == "resumes (1/4 epochs, about 13 s left at 4.2 s an epoch)"
    assert reproduce._time_left([row], [12.6], 1) == "about 13 s of training left, rows one after another"


def test_the_header_counts_the_training_set_and_the_images_an_epoch_trains_on(tmp_path):
    rows = [spec_row(f"r{i}", tmp_path / f"r{i}") for i in range(2)]
    rows[0].run.mkdir()
    (rows[0].run / "args.json").write_text(json.dumps({"inputs": {"data": {"train": 200, "test": 40}}}))
    for r, per_epoch in zip(rows, (128, 128)):
        r.result = {"data": "d", "train_images": per_epoch, "test_images": 40, "hardware": "h", "commits": ["c"]}
    args = reproduce.build_parser().parse_args(["cifar10-reducenet", "--subset", "200"])
    data = reproduce._header("cifar10-reducenet", args, rows, "1 + 1 epochs")[1]
    assert data == ("- Data: d; 200 train / 40 test images; 128 of 200 training images per epoch (last partial batch "
                    "dropped).")
    rows[1].result["train_images"] = 192  # another row's batch of 64
    assert "; 128 or 192 of 200 training images per epoch (last partial batch dropped, by batch size)." in (
        reproduce._header("cifar10-reducenet", args, rows, "1 + 1 epochs")[1])
    for r in rows:
        r.result["train_images"] = 200  # every image in every epoch: nothing to add
    assert reproduce._header("cifar10-reducenet", args, rows, "1 + 1 epochs")[1] == (
        "- Data: d; 200 train / 40 test images.")


def test_a_checkpoint_beside_the_rows_is_scored_on_their_test_images(tmp_path):
    """A reference line (original-stage2's published checkpoints) is measured on the test images of the rows it
    stands beside: the subset's, drawn with each row's seed, not the whole test set."""
    argv = smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper", "--seeds", "1")
    teacher = reproduce.cifar10_rows(reproduce.build_parser().parse_args(argv))[0]
    summary = reproduce.train_row(teacher, lambda m: None)
    report = reproduce.tables._evaluate(teacher.run / "last.safetensors", teacher.spec.data.data_dir, "cpu",
                                        teacher.spec.data.subset, teacher.seed)
    assert report["test_acc"] == pytest.approx(summary["last_test_acc"])
    assert report["count"] == summary["test_images"]
    assert summary["test_images"] < 100  # the subset's, not the 1017 of the whole (exact subset) test set


def test_a_batch_larger_than_the_data_names_what_reproduce_can_change(tmp_path, capsys):
    """The recipes' batch is 128 and reproduce has no --batch-size: too few images say to give it more (the
    loader's own advice named --batch-size)."""
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        reproduce.main(smoke_argv("cifar10-reducenet", tmp_path, "--models", "reduce20", "--recipes", "paper",
                                  "--subset", "100"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "trains at batch 128, but the data gives 100 training images per process" in err
    assert "--batch-size" not in err and "a larger --subset" in err


def test_bench_says_its_defaults_and_refuses_a_pack_mode_without_pack(capsys):
    from train import bench

    with pytest.raises(SystemExit):
        bench.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: reduce20 reduce56)" in out and "(default: 20)" in out and "(default: processes)" in out
    assert "(default: False)" not in out and "[]" not in out
    with pytest.raises(SystemExit) as e:
        bench.main(["--pack-mode", "streams", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "add --pack N" in err


def test_bench_refuses_a_model_it_cannot_time_before_timing_the_others(capsys):
    from train import bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "reduce20", "bogus", "--steps", "2", "--batch-size", "16", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == "" and err.startswith("error: --models bogus: bench times ReduceNet's"), err


@pytest.mark.skipif(torch.cuda.is_available(), reason="--device auto picks the GPU there")
def test_a_row_asked_for_as_the_machine_would_default_is_the_same_run(monkeypatch, tmp_path):
    """The table's own "Generated by" command (no --device, so auto; data from $REDUCENET_DATA) named every finished
    row "made by another spec" and retrained it: on this machine auto is the CPU, and no --data-dir is that folder."""
    from train.reproduce.runner import _same

    monkeypatch.setenv("REDUCENET_DATA", str(CIFAR10))
    done = RunSpec.of(Fresh("reduce20"), epochs=2, device="cpu", data_dir=str(CIFAR10), out="r").record()
    assert _same(done, RunSpec.of(Fresh("reduce20"), epochs=2, out="r").record())
    assert _same({"chain": [done]}, {"chain": [RunSpec.of(Fresh("reduce20"), epochs=2, out="r").record()]})
    for other in ({"device": "cuda"}, {"data_dir": str(tmp_path)}, {"epochs": 3}):
        assert not _same(done, RunSpec.of(Fresh("reduce20"), **{"epochs": 2, **other}, out="r").record()), other


def test_a_header_names_every_hardware_its_rows_ran_on_and_options_a_table_ignores_are_refused(tmp_path, capsys):
    """Rows trained on 2 threads and (under --jobs 2) on 1 thread were all labelled with the first row's hardware;
    --image-size and --widths were accepted by tables that ignore them, and printed in the header."""
    import argparse

    from train.reproduce.tables import _header

    rows = [spec_row(f"r{i}", tmp_path / f"r{i}") for i in range(3)]
    for row, threads in zip(rows, (2, 1, 1)):
        row.result = {"hardware": f"CPU X, {threads} threads", "data": "D", "train_images": 8, "test_images": 2}
    args = argparse.Namespace(budget="smoke", seeds=[0], subset=None, models=None, image_size=None, data_dir=None,
                              device="auto")
    hardware = next(line for line in _header("trim", args, rows, "b") if line.startswith("- Hardware"))
    assert hardware.startswith("- Hardware: CPU X, 2 threads; CPU X, 1 threads;")
    for extra in (["trim", "--image-size", "64"], ["trim", "--widths", "2"]):
        with pytest.raises(SystemExit) as e:
            reproduce.main([*extra, "--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "not trim: leave it out" in err


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"{ORIGINAL} is absent")
def test_a_teacher_converted_before_hashes_were_recorded_is_found_by_its_tensors(tmp_path):
    """A conversion that records no SHA-256 was compared by path: the same original moved elsewhere was refused."""
    import shutil

    from models.checkpoint import save_checkpoint
    from models.convert import from_reducenet_original
    from models.weights import read_state_dict
    from train.reproduce.tables import _check_converted_from

    teacher = ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth"
    dest = save_checkpoint(from_reducenet_original(read_state_dict(teacher), str(teacher)), tmp_path / "t",
                           {"converted_from": "/where/it/was/teacher.pth"})
    shutil.copy(teacher, tmp_path / "moved.pth")
    _check_converted_from(dest, tmp_path / "moved.pth")
    with pytest.raises(ConfigError):
        _check_converted_from(dest, ORIGINAL / "reduce20_cifar10_e1_w1_student.pth")
