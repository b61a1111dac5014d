"""``python -m train.reproduce TABLE --budget full|short``: regenerate one results table, row by row.

Tables:
    cifar10-reducenet  teacher, scratch student (same total epochs), stage2 KD, + LoRA, + LoRA + LambdaReLU,
                       and the fused deploy model, for reduce20/reduce56 (width 2 too on a GPU).
    cifar100-kd        resnet56 -> resnet20 and resnet110 -> resnet32: scratch, KD, DKD (RepDistiller recipe).
    deploy-speed       params, MACs, CPU latency (batch 1) and throughput (batch 128), GPU when present, for
                       teacher / unfused student with LoRA / fused student / plain ResNet built directly.

Every training row is a stage1/stage2 run in ``--runs/TABLE/ROW``; a row whose run finished is skipped and a
half-finished one resumes, so an interrupted table continues where it stopped. The table is written to
``--results/TABLE.md`` and ``.csv`` with plots (accuracy per epoch, accuracy against MACs).
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Callable

import torch

from models import complexity, create_model, load_checkpoint
from models.checkpoint import atomic_write_text
from models.errors import ConfigError, cli_errors
from reparam import fuse_model

from . import stage1, stage2
from .engine import hardware

TABLES = ("cifar10-reducenet", "cifar100-kd", "deploy-speed")
# Epochs per budget. "short" runs the reduce20 cifar10-reducenet table on the full CIFAR-10 in about an hour on
# 2 CPU cores (teacher ~190 img/s); "smoke" is for tests.
BUDGETS = {
    "cifar10-reducenet": {"full": (200, 200), "short": (3, 2), "smoke": (1, 1)},  # (stage1, stage2)
    "cifar100-kd": {"full": (240, 240), "short": (4, 4), "smoke": (1, 1)},  # (teacher, student)
}
PAPER = {  # published numbers, original CIFAR, kept apart from ours
    "cifar10-reducenet": {("reduce20", 1): (91.97, 92.72), ("reduce56", 1): (92.84, 93.79),
                          ("reduce20", 2): (93.27, 94.40), ("reduce56", 2): (94.11, 95.27)},
    "cifar100-kd": {("reduce56", "reduce20"): {"teacher": 72.34, "scratch": 69.06, "kd": 70.66, "dkd": 71.97},
                    ("reduce110", "reduce32"): {"teacher": 74.31, "scratch": 71.14, "kd": 73.08, "dkd": 74.11}},
}
LORA_RANK = 8
# RepDistiller / mdistiller CIFAR-100 recipe: SGD lr 0.05, wd 5e-4, batch 64, x0.1 at epochs 150/180/210 of 240.
KD_RECIPE = ["--lr", "0.05", "--wd", "5e-4", "--batch-size", "64", "--schedule", "step",
             "--milestones", "0.625", "0.75", "0.875"]


@dataclass
class Row:
    """One line of a table: a training run (or a derived measurement) and what to show."""

    name: str
    model: str
    run: Path | None
    argv: list[str] = field(default_factory=list)
    main: Callable[[list[str]], dict] | None = None
    result: dict[str, Any] = field(default_factory=dict)


def _finished(run: Path) -> bool:
    return (run / "summary.json").is_file() and (run / "done").is_file()


def train_row(row: Row, log: Callable[[str], None]) -> dict[str, Any]:
    """Run (or skip, or resume) one training row; returns its summary."""
    if _finished(row.run):
        log(f"[skip] {row.name}: finished in {row.run}")
        return json.loads((row.run / "summary.json").read_text())
    resume = (row.run / "train_state.pt").is_file()
    argv = [*row.argv, "--out", str(row.run)] + (["--resume"] if resume else ["--overwrite"])
    log(f"[{'resume' if resume else 'run'}] {row.name}: python -m train.{row.main.__module__.split('.')[-1]} "
        + " ".join(argv))
    summary = row.main(argv)
    atomic_write_text(row.run / "done", "")
    return summary


def _common(args) -> list[str]:
    out = ["--seed", str(args.seed), "--device", args.device]
    if args.data_dir:
        out += ["--data-dir", args.data_dir]
    if args.subset:
        out += ["--subset", str(args.subset)]
    return out


def cifar10_rows(args) -> list[Row]:
    e1, e2 = BUDGETS["cifar10-reducenet"][args.budget]
    widths = [1, 2] if torch.cuda.is_available() and args.device != "cpu" else [1]
    runs, common = Path(args.runs) / "cifar10-reducenet", ["--dataset", "cifar10", *_common(args)]
    rows = []
    for model in args.models or ["reduce20", "reduce56"]:
        for w in widths:
            tag = f"{model}-w{w}"
            teacher = runs / f"{tag}-teacher"
            s2 = ["--inherit", str(teacher), "--epochs", str(e2), *common]
            rows += [
                Row("teacher (stage1)", tag, teacher, ["-m", model, "--width", str(w), "--expansion", "1",
                                                       "--epochs", str(e1), *common], stage1.main),
                Row(f"student from scratch ({e1 + e2} ep)", tag, runs / f"{tag}-scratch",
                    ["-m", model, "--width", str(w), "--expansion", "0", "--epochs", str(e1 + e2), *common],
                    stage1.main),
                Row("stage2: inherit + KD", tag, runs / f"{tag}-kd", [*s2, "--kd", "kd"], stage2.main),
                Row(f"stage2 + LoRA r{LORA_RANK}", tag, runs / f"{tag}-kd-lora",
                    [*s2, "--kd", "kd", "--lora-rank", str(LORA_RANK)], stage2.main),
                Row(f"stage2 + LoRA r{LORA_RANK} + LambdaReLU", tag, runs / f"{tag}-kd-lora-lambda",
                    [*s2, "--kd", "kd", "--lora-rank", str(LORA_RANK), "--lambda-epochs", str(max(1, e2 // 2))],
                    stage2.main),
            ]
    return rows


def cifar100_rows(args) -> list[Row]:
    epochs = BUDGETS["cifar100-kd"][args.budget][0]
    runs = Path(args.runs) / "cifar100-kd"
    common = ["--dataset", "cifar100", "--epochs", str(epochs), *KD_RECIPE, *_common(args)]
    rows = []
    pairs = [("reduce56", "reduce20"), ("reduce110", "reduce32")]
    if args.models:
        pairs = [p for p in pairs if p[1] in args.models or p[0] in args.models]
    for big, small in pairs:
        tag = f"{big}->{small}"
        teacher = runs / f"{big}-teacher"
        kd = ["--teacher", str(teacher), "-m", small, "--no-export", *common]
        rows += [
            Row(f"teacher {big} (scratch)", tag, teacher, ["-m", big, "--expansion", "0", *common], stage1.main),
            Row(f"student {small} scratch", tag, runs / f"{small}-scratch", ["-m", small, "--expansion", "0",
                                                                            *common], stage1.main),
            Row(f"student {small} KD", tag, runs / f"{small}-kd-from-{big}",
                [*kd, "--kd", "kd", "--kd-alpha", "0.9", "--kd-T", "4"], stage2.main),
            Row(f"student {small} DKD", tag, runs / f"{small}-dkd-from-{big}", [*kd, "--kd", "dkd"], stage2.main),
        ]
    return rows


# ------------------------------------------------------------------------------------------------ speed
@torch.inference_mode()
def measure(models: dict[str, torch.nn.Module], batch: int, device: torch.device, repeats: int, warmup: int = 10,
            image_size: int = 32) -> dict[str, float]:
    """Median seconds of one forward pass at ``batch`` for each model.

    The models are timed side by side: each round runs every model once, in turn, so that drift in the
    machine's speed (other processes, clock changes) affects them alike. ``warmup`` rounds are not timed.
    """
    models = {k: m.to(device).eval() for k, m in models.items()}
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(warmup + repeats):
        for k, model in models.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def speed_rows(args) -> list[dict[str, Any]]:
    """Deploy-speed rows: every zoo model in four forms."""
    from models import list_models

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for name in args.models or list_models():
        torch.manual_seed(0)
        lora = create_model(name, expansion=0, lora_rank=LORA_RANK)
        forms = {"teacher": create_model(name, expansion=1), f"student + LoRA r{LORA_RANK} (unfused)": lora,
                 "fused student": fuse_model(lora), "plain (built directly)": create_model(
                     name, expansion=0, inference_mode=True)}
        table = {form: {"model": name, "form": form, **complexity(model)} for form, model in forms.items()}
        for dev in devices:
            tag = "cpu" if dev.type == "cpu" else "gpu"
            b1 = measure(forms, 1, dev, args.repeats)
            b128 = measure(forms, 128, dev, max(3, args.repeats // 5), warmup=2)
            for form, row in table.items():
                row[f"{tag}_latency_ms_b1"] = 1e3 * b1[form]
                row[f"{tag}_img_per_s_b128"] = 128 / b128[form]
            fused, plain = table["fused student"], table["plain (built directly)"]
            fused[f"{tag}_fused_over_plain"] = fused[f"{tag}_latency_ms_b1"] / plain[f"{tag}_latency_ms_b1"]
        for row in table.values():
            print(f"  {name:18s} {row['form']:32s} {row['cpu_latency_ms_b1']:7.2f} ms", flush=True)
        rows += table.values()
    return rows


# ------------------------------------------------------------------------------------------------ output
def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_table(table: str, header: list[str], lines: list[dict[str, Any]], columns: list[tuple[str, str]],
                results: Path, notes: list[str]) -> Path:
    """Write ``TABLE.md`` (header notes + markdown table) and ``TABLE.csv``."""
    results.mkdir(parents=True, exist_ok=True)
    md = [f"# {table}", "", *header, "", "| " + " | ".join(t for t, _ in columns) + " |",
          "|" + "---|" * len(columns)]
    for line in lines:
        md.append("| " + " | ".join(_fmt(line.get(k)) for _, k in columns) + " |")
    md += ["", *notes]
    atomic_write_text(results / f"{table}.md", "\n".join(md) + "\n")
    buf = io.StringIO()
    keys = list(dict.fromkeys(k for line in lines for k in line))
    writer = csv.DictWriter(buf, fieldnames=keys)
    writer.writeheader()
    writer.writerows(lines)
    atomic_write_text(results / f"{table}.csv", buf.getvalue())
    return results / f"{table}.md"


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def plot_curves(table: str, rows: list[Row], results: Path) -> Path:
    """Test accuracy per epoch of every training row, and accuracy against MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.model for r in rows))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(5.5 * (len(groups) + 1), 4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in rows:
            if r.model != group or not (r.run / "metrics.csv").is_file():
                continue
            with open(r.run / "metrics.csv") as f:
                hist = list(csv.DictReader(f))
            ax.plot([int(h["epoch"]) for h in hist], [float(h["test_acc"]) for h in hist], marker=".", label=r.name)
        ax.set(title=group, xlabel="epoch", ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for r in rows:
        acc = r.result.get("fused_test_acc", r.result.get("last_test_acc"))
        macs = r.result.get("sizes", {}).get("fused", {}).get("macs", r.result.get("macs"))
        if acc is not None and macs:
            ax.scatter(macs / 1e6, acc)
            ax.annotate(f"{r.model}: {r.name}", (macs / 1e6, acc), fontsize=6)
    ax.set(title="accuracy vs deployed MACs (last epoch)", xlabel="MACs (M)", ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = results / f"{table}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def training_table(table: str, rows: list[Row], args, log: Callable[[str], None]) -> Path:
    for r in rows:
        r.result = train_row(r, log)
    lines = []
    for r in rows:
        s = r.result
        lines.append({"model": r.model, "row": r.name, "epochs": s["epochs"], "params": s["params"],
                      "macs_M": s["macs"] / 1e6, "last_acc": s["last_test_acc"], "best_acc": s["best_test_acc"],
                      "best_epoch": s["best_epoch"], "train_s": s["train_s_total"], "run": str(r.run)})
        if "fused_test_acc" in s and table == "cifar10-reducenet" and r is rows_last_of(rows, r.model):
            fused = s["sizes"]["fused"]
            deploy = load_checkpoint(r.run / "deploy" / "model.safetensors")
            lat = 1e3 * measure({"fused": deploy}, 1, torch.device("cpu"), 30)["fused"]
            lines.append({"model": r.model, "row": "fused deploy model (of the row above)", "epochs": s["epochs"],
                          "params": fused["params"], "macs_M": fused["macs"] / 1e6, "last_acc": s["fused_test_acc"],
                          "best_acc": None, "best_epoch": None, "train_s": None, "run": str(r.run / "deploy"),
                          "cpu_latency_ms_b1": lat})
    first = rows[0].result
    header = [
        f"Generated by `python -m train.reproduce {table} --budget {args.budget}"
        + (f" --subset {args.subset}" if args.subset else "")
        + (f" --models {' '.join(args.models)}" if args.models else "") + f"` at commit {_git_commit()}, "
        f"{date.today().isoformat()}.",
        f"- Data: {first['data']}; {first['train_images']} train / {first['test_images']} test images.",
        f"- Hardware: {first['hardware']}; torch {torch.__version__}.",
        f"- Budget `{args.budget}`: epochs per row in the table; seed {args.seed}, one seed per row.",
        "- `last_acc` is the test accuracy after the last epoch (what we report); `best_acc` is the best epoch,"
        " shown for comparison only (choosing it would select on the test set).",
    ]
    columns = [("model", "model"), ("row", "row"), ("epochs", "epochs"), ("params", "params"),
               ("MACs (M)", "macs_M"), ("last acc (%)", "last_acc"), ("best acc (%)", "best_acc"),
               ("best epoch", "best_epoch"), ("train time (s)", "train_s")]
    if table == "cifar10-reducenet":
        columns.append(("CPU latency b1 (ms)", "cpu_latency_ms_b1"))
    notes = paper_notes(table)
    path = write_table(table, header, lines, columns, Path(args.results), notes)
    plot_curves(table, rows, Path(args.results))
    return path


def rows_last_of(rows: list[Row], model: str) -> Row:
    return [r for r in rows if r.model == model][-1]


def paper_notes(table: str) -> list[str]:
    if table == "cifar10-reducenet":
        lines = ["## Published numbers (ReduceNet, original CIFAR-10, 200 + 200 epochs, one seed) — not ours",
                 "", "| model | teacher | student |", "|---|---:|---:|"]
        lines += [f"| {m} w{w} | {t} | {s} |" for (m, w), (t, s) in PAPER[table].items()]
        return lines
    lines = ["## Published numbers (original CIFAR-100, 240 epochs) — not ours", "",
             "RepDistiller (Tian et al., ICLR 2020) for teacher/scratch/KD; mdistiller (Zhao et al., CVPR 2022) "
             "for DKD.", "", "| pair | teacher | scratch | KD | DKD |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {t} -> {s} | {v['teacher']} | {v['scratch']} | {v['kd']} | {v['dkd']} |"
              for (t, s), v in PAPER[table].items()]
    return lines


def speed_table(args) -> Path:
    rows = speed_rows(args)
    gpu = torch.cuda.is_available()
    header = [
        f"Generated by `python -m train.reproduce deploy-speed` at commit {_git_commit()}, "
        f"{date.today().isoformat()}.",
        f"- Hardware: {hardware(torch.device('cpu'))}"
        + (f"; GPU {torch.cuda.get_device_name()}" if gpu else "; no GPU") + f"; torch {torch.__version__}.",
        f"- Random weights, 32x32 input, eval mode, `torch.inference_mode`; median of {args.repeats} timed runs at "
        f"batch 1 and {max(3, args.repeats // 5)} at batch 128; the four forms of a model are timed in "
        "turn within each round, so they see the same machine state.",
        "- `fused / plain` is the fused student's batch-1 latency over the plain ResNet built directly "
        "(same shape); the promise is <= 1.05.",
    ]
    columns = [("model", "model"), ("form", "form"), ("params", "params"), ("MACs", "macs"),
               ("CPU latency b1 (ms)", "cpu_latency_ms_b1"), ("CPU img/s b128", "cpu_img_per_s_b128"),
               ("fused / plain (CPU)", "cpu_fused_over_plain")]
    if gpu:
        columns += [("GPU latency b1 (ms)", "gpu_latency_ms_b1"), ("GPU img/s b128", "gpu_img_per_s_b128"),
                    ("fused / plain (GPU)", "gpu_fused_over_plain")]
    return write_table("deploy-speed", header, rows, columns, Path(args.results), [])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("table", choices=TABLES)
    p.add_argument("--budget", choices=("full", "short", "smoke"), default="short",
                   help="full: the papers' epochs; short: CPU-sized; smoke: 1 epoch per row, for tests")
    p.add_argument("--models", nargs="+", default=None, help="restrict to these models (e.g. reduce20)")
    p.add_argument("--data-dir", default=None, help="data root (default $REDUCENET_DATA, else ./data)")
    p.add_argument("--subset", type=int, default=None, help="train on N balanced images (quick checks only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--runs", default="runs/reproduce", help="where the rows' run directories go")
    p.add_argument("--results", default="results", help="where TABLE.md/.csv/.png go")
    p.add_argument("--repeats", type=int, default=30, help="deploy-speed: timed runs at batch 1")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    if args.table == "deploy-speed":
        path = speed_table(args)
    else:
        rows = cifar10_rows(args) if args.table == "cifar10-reducenet" else cifar100_rows(args)
        if not rows:
            raise ConfigError(f"--models {args.models} selects no row of {args.table}")
        path = training_table(args.table, rows, args, lambda m: print(m, flush=True))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
