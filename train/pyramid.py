"""``python -m train.pyramid --teacher RUN --scheme forward|backward --loss two-stage``: the Pyramid's chain.

pyramid_compression (Ravindran & Fita Sanmartin) compresses VGG19 level by level: VGG19 -> SVGG17 -> SVGG14 ->
SVGG11 -> SVGG8 -> SVGG5 (``models/vgg.py``), each level inheriting every tensor of the level above but the one
conv (or head) that replaces a block, and taught by it. Each level is a normal run directory ``OUT/<level>``
(resume, metrics, TensorBoard, checkpoint, fused and exported model); an interrupted chain resumes where it
stopped, and finished levels are skipped. ``OUT/summary.json`` holds the chain's per-level results.

Losses (``--loss``), each level in two stages of ``--hint-epochs`` and ``--epochs`` epochs, as the original:

* ``two-stage``: stage 1 imitates the teacher's output at the end of the replaced block with the new conv's
  output (squared error summed per sample, the original's ``MSELoss(size_average=False)`` per sample); stage 2
  is cross-entropy. Taught by the level above.
* ``gram``: stage 1 matches the FSP (Gram) matrices of the replaced block's input and output; stage 2 CE.
* ``hinton``: stage 1 is the squared error of the logits; stage 2 CE ("Hinton 2 stages").
* ``fitnet`` / ``gram-direct``: ``two-stage`` / ``gram`` taught by VGG19 (``--teacher``) at every level, the
  original's baselines.
* ``scratch``: inherit, then CE only (no stage 1): the baseline every loss must beat.
* ``kd`` (ours): the ``two-stage`` hint, then KD from the level above (``--kd``, ``--kd-alpha``, ``--kd-T``)
  instead of plain CE.

Defaults (``--recipe ours``): Adam, lr 1e-4, weight decay 5e-4 as the original, with a cosine schedule per
stage budget instead of its ReduceLROnPlateau and early stopping.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.nn as nn
from torch import Tensor

from models import load_checkpoint
from models.checkpoint import atomic_write_text
from models.errors import ConfigError, cli_errors
from models.vgg import LEVELS, SCHEMES, hint_points, level_of, svgg_from

from .cli import (add_distillation_options, check_teacher, cli_record, common_parser, data_metadata, finish,
                  load_teacher_checkpoint, logit_loss, make_run_dir, parse_args, resolve_data, train_config)
from .deploy import FuseCheckExport
from .distill import DistillLoss, gram_loss, hint_mse
from .engine import Trainer
from .preprocess import Renormalize
from .rundir import finished_summary, mark_done, options_of_run
from .spec import spec_parts
from .tasks import FeatureHooks, Taught

LOSSES = ("two-stage", "gram", "hinton", "fitnet", "gram-direct", "kd", "scratch")
TAUGHT_BY_TOP = ("fitnet", "gram-direct")


class PyramidLevel(Taught):
    """One level's training: a stage-1 loss for ``hint_epochs`` epochs, then cross-entropy (or KD for ``kd``).

    Args:
        student: the level, built from its parent by :func:`models.vgg.svgg_from`.
        teacher: the frozen teacher (the level above, or VGG19).
        loss: one of :data:`LOSSES`.
        hint_epochs: epochs of stage 1 (0: none).
        student_paths: ``{"output", "input", "prepool"}`` module paths of the student (:class:`HintPoints`).
        teacher_paths: the same for the teacher.
        kd: the stage-2 loss of ``kd``.
        teacher_input: maps the student's batch to the teacher's preprocessing.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: str, hint_epochs: int,
                 student_paths: dict[str, str], teacher_paths: dict[str, str], kd: DistillLoss | None = None,
                 teacher_input: nn.Module | None = None) -> None:
        super().__init__(student, teacher, teacher_input)
        self.kind, self.hint_epochs, self.kd = loss, hint_epochs, kd
        keys = ("input", "prepool") if loss in ("gram", "gram-direct") else ("output",)
        self._keys = keys
        self._hooks = None
        if loss not in ("hinton", "scratch"):
            self._hooks = (FeatureHooks(student, [student_paths[k] for k in keys]),
                           FeatureHooks(teacher, [teacher_paths[k] for k in keys]))
        self.stage = 1 if hint_epochs else 2

    def set_epoch(self, epoch: int) -> None:
        self.stage = 1 if epoch < self.hint_epochs else 2
        if self.kd is not None:
            self.kd.set_epoch(epoch - self.hint_epochs)

    def forward(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        logits = self.student(x)
        needs_teacher = self.stage == 1 or self.kind == "kd"
        t_logits = self.teacher_logits(x) if needs_teacher else None
        out = {"logits": logits, "stage": logits.new_tensor(float(self.stage))}
        if t_logits is not None:
            out["teacher_logits"] = t_logits
        s_feats = self._hooks[0].take() if self._hooks else []
        t_feats = self._hooks[1].take() if self._hooks and needs_teacher else []
        if self.stage == 1:
            if self.kind == "hinton":
                loss = hint_mse(logits, t_logits)
            elif self.kind in ("gram", "gram-direct"):
                loss = gram_loss(s_feats[0], s_feats[1], t_feats[0], t_feats[1])
            else:
                loss = hint_mse(s_feats[0], t_feats[0])
        elif self.kind == "kd":
            loss = self.kd(logits, y, t_logits)
        else:
            loss = nn.functional.cross_entropy(logits, y)
        return {"loss": loss, **out}


def teacher_paths(level: str, taught_by_top: bool) -> dict[str, str]:
    """The module paths of the teacher's activations for ``level``'s stage 1: in its parent, or in VGG19."""
    points = hint_points(level)
    paths = {"output": points.teacher_output, "input": points.teacher_input, "prepool": points.teacher_prepool}
    if taught_by_top and points.replaced != "head":  # VGG19 still has every block the level above replaced
        k = int(points.teacher_output.removeprefix("features.block"))
        paths["input"] = "features.block1.conv1" if k == 2 else f"features.block{k - 1}"
    return paths


def build_parser():
    p = common_parser("python -m train.pyramid", __doc__, epochs=30, lr=1e-4, warmup="0")
    g = p.add_argument_group("pyramid")
    g.add_argument("--teacher", required=True, help="the trained top: a pyramid_vgg19(_bn) run or checkpoint")
    g.add_argument("--scheme", choices=tuple(SCHEMES), required=True,
                   help="forward: compress from the deep end; backward: from the input end")
    g.add_argument("--levels", nargs="+", default=None,
                   help="levels to run, in chain order (default all: svgg17 svgg14 svgg11 svgg8 svgg5)")
    g.add_argument("--loss", choices=LOSSES, default="two-stage", help="see the description above")
    g.add_argument("--hint-epochs", type=int, default=None,
                   help="epochs of stage 1, before the --epochs of stage 2 (default: a third of --epochs, at "
                        "least 1; 0 for scratch)")
    add_distillation_options(p)
    return p


def _levels(args) -> list[str]:
    chain = [f"svgg{depth}_{args.scheme}" for depth, _ in SCHEMES[args.scheme]]
    if not args.levels:
        return chain
    names = [name if name.endswith(f"_{args.scheme}") else f"{name}_{args.scheme}" for name in args.levels]
    unknown = [n for n in names if n not in chain]
    if unknown:
        raise ConfigError(f"--levels {unknown[0]} is not a level of the {args.scheme} scheme; choose from "
                          f"{', '.join(n.split('_')[0] for n in chain)}")
    if names != chain[chain.index(names[0]):chain.index(names[0]) + len(names)]:
        raise ConfigError(f"--levels must follow the chain without gaps ({' -> '.join(chain)}); got "
                          f"{' -> '.join(names)}")
    return names


@cli_errors
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(build_parser(), "pyramid", argv)
    levels = _levels(args)
    if args.hint_epochs is None:
        args.hint_epochs = 0 if args.loss == "scratch" else max(1, args.epochs // 3)
    if args.loss == "scratch" and args.hint_epochs:
        raise ConfigError("--loss scratch has no stage 1: drop --hint-epochs")
    if args.hint_epochs < 0:
        raise ConfigError(f"--hint-epochs {args.hint_epochs} is not valid: pass 0 or more epochs of stage 1")
    kd = logit_loss(spec_parts(vars(args))["loss"]) if args.loss == "kd" else None
    top, top_meta, top_path = load_teacher_checkpoint(args.teacher)
    name, _ = level_of(top)
    first_parent = LEVELS[levels[0]].parent
    info, device, data = resolve_data(args, top_meta)
    check_teacher(top, data)
    out = Path(args.out or Path("runs") / f"pyramid-{args.scheme}-{args.loss}-s{args.seed}")
    parent = top if first_parent == name else None
    if parent is None:  # the chain starts lower: its first parent is the level run before it, in OUT
        parent_run = out / first_parent
        if not (parent_run / "last.safetensors").is_file():
            raise ConfigError(f"--levels starts at {levels[0]}, whose parent {first_parent} has no run in "
                              f"{parent_run}; start the chain higher or pass its --out")
        parent = load_checkpoint(parent_run).float()
    chain_summary = {"scheme": args.scheme, "loss": args.loss, "teacher": str(top_path), "levels": {}}
    for level in levels:
        summary = train_level(args, argv, level, parent, top, data, info, device, out, kd)
        chain_summary["levels"][level] = {k: summary.get(k) for k in (
            "last_test_acc", "best_test_acc", "params", "macs", "fused_test_acc", "epochs")}
        parent = load_checkpoint(out / level).float()
        parent.preprocess = parent.preprocess or top.preprocess
    if info.is_main:
        atomic_write_text(out / "summary.json", json.dumps(chain_summary, indent=2) + "\n")
    finish(info)
    return chain_summary


def train_level(args, argv, level: str, parent: nn.Module, top: nn.Module, data, info, device, out: Path,
                kd: DistillLoss | None) -> dict:
    """Train one level in ``out/<level>`` (skipped when finished with the same options, resumed when begun)."""
    run = out / level
    record = {"level": level, "argv": options_of_run(sys.argv[1:] if argv is None else list(argv))}
    summary = finished_summary(run, record)
    if summary is not None:
        print(f"[skip] {level}: finished in {run}")
        return summary
    student = svgg_from(parent, level)
    by_top = args.loss in TAUGHT_BY_TOP
    teacher = top if by_top else parent
    points = hint_points(level)
    task = PyramidLevel(student, teacher, args.loss, args.hint_epochs,
                        {"output": points.student_output, "input": points.student_input,
                         "prepool": points.student_prepool}, teacher_paths(level, by_top), kd,
                        Renormalize(student.preprocess, teacher.preprocess))
    data.normalize(student.preprocess)
    level_args = type(args)(**{**vars(args), "out": str(run), "epochs": args.epochs + args.hint_epochs,
                               "resume": (run / "train_state.pt").is_file() and not args.overwrite})
    with make_run_dir(run, info, cli_record(level_args, info, "train.pyramid", argv), level_args.resume,
                      level_args.overwrite) as run_dir:
        metadata = {"stage": "pyramid", "role": level, **data_metadata(data, args.data_dir), "loss": args.loss,
                    "scheme": args.scheme, "teacher": "VGG19 (--teacher)" if by_top else LEVELS[level].parent}
        cfg = train_config(level_args, 0.0, stage="pyramid", recipe=args.recipe, level=level, loss=args.loss,
                           hint_epochs=args.hint_epochs)
        export = FuseCheckExport(teacher, nn.Sequential(task.teacher_input, teacher), not args.no_export, metadata,
                                 f"{level} ({args.loss})")
        trainer = Trainer(task, data, cfg, run_dir, dist_info=info, device=device, metadata=metadata,
                          callbacks=[export])
        if level_args.resume:
            trainer.resume()
        summary = trainer.fit()
        if info.is_main:
            mark_done(run, record)
    return summary


if __name__ == "__main__":
    main()
