"""``python -m train.curves RUN RUN ... --out curves.png``: learning curves of runs, side by side.

Draws each run directory's ``metrics.csv`` (one line per finished epoch, so a run still training is drawn up to its
last epoch): test accuracy and test loss (cross-entropy, the same quantity for a distilled run) per epoch, one
colour per run, labelled by ``--labels`` or the run's folder name, with each run's last test accuracy in its label.
The picture is written atomically (PNG, or any format matplotlib knows by the file's extension). ``train.stage2
--baseline`` and ``train.trim --baseline`` draw the distilled student against its cross-entropy-only baseline this
way.
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from models.checkpoint import atomic_write, user_path
from models.errors import ConfigError, DataError, cli_errors

#: Columns of ``metrics.csv`` drawn, with their axis labels: the same quantities for every run (a distilled run's
#: training loss holds its distillation terms, so it is not drawn beside another run's cross-entropy).
PANELS = {"test_acc": "test accuracy (%)", "test_loss": "test loss (cross-entropy)"}
#: Line styles of the runs after the first ten colours (matplotlib's C0-C9), so that no two runs look alike.
STYLES = ("-", "--", ":", "-.")


def read_curves(run: str | Path) -> dict[str, list[float]]:
    """``{column: values per epoch}`` of a run directory's ``metrics.csv`` (``epoch`` and :data:`PANELS`).

    Raises:
        DataError: the folder has no ``metrics.csv`` (not a run, or one that has not finished an epoch), or the file
            lacks a column or holds a value that is not a number.
    """
    path = Path(run) / "metrics.csv"
    if not path.is_file():
        what = "not a folder" if not Path(run).is_dir() else "a folder without metrics.csv"
        raise DataError(f"{run} is {what}: pass run directories of train.stage1/stage2/trim that have finished an "
                        "epoch")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ("epoch", *PANELS)
    missing = [c for c in columns if rows and c not in rows[0]]
    if not rows or missing:
        raise DataError(f"{path} has {'no epochs' if not rows else 'no column ' + missing[0]}: it is not a run's "
                        "metrics.csv, or the run has not finished an epoch")
    try:
        return {c: [float(r[c]) for r in rows] for c in columns}
    except (TypeError, ValueError):
        raise DataError(f"{path} holds a value that is not a number; it was edited or cut short") from None


def draw_curves(runs: dict[str, str | Path], title: str | None = None):
    """The matplotlib figure of the runs (``{label: run directory}``): a panel per column of :data:`PANELS`, a line
    per run, the run's last test accuracy in its label.

    Raises:
        DataError: a run has no readable ``metrics.csv`` (:func:`read_curves`).
    """
    from matplotlib.figure import Figure  # noqa: PLC0415 (a plot is drawn at the end of a run, not at import)
    from matplotlib.ticker import MaxNLocator  # noqa: PLC0415

    curves = {label: read_curves(run) for label, run in runs.items()}  # every run read before anything is drawn
    fig = Figure(figsize=(6 * len(PANELS), 4.2))
    for ax, (column, ylabel) in zip(fig.subplots(1, len(PANELS), squeeze=False)[0], PANELS.items()):
        for i, (label, c) in enumerate(curves.items()):
            last = c["test_acc"][-1]
            ax.plot(c["epoch"], c[column], marker="." if len(c["epoch"]) < 50 else None, color=f"C{i % 10}",
                    linestyle=STYLES[i // 10 % len(STYLES)],
                    label=f"{label}: {last:.2f}% at epoch {c['epoch'][-1]:g}" if column == "test_acc" else label)
        finite = [v for c in curves.values() for v in c[column] if math.isfinite(v)]
        if column == "test_loss" and finite and min(finite) > 0 and max(finite) / min(finite) > 20:
            ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=ylabel)
        epochs = sorted({e for c in curves.values() for e in c["epoch"]})
        if len(epochs) <= 12:  # the epochs themselves (a locator shows fractions around one or two points)
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_curves(runs: dict[str, str | Path], out: str | Path, title: str | None = None) -> Path:
    """Draw the runs (``{label: run directory}``, :func:`draw_curves`) into ``out``, atomically; returns ``out``.

    Raises:
        DataError: a run has no readable ``metrics.csv`` (:func:`read_curves`); nothing is written.
        ConfigError: ``out``'s extension is not a format matplotlib writes.
    """
    from matplotlib.backend_bases import FigureCanvasBase  # noqa: PLC0415

    out = Path(out)
    fmt = out.suffix.lstrip(".").lower()
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt not in formats:
        given = f".{fmt} files" if fmt else "a name without an extension"
        raise ConfigError(f"--out {out}: matplotlib writes {', '.join(sorted(formats))}, not {given}; end the name "
                          "in .png")
    fig = draw_curves(runs, title)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format=fmt, dpi=90))
    return out


def build_parser() -> argparse.ArgumentParser:
    from .cli import DescribedHelpFormatter  # noqa: PLC0415 (the parser alone: plot_curves serves the pipeline too)

    p = argparse.ArgumentParser(prog="python -m train.curves", description=__doc__,
                                formatter_class=DescribedHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories (each with its metrics.csv)")
    p.add_argument("--out", required=True, help="the picture to write (.png, .svg, .pdf, ...)")
    p.add_argument("--labels", nargs="+", default=None, help="one label per run (default: the run's folder name)")
    p.add_argument("--title", default=None, help="a title above the panels")
    return p


@cli_errors
def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_args(argv)
    labels = args.labels or [Path(r).resolve().name or str(r) for r in args.runs]
    if len(labels) != len(args.runs):
        raise ConfigError(f"--labels names {len(labels)} runs but {len(args.runs)} were given: pass one label a run")
    if len(set(labels)) != len(labels):
        twice = next(x for i, x in enumerate(labels) if x in labels[:i])
        raise ConfigError(f"two runs would both be labelled {twice!r}: pass --labels, one distinct label a run")
    out = plot_curves({label: user_path(r) for label, r in zip(labels, args.runs)}, user_path(args.out), args.title)
    print(f"curves: {out}")
    return out


if __name__ == "__main__":
    main()
