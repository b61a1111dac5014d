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

import json
from pathlib import Path

from models import read_record
from models.checkpoint import atomic_write_text, resolve
from models.errors import ConfigError, cli_errors
from models.vgg import LEVELS, SCHEMES

from .cli import add_distillation_options, common_parser
from .pipeline import run
from .rundir import finished_summary, mark_done
from .spec import Pyramid, from_options
from .tasks import LOSSES


def build_parser():
    p = common_parser("python -m train.pyramid", __doc__, epochs=30, lr=1e-4, warmup="0")
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


def _levels(args) -> list[str]:
    chain = [f"svgg{depth}_{args.scheme}" for depth, _ in SCHEMES[args.scheme]]
    if not args.levels:
        return chain
    names = [name if name.endswith(f"_{args.scheme}") else f"{name}_{args.scheme}" for name in args.levels]
    unknown = [n for n in names if n not in chain]
    if unknown:
        raise ConfigError(f"--levels {unknown[0]} is not a level of the {args.scheme} scheme; choose from "
                          f"{', '.join(n.split('_')[0] for n in chain)}")
    if names != chain[chain.index(names[0]):chain.index(names[0]) + len(names)]:
        raise ConfigError(f"--levels must follow the chain without gaps ({' -> '.join(chain)}); got "
                          f"{' -> '.join(names)}")
    return names


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.config:
        raise ConfigError("--config reruns one run; rerun a level with python -m train.pyramid and its options, or "
                          "its run directory's spec with the pipeline (train.pipeline.run)")
    levels = _levels(args)
    if args.hint_epochs is None:
        args.hint_epochs = 0 if args.loss == "scratch" else max(1, args.epochs // 3)
    from_options(vars(args), Pyramid(args.teacher, levels[0], None, args.loss, args.hint_epochs)).validate()
    top_name = read_record(resolve(args.teacher))["config"].get("model")
    out = Path(args.out or Path("runs") / f"pyramid-{args.scheme}-{args.loss}-s{args.seed}")
    first_parent = LEVELS[levels[0]].parent
    if first_parent != top_name and not (out / first_parent / "last.safetensors").is_file():
        raise ConfigError(f"--levels starts at {levels[0]}, whose parent {first_parent} has no run in "
                          f"{out / first_parent}; start the chain higher or pass its --out")
    chain = {"scheme": args.scheme, "loss": args.loss, "teacher": str(resolve(args.teacher)), "levels": {}}
    for level in levels:  # each level a run of the pipeline in OUT/<level>, taught by the one above
        parent = None if LEVELS[level].parent == top_name else str(out / LEVELS[level].parent)
        spec = from_options({**vars(args), "out": str(out / level)},
                            Pyramid(args.teacher, level, parent, args.loss, args.hint_epochs))
        asked = spec.to_dict()
        summary = finished_summary(out / level, asked)
        if summary is None:
            resume = (out / level / "train_state.pt").is_file() and not args.overwrite
            summary = run(spec, resume=resume, overwrite=args.overwrite,
                          cli={"module": "train.pyramid", "argv": argv})
            mark_done(out / level, asked)
        else:
            print(f"[skip] {level}: finished in {out / level}")
        chain["levels"][level] = {k: summary.get(k) for k in (
            "last_test_acc", "best_test_acc", "params", "macs", "fused_test_acc", "epochs")}
    atomic_write_text(out / "summary.json", json.dumps(chain, indent=2) + "\n")
    return chain


if __name__ == "__main__":
    main()
