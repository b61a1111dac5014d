"""Write a table: markdown with its provenance, CSV with one line per run, and plots."""
from __future__ import annotations

import csv
import io
import math
import statistics
from pathlib import Path
from typing import Any

from models.checkpoint import atomic_write_text

from .specs import Row, inherits_from


def aggregate(lines: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """One line per (group, row) with the mean of each of ``keys`` over seeds, ``KEY_std`` and ``seeds``."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    values: dict[tuple[str, str], dict[str, list[float]]] = {}
    for line in lines:
        k = (line["group"], line["row"])
        out.setdefault(k, {**line, "seeds": []})["seeds"].append(line.get("seed"))
        for key in keys:
            if isinstance(line.get(key), (int, float)) and not math.isnan(line[key]):
                values.setdefault(k, {}).setdefault(key, []).append(float(line[key]))
    for k, agg in out.items():
        for key in keys:
            v = values.get(k, {}).get(key, [])
            agg[key] = statistics.mean(v) if v else None
            agg[f"{key}_std"] = statistics.stdev(v) if len(v) > 1 else None
        agg["seeds"] = ", ".join(str(s) for s in agg["seeds"] if s is not None) or "–"
    return list(out.values())


def against_baselines(lines: list[dict[str, Any]], baselines: dict[str, str], test_images: int) -> list[str]:
    """A markdown section: each row's accuracy minus its baseline's (the same seed's run), over seeds.

    Args:
        lines: one line per run, with ``run``, ``group``, ``row``, ``seed`` and accuracies (``last_acc``, and
            ``exact_acc`` where the table has it).
        baselines: run folder -> the run folder of its baseline, for the rows that have one.
        test_images: the size of the test set of ``last_acc``, for the standard error quoted beside it.

    Returns:
        The section's lines, or none when no row has a finished baseline.
    """
    by_run = {line["run"]: line for line in lines}
    pairs = [(line, by_run[baselines[line["run"]]]) for line in lines if baselines.get(line["run"]) in by_run]
    if not pairs:
        return []
    keys = [k for k in ("last_acc", "exact_acc")
            if all(isinstance(x.get(k), (int, float)) for pair in pairs for x in pair)]
    diffs = [{"group": line["group"], "row": line["row"], "seed": line["seed"], "baseline": base["row"],
              **{k: line[k] - base[k] for k in keys}} for line, base in pairs]
    p = statistics.mean(x["last_acc"] for pair in pairs for x in pair) / 100
    se = 100 * math.sqrt(p * (1 - p) / test_images)
    names = {"last_acc": "last acc", "exact_acc": "exact-subset acc"}
    md = ["## Each row against its baseline, seed by seed", "",
          "The row's last-epoch accuracy minus its baseline's, run against run of the same seed, in points "
          "(above 0: the row is ahead); mean ± standard deviation over the seeds, then each seed's difference. "
          f"For scale: one binomial standard error of one accuracy near {100 * p:.0f}% on {test_images:,} test "
          f"images is {se:.2f} points, of a difference of two independent runs {math.sqrt(2) * se:.2f}.", "",
          "| group | row | baseline | seeds | " + " | ".join(f"Δ {names[k]} (points) | per seed" for k in keys)
          + " |", "|" + "---|" * (4 + 2 * len(keys))]
    for agg in aggregate(diffs, keys):
        per_seed = [d for d in diffs if (d["group"], d["row"]) == (agg["group"], agg["row"])]
        cells = [agg["group"], agg["row"], agg["baseline"], agg["seeds"]]
        for k in keys:
            cells += [f"{agg[k]:+.2f}" + (f" ± {agg[k + '_std']:.2f}" if agg[k + "_std"] is not None else ""),
                      ", ".join(f"{d[k]:+.2f}" for d in per_seed)]
        md.append("| " + " | ".join(cells) + " |")
    return md + [""]


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_table(table: str, header: list[str], lines: list[dict[str, Any]], columns: list[tuple[str, str]],
                results: Path, notes: list[str], csv_lines: list[dict[str, Any]] | None = None) -> Path:
    """Write ``TABLE.md`` (header, markdown table, notes) and ``TABLE.csv`` (``csv_lines``, default ``lines``).

    A column whose key has a ``KEY_std`` value in a line shows ``mean ± std``.
    """
    results.mkdir(parents=True, exist_ok=True)
    md = [f"# {table}", "", *header, "", "| " + " | ".join(t for t, _ in columns) + " |",
          "|" + "---|" * len(columns)]
    for line in lines:
        cells = []
        for _, k in columns:
            std = line.get(f"{k}_std")
            cells.append(fmt(line.get(k)) + (f" ± {std:.2f}" if std is not None else ""))
        md.append("| " + " | ".join(cells) + " |")
    md += ["", *notes]
    atomic_write_text(results / f"{table}.md", "\n".join(md) + "\n")
    rows = csv_lines if csv_lines is not None else lines
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for line in rows for k in line)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(results / f"{table}.csv", buf.getvalue())
    return results / f"{table}.md"


def epochs(run: Path) -> list[dict[str, str]]:
    """The rows of the run's ``metrics.csv``, one per epoch; none where the file is absent."""
    try:
        with open(run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


def train_seconds(run: Path, summary: dict[str, Any]) -> float | None:
    """The training time of the run in ``run``: its epochs times the median epoch's wall-clock time.

    A run's summed epoch times (``train_s_total``) count every pause of its process in the epoch it fell in: a
    job stopped while the tests ran, a machine suspended or busy with something else for a while. The median
    epoch is not moved by a few such epochs, so rows trained with and without pauses compare. Falls back to the
    summed time where ``metrics.csv`` has no epoch times.
    """
    hist = [e for e in epochs(run) if e.get("epoch") != "0"]  # epoch 0: the evaluation of a run of 0 epochs
    if not hist and epochs(run):
        return 0.0
    per_epoch = median_epoch_seconds(hist)
    return per_epoch * len(hist) if per_epoch is not None else summary.get("train_s_total")


def median_epoch_seconds(hist: list[dict[str, str]]) -> float | None:
    """The median wall-clock time of the epochs of a ``metrics.csv`` (see :func:`epochs`); None without times."""
    try:
        return statistics.median(float(e["epoch_s"]) for e in hist) if hist else None
    except (KeyError, TypeError, ValueError):
        return None


def _plot_cost(ax, rows: list[Row], colors: dict[str, str]) -> None:
    """Last-epoch accuracy against deployed MACs; against training time when every row deploys at the same MACs
    (then MACs would put every point on one vertical line, and what differs between the rows is their cost)."""
    points = []
    for r in rows:
        acc = r.result.get("fused_test_acc", r.result.get("last_test_acc"))
        macs = r.result.get("sizes", {}).get("fused", {}).get("macs", r.result.get("macs"))
        if acc is not None and macs:
            points.append((r, macs / 1e6, train_seconds(r.run, r.result), acc))
    by_macs = len({round(p[1], 3) for p in points}) > 1 or any(p[2] is None for p in points)
    several_groups = len({r.group for r in rows}) > 1
    seeds = sorted({r.seed for r in rows})
    marker = {seed: "o^sDv"[i % 5] for i, seed in enumerate(seeds)}
    labelled: set[str] = set()
    for r, macs, train_s, acc in points:  # a legend, not a label at every point: points of one MACs value overlap
        name = f"{r.group}: {r.name}" if several_groups else r.name
        ax.scatter(macs if by_macs else train_s / 3600, acc, color=colors[r.name], marker=marker[r.seed],
                   label=None if name in labelled else name)
        labelled.add(name)
    if points:
        seeds_note = f"markers {' '.join(marker.values())}: seeds {', '.join(map(str, seeds))}"
        ax.legend(fontsize=6, title=seeds_note if len(seeds) > 1 else None, title_fontsize=6)
    if by_macs:
        ax.set(title="last-epoch accuracy vs deployed MACs", xlabel="MACs (M)", ylabel="test accuracy (%)")
    else:
        same_macs = f" (every row deploys at {points[0][1]:.2f} M MACs)" if points else ""
        ax.set(title="last-epoch accuracy vs training time" + same_macs, xlabel="training time (h)",
               ylabel="test accuracy (%)")
    ax.grid(alpha=0.3)


def curve(row: Row, rows: list[Row]) -> tuple[list[int], list[float]]:
    """The test accuracy of ``row`` per epoch, each epoch counted after those of the rows it inherits from.

    A stage-2 run's epoch 1 follows its teacher's last epoch, so a pipeline of 30 + 30 epochs and a scratch
    student of 60 share one axis of total epochs (an inherited row's own offset counts too).
    """
    def start(r: Row) -> int:
        ends = []
        for d in inherits_from(r, rows):
            if hist := epochs(d.run):
                ends.append(start(d) + int(hist[-1]["epoch"]))
        return max(ends, default=0)

    hist = epochs(row.run)
    offset = start(row) if hist else 0
    return [offset + int(h["epoch"]) for h in hist], [float(h["test_acc"]) for h in hist]


def plot_curves(table: str, rows: list[Row], results: Path, references: dict[str, float] | None = None) -> Path:
    """Test accuracy per epoch of every run (one panel per group; a stage-2 run's epochs continue its
    teacher's), and last accuracy against deployed MACs (or training time, where every row has the same MACs).

    ``references`` (label -> accuracy, e.g. a published checkpoint scored on the same test set) are drawn as
    dashed horizontal lines in every group's panel.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(r.group for r in rows))
    fig, axes = plt.subplots(1, len(groups) + 1, figsize=(6 * (len(groups) + 1), 4.5), squeeze=False)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(r.name for r in rows))}
    for ax, group in zip(axes[0], groups):
        labelled: set[str] = set()
        continued = False
        for r in rows:
            x, acc = curve(r, rows) if r.group == group else ([], [])
            if not x:
                continue
            continued |= x[0] > 1
            ax.plot(x, acc, marker=".", color=colors[r.name], label=None if r.name in labelled else r.name)
            labelled.add(r.name)
        for i, (label, acc) in enumerate((references or {}).items()):
            ax.axhline(acc, color="k", alpha=0.6, linestyle=("--", ":", "-.")[i % 3], linewidth=1,
                       label=f"{label}: {acc:.2f}")
        xlabel = "total epochs (a stage-2 run's continue its teacher's)" if continued else "epoch"
        ax.set(title=group, xlabel=xlabel, ylabel="test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _plot_cost(axes[0][-1], rows, colors)
    fig.tight_layout()
    path = results / f"{table}.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
