"""Unit tests of the training loop (train/engine.py) on tiny in-memory tasks: no data folder, no CLI, a few seconds."""
from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from train.callbacks import Callback
from train.data import ArrayData, Data, DatasetInfo, Loader
from models.errors import ConfigError
from train.engine import OPTIMIZERS, SCHEDULES, EpochSums, TrainConfig, Trainer, TrainingDiverged, evaluate
from train.tasks import Classify

from _shared import CIFAR10, ROOT, one_line

NUM_CLASSES, SIZE = 3, 8


def tiny_data(n_train: int = 48, n_test: int = 20, batch: int = 8) -> Data:
    """Random uint8 images of three classes, a batch of ``batch``: ``n_train / batch`` steps an epoch."""
    g = torch.Generator().manual_seed(0)
    info = DatasetInfo("tiny", NUM_CLASSES, ["a", "b", "c"], (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), SIZE, "memory",
                       "tiny (test)")

    def split(n: int) -> ArrayData:
        return ArrayData(torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=g, dtype=torch.uint8),
                         torch.randint(0, NUM_CLASSES, (n,), generator=g))

    return Data(Loader(split(n_train), info, batch, train=True), Loader(split(n_test), info, batch, train=False),
                info)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, NUM_CLASSES))
    model.config = {"model": "tiny"}
    return model


class NaNAt(Classify):
    """Classification whose loss is NaN at one (0-based) global step."""

    def __init__(self, model: nn.Module, at: int) -> None:
        super().__init__(model)
        self.at, self.calls = at, 0

    def forward(self, x, y):
        out = super().forward(x, y)
        self.calls += 1
        return {**out, "loss": out["loss"] * float("nan")} if self.calls - 1 == self.at else out


def test_epoch_sums_add_up_on_the_device_and_keep_the_first_bad_step():
    sums = EpochSums(torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    y = torch.tensor([0, 0, 0])  # two right
    sums.add(torch.tensor(1.5), logits, y, {"term": torch.tensor(0.5)})
    sums.add(torch.tensor(float("inf")), logits, y, {"term": torch.tensor(1.0)}, teacher_logits=logits)
    sums.add(torch.tensor(float("nan")), logits * float("nan"), y, {"term": torch.tensor(float("nan"))})
    done = sums.read()
    assert done["seen"] == 9 and done["correct"] == 2 + 2 + 3  # argmax takes NaN as the largest: class 0
    assert done["terms"] == {"term": pytest.approx(float("nan"), nan_ok=True)}
    assert math.isinf(done["loss"]) or math.isnan(done["loss"])
    assert done["bad"] == {"step": 1, "loss": math.inf, "logits_finite": True, "teacher_finite": True,
                           "terms_finite": {"term": True}}  # the first bad step's, not the later NaN's


def test_epoch_sums_name_a_non_finite_teacher():
    sums = EpochSums(torch.device("cpu"))
    logits, y = torch.zeros(2, 3), torch.zeros(2, dtype=torch.int64)
    sums.add(torch.tensor(0.1), logits, y, {})
    sums.add(torch.tensor(float("nan")), logits, y, {}, teacher_logits=torch.full((2, 3), float("nan")))
    assert sums.read()["bad"] == {"step": 1, "loss": pytest.approx(float("nan"), nan_ok=True),
                                  "logits_finite": True, "teacher_finite": False, "terms_finite": {}}


class FeatureOverflowAt(NaNAt):
    """Logs a feature and a logit term, as Distill does with a feature loss; at step ``at`` the feature term, and
    with it the loss, is inf while the logits stay finite."""

    def forward(self, x, y):
        out = Classify.forward(self, x, y)
        self.calls += 1
        feat = out["loss"] * (float("inf") if self.calls - 1 == self.at else 0.0)
        return {**out, "loss": out["loss"] + feat, "loss_logits": out["loss"].detach(), "loss_features": feat.detach()}


def test_a_loss_term_that_overflows_is_named_with_the_options_that_scale_it(tmp_path):
    """SemCKD diverging while the logits stay finite was blamed on --kd-T and --kd-alpha, which the run never set."""
    trainer = Trainer(FeatureOverflowAt(tiny_model(), at=2), tiny_data(), TrainConfig(epochs=1, lr=0.05), tmp_path,
                      log=lambda line: None)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    assert ("epoch 1, step 3 while the model's outputs are finite: its loss_features term overflowed; choose "
            "moderate values of --feature-weight, --lr (no epoch had finished") in one_line(e)


@pytest.mark.parametrize("sync_every", [1, 4, 1000])
def test_a_nan_stops_at_the_next_read_back_naming_its_step(tmp_path, sync_every, monkeypatch):
    """Epoch 2 has a NaN at its step 2: whatever the read-back interval, the error names that step and the
    checkpoint of epoch 1 stays as it was."""
    monkeypatch.setattr(Trainer, "sync_every", sync_every)
    data = tiny_data()  # 6 steps an epoch
    trainer = Trainer(NaNAt(tiny_model(), at=6 + 1), data, TrainConfig(epochs=3, lr=0.05), tmp_path,
                      log=lambda line: None)
    with pytest.raises(TrainingDiverged) as e:
        trainer.fit()
    msg = one_line(e)
    assert "epoch 2, step 2" in msg and "(epoch 1)" in msg and "outputs are finite" in msg, msg
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    assert state["epoch"] == 1 and len(trainer.history) == 1


def test_read_backs_come_every_sync_every_steps(tmp_path, monkeypatch):
    monkeypatch.setattr(Trainer, "sync_every", 4)
    trainer = Trainer(Classify(tiny_model()), tiny_data(n_train=80), TrainConfig(epochs=1), tmp_path)  # 10 steps
    reads = []
    original = EpochSums.read

    def counted(self):
        reads.append(int(self.steps))
        return original(self)

    monkeypatch.setattr(EpochSums, "read", counted)
    row = trainer.train_epoch(0)
    assert reads == [4, 8, 10]
    assert row["train_acc"] >= 0 and math.isfinite(row["train_loss"]) and row["images_per_s"] > 0


def test_evaluate_matches_a_direct_computation():
    data = tiny_data()
    model = tiny_model().eval()
    with torch.no_grad():
        batches = list(data.test)
        logits = torch.cat([model(x) for x, _ in batches])
        y = torch.cat([t for _, t in batches])
    got = evaluate(model, data.test, NUM_CLASSES)
    right = logits.argmax(1) == y
    assert got["count"] == len(y)
    assert got["test_acc"] == pytest.approx(100 * right.double().mean().item())
    assert got["test_loss"] == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert got["top5_acc"] == 100.0  # 3 classes
    for c in range(NUM_CLASSES):
        mine = y == c
        want = 100 * right[mine].double().mean().item() if mine.any() else float("nan")
        assert got["per_class_acc"][c] == pytest.approx(want, nan_ok=True)


def test_kernel_time_profiles_one_epoch(tmp_path):
    """bench's kernel-time column: one epoch under torch.profiler; a trace with no GPU kernels (a CPU has none) is
    the profiler's failure, which bench reports beside its numbers, not a kernel time of 0."""
    from train.bench import kernel_time

    trainer = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1), tmp_path)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    with pytest.raises(RuntimeError, match="no GPU kernels"):
        kernel_time(trainer, 0)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))  # it trained


def test_bench_refuses_a_bad_folder_before_it_loads_or_times_anything(tmp_path, monkeypatch, capsys):
    import train.bench as bench

    monkeypatch.setattr(bench, "build_data", lambda *a, **k: pytest.fail("the benchmark started"))
    (tmp_path / "a.txt").write_text("not images")
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "reduce20", "--steps", "1", "--folder", str(tmp_path / "a.txt")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and "a.txt" in err and err.count("\n") == 1


def test_bench_names_folder_not_data_dir_for_a_missing_folder(tmp_path, monkeypatch, capsys):
    """A missing --folder is told as bench's option: the data reader's message names --data-dir, not given here."""
    import train.bench as bench

    monkeypatch.setattr(bench, "build_data", lambda *a, **k: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "reduce20", "--steps", "1", "--folder", str(tmp_path / "nope.zip")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --folder ") and "nope.zip does not exist" in err, err
    assert "--data-dir" not in err and err.count("\n") == 1


@pytest.mark.parametrize("steps, batch, says", [(10, 1000, "5,438 training images; pass fewer --steps"),
                                                (1, 2, "10 classes; pass more --steps")])
def test_bench_names_its_own_options_when_steps_x_batch_does_not_fit_the_data(steps, batch, says, capsys):
    """bench times steps x batch images drawn once each: a product out of the data's range is told in bench's
    options (its subset is not the user's --subset)."""
    import train.bench as bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--models", "reduce20", "--device", "cpu", "--data-dir", str(CIFAR10), "--steps", str(steps),
                    "--batch-size", str(batch)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--subset" not in err, err
    assert f"--steps {steps} x --batch-size {batch} = {steps * batch:,} images" in err and says in err, err


def test_host_ops_are_per_step_and_largest_first():
    """bench's host side of a profile: each op's self CPU time and calls per step, the largest first, and their
    sum (where a step's wall time goes when the GPU waits)."""
    from torch.profiler import ProfilerActivity, profile

    from train.bench import host_ops

    a = torch.randn(384, 384)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(4):  # 4 steps of two matrix products and an addition
            torch.mm(a, a)
            torch.mm(a, a)
            a.add(1)
    got = host_ops(prof, 4)
    top = {name: (ms, calls) for name, ms, calls in got["top_host_ops"]}
    assert got["top_host_ops"][0][0] == "aten::mm" and top["aten::mm"][1] == 2 and top["aten::add"][1] == 1
    ms = [m for _, m, _ in got["top_host_ops"]]
    assert ms == sorted(ms, reverse=True) and got["host_ms"] >= sum(ms) > 0


class CountEpochs(Callback):
    """A callback with state: the epochs it has seen, across a resume."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_epoch_end(self, trainer, row):
        self.seen.append(int(row["epoch"]))

    def state_dict(self):
        return {"seen": list(self.seen)}

    def load_state_dict(self, state):
        self.seen = list(state["seen"])


class StopAfter(Callback):
    """Ctrl-C right after epoch ``epoch`` is saved (it runs after the run directory's writers)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_start(self, trainer, epoch):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_resume_restores_the_callbacks_state_and_ends_bit_exact(tmp_path):
    """3 epochs straight, or 1 epoch, a Ctrl-C, and --resume: the same weights, history and callback state."""
    cfg = TrainConfig(epochs=3, lr=0.05)
    straight = Trainer(Classify(tiny_model()), tiny_data(), cfg, tmp_path / "a", callbacks=[CountEpochs()],
                       log=lambda line: None)
    straight.fit()
    first = Trainer(Classify(tiny_model()), tiny_data(), cfg, tmp_path / "b", callbacks=[CountEpochs(), StopAfter(1)],
                    log=lambda line: None)
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    again = Trainer(Classify(tiny_model()), tiny_data(), cfg, tmp_path / "b", callbacks=[CountEpochs()],
                    log=lambda line: None)
    again.resume()
    assert again.epoch == 1 and again.callbacks[0].seen == [1]
    summary = again.fit()
    assert again.callbacks[0].seen == straight.callbacks[0].seen == [1, 2, 3]
    for a, b in zip(straight.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.equal(a, b)
    drop = ("images_per_s", "epoch_s")
    assert [{k: v for k, v in r.items() if k not in drop} for r in again.history] == \
        [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    assert summary["last_epoch"] == 3 and len(summary["commits"]) == 1  # one commit, recorded by both calls


def test_zero_epochs_evaluates_and_records_epoch_0(tmp_path):
    trainer = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=0), tmp_path, log=lambda line: None)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["last_epoch"] == 0 and summary["last_test_acc"] == trainer.evaluate()["test_acc"]
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert (tmp_path / "last.safetensors").is_file() and (tmp_path / "summary.json").is_file()
    assert torch.load(tmp_path / "train_state.pt", weights_only=True)["epoch"] == 0


def test_without_a_run_directory_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1))
    assert trainer.fit()["last_epoch"] == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
def test_importing_the_training_code_runs_no_git():
    """The commit is read when a run starts, not at import (the design review's finding)."""
    code = ("import subprocess\n"
            "calls = []\n"
            "real = subprocess.Popen.__init__\n"
            "def spy(self, args, *a, **k):\n"
            "    calls.append(args) if 'git' in str(args) else None\n"
            "    real(self, args, *a, **k)\n"
            "subprocess.Popen.__init__ = spy\n"
            "import train.engine, train.stage1, train.stage2, train.trim, train.pyramid, train.reproduce, train.bench\n"
            "print(calls)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]", out


def test_a_run_from_a_gpu_resumes_on_a_cpu(tmp_path):
    """The optimizer is fused on CUDA; its recorded settings must not carry a GPU's fused kernels to a CPU."""
    first = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=2), tmp_path, log=lambda line: None,
                    callbacks=[StopAfter(1)])
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    state = torch.load(tmp_path / "train_state.pt", weights_only=True)
    for group in state["optimizer"]["param_groups"]:
        group["fused"] = True  # as a CUDA run records it
    torch.save(state, tmp_path / "train_state.pt")
    again = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=2), tmp_path, log=lambda line: None)
    again.resume()
    assert all(group["fused"] is None for group in again.optimizer.param_groups)
    assert again.fit()["last_epoch"] == 2


def test_the_dkd_warm_up_is_a_task_callback_that_a_resumed_run_continues(tmp_path):
    """The DKD term's weight follows the epoch (mdistiller's warm-up) through the task's own callback, from the
    first epoch and after a resume alike; a loss without warm-up adds no callback."""
    from train.distill import DistillLoss
    from train.tasks import Distill

    class Weights(Callback):  # runs after the task's callbacks: sees the weight the epoch trains with
        def __init__(self, loss):
            self.loss, self.seen = loss, []

        def on_epoch_start(self, trainer, epoch):
            self.seen.append(self.loss.dkd_weight())

    def trainer(run, *extra):
        loss = DistillLoss("dkd", warmup_epochs=4)
        task = Distill(tiny_model(), tiny_model().eval(), loss)
        return Trainer(task, tiny_data(), TrainConfig(epochs=3, lr=0.05), run, callbacks=[Weights(loss), *extra],
                       log=lambda line: None)

    first = trainer(tmp_path, StopAfter(1))
    assert [type(cb).__name__ for cb in first.callbacks][:2] == ["DKDWarmup", "Weights"]
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    again = trainer(tmp_path)
    again.resume()
    again.fit()
    assert first.callbacks[1].seen == [0.25, 0.5] and again.callbacks[1].seen == [0.5, 0.75]
    assert Distill(tiny_model(), tiny_model(), DistillLoss("kd")).callbacks() == []


def test_training_talks_when_the_output_is_not_a_terminal(tmp_path, monkeypatch):
    """In a log file or pipe, a line with the step, loss and img/s at most every EVERY_S seconds within an epoch
    (here every step), then the epoch's own line; on a terminal the bar shows it and no such line is written."""
    from train import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.0)
    monkeypatch.setattr(progress, "is_terminal", lambda: False)
    lines: list[str] = []
    Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1), tmp_path, log=lines.append).fit()
    steps = [line for line in lines if line.startswith("epoch 1/1: ")]
    assert steps[0].startswith("epoch 1/1: 1/6 (17%, ") and "loss " in steps[0] and "img/s " in steps[0]
    assert len(steps) == 5 and lines[-1].startswith("epoch   1/1 loss")  # the last step is the epoch's line
    monkeypatch.setattr(progress, "is_terminal", lambda: True)
    lines.clear()
    Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1), tmp_path / "b", log=lines.append).fit()
    assert not [line for line in lines if line.startswith("epoch 1/1: ")]


def test_a_run_says_what_it_is_before_its_first_step_and_what_an_epoch_leaves_out(tmp_path):
    lines: list[str] = []
    Trainer(Classify(tiny_model()), tiny_data(n_train=50), TrainConfig(epochs=1), tmp_path, log=lines.append,
            metadata={"role": "student"}).fit()
    model, data, run = lines[:3]
    assert model == "model: tiny (student): 135 params, 0.01 M MACs at 8 px"
    assert data == ("data: tiny (test): 3 classes, 50 train / 20 test images at 8 px, in-memory loader; 48 of 50 "
                    "training images per epoch (last partial batch dropped)")
    assert run.startswith("run: cpu, float32, 1 epoch of 6 steps (batch 8); writes ") and str(tmp_path) in run
    lines.clear()
    Trainer(Classify(tiny_model()), tiny_data(n_train=8), TrainConfig(epochs=0), tmp_path / "zero",
            log=lines.append).fit()
    # not "0 epochs of 1 steps"
    assert lines[2].startswith("run: cpu, float32, no training (0 epochs) (batch 8)"), lines


def test_a_grown_zoo_student_is_named_by_its_growth_not_its_expansion_0(tmp_path):
    """A zoo student grown into a teacher has expansion 0 in its config: its first line says it is grown."""
    import models

    grown = models.grow(models.create_model("reduce20", num_classes=NUM_CLASSES, expansion=0), 2)
    lines: list[str] = []
    Trainer(Classify(grown), tiny_data(), TrainConfig(epochs=0), tmp_path, log=lines.append,
            metadata={"role": "teacher"}).fit()
    assert lines[0].startswith("model: reduce20 (teacher, grown e2, width 1): "), lines[0]


def test_after_a_kill_before_the_first_epoch_both_messages_say_overwrite_and_the_stale_temp_goes(tmp_path):
    """A run killed before its first checkpoint leaves args.json and a half-written temp file: a fresh start and a
    --resume both say what works (--overwrite); the run that then owns the folder removes the temp file."""
    import json as _json

    from train.rundir import RunDir, RunDirError

    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_text(_json.dumps({"argv": [], "args": {}}))
    (run / ".last.safetensors.x1y2.tmp").write_bytes(b"half")
    (run / "run.lock").write_text("pid 1\n")
    messages = []
    for resume in (False, True):
        with pytest.raises(RunDirError) as e:
            RunDir(run, resume=resume).open()
        messages.append(str(e.value))
    assert all("--overwrite" in m and "before its first epoch ended" in m for m in messages)
    assert "--resume to continue" not in messages[0]
    with RunDir(run, overwrite=True).open():
        assert not (run / ".last.safetensors.x1y2.tmp").exists()
    stale_only = tmp_path / "stale"
    stale_only.mkdir()
    (stale_only / ".metrics.csv.a.tmp").write_text("")
    with RunDir(stale_only).open():  # only a killed write's temp file: no run to protect
        assert not (stale_only / ".metrics.csv.a.tmp").exists()


def test_a_first_epoch_at_chance_with_a_test_loss_far_above_the_train_loss_says_what_to_try():
    from train.callbacks import chance_hint

    row = {"epoch": 1, "test_acc": 10.0, "test_loss": 4913.0, "train_loss": 2.3}
    hint = chance_hint(row, 10, 15)
    assert hint.startswith("hint: epoch 1 ended at chance (10.0%, chance 10.0%)") and "--lr" in hint
    assert "after 15 steps" in hint
    assert chance_hint({**row, "test_acc": 40.0}, 10, 15) is None  # learning
    assert chance_hint({**row, "test_loss": 2.5}, 10, 15) is None  # at chance but not broken: early days
    assert chance_hint({**row, "epoch": 2}, 10, 15) is None


def test_a_run_dir_whose_other_rank_failed_takes_back_its_lock_and_says_so_in_one_line(tmp_path, monkeypatch):
    """Under torchrun rank 0 opens the run directory, then waits for the others: when one of them failed (the
    barrier's connection closes), the folder is left as it was and the error is one line, not gloo's traceback."""
    import train.assemble as assemble
    from models.errors import ReduceNetError
    from train.engine import Dist

    def barrier():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(assemble.dist, "barrier", barrier)
    with pytest.raises(ReduceNetError, match="another process of this torchrun job stopped") as e:
        assemble.make_run_dir(tmp_path / "run", Dist(0, 2, 0), {"args": {}})
    assert "\n" not in str(e.value) and not (tmp_path / "run").exists()


def test_a_peer_that_stops_during_training_is_one_line_naming_what_is_kept(tmp_path, monkeypatch):
    """A rank killed mid-epoch: the others' gradient all-reduce fails, and rank 0 printed gloo's traceback."""
    from models.errors import ReduceNetError
    from train.engine import Dist

    trainer = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=3, lr=0.05), tmp_path,
                      log=lambda line: None)
    original = Trainer.train_epoch

    def train_epoch(self, epoch):
        if epoch == 1:
            self.dist = Dist(0, 2, 0)  # as under torchrun, once its peer has gone
            raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection reset by peer")
        return original(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", train_epoch)
    with pytest.raises(ReduceNetError) as e:
        trainer.fit()
    assert one_line(e).startswith("rank 0: another process of this torchrun job stopped during epoch 2 (")
    assert f"the last good checkpoint (epoch 1) in {tmp_path} is kept" in one_line(e) and "--resume" in one_line(e)
    monkeypatch.setattr(Trainer, "train_epoch", lambda self, epoch: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # any other error, alone or under torchrun, is left as it is
        Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1), tmp_path / "b", log=lambda line: None).fit()


def test_a_rank_waiting_for_rank_0_that_failed_says_so_in_one_line(monkeypatch):
    """Rank 1 waits while rank 0 loads the data first; rank 0's one-line data error left rank 1 with gloo's
    traceback (about 30 lines) instead of one line."""
    import train.assemble as assemble
    from models.errors import ReduceNetError
    from train.engine import Dist

    def barrier():
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer")

    monkeypatch.setattr(assemble.dist, "barrier", barrier)
    loaded = []
    with pytest.raises(ReduceNetError) as e:
        assemble.rank0_first(Dist(1, 2, 1), loaded.append, "data")
    assert one_line(e).startswith("rank 1: another process of this torchrun job stopped before the run started")
    assert loaded == []


def test_a_teacher_still_training_is_refused_and_an_unfinished_one_is_named(tmp_path, capsys):
    """A run still training was taught from (its checkpoint changes every epoch; the student's --resume then
    refused the changed teacher); one that stopped part-way was taught from without a word."""
    import fcntl
    import os

    import models
    from train.assemble import load_teacher_checkpoint
    from train.rundir import RunDirError

    run = tmp_path / "teacher"
    models.save_checkpoint(models.create_model("reduce20", expansion=0), run / "last",
                           metadata={"epoch": 3})
    (run / "args.json").write_text("{}")
    fd = os.open(run / "run.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(RunDirError) as e:
            load_teacher_checkpoint(run)
        assert f"the run {run} is still training; wait for it to finish, or copy its last.safetensors" in one_line(e)
    finally:
        os.close(fd)
    load_teacher_checkpoint(run)
    assert f"the run {run} did not finish; this is its checkpoint of epoch 3" in capsys.readouterr().err
    (run / "summary.json").write_text("{}")
    load_teacher_checkpoint(run)
    assert capsys.readouterr().err == ""


class CountSteps(Classify):
    """Classification that counts its forward passes (training steps)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.steps = 0

    def forward(self, x, y):
        self.steps += 1
        return super().forward(x, y)


def test_a_users_own_module_trains_without_a_run_dir_and_is_refused_with_one_before_any_step(tmp_path):
    """A plain nn.Module (no .config) trains and gets its summary without a run directory; with one, whose
    checkpoints need a .config naming the model, it is refused in one line before the first step, writing nothing."""
    def plain() -> nn.Module:
        model = tiny_model()
        del model.config
        return model

    trainer = Trainer(Classify(plain()), tiny_data(), TrainConfig(epochs=2, lr=0.05), log=lambda line: None)
    summary = trainer.fit()
    assert summary["model"] is None and summary["last_epoch"] == 2 and summary["params"] == 135
    task = CountSteps(plain())
    with pytest.raises(ConfigError) as e:
        Trainer(task, tiny_data(), TrainConfig(epochs=2, lr=0.05), tmp_path / "run", log=lambda line: None)
    msg = one_line(e)
    assert "Sequential" in msg and ".config" in msg and "models.create_model" in msg and "no run_dir" in msg, msg
    assert task.steps == 0 and not (tmp_path / "run").exists()


@pytest.mark.parametrize("field, value", [("optimizer", "adamw"), ("optimizer", "SGD"), ("schedule", "linear")])
def test_an_unknown_optimizer_or_schedule_is_refused_naming_the_valid_ones(field, value):
    """Not silently SGD or the step schedule: one line naming the valid values."""
    with pytest.raises(ConfigError) as e:
        TrainConfig(**{field: value})
    msg = one_line(e)
    valid = OPTIMIZERS if field == "optimizer" else SCHEDULES
    assert f"{field}={value!r}" in msg and ", ".join(valid) in msg, msg
    for ok in valid:  # every valid value is taken
        assert getattr(TrainConfig(**{field: ok}), field) == ok


def test_train_config_seed_is_recorded_not_applied():
    """TrainConfig.seed is a record (the pipeline seeds before it builds the model and data), as its docstring says:
    the trainer trains the same with any seed and writes it to the summary."""
    runs = [Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=1, lr=0.05, seed=seed),
                    log=lambda line: None) for seed in (0, 1)]
    summaries = [run.fit() for run in runs]
    assert [s["seed"] for s in summaries] == [0, 1]
    for a, b in zip(*(run.model.state_dict().values() for run in runs)):
        assert torch.equal(a, b)


def test_a_plain_folder_holding_a_run_is_refused_unless_resumed_or_replaced_through_a_run_dir(tmp_path):
    """A second run into a plain folder that holds a run stops before its first step, leaving the run as it was;
    resume() continues that run, RunDir(..., overwrite=True) replaces it, and a folder of other files is taken."""
    from train.rundir import RunDir, RunDirError

    run = tmp_path / "run"
    cfg = TrainConfig(epochs=1, lr=0.05)
    Trainer(Classify(tiny_model()), tiny_data(), cfg, run, log=lambda line: None).fit()
    (run / "spec.json").write_text("{}")  # what a CLI run leaves beside them
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    task = CountSteps(tiny_model())
    again = Trainer(task, tiny_data(), TrainConfig(epochs=2, lr=0.05), run, log=lambda line: None)
    with pytest.raises(RunDirError) as e:
        again.fit()
    msg = one_line(e)
    assert str(run) in msg and "train_state.pt" in msg and "empty folder" in msg and "overwrite=True" in msg, msg
    assert task.steps == 0 and {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    resumed = Trainer(Classify(tiny_model()), tiny_data(), TrainConfig(epochs=2, lr=0.05), run, log=lambda line: None)
    resumed.resume()
    assert resumed.fit()["last_epoch"] == 2 and [r["epoch"] for r in resumed.history] == [1, 2]
    with RunDir(run, overwrite=True).open() as replaced:
        fresh = Trainer(Classify(tiny_model()), tiny_data(), cfg, replaced, log=lambda line: None)
        assert fresh.fit()["last_epoch"] == 1
    assert not (run / "spec.json").exists()  # replaced whole, not mixed
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    Trainer(Classify(tiny_model()), tiny_data(), cfg, other, log=lambda line: None).fit()
    assert (other / "notes.txt").read_text() == "mine" and (other / "last.safetensors").is_file()


def test_a_model_no_checkpoint_can_hold_is_refused_before_the_first_step(tmp_path):
    """A zoo model changed by hand (its config does not say so): the first checkpoint, after an epoch of training,
    refused it; now the Trainer does, before any step, writing nothing."""
    import models

    model = models.create_model("reduce20", expansion=0)
    model.fc = nn.Linear(model.fc.in_features, 3)  # what the config does not record
    task = CountSteps(model)
    with pytest.raises(models.CheckpointError) as e:
        Trainer(task, tiny_data(), TrainConfig(epochs=1, lr=0.05), tmp_path / "run", log=lambda line: None)
    msg = one_line(e)
    assert "last.safetensors" in msg and "fc.weight is (3, 64), not (10, 64)" in msg, msg
    assert task.steps == 0 and not (tmp_path / "run").exists()
