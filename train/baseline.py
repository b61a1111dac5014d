"""``--baseline`` of train.stage2 and train.trim: the same student trained without its teacher, side by side.

The baseline is the run's own student (inherited, fresh or trimmed, as the run builds it) trained with
cross-entropy only (``--kd none``, no feature loss) for the same epochs, seed and recipe, in ``OUT-baseline``. Both
last-epoch accuracies are printed, and both runs' curves drawn into ``OUT/baseline.png`` (:mod:`train.curves`):
the knowledge-distillation project's plot of a student with and without distillation.
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from models.errors import ConfigError

from .curves import plot_curves
from .pipeline import run, taught_out
from .rundir import RunDir
from .spec import LossSpec, RunSpec

#: The picture of the run against its baseline, in the run's folder.
PLOT = "baseline.png"


def baseline_out(out: str | Path) -> Path:
    """The folder of the baseline of the run in ``out``: ``OUT-baseline``."""
    return Path(f"{out}-baseline")


def check_baseline(spec: RunSpec, out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse ``--baseline`` before the run trains: under torchrun, with ``--kd none`` and no feature loss (the run
    is its own baseline), with ``--epochs 0``, or when ``OUT-baseline`` could not take the baseline's run (it holds
    another run, and neither ``--resume`` nor ``--overwrite`` was given)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's process group does not survive two runs in a row
        raise ConfigError("--baseline trains two runs one after the other, which a torchrun job cannot: run this "
                          "command without --baseline, then the baseline as its own (the same options with --kd none, "
                          "no feature loss, --out OUT-baseline)")
    if spec.loss.kd == "none" and spec.loss.feature_kd == "none":
        raise ConfigError("--baseline trains with cross-entropy only, which this run already does (--kd none)")
    if spec.optim.epochs == 0:
        raise ConfigError("--baseline with --epochs 0 trains neither run, so it compares nothing: pass --epochs N")
    base = baseline_out(out)
    if not (resume and (base / "train_state.pt").is_file()):
        RunDir(base, overwrite=overwrite).open().close()  # its checks alone: the folder is left as it was


def run_with_baseline(spec: RunSpec, *, resume: bool, overwrite: bool, cli: dict[str, Any],
                      derive_for: Callable[[Path], Any] | None = None) -> dict[str, Any]:
    """Run ``spec`` (a stage 2 or a trim), then its baseline (see the module's docstring); the run's summary
    with the baseline's under ``"baseline"``. ``derive_for(run_dir)``: the baseline's derivation, given the
    finished run's folder (a trim's baseline takes the trimmed structure from it); default the run's own."""
    check_baseline(spec, taught_out(spec), resume, overwrite)
    summary = run(spec, resume=resume, overwrite=overwrite, cli=cli)
    run_dir = Path(summary["run_dir"])
    derive = derive_for(run_dir) if derive_for else spec.derive
    baseline = replace(spec, out=str(baseline_out(run_dir)), loss=LossSpec(kd="none"), derive=derive)
    command = cli["module"].rpartition(".")[2]  # one process (check_baseline refuses torchrun): it prints
    print(f"{command}: the baseline: the same student, trained with cross-entropy only, in {baseline.out}")
    # recorded as run from Python: the command that repeats it is --config OUT-baseline/spec.json, not this one
    base = run(baseline, resume=resume and Path(baseline.out, "train_state.pt").is_file(), overwrite=overwrite)
    losses = spec.loss.label
    epochs = f"{spec.optim.epochs} epoch{'s' * (spec.optim.epochs != 1)}"
    plot = plot_curves({f"distilled ({losses})": run_dir, "cross-entropy only": base["run_dir"]},
                       run_dir / PLOT, title=f"{run_dir.name}: distilled against its baseline, {epochs} each")
    print(f"{command}: {summary['last_test_acc']:.2f}% distilled ({losses}) against {base['last_test_acc']:.2f}% "
          f"with cross-entropy only, after {epochs} each; curves: {plot}")
    return {**summary, "baseline": base}
