"""The Pyramid's chain (python -m train.pyramid) and its stage-1 losses."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
import torch.nn.functional as F

import models
from _shared import CIFAR10, training_stopped_at
from train import pyramid, stage1, tasks
from train.distill import DistillLoss, fsp_matrix, gram_loss, hint_mse

pytestmark = pytest.mark.usefixtures("isolated_cache")

ARGS = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu", "--image-size", "32"]
needs_data = pytest.mark.skipif(not (CIFAR10 / "cifar-10-batches-py").is_dir(), reason=f"{CIFAR10} is absent")


def test_hint_is_the_per_sample_sum_of_squares():
    s, t = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 3, 2, 2, dtype=torch.float64)
    expected = sum(((s[b] - t[b]) ** 2).sum() for b in range(4)) / 4
    torch.testing.assert_close(hint_mse(s, t), expected)
    # the original's nn.MSELoss(size_average=False) is the same sum, over the batch
    torch.testing.assert_close(hint_mse(s, t) * 4, F.mse_loss(s, t, reduction="sum"))


def test_fsp_and_gram_match_the_definition():
    a = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    b = torch.randn(2, 5, 4, 4, dtype=torch.float64)
    g = torch.zeros(2, 3, 5, dtype=torch.float64)
    for n in range(2):
        for i in range(3):
            for j in range(5):
                g[n, i, j] = (a[n, i] * b[n, j]).sum() / 16
    torch.testing.assert_close(fsp_matrix(a, b), g)
    small = torch.randn(2, 5, 2, 2, dtype=torch.float64)  # block 2: the output is upsampled to the input's size
    upsampled = small.repeat_interleave(2, 2).repeat_interleave(2, 3)
    torch.testing.assert_close(fsp_matrix(a, small), fsp_matrix(a, upsampled))
    c, d = torch.randn_like(a), torch.randn_like(b)
    torch.testing.assert_close(gram_loss(a, b, c, d), ((fsp_matrix(a, b) - fsp_matrix(c, d)) ** 2).mean())


def test_a_head_output_is_a_1x1_map():
    feats, logits = torch.randn(2, 6, 3, 3, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    expected = torch.einsum("bihw,bj->bij", feats, logits) / 9  # each input channel's mean times each logit
    torch.testing.assert_close(fsp_matrix(feats, logits), expected)


@pytest.mark.parametrize("scheme", ["forward", "backward"])
def test_every_loss_runs_at_every_level(scheme):
    """One batch of each level's task with each loss, the teacher being the level above (or VGG19)."""
    torch.manual_seed(0)
    top = models.create_model("pyramid_vgg19", num_classes=10, image_size=32)
    parent, x, y = top, torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    for level in models.vgg.chain(scheme)[1:]:
        student = models.vgg.svgg_from(parent, level)
        points = models.vgg.hint_points(level)
        for loss in tasks.LOSSES:
            by_top = loss in tasks.TAUGHT_BY_TOP
            kd = DistillLoss("kd") if loss == "kd" else None
            hint_epochs = 0 if loss == "scratch" else 1  # as the CLI requires
            task = tasks.PyramidLevel(student, top if by_top else parent, loss, hint_epochs,
                                        {"output": points.student_output, "input": points.student_input,
                                         "prepool": points.student_prepool},
                                        tasks.teacher_paths(level, by_top), kd)
            for epoch in (0, 1):  # stage 1 (its hint; none for scratch), then stage 2
                for callback in task.callbacks():
                    callback.on_epoch_start(None, epoch)
                value = task(x, y)["loss"]
                assert value.ndim == 0 and torch.isfinite(value), (level, loss, epoch)
                assert task.stage == (1 if epoch < hint_epochs else 2)
            for hooks in task._hooks or ():
                hooks.remove()
        parent = student


def test_teacher_paths_in_vgg19_exist():
    vgg = dict(models.create_model("pyramid_vgg19").named_modules())
    for scheme in ("forward", "backward"):
        for depth in (17, 14, 11, 8, 5):
            for path in tasks.teacher_paths(f"svgg{depth}_{scheme}", taught_by_top=True).values():
                assert path in vgg, (scheme, depth, path)


@needs_data
@pytest.mark.e2e
def test_a_two_level_chain_runs_and_resumes(tmp_path):
    top = tmp_path / "vgg19"
    with contextlib.redirect_stdout(io.StringIO()):
        stage1.main(["-m", "pyramid_vgg19", "--epochs", "1", *ARGS, "--out", str(top)])
    argv = ["--teacher", str(top), "--scheme", "forward", "--levels", "svgg17", "svgg14", "--loss", "two-stage",
            "--epochs", "1", "--hint-epochs", "1", "--no-export", *ARGS]
    with contextlib.redirect_stdout(io.StringIO()):
        whole = pyramid.main([*argv, "--out", str(tmp_path / "whole")])
    assert list(whole["levels"]) == ["svgg17_forward", "svgg14_forward"]
    s17 = models.load_checkpoint(tmp_path / "whole" / "svgg17_forward")
    s14 = models.load_checkpoint(tmp_path / "whole" / "svgg14_forward")
    assert s17.config["model"] == "svgg17_forward" and s14.config["model"] == "svgg14_forward"
    rows = (tmp_path / "whole" / "svgg14_forward" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].endswith("stage")  # stage 1 (hint), then stage 2 (CE)

    # level 1 runs epochs 0 and 1; level 2 is stopped in its second epoch
    with training_stopped_at(call=4), pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        pyramid.main([*argv, "--out", str(tmp_path / "split")])
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        split = pyramid.main([*argv, "--out", str(tmp_path / "split")])
    assert "[skip] svgg17_forward" in out.getvalue()
    for level in ("svgg17_forward", "svgg14_forward"):
        a = torch.load(tmp_path / "whole" / level / "train_state.pt", weights_only=True)["task"]
        b = torch.load(tmp_path / "split" / level / "train_state.pt", weights_only=True)["task"]
        assert all(torch.equal(a[k], b[k]) for k in a), level
    assert split["levels"]["svgg14_forward"]["last_test_acc"] == whole["levels"]["svgg14_forward"]["last_test_acc"]
    recorded = json.loads((tmp_path / "split" / "summary.json").read_text())["levels"]
    assert [(k, v["loss"], v["scheme"]) for k, v in recorded.items()] == [
        ("svgg17_forward", "two-stage", "forward"), ("svgg14_forward", "two-stage", "forward")]
    # a call for the lower level alone (svgg17 skipped as its parent) keeps both levels in OUT/summary.json
    with contextlib.redirect_stdout(io.StringIO()):
        lower = pyramid.main([*argv[:argv.index("--levels") + 1], "svgg14", *argv[argv.index("--loss"):],
                              "--out", str(tmp_path / "split")])
    assert list(lower["levels"]) == ["svgg14_forward"]
    assert json.loads((tmp_path / "split" / "summary.json").read_text())["levels"] == recorded


@needs_data
@pytest.mark.e2e
def test_bad_levels_are_one_line(tmp_path, capsys):
    for extra, words in ((["--levels", "svgg14", "svgg8"], "without gaps"), (["--levels", "svgg99"], "svgg99"),
                         (["--loss", "scratch", "--hint-epochs", "1"], "scratch")):
        with pytest.raises(SystemExit):
            pyramid.main(["--teacher", str(tmp_path / "nope"), "--scheme", "forward", *extra, *ARGS,
                          "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and err.count("\n") == 1, err


@pytest.mark.parametrize("levels", [[], ["--levels", "svgg17"]])
def test_a_teacher_that_is_not_the_chains_top_is_named(tmp_path, capsys, levels):
    """A chain without --levels, or with --levels from its top level, starts below its VGG19: another model as
    --teacher is named as the cause (the message spoke of a --levels nobody passed, or of a parent run in
    OUT/pyramid_vgg19 and a level higher than the top)."""
    teacher = models.save_checkpoint(models.create_model("reduce20"), tmp_path / "reduce20")
    with pytest.raises(SystemExit):
        pyramid.main(["--teacher", str(teacher), "--scheme", "forward", *levels, *ARGS, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert err.startswith("error:") and "is a reduce20" in err and err.count("\n") == 1, err
    assert "pyramid_vgg19 or pyramid_vgg19_bn" in err and "higher" not in err, err
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def vgg19_tops(tmp_path_factory):
    """Untrained pyramid_vgg19 and pyramid_vgg19_bn checkpoints (what --teacher reads before any data)."""
    folder = tmp_path_factory.mktemp("tops")
    return {name: models.save_checkpoint(models.create_model(name), folder / name)
            for name in ("pyramid_vgg19", "pyramid_vgg19_bn")}


@pytest.mark.parametrize("top", ["pyramid_vgg19", "pyramid_vgg19_bn"])
@pytest.mark.parametrize("levels", [[], ["--levels", "svgg17", "svgg14"]])
def test_either_vgg19_teaches_the_chains_top_level(tmp_path, vgg19_tops, top, levels):
    """--teacher pyramid_vgg19_bn is the top as pyramid_vgg19 is (README, --help): it teaches svgg17 itself, each
    level below is taught by its parent's run in OUT/<parent> (it was refused, or its svgg17 looked for a parent
    run in OUT/pyramid_vgg19)."""
    chain, _ = pyramid.parse(["--teacher", str(vgg19_tops[top]), "--scheme", "backward", *levels, *ARGS,
                              "--out", str(tmp_path / "o")])
    derived = [spec.derive for spec in chain.levels]
    assert [d.level for d in derived][:2] == ["svgg17_backward", "svgg14_backward"]
    assert [d.parent for d in derived][:2] == [None, str(tmp_path / "o" / "svgg17_backward")]
    assert [spec.out for spec in chain.levels][:2] == [str(tmp_path / "o" / d.level) for d in derived[:2]]
    assert all(d.top == str(vgg19_tops[top]) for d in derived)


@needs_data
@pytest.mark.e2e
def test_a_bn_chain_trains_fuses_and_skips_finished_levels(tmp_path, vgg19_tops, capsys):
    """Below pyramid_vgg19_bn every level has BatchNorm (the same level names and run directories), inherited
    level to level; each is fused into plain biased convs on export; a second call skips the finished levels."""
    top = vgg19_tops["pyramid_vgg19_bn"]  # its training is not what this tests
    argv = ["--teacher", str(top), "--scheme", "forward", "--levels", "svgg17", "svgg14", "--loss", "kd",
            "--epochs", "1", "--hint-epochs", "1", *ARGS, "--out", str(tmp_path / "pyr")]
    with contextlib.redirect_stdout(io.StringIO()):
        first = pyramid.main(argv)
    assert list(first["levels"]) == ["svgg17_forward", "svgg14_forward"]
    for level, convs in (("svgg17_forward", 16), ("svgg14_forward", 13)):
        run = tmp_path / "pyr" / level
        model = models.load_checkpoint(run)
        assert model.config == {"model": level, "num_classes": 10, "image_size": 32, "bn": True,
                                "inference_mode": False}
        assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == convs
        fused = models.load_checkpoint(run / "deploy" / "model.safetensors")
        assert fused.config["model"] == level and fused.config["inference_mode"] is True
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
        assert first["levels"][level]["fused_test_acc"] is not None
        taught_by = {"svgg17_forward": "pyramid_vgg19_bn", "svgg14_forward": "svgg17_forward"}[level]
        assert model.checkpoint_metadata["teacher"] == taught_by  # the top with BatchNorm is named as such
    spec14 = json.loads((tmp_path / "pyr" / "svgg14_forward" / "spec.json").read_text())["derive"]
    assert spec14["parent"] == str(tmp_path / "pyr" / "svgg17_forward")
    recorded = json.loads((tmp_path / "pyr" / "summary.json").read_text())["levels"]
    assert list(recorded) == ["svgg17_forward", "svgg14_forward"]
    assert {v["teacher"] for v in recorded.values()} == {str(top)}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        again = pyramid.main(argv)
    assert "[skip] svgg17_forward" in out.getvalue() and "[skip] svgg14_forward" in out.getvalue()
    assert again["levels"] == first["levels"]
    plain = ["--teacher", str(vgg19_tops["pyramid_vgg19"]), "--scheme", "forward", "--levels", "svgg11", *argv[7:]]
    before = sorted(p.name for p in (tmp_path / "pyr").iterdir())
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        pyramid.main(plain)  # a plain VGG19 going on below the BatchNorm levels: two chains in one
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "is a level with BatchNorm" in err, err
    assert sorted(p.name for p in (tmp_path / "pyr").iterdir()) == before


def test_config_of_a_level_points_to_the_chain_and_pyramid_offers_no_config(tmp_path, capsys):
    """A level's spec is part of a chain: --config of stage1/stage2/trim names train.pyramid (it named stage2);
    train.pyramid, which runs chains, has no --config to offer."""
    from train import stage2, trim
    from train.spec import Pyramid, RunSpec

    spec = RunSpec.of(Pyramid(str(tmp_path / "vgg19"), "svgg17_forward"), out=str(tmp_path / "level"))
    (tmp_path / "level.json").write_text(json.dumps(spec.to_dict()))
    for main in (stage1.main, stage2.main, trim.main):
        with pytest.raises(SystemExit):
            main(["--config", str(tmp_path / "level.json")])
        err = capsys.readouterr().err
        assert "level of a Pyramid chain" in err and "python -m train.pyramid" in err and err.count("\n") == 1, err
    assert "--config" not in pyramid.build_parser().format_help()
