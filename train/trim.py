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
from pathlib import Path

from models.errors import ConfigError, cli_errors
from models.trim import COSTS, IMPORTANCES

from .cli import add_distillation_options, common_parser, parse_options
from .pipeline import run, trim_out
from .rundir import RunDir
from .spec import LossSpec, RunSpec, Trim, from_options


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
                        "epochs, in OUT-baseline, and print both accuracies")
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


def _baseline_out(out: str | Path) -> Path:
    """The folder of ``--baseline``'s run beside the trim run in ``out``: ``OUT-baseline``."""
    return Path(f"{out}-baseline")


def _check_baseline(spec: RunSpec, args: argparse.Namespace) -> None:
    """Refuse ``--baseline`` before the trim trains: with ``--kd none`` (nothing to compare), or when its folder
    ``OUT-baseline`` could not take the baseline's run (it holds another run, no --resume or --overwrite)."""
    if spec.loss.kd == "none" and spec.loss.feature_kd == "none":
        raise ConfigError("--baseline fine-tunes with cross-entropy only, which this run already does (--kd none)")
    base = _baseline_out(trim_out(spec))
    if not (args.resume and (base / "train_state.pt").is_file()):
        RunDir(base, overwrite=args.overwrite).open().close()  # its checks alone: the folder is left as it was


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    spec, args = parse(argv)
    if args.baseline:
        _check_baseline(spec, args)
    summary = run(spec, resume=args.resume, overwrite=args.overwrite, cli={"module": "train.trim", "argv": argv})
    if not args.baseline:
        return summary
    out = summary["run_dir"]
    baseline = replace(spec, out=str(_baseline_out(out)), loss=LossSpec(kd="none"),
                       derive=replace(spec.derive, structure_from=str(out)))
    print(f"trim: the baseline: the same trimmed network, fine-tuned with cross-entropy only, in {baseline.out}")
    base = run(baseline, resume=args.resume and Path(baseline.out, "train_state.pt").is_file(),
               overwrite=args.overwrite, cli={"module": "train.trim", "argv": argv})
    print(f"trim: {summary['last_test_acc']:.2f}% distilled ({spec.loss.kd}"
          f"{', ' + spec.loss.feature_kd if spec.loss.feature_kd != 'none' else ''}) against "
          f"{base['last_test_acc']:.2f}% with cross-entropy only, after {spec.optim.epochs} "
          f"epoch{'s' * (spec.optim.epochs != 1)} each")
    return {**summary, "baseline": base}


if __name__ == "__main__":
    main()
