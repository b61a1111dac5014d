"""What each table trains: its rows (one stage1/stage2 run each), budgets, and the published numbers beside them.

A row's ``argv`` is the complete command of its run, minus ``--out``/``--resume``/``--overwrite``; the runner
treats a row as finished only when the run in its folder was made by exactly that command.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .. import pyramid, stage1, stage2, trim

#: Epochs per budget: (stage 1, stage 2). ``medium`` is the CPU budget of the results issue (30 + 30 vs 60
#: epochs, a few hours per seed on 2 cores); ``short`` fits one sitting on 2 CPU cores (original-stage2: its
#: five rows of 10 epochs take about 1.5 hours there); ``smoke`` is for tests.
BUDGETS: dict[str, dict[str, tuple[int, int]]] = {
    "cifar10-reducenet": {"full": (200, 200), "medium": (30, 30), "short": (3, 2), "smoke": (1, 1)},
    "original-stage2": {"full": (0, 200), "medium": (0, 30), "short": (0, 10), "smoke": (0, 1)},
    "cifar100-kd": {"full": (240, 240), "medium": (30, 30), "short": (4, 4), "smoke": (1, 1)},
    "kd-imagefolder": {"full": (30, 30), "medium": (10, 10), "short": (4, 4), "smoke": (1, 1)},
    "precision": {"full": (200, 200), "medium": (30, 30), "short": (5, 5), "smoke": (1, 1)},
    "trim": {"full": (200, 100), "medium": (30, 10), "short": (15, 5), "smoke": (1, 1)},  # (ResNet-56, fine-tune)
    # (VGG19, stage 1, stage 2) per level; the CPU budgets train on a --subset (default PYRAMID_SUBSET)
    "pyramid": {"full": (60, 10, 30), "medium": (15, 2, 6), "short": (8, 1, 2), "smoke": (1, 1, 1)},
}
PYRAMID_SUBSET = {"full": None, "medium": 10000, "short": 2500, "smoke": None}
#: The knowledge-distillation project's setting: an image folder at 224 px (Imagenette there), a torchvision
#: teacher and a smaller torchvision student, MSE on logits (its loss) or KL.
KD_FOLDER = {"teacher": "torchvision:resnet18", "student": "torchvision:mobilenet_v3_small", "image_size": 224}
RECIPE_NAMES = {"paper": "reducenet-paper", "ours": "ours"}
PAPER: dict[str, Any] = {  # published numbers, original data, kept apart from ours
    "cifar10-reducenet": {("reduce20", 1): (91.97, 92.72), ("reduce56", 1): (92.84, 93.79),
                          ("reduce20", 2): (93.27, 94.40), ("reduce56", 2): (94.11, 95.27)},
    "cifar100-kd": {("reduce56", "reduce20"): {"teacher": 72.34, "scratch": 69.06, "kd": 70.66, "dkd": 71.97},
                    ("reduce110", "reduce32"): {"teacher": 74.31, "scratch": 71.14, "kd": 73.08, "dkd": 74.11}},
    # pyramid_compression's table (CIFAR-100 at 96 px; VGG19 80.66): SVGG5 accuracies
    "pyramid": {"VGG19": 80.66, ("forward", "scratch"): 61.24, ("forward", "gram"): 72.18,
                ("backward", "scratch"): 61.56, ("backward", "two-stage"): 74.71},
    # Torch-Pruning's README (Fang et al., CVPR 2023), ResNet-56 on CIFAR-10 without sparse training
    "trim": {"untrimmed": 93.53, "trimmed": 93.46, "speed_up": 2.11, "epochs": "200 + 100"},
}
LORA_RANK = 8
# RepDistiller / mdistiller CIFAR-100 recipe: SGD momentum 0.9 without Nesterov, lr 0.05, wd 5e-4, batch 64,
# x0.1 at epochs 150/180/210 of 240, no warm-up; mdistiller's DKD uses beta 2 for these two pairs.
KD_RECIPE = ["--lr", "0.05", "--wd", "5e-4", "--batch-size", "64", "--schedule", "step",
             "--milestones", "0.625", "0.75", "0.875", "--no-nesterov", "--warmup-epochs", "0"]
DKD_BETA = {("reduce56", "reduce20"): 2.0, ("reduce110", "reduce32"): 2.0}


@dataclass
class Row:
    """One training run of a table.

    Attributes:
        name: the row's label, e.g. ``"stage2 + LoRA r8 (ours)"``.
        group: what the row belongs to, e.g. ``"reduce20-w1"``; rows of one group share a plot.
        run: the run directory of this seed.
        argv: the command's options (without ``--out``, ``--resume``, ``--overwrite``).
        main: ``train.stage1.main`` or ``train.stage2.main``.
        seed: the row's seed.
        baseline: the run this row is measured against, seed by seed (e.g. the scratch student of the same
            epochs); the table shows the row's accuracy minus the baseline's.
        result: the run's summary, filled by the runner.
    """

    name: str
    group: str
    run: Path
    argv: list[str]
    main: Callable[[list[str]], dict]
    seed: int = 0
    baseline: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)


def inherits_from(row: Row, rows: list[Row]) -> list[Row]:
    """The rows whose run ``row`` reads (its command names their folder or a file in it): they train first."""
    def names(run: Path, token: str) -> bool:
        return token == str(run) or token.startswith(str(run) + os.sep)

    return [r for r in rows if r is not row and any(names(r.run, t) for t in row.argv)]


def _common(args: argparse.Namespace, seed: int) -> list[str]:
    out = ["--seed", str(seed), "--device", args.device]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    if args.subset:
        out += ["--subset", str(args.subset)]
    if getattr(args, "compile", False):
        out += ["--compile", "--compile-mode", args.compile_mode]
    return out


def cifar10_rows(args: argparse.Namespace) -> list[Row]:
    """Teacher, scratch student with the same total epochs, and stage 2, per recipe, model, width and seed.

    With our recipe stage 2 also runs with LoRA and with LoRA + LambdaReLU, unless ``args.lora_rows`` is False;
    leaving them out changes no other row's command, so finished rows count either way.
    """
    e1, e2 = BUDGETS["cifar10-reducenet"][args.budget]
    widths = getattr(args, "widths", None) or ([1, 2] if torch.cuda.is_available() and args.device != "cpu" else [1])
    runs, rows = Path(args.runs) / "cifar10-reducenet", []
    for model in args.models or ["reduce20", "reduce56"]:
        for w in widths:
            group = f"{model}-w{w}"
            for seed in args.seeds:
                for short in args.recipes:
                    recipe = ["--recipe", RECIPE_NAMES[short]]
                    common = ["--dataset", "cifar10", *recipe, *_common(args, seed)]
                    prefix = runs / f"{group}-{short}-s{seed}"
                    teacher, scratch = Path(f"{prefix}-teacher"), Path(f"{prefix}-scratch")
                    s2 = ["--inherit", str(teacher), "--epochs", str(e2), *common]
                    tag = f" ({short} recipe)"
                    rows += [
                        Row("teacher (stage1)" + tag, group, teacher,
                            ["-m", model, "--width", str(w), "--expansion", "1", "--epochs", str(e1), *common],
                            stage1.main, seed),
                        Row(f"student from scratch ({e1 + e2} ep)" + tag, group, scratch,
                            ["-m", model, "--width", str(w), "--expansion", "0", "--epochs", str(e1 + e2), *common],
                            stage1.main, seed),
                        Row("stage2: inherit + KD" + tag, group, Path(f"{prefix}-kd"), [*s2, "--kd", "kd"],
                            stage2.main, seed, baseline=scratch),
                    ]
                    if short == "ours" and getattr(args, "lora_rows", True):
                        rows += _lora_rows(group, prefix, s2, e2, tag, seed, scratch)
    return rows


def _lora_rows(group: str, prefix: Path, s2: list[str], e2: int, tag: str, seed: int, baseline: Path) -> list[Row]:
    lora = [*s2, "--kd", "kd", "--lora-rank", str(LORA_RANK)]
    return [
        Row(f"stage2 + LoRA r{LORA_RANK}" + tag, group, Path(f"{prefix}-kd-lora"), lora, stage2.main, seed,
            baseline=baseline),
        Row(f"stage2 + LoRA r{LORA_RANK} + LambdaReLU" + tag, group, Path(f"{prefix}-kd-lora-lambda"),
            [*lora, "--lambda-epochs", str(max(1, e2 // 2))], stage2.main, seed, baseline=baseline),
    ]


def original_rows(args: argparse.Namespace, teacher: Path) -> list[Row]:
    """Stage 2 from the original ReduceNet's own converted teacher, against a scratch student of the same epochs."""
    _, e2 = BUDGETS["original-stage2"][args.budget]
    runs, rows, group = Path(args.runs) / "original-stage2", [], "reduce20-w1"
    for seed in args.seeds:
        common = ["--dataset", "cifar10", *_common(args, seed)]
        prefix = runs / f"reduce20-s{seed}"
        paper = ["--inherit", str(teacher), "--epochs", str(e2), "--recipe", "reducenet-paper", *common]
        ours = ["--inherit", str(teacher), "--epochs", str(e2), *common]
        scratch = Path(f"{prefix}-scratch")
        rows += [
            Row(f"student from scratch ({e2} ep, ours)", group, scratch,
                ["-m", "reduce20", "--expansion", "0", "--epochs", str(e2), *common], stage1.main, seed),
            Row("stage2: inherit + KD (paper recipe)", group, Path(f"{prefix}-paper-kd"), [*paper, "--kd", "kd"],
                stage2.main, seed, baseline=scratch),
            Row("stage2: inherit + KD (ours recipe)", group, Path(f"{prefix}-ours-kd"), [*ours, "--kd", "kd"],
                stage2.main, seed, baseline=scratch),
            *_lora_rows(group, Path(f"{prefix}-ours"), ours, e2, " (ours recipe)", seed, scratch),
        ]
    return rows


def cifar100_rows(args: argparse.Namespace) -> list[Row]:
    """resnet56 -> resnet20 and resnet110 -> resnet32: teacher, scratch, KD and DKD (RepDistiller/mdistiller)."""
    epochs = BUDGETS["cifar100-kd"][args.budget][0]
    runs, rows = Path(args.runs) / "cifar100-kd", []
    pairs = [("reduce56", "reduce20"), ("reduce110", "reduce32")]
    if args.models:
        pairs = [p for p in pairs if p[1] in args.models or p[0] in args.models]
    for big, small in pairs:
        group = f"{big}->{small}"
        for seed in args.seeds:
            common = ["--dataset", "cifar100", "--epochs", str(epochs), *KD_RECIPE, *_common(args, seed)]
            teacher, scratch = runs / f"{big}-teacher-s{seed}", runs / f"{small}-scratch-s{seed}"
            kd = ["--teacher", str(teacher), "-m", small, "--no-export", *common]
            rows += [
                Row(f"teacher {big} (scratch)", group, teacher, ["-m", big, "--expansion", "0", *common],
                    stage1.main, seed),
                Row(f"student {small} scratch", group, scratch, ["-m", small, "--expansion", "0", *common],
                    stage1.main, seed),
                Row(f"student {small} KD", group, runs / f"{small}-kd-from-{big}-s{seed}",
                    [*kd, "--kd", "kd", "--kd-alpha", "0.9", "--kd-T", "4"], stage2.main, seed, baseline=scratch),
                Row(f"student {small} DKD", group, runs / f"{small}-dkd-from-{big}-s{seed}",
                    [*kd, "--kd", "dkd", "--kd-beta", str(DKD_BETA[(big, small)])], stage2.main, seed,
                    baseline=scratch),
            ]
    return rows


def kd_folder_rows(args: argparse.Namespace) -> list[Row]:
    """A torchvision teacher and student on an image folder: the student from scratch, with MSE-on-logits KD and
    with KL KD, for the same epochs."""
    e1, e2 = BUDGETS["kd-imagefolder"][args.budget]
    runs, rows = Path(args.runs) / "kd-imagefolder", []
    teacher_name, student_name = KD_FOLDER["teacher"], KD_FOLDER["student"]
    size = args.image_size or KD_FOLDER["image_size"]
    group = f"{teacher_name.split(':')[1]}->{student_name.split(':')[1]}"
    for seed in args.seeds:
        common = ["--dataset", "imagefolder", "--image-size", str(size), "--loader", "stream", *_common(args, seed)]
        if args.budget == "smoke":  # (tests) a few hundred images: starting loader workers costs more than it saves
            common += ["--workers", "0"]
        teacher, scratch = runs / f"teacher-s{seed}", runs / f"student-scratch-s{seed}"
        kd = ["--teacher", str(teacher), "-m", student_name, "--epochs", str(e2), *common]
        rows += [
            Row(f"teacher {teacher_name}", group, teacher, ["-m", teacher_name, "--epochs", str(e1), *common],
                stage1.main, seed),
            Row(f"student {student_name}, no distillation", group, scratch,
                ["-m", student_name, "--epochs", str(e2), *common], stage1.main, seed),
            Row(f"student {student_name}, KD: MSE on logits", group, runs / f"student-mse-s{seed}",
                [*kd, "--kd", "mse"], stage2.main, seed, baseline=scratch),
            Row(f"student {student_name}, KD: KL (T 5)", group, runs / f"student-kl-s{seed}", [*kd, "--kd", "kd"],
                stage2.main, seed, baseline=scratch),
        ]
    return rows


def precision_rows(args: argparse.Namespace) -> list[Row]:
    """The same teacher and stage-2 runs in float32 and in bf16 autocast: does the faster default cost accuracy?"""
    e1, e2 = BUDGETS["precision"][args.budget]
    runs, rows = Path(args.runs) / "precision", []
    for model in args.models or ["reduce20"]:
        for seed in args.seeds:
            common = ["--dataset", "cifar10", *_common(args, seed)]
            def run(precision: str, stage: str) -> Path:
                return runs / f"{model}-{precision}-s{seed}-{stage}"

            for amp, label in (("--no-amp", "float32"), ("--amp", "bf16 autocast")):
                precision = label.split()[0]
                teacher = run(precision, "teacher")
                bf16 = precision == "bf16"  # measured against float32
                rows += [
                    Row(f"teacher, {label}", model, teacher,
                        ["-m", model, "--expansion", "1", "--epochs", str(e1), amp, *common], stage1.main, seed,
                        baseline=run("float32", "teacher") if bf16 else None),
                    Row(f"stage2 + LoRA r{LORA_RANK} + LambdaReLU, {label}", model, run(precision, "stage2"),
                        ["--inherit", str(teacher), "--epochs", str(e2), "--lora-rank", str(LORA_RANK),
                         "--lambda-epochs", str(max(1, e2 // 2)), amp, *common], stage2.main, seed,
                        baseline=run("float32", "stage2") if bf16 else None),
                ]
    return rows


def trim_rows(args: argparse.Namespace) -> list[Row]:
    """A ResNet-56 (reduce56 student form) trained from scratch, trimmed 2x and 4x by MACs: without fine-tuning, and
    fine-tuned for the same epochs with CE only, with KD, and with KD + SemCKD (SemCKD's CIFAR recipe)."""
    e1, e2 = BUDGETS["trim"][args.budget]
    runs, rows = Path(args.runs) / "trim", []
    model = (args.models or ["reduce56"])[0]
    for seed in args.seeds:
        common = ["--dataset", "cifar10", *_common(args, seed)]
        base = runs / f"{model}-s{seed}"
        rows.append(Row(f"untrimmed {model} student ({e1} ep)", model, base,
                        ["-m", model, "--expansion", "0", "--epochs", str(e1), *common], stage1.main, seed))
        for reduce in (2, 4):
            trim_args = ["--teacher", str(base), "--reduce", str(reduce), "--by", "macs", *common]
            variants = [
                ("trimmed, no fine-tuning", "none", ["--epochs", "0", "--kd", "none"]),
                (f"fine-tuned {e2} ep, CE only", "ce", ["--epochs", str(e2), "--kd", "none"]),
                (f"fine-tuned {e2} ep, KD", "kd", ["--epochs", str(e2), "--kd", "kd"]),
                (f"fine-tuned {e2} ep, KD + SemCKD", "semckd",
                 ["--epochs", str(e2), "--kd", "kd", "--kd-alpha", "1", "--ce-weight", "1", "--kd-T", "4",
                  "--feature-kd", "semckd"]),
            ]
            ce = Path(f"{base}-trim{reduce}-ce")  # distillation is measured against fine-tuning with CE only
            rows += [Row(f"{reduce}x MACs: {label}", model, Path(f"{base}-trim{reduce}-{tag}"), [*trim_args, *extra],
                         trim.main, seed, baseline=ce if tag in ("kd", "semckd") else None)
                     for label, tag, extra in variants]
    return rows


def pyramid_rows(args: argparse.Namespace) -> list[Row]:
    """VGG19 (the top), then each scheme's chain SVGG17 -> SVGG5 with each loss (one row per chain)."""
    e0, e1, e2 = BUDGETS["pyramid"][args.budget]
    runs, rows = Path(args.runs) / "pyramid", []
    size = args.image_size or 32
    for seed in args.seeds:
        common = ["--dataset", "cifar10", "--image-size", str(size), *_common(args, seed)]
        if not args.subset and PYRAMID_SUBSET[args.budget]:
            common += ["--subset", str(PYRAMID_SUBSET[args.budget])]
        top = runs / f"vgg19-s{seed}"
        # VGG19 without BatchNorm does not train at SGD's lr 0.1: the original's Adam, lr 1e-4, wd 5e-4
        rows.append(Row("VGG19 (the top)", "pyramid_vgg19", top,
                        ["-m", "pyramid_vgg19", "--epochs", str(e0), "--optimizer", "adam", "--lr", "1e-4",
                         "--wd", "5e-4", *common], stage1.main, seed))
        # the table reads no deploy files; the smoke budget (tests) leaves out writing them for ten levels
        no_export = ["--no-export"] if args.budget == "smoke" else []
        for scheme in ("forward", "backward"):
            for loss in args.losses:
                hint = ["--hint-epochs", "0"] if loss == "scratch" else ["--hint-epochs", str(e1)]
                rows.append(Row(f"{scheme}: {loss}", scheme, runs / f"{scheme}-{loss}-s{seed}",
                                ["--teacher", str(top), "--scheme", scheme, "--loss", loss, "--epochs", str(e2),
                                 *hint, *no_export, *common], pyramid.main, seed))
    return rows
