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

from typing import Any

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "ours": {
        "stage1": {"lr": 0.1, "wd": 1e-4, "schedule": "cosine", "warmup_epochs": 0.0, "normalize": "dataset",
                   "init": "kaiming", "optimizer": "sgd"},
        # fine-tuning an inherited network: warm-up over 5% of the epochs (>= 1) to half the teacher's lr
        "stage2": {"lr": 0.05, "wd": 1e-4, "schedule": "cosine", "warmup_epochs": None, "normalize": "dataset",
                   "kd_reduction": "batchmean", "optimizer": "sgd"},
        # fine-tuning a trimmed network: Torch-Pruning's CIFAR recipe uses lr 0.01 (step decay); ours is cosine
        "trim": {"lr": 0.01, "wd": 1e-4, "schedule": "cosine", "warmup_epochs": 0.0, "normalize": "dataset",
                 "kd_reduction": "batchmean", "optimizer": "sgd"},
        # the Pyramid's levels: its original's Adam, lr 1e-4, weight decay 5e-4 (with cosine instead of its
        # ReduceLROnPlateau and early stopping, so that a level has a fixed budget)
        "pyramid": {"lr": 1e-4, "wd": 5e-4, "schedule": "cosine", "warmup_epochs": 0.0, "normalize": "dataset",
                    "kd_reduction": "batchmean", "optimizer": "adam"},
    },
    "reducenet-paper": {
        "stage1": {"lr": 0.1, "wd": 1e-4, "schedule": "cosine-epoch", "warmup_epochs": 0.0, "normalize": "none",
                   "init": "torch", "optimizer": "sgd"},
        "stage2": {"lr": 0.1, "wd": 1e-4, "schedule": "cosine-epoch", "warmup_epochs": 0.0, "normalize": "none",
                   "kd_alpha": 0.7, "kd_T": 5.0, "kd_reduction": "mean", "optimizer": "sgd"},
        "trim": {"lr": 0.01, "wd": 1e-4, "schedule": "cosine-epoch", "warmup_epochs": 0.0, "normalize": "none",
                 "kd_alpha": 0.7, "kd_T": 5.0, "kd_reduction": "mean", "optimizer": "sgd"},
        "pyramid": {"lr": 1e-4, "wd": 5e-4, "schedule": "cosine", "warmup_epochs": 0.0, "normalize": "none",
                    "kd_reduction": "mean", "optimizer": "adam"},
    },
}
