"""models.convert: the original ReduceNet's checkpoints become ours, computing the same function."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from _shared import SHARED, one_line, randomize_model, run_main

import models
from models.convert import from_reducenet_original, main
from models.weights import read_state_dict
from models.errors import CheckpointError

ORIGINAL = SHARED / "reducenet-original"


class OriginalBlock(nn.Module):
    """The original ReduceNet block, written from its description (ohmydroid/reducenet models/reducenet.py):
    ``relu(fuse(branch1(x) * [scaler == 1] + branch2(x)) + shortcut(x))``, with its key names."""

    def __init__(self, in_planes: int, planes: int, stride: int, scaler: float, expansion: int) -> None:
        super().__init__()
        self.scaler = nn.Parameter(torch.tensor(scaler), requires_grad=False)
        self.lora = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        mid = expansion * planes
        self.branch1 = nn.Sequential(nn.Conv2d(in_planes, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid),
                                     nn.ReLU(), nn.Conv2d(mid, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.branch2 = nn.Sequential(nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False))
        self.lora_branch = nn.Sequential(nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False),
                                         nn.BatchNorm2d(planes))  # never used (lora = 0), as in the original
        self.fuse = nn.Sequential(nn.BatchNorm2d(planes), nn.ReLU(), nn.Conv2d(planes, planes, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(planes))
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = self.branch1(x) + self.branch2(x) if self.scaler == 1.0 else self.branch2(x)
        return F.relu(self.fuse(out) + self.shortcut(x))


class OriginalReduceNet(nn.Module):
    def __init__(self, depth: int, num_classes: int, width: int, expansion: int, scaler: float) -> None:
        super().__init__()
        self.scaler = nn.Parameter(torch.tensor(scaler), requires_grad=False)
        self.lora = nn.Parameter(torch.tensor(0.0), requires_grad=False)
        n, in_planes = (depth - 2) // 6, 16 * width
        self.conv1 = nn.Sequential(nn.Conv2d(3, in_planes, 3, 1, 1, bias=False), nn.BatchNorm2d(in_planes), nn.ReLU())
        for i, (planes, stride) in enumerate(((16 * width, 1), (32 * width, 2), (64 * width, 2)), 1):
            blocks = []
            for s in [stride] + [1] * (n - 1):
                blocks.append(OriginalBlock(in_planes, planes, s, scaler, expansion))
                in_planes = planes
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
        self.linear = nn.Linear(64 * width, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return self.linear(F.avg_pool2d(out, out.size()[3]).flatten(1))


@pytest.mark.parametrize("depth, width, expansion, scaler", [
    (20, 1, 1, 1.0), (20, 1, 1, 0.0), (32, 2, 2, 1.0), (20, 2, 3, 0.0),
])
def test_converted_model_computes_the_originals_function(depth, width, expansion, scaler, single_thread):
    torch.manual_seed(depth + width + expansion)
    original = randomize_model(OriginalReduceNet(depth, 10, width, expansion, scaler).double(), seed=3).eval()
    ours = from_reducenet_original(original.state_dict()).double().eval()
    assert ours.config["model"] == f"reduce{depth}" and ours.config["width"] == width
    assert ours.config["expansion"] == (expansion if scaler else 0)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = original(x), ours(x)
    assert ((got - want).norm() / want.norm()).item() <= 1e-12
    # and the block is not trivially the student's: branch (b) changes a teacher's logits
    if scaler:
        student = models.student_from_teacher(ours).eval()
        with torch.no_grad():
            assert ((student(x) - want).norm() / want.norm()).item() > 1e-3


def test_unmapped_key_is_refused_by_name():
    state = OriginalReduceNet(20, 10, 1, 1, 1.0).state_dict()
    state["layer2.1.extra.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as e:
        from_reducenet_original(state, name="x.pth")
    assert "layer2.1.extra.weight" in one_line(e)


def test_lora_branch_tensors_of_any_shape_are_ignored():
    state = OriginalReduceNet(20, 10, 1, 1, 1.0).state_dict()
    state["layer1.0.lora_branch.0.weight"] = torch.zeros(16, 16, 1, 1)  # an older commit's shape
    assert from_reducenet_original(state).config["expansion"] == 1


@pytest.mark.e2e
def test_not_a_reducenet_state_dict_is_refused(tmp_path):
    with pytest.raises(CheckpointError) as e:
        from_reducenet_original(models.create_model("reduce20").state_dict(), name="ours.pth")
    assert "not an original ReduceNet" in one_line(e)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a zip")
    proc = run_main(main, ["reducenet-original", str(bad), "--out", str(tmp_path / "out")])
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "bad.pth" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_pickled_code_in_a_pth_is_not_run(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"scaler": Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(path)
    assert "holds a pickled object (io.open), not a state_dict" in one_line(e) and "\x1b" not in one_line(e)
    assert not marker.exists()
    (tmp_path / "garbage.pth").write_bytes(b"\x80\x02garbage" * 10)  # torch's paragraph, cut mid-sentence, before
    with pytest.raises(CheckpointError) as e:
        read_state_dict(tmp_path / "garbage.pth")
    assert one_line(e).endswith("(not a pickle that torch.load(weights_only=True) reads); pass a file saved with "
                                "torch.save(model.state_dict())")


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"needs {ORIGINAL}")
def test_cli_converts_the_original_checkpoints(tmp_path, capsys):
    files = [ORIGINAL / f"reduce20_cifar10_e1_w1_{r}.pth" for r in ("teacher", "student")]
    written = main(["reducenet-original", *map(str, files), "--out", str(tmp_path)])
    assert [p.name for p in written] == [f.with_suffix(".safetensors").name for f in files]
    teacher, student = (models.load_checkpoint(p) for p in written)
    assert teacher.config["expansion"] == 1 and student.config["expansion"] == 0
    assert teacher.preprocess == {"mean": [0.0] * 3, "std": [1.0] * 3, "input_size": [3, 32, 32]}
    assert student.checkpoint_metadata["dataset"] == "cifar10"
    # the student holds the teacher's shared tensors, except what distillation changed
    assert set(student.state_dict()) < set(teacher.state_dict())
    # a staging folder that a killed convert left (SIGKILL: no cleanup ran) goes at the next convert into --out
    import socket
    import subprocess

    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f".convert.{socket.gethostname()}-{gone.pid}.abc.tmp"
    (stale / "x").mkdir(parents=True)
    main(["reducenet-original", str(files[1]), "--out", str(tmp_path), "--overwrite"])
    assert not stale.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f.with_suffix(e).name for f in files for e in (".safetensors", ".json")])
    before = written[0].read_bytes()
    with pytest.raises(SystemExit) as e:
        main(["reducenet-original", str(files[0]), "--out", str(tmp_path)])
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert written[0].read_bytes() == before


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"needs {ORIGINAL}")
@pytest.mark.parametrize("extra, words", [(["--dataset", "bogus set"], "invalid choice"),
                                          (["SAME"], "would both be written to"),
                                          (["--dataset", "cifar100"], "classifies 10 classes")])
def test_cli_refuses_an_unknown_dataset_and_two_inputs_of_one_name(tmp_path, capsys, extra, words):
    import shutil

    teacher = ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth"
    (tmp_path / "other").mkdir()
    twin = shutil.copy(ORIGINAL / "reduce20_cifar10_e1_w1_student.pth", tmp_path / "other" / teacher.name)
    files = [str(teacher), str(twin)] if extra == ["SAME"] else [str(teacher)]
    with pytest.raises(SystemExit) as e:
        main(["reducenet-original", *files, "--out", str(tmp_path / "out"), *[x for x in extra if x != "SAME"]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and not (tmp_path / "out").exists()


# --- the CLI's refusals: one line, exit 2, nothing written ---------------------------------------------------------

needs_original = pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"needs {ORIGINAL}")


def original_state() -> dict[str, torch.Tensor]:
    """The original's teacher state_dict, as the CLI reads it."""
    return torch.load(ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth", map_location="cpu", weights_only=True)


def refusal(proc, *words: str) -> str:
    """The one stderr line of a refused run (exit 2), asserted to hold ``words``."""
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("error: ") and "\x1b" not in proc.stderr, proc.stderr
    assert all(w in proc.stderr for w in words), proc.stderr
    return proc.stderr


def files_in(folder) -> dict[str, bytes | str]:
    """What ``folder`` holds: each file's bytes, a link's target, ``"<folder>"`` for a folder."""
    return {p.name: (f"-> {os.readlink(p)}" if p.is_symlink() else "<folder>" if p.is_dir() else p.read_bytes())
            for p in sorted(folder.iterdir())}


def _vector_scaler(s):
    s["scaler"] = torch.ones(2)


def _no_branch1(s):
    del s["layer1.0.branch1.0.weight"]


def _stem_of_8(s):
    s["conv1.0.weight"] = s["conv1.0.weight"][:8]


def _bias_of_5(s):
    s["linear.bias"] = torch.zeros(5)


def _bn_of_8(s):
    s["layer2.1.fuse.0.weight"] = torch.ones(8)


def _bn_of_16x3(s):
    s["layer1.0.branch1.1.weight"] = torch.ones(16, 3)


def _branch1_wider(s):
    s["layer1.2.branch1.0.weight"] = torch.zeros(32, 16, 3, 3)


@needs_original
@pytest.mark.parametrize("change, words", [
    (_vector_scaler, ["scaler", "(2,)", "single number"]),
    (_no_branch1, ["layer1.0.branch1.0.weight", "lacks"]),
    (_stem_of_8, ["conv1.0.weight", "(8, 3, 3, 3)", "multiple of 16"]),
    (_bias_of_5, ["linear.bias", "(5,)", "(10,)"]),
    (_bn_of_8, ["layer2.1.fuse.0.weight", "(8,)", "(32,)"]),
    (_bn_of_16x3, ["layer1.0.branch1.1.weight", "(16, 3)", "(16,)"]),
    (_branch1_wider, ["layer1.2.branch1.0.weight", "(32, 16, 3, 3)", "(16, 16, 3, 3)"]),
], ids=["vector_scaler", "no_branch1", "stem_of_8", "bias_of_5", "bn_of_8", "bn_of_16x3", "branch1_wider"])
def test_cli_refuses_a_malformed_state_dict_in_one_line(tmp_path, change, words):
    state = original_state()
    change(state)
    path = tmp_path / "odd.pth"
    torch.save(state, path)
    proc = run_main(main, ["reducenet-original", str(path), "--out", str(tmp_path / "out")])
    refusal(proc, "odd.pth", *words, "pass ")
    assert not (tmp_path / "out").exists()


@needs_original
@pytest.mark.parametrize("taken", ["a.json", "a.safetensors", "dangling link"])
def test_cli_replaces_no_file_without_overwrite(tmp_path, taken):
    out = tmp_path / "out"
    out.mkdir()
    if taken == "dangling link":
        (out / "a.safetensors").symlink_to(tmp_path / "nowhere")
    else:
        (out / taken).write_text("the user's own file\n")
    before = files_in(out)
    source = shutil.copy(ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth", tmp_path / "a.pth")
    proc = run_main(main, ["reducenet-original", str(source), "--out", str(out)])
    refusal(proc, str(out / ("a.json" if taken == "a.json" else "a.safetensors")), "--overwrite")
    assert files_in(out) == before and not (tmp_path / "nowhere").exists()


@needs_original
@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_cli_writes_nothing_when_one_destination_is_a_folder(tmp_path, overwrite):
    out = tmp_path / "out"
    (out / "b.json").mkdir(parents=True)
    sources = [shutil.copy(ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth", tmp_path / f"{n}.pth") for n in "ab"]
    proc = run_main(main, ["reducenet-original", *map(str, sources), "--out", str(out), *overwrite])
    refusal(proc, str(out / "b.json"), "folder")
    assert files_in(out) == {"b.json": "<folder>"}


@needs_original
@pytest.mark.parametrize("fail_at", ["write", "move"])
def test_cli_failing_midway_leaves_the_folder_as_it_was(tmp_path, monkeypatch, fail_at):
    """A write that fails after the checks (a full disk) or a move into place that fails: what the run wrote goes,
    the files it was to replace (--overwrite) come back."""
    import models.convert as convert
    from models.checkpoint import WriteError

    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.safetensors", "a.json", "notes.txt"):
        (out / name).write_text(f"previous {name}\n")
    before = files_in(out)
    sources = [shutil.copy(ORIGINAL / "reduce20_cifar10_e1_w1_teacher.pth", tmp_path / f"{n}.pth") for n in "ab"]
    if fail_at == "write":
        save = convert.save_checkpoint

        def save_then_fail(model, path, metadata=None):
            if path.name.startswith("b."):
                error = WriteError(f"cannot write {path} (No space left on device)")
                error.reason = "No space left on device"
                raise error
            return save(model, path, metadata)

        monkeypatch.setattr(convert, "save_checkpoint", save_then_fail)
    else:
        replace = os.replace

        def replace_then_fail(src, dst):
            if Path(dst) == out / "b.json":
                raise PermissionError(13, "Permission denied")
            return replace(src, dst)

        monkeypatch.setattr(os, "replace", replace_then_fail)
    proc = run_main(main, ["reducenet-original", *map(str, sources), "--out", str(out), "--overwrite"])
    refusal(proc, "b.", "No space left on device" if fail_at == "write" else "Permission denied")
    assert files_in(out) == before


@needs_original
def test_cli_expands_a_tilde_after_the_equals_sign(tmp_path, monkeypatch):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    source = shutil.copy(ORIGINAL / "reduce20_cifar10_e1_w1_student.pth", tmp_path / "s.pth")
    proc = run_main(main, ["reducenet-original", str(source), "--out=~/converted"])
    assert proc.returncode == 0, proc.stderr
    assert sorted(files_in(home / "converted")) == ["s.json", "s.safetensors"] and not any(cwd.iterdir())


@pytest.mark.parametrize("content, words", [
    (nn.Linear(2, 2), ["pickled object", "torch.nn.modules.linear.Linear", "not a state_dict", "save the weights alone",
                       "weights_only", "no code"]),
    ({}, ["empty", "state_dict"]),
], ids=["module", "empty"])
def test_cli_says_what_a_file_holds_instead_of_a_state_dict(tmp_path, content, words):
    path = tmp_path / "x.pth"
    torch.save(content, path)
    proc = run_main(main, ["reducenet-original", str(path), "--out", str(tmp_path / "out")])
    refusal(proc, "x.pth", *words)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"needs {ORIGINAL}")
def test_overwrite_keeps_each_name_to_its_own_model_and_a_killed_converts_files_come_back(tmp_path, capsys):
    """The files an --overwrite moved aside were named previous.NAME beside the new conversions: converting
    previous.x.pth too put the old x under the new name. And a killed convert's staging folder, holding the files it
    had moved aside, was removed by the next convert: the user's old checkpoint was gone."""
    import socket
    import subprocess

    teacher, student = (ORIGINAL / f"reduce20_cifar10_e1_w1_{r}.pth" for r in ("teacher", "student"))
    shutil.copy(teacher, tmp_path / "x.pth")
    shutil.copy(student, tmp_path / "previous.x.pth")
    out = tmp_path / "out"
    main(["reducenet-original", str(tmp_path / "x.pth"), "--out", str(out)])
    main(["reducenet-original", str(tmp_path / "x.pth"), str(tmp_path / "previous.x.pth"), "--out", str(out),
          "--overwrite"])
    assert models.read_record(out / "x.safetensors")["metadata"]["role"] == "teacher"
    assert models.read_record(out / "previous.x.safetensors")["metadata"]["role"] == "student"
    # a convert killed after moving x.json aside and placing the new previous.x.json, before placing x.json
    gone = subprocess.Popen(["true"])
    gone.wait()
    aside = out / f".convert.{socket.gethostname()}-{gone.pid}.abc.tmp" / ".previous"
    aside.mkdir(parents=True)
    (out / "x.json").rename(aside / "x.json")
    (aside / "previous.x.json").write_text("the old one")
    capsys.readouterr()
    main(["reducenet-original", str(teacher), "--out", str(out)])  # another name into the same --out
    err = capsys.readouterr().err
    assert (out / "x.json").is_file() and f"restored {out / 'x.json'}" in err
    assert (out / f".convert-kept-{gone.pid}" / "previous.x.json").read_text() == "the old one"
    assert "holds the files a stopped convert" in err and not aside.parent.exists()
