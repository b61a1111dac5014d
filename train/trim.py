"""``python -m train.trim --teacher RUN_OR_CKPT --reduce R``: trim a trained classifier, distil it back, fuse, export.

Breed-Net's promise: a trained classifier and a reduction factor in, a faster, lighter network of comparable
accuracy out, as a complete architecture. The teacher (zoo, torchvision:NAME, timm:NAME, or already trimmed) is
pruned structurally with Torch-Pruning's dependency graph until its MACs, parameters or measured latency
(``--by``) are ``1 / R`` of the original's, within 3%, keeping the surviving weights (``--importance`` ranks the
channels; ``--round-to`` keeps widths hardware-friendly; the classifier is kept), and its BatchNorm statistics
are re-estimated on training batches (``--calibrate-batches``). The trimmed network is then
fine-tuned for ``--epochs`` with distillation from the untrimmed one (``--kd``, ``--feature-kd``; ``--kd none``
is cross-entropy only; ``--epochs 0`` only trims), fused and exported like a stage-2 student. The run directory
is a normal one: the trimmed checkpoint rebuilds without pickle and can be trimmed again.

Defaults (``--recipe ours``): lr 0.01, cosine, no warm-up, KD α 0.7 T 5, 100 epochs (Torch-Pruning's CIFAR
fine-tune uses lr 0.01 for 100 epochs with step decay).
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from models.errors import cli_errors
from models.trim import COSTS, IMPORTANCES

from .baseline import run_with_baseline
from .cli import add_distillation_options, common_parser, parse_options
from .pipeline import run
from .spec import RunSpec, Trim, from_options


def build_parser():
    p = common_parser("python -m train.trim", __doc__, stage="trim", epochs=100)
    t = p.add_argument_group("trimming")
    t.add_argument("--teacher", help="the trained classifier: a run directory or checkpoint (required)")
    t.add_argument("--reduce", type=float, help="cost reduction factor R > 1 (2 halves the cost; required)")
    t.add_argument("--by", choices=COSTS, default="macs",
                   help="the cost to divide by R: MACs, parameters, or batch-1 latency measured on --device")
    t.add_argument("--importance", choices=IMPORTANCES, default="l2",
                   help="channel ranking: L2/L1 magnitude, LAMP, BatchNorm scale, or random")
    t.add_argument("--round-to", type=int, default=None, help="keep channel counts multiples of this (e.g. 8)")
    t.add_argument("--calibrate-batches", type=int, default=50,
                   help="after pruning, re-estimate the BatchNorm statistics on this many training batches "
                        "(no weight changes; 0 skips it)")
    t.add_argument("--structure-from", default=None,
                   help="take the trimmed structure of this trim run instead of searching one")
    t.add_argument("--baseline", action="store_true",
                   help="also fine-tune the same trimmed network with cross-entropy only (--kd none) for the same "
                        "epochs, in OUT-baseline; print both accuracies and draw both curves in OUT/baseline.png")
    add_distillation_options(p)
    return p


def parse(argv: list[str] | None) -> tuple[RunSpec, argparse.Namespace]:
    """The spec that ``argv`` asks for, and the parsed options (``--resume``, ``--overwrite``)."""
    parser = build_parser()
    args = parse_options(parser, argv, kinds=("trim",))
    missing = [o for o, v in (("--teacher", args.teacher), ("--reduce", args.reduce)) if v is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)}")
    derive = Trim(args.teacher, args.reduce, args.by, args.importance, args.round_to, args.calibrate_batches,
                  args.structure_from)
    return from_options(vars(args), derive), args


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    spec, args = parse(argv)
    cli = {"module": "train.trim", "argv": argv}
    if not args.baseline:
        return run(spec, resume=args.resume, overwrite=args.overwrite, cli=cli)
    return run_with_baseline(spec, resume=args.resume, overwrite=args.overwrite, cli=cli,
                             derive_for=lambda out: replace(spec.derive, structure_from=str(out)))


if __name__ == "__main__":
    main()
