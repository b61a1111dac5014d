"""models.convert: the original ReduceNet's checkpoints become ours, computing the same function."""
from __future__ import annotations


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
    assert "not a readable PyTorch state_dict" in one_line(e)
    assert not marker.exists()


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
