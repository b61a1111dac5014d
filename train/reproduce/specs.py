"""What each table trains: its rows (one run of the pipeline each, or a Pyramid chain), budgets, and the published
numbers beside them.

A row's ``spec`` is the complete :class:`~train.spec.RunSpec` of its run (its ``out`` is the row's folder); the
runner treats a row as finished only when the run in its folder was asked for by exactly that spec. Every table's
rows are built once when this module is imported (:func:`check_tables`), so a row that names an option no spec has
fails at import, not hours into a table.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

import torch

from models import list_models
from models.errors import ConfigError, UnknownModelError
from models.registry import EXTERNAL, check_model_name, is_zoo, unknown_model

from ..pipeline import Chain, chain_of
from ..spec import Distil, Fresh, Inherit, RunSpec, Trim

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
#: grow: (grown teacher, stage 2) epochs; the CPU budgets train on GROW_SUBSET images of the CIFAR-10 JPEG copy.
BUDGETS["grow"] = {"full": (200, 200), "medium": (8, 8), "short": (3, 3), "smoke": (1, 1)}
GROW_SUBSET = {"full": None, "medium": 10000, "short": 2500, "smoke": None}
#: Two architectures that are not ReduceNet, small enough for a CPU budget and sensible at 32 px.
GROW_MODELS = ("torchvision:resnet18", "timm:resnet10t")
GROW_EXPANSION = 1
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
KD_RECIPE = dict(lr=0.05, wd=5e-4, batch_size=64, schedule="step", milestones=(0.625, 0.75, 0.875), nesterov=False,
                 warmup_epochs=0.0)
DKD_BETA = {("reduce56", "reduce20"): 2.0, ("reduce110", "reduce32"): 2.0}


@dataclass
class Row:
    """One training run of a table.

    Attributes:
        name: the row's label, e.g. ``"stage2 + LoRA r8 (ours)"``.
        group: what the row belongs to, e.g. ``"reduce20-w1"``; rows of one group share a plot.
        spec: the run (its ``out`` is the row's run directory), or a Pyramid :class:`~train.pyramid.Chain`.
        seed: the row's seed.
        baseline: the run this row is measured against, seed by seed (e.g. the scratch student of the same
            epochs); the table shows the row's accuracy minus the baseline's.
        result: the run's summary, filled by the runner.
    """

    name: str
    group: str
    spec: Union[RunSpec, Chain]
    seed: int = 0
    baseline: Path | None = None
    result: dict[str, Any] = field(default_factory=dict)

    @property
    def run(self) -> Path:
        """The row's run directory (a chain's folder of levels)."""
        return Path(self.spec.out)

    @property
    def kind(self) -> str:
        """The spec's kind (``fresh``, ``inherit``, ``distil``, ``trim``) or ``chain``."""
        return "chain" if isinstance(self.spec, Chain) else self.spec.kind

    @property
    def epochs(self) -> int:
        """The epochs the row trains in all (a chain: every level's, hint epochs included)."""
        specs = self.spec.levels if isinstance(self.spec, Chain) else [self.spec]
        return sum(s.optim.epochs + getattr(s.derive, "hint_epochs", 0) for s in specs)


def _reads(spec: RunSpec | Chain) -> list[str]:
    """The files and run directories ``spec`` reads (its teacher, the level above, the chain's top, weights)."""
    specs = spec.levels[:1] if isinstance(spec, Chain) else [spec]
    return [getattr(s.derive, f.name) for s in specs for f in fields(s.derive)
            if f.name in ("teacher", "parent", "top", "weights") and isinstance(getattr(s.derive, f.name), str)]


def inherits_from(row: Row, rows: list[Row]) -> list[Row]:
    """The rows whose run ``row`` reads (its spec names their folder or a file in it): they train first."""
    def names(run: Path, path: str) -> bool:
        return path == str(run) or path.startswith(str(run) + os.sep)

    return [r for r in rows if r is not row and any(names(r.run, p) for p in _reads(row.spec))]


def _common(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    out = dict(seed=seed, device=args.device, data_dir=args.data_dir, subset=args.subset)
    if getattr(args, "compile", False):
        out.update(compile=True, compile_mode=args.compile_mode)
    if getattr(args, "cuda_graph", False):
        out.update(cuda_graph=True)
    return out


def cifar10_rows(args: argparse.Namespace) -> list[Row]:
    """Teacher, scratch student with the same total epochs, and stage 2, per recipe, model, width and seed.

    With our recipe stage 2 also runs with LoRA and with LoRA + LambdaReLU, unless ``args.lora_rows`` is False;
    leaving them out changes no other row's spec, so finished rows count either way.
    """
    e1, e2 = BUDGETS["cifar10-reducenet"][args.budget]
    widths = getattr(args, "widths", None) or ([1, 2] if torch.cuda.is_available() and args.device != "cpu" else [1])
    runs, rows = Path(args.runs) / "cifar10-reducenet", []
    for model in args.models or ["reduce20", "reduce56"]:
        for w in widths:
            group = f"{model}-w{w}"
            for seed in args.seeds:
                for short in args.recipes:
                    common = dict(dataset="cifar10", recipe=RECIPE_NAMES[short], **_common(args, seed))
                    prefix = runs / f"{group}-{short}-s{seed}"
                    teacher, scratch = Path(f"{prefix}-teacher"), Path(f"{prefix}-scratch")
                    tag = f" ({short} recipe)"
                    rows += [
                        Row("teacher (stage1)" + tag, group,
                            RunSpec.of(Fresh(model, 1, w), epochs=e1, out=str(teacher), **common), seed),
                        Row(f"student from scratch ({e1 + e2} ep)" + tag, group,
                            RunSpec.of(Fresh(model, 0, w), epochs=e1 + e2, out=str(scratch), **common), seed),
                        Row("stage2: inherit + KD" + tag, group,
                            RunSpec.of(Inherit(str(teacher)), epochs=e2, kd="kd", out=f"{prefix}-kd", **common),
                            seed, baseline=scratch),
                    ]
                    if short == "ours" and getattr(args, "lora_rows", True):
                        rows += _lora_rows(group, prefix, str(teacher), e2, tag, seed, scratch, common)
    return rows


def _lora_rows(group: str, prefix: Path, teacher: str, e2: int, tag: str, seed: int, baseline: Path,
               common: dict[str, Any]) -> list[Row]:
    def lora(lambda_epochs: float, out: str) -> RunSpec:
        return RunSpec.of(Inherit(teacher, lora_rank=LORA_RANK, lambda_epochs=lambda_epochs), epochs=e2, kd="kd",
                          out=out, **common)

    return [
        Row(f"stage2 + LoRA r{LORA_RANK}" + tag, group, lora(0.0, f"{prefix}-kd-lora"), seed, baseline=baseline),
        Row(f"stage2 + LoRA r{LORA_RANK} + LambdaReLU" + tag, group,
            lora(float(max(1, e2 // 2)), f"{prefix}-kd-lora-lambda"), seed, baseline=baseline),
    ]


def original_rows(args: argparse.Namespace, teacher: Path) -> list[Row]:
    """Stage 2 from the original ReduceNet's own converted teacher, against a scratch student of the same epochs."""
    _, e2 = BUDGETS["original-stage2"][args.budget]
    runs, rows, group = Path(args.runs) / "original-stage2", [], "reduce20-w1"
    for seed in args.seeds:
        common = dict(dataset="cifar10", **_common(args, seed))
        prefix = runs / f"reduce20-s{seed}"
        scratch = Path(f"{prefix}-scratch")

        def stage2(recipe: str, out: str) -> RunSpec:
            return RunSpec.of(Inherit(str(teacher)), epochs=e2, recipe=recipe, kd="kd", out=out, **common)

        rows += [
            Row(f"student from scratch ({e2} ep, ours)", group,
                RunSpec.of(Fresh("reduce20", 0), epochs=e2, out=str(scratch), **common), seed),
            Row("stage2: inherit + KD (paper recipe)", group, stage2("reducenet-paper", f"{prefix}-paper-kd"), seed,
                baseline=scratch),
            Row("stage2: inherit + KD (ours recipe)", group, stage2("ours", f"{prefix}-ours-kd"), seed,
                baseline=scratch),
            *_lora_rows(group, Path(f"{prefix}-ours"), str(teacher), e2, " (ours recipe)", seed, scratch, common),
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
            common = dict(dataset="cifar100", epochs=epochs, **KD_RECIPE, **_common(args, seed))
            teacher, scratch = runs / f"{big}-teacher-s{seed}", runs / f"{small}-scratch-s{seed}"

            def kd(out: Path, **loss: Any) -> RunSpec:
                return RunSpec.of(Distil(str(teacher), small), export=False, out=str(out), **loss, **common)

            rows += [
                Row(f"teacher {big} (scratch)", group,
                    RunSpec.of(Fresh(big, 0), out=str(teacher), **common), seed),
                Row(f"student {small} scratch", group, RunSpec.of(Fresh(small, 0), out=str(scratch), **common), seed),
                Row(f"student {small} KD", group, kd(runs / f"{small}-kd-from-{big}-s{seed}", kd="kd",
                                                      kd_alpha=0.9, kd_T=4.0), seed, baseline=scratch),
                Row(f"student {small} DKD", group, kd(runs / f"{small}-dkd-from-{big}-s{seed}", kd="dkd",
                                                       kd_beta=DKD_BETA[(big, small)]), seed, baseline=scratch),
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
        common = dict(dataset="imagefolder", image_size=size, loader="stream", **_common(args, seed))
        if args.budget == "smoke":  # (tests) a few hundred images: starting loader workers costs more than it saves
            common["workers"] = 0
        teacher, scratch = runs / f"teacher-s{seed}", runs / f"student-scratch-s{seed}"

        def kd(loss: str, out: Path) -> RunSpec:
            return RunSpec.of(Distil(str(teacher), student_name), epochs=e2, kd=loss, out=str(out), **common)

        rows += [
            Row(f"teacher {teacher_name}", group,
                RunSpec.of(Fresh(teacher_name), epochs=e1, out=str(teacher), **common), seed),
            Row(f"student {student_name}, no distillation", group,
                RunSpec.of(Fresh(student_name), epochs=e2, out=str(scratch), **common), seed),
            Row(f"student {student_name}, KD: MSE on logits", group, kd("mse", runs / f"student-mse-s{seed}"), seed,
                baseline=scratch),
            Row(f"student {student_name}, KD: KL (T 5)", group, kd("kd", runs / f"student-kl-s{seed}"), seed,
                baseline=scratch),
        ]
    return rows


def precision_rows(args: argparse.Namespace) -> list[Row]:
    """The same teacher and stage-2 runs in float32 and in bf16 autocast: does the faster default cost accuracy?"""
    e1, e2 = BUDGETS["precision"][args.budget]
    runs, rows = Path(args.runs) / "precision", []
    for model in args.models or ["reduce20"]:
        for seed in args.seeds:
            common = dict(dataset="cifar10", **_common(args, seed))

            def run(precision: str, stage: str) -> Path:
                return runs / f"{model}-{precision}-s{seed}-{stage}"

            for amp, label in ((False, "float32"), (True, "bf16 autocast")):
                precision = label.split()[0]
                teacher = run(precision, "teacher")
                bf16 = precision == "bf16"  # measured against float32
                lora = Inherit(str(teacher), lora_rank=LORA_RANK, lambda_epochs=float(max(1, e2 // 2)))
                rows += [
                    Row(f"teacher, {label}", model,
                        RunSpec.of(Fresh(model, 1), epochs=e1, amp=amp, out=str(teacher), **common), seed,
                        baseline=run("float32", "teacher") if bf16 else None),
                    Row(f"stage2 + LoRA r{LORA_RANK} + LambdaReLU, {label}", model,
                        RunSpec.of(lora, epochs=e2, amp=amp, out=str(run(precision, "stage2")), **common), seed,
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
        common = dict(dataset="cifar10", **_common(args, seed))
        base = runs / f"{model}-s{seed}"
        rows.append(Row(f"untrimmed {model} student ({e1} ep)", model,
                        RunSpec.of(Fresh(model, 0), epochs=e1, out=str(base), **common), seed))
        for reduce in (2, 4):
            variants = [
                ("trimmed, no fine-tuning", "none", dict(epochs=0, kd="none")),
                (f"fine-tuned {e2} ep, CE only", "ce", dict(epochs=e2, kd="none")),
                (f"fine-tuned {e2} ep, KD", "kd", dict(epochs=e2, kd="kd")),
                (f"fine-tuned {e2} ep, KD + SemCKD", "semckd",
                 dict(epochs=e2, kd="kd", kd_alpha=1.0, ce_weight=1.0, kd_T=4.0, feature_kd="semckd")),
            ]
            ce = Path(f"{base}-trim{reduce}-ce")  # distillation is measured against fine-tuning with CE only
            rows += [Row(f"{reduce}x MACs: {label}", model,
                         RunSpec.of(Trim(str(base), float(reduce), "macs"), out=f"{base}-trim{reduce}-{tag}",
                                    **extra, **common), seed, baseline=ce if tag in ("kd", "semckd") else None)
                     for label, tag, extra in variants]
    return rows


def pyramid_rows(args: argparse.Namespace) -> list[Row]:
    """VGG19 (the top), then each scheme's chain SVGG17 -> SVGG5 with each loss (one row per chain)."""
    e0, e1, e2 = BUDGETS["pyramid"][args.budget]
    runs, rows = Path(args.runs) / "pyramid", []
    size = args.image_size or 32
    for seed in args.seeds:
        common = dict(dataset="cifar10", image_size=size, **_common(args, seed))
        if not args.subset and PYRAMID_SUBSET[args.budget]:
            common["subset"] = PYRAMID_SUBSET[args.budget]
        top = runs / f"vgg19-s{seed}"
        # VGG19 without BatchNorm does not train at SGD's lr 0.1: the original's Adam, lr 1e-4, wd 5e-4
        rows.append(Row("VGG19 (the top)", "pyramid_vgg19",
                        RunSpec.of(Fresh("pyramid_vgg19"), epochs=e0, optimizer="adam", lr=1e-4, wd=5e-4,
                                   out=str(top), **common), seed))
        for scheme in ("forward", "backward"):
            for loss in args.losses:
                # the table reads no deploy files; the smoke budget (tests) leaves out writing them for ten levels
                chain = chain_of(str(top), "pyramid_vgg19", scheme, runs / f"{scheme}-{loss}-s{seed}", loss,
                                 hint_epochs=0 if loss == "scratch" else e1, epochs=e2,
                                 export=args.budget != "smoke", **common)
                rows.append(Row(f"{scheme}: {loss}", scheme, chain, seed))
    return rows


def grow_rows(args: argparse.Namespace) -> list[Row]:
    """Any classifier grown into a ReduceNet teacher (branch (b) of width 1 beside its kxk convs), then shrunk back
    into itself and distilled (stage 2 --inherit), against the same architecture trained alone for the same total
    epochs."""
    e1, e2 = BUDGETS["grow"][args.budget]
    runs, rows = Path(args.runs) / "grow", []
    for model in args.models or GROW_MODELS:
        group, tag = model, model.replace(":", "-")
        for seed in args.seeds:
            common = dict(dataset="cifar10", **_common(args, seed))
            if not args.subset and GROW_SUBSET[args.budget]:
                common["subset"] = GROW_SUBSET[args.budget]
            teacher, alone = runs / f"{tag}-grown-s{seed}", runs / f"{tag}-alone-s{seed}"
            rows += [
                Row(f"grown teacher (E={GROW_EXPANSION}, {e1} ep)", group,
                    RunSpec.of(Fresh(model, grow=GROW_EXPANSION), epochs=e1, out=str(teacher), **common), seed),
                Row(f"{model.split(':')[1]} alone ({e1 + e2} ep)", group,
                    RunSpec.of(Fresh(model), epochs=e1 + e2, out=str(alone), **common), seed),
                Row(f"shrunk back + KD ({e2} ep)", group,
                    RunSpec.of(Inherit(str(teacher)), epochs=e2, kd="kd", out=f"{runs / tag}-student-s{seed}",
                               **common), seed, baseline=alone),
            ]
    return rows


def table_models(table: str) -> tuple[str, ...] | None:
    """The names ``--models`` may give ``table``: ReduceNet's families where a row builds a teacher or a student
    form, cifar100-kd's pairs, None (any classifier) for grow, and none for a table whose models are fixed."""
    if table in ("cifar10-reducenet", "precision", "trim", "deploy-speed"):
        return tuple(list_models(reducible=True))
    if table == "cifar100-kd":
        return tuple(dict.fromkeys(name for pair in DKD_BETA for name in pair))
    return None if table == "grow" else ()


def check_models(table: str, names: list[str] | None) -> None:
    """Refuse, in one line and before anything trains, a ``--models`` name that ``table`` cannot train: an unknown
    name (with the close ones), a model of another kind than the table's, or any name where its models are fixed.

    Raises:
        ConfigError: as above; UnknownModelError for a name that is no model at all.
    """
    if not names:
        return
    accepted = table_models(table)
    if accepted == ():
        raise ConfigError(f"--models: the models of {table} are fixed; leave --models out")
    if table == "trim" and len(names) > 1:
        raise ConfigError(f"--models {' '.join(names)}: trim trims one model; pass one (e.g. --models {names[0]})")
    try:
        for name in names:
            if accepted is None:  # grow: any classifier of the zoo, torchvision or timm
                check_model_name(name)
            elif name not in accepted:
                source, colon, _ = name.partition(":")
                if is_zoo(name) or (colon and source in EXTERNAL):
                    raise ConfigError(f"--models {name}: {table} cannot train it; it takes {', '.join(accepted)}")
                raise unknown_model(name, list(accepted), f"{table} takes {', '.join(accepted)}")
    except UnknownModelError as e:
        raise UnknownModelError(f"--models: {e}") from None


#: Every table's rows, by the name ``train.reproduce`` takes (``original-stage2`` reads its teacher's path).
ROW_BUILDERS = {"cifar10-reducenet": cifar10_rows, "cifar100-kd": cifar100_rows, "kd-imagefolder": kd_folder_rows,
                "precision": precision_rows, "trim": trim_rows, "pyramid": pyramid_rows, "grow": grow_rows,
                "original-stage2": lambda args: original_rows(args, Path(args.runs) / "teacher.safetensors")}


def check_tables() -> int:
    """Build every table's rows for every budget, with every model, width, recipe, loss and two seeds, and validate
    each spec: a row naming an option that no spec has, or a value no run takes, raises here (at import). Returns
    the number of rows built."""
    from ..tasks import LOSSES  # noqa: PLC0415 (the pyramid's losses)

    args = argparse.Namespace(runs="runs", data_dir=None, subset=None, image_size=None, device="cpu", seeds=[0, 1],
                              models=None, widths=[1, 2], recipes=list(RECIPE_NAMES), lora_rows=True,
                              losses=list(LOSSES), compile=True, compile_mode="default")
    count = 0
    for budget in BUDGETS["cifar10-reducenet"]:
        args.budget = budget
        for build in ROW_BUILDERS.values():
            for row in build(args):
                for spec in row.spec.levels if isinstance(row.spec, Chain) else [row.spec]:
                    spec.validate()
                count += 1
    return count


check_tables()
