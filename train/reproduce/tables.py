"""Training a table's rows and writing the table: markdown, CSV and plots (:func:`training_table`,
:func:`pyramid_table`, :func:`original_table`); ``python -m train.reproduce`` (the package's ``main``) calls them."""
from __future__ import annotations

import argparse
import json
from datetime import date
from fnmatch import fnmatch
from pathlib import Path
from typing import Callable

import torch

from models import load_checkpoint
from models.checkpoint import file_sha256, read_record, resolve, save_checkpoint
from models.convert import from_reducenet_original
from models.errors import ConfigError, DataError
from models.weights import read_state_dict

from .. import evaluate as evaluate_cli
from ..data import data_root, resolve_source
from ..provenance import git_commit
from ..rundir import in_use
from ..spec import Fresh
from ..timing import measure, paired_ratio, time_rounds
from .parallel import train_parallel
from .report import against_baselines, aggregate, plot_curves, train_seconds, write_table
from .runner import duration, finished, finished_otherwise, plan_row, read_summary, train_row
from .specs import BUDGETS, PAPER, Row, inherits_from, original_rows, pyramid_rows

#: The tables whose rows take ``--image-size``.
IMAGE_SIZED = ("kd-imagefolder", "pyramid")
TABLES = ("cifar10-reducenet", "original-stage2", "cifar100-kd", "kd-imagefolder", "trim", "pyramid", "precision",
          "grow",
          "deploy-speed")
VALUES = ["last_acc", "fused_acc", "best_acc", "train_s", "exact_acc"]
COLUMNS = [("group", "group"), ("row", "row"), ("seeds", "seeds"), ("epochs", "epochs"), ("params", "params"),
           ("MACs (M)", "macs_M"), ("last acc (%)", "last_acc"), ("best acc (%)", "best_acc"),
           ("train time (s)", "train_s")]
FUSED_ACC_NOTE = ("- `fused acc` is a stage-2 row's deploy model (every linear branch and BatchNorm fused into plain "
                  "convs) on the same test images as `last acc`.")
FUSED_ROW_NOTE = " A `fused deploy model` row gives that model's size and latency."
#: What the two numbers of a table's budget train, where they are not a stage 1 and the stage 2 inheriting from it.
PHASES = {"kd-imagefolder": ("teacher", "students (each from scratch, with or without distillation)"),
          "trim": ("the untrimmed network", "the fine-tuning of each trimmed one"),
          "grow": ("the grown teacher", "stage 2")}


def budget_words(table: str, e1: int, e2: int) -> str:
    """The header's words for a table's budget ``(e1, e2)``."""
    if not e1:
        return f"{e2} epochs"
    if table == "cifar100-kd":  # every row trains e1 epochs: the teachers, and the students with or without KD
        return f"{e1} epochs for every row (teachers, and students from scratch or distilled)"
    if table in PHASES:
        first, second = PHASES[table]
        return f"{first} {e1} epochs, {second} {e2} epochs"
    return f"{e1} + {e2} epochs (stage 1 + stage 2)"


def _line(r: Row) -> dict:
    s = r.result
    line = {"group": r.group, "row": r.name, "seed": r.seed, "epochs": s["epochs"], "params": s["params"],
            "macs_M": s["macs"] / 1e6, "last_acc": s["last_test_acc"], "best_acc": s["best_test_acc"],
            "best_epoch": s["best_epoch"], "train_s": train_seconds(r.run, s), "precision": s.get("precision"),
            "run": str(r.run)}
    if "fused_test_acc" in s:  # a stage-2 row: its own fused deploy model, on the same test images
        line["fused_acc"] = s["fused_test_acc"]
    if "trim" in s:
        line["macs_reduction"] = s["trim"]["cost_before"] / s["trim"]["cost_after"]
        line["latency_ratio"] = s["trim"].get("latency_ratio_b1")
    return line


def _fused_line(r: Row) -> dict:
    """The fused deploy model of a stage-2 row; its latency is filled in by :func:`_time_fused`."""
    s, fused = r.result, r.result["sizes"]["fused"]
    return {"group": r.group, "row": f"fused deploy model of: {r.name}", "seed": r.seed, "epochs": s["epochs"],
            "params": fused["params"], "macs_M": fused["macs"] / 1e6, "last_acc": s["fused_test_acc"],
            "best_acc": None, "train_s": None, "cpu_latency_ms_b1": None, "run": str(r.run / "deploy")}


def _time_fused(lines: list[dict], repeats: int) -> str | None:
    """Fill the batch-1 CPU latency of every fused deploy model in ``lines``, all timed in one side-by-side run;
    return the header line that says how (None where ``lines`` has no fused model).

    Each round runs every model once, so drift in the host's speed between two timings cannot show as a
    spread between seeds of one architecture (timed one after another, two seeds' identical fused reduce20s
    measured 2.99 and 4.09 ms here, with trainings running).
    """
    fused = [line for line in lines if "cpu_latency_ms_b1" in line]
    if not fused:
        return None
    deploys = {line["run"]: load_checkpoint(Path(line["run"]) / "model.safetensors") for line in fused}
    seconds = measure(deploys, 1, torch.device("cpu"), repeats)
    for line in fused:
        line["cpu_latency_ms_b1"] = 1e3 * seconds[line["run"]]
    return (f"- `CPU latency b1` is a fused model's median batch-1 float32 forward time over {repeats} rounds on "
            f"{torch.get_num_threads()} threads, timed when the table was written; all fused models of the table are "
            "timed side by side (each round runs each once), so they share the host's drift.")


def _time_trimmed(lines: list[dict], rows: list[Row], repeats: int) -> str | None:
    """Fill ``latency_ratio`` of every trim row in ``lines``: its untrimmed network's batch-1 CPU time over the
    trimmed one's, every network of the table timed side by side (each round runs each once) when the table is
    written, as the median ratio over rounds. Each run's own measurement, taken while other jobs trained, put three
    rows of one architecture at 1.24x to 3.70x. Returns the header line that says how, None without trim rows."""
    trims = {str(r.run): r for r in rows if r.kind == "trim" and "trim" in r.result}
    timed = [line for line in lines if line.get("run") in trims]
    if not timed:
        return None
    nets = {run: load_checkpoint(Path(run) / "last.safetensors") for run in dict.fromkeys(x["run"] for x in timed)}
    untrimmed = {run: str(resolve(trims[run].spec.derive.teacher)) for run in list(nets)}
    nets.update({path: load_checkpoint(path) for path in set(untrimmed.values())})
    sizes = {k: ((m.preprocess or {}).get("input_size") or [3, 32, 32])[-1] for k, m in nets.items()}
    rounds = time_rounds({k: m.eval() for k, m in nets.items()}, 1, torch.device("cpu"), repeats, image_size=sizes)
    for line in timed:
        line["latency_ratio"] = paired_ratio(rounds[untrimmed[line["run"]]], rounds[line["run"]])
    return (f"- `latency ratio b1` is the untrimmed network's batch-1 float32 CPU forward time over a trimmed one's: "
            f"the median over {repeats} rounds on {torch.get_num_threads()} threads in which every network of the "
            "table runs once, timed when the table was written.")


def _images(rows: list[Row]) -> str:
    """The header's image counts: ``200 train / 40 test images; 128 of 200 training images per epoch (last partial
    batch dropped)``. A run's summary counts the images an epoch trains on (whole batches only, drawn anew each
    epoch), its ``args.json`` the training set."""
    first = rows[0].result
    try:
        train = json.loads((rows[0].run / "args.json").read_text())["inputs"]["data"]["train"]
    except (OSError, ValueError, KeyError, TypeError):  # a run made before args.json recorded its data
        train = first["train_images"]
    counts = f"{train:,} train / {first['test_images']:,} test images"
    per_epoch = sorted({r.result["train_images"] for r in rows if "train_images" in r.result})
    if per_epoch in ([], [train]):
        return counts
    by = ", by batch size" if len(per_epoch) > 1 else ""
    return (f"{counts}; {' or '.join(f'{n:,}' for n in per_epoch)} of {train:,} training images per epoch (last "
            f"partial batch dropped{by})")


def _header(table: str, args: argparse.Namespace, rows: list[Row], budget: str) -> list[str]:
    """The provenance lines of a table: command, commits, data, hardware, precision, budget, what is reported."""
    first = rows[0].result
    command = (f"python -m train.reproduce {table} --budget {args.budget} --seeds {' '.join(map(str, args.seeds))}"
               + (f" --subset {args.subset}" if args.subset else "")
               + (f" --models {' '.join(args.models)}" if args.models else "")
               + (f" --recipes {' '.join(args.recipes)}" if table == "cifar10-reducenet" else "")
               + (" --no-lora-rows" if table == "cifar10-reducenet" and not getattr(args, "lora_rows", True) else "")
               + (f" --losses {' '.join(args.losses)}" if table == "pyramid" else "")
               + (f" --widths {' '.join(map(str, args.widths))}"
                  if table == "cifar10-reducenet" and getattr(args, "widths", None) else "")
               + (f" --image-size {args.image_size}" if args.image_size and table in IMAGE_SIZED else "")
               + (f" --data-dir {args.data_dir}" if args.data_dir else "")
               + "".join(f" {option} {getattr(args, name)}" for option, name in (("--original", "original"),
                                                                                 ("--exact-dir", "exact_dir"))
                         if table == "original-stage2" and getattr(args, name, None))
               + (f" --device {args.device}" if getattr(args, "device", "auto") != "auto" else "")
               + (f" --compile --compile-mode {args.compile_mode}" if getattr(args, "compile", False) else "")
               + (" --cuda-graph" if getattr(args, "cuda_graph", False) else ""))
    hardware = "; ".join(dict.fromkeys(r.result["hardware"] for r in rows if r.result.get("hardware"))) or \
        first.get("hardware", "unknown")
    commits = ", ".join(dict.fromkeys(c for r in rows for c in r.result.get("commits", ["unknown"])))
    lines = [
        f"Generated by `{command}` on {date.today().isoformat()} (table written at commit {git_commit()}; "
        f"runs trained at commit {commits}).",
        f"- Data: {first['data']}; {_images(rows)}.",
        f"- Hardware: {hardware}; "
        f"{' and '.join(sorted({r.result.get('precision', 'float32') for r in rows}))} training, float32 evaluation; "
        f"torch {torch.__version__}.",
        f"- Budget `{args.budget}`: {budget}; seeds {', '.join(map(str, args.seeds))}; a cell with ± is the mean ± "
        "standard deviation over the seeds, the CSV has every run.",
        "- `last acc` is the test accuracy after the last epoch (what we report); `best acc` is the best epoch,"
        " shown for comparison only (choosing it would select on the test set).",
        "- `train time` is a run's epochs times its median epoch's wall-clock time, so that a paused or restarted"
        " process does not count (each epoch's time is in the run's `metrics.csv`).",
    ]
    if table in ("cifar10-reducenet", "original-stage2"):
        lines.append("- Teacher block: the published ReduceNet block (branches summed before the shared BN). Recipes: "
                     "`paper` = `--recipe reducenet-paper` (the original main.py), `ours` = the project's defaults "
                     "(train/recipes.py).")
    return lines


def _paper_notes(table: str) -> list[str]:
    if table == "cifar10-reducenet":
        lines = ["## Published numbers (ReduceNet, original CIFAR-10, 200 + 200 epochs, one seed) — not ours",
                 "", "| model | teacher | student |", "|---|---:|---:|"]
        return lines + [f"| {m} w{w} | {t} | {s} |" for (m, w), (t, s) in PAPER[table].items()]
    if table == "cifar100-kd":
        lines = ["## Published numbers (original CIFAR-100, 240 epochs) — not ours", "",
                 "RepDistiller (Tian et al., ICLR 2020) for teacher/scratch/KD; mdistiller (Zhao et al., CVPR 2022) "
                 "for DKD.", "", "| pair | teacher | scratch | KD | DKD |", "|---|---:|---:|---:|---:|"]
        return lines + [f"| {t} -> {s} | {v['teacher']} | {v['scratch']} | {v['kd']} | {v['dkd']} |"
                        for (t, s), v in PAPER[table].items()]
    if table == "trim":
        t = PAPER["trim"]
        return ["## Published (Torch-Pruning's README, ResNet-56 on the original CIFAR-10, no sparse training, "
                f"{t['epochs']} epochs) — not ours", "",
                "| untrimmed | trimmed | MACs speed-up |", "|---:|---:|---:|",
                f"| {t['untrimmed']} | {t['trimmed']} | {t['speed_up']}x |"]
    return []


def _evaluate(checkpoint: Path, data_dir: Path | str | None, device: str, subset: int | None = None,
              seed: int = 0) -> dict:
    """``python -m train.evaluate``'s report of ``checkpoint`` on CIFAR-10 in ``data_dir``: its whole test set, or
    the test images a row with ``--subset subset`` and ``seed`` is measured on."""
    argv = [str(checkpoint), "--dataset", "cifar10", "--device", device, "--json", "--seed", str(seed)]
    argv += (["--data-dir", str(data_dir)] if data_dir else []) + (["--subset", str(subset)] if subset else [])
    return evaluate_cli.run(evaluate_cli.build_parser().parse_args(argv))


def _picked(rows: list[Row], args: argparse.Namespace) -> list[Row] | None:
    """The rows ``--rows`` selects (by run folder name, shell patterns), or None without ``--rows``."""
    if not args.rows:
        return None
    picked = [r for r in rows if any(fnmatch(r.run.name, p) for p in args.rows)]
    if not picked:
        raise ConfigError(f"--rows {' '.join(args.rows)} matches no row of this table: its rows are "
                          f"{', '.join(r.run.name for r in rows)}")
    unmatched = [p for p in args.rows if not any(fnmatch(r.run.name, p) for r in rows)]
    if unmatched:  # a typo beside a pattern that matches would leave its rows out silently
        raise ConfigError(f"--rows {unmatched[0]} matches no row of this table (a typo?): its rows are "
                          f"{', '.join(r.run.name for r in rows)}; fix or drop that pattern")
    return picked


def _check_inherited(chosen: list[Row], rows: list[Row]) -> None:
    """Refuse, before anything trains, a row that reads a row (its teacher, the level above) which has not finished
    and which ``--rows`` leaves out: it would stop at that row's missing checkpoint."""
    for r in chosen:
        for d in inherits_from(r, rows):
            if d in chosen or finished(d):
                continue
            fix = ("another process is training it now: run this when it has finished" if in_use(d.run) else
                   f"train it first (--rows '{d.run.name}', or the same command without --rows)")
            raise ConfigError(f"--rows selects {r.run.name}, which starts from the row {d.run.name}; that row has "
                              f"not finished and --rows leaves it out: {fix}")


def _longest_chain(chosen: list[Row], left: list[float | None]) -> float:
    """The longest training time left of one row and the rows it waits for (a stage 2 for its teacher, a Pyramid
    level for the one above), and theirs: with any number of jobs the rows cannot finish sooner."""
    seconds = {id(r): t or 0.0 for r, t in zip(chosen, left)}
    chain: dict[int, float] = {}

    def through(row: Row) -> float:
        if id(row) not in chain:
            chain[id(row)] = seconds[id(row)] + max((through(d) for d in inherits_from(row, chosen)), default=0.0)
        return chain[id(row)]

    return max((through(r) for r in chosen), default=0.0)


def _time_left(chosen: list[Row], left: list[float | None], jobs: int) -> str:
    """The --plan's last line: the training time left in all, from each row's time left (see ``plan_row``), and
    with ``jobs`` at once the least it can take: the rows shared evenly, or their longest chain, whichever is
    longer."""
    known = sum(t for t in left if t is not None)
    unknown = sum(t is None for t in left)
    parts = [f"about {duration(known)} of training left, rows one after another"] if known else []
    if known and jobs > 1:
        chain = _longest_chain(chosen, left)
        why = ("its longest row, or chain of rows that wait for one another" if chain > known / jobs
               else "if the rows share the jobs evenly")
        parts[0] += f"; with --jobs {jobs}, at least {duration(max(chain, known / jobs))} ({why})"
    if unknown:
        parts.append(f"{unknown} row(s) not timed: no run of theirs has timed an epoch yet")
    return "; ".join(parts) or "nothing left to train"


def _data_problem(rows: list[Row]) -> str | None:
    """Why the data of ``rows`` cannot be found, or None: ``--plan`` says so before anything is trained. Only where
    the files are looked for; nothing is read (a CIFAR download into an empty folder is not foreseen)."""
    for r in rows:
        for spec in getattr(r.spec, "levels", (r.spec,)):
            if spec.data.dataset is None and not isinstance(spec.derive, Fresh):  # the teacher's: checked there
                continue
            try:
                resolve_source(spec.data.dataset or "cifar10", spec.data.data_dir)
            except DataError as e:
                return str(e)
    return None


def _too_few_images(rows: list[Row]) -> str | None:
    """Why ``rows`` would stop at their first batch, or None: a ``--subset`` below the batch a row trains at (the
    recipe's: train.reproduce has no ``--batch-size``), whose one epoch would hold no whole batch."""
    short = [(r, s) for r in rows for s in getattr(r.spec, "levels", (r.spec,))
             if s.data.subset is not None and s.data.subset < s.data.batch_size]
    if not short:
        return None
    (row, spec), batch = short[0], max(s.data.batch_size for _, s in short)
    return (f"{row.run.name} trains at batch {spec.data.batch_size}, but the data gives {spec.data.subset} training "
            f"images per process (--subset {spec.data.subset}): train.reproduce keeps the recipe's batch, so give it "
            f"at least {batch} (a larger --subset)")


def _train_rows(rows: list[Row], args: argparse.Namespace, log: Callable[[str], None]) -> bool:
    """Train the table's rows; with ``--rows`` only those, and False (the table is not written from a part)."""
    picked = _picked(rows, args)
    chosen = rows if picked is None else picked
    if args.plan:
        states, left = zip(*(plan_row(r, rows) for r in chosen))
        log(f"{states.count('finished')} of {len(chosen)} rows finished; nothing trained (--plan)")
        for r, state in zip(chosen, states):
            log(f"  {r.run.name:<40} {state}")
        log(_time_left(chosen, list(left), args.jobs))
        waiting = [r for r, state in zip(chosen, states) if state != "finished"]
        problem = _data_problem(waiting)
        if problem:
            log(f"warning: the rows not finished would stop at their data: {problem}")
        problem = _too_few_images(waiting)
        if problem:
            log(f"warning: the rows not finished would stop at their first batch: {problem}")
        return False
    problem = _too_few_images([r for r in chosen if not finished(r)])
    if problem:  # every such row would fail, one after another, with the same error
        raise DataError(problem)
    _check_inherited(chosen, rows)
    replaced = [r for r in chosen if finished_otherwise(r)]
    if replaced and not getattr(args, "replace", False):  # hours of training, deleted by a forgotten --budget
        raise ConfigError(f"{len(replaced)} row(s) finished with other options ({replaced[0].run} first; --plan "
                          "lists them): pass --replace to retrain them with these options, or another --runs to "
                          "keep them")
    if args.jobs > 1:
        train_parallel(chosen, args.argv, args.jobs, args.device, log)
    for r in chosen:  # after --jobs every row has finished: this reads their summaries
        r.result = train_row(r, log)
    if picked is not None:
        log(f"trained {len(picked)} of {len(rows)} rows; run the same command without --rows to write the table")
    return picked is None


def training_table(table: str, rows: list[Row], args: argparse.Namespace, log: Callable[[str], None],
                   references: Callable[[], list[dict]] | None = None, exact_dir: Path | None = None) -> Path | None:
    """Train the rows, then write the table, its CSV and plot; with ``--rows`` train only, and return None.

    ``references`` returns lines shown above the trained rows (e.g. published checkpoints scored here); it is
    called only when the table is written, so a part trained with ``--rows`` does not pay for it.
    """
    if not _train_rows(rows, args, log):
        return None
    extra_lines = references() if references is not None else []
    lines = []
    for r in rows:
        line = _line(r)
        if exact_dir is not None:
            line["exact_acc"] = _evaluate(r.run / "last.safetensors", exact_dir, args.device)["test_acc"]
        lines.append(line)
        last_stage2 = (r.kind in ("inherit", "distil")
                       and r is [x for x in rows if x.group == r.group and x.seed == r.seed][-1])
        if last_stage2 and "fused_test_acc" in r.result and (r.run / "deploy").is_dir():
            lines.append(_fused_line(r))
    timing = _time_fused(lines, args.repeats)
    trim_timing = _time_trimmed(lines, rows, args.repeats)
    columns = list(COLUMNS)
    if exact_dir is not None:
        columns.insert(7, ("exact-subset acc (%)", "exact_acc"))
    fused_acc = any("fused_acc" in line for line in lines)
    if fused_acc:
        columns.insert(columns.index(("best acc (%)", "best_acc")), ("fused acc (%)", "fused_acc"))
    if any("cpu_latency_ms_b1" in line for line in lines):
        columns.append(("CPU latency b1 (ms)", "cpu_latency_ms_b1"))
    if any("macs_reduction" in line for line in lines):
        columns += [("MACs reduction", "macs_reduction"), ("latency ratio b1 (measured)", "latency_ratio")]
    e1, e2 = BUDGETS[table][args.budget]
    header = _header(table, args, rows, budget_words(table, e1, e2))
    if fused_acc:
        header += [FUSED_ACC_NOTE + (FUSED_ROW_NOTE if any("cpu_latency_ms_b1" in line for line in lines) else "")]
    header += [line for line in (timing, trim_timing) if line]
    shown = aggregate(extra_lines + lines, VALUES + ["cpu_latency_ms_b1", "latency_ratio"])
    paired = against_baselines(lines, {str(r.run): str(r.baseline) for r in rows if r.baseline},
                               rows[0].result["test_images"])
    path = write_table(table, header, shown, columns, Path(args.results), paired + _paper_notes(table),
                       csv_lines=extra_lines + lines)
    plot_curves(table, rows, Path(args.results), references={
        line["row"]: line["last_acc"] for line in aggregate(extra_lines, ["last_acc"]) if line.get("last_acc")})
    return path


def pyramid_table(args: argparse.Namespace, log: Callable[[str], None]) -> Path | None:
    """VGG19 and each scheme's chain per loss: per level, params, MACs, measured latency ratio to VGG19, accuracy."""
    rows = pyramid_rows(args)
    if not _train_rows(rows, args, log):
        return None
    top_row = rows[0]
    top = load_checkpoint(top_row.run)
    size = top.config["image_size"]
    lines = [{**_line(top_row), "group": "top", "latency_ratio": 1.0}]
    chains = {scheme: [r for r in rows[1:] if r.group == scheme] for scheme in ("forward", "backward")}
    levels = {scheme: list(rs[0].result["levels"]) for scheme, rs in chains.items() if rs}
    # every level's architecture timed once (its first loss's run), all beside VGG19 in one run
    nets = {"top": top, **{f"{scheme}/{lv}": load_checkpoint(chains[scheme][0].run / lv)
                           for scheme, lvs in levels.items() for lv in lvs}}
    times = measure(nets, 1, torch.device("cpu"), args.repeats, image_size=size)
    for scheme, lvs in levels.items():
        for r in chains[scheme]:
            for lv in lvs:
                s = read_summary(r.run / lv)
                if s is None:
                    raise DataError(f"{r.run / lv / 'summary.json'} is missing or damaged; run the same command "
                                    "again, which resumes the level to write it anew")
                r.result.setdefault("commits", [])
                r.result["commits"] += [c for c in s.get("commits", []) if c not in r.result["commits"]]
                lines.append({"group": f"{scheme}: {lv.split('_')[0]}", "row": r.name.split(": ")[1],
                              "seed": r.seed, "epochs": s["epochs"], "params": s["params"],
                              "macs_M": s["macs"] / 1e6, "last_acc": s["last_test_acc"],
                              "best_acc": s["best_test_acc"], "train_s": train_seconds(r.run / lv, s),
                              "latency_ratio": times["top"] / times[f"{scheme}/{lv}"], "run": str(r.run / lv)})
    columns = [("level", "group"), ("loss", "row"), ("seeds", "seeds"), ("epochs", "epochs"), ("params", "params"),
               ("MACs (M)", "macs_M"), ("VGG19 latency / this (CPU b1)", "latency_ratio"),
               ("last acc (%)", "last_acc"), ("best acc (%)", "best_acc"), ("train time (s)", "train_s")]
    e0, e1, e2 = BUDGETS["pyramid"][args.budget]
    header = _header("pyramid", args, rows, f"VGG19 {e0} epochs; each level {e1} epochs of stage 1 (its loss) + "
                     f"{e2} of stage 2 (CE; KD for `kd`), `scratch` {e2} of CE only")
    paper = PAPER["pyramid"]
    notes = ["## Published (pyramid_compression: CIFAR-100 upscaled to 96 px, VGG19 "
             f"{paper['VGG19']}%) — not ours",
             "", "| SVGG5 | scratch | best loss |", "|---|---:|---:|",
             f"| forward | {paper[('forward', 'scratch')]} | {paper[('forward', 'gram')]} (Gram) |",
             f"| backward | {paper[('backward', 'scratch')]} | {paper[('backward', 'two-stage')]} (two-stage) |"]
    path = write_table("pyramid", header, aggregate(lines, VALUES + ["latency_ratio"]), columns, Path(args.results),
                       notes, csv_lines=lines)
    _plot_pyramid(lines, Path(args.results))
    return path


def _plot_pyramid(lines: list[dict], results: Path) -> Path:
    """Accuracy against MACs per scheme and loss: the chain's curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False)
    top = lines[0]
    for ax, scheme in zip(axes[0], ("forward", "backward")):
        losses = list(dict.fromkeys(line["row"] for line in lines[1:] if line["group"].startswith(scheme)))
        for loss in losses:
            pts = sorted(((line["macs_M"], line["last_acc"]) for line in lines[1:]
                          if line["group"].startswith(scheme) and line["row"] == loss), reverse=True)
            ax.plot([top["macs_M"], *(p[0] for p in pts)], [top["last_acc"], *(p[1] for p in pts)], marker="o",
                    label=loss)
        ax.set(title=f"{scheme} scheme: VGG19 -> SVGG5", xlabel="MACs (M)", ylabel="test accuracy (%)")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = results / "pyramid.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _check_converted_from(dest: Path, pth: Path) -> None:
    """Refuse a converted checkpoint of the runs folder that another original file made: the rows trained from it
    (finished, and named by its path) would be reported as this file's."""
    meta = read_record(dest).get("metadata", {})
    source = meta.get("converted_from")
    if "sha256" in meta:
        same = meta["sha256"] == file_sha256(pth)
    else:  # converted before the hash was recorded: the same original converts to the same tensors, wherever it is
        ours, theirs = read_state_dict(dest), from_reducenet_original(read_state_dict(pth), str(pth)).state_dict()
        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    if not same:
        raise ConfigError(f"{dest} was converted from {source}, not from {pth} as --original now says, and this "
                          f"table's rows were trained from it: pass another --runs for {pth}, or move "
                          f"{dest.parent.parent} aside to train the table anew")


def original_table(args: argparse.Namespace, log: Callable[[str], None]) -> Path | None:
    """Convert the original's checkpoints, train the rows, evaluate on the exact test images and the JPEG copy."""
    root = data_root(args.data_dir)
    original = Path(args.original or root / "reducenet-original")
    exact = Path(args.exact_dir or root / "cifar-10-subset")
    files = {r: original / f"reduce20_cifar10_e1_w1_{r}.pth" for r in ("teacher", "student")}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"original-stage2 needs the original ReduceNet's checkpoints ({missing[0]} is absent); "
                        "pass --original DIR holding reduce20_cifar10_e1_w1_{teacher,student}.pth")
    if not (exact / "cifar-10-batches-py").is_dir():
        raise DataError(f"original-stage2 reports on the exact CIFAR-10 test images: {exact} has no "
                        "cifar-10-batches-py; pass --exact-dir")
    converted = {}
    for role, pth in files.items():
        dest = Path(args.runs) / "original-stage2" / "converted" / f"{pth.stem}.safetensors"
        if dest.is_file():
            _check_converted_from(dest, pth)
        elif not args.plan:
            save_checkpoint(from_reducenet_original(read_state_dict(pth), str(pth)), dest,
                            {"converted_from": str(pth), "sha256": file_sha256(pth), "dataset": "cifar10",
                             "role": role})
        converted[role] = dest

    def references() -> list[dict]:
        """The original's two checkpoints scored as the trained rows are (about a minute on a CPU core): ``last_acc``
        on their test images (with --subset, each seed's: one line per seed), ``exact_acc`` on the exact ones."""
        same = args.data_dir is not None and Path(args.data_dir).resolve() == exact.resolve()
        refs = []
        for role, name in (("teacher", "original teacher (their checkpoint: 200 ep on original CIFAR-10)"),
                           ("student", "original student (their checkpoint: 200 + 200 ep, their stage 2)")):
            exact_acc = _evaluate(converted[role], exact, args.device)["test_acc"]  # e.g. the tests' subset
            if args.subset:  # the test images the subset's rows are measured on, drawn with their seed
                last = {s: _evaluate(converted[role], args.data_dir, args.device, args.subset, s)["test_acc"]
                        for s in args.seeds}
            else:
                last = {None: exact_acc if same else _evaluate(converted[role], args.data_dir, args.device)["test_acc"]}
            params = sum(t.numel() for t in load_checkpoint(converted[role]).parameters())
            refs += [{"group": "reduce20-w1", "row": name, "seed": seed, "epochs": None, "params": params,
                      "macs_M": None, "last_acc": acc, "run": str(converted[role]),
                      **({"exact_acc": exact_acc} if i == 0 else {})}  # one test set, scored once
                     for i, (seed, acc) in enumerate(last.items())]
        return refs

    rows = original_rows(args, converted["teacher"])
    return training_table("original-stage2", rows, args, log, references=references, exact_dir=exact)


