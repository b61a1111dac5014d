"""Learning curves of runs (train.curves) and stage 2's --baseline, which draws a student with and without its
teacher."""
from __future__ import annotations

import contextlib
import io
import json

import pytest
from _shared import CIFAR10, needs_data, one_line

from models.errors import ConfigError, DataError
from train import curves
from train.baseline import PLOT
from train.rundir import RUN_FILES

METRICS = "epoch,lr,train_loss,train_acc,test_loss,test_acc,images_per_s,epoch_s\n"


def fake_run(path, accs, losses):
    path.mkdir()
    (path / "metrics.csv").write_text(METRICS + "".join(f"{i + 1},0.1,9.0,50,{loss},{acc},100,1\n"
                                                       for i, (acc, loss) in enumerate(zip(accs, losses))))
    return path


def test_curves_are_read_per_epoch_and_drawn_with_each_runs_last_accuracy(tmp_path):
    a = fake_run(tmp_path / "a", [10, 30, 45.5], [2.3, 1.5, 1.1])
    b = fake_run(tmp_path / "b", [10, 20], [2.3, 1.9])
    assert curves.read_curves(a) == {"epoch": [1, 2, 3], "test_acc": [10, 30, 45.5], "test_loss": [2.3, 1.5, 1.1]}
    fig = curves.draw_curves({"distilled": a, "baseline": b})
    drawn = {(ax.get_ylabel(), line.get_label()): (list(line.get_xdata()), list(line.get_ydata()))
             for ax in fig.axes for line in ax.get_lines()}
    assert drawn == {("test accuracy (%)", "distilled: 45.50% at epoch 3"): ([1, 2, 3], [10, 30, 45.5]),
                     ("test accuracy (%)", "baseline: 20.00% at epoch 2"): ([1, 2], [10, 20]),
                     ("test loss (cross-entropy)", "distilled"): ([1, 2, 3], [2.3, 1.5, 1.1]),
                     ("test loss (cross-entropy)", "baseline"): ([1, 2], [2.3, 1.9])}
    assert [list(ax.get_xticks()) for ax in fig.axes] == [[1, 2, 3]] * 2  # the epochs, not fractions around them
    out = curves.plot_curves({"distilled": a, "baseline": b}, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["c.png"]  # no temporary file left


def test_no_two_of_many_runs_are_drawn_alike(tmp_path):
    """Past matplotlib's ten colours, runs 1 and 11 looked the same."""
    runs = {f"r{i}": fake_run(tmp_path / f"r{i}", [10, 20], [2.0, 1.0]) for i in range(12)}
    lines = curves.draw_curves(runs).axes[0].get_lines()
    styles = [(line.get_color(), line.get_linestyle()) for line in lines]
    assert len(set(styles)) == 12


def test_a_folder_that_is_no_run_or_a_bad_format_is_one_line_and_nothing_is_written(tmp_path, capsys):
    a = fake_run(tmp_path / "a", [10], [2.3])
    (tmp_path / "empty").mkdir()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.csv").write_text(METRICS + "1,0.1,2.3,50,1.0,\n")
    for runs, error, words in (([a, tmp_path / "empty"], DataError, "a folder without metrics.csv"),
                               ([a, tmp_path / "none"], DataError, "is not a folder"),
                               ([tmp_path / "cut"], DataError, "not a number")):
        with pytest.raises(error) as e:
            curves.plot_curves({str(r): r for r in runs}, tmp_path / "c.png")
        assert words in one_line(e)
    with pytest.raises(ConfigError) as e:
        curves.plot_curves({"a": a}, tmp_path / "c.xyz")
    assert "not .xyz files; end the name in .png" in one_line(e)
    for argv, words in (([str(a), str(a), "--out", str(tmp_path / "c.png")], "both be labelled 'a'"),
                        ([str(a), "--labels", "x", "y", "--out", str(tmp_path / "c.png")], "names 2 runs but 1")):
        with pytest.raises(SystemExit) as exit_:
            curves.main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.iterdir() if p.is_file()]
    assert curves.main([str(a), str(a), "--labels", "x", "y", "--out", str(tmp_path / "c.svg")]).is_file()


def test_overwrite_removes_a_runs_baseline_plot():
    """``--overwrite`` removes a run's files and nothing else: the plot of an earlier run's baseline is one of them."""
    assert PLOT in RUN_FILES


@pytest.mark.e2e
@needs_data
def test_stage2_baseline_trains_the_same_inherited_student_with_cross_entropy_only_and_draws_both(tmp_path, capsys,
                                                                                                     monkeypatch):
    from train import stage1, stage2

    data = ["--data-dir", str(CIFAR10), "--subset", "64", "--batch-size", "32", "--device", "cpu"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        stage1.main(["-m", "reduce20", "--epochs", "1", *data, "--out", str(tmp_path / "t")])
    (tmp_path / "s-baseline").mkdir()
    (tmp_path / "s-baseline" / "args.json").write_text("{}")
    argv = ["--inherit", str(tmp_path / "t"), "--epochs", "2", "--lora-rank", "2", "--no-export", "--baseline",
            *data[2:], "--out", str(tmp_path / "s")]
    for extra, env, words in (([], "1", "s-baseline"), (["--kd", "none"], "1", "cross-entropy only"),
                              (["--epochs", "0"], "1", "compares nothing"), ([], "2", "a torchrun job cannot")):
        monkeypatch.setenv("WORLD_SIZE", env)  # "2": as torchrun's processes see it (the two ranks raced and hung)
        with pytest.raises(SystemExit):
            stage2.main([*argv, *extra])  # refused before the distilled student trains
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "s").exists()
    monkeypatch.delenv("WORLD_SIZE")
    (tmp_path / "s-baseline" / "args.json").unlink()
    with contextlib.redirect_stdout(out):
        summary = stage2.main(argv)
    records = [json.loads((tmp_path / run / "args.json").read_text())["spec"] for run in ("s", "s-baseline")]
    assert [r["loss"]["kd"] for r in records] == ["kd", "none"]
    assert records[0]["derive"] == records[1]["derive"]  # the same student: inherited, LoRA r2
    assert summary["baseline"]["run_dir"] == str(tmp_path / "s-baseline")
    command = json.loads((tmp_path / "s-baseline" / "args.json").read_text())["command"]  # repeats the baseline
    assert command == f"python -m train.stage2 --config {tmp_path / 's-baseline' / 'spec.json'}", command
    assert curves.read_curves(tmp_path / "s")["epoch"] == curves.read_curves(tmp_path / "s-baseline")["epoch"] == [1, 2]
    assert (tmp_path / "s" / PLOT).read_bytes()[:4] == b"\x89PNG"
    assert (f"{summary['last_test_acc']:.2f}% distilled (kd) against {summary['baseline']['last_test_acc']:.2f}% with "
            f"cross-entropy only, after 2 epochs each; curves: {tmp_path / 's' / PLOT}") in out.getvalue()
