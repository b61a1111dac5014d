"""Typed run specs (train/spec.py) and the one pipeline (train/pipeline.py): JSON, --config, resume, the README."""
from __future__ import annotations

import contextlib
import io
import json
import re

import pytest
import torch
from safetensors.torch import load_file

import models
from models.errors import ConfigError
from train import pipeline, stage1, stage2
from train.spec import (DataSpec, Distil, Fresh, Inherit, LossSpec, OptimSpec, Pyramid, RunSpec, RuntimeSpec, Trim,
                        differences)

from _shared import CIFAR10, ROOT, SHARED, one_line

if not (CIFAR10 / "cifar-10-batches-py").is_dir():
    pytest.skip(f"{CIFAR10} is absent (set REDUCENET_SHARED_DATA to the shared data folder)", allow_module_level=True)

TINY = ["-m", "reduce20", "--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--epochs", "2",
        "--device", "cpu"]


@pytest.fixture(autouse=True)
def _isolated(isolated_cache):
    yield


def quiet(main, argv):
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


def test_a_spec_round_trips_through_json():
    spec = RunSpec(Inherit("runs/t", lora_rank=4, lora_targets=("layer*.conv1",), lambda_epochs=2.0),
                   DataSpec(dataset="cifar10", subset=100), OptimSpec(epochs=3, milestones=(0.3, 0.6)),
                   LossSpec(kd="dkd", feature_kd="at", feature_layers=("layer2", "layer3")),
                   RuntimeSpec(device="cpu", amp=False), recipe="reducenet-paper", out="runs/s", export=False)
    again = RunSpec.from_json(spec.to_json())
    assert again == spec and again.kind == "inherit" and again.stage == "stage2"
    assert RunSpec.from_json(RunSpec(Distil("t", "reduce20")).to_json()).derive == Distil("t", "reduce20")
    trimmed = RunSpec(Trim("t", 2.0, by="params", round_to=8), optim=OptimSpec(epochs=0))
    assert RunSpec.from_json(trimmed.to_json()) == trimmed.validate() and trimmed.stage == "trim"


@pytest.mark.parametrize("record, words", [
    ({"derive": {"kind": "fresh", "model": "reduce20", "depth": 3}}, "'depth'"),
    ({"derive": {"kind": "grow"}}, "'grow'"),
    ({"derive": {"kind": "fresh"}, "optim": {"lr": 0.1, "momentum": 0.8}}, "spec optim has no field 'momentum'"),
    ({"derive": {"kind": "inherit"}}, "spec derive"),
    ({"derive": []}, "'derive' object"),
])
def test_a_bad_spec_is_one_line_naming_the_field(record, words):
    with pytest.raises(ConfigError) as e:
        RunSpec.from_dict(record)
    assert words in one_line(e)


@pytest.fixture
def refused(tmp_path, monkeypatch):
    """``refused(spec_of)``: the one-line ConfigError with which :func:`train.pipeline.run` refuses the spec
    ``spec_of(out)`` before it loads anything (a spec that got past fails the test rather than train), asserting
    that nothing was written (no run directory, nothing in ``tmp_path``)."""
    def past(spec, *args):
        raise AssertionError(f"run() took the spec and went on to load its teacher and data: {spec}")

    for name in ("_train_fresh", "_train_student", "_train_trimmed", "_train_level"):
        monkeypatch.setattr(pipeline, name, past)

    def refuse(spec_of) -> str:
        out = tmp_path / "run"
        with pytest.raises(ConfigError) as e:
            pipeline.run(spec_of(str(out)))
        assert not out.exists() and not any(tmp_path.iterdir())
        return one_line(e)

    return refuse


def from_json(out: str, **parts) -> RunSpec:
    """The spec of a --config file holding ``parts`` (``optim={"epochs": "2"}``), of a fresh reduce20 by default."""
    return RunSpec.from_json(json.dumps({"derive": {"kind": "fresh", "model": "reduce20"}, **parts, "out": out}))


@pytest.mark.parametrize("spec_of, words", [
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), epochs=1.5, out=out),
                 "--epochs 1.5 is not valid: pass a whole number", id="epochs"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), batch_size=64.0, out=out),
                 "--batch-size 64.0 is not valid: pass a whole number", id="batch_size"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), seed=1.5, out=out),
                 "--seed 1.5 is not valid: pass a whole number", id="seed"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), workers=True, out=out),
                 "--workers True is not valid: pass a whole number", id="workers-bool"),
    pytest.param(lambda out: RunSpec.of(Pyramid("runs/vgg", "svgg17_forward", hint_epochs=0.5), out=out),
                 "--hint-epochs 0.5 is not valid: pass a whole number", id="hint_epochs"),
    pytest.param(lambda out: RunSpec.of(Trim("t", 2, calibrate_batches=2.5), out=out),
                 "--calibrate-batches 2.5 is not valid: pass a whole number", id="calibrate_batches"),
    pytest.param(lambda out: RunSpec.of(Inherit("t", lora_rank=1.5), out=out),
                 "--lora-rank 1.5 is not valid: pass a whole number", id="lora_rank"),
    pytest.param(lambda out: RunSpec.of(Fresh(20), out=out), "--model 20 is not valid: pass a string", id="model"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20", width=float("nan")), out=out),
                 "--width nan is not valid: pass a finite number", id="width-nan"),
    pytest.param(lambda out: from_json(out, optim={"epochs": "2"}),
                 "--epochs '2' is not valid: pass a whole number", id="json-epochs"),
    pytest.param(lambda out: from_json(out, optim={"lr": "0.1"}),
                 "--lr '0.1' is not valid: pass a finite number", id="json-lr"),
    pytest.param(lambda out: from_json(out, data={"batch_size": None}),
                 "--batch-size None is not valid: pass a whole number", id="json-batch_size"),
    pytest.param(lambda out: from_json(out, optim={"milestones": 0.5}),
                 "--milestones 0.5 is not valid: pass a list of finite numbers", id="json-milestones"),
    pytest.param(lambda out: from_json(out, optim={"milestones": [0.5, "0.75"]}),
                 "--milestones 0.5 '0.75' is not valid: pass a list of finite numbers", id="json-milestone"),
])
def test_a_field_of_the_wrong_type_is_one_line_naming_its_option(spec_of, words, refused):
    """A count that is not a whole number, a number that is a string (they failed after the data loaded, with a
    traceback naming no option, or ran on: 2.5 calibration batches calibrated on every batch) is refused first."""
    assert words in refused(spec_of)


@pytest.mark.parametrize("spec_of, words", [
    pytest.param(lambda out: from_json(out, runtime={"amp": "false"}),
                 "--amp 'false' is not valid: pass true or false", id="json-amp"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), nesterov="no", out=out),
                 "--nesterov 'no' is not valid: pass true or false", id="nesterov"),
    pytest.param(lambda out: RunSpec.of(Fresh("reduce20"), compile=1, out=out),
                 "--compile 1 is not valid: pass true or false", id="compile"),
    pytest.param(lambda out: from_json(out, export="no"), "export 'no' is not valid: pass true or false",
                 id="json-export"),
])
def test_a_flag_takes_only_true_or_false(spec_of, words, refused):
    """``"amp": "false"`` in a --config spec ran with bf16 autocast (the string is true): a flag takes a bool."""
    assert words in refused(spec_of)


@pytest.mark.parametrize("level", ["svgg17", "svgg99_forward", "pyramid_vgg19"])
def test_a_pyramid_level_is_one_of_the_chain_s_full_names(level, refused):
    """An unknown or short level was a KeyError traceback once the teacher and the data had loaded."""
    line = refused(lambda out: RunSpec.of(Pyramid("runs/vgg", level), out=out))
    assert f"Pyramid level {level} is not valid: pass a full level name" in line
    assert "svgg17_forward" in line and "svgg5_backward" in line
    line = refused(lambda out: RunSpec.of(Pyramid("runs/vgg", "svgg17_forward", loss="hint"), out=out))
    assert "--loss hint is not valid: pass one of two-stage" in line


def test_a_run_spec_s_parts_are_of_their_types(refused):
    """``RunSpec(derive, OptimSpec(...))`` passes the optimisation as the data: it passed validate() and failed later
    with an AttributeError."""
    line = refused(lambda out: RunSpec(Inherit("runs/t", lora_rank=4), OptimSpec(epochs=1), out=out))
    assert "a run spec's data must be a DataSpec, not OptimSpec" in line and "data=DataSpec(...)" in line
    line = refused(lambda out: RunSpec(OptimSpec(epochs=1), out=out))
    assert "a run spec's derive (its first argument) must be one of Fresh, Inherit" in line


def test_the_pipeline_s_docstring_example_builds_valid_specs(monkeypatch):
    """train/pipeline.py's example (it passed OptimSpec as the student's data), run with a ``run`` that only
    validates what it is given."""
    code = re.search(r"::\n\n(.*)", pipeline.__doc__, re.S).group(1)
    asked = []
    monkeypatch.setattr(pipeline, "run", lambda spec: asked.append(spec.validate()))
    exec(compile("\n".join(line[4:] for line in code.splitlines()), "train/pipeline.py", "exec"), {})
    assert [(s.kind, s.optim.epochs, s.data.subset) for s in asked] == [("fresh", 2, 256), ("inherit", 1, 256)]


@pytest.mark.parametrize("options, words", [
    ({"kd": "dkd", "kd_T": 3.0, "feature_kd": "fitnet"}, "--kd dkd is a distillation option, but a model trained "
                                                         "from its initialisation"),
    ({"kd_T": 3.0}, "--kd-T 3.0 is a distillation option"),
    ({"feature_kd": "at"}, "--feature-kd at is a distillation option"),
    ({"kd": "none"}, "--kd none is a distillation option"),
])
def test_a_fresh_run_refuses_loss_options_it_would_ignore(options, words, refused):
    """A model trained from its initialisation learns from cross-entropy alone: loss options were recorded in its
    spec and did nothing. The recipe's own values (which a resolved spec.json holds) still pass."""
    assert words in refused(lambda out: RunSpec.of(Fresh("reduce20"), **options, out=out))
    for recipe in ("ours", "reducenet-paper"):
        for model in ("reduce20", "torchvision:resnet18"):
            resolved = RunSpec.of(Fresh(model), recipe=recipe, out="r").with_recipe()
            assert RunSpec.from_json(resolved.to_json()).validate() == resolved
    assert RunSpec.of(Inherit("t"), **options).validate()  # a taught student takes them


@pytest.mark.parametrize("options, words", [
    ({"kd": "foo"}, "--kd foo is not valid: pass one of kd, dkd, mse, none"),
    ({"feature_kd": "foo"}, "--feature-kd foo is not valid: pass none or one of fitnet, at, semckd"),
    ({"kd_reduction": "sum"}, "--kd-reduction sum is not valid: pass one of batchmean, mean"),
])
def test_an_unknown_loss_is_refused_before_the_run(options, words, refused):
    """An unknown loss name passed validate() and was refused only inside run() (after the teacher loaded)."""
    assert words in refused(lambda out: RunSpec.of(Distil("t", "reduce20"), **options, out=out))


def test_a_string_or_list_in_a_tuple_field_is_the_tuple():
    """``feature_layers="layer3"`` was iterated letter by letter; a list inside a derivation made a spec that does
    not hash and that differs from itself read back from JSON. Records are those of the tuples."""
    named = RunSpec.of(Inherit("t"), feature_kd="at", feature_layers="layer3", teacher_layers=["layer2"])
    assert (named.loss.feature_layers, named.loss.teacher_layers) == (("layer3",), ("layer2",))
    direct = RunSpec(Inherit("t", lora_rank=2, lora_targets=["layer1*"]), loss=LossSpec(feature_layers="layer3"))
    assert direct.derive.lora_targets == ("layer1*",) and direct.loss.feature_layers == ("layer3",)
    assert hash(direct) and RunSpec.from_json(direct.to_json()) == direct
    grown = Fresh("reduce20", grow=1, grow_targets="layer1*")
    assert grown.grow_targets == ("layer1*",) and RunSpec(grown).validate().derive == grown
    assert RunSpec.from_json(json.dumps({"derive": {"kind": "distil", "teacher": "t", "model": "reduce20",
                                                    "lora_rank": 2, "lora_targets": "layer1*"}})).derive == \
        Distil("t", "reduce20", lora_rank=2, lora_targets=("layer1*",))
    assert named.record() == RunSpec.of(Inherit("t"), feature_kd="at", feature_layers=("layer3",),
                                        teacher_layers=("layer2",)).record()


def test_resume_refuses_only_fields_that_shape_the_run():
    spec = RunSpec(Fresh("reduce20"), optim=OptimSpec(epochs=3, lr=0.1), runtime=RuntimeSpec(device="cpu"))
    old = spec.to_dict()
    assert differences(old, RunSpec(Fresh("reduce20"), optim=OptimSpec(epochs=3, lr=0.01),
                                    runtime=RuntimeSpec(device="cuda", compile=True), out="elsewhere")) == []
    changed = RunSpec(Fresh("reduce32"), optim=OptimSpec(epochs=4, lr=0.1), data=DataSpec(batch_size=64))
    assert sorted(differences(old, changed)) == ["--batch-size 64 (run: 128)", "--epochs 4 (run: 3)",
                                                 "--model reduce32 (run: reduce20)"]


@pytest.mark.e2e
def test_config_reruns_a_run_exactly(tmp_path):
    """``--config RUN --out NEW`` trains the same run again: the same weights and metrics, bit for bit."""
    first, again = tmp_path / "first", tmp_path / "again"
    quiet(stage1.main, [*TINY, "--out", str(first)])
    spec = json.loads((first / "spec.json").read_text())
    assert spec["derive"] == {"kind": "fresh", "model": "reduce20", "expansion": 1, "width": 1, "weights": None,
                              "init": "kaiming", "grow": None, "grow_targets": None}  # resolved: the recipe's init,
    # the zoo's defaults
    assert spec["optim"]["lr"] == 0.1 and spec["data"]["loader"] == "memory"
    quiet(stage1.main, ["--config", str(first), "--out", str(again)])
    a, b = load_file(str(first / "last.safetensors")), load_file(str(again / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda text: [line.rsplit(",", 2)[0] for line in text.splitlines()]  # noqa: E731 (images/s, epoch_s)
    assert drop((first / "metrics.csv").read_text()) == drop((again / "metrics.csv").read_text())
    # an option given beside --config wins over the spec's
    quiet(stage1.main, ["--config", str(first), "--out", str(tmp_path / "three"), "--epochs", "1"])
    assert json.loads((tmp_path / "three" / "spec.json").read_text())["optim"]["epochs"] == 1


@pytest.mark.e2e
def test_config_of_another_kind_or_command_is_one_line(tmp_path, capsys):
    quiet(stage1.main, [*TINY, "--epochs", "1", "--out", str(tmp_path / "t")])
    for main, argv, words in ((stage2.main, ["--config", str(tmp_path / "t")], "python -m train.stage1"),
                              (stage1.main, ["--config", str(tmp_path / "nothing")], "cannot read"),
                              (stage1.main, ["--config", str(tmp_path / "t" / "metrics.csv")], "not JSON")):
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err, err


@pytest.mark.e2e
def test_a_run_made_before_specs_still_resumes(tmp_path, capsys):
    """A run directory without spec.json (written before specs existed) resumes by its recorded options."""
    run = tmp_path / "old"
    quiet(stage1.main, [*TINY, "--epochs", "1", "--out", str(run)])
    (run / "spec.json").unlink()
    record = json.loads((run / "args.json").read_text())
    del record["spec"]
    (run / "args.json").write_text(json.dumps(record))
    # another --epochs is refused by its name, the same command resumes
    capsys.readouterr()  # the first run's own output
    with pytest.raises(SystemExit) as e:
        stage1.main([*TINY, "--out", str(run), "--resume"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--epochs 2" in err, err
    summary = quiet(stage1.main, [*TINY, "--epochs", "1", "--out", str(run), "--resume"])
    assert summary["last_epoch"] == 1


def readme_snippet(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.e2e
def test_the_readme_trains_from_python_as_written(tmp_path, monkeypatch):
    """The README's "Training from Python" snippet, run as it stands, with DATA and RUNS pointed here."""
    code = readme_snippet("## Training from Python")
    line = next(x for x in code.splitlines() if x.startswith("DATA, RUNS = "))
    code = code.replace(line, f"DATA, RUNS = {str(CIFAR10)!r}, {str(tmp_path)!r}")
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()) as out:
        exec(compile(code, "README.md", "exec"), namespace)
    teacher, student, deploy = namespace["teacher"], namespace["student"], namespace["deploy"]
    assert teacher["last_epoch"] == 2 and student["last_epoch"] == 2
    assert abs(student["fused_test_acc"] - student["last_test_acc"]) <= 2 * 100 / student["test_images"]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in deploy.modules())
    for run in ("py-teacher", "py-student"):
        spec = RunSpec.from_json((tmp_path / run / "spec.json").read_text())
        assert spec.out == str(tmp_path / run)
        command = json.loads((tmp_path / run / "args.json").read_text())["command"]
        assert command.endswith(f"--config {tmp_path / run / 'spec.json'}")  # the command that repeats it
    assert str(student["last_test_acc"]) in out.getvalue()
    assert isinstance(models.load_checkpoint(tmp_path / "py-student"), torch.nn.Module)


@pytest.mark.parametrize("module", ["stage1", "stage2", "trim", "pyramid"])
def test_help_reads_every_default_from_the_recipes_and_the_specs(module):
    """One place per default: what a recipe sets, --help says from train/recipes.py for that command's stage;
    every other option's default is the spec dataclass's."""
    import importlib

    from train.recipes import RECIPES, STAGES

    cli = importlib.import_module(f"train.{module}")
    stage = STAGES[["stage1", "stage2", "trim", "pyramid"].index(module)]
    parser = cli.build_parser()
    text = " ".join(parser.format_help().split())
    values = {name: RECIPES[name](stage)["lr"] for name in RECIPES}
    assert f"ours {values['ours']:g}, reducenet-paper {values['reducenet-paper']:g}" in text
    defaults = {a.dest: a.default for a in parser._actions}
    data, optim = DataSpec(), OptimSpec()
    assert (defaults["batch_size"], defaults["workers"], defaults["loader"]) == (
        data.batch_size, data.workers, data.loader)
    assert (tuple(defaults["milestones"]), defaults["gamma"], defaults["seed"], defaults["nesterov"]) == (
        optim.milestones, optim.gamma, optim.seed, optim.nesterov)
    assert all(defaults[f] is None for f in ("lr", "wd", "schedule", "warmup_epochs", "optimizer", "normalize"))


def test_any_classifier_or_image_folder_gets_a_warm_up_and_a_learning_rate_for_its_batch():
    """ours: the CIFAR zoo keeps ReduceNet's recipe; a torchvision/timm model or an image folder gets lr 0.1 per 256
    images of batch and a warm-up of 5% of the epochs (>= 1); an option given still wins."""
    zoo = RunSpec(Fresh("reduce20"), optim=OptimSpec(epochs=40)).with_recipe()
    assert (zoo.optim.lr, zoo.warmup_epochs()) == (0.1, 0.0)
    tv = RunSpec(Fresh("torchvision:resnet18"), DataSpec(batch_size=64), OptimSpec(epochs=40)).with_recipe()
    assert (tv.optim.lr, tv.warmup_epochs()) == (0.025, 2.0)
    folder = RunSpec(Fresh("reduce20"), DataSpec(dataset="imagefolder"), OptimSpec(epochs=10)).with_recipe()
    assert (folder.optim.lr, folder.warmup_epochs()) == (0.05, 1.0)
    mine = RunSpec(Fresh("torchvision:resnet18"), optim=OptimSpec(lr=0.3, warmup_epochs=0.0)).with_recipe()
    assert (mine.optim.lr, mine.warmup_epochs()) == (0.3, 0.0)
    paper = RunSpec(Fresh("torchvision:resnet18"), recipe="reducenet-paper").with_recipe()
    assert (paper.optim.lr, paper.warmup_epochs()) == (0.1, 0.0)


@pytest.mark.e2e
@pytest.mark.skipif(not (ROOT.parent / "shared" / "data" / "cifar10-jpeg.zip").is_file()
                    and not __import__("os").environ.get("REDUCENET_SHARED_DATA"), reason="needs cifar10-jpeg.zip")
def test_the_readme_walkthrough_for_your_own_image_folder_runs_as_written(tmp_path):
    """The README's "Your own image folder" block, run by bash as it stands with its variables set small: every
    step ends well and says what it does (train -> trim with a baseline -> distil with a baseline -> evaluate ONNX ->
    compare)."""
    import os
    import subprocess
    import sys
    from pathlib import PurePosixPath

    from train.data import extract_images, scan_image_tree

    tree = scan_image_tree(SHARED / "cifar10-jpeg.zip")
    chosen = {split: [(n, y) for n, y in items if int(PurePosixPath(n).stem) < k]
              for split, items, k in (("train", tree.train, 14), ("test", tree.test, 4))}
    folder = extract_images(tree, chosen, tmp_path / "my_images")
    text = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text[text.index("## Your own image folder"):], re.S).group(1)
    first = block.splitlines()[0]
    assert first.startswith("DATA=my_images SIZE=64 EPOCHS=30")
    script = block.replace(first, f"set -e; DATA={folder} SIZE=32 EPOCHS=1")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}", "OMP_NUM_THREADS": "2",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("model: torchvision:") >= 3 and "data: my_images (image folder)" in out  # each run says so
    assert "trim: from the untrimmed teacher: params" in out and "trimmed, before fine-tuning" in out
    assert out.count("with cross-entropy only, after 1 epoch each; curves:") == 2  # trim's and stage2's --baseline
    assert (tmp_path / "runs/mine-trim2/baseline.png").is_file() and (tmp_path / "runs/mine-small/baseline.png").is_file()
    assert "model.onnx: torchvision:resnet18" in out and "top-1" in out
    assert "torch.export" in out and "runs/mine-small" in out  # the comparison's rows


def test_the_losses_are_named_in_the_printed_lines_with_the_feature_loss():
    """A --feature-kd fitnet run was printed as "student (kd)", and --kd none --feature-kd at as "student (none)"."""
    from train.spec import LossSpec

    assert [LossSpec(**kw).label for kw in ({}, {"kd": "dkd", "feature_kd": "semckd"},
                                            {"kd": "none", "feature_kd": "at"}, {"kd": "none"})] == [
        "kd", "dkd + semckd", "at", "cross-entropy only"]


def test_a_spec_record_leaves_out_the_machine_s_worker_count():
    """Two machines with other core counts ask for the same run; a mark written with the whole JSON form (before
    records) compares equal after as_record."""
    from train.spec import as_record

    a = RunSpec(Fresh("reduce20"), DataSpec(workers=2))
    b = RunSpec(Fresh("reduce20"), DataSpec(workers=8))
    assert a.record() == b.record() and "workers" not in a.record()["data"]
    assert as_record(b.to_dict()) == a.record() and as_record(["--epochs", "3"]) == ["--epochs", "3"]


def test_a_run_marked_before_a_field_existed_is_the_same_run():
    """A finished run's mark written before runtime.cuda_graph existed compares equal to the spec asking for it at
    its default, and not to one asking for it."""
    from train.rundir import same_record
    from train.spec import RuntimeSpec, as_record

    spec = RunSpec(Fresh("reduce20"))
    old = spec.record()
    del old["runtime"]["cuda_graph"]
    assert same_record(as_record(old), spec.record())
    graphed = RunSpec(Fresh("reduce20"), runtime=RuntimeSpec(cuda_graph=True))
    assert not same_record(as_record(old), graphed.record())


def test_the_readme_python_api_block_runs_as_written(tmp_path, monkeypatch):
    """The README's "In Python" block (create, grow, inherit, fuse, export, load), run as it stands."""
    monkeypatch.chdir(tmp_path)
    code = readme_snippet("## In Python")
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert "grow" not in namespace["resnet18"].config and namespace["grown"].config["grow"]["expansion"] == 1
    assert (tmp_path / "deploy" / "model.pt2").is_file() and namespace["deployed"].config["inference_mode"]
    fast, deployed = namespace["fast"], namespace["deployed"]
    assert list(fast.state_dict()) == list(deployed.state_dict()) and "getattr(" not in fast.code


def test_a_zoo_student_takes_weights_and_then_its_lora_branches(tmp_path):
    """--teacher T -m reduce20 --weights W --lora-rank 2: the weights name the convs without branches (they were
    refused as missing 90 tensors); the branches start at zero, so the student computes the weights' function."""
    from train.pipeline import build_student

    source = models.create_model("reduce20", expansion=0, num_classes=10).eval()
    weights = models.save_checkpoint(source, tmp_path / "w")
    student = build_student(Distil("unused", "reduce20", weights=str(weights), lora_rank=2), None, 10, 32).eval()
    assert student.config["lora_rank"] == 2 and any(type(m).__name__ == "LoRABranch" for m in student.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(student(x), source(x))
        reloaded = models.load_checkpoint(models.save_checkpoint(student, tmp_path / "s")).eval()
        assert torch.equal(reloaded(x), student(x))
