"""Behaviour tests for models/checkpoint.py: round trips, one-line errors and atomic writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import models
from _shared import one_line
import models.checkpoint as ckpt_mod
from models import CheckpointError

pytestmark = pytest.mark.usefixtures("single_thread", "seeded")



def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> None:
    assert type(a) is type(b) and a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


FORMS = {
    "teacher": lambda: models.create_model("reduce20", expansion=2, num_classes=100),
    "lora_student": lambda: models.create_model("reduce20", expansion=0, lora_rank=2, lora_targets=["layer2.*"]),
    "mobilenet_student": lambda: models.create_model("reduce_mobilenetv2", expansion=0, width=0.5),
    "deploy": lambda: models.create_model("reduce20", expansion=0, inference_mode=True, width=2),
}


@pytest.mark.parametrize("form", list(FORMS))
def test_round_trip(form, tmp_path, randomize, make_images):
    model = FORMS[form]()
    if form != "deploy":
        randomize(model)
    models.set_lambda(model, 0.3)  # a buffer that must survive the round trip (LoRA student only)
    path = models.save_checkpoint(model, tmp_path / "X", metadata={"epoch": 7})
    assert path == tmp_path / "X.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X.json", "X.safetensors"]
    record = json.loads((tmp_path / "X.json").read_text())
    assert record["config"] == model.config and record["metadata"] == {"epoch": 7}
    assert models.read_record(path) == record

    loaded = models.load_checkpoint(path)
    assert loaded.checkpoint_metadata == {"epoch": 7}
    assert_same_model(model, loaded, make_images(2))


def test_run_dir_and_json_path(tmp_path, randomize, make_images):
    model = randomize(models.create_model("reduce20", expansion=0))
    run = tmp_path / "run"
    models.save_checkpoint(model, run / "last")
    x = make_images(2)
    assert_same_model(model, models.load_checkpoint(run), x)
    assert_same_model(model, models.load_checkpoint(run / "last.json"), x)
    assert_same_model(model, models.load_checkpoint(str(run / "last.safetensors")), x)
    fresh = models.create_model("reduce20", expansion=0)
    assert models.load_weights(fresh, run) is fresh
    assert_same_model(model, fresh, x)
    models.save_checkpoint(model, tmp_path / "deploy" / "model")  # a deploy folder: its model.safetensors
    assert_same_model(model, models.load_checkpoint(tmp_path / "deploy"), x)


def test_loading_runs_no_weight_initialiser_and_leaves_them_working(tmp_path, randomize, make_images, monkeypatch):
    """load_checkpoint builds the model with torch.nn.init's initialisers skipped (every parameter is loaded
    next; on the meta device of its checks each costs about 1 ms); the model is the saved one, and the
    initialisers are themselves again afterwards, also when the load fails."""
    calls = []

    def counting(name):
        real = getattr(torch.nn.init, name)

        def init(tensor, *args, **kwargs):
            calls.append(name)
            return real(tensor, *args, **kwargs)
        return init

    for name in ("kaiming_normal_", "kaiming_uniform_", "uniform_", "zeros_", "constant_"):
        monkeypatch.setattr(torch.nn.init, name, counting(name))
    model = randomize(models.create_model("reduce20", expansion=0, lora_rank=2))
    path = models.save_checkpoint(model, tmp_path / "m")
    calls.clear()
    loaded = models.load_checkpoint(path)
    assert calls == []
    assert_same_model(model, loaded, make_images(2))
    with pytest.raises(RuntimeError), ckpt_mod.skip_init():
        raise RuntimeError("a build that fails")
    models.create_model("reduce20")
    assert "kaiming_normal_" in calls  # a build outside a load (and after a failed one) initialises again
    w = torch.empty(3, 3)
    torch.nn.init.zeros_(torch.nn.init.uniform_(w))
    assert not w.any()


def test_round_trip_float64(tmp_path):
    model = models.create_model("reduce20", expansion=0).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    models.save_checkpoint(model, tmp_path / "X")
    loaded = models.load_checkpoint(tmp_path / "X.safetensors")
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------------- errors
def test_missing_file(tmp_path):
    for path in (tmp_path / "nope.safetensors", tmp_path / "nope.json", tmp_path):  # empty run dir too
        with pytest.raises(CheckpointError) as e:
            models.load_checkpoint(path)
        one_line(e)


def test_a_path_with_a_tilde_is_the_home_folder_and_a_missing_one_is_named(tmp_path, monkeypatch):
    """A quoted '~/run', an --out=~/run or a path in a JSON spec reaches the program unexpanded: it means the home
    folder, as in a shell; ~user of no such user, and a missing deploy file, are one line saying so."""
    monkeypatch.setenv("HOME", str(tmp_path))
    models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "run" / "last")
    assert models.load_checkpoint("~/run").config["model"] == "reduce20"
    assert models.load_any("~/run/last.safetensors").config["model"] == "reduce20"
    assert ckpt_mod.user_path("~/runs/x") == tmp_path / "runs" / "x"
    with pytest.raises(models.ConfigError) as e:
        ckpt_mod.user_path("~no_such_user_here/x")
    assert "cannot expand ~no_such_user_here" in one_line(e)
    for missing in ("~/gone.onnx", tmp_path / "gone"):
        with pytest.raises(CheckpointError) as e:
            models.load_any(missing)
        assert "gone" in one_line(e) and "does not exist" in one_line(e)


def test_a_damaged_deploy_file_is_one_line_and_nothing_else_is_printed(tmp_path, capfd):
    """torch.export logs a traceback for a damaged .pt2 before it raises: the user sees our line alone."""
    from reparam.export import export_deploy

    report = export_deploy(models.create_model("reduce20", expansion=0), tmp_path / "d", onnx=False)
    capfd.readouterr()
    for kind, name in (("pt2", "bad.pt2"), ("torchscript", "bad.ts")):
        (tmp_path / "d" / name).write_bytes(report.files[kind].read_bytes()[:4000])
        (tmp_path / "d" / name).with_suffix(".json").write_bytes((tmp_path / "d" / "model.json").read_bytes())
        with pytest.raises(CheckpointError) as e:
            models.load_any(tmp_path / "d" / name)
        assert "is not a readable" in one_line(e)
        out, err = capfd.readouterr()
        assert out == err == "", (out, err)


class _Plant:
    """A pickle that, once loaded without restriction, leaves a file: what a hostile .pt2 payload could do."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pt2_with_pickled_payloads_is_refused_before_anything_runs(tmp_path):
    """torch.export.load unpickles a weight marked use_pickle, and a sample-inputs blob that weights_only refuses,
    with code execution allowed: such a .pt2 is refused and nothing in it runs; the export's own file loads."""
    import io
    import warnings
    import zipfile

    from reparam.export import export_deploy

    report = export_deploy(models.create_model("reduce20", expansion=0), tmp_path / "d", onnx=False,
                           torchscript=False)
    good = report.files["pt2"]
    assert models.load_any(good).form == "torch.export"
    planted = tmp_path / "planted"
    evil = io.BytesIO()
    torch.save(_Plant(str(planted)), evil)
    with zipfile.ZipFile(good) as z:
        members = {n: z.read(n) for n in z.namelist()}
    config_name = next(n for n in members if n.endswith("data/weights/model_weights_config.json"))
    inputs_name = next(n for n in members if n.endswith("data/sample_inputs/model.pt"))
    config = json.loads(members[config_name])
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True
    weight = config_name.replace("model_weights_config.json", first["path_name"])
    evil_config = json.dumps(config).encode()
    # a constants list that does not parse, listed first, stopped the check before the pickled weight; a name written
    # twice was checked in its last entry while torch loads its first
    constants = next(n for n in members if n.endswith("data/constants/model_constants_config.json"))
    cases = {
        "weight": list({**members, config_name: evil_config, weight: evil.getvalue()}.items()),
        "sample inputs": list({**members, inputs_name: evil.getvalue()}.items()),
        "unparsed list first": [(constants, b"{not json"), (config_name, evil_config), (weight, evil.getvalue())]
        + [(n, d) for n, d in members.items() if n not in (constants, config_name, weight)],
        "a name twice": [(config_name, evil_config), (weight, evil.getvalue())]
        + [(n, d) for n, d in members.items() if n != weight],
    }
    for case, entries in cases.items():
        bad = tmp_path / "d" / f"bad-{case.replace(' ', '-')}.pt2"
        with zipfile.ZipFile(bad, "w") as z, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile's "Duplicate name"
            for n, data in entries:
                z.writestr(n, data)
        bad.with_suffix(".json").write_bytes((tmp_path / "d" / "model.json").read_bytes())
        with pytest.raises(CheckpointError) as e:
            models.load_any(bad)
        assert "which torch.export.load would run as code: refused" in one_line(e), case
        assert not planted.exists(), case


def test_an_onnx_session_uses_torchs_threads_and_does_not_spin(tmp_path):
    """load_any's onnxruntime session is timed in turn with PyTorch (train.compare): its intra-op threads are
    torch's (so --threads limits both) and they do not spin-wait into PyTorch's turn; a given count wins."""
    from models.deployed import session_options
    from reparam.export import export_deploy

    report = export_deploy(models.create_model("reduce20", expansion=0), tmp_path / "d", torchscript=False, pt2=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        options = models.load_any(report.files["onnx"]).session.get_session_options()
    finally:
        torch.set_num_threads(threads)
    assert options.intra_op_num_threads == 3
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert session_options(2).intra_op_num_threads == 2


@pytest.fixture
def saved(tmp_path) -> Path:
    return models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "good")


@pytest.mark.parametrize("corruption", ["garbage", "empty", "header_cut", "half", "last_bytes"])
def test_corrupt_file(corruption, saved, tmp_path):
    data = saved.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({
        "garbage": os.urandom(4096),
        "empty": b"",
        "header_cut": data[:40],
        "half": data[: len(data) // 2],
        "last_bytes": data[:-16],
    }[corruption])
    for call in (models.load_checkpoint, models.read_record,
                 lambda p: models.load_weights(models.create_model("reduce20", expansion=0), p)):
        with pytest.raises(CheckpointError) as e:
            call(bad)
        one_line(e)


def test_safetensors_without_reducenet_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file(models.create_model("reduce20", expansion=0).state_dict(), str(plain))
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(plain)
    assert "metadata" in one_line(e)


@pytest.mark.parametrize("meta", ["not json", "{}"])
def test_malformed_reducenet_metadata(meta, tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(2)}, str(bad), metadata={"reducenet": meta})
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(bad)
    one_line(e)


def test_load_weights_refuses_other_architecture(saved):
    for other in (models.create_model("reduce56", expansion=0),
                  models.create_model("reduce20", expansion=0, num_classes=100),
                  models.create_model("reduce20", expansion=1),
                  models.create_model("reduce20", expansion=0, width=2)):
        before = {k: v.clone() for k, v in other.state_dict().items()}
        with pytest.raises(CheckpointError) as e:
            models.load_weights(other, saved)
        assert "architecture" in one_line(e)
        assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # left as it was


def test_load_weights_refuses_mismatched_keys(saved):
    # same model/width/expansion/num_classes, but LoRA changes the state_dict
    with pytest.raises(CheckpointError) as e:
        models.load_weights(models.create_model("reduce20", expansion=0, lora_rank=2), saved)
    one_line(e)
    # a model without .config is checked by its state_dict alone
    with pytest.raises(CheckpointError) as e:
        models.load_weights(torch.nn.Linear(2, 2), saved)
    one_line(e)


def test_save_needs_config(tmp_path):
    with pytest.raises(CheckpointError) as e:
        models.save_checkpoint(torch.nn.Linear(2, 2), tmp_path / "x")
    one_line(e)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- atomic write
def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch, make_images):
    old_model = models.create_model("reduce20", expansion=0)
    path = models.save_checkpoint(old_model, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert set(before) == {"ckpt.safetensors", "ckpt.json"}

    calls = []

    def torn_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        with open(filename, "wb") as f:
            f.write(b"\x00partial write")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "save_file", torn_save_file)
    new_model = models.create_model("reduce20", expansion=0, num_classes=100)
    with pytest.raises(OSError) as e:  # disk full is an OSError (possibly wrapped as a ReduceNetError)
        models.save_checkpoint(new_model, tmp_path / "ckpt")
    one_line(e)
    assert calls and Path(calls[0]).parent == tmp_path and Path(calls[0]) != path  # wrote a temp file
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # same files, same bytes
    monkeypatch.undo()

    loaded = models.load_checkpoint(path)
    assert_same_model(old_model, loaded, make_images(2))


def test_successful_overwrite_leaves_no_temp_files(tmp_path):
    models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "ckpt")
    models.save_checkpoint(models.create_model("reduce20", expansion=0, num_classes=100), tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.json", "ckpt.safetensors"]
    assert models.load_checkpoint(tmp_path / "ckpt.safetensors").config["num_classes"] == 100


# ---------------------------------------------------------------------------------------------------- formats
def test_preprocess_travels_with_the_checkpoint(tmp_path):
    model = models.create_model("reduce20", expansion=0)
    model.preprocess = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5], "input_size": [3, 32, 32]}
    path = models.save_checkpoint(model, tmp_path / "m")
    assert models.read_record(path)["preprocess"] == model.preprocess
    assert models.load_checkpoint(path).preprocess == model.preprocess
    # the student of a teacher, and its fused form, keep the teacher's preprocessing
    teacher = models.create_model("reduce20", expansion=1)
    teacher.preprocess = model.preprocess
    student = models.student_from_teacher(teacher, lora_rank=2)
    assert student.preprocess == model.preprocess
    assert models.load_checkpoint(models.save_checkpoint(student, tmp_path / "s")).preprocess == model.preprocess
    from reparam import fuse_model
    assert fuse_model(student).preprocess == model.preprocess
    # a model that was never told has none
    plain = models.create_model("reduce20", expansion=0)
    assert models.load_checkpoint(models.save_checkpoint(plain, tmp_path / "t")).preprocess is None


def _rewrite_record(path: Path, **changes) -> None:
    """Rewrite a checkpoint's record as an older or newer writer would have left it."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    with safe_open(str(path), framework="pt") as f:
        record = json.loads(f.metadata()["reducenet"])
    record.update(changes)
    save_file(load_file(str(path)), str(path), metadata={"reducenet": json.dumps(record)})


def test_reducenet_1_students_load_and_its_teachers_are_refused(tmp_path):
    student = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "student")
    _rewrite_record(student, format="reducenet-1")
    assert models.load_checkpoint(student).preprocess is None
    teacher = models.save_checkpoint(models.create_model("reduce20", expansion=1), tmp_path / "teacher")
    _rewrite_record(teacher, format="reducenet-1")
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(teacher)
    assert "reducenet 0.1" in one_line(e) and "retrain" in str(e.value)
    _rewrite_record(teacher, format="reducenet-99")
    with pytest.raises(CheckpointError) as e:
        models.read_record(teacher)
    assert "reducenet-99" in one_line(e)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_map_location(tmp_path):
    path = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "m")
    assert next(models.load_checkpoint(path, map_location=None).parameters()).device.type == "cpu"
    for bad, words in (("cuda", "none is visible"), ("tpu9", "not a device"), (3.5, "not a device")):
        with pytest.raises(CheckpointError) as e:
            models.load_checkpoint(path, map_location=bad)
        assert words in one_line(e)


def test_written_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: what open() would give a new file under the process's umask."""
    path = ckpt_mod.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "m")
    for p in (path, path.with_suffix(".json")):
        assert p.stat().st_mode & 0o777 == 0o666 & ~ckpt_mod._umask(), oct(p.stat().st_mode)


def test_save_needs_a_registered_name(tmp_path):
    from models.reducenet import ReduceNet
    with pytest.raises(CheckpointError) as e:
        models.save_checkpoint(ReduceNet(20), tmp_path / "x")  # built directly: its config names no model
    assert "create_model" in one_line(e)
    assert list(tmp_path.iterdir()) == []


def _crafted(tmp_path, name: str, change) -> Path:
    """A real checkpoint of ``name`` whose record (inside the safetensors file) is changed by ``change``."""
    from safetensors.torch import load_file

    path = models.save_checkpoint(models.create_model(name, num_classes=10), tmp_path / "real.safetensors")
    record = models.read_record(path)
    change(record)
    out = tmp_path / "crafted.safetensors"
    save_file(load_file(path), out, metadata={"reducenet": json.dumps(record)})
    return out


_CONV = {"type": "Conv2d", "in_channels": 3, "kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1],
         "dilation": [1, 1], "padding_mode": "zeros", "bias": False}


@pytest.mark.parametrize("name, change, words", [
    ("timm:resnet10t", lambda r: r["config"].update(checkpoint_path="/etc/passwd"), "'checkpoint_path'"),
    ("timm:resnet10t", lambda r: r["config"].update(pretrained_cfg_overlay={"file": "/etc/passwd"}),
     "'pretrained_cfg_overlay'"),
    ("torchvision:resnet18", lambda r: r["config"].update(weights="DEFAULT"), "'weights'"),
    ("timm:resnet10t", lambda r: r["config"].update(num_classes=10**9), "parameters"),
    ("reduce20", lambda r: r["config"].update(expansion=100_000), "parameters"),
    ("reduce20", lambda r: r["config"].update(width="x"), "cannot be built"),
    ("reduce20", lambda r: r["config"].update(device="cuda"), "'device'"),
    ("reduce20", lambda r: r["config"].update(structure=[1, 2]), "structure patch is not"),
    ("reduce20", lambda r: r["config"].update(structure={"stem.conv": {**_CONV, "out_channels": 32, "groups": 1}}),
     "does not fit the model"),  # a widened conv whose BatchNorm stays narrow
    ("reduce20", lambda r: r["config"].update(structure={"stem.conv": {**_CONV, "out_channels": 16, "groups": 2}}),
     "divisible by groups"),
    ("reduce20", lambda r: r["config"].update(lora_targets=[[[1]]]), "not a number, string or list"),
])
def test_a_crafted_record_is_refused_before_anything_is_built_or_read(tmp_path, monkeypatch, name, change, words):
    """A checkpoint's JSON chooses no file to read, no argument a model does not declare, and no size beyond the
    bound (checked on the meta device, before any allocation): one line naming the file."""
    path = _crafted(tmp_path, name, change)
    opened = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: opened.append(str(f)) or real_open(f, *a, **k))
    with pytest.raises(models.CheckpointError) as e:
        models.load_checkpoint(path)
    assert words in one_line(e) and str(path) in str(e.value)
    assert "/etc/passwd" not in opened


def test_a_deeply_nested_record_and_a_non_path_are_one_line(tmp_path):
    deep = tmp_path / "deep.safetensors"
    save_file({"w": torch.zeros(1)}, deep, metadata={"reducenet": "[" * 100_000 + "]" * 100_000})
    for bad in (deep, None, 3):
        with pytest.raises(models.CheckpointError) as e:
            models.load_checkpoint(bad)
        one_line(e)


@pytest.mark.parametrize("failure", [
    lambda: __import__("safetensors").SafetensorError("Error while serializing: I/O error: No space left on device"),
    lambda: RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file"),
    lambda: OSError(28, "No space left on device"),
])
def test_a_disk_that_fills_during_a_write_is_one_line_and_the_last_good_file_stays(tmp_path, failure):
    path = tmp_path / "last.safetensors"
    path.write_bytes(b"the last good checkpoint")

    def write(tmp):
        Path(tmp).write_bytes(b"half of it")
        raise failure()

    with pytest.raises(ckpt_mod.WriteError) as e:
        ckpt_mod.atomic_write(path, write)
    assert "cannot write" in one_line(e) and "free some disk space" in str(e.value)
    assert path.read_bytes() == b"the last good checkpoint" and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("links", [True, False])
def test_a_copied_checkpoint_survives_the_next_save_over_its_source(tmp_path, randomize, make_images, monkeypatch,
                                                                      links):
    """best = last of the best epoch, placed without writing it again (a hard link, or a copy where the filesystem
    has none); the next epoch's last replaces its own name only."""
    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    if not links:
        monkeypatch.setattr(ckpt_mod.os, "link", no_links)
    first = randomize(models.create_model("reduce20", expansion=0))
    last = models.save_checkpoint(first, tmp_path / "last", metadata={"epoch": 1})
    best = ckpt_mod.copy_checkpoint(last, tmp_path / "best")
    assert best == tmp_path / "best.safetensors" and best.read_bytes() == last.read_bytes()
    assert (tmp_path / "best.json").read_text() == (tmp_path / "last.json").read_text()
    assert os.path.samefile(best, last) == links
    models.save_checkpoint(randomize(models.create_model("reduce20", expansion=0)), last, metadata={"epoch": 2})
    assert models.read_record(best)["metadata"] == {"epoch": 1} and models.read_record(last)["metadata"]["epoch"] == 2
    assert_same_model(first, models.load_checkpoint(best), make_images(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.json", "best.safetensors", "last.json",
                                                           "last.safetensors"]


def test_a_missing_checkpoint_is_named_as_the_user_wrote_it_with_the_reason(tmp_path):
    """Not "no checkpoint at nope.safetensors" for a --structure-from nope.json the user typed."""
    from models.checkpoint import resolve

    (tmp_path / "empty").mkdir()
    (tmp_path / "alone.json").write_text("{}")
    for given, why in (("nope.json", "does not exist"), ("empty", "holds no last.safetensors"),
                       ("alone.json", "has no weights beside it (alone.safetensors)")):
        with pytest.raises(CheckpointError) as e:
            resolve(tmp_path / given)
        assert str(e.value).startswith(f"no checkpoint at {tmp_path / given}: it {why};"), e.value
    (tmp_path / "model.onnx").write_bytes(b"onnx")  # a deploy program is no checkpoint (it read as a damaged one)
    with pytest.raises(CheckpointError) as e:
        resolve(tmp_path / "model.onnx")
    assert str(e.value).startswith(f"{tmp_path / 'model.onnx'} is a deploy program (.onnx)")
    assert "pass its model.safetensors beside it" in str(e.value)


def test_a_killed_writers_temp_file_is_removed_by_the_next_write(tmp_path):
    """SIGKILL during an atomic write (a checkpoint, the image cache: gigabytes) leaves its temp file, named with its
    machine and process; the next write of the same file removes it, and leaves alone a write in progress here or on
    another machine."""
    import socket
    import subprocess

    target, host = tmp_path / "cache.pt", socket.gethostname()
    names = []
    ckpt_mod.atomic_write(target, lambda tmp: names.append(os.path.basename(tmp)) or open(tmp, "wb").write(b"old"))
    assert names[0].startswith(f".cache.pt.{host}-{os.getpid()}.") and names[0].endswith(".tmp")
    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that no longer runs: as one killed mid-write
    killed = tmp_path / f".cache.pt.{host}-{gone.pid}.abc.tmp"
    running = tmp_path / f".cache.pt.{host}-1.abc.tmp"  # pid 1 runs
    elsewhere = tmp_path / f".cache.pt.other-host-{gone.pid}.abc.tmp"
    other_file = tmp_path / f".cache.ptx.{host}-{gone.pid}.abc.tmp"
    for p in (killed, running, elsewhere, other_file):
        p.write_bytes(b"")
    real_unlink = Path.unlink

    def refused(self, missing_ok=False):  # another user's file in a shared (sticky) folder
        if self == killed:
            raise PermissionError(1, "Operation not permitted")
        return real_unlink(self, missing_ok=missing_ok)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "unlink", refused)
        ckpt_mod.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"newer"))  # the write goes on
    assert target.read_bytes() == b"newer" and killed.exists()
    ckpt_mod.atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and not killed.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache.pt", running.name, elsewhere.name,
                                                                 other_file.name])


def test_checkpoint_names_with_dots_do_not_collide_and_load_as_saved(tmp_path):
    """save_checkpoint(m, "teacher.e1") and (m, "teacher.e2") wrote the same teacher.safetensors, the second over the
    first; a name loads as it was saved, and a .pth given as a checkpoint says what to do with it."""
    a, b = (models.create_model("reduce20", expansion=0) for _ in range(2))
    assert models.save_checkpoint(a, tmp_path / "teacher.e1") == tmp_path / "teacher.e1.safetensors"
    models.save_checkpoint(b, tmp_path / "teacher.e2")
    assert models.save_checkpoint(a, tmp_path / "w.json") == tmp_path / "w.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.e1.json", "teacher.e1.safetensors",
                                                          "teacher.e2.json", "teacher.e2.safetensors",
                                                          "w.json", "w.safetensors"]
    for name, model in (("teacher.e1", a), ("teacher.e2", b), ("teacher.e1.safetensors", a), ("w", a)):
        loaded = models.load_checkpoint(tmp_path / name)
        assert all(torch.equal(x, y) for x, y in zip(loaded.state_dict().values(), model.state_dict().values()))
    torch.save(a.state_dict(), tmp_path / "w.pth")
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(tmp_path / "w.pth")
    assert "is a PyTorch file, not a checkpoint" in one_line(e) and "--weights" in one_line(e)


def test_a_write_error_gives_the_advice_that_fits_its_cause(tmp_path):
    """A file in the way of the folder, or a read-only folder, is not a full disk: the advice says what to do."""
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ckpt_mod.WriteError) as e:
        ckpt_mod.atomic_write(tmp_path / "a-file" / "x.safetensors", lambda tmp: None)
    assert "a file is in the way of the folder" in one_line(e) and "disk space" not in one_line(e)

    def refused(tmp):
        raise PermissionError(13, "Permission denied")

    with pytest.raises(ckpt_mod.WriteError) as e:
        ckpt_mod.atomic_write(tmp_path / "x.safetensors", refused)
    assert one_line(e).endswith("(Permission denied); the previous x.safetensors, if any, is unchanged: choose a "
                                "writable folder")
    assert (tmp_path / "a-file").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    (tmp_path / "last.safetensors").mkdir()
    with pytest.raises(ckpt_mod.WriteError) as e:
        ckpt_mod.atomic_write(tmp_path / "last.safetensors", lambda tmp: open(tmp, "wb").write(b"x"))
    assert one_line(e).endswith("a folder has the name last.safetensors: move it, or choose another name")


def test_save_checkpoint_writes_only_what_load_checkpoint_takes_back(tmp_path):
    """Each of these saved, then failed to load: models.add_lora after create_model (now recorded), a compiled
    model (its keys carried "_orig_mod."), a model changed by hand, a preprocess with std 0, tensor metadata.
    Refusals write nothing, and a loaded checkpoint saved again keeps its metadata."""
    import torch.nn as nn

    torch.manual_seed(0)
    student = models.create_model("reduce20", expansion=0)
    models.add_lora(student, 2, ["layer*.conv1"])
    for p in student.parameters():
        nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 3, 32, 32)
    reloaded = models.load_checkpoint(models.save_checkpoint(student, tmp_path / "lora", metadata={"epoch": 3}))
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), student.eval()(x))
    again = models.load_checkpoint(models.save_checkpoint(reloaded, tmp_path / "again"))
    assert again.checkpoint_metadata == {"epoch": 3}
    compiled = torch.compile(models.create_model("reduce20", expansion=0))
    assert "stem.conv.weight" in models.load_checkpoint(models.save_checkpoint(compiled, tmp_path / "c")).state_dict()
    written = sorted(p.name for p in tmp_path.iterdir())
    changed = models.create_model("reduce20", expansion=0)
    changed.fc = nn.Linear(64, 5)
    for model, kwargs, words in (
            (changed, {}, "fc.weight is (5, 64), not (10, 64)"),
            (student, {"preprocess": {"mean": [0.5] * 3, "std": [0.0] * 3}}, "has a value <= 0"),
            (student, {"metadata": {"x": torch.zeros(1)}}, "its metadata is not JSON data")):
        with pytest.raises(CheckpointError) as e:
            models.save_checkpoint(model, tmp_path / "bad", **kwargs)
        assert one_line(e).startswith(f"cannot save {tmp_path / 'bad.safetensors'}") and words in one_line(e)
    assert sorted(p.name for p in tmp_path.iterdir()) == written


def test_a_config_override_that_does_not_fit_the_weights_says_how_to_fuse(tmp_path):
    """load_checkpoint(unfused student, inference_mode=True) listed missing bias keys; it now says what to do."""
    path = models.save_checkpoint(models.create_model("reduce20", expansion=0), tmp_path / "s")
    with pytest.raises(CheckpointError) as e:
        models.load_checkpoint(path, inference_mode=True)
    assert "with inference_mode=True" in one_line(e) and "reparam.fuse_model" in one_line(e)


def test_add_lora_twice_records_both_and_refuses_what_its_card_cannot_say(tmp_path):
    """add_lora on layer1, then layer2: the card said layer2 alone, and save refused the model. A teacher, another
    rank, or a family without LoRA in its config were accepted, and the model could not be saved."""
    student = models.create_model("reduce20", expansion=0)
    models.add_lora(student, 2, ["layer1.*"])
    models.add_lora(student, 2, "layer2.*")
    assert student.config["lora_targets"] == ["layer1.*", "layer2.*"]
    reloaded = models.load_checkpoint(models.save_checkpoint(student, tmp_path / "s"))
    assert reloaded.state_dict().keys() == student.state_dict().keys()
    for model, rank, words in ((student, 4, "rank 2 already"), (models.create_model("reduce20"), 2, "student"),
                               (models.create_model("pyramid_vgg19"), 2, "add_lora_to_convs")):
        keys = set(model.state_dict())
        with pytest.raises(models.ConfigError) as e:
            models.add_lora(model, rank, ["layer3.*", "features.*"])
        assert words in one_line(e) and set(model.state_dict()) == keys


@pytest.mark.parametrize("name,size", [("torchvision:regnet_x_400mf", 32), ("torchvision:mnasnet0_5", 32),
                                       ("timm:levit_128s", 224)])
def test_models_whose_builders_compute_or_whose_weights_carry_versions_save_and_load(tmp_path, name, size):
    """torchvision's RegNet computes its widths with tensors while it builds (the save's rebuild check ran on the
    meta device, which cannot); MNASNet refuses weights without its module version (a safetensors file holds
    none); a fused LeViT runs at 224 px only (the save's test run took 32 px)."""
    from models.weights import load_pretrained
    from reparam import fuse_model

    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10).eval()
    if name.startswith("timm:"):
        model = fuse_model(model)  # a structure patch: the save test-runs it
    x = torch.randn(2, 3, size, size)
    back = models.load_checkpoint(models.save_checkpoint(model, tmp_path / "ckpt")).eval()
    assert torch.equal(back(x), model(x))
    if name.startswith("torchvision:"):  # --weights: a plain safetensors file of the model's weights
        save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
        fresh = models.create_model(name, num_classes=10).eval()
        assert load_pretrained(fresh, tmp_path / "w.safetensors") == [] and torch.equal(fresh(x), model(x))
