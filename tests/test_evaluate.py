"""python -m train.evaluate, checked against the original ReduceNet's own numbers on the exact CIFAR-10 test images."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

import models
from _shared import CIFAR10, ROOT, SHARED, run_main
from models.convert import main as convert
from reparam.export import export_deploy
from train import evaluate

pytestmark = pytest.mark.e2e  # every test here trains or runs a CLI on data

ORIGINAL = SHARED / "reducenet-original"
if not (ORIGINAL.is_dir() and (CIFAR10 / "cifar-10-batches-py").is_dir()):
    pytest.skip(f"needs {ORIGINAL} and {CIFAR10}", allow_module_level=True)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    out = tmp_path_factory.mktemp("converted")
    files = [ORIGINAL / f"reduce20_cifar10_e1_w1_{r}.pth" for r in ("teacher", "student")]
    teacher, student = convert(["reducenet-original", *map(str, files), "--out", str(out)])
    return {"teacher": teacher, "student": student, "dir": out}


def run_json(*argv: str, subprocess_: bool = False) -> dict:
    """The report of ``python -m train.evaluate ARGV --json`` (with ``subprocess_``), or of its ``main`` here."""
    if subprocess_:
        proc = subprocess.run([sys.executable, "-m", "train.evaluate", *argv, "--json"], cwd=ROOT,
                              capture_output=True, text=True, env={"OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"})
    else:
        proc = run_main(evaluate.main, [*argv, "--json"])
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # stdout is the JSON report alone


@pytest.mark.parametrize("role, accuracy", [("teacher", 93.41), ("student", 93.61)])
def test_original_checkpoints_score_as_in_the_original(converted, role, accuracy):
    report = run_json(str(converted[role]), "--data-dir", str(CIFAR10), subprocess_=role == "teacher")
    assert report["count"] == 1017 and report["data"] == "CIFAR-10 (exact subset, 5438 train / 1017 test)"
    assert f"{report['test_acc']:.2f}" == f"{accuracy:.2f}"
    assert report["top5_acc"] >= report["test_acc"] and 0 < report["test_loss"] < 1
    assert report["preprocess"]["std"] == [1.0, 1.0, 1.0]  # the original did not normalise
    per_class = report["per_class_acc"]
    counts = torch.bincount(torch.tensor(_test_labels()), minlength=10).double()
    assert len(per_class) == 10
    assert math.isclose(sum(a * n for a, n in zip(per_class, counts.tolist())) / 1017, report["test_acc"], abs_tol=1e-9)


def _test_labels() -> list[int]:
    from train.data.cifar import _unpickle
    return list(_unpickle(CIFAR10 / "cifar-10-batches-py" / "test_batch")["labels"])


def test_the_fused_student_scores_the_same(converted, tmp_path):
    student = models.load_checkpoint(converted["student"])
    export_deploy(student, tmp_path / "deploy", onnx=False, torchscript=False)
    deploy = tmp_path / "deploy" / "model.safetensors"
    assert models.read_record(deploy)["config"]["inference_mode"] is True
    report = evaluate.run(evaluate.build_parser().parse_args([str(deploy), "--data-dir", str(CIFAR10)]))
    assert f"{report['test_acc']:.2f}" == "93.61"


def test_text_output_and_errors(converted, tmp_path, capsys):
    evaluate.main([str(converted["teacher"]), "--data-dir", str(CIFAR10)])
    out = capsys.readouterr().out
    assert "top-1 93.41%" in out and "1017 test images" in out and "airplane" in out
    cifar100 = ["--dataset", "cifar100", "--data-dir", str(SHARED / "cifar-100-subset")]
    for argv, words in (([str(converted["teacher"]), *cifar100], "10 classes"),
                        ([str(tmp_path / "missing.safetensors")], "no checkpoint"),
                        ([str(converted["teacher"]), "--batch-size", "0"], "--batch-size")):
        with pytest.raises(SystemExit) as e:
            evaluate.main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1 and words in err, err


@pytest.mark.skipif(not (SHARED / "cifar10-jpeg.zip").is_file(), reason="needs the CIFAR-10 JPEG zip")
def test_an_image_folder_evaluates_through_the_training_data_path(tmp_path):
    """train.evaluate reads data through the training path's entry point: in memory it scores exactly as a loader
    over the decoded test split, and a folder can stream (the streamed test transform resizes to size / 0.875 and
    centre-crops, as timm's; the in-memory one resizes: the same images, not the same pixels)."""
    from pathlib import PurePosixPath
    from train.data import Loader, extract_images, load_dataset, scan_image_tree
    from train.engine import evaluate as score

    tree = scan_image_tree(SHARED / "cifar10-jpeg.zip")
    chosen = {split: [(n, y) for n, y in items if int(PurePosixPath(n).stem) < 6]
              for split, items in (("train", tree.train), ("test", tree.test))}
    folder = extract_images(tree, chosen, tmp_path / "jpeg")
    torch.manual_seed(0)
    model = models.create_model("reduce20", expansion=0).eval()
    model.preprocess = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]}
    models.save_checkpoint(model, tmp_path / "model.safetensors")
    args = [str(tmp_path / "model.safetensors"), "--dataset", "imagefolder", "--data-dir", str(folder),
            "--batch-size", "16"]
    memory = evaluate.run(evaluate.build_parser().parse_args([*args, "--loader", "memory"]))
    _, test, info = load_dataset("imagefolder", folder, image_size=32)
    direct = Loader(test, info, 16, train=False)
    direct.set_normalization([0.5] * 3, [0.25] * 3)
    assert {k: memory[k] for k in ("test_acc", "count", "per_class_acc")} == \
        {k: v for k, v in score(model, direct, 10).items() if k in ("test_acc", "count", "per_class_acc")}
    stream = evaluate.run(evaluate.build_parser().parse_args([*args, "--loader", "stream", "--workers", "1"]))
    assert stream["count"] == memory["count"] == 60 and "streamed" in stream["data"]
    assert stream["classes"] == memory["classes"] and 0 <= stream["test_acc"] <= 100


def _reduce20(tmp_path, name: str, change=None, metadata=None, expansion: int = 0):
    """A reduce20 student (``expansion`` 0; else a teacher) checkpoint for CIFAR-10, its weights changed by
    ``change``."""
    torch.manual_seed(0)
    model = models.create_model("reduce20", expansion=expansion).eval()
    if change is not None:
        with torch.no_grad():
            change(model)
    return models.save_checkpoint(model, tmp_path / f"{name}.safetensors",
                                  {"dataset": "cifar10", **(metadata or {})})


def test_outputs_that_are_not_finite_or_classes_of_other_names_are_errors_not_accuracies(tmp_path, capsys):
    """Not "10.42%": a model whose outputs are NaN is named as such; a folder whose class names differ from the
    ones the model was trained on is refused even when the count agrees."""
    nan = _reduce20(tmp_path, "nan", lambda m: m.fc.weight.fill_(float("nan")))
    other = _reduce20(tmp_path, "other", metadata={"classes": [f"c{i}" for i in range(10)]})
    for argv, words in (([str(nan)], "not finite (NaN or inf) for 1,017 of 1,017 test images"),
                        ([str(other)], "class 0 is 'c0' there, 'airplane' here")):
        with pytest.raises(SystemExit) as e:
            evaluate.main([*argv, "--data-dir", str(CIFAR10)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and words in err, err


def test_a_recorded_data_folder_that_is_gone_is_refused_not_replaced_by_the_default(tmp_path, capsys, monkeypatch):
    """Without --data-dir, evaluate reads the data the checkpoint records; once that folder is gone it says so (as
    stage2 and trim do for a teacher's) rather than scoring $REDUCENET_DATA's or ./data's images."""
    gone = tmp_path / "moved-away"
    checkpoint = _reduce20(tmp_path, "model", metadata={"data_dir": str(gone)})
    monkeypatch.setenv("REDUCENET_DATA", str(CIFAR10))  # where the default would have led
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(checkpoint), "--subset", "100"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert err == (f"error: {checkpoint} was trained on data in {gone}, which no longer exists; pass --data-dir with "
                   "the same data\n")
    report = evaluate.main([str(checkpoint), "--subset", "100", "--data-dir", str(CIFAR10), "--json"])
    assert report["count"] == 19 and report["data_source"] == str(CIFAR10 / "cifar-10-batches-py")


@pytest.mark.parametrize("command, option", [("stage2", "--teacher"), ("stage2", "--inherit"), ("trim", "--teacher")])
def test_a_teacher_with_absurd_logits_is_named_before_distillation(command, option, tmp_path, capsys):
    """Named by the option that passed it (the message offered stage2's --inherit to trim's users)."""
    from train import stage2, trim

    huge = _reduce20(tmp_path, "huge", lambda m: m.fc.weight.mul_(1e7), expansion=1)
    extra = {("stage2", "--teacher"): ["-m", "reduce20"], ("stage2", "--inherit"): [],
             ("trim", "--teacher"): ["--reduce", "2"]}[command, option]
    with pytest.raises(SystemExit) as e:
        {"stage2": stage2.main, "trim": trim.main}[command]([
            option, str(huge), *extra, "--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the teacher's logits reach" in err and err.count("\n") == 1, err
    assert f"check {option} and --data-dir" in err, err
    assert not (tmp_path / "s").exists()


def test_every_deploy_file_evaluates_and_times_beside_its_checkpoint(converted, tmp_path, capsys):
    """model.pt2, model.ts and model.onnx are evaluated with the record beside them and score as the checkpoint;
    train.compare times them side by side with params, MACs and file size."""
    from train import compare

    student = models.load_checkpoint(converted["student"])
    report = export_deploy(student, tmp_path / "deploy")
    accs = {}
    for form in ("safetensors", "pt2", "ts", "onnx"):
        path = tmp_path / "deploy" / f"model.{form}"
        accs[form] = evaluate.run(evaluate.build_parser().parse_args([str(path), "--data-dir", str(CIFAR10)]))
    assert {f: f"{r['test_acc']:.2f}" for f, r in accs.items()} == dict.fromkeys(accs, "93.61")
    assert [r["form"] for r in accs.values()] == ["checkpoint", "torch.export", "TorchScript", "ONNX"]
    files = [str(converted["student"]), *(str(report.files[k]) for k in ("pt2", "torchscript", "onnx"))]
    rows = compare.main([*files, "--repeats", "3", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert [r["form"] for r in rows] == ["checkpoint", "torch.export", "TorchScript", "ONNX"]
    assert len({r["macs"] for r in rows}) == 1 and rows[0]["ratio_b1"] == 1.0 and all(r["bytes"] > 0 for r in rows)
    assert "ms b4" in out and "model.onnx" in out
    (tmp_path / "deploy" / "model.json").unlink()
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(tmp_path / "deploy" / "model.onnx"), "--data-dir", str(CIFAR10)])
    assert e.value.code == 2 and "model.json beside it" in capsys.readouterr().err


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """A fused student's deploy folder with model.safetensors, model.json and model.onnx."""
    out = tmp_path_factory.mktemp("deployed")
    export_deploy(models.create_model("reduce20", expansion=0), out, torchscript=False, pt2=False)
    return out


def test_compare_json_is_json_lines_alone_and_sizes_are_the_weights(deployed, monkeypatch):
    """compare --json: stdout is one JSON object per file (what it times goes to stderr, as evaluate's does); a
    record's size is its weights' (model.safetensors), not the few bytes of model.json; --threads limits the
    onnxruntime session too."""
    from train import compare

    timed = {}
    monkeypatch.setattr(compare, "measure", lambda found, *a, **k: timed.update(found) or dict.fromkeys(found, 1.0))
    threads = torch.get_num_threads()
    try:
        proc = run_main(compare.main, [str(deployed / "model.json"), str(deployed / "model.onnx"), "--repeats", "1",
                                       "--batch-size", "2", "--threads", "3", "--json"])
    finally:
        torch.set_num_threads(threads)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["form"] for r in rows] == ["checkpoint", "ONNX"] and "timing 2 file(s)" in proc.stderr
    assert [r["bytes"] for r in rows] == [(deployed / f"model.{s}").stat().st_size for s in ("safetensors", "onnx")]
    options = timed[str(deployed / "model.onnx")].session.get_session_options()
    assert options.intra_op_num_threads == 3


@pytest.mark.parametrize("second", ["model.json", "./model.json", "model.safetensors", "link"])
def test_compare_refuses_a_file_given_twice_by_any_path(deployed, tmp_path, monkeypatch, second):
    """The same weights twice (the same path, another spelling of it, a record and its .safetensors, a link) would
    be one row of a table that says it times two files: refused in one line naming both, before any timing."""
    from train import compare

    if second == "link":
        for suffix in (".safetensors", ".json"):
            (tmp_path / f"link{suffix}").symlink_to(deployed / f"model{suffix}")
        second = str(tmp_path / "link.safetensors")
    monkeypatch.chdir(deployed)
    proc = run_main(compare.main, ["model.json", second, "--repeats", "1", "--batch-size", "2"])
    assert proc.returncode == 2 and proc.stdout == "" and proc.stderr.count("\n") == 1, proc
    assert proc.stderr.startswith("error: ") and "model.json" in proc.stderr and second in proc.stderr


def test_compare_marks_a_path_it_shortens():
    """The table's file column keeps a long path's end, marked with an ellipsis so that it does not read as a path."""
    from train.compare import _fit

    path = "/work/experiments/" + "x" * 40 + "/deploy/model.onnx"
    assert _fit(path, 48) == "…" + path[-47:] and len(_fit(path, 48)) == 48
    assert _fit("runs/a/model.onnx", 48) == "runs/a/model.onnx"


def test_a_class_without_test_images_is_said_so_not_nan(monkeypatch, capsys):
    report = {"model": {"model": "torchvision:resnet18"}, "checkpoint": "runs/x", "form": "checkpoint",
              "data": "mine (image folder)", "count": 6, "test_acc": 50.0, "top5_acc": 100.0, "test_loss": 0.7,
              "classes": ["cat", "dog", "fox"], "per_class_acc": [100.0, 0.0, float("nan")]}
    monkeypatch.setattr(evaluate, "run", lambda args: report)
    evaluate.main(["runs/x"])
    assert capsys.readouterr().out.splitlines()[-1] == "per class: cat 100.0%, dog 0.0%, fox no test images"


def test_a_model_trained_at_another_size_is_evaluated_at_its_own_size_on_cifar(tmp_path, capsys):
    """A model trained on 40 px images, evaluated on CIFAR-10: its checkpoint ran silently at 32 px, and its
    programs, which take 40 px only, failed with onnxruntime's or torch.export's traceback."""
    model = models.create_model("reduce20", expansion=0).eval()
    models.save_checkpoint(model, tmp_path / "m", {"dataset": "cifar10"},
                           preprocess={"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 40, 40]})
    export_deploy(models.load_checkpoint(tmp_path / "m"), tmp_path / "deploy", onnx=False, torchscript=False)
    accs = []
    for path in (tmp_path / "m.safetensors", tmp_path / "deploy" / "model.pt2"):
        report = evaluate.run(evaluate.build_parser().parse_args([str(path), "--data-dir", str(CIFAR10),
                                                                  "--subset", "200"]))
        assert "test images at 40 px" in capsys.readouterr().out
        accs.append(report["test_acc"])
    assert accs[0] == accs[1]


def test_a_program_beside_another_export_s_record_is_refused_in_one_line(tmp_path):
    """A 3-class program beside a 10-class model.json: evaluate failed with IndexError and compare reported the
    record's model; a program exported at 32 px beside a record of 40 px failed in the reader."""
    from models.deployed import load_any

    preprocess = {"mean": [0.5] * 3, "std": [0.25] * 3, "input_size": [3, 32, 32]}
    for name, classes in (("three", 3), ("ten", 10)):
        model = models.create_model("reduce20", expansion=0, num_classes=classes).eval()
        models.save_checkpoint(model, tmp_path / name, preprocess=preprocess)
        export_deploy(models.load_checkpoint(tmp_path / name), tmp_path / name / "deploy", onnx=False)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for form in ("model.pt2", "model.ts"):
        (mixed / form).write_bytes((tmp_path / "three" / "deploy" / form).read_bytes())
        assert load_any(tmp_path / "three" / "deploy" / form).num_classes == 3
    (mixed / "model.json").write_text((tmp_path / "ten" / "deploy" / "model.json").read_text())
    for form in ("model.pt2", "model.ts"):
        with pytest.raises(models.CheckpointError, match=r"gives 3 outputs but its record \(model.json\) says 10"):
            load_any(mixed / form)
    record = json.loads((tmp_path / "three" / "deploy" / "model.json").read_text())
    record["preprocess"]["input_size"] = [3, 40, 40]
    (mixed / "model.json").write_text(json.dumps(record))
    with pytest.raises(models.CheckpointError, match=r"does not take the 40x40 px input"):
        load_any(mixed / "model.pt2")


def test_a_pytorch_file_or_a_folder_of_programs_gets_advice(tmp_path, capsys):
    """The original's .pth said only "not a form this reads"; a deploy folder holding programs but no checkpoint
    said it "holds no last.safetensors; pass ... a deploy folder", which the user had passed."""
    from models.deployed import load_any

    torch.save(models.create_model("reduce20", expansion=0).state_dict(), tmp_path / "weights.pth")
    with pytest.raises(models.CheckpointError, match="python -m models.convert"):
        load_any(tmp_path / "weights.pth")
    model = models.create_model("reduce20", expansion=0).eval()
    export_deploy(model, tmp_path / "deploy", onnx=False, torchscript=False)
    (tmp_path / "deploy" / "model.safetensors").unlink()
    with pytest.raises(models.CheckpointError, match=r"holds model.pt2 but no model.safetensors; evaluate and compare "
                                                     r"take a program itself \(.*deploy/model.pt2\)"):
        load_any(tmp_path / "deploy")
    assert load_any(tmp_path / "deploy" / "model.pt2").num_classes == 10


def test_a_run_that_did_not_finish_is_evaluated_with_a_note_saying_so(converted, tmp_path):
    """Evaluating a run while it trains (or after it stopped part-way) printed that epoch's accuracy as if final."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    for suffix in (".safetensors", ".json"):
        shutil.copy(converted["student"].with_suffix(suffix), run / f"last{suffix}")
    (run / "args.json").write_text("{}")
    proc = run_main(evaluate.main, [str(run), "--data-dir", str(CIFAR10), "--subset", "200"])
    assert proc.returncode == 0 and proc.stderr.startswith(f"note: the run {run} did not finish: this is its checkpoint")
    (run / "summary.json").write_text("{}")
    proc = run_main(evaluate.main, [str(run), "--data-dir", str(CIFAR10), "--subset", "200"])
    assert proc.returncode == 0 and "note:" not in proc.stderr, proc.stderr
