"""The training CLIs' options: the parser every training command shares (stage1, stage2, trim, pyramid), the
distillation options, ``--config`` and the help formatters. Parsing only: what the options build is
:mod:`train.assemble`'s, and nothing below the CLIs reads argv."""
from __future__ import annotations

import argparse

from models.errors import ConfigError

from .data import DATASETS
from .distill import FEATURE_LOSSES, KD_REDUCTIONS, LOGIT_LOSSES
from .engine import COMPILE_MODES, OPTIMIZERS, SCHEDULES
from .preprocess import NORMALIZATIONS
from .recipes import RECIPES, help_default
from .spec import COMMANDS, LOADERS, DataSpec, OptimSpec, load_spec, options_of


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, except where the help already says it (a recipe's), there is none, or the
    option is a flag (its default is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.nargs == 0 or "default:" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class DescribedHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """:class:`HelpFormatter` for a command whose description (its module docstring) keeps its own line breaks."""


def common_parser(prog: str, description: str, *, stage: str, epochs: int,
                  one_run: bool = True) -> argparse.ArgumentParser:
    """The options every training CLI takes; defaults the recipes set are described from them
    (:func:`train.recipes.help_default` for ``stage``), the others are the spec dataclasses' own. ``one_run``
    False (a chain of runs, the Pyramid): no ``--config``, which reruns one run, and ``--out`` holds the runs."""
    data, optim = DataSpec(), OptimSpec()
    p = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    p.add_argument("--recipe", choices=tuple(RECIPES), default="ours",
                   help="named defaults (train/recipes.py): ours, or the original ReduceNet's main.py; "
                        "options given here override them")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=DATASETS, default=None, help="default: cifar10 (stage2: the teacher's)")
    d.add_argument("--data-dir", default=None,
                   help="data root; default $REDUCENET_DATA, else ./data (stage2: the teacher's)")
    d.add_argument("--subset", type=int, default=None,
                   help="train on N class-balanced images (fixed seed) and test on the same share of the test set")
    d.add_argument("--image-size", type=int, default=None, help="imagefolder: resize/crop to this size")
    d.add_argument("--loader", choices=LOADERS, default=data.loader,
                   help="memory: decode once, keep uint8 images on the device (CIFAR-size data); stream: decode "
                        "image folders in DataLoader workers each epoch; auto: stream when the decoded images "
                        "would take more than a quarter of the free memory")
    d.add_argument("--workers", type=int, default=data.workers,
                   help="decoding processes of the streaming loader")
    d.add_argument("--normalize", choices=NORMALIZATIONS, default=None,
                   help="input normalisation stored with the model: the dataset's mean/std, none ([0, 1] pixels) "
                        f"or ImageNet's ({help_default('normalize', stage)}; stage2 --inherit: the teacher's)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help=f"SGD with momentum 0.9 (--nesterov), or Adam ({help_default('optimizer', stage)})")
    o.add_argument("--epochs", type=int, default=epochs, help="training epochs")
    o.add_argument("--batch-size", type=int, default=data.batch_size, help="per process")
    o.add_argument("--lr", type=float, default=None, help=f"peak learning rate ({help_default('lr', stage)})")
    o.add_argument("--wd", type=float, default=None, help=f"weight decay ({help_default('wd', stage)})")
    o.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=optim.nesterov,
                   help="Nesterov momentum")
    o.add_argument("--schedule", choices=SCHEDULES, default=None,
                   help="cosine to 0 per step, per epoch (torch's CosineAnnealingLR), or x--gamma at each of "
                        f"--milestones ({help_default('schedule', stage)})")
    o.add_argument("--milestones", type=float, nargs="+", default=list(optim.milestones),
                   help="step schedule: fractions of training where the lr drops")
    o.add_argument("--gamma", type=float, default=optim.gamma, help="step schedule: lr factor at each milestone")
    o.add_argument("--warmup-epochs", type=float, default=None,
                   help=f"linear warm-up ({help_default('warmup_epochs', stage)})")
    o.add_argument("--seed", type=int, default=optim.seed, help="weights, data order, augmentation and --subset draw")
    r = p.add_argument_group("run")
    if one_run:
        r.add_argument("--config", default=None,
                       help="a run spec (JSON) or a run directory (its spec.json): its options, which the options "
                            "given here override; --config RUN --out NEW reruns that run exactly")
    r.add_argument("--out", default=None, help="run directory (default runs/<name>)" if one_run else
                   "the chain's folder, a run directory per level in it (default runs/<name>)")
    r.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    r.add_argument("--overwrite", action="store_true", help="replace a finished run in --out")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: on where the device computes bf16 natively: recent GPUs, "
                        "CPUs with AVX-512 BF16 or AMX)")
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    r.add_argument("--cuda-graph", action="store_true",
                   help="the whole training step (forward, backward, optimizer) as one CUDA graph, replayed with one "
                        "launch per step (train/graphs.py); with --compile, only --compile-mode default")
    r.add_argument("--sync-bn", action="store_true",
                   help="torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm); without it "
                        "each process normalises with its own batch's statistics")
    r.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels-last memory format")
    return p


def parse_options(parser: argparse.ArgumentParser, argv: list[str] | None,
                  kinds: tuple[str, ...]) -> argparse.Namespace:
    """Parse ``argv``; with ``--config FILE`` (a spec or a run directory, of one of ``kinds``) the spec's options are
    the defaults, which the command line's own options override (timm's ``--config``). Recipe defaults are
    filled later, from the spec (:meth:`train.spec.RunSpec.with_recipe`)."""
    args = parser.parse_args(argv)
    if getattr(args, "resume", False) and getattr(args, "overwrite", False):
        raise ConfigError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if args.config:
        spec = load_spec(args.config)
        if spec.kind == "pyramid":
            raise ConfigError(f"--config {args.config} is a level of a Pyramid chain; rerun the chain with "
                              "python -m train.pyramid and its options (its finished levels are skipped)")
        if spec.kind not in kinds:
            module = COMMANDS[spec.kind]
            raise ConfigError(f"--config {args.config} is a {spec.kind} run; run it with python -m {module}")
        parser.set_defaults(**options_of(spec))
        args = parser.parse_args(argv)
    return args


def add_distillation_options(p: argparse.ArgumentParser) -> None:
    """The loss options of every distilling command (stage 2, trim)."""
    s = p.add_argument_group("distillation")
    s.add_argument("--kd", choices=tuple(LOGIT_LOSSES), default="kd",
                   help="logit loss: " + "; ".join(f"{k}: {t.help}" for k, t in LOGIT_LOSSES.items()))
    s.add_argument("--kd-alpha", type=float, default=None, help="KD weight (kd/mse: 0.7, ReduceNet; dkd: 1)")
    s.add_argument("--kd-T", type=float, default=None, help="temperature (kd: 5, ReduceNet; dkd: 4)")
    s.add_argument("--kd-beta", type=float, default=None, help="dkd: NCKD weight (8, mdistiller's default)")
    s.add_argument("--kd-warmup", type=float, default=None, metavar="EPOCHS",
                   help="dkd: epochs over which its loss ramps linearly to full weight (20, mdistiller's, made for "
                        "240 epochs; 0: none)")
    s.add_argument("--ce-weight", type=float, default=None,
                   help="kd/mse: weight of the cross-entropy term (default 1 - --kd-alpha; RepDistiller and "
                        "SemCKD use 1 with --kd-alpha 1)")
    s.add_argument("--kd-reduction", choices=KD_REDUCTIONS, default=None,
                   help="kd: batchmean (Hinton) or mean over N*C elements (the original ReduceNet's nn.KLDivLoss(), "
                        "1/C of it); default: the recipe's")
    f = p.add_argument_group("feature distillation")
    f.add_argument("--feature-kd", choices=("none", *FEATURE_LOSSES), default="none",
                   help="feature loss on the stage outputs: " + "; ".join(f"{k}: {t.help}"
                                                                           for k, t in FEATURE_LOSSES.items()))
    f.add_argument("--feature-weight", type=float, default=None,
                   help=f"weight of the feature loss (CIFAR settings of RepDistiller and SemCKD: "
                        f"{', '.join(f'{k} {t.weight:g}' for k, t in FEATURE_LOSSES.items())})")
    f.add_argument("--feature-layers", nargs="+", default=None,
                   help="student module paths (default: its last 3 stage outputs)")
    f.add_argument("--teacher-layers", nargs="+", default=None,
                   help="teacher module paths, one per student layer (default: its last stage outputs)")
    p.add_argument("--no-export", action="store_true", help="fuse and check, but write no deploy files")
