"""Typed run specs: what a training run is, as frozen dataclasses with a JSON form.

A :class:`RunSpec` says how the trained model comes to be (:class:`Fresh`: a model trained from its
initialisation; :class:`Inherit`: the student of a ReduceNet teacher, which inherits its weights; :class:`Distil`: a
fresh student distilled from any trained classifier; :class:`Trim`: a trained classifier pruned, then distilled
from itself; :class:`Pyramid`: one level of the Pyramid's chain), on which data (:class:`DataSpec`), with which losses
(:class:`LossSpec`), optimisation (:class:`OptimSpec`) and runtime (:class:`RuntimeSpec`). ``None`` means "the
recipe's" (``recipe``, :mod:`train.recipes`) or, for the data of a distilled student, "the teacher's";
:func:`train.pipeline.run` resolves them and records the resolved spec in the run directory (``spec.json``), so
``--config RUN_DIR`` reruns the run exactly.

Field names are the command-line options' (``lr`` is ``--lr``), so the CLIs fill a spec from their parsed options
(:func:`from_options`) and every message names the option a user typed. :meth:`RunSpec.validate` checks every
field's type (a whole number for a count, a finite number, a string, a bool for a flag, a tuple of strings) and
value before a run reads anything; a list or a lone string given for a tuple field is held as the tuple. The fields
a ``--resume`` may change are marked resumable on the dataclasses (:func:`resumable_fields`): where and how fast a
run goes, and its peak learning rate; any other difference from the run's recorded spec is refused.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Union

from models.errors import ConfigError
from models.registry import is_zoo
from models.trim import COSTS, IMPORTANCES
from models.vgg import LEVELS

from .data import DATASETS
from .distill import FEATURE_LOSSES, KD_REDUCTIONS, LOGIT_LOSSES
from .engine import COMPILE_MODES, OPTIMIZERS, SCHEDULES, TrainConfig, check_cuda_graph
from .preprocess import NORMALIZATIONS
from .recipes import RECIPES
from .recipes import defaults as recipe_defaults
from .rundir import same_record
from .tasks import LOSSES as PYRAMID_LOSSES

#: A field that ``--resume`` may change.
RESUMABLE = {"resumable": True}
MAX_SEED = 2**32 - 1
LOADERS = ("auto", "memory", "stream")


def _default_workers() -> int:
    return min(8, len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else min(8, os.cpu_count() or 1)


def _bad(option: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"{option} {value} is not valid: pass {want}")


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _kinds(hint: Any) -> tuple[Any, ...]:
    """The types a field typed ``hint`` holds besides ``None``."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def _normalise(part: Any) -> None:
    """In place, on a frozen spec dataclass: a list or a lone string in a tuple field as the tuple it holds
    (``"layer3"``: ``("layer3",)``, not its letters), so that the spec hashes and round-trips through JSON; a path
    in a string field as its string."""
    for f in fields(part):
        value, kinds = getattr(part, f.name), _kinds(_hints(type(part))[f.name])
        if any(typing.get_origin(k) is tuple for k in kinds) and isinstance(value, (str, list)):
            object.__setattr__(part, f.name, (value,) if isinstance(value, str) else tuple(value))
        elif str in kinds and isinstance(value, os.PathLike):
            object.__setattr__(part, f.name, os.fspath(value))


def _unfit(value: Any, hint: Any) -> str | None:
    """What to pass instead of ``value`` in a field typed ``hint``, or ``None`` if it fits: a whole number for an
    ``int`` (a bool is not one), a finite number for a ``float``, a string, true or false, a list of these."""
    kinds = _kinds(hint)
    if value is None and typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint):
        return None
    (hint,) = kinds  # every field but RunSpec's parts holds one type (or None)
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if isinstance(value, tuple) and not any(_unfit(v, item) for v in value):
            return None
        return f"a list of {({str: 'strings', int: 'whole numbers', float: 'finite numbers'})[item]}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if hint is float:
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if number and math.isfinite(value) else "a finite number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    raise TypeError(f"no check for a spec field of type {hint}")


def _shown(value: Any) -> str:
    """``value`` as a message shows it: a string quoted (``'2'`` is not the number 2), a list spaced."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(_shown, value)) if value else "()"
    return repr(value) if isinstance(value, str) else str(value)


def _option(part: Any, name: str) -> str:
    """The command-line option of the field ``name`` of ``part`` (``kd_T``: ``--kd-T``), as messages name it."""
    if isinstance(part, RunSpec) and name == "export":
        return "spec field export"  # the command line's --no-export
    return "--" + _CLI_NAMES.get((type(part), name), name).replace("_", "-")


def _check_types(part: Any, skip: tuple[str, ...] = ()) -> None:
    """One line naming the option of the first field of ``part`` (but ``skip``) whose value has the wrong type: a
    float where a count goes, a string for a flag, ... (which failed later with a traceback naming no option, or ran
    with a value not asked for: ``"amp": "false"`` is true)."""
    for f in fields(part):
        want = None if f.name in skip else _unfit(getattr(part, f.name), _hints(type(part))[f.name])
        if want:
            raise _bad(_option(part, f.name), _shown(getattr(part, f.name)), want)


@dataclass(frozen=True)
class DataSpec:
    """The data: a dataset (``None``: CIFAR-10, or a distilled student's teacher's), how much of it, how loaded."""

    dataset: str | None = None
    data_dir: str | None = field(default=None, metadata=RESUMABLE)
    subset: int | None = None
    image_size: int | None = None
    loader: str = "auto"
    workers: int = field(default_factory=_default_workers, metadata=RESUMABLE)
    batch_size: int = 128
    normalize: str | None = None

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)
        if self.dataset is not None and self.dataset not in DATASETS:
            raise _bad("--dataset", self.dataset, f"one of {', '.join(DATASETS)}")
        if self.batch_size < 1:
            raise _bad("--batch-size", self.batch_size, "1 or more")
        if self.subset is not None and self.subset < 1:
            raise _bad("--subset", self.subset, "a number of images, 1 or more")
        if self.image_size is not None and not 8 <= self.image_size <= 1024:
            raise _bad("--image-size", self.image_size, "a size in pixels in [8, 1024]")
        if self.loader not in LOADERS:
            raise _bad("--loader", self.loader, f"one of {', '.join(LOADERS)}")
        if self.workers < 0:
            raise _bad("--workers", self.workers, "0 or more")
        if self.normalize is not None and self.normalize not in NORMALIZATIONS:
            raise _bad("--normalize", self.normalize, f"one of {', '.join(NORMALIZATIONS)}")


@dataclass(frozen=True)
class OptimSpec:
    """Optimisation; ``None`` takes the recipe's value."""

    epochs: int = 200
    lr: float | None = field(default=None, metadata=RESUMABLE)
    wd: float | None = None
    optimizer: str | None = None
    nesterov: bool = True
    schedule: str | None = None
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    warmup_epochs: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self, min_epochs: int = 1) -> None:
        _check_types(self)
        if self.epochs < min_epochs:
            raise _bad("--epochs", self.epochs, f"{min_epochs} or more")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise _bad("--lr", self.lr, "a positive number such as 0.1")
        if self.wd is not None and not (math.isfinite(self.wd) and self.wd >= 0):
            raise _bad("--wd", self.wd, "0 or a small positive number such as 1e-4")
        if self.warmup_epochs is not None and not (math.isfinite(self.warmup_epochs)
                                                   and 0 <= self.warmup_epochs <= self.epochs):
            raise _bad("--warmup-epochs", self.warmup_epochs, f"a number of epochs in [0, --epochs {self.epochs}]")
        if not 0 <= self.seed <= MAX_SEED:
            raise _bad("--seed", self.seed, f"a whole number in [0, {MAX_SEED}]")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise _bad("--gamma", self.gamma, "a positive factor such as 0.1")
        if not all(0 < m < 1 for m in self.milestones):
            raise _bad("--milestones", " ".join(map(str, self.milestones)), "fractions of training in (0, 1)")
        if self.optimizer is not None and self.optimizer not in OPTIMIZERS:
            raise _bad("--optimizer", self.optimizer, "sgd or adam")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise _bad("--schedule", self.schedule, "cosine, cosine-epoch or step")


@dataclass(frozen=True)
class RuntimeSpec:
    """Where and how fast a run goes; all of it may change on ``--resume``. ``amp`` None: bf16 where native."""

    device: str = field(default="auto", metadata=RESUMABLE)
    amp: bool | None = field(default=None, metadata=RESUMABLE)
    compile: bool = field(default=False, metadata=RESUMABLE)
    compile_mode: str = field(default="default", metadata=RESUMABLE)
    cuda_graph: bool = field(default=False, metadata=RESUMABLE)
    channels_last: bool = field(default=True, metadata=RESUMABLE)
    sync_bn: bool = False

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)
        if self.compile_mode not in COMPILE_MODES:
            raise _bad("--compile-mode", self.compile_mode, f"one of {', '.join(COMPILE_MODES)}")
        check_cuda_graph(self.cuda_graph, self.compile, self.compile_mode)


@dataclass(frozen=True)
class LossSpec:
    """The distillation losses of a taught student (:mod:`train.distill`); ``None`` takes the loss's default."""

    kd: str = "kd"
    kd_alpha: float | None = None
    kd_T: float | None = None
    kd_beta: float | None = None
    kd_warmup: float | None = None
    ce_weight: float | None = None
    kd_reduction: str | None = None
    feature_kd: str = "none"
    feature_weight: float | None = None
    feature_layers: tuple[str, ...] | None = None
    teacher_layers: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _normalise(self)

    @property
    def label(self) -> str:
        """The losses as the printed lines name them: ``kd``, ``dkd + semckd``, ``at``, or ``cross-entropy only``."""
        return " + ".join(t for t in (self.kd, self.feature_kd) if t != "none") or "cross-entropy only"

    def validate(self) -> None:
        _check_types(self)
        if self.kd not in LOGIT_LOSSES:
            raise _bad("--kd", self.kd, f"one of {', '.join(LOGIT_LOSSES)}")
        if self.feature_kd != "none" and self.feature_kd not in FEATURE_LOSSES:
            raise _bad("--feature-kd", self.feature_kd, f"none or one of {', '.join(FEATURE_LOSSES)}")
        if self.kd_reduction is not None and self.kd_reduction not in KD_REDUCTIONS:
            raise _bad("--kd-reduction", self.kd_reduction, f"one of {', '.join(KD_REDUCTIONS)}")
        if self.feature_kd == "none" and (self.feature_layers or self.teacher_layers
                                          or self.feature_weight is not None):
            raise ConfigError("--feature-layers/--teacher-layers/--feature-weight need --feature-kd fitnet, at or "
                              "semckd")
        # (--kd-alpha, --kd-T and --kd-reduction are also set by recipes, whatever the --kd: not checked here)
        if self.kd_beta is not None and self.kd != "dkd":
            raise ConfigError(f"--kd-beta weighs DKD's non-target term: it applies to --kd dkd, not --kd {self.kd}")
        if self.kd_warmup is not None and self.kd != "dkd":
            raise ConfigError(f"--kd-warmup ramps DKD's loss in: it applies to --kd dkd, not --kd {self.kd}")
        if self.kd_warmup is not None and not (math.isfinite(self.kd_warmup) and self.kd_warmup >= 0):
            raise _bad("--kd-warmup", self.kd_warmup, "a number of epochs >= 0 (0: none)")
        if self.ce_weight is not None and self.kd not in ("kd", "mse"):
            raise ConfigError(f"--ce-weight weighs the cross-entropy beside --kd kd or mse, not --kd {self.kd}")
        for option, value in (("--kd-alpha", self.kd_alpha), ("--kd-T", self.kd_T), ("--kd-beta", self.kd_beta),
                              ("--ce-weight", self.ce_weight), ("--feature-weight", self.feature_weight)):
            if value is not None and not math.isfinite(value):
                raise _bad(option, value, "a finite number")


@dataclass(frozen=True)
class Fresh:
    """A model trained from its initialisation (stage 1): a ReduceNet teacher, a scratch student, any classifier.

    ``model``: a zoo name, ``torchvision:NAME``, ``timm:NAME``, or a checkpoint or run directory (its architecture
    and weights: a trimmed network, say). ``expansion`` and ``width`` belong to ReduceNet's families (``None``: 1,
    the teacher, width 1); ``weights`` starts from a file; ``init`` is the zoo's conv init (``None``: the
    recipe's). ``grow`` E makes the model a ReduceNet teacher of any architecture (:mod:`models.grow`): branch (b)
    of width E beside its convs that feed a BatchNorm, or those ``grow_targets`` (globs over module paths) name."""

    model: str = "reduce56"
    expansion: int | None = None
    width: float | None = None
    weights: str | None = None
    init: str | None = None
    grow: int | None = None
    grow_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)
        if self.init is not None and self.init not in ("kaiming", "torch"):
            raise _bad("--init", self.init, "kaiming or torch")
        if self.grow is not None and not (isinstance(self.grow, int) and 1 <= self.grow <= 64):
            raise _bad("--grow", self.grow, "a branch width factor in [1, 64], such as 1")
        if self.grow_targets and self.grow is None:
            raise ConfigError("--grow-targets chooses the convs --grow gives a branch: pass --grow E as well")


@dataclass(frozen=True, kw_only=True)
class LoRAOptions:
    """A student's linear LoRA branches (rank 0: none), whose LambdaReLU is annealed from ReLU to identity over the
    first ``lambda_epochs`` epochs; keyword-only fields of :class:`Inherit` and :class:`Distil`."""

    lora_rank: int = 0
    lora_targets: tuple[str, ...] | None = None
    lambda_epochs: float = 0.0

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)  # with the fields of the Inherit or Distil that holds them
        if self.lora_rank < 0:
            raise _bad("--lora-rank", self.lora_rank, "0 (no LoRA) or a rank >= 1")
        if self.lambda_epochs and not self.lora_rank:
            raise ConfigError("--lambda-epochs anneals the LoRA branches' LambdaReLU: pass --lora-rank R as well")
        if self.lora_targets and not self.lora_rank:
            raise ConfigError("--lora-targets chooses the convs that get LoRA branches: pass --lora-rank R as well")


@dataclass(frozen=True)
class Inherit(LoRAOptions):
    """The student of a ReduceNet teacher (a run directory or checkpoint): the teacher without branch (b),
    inheriting every other tensor, then distilled from it (stage 2). ``model``, when given, is the architecture the
    teacher must have."""

    teacher: str
    model: str | None = None


@dataclass(frozen=True)
class Distil(LoRAOptions):
    """A fresh student ``model`` (zoo, torchvision:NAME, timm:NAME) distilled from any trained classifier."""

    teacher: str
    model: str
    weights: str | None = None


@dataclass(frozen=True)
class Trim:
    """Breed-Net's promise: the trained classifier ``teacher`` pruned structurally (Torch-Pruning) until its cost
    ``by`` (macs, params or latency) is ``1 / reduce`` of the original's, its BatchNorm statistics re-estimated on
    ``calibrate_batches`` training batches, then fine-tuned with distillation from the untrimmed network (0 epochs:
    only trimmed). ``structure_from``: take the trimmed structure of that trim run (or checkpoint) instead of
    searching one (a baseline of the same network, or a latency trim repeated exactly)."""

    teacher: str
    reduce: float
    by: str = "macs"
    importance: str = "l2"
    round_to: int | None = None
    calibrate_batches: int = 50
    structure_from: str | None = None

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)
        if not (isinstance(self.reduce, (int, float)) and math.isfinite(self.reduce) and 1 < self.reduce <= 1000):
            raise _bad("--reduce", self.reduce, "a cost reduction factor in (1, 1000], such as 2")
        if self.by not in COSTS:
            raise _bad("--by", self.by, f"one of {', '.join(COSTS)}")
        if self.importance not in IMPORTANCES:
            raise _bad("--importance", self.importance, f"one of {', '.join(IMPORTANCES)}")
        if self.round_to is not None and not 1 <= self.round_to <= 256:
            raise _bad("--round-to", self.round_to, "a channel multiple in [1, 256], such as 8")
        if self.calibrate_batches < 0:
            raise _bad("--calibrate-batches", self.calibrate_batches, "0 (none) or more")


@dataclass(frozen=True)
class Pyramid:
    """One level of the Pyramid's chain (pyramid_compression): ``level`` (e.g. ``svgg14_forward``) built from its
    ``parent`` (the run or checkpoint of the level above; ``None``: the level above is ``top``), inheriting every
    tensor but the one conv or head that replaces a block, and taught by the parent (by ``top``, the chain's VGG19,
    for the ``fitnet`` and ``gram-direct`` losses): ``hint_epochs`` of stage 1 (the hint), then ``optim.epochs`` of
    stage 2. ``top`` also gives the data."""

    top: str
    level: str
    parent: str | None = None
    loss: str = "two-stage"
    hint_epochs: int = 1

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> None:
        _check_types(self)
        levels = [name for name, level in LEVELS.items() if level.parent]  # the top, VGG19, is no level to train
        if self.level not in levels:
            raise _bad("Pyramid level", self.level, f"a full level name (--levels takes short ones), one of "
                                                    f"{', '.join(levels)}")
        if self.loss not in PYRAMID_LOSSES:
            raise _bad("--loss", self.loss, f"one of {', '.join(PYRAMID_LOSSES)}")
        if self.hint_epochs < 0:
            raise _bad("--hint-epochs", self.hint_epochs, "0 or more epochs of stage 1")
        if self.loss == "scratch" and self.hint_epochs:
            raise ConfigError("--loss scratch has no stage 1: drop --hint-epochs")


Derivation = Union[Fresh, Inherit, Distil, Trim, Pyramid]
_PARTS: dict[str, type] = {"data": DataSpec, "optim": OptimSpec, "loss": LossSpec, "runtime": RuntimeSpec}
#: The flat option names a spec takes beside its derivation (:meth:`RunSpec.of`).
SPEC_OPTIONS = frozenset({f.name for part in _PARTS.values() for f in fields(part)} | {"recipe", "out", "export"})
#: The JSON name of each derivation, and the recipe stage whose defaults it takes.
KINDS: dict[str, tuple[type, str]] = {"fresh": (Fresh, "stage1"), "inherit": (Inherit, "stage2"),
                                      "distil": (Distil, "stage2"), "trim": (Trim, "trim"),
                                      "pyramid": (Pyramid, "pyramid")}


@dataclass(frozen=True)
class RunSpec:
    """One training run. ``out`` is its run directory (``None``: ``runs/<name>``); ``export`` writes the deploy
    files at the end of a student's training."""

    derive: Derivation
    data: DataSpec = field(default_factory=DataSpec)
    optim: OptimSpec = field(default_factory=OptimSpec)
    loss: LossSpec = field(default_factory=LossSpec)
    runtime: RuntimeSpec = field(default_factory=RuntimeSpec)
    recipe: str = "ours"
    out: str | None = field(default=None, metadata=RESUMABLE)
    export: bool = field(default=True, metadata=RESUMABLE)

    @property
    def kind(self) -> str:
        return next(k for k, (cls, _) in KINDS.items() if isinstance(self.derive, cls))

    @property
    def stage(self) -> str:
        """The recipe stage whose defaults this run takes."""
        return KINDS[self.kind][1]

    def __post_init__(self) -> None:
        _normalise(self)

    def validate(self) -> RunSpec:
        """One-line :class:`ConfigError` for a field no run can use; returns the spec."""
        derivations = tuple(cls for cls, _ in KINDS.values())
        if not isinstance(self.derive, derivations):
            raise ConfigError(f"a run spec's derive (its first argument) must be one of "
                              f"{', '.join(c.__name__ for c in derivations)}, not {type(self.derive).__name__}")
        for name, cls in _PARTS.items():  # RunSpec(derive, OptimSpec(...)) passed the optimisation as the data
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"a run spec's {name} must be a {cls.__name__}, not "
                                  f"{type(getattr(self, name)).__name__}: pass the parts after the derivation by "
                                  f"name ({name}={cls.__name__}(...))")
        _check_types(self, skip=("derive", *_PARTS))
        if self.recipe not in RECIPES:
            raise _bad("--recipe", self.recipe, f"one of {', '.join(RECIPES)}")
        self.optim.validate(min_epochs=0 if self.kind == "trim" else 1)  # a trim without fine-tuning is a run
        for part in (self.derive, self.data, self.loss, self.runtime):
            part.validate()
        lambda_epochs = getattr(self.derive, "lambda_epochs", 0.0)
        if not 0 <= lambda_epochs <= self.optim.epochs:
            raise ConfigError(f"--lambda-epochs {lambda_epochs:g} must lie in [0, --epochs {self.optim.epochs}] "
                              "so that lambda reaches 1 before fusion")
        if self.kind == "fresh":
            self._check_no_distillation()
        return self

    def _check_no_distillation(self) -> None:
        """A model trained from its initialisation learns from cross-entropy alone: a loss option that differs from
        its default, and from the value its recipe sets (which the resolved ``spec.json`` holds), would be recorded
        but do nothing, so it is refused."""
        recipe = recipe_defaults(self.recipe, self.stage, general=self.general(), batch_size=self.data.batch_size)
        for f in fields(LossSpec):
            value = getattr(self.loss, f.name)
            if value != f.default and value != recipe.get(f.name) and value != ():
                raise ConfigError(f"{_option(self.loss, f.name)} {_show(value)} is a distillation option, but a "
                                  f"model trained from its initialisation ({type(self.derive).__name__}, "
                                  "python -m train.stage1) learns from cross-entropy alone: drop it, or distil a "
                                  "student (Inherit or Distil, python -m train.stage2)")

    def with_recipe(self) -> RunSpec:
        """Every field left ``None`` that the recipe sets, set (:mod:`train.recipes`): the one place of defaults."""
        defaults = recipe_defaults(self.recipe, self.stage, general=self.general(), batch_size=self.data.batch_size)

        def fill(part):
            given = {f.name: defaults[f.name] for f in fields(part)
                     if getattr(part, f.name) is None and f.name in defaults and defaults[f.name] is not None}
            return replace(part, **given)

        return replace(self, derive=fill(self.derive), data=fill(self.data), optim=fill(self.optim),
                       loss=fill(self.loss))

    def general(self) -> bool:
        """Whether a model trained from scratch is not a CIFAR zoo model or its data not CIFAR: ``ours`` then takes
        its rule for any classifier (:func:`train.recipes.ours`)."""
        model = getattr(self.derive, "model", None)
        return self.kind == "fresh" and (not is_zoo(model) or self.data.dataset == "imagefolder")

    def warmup_epochs(self) -> float:
        """The warm-up: ``optim.warmup_epochs``, else (a recipe that leaves it to the rule: ``ours`` for a student,
        or for any classifier but the CIFAR zoo's) 5% of the epochs, at least one (none for a single epoch)."""
        if self.optim.warmup_epochs is not None:
            return self.optim.warmup_epochs
        return max(1.0, 0.05 * self.optim.epochs) if self.optim.epochs > 1 else 0.0

    def train_config(self, **extra: Any) -> TrainConfig:
        """The engine's settings of this (resolved) spec; ``extra`` is recorded in summary.json. A Pyramid level
        trains its hint epochs before ``optim.epochs``."""
        epochs = self.optim.epochs + getattr(self.derive, "hint_epochs", 0)
        optim = replace(self.optim, warmup_epochs=self.warmup_epochs(), epochs=epochs)
        return make_train_config(optim, self.runtime, **extra)

    # ------------------------------------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """The JSON form (tuples as lists): what ``spec.json`` holds."""
        out = dataclasses.asdict(self)
        out["derive"] = {"kind": self.kind, **out["derive"]}
        return json.loads(json.dumps(out))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def of(cls, derive: Derivation, **options: Any) -> RunSpec:
        """A spec from its derivation and flat option names (``epochs=30``, ``kd="dkd"``, ``device="cuda"``): each
        goes to the part that holds a field of its name. An unknown name is a :class:`ConfigError` naming it, so a
        table of specs built at import fails at import, not hours into a run."""
        parts: dict[str, dict[str, Any]] = {name: {} for name in _PARTS}
        top = {f.name for f in fields(cls)} - {"derive", *_PARTS}
        own: dict[str, Any] = {}
        for name, value in options.items():
            part = next((p for p, c in _PARTS.items() if name in {f.name for f in fields(c)}), None)
            if part is None and name not in top:
                raise ConfigError(f"a run spec has no option {name!r} (see train/spec.py)")
            (parts[part] if part else own)[name] = _tuple(value)
        return cls(derive=derive, **{p: _PARTS[p](**v) for p, v in parts.items()}, **own)

    def record(self) -> dict[str, Any]:
        """What makes two runs the same run: :meth:`to_dict` without the fields that cannot change what a run
        computes and whose default depends on the machine (``data.workers``). A finished run is marked with it."""
        return as_record(self.to_dict())

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> RunSpec:
        """The spec of a :meth:`to_dict` record; an unknown field or kind is one line naming it."""
        if not isinstance(record, dict) or not isinstance(record.get("derive"), dict):
            raise ConfigError("a run spec is a JSON object with a 'derive' object (see train/spec.py)")
        derive = dict(record["derive"])
        kind = derive.pop("kind", None)
        if kind not in KINDS:
            raise ConfigError(f"spec derive kind {kind!r} is not one of {', '.join(KINDS)}")
        parts = {"derive": _build(KINDS[kind][0], derive, "derive")}
        for name, part in _PARTS.items():
            parts[name] = _build(part, record.get(name, {}), name)
        rest = {k: v for k, v in record.items() if k not in ("derive", *parts)}
        return _build(cls, {**rest, **parts}, "spec")

    @classmethod
    def from_json(cls, text: str) -> RunSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as e:
            raise ConfigError(f"the spec is not JSON ({e.msg} at line {e.lineno}); write it as train.spec does")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """``cls(**values)`` with lists turned into the tuples the fields hold; an unknown field is one line."""
    if not isinstance(values, dict):
        raise ConfigError(f"spec {where} must be a JSON object, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"spec {where} has no field {unknown[0]!r}; its fields are {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    out = {}
    for k, v in values.items():
        if isinstance(v, list) and "tuple" in str(hints[k]):
            v = tuple(v)
        out[k] = v
    try:
        return cls(**out)
    except TypeError as e:
        raise ConfigError(f"spec {where}: {e}") from None


def as_record(spec_dict: Any) -> Any:
    """A spec's JSON form (or a record already) as :meth:`RunSpec.record` gives it: without ``data.workers``, and
    with the default of every field its part did not have yet (``runtime.cuda_graph``, added 2026-12-07), so a
    run marked finished before compares as the same run, as one marked with its whole JSON form does (the
    Pyramid's levels before 2026-12-06). Anything that is not a spec's JSON form is returned as it is."""
    if not (isinstance(spec_dict, dict) and isinstance(spec_dict.get("data"), dict)):
        return spec_dict
    out = dict(spec_dict)
    for name, cls in _PARTS.items():
        if isinstance(out.get(name), dict):
            added = {f.name: json.loads(json.dumps(f.default)) for f in fields(cls)
                     if f.name not in out[name] and f.default is not dataclasses.MISSING}
            out[name] = {**out[name], **added}
    out["data"] = {k: v for k, v in out["data"].items() if k != "workers"}
    return out


def resumable_fields(spec: RunSpec) -> set[str]:
    """The dotted paths of the fields a ``--resume`` may change (``optim.lr``, ``runtime.device``, ...)."""
    out = {f.name for f in fields(RunSpec) if f.metadata.get("resumable")}
    for part in ("data", "optim", "loss", "runtime", "derive"):
        out |= {f"{part}.{f.name}" for f in fields(getattr(spec, part)) if f.metadata.get("resumable")}
    return out


def differences(old: dict[str, Any], new: RunSpec, moved: frozenset[str] = frozenset()) -> list[str]:
    """``--option new (run: old)`` for every field of ``new`` that differs from the recorded spec ``old`` and that
    a resume may not change. ``moved``: the derivation's fields (``teacher``) naming a checkpoint found at another
    path with the bytes the run started with, which are the same checkpoint."""
    mine, allowed = new.to_dict(), resumable_fields(new) | {f"derive.{name}" for name in moved}
    made_by = (old.get("derive") or {}).get("kind")
    if made_by in COMMANDS and COMMANDS[made_by] != COMMANDS.get(mine["derive"].get("kind")):
        return [f"it is a run of python -m {COMMANDS[made_by]}: resume it with that command"]  # not every option
    out = []
    for part, values in mine.items():
        flat = values.items() if isinstance(values, dict) else [(None, values)]
        for name, value in flat:
            path = f"{part}.{name}" if name else part
            before = old.get(part, {}).get(name) if name else old.get(part)
            if path in allowed or _same(before, value):
                continue
            key = (type(new.derive), name) if part == "derive" else None
            option = "--" + _CLI_NAMES.get(key, name or part).replace("_", "-")
            out.append(f"{option} {_show(value)} (run: {_show(before)})")
    return out


#: The command that trains each kind of derivation.
COMMANDS = {"fresh": "train.stage1", "inherit": "train.stage2", "distil": "train.stage2", "trim": "train.trim",
            "pyramid": "train.pyramid"}

#: The command-line option of a derivation's field whose name is not the option's.
_CLI_NAMES = {(Inherit, "teacher"): "inherit", (Pyramid, "top"): "teacher"}


def _same(a: Any, b: Any) -> bool:
    return same_record(json.loads(json.dumps(a)), json.loads(json.dumps(b)))  # two names of one teacher file agree


def _show(v: Any) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)


def make_train_config(optim: OptimSpec, runtime: RuntimeSpec, **extra: Any) -> TrainConfig:
    """The engine's settings of resolved ``optim`` and ``runtime``; ``extra`` is recorded in summary.json."""
    return TrainConfig(epochs=optim.epochs, lr=optim.lr, wd=optim.wd, optimizer=optim.optimizer,
                       nesterov=optim.nesterov, schedule=optim.schedule, milestones=tuple(optim.milestones),
                       gamma=optim.gamma, warmup_epochs=optim.warmup_epochs or 0.0, seed=optim.seed,
                       amp=bool(runtime.amp), compile=runtime.compile, compile_mode=runtime.compile_mode,
                       cuda_graph=runtime.cuda_graph,
                       channels_last=runtime.channels_last, sync_bn=runtime.sync_bn, extra=extra)


def spec_parts(options: dict[str, Any]) -> dict[str, Any]:
    """``{"data", "optim", "loss", "runtime"}`` from parsed command-line options (``vars(args)``): each field takes
    the option of its name."""
    def part(cls):
        return cls(**{f.name: _tuple(options[f.name]) for f in fields(cls) if f.name in options})

    return {"data": part(DataSpec), "optim": part(OptimSpec), "loss": part(LossSpec), "runtime": part(RuntimeSpec)}


def from_options(options: dict[str, Any], derive: Derivation) -> RunSpec:
    """A spec from parsed command-line options (``vars(args)``) and the derivation they name."""
    return RunSpec(derive=derive, recipe=options.get("recipe", "ours"), out=options.get("out"),
                   export=not options.get("no_export", False), **spec_parts(options))


def options_of(spec: RunSpec) -> dict[str, Any]:
    """The command-line options (``dest -> value``) that give ``spec``: the inverse of :func:`from_options`; what
    ``args.json`` records as ``args``, and the defaults that ``--config`` sets before the command line's options."""
    out: dict[str, Any] = {}
    for part in (spec.data, spec.optim, spec.loss, spec.runtime):
        out.update(dataclasses.asdict(part))
    derive = dataclasses.asdict(spec.derive)
    if spec.kind in ("inherit", "distil"):
        teacher = derive.pop("teacher")
        derive.update(inherit=teacher if spec.kind == "inherit" else None,
                      teacher=teacher if spec.kind == "distil" else None)
    out.update(derive, recipe=spec.recipe, out=spec.out, no_export=not spec.export)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


def load_spec(path: str | Path) -> RunSpec:
    """The spec in ``path``: a spec JSON file, or a run directory's ``spec.json``."""
    p = Path(path)
    file = p / "spec.json" if p.is_dir() else p
    try:
        text = file.read_text()
    except OSError as e:
        hint = " (runs made before specs have none: repeat their command, in args.json)" if p.is_dir() else ""
        raise ConfigError(f"--config {path}: cannot read {file} ({e.strerror}){hint}") from None
    return RunSpec.from_json(text)
