"""Named training recipes: the defaults of stage 1 and stage 2, chosen with ``--recipe``.

``ours`` (the default) is the project's recipe. ``reducenet-paper`` is what the original ReduceNet's
``main.py`` (ohmydroid/reducenet) did, read from its code:

* inputs not normalised (``ToTensor()`` values in [0, 1]; its ``Normalize`` line is commented out);
* PyTorch's default conv init (its ``_weights_init`` is commented out);
* SGD momentum 0.9 Nesterov, lr 0.1, weight decay 1e-4, batch 128, random crop (pad 4) + flip, 200 epochs;
* ``CosineAnnealingLR(T_max=epochs)`` stepped once per epoch, no warm-up, in both stages;
* stage 2: the student inherits every teacher tensor and is distilled with
  ``0.7 * 25 * nn.KLDivLoss()(log_softmax(s / 5), softmax(t / 5)) + 0.3 * CE``, whose default ``mean``
  reduction averages over N * C elements: 1/C of Hinton's ``batchmean`` term (``--kd-reduction mean``);
  no LoRA (its released code has ``lora = 0``; our ``--lora-rank`` default is 0 too).

What remains different: the original drew its batches with a ``DataLoader`` and seed 666, ours with the
project's loader (same augmentation) and ``--seed``.

Options given on the command line always win over the recipe.
"""
from __future__ import annotations

from typing import Any, Callable

#: The stages a recipe gives defaults for: one per kind of run (see ``train.spec.KINDS``).
STAGES = ("stage1", "stage2", "trim", "pyramid")


def ours(stage: str) -> dict[str, Any]:
    """The project's defaults for ``stage``: spec field -> value (``None``: the spec's own rule, e.g. stage 2's
    warm-up of 5% of the epochs, at least one)."""
    common = {"wd": 1e-4, "schedule": "cosine", "warmup_epochs": 0.0, "normalize": "dataset", "optimizer": "sgd",
              "kd_reduction": "batchmean"}
    return {
        "stage1": {**common, "lr": 0.1, "init": "kaiming", "kd_reduction": None},
        # fine-tuning an inherited network: warm-up over 5% of the epochs (>= 1) to half the teacher's lr
        "stage2": {**common, "lr": 0.05, "warmup_epochs": None},
        # fine-tuning a trimmed network: Torch-Pruning's CIFAR recipe uses lr 0.01 (step decay); ours is cosine
        "trim": {**common, "lr": 0.01},
        # the Pyramid's levels: its original's Adam, lr 1e-4, weight decay 5e-4 (with cosine instead of its
        # ReduceLROnPlateau and early stopping, so that a level has a fixed budget)
        "pyramid": {**common, "lr": 1e-4, "wd": 5e-4, "optimizer": "adam"},
    }[stage]


def reducenet_paper(stage: str) -> dict[str, Any]:
    """The original ReduceNet's ``main.py`` for ``stage`` (see the module docstring); its trim and Pyramid stages
    keep the original's inputs and KD loss with our optimiser settings of those stages."""
    common = {"wd": 1e-4, "schedule": "cosine-epoch", "warmup_epochs": 0.0, "normalize": "none", "optimizer": "sgd",
              "kd_alpha": 0.7, "kd_T": 5.0, "kd_reduction": "mean"}
    return {
        "stage1": {**common, "lr": 0.1, "init": "torch", "kd_alpha": None, "kd_T": None, "kd_reduction": None},
        "stage2": {**common, "lr": 0.1},
        "trim": {**common, "lr": 0.01},
        "pyramid": {**common, "lr": 1e-4, "wd": 5e-4, "schedule": "cosine", "optimizer": "adam", "kd_alpha": None,
                    "kd_T": None},
    }[stage]


#: ``--recipe NAME`` -> the function that gives its defaults per stage: the one place of every default.
RECIPES: dict[str, Callable[[str], dict[str, Any]]] = {"ours": ours, "reducenet-paper": reducenet_paper}


def defaults(recipe: str, stage: str) -> dict[str, Any]:
    """The defaults of ``recipe`` for ``stage`` (spec field -> value; ``None``: not set by the recipe)."""
    return RECIPES[recipe](stage)


def help_default(field: str, stage: str) -> str:
    """What ``--help`` says of an option the recipes set: ``"default: the recipe's; ours 0.1, reducenet-paper
    0.1"``, read from :data:`RECIPES`."""
    def show(v: Any) -> str:
        if v is None:
            return "5%% of --epochs, >= 1" if field == "warmup_epochs" else "the loss's"
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = ", ".join(f"{name} {show(defaults(name, stage).get(field))}" for name in RECIPES)
    return f"default: the recipe's; {values}"
