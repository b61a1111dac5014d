"""``python -m train.stage1 -m reduce56``: train a ReduceNet teacher, a scratch student, or any classifier.

Defaults (``--recipe ours``): SGD, momentum 0.9, Nesterov, lr 0.1, weight decay 1e-4, batch 128, cosine
schedule per step over 200 epochs, inputs normalised by the dataset's mean and std, Kaiming init.
``--recipe reducenet-paper`` is the original ReduceNet's main.py (no input normalisation, PyTorch's default
init, cosine per epoch; see train/recipes.py). ``--expansion 0`` trains the zoo student from scratch: the honest
baseline for stage 2, to be trained for stage1 + stage2 epochs. ``-m torchvision:NAME`` or ``-m timm:NAME``
trains that classifier (built without downloading anything; ``--weights FILE`` starts from your weights, with
the classifier replaced when its class count differs).
"""
from __future__ import annotations

import argparse

from models.errors import cli_errors

from .cli import common_parser, parse_options
from .recipes import help_default
from .pipeline import run
from .spec import Fresh, RunSpec, from_options


def build_parser():
    p = common_parser("python -m train.stage1", __doc__, stage="stage1", epochs=200)
    m = p.add_argument_group("model")
    m.add_argument("-m", "--model", default="reduce56",
                   help="zoo model (python -m models lists them), torchvision:NAME or timm:NAME")
    m.add_argument("--expansion", type=int, default=None,
                   help="zoo: branch (b) width factor, 0 trains the student (default 1: the teacher)")
    m.add_argument("--width", type=float, default=None, help="zoo: channel multiplier (ReduceNet 1, 2, 4; default 1)")
    m.add_argument("--weights", default=None,
                   help="start from these weights (.safetensors, a run directory's last checkpoint, or a .pth "
                        "state_dict read with weights_only=True)")
    m.add_argument("--grow", type=int, default=None, metavar="E",
                   help="grow the model into a ReduceNet teacher: branch (b) of width E beside every conv that "
                        "feeds a BatchNorm (kxk, groups 1; a ReduceNet student: its blocks' first convs); "
                        "train.stage2 --inherit RUN then gives back exactly the original network")
    m.add_argument("--grow-targets", nargs="+", default=None, metavar="GLOB",
                   help="with --grow: the convs to grow, as globs over module paths (e.g. 'layer*.conv1')")
    m.add_argument("--init", choices=("kaiming", "torch"), default=None,
                   help="zoo conv init: the model's own (Kaiming normal, fan-out) or PyTorch's default "
                        f"({help_default('init', 'stage1')})")
    return p


def parse(argv: list[str] | None) -> tuple[RunSpec, argparse.Namespace]:
    """The spec that ``argv`` asks for, and the parsed options (``--resume``, ``--overwrite``)."""
    args = parse_options(build_parser(), argv, kinds=("fresh",))
    derive = Fresh(args.model, args.expansion, args.width, args.weights, args.init, args.grow,
                   args.grow_targets and tuple(args.grow_targets))
    return from_options(vars(args), derive), args


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    spec, args = parse(argv)
    return run(spec, resume=args.resume, overwrite=args.overwrite, cli={"module": "train.stage1", "argv": argv})


if __name__ == "__main__":
    main()
