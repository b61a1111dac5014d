"""``python -m train.reproduce TABLE --budget full|medium|short``: regenerate one results table, row by row.

Tables:
    cifar10-reducenet  teacher, scratch student (same total epochs), stage 2 (KD; with our recipe also + LoRA and
                       + LoRA + LambdaReLU) and the fused model, with the paper's recipe and ours, for
                       reduce20/reduce56 (width 2 too on a GPU), one run per seed.
    original-stage2    stage 2 from the original ReduceNet's own trained reduce20 teacher (converted), against a
                       scratch student of the same epochs and the original's own distilled student; accuracies on
                       the exact CIFAR-10 test images at hand and on the JPEG copy's test set.
    cifar100-kd        resnet56 -> resnet20 and resnet110 -> resnet32: scratch, KD, DKD (RepDistiller/mdistiller).
    kd-imagefolder     the knowledge-distillation project's setting: torchvision resnet18 -> mobilenet_v3_small on an
                       image folder at 224 px, the student without distillation, with MSE on logits and with KL.
    pyramid            VGG19 -> SVGG17 -> ... -> SVGG5, forward and backward, per loss: params, MACs, latency ratio
                       to VGG19, accuracy.
    trim               a trained ResNet-56 trimmed 2x and 4x by MACs (Torch-Pruning): without fine-tuning, fine-tuned
                       with CE only, with KD and with KD + SemCKD; params, MACs, latency ratio, accuracy.
    precision          the same teacher and stage-2 runs in float32 and in bf16 autocast (the CPU default where the
                       CPU has native bf16), accuracies side by side.
    grow               a torchvision and a timm classifier grown into ReduceNet teachers, shrunk back into themselves
                       and distilled, against the same architecture trained alone for the same total epochs.
    deploy-speed       params, MACs, latency and throughput of every zoo model's forms.

Every training row is a run spec (:mod:`train.reproduce.specs`), trained by :func:`train.pipeline.run` in
``--runs/TABLE/ROW``; a row whose run finished as its spec asks is skipped, a half-finished one resumes, and one
made by another spec is replaced (one that finished, only with ``--replace``), so an interrupted table continues
where it stopped. A spec that differs only in what ``--resume`` honours (``--device``, ``--compile``, another
``--data-dir`` holding the same images, ...) asks for the same run, and so does the same table in another
``--runs`` folder (copied, moved, or split across machines). The table is written to ``--results/TABLE.md`` and
``.csv`` (one CSV line per run, the markdown averaged over seeds) with plots.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from models.errors import ConfigError, cli_errors

from ..cli import DescribedHelpFormatter
from ..engine import COMPILE_MODES
from ..tasks import LOSSES
from . import parallel, runner, specs, tables
from .parallel import RowsFailed, train_parallel
from .report import against_baselines
from .runner import finished, plan_row, row_state, train_row
from .specs import RECIPE_NAMES, ROW_BUILDERS, Row, check_models, cifar10_rows, cifar100_rows, original_rows
from .speed import speed_table
from .tables import IMAGE_SIZED, TABLES, _header, _time_fused, _time_left, original_table, pyramid_table, training_table

__all__ = ["parallel", "runner", "specs", "tables", "main", "build_parser", "train_row", "train_parallel",
           "RowsFailed", "finished", "row_state", "plan_row",
           "Row", "cifar10_rows", "cifar100_rows", "original_rows", "against_baselines", "training_table",
           "_header", "_time_fused", "_time_left"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__,
                                formatter_class=DescribedHelpFormatter)
    p.add_argument("table", choices=TABLES)
    p.add_argument("--budget", choices=("full", "medium", "short", "smoke"), default="short",
                   help="full: the papers' epochs; medium: CPU hours; short: CPU-sized; smoke: 1 epoch, for tests")
    p.add_argument("--models", nargs="+", default=None, help="restrict to these models (e.g. reduce20)")
    p.add_argument("--recipes", nargs="+", choices=tuple(RECIPE_NAMES), default=list(RECIPE_NAMES),
                   help="cifar10-reducenet: which recipes to run")
    p.add_argument("--lora-rows", action=argparse.BooleanOptionalAction, default=True,
                   help="cifar10-reducenet: also stage 2 + LoRA and + LoRA + LambdaReLU with our recipe (default); "
                        "--no-lora-rows leaves them out (they train longest) and keeps every other row as it is")
    p.add_argument("--data-dir", default=None, help="data root (default $REDUCENET_DATA, else ./data)")
    p.add_argument("--original", default=None,
                   help="original-stage2: folder of the original ReduceNet's .pth files "
                        "(default DATA/reducenet-original)")
    p.add_argument("--exact-dir", default=None,
                   help="original-stage2: root of the exact CIFAR-10 test images (default DATA/cifar-10-subset)")
    p.add_argument("--subset", type=int, default=None, help="train on N balanced images (quick checks only)")
    p.add_argument("--image-size", type=int, default=None,
                   help="kd-imagefolder: input size (default 224); pyramid: 32 (CIFAR) or 96 (the original)")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                   help="pyramid: which losses to run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed and row")
    p.add_argument("--rows", nargs="+", default=None, metavar="PATTERN",
                   help="train only the rows whose run folder matches one of these shell patterns (e.g. "
                        "'*-scratch'), to split a table across cores or machines; writes no table: the same "
                        "command without --rows then skips the finished rows and writes it")
    p.add_argument("--jobs", type=int, default=1,
                   help="train up to N rows at once, each in its own process (a stage-2 row once its teacher row "
                        "has finished): on a CPU each gets its share of the cores, with GPUs job k uses GPU k mod "
                        "count; logs in RUNS/TABLE/logs/")
    p.add_argument("--replace", action="store_true",
                   help="retrain the rows whose runs finished with other options (another --budget, --subset, ...); "
                        "without it they are refused, not deleted")
    p.add_argument("--plan", action="store_true",
                   help="train nothing: list the table's rows (those --rows selects) and what a run would do with "
                        "each (finished, running, resumes at epoch k, not started), with the time each row has "
                        "left at its own pace (a row not started: at its other seed's), the total, and with "
                        "--jobs N the least it can take (the total shared by N, or the longest chain of rows "
                        "that wait for one another)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--widths", type=int, nargs="+", choices=(1, 2, 4), default=None,
                   help="cifar10-reducenet: ReduceNet widths (default 1 and 2 on a GPU, 1 on a CPU)")
    p.add_argument("--compile", action="store_true", help="every row: torch.compile (with --compile-mode)")
    p.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                   help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="every row: the whole training step as one CUDA graph (see train.stage1 --help)")
    p.add_argument("--runs", default="runs/reproduce", help="where the rows' run directories go")
    p.add_argument("--results", default="results", help="where TABLE.md/.csv/.png go")
    p.add_argument("--repeats", type=int, default=30,
                   help="timed runs at batch 1 behind every latency the table reports (their median)")
    return p


def _check_folder(option: str, path: Path) -> None:
    """Refuse, before anything trains, a folder option naming a file, or a folder that cannot be made or written."""
    existing = next(p for p in (path, *path.parents) if p.exists())  # the parents end at "." or "/"
    if not existing.is_dir():
        where = "is a file" if existing == path else f"lies inside the file {existing}"
        raise ConfigError(f"{option} {path} {where}; pass a folder (it is made if absent)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: cannot write in {existing}; pass a folder you can write to")


@cli_errors
def main(argv: list[str] | None = None) -> Path | None:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what each --jobs process repeats
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} is not valid: pass 1 or more processes")
    if args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats} is not valid: pass 1 or more timed runs")
    if min(args.seeds) < 0:
        raise ConfigError(f"--seeds {args.seeds} is not valid: pass whole numbers >= 0")
    for option, what, values in (("--seeds", "seed", args.seeds), ("--models", "model", args.models),
                                 ("--recipes", "recipe", args.recipes), ("--widths", "width", args.widths),
                                 ("--losses", "loss", args.losses)):
        twice = next((v for i, v in enumerate(values or []) if v in values[:i]), None)
        if twice is not None:  # one row per value: a value given twice would count the same run twice
            raise ConfigError(f"{option} {' '.join(map(str, values))} names {what} {twice} twice; "
                              f"pass each {what} once")
    for option, value, names in (("--image-size", args.image_size, IMAGE_SIZED),
                                 ("--widths", args.widths, ("cifar10-reducenet",))):
        if value is not None and args.table not in names:  # it was accepted, recorded in the header, and ignored
            raise ConfigError(f"{option} applies to {' and '.join(names)}, not {args.table}: leave it out")
    check_models(args.table, args.models)
    if args.table != "deploy-speed":  # which trains nothing
        _check_folder("--runs", Path(args.runs))
    _check_folder("--results", Path(args.results))
    if (args.rows or args.plan or args.jobs > 1) and args.table == "deploy-speed":
        option = "--rows" if args.rows else "--plan" if args.plan else "--jobs"
        raise ConfigError(f"{option} is about training rows; deploy-speed trains none: leave it out")
    log = lambda m: print(m, flush=True)  # noqa: E731
    if args.table == "deploy-speed":
        path = speed_table(args)
    elif args.table == "original-stage2":
        path = original_table(args, log)
    elif args.table == "pyramid":
        path = pyramid_table(args, log)
    else:
        rows = ROW_BUILDERS[args.table](args)
        if not rows:
            raise ConfigError(f"--models {args.models} selects no row of {args.table}")
        path = training_table(args.table, rows, args, log)
    if path is not None:
        print(f"wrote {path}")
    return path
