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


def ours(stage: str, general: bool = False, batch_size: int = 128) -> dict[str, Any]:
    """The project's defaults for ``stage``: spec field -> value (``None``: the spec's own rule, a warm-up of 5% of
    the epochs, at least one).

    ``general``: a model trained from scratch that is not a CIFAR zoo model, or data that is not CIFAR (a
    torchvision or timm classifier, an image folder). The CIFAR ResNet recipe (lr 0.1 from the first step) left a
    ResNet-18 on 2,000 images at chance: a few steps per epoch give the BatchNorm statistics no time to settle at
    that rate. Such runs get the linear scaling rule (lr 0.1 per 256 images of batch, Goyal et al. 2017) and a
    linear warm-up over 5% of the epochs (at least one)."""
    if stage == "stage1" and general:
        return {**ours("stage1"), "lr": round(0.1 * batch_size / 256, 6), "warmup_epochs": None}
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


def reducenet_paper(stage: str, general: bool = False, batch_size: int = 128) -> dict[str, Any]:
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


#: ``--recipe NAME`` -> the function that gives its defaults per stage (and for other models or data, and the
#: batch size): the one place of every default.
RECIPES: dict[str, Callable[..., dict[str, Any]]] = {"ours": ours, "reducenet-paper": reducenet_paper}


def defaults(recipe: str, stage: str, general: bool = False, batch_size: int = 128) -> dict[str, Any]:
    """The defaults of ``recipe`` for ``stage`` (spec field -> value; ``None``: not set by the recipe);
    ``general``: a model or data other than the CIFAR zoo's (see :func:`ours`)."""
    return RECIPES[recipe](stage, general=general, batch_size=batch_size)


def help_default(field: str, stage: str) -> str:
    """What ``--help`` says of an option the recipes set: ``"default: the recipe's; ours 0.1, reducenet-paper
    0.1"``, read from :data:`RECIPES`."""
    def show(v: Any) -> str:
        if v is None:
            return "5%% of --epochs, >= 1" if field == "warmup_epochs" else "the loss's"
        return f"{v:g}" if isinstance(v, float) else str(v)

    values = ", ".join(f"{name} {show(defaults(name, stage).get(field))}" for name in RECIPES)
    general = defaults("ours", stage, general=True).get(field)
    if general != defaults("ours", stage).get(field):  # what other models or data get
        rule = "0.1 x --batch-size / 256" if field == "lr" else show(general)
        values += f"; ours for a torchvision/timm model or an image folder: {rule}"
    return f"default: the recipe's; {values}"
