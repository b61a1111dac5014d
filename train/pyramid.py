"""``python -m train.pyramid --teacher RUN --scheme forward|backward --loss two-stage``: the Pyramid's chain.

pyramid_compression (Ravindran & Fita Sanmartin) compresses VGG19 level by level: VGG19 -> SVGG17 -> SVGG14 ->
SVGG11 -> SVGG8 -> SVGG5 (``models/vgg.py``), each level inheriting every tensor of the level above but the one
conv (or head) that replaces a block, and taught by it. Each level is a normal run directory ``OUT/<level>``
(resume, metrics, TensorBoard, checkpoint, fused and exported model); an interrupted chain resumes where it
stopped, and finished levels are skipped. ``OUT/summary.json`` holds the chain's per-level results.

Losses (``--loss``), each level in two stages of ``--hint-epochs`` and ``--epochs`` epochs, as the original:

* ``two-stage``: stage 1 imitates the teacher's output at the end of the replaced block with the new conv's
  output (squared error summed per sample, the original's ``MSELoss(size_average=False)`` per sample); stage 2
  is cross-entropy. Taught by the level above.
* ``gram``: stage 1 matches the FSP (Gram) matrices of the replaced block's input and output; stage 2 CE.
* ``hinton``: stage 1 is the squared error of the logits; stage 2 CE ("Hinton 2 stages").
* ``fitnet`` / ``gram-direct``: ``two-stage`` / ``gram`` taught by VGG19 (``--teacher``) at every level, the
  original's baselines.
* ``scratch``: inherit, then CE only (no stage 1): the baseline every loss must beat.
* ``kd`` (ours): the ``two-stage`` hint, then KD from the level above (``--kd``, ``--kd-alpha``, ``--kd-T``)
  instead of plain CE.

Defaults (``--recipe ours``): Adam, lr 1e-4, weight decay 5e-4 as the original, with a cosine schedule per
stage budget instead of its ReduceLROnPlateau and early stopping.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models import read_record
from models.checkpoint import atomic_write_text, resolve
from models.errors import ConfigError, cli_errors
from models.vgg import LEVELS, SCHEMES

from .cli import add_distillation_options, common_parser
from .pipeline import run
from .rundir import finished_summary, mark_done
from .spec import SPEC_OPTIONS, OptimSpec, Pyramid, RunSpec
from .tasks import LOSSES


def build_parser():
    p = common_parser("python -m train.pyramid", __doc__, stage="pyramid", epochs=30)
    g = p.add_argument_group("pyramid")
    g.add_argument("--teacher", required=True, help="the trained top: a pyramid_vgg19(_bn) run or checkpoint")
    g.add_argument("--scheme", choices=tuple(SCHEMES), required=True,
                   help="forward: compress from the deep end; backward: from the input end")
    g.add_argument("--levels", nargs="+", default=None,
                   help="levels to run, in chain order (default all: svgg17 svgg14 svgg11 svgg8 svgg5)")
    g.add_argument("--loss", choices=LOSSES, default="two-stage", help="see the description above")
    g.add_argument("--hint-epochs", type=int, default=None,
                   help="epochs of stage 1, before the --epochs of stage 2 (default: a third of --epochs, at "
                        "least 1; 0 for scratch)")
    add_distillation_options(p)
    return p


@dataclass(frozen=True)
class Chain:
    """A Pyramid chain: one :class:`~train.spec.Pyramid` run per level, in chain order, each in ``OUT/<level>``
    (its ``spec.out``) and taught by the level above; ``out`` holds the chain's ``summary.json``."""

    out: str
    levels: tuple[RunSpec, ...]

    def record(self) -> dict[str, Any]:
        """What makes two chains the same chain: each level's :meth:`~train.spec.RunSpec.record`."""
        return {"chain": [s.record() for s in self.levels]}


def chain_levels(scheme: str, levels: list[str] | None = None) -> list[str]:
    """The levels of ``scheme`` to run: all of them, or ``levels`` (short names allowed), which must follow the
    chain without gaps."""
    chain = [f"svgg{depth}_{scheme}" for depth, _ in SCHEMES[scheme]]
    if not levels:
        return chain
    names = [name if name.endswith(f"_{scheme}") else f"{name}_{scheme}" for name in levels]
    unknown = [n for n in names if n not in chain]
    if unknown:
        raise ConfigError(f"--levels {unknown[0]} is not a level of the {scheme} scheme; choose from "
                          f"{', '.join(n.split('_')[0] for n in chain)}")
    if names != chain[chain.index(names[0]):chain.index(names[0]) + len(names)]:
        raise ConfigError(f"--levels must follow the chain without gaps ({' -> '.join(chain)}); got "
                          f"{' -> '.join(names)}")
    return names


def chain_of(top: str, top_model: str | None, scheme: str, out: str | Path, loss: str = "two-stage",
             hint_epochs: int | None = None, levels: list[str] | None = None, **options: Any) -> Chain:
    """The chain below ``top`` (a run or checkpoint of the model ``top_model``) in ``out``; ``options`` are the
    levels' spec options (:meth:`train.spec.RunSpec.of`: ``epochs``, ``seed``, ``dataset``, ...). ``hint_epochs``
    None: a third of the epochs, at least 1 (0 for ``scratch``)."""
    if hint_epochs is None:
        hint_epochs = 0 if loss == "scratch" else max(1, options.get("epochs", OptimSpec.epochs) // 3)
    specs = []
    for level in chain_levels(scheme, levels):
        parent = None if LEVELS[level].parent == top_model else str(Path(out) / LEVELS[level].parent)
        specs.append(RunSpec.of(Pyramid(top, level, parent, loss, hint_epochs),
                                **{**options, "out": str(Path(out) / level)}).validate())
    return Chain(str(out), tuple(specs))


def run_chain(chain: Chain, *, overwrite: bool = False, cli: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train the chain's levels in order: a finished level (made by its spec) is skipped, an interrupted one
    resumed (``overwrite``: restarted); returns the chain's per-level results, also in ``OUT/summary.json``."""
    first = chain.levels[0].derive
    if first.parent is not None and not (Path(first.parent) / "last.safetensors").is_file():
        raise ConfigError(f"--levels starts at {first.level}, whose parent {LEVELS[first.level].parent} has no run "
                          f"in {first.parent}; start the chain higher or pass its --out")
    out = Path(chain.out)
    result = {"scheme": LEVELS[first.level].scheme, "loss": first.loss, "teacher": str(resolve(first.top)),
              "levels": {}}
    for spec in chain.levels:  # each level a run of the pipeline in OUT/<level>, taught by the one above
        level, run_path, asked = spec.derive.level, Path(spec.out), spec.record()
        summary = finished_summary(run_path, asked)
        if summary is None:
            resume = (run_path / "train_state.pt").is_file() and not overwrite
            summary = run(spec, resume=resume, overwrite=overwrite, cli=cli)
            mark_done(run_path, asked)
        else:
            print(f"[skip] {level}: finished in {run_path}")
        result["levels"][level] = {k: summary.get(k) for k in (
            "last_test_acc", "best_test_acc", "params", "macs", "fused_test_acc", "epochs")}
    atomic_write_text(out / "summary.json", json.dumps(result, indent=2) + "\n")
    return result


def parse(argv: list[str] | None) -> tuple[Chain, argparse.Namespace]:
    """The chain that ``argv`` asks for, and the parsed options (``--overwrite``)."""
    args = build_parser().parse_args(argv)
    if args.config:
        raise ConfigError("--config reruns one run; rerun a level with python -m train.pyramid and its options, or "
                          "its run directory's spec with the pipeline (train.pipeline.run)")
    options = {k: v for k, v in vars(args).items()
               if k not in ("teacher", "scheme", "levels", "loss", "hint_epochs", "out", "resume", "overwrite",
                            "config", "no_export")}
    out = args.out or Path("runs") / f"pyramid-{args.scheme}-{args.loss}-s{args.seed}"

    def chain(top_model: str | None) -> Chain:
        return chain_of(args.teacher, top_model, args.scheme, out, args.loss, args.hint_epochs, args.levels,
                        export=not args.no_export, **{k: v for k, v in options.items() if k in SPEC_OPTIONS})

    chain(None)  # the options and levels are checked before the teacher is read
    return chain(read_record(resolve(args.teacher))["config"].get("model")), args


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    chain, args = parse(argv)
    return run_chain(chain, overwrite=args.overwrite, cli={"module": "train.pyramid", "argv": argv})


if __name__ == "__main__":
    main()
