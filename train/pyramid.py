"""``python -m train.pyramid --teacher RUN --scheme forward|backward --loss two-stage``: the Pyramid's chain.

pyramid_compression (Ravindran & Fita Sanmartin) compresses VGG19 level by level: VGG19 -> SVGG17 -> SVGG14 ->
SVGG11 -> SVGG8 -> SVGG5 (``models/vgg.py``), each level inheriting every tensor of the level above but the one
conv (or head) that replaces a block, and taught by it. Each level is a normal run directory ``OUT/<level>``
(resume, metrics, TensorBoard, checkpoint, fused and exported model); an interrupted chain resumes where it
stopped, and finished levels are skipped. ``OUT/summary.json`` holds the results of every level finished in
``OUT``, each with its scheme, loss and teacher (a second call, another scheme or fewer levels, adds to it).

``--teacher`` is a ``pyramid_vgg19`` or a ``pyramid_vgg19_bn``: below the latter every level has BatchNorm after
each conv (the same level names and run directories), inherited from the level above, and the fused export folds it
into the convs.

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
from pathlib import Path

from models import read_record
from models.checkpoint import resolve
from models.errors import ConfigError, cli_errors
from models.vgg import LEVELS, SCHEMES, TOP, TOP_BN, level_name

from .cli import add_distillation_options, common_parser
from .pipeline import Chain, chain_of, run_chain
from .spec import SPEC_OPTIONS
from .tasks import LOSSES


def build_parser():
    p = common_parser("python -m train.pyramid", __doc__, stage="pyramid", epochs=30, one_run=False)
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


def parse(argv: list[str] | None) -> tuple[Chain, argparse.Namespace]:
    """The chain that ``argv`` asks for, and the parsed options (``--overwrite``)."""
    args = build_parser().parse_args(argv)
    options = {k: v for k, v in vars(args).items()
               if k not in ("teacher", "scheme", "levels", "loss", "hint_epochs", "out", "resume", "overwrite",
                            "no_export")}
    out = args.out or Path("runs") / f"pyramid-{args.scheme}-{args.loss}-s{args.seed}"

    def chain(top_model: str | None) -> Chain:
        return chain_of(args.teacher, top_model, args.scheme, out, args.loss, args.hint_epochs, args.levels,
                        export=not args.no_export, **{k: v for k, v in options.items() if k in SPEC_OPTIONS})

    first = chain(None).levels[0].derive  # the options and levels are checked before the teacher is read
    top_model = read_record(resolve(args.teacher))["config"].get("model")
    top = LEVELS[first.level].parent
    if level_name(top_model) != top and top == TOP:  # the chain's top level is taught by --teacher itself
        where = (f"--levels starts at {first.level}, the top level of the {args.scheme} chain, which"
                 if args.levels else f"the {args.scheme} chain")
        raise ConfigError(f"--teacher {args.teacher} is a {top_model}, but {where} is taught by a {TOP} or {TOP_BN}: "
                          f"pass a trained one (python -m train.stage1 -m {TOP} or -m {TOP_BN})"
                          + ("" if args.levels else ", or --levels to go on below a level this --out has finished"))
    return chain(top_model), args


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    chain, args = parse(argv)
    return run_chain(chain, overwrite=args.overwrite, cli={"module": "train.pyramid", "argv": argv})


if __name__ == "__main__":
    main()
